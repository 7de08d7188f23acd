"""The feature cache: right contents, computed once across real processes, crash-safe."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from search import features
from search.backbones import build_backbone
from search.dataset import PreparedData, load_prepared
from search.errors import ConfigError
from tests.conftest import ROOT

BACKBONE = "efficientnet_lite0"
# A worker's view of the cache: load (or compute) and print who computed what it got.
CHILD = """
import hashlib, json, os, sys
from pathlib import Path
from search.dataset import load_prepared
from search.features import load_or_compute
data = load_prepared(Path(sys.argv[1]))
feats = load_or_compute(data, "efficientnet_lite0", "imagenet", Path(sys.argv[2]),
                        views=int(sys.argv[3]), batch_size=int(sys.argv[4]))
digest = hashlib.sha256(feats.train.tobytes() + feats.val.tobytes()).hexdigest()
print(json.dumps({"pid": os.getpid(), "by": feats.meta["computed_by"]["pid"], "digest": digest}))
"""


@pytest.fixture(scope="module")
def data(prepared_dir: Path) -> PreparedData:
    return load_prepared(prepared_dir)


def start_child(
    data: PreparedData, root: Path, log: Path, views: int = 1, batch: int = 64
) -> subprocess.Popen[str]:
    args = [str(data.root), str(root), str(views), str(batch)]
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_key_changes_with_everything_that_shapes_the_embeddings(data: PreparedData) -> None:
    key = features.feature_key(data, BACKBONE, "imagenet", 2, 0)
    other_data = dataclasses.replace(data, info={**data.info, "data_hash": "0" * 64})
    other_size = dataclasses.replace(data, info={**data.info, "image_size": 64})
    variants = [
        features.feature_key(other_data, BACKBONE, "imagenet", 2, 0),
        features.feature_key(other_size, BACKBONE, "imagenet", 2, 0),
        features.feature_key(data, "mobilenet_v2_tv", "imagenet", 2, 0),
        features.feature_key(data, BACKBONE, "none", 2, 0),
        features.feature_key(data, BACKBONE, "imagenet", 1, 0),
        features.feature_key(data, BACKBONE, "imagenet", 2, 1),
    ]
    assert len({key, *variants}) == 1 + len(variants)
    assert features.feature_key(data, BACKBONE, "imagenet", 2, 0) == key  # stable


def test_cache_holds_float16_plain_and_deterministic_augmented_views(
    data: PreparedData, tmp_path: Path
) -> None:
    lines: list[str] = []
    feats = features.load_or_compute(
        data, BACKBONE, "imagenet", tmp_path, views=2, batch_size=48, log=lines.append
    )
    n = {s: len(data.indices(s)) for s in features.SPLITS}
    assert feats.train.dtype == feats.val.dtype == feats.test.dtype == np.float16
    assert feats.train.shape == (3, n["train"], 1280)
    assert feats.val.shape == (n["val"], 1280) and feats.test.shape == (n["test"], 1280)
    for split in features.SPLITS:
        np.testing.assert_array_equal(getattr(feats, f"{split}_labels"), data.labels(split))
    assert sum(": computing " in line for line in lines) == 1

    # The stored views are the backbone run on the plain image and on augment_batch's views,
    # whatever the batch size: recompute them with another batch size and compare.
    model = build_backbone(BACKBONE, data.image_size, "imagenet")
    images, _ = data.arrays("train")
    for view in range(3):
        again = features.embed(model, images, 17, view=view, seed=0)
        np.testing.assert_allclose(feats.train[view], again, rtol=2e-3, atol=2e-3)
    plain, aug = feats.train[0].astype(np.float32), feats.train[1].astype(np.float32)
    assert np.abs(plain - aug).mean() > 0.05 * np.abs(plain).mean()  # views really differ
    assert np.abs(aug - feats.train[2].astype(np.float32)).mean() > 0.05 * np.abs(aug).mean()
    first = features.augment_batch(images[:8], view=1, seed=0)
    np.testing.assert_array_equal(first, features.augment_batch(images[:8], view=1, seed=0))
    assert not np.array_equal(first, images[:8])
    assert not np.array_equal(first, features.augment_batch(images[:8], view=1, seed=1))

    # A second call loads the cache instead of computing it.
    lines.clear()
    again_feats = features.load_or_compute(
        data, BACKBONE, "imagenet", tmp_path, views=2, log=lines.append
    )
    assert lines == [] and again_feats.meta["computed_at"] == feats.meta["computed_at"]


def test_two_processes_compute_a_missing_cache_once(data: PreparedData, tmp_path: Path) -> None:
    """Both workers find the cache missing while another holds its lock; when the lock frees,
    exactly one of them computes and the other loads that result."""
    root = tmp_path / "features"
    root.mkdir()
    key = features.feature_key(data, BACKBONE, "imagenet", 1, 0)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    lock = FileLock(str(root / f"{key}.lock"))
    lock.acquire()
    try:
        children = [start_child(data, root, log) for log in logs]
        wait_for(lambda: all("waiting" in log.read_text() for log in logs), "both to wait")
    finally:
        lock.release()
    outs = [json.loads(child.communicate(timeout=300)[0].splitlines()[-1]) for child in children]
    assert [child.returncode for child in children] == [0, 0]
    stderr = [log.read_text() for log in logs]
    computed = [i for i, text in enumerate(stderr) if f"features {key}: computing" in text]
    assert len(computed) == 1, stderr
    assert outs[0]["by"] == outs[1]["by"] == outs[computed[0]]["pid"]
    assert outs[0]["digest"] == outs[1]["digest"]
    assert [p.name for p in root.iterdir() if p.is_dir()] == [key]


def test_sigkill_while_computing_leaves_no_cache_and_the_next_call_recomputes(
    data: PreparedData, tmp_path: Path
) -> None:
    root = tmp_path / "features"
    key = features.feature_key(data, BACKBONE, "imagenet", 2, 0)
    log = tmp_path / "child.log"
    child = start_child(data, root, log, views=2, batch=1)  # slow on purpose: many batches
    try:
        wait_for(lambda: "features " in log.read_text() and "/imagenet" in log.read_text(),
                 "the first progress line")  # fmt: skip
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, log.read_text()
    assert not (root / key).exists()  # no cache, not even a half-written one
    partials = list(root.glob(f".{key}{features.PARTIAL}*"))
    assert len(partials) == 1 and (partials[0] / "train.npy").exists()
    assert not (partials[0] / features.META_FILE).exists()

    lines: list[str] = []
    feats = features.load_or_compute(data, BACKBONE, "imagenet", root, views=2, log=lines.append)
    assert sum(": computing " in line for line in lines) == 1
    assert not partials[0].exists()  # the stale partial was cleaned up
    assert feats.train.shape == (3, len(data.indices("train")), 1280)
    assert np.isfinite(feats.train.astype(np.float32)).all()
    assert feats.meta["computed_by"]["pid"] == os.getpid()


def test_stale_partials_are_removed_only_when_their_lock_is_free(tmp_path: Path) -> None:
    stale = tmp_path / f".keya{features.PARTIAL}x1"
    busy = tmp_path / f".keyb{features.PARTIAL}y2"
    for folder in (stale, busy):
        folder.mkdir()
        (folder / "train.npy").write_bytes(b"partial")
    held = FileLock(str(tmp_path / "keyb.lock"))
    held.acquire()
    try:
        removed = features.remove_stale_partials(tmp_path)
    finally:
        held.release()
    assert removed == [stale] and not stale.exists() and busy.exists()


def test_a_damaged_cache_is_computed_again(data: PreparedData, tmp_path: Path) -> None:
    feats = features.load_or_compute(data, BACKBONE, "imagenet", tmp_path, views=0)
    val = feats.path / "val.npy"
    del feats
    val.write_bytes(val.read_bytes()[:200])  # truncated, e.g. by a full disk or a bad copy
    lines: list[str] = []
    again = features.load_or_compute(
        data, BACKBONE, "imagenet", tmp_path, views=0, log=lines.append
    )
    assert any("damaged" in line for line in lines), lines
    assert again.val.shape == (len(data.indices("val")), 1280)
    assert list(tmp_path.glob(f".*{features.PARTIAL}*")) == []


def test_val_and_test_are_also_stored_mirrored_left_right(
    data: PreparedData, tmp_path: Path
) -> None:
    lines: list[str] = []
    feats = features.load_or_compute(
        data, BACKBONE, "imagenet", tmp_path, views=0, batch_size=48, log=lines.append
    )
    n = {s: len(data.indices(s)) for s in features.SPLITS}
    # One pass computed them all, and its log line counts the mirrored images.
    computing = [line for line in lines if ": computing " in line]
    assert len(computing) == 1
    assert f"computing {n['train'] + 2 * n['val'] + 2 * n['test']} embeddings" in computing[0]
    assert feats.meta["flip_views"] == ["val", "test"]

    model = build_backbone(BACKBONE, data.image_size, "imagenet")
    for split in features.FLIP_SPLITS:
        flipped = getattr(feats, f"{split}_flip")
        plain = getattr(feats, split).astype(np.float32)
        assert flipped.dtype == np.float16 and flipped.shape == (n[split], 1280)
        images, _ = data.arrays(split)
        mirrored = features.embed(model, np.ascontiguousarray(images[:, :, ::-1]), 17)
        np.testing.assert_allclose(flipped, mirrored, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(
            features.embed(model, images, 17, view=features.FLIP), mirrored, rtol=1e-5, atol=1e-5
        )
        # A mirror is not a no-op: where the image is not symmetric, its embedding moves.
        asymmetric = np.array([not np.array_equal(im, im[:, ::-1]) for im in images])
        assert asymmetric.all()
        moved = np.abs(flipped.astype(np.float32) - plain).mean(axis=1)
        assert (moved > 0.01 * np.abs(plain).mean(axis=1)).all()


def test_a_cache_without_its_mirrored_views_is_computed_again(
    data: PreparedData, tmp_path: Path
) -> None:
    feats = features.load_or_compute(data, BACKBONE, "imagenet", tmp_path, views=0)
    (feats.path / "val_flip.npy").unlink()  # as a cache written before the mirrored views
    del feats
    lines: list[str] = []
    again = features.load_or_compute(
        data, BACKBONE, "imagenet", tmp_path, views=0, log=lines.append
    )
    assert any("damaged" in line for line in lines), lines
    assert sum(": computing " in line for line in lines) == 1
    assert again.val_flip.shape == (len(data.indices("val")), 1280)
    assert (again.path / "val_flip.npy").exists()
    assert list(tmp_path.glob(f".*{features.PARTIAL}*")) == []


def test_an_unusable_cache_folder_is_a_one_line_error(data: PreparedData, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="SEARCH_FEATURES_DIR"):
        features.load_or_compute(data, BACKBONE, "imagenet", blocker / "features", views=0)
