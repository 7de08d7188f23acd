"""Classify photos with the champion: files and folders in, top-k families out (CSV or JSON).

Images are decoded exactly as at training time (search.images) and predicted in batches;
unreadable files are reported and skipped, never fatal.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
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
    champion: Champion, paths: list[Path], top_k: int = 5
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Predictions for readable images and (path, reason) for the ones skipped."""
    results: list[Prediction] = []
    skipped: list[tuple[str, str]] = []
    top_k = max(1, min(top_k, len(champion.classes)))
    bar = Progress(len(paths), "predict", every_s=5.0) if len(paths) > DECODE_CHUNK else None
    for chunk in _chunks(paths, DECODE_CHUNK):
        images, kept = [], []
        for path in chunk:
            try:
                images.append(decode_image(path, champion.image_size))
                kept.append(path)
            except (DataError, OSError) as exc:
                skipped.append((str(path), str(exc) or type(exc).__name__))
        if images:
            probs = champion.predict(np.stack(images))
            for path, row in zip(kept, probs, strict=True):
                order = np.argsort(-row, kind="stable")[:top_k]
                results.append(
                    Prediction(
                        path=str(path),
                        families=[champion.classes[i] for i in order],
                        probabilities=[float(row[i]) for i in order],
                        phylum=champion.phyla[int(order[0])],
                    )
                )
        if bar is not None:
            bar.update(len(chunk))
    return results, skipped


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
