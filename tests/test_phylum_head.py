"""The phylum-aware head: an auxiliary phylum output trained beside the families, dropped from
what is kept, and a loss that is exactly family + weight x phylum cross-entropy."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from search.settings import Settings
from search.study import load, open_storage
from search.trial import PhylumAwareLoss, build_head, make_loss, with_phylum_output
from search.worker import run_worker
from tests.conftest import HEAD, search_env

PHYLA = ["Chordata", "Arthropoda", "Chordata", "Mollusca", "Arthropoda"]  # per family


def crossentropy(target: np.ndarray, probs: np.ndarray) -> np.ndarray:
    return -(target * np.log(np.clip(probs, 1e-7, 1.0))).sum(-1)


def test_weight_zero_is_todays_head_and_above_zero_adds_a_phylum_output() -> None:
    head = build_head(8, len(PHYLA), {**HEAD, "phylum_loss_weight": 0.0})
    assert with_phylum_output(head, PHYLA, {**HEAD, "phylum_loss_weight": 0.0}) is head
    assert isinstance(make_loss(HEAD, PHYLA), keras.losses.CategoricalCrossentropy)
    trained = with_phylum_output(head, PHYLA, {**HEAD, "phylum_loss_weight": 0.5})
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    both = keras.ops.convert_to_numpy(trained(x))
    assert both.shape == (4, len(PHYLA) + 3)  # 5 families, then 3 phyla
    np.testing.assert_allclose(both[:, :5], keras.ops.convert_to_numpy(head(x)), atol=1e-6)
    np.testing.assert_allclose(both[:, 5:].sum(-1), 1.0, atol=1e-5)
    assert head.output_shape == (None, len(PHYLA))  # what is kept predicts families only


def test_loss_is_family_plus_weighted_phylum_crossentropy() -> None:
    rng = np.random.default_rng(1)
    labels = np.array([0, 1, 2, 3, 4, 2])
    y_true = np.eye(5, dtype=np.float32)[labels]
    families = rng.dirichlet(np.ones(5), size=6).astype(np.float32)
    phyla = rng.dirichlet(np.ones(3), size=6).astype(np.float32)
    loss = PhylumAwareLoss(PHYLA, weight=0.3)
    got = float(keras.ops.convert_to_numpy(loss(y_true, np.concatenate([families, phyla], 1))))
    names = sorted(set(PHYLA))  # Arthropoda, Chordata, Mollusca
    phylum_true = np.eye(3)[[names.index(PHYLA[c]) for c in labels]]
    expected = crossentropy(y_true, families) + 0.3 * crossentropy(phylum_true, phyla)
    assert got == pytest.approx(float(expected.mean()), rel=1e-5)


def test_a_phylum_aware_trial_trains_and_keeps_a_family_only_head(workspace) -> None:
    from optuna.artifacts import FileSystemArtifactStore, download_artifact

    from search.study import create_or_load

    settings = Settings.load(environ=search_env(workspace, SEARCH_PRUNER="none"))
    study = create_or_load(open_storage(settings, heartbeat=False), settings)
    study.enqueue_trial({**HEAD, "phylum_loss_weight": 0.7})
    run_worker(settings, n_trials=1)
    trial = load(open_storage(settings, heartbeat=False), settings).trials[0]
    assert trial.state.name == "COMPLETE" and trial.params["phylum_loss_weight"] == 0.7
    path = workspace / "head.keras"
    download_artifact(artifact_store=FileSystemArtifactStore(str(settings.artifacts_dir)),
                      file_path=str(path), artifact_id=trial.user_attrs["checkpoint"])  # fmt: skip
    head = keras.models.load_model(path, compile=False)
    from search.dataset import load_prepared

    assert head.output_shape == (None, len(load_prepared(settings.data_dir).classes))
