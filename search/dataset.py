"""Read, validate and split the Rare Species data set into the prepared-data format.

`prepare` turns `rare_species.zip` (or the folder it extracts to) into `data/prepared/`:

    manifest.csv   one row per kept image, in cache order (index, row, ids, family, label, split)
    images.npy     uint8 (N, S, S, 3), decoded once, memory-mappable by every worker
    prepared.json  classes, phyla, class weights, counts, split settings, data_hash
    report.csv     every excluded row or zip entry with the reason (header only if none)

Raw data is never modified and never extracted: members are read straight from the zip, so
there is no second 2 GB copy on disk and no extraction path where a hostile member name
(`../x`, absolute, symlink) could write outside the target. Bad rows are reported, never
dropped silently; only "nothing usable" is an error. `load_prepared` is the read side.

metadata.csv needs the columns `eol_page_id` (species; the unit of `split_by="species"`),
`family` (the label) and `file_path` (relative to the folder holding metadata.csv).
`rare_species_id`, `eol_content_id` and `phylum` are copied into the manifest when present;
other columns are ignored.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import socket
import stat
import tempfile
import uuid
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from filelock import FileLock
from sklearn.utils.class_weight import compute_class_weight

from search.errors import ConfigError, DataError
from search.images import ImageDecodeError, decode_image
from search.progress import Progress

__all__ = [
    "FORMAT",
    "MANIFEST_COLUMNS",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "NoUsableData",
    "PrepareReport",
    "PreparedData",
    "Problem",
    "load_prepared",
    "prepare",
]

FORMAT = 1
SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("eol_page_id", "family", "file_path")
OPTIONAL_COLUMNS = ("rare_species_id", "eol_content_id", "phylum")
MANIFEST_COLUMNS = (
    "index",
    "row",
    "rare_species_id",
    "eol_content_id",
    "eol_page_id",
    "phylum",
    "family",
    "file_path",
    "label",
    "split",
    "sha256",
)
REPORT_COLUMNS = ("row", "file_path", "problem")
MAX_MEMBER_BYTES = 100 * 2**20  # the largest real photo is ~15 MB
MAX_COMPRESSION_RATIO = 100  # JPEGs barely compress; a 100:1 member is a bomb, not a photo
_COPY_CHUNK = 256


class Problem(NamedTuple):
    """One excluded metadata row (`row` is its 1-based data line) or zip entry (`row` None)."""

    row: int | None
    file_path: str
    problem: str


class NoUsableData(DataError):
    """Nothing is left to train on; `problems` says why, since no report.csv is written."""

    def __init__(self, message: str, problems: list[Problem]) -> None:
        super().__init__(message)
        self.problems = problems


@dataclass
class PrepareReport:
    """What `prepare` did, for the CLI and for tests."""

    n_rows: int
    n_kept: int
    n_bad: int
    problems: list[Problem]
    counts: dict[str, int]
    out: Path
    n_families: int = 0
    n_species: int = 0

    def summary(self) -> str:
        split = ", ".join(f"{s} {self.counts.get(s, 0)}" for s in SPLITS)
        lines = [
            f"prepared {self.n_kept} of {self.n_rows} rows into {self.out}: {split} "
            f"({self.n_families} families, {self.n_species} species)"
        ]
        if self.problems:
            entries = sum(1 for p in self.problems if p.row is None)
            refused = f", {entries} zip entries refused" if entries else ""
            lines.append(
                f"{self.n_bad} bad rows excluded{refused} ({_problem_kinds(self.problems)}); "
                f"see {self.out / 'report.csv'}"
            )
        return "\n".join(lines)


@dataclass
class _Row:
    row: int
    values: dict[str, str]
    path: str = ""  # normalised file_path
    task: tuple[str, str, str] | None = None  # what a worker reads: (kind, path, member)
    sha256: str = ""
    slot: int = -1  # position in the temporary decode cache


# ---------------------------------------------------------------------------------------------
# prepare


def prepare(
    source: Path,
    out: Path,
    *,
    image_size: int = 224,
    split_by: str = "image",
    fractions: tuple[float, float, float] = (0.72, 0.18, 0.10),
    seed: int = 0,
    workers: int = 1,
) -> PrepareReport:
    """Validate SOURCE, decode every usable image once, split, and write `out` atomically.

    Everything is written into a temporary folder beside `out` and renamed into place at the
    end, so a crash or an error (e.g. nothing usable) leaves the previous prepared data intact.

    Split rules (deterministic for `seed`; each family is split on its own, seeded by the
    seed and the family name, so adding a family does not reshuffle the others):

    - `split_by="image"`: every family is stratified exactly, with at least one image in each
      split that has a non-zero fraction; a family with fewer usable images than that (3 by
      default) cannot be evaluated and is excluded and reported.
    - `split_by="species"`: all images of one species (`eol_page_id`) stay in one split, so
      val/test measure families of species never seen in training. A family needs at least
      one species per split (3 by default); most real families hold one or two species, and
      keeping those in train only would put classes in the model that val/test never score,
      so they are excluded and reported, as are rows whose species is listed under two
      families.
    """
    source, out = Path(source), Path(out)
    fractions = _check_args(image_size, split_by, fractions, workers)
    _check_paths(source, out)
    src = _open_source(source)
    try:
        rows, malformed = _read_metadata(src)
        problems: list[Problem] = list(malformed)
        candidates = _check_rows(rows, src, split_by, problems)
        problems.extend(src.unreferenced_entries())
        n_rows = len(rows) + len(malformed)
        staging = _make_staging(out)
        try:
            options = _Options(image_size, split_by, fractions, seed, workers)
            report = _build(staging, source, out, candidates, problems, n_rows, options)
            _swap_into_place(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        src.close()
    return report


@dataclass(frozen=True)
class _Options:
    image_size: int
    split_by: str
    fractions: tuple[float, float, float]
    seed: int
    workers: int


def _build(
    staging: Path,
    source: Path,
    out: Path,
    candidates: list[_Row],
    problems: list[Problem],
    n_rows: int,
    options: _Options,
) -> PrepareReport:
    """Decode, split and write every output file into `staging`."""
    image_size, split_by, fractions = options.image_size, options.split_by, options.fractions
    seed, workers = options.seed, options.workers
    decoded = staging / "decoded.tmp.npy"
    kept = _decode_all(candidates, decoded, image_size, workers, problems)
    kept = _drop_small_families(kept, split_by, fractions, problems)
    _check_usable(source, kept, problems, n_rows)

    classes = sorted({r.values["family"] for r in kept})
    label_of = {name: i for i, name in enumerate(classes)}
    labels = np.array([label_of[r.values["family"]] for r in kept], dtype=np.int64)
    if split_by == "image":
        splits = _split_by_image(kept, fractions, seed)
    else:
        splits = _split_by_species(kept, fractions, seed)

    _write_manifest(staging / "manifest.csv", kept, labels, splits)
    _write_images(decoded, staging / "images.npy", [r.slot for r in kept], image_size)
    _write_report(staging / "report.csv", problems)
    train = labels[np.asarray(splits) == "train"]
    weights = compute_class_weight("balanced", classes=np.arange(len(classes)), y=train)
    counts = {s: int(sum(1 for x in splits if x == s)) for s in SPLITS}
    n_species = len({r.values["eol_page_id"] for r in kept if r.values["eol_page_id"]})
    n_bad = len({p.row for p in problems if p.row is not None})
    info = {
        "format": FORMAT,
        "source": source.resolve().name,
        "image_size": image_size,
        "split_by": split_by,
        "fractions": list(fractions),
        "seed": seed,
        "classes": classes,
        "phyla": [_phylum_of(kept, c) for c in classes],
        "class_weights": [float(w) for w in weights],
        "counts": {
            **counts,
            "families": len(classes),
            "species": n_species,
            "bad_rows": n_bad,
            "rows": n_rows,
        },
        "data_hash": _hash_files(staging / "manifest.csv", staging / "images.npy"),
    }
    (staging / "prepared.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return PrepareReport(
        n_rows=n_rows,
        n_kept=len(kept),
        n_bad=n_bad,
        problems=_sorted(problems),
        counts=counts,
        out=out,
        n_families=len(classes),
        n_species=n_species,
    )


def _check_args(
    image_size: int, split_by: str, fractions: Sequence[float], workers: int
) -> tuple[float, float, float]:
    if image_size < 8:
        raise ConfigError(f"image_size must be at least 8, got {image_size}")
    if split_by not in ("image", "species"):
        raise ConfigError(f"split_by must be 'image' or 'species', got {split_by!r}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or min(fr) < 0 or fr[0] <= 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(
            f"fractions must be three non-negative numbers (train, val, test) summing to 1 "
            f"with train > 0, got {tuple(fractions)}"
        )
    return fr[0], fr[1], fr[2]


def _check_paths(source: Path, out: Path) -> None:
    """SOURCE is read-only and `out` is replaced whole: neither may contain the other."""
    if not source.exists():
        raise DataError(
            f"SOURCE {source} does not exist: pass rare_species.zip or the folder it extracts to"
        )
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise DataError(
            f"output {out} and SOURCE {source} overlap: prepared data must live outside the "
            "raw data (which is never modified); choose another output folder"
        )
    _check_replaceable(out)


def _check_replaceable(out: Path) -> None:
    """Only an empty folder or earlier prepared data may be replaced: `out` is deleted whole,
    and a mistyped `--out .` must not take a home directory with it."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder: remove it or choose another")
    names = {p.name for p in out.iterdir()}
    if names and not names & {"prepared.json", "manifest.csv", "report.csv"}:
        raise DataError(
            f"output {out} exists and does not hold prepared data; refusing to replace it: "
            "remove it or choose another output folder"
        )


