"""Does a study stay usable at 2,000 trials? The sampler, the pruner, `search status`,
optuna-dashboard's study page (API and a real headless-Chromium page load) and `promote-best`,
timed at 100, 1,000 and 2,000 finished trials, on SQLite and on PostgreSQL.

The study is built fast but with a real trial's storage traffic: the study created as a worker
creates it (search.worker.join_study: the study's record, the real sampler and pruner), the
search space's own suggestions (search.space.sample), one report and should_prune per epoch,
the trial's attributes at start and end (search.study.set_user_attrs), the checkpoint and
history.csv uploaded to the real artifact store for kept trials, and the `curves-best` figure on
each new best. Only the training is fake: a plausible learning curve per configuration (better
or worse with the learning rate, backbone, layers ...), with early stopping after 5 flat
epochs, so the median pruner prunes some trials and TPE has something to learn. Every
checkpoint is the same tiny end-to-end Keras model (checkpoint_kind "full"), so promote-best
loads and evaluates a real model without a backbone. Several worker processes build the study.

Built studies are kept under benchmarks/results/cache/big_study/ (SQLite copies, pg_dump files,
the artifact folders), so a rerun measures at once. Each measurement runs on a copy of the
study at that size, so the trials it asks for do not change the study that is built on.

    .venv/bin/python benchmarks/big_study.py [--stages 100,1000,2000] [--workers 2]
        [--storages sqlite,postgresql] [--pg postgresql://postgres@127.0.0.1:5432/postgres]

Columns (wall seconds, and in brackets CPU seconds, which other load on the 2 shared cores
hardly changes: about the wall time on an idle core; medians): ask ms = study.ask() plus
sampling the whole space, over --asks trials after the first ("1st ask": it fills Optuna's
trial cache); report ms = trial.report + should_prune at epochs 5-8 (past the pruner's warm-up);
status = `search status` as a subprocess, and collect() in process; API = GET /api/studies/<id>
on a fresh optuna-dashboard (cold: its trial cache empty; CPU of the dashboard process) and
again (warm); render = headless Chromium from navigation until the study page has drawn all its
plots (history, intermediate values, timeline, importance, curves-best), and until a trial's
page shows its learning curve (CPU: all Chromium's processes); promote = `promote-best`
as a subprocess; promote reads = its storage reads alone (best_trial, search_budget,
len(study.trials)); remedy reads = the same answers by study.best_trial and one query of three
columns (search.status.trial_times), what search/registry.py now does; DB MB = the study's
size (SQLite file; PostgreSQL database, restored from its dump, so without dead rows).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import psycopg
from common import WORK, log, machine, prepared
from optuna.artifacts import upload_artifact
from optuna.artifacts._protocol import ArtifactStore
from sqlalchemy.engine import make_url
from storage_throughput import drop_pg_database

from search.settings import Settings

optuna.logging.set_verbosity(optuna.logging.WARNING)
CACHE = WORK / "big_study"
STUDY = "big-study"
MAX_EPOCHS = 20  # Settings' default
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TARGETS = {"ask_s": 1.0, "status_s": 2.0, "api_s": 3.0, "render_s": 5.0}


# ---------------------------------------------------------------------------------------------
# the study: settings, the fake trial, building with several processes


def set_cache(folder: Path) -> None:
    global CACHE
    CACHE = folder.resolve()


def bench_settings(url: str, storage_name: str, data_dir: Path) -> Settings:
    return Settings(
        storage=url,
        study=STUDY,
        data_dir=data_dir,
        features_dir=CACHE / "features",
        models_dir=CACHE / f"models-{storage_name}",
        artifacts_dir=CACHE / f"artifacts-{storage_name}",
        max_epochs=MAX_EPOCHS,
    )


def fake_curve(params: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Validation macro-F1 and training loss per epoch that look like a head trial's: the
    ceiling depends on the configuration, so some trials are clearly better than others."""
    optimum = {"sgd": 1e-2, "rmsprop": 5e-4}.get(params["optimizer"], 1e-3)
    lr_fit = np.exp(-(((np.log10(params["learning_rate"]) - np.log10(optimum)) / 0.7) ** 2))
    backbone = {"efficientnet_lite0": 1.0, "mobilenet_v2_tv": 0.93}.get(params["backbone"], 0.55)
    width = min(1.0, 0.75 + 0.1 * np.log2(params["units_0"] / 64))
    dropout = 1.0 - 0.4 * abs(params["dropout_0"] - 0.3)
    ceiling = 0.15 + 0.75 * lr_fit * backbone * width * dropout + rng.normal(0, 0.02)
    tau = rng.uniform(1.5, 5.0) * (64 / params["batch_size"]) ** 0.3
    epochs = np.arange(1, MAX_EPOCHS + 1)
    val = ceiling * (1 - np.exp(-epochs / tau)) + rng.normal(0, 0.012, MAX_EPOCHS)
    loss = 0.6 + 2.6 * np.exp(-epochs / tau) * (1.2 - lr_fit * 0.4)
    loss = loss + rng.normal(0, 0.02, MAX_EPOCHS)
    return np.clip(val, 0.0, 1.0), loss


