"""The worker loop: claim a GPU, join the study, run trials until the study's budget is spent,
stop cleanly.

Each trial runs inside `study.optimize(n_trials=1)`, so Optuna's heartbeat thread covers it and
stale trials of dead workers are failed (and retried) before each new trial; between trials the
loop checks the budget, the deadline and stop signals, and rides out storage outages: a trial cut
off by one is failed and queued again once the storage answers.

Keras loads only after the GPU claim (search.space and search.trial import it), so that
CUDA_VISIBLE_DEVICES is set before any backend starts.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from search.dataset import PreparedData, load_prepared
from search.errors import ConfigError, StorageError
from search.gpu import GpuClaim
from search.settings import Settings
from search.study import (
    TRANSIENT,
    create_or_load,
    is_transient,
    library_versions,
    open_artifact_store,
    open_storage,
    rdb_behind,
)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_OUTAGE_TRIES = 8  # about 2 minutes of backoff (1, 2, 4 ... 30 s) before the worker gives up


class StopFlag:
    """Set by SIGTERM/SIGINT; checked between batches, so a trial stops within one batch."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Handle SIGTERM/SIGINT while inside, then put the previous handlers back: a handler
        left behind in a process that runs a worker in-process (tests, notebooks) would be
        inherited by every process it forks later, which then ignore `terminate()`."""
        previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

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
    gpu: str | None = None


def rss_mb() -> float:
    """This process's resident memory (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def join_study(settings: Settings, data: PreparedData) -> tuple[optuna.Study, dict[str, Any]]:
    """Open the study and make sure this worker searches what the study was created for."""
    from search import space as search_space  # imports Keras

    storage = open_storage(settings)
    study = create_or_load(storage, settings)
    attrs = study.user_attrs
    if "data_hash" not in attrs:
        space, explicit = search_space.load_space(settings.space_file)
        space, left_out = search_space.resolve_backbones(
            space, settings.weights, data.image_size, "backbone" in explicit
        )
        if left_out:
            log(
                f"worker: left out of the search space (ImageNet weights not on this machine): "
                f"{', '.join(left_out)}; name them in a --space file to download them"
            )
        record = {
            "image_size": data.image_size,
            "classes": data.classes,
            "weights": settings.weights,
            "feature_seed": settings.seed,
            "feature_views": settings.feature_views,
            "max_epochs": settings.max_epochs,
            "split_by": data.info.get("split_by", "image"),
            "search_space": search_space.to_json(space),
            "versions": library_versions(),
            # Last: workers starting together take data_hash as "the record is complete".
            "data_hash": data.data_hash,
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


@contextlib.contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """Leave what lives as long as the worker (Keras, TensorFlow, the data, the study: about
    400,000 objects) out of garbage collection. Every full collection walks them: 0.2-0.3 s on
    this machine, twice a trial (Optuna's gc_after_trial and Keras's clear_session), a quarter
    of a head trial's time. One collection first, so only live objects are frozen
    (gc.freeze); put back at the end for a process that runs a worker in-process (tests)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_worker(
    settings: Settings,
    n_trials: int | None,
    timeout: float | None = None,
    stop: StopFlag | None = None,
    max_trials_here: int | None = None,
) -> WorkerReport:
    """Run trials until the study holds `n_trials` finished (complete or pruned) trials and no
    queued ones, this worker has run `max_trials_here`, the timeout passes, or a signal arrives.
    The GPU claimed first is held until the end, and released even when the process dies."""
    started = time.monotonic()
    stop = stop if stop is not None else StopFlag()
    report = WorkerReport()
    claim = GpuClaim(settings, stop=lambda: bool(stop), log=log)
    if not claim.acquire():
        report.stopped_by = "signal"
    else:
        try:
            report.gpu = claim.gpu
            _run(settings, n_trials, timeout, stop, max_trials_here, claim, report, started)
        finally:
            claim.release()
    report.seconds = time.monotonic() - started
    return report


def _run(
    settings: Settings,
    n_trials: int | None,
    timeout: float | None,
    stop: StopFlag,
    max_trials_here: int | None,
    claim: GpuClaim,
    report: WorkerReport,
    started: float,
) -> None:
    from search import space as search_space  # Keras loads here, after the GPU claim
    from search.trial import TrialEnv, TrialFailed, TrialInterrupted, objective

    data = load_prepared(settings.data_dir)
    study, attrs = join_study(settings, data)
    settings = settings.replace(
        weights=attrs["weights"],
        feature_views=int(attrs["feature_views"]),
        max_epochs=int(attrs["max_epochs"]),
    )
    env = TrialEnv(
        settings=settings,
        data=data,
        space=search_space.from_json(attrs["search_space"]),
        artifact_store=open_artifact_store(settings),
        feature_seed=int(attrs["feature_seed"]),
        stop_requested=lambda: bool(stop),
        log=log,
    )
    retry = RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry)
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    in_progress: dict[str, int] = {}  # the trial id this worker runs, until its result is told

    def run_one(trial: optuna.Trial) -> float:
        in_progress["trial_id"] = trial._trial_id
        try:
            return objective(trial, env, {"worker": worker_id, "gpu": claim.gpu})
        except TrialInterrupted as exc:
            requeue(study, study._storage.get_trial(trial._trial_id), retry)
            trial.set_user_attr("fail_reason", str(exc))
            raise
        except TrialFailed as exc:
            if exc.__cause__ is not None and is_transient(exc.__cause__):
                # The storage's fault, not the trial's: the outage path fails and requeues it.
                # A StorageError says so whatever the chain became: Keras re-raises errors from
                # callbacks `from None`, and re-raising the cause itself lost the connection
                # error storage_outage() looks for, so the worker died and the trial stayed
                # failed (fleet-test, PostgreSQL down during a report).
                raise StorageError(
                    f"storage lost during trial {trial.number}: {_first_line(exc.__cause__)}"
                ) from exc.__cause__
            if "fail_reason" not in trial.user_attrs:  # a NaN loss: the objective names no reason
                trial.set_user_attr("fail_reason", str(exc)[:500])
            log(f"trial {trial.number} failed: {exc}")
            raise

    def record(study: optuna.Study, trial: FrozenTrial) -> None:
        in_progress.pop("trial_id", None)
        report.trials[trial.state.name] = report.trials.get(trial.state.name, 0) + 1
        log(f"worker: trial {trial.number} {trial.state.name} value={trial.value}")

    outages_in_a_row = 0
    cut_off: int | None = None  # a trial a storage outage interrupted, to fail and requeue
    cut_off_in_ask = False  # cut_off was last started in `ask`: settle it only if still RUNNING
    log(f"worker: joined study {settings.study!r} ({len(data.classes)} families)")
    with long_lived_objects_frozen():
        while True:
            if stop:
                report.stopped_by = "signal"
                break
            if timeout is not None and time.monotonic() - started >= timeout:
                report.stopped_by = "timeout"
                break
            try:
                if cut_off is not None:
                    settle_cut_off_trial(study, cut_off, retry, only_if_running=cut_off_in_ask)
                    cut_off, cut_off_in_ask = None, False
                if n_trials is not None:
                    counts = study.get_trials(
                        deepcopy=False, states=(*FINISHED, TrialState.WAITING)
                    )
                    waiting = sum(t.state == TrialState.WAITING for t in counts)
                    if len(counts) - waiting >= n_trials and not waiting:
                        break  # queued retries and re-runs still run after the budget is met
                if max_trials_here is not None and sum(report.trials.values()) >= max_trials_here:
                    break
                if report.trials and rss_mb() > settings.worker_max_rss_mb:
                    log(
                        f"worker: {rss_mb():.0f} MB resident after {sum(report.trials.values())} "
                        f"trials (limit {settings.worker_max_rss_mb} MB): starting afresh"
                    )
                    report.stopped_by = "memory"
                    break
                study.optimize(
                    run_one,
                    n_trials=1,
                    catch=(TrialFailed, TrialInterrupted),
                    callbacks=[record],
                    gc_after_trial=True,
                )
                outages_in_a_row = 0
            except Exception as exc:
                if finished_elsewhere(exc):
                    in_progress.pop("trial_id", None)
                    log(f"worker: another worker failed this trial as stale: {exc}; going on")
                    continue
                if not storage_outage(exc):
                    raise
                cut_off = in_progress.pop("trial_id", cut_off)
                if cut_off is None:  # perhaps a trial it had just started in `ask`
                    cut_off = getattr(rdb_behind(study._storage), "last_started_trial_id", None)
                    cut_off_in_ask = True
                outages_in_a_row += 1
                if outages_in_a_row > MAX_OUTAGE_TRIES:
                    raise StorageError(
                        f"storage unreachable for too long: {_first_line(exc)}"
                    ) from None
                wait = min(30.0, 0.5 * 2**outages_in_a_row)
                log(f"worker: storage error ({_first_line(exc)}); retrying in {wait:.0f}s")
                resume_at = time.monotonic() + wait
                while not stop and time.monotonic() < resume_at:  # SIGTERM ends the wait
                    time.sleep(0.2)
        try:
            fail_stale_trials(study)  # dead workers' trials past their grace period: fail, requeue
        except Exception as exc:
            if not is_transient(exc):
                raise


def requeue(
    study: optuna.Study, trial: FrozenTrial, retry: RetryHeartbeatStaleTrialCallback
) -> None:
    """Queue a copy of `trial` (same params and seed) as Optuna's stale-trial retry does, so it
    counts towards the same max_retry; the copy starts without the original's fail_reason."""
    clean = copy.deepcopy(trial)
    clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != "fail_reason"}
    retry(study, clean)


