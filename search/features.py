"""Cached backbone embeddings: a frozen base's output for an image never changes, so compute it
once per (prepared data, backbone, weights, size, augmentation views) and let every trial and
every worker on the volume train heads on it.

Layout: <cache_root>/<key>/{train,val,test}.npy (float16; train holds the plain view and K
augmented views, val and test the plain images), {val,test}_flip.npy (float16: the same val and
test images mirrored left-right, exactly and nothing else, so trials and ensemble selection are
scored with the flip test-time augmentation uses at prediction time), labels_*.npy,
backbone.weights.h5, meta.json (written last: a folder without it is not a cache).

Safety: a cache is written into a hidden `.<key>.partial-*` folder and renamed into place, so a
crash leaves no half-written cache, only a partial folder that nobody reads; a file lock per key
keeps two workers from computing the same cache (the second waits and then loads it), and
partial folders are deleted by the next computation once their key's lock is free (a free lock
means the process that wrote them is gone). A cache that fails to load is moved aside and
computed again.

Speed: the images stream from the memory-mapped prepared data in one flat sequence of batches
(all splits and views), decoded and augmented by a helper thread while the backbone runs the
previous batch, and written straight into memory-mapped .npy files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from filelock import FileLock, Timeout
from PIL import Image

from search.backbones import build_backbone
from search.dataset import PreparedData
from search.durable import fsync_dir, fsync_tree
from search.errors import ConfigError
from search.progress import Progress

FORMAT = 3  # 3: val_flip.npy and test_flip.npy
SPLITS = ("train", "val", "test")
# The view that is the image mirrored left-right, exactly, with no random augmentation: stored
# for these splits as <split>_flip.npy. At the real size (8,664 training images x 3 views + 1,800
# val + 1,800 test) it adds about 3,600 forward passes to a cache, ~12% more.
FLIP = -1
FLIP_SPLITS = ("val", "test")
ARRAYS = (*SPLITS, *(f"{split}_flip" for split in FLIP_SPLITS))
META_FILE = "meta.json"
WEIGHTS_FILE = "backbone.weights.h5"
PARTIAL = ".partial-"
# Everything that shapes an augmented view; part of the key, so changing it recomputes caches.
AUGMENT: dict[str, Any] = {
    "version": 1,
    "crop_scale": [0.6, 1.0],
    "crop_ratio": [3 / 4, 4 / 3],
    "flip": 0.5,
    "contrast": [0.8, 1.2],
    "brightness": 20.0,
}


@dataclass(frozen=True)
class FeatureSet:
    """Embeddings of one backbone. `train` has shape (views, n, dim): view 0 is the plain image;
    `val_flip` and `test_flip` are `val` and `test` of the images mirrored left-right."""

    key: str
    path: Path
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_flip: np.ndarray
    test_flip: np.ndarray
    train_labels: np.ndarray
    val_labels: np.ndarray
    test_labels: np.ndarray
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.val.shape[-1])

    @property
    def backbone_weights(self) -> Path:
        return self.path / WEIGHTS_FILE


class DamagedCache(Exception):
    """A cache folder with meta.json whose arrays do not load or do not match it."""


def feature_key(data: PreparedData, backbone: str, weights: str, views: int, seed: int) -> str:
    """Key of a cache: changes whenever anything that changes the embeddings changes."""
    parts: dict[str, Any] = {
        "format": FORMAT,
        "data_hash": data.data_hash,
        "backbone": backbone,
        "weights": weights,
        "size": data.image_size,
        "views": views,
        "seed": seed,
    }
    if views > 0:  # the plain view does not depend on the augmentation settings
        parts["augment"] = AUGMENT
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
    log: Callable[[str], None] | None = None,
) -> FeatureSet:
    """Return the cached embeddings, computing them first if no worker has yet.

    `views` augmented views of every training image are stored beside the plain one; val and
    test are stored plain and mirrored left-right (`val_flip`, `test_flip`). Safe to call from
    many processes at once: one computes, the others wait for it and load its result.
    """
    say = log if log is not None else _stderr
    key = feature_key(data, backbone, weights, views, seed)
    cache_root = Path(cache_root)
    final = cache_root / key
    if (final / META_FILE).exists():
        try:
            return _load(final, key)
        except DamagedCache:
            pass  # repaired below, under the lock
    lock = FileLock(str(cache_root / f"{key}.lock"))
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            say(f"features {key}: another worker is computing them; waiting for it")
            lock.acquire()
    except OSError as exc:
        raise ConfigError(
            f"cannot write the feature cache in {cache_root} ({exc.strerror or exc}): point "
            "--features-dir / SEARCH_FEATURES_DIR at a writable folder every worker shares"
        ) from None
    try:
        if (final / META_FILE).exists():  # another worker finished meanwhile
            try:
                return _load(final, key)
            except DamagedCache as exc:
                say(f"features {key}: cache is damaged ({exc}); computing it again")
                final.rename(Path(tempfile.mkdtemp(prefix=f".{key}{PARTIAL}", dir=cache_root)))
        elif final.exists():  # a folder without meta.json is not a cache: nobody reads it
            final.rename(Path(tempfile.mkdtemp(prefix=f".{key}{PARTIAL}", dir=cache_root)))
        remove_stale_partials(cache_root, holding=key)
        _compute(
            data, backbone, weights, final, views=views, seed=seed, batch_size=batch_size, say=say
        )
        return _load(final, key)
    finally:
        lock.release()


def remove_stale_partials(cache_root: Path, holding: str | None = None) -> list[Path]:
    """Delete partial folders left by crashed computations; returns what was deleted.

    A partial folder belongs to a computation only while that key's lock is held, so those of
    `holding` (whose lock the caller holds) and of any key whose lock is free are stale.
    """
    removed = []
    for path in sorted(Path(cache_root).glob(f".*{PARTIAL}*")):
        key = path.name[1:].split(PARTIAL, 1)[0]
        if key == holding:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            continue
        probe = FileLock(str(Path(cache_root) / f"{key}.lock"))
        try:
            probe.acquire(timeout=0)
        except Timeout:
            continue  # being computed right now
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            probe.release()
    return removed


def _load(path: Path, key: str) -> FeatureSet:
    """Memory-map a finished cache (workers share the page cache) and check it is whole."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        labels = {name: np.load(path / f"labels_{name}.npy") for name in SPLITS}
        counts, dim = meta["counts"], int(meta["dim"])
        expected = {
            "train": (1 + int(meta["views"]), counts["train"], dim),
            "val": (counts["val"], dim),
            "test": (counts["test"], dim),
            "val_flip": (counts["val"], dim),
            "test_flip": (counts["test"], dim),
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedCache(f"{type(exc).__name__}: {exc}") from None
    for name in ARRAYS:
        if arrays[name].shape != expected[name] or arrays[name].dtype != np.float16:
            raise DamagedCache(f"{name}.npy is {arrays[name].dtype} {arrays[name].shape}")
    for name in SPLITS:
        if labels[name].shape != (counts[name],):
            raise DamagedCache(f"labels_{name}.npy has shape {labels[name].shape}")
    return FeatureSet(
        key=key,
        path=path,
        train=arrays["train"],
        val=arrays["val"],
        test=arrays["test"],
        val_flip=arrays["val_flip"],
        test_flip=arrays["test_flip"],
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
    say: Callable[[str], None],
) -> None:
    """Write the cache into a partial folder, then rename it into place."""
    keras.utils.set_random_seed(seed)  # a random-weights backbone is the same on every machine
    model = build_backbone(backbone, data.image_size, weights)
    dim = int(model.output_shape[-1])
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL}", dir=final.parent))
    try:
        started = time.monotonic()
        indices = {split: data.indices(split) for split in SPLITS}
        # Views of each split, as one job each: train's plain one and `views` augmented ones,
        # val's and test's plain one and their mirror (FLIP), all in the same streamed pass.
        split_views = {split: [0, FLIP] if split in FLIP_SPLITS else [0] for split in SPLITS}
        split_views["train"] = list(range(1 + views))
        outputs = {}
        for split in SPLITS:
            n = len(indices[split])
            shape = (1 + views, n, dim) if split == "train" else (n, dim)
            for name in (split, f"{split}_flip") if split in FLIP_SPLITS else (split,):
                outputs[name] = np.lib.format.open_memmap(
                    tmp / f"{name}.npy", mode="w+", dtype=np.float16, shape=shape
                )
            labels = data.manifest["label"].to_numpy(dtype=np.int32)[indices[split]]
            np.save(tmp / f"labels_{split}.npy", labels)
        plan = [(split, view, indices[split]) for split in SPLITS for view in split_views[split]]
        total = sum(len(idx) for _, _, idx in plan)
        say(
            f"features {final.name}: computing {total} embeddings ({views} augmented views of "
            f"{len(indices['train'])} training images, val and test also mirrored), "
            f"batch {batch_size}"
        )
        bar = Progress(total, f"features {backbone}/{weights} {data.image_size}px")
        for rows, emb in stream_embeddings(model, data.images(), plan, batch_size, seed):
            for (split, view), (dest, src) in rows.items():
                if split == "train":
                    target = outputs[split][view]
                else:
                    target = outputs[f"{split}_flip" if view == FLIP else split]
                target[dest] = emb[src]
            bar.update(len(emb))
        for array in outputs.values():
            array.flush()
        del outputs
        model.save_weights(tmp / WEIGHTS_FILE)
        seconds = time.monotonic() - started
        meta = {
            "format": FORMAT,
            "backbone": backbone,
            "weights": weights,
            "image_size": data.image_size,
            "views": views,
            "augment": AUGMENT if views > 0 else None,
            "flip_views": list(FLIP_SPLITS),
            "seed": seed,
            "data_hash": data.data_hash,
            "dim": dim,
            "counts": {split: len(indices[split]) for split in SPLITS},
            "batch_size": batch_size,
            "seconds": round(seconds, 2),
            "images_per_second": round(total / max(seconds, 1e-9), 1),
            "computed_by": {"host": socket.gethostname(), "pid": os.getpid()},
            "computed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        fsync_tree(tmp)
        tmp.rename(final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


Plan = list[tuple[str, int, np.ndarray]]  # (split, view or FLIP, image indices)
Rows = dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]  # (split, view) -> (dest, src)


def stream_embeddings(
    model: keras.Model, images: np.ndarray, plan: Plan, batch_size: int, seed: int
) -> Iterator[tuple[Rows, np.ndarray]]:
    """Embed every (split, view, indices) job of `plan` as one flat sequence of full batches.

    A helper thread reads (and, for view > 0, augments; for view FLIP, mirrors left-right) the
    next batch while the backbone runs the current one. Batches stay uint8 (a quarter of the
    bytes of float32): the model's float32 input casts them inside the graph. Only the very last
    batch is short, and it is padded, so the backbone sees one input shape and is traced once.
    """
    jobs = np.concatenate([np.full(len(idx), j) for j, (_, _, idx) in enumerate(plan)] or [[]])
    position = np.concatenate([np.arange(len(idx)) for _, _, idx in plan] or [[]])
    jobs, position = jobs.astype(np.int64), position.astype(np.int64)
    size = images.shape[1]

    def prepare(start: int) -> tuple[Rows, np.ndarray, int]:
        j, pos = jobs[start : start + batch_size], position[start : start + batch_size]
        batch = np.zeros((batch_size, size, size, 3), dtype=np.uint8)  # the model casts it
        rows: Rows = {}
        for job in np.unique(j):
            split, view, idx = plan[int(job)]
            src = np.flatnonzero(j == job)
            pixels = np.asarray(images[idx[pos[src]]])
            if view == FLIP:
                pixels = pixels[:, :, ::-1]  # (n, height, width, 3): mirror the width axis
            elif view > 0:
                pixels = augment_batch(pixels, view=view, seed=seed, positions=pos[src])
            batch[src] = pixels
            rows[(split, view)] = (pos[src], src)
        return rows, batch, len(j)

    starts = range(0, len(jobs), batch_size)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="features-input") as pool:
        pending = pool.submit(prepare, 0) if len(jobs) else None
        for k in range(len(starts)):
            assert pending is not None
            rows, batch, count = pending.result()
            if k + 1 < len(starts):
                pending = pool.submit(prepare, starts[k + 1])
            emb = np.asarray(model.predict_on_batch(batch))[:count]
            yield rows, emb


