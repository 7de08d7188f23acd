"""Is decoding the bottleneck of `search predict`? Images/s of `predict_paths` (threaded decoding
one chunk ahead of the model) vs the same with one decoding thread, vs decoding alone and the
model alone on pre-decoded arrays, on ~2,000 generated JPEG photos predicted at 32 px.

The champion is a real end-to-end model (EfficientNet-Lite0 with its offline ImageNet weights and
an untrained head: speed does not depend on training), saved and loaded through the registry.
Rounds alternate between the variants, so a busy machine slows all alike.

    .venv/bin/python benchmarks/predict_speed.py [--images 2000] [--size 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import WORK, log, machine


def photos(n: int, px: int) -> list[Path]:
    """Generated JPEG photos (`search synth`), written once under benchmarks/results/cache."""
    from search.synth import generate

    folder = WORK / f"predict-photos-n{n}-{px}px"
    if not (folder / "metadata.csv").exists():
        log(f"generating {n} photos of {px} px")
        generate(folder, n_families=12, total_images=n, image_px=px, seed=1)
    return sorted(folder.rglob("*.jpg"))


def champion(size: int, folder: Path):
    """An end-to-end model saved as a registry version and loaded back by load_champion."""
    import keras

    from search.backbones import build_backbone
    from search.registry import INFO_FILE, MODEL_FILE, load_champion

    classes = [f"family_{i}" for i in range(12)]
    backbone = build_backbone("efficientnet_lite0", size, "imagenet")
    inputs = keras.Input((size, size, 3))
    outputs = keras.layers.Dense(len(classes), activation="softmax")(backbone(inputs))
    keras.Model(inputs, outputs).save(folder / MODEL_FILE)
    info = {"classes": classes, "phyla": ["chordata"] * len(classes), "image_size": size}
    (folder / INFO_FILE).write_text(json.dumps(info))
    return load_champion(folder, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--photo-px", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--size", type=int, default=32, help="model input size")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from search.images import decode_image
    from search.predict import DECODE_THREADS, predict_paths

    paths = photos(args.images, args.photo_px)
    log(f"{len(paths)} photos; {machine()}; decode threads {DECODE_THREADS}")
    with tempfile.TemporaryDirectory() as tmp:
        model = champion(args.size, Path(tmp))
        decoded = np.stack([decode_image(p, args.size) for p in paths[:256]])
        model.predict(decoded)  # warm up (graph tracing)
        rates: dict[str, list[float]] = {}

        def measure(name: str, fn) -> None:
            started = time.perf_counter()
            fn()
            rates.setdefault(name, []).append(len(paths) / (time.perf_counter() - started))

        def decode(path: Path) -> np.ndarray:
            return decode_image(path, args.size)

        for r in range(args.rounds):
            measure("decode, 1 thread", lambda: [decode(p) for p in paths])
            with ThreadPoolExecutor(DECODE_THREADS) as pool:
                measure(
                    f"decode, {DECODE_THREADS} threads",
                    lambda pool=pool: list(pool.map(decode, paths)),
                )
            arrays = np.stack([decode(p) for p in paths])
            measure("model only (pre-decoded)", lambda arrays=arrays: model.predict(arrays))
            measure("predict_paths, 1 thread", lambda: predict_paths(model, paths, threads=1))
            measure("predict_paths, default", lambda: predict_paths(model, paths))
            log(f"round {r + 1}/{args.rounds} done")

    best = {name: max(values) for name, values in rates.items()}
    print(f"images: {len(paths)} JPEGs of {args.photo_px} px -> {args.size} px; {machine()}")
    for name, values in rates.items():
        rounds = ", ".join(f"{v:.0f}" for v in values)
        print(
            f"{name:28s} {best[name]:8.0f} images/s  "
            f"(rounds: {rounds}; median {statistics.median(values):.0f})"
        )
    model_only = best["model only (pre-decoded)"]
    print(
        f"end to end / model only: {best['predict_paths, default'] / model_only:.2f} "
        f"(1 decoding thread: {best['predict_paths, 1 thread'] / model_only:.2f}); "
        f"threaded / serial decoding: "
        f"{best[f'decode, {DECODE_THREADS} threads'] / best['decode, 1 thread']:.2f}"
    )


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
