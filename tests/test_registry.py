"""The champion registry with real parts: promotions recorded in the study database (SQLite and
PostgreSQL), history, rollback, two promote-best processes at once, and promote-best killed with
SIGKILL while it writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna_dashboard import get_note

from search.cli import main
from search.registry import (
    CARD_FILE,
    INFO_FILE,
    MODEL_FILE,
    history,
    load_champion,
    promote_best,
    render_history,
    rollback,
)
from search.settings import Settings
from search.study import load, open_storage
from tests.conftest import PROMOTE, search_env, searched_workspace, use_search_env
from tests.data_helpers import tree_digest

VERSION_FILES = {MODEL_FILE, INFO_FILE, CARD_FILE, "evaluation.json", "per_family.csv", "reports"}


@pytest.fixture(scope="module")
def searched_once(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    return searched_workspace(tmp_path_factory.mktemp("registry"), prepared_dir)


@pytest.fixture()
def ws(searched_once: Path, tmp_path: Path) -> Path:
    """A private copy of the searched workspace (study file, artifacts, features, data)."""
    target = tmp_path / "ws"
    shutil.copytree(searched_once, target, symlinks=True)
    return target


@pytest.fixture()
def settings(ws: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    use_search_env(ws, monkeypatch)
    monkeypatch.chdir(ws)
    return Settings.load()


def add_best_copy(settings: Settings, of_trial: int) -> int:
    """A complete trial with trial `of_trial`'s params and checkpoint and a value above every
    other: the study's new best, ready to promote without training again."""
    study = load(open_storage(settings, heartbeat=False), settings)
    source = study.trials[of_trial]
    best = max(t.value for t in study.trials if t.value is not None)
    study.add_trial(
        optuna.trial.create_trial(
            params=source.params,
            distributions=source.distributions,
            value=best + 1.0,
            user_attrs=source.user_attrs,
        )
    )
    return study.trials[-1].number


def versions(models: Path) -> set[str]:
    """Version folders a reader can see (staging folders start with a dot)."""
    return {p.name for p in (models / "history").iterdir() if not p.name.startswith(".")}


def current(models: Path) -> str:
    return (models / "champion").resolve().name


def test_history_rollback_and_dashboard_note(settings: Settings, ws: Path, capsys) -> None:
    models = ws / "models"
    first = promote_best(settings)
    v1 = first["version"]
    other = 1 - first["trial"]
    add_best_copy(settings, other)
    second = promote_best(settings, force=True)  # force: the copy may score lower on test
    v2 = second["version"]
    assert second["previous"]["version"] == v1 and current(models) == v2
    assert versions(models) == {v1, v2}
    for v in (v1, v2):
        assert VERSION_FILES <= {p.name for p in (models / "history" / v).iterdir()}

    # The new version's evaluation and card compare it with the old champion on the same split.
    evaluation = json.loads((models / "history" / v2 / "evaluation.json").read_text())
    assert evaluation["previous"]["version"] == v1
    old_f1 = first["test"]["macro_f1"]
    assert evaluation["previous"]["metrics"]["macro_f1"] == pytest.approx(old_f1)
    assert evaluation["previous"]["delta"]["macro_f1"] == pytest.approx(
        second["test"]["macro_f1"] - old_f1
    )
    card = (models / "history" / v2 / CARD_FILE).read_text()
    assert f"Compared with the previous champion `{v1}`" in card
    assert "## Known weaknesses" in card and "keras.models.load_model" in card

    # Recorded durably in the study's database, by whom, with metrics and the previous champion.
    entries = history(settings)
    assert [(e["action"], e["version"], e["previous"]) for e in entries] == [
        ("promote", v1, None),
        ("promote", v2, v1),
    ]
    assert all("@" in e["who"] and "macro_f1" in e["metrics"] for e in entries)
    assert [e["current"] for e in entries] == [False, True]
    engine = sa.create_engine(settings.storage)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT action, version FROM search_promotions")).all()
    engine.dispose()
    assert sorted(rows) == [("promote", v1), ("promote", v2)]
    study = load(open_storage(settings, heartbeat=False), settings)
    assert v2 in get_note(study) and f"history/{v2}/reports/index.html" in get_note(study)

    assert main(["registry"]) == 0
    table = capsys.readouterr().out
    assert v1 in table and v2 in table
    assert next(line for line in table.splitlines() if v2 in line).startswith("*")

    # Rollback, default: the champion promoted before the current one; atomic link swap.
    digest = tree_digest(models / "history" / v1)
    assert main(["rollback"]) == 0
    assert f"champion is now {v1} (was {v2})" in capsys.readouterr().out
    assert current(models) == v1 and (models / "champion").is_symlink()
    assert load_champion(models).info["version"] == v1
    assert tree_digest(models / "history" / v1) == digest  # restored, not rewritten
    entries = history(settings)
    assert (entries[-1]["action"], entries[-1]["version"], entries[-1]["previous"]) == (
        "rollback",
        v1,
        v2,
    )
    assert entries[-1]["current"] and not entries[1]["current"]
    assert v1 in get_note(load(open_storage(settings, heartbeat=False), settings))
    assert "rollback" in render_history(entries)

    # Nothing was promoted before v1 here: a clear error, nothing changes.
    assert main(["rollback"]) != 0
    assert "no champion before" in capsys.readouterr().err
    # By id (a unique prefix is enough), then the errors a user can make.
    prefix = next(v2[:n] for n in range(1, len(v2) + 1) if not v1.startswith(v2[:n]))
    assert rollback(settings, prefix)["version"] == v2
    assert current(models) == v2
    assert main(["rollback", v2]) != 0
    assert "already the champion" in capsys.readouterr().err
    assert main(["rollback", "19990101T000000-nothing"]) != 0
    err = capsys.readouterr().err
    assert "not a version kept here" in err and "Traceback" not in err
    assert [e["action"] for e in history(settings)] == [
        "promote",
        "promote",
        "rollback",
        "rollback",
    ]