def fake_objective(
    trial: optuna.Trial, space: dict[str, Any], store: ArtifactStore, checkpoint: Path
) -> float:
    """search.trial.objective's storage traffic, with `fake_curve` instead of training."""
    from search.space import sample
    from search.study import is_new_best, params_together, set_user_attrs
    from search.trial import (
        BEST_CURVES_ID,
        CHECKPOINT_NAME,
        HISTORY_NAME,
        learning_curves,
        trial_seed,
    )

    started = time.monotonic()
    seed = trial_seed(trial, 0)
    set_user_attrs(trial, {"worker": f"{socket.gethostname()}:{os.getpid()}", "gpu": None,
                           "seed": seed})  # fmt: skip
    with params_together(trial):
        params = sample(trial, space)
    val, loss = fake_curve(params, np.random.default_rng(seed))
    rows: list[dict[str, float]] = []
    best, best_epoch, pruned = -1.0, 0, False
    for epoch in range(1, MAX_EPOCHS + 1):
        value = float(val[epoch - 1])
        rows.append({"epoch": epoch, "loss": float(loss[epoch - 1]), "val_macro_f1": value,
                     "learning_rate": params["learning_rate"]})  # fmt: skip
        if value > best:
            best, best_epoch = value, epoch
        trial.report(value, epoch)
        if trial.should_prune():
            pruned = True
            break
        if epoch - best_epoch >= 5:  # EarlyStopping(patience=5)
            break
    attrs: dict[str, Any] = {"feature_key": f"fake-{params['backbone']}", "epochs_run": len(rows)}
    if pruned:
        set_user_attrs(trial, attrs)
        raise optuna.TrialPruned(f"pruned at epoch {len(rows)}")
    history = pd.DataFrame(rows)
    with tempfile.TemporaryDirectory(prefix="big-study-trial-") as tmp:
        csv, model = Path(tmp) / HISTORY_NAME, Path(tmp) / CHECKPOINT_NAME
        history.to_csv(csv, index=False)
        shutil.copyfile(checkpoint, model)
        for attr, path in (("history", csv), ("checkpoint", model)):
            attrs[attr] = upload_artifact(
                artifact_store=store, file_path=str(path), study_or_trial=trial
            )
    metrics = {"accuracy": best + 0.05, "top5_accuracy": min(1.0, best + 0.3), "macro_f1": best,
               "weighted_f1": best + 0.02, "auc": 0.5 + best / 2,
               "loss": float(loss.min())}  # fmt: skip
    attrs.update({f"val_{k}": round(v, 4) for k, v in metrics.items()})
    attrs.update(checkpoint_kind="full", best_epoch=best_epoch,
                 train_seconds=round(time.monotonic() - started, 2))  # fmt: skip
    set_user_attrs(trial, attrs)
    if is_new_best(trial, best):
        from optuna_dashboard import save_plotly_graph_object

        save_plotly_graph_object(
            trial.study, learning_curves(history, trial.number, best=True),
            graph_object_id=BEST_CURVES_ID,
        )  # fmt: skip
    return best


