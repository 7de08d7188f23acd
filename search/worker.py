"""The worker loop: join the study, run trials until the study's budget is spent, stop cleanly.

Each trial runs inside `study.optimize(n_trials=1)`, so Optuna's heartbeat thread covers it and
stale trials of dead workers are failed (and retried) before each new trial; between trials the
loop checks the budget, the deadline and stop signals, and rides out storage outages.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from search import space as search_space
from search.dataset import PreparedData, load_prepared
from search.errors import ConfigError, StorageError
from search.settings import Settings
from search.study import TRANSIENT, create_or_load, library_versions, open_storage
from search.trial import TrialEnv, TrialFailed, TrialInterrupted, objective

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class StopFlag:
    """Set by SIGTERM/SIGINT; checked between batches, so a trial stops within one batch."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C stops at once
        self.signal = signum
        log(f"worker: got signal {signal.Signals(signum).name}, finishing the current batch")


@dataclass
class WorkerReport:
    trials: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    stopped_by: str = "budget"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def join_study(settings: Settings, data: PreparedData) -> tuple[optuna.Study, dict[str, Any]]:
    """Open the study and make sure this worker searches what the study was created for."""
    storage = open_storage(settings)
    study = create_or_load(storage, settings)
    attrs = study.user_attrs
    if "data_hash" not in attrs:
        space, explicit = search_space.load_space(settings.space_file)
        space = search_space.resolve_backbones(
            space, settings.weights, data.image_size, "backbone" in explicit
        )
        record = {
            "data_hash": data.data_hash,
            "image_size": data.image_size,
            "classes": data.classes,
            "weights": settings.weights,
            "feature_seed": settings.seed,
            "feature_views": settings.feature_views,
            "max_epochs": settings.max_epochs,
            "split_by": data.info.get("split_by", "image"),
            "search_space": search_space.to_json(space),
            "versions": library_versions(),
        }
        for key, value in record.items():
            study.set_user_attr(key, value)
        attrs = study.user_attrs
    if attrs["data_hash"] != data.data_hash:
        raise ConfigError(
            f"study {settings.study!r} was created on prepared data {attrs['data_hash'][:12]}, "
            f"but {settings.data_dir} holds {data.data_hash[:12]}: use the same data, "
            "or a new --study"
        )
    return study, attrs


def run_worker(
    settings: Settings,
    n_trials: int | None,
    timeout: float | None = None,
    stop: StopFlag | None = None,
    max_trials_here: int | None = None,
) -> WorkerReport:
    """Run trials until the study holds `n_trials` finished (complete or pruned) trials, this
    worker has run `max_trials_here`, the timeout passes, or a signal arrives."""
    started = time.monotonic()
    stop = stop if stop is not None else StopFlag()
    data = load_prepared(settings.data_dir)
    study, attrs = join_study(settings, data)
    settings = settings.replace(
        weights=attrs["weights"],
        feature_views=int(attrs["feature_views"]),
        max_epochs=int(attrs["max_epochs"]),
    )
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    env = TrialEnv(
        settings=settings,
        data=data,
        space=search_space.from_json(attrs["search_space"]),
        artifact_store=FileSystemArtifactStore(str(settings.artifacts_dir)),
        feature_seed=int(attrs["feature_seed"]),
        stop_requested=lambda: bool(stop),
        log=log,
    )
    retry = RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry)

    def run_one(trial: optuna.Trial) -> float:
        try:
            return objective(trial, env)
        except TrialInterrupted as exc:
            trial.set_user_attr("fail_reason", str(exc))
            retry(study, study._storage.get_trial(trial._trial_id))  # queue it for another worker
            raise
        except TrialFailed as exc:
            log(f"trial {trial.number} failed: {exc}")
            raise

    report = WorkerReport()

    def record(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        report.trials[trial.state.name] = report.trials.get(trial.state.name, 0) + 1
        log(f"worker: trial {trial.number} {trial.state.name} value={trial.value}")

    failures_in_a_row = 0
    log(f"worker: joined study {settings.study!r} ({len(data.classes)} families)")
    while True:
        if stop:
            report.stopped_by = "signal"
            break
        if timeout is not None and time.monotonic() - started >= timeout:
            report.stopped_by = "timeout"
            break
        try:
            finished = len(study.get_trials(deepcopy=False, states=FINISHED))
            if n_trials is not None and finished >= n_trials:
                break
            if max_trials_here is not None and sum(report.trials.values()) >= max_trials_here:
                break
            study.optimize(
                run_one,
                n_trials=1,
                catch=(TrialFailed, TrialInterrupted),
                callbacks=[record],
                gc_after_trial=True,
            )
            failures_in_a_row = 0
        except (StorageError, *TRANSIENT) as exc:
            failures_in_a_row += 1
            if failures_in_a_row > 8:
                raise StorageError(f"storage unreachable for too long: {exc}") from None
            wait = min(30.0, 0.5 * 2**failures_in_a_row)
            log(f"worker: storage error ({type(exc).__name__}); retrying in {wait:.0f}s")
            time.sleep(wait)
            continue
    report.seconds = time.monotonic() - started
    return report
