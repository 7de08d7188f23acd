"""The objective is named "validation macro-F1" where people see it (optuna-dashboard, `search
status`), in new studies and in studies created before it was named."""

from __future__ import annotations

import gc
from pathlib import Path

import optuna
import pytest

from search.cli import main
from search.settings import Settings
from search.study import OBJECTIVE_NAME, create_or_load, load, open_storage
from search.worker import run_worker
from tests.conftest import search_env

ONE_HEAD = '[space]\nbackbone = ["efficientnet_lite0"]\nn_layers = {low = 1, high = 1}\n'


def test_a_new_study_names_its_objective(tmp_path: Path) -> None:
    settings = Settings(storage=f"sqlite:///{tmp_path / 'new.sqlite3'}", study="named")
    study = create_or_load(open_storage(settings, heartbeat=False), settings)
    assert study.metric_names == [OBJECTIVE_NAME] == ["validation macro-F1"]
    again = create_or_load(open_storage(settings, heartbeat=False), settings)  # a second worker
    assert again.metric_names == [OBJECTIVE_NAME]


def test_a_worker_names_the_objective_of_an_older_study(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A study created without a name (as before this change) gets it from the next worker,
    and `search status` shows it with the best value."""
    (workspace / "space.toml").write_text(ONE_HEAD)
    env = search_env(workspace, SEARCH_PRUNER="none")
    settings = Settings.load(environ=env)
    old = optuna.create_study(
        storage=open_storage(settings, heartbeat=False),
        study_name=settings.study,
        direction="maximize",
    )
    assert old.metric_names is None

    run_worker(settings, n_trials=1)  # the worker command's own code, in this process
    assert gc.get_freeze_count() == 0  # its frozen objects are given back to the collector

    study = load(open_storage(settings, heartbeat=False), settings)
    assert study.metric_names == ["validation macro-F1"]
    assert len(study.trials) == 1 and study.trials[0].value is not None
    capsys.readouterr()
    assert main(["status", "--storage", settings.storage, "--study", settings.study]) == 0
    best = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("best"))
    assert f"{study.best_value:.4f} validation macro-F1" in best