def _check_usable(source: Path, kept: list[_Row], problems: list[Problem], n_rows: int) -> None:
    families = sorted({r.values["family"] for r in kept})
    kinds = _problem_kinds(problems)
    if not kept:
        raise NoUsableData(
            f"nothing usable in {source.name}: all {n_rows} rows are excluded ({kinds}); "
            "fix the data and run prepare again",
            _sorted(problems),
        )
    if len(families) < 2:
        raise NoUsableData(
            f"only one family ({families[0]}) is usable in {source.name} "
            f"({kinds or 'no bad rows'}); a classifier needs at least 2",
            _sorted(problems),
        )


# ---------------------------------------------------------------------------------------------
# sources: a zip read in place, or a folder


class _Source:
    """Where metadata.csv and the images live; `locate` turns a row's path into a read task."""

    name: str

    def metadata(self) -> bytes:
        raise NotImplementedError

    def locate(self, rel: str) -> tuple[tuple[str, str, str] | None, str]:
        raise NotImplementedError

    def unreferenced_entries(self) -> list[Problem]:
        return []

    def close(self) -> None:
        pass


class _ZipSource(_Source):
    """Members are read in place (never extracted); unsafe ones are refused up front."""

    def __init__(self, path: Path) -> None:
        self.name = path.name
        self.path = path
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{path} is not a readable zip file ({exc}): re-download it") from exc
        self.members: dict[str, zipfile.ZipInfo] = {}
        self.refused: dict[str, str] = {}
        self.used: set[str] = set()
        files = [i for i in self.zf.infolist() if not i.is_dir()]
        bad = {i.filename: reason for i in files if (reason := _member_problem(i))}
        self.prefix = self._find_metadata(files, bad)
        for info in files:
            name = info.filename
            if name in bad:
                self.refused[name] = bad[name]
            elif name.startswith(self.prefix):
                self.members[name[len(self.prefix) :]] = info

    def _find_metadata(self, files: list[zipfile.ZipInfo], bad: dict[str, str]) -> str:
        hits = [
            i.filename
            for i in files
            if PurePosixPath(i.filename).name == "metadata.csv"
            and i.filename.count("/") <= 1
            and not i.filename.startswith("__MACOSX/")
        ]
        if "metadata.csv" in hits:
            hits = ["metadata.csv"]
        if not hits:
            raise DataError(
                f"no metadata.csv in {self.name} (looked at the top and one folder down): "
                "is this rare_species.zip?"
            )
        if len(hits) > 1:
            raise DataError(f"several metadata.csv in {self.name} ({', '.join(sorted(hits))})")
        if hits[0] in bad:
            raise DataError(f"metadata.csv in {self.name} is refused: {bad[hits[0]]}")
        self.meta_name = hits[0]
        return hits[0][: -len("metadata.csv")]

    def metadata(self) -> bytes:
        try:
            return self.zf.read(self.meta_name)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
            raise DataError(f"metadata.csv in {self.name} cannot be read ({exc})") from exc

    def locate(self, rel: str) -> tuple[tuple[str, str, str] | None, str]:
        full = self.prefix + rel
        if full in self.refused:
            self.used.add(full)
            return None, self.refused[full]
        info = self.members.get(rel)
        if info is None:
            return None, "missing file"
        return ("zip", str(self.path), info.filename), ""

    def unreferenced_entries(self) -> list[Problem]:
        return [
            Problem(None, name, reason)
            for name, reason in sorted(self.refused.items())
            if name not in self.used
        ]

    def close(self) -> None:
        self.zf.close()