def tiny_checkpoint(data_dir: Path) -> Path:
    """A real end-to-end Keras model for the prepared data (images in, families out), made
    once: what every kept trial uploads, and what promote-best loads and evaluates."""
    path = CACHE / "checkpoint.keras"
    if path.exists():
        return path
    import keras

    from search.dataset import load_prepared

    data = load_prepared(data_dir)
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(data.image_size, data.image_size, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(data.classes), activation="softmax")(x)
    CACHE.mkdir(parents=True, exist_ok=True)
    keras.Model(inputs, outputs).save(path)
    return path


def open_bench_study(settings: Settings) -> optuna.Study:
    """The study as a worker joins it (creates it and its record on first use)."""
    from search.dataset import load_prepared
    from search.worker import join_study

    study, _ = join_study(settings, load_prepared(settings.data_dir))
    return study


def build_worker(settings: Settings, n_trials: int, checkpoint: Path) -> None:
    from search.space import from_json
    from search.study import open_artifact_store

    study = open_bench_study(settings)
    space = from_json(study.user_attrs["search_space"])
    store = open_artifact_store(settings)
    study.optimize(lambda t: fake_objective(t, space, store, checkpoint), n_trials=n_trials)


def finished(settings: Settings) -> int:
    from search.study import open_storage

    storage = open_storage(settings, heartbeat=False)
    try:
        study = optuna.load_study(study_name=STUDY, storage=storage)
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return len(study.get_trials(deepcopy=False, states=states))
    except KeyError:
        return 0
    finally:
        storage.engine.dispose()


