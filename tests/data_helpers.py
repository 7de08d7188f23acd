"""Real files for the data tests: JPEGs in awkward modes, EXIF-rotated photos, and a copy of a
generated rare_species.zip with every kind of bad row and hostile member added."""

from __future__ import annotations

import csv
import hashlib
import io
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from search.synth import generate

RED = (255, 0, 0)
BLUE = (0, 0, 255)
TOP = "rare_species"


def encode(img: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def red_left_blue_right(w: int = 80, h: int = 60) -> Image.Image:
    img = Image.new("RGB", (w, h), BLUE)
    img.paste(RED, (0, 0, w // 2, h))
    return img


def exif_rotated_jpeg(orientation: int) -> bytes:
    """A JPEG whose stored pixels are turned, with the EXIF tag that turns them back to
    red-left/blue-right (6: display = stored turned 90 degrees clockwise; 8: anticlockwise)."""
    shown = red_left_blue_right()
    turn = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(shown.transpose(turn), quality=95, exif=exif.tobytes())


def is_red_left_blue_right(a: np.ndarray) -> bool:
    """Left quarter clearly red and right quarter clearly blue (JPEG noise tolerated)."""
    w = a.shape[1]
    left = a[:, : w // 4].reshape(-1, 3).mean(0)
    right = a[:, -(w // 4) :].reshape(-1, 3).mean(0)
    return bool(left[0] > 200 > left[2] + 150 and right[2] > 200 > right[0] + 150)


def tree_digest(path: Path) -> str:
    """Hash of a file, or of every path and file content under a folder."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@dataclass
class BadZip:
    """A generated zip plus the rows added to it: file_path -> expected problem text, and the
    file_paths of odd-but-valid images that must be kept."""

    path: Path
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file_path, problem start)
    kept: list[str] = field(default_factory=list)
    entries: dict[str, str] = field(default_factory=dict)  # member name -> problem (no row)
    n_rows: int = 0


def build_bad_zip(tmp: Path, seed: int = 0) -> BadZip:
    """A real generated data set (4 families) zipped like rare_species.zip, with added rows for
    every problem `prepare` must report and every odd image it must convert."""
    base = generate(tmp / "base", n_families=4, total_images=80, image_px=48, seed=seed)
    rows = read_csv(base / "metadata.csv")
    columns = list(rows[0])
    first = rows[0]
    folder = first["file_path"].split("/")[0]
    template = {k: first[k] for k in columns}
    real_jpeg = (base / first["file_path"]).read_bytes()
    out = BadZip(tmp / "rare_species.zip")

    members: dict[str, bytes] = {}
    extra_rows: list[dict[str, str]] = []

    def add(
        name: str, data: bytes | None, expect: str | None, *, family: str | None = None
    ) -> None:
        path = f"{folder}/{name}" if "/" not in name else name
        if data is not None:
            members[path] = data
        fam = template["family"] if family is None else family
        extra_rows.append({**template, "file_path": path, "family": fam})
        if expect is None:
            out.kept.append(path)
        else:
            out.bad.append((path, expect))

    add("missing_1_eol-full-size-copy.jpg", None, "missing file")
    add("trunc_1_eol-full-size-copy.jpg", real_jpeg[: len(real_jpeg) // 2], "truncated JPEG")
    add("text_1_eol-full-size-copy.jpg", b"this is a text file, not a photo\n", "not an image")
    add("empty_1_eol-full-size-copy.jpg", b"", "empty file")
    add("dup_1_eol-full-size-copy.jpg", real_jpeg, "duplicate image (same bytes as row 1)")
    add(
        "nofam_1_eol-full-size-copy.jpg",
        encode(Image.new("RGB", (40, 40))),
        "empty family",
        family="",
    )
    bomb = b"\0" * (2 * 2**20)
    add("bomb_1_eol-full-size-copy.jpg", bomb, "unsafe zip member: compression ratio")
    extra_rows.append({**template, "file_path": first["file_path"]})
    out.bad.append((first["file_path"], "duplicate file_path (same as row 1)"))
    extra_rows.append({**template, "file_path": "../evil.jpg"})
    out.bad.append(("../evil.jpg", "unsafe file_path"))
    out.entries["../evil.jpg"] = "unsafe zip member: path escapes"
    add("link_1_eol-full-size-copy.jpg", None, "unsafe zip member: symlink")

    add(
        "cmyk_1_eol-full-size-copy.jpg", encode(Image.new("CMYK", (50, 40), (0, 255, 255, 0))), None
    )
    add("gray_1_eol-full-size-copy.jpg", encode(Image.new("L", (40, 50), 77)), None)
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    add("palette_1_eol-full-size-copy.jpg", encode(palette, "PNG"), None)
    add("rot6_1_eol-full-size-copy.jpg", exif_rotated_jpeg(6), None)
    add("rot8_1_eol-full-size-copy.jpg", exif_rotated_jpeg(8), None)

    all_rows = rows + extra_rows
    out.n_rows = len(all_rows)
    meta = io.StringIO()
    writer = csv.DictWriter(meta, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(all_rows)

    with zipfile.ZipFile(out.path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{TOP}/metadata.csv", meta.getvalue())
        for p in sorted(base.rglob("*.jpg")):
            zf.writestr(f"{TOP}/{p.relative_to(base).as_posix()}", p.read_bytes())
        for name, data in members.items():
            zf.writestr(f"{TOP}/{name}", data)
        evil = zipfile.ZipInfo("../evil.jpg")
        zf.writestr(evil, real_jpeg)
        link = zipfile.ZipInfo(f"{TOP}/{folder}/link_1_eol-full-size-copy.jpg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "../../../../etc/passwd")
    return out
