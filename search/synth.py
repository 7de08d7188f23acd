"""Synthetic stand-ins for `rare_species.zip`: same layout, real families, real imbalance.

The real data set cannot ship with the project, but demos, tests and benchmarks need one that
behaves like it: the exact zip/folder layout that `dataset.prepare` reads, real family names and
phyla, the real heavy imbalance and species grouping (from `families.csv`, a summary of the
public label list), and images a classifier can learn only partly. Each family has a hidden
"animal": a body hue shared with other families, a coat pattern (stripes, spots, checks or
zigzags) with a family orientation and frequency, light or dark markings. Species vary it a
little, every photo jitters it and puts the animal at a random place, size and rotation on a
cluttered background with distractor patterns and noise, so colour alone is not enough and a
better model scores clearly better than a worse one. That is the default "coats" style, quick
to learn (tests, smoke runs); the "photos" style (search/synth_photos.py) makes a family a
body plan in photo-like scenes, where pretrained backbones pay off as they do on real photos.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from search.errors import ConfigError
from search.synth_photos import (
    body_plans,
    hsv_to_rgb,
    pick_combinations,
    render_photo,
    species_look,
)

__all__ = ["FAMILY_TABLE", "METADATA_COLUMNS", "STYLES", "generate", "load_families"]

FAMILY_TABLE = "families.csv"
METADATA_COLUMNS = (
    "rare_species_id",
    "eol_content_id",
    "eol_page_id",
    "kingdom",
    "phylum",
    "family",
    "file_path",
)
ZIP_TOP = "rare_species"
STYLES = ("coats", "photos")  # a family is a coat texture / a body plan (search/synth_photos.py)
MIN_PER_FAMILY = 8
GRAYSCALE_FRACTION = 0.01  # "a few" real photos are grayscale JPEGs

# Traits are drawn from small sets so families share them: only the combination is unique.
_HUES = (0.0, 0.08, 0.15, 0.33, 0.55, 0.75)
_PATTERNS = ("stripes", "spots", "checks", "zigzag")
_ANGLES = (0.0, 45.0, 90.0, 135.0)
_FREQS = (3.0, 5.0, 8.0)  # pattern cycles across the body's long axis
_MARKINGS = ("dark", "light")
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed, so one seed gives one byte-identical zip

Render = Callable[[int, int, int], bytes]  # (family, species, image) -> JPEG bytes


@dataclass(frozen=True)
class FamilyInfo:
    """One row of `families.csv`: what the real data set holds for a family."""

    family: str
    phylum: str
    n_images: int
    n_species: int


@dataclass(frozen=True)
class _Look:
    """What a family (then a species, then one photo) looks like."""

    hue: float
    pattern: str
    angle: float
    freq: float
    marking: str
    aspect: float


def load_families() -> list[FamilyInfo]:
    """The 202 real families, sorted by name (package data; never reads ../shared at run time)."""
    text = resources.files("search").joinpath(FAMILY_TABLE).read_text(encoding="utf-8")
    rows = csv.DictReader(io.StringIO(text))
    return [
        FamilyInfo(r["family"], r["phylum"], int(r["n_images"]), int(r["n_species"])) for r in rows
    ]


def generate(
    out: Path,
    *,
    n_families: int = 12,
    images_per_family: tuple[int, int] | None = None,
    image_px: int = 128,
    seed: int = 0,
    as_zip: bool = False,
    total_images: int | None = None,
    style: str = "coats",
) -> Path:
    """Write a synthetic data set at `out` (a folder, or with `as_zip` a zip file whose single
    top-level folder is `rare_species/`, like the real download) and return its path.

    Image counts per family: scaled from the real counts to about `total_images` (at least 8 a
    family) when given; else the real counts mapped linearly onto `images_per_family`
    (lo, hi) when given; else the real counts. Families are picked one per size-quantile, so
    large and small families are both present. `style` "coats": a family is a coat texture,
    quick to learn (tests, demos); "photos": a family is a body plan in field-photo-like
    scenes, where pretrained features pay as on the real photos. Refuses to overwrite an
    existing `out`: it might be the user's real data.
    """
    out = Path(out)
    table = load_families()
    _check_args(n_families, images_per_family, image_px, total_images, len(table))
    if style not in STYLES:
        raise ConfigError(f"unknown style {style!r}: choose one of {', '.join(STYLES)}")
    if out.exists():
        raise ConfigError(f"{out} already exists: remove it or choose another output path")
    rng = np.random.default_rng(seed)
    chosen = _choose_families(table, n_families, rng)
    counts = _image_counts(chosen, images_per_family, total_images)
    render = _renderer(style, len(chosen), image_px, seed, rng)
    rows = _metadata_rows(chosen, counts, rng)

    out.parent.mkdir(parents=True, exist_ok=True)
    if as_zip:
        _write_zip(out, rows, chosen, render)
    else:
        _write_folder(out, rows, chosen, render)
    return out


def _renderer(style: str, n: int, image_px: int, seed: int, rng: np.random.Generator) -> Render:
    """The function that draws photo `img` of species `sp` of family `fam` (0-based)."""
    if style == "coats":
        looks = _family_looks(n, rng)
        return lambda fam, sp, img: _render_jpeg(looks[fam], fam, sp, img, image_px, seed)
    plans = body_plans(n, rng)

    def render(fam: int, sp: int, img: int) -> bytes:
        plan, coat = species_look(plans[fam], seed, fam, sp)
        r = np.random.default_rng([seed, fam, sp, img, 2])
        return _jpeg(render_photo(plan, coat, r, image_px), r)

    return render


def _check_args(
    n_families: int,
    images_per_family: tuple[int, int] | None,
    image_px: int,
    total_images: int | None,
    available: int,
) -> None:
    if not 1 <= n_families <= available:
        raise ConfigError(f"n_families must be between 1 and {available}, got {n_families}")
    if image_px < 16:
        raise ConfigError(f"image_px must be at least 16, got {image_px}")
    if images_per_family is not None:
        lo, hi = images_per_family
        if not MIN_PER_FAMILY // 2 <= lo <= hi:
            raise ConfigError(
                f"images_per_family must be (lo, hi) with {MIN_PER_FAMILY // 2} <= lo <= hi, "
                f"got {images_per_family}"
            )
    if total_images is not None and total_images < 1:
        raise ConfigError(f"total_images must be positive, got {total_images}")


def _choose_families(table: list[FamilyInfo], n: int, rng: np.random.Generator) -> list[FamilyInfo]:
    """One family from each of `n` size-quantile bins: the real imbalance survives a small n."""
    by_size = sorted(table, key=lambda f: (f.n_images, f.family))
    bins = np.array_split(np.arange(len(by_size)), n)
    picked = [by_size[int(rng.choice(b))] for b in bins]
    return sorted(picked, key=lambda f: f.family)


def _image_counts(
    chosen: list[FamilyInfo],
    images_per_family: tuple[int, int] | None,
    total_images: int | None,
) -> list[int]:
    real = np.array([f.n_images for f in chosen], dtype=np.float64)
    if total_images is not None:
        scaled = np.rint(real * total_images / real.sum()).astype(int)
        return [max(MIN_PER_FAMILY, int(n)) for n in scaled]
    if images_per_family is not None:
        lo, hi = images_per_family
        span = real.max() - real.min()
        pos = (real - real.min()) / span if span > 0 else np.zeros_like(real)
        return [int(round(lo + p * (hi - lo))) for p in pos]
    return [int(n) for n in real]


def _family_looks(n: int, rng: np.random.Generator) -> list[_Look]:
    """Distinct trait combinations, drawn without replacement from the full grid."""
    traits = pick_combinations((_HUES, _PATTERNS, _ANGLES, _FREQS, _MARKINGS), n, rng)
    return [_Look(*t, aspect=float(rng.uniform(0.45, 0.8))) for t in traits]


def _metadata_rows(
    chosen: list[FamilyInfo], counts: list[int], rng: np.random.Generator
) -> list[dict[str, object]]:
    """Rows of metadata.csv, grouped by family then species like the real file. Species get the
    family's real count, capped so that each has at least 2 images."""
    rows: list[dict[str, object]] = []
    content_id = 20_000_000
    page_id = 1_000_000
    for fam_i, (info, n) in enumerate(zip(chosen, counts, strict=True)):
        k = max(1, min(info.n_species, n // 2))
        for sp_i, part in enumerate(np.array_split(np.arange(n), k)):
            page_id += int(rng.integers(1, 5_000))
            for img_j in part:
                content_id += int(rng.integers(1, 50))
                name = f"{content_id}_{page_id}_eol-full-size-copy.jpg"
                rows.append(
                    {
                        "rare_species_id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                        "eol_content_id": content_id,
                        "eol_page_id": page_id,
                        "kingdom": "animalia",
                        "phylum": info.phylum,
                        "family": info.family,
                        "file_path": f"{info.phylum}_{info.family}/{name}",
                        "_family": fam_i,
                        "_species": sp_i,
                        "_image": int(img_j),
                    }
                )
    return rows


def _metadata_bytes(rows: list[dict[str, object]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=METADATA_COLUMNS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _images(rows: list[dict[str, object]], render: Render) -> list[tuple[str, bytes]]:
    out = []
    for row in rows:
        fam, sp, img = int(row["_family"]), int(row["_species"]), int(row["_image"])
        out.append((str(row["file_path"]), render(fam, sp, img)))
    return out


def _write_zip(
    out: Path,
    rows: list[dict[str, object]],
    chosen: list[FamilyInfo],
    render: Render,
) -> None:
    """Write beside `out`, then rename: a crash never leaves a half zip under the real name."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; it stands in for a downloaded file
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            _zip_dir(zf, f"{ZIP_TOP}/")
            meta = zipfile.ZipInfo(f"{ZIP_TOP}/metadata.csv", date_time=_ZIP_DATE)
            zf.writestr(meta, _metadata_bytes(rows), compress_type=zipfile.ZIP_DEFLATED)
            for folder in sorted({f"{f.phylum}_{f.family}" for f in chosen}):
                _zip_dir(zf, f"{ZIP_TOP}/{folder}/")
            for path, data in _images(rows, render):
                info = zipfile.ZipInfo(f"{ZIP_TOP}/{path}", date_time=_ZIP_DATE)
                info.external_attr = 0o644 << 16
                zf.writestr(info, data, compress_type=zipfile.ZIP_STORED)  # JPEGs don't shrink
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _zip_dir(zf: zipfile.ZipFile, name: str) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.external_attr = (0o40755 << 16) | 0x10
    zf.writestr(info, b"")


def _write_folder(
    out: Path,
    rows: list[dict[str, object]],
    chosen: list[FamilyInfo],
    render: Render,
) -> None:
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    tmp.chmod(0o755)
    try:
        (tmp / "metadata.csv").write_bytes(_metadata_bytes(rows))
        for f in chosen:
            (tmp / f"{f.phylum}_{f.family}").mkdir(exist_ok=True)
        for path, data in _images(rows, render):
            (tmp / path).write_bytes(data)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# Rendering: plain numpy on a float (h, w, 3) canvas in [0, 1].


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """Coat pattern in [0, 1] over body coordinates (u along the pattern direction).
    Grid patterns are anisotropic so that a 90-degree turn is a different family."""
    two_pi = 2.0 * np.pi
    if kind == "stripes":
        s = np.sin(two_pi * freq * u)
    elif kind == "spots":
        s = np.sin(two_pi * freq * u) * np.sin(two_pi * 0.5 * freq * v) - 0.35
    elif kind == "checks":
        s = np.sin(two_pi * freq * u) * np.sin(two_pi * 2.0 * freq * v)
    else:  # zigzag
        s = np.sin(two_pi * freq * u + 2.0 * np.sin(two_pi * 1.5 * freq * v))
    return np.clip(s * 4.0 + 0.5, 0.0, 1.0)


def _species_look(base: _Look, seed: int, fam: int, sp: int) -> _Look:
    """Species of one family differ a little: hue, pattern angle/frequency, body shape."""
    r = np.random.default_rng([seed, fam, sp, 1])
    return _Look(
        hue=(base.hue + r.uniform(-0.04, 0.04)) % 1.0,
        pattern=base.pattern,
        angle=base.angle + r.uniform(-6.0, 6.0),
        freq=base.freq * r.uniform(0.88, 1.12),
        marking=base.marking,
        aspect=float(np.clip(base.aspect + r.uniform(-0.08, 0.08), 0.35, 0.9)),
    )


def _render_jpeg(base: _Look, fam: int, sp: int, img: int, image_px: int, seed: int) -> bytes:
    look = _species_look(base, seed, fam, sp)
    r = np.random.default_rng([seed, fam, sp, img, 2])
    w = int(round(image_px * r.uniform(0.9, 1.1)))
    h = int(round(image_px * r.uniform(0.9, 1.1)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    canvas = _background(r, h, w, xx, yy)
    _clutter(canvas, r, xx, yy)
    _animal(canvas, look, r, xx, yy)
    canvas *= r.uniform(0.75, 1.15)  # exposure
    canvas += r.normal(0.0, r.uniform(0.03, 0.07), canvas.shape).astype(np.float32)
    pixels = (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return _jpeg(Image.fromarray(pixels), r)


def _jpeg(picture: Image.Image, r: np.random.Generator) -> bytes:
    """Encode like a camera roll: varying quality, and now and then a grayscale file."""
    if r.random() < GRAYSCALE_FRACTION:
        picture = picture.convert("L")
    buf = io.BytesIO()
    picture.save(buf, "JPEG", quality=int(r.integers(80, 93)))
    return buf.getvalue()


def _background(
    r: np.random.Generator, h: int, w: int, xx: np.ndarray, yy: np.ndarray
) -> np.ndarray:
    """A smooth, random-coloured scene: low-resolution colour noise upsampled plus a gradient."""
    coarse = r.uniform(0.15, 0.85, (4, 4, 3)).astype(np.float32)
    small = Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    canvas = np.asarray(small, dtype=np.float32) / 255.0
    g = r.uniform(-0.25, 0.25)
    canvas = canvas + (g * (yy / h - 0.5))[..., None]
    return canvas.astype(np.float32)


def _clutter(canvas: np.ndarray, r: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> None:
    """Distractors: blobs in any hue (family hues included) and patches of random stripes."""
    h, w = canvas.shape[:2]
    side = min(h, w)
    for _ in range(int(r.integers(3, 7))):
        cx, cy = r.uniform(0, w), r.uniform(0, h)
        a, b = r.uniform(0.05, 0.2) * side, r.uniform(0.05, 0.2) * side
        t = r.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / a
        v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / b
        mask = np.clip((1.0 - (u * u + v * v)) * 3.0, 0.0, 1.0)[..., None]
        colour = hsv_to_rgb(r.uniform(0, 1), r.uniform(0.2, 0.9), r.uniform(0.3, 0.95))
        if r.random() < 0.5:
            kind = _PATTERNS[int(r.integers(len(_PATTERNS)))]
            coat = _pattern(kind, u * r.uniform(1.0, 4.0), v, 1.0)
            colour = colour * (0.3 + 0.7 * coat[..., None])
        canvas *= 1.0 - mask
        canvas += mask * colour


def _animal(
    canvas: np.ndarray, look: _Look, r: np.random.Generator, xx: np.ndarray, yy: np.ndarray
) -> None:
    """The family signal: a patterned body (plus a head) at a random place, size and rotation.
    The coat pattern keeps its family angle (jittered) whatever the body's rotation."""
    h, w = canvas.shape[:2]
    side = min(h, w)
    a = r.uniform(0.22, 0.38) * side
    b = a * look.aspect * r.uniform(0.9, 1.1)
    cx, cy = r.uniform(0.3, 0.7) * w, r.uniform(0.3, 0.7) * h
    t = r.uniform(0, np.pi)
    dx, dy = xx - cx, yy - cy
    u = (dx * np.cos(t) + dy * np.sin(t)) / a
    v = (-dx * np.sin(t) + dy * np.cos(t)) / b
    body = np.clip((1.0 - (u * u + v * v)) * 4.0, 0.0, 1.0)
    hx, hy = cx + np.cos(t) * a * 1.05, cy + np.sin(t) * a * 1.05
    hr = b * 0.55
    head = np.clip((1.0 - ((xx - hx) ** 2 + (yy - hy) ** 2) / (hr * hr)) * 4.0, 0.0, 1.0)
    mask = np.maximum(body, head)[..., None]

    ang = np.deg2rad(look.angle + r.uniform(-10.0, 10.0))
    freq = look.freq * r.uniform(0.92, 1.08) / (2.0 * a)  # cycles per pixel
    pu = (dx * np.cos(ang) + dy * np.sin(ang)) * freq
    pv = (-dx * np.sin(ang) + dy * np.cos(ang)) * freq
    phase = r.uniform(0, 1)
    coat = _pattern(look.pattern, pu + phase, pv + phase, 1.0)[..., None]
    hue = (look.hue + r.uniform(-0.025, 0.025)) % 1.0
    fur = hsv_to_rgb(hue, r.uniform(0.55, 0.9), r.uniform(0.6, 0.9))
    if look.marking == "dark":
        mark = fur * r.uniform(0.15, 0.35)
    else:
        mark = 0.35 * fur + 0.65 * r.uniform(0.85, 1.0)
    colour = fur * (1.0 - coat) + mark * coat
    canvas *= 1.0 - mask
    canvas += mask * colour