def build(settings: Settings, target: int, workers: int, checkpoint: Path) -> float:
    """Add trials until the study holds `target` finished ones; returns the seconds it took."""
    started = time.perf_counter()
    open_bench_study(settings)  # one process creates the study and its record
    missing = target - finished(settings)
    if missing <= 0:
        return 0.0
    shares = [missing // workers + (i < missing % workers) for i in range(workers)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=build_worker, args=(settings, n, checkpoint)) for n in shares if n]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"build worker exited with {p.exitcode}")
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# storages: a live study to build on, snapshots per size, copies to measure on


class SqliteStudy:
    name = "sqlite"

    def __init__(self) -> None:
        self.live = CACHE / "sqlite-live.sqlite3"

    def url(self, path: Path) -> str:
        return f"sqlite:///{path}"

    def snapshot_path(self, n: int) -> Path:
        return CACHE / f"sqlite-{n}.sqlite3"

    def has_snapshot(self, n: int) -> bool:
        return self.snapshot_path(n).exists()

    def restore_live(self, n: int) -> str:
        _sqlite_copy(self.snapshot_path(n), self.live)
        return self.url(self.live)

    def fresh_live(self) -> str:
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{self.live}{suffix}").unlink(missing_ok=True)
        return self.url(self.live)

    def snapshot(self, n: int) -> None:
        _sqlite_copy(self.live, self.snapshot_path(n))

    def measured_copy(self, n: int, tmp: Path) -> str:
        copy = tmp / f"measure-{n}.sqlite3"
        _sqlite_copy(self.snapshot_path(n), copy)
        return self.url(copy)

    def size_mb(self, url: str) -> float:
        path = Path(make_url(url).database or "")
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20

    def cleanup(self) -> None:
        pass


def _sqlite_copy(source: Path, target: Path) -> None:
    """A consistent copy (the WAL folded in), by SQLite's own backup."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    with sqlite3.connect(target) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


class PostgresStudy:
    name = "postgresql"

    def __init__(self, server: str) -> None:
        self.server = server
        self.live_db = f"big_study_live_{os.getpid()}"
        self.databases: list[str] = []

    def _db_url(self, name: str) -> str:
        return make_url(self.server).set(database=name).render_as_string(hide_password=False)

    def _libpq(self, name: str) -> str:
        url = make_url(self._db_url(name)).set(drivername="postgresql")
        return url.render_as_string(hide_password=False)

    def _create(self, name: str) -> str:
        drop_pg_database(self._libpq_server(), name)
        with psycopg.connect(self._libpq_server(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return self._db_url(name)

    def _libpq_server(self) -> str:
        return make_url(self.server).set(drivername="postgresql").render_as_string(False)

    def snapshot_path(self, n: int) -> Path:
        return CACHE / f"postgresql-{n}.dump"

    def has_snapshot(self, n: int) -> bool:
        return self.snapshot_path(n).exists()

    def _restore(self, n: int, name: str) -> str:
        url = self._create(name)
        subprocess.run(["pg_restore", "--no-owner", "--no-acl", "-d", self._libpq(name),
                        str(self.snapshot_path(n))], check=True)  # fmt: skip
        return url

    def restore_live(self, n: int) -> str:
        return self._restore(n, self.live_db)

    def fresh_live(self) -> str:
        return self._create(self.live_db)

    def snapshot(self, n: int) -> None:
        tmp = self.snapshot_path(n).with_suffix(".part")
        subprocess.run(["pg_dump", "-Fc", "-f", str(tmp), self._libpq(self.live_db)], check=True)
        tmp.rename(self.snapshot_path(n))

    def measured_copy(self, n: int, tmp: Path) -> str:
        return self._restore(n, f"big_study_measure_{n}_{os.getpid()}")

    def size_mb(self, url: str) -> float:
        with psycopg.connect(self._libpq(make_url(url).database or "")) as conn:
            row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        return int(row[0]) / 2**20 if row else float("nan")

    def cleanup(self) -> None:
        for name in self.databases:
            drop_pg_database(self._libpq_server(), name)


# ---------------------------------------------------------------------------------------------
# measurements


def load_avg() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, float, list[float]]:
    """Median wall and CPU seconds of `fn`, and every wall time. CPU seconds are what `fn`
    returns (a subprocess's, the dashboard's), else this process's: other load on the machine
    stretches the wall time but hardly the CPU time, which is about the wall time on an idle
    core."""
    walls, cpus = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        cpu = fn()
        walls.append(time.perf_counter() - started)
        cpus.append(cpu if isinstance(cpu, float) else time.process_time() - cpu_started)
    return statistics.median(walls), statistics.median(cpus), walls


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds of a process and all its descendants (Chromium's renderer, GPU and utility
    processes), those that ended included (in their parents' children times)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    total = 0.0
    for pid in parent:
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in parent:
            ancestor = parent[ancestor]
        if ancestor == root:
            try:  # with its reaped children: a renderer swapped out on navigation counts
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def search_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {**os.environ, "SEARCH_STORAGE": settings.storage, "SEARCH_STUDY": settings.study,
           "SEARCH_DATA_DIR": str(settings.data_dir),
           "SEARCH_FEATURES_DIR": str(settings.features_dir),
           "SEARCH_MODELS_DIR": str(settings.models_dir),
           "SEARCH_ARTIFACTS_DIR": str(settings.artifacts_dir)}  # fmt: skip
    env.update(extra)
    return env


def run_cli(argv: list[str], env: dict[str, str]) -> float:
    """Run a command; its CPU seconds (user + system)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{argv[0]} failed: {err.read().decode()[-2000:]}")
    return usage.ru_utime + usage.ru_stime


def measure_status(settings: Settings, repeats: int) -> dict[str, Any]:
    from search.status import collect

    env = search_env(settings)
    cli, cli_cpu, cli_all = median_time(
        lambda: run_cli([str(BIN / "search"), "status"], env), repeats
    )
    inproc, in_cpu, in_all = median_time(lambda: collect(settings), repeats)
    return {"status_cli_s": cli, "status_cli_cpu_s": cli_cpu, "status_in_s": inproc,
            "status_in_cpu_s": in_cpu, "status_runs": [cli_all, in_all]}  # fmt: skip


def measure_promote(settings: Settings, repeats: int) -> dict[str, Any]:
    """promote-best through its CLI into an empty registry, and its storage reads alone."""
    from search.registry import best_trial, search_budget
    from search.study import load, open_storage

    models = settings.models_dir
    shutil.rmtree(models, ignore_errors=True)
    started = time.perf_counter()
    try:
        cpu = run_cli([str(BIN / "promote-best")], search_env(settings))
        wall = time.perf_counter() - started
    except RuntimeError as exc:  # say so and measure the rest
        log(f"  promote-best failed: {str(exc).strip().splitlines()[-1]}")
        cpu = wall = float("nan")
    shutil.rmtree(models, ignore_errors=True)

    def storage_part() -> None:
        storage = open_storage(settings, heartbeat=False)
        study = load(storage, settings)
        best_trial(study)
        search_budget(study)
        len(study.trials)
        storage.engine.dispose()

    def light_part() -> None:
        """What search/registry.py now reads (it was the remedy this benchmark measured): the
        best trial by one indexed query, the budget from states and times
        (search.status.trial_times)."""
        from search.status import trial_times

        storage = open_storage(settings, heartbeat=False)
        study = load(storage, settings)
        assert "checkpoint" in study.best_trial.user_attrs
        trial_times(study)
        storage.engine.dispose()

    part, part_cpu, _ = median_time(storage_part, repeats)
    light, light_cpu, _ = median_time(light_part, repeats)
    return {"promote_s": wall, "promote_cpu_s": cpu, "promote_storage_s": part,
            "promote_storage_cpu_s": part_cpu, "promote_storage_light_s": light,
            "promote_storage_light_cpu_s": light_cpu}  # fmt: skip


def measure_sampler_pruner(settings: Settings, asks: int) -> dict[str, Any]:
    """Worker-side costs on the copy: ask + the space's suggestions; report + should_prune
    past the warm-up. The trials asked here are told FAIL at the end."""
    from search.space import from_json, sample
    from search.study import load, open_storage, params_together

    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")  # ask(), fine
    storage = open_storage(settings)
    study = load(storage, settings)
    space = from_json(study.user_attrs["search_space"])
    ask_s: list[float] = []
    report_s: list[float] = []
    ask_cpu: list[float] = []
    report_cpu: list[float] = []
    for _ in range(asks):
        started, cpu = time.perf_counter(), time.process_time()
        trial = study.ask()
        with params_together(trial):  # as search.trial.objective does
            params = sample(trial, space)
        ask_s.append(time.perf_counter() - started)
        ask_cpu.append(time.process_time() - cpu)
        val, _ = fake_curve(params, np.random.default_rng(trial.number))
        for epoch in range(1, 9):
            started, cpu = time.perf_counter(), time.process_time()
            trial.report(float(val[epoch - 1]), epoch)
            trial.should_prune()
            if epoch >= 5:
                report_s.append(time.perf_counter() - started)
                report_cpu.append(time.process_time() - cpu)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    storage.engine.dispose()
    return {
        "ask_ms": 1000 * statistics.median(ask_s[1:] or ask_s),
        "ask_cpu_ms": 1000 * statistics.median(ask_cpu[1:] or ask_cpu),
        "ask_first_ms": 1000 * ask_s[0],
        "report_ms": 1000 * statistics.median(report_s),
        "report_cpu_ms": 1000 * statistics.median(report_cpu),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 120) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def measure_dashboard(settings: Settings, expected: int, repeats: int) -> dict[str, Any]:
    """optuna-dashboard as a subprocess: its study page's API calls, then the pages in
    headless Chromium; checks that every trial and a trial's learning curve are served."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(BIN / "optuna-dashboard"), settings.storage, "--port", str(port), "--quiet",
         "--artifact-dir", str(settings.artifacts_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out: dict[str, Any] = {}
    try:
        started = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"optuna-dashboard exited: {proc.stderr.read()[-2000:]}")
            try:
                http_get(f"{base}/api/meta", timeout=5)
                break
            except OSError:
                time.sleep(0.1)
        out["dash_start_s"] = time.perf_counter() - started
        summaries = json.loads(http_get(f"{base}/api/studies"))["study_summaries"]
        study_id = next(s["study_id"] for s in summaries if s["study_name"] == STUDY)
        detail_url = f"{base}/api/studies/{study_id}"

        def served(url: str) -> Callable[[], float]:
            def get() -> float:
                cpu = process_cpu(proc.pid)
                http_get(url)
                return process_cpu(proc.pid) - cpu

            return get

        started, cpu = time.perf_counter(), process_cpu(proc.pid)
        detail = json.loads(http_get(detail_url))
        out["api_cold_s"] = time.perf_counter() - started
        out["api_cold_cpu_s"] = process_cpu(proc.pid) - cpu
        out["api_warm_s"], out["api_warm_cpu_s"], _ = median_time(served(detail_url), repeats)
        out["api_list_s"], _, _ = median_time(served(f"{base}/api/studies"), repeats)
        out["api_importance_s"], out["api_importance_cpu_s"], _ = median_time(
            served(f"{detail_url}/param_importances"), 1
        )
        trials = detail["trials"]
        done = [t for t in trials if t["state"] in ("Complete", "Pruned")]
        assert len(done) >= expected, (len(done), expected)
        # the latest trial with the longest learning curve (intermediate values)
        trial = max(done, key=lambda t: (len(t["intermediate_values"]), t["number"]))
        assert len(trial["intermediate_values"]) >= 5, "no trial with its learning curve"
        out["curve_trial"] = trial["number"]
        out["curve_points"] = len(trial["intermediate_values"])
        figures = detail.get("plotly_graph_objects", [])
        out["best_figure"] = any(g["id"] == "curves-best" for g in figures)
        if CHROMIUM:
            out.update(render_pages(base, study_id, trial, len(trials)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


# The study page ("History") is drawn when each of its plots has its SVG: the history plot
# with its markers, the intermediate values (one trace per trial), the timeline, the importance,
# the curves-best figure; the trial list page when the chosen trial's intermediate values (its
# learning curve) are on screen.
PAGE_PROBE = r"""(() => {
  const q = (s) => document.querySelectorAll(s).length;
  const text = document.body ? document.body.innerText : '';
  return {plots: q('.js-plotly-plot .main-svg'), points: q('.js-plotly-plot .scatterlayer .point'),
          curves: q('#graph-intermediate-values .scatterlayer .trace'),
          timeline: q('#graph-timeline .main-svg'),
          importance: q('#graph-hyperparameter-importances .bars'), chars: text.length,
          best: text.includes('Best Trial'), curve: text.includes('Intermediate Values'),
          trial: (text.match(/Trial \d+ \(trial_id=\d+\)/) || [''])[0]};
})()"""


def study_page_ready(state: dict) -> bool:
    drawn = ("points", "curves", "timeline", "importance", "best")
    return state.get("plots", 0) >= 5 and all(state.get(key) for key in drawn)


def render_pages(base: str, study_id: int, trial: dict, n_trials: int) -> dict[str, Any]:
    """Seconds until the study page and the trial list page (on `trial`) are drawn."""
    out: dict[str, Any] = {}
    wanted = f"Trial {trial['number']} (trial_id={trial['trial_id']})"
    with tempfile.TemporaryDirectory(prefix="big-study-chromium-") as profile:
        browser = Browser(Path(profile))
        try:
            out["render_study_s"], out["study_page"] = browser.load(
                f"{base}/dashboard/studies/{study_id}", PAGE_PROBE, study_page_ready
            )
            out["render_trial_s"], out["trial_page"] = browser.load(
                f"{base}/dashboard/studies/{study_id}/trials?numbers={trial['number']}",
                PAGE_PROBE, lambda r: r.get("trial") == wanted and bool(r.get("curve")),
            )  # fmt: skip
        finally:
            browser.close()
    return out


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4), so no
    WebSocket client is needed. Networking other than the dashboard goes to a dead proxy."""

    def __init__(self, profile: Path) -> None:
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        args = ["--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
                "--remote-debugging-pipe", "--proxy-server=127.0.0.1:9",
                "--proxy-bypass-list=127.0.0.1", f"--user-data-dir={profile}",
                "--window-size=1400,1000", "about:blank"]  # fmt: skip
        shell = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
        self.proc = subprocess.Popen(
            ["bash", "-c", shell, str(CHROMIUM), *args],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.w, self.r = to_chrome_w, from_chrome_r
        self.buffer = b""
        self.next_id = 0
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        self.call("Page.enable", session=self.session)
        self.call("Performance.enable", session=self.session)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.w, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                           session=self.session)  # fmt: skip
        return result.get("result", {}).get("value")

    def load(
        self, url: str, probe: str, ready: Callable[[dict], bool], timeout: float = 180
    ) -> tuple[float, dict]:
        """Seconds from navigation until `ready(probe)`, and the last probe with the CPU
        seconds of all Chromium's processes in that time (cpu_s), and the page's main-thread
        task and script seconds (wall time, which other load stretches)."""
        self.call("Page.navigate", {"url": "about:blank"}, session=self.session)
        before = self.metrics()
        cpu = tree_cpu(self.proc.pid)
        started = time.perf_counter()
        self.call("Page.navigate", {"url": url}, session=self.session)
        state: dict = {}
        seconds = float("nan")
        while time.perf_counter() - started < timeout:
            state = self.evaluate(probe) or {}
            if ready(state):
                seconds = time.perf_counter() - started
                break
            time.sleep(0.05)
        state["cpu_s"] = tree_cpu(self.proc.pid) - cpu
        after = self.metrics()
        for name in ("TaskDuration", "ScriptDuration"):
            state[name] = round(after.get(name, 0.0) - before.get(name, 0.0), 2)
        return seconds, state

    def metrics(self) -> dict[str, float]:
        result = self.call("Performance.getMetrics", session=self.session)
        return {m["name"]: m["value"] for m in result.get("metrics", [])}

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.w)
        os.close(self.r)


