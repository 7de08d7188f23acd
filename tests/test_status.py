"""`search status` reads what it shows without loading whole trials: at 2,000 trials reading
every trial's parameters, attributes and intermediate values was most of its time
(benchmarks/big_study.py). States, throughput and the best trial must still be exact."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from search.settings import Settings
from search.status import collect, render, throughput, trial_times
from search.study import create_or_load, open_storage

pytestmark = pytest.mark.filterwarnings(
    "ignore:Heartbeat of storage is supposed to be used:UserWarning"
)


def small_study(tmp_path: Path) -> tuple[Settings, optuna.Study]:
    """3 complete trials (the best in the middle), 2 pruned, 1 failed, 1 running, 1 waiting."""
    settings = Settings(storage=f"sqlite:///{tmp_path / 's.sqlite3'}", study="status")
    study = create_or_load(open_storage(settings), settings)
    for value in (0.5, 0.9, 0.7):
        trial = study.ask()
        trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
        trial.set_user_attr("worker", "host:1")
        for step in range(1, 4):
            trial.report(value * step / 3, step)
        study.tell(trial, value)
    for state in (TrialState.PRUNED, TrialState.PRUNED, TrialState.FAIL):
        trial = study.ask()
        trial.report(0.1, 1)
        study.tell(trial, state=state)
    running = study.ask()
    running.set_user_attr("worker", "host:2")
    study.enqueue_trial({"learning_rate": 1e-3})
    return settings, study


def test_status_counts_states_throughput_and_best_as_whole_trials_do(tmp_path: Path) -> None:
    settings, study = small_study(tmp_path)
    now = datetime.now()
    report = collect(settings, now=now)

    trials = study.get_trials(deepcopy=False)
    assert report["trials"] == len(trials) == 8
    expected = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    assert report["states"] == expected
    assert report["states"]["COMPLETE"] == 3 and report["states"]["WAITING"] == 1
    assert report["throughput"] == throughput(trials, now)  # the same as from whole trials
    assert report["throughput"]["finished"] == 6.0
    best = report["best"]
    assert best["trial"] == 1 and best["value"] == 0.9 and best["worker"] == "host:1"
    assert set(best["params"]) == {"learning_rate"}
    assert "trial 1: 0.9000" in render(report)


def test_status_does_not_load_every_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, _ = small_study(tmp_path)

    def no_whole_trials(*args: object, **kwargs: object) -> None:
        raise AssertionError("status read every trial whole")

    monkeypatch.setattr(RDBStorage, "get_all_trials", no_whole_trials)
    report = collect(settings)
    assert report["states"]["COMPLETE"] == 3 and report["best"]["trial"] == 1


def test_trial_times_are_the_trials_states_and_times(tmp_path: Path) -> None:
    settings, study = small_study(tmp_path)
    light = sorted(trial_times(study), key=lambda t: (t.datetime_start is None,
                                                                t.datetime_start))  # fmt: skip
    whole = sorted(study.get_trials(deepcopy=False), key=lambda t: (t.datetime_start is None,
                                                                    t.datetime_start))  # fmt: skip
    assert [(t.state, t.datetime_start, t.datetime_complete) for t in light] == [
        (t.state, t.datetime_start, t.datetime_complete) for t in whole
    ]


def test_status_of_a_study_without_complete_trials(tmp_path: Path) -> None:
    settings = Settings(storage=f"sqlite:///{tmp_path / 'e.sqlite3'}", study="empty")
    study = create_or_load(open_storage(settings), settings)
    study.tell(study.ask(), state=TrialState.PRUNED)
    report = collect(settings)
    assert report["best"] is None and report["states"]["PRUNED"] == 1
    assert "no complete trial yet" in render(report)
