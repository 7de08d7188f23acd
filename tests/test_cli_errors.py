"""Every error a user can cause: one line on stderr naming the problem, non-zero exit, no
traceback. Run in-process through search.cli.main (the same code path as the console script)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from search.cli import main
from search.settings import Settings
from search.study import create_or_load, open_storage
from tests.conftest import use_search_env


@pytest.fixture()
def env(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = use_search_env(workspace, monkeypatch)
    monkeypatch.chdir(workspace)
    return values


def one_line_error(capsys: pytest.CaptureFixture[str], code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    for needle in needles:
        assert needle in last, last
    return last


def test_unknown_backbone(env: dict[str, str], workspace: Path, capsys) -> None:
    (workspace / "bad.toml").write_text('[space]\nbackbone = ["resnet9000"]\n')
    code = main(["worker", "--n-trials", "1", "--space", str(workspace / "bad.toml")])
    one_line_error(capsys, code, "unknown backbone 'resnet9000'", "choose one of")


def test_a_worker_run_in_process_puts_the_signal_handlers_back(
    env: dict[str, str], workspace: Path, capsys
) -> None:
    """Processes forked later inherit handlers; ours would make them ignore SIGTERM."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    (workspace / "bad.toml").write_text('[space]\nbackbone = ["resnet9000"]\n')
    main(["worker", "--n-trials", "1", "--space", str(workspace / "bad.toml")])
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_unknown_space_parameter(env: dict[str, str], workspace: Path, capsys) -> None:
    (workspace / "bad.toml").write_text("[space]\nlearnin_rate = 0.1\n")
    code = main(["worker", "--n-trials", "1", "--space", str(workspace / "bad.toml")])
    one_line_error(capsys, code, "unknown search-space parameter 'learnin_rate'")


def test_unreachable_storage(env: dict[str, str], capsys) -> None:
    url = "postgresql://nobody:secret@127.0.0.1:1/nowhere"
    code = main(["worker", "--n-trials", "1", "--storage", url])
    line = one_line_error(capsys, code, "cannot reach storage", "127.0.0.1:1")
    assert "secret" not in line  # never print the password


def test_driver_that_is_not_installed_names_the_forms_that_work(
    env: dict[str, str], capsys
) -> None:
    url = "postgresql+asyncpg://nobody:secret@127.0.0.1:1/nowhere"
    code = main(["worker", "--n-trials", "1", "--storage", url])
    line = one_line_error(capsys, code, "no database driver", "asyncpg", "postgresql://")
    assert "secret" not in line


def test_study_not_found(env: dict[str, str], capsys) -> None:
    settings = Settings.load()
    create_or_load(open_storage(settings, heartbeat=False), settings)  # an existing other study
    code = main(["promote", "--study", "no-such-study"])
    one_line_error(capsys, code, "study 'no-such-study' not found", "test")


def test_no_complete_trial_to_promote(env: dict[str, str], capsys) -> None:
    settings = Settings.load()
    create_or_load(open_storage(settings, heartbeat=False), settings)
    code = main(["promote"])
    one_line_error(capsys, code, "no complete trial to promote")


def test_no_prepared_data(env: dict[str, str], workspace: Path, capsys) -> None:
    code = main(["worker", "--n-trials", "1", "--data-dir", str(workspace / "nothing")])
    one_line_error(capsys, code, "search prepare")


def test_empty_data_set(env: dict[str, str], workspace: Path, capsys) -> None:
    empty = workspace / "empty_source"
    empty.mkdir()
    (empty / "metadata.csv").write_text(
        "rare_species_id,eol_content_id,eol_page_id,kingdom,phylum,family,file_path\n"
    )
    code = main(["prepare", str(empty), "--out", str(workspace / "out")])
    one_line_error(capsys, code)
    assert not (workspace / "out").exists()


def test_champion_that_fails_to_load(env: dict[str, str], workspace: Path, capsys) -> None:
    version = workspace / "models" / "history" / "v1"
    version.mkdir(parents=True)
    (version / "model.keras").write_bytes(b"not a keras file")
    (version / "champion.json").write_text("{}")
    os.symlink("history/v1", workspace / "models" / "champion")
    photo = workspace / "x.jpg"
    photo.write_bytes(b"")
    code = main(["predict", str(photo)])
    one_line_error(capsys, code, "fails to load", "roll back")


def test_no_champion(env: dict[str, str], workspace: Path, capsys) -> None:
    code = main(["predict", str(workspace / "x.jpg")])
    one_line_error(capsys, code, "no champion", "promote-best")


def test_registry_without_promotions(env: dict[str, str], capsys) -> None:
    assert main(["registry"]) == 0
    assert "no promotion recorded yet" in capsys.readouterr().out


def test_rollback_without_champion(env: dict[str, str], capsys) -> None:
    code = main(["rollback"])
    one_line_error(capsys, code, "no champion to roll back from", "name a version")


def test_rollback_to_unknown_version(env: dict[str, str], capsys) -> None:
    code = main(["rollback", "20200101T000000-x-1"])
    one_line_error(capsys, code, "not a version kept here", "search registry")


def test_evaluate_without_champion(env: dict[str, str], capsys) -> None:
    code = main(["evaluate"])
    one_line_error(capsys, code, "no champion", "promote-best")


def test_promote_and_rollback_while_registry_locked(
    env: dict[str, str], workspace: Path, capsys
) -> None:
    """Another process's promotion holds the registry lock: refused at once, exit code 3."""
    from filelock import FileLock

    models = workspace / "models"
    models.mkdir(exist_ok=True)
    with FileLock(str(models / ".registry.lock")):
        code = main(["promote"])
        assert code == 3
        one_line_error(capsys, code, "another promotion or rollback holds", "promote-best again")
        code = main(["rollback"])
        assert code == 3
        one_line_error(capsys, code, "another promotion or rollback holds", "rollback again")