def _member_problem(info: zipfile.ZipInfo) -> str:
    """Why a zip member must not be read, or "" if it is fine."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "unsafe zip member: symlink"
    parts = info.filename.replace("\\", "/").split("/")
    if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        return "unsafe zip member: path escapes the archive folder"
    if info.flag_bits & 0x1:
        return "unsafe zip member: encrypted"
    if info.file_size > MAX_MEMBER_BYTES:
        return f"unsafe zip member: {info.file_size} bytes uncompressed (limit {MAX_MEMBER_BYTES})"
    if info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        ratio = info.file_size // max(info.compress_size, 1)
        return f"unsafe zip member: compression ratio {ratio} (limit {MAX_COMPRESSION_RATIO})"
    return ""


class _DirSource(_Source):
    def __init__(self, path: Path) -> None:
        self.name = path.name
        if (path / "metadata.csv").is_file():
            self.root = path
        else:
            hits = sorted(p.parent for p in path.glob("*/metadata.csv") if p.is_file())
            if not hits:
                raise DataError(
                    f"no metadata.csv in {path} or one folder down: "
                    "pass rare_species.zip or the folder it extracts to"
                )
            if len(hits) > 1:
                raise DataError(f"several metadata.csv in {path}: {', '.join(map(str, hits))}")
            self.root = hits[0]
        self.real_root = self.root.resolve()

    def metadata(self) -> bytes:
        try:
            return (self.root / "metadata.csv").read_bytes()
        except OSError as exc:
            raise DataError(f"metadata.csv in {self.root} cannot be read ({exc})") from exc

    def locate(self, rel: str) -> tuple[tuple[str, str, str] | None, str]:
        path = self.root / rel
        try:
            inside = path.resolve().is_relative_to(self.real_root)
        except (OSError, RuntimeError):  # symlink loops
            inside = False
        if not inside:
            return None, "unsafe file_path: resolves outside the data folder; not read"
        if not path.is_file():
            return None, "missing file"
        return ("dir", str(path), ""), ""


def _open_source(source: Path) -> _Source:
    if source.is_dir():
        return _DirSource(source)
    return _ZipSource(source)


# ---------------------------------------------------------------------------------------------
# metadata and per-row checks


def _read_metadata(src: _Source) -> tuple[list[_Row], list[Problem]]:
    """Parse metadata.csv with the csv module, so `row` is the file's data-line number and a
    malformed line is one bad row instead of a parse failure for the whole file."""
    try:
        text = src.metadata().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"metadata.csv in {src.name} is not UTF-8 text ({exc.reason})") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[_Row] = []
    malformed: list[Problem] = []
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        if not any(header):
            raise DataError(f"metadata.csv in {src.name} is empty: re-download the data set")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataError(
                f"metadata.csv in {src.name} lacks required column(s) {', '.join(missing)}; "
                f"it needs {', '.join(REQUIRED_COLUMNS)}"
            )
        where = {c: header.index(c) for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in header}
        for record in reader:
            if not record or (len(record) == 1 and not record[0].strip()):
                continue
            row = reader.line_num - 1
            if len(record) != len(header):
                path = record[where["file_path"]] if len(record) > where["file_path"] else ""
                malformed.append(
                    Problem(
                        row,
                        path.strip(),
                        f"malformed row: {len(record)} fields, header has {len(header)}",
                    )
                )
                continue
            values = {c: record[i].strip() for c, i in where.items()}
            for c in OPTIONAL_COLUMNS:
                values.setdefault(c, "")
            rows.append(_Row(row, values))
    except csv.Error as exc:
        raise DataError(
            f"metadata.csv in {src.name} cannot be parsed at line {reader.line_num} ({exc})"
        ) from exc
    if not rows and not malformed:
        raise DataError(f"metadata.csv in {src.name} has no data rows")
    return rows, malformed


def _normalise(path: str) -> str | None:
    """A row's file_path as a clean relative POSIX path, or None if it could escape the data
    folder (absolute, drive letter, `..`): such a path is refused before anything is read."""
    p = path.replace("\\", "/")
    parts = [x for x in p.split("/") if x not in ("", ".")]
    if p.startswith("/") or not parts or ".." in parts or ":" in parts[0]:
        return None
    return "/".join(parts)


def _check_rows(
    rows: list[_Row], src: _Source, split_by: str, problems: list[Problem]
) -> list[_Row]:
    """Checks that need no decoding; each bad row gets exactly one (the first) problem."""
    seen_path: dict[str, int] = {}
    ok: list[_Row] = []
    for r in rows:
        v = r.values
        fp = v["file_path"]
        problem = ""
        norm = _normalise(fp) if fp else None
        if not v["family"]:
            problem = "empty family"
        elif not fp:
            problem = "empty file_path"
        elif norm is None:
            problem = "unsafe file_path (absolute or '..'); not read"
        elif norm in seen_path:
            problem = f"duplicate file_path (same as row {seen_path[norm]})"
        elif split_by == "species" and not v["eol_page_id"]:
            problem = "empty eol_page_id (split_by=species needs it)"
        else:
            seen_path[norm] = r.row
            r.path = norm
            r.task, problem = src.locate(norm)
        if problem:
            problems.append(Problem(r.row, fp, problem))
        else:
            ok.append(r)
    if split_by == "species":
        ok = _drop_species_conflicts(ok, problems)
    return ok


def _drop_species_conflicts(rows: list[_Row], problems: list[Problem]) -> list[_Row]:
    families: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        families[r.values["eol_page_id"]].add(r.values["family"])
    kept = []
    for r in rows:
        fams = families[r.values["eol_page_id"]]
        if len(fams) > 1:
            listed = ", ".join(sorted(fams))
            msg = f"eol_page_id {r.values['eol_page_id']} is listed under several families"
            problems.append(Problem(r.row, r.values["file_path"], f"{msg} ({listed})"))
        else:
            kept.append(r)
    return kept


# ---------------------------------------------------------------------------------------------
# decoding

_OPEN_ZIPS: dict[str, zipfile.ZipFile] = {}


def _read_task(task: tuple[str, str, str], size: int) -> tuple[str, np.ndarray | None, str]:
    """Read one file, hash its bytes, decode it: (sha256, image or None, problem). Runs in pool
    workers, so it only takes picklable arguments and keeps one zip handle per process."""
    kind, path, member = task
    try:
        if kind == "zip":
            zf = _OPEN_ZIPS.get(path)
            if zf is None:
                zf = _OPEN_ZIPS[path] = zipfile.ZipFile(path)
            data = zf.read(member)
        else:
            data = Path(path).read_bytes()
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError, RuntimeError) as exc:
        return "", None, f"unreadable file ({str(exc)[:80]})"
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        return sha, None, "empty file"
    try:
        return sha, decode_image(io.BytesIO(data), size), ""
    except ImageDecodeError as exc:
        return sha, None, exc.reason


def _close_zips() -> None:
    while _OPEN_ZIPS:
        _OPEN_ZIPS.popitem()[1].close()


def _results(
    tasks: list[tuple[str, str, str]], size: int, workers: int
) -> Iterator[tuple[str, np.ndarray | None, str]]:
    """Results in task order. Worker processes are spawned, not forked: the CLI may have
    imported a deep-learning backend whose threads make forking unsafe. An executor rather
    than multiprocessing.Pool, because a worker that dies raises BrokenProcessPool here
    instead of being respawned forever."""
    job = partial(_read_task, size=size)
    if workers <= 1 or len(tasks) < 2:
        try:
            yield from map(job, tasks)
        finally:
            _close_zips()
        return
    chunk = max(1, min(16, len(tasks) // (workers * 4)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(job, tasks, chunksize=chunk)


def _decode_all(
    candidates: list[_Row],
    decoded: Path,
    size: int,
    workers: int,
    problems: list[Problem],
) -> list[_Row]:
    """Decode candidates into a temporary cache (slot = candidate position); the first copy of
    identical bytes wins, later copies are reported as duplicates."""
    if not candidates:
        return []
    cache = np.lib.format.open_memmap(
        decoded, mode="w+", dtype=np.uint8, shape=(len(candidates), size, size, 3)
    )
    first_with: dict[str, int] = {}
    kept: list[_Row] = []
    bar = Progress(len(candidates), "decoding images")
    tasks = [r.task for r in candidates if r.task is not None]
    assert len(tasks) == len(candidates)
    for slot, (r, (sha, image, problem)) in enumerate(
        zip(candidates, _results(tasks, size, workers), strict=True)
    ):
        bar.update()
        r.sha256 = sha
        if sha and sha in first_with:
            problem = f"duplicate image (same bytes as row {first_with[sha]})"
        elif sha:
            first_with[sha] = r.row
        if problem or image is None:
            problems.append(Problem(r.row, r.values["file_path"], problem or "unreadable"))
            continue
        cache[slot] = image
        r.slot = slot
        kept.append(r)
    cache.flush()
    del cache
    return kept


def _drop_small_families(
    rows: list[_Row],
    split_by: str,
    fractions: tuple[float, float, float],
    problems: list[Problem],
) -> list[_Row]:
    """A family must be able to put something in every split with a non-zero fraction."""
    need = sum(1 for f in fractions if f > 0)
    by_family: dict[str, list[_Row]] = defaultdict(list)
    for r in rows:
        by_family[r.values["family"]].append(r)
    small: dict[str, str] = {}
    for fam, members in by_family.items():
        if split_by == "species":
            n = len({r.values["eol_page_id"] for r in members})
            if n < need:
                small[fam] = (
                    f"family has {n} species; split_by=species needs at least {need} "
                    "(one per split)"
                )
        elif len(members) < need:
            small[fam] = (
                f"family has {len(members)} usable images; needs at least {need} (one per split)"
            )
    for r in rows:
        if r.values["family"] in small:
            problems.append(Problem(r.row, r.values["file_path"], small[r.values["family"]]))
    return [r for r in rows if r.values["family"] not in small]


# ---------------------------------------------------------------------------------------------
# splitting


def _family_rng(seed: int, family: str) -> np.random.Generator:
    key = int.from_bytes(hashlib.sha256(family.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, key])


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split n items by largest remainder, with at least one item in every non-zero split."""
    ideal = [n * f for f in fractions]
    floor = [1 if f > 0 else 0 for f in fractions]
    counts = [max(math.floor(x), m) for x, m in zip(ideal, floor, strict=True)]
    while sum(counts) > n:
        spare = [i for i in range(len(counts)) if counts[i] > floor[i]]
        counts[max(spare, key=lambda i: (counts[i] - ideal[i], i))] -= 1
    while sum(counts) < n:
        counts[max(range(len(counts)), key=lambda i: (ideal[i] - counts[i], -i))] += 1
    return counts


