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

At full size (`real_shape`, `sizes="real"`) it stands in for the whole download: every family,
species and count, photos with the real spread of pixel sizes (a few grayscale, CMYK and
EXIF-rotated), drawn small, upscaled and JPEG-encoded in a process pool, so the ~3 GB set takes
minutes on two cores and rehearsals (benchmarks/full_scale.py) meet the real decoding load.
"""

from __future__ import annotations

import csv
import io
import math
import multiprocessing
import os
import shutil
import signal
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from search.errors import ConfigError
from search.progress import Progress
from search.synth_photos import (
    BodyPlan,
    Coat,
    body_plans,
    hsv_to_rgb,
    pick_combinations,
    render_photo,
    species_look,
)

__all__ = [
    "FAMILY_TABLE",
    "LABEL_COLUMNS",
    "METADATA_COLUMNS",
    "REAL_TOTAL",
    "SIZES",
    "STYLES",
    "generate",
    "load_families",
]

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
LABEL_COLUMNS = METADATA_COLUMNS[1:]  # rare_species_labels.csv: metadata.csv without the UUID
STYLES = ("coats", "photos")  # a family is a coat texture / a body plan (search/synth_photos.py)
SIZES = ("fixed", "real")  # about image_px square / the real spread of full-size photos
MIN_PER_FAMILY = 8
GRAYSCALE_FRACTION = 0.01  # "a few" real photos are grayscale JPEGs

# Traits are drawn from small sets so families share them: only the combination is unique.
_HUES = (0.0, 0.08, 0.15, 0.33, 0.55, 0.75)
_PATTERNS = ("stripes", "spots", "checks", "zigzag")
_ANGLES = (0.0, 45.0, 90.0, 135.0)
_FREQS = (3.0, 5.0, 8.0)  # pattern cycles across the body's long axis
_MARKINGS = ("dark", "light")
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed, so one seed gives one byte-identical zip

# The real set (../shared/data/README.md): 11,983 photos; families.csv summarises the public label
# list, which lacks 159 of them; species hold at most 30 photos.
REAL_TOTAL = 11_983
MAX_PER_SPECIES = 30
# Long side of the real photos, measured on a sample of 127: min, p10, median, p90, max; short
# side down to 160. A log-normal through p10/median/p90, redrawn outside [min, max].
LONG_MIN, LONG_P10, LONG_MEDIAN, LONG_P90, LONG_MAX = 297, 640, 1710, 3963, 8688
SHORT_MIN = 160
RENDER_PX = 320  # full-size photos are drawn at this long side, then upscaled (minutes, not hours)
CMYK_FRACTION = 0.005
EXIF_FRACTION = 0.02
_STORE_TURN = {  # EXIF orientation -> how the upright picture is stored so viewers turn it back
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


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


@dataclass(frozen=True)
class _Shot:
    """How one full-size photo is stored: upright size, JPEG colour mode, EXIF orientation."""

    width: int
    height: int
    mode: str = "RGB"  # "RGB", "L" (grayscale) or "CMYK"
    orientation: int = 1  # 1 upright; 3, 6, 8: pixels stored turned, EXIF says how to turn back


def generate(
    out: Path,
    *,
    n_families: int | None = None,
    images_per_family: tuple[int, int] | None = None,
    image_px: int = 128,
    seed: int = 0,
    as_zip: bool = False,
    total_images: int | None = None,
    style: str = "coats",
    real_shape: bool = False,
    labels: Path | None = None,
    sizes: str = "fixed",
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Write a synthetic data set at `out` (a folder, or with `as_zip` a zip file whose single
    top-level folder is `rare_species/`, like the real download) and return its path.

    Image counts per family: scaled from the real counts to about `total_images` (at least 8 a
    family) when given; else the real counts mapped linearly onto `images_per_family`
    (lo, hi) when given; else the real counts. Families are picked one per size-quantile, so
    large and small families are both present. `style` "coats": a family is a coat texture,
    quick to learn (tests, demos); "photos": a family is a body plan in field-photo-like
    scenes, where pretrained features pay as on the real photos.

    `real_shape`: every family of `families.csv` with its real species and counts, topped up to
    the real total of 11,983 (the label list lacks 159: they go to the species that have fewest
    photos, at most 30 a species); `labels` (implies it): exactly the rows of a labels CSV of the
    `rare_species_labels.csv` form. `sizes` "fixed": about `image_px` square; "real": the real
    spread of full-size photo sizes (photos style only), a few grayscale, CMYK and EXIF-rotated.
    `workers` processes draw the photos; the bytes do not depend on it. Refuses to overwrite an
    existing `out`: it might be the user's real data.
    """
    out = Path(out)
    table = load_families()
    whole = real_shape or labels is not None
    if whole and (n_families is not None or images_per_family or total_images is not None):
        raise ConfigError(
            "a real-shape data set has every family and the real counts: "
            "drop the number of families and images"
        )
    n_families = 12 if n_families is None else n_families
    _check_args(n_families, images_per_family, image_px, total_images, len(table))
    if style not in STYLES:
        raise ConfigError(f"unknown style {style!r}: choose one of {', '.join(STYLES)}")
    if sizes not in SIZES:
        raise ConfigError(f"unknown sizes {sizes!r}: choose one of {', '.join(SIZES)}")
    if sizes == "real" and style != "photos":
        raise ConfigError("real photo sizes need the photos style: add --style photos")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if out.exists():
        raise ConfigError(f"{out} already exists: remove it or choose another output path")
    rng = np.random.default_rng(seed)
    if labels is not None:
        chosen, rows = _labels_rows(Path(labels), rng)
        painter = _painter(style, len(chosen), image_px, seed, rng)
    else:
        if real_shape:
            chosen, counts = table, _real_counts(table)
        else:
            chosen = _choose_families(table, n_families, rng)
            counts = _image_counts(chosen, images_per_family, total_images)
        painter = _painter(style, len(chosen), image_px, seed, rng)
        rows = _metadata_rows(chosen, counts, rng)
    if sizes == "real":
        for row, shot in zip(rows, _draw_shots(len(rows), seed), strict=True):
            row["_shot"] = shot

    out.parent.mkdir(parents=True, exist_ok=True)
    images = _images(rows, painter, workers, progress)
    if as_zip:
        _write_zip(out, rows, chosen, images)
    else:
        _write_folder(out, rows, chosen, images)
    return out


