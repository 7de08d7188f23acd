"""compute_metrics on small class counts: the values a small data set's trials record, and no
warning at every epoch of every trial."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from search.metrics import compute_metrics


def _probs(n: int, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.random((n, n_classes))
    return np.arange(n) % n_classes, probs / probs.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_top5_is_one_without_a_warning_for_five_or_fewer_classes(n_classes: int) -> None:
    """Every class is among the 5 most probable, so top-5 accuracy is 1.0 by definition."""
    y_true, probs = _probs(40, n_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(y_true, probs)
    assert m["top5_accuracy"] == 1.0
    assert m["accuracy"] == np.mean(probs.argmax(axis=1) == y_true)


def test_small_split_missing_classes_warns_nothing() -> None:
    """A validation split of a 5-family set that holds only two of them."""
    _, probs = _probs(6, 5, seed=1)
    y_true = np.array([0, 0, 1, 1, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(y_true, probs)
    assert m["top5_accuracy"] == 1.0 and 0.0 <= m["auc"] <= 1.0


def test_top5_counts_the_five_most_probable_with_more_classes() -> None:
    probs = np.tile(np.linspace(0.01, 0.06, 6), (3, 1))  # class 5 most, class 0 least probable
    y_true = np.array([5, 1, 0])  # first, fifth and sixth most probable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(y_true, probs)
    assert m["top5_accuracy"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(1 / 3)
