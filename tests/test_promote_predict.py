"""promote-best and predict through the real CLI, on a study that real workers filled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from search.dataset import load_prepared
from search.features import load_or_compute
from search.registry import load_champion
from search.settings import Settings
from search.study import open_storage
from tests.conftest import PROMOTE, run_cli, search_env, searched_workspace


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    return searched_workspace(tmp_path_factory.mktemp("searched"), prepared_dir)


def test_promote_writes_an_end_to_end_champion_that_predict_uses(searched: Path) -> None:
    env = search_env(searched)
    result = run_cli([], env, searched, program=PROMOTE)
    assert result.returncode == 0, result.stderr
    assert "promoted trial" in result.stdout
    champion = load_champion(searched / "models")
    info = champion.info
    assert set(info["test"]) >= {"accuracy", "macro_f1", "top5_accuracy", "auc", "loss"}
    assert (searched / "models" / "champion").is_symlink()

    data = load_prepared(searched / "data" / "prepared")
    some = data.manifest[data.manifest["split"] == "test"].head(3)
    images = data.images()[some["index"].to_numpy()]
    probs = champion.predict(np.asarray(images))
    assert probs.shape == (3, len(data.classes))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)

    # Promoting again: the same trial is already the champion, nothing changes.
    again = run_cli([], env, searched, program=PROMOTE)
    assert again.returncode == 0 and "already the champion" in again.stdout


def test_champion_matches_head_on_cached_features(searched: Path) -> None:
    """The end-to-end champion equals backbone features -> head, within float16 tolerance."""
    from search.champion_model import assemble
    from search.study import load

    env = search_env(searched)
    settings = Settings.load(environ=env)
    study = load(open_storage(settings, heartbeat=False), settings)
    trial = next(t for t in study.trials if t.params.get("backbone") == "efficientnet_lite0")
    data = load_prepared(settings.data_dir)
    attrs = study.user_attrs
    feats = load_or_compute(
        data,
        "efficientnet_lite0",
        "imagenet",
        settings.features_dir,
        views=int(attrs["feature_views"]),
        seed=int(attrs["feature_seed"]),
    )
    import keras
    from optuna.artifacts import FileSystemArtifactStore, download_artifact

    path = searched / "head.keras"
    store = FileSystemArtifactStore(str(settings.artifacts_dir))
    download_artifact(artifact_store=store,
                      file_path=str(path), artifact_id=trial.user_attrs["checkpoint"])  # fmt: skip
    head = keras.models.load_model(path, compile=False)
    end_to_end = assemble(trial, path, data, settings, attrs)
    images, _ = data.arrays("test")
    from_images = np.asarray(end_to_end.predict(images.astype(np.float32), verbose=0))
    from_features = np.asarray(head.predict(feats.test.astype(np.float32), verbose=0))
    np.testing.assert_allclose(from_images, from_features, atol=2e-2)
    assert (from_images.argmax(1) == from_features.argmax(1)).mean() >= 0.95


def test_predict_cli_prints_top_k_and_skips_unreadable(searched: Path, tmp_path: Path) -> None:
    env = search_env(searched)
    assert run_cli([], env, searched, program=PROMOTE).returncode == 0
    data = load_prepared(searched / "data" / "prepared")
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, index in enumerate(data.indices("test")[:4]):
        Image.fromarray(np.asarray(data.images()[index])).save(folder / f"p{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_cli(["predict", "--top-k", "3", "--format", "json", str(folder)], env, searched)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 4
    assert all(len(r["families"]) == 3 and r["families"][0] in data.classes for r in rows)
    assert all(r["probabilities"] == sorted(r["probabilities"], reverse=True) for r in rows)
    assert "broken.jpg" in result.stderr and "Traceback" not in result.stderr
