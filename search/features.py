"""Cached backbone embeddings: a frozen base's output for an image never changes, so compute it
once per (prepared data, backbone, weights, size, augmentation views) and let every trial and
every worker on the volume train heads on it.

Layout: <cache_root>/<key>/{train,val,test}.npy (float16), labels_*.npy, backbone.weights.h5,
meta.json. A cache is written into a temporary folder and renamed into place, so a crash leaves
no half-written cache; a file lock per key keeps two workers from computing the same one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from filelock import FileLock
from PIL import Image

from search.backbones import build_backbone
from search.dataset import PreparedData
from search.progress import Progress

FORMAT = 1
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FeatureSet:
    """Embeddings of one backbone. `train` has shape (views, n, dim): view 0 is the plain image."""

    key: str
    path: Path
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray
    val_labels: np.ndarray
    test_labels: np.ndarray
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.val.shape[-1])

    @property
    def backbone_weights(self) -> Path:
        return self.path / "backbone.weights.h5"


def feature_key(data: PreparedData, backbone: str, weights: str, views: int, seed: int) -> str:
    """Key of a cache: changes whenever anything that changes the embeddings changes."""
    parts = {
        "format": FORMAT,
        "data_hash": data.data_hash,
        "backbone": backbone,
        "weights": weights,
        "size": data.image_size,
        "views": views,
        "augment": AUGMENT_VERSION,
        "seed": seed,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{backbone}-{weights}-{data.image_size}px-v{views}-{digest}"


def load_or_compute(
    data: PreparedData,
    backbone: str,
    weights: str,
    cache_root: Path,
    *,
    views: int = 2,
    seed: int = 0,
    batch_size: int = 64,
) -> FeatureSet:
    """Return the cached embeddings, computing them first if no worker has yet."""
    key = feature_key(data, backbone, weights, views, seed)
    cache_root = Path(cache_root)
    final = cache_root / key
    if not (final / "meta.json").exists():
        cache_root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache_root / f"{key}.lock")):
            if not (final / "meta.json").exists():  # another worker may have finished meanwhile
                _compute(
                    data, backbone, weights, final, views=views, seed=seed, batch_size=batch_size
                )
    return _load(final, key)


def _load(path: Path, key: str) -> FeatureSet:
    arrays = {name: np.load(path / f"{name}.npy") for name in SPLITS}
    labels = {name: np.load(path / f"labels_{name}.npy") for name in SPLITS}
    meta = json.loads((path / "meta.json").read_text())
    return FeatureSet(
        key=key,
        path=path,
        train=arrays["train"],
        val=arrays["val"],
        test=arrays["test"],
        train_labels=labels["train"],
        val_labels=labels["val"],
        test_labels=labels["test"],
        meta=meta,
    )


def _compute(
    data: PreparedData,
    backbone: str,
    weights: str,
    final: Path,
    *,
    views: int,
    seed: int,
    batch_size: int,
) -> None:
    keras.utils.set_random_seed(seed)  # a random-weights backbone is the same on every machine
    model = build_backbone(backbone, data.image_size, weights)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        started = time.monotonic()
        total = sum(len(data.indices(s)) for s in SPLITS) + views * len(data.indices("train"))
        bar = Progress(total, f"features {backbone}/{weights}")
        for split in SPLITS:
            images, labels = data.arrays(split)
            n_views = 1 + views if split == "train" else 1
            out = None
            for view in range(n_views):
                emb = embed(model, images, batch_size, view=view, seed=seed, progress=bar)
                if out is None:
                    out = np.empty((n_views, *emb.shape), dtype=np.float16)
                out[view] = emb
            assert out is not None
            np.save(tmp / f"{split}.npy", out if split == "train" else out[0])
            np.save(tmp / f"labels_{split}.npy", labels.astype(np.int32))
        model.save_weights(tmp / "backbone.weights.h5")
        meta = {
            "format": FORMAT,
            "backbone": backbone,
            "weights": weights,
            "image_size": data.image_size,
            "views": views,
            "seed": seed,
            "data_hash": data.data_hash,
            "seconds": round(time.monotonic() - started, 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def embed(
    model,
    images: np.ndarray,
    batch_size: int,
    *,
    view: int = 0,
    seed: int = 0,
    progress: Progress | None = None,
) -> np.ndarray:
    """Run `model` over uint8 images in batches; view > 0 applies that augmentation view."""
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if view > 0:
            batch = augment_batch(batch, view=view, seed=seed, offset=start)
        chunks.append(np.asarray(model.predict_on_batch(batch.astype(np.float32))))
        if progress is not None:
            progress.update(len(batch))
    if not chunks:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float32)
    return np.concatenate(chunks)


AUGMENT_VERSION = 1


def augment_batch(batch: np.ndarray, *, view: int, seed: int, offset: int) -> np.ndarray:
    """Deterministic augmented view: random resized crop, horizontal flip, brightness/contrast.

    Seeded per (seed, view, image position), so a cache rebuilt anywhere is identical.
    """
    size = batch.shape[1]
    out = np.empty_like(batch)
    for i, image in enumerate(batch):
        rng = np.random.default_rng([seed, view, offset + i])
        scale = rng.uniform(0.6, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w = int(min(size, round(size * np.sqrt(scale * ratio))))
        h = int(min(size, round(size * np.sqrt(scale / ratio))))
        x0 = int(rng.integers(0, size - w + 1))
        y0 = int(rng.integers(0, size - h + 1))
        pil = Image.fromarray(image).resize(
            (size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + w, y0 + h)
        )
        arr = np.asarray(pil, dtype=np.float32)
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        contrast = rng.uniform(0.8, 1.2)
        brightness = rng.uniform(-20, 20)
        arr = (arr - arr.mean()) * contrast + arr.mean() + brightness
        out[i] = np.clip(arr, 0, 255).astype(np.uint8)
    return out
