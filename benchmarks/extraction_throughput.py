"""Is the feature cache's input pipeline a bottleneck? Feature extraction through
`features.load_or_compute` (plain view, val and test also mirrored) vs the backbone's raw
forward pass (`predict_on_batch` on pre-decoded float32 arrays in memory), same images, same
batch size.

The two are measured in alternating rounds, so a busy machine slows both alike; each cache round
computes into a fresh folder and includes everything a worker pays (building the backbone,
reading images from the memory-mapped prepared data, writing the cache). Target: >= 90%.

    .venv/bin/python benchmarks/extraction_throughput.py [--rounds 3] [--images 2000]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import log, machine, prepared

BACKBONE = "efficientnet_lite0"


def cpu_seconds() -> float:
    """CPU time of this process, all threads: what the work costs, whatever else runs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raw_pass(model, batches: list[np.ndarray]) -> tuple[float, float]:
    """(wall s, CPU s) of predict_on_batch over pre-decoded float32 batches in memory."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    for batch in batches:
        model.predict_on_batch(batch)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def cache_pass(data, root: Path, batch_size: int) -> tuple[float, float]:
    """(wall s, CPU s) of a whole load_or_compute call computing a fresh cache."""
    from search import features

    with tempfile.TemporaryDirectory(dir=root) as tmp:
        wall, cpu = time.perf_counter(), cpu_seconds()
        features.load_or_compute(
            data, BACKBONE, "imagenet", Path(tmp), views=0, batch_size=batch_size, log=log
        )
        return time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    from search.backbones import build_backbone
    from search.dataset import load_prepared

    print(f"extraction throughput: {BACKBONE} imagenet at {args.image_size} px, {machine()}")
    data = load_prepared(prepared(20, args.images, 256, args.image_size))
    n = len(data.manifest)
    # The cache embeds every image once and the val and test images once more, mirrored.
    cache_n = n + len(data.indices("val")) + len(data.indices("test"))
    model = build_backbone(BACKBONE, data.image_size, "imagenet")
    pixels = np.asarray(data.images())  # decoded once, outside the timing
    batches = [
        pixels[i : i + args.batch_size].astype(np.float32) for i in range(0, n, args.batch_size)
    ]
    del pixels
    model.predict_on_batch(batches[0])  # trace once: the raw number is the steady state
    model.predict_on_batch(batches[-1])
    wall_ratios, cpu_ratios = [], []
    for r in range(args.rounds):
        raw_wall, raw_cpu = raw_pass(model, batches)
        cache_wall, cache_cpu = cache_pass(data, data.root.parent, args.batch_size)
        wall_ratios.append((cache_n / cache_wall) / (n / raw_wall))
        cpu_ratios.append((cache_n / cache_cpu) / (n / raw_cpu))
        print(
            f"round {r + 1}: raw {n / raw_wall:6.1f} images/s ({n / raw_cpu:5.1f}/CPU-s), "
            f"load_or_compute {cache_n / cache_wall:6.1f} images/s "
            f"({cache_n / cache_cpu:5.1f}/CPU-s): "
            f"{wall_ratios[-1]:.0%} wall, {cpu_ratios[-1]:.0%} CPU "
            f"(load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    wall, cpu = statistics.median(wall_ratios), statistics.median(cpu_ratios)
    print(f"{n} images, batch {args.batch_size}, {args.rounds} alternating rounds (medians):")
    print(f"  load_or_compute(views=0) / raw predict_on_batch, wall-clock throughput: {wall:.0%}")
    print(f"  the same per CPU-second (robust to other load on the machine):          {cpu:.0%}")
    print(
        f"target >= 90%: wall {'MET' if wall >= 0.9 else 'NOT MET'}, per CPU-second "
        f"{'MET' if cpu >= 0.9 else 'NOT MET'} (the whole call: building the backbone, reading "
        "the memory-mapped images, writing the cache)"
    )


if __name__ == "__main__":
    main()
