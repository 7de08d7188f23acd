"""The measurement behind the default pruner (search/study.py make_pruner): the same budget of
trials on cached features with each pruner, the same sampler seed, the real trial objective.

"median" is make_pruner's median (the default); "median:S:W" is a MedianPruner with
n_startup_trials=S and n_warmup_steps=W (median:4:2 was the default before this measurement).
For every pruner and seed it prints the best validation macro-F1 reached, the test macro-F1 of
that best trial's head (validation-selected scores are optimistic), the epochs trained in all
(the cost that pruning saves; robust to other load on the machine) and the wall time.

    .venv/bin/python benchmarks/pruners.py [--trials 24] [--seeds 0 1] [--max-epochs 20]
        [--pruners none median median:4:2 percentile hyperband sha]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import WORK, log, machine, prepared

PRUNERS = ["none", "median", "median:4:2", "percentile", "hyperband", "sha"]
BACKBONES = ("efficientnet_lite0", "mobilenet_v2_tv")


def build(spec: str, env):
    """A name make_pruner knows (the service's settings), or "median:S:W", a MedianPruner with
    n_startup_trials=S and n_warmup_steps=W, to measure other settings of the default."""
    import optuna

    from search.study import make_pruner

    if spec.startswith("median:"):
        startup, warmup = (int(v) for v in spec.split(":")[1:])
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    return make_pruner(spec, env.settings.max_epochs)


def run(pruner: str, seed: int, env, trials: int) -> dict[str, float]:
    import keras
    import optuna
    from optuna.artifacts import download_artifact

    from search.features import load_or_compute
    from search.metrics import macro_f1
    from search.study import make_sampler
    from search.trial import TrialFailed, objective

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=make_sampler(seed), pruner=build(pruner, env)
    )
    started = time.perf_counter()
    study.optimize(lambda t: objective(t, env), n_trials=trials, catch=(TrialFailed,))
    seconds = time.perf_counter() - started
    states = [t.state.name for t in study.trials]
    best = study.best_trial
    feats = load_or_compute(
        env.data,
        best.params["backbone"],
        "imagenet",
        env.settings.features_dir,
        views=env.settings.feature_views,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "head.keras"
        download_artifact(
            artifact_store=env.artifact_store,
            file_path=str(path),
            artifact_id=best.user_attrs["checkpoint"],
        )
        head = keras.models.load_model(path, compile=False)
        probs = head.predict(feats.test.astype(np.float32), verbose=0)
    return {
        "best_val": float(best.value),
        "test": macro_f1(feats.test_labels, probs),
        "epochs": sum(int(t.user_attrs.get("epochs_run", 0)) for t in study.trials),
        "pruned": states.count("PRUNED"),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--pruners", nargs="+", default=PRUNERS)
    args = parser.parse_args()

    from optuna.artifacts import FileSystemArtifactStore

    from search import space as search_space
    from search.dataset import load_prepared
    from search.features import load_or_compute
    from search.settings import Settings
    from search.trial import TrialEnv

    print(f"pruners: {args.trials} trials each, sampler seeds {args.seeds}, {machine()}")
    data = load_prepared(prepared(20, 1200, 128, 96))
    features_dir = WORK / "features-pruners"
    for backbone in BACKBONES:  # computed once, before any timing
        load_or_compute(data, backbone, "imagenet", features_dir, views=2, log=log)
    space, _ = search_space.load_space(None)
    space["backbone"] = search_space.Categorical(BACKBONES)
    results: dict[str, list[dict[str, float]]] = {p: [] for p in args.pruners}
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        settings = Settings(
            features_dir=features_dir,
            weights="imagenet",
            max_epochs=args.max_epochs,
            feature_views=2,
        )
        env = TrialEnv(
            settings=settings,
            data=data,
            space=space,
            artifact_store=FileSystemArtifactStore(tmp),
            log=lambda message: None,
        )
        for seed in args.seeds:
            for pruner in args.pruners:
                r = run(pruner, seed, env, args.trials)
                results[pruner].append(r)
                print(
                    f"seed {seed} {pruner:>12}: best val macro-F1 {r['best_val']:.3f} "
                    f"(its test {r['test']:.3f}), {r['epochs']:4d} epochs, {r['pruned']:2d} "
                    f"pruned, {r['seconds']:5.0f}s",
                    flush=True,
                )
    print(f"mean over seeds {args.seeds} ({data.image_size} px, {len(data.classes)} families, "
          f"max {args.max_epochs} epochs):")  # fmt: skip
    base = statistics.mean(r["epochs"] for r in results["none"]) if "none" in results else None
    for pruner, rows in results.items():
        epochs = statistics.mean(r["epochs"] for r in rows)
        share = f" ({epochs / base:.0%} of none)" if base else ""
        print(
            f"  {pruner:>12}: best val {statistics.mean(r['best_val'] for r in rows):.3f}, "
            f"test {statistics.mean(r['test'] for r in rows):.3f}, "
            f"epochs {epochs:.0f}{share}, wall {statistics.mean(r['seconds'] for r in rows):.0f}s"
        )


if __name__ == "__main__":
    main()