def measure(settings: Settings, n: int, args: argparse.Namespace, store: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"n": n, "db_mb": store.size_mb(settings.storage)}
    log(f"  {n} trials: status ({load_avg()})")
    row.update(measure_status(settings, args.repeats))
    log(f"  {n} trials: dashboard ({load_avg()})")
    row.update(measure_dashboard(settings, n, args.repeats))
    log(f"  {n} trials: promote-best ({load_avg()})")
    row.update(measure_promote(settings, args.repeats))
    log(f"  {n} trials: sampler and pruner ({load_avg()})")
    row.update(measure_sampler_pruner(settings, args.asks))
    row["load"] = os.getloadavg()[0]
    log(f"  {n} trials: {json.dumps(row, default=str)}")
    return row


# ---------------------------------------------------------------------------------------------


def run_storage(store: Any, args: argparse.Namespace, data_dir: Path, checkpoint: Path) -> list:
    """Build (or restore) the study size by size; measure each size on a copy."""
    stages = sorted(args.stages)
    cached = [n for n in stages if store.has_snapshot(n)]
    live_url: str | None = None
    rows = []
    with tempfile.TemporaryDirectory(prefix="big-study-") as tmp:
        for n in stages:
            if not store.has_snapshot(n):
                if live_url is None:
                    below = [c for c in cached if c < n]
                    live_url = store.restore_live(max(below)) if below else store.fresh_live()
                settings = bench_settings(live_url, store.name, data_dir)
                log(f"{store.name}: building to {n} finished trials with {args.workers} "
                    f"workers ({load_avg()})")  # fmt: skip
                seconds = build(settings, n, args.workers, checkpoint)
                log(f"{store.name}: built {n} in {seconds:.0f}s ({load_avg()})")
                store.snapshot(n)
            url = store.measured_copy(n, Path(tmp))
            settings = bench_settings(url, store.name, data_dir)
            log(f"{store.name}: measuring at {n} trials")
            rows.append(measure(settings, n, args, store))
    return rows