def embed(
    model: keras.Model,
    images: np.ndarray,
    batch_size: int,
    *,
    view: int = 0,
    seed: int = 0,
    progress: Progress | None = None,
) -> np.ndarray:
    """Run `model` over uint8 images (n, size, size, 3); view > 0 applies that augmentation
    view and view FLIP mirrors them left-right, exactly as the cache stores them. Returns float32
    (n, dim)."""
    dim = int(model.output_shape[-1])
    out = np.zeros((len(images), dim), dtype=np.float32)
    plan = [("images", view, np.arange(len(images)))]
    for rows, emb in stream_embeddings(model, images, plan, batch_size, seed):
        dest, src = rows[("images", view)]
        out[dest] = emb[src]
        if progress is not None:
            progress.update(len(emb))
    return out


def augment_batch(
    batch: np.ndarray, *, view: int, seed: int, positions: np.ndarray | None = None
) -> np.ndarray:
    """Deterministic augmented view: random resized crop, horizontal flip, brightness/contrast.

    Seeded per (seed, view, image position in its split), so a cache rebuilt anywhere, with any
    batch size, is identical.
    """
    size = batch.shape[1]
    positions = np.arange(len(batch)) if positions is None else positions
    lo, hi = AUGMENT["crop_scale"]
    r_lo, r_hi = np.log(AUGMENT["crop_ratio"][0]), np.log(AUGMENT["crop_ratio"][1])
    out = np.empty_like(batch)
    for i, image in enumerate(batch):
        rng = np.random.default_rng([seed, view, int(positions[i])])
        scale = rng.uniform(lo, hi)
        ratio = np.exp(rng.uniform(r_lo, r_hi))
        w = int(min(size, round(size * np.sqrt(scale * ratio))))
        h = int(min(size, round(size * np.sqrt(scale / ratio))))
        x0 = int(rng.integers(0, size - w + 1))
        y0 = int(rng.integers(0, size - h + 1))
        pil = Image.fromarray(np.asarray(image)).resize(
            (size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + w, y0 + h)
        )
        arr = np.asarray(pil, dtype=np.float32)
        if rng.random() < AUGMENT["flip"]:
            arr = arr[:, ::-1]
        contrast = rng.uniform(*AUGMENT["contrast"])
        brightness = rng.uniform(-AUGMENT["brightness"], AUGMENT["brightness"])
        mean = arr.mean()
        arr = (arr - mean) * contrast + mean + brightness
        out[i] = np.clip(arr, 0, 255).astype(np.uint8)
    return out


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
