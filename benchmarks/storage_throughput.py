"""How many workers can one study storage serve? Trials per hour for 1, 2 and 4 worker processes
on SQLite (the single-machine default) and on PostgreSQL, and the storage's own cost per trial.

A benchmark trial does what a real one (search/trial.py) does to the storage, without the
training: the worker's storage settings (search.study: heartbeat, pool, TPE sampler with constant
liar, median pruner asked from its first prunable epoch on), the search space's ten suggestions,
the trial's attributes written together at its start and at its end (search.study.set_user_attrs),
a report per epoch (8 epochs), written together as a head trial's are
(search.study.reports_together), should_prune from epoch 5, two artifact uploads (checkpoint
and history, into a folder), the new-best check, tell. Each epoch sleeps TRIAL_S / 8, so the
CPU (2 cores here) is not what limits 4 workers: what is measured is the storage. Each row runs
its workers for the same wall time.

    .venv/bin/python benchmarks/storage_throughput.py [--seconds 12] [--trial-s 0.4]
        [--pg postgresql://postgres@127.0.0.1:5432/postgres] [--loop-rounds 5]

Columns: trials/hour across all workers; "vs ideal" = that / (workers x 3600 / TRIAL_S), the
share of time workers spend training rather than waiting on the storage; "storage ms/trial" =
wall time per trial not spent sleeping, per worker; "connections" = the workers' PostgreSQL
sessions half-way through. Rows sample at random, so that the sampler's CPU time (TPE's, which
grows with the study) is not counted as storage time; the "+TPE" row shows it with the
workers' own sampler. "overhead" rows run one worker with TRIAL_S = 0: nothing but storage
round trips. Every study starts with 30 trials, so tables and TPE are past their start-up.

Then, less noisy on a shared machine: one worker in this process runs rounds of 60 empty
trials; per trial, the median over rounds of wall ms, this process's CPU ms and SQL statements.
To compare two versions, run it in a checkout of each (git worktree) one after the other.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import psycopg
from common import log, machine
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts._protocol import ArtifactStore
from sqlalchemy import event
from sqlalchemy.engine import make_url

from search.settings import Settings
from search.study import (
    attrs_together,
    create_or_load,
    is_new_best,
    open_storage,
    params_together,
    reports_together,
    set_user_attrs,
)

EPOCHS = 8
WARM_UP = 30  # trials in the study before timing: TPE past its random start-up, tables warm
optuna.logging.set_verbosity(optuna.logging.WARNING)


def objective(trial: optuna.Trial, trial_s: float, store: ArtifactStore) -> float:
    """The storage traffic of one real trial (search/space.py + search/trial.py), no training."""
    set_user_attrs(trial, {"worker": "bench", "gpu": None, "seed": trial.number})
    with params_together(trial):
        trial.suggest_categorical("backbone", ["efficientnet_lite0", "mobilenet_v2_tv"])
        n_layers = trial.suggest_int("n_layers", 1, 3)
        for i in range(n_layers):
            trial.suggest_int(f"units_{i}", 64, 1024, log=True)
            trial.suggest_float(f"dropout_{i}", 0.0, 0.6)
        trial.suggest_categorical("batch_norm", [True, False])
        lr = trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True)
        trial.suggest_categorical("optimizer", ["adam", "adamw", "sgd", "rmsprop"])
        trial.suggest_categorical("batch_size", [16, 32, 64, 128])
        trial.suggest_float("label_smoothing", 0.0, 0.2)
        trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    with reports_together(trial):  # as a head trial: written together every few seconds
        for epoch in range(1, EPOCHS + 1):
            time.sleep(trial_s / EPOCHS)
            trial.report(0.1 * epoch, epoch)  # the same curve for all: never pruned
            if trial.should_prune():
                raise optuna.TrialPruned()
    attrs: dict[str, Any] = {"feature_key": "bench", "epochs_run": EPOCHS}
    with attrs_together(trial), tempfile.TemporaryDirectory() as tmp:  # as a trial's end
        for name in ("history", "checkpoint"):
            path = Path(tmp) / name
            path.write_bytes(b"x" * 1024)
            attrs[name] = upload_artifact(
                artifact_store=store, file_path=str(path), study_or_trial=trial
            )
        attrs.update({f"val_{m}": 0.5 for m in ("accuracy", "top5_accuracy", "macro_f1",
                                                 "weighted_f1", "auc", "loss")})  # fmt: skip
        attrs.update(checkpoint_kind="head", best_epoch=EPOCHS, train_seconds=trial_s)
        set_user_attrs(trial, attrs)
    is_new_best(trial, 0.8 + lr)
    return 0.8 + lr


def open_study(url: str, study: str, sampler: str) -> tuple[optuna.Study, Any]:
    """The study as a worker opens it (storage settings, heartbeat, pruner); the sampler is
    the worker's TPE, or random sampling to leave the sampler's CPU time out of the storage's."""
    settings = Settings(storage=url, study=study, max_epochs=EPOCHS)
    storage = open_storage(settings)
    handle = create_or_load(storage, settings)
    if sampler == "random":
        handle.sampler = optuna.samplers.RandomSampler()
    return handle, storage


def worker(
    url: str, study: str, sampler: str, trial_s: float, start_at: float, seconds: float, out: Any
) -> None:
    handle, _ = open_study(url, study, sampler)
    store = FileSystemArtifactStore(tempfile.mkdtemp(prefix="bench-artifacts-"))
    time.sleep(max(0.0, start_at - time.time()))
    done = 0
    deadline = start_at + seconds
    while time.time() < deadline:
        handle.optimize(lambda t: objective(t, trial_s, store), n_trials=1)
        done += 1
    out.put((done, time.time() - start_at))


