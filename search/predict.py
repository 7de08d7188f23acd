"""Classify photos with the champion: files and folders in, top-k families out (CSV or JSON).

Images are decoded exactly as at training time (search.images) and predicted in batches;
unreadable files are reported and skipped, never fatal. Decoding runs in a small thread pool
(Pillow releases the GIL while it decodes) one chunk ahead of the model, so decoding overlaps
prediction and scales with the cores (benchmarks/predict_speed.py measures it).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from search.errors import DataError
from search.images import decode_image
from search.progress import Progress
from search.registry import Champion

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DECODE_CHUNK = 256
DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclass
class Prediction:
    path: str
    families: list[str]
    probabilities: list[float]
    phylum: str


def expand(inputs: list[Path]) -> list[Path]:
    """Files as given; folders walked recursively for image files, in sorted order."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths.extend(
                sorted(
                    p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                )
            )
        else:
            paths.append(item)
    return paths


def predict_paths(
    champion: Champion, paths: list[Path], top_k: int = 5, threads: int = DECODE_THREADS
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Predictions for readable images, in input order, and (path, reason) for those skipped."""
    results: list[Prediction] = []
    skipped: list[tuple[str, str]] = []
    top_k = max(1, min(top_k, len(champion.classes)))
    bar = Progress(len(paths), "predict", every_s=5.0) if len(paths) > DECODE_CHUNK else None
    chunks = list(_chunks(paths, DECODE_CHUNK))
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="decode") as pool:
        pending = _submit(pool, chunks[0], champion.image_size) if chunks else []
        for i, chunk in enumerate(chunks):
            decoded = pending
            # Decode the next chunk while the model works on this one.
            if i + 1 < len(chunks):
                pending = _submit(pool, chunks[i + 1], champion.image_size)
            images, kept = [], []
            for path, future in zip(chunk, decoded, strict=True):
                try:
                    images.append(future.result())
                    kept.append(path)
                except (DataError, OSError) as exc:
                    skipped.append((str(path), str(exc) or type(exc).__name__))
            if images:
                probs = champion.predict(np.stack(images))
                results.extend(
                    _top(champion, path, row, top_k) for path, row in zip(kept, probs, strict=True)
                )
            if bar is not None:
                bar.update(len(chunk))
    return results, skipped


def _submit(pool: ThreadPoolExecutor, chunk: list[Path], size: int) -> list[Future[np.ndarray]]:
    return [pool.submit(decode_image, path, size) for path in chunk]


def _top(champion: Champion, path: Path, row: np.ndarray, top_k: int) -> Prediction:
    order = np.argsort(-row, kind="stable")[:top_k]
    return Prediction(
        path=str(path),
        families=[champion.classes[i] for i in order],
        probabilities=[float(row[i]) for i in order],
        phylum=champion.phyla[int(order[0])],
    )


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def write(results: list[Prediction], fmt: str, out: TextIO | None = None) -> None:
    """CSV: path, phylum, then family_i/probability_i pairs; JSON: a list of objects."""
    out = out if out is not None else sys.stdout
    if fmt == "json":
        json.dump([r.__dict__ for r in results], out, indent=2)
        out.write("\n")
        return
    k = max((len(r.families) for r in results), default=0)
    writer = csv.writer(out)
    header = ["path", "phylum"]
    for i in range(1, k + 1):
        header += [f"family_{i}", f"probability_{i}"]
    writer.writerow(header)
    for r in results:
        row = [r.path, r.phylum]
        for family, p in zip(r.families, r.probabilities, strict=True):
            row += [family, f"{p:.4f}"]
        writer.writerow(row)