def _split_by_image(
    rows: list[_Row], fractions: tuple[float, float, float], seed: int
) -> list[str]:
    """Exact per-family stratification. sklearn's StratifiedShuffleSplit rounds over all
    families at once and may leave an 8-image family out of test; this cannot."""
    splits = [""] * len(rows)
    by_family: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_family[r.values["family"]].append(i)
    for fam in sorted(by_family):
        members = by_family[fam]
        order = _family_rng(seed, fam).permutation(len(members))
        counts = _allocate(len(members), fractions)
        bounds = np.cumsum(counts)
        for pos, j in enumerate(order):
            splits[members[j]] = SPLITS[int(np.searchsorted(bounds, pos, side="right"))]
    return splits


def _split_by_species(
    rows: list[_Row], fractions: tuple[float, float, float], seed: int
) -> list[str]:
    """Whole species per split, per family: one (random) species to each non-zero split,
    smallest split first, then each remaining species to the split furthest below its share
    of the family's images. Group splitters (StratifiedGroupKFold, GroupShuffleSplit) cannot
    promise every family a species in every split with 3-10 species a family; this can."""
    by_family: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, r in enumerate(rows):
        by_family[r.values["family"]][r.values["eol_page_id"]].append(i)
    open_splits = sorted((i for i, f in enumerate(fractions) if f > 0), key=lambda i: fractions[i])
    splits = [""] * len(rows)
    for fam in sorted(by_family):
        species = by_family[fam]
        names = sorted(species)
        order = [names[j] for j in _family_rng(seed, fam).permutation(len(names))]
        total = sum(len(v) for v in species.values())
        have = [0] * len(fractions)
        for k, name in enumerate(order):
            if k < len(open_splits):
                target = open_splits[k]
            else:
                target = max(open_splits, key=lambda i: (total * fractions[i] - have[i], -i))
            have[target] += len(species[name])
            for i in species[name]:
                splits[i] = SPLITS[target]
    return splits