COLUMNS = [  # header, unit scale, wall key, CPU key
    ("ask ms", 1, "ask_ms", "ask_cpu_ms"),
    ("report ms", 1, "report_ms", "report_cpu_ms"),
    ("status CLI s", 1, "status_cli_s", "status_cli_cpu_s"),
    ("status in-proc s", 1, "status_in_s", "status_in_cpu_s"),
    ("API cold s", 1, "api_cold_s", "api_cold_cpu_s"),
    ("API warm s", 1, "api_warm_s", "api_warm_cpu_s"),
    ("render study s", 1, "render_study_s", "render_study_cpu_s"),
    ("render trial s", 1, "render_trial_s", "render_trial_cpu_s"),
    ("promote s", 1, "promote_s", "promote_cpu_s"),
    ("promote reads s", 1, "promote_storage_s", "promote_storage_cpu_s"),
    ("remedy reads s", 1, "promote_storage_light_s", "promote_storage_light_cpu_s"),
]


def print_table(name: str, rows: list[dict[str, Any]]) -> None:
    """One row per size; each cell is wall (CPU) seconds or ms, medians."""
    cells = []
    for r in rows:
        r = {**r, "render_study_cpu_s": r.get("study_page", {}).get("cpu_s"),
             "render_trial_cpu_s": r.get("trial_page", {}).get("cpu_s")}  # fmt: skip
        row = [str(r["n"])]
        for _, _, wall, cpu in COLUMNS:
            w, c = r.get(wall), r.get(cpu)
            digits = 0 if wall.endswith("_ms") else 2
            text = "-" if w is None else f"{w:.{digits}f}"
            row.append(text if c is None else f"{text} ({c:.{digits}f})")
        row += [f"{r['ask_first_ms']:.0f}", f"{r['db_mb']:.1f}", f"{r['load']:.1f}"]
        cells.append(row)
    header = ["trials", *(c[0] for c in COLUMNS), "1st ask ms", "DB MB", "load"]
    widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=True)]
    print(f"\n{name}: wall (CPU) per call, medians")
    for row in [header, *cells]:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)))


