"""What freezing the worker's long-lived objects (search.worker.long_lived_objects_frozen,
gc.freeze) saves per trial: the real worker loop (`run_worker`) over the same queued head trials on
cached features, once as it is and once with the freeze switched off, alternating, in one run.

Every trial makes two full garbage collections (Optuna's gc_after_trial, Keras's clear_session);
without the freeze each walks every object Keras, TensorFlow and the data made (~400,000).

    .venv/bin/python benchmarks/worker_overhead.py [--trials 10] [--rounds 2] [--max-epochs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from common import HEAD_PARAMS, WORK, log, machine, prepared

BACKBONE = "efficientnet_lite0"


def run(data_dir: Path, features_dir: Path, trials: int, max_epochs: int, frozen: bool) -> float:
    """Seconds per trial of one worker over `trials` queued head trials in a new study."""
    import search.worker
    from search.settings import Settings
    from search.study import create_or_load, open_storage

    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        settings = Settings(
            storage=f"sqlite:///{Path(tmp) / 'study.sqlite3'}",
            study="overhead",
            data_dir=data_dir,
            features_dir=features_dir,
            artifacts_dir=Path(tmp) / "artifacts",
            max_epochs=max_epochs,
            feature_views=1,
            pruner="none",
        )
        study = create_or_load(open_storage(settings, heartbeat=False), settings)
        for i in range(trials):
            study.enqueue_trial(
                {
                    **HEAD_PARAMS,
                    "backbone": BACKBONE,
                    "phylum_loss_weight": 0.0,
                    "learning_rate": 1e-3 * (1 + i % 3),
                }
            )
        switch = search.worker.long_lived_objects_frozen
        if not frozen:
            search.worker.long_lived_objects_frozen = contextlib.nullcontext
        try:
            started = time.perf_counter()
            report = search.worker.run_worker(settings, n_trials=trials)
            seconds = time.perf_counter() - started
        finally:
            search.worker.long_lived_objects_frozen = switch
        done = sum(report.trials.values())
        assert done == trials, report.trials
        return seconds / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-epochs", dest="max_epochs", type=int, default=5)
    args = parser.parse_args()

    from search.dataset import load_prepared
    from search.features import load_or_compute

    print(f"worker overhead: {args.trials} head trials x {args.rounds} rounds, {machine()}")
    data_dir = prepared(20, 1000, 128, 96)
    features_dir = WORK / "features-worker-overhead"
    load_or_compute(load_prepared(data_dir), BACKBONE, "imagenet", features_dir, views=1, log=log)
    per_trial: dict[bool, list[float]] = {True: [], False: []}
    run(data_dir, features_dir, 2, args.max_epochs, True)  # warm: imports, first traces
    for r in range(args.rounds):
        for frozen in (False, True) if r % 2 == 0 else (True, False):
            s = run(data_dir, features_dir, args.trials, args.max_epochs, frozen)
            per_trial[frozen].append(s)
            log(f"round {r + 1}: {'frozen' if frozen else 'not frozen'} {s:.2f} s/trial")
    off, on = statistics.median(per_trial[False]), statistics.median(per_trial[True])
    print(f"{args.max_epochs}-epoch head trials on cached features, one worker, median of rounds:")
    print(f"  long-lived objects not frozen: {off:.2f} s/trial ({3600 / off:,.0f} trials/hour)")
    print(f"  frozen (the worker as it is):  {on:.2f} s/trial ({3600 / on:,.0f} trials/hour)")
    print(f"  saved per trial: {off - on:.2f} s; trials/hour x{off / on:.2f}")


if __name__ == "__main__":
    main()