@dataclass(frozen=True)
class _Painter:
    """Draws photo `img` of species `sp` of family `fam` (0-based) as JPEG bytes. A plain,
    picklable value, so pool processes draw exactly what the parent would."""

    style: str
    image_px: int
    seed: int
    looks: tuple[_Look, ...] = ()
    plans: tuple[BodyPlan, ...] = ()

    def __call__(self, task: tuple[int, int, int, _Shot | None]) -> bytes:
        fam, sp, img, shot = task
        if self.style == "coats":
            return _render_jpeg(self.looks[fam], fam, sp, img, self.image_px, self.seed)
        plan, coat = species_look(self.plans[fam], self.seed, fam, sp)
        r = np.random.default_rng([self.seed, fam, sp, img, 2])
        if shot is None:
            return _jpeg(render_photo(plan, coat, r, self.image_px), r)
        return _full_size_jpeg(plan, coat, r, shot)


def _painter(style: str, n: int, image_px: int, seed: int, rng: np.random.Generator) -> _Painter:
    if style == "coats":
        return _Painter(style, image_px, seed, looks=tuple(_family_looks(n, rng)))
    return _Painter(style, image_px, seed, plans=tuple(body_plans(n, rng)))


def _real_counts(table: list[FamilyInfo]) -> list[int]:
    """The label list's counts plus the photos it lacks (REAL_TOTAL in all), shared out by
    largest remainder among families whose species hold fewer than 30 photos, in proportion
    to that room: where the real set has its photos that the public list lost."""
    n = np.array([f.n_images for f in table], dtype=np.int64)
    room = np.maximum(0, MAX_PER_SPECIES * np.array([f.n_species for f in table]) - n)
    extra = min(REAL_TOTAL - int(n.sum()), int(room.sum()))
    if extra <= 0:
        return [int(v) for v in n]
    share = extra * room / room.sum()
    add = np.floor(share).astype(np.int64)
    rest = extra - int(add.sum())
    order = sorted(range(len(n)), key=lambda i: (-(share[i] - add[i]), i))
    add[order[:rest]] += 1
    return [int(v) for v in n + add]


