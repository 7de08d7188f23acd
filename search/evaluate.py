"""Test-split evaluation users can trust: metrics and error analysis of a model on a split.
The files that show it are written by search/reports.py; `search evaluate` is in
search/registry.py (it loads a registered version).

An evaluation is a pure function of (predicted probabilities, prepared data): the same model on the
same split gives the same `evaluation.json`, byte for byte, whether it was written at promotion
(inside the version folder) or later by `search evaluate` (under models/evaluations/<version>/).

Families are bucketed by how many *training* images they have, since that is what a model learnt
from: rare (< 30), medium (30-99), common (>= 100). The real Rare Species set has ~30 photos per
species and 1-5 species per family, so all three buckets are populated there.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from search.errors import RegistryError
from search.metrics import compute_metrics

if TYPE_CHECKING:
    from search.dataset import PreparedData

RARE_BELOW = 30
COMMON_FROM = 100
SIZE_BUCKETS = (
    ("rare", f"< {RARE_BELOW} training images"),
    ("medium", f"{RARE_BELOW}-{COMMON_FROM - 1} training images"),
    ("common", f">= {COMMON_FROM} training images"),
)
TOP_PAIRS = 10


@dataclass
class HeldOutSplit:
    """The held-out images a model is judged on, in manifest order."""

    images: np.ndarray  # uint8 (n, size, size, 3)
    labels: np.ndarray  # int64 (n,)
    paths: list[str]  # file_path of each image in the source data set
    classes: list[str]
    phyla: list[str]
    train_counts: np.ndarray  # training images per class
    data_hash: str

    @classmethod
    def of(cls, data: PreparedData) -> HeldOutSplit:
        images, labels = data.arrays("test")
        rows = data.manifest.set_index("index").loc[data.indices("test")]
        train = np.bincount(data.labels("train"), minlength=len(data.classes))
        return cls(
            images=images,
            labels=labels,
            paths=[str(p) for p in rows["file_path"]],
            classes=data.classes,
            phyla=data.phyla,
            train_counts=train.astype(np.int64),
            data_hash=data.data_hash,
        )


def size_bucket(train_images: int) -> str:
    if train_images < RARE_BELOW:
        return "rare"
    return "medium" if train_images < COMMON_FROM else "common"


def evaluate(probs: np.ndarray, split: HeldOutSplit) -> dict[str, Any]:
    """Everything the reports and the model card show, as plain JSON-ready values."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(split.labels, dtype=np.int64)
    n_classes = len(split.classes)
    if probs.shape != (len(y_true), n_classes):
        raise RegistryError(
            f"the model gives {probs.shape[-1]} scores per image but the data has {n_classes} "
            "families: evaluate it on the prepared data it was trained on (--data-dir)"
        )
    y_pred = probs.argmax(axis=1)
    labels = np.arange(n_classes)
    correct = y_pred == y_true
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_family = [
        {
            "family": split.classes[c],
            "phylum": split.phyla[c],
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
            "train_images": int(split.train_counts[c]),
            "size_bucket": size_bucket(int(split.train_counts[c])),
        }
        for c in range(n_classes)
    ]
    counts = confusion_matrix(y_true, y_pred, labels=labels)
    return _clean(
        {
            "data_hash": split.data_hash,
            "split": "test",
            "n_images": int(len(y_true)),
            "n_families": n_classes,
            "metrics": {
                **compute_metrics(y_true, probs),
                "phylum_accuracy": phylum_accuracy(y_true, y_pred, split.phyla),
            },
            "per_family": per_family,
            "per_phylum": _accuracy_by(
                [split.phyla[c] for c in y_true], correct, "phylum", split.phyla
            ),
            "per_size_bucket": _size_buckets(y_true, correct, split),
            "confused_pairs": confused_pairs(counts, split.classes),
            "confusion_matrix": {"labels": split.classes, "counts": counts.tolist()},
        }
    )


def phylum_accuracy(y_true: np.ndarray, y_pred: np.ndarray, phyla: list[str]) -> float:
    """Share of images whose predicted family is in the true family's phylum: how wrong the
    wrong answers are (a phylum-aware head should keep them in the right phylum)."""
    phylum = np.array(phyla)
    return float(np.mean(phylum[y_pred] == phylum[y_true])) if len(y_true) else float("nan")


def _accuracy_by(
    keys: list[str], correct: np.ndarray, name: str, all_keys: list[str]
) -> list[dict[str, Any]]:
    """Accuracy of the images grouped by `keys` (one per image), worst first."""
    rows = []
    for key in sorted(set(keys)):
        mask = np.array([k == key for k in keys])
        rows.append(
            {
                name: key,
                "n": int(mask.sum()),
                "families": all_keys.count(key),
                "accuracy": float(correct[mask].mean()),
            }
        )
    return sorted(rows, key=lambda r: (r["accuracy"], r[name]))


def _size_buckets(y_true: np.ndarray, correct: np.ndarray, split: HeldOutSplit) -> list[dict]:
    family_bucket = [size_bucket(int(n)) for n in split.train_counts]
    image_bucket = np.array([family_bucket[c] for c in y_true])
    rows = []
    for bucket, rule in SIZE_BUCKETS:
        mask = image_bucket == bucket
        rows.append(
            {
                "bucket": bucket,
                "rule": rule,
                "families": family_bucket.count(bucket),
                "n": int(mask.sum()),
                "accuracy": float(correct[mask].mean()) if mask.any() else None,
            }
        )
    return rows