def test_two_promotions_at_once_one_wins(ws: Path) -> None:
    """Two real promote-best processes started together: one promotes, the other is refused
    at once by the registry lock (exit 3) and writes nothing."""
    env = search_env(ws)
    procs = [
        subprocess.Popen(
            [PROMOTE], env=env, cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 3], results
    winner = next(r for r in results if r[0] == 0)
    loser = next(r for r in results if r[0] == 3)
    assert "promoted trial" in winner[1]
    assert "error: another promotion or rollback holds" in loser[2]
    assert "Traceback" not in loser[2]
    models = ws / "models"
    assert len(versions(models)) == 1 and current(models) in versions(models)
    assert not [p for p in (models / "history").iterdir() if p.name.startswith(".")]
    assert load_champion(models).info["version"] == current(models)
    assert [e["action"] for e in history(Settings.load(environ=env))] == ["promote"]


def _staging(models: Path) -> list[Path]:
    return [p for p in (models / "history").glob(".*") if p.is_dir()]


MOMENTS: dict[str, Callable[[Path], bool]] = {
    # staging folder made: the checkpoint is being downloaded and the model assembled
    "staging": lambda models: bool(_staging(models)),
    # model.keras saved into staging: being reloaded and evaluated
    "model saved": lambda models: any((s / MODEL_FILE).exists() for s in _staging(models)),
    # reports being written (plotly.js, pages, thumbnails), card and champion.json next
    "reports": lambda models: any((s / "reports").exists() for s in _staging(models)),
}


def test_promotion_killed_midway_leaves_previous_champion(settings: Settings, ws: Path) -> None:
    models = ws / "models"
    v1 = promote_best(settings)["version"]
    digest = tree_digest(models / "history" / v1)
    add_best_copy(settings, 1 - load_champion(models).info["trial"])
    env = search_env(ws)
    for moment, reached in MOMENTS.items():
        proc = subprocess.Popen(
            [PROMOTE, "--force"],
            env=env,
            cwd=ws,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while not reached(models) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"promote-best ended before {moment!r}"
        # The old champion is current, loadable and byte for byte the same; nothing
        # half-written is visible as a version.
        assert (models / "champion").is_symlink() and current(models) == v1, moment
        assert tree_digest(models / "history" / v1) == digest, moment
        assert versions(models) == {v1}, moment
        assert load_champion(models).info["version"] == v1
    assert _staging(models), "the killed runs leave their staging folders behind"

    # The next promotion removes the stale staging folders and succeeds.
    v2 = promote_best(settings, force=True)["version"]
    assert current(models) == v2 and versions(models) == {v1, v2}
    assert not _staging(models)
    assert not list(models.glob(".champion-*"))


def _postgres_url(database: str) -> str:
    return f"postgresql://postgres@127.0.0.1:5432/{database}"


@pytest.fixture()
def postgres_db() -> str:
    """A throwaway PostgreSQL database, dropped afterwards."""
    admin = sa.create_engine(_postgres_url("postgres"), isolation_level="AUTOCOMMIT")
    name = f"registry_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {exc.orig}")
    yield _postgres_url(name)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def test_promotions_recorded_in_postgresql(settings: Settings, ws: Path, postgres_db: str) -> None:
    """The same study in PostgreSQL (optuna.copy_study): promotion and rollback land in its
    search_promotions table, readable from any machine with the URL."""
    optuna.copy_study(
        from_study_name=settings.study,
        from_storage=settings.storage,
        to_storage=postgres_db,
    )
    pg = settings.replace(storage=postgres_db)
    v1 = promote_best(pg)["version"]
    add_best_copy(pg, 1 - load_champion(ws / "models").info["trial"])
    v2 = promote_best(pg, force=True)["version"]
    assert rollback(pg) == {"version": v1, "previous": v2}
    entries = history(pg)
    assert [(e["action"], e["version"]) for e in entries] == [
        ("promote", v1),
        ("promote", v2),
        ("rollback", v1),
    ]
    assert entries[-1]["current"] and entries[0]["at"].endswith("Z")
    # The SQLite study file knows nothing of these promotions.
    assert [e["action"] for e in history(settings)] == ["local", "local"]


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_best_trial_by_one_query_ties_to_the_lowest_number_and_needs_a_checkpoint(
    backend: str, tmp_path: Path
) -> None:
    """What promote-best picks, without reading the whole study: the highest value, the lowest
    number among equals, and only a trial with a checkpoint; the budget counts every trial."""
    from search.registry import best_trial, search_budget
    from search.study import create_or_load
    from tests.test_postgres import fresh_database

    with fresh_database() as url:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / 'best.sqlite3'}"
        settings = Settings(storage=url, study="best")
        study = create_or_load(open_storage(settings, heartbeat=False), settings)

        def told(value: float | None, checkpoint: bool = True) -> None:
            trial = study.ask()
            if checkpoint:
                trial.set_user_attr("checkpoint", f"artifact-{trial.number}")
            if value is None:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, value)

        for value in (0.5, 0.9, 0.9, None):
            told(value)
        assert best_trial(study).number == 1  # 1 and 2 tie: the earlier one
        told(0.95, checkpoint=False)  # the best value, but nothing to promote
        assert best_trial(study).number == 1
        told(0.97)
        assert best_trial(study).number == 5
        budget = search_budget(study)
        assert budget["n_trials"] == 6 and budget["states"] == {"COMPLETE": 5, "PRUNED": 1}
