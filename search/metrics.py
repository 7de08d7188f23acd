"""Classification metrics from predicted probabilities, via scikit-learn.

Used every epoch on the validation split (the objective is macro-F1) and once on the test split
at promotion. Classes absent from `y_true` are handled explicitly so small splits never crash.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score, top_k_accuracy_score

TOP_K = 5  # reported as "top5_accuracy": the key stays whatever the number of classes


def compute_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """accuracy, top-5 accuracy, macro/weighted F1, one-vs-rest macro AUC and log loss."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    labels = np.arange(n_classes)
    y_pred = probs.argmax(axis=1)
    probs = np.clip(probs, 1e-12, 1.0)
    probs = probs / probs.sum(axis=1, keepdims=True)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "top5_accuracy": top_k_accuracy(y_true, probs, TOP_K),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "weighted_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
        ),
        "auc": ovr_auc(y_true, probs),
        "loss": float(log_loss(y_true, probs, labels=labels)),
    }


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Share of examples whose true class is among the k most probable. With k or fewer classes
    every class is in the top k, so it is 1.0 by definition: scikit-learn returns that too, but
    warns (UndefinedMetricWarning) at every epoch of every trial of a small data set, and its
    2-class form means something else. Kept at k, under the same key, so that values of studies
    on different data sets compare; small data sets just show a trivial 1.0."""
    n_classes = probs.shape[1]
    if k >= n_classes:
        return 1.0
    return float(top_k_accuracy_score(y_true, probs, k=k, labels=np.arange(n_classes)))


def macro_f1(y_true: np.ndarray, probs: np.ndarray) -> float:
    labels = np.arange(probs.shape[1])
    return float(
        f1_score(y_true, probs.argmax(axis=1), labels=labels, average="macro", zero_division=0)
    )


def ovr_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUC over the classes present in y_true (others have no positives)."""
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    scores = [roc_auc_score(y_true == c, probs[:, c]) for c in present]
    return float(np.mean(scores))
