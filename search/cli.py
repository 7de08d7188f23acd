"""Command line: parses arguments, calls the modules, turns known errors into one-line messages.

Heavy imports (Keras, Optuna) happen inside the commands, so `search --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from search.errors import SearchError
from search.settings import Settings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ banner out of logs


def _common(parser: argparse.ArgumentParser) -> None:
    """Options that map onto Settings; unset ones fall back to SEARCH_* variables, then defaults."""
    g = parser.add_argument_group("settings (else SEARCH_<NAME> environment variables)")
    g.add_argument(
        "--storage", help="study storage URL (default sqlite:///study_db/search.sqlite3)"
    )
    g.add_argument("--study", help="study name (default rare-species)")
    g.add_argument("--data-dir", dest="data_dir", type=Path, help="prepared data (data/prepared)")
    g.add_argument("--features-dir", dest="features_dir", type=Path, help="feature cache")
    g.add_argument("--models-dir", dest="models_dir", type=Path, help="registry (models)")
    g.add_argument("--artifacts-dir", dest="artifacts_dir", type=Path, help="artifact store")


def _settings(args: argparse.Namespace) -> Settings:
    names = [
        "storage", "study", "data_dir", "features_dir", "models_dir", "artifacts_dir", "weights",
        "space_file", "max_epochs", "feature_views", "seed", "pruner", "heartbeat_interval",
        "grace_period", "max_retry", "gpus", "gpu_wait",
    ]  # fmt: skip
    return Settings.load({name: getattr(args, name, None) for name in names})


def cmd_synth(args: argparse.Namespace) -> int:
    from search.synth import generate

    path = generate(
        args.out,
        n_families=args.families,
        image_px=args.image_px,
        seed=args.seed,
        as_zip=args.zip,
        total_images=args.images,
        style=args.style,
        real_shape=args.real_shape,
        labels=args.labels,
        sizes=args.sizes,
        workers=args.workers if args.workers is not None else (os.cpu_count() or 1),
        progress=True,
    )
    print(f"wrote synthetic data set to {path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from search.dataset import prepare

    out = args.out if args.out is not None else _settings(args).data_dir
    report = prepare(
        args.source,
        out,
        image_size=args.image_size,
        split_by=args.split_by,
        fractions=tuple(args.fractions),
        seed=args.seed or 0,
        workers=args.workers,
    )
    print(report.summary())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from search.worker import StopFlag, run_worker

    with StopFlag().installed() as stop:
        report = run_worker(_settings(args), args.n_trials, args.timeout, stop)
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(report.trials.items()))
    print(f"worker done ({report.stopped_by}) in {report.seconds:.0f}s: {counts or 'no trials'}")
    if report.stopped_by == "memory":
        _start_afresh(args.timeout, report.seconds)
    return 0


def _start_afresh(timeout: float | None, spent: float) -> None:
    """Replace this process with the same worker command (os.execv: the same PID, so compose
    and tini see one worker): its memory starts from nothing, the study's budget carries on,
    and a --timeout keeps counting from the first start."""
    argv = list(sys.argv)
    if timeout is not None:
        if "--timeout" in argv:
            at = argv.index("--timeout")
            del argv[at : at + 2]
        argv = [a for a in argv if not a.startswith("--timeout=")]
        argv += ["--timeout", f"{max(1.0, timeout - spent):.0f}"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv])


def cmd_promote(args: argparse.Namespace) -> int:
    from search.registry import describe_champion, promote_best

    settings = _settings(args)
    result = promote_best(settings, force=args.force, ensemble=args.ensemble, tta=args.tta)
    what = describe_champion(result)
    if not result["promoted"]:
        print(f"{what} of study {result['study']} is already the champion")
        return 0
    test = result["test"]
    print(
        f"promoted {what} of study {result['study']} "
        f"as {result['version']}: test accuracy {test['accuracy']:.3f}, "
        f"macro-F1 {test['macro_f1']:.3f}, top-5 {test['top5_accuracy']:.3f}"
    )
    previous = result.get("previous") or {}
    if previous.get("delta"):
        d = previous["delta"]
        print(
            f"vs previous champion {previous['version']}: macro-F1 {d['macro_f1']:+.3f}, "
            f"accuracy {d['accuracy']:+.3f}"
        )
    folder = Path(settings.models_dir) / "history" / result["version"]
    print(f"model card: {folder / 'MODEL_CARD.md'}")
    print(f"reports: {folder / 'reports' / 'index.html'} (confusion matrix, error gallery)")
    return 0


def _ensemble_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(
            f"expected a number of trials (1 or more) or auto, got {value!r}"
        )
    return size


def cmd_predict(args: argparse.Namespace) -> int:
    from search.predict import expand, predict_paths, write
    from search.registry import load_champion

    settings = _settings(args)
    champion = load_champion(settings.models_dir, args.model)
    paths = expand(args.images)
    results, skipped = predict_paths(champion, paths, args.top_k)
    if args.output:
        with open(args.output, "w", newline="") as out:
            write(results, args.format, out)
    else:
        write(results, args.format)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if skipped:
        print(
            f"predicted {len(results)} images, skipped {len(skipped)} unreadable", file=sys.stderr
        )
    if not results:
        print("error: no readable image among the inputs", file=sys.stderr)
        return 2
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    from search.rerun import rerun

    values, number = rerun(_settings(args), args.trial)

    def show(value: float | None) -> str:
        return "none (pruned or failed)" if value is None else f"{value:.4f}"

    print(
        f"re-ran trial {args.trial} as trial {number}: value {show(values['rerun'])} "
        f"(original {show(values['original'])})"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from search.status import collect, render

    report = collect(_settings(args))
    print(_dump(report) if args.json else render(report))
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from search.registry import history, render_history

    entries = history(_settings(args))
    print(_dump(entries) if args.json else render_history(entries))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from search.registry import rollback

    result = rollback(_settings(args), args.version)
    print(f"champion is now {result['version']} (was {result.get('previous')})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from search.registry import evaluate_champion

    result = evaluate_champion(_settings(args), args.model)
    print(_dump(result) if args.json else result["summary"])
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from search.finetune import finetune

    result = finetune(
        _settings(args),
        trial=args.trial,
        unfreeze=args.unfreeze,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
    )
    print(result["summary"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="search", description="Hyperparameter search for rare-species family classifiers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate a data set in the real rare_species.zip format")
    p.add_argument("out", type=Path, help="output folder (or .zip path with --zip)")
    p.add_argument("--families", type=int, default=None, help="number of families (default 12)")
    p.add_argument("--images", type=int, default=None, help="about this many images in all")
    p.add_argument(
        "--real-shape",
        dest="real_shape",
        action="store_true",
        help="every real family, species and count: 202 families, 400 species, 11,983 images",
    )
    p.add_argument(
        "--labels",
        type=Path,
        help="with the rows of this labels CSV (rare_species_labels.csv form): its families, "
        "species, counts and file names; implies --real-shape",
    )
    p.add_argument(
        "--sizes",
        choices=["fixed", "real"],
        default="fixed",
        help="fixed: about --image-px square (default); real: the real photos' spread of sizes "
        "(long side 297-8,688 px, median 1,710), a few grayscale, CMYK, EXIF-rotated; photos style",
    )
    p.add_argument("--image-px", dest="image_px", type=int, default=128, help="image side in px")
    p.add_argument(
        "--workers", type=int, default=None, help="drawing processes (default: all cores)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zip", action="store_true", help="write a zip like rare_species.zip")
    p.add_argument(
        "--style",
        choices=["coats", "photos"],
        default="coats",
        help="coats: a family is a coat texture, quick to learn (default); photos: a family is "
        "a body plan in field-photo-like scenes, where ImageNet features pay as on real photos",
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="validate, split and decode a data set into data/prepared")
    p.add_argument("source", type=Path, help="rare_species.zip or the folder it extracts to")
    p.add_argument("--out", type=Path, default=None, help="output folder (default data/prepared)")
    p.add_argument("--image-size", dest="image_size", type=int, default=224)
    p.add_argument("--split-by", dest="split_by", choices=["image", "species"], default="image")
    p.add_argument("--fractions", type=float, nargs=3, default=[0.72, 0.18, 0.10])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="decoding processes")
    _common(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("worker", help="run trials of the study until its budget is spent")
    _common(p)
    p.add_argument(
        "--n-trials",
        dest="n_trials",
        type=int,
        default=None,
        help="stop when the study holds this many complete or pruned trials",
    )
    p.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--weights", choices=["imagenet", "none"], help="backbone weights (imagenet)")
    p.add_argument("--space", dest="space_file", type=Path, help="TOML/JSON narrowing the space")
    p.add_argument("--max-epochs", dest="max_epochs", type=int)
    p.add_argument("--feature-views", dest="feature_views", type=int,
                   help="augmented feature views per training image (default 2)")  # fmt: skip
    p.add_argument("--pruner", choices=["median", "percentile", "hyperband", "sha", "none"])
    p.add_argument("--seed", type=int, help="base seed of trials and feature views")
    p.add_argument("--heartbeat-interval", dest="heartbeat_interval", type=int)
    p.add_argument("--grace-period", dest="grace_period", type=int)
    p.add_argument("--gpus", help='GPU indices to claim from, e.g. "0,1,2,3" (default: all seen)')
    p.add_argument(
        "--gpu-wait",
        dest="gpu_wait",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with more workers than GPUs, wait for a free one (default) or share",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("promote", help="promote the best trial to models/champion")
    _common(p)
    p.add_argument("--force", action="store_true", help="replace even a better champion")
    p.add_argument(
        "--ensemble",
        type=_ensemble_size,
        default=None,
        metavar="K|auto",
        help="promote the ensemble greedily selected (with replacement, on validation "
        "probabilities) from the K best trials; auto: from the 10 best, only if it beats the "
        "best trial on validation data it was not selected on",
    )
    p.add_argument(
        "--tta",
        choices=["none", "flip", "auto"],
        default="none",
        help="average each prediction with the mirrored photo's (flip), or when that scores "
        "higher on validation (auto)",
    )
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("predict", help="top-k families of photos from the champion")
    _common(p)
    p.add_argument("images", type=Path, nargs="+", help="image files or folders")
    p.add_argument("--top-k", dest="top_k", type=int, default=5)
    p.add_argument("--format", choices=["csv", "json"], default="csv")
    p.add_argument("--output", type=Path, help="write here instead of standard output")
    p.add_argument("--model", type=Path, help="a registry version folder instead of the champion")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("status", help="trials by state, best trial, throughput, live workers")
    _common(p)
    p.add_argument(
        "--grace-period",
        dest="grace_period",
        type=int,
        help="seconds without a heartbeat before a running trial counts as dead (default 30)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("registry", help="list every champion ever promoted")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser("rollback", help="make an earlier champion current again")
    _common(p)
    p.add_argument("version", nargs="?", help="version id (default: the one before the current)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("evaluate", help="test-split evaluation, reports and error gallery")
    _common(p)
    p.add_argument("--model", type=Path, help="a registry version folder (default: champion)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("finetune", help="unfreeze the top of the best trial's backbone")
    _common(p)
    p.add_argument("--trial", type=int, help="trial number (default: the best)")
    p.add_argument("--unfreeze", type=int, default=20, help="top layers to unfreeze")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--learning-rate", dest="learning_rate", type=float, default=1e-4)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("rerun", help="re-run a trial with its params and seed")
    _common(p)
    p.add_argument("trial", type=int, help="trial number")
    p.set_defaults(func=cmd_rerun)
    return parser


def run(argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv, build_parser())


def promote_best_main(argv: Sequence[str] | None = None) -> int:
    """`promote-best` is `search promote`."""
    return main(["promote", *(sys.argv[1:] if argv is None else argv)])


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


if __name__ == "__main__":
    sys.exit(main())
