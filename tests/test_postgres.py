"""The study on a real PostgreSQL: a fresh database per test on the server at 127.0.0.1:5432,
or a throwaway cluster (initdb + pg_ctl in a temporary folder) that a test may restart.

The helpers here (`fresh_database`, `throwaway_cluster`) are shared with test_compose.py and
test_crash_safety.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import psycopg
import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search.cli import main
from search.settings import Settings
from search.status import collect, render
from search.study import create_or_load, engine_kwargs, open_storage
from tests.conftest import ROOT

SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
CONF = ROOT / "study_db" / "postgres" / "postgresql.conf"


@contextmanager
def fresh_database(server: str = SERVER) -> Iterator[str]:
    """A uniquely named, empty database for one test; dropped afterwards (open sessions too)."""
    name = f"search_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = make_url(server).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A PostgreSQL server of our own, for tests that stop and start it."""

    data: Path
    port: int
    options: str

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        subprocess.run(
            _as_postgres(["pg_ctl", "-D", str(self.data), "-w", "-t", "60", *args]),
            check=True,
            capture_output=True,
            timeout=90,
        )

    def start(self) -> None:
        self.ctl("-l", str(self.data / "server.log"), "-o", self.options, "start")

    def stop(self) -> None:
        self.ctl("-m", "fast", "stop")


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: run them as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def throwaway_cluster(config_file: Path | None = None) -> Iterator[Cluster]:
    for tool in ("initdb", "pg_ctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    root = Path(tempfile.mkdtemp(prefix="search-pg-"))
    root.chmod(0o755)
    data = root / "data"
    data.mkdir()
    options = f"-p {{port}} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root}"
    if config_file is not None:
        shutil.copy(config_file, root / "postgresql.conf")
        options += f" -c config_file={root / 'postgresql.conf'}"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        for path in root.iterdir():
            shutil.chown(path, "postgres", "postgres")
    subprocess.run(
        _as_postgres(
            ["initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    port = free_port()
    cluster = Cluster(data, port, options.format(port=port) + " -c fsync=off")
    cluster.start()
    try:
        yield cluster
    finally:
        try:
            cluster.ctl("-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass  # already down
        shutil.rmtree(root, ignore_errors=True)


def conf_value(name: str) -> str:
    match = re.search(rf"^{name}\s*=\s*'?([^'#\n]+?)'?\s*(#.*)?$", CONF.read_text(), re.M)
    assert match, name
    return match.group(1)


def test_compose_postgresql_conf_runs_a_real_server() -> None:
    """study_db/postgres/postgresql.conf, as compose mounts it, starts PostgreSQL with its
    settings in force (a typo or an unknown setting would stop the server from starting)."""
    with throwaway_cluster(CONF) as cluster:
        with psycopg.connect(cluster.url) as conn:
            show = {
                name: conn.execute(f"SHOW {name}").fetchone()[0]
                for name in ("max_connections", "timezone", "idle_in_transaction_session_timeout")
            }
    assert show["max_connections"] == conf_value("max_connections")
    assert show["timezone"] == "UTC"
    assert show["idle_in_transaction_session_timeout"] == "5min"
    pool = engine_kwargs(cluster.url)
    per_worker = pool["pool_size"] + pool["max_overflow"]
    assert int(show["max_connections"]) // per_worker >= 50  # what docs/fleet.md promises


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used:UserWarning")
def test_status_counts_live_workers_by_heartbeat_and_fails_dead_ones(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(storage=pg_url, study="status", heartbeat_interval=1, grace_period=3)
    storage = open_storage(settings)
    study = create_or_load(storage, settings)
    done = study.ask()
    done.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
    study.tell(done, 0.75)
    alive, dead = study.ask(), study.ask()
    for trial, worker in ((alive, "host-a:11"), (dead, "host-b:22")):
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("gpu", "1")
        storage.record_heartbeat(trial._trial_id)
    # The worker running `dead` stopped beating a minute ago.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE trial_heartbeats SET heartbeat = heartbeat - interval '1 minute' "
            "WHERE trial_id = %s",
            (dead._trial_id,),
        )

    report = collect(settings)

    assert report["workers"]["alive"] == 1
    assert [r["worker"] for r in report["workers"]["running"]] == ["host-a:11"]
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[dead.number] == TrialState.FAIL  # failed by `status`, as a worker would
    assert report["states"]["WAITING"] == 1  # ... and queued again for another worker
    assert report["best"]["trial"] == done.number and report["best"]["value"] == 0.75
    assert report["throughput"]["finished"] == 2.0
    text = render(report)
    assert "1 alive" in text and "host-a:11" in text and "trial 0: 0.7500" in text

    code = main(["status", "--json", "--storage", pg_url, "--study", "status"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["states"]["COMPLETE"] == 1 and printed["workers"]["alive"] == 1


def test_each_worker_holds_a_small_pool() -> None:
    """SQLite waits on a locked file; PostgreSQL gets a small, pre-pinged pool per worker."""
    sqlite = engine_kwargs("sqlite:///x.sqlite3")
    assert "pool_size" not in sqlite and sqlite["connect_args"]["timeout"] > 0
    pg = engine_kwargs(SERVER)
    assert pg["pool_pre_ping"] is True
    assert pg["pool_size"] + pg["max_overflow"] <= 4


def test_study_storage_works_on_postgres(pg_url: str) -> None:
    """Trials written by one storage object are read by another, as across workers."""
    settings = Settings(storage=pg_url, study="plain")
    study = create_or_load(open_storage(settings, heartbeat=False), settings)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    again = optuna.load_study(study_name="plain", storage=open_storage(settings, heartbeat=False))
    assert [t.state for t in again.get_trials()] == [TrialState.COMPLETE] * 3


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_user_attrs_written_together_upsert_and_refuse_a_finished_trial(
    backend: str, tmp_path: Path
) -> None:
    """One transaction for several attributes: later values replace earlier ones, the trial
    shows them at once, and a finished trial refuses them as Optuna's own writes do."""
    from optuna.exceptions import UpdateFinishedTrialError

    from search.study import set_user_attrs

    with fresh_database() as url:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / 'attrs.sqlite3'}"
        settings = Settings(storage=url, study="attrs")
        study = create_or_load(open_storage(settings, heartbeat=False), settings)
        trial = study.ask()
        set_user_attrs(trial, {"seed": 1, "worker": "a", "nested": {"x": [1, None]}})
        set_user_attrs(trial, {"seed": 2, "epochs_run": 3})
        assert trial.user_attrs == {"seed": 2, "worker": "a", "nested": {"x": [1, None]},
                                    "epochs_run": 3}  # fmt: skip
        study.tell(trial, 0.5)
        assert study.trials[0].user_attrs == trial.user_attrs
        with pytest.raises(UpdateFinishedTrialError):
            set_user_attrs(trial, {"late": True})


@pytest.mark.parametrize("scheme", ["postgresql+psycopg2", "postgres"])
def test_url_forms_from_guides_open_the_installed_driver_and_hide_the_password(
    scheme: str, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`postgresql+psycopg2://` (most guides) and `postgres://` (Heroku and others) name a
    driver or a scheme SQLAlchemy cannot load here; they open psycopg 3 instead. The server
    trusts local connections, so the password is only there to be hidden."""
    url = make_url(pg_url).set(drivername=scheme, password="s3cret-pw")
    url_text = url.render_as_string(hide_password=False)
    assert url_text.startswith(f"{scheme}://") and "s3cret-pw" in url_text
    settings = Settings(storage=url_text, study="guide")
    study = create_or_load(open_storage(settings, heartbeat=False), settings)
    study.tell(study.ask(), 0.5)

    assert main(["status", "--json", "--storage", url_text, "--study", "guide"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["states"]["COMPLETE"] == 1
    assert printed["storage"].startswith(f"{scheme}://postgres:***@")
    assert main(["status", "--storage", url_text, "--study", "missing"]) != 0
    out, err = capsys.readouterr()
    assert "study 'missing' not found" in err and "guide" in err
    assert "s3cret-pw" not in out + err


def test_unparsable_url_keeps_its_password_out_of_the_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = "postgresql+psycopg2://postgres:s3cret-pw@127.0.0.1:no-port/postgres"
    assert main(["status", "--storage", url]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: bad storage URL") and err.count("\n") == 1
    assert "s3cret-pw" not in err and "postgres:***@" in err
