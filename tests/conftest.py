"""Shared fixtures: one small generated data set, prepared once per session, and helpers to run
the real CLI in subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests never download: any attempt (e.g. Keras ImageNet weights) hits a dead proxy at once.
os.environ["HTTPS_PROXY"] = os.environ["HTTP_PROXY"] = "http://127.0.0.1:9"
os.environ["NO_PROXY"] = "127.0.0.1,localhost"

ROOT = Path(__file__).resolve().parent.parent
SEARCH = str(Path(sys.executable).parent / "search")
PROMOTE = str(Path(sys.executable).parent / "promote-best")
IMAGE_SIZE = 32
FAST_SPACE = """
[space]
backbone = ["efficientnet_lite0", "baseline_cnn"]
n_layers = {low = 1, high = 2}
units = {low = 32, high = 128}
batch_size = [32, 64]
"""


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 families, ~240 images, prepared at 32 px: big enough to learn, small enough for CI."""
    from search.dataset import prepare
    from search.synth import generate

    root = tmp_path_factory.mktemp("data")
    source = generate(root / "rare_species.zip", n_families=8, total_images=240, image_px=64,
                      as_zip=True, seed=3)  # fmt: skip
    prepare(source, root / "prepared", image_size=IMAGE_SIZE, seed=0)
    return root / "prepared"


@pytest.fixture(scope="session")
def shared_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for every workspace of this run, also across pytest-xdist processes:
    the workspaces hold the same prepared data, so each backbone's features are computed once
    (under the cache's own lock) instead of once per test. tests/test_features.py tests the
    cache itself in folders of its own."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's folder, shared by its xdist processes
    folder = base / "shared-features"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture()
def workspace(tmp_path: Path, prepared_dir: Path, shared_features: Path) -> Path:
    """A project-like folder: its own study_db/, models/ and a fast space file; its feature
    cache folder is the run's shared one."""
    shutil.copytree(prepared_dir, tmp_path / "data" / "prepared")
    (tmp_path / "data" / "features").symlink_to(shared_features, target_is_directory=True)
    (tmp_path / "space.toml").write_text(FAST_SPACE)
    return tmp_path


def search_env(workspace: Path, **extra: str) -> dict[str, str]:
    """Environment of a CLI process working in `workspace` (settings via SEARCH_* variables)."""
    env = dict(os.environ)
    env.update(
        {
            "SEARCH_STORAGE": f"sqlite:///{workspace / 'study_db' / 'search.sqlite3'}",
            "SEARCH_STUDY": "test",
            "SEARCH_DATA_DIR": str(workspace / "data" / "prepared"),
            "SEARCH_FEATURES_DIR": str(workspace / "data" / "features"),
            "SEARCH_MODELS_DIR": str(workspace / "models"),
            "SEARCH_ARTIFACTS_DIR": str(workspace / "models" / "artifacts"),
            "SEARCH_SPACE_FILE": str(workspace / "space.toml"),
            "SEARCH_WEIGHTS": "imagenet",  # the offline ported weights: no download
            "SEARCH_MAX_EPOCHS": "4",
            "SEARCH_FEATURE_VIEWS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def use_search_env(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, **extra: str
) -> dict[str, str]:
    """Point in-process commands (`search.cli.main`, `Settings.load()`) at `workspace`: its
    SEARCH_* variables are set for this test only. Returns the whole `search_env`."""
    env = search_env(workspace, **extra)
    for key, value in env.items():
        if key.startswith("SEARCH_"):
            monkeypatch.setenv(key, value)
    return env


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300, program: str = SEARCH
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [program, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


HEAD = {
    "backbone": "efficientnet_lite0",
    "n_layers": 1,
    "units_0": 64,
    "dropout_0": 0.1,
    "batch_norm": True,
    "learning_rate": 0.01,
    "optimizer": "adam",
    "batch_size": 32,
    "label_smoothing": 0.0,
    "weight_decay": 1e-6,
    "phylum_loss_weight": 0.0,
}


def searched_workspace(root: Path, prepared_dir: Path) -> Path:
    """A workspace whose study holds two complete trials: a head on a frozen backbone (HEAD)
    and the from-scratch CNN, run by a real worker loop."""
    from search.settings import Settings
    from search.study import create_or_load, open_storage
    from search.worker import run_worker

    shutil.copytree(prepared_dir, root / "data" / "prepared")
    (root / "space.toml").write_text('[space]\nbackbone = ["efficientnet_lite0", "baseline_cnn"]\n')
    settings = Settings.load(environ=search_env(root, SEARCH_PRUNER="none"))
    study = create_or_load(open_storage(settings, heartbeat=False), settings)
    study.enqueue_trial(HEAD)
    study.enqueue_trial({**HEAD, "backbone": "baseline_cnn"})
    run_worker(settings, n_trials=2)
    return root