def settle_cut_off_trial(
    study: optuna.Study,
    trial_id: int,
    retry: RetryHeartbeatStaleTrialCallback,
    only_if_running: bool = False,
) -> None:
    """After an outage: fail this worker's interrupted trial if it is still RUNNING, and requeue
    it unless someone (a worker that found it stale) already did. `only_if_running`: a trial
    last started in `ask`, which may have finished long before (a NaN loss, already FAIL)."""
    storage = study._storage
    trial = storage.get_trial(trial_id)
    if only_if_running and trial.state != TrialState.RUNNING:
        return
    if trial.state == TrialState.RUNNING:
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", "storage connection lost")
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            pass  # failed as stale by another worker meanwhile
        trial = storage.get_trial(trial_id)
    if trial.state != TrialState.FAIL:
        return  # its result was recorded before the outage
    retried = any(
        t.system_attrs.get("retry_history", [])[-1:] == [trial.number]
        for t in study.get_trials(deepcopy=False)
    )
    if not retried:
        requeue(study, trial, retry)
        log(f"worker: trial {trial.number} was cut off by a storage outage; queued again")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def storage_outage(exc: BaseException) -> bool:
    return isinstance(exc, StorageError) or is_transient(exc)


def finished_elsewhere(exc: BaseException) -> bool:
    """Our trial was failed by another worker that took it for stale (its heartbeat lapsed)."""
    return any(
        isinstance(e, UpdateFinishedTrialError)
        or (isinstance(e, ValueError) and str(e).startswith("Cannot tell a"))
        for e in _chain(exc)
    )


def _first_line(exc: BaseException) -> str:
    """What went wrong in one line: the lost connection itself when there is one, not the
    wrappers Optuna put around it."""
    root = next((e for e in _chain(exc) if isinstance(e, TRANSIENT)), exc)
    text = str(getattr(root, "orig", None) or root).strip().splitlines()
    return f"{type(root).__name__}: {text[0]}" if text else type(root).__name__
