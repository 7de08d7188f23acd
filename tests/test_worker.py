"""Workers as real processes on a real SQLite file, as `docker compose up` starts replicas."""

from __future__ import annotations

import gc
import subprocess
import weakref
from pathlib import Path

import keras
import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.trial import TrialState

from search.settings import Settings
from search.study import load, open_storage
from search.worker import long_lived_objects_frozen
from tests.conftest import SEARCH, search_env

N_TRIALS = 9


def test_three_workers_started_together_share_one_fresh_sqlite_study(workspace: Path) -> None:
    env = search_env(workspace)
    procs = [
        subprocess.Popen(
            [SEARCH, "worker", "--n-trials", str(N_TRIALS)],
            env=env,
            cwd=workspace,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=480) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "worker done" in out
        assert "worker: trial" in err, "every worker must have run at least one trial"

    settings = Settings.load(environ=env)
    study = load(open_storage(settings, heartbeat=False), settings)
    trials = study.get_trials(deepcopy=False)
    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(len(trials))), "trial numbers have gaps or duplicates"
    assert all(t.state.is_finished() for t in trials), [t.state for t in trials]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert N_TRIALS <= len(finished) <= N_TRIALS + 2  # workers overshoot by at most N-1

    best = study.best_trial
    store = FileSystemArtifactStore(str(workspace / "models" / "artifacts"))
    path = workspace / "best.keras"
    download_artifact(
        artifact_store=store, file_path=str(path), artifact_id=best.user_attrs["checkpoint"]
    )
    model = keras.models.load_model(path, compile=False)
    assert model.output_shape[-1] == len(study.user_attrs["classes"])
    assert 0.0 <= best.value <= 1.0
    for key in ("val_accuracy", "val_top5_accuracy", "val_auc", "val_loss", "seed"):
        assert key in best.user_attrs, key
    assert (
        study.user_attrs["data_hash"]
        and study.user_attrs["versions"]["optuna"] == optuna.__version__
    )


def test_a_worker_past_its_memory_limit_starts_afresh_as_the_same_process(
    workspace: Path,
) -> None:
    """TensorFlow keeps a few MB of every trial's model: past SEARCH_WORKER_MAX_RSS_MB a worker
    replaces itself between trials (same PID, same command) and the study's budget carries on.
    A 1 MB limit makes it start afresh after its first trial; after the second the budget is
    spent and it stops."""
    (workspace / "head_space.toml").write_text(
        '[space]\nbackbone = ["efficientnet_lite0"]\nn_layers = {low = 1, high = 1}\n'
    )
    env = search_env(
        workspace,
        SEARCH_WORKER_MAX_RSS_MB="1",
        SEARCH_MAX_EPOCHS="2",
        SEARCH_PRUNER="none",
        SEARCH_SPACE_FILE=str(workspace / "head_space.toml"),
    )
    done = subprocess.run(
        [SEARCH, "worker", "--n-trials", "2", "--timeout", "600"],
        env=env, cwd=workspace, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("starting afresh") == 1, done.stderr[-3000:]
    assert done.stdout.count("worker done (memory)") == 1
    assert done.stdout.count("worker done (budget)") == 1
    settings = Settings.load(environ=env)
    trials = load(open_storage(settings, heartbeat=False), settings).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[0].user_attrs["worker"] == trials[1].user_attrs["worker"]  # host:pid


def test_long_lived_objects_are_frozen_only_while_the_worker_runs() -> None:
    """Full collections skip Keras's and TensorFlow's objects inside the block, garbage made
    inside is still collected, and the process gets its collector back as it was."""

    class Node:
        pass

    before = gc.get_freeze_count()
    with long_lived_objects_frozen():
        assert gc.get_freeze_count() > before + 100_000  # keras, tensorflow, optuna, ...
        node = Node()
        node.itself = node  # a cycle: only the collector frees it
        ref = weakref.ref(node)
        del node
        gc.collect()
        assert ref() is None
    assert gc.get_freeze_count() == before
