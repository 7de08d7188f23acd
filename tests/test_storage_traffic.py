"""What a trial writes to and reads from the study storage, on PostgreSQL and SQLite: the
parameters written together, reports as upserts, the attributes and artifact records of a
trial's end written together, `ask` without reading the queue or its new trial back, and the
pruner's one study read per trial. Each keeps Optuna's checks, so a finished trial and a
clashing distribution are still refused."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from sqlalchemy import event

from search.settings import Settings
from search.study import (
    attrs_together,
    create_or_load,
    make_pruner,
    open_storage,
    params_together,
    reports_together,
    set_user_attrs,
)
from tests.test_postgres import fresh_database

BACKENDS = ["postgresql", "sqlite"]


@contextmanager
def study_on(backend: str, tmp_path: Path, name: str = "traffic") -> Iterator[optuna.Study]:
    with fresh_database() as url:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / 'traffic.sqlite3'}"
        settings = Settings(storage=url, study=name)
        yield create_or_load(open_storage(settings, heartbeat=False), settings)


def stored(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """The trial as another worker reads it: a fresh storage object, no cache shared."""
    again = optuna.load_study(study_name=study.study_name, storage=study._storage._backend.url)
    return again.trials[number]


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_written_together_reach_the_storage_at_the_end_of_the_block(
    backend: str, tmp_path: Path
) -> None:
    with study_on(backend, tmp_path) as study:
        trial = study.ask()
        with params_together(trial):
            x = trial.suggest_float("x", 0.0, 1.0)
            n = trial.suggest_int("n", 1, 4)
            kind = trial.suggest_categorical("kind", ["a", "b"])
            assert trial.params == {"x": x, "n": n, "kind": kind}  # the trial sees them at once
            assert stored(study, 0).params == {}  # the storage not yet
        assert stored(study, 0).params == {"x": x, "n": n, "kind": kind}
        later = trial.suggest_float("later", 0.0, 1.0)  # outside the block: written at once
        assert stored(study, 0).params["later"] == later
        study.tell(trial, 0.5)
        assert stored(study, 0).state == TrialState.COMPLETE


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_together_keep_optunas_checks(backend: str, tmp_path: Path) -> None:
    """A parameter name reused with another kind of distribution is refused, as one by one."""
    with study_on(backend, tmp_path) as study:
        first = study.ask()
        first.suggest_float("x", 0.0, 1.0)
        study.tell(first, 0.1)
        clash = optuna.load_study(study_name=study.study_name, storage=study._storage)
        second = clash.ask()
        with pytest.raises(ValueError, match="[Cc]annot set different distribution kind"):
            with params_together(second):
                second.suggest_categorical("x", ["a", "b"])
        done = study.ask()
        study.tell(done, 0.2)
        with pytest.raises(UpdateFinishedTrialError):
            with params_together(done):
                done.suggest_float("y", 0.0, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reports_store_every_kind_of_value_and_refuse_a_finished_trial(
    backend: str, tmp_path: Path
) -> None:
    with study_on(backend, tmp_path) as study:
        trial = study.ask()
        for step, value in enumerate([0.25, math.inf, -math.inf, math.nan], start=1):
            trial.report(value, step)
        study._storage.set_trial_intermediate_value(trial._trial_id, 1, 0.75)  # a step again
        values = stored(study, 0).intermediate_values
        assert values[1] == 0.75 and values[2] == math.inf and values[3] == -math.inf
        assert math.isnan(values[4]) and len(values) == 4
        study.tell(trial, 0.5)
        with pytest.raises(UpdateFinishedTrialError):
            study._storage.set_trial_intermediate_value(trial._trial_id, 5, 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reports_together_reach_the_storage_in_one_write_every_few_seconds_and_at_the_end(
    backend: str, tmp_path: Path
) -> None:
    with study_on(backend, tmp_path) as study:
        engine = study._storage._backend.engine
        writes: list[str] = []

        def count(conn, cursor, statement, params, context, executemany) -> None:  # noqa: ANN001
            if "INSERT INTO trial_intermediate_values" in statement:
                writes.append(statement)

        event.listen(engine, "before_cursor_execute", count)
        trial = study.ask()
        with reports_together(trial, every_s=3600):
            for step in range(1, 6):
                trial.report(step / 10, step)
            assert not trial.should_prune()  # the trial's own check reads its reports from memory
            assert stored(study, 0).intermediate_values == {}  # the storage not yet
        assert stored(study, 0).intermediate_values == {s: s / 10 for s in range(1, 6)}
        assert len(writes) == 1

        later = study.ask()
        with reports_together(later, every_s=2.0):
            later.report(0.1, 1)
            assert stored(study, 1).intermediate_values == {}
            time.sleep(2.1)
            later.report(0.2, 2)  # two seconds on: both written now, without waiting for the end
            assert stored(study, 1).intermediate_values == {1: 0.1, 2: 0.2}
            later.report(0.3, 3)
        assert stored(study, 1).intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3}

        at_once = study.ask()
        with reports_together(at_once, every_s=0.0):  # what an end-to-end trial uses
            at_once.report(0.4, 1)
            assert stored(study, 2).intermediate_values == {1: 0.4}
        event.remove(engine, "before_cursor_execute", count)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_trial_pruned_inside_reports_together_keeps_its_curve_and_value(
    backend: str, tmp_path: Path
) -> None:
    """The block is left by the exception that prunes the trial; its reports are written on
    the way out, so tell() gives the pruned trial its last report as value (Optuna's rule)."""
    with study_on(backend, tmp_path) as study:
        trial = study.ask()
        with pytest.raises(optuna.TrialPruned):
            with reports_together(trial, every_s=3600):
                trial.report(0.3, 1)
                trial.report(0.2, 2)
                raise optuna.TrialPruned()
        study.tell(trial, state=TrialState.PRUNED)
        pruned = stored(study, 0)
        assert pruned.intermediate_values == {1: 0.3, 2: 0.2} and pruned.value == 0.2

        done = study.ask()
        study.tell(done, 0.5)
        with pytest.raises(UpdateFinishedTrialError):  # Optuna's check, at the write
            with reports_together(done, every_s=3600):
                done.report(0.1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_median_pruner_reads_the_study_once_per_trial_and_still_prunes(
    backend: str, tmp_path: Path
) -> None:
    """Eight good trials, then a bad one: pruned at the first step past warm-up. A trial that
    is not pruned asks at every step after warm-up but reads the trials table once."""
    with study_on(backend, tmp_path) as study:
        study.pruner = make_pruner("median", max_epochs=10)
        for _ in range(8):
            good = study.ask()
            for step in range(1, 11):
                good.report(0.5 + step / 100, step)
            study.tell(good, 0.6)

        engine = study._storage._backend.engine
        reads: list[str] = []

        def count(conn, cursor, statement, params, context, executemany) -> None:  # noqa: ANN001
            if statement.lstrip().upper().startswith("SELECT") and "FROM trials" in statement:
                reads.append(statement)

        event.listen(engine, "before_cursor_execute", count)
        try:
            steady = study.ask()
            asked = 0
            for step in range(1, 11):
                steady.report(0.5 + step / 100, step)  # the median itself: never below it
                if step == 1:
                    reads.clear()
                before = len(reads)
                assert not steady.should_prune()
                asked += 1
                if step < 5:
                    assert len(reads) == before  # warm-up: no study read at all
        finally:
            event.remove(engine, "before_cursor_execute", count)
        study_reads = [s for s in reads if "trials.study_id" in s and "trial_id =" not in s]
        assert asked == 10 and len(study_reads) == 1, study_reads
        study.tell(steady, 0.6)

        bad = study.ask()
        for step in range(1, 11):
            bad.report(0.1, step)
            if bad.should_prune():
                break
        assert step == 5  # the first step past the median's 5 warm-up steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_storage_knows_the_trial_this_process_last_started(
    backend: str, tmp_path: Path
) -> None:
    """What a worker settles after an outage that hit `ask` before the trial reached it: a new
    trial, or one taken from the queue; not the queued one, nor one told finished."""
    with study_on(backend, tmp_path) as study:
        storage = study._storage._backend
        assert storage.last_started_trial_id is None
        new = study.ask()
        assert storage.last_started_trial_id == new._trial_id
        study.tell(new, 0.5)
        study.enqueue_trial({"x": 0.5})
        assert storage.last_started_trial_id == new._trial_id  # queued is not started
        queued = study.ask()
        assert queued._trial_id != new._trial_id
        assert storage.last_started_trial_id == queued._trial_id


@contextmanager
def statements(study: optuna.Study) -> Iterator[list[str]]:
    """Every SQL statement the study's storage runs within the block."""
    engine = study._storage._backend.engine
    seen: list[str] = []

    def keep(conn, cursor, statement, params, context, executemany) -> None:  # noqa: ANN001
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", keep)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ask_neither_reads_the_running_trials_for_an_empty_queue_nor_its_new_trial_back(
    backend: str, tmp_path: Path
) -> None:
    """Optuna's `ask` reads every unfinished trial whole to find the queue empty, then reads
    the trial it created back; here one small query looks at the queue, and the new trial is
    what creating it returned, the same as another worker reads. Queued trials still come
    first."""
    with study_on(backend, tmp_path) as study:
        other = optuna.load_study(study_name=study.study_name, storage=study._storage._backend.url)
        running = other.ask()  # another worker's trial, running
        running.suggest_float("x", 0.0, 1.0)
        running.report(0.3, 1)
        with statements(study) as seen:
            trial = study.ask()
        whole_reads = [s for s in seen if "FROM trial_params" in s or "FROM trial_values" in s]
        assert whole_reads == [], whole_reads
        again = stored(study, trial.number)
        assert trial.number == 1 and trial._trial_id == again._trial_id
        assert trial.datetime_start == again.datetime_start
        assert trial._cached_frozen_trial.state == again.state == TrialState.RUNNING
        assert trial.params == again.params == {}
        x = trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, 0.5)
        assert stored(study, 1).params == {"x": x}

        study.enqueue_trial({"x": 0.25})
        queued = study.ask()
        assert queued.number == 2 and queued.suggest_float("x", 0.0, 1.0) == 0.25
        study.tell(queued, 0.4)
        fresh = study.ask()  # the queue is empty again: a new trial
        assert fresh.number == 3 and stored(study, 3).state == TrialState.RUNNING
        other.tell(running, 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attrs_together_write_the_uploads_and_attributes_of_a_trials_end_in_one_transaction(
    backend: str, tmp_path: Path
) -> None:
    store = FileSystemArtifactStore(str(tmp_path / "artifacts"))
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "history.csv").write_text("epoch,val_macro_f1\n1,0.5\n")
    (tmp_path / "checkpoint.keras").write_bytes(b"weights")
    with study_on(backend, tmp_path) as study:
        trial = study.ask()
        with statements(study) as seen:
            with attrs_together(trial):
                ids = {
                    name: upload_artifact(
                        artifact_store=store,
                        file_path=str(tmp_path / name),
                        study_or_trial=trial,
                    )
                    for name in ("history.csv", "checkpoint.keras")
                }
                set_user_attrs(trial, {"history": ids["history.csv"], "best_epoch": 3})
                assert trial.user_attrs["best_epoch"] == 3  # the trial sees them at once
                assert stored(study, 0).user_attrs == {}  # the storage not yet
                assert get_all_artifact_meta(stored(study, 0), storage=study._storage) == []
        assert sum(s.startswith("INSERT") for s in seen) == 2  # user and system attributes
        assert stored(study, 0).user_attrs == {"history": ids["history.csv"], "best_epoch": 3}
        metas = get_all_artifact_meta(stored(study, 0), storage=study._storage)
        assert {m.artifact_id: m.filename for m in metas} == {
            ids["history.csv"]: "history.csv",
            ids["checkpoint.keras"]: "checkpoint.keras",
        }

        failing = study.ask()
        with pytest.raises(RuntimeError, match="disk full"):
            with attrs_together(failing):
                set_user_attrs(failing, {"epochs_run": 2})
                raise RuntimeError("disk full")
        assert stored(study, 1).user_attrs == {"epochs_run": 2}  # written on the way out

        done = study.ask()
        study.tell(done, 0.2)
        with pytest.raises(UpdateFinishedTrialError):
            with attrs_together(done):
                study._storage.set_trial_system_attr(done._trial_id, "late", 1)
        assert "late" not in stored(study, 2).system_attrs
