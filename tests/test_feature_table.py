"""A worker keeps one feature table per feature cache for all its trials: its memory stays flat
over many trials, and a trial on a kept table learns exactly what it learns on a new one."""

from __future__ import annotations

import keras
import numpy as np

from search.trial import build_head, feature_table, fit_on_table
from search.worker import rss_mb
from tests.conftest import HEAD

PARAMS = {**HEAD, "units_0": 32, "dropout_0": 0.2, "batch_size": 64}


def trained_weights(views: np.ndarray, labels: np.ndarray, seed: int, key: str | None) -> list:
    head = build_head(views.shape[-1], 5, PARAMS)
    fit_on_table(head, views, labels, {i: 1.0 for i in range(5)}, PARAMS, 2, [], seed, key)
    return head.get_weights()


def test_a_kept_table_is_reseeded_and_learns_what_a_new_one_does() -> None:
    rng = np.random.default_rng(0)
    views = rng.normal(size=(3, 300, 16)).astype(np.float16)
    labels = rng.integers(0, 5, 300)
    keras.utils.set_random_seed(1)
    fresh = trained_weights(views, labels, seed=11, key=None)
    keras.utils.set_random_seed(1)
    trained_weights(views, labels, seed=99, key="kept")  # another trial first: other views drawn
    keras.utils.set_random_seed(1)
    kept = trained_weights(views, labels, seed=11, key="kept")
    for a, b in zip(fresh, kept, strict=True):
        np.testing.assert_array_equal(a, b)
    assert feature_table(views, 5, "kept") is feature_table(views, 6, "kept")


def test_memory_stays_flat_over_trials_on_one_feature_cache() -> None:
    """Six trials on a 98 MB table: a new table per trial grew the process by about the
    table's size every trial (TensorFlow never freed it, 600 MB here); a kept one adds what
    TensorFlow keeps of every fitted model, a few MB a trial."""
    rng = np.random.default_rng(0)
    views = rng.normal(size=(3, 8000, 2048)).astype(np.float16)
    labels = rng.integers(0, 5, 8000)
    trained_weights(views, labels, seed=0, key="flat")
    before = rss_mb()
    for seed in range(1, 7):
        trained_weights(views, labels, seed=seed, key="flat")
    grown = rss_mb() - before
    assert grown < 2 * views.nbytes / 2**20, f"grew {grown:.0f} MB over 6 trials"