def confused_pairs(
    counts: np.ndarray, classes: list[str], top: int = TOP_PAIRS
) -> list[dict[str, Any]]:
    """The largest off-diagonal cells: (true family, predicted family, images, share of true)."""
    support = counts.sum(axis=1)
    cells = [
        (-int(counts[t, p]), t, p)
        for t in range(len(classes))
        for p in range(len(classes))
        if t != p and counts[t, p] > 0
    ]
    return [
        {
            "true": classes[t],
            "predicted": classes[p],
            "count": -negative,
            "share_of_true": float(-negative / support[t]),
        }
        for negative, t, p in sorted(cells)[:top]
    ]


def compare(new: dict[str, Any], old: dict[str, Any], version: str | None) -> dict[str, Any]:
    """Old metrics, new minus old, and the per-family F1 changes, largest loss first."""
    old_f1 = {row["family"]: row["f1"] for row in old["per_family"]}
    per_family = [
        {"family": row["family"], "f1": row["f1"], "delta": row["f1"] - old_f1[row["family"]]}
        for row in new["per_family"]
        if row["family"] in old_f1
    ]
    return _clean(
        {
            "version": version,
            "metrics": old["metrics"],
            "delta": {
                k: new["metrics"][k] - old["metrics"][k]
                for k in new["metrics"]
                if k in old["metrics"]
                and new["metrics"][k] is not None
                and old["metrics"][k] is not None
            },
            "per_family_f1_delta": sorted(per_family, key=lambda r: (r["delta"], r["family"])),
        }
    )


def with_version(
    version: str, evaluation: dict[str, Any], previous: dict[str, Any] | None
) -> dict[str, Any]:
    """The evaluation as written to evaluation.json: version first, comparison last; promotion
    and `search evaluate` both use it, so their files compare byte for byte."""
    return {"version": version, **evaluation, "previous": previous}


def _clean(value: Any) -> Any:
    """NaN (e.g. AUC of a one-class split) becomes null, so the JSON stays strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_json(evaluation: dict[str, Any]) -> str:
    return json.dumps(evaluation, indent=2, allow_nan=False) + "\n"


class Scorable(Protocol):
    """What scoring needs of a model: search.registry.Champion is one."""

    path: Path
    classes: list[str]
    image_size: int

    def predict(self, images: np.ndarray) -> np.ndarray: ...


def score(champion: Scorable, split: HeldOutSplit) -> tuple[np.ndarray, dict[str, Any]]:
    """Predict the test split with a loaded model and evaluate it."""
    check_compatible(champion, split)
    probs = champion.predict(split.images)
    return probs, evaluate(probs, split)


def check_compatible(champion: Scorable, split: HeldOutSplit) -> None:
    if champion.classes != split.classes or champion.image_size != split.images.shape[1]:
        raise RegistryError(
            f"the model at {champion.path} was trained on other families or another image size "
            "than the prepared data: point --data-dir at the data it was trained on"
        )


def summary(evaluation: dict[str, Any], report: Path, warning: str = "") -> str:
    """A few lines for the terminal: headline metrics, comparison, where it fails."""
    m = evaluation["metrics"]
    lines = [
        f"evaluated {evaluation.get('version', 'model')} on {evaluation['n_images']} test images "
        f"({evaluation['n_families']} families, data {evaluation['data_hash'][:12]})",
        f"accuracy {m['accuracy']:.3f}  top-5 {m['top5_accuracy']:.3f}  "
        f"macro-F1 {m['macro_f1']:.3f}  weighted-F1 {m['weighted_f1']:.3f}  "
        f"AUC {_fmt(m['auc'])}  loss {m['loss']:.3f}",
    ]
    previous = evaluation.get("previous")
    if previous and previous.get("delta"):
        d = previous["delta"]
        lines.append(
            f"vs previous {previous['version']}: macro-F1 {d['macro_f1']:+.3f}, "
            f"accuracy {d['accuracy']:+.3f}"
        )
    worst = sorted(evaluation["per_family"], key=lambda r: (r["f1"], -r["support"]))[:5]
    lines.append(
        "worst families (F1): "
        + ", ".join(f"{r['family']} {r['f1']:.2f} (n={r['support']})" for r in worst)
    )
    lines.append(
        "by size bucket: "
        + ", ".join(
            f"{r['bucket']} {_fmt(r['accuracy'])} (n={r['n']})"
            for r in evaluation["per_size_bucket"]
        )
    )
    lines.append(
        "by phylum: "
        + ", ".join(
            f"{r['phylum']} {r['accuracy']:.2f} (n={r['n']})" for r in evaluation["per_phylum"]
        )
    )
    if evaluation["confused_pairs"]:
        lines.append(
            "most confused: "
            + ", ".join(
                f"{p['true']} -> {p['predicted']} ({p['count']})"
                for p in evaluation["confused_pairs"][:5]
            )
        )
    lines.append(f"reports: {report}")
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
