"""Does the search pay? 30 trials over cached features of two offline ImageNet backbones vs
trials of the from-scratch baseline CNN, on the same generated data; each study's best trial is
promoted and scored on the test split. Then the pretrained study's best trial is fine-tuned
(`search finetune`: top 20 layers, lr 1e-4) and promoted again if it became the best.

Everything runs through the real service code: `run_worker` (SQLite study, feature cache,
artifact store, the default median pruner) and `promote_best`, in a fresh workspace under
benchmarks/results/cache/ (so the feature extraction is part of the pretrained study's time).

    .venv/bin/python benchmarks/search_pretrained_vs_scratch.py [--trials 30] [--scratch-trials 8]
        [--image-px 192 --image-size 160] [--style photos] [--pruner median] [--finetune-epochs 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import WORK, log, machine, prepared

PRETRAINED = ["efficientnet_lite0", "mobilenet_v2_tv"]


def run_study(root: Path, data_dir: Path, name: str, backbones: list[str], trials: int, args):
    """Run one study to `trials` finished trials, promote its best; return a report row."""
    from optuna.trial import TrialState

    from search.registry import promote_best
    from search.settings import Settings
    from search.study import load, open_storage
    from search.worker import run_worker

    space = root / f"{name}.toml"
    space.write_text(f"[space]\nbackbone = {json.dumps(backbones)}\n")
    settings = Settings(
        storage=f"sqlite:///{root / 'search.sqlite3'}",
        study=name,
        data_dir=data_dir,
        features_dir=root / "features",
        models_dir=root / f"models-{name}",
        artifacts_dir=root / "artifacts",
        weights="imagenet",
        space_file=space,
        max_epochs=args.max_epochs,
        feature_views=args.feature_views,
        pruner=args.pruner,
    )
    started = time.perf_counter()
    run_worker(settings, n_trials=trials)
    seconds = time.perf_counter() - started
    study = load(open_storage(settings, heartbeat=False), settings)
    states = [t.state for t in study.trials]
    epochs = sum(int(t.user_attrs.get("epochs_run", 0)) for t in study.trials)
    best_by_backbone: dict[str, float] = {}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        b = t.params["backbone"]
        best_by_backbone[b] = max(best_by_backbone.get(b, 0.0), float(t.value))
    best_val = study.best_value  # before fine-tuning adds a trial
    promoted = promote_best(settings, force=True)
    tuned = None
    if name == "pretrained" and args.finetune_epochs > 0:
        from search.finetune import finetune

        log(f"fine-tuning the best trial: top 20 layers, {args.finetune_epochs} epochs, lr 1e-4")
        result = finetune(
            settings, unfreeze=20, epochs=args.finetune_epochs, learning_rate=1e-4, log=log
        )
        after = promote_best(settings, force=True)
        tuned = {**result, "champion": f"trial {after['trial']}", "test": after["test"]}
    return {
        "study": name,
        "seconds": seconds,
        "complete": states.count(TrialState.COMPLETE),
        "pruned": states.count(TrialState.PRUNED),
        "failed": states.count(TrialState.FAIL),
        "epochs": epochs,
        "best_val": best_val,
        "best_by_backbone": best_by_backbone,
        "champion": f"trial {promoted['trial']} ({promoted['backbone']})",
        "test": promoted["test"],
        "finetuned": tuned,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--scratch-trials", type=int, default=8)
    parser.add_argument("--families", type=int, default=20)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--feature-views", type=int, default=2)
    parser.add_argument("--image-px", type=int, default=192, help="side of the generated images")
    parser.add_argument("--pruner", default="median", help="the service's default: median")
    parser.add_argument("--style", default="photos", help="search synth --style (photos, coats)")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="0: no fine-tuning")
    args = parser.parse_args()

    from search.dataset import load_prepared

    print(f"search: pretrained (cached features) vs from scratch, {machine()}")
    data_dir = prepared(
        args.families, args.images, args.image_px, args.image_size, style=args.style
    )
    data = load_prepared(data_dir)
    n = {s: len(data.indices(s)) for s in ("train", "val", "test")}
    print(f"data: {args.style} style, {len(data.classes)} families, train {n['train']}, "
          f"val {n['val']}, test {n['test']} at {data.image_size} px; "
          f"max {args.max_epochs} epochs, {args.pruner} pruner, "
          f"{args.feature_views} augmented feature views")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="search-", dir=WORK))
    try:
        rows = []
        log(f"pretrained study: {args.trials} trials over {', '.join(PRETRAINED)}")
        rows.append(run_study(root, data_dir, "pretrained", PRETRAINED, args.trials, args))
        log(f"scratch study: {args.scratch_trials} trials of baseline_cnn")
        rows.append(
            run_study(root, data_dir, "scratch", ["baseline_cnn"], args.scratch_trials, args)
        )
        caches = sorted((root / "features").glob("*/meta.json"))
        extraction = [json.loads(p.read_text()) for p in caches]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for meta in extraction:
        print(f"feature cache {meta['backbone']}: {sum(meta['counts'].values())} images "
              f"(+{meta['views']} views of train) in {meta['seconds']:.0f}s")  # fmt: skip
    for r in rows:
        per = ", ".join(f"{b} {v:.3f}" for b, v in sorted(r["best_by_backbone"].items()))
        print(
            f"{r['study']:>10}: {r['complete'] + r['pruned']} trials ({r['complete']} complete, "
            f"{r['pruned']} pruned, {r['failed']} failed), {r['epochs']} epochs in "
            f"{r['seconds'] / 60:.1f} min; best val macro-F1 {r['best_val']:.3f} ({per}); "
            f"champion {r['champion']}: test macro-F1 {r['test']['macro_f1']:.3f}, "
            f"accuracy {r['test']['accuracy']:.3f}"
        )
    tuned = rows[0]["finetuned"]
    if tuned:
        print(
            f"fine-tuned trial {tuned['finetuned_from']} ({tuned['seconds']:.0f}s): val macro-F1 "
            f"{tuned['before']:.3f} -> {tuned['after']:.3f}; champion then {tuned['champion']}: "
            f"test macro-F1 {tuned['test']['macro_f1']:.3f}"
        )
    pre, scratch = rows[0]["test"]["macro_f1"], rows[1]["test"]["macro_f1"]
    verdict = "pretrained wins" if pre > scratch else "NOT better"
    print(f"test macro-F1: pretrained champion {pre:.3f} vs best from-scratch {scratch:.3f} "
          f"({pre - scratch:+.3f}): {verdict}")  # fmt: skip
    if tuned:
        best = tuned["test"]["macro_f1"]
        print(f"with fine-tuning: {best:.3f} vs {scratch:.3f} ({best - scratch:+.3f})")


if __name__ == "__main__":
    main()