def verdict(name: str, row: dict[str, Any]) -> None:
    """Each target by wall time here and by CPU time (about the wall time on an idle core)."""
    page = row.get("study_page", {})
    row = {**row, "ask_s": row["ask_ms"] / 1000, "ask_cpu_s": row["ask_cpu_ms"] / 1000}
    checks = [
        ("sampler ask < 1 s", "ask_s", "ask_cpu_s", TARGETS["ask_s"]),
        ("search status < 2 s (CLI)", "status_cli_s", "status_cli_cpu_s", TARGETS["status_s"]),
        ("dashboard study API < 3 s (cold)", "api_cold_s", "api_cold_cpu_s", TARGETS["api_s"]),
        ("study page renders < 5 s", "render_study_s", "", TARGETS["render_s"]),
    ]
    for label, wall, cpu, target in checks:
        w = row.get(wall, float("nan"))
        c = row.get(cpu, float("nan")) if cpu else page.get("cpu_s", float("nan"))
        by_wall, by_cpu = ("met" if v < target else "NOT MET" for v in (w, c))
        print(f"{name} at {row['n']} trials: {label}: wall {w:.2f} ({by_wall}), CPU {c:.2f} "
              f"({by_cpu})")  # fmt: skip
    print(f"{name} at {row['n']} trials: a trial's learning curve in the API: trial "
          f"{row['curve_trial']} with {row['curve_points']} intermediate values, shown on its "
          f"trial page: {bool(row.get('trial_page', {}).get('curve'))}; curves-best figure on "
          f"the study: {row['best_figure']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=lambda s: [int(x) for x in s.split(",")],
                        default=[100, 1000, 2000])  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="processes building the study")
    parser.add_argument("--storages", default="sqlite,postgresql")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement")
    parser.add_argument("--asks", type=int, default=6, help="trials asked per size")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where built studies are kept")
    args = parser.parse_args()
    set_cache(args.cache)
    log(f"big study on {machine()}; stages {args.stages}, {args.workers} build workers")
    CACHE.mkdir(parents=True, exist_ok=True)
    data_dir = prepared(8, 320, 64, 64)
    checkpoint = tiny_checkpoint(data_dir)
    results: dict[str, list] = {}
    for name in args.storages.split(","):
        store = SqliteStudy() if name == "sqlite" else PostgresStudy(args.pg)
        try:
            results[name] = run_storage(store, args, data_dir, checkpoint)
        finally:
            store.cleanup()
    for name, rows in results.items():
        print_table(name, rows)
    print()
    for name, rows in results.items():
        verdict(name, rows[-1])


if __name__ == "__main__":
    main()
