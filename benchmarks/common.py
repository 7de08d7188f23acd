"""Shared helpers of the benchmarks: generated data sets prepared once under benchmarks/results/
(git-ignored), a fixed head, and a timer. Run the scripts from the repository root, e.g.
`.venv/bin/python benchmarks/feature_cache.py`."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = RESULTS / "cache"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# One ordinary head, used wherever a benchmark needs "the same trial" twice.
HEAD_PARAMS = {
    "n_layers": 1,
    "units_0": 256,
    "dropout_0": 0.2,
    "batch_norm": False,
    "learning_rate": 1e-3,
    "optimizer": "adam",
    "batch_size": 32,
    "label_smoothing": 0.0,
    "weight_decay": 1e-6,
}


def prepared(
    families: int,
    images: int,
    image_px: int,
    image_size: int,
    *,
    seed: int = 0,
    style: str = "coats",
) -> Path:
    """A generated data set (`search synth`), prepared (`search prepare`) once and reused."""
    from search.dataset import prepare
    from search.synth import generate

    name = f"synth-f{families}-n{images}-{image_px}px-s{seed}"
    if style != "coats":
        name += f"-{style}"
    out = WORK / f"{name}-prepared{image_size}"
    if (out / "prepared.json").exists():
        return out
    source = WORK / name
    if not (source / "metadata.csv").exists():
        log(f"generating {name}")
        generate(
            source,
            n_families=families,
            total_images=images,
            image_px=image_px,
            seed=seed,
            style=style,
        )
    log(f"preparing {name} at {image_size} px")
    prepare(source, out, image_size=image_size, seed=seed, workers=2)
    return out


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def timed(into: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to `into[name]`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        into[name] = into.get(name, 0.0) + time.perf_counter() - started


def machine() -> str:
    return f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start"