def run(
    url: str, workers: int, trial_s: float, seconds: float, sampler: str = "random"
) -> dict[str, Any]:
    study = f"bench-{uuid.uuid4().hex[:8]}"
    handle, storage = open_study(url, study, sampler)
    store = FileSystemArtifactStore(tempfile.mkdtemp(prefix="bench-artifacts-"))
    handle.optimize(lambda t: objective(t, 0.0, store), n_trials=WARM_UP)
    storage.engine.dispose()  # count only the workers' connections below
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 4.0  # every child has imported and connected by then
    procs = [
        ctx.Process(target=worker, args=(url, study, sampler, trial_s, start_at, seconds, out))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    connections = None
    if url.startswith("postgresql"):
        time.sleep(max(0.0, start_at - time.time()) + seconds / 2)
        connections = pg_connections(url)
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    trials = sum(n for n, _ in results)
    elapsed = max(t for _, t in results)
    per_hour = trials / elapsed * 3600
    busy = elapsed * workers / trials  # seconds each trial took, per worker
    return {
        "trials": trials,
        "per_hour": per_hour,
        "vs_ideal": per_hour / (workers * 3600 / trial_s) if trial_s else None,
        "storage_ms": (busy - trial_s) * 1000,
        "connections": connections,
    }


def loop(url: str, rounds: int, trials: int = 60) -> dict[str, float]:
    """Median per empty trial over `rounds` rounds of one in-process worker: wall ms, CPU ms
    (this process only, which other load on the machine barely changes), SQL statements."""
    handle, storage = open_study(url, f"loop-{uuid.uuid4().hex[:8]}", "random")
    store = FileSystemArtifactStore(tempfile.mkdtemp(prefix="bench-artifacts-"))
    handle.optimize(lambda t: objective(t, 0.0, store), n_trials=WARM_UP)
    executed = [0]

    def count(*_: Any) -> None:
        executed[0] += 1

    event.listen(storage.engine, "before_cursor_execute", count)
    walls, cpus, statements = [], [], []
    for _ in range(rounds):
        executed[0] = 0
        wall, cpu = time.perf_counter(), time.process_time()
        handle.optimize(lambda t: objective(t, 0.0, store), n_trials=trials)
        walls.append((time.perf_counter() - wall) / trials * 1000)
        cpus.append((time.process_time() - cpu) / trials * 1000)
        statements.append(executed[0] / trials)
    event.remove(storage.engine, "before_cursor_execute", count)
    storage.engine.dispose()
    median = statistics.median
    return {"wall": median(walls), "cpu": median(cpus), "statements": median(statements)}


def pg_connections(url: str) -> int:
    database = make_url(url).database
    admin = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchone()
    return int(row[0]) if row else 0


def fresh_pg_database(server: str) -> tuple[str, str]:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(server).set(database=name).render_as_string(hide_password=False), name


def drop_pg_database(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="wall time per row")
    parser.add_argument("--trial-s", dest="trial_s", type=float, default=0.4)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--loop-rounds", dest="loop_rounds", type=int, default=5)
    args = parser.parse_args()
    log(f"storage throughput on {machine()}; trials of {args.trial_s}s, {args.seconds}s per row")

    tmp = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    pg_url, pg_name = fresh_pg_database(args.pg)
    storages = {"sqlite": f"sqlite:///{tmp / 'bench.sqlite3'}", "postgresql": pg_url}
    rows: list[tuple[str, str, dict]] = []
    loops: dict[str, dict[str, float]] = {}
    try:
        for name, url in storages.items():
            log(f"{name}: storage overhead (1 worker, empty trials)")
            rows.append((name, "overhead", run(url, 1, 0.0, args.seconds / 2)))
            rows.append((name, "+TPE", run(url, 1, 0.0, args.seconds / 2, sampler="tpe")))
            for n in (1, 2, 4):
                log(f"{name}: {n} worker(s)")
                rows.append((name, f"{n} workers", run(url, n, args.trial_s, args.seconds)))
        for name, url in storages.items():
            log(f"{name}: {args.loop_rounds} rounds of 60 empty trials in this process")
            loops[name] = loop(url, args.loop_rounds)
    finally:
        drop_pg_database(args.pg, pg_name)
        shutil.rmtree(tmp, ignore_errors=True)

    header = f"{'storage':<11}{'run':<11}{'trials':>7}{'trials/hour':>13}{'vs ideal':>10}"
    header += f"{'storage ms/trial':>18}{'connections':>13}"
    print(header)
    print("-" * len(header))
    for storage, label, r in rows:
        ideal = "-" if r["vs_ideal"] is None else f"{r['vs_ideal']:.0%}"
        conns = "-" if r["connections"] is None else str(r["connections"])
        print(
            f"{storage:<11}{label:<11}{r['trials']:>7}{r['per_hour']:>13,.0f}{ideal:>10}"
            f"{r['storage_ms']:>18.1f}{conns:>13}"
        )
    by = {(s, label): r for s, label, r in rows}
    for storage in storages:
        four, one = by[(storage, "4 workers")], by[(storage, "1 workers")]
        print(f"{storage}: 4 workers deliver {four['per_hour'] / one['per_hour']:.2f}x one worker")
    pg, sq = by[("postgresql", "overhead")], by[("sqlite", "overhead")]
    print(f"storage cost per trial, postgresql / sqlite: {pg['storage_ms'] / sq['storage_ms']:.2f}")
    for storage, r in loops.items():
        print(
            f"{storage}: one worker, empty trials, median of {args.loop_rounds} rounds: "
            f"{r['wall']:.1f} ms wall, {r['cpu']:.1f} ms CPU, {r['statements']:.0f} SQL statements"
            " per trial"
        )


if __name__ == "__main__":
    main()
