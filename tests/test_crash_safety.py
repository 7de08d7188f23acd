"""No trial lost or stuck when things fail: a worker killed with SIGKILL, a worker stopped with
SIGTERM (`docker stop`), a PostgreSQL restart in the middle of a study, and trials whose loss
turns NaN or whose model does not fit in memory. Real worker processes, real PostgreSQL."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from search.settings import Settings
from search.study import create_or_load, load, open_storage
from search.worker import run_worker
from tests.conftest import HEAD, SEARCH, search_env
from tests.test_postgres import fresh_database, throwaway_cluster

# Heads on cached features only, 8 epochs without pruning: a trial lasts long enough to be
# caught in the middle, and early stopping cannot end it before epoch 6.
HEAD_SPACE = """
[space]
backbone = ["efficientnet_lite0"]
n_layers = {low = 1, high = 1}
units = {low = 32, high = 64}
batch_size = [32]
"""
QUICK = {"SEARCH_HEARTBEAT_INTERVAL": "1", "SEARCH_GRACE_PERIOD": "3"}
FINAL = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class Worker:
    """A `search worker` process whose log lines can be waited for."""

    def __init__(self, env: dict[str, str], cwd: Path, n_trials: int) -> None:
        self.proc = subprocess.Popen(
            [SEARCH, "worker", "--n-trials", str(n_trials)],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.out: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pumps = [
            threading.Thread(target=self._pump, daemon=True),
            threading.Thread(target=self._collect_stdout, daemon=True),
        ]
        for pump in self._pumps:
            pump.start()

    @property
    def id(self) -> str:
        return f"{socket.gethostname()}:{self.proc.pid}"

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def _collect_stdout(self) -> None:
        assert self.proc.stdout is not None
        self.out.extend(self.proc.stdout)

    def wait_for(self, pattern: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"worker exited before {pattern!r}:\n{self.log[-3000:]}")
            if re.search(pattern, line):
                return
        raise AssertionError(f"no {pattern!r} in time:\n{self.log[-3000:]}")

    def finish(self, timeout: float = 400) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        for pump in self._pumps:
            pump.join(timeout=30)
        return code, "".join(self.out)

    @property
    def log(self) -> str:
        return "".join(self.lines)


def crash_env(workspace: Path, storage: str, **extra: str) -> dict[str, str]:
    (workspace / "head_space.toml").write_text(HEAD_SPACE)
    settings = {
        "SEARCH_STORAGE": storage,
        "SEARCH_SPACE_FILE": str(workspace / "head_space.toml"),
        "SEARCH_MAX_EPOCHS": "8",
        "SEARCH_PRUNER": "none",
        **QUICK,
    }
    return search_env(workspace, **{**settings, **extra})


def trials_of(env: dict[str, str]) -> list:
    settings = Settings.load(environ=env)
    study = load(open_storage(settings, heartbeat=False), settings)
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


def assert_numbered_without_gaps(trials: list) -> None:
    assert [t.number for t in trials] == list(range(len(trials)))


def test_sigkilled_workers_trial_is_failed_and_retried_by_another_worker(workspace: Path) -> None:
    with fresh_database() as url:
        env = crash_env(workspace, url)
        doomed = Worker(env, workspace, n_trials=50)
        doomed.wait_for(r"^trial 0 epoch 1/")
        os.kill(doomed.proc.pid, signal.SIGSTOP)  # freeze it mid-trial, then kill it there
        assert trials_of(env)[0].state == TrialState.RUNNING
        os.kill(doomed.proc.pid, signal.SIGKILL)
        doomed.finish(timeout=60)
        assert trials_of(env)[0].state == TrialState.RUNNING  # nobody has noticed yet

        rescuer = Worker(env, workspace, n_trials=2)
        code, out = rescuer.finish()
        assert code == 0, rescuer.log[-3000:]

        trials = trials_of(env)
    assert_numbered_without_gaps(trials)
    assert all(t.state in FINAL for t in trials), [t.state for t in trials]
    killed = trials[0]
    assert killed.state == TrialState.FAIL
    assert killed.user_attrs["worker"] == doomed.id
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == killed.params and retry.user_attrs["seed"] == killed.user_attrs["seed"]
    assert retry.user_attrs["worker"] == rescuer.id
    assert "checkpoint" in retry.user_attrs and "fail_reason" not in retry.user_attrs


def test_sigterm_stops_within_ten_seconds_and_queues_the_trial_again(workspace: Path) -> None:
    with fresh_database() as url:
        env = crash_env(workspace, url)
        worker = Worker(env, workspace, n_trials=50)
        worker.wait_for(r"^trial 0 epoch 1/")
        worker.proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
        try:
            code, out = worker.finish(timeout=10)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            raise AssertionError(f"no exit within 10 s of SIGTERM:\n{worker.log[-3000:]}") from None
        trials = trials_of(env)
    assert code == 0 and "worker done (signal)" in out, worker.log[-3000:]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    stopped, queued = trials
    assert stopped.user_attrs["fail_reason"].startswith("stopped by signal at epoch")
    assert "checkpoint" not in stopped.user_attrs  # no model from a half-trained trial
    assert queued.system_attrs["failed_trial"] == 0 and queued.params == stopped.params
    assert "fail_reason" not in queued.user_attrs  # the retry starts clean
    # Nothing uploaded for a trial that is not kept; its curve is whole in the study (one
    # validation score per epoch it ran).
    stored = [p for p in (workspace / "models" / "artifacts").rglob("*") if p.is_file()]
    assert stored == []
    assert len(stopped.intermediate_values) == stopped.user_attrs["epochs_run"] >= 1


def test_postgres_restart_mid_study_and_the_study_still_finishes(workspace: Path) -> None:
    n_trials = 8
    with throwaway_cluster() as cluster:
        env = crash_env(workspace, cluster.url, SEARCH_MAX_EPOCHS="3")
        workers = [Worker(env, workspace, n_trials=n_trials) for _ in range(2)]
        for worker in workers:
            worker.wait_for(r"^worker: trial \d+ COMPLETE")  # both are in the middle of things
        cluster.stop()
        time.sleep(3)  # a restart with some downtime: every worker meets the outage
        cluster.start()
        results = [w.finish() for w in workers]
        trials = trials_of(env)
    for worker, (code, out) in zip(workers, results, strict=True):
        assert code == 0 and "worker done (budget)" in out, worker.log[-3000:]
    noticed = [w for w in workers if "storage error" in w.log or "missed a beat" in w.log]
    assert noticed, "no worker met the outage: the test proved nothing"
    assert_numbered_without_gaps(trials)
    assert all(t.state in FINAL for t in trials), [t.state for t in trials]
    assert sum(t.state != TrialState.FAIL for t in trials) >= n_trials
    for failed in (t for t in trials if t.state == TrialState.FAIL):  # each one queued again
        assert any(t.system_attrs.get("retry_history", [])[-1:] == [failed.number] for t in trials)


NAN_AND_OOM_SPACE = """
[space]
backbone = ["efficientnet_lite0"]
learning_rate = {low = 1e-4, high = 1e4, log = true}
units = {low = 32, high = 40000000000}
"""
PLAIN_HEAD = {**HEAD, "dropout_0": 0.0, "batch_norm": False}
# Plain SGD at the widened space's largest learning rate, with the default space's largest
# weight decay: each step scales the weights by 1 - lr * wd = -99, so they overflow to inf.
DIVERGES = {**PLAIN_HEAD, "optimizer": "sgd", "learning_rate": 1e4, "weight_decay": 1e-2}
# A 1280 x 4e10 kernel: 200 TB, more than any machine's (or GPU's) memory.
TOO_BIG = {**PLAIN_HEAD, "units_0": 40_000_000_000}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nan_loss_and_out_of_memory_fail_only_their_own_trial(workspace: Path) -> None:
    (workspace / "nan_space.toml").write_text(NAN_AND_OOM_SPACE)
    env = search_env(
        workspace, SEARCH_SPACE_FILE=str(workspace / "nan_space.toml"), SEARCH_PRUNER="none"
    )
    settings = Settings.load(environ=env)
    study = create_or_load(open_storage(settings, heartbeat=False), settings)
    for params in (DIVERGES, TOO_BIG, PLAIN_HEAD):
        study.enqueue_trial(params)

    report = run_worker(settings, n_trials=1)

    diverged, oom, fine = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert diverged.state == TrialState.FAIL
    assert "NaN" in diverged.user_attrs["fail_reason"]
    assert oom.state == TrialState.FAIL
    assert re.search(r"OOM|ResourceExhausted|out of memory", oom.user_attrs["fail_reason"])
    assert fine.state == TrialState.COMPLETE  # the worker went on after both
    assert report.trials == {"FAIL": 2, "COMPLETE": 1}