# ---------------------------------------------------------------------------------------------
# writing


def _write_manifest(path: Path, rows: list[_Row], labels: np.ndarray, splits: list[str]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(MANIFEST_COLUMNS)
        for i, (r, label, split) in enumerate(zip(rows, labels, splits, strict=True)):
            v = r.values
            w.writerow(
                [
                    i,
                    r.row,
                    v["rare_species_id"],
                    v["eol_content_id"],
                    v["eol_page_id"],
                    v["phylum"],
                    v["family"],
                    v["file_path"],
                    int(label),
                    split,
                    r.sha256,
                ]
            )


def _write_images(decoded: Path, target: Path, slots: list[int], size: int) -> None:
    """Compact the decode cache to the kept images; a rename when nothing was dropped."""
    src = np.load(decoded, mmap_mode="r")
    if slots == list(range(len(src))):
        del src
        os.replace(decoded, target)
        return
    dst = np.lib.format.open_memmap(
        target, mode="w+", dtype=np.uint8, shape=(len(slots), size, size, 3)
    )
    for start in range(0, len(slots), _COPY_CHUNK):
        part = slots[start : start + _COPY_CHUNK]
        dst[start : start + len(part)] = src[part]
    dst.flush()
    del dst, src
    decoded.unlink()


def _write_report(path: Path, problems: list[Problem]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(REPORT_COLUMNS)
        for p in _sorted(problems):
            w.writerow(["" if p.row is None else p.row, p.file_path, p.problem])


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.tmp-{socket.gethostname()}-"


def _make_staging(out: Path) -> Path:
    """A fresh folder beside `out` (same file system, so the final rename is atomic), after
    removing staging folders that crashed runs on this host left behind (their pid is gone)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = _staging_prefix(out)
    for stale in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = stale.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{prefix}{os.getpid()}-"))
    staging.chmod(0o755)  # mkdtemp makes it private; workers may run as another user
    return staging


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_into_place(staging: Path, out: Path) -> None:
    """Old out renamed away, new one renamed in, old deleted: at every instant `out` is either
    the complete old or the complete new data (or briefly absent), never a mixture."""
    with FileLock(str(out.parent / f".{out.name}.lock")):
        _check_replaceable(out)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        try:
            os.rename(staging, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _hash_files(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _phylum_of(rows: list[_Row], family: str) -> str:
    votes = Counter(r.values["phylum"] for r in rows if r.values["family"] == family)
    votes.pop("", None)
    return votes.most_common(1)[0][0] if votes else ""


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.row is None, p.row or 0, p.file_path))


def _problem_kinds(problems: list[Problem]) -> str:
    """'missing file 3, truncated JPEG 1': the part of each problem before any detail."""
    kinds = Counter(p.problem.split(" (")[0].split(":")[0] for p in problems)
    return ", ".join(f"{k} {n}" for k, n in kinds.most_common())


# ---------------------------------------------------------------------------------------------
# the read side


@dataclass
class PreparedData:
    """A loaded view of `data/prepared`: the manifest in memory, the images memory-mapped."""

    root: Path
    manifest: pd.DataFrame
    info: dict[str, Any]
    _images: np.ndarray | None = field(default=None, repr=False)

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def phyla(self) -> list[str]:
        return list(self.info["phyla"])

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def class_weights(self) -> dict[int, float]:
        """Balanced weights in Keras' `class_weight` form."""
        return {i: float(w) for i, w in enumerate(self.info["class_weights"])}

    @property
    def data_hash(self) -> str:
        return str(self.info["data_hash"])

    def images(self) -> np.ndarray:
        """All images, memory-mapped read-only: workers share the page cache, not copies."""
        if self._images is None:
            self._images = np.load(self.root / "images.npy", mmap_mode="r")
        return self._images

    def indices(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        mask = (self.manifest["split"] == split).to_numpy()
        return self.manifest["index"].to_numpy(dtype=np.int64)[mask]

    def labels(self, split: str) -> np.ndarray:
        return self.manifest["label"].to_numpy(dtype=np.int64)[self.indices(split)]

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images, int labels) of one split, copied into memory."""
        idx = self.indices(split)
        return np.asarray(self.images()[idx]), self.labels(split)

    def verify(self) -> None:
        """Recompute data_hash (reads every byte): catches a cache changed after prepare."""
        actual = _hash_files(self.root / "manifest.csv", self.root / "images.npy")
        if actual != self.data_hash:
            raise DataError(
                f"prepared data at {self.root} does not match its data_hash: "
                "run `search prepare SOURCE` again"
            )


def load_prepared(root: Path) -> PreparedData:
    """Open prepared data, checking that its three files agree with each other."""
    root = Path(root)
    again = "run `search prepare SOURCE` first"
    needed = [root / n for n in ("prepared.json", "manifest.csv", "images.npy")]
    if not all(p.is_file() for p in needed):
        raise DataError(f"no prepared data at {root}: {again}")
    try:
        info = json.loads((root / "prepared.json").read_text(encoding="utf-8"))
        text_cols = [c for c in MANIFEST_COLUMNS if c not in ("index", "row", "label")]
        manifest = pd.read_csv(
            root / "manifest.csv",
            dtype={c: str for c in text_cols},
            keep_default_na=False,
        )
        images = np.load(root / "images.npy", mmap_mode="r")
        shape, dtype = images.shape, images.dtype
        del images
    except (OSError, ValueError, json.JSONDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"prepared data at {root} is malformed ({exc}): {again}") from exc
    problem = _inconsistency(info, manifest, tuple(shape), np.dtype(dtype))
    if problem:
        raise DataError(f"prepared data at {root} is malformed ({problem}): {again}")
    return PreparedData(root=root, manifest=manifest, info=info)


def _inconsistency(
    info: Any, manifest: pd.DataFrame, shape: tuple[int, ...], dtype: np.dtype
) -> str:
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        return f"prepared.json is not format {FORMAT}"
    for key in ("classes", "phyla", "class_weights", "image_size", "data_hash"):
        if key not in info:
            return f"prepared.json lacks {key}"
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        return f"manifest.csv lacks {', '.join(missing)}"
    n, s, c = len(manifest), info["image_size"], len(info["classes"])
    if dtype != np.uint8 or shape != (n, s, s, 3):
        return f"images.npy is {dtype} {shape}, expected uint8 {(n, s, s, 3)}"
    if not manifest["index"].astype("int64").equals(pd.Series(range(n), dtype="int64")):
        return "manifest index is not 0..N-1"
    labels = manifest["label"]
    if n and (labels.min() < 0 or labels.max() >= c):
        return "labels outside the class list"
    if not manifest["split"].isin(SPLITS).all():
        return "unknown split names in manifest"
    if len(info["phyla"]) != c or len(info["class_weights"]) != c:
        return "phyla/class_weights do not match classes"
    return ""
