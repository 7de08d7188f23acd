"""The GPU check: feature extraction and head trials on one accelerator, in a few minutes.

Generates a photo-style data set, prepares it, computes one offline backbone's feature cache
(images/s, against the backbone's raw forward throughput on the same batches), then runs head
trials on the cached features with the service's own training code (search.trial.fit_on_table)
and prints seconds per trial. Meant for KERAS_BACKEND=torch on a lent GPU machine (no
TensorFlow there); runs anywhere, on any backend, at any size:

    KERAS_BACKEND=torch python benchmarks/gpu_check.py [--images 3000] [--image-size 224]
    bash benchmarks/gpu_check.sh      # on the GPU machine: installs carried wheels, then this
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import HEAD_PARAMS, log

BACKBONE = "efficientnet_lite0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", type=int, default=40)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8, help="decoding processes for prepare")
    args = parser.parse_args()

    import keras

    from search import features
    from search.backbones import build_backbone
    from search.dataset import load_prepared, prepare
    from search.synth import generate
    from search.trial import build_head, fit_on_table, predict

    backend = keras.backend.backend()
    device = _device(backend)
    print(f"gpu check: keras {keras.__version__}, backend {backend}, device {device}")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        started = time.perf_counter()
        source = generate(work / "raw", n_families=args.families, total_images=args.images,
                          image_px=args.image_size + 32, seed=0, style="photos")  # fmt: skip
        prepare(source, work / "prepared", image_size=args.image_size, seed=0,
                workers=args.workers)  # fmt: skip
        data = load_prepared(work / "prepared")
        log(f"data ready in {time.perf_counter() - started:.0f}s")

        images, _ = data.arrays("train")
        model = build_backbone(BACKBONE, data.image_size, "imagenet")
        batch = images[:64].astype(np.float32)
        model.predict_on_batch(batch)  # warm-up: kernels, allocations
        t = time.perf_counter()
        reps = 10
        for _ in range(reps):
            keras.ops.convert_to_numpy(model.predict_on_batch(batch))
        raw = reps * len(batch) / (time.perf_counter() - t)

        t = time.perf_counter()
        feats = features.load_or_compute(data, BACKBONE, "imagenet", work / "features",
                                         views=2, seed=0, log=log)  # fmt: skip
        extract_s = time.perf_counter() - t
        mirrored = len(feats.val_flip) + len(feats.test_flip)
        n_images = feats.train.shape[0] * feats.train.shape[1] + len(feats.val) + len(feats.test)
        n_images += mirrored
        rate = n_images / extract_s
        print(f"extraction: {n_images} images in {extract_s:.1f}s = {rate:.0f} images/s; "
              f"raw forward {raw:.0f} images/s ({rate / raw:.0%})")  # fmt: skip

        plain = feats.train[0].astype(np.float32)
        stats = (plain.mean(0), plain.var(0))
        val_x = feats.val.astype(np.float32)
        for trial in range(args.trials):
            keras.backend.clear_session()
            t = time.perf_counter()
            keras.utils.set_random_seed(trial)
            head = build_head(feats.dim, len(data.classes), HEAD_PARAMS, feature_stats=stats)
            fit_on_table(head, np.asarray(feats.train), feats.train_labels, data.class_weights,
                         HEAD_PARAMS, args.epochs, [], trial)  # fmt: skip
            probs = predict(head, val_x)
            seconds = time.perf_counter() - t
            accuracy = float((probs.argmax(1) == feats.val_labels).mean())
            print(f"head trial {trial + 1}: {args.epochs} epochs over {feats.train.shape[1]} "
                  f"examples x {feats.train.shape[0]} views in {seconds:.2f}s "
                  f"(val accuracy {accuracy:.3f})")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _device(backend: str) -> str:
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if backend == "jax":
        import jax

        return str(jax.devices()[0])
    return "default"


if __name__ == "__main__":
    main()