def _labels_rows(
    path: Path, rng: np.random.Generator
) -> tuple[list[FamilyInfo], list[dict[str, object]]]:
    """Families and metadata rows from a labels CSV (rare_species_labels.csv form): its exact
    families, species, counts, ids and file names, in its order; only the UUIDs are drawn."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"labels file {path} not found: check the --labels path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"labels file {path} cannot be read: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ConfigError(
            f"labels file {path} lacks column(s) {', '.join(missing)}: "
            f"expected {', '.join(LABEL_COLUMNS)}"
        )
    raw = list(reader)
    if not raw:
        raise ConfigError(f"labels file {path} has no rows")
    phylum_of: dict[str, str] = {}
    species_of: dict[str, dict[str, int]] = {}
    seen: set[str] = set()
    for line, r in enumerate(raw, start=2):
        fam, phylum, page, fp = r["family"], r["phylum"], r["eol_page_id"], r["file_path"]
        parts = PurePosixPath(fp).parts
        if (
            len(parts) != 2
            or parts[0] != f"{phylum}_{fam}"
            or not parts[1].endswith(".jpg")
            or parts[1].startswith(".")
            or "\\" in fp
        ):
            raise ConfigError(
                f"labels file {path} line {line}: file_path {fp!r} is not "
                "<phylum>_<family>/<name>.jpg"
            )
        if fp in seen:
            raise ConfigError(f"labels file {path} line {line}: file_path {fp!r} repeats")
        seen.add(fp)
        if phylum_of.setdefault(fam, phylum) != phylum:
            raise ConfigError(f"labels file {path} line {line}: family {fam!r} in two phyla")
        species = species_of.setdefault(fam, {})
        species.setdefault(page, len(species))
    families = sorted(phylum_of)
    index = {f: i for i, f in enumerate(families)}
    per_species: dict[tuple[str, str], int] = {}
    rows: list[dict[str, object]] = []
    for r in raw:
        fam, page = r["family"], r["eol_page_id"]
        img = per_species.get((fam, page), 0)
        per_species[(fam, page)] = img + 1
        row: dict[str, object] = {"rare_species_id": str(uuid.UUID(bytes=rng.bytes(16), version=4))}
        row.update({c: r[c] for c in LABEL_COLUMNS})
        row.update(_family=index[fam], _species=species_of[fam][page], _image=img)
        rows.append(row)
    counts = {f: 0 for f in families}
    for r in raw:
        counts[r["family"]] += 1
    chosen = [FamilyInfo(f, phylum_of[f], counts[f], len(species_of[f])) for f in families]
    return chosen, rows


def _draw_shots(n: int, seed: int) -> list[_Shot]:
    """Sizes and storage of `n` full-size photos, from their own random stream (so the scene
    of every photo is the one fixed sizes would draw). Long sides follow the real spread; the
    set holds its extremes (the largest draw becomes 8,688 px, the smallest 297 x 160); about 1%
    are grayscale, 0.5% CMYK and 2% EXIF-rotated, at least one of each."""
    r = np.random.default_rng([seed, 5])
    mu = math.log(LONG_MEDIAN)
    sigma = (math.log(LONG_P90) - math.log(LONG_P10)) / (2 * 1.2815516)  # z of the 90th pct
    long = np.exp(mu + sigma * r.standard_normal(n))
    outside = (long < LONG_MIN) | (long > LONG_MAX)
    while outside.any():
        long[outside] = np.exp(mu + sigma * r.standard_normal(int(outside.sum())))
        outside = (long < LONG_MIN) | (long > LONG_MAX)
    ratio = r.uniform(0.55, 1.0, n)  # short over long side
    portrait = r.random(n) < 0.3
    long_px = np.rint(long).astype(np.int64)
    short_px = np.clip(np.rint(long * ratio).astype(np.int64), SHORT_MIN, long_px)
    if n >= 2:
        long_px[int(np.argmax(long))] = LONG_MAX
        smallest = int(np.argmin(long))
        long_px[smallest], short_px[smallest] = LONG_MIN, SHORT_MIN
    modes = ["RGB"] * n
    orientation = [1] * n
    order = [int(i) for i in r.permutation(n)]
    k_gray, k_cmyk, k_exif = (
        max(1, round(f * n)) for f in (GRAYSCALE_FRACTION, CMYK_FRACTION, EXIF_FRACTION)
    )
    for i in order[:k_gray]:
        modes[i] = "L"
    for i in order[k_gray : k_gray + k_cmyk]:
        modes[i] = "CMYK"
    turns = r.choice(sorted(_STORE_TURN), size=k_exif)
    for i, turn in zip(order[k_gray + k_cmyk : k_gray + k_cmyk + k_exif], turns, strict=False):
        orientation[i] = int(turn)
    shots = []
    for i in range(n):
        w, h = int(long_px[i]), int(short_px[i])
        if portrait[i]:
            w, h = h, w
        shots.append(_Shot(w, h, modes[i], orientation[i]))
    return shots


def _full_size_jpeg(plan: BodyPlan, coat: Coat, r: np.random.Generator, shot: _Shot) -> bytes:
    """Draw the photo at RENDER_PX long side, upscale it to the shot's size, encode it as the
    shot says. Upscaled scenes are smooth, yet the files come out near the real sizes."""
    w, h = shot.width, shot.height
    scale = min(1.0, RENDER_PX / max(w, h))
    small = (max(1, round(w * scale)), max(1, round(h * scale)))
    picture = render_photo(plan, coat, r, max(small), size=small)
    if small != (w, h):
        picture = picture.resize((w, h), Image.Resampling.BICUBIC)
    quality = int(r.integers(85, 91))
    if shot.mode != "RGB":
        picture = picture.convert(shot.mode)
    extra: dict[str, object] = {}
    if shot.orientation != 1:
        picture = picture.transpose(_STORE_TURN[shot.orientation])
        exif = Image.Exif()
        exif[0x0112] = shot.orientation
        extra["exif"] = exif.tobytes()
    buf = io.BytesIO()
    picture.save(buf, "JPEG", quality=quality, **extra)
    return buf.getvalue()


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


_POOL_PAINTER: _Painter | None = None  # set in each pool process by _pool_init


def _pool_init(painter: _Painter) -> None:
    """Forked children inherit the parent's signal handlers; the defaults make `terminate()`
    (SIGTERM) end them and leave Ctrl+C to the parent, whatever the parent had installed."""
    global _POOL_PAINTER
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _POOL_PAINTER = painter


def _pool_paint(task: tuple[int, int, int, _Shot | None]) -> bytes:
    assert _POOL_PAINTER is not None
    return _POOL_PAINTER(task)


def _images(
    rows: list[dict[str, object]], painter: _Painter, workers: int, progress: bool
) -> Iterator[tuple[str, bytes]]:
    """(file_path, JPEG bytes) in row order, drawn by `workers` processes: streamed, so a
    3 GB set never sits in memory, and in order, so the bytes do not depend on `workers`."""
    tasks = [
        (int(r["_family"]), int(r["_species"]), int(r["_image"]), r.get("_shot")) for r in rows
    ]
    bar = Progress(len(tasks), "synth images", every_s=10.0) if progress else None
    if workers == 1 or len(tasks) < 4 * workers:
        drawn: Iterator[bytes] = (painter(t) for t in tasks)  # type: ignore[arg-type]
        for row, data in zip(rows, drawn, strict=True):
            yield str(row["file_path"]), data
            if bar:
                bar.update()
        return
    with multiprocessing.get_context().Pool(workers, _pool_init, (painter,)) as pool:
        drawn = pool.imap(_pool_paint, tasks, chunksize=4)  # type: ignore[arg-type]
        for row, data in zip(rows, drawn, strict=True):
            yield str(row["file_path"]), data
            if bar:
                bar.update()
        pool.close()  # all drawn: let the children exit on their own rather than be killed
        pool.join()


def _write_zip(
    out: Path,
    rows: list[dict[str, object]],
    chosen: list[FamilyInfo],
    images: Iterator[tuple[str, bytes]],
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
            for path, data in images:
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
    images: Iterator[tuple[str, bytes]],
) -> None:
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    tmp.chmod(0o755)
    try:
        (tmp / "metadata.csv").write_bytes(_metadata_bytes(rows))
        for f in chosen:
            (tmp / f"{f.phylum}_{f.family}").mkdir(exist_ok=True)
        for path, data in images:
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
