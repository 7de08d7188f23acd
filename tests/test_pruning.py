"""The default pruner must stop trials that are clearly worse than the ones before them."""

from __future__ import annotations

from pathlib import Path

from optuna.trial import TrialState
from optuna_dashboard._custom_plot_data import list_graph_object_ids

from search.settings import Settings
from search.study import create_or_load, open_storage
from search.worker import run_worker
from tests.conftest import HEAD, search_env

GOOD = {**HEAD, "dropout_0": 0.0, "batch_norm": False}
# Same head, but a learning rate 100x too small for plain SGD: it barely moves in 8 epochs.
BAD = {**GOOD, "optimizer": "sgd", "learning_rate": 1e-4}


def test_median_pruner_prunes_clearly_worse_trials(workspace: Path) -> None:
    env = search_env(workspace, SEARCH_MAX_EPOCHS="8", SEARCH_PRUNER="median")
    settings = Settings.load(environ=env)
    study = create_or_load(open_storage(settings, heartbeat=False), settings)
    for params in [GOOD] * 8 + [BAD] * 3:  # the default median pruner waits for 8 trials
        study.enqueue_trial(params)
    run_worker(settings, n_trials=11)

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert [t.state for t in trials[:8]] == [TrialState.COMPLETE] * 8
    bad_states = [t.state for t in trials[8:11]]
    assert bad_states.count(TrialState.PRUNED) >= 2, bad_states
    for t in trials[8:11]:
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["epochs_run"] < 8  # stopped early: that is the point
            assert "history" not in t.user_attrs  # nothing uploaded for a trial not kept


def test_study_figures_do_not_grow_with_the_trials(workspace: Path) -> None:
    """The dashboard's study page carries one learning-curve figure (the best trial's), not one
    per trial: 12 trials leave the same figure attributes as 2 would."""
    env = search_env(workspace, SEARCH_MAX_EPOCHS="2", SEARCH_PRUNER="none")
    settings = Settings.load(environ=env)
    study = create_or_load(open_storage(settings, heartbeat=False), settings)
    for i in range(12):
        study.enqueue_trial({**GOOD, "learning_rate": 0.002 * (i + 1)})
    run_worker(settings, n_trials=2)
    first = study._storage.get_study_system_attrs(study._study_id)
    run_worker(settings, n_trials=12)
    after = study._storage.get_study_system_attrs(study._study_id)
    assert len(study.trials) == 12 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert list_graph_object_ids(first) == list_graph_object_ids(after) == ["curves-best"]
    assert len(after) == len(first)  # replaced in place, never added to
    assert all("history" in t.user_attrs for t in study.trials)  # every trial's own curve
