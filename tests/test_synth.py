"""The synthetic data set: real layout, real families and imbalance, learnable but not trivial."""

from __future__ import annotations

import csv
import io
import multiprocessing
import re
import signal
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from data_helpers import read_csv
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from search.errors import ConfigError
from search.images import decode_image
from search.synth import (
    METADATA_COLUMNS,
    REAL_TOTAL,
    _draw_shots,
    _images,
    _real_counts,
    generate,
    load_families,
)
from search.synth_photos import body_plans, species_look

NAME = re.compile(
    r"^(?P<phylum>[a-z]+)_(?P<family>[a-z]+)/(?P<c>\d+)_(?P<p>\d+)_eol-full-size-copy\.jpg$"
)


def test_zip_has_the_real_layout(tmp_path: Path) -> None:
    path = generate(
        tmp_path / "rare_species.zip", n_families=6, total_images=100, image_px=48, as_zip=True
    )
    assert path == tmp_path / "rare_species.zip"
    real = {f.family: f for f in load_families()}
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        assert all(n.startswith("rare_species/") for n in names)
        text = zf.read("rare_species/metadata.csv").decode()
        rows = list(csv.DictReader(io.StringIO(text)))
        assert text.splitlines()[0] == ",".join(METADATA_COLUMNS)
        sizes = set()
        for r in rows:
            m = NAME.match(r["file_path"])
            assert m, r["file_path"]
            assert (m["phylum"], m["family"]) == (r["phylum"], r["family"])
            assert (m["c"], m["p"]) == (r["eol_content_id"], r["eol_page_id"])
            assert r["kingdom"] == "animalia" and real[r["family"]].phylum == r["phylum"]
            assert uuid.UUID(r["rare_species_id"]).version == 4
            img = Image.open(io.BytesIO(zf.read(f"rare_species/{r['file_path']}")))
            assert img.format == "JPEG"
            sizes.add(img.size)
    assert len({r["rare_species_id"] for r in rows}) == len(rows)
    assert len({r["eol_content_id"] for r in rows}) == len(rows)
    assert len({r["family"] for r in rows}) == 6
    assert all(43 <= s <= 53 for wh in sizes for s in wh)
    assert any(w != h for w, h in sizes) and len(sizes) > 10
    # a species (eol_page_id) belongs to one family
    fam_of: dict[str, set[str]] = {}
    for r in rows:
        fam_of.setdefault(r["eol_page_id"], set()).add(r["family"])
    assert all(len(f) == 1 for f in fam_of.values())


@pytest.mark.parametrize("style", ["coats", "photos"])
def test_same_seed_same_bytes(tmp_path: Path, style: str) -> None:
    kw = {"n_families": 3, "total_images": 30, "image_px": 32, "as_zip": True, "style": style}
    a = generate(tmp_path / "a.zip", seed=1, **kw).read_bytes()
    b = generate(tmp_path / "b.zip", seed=1, **kw).read_bytes()
    c = generate(tmp_path / "c.zip", seed=2, **kw).read_bytes()
    assert a == b and a != c


def test_counts_follow_the_real_imbalance(tmp_path: Path) -> None:
    folder = generate(tmp_path / "d", n_families=12, total_images=240, image_px=16, seed=3)
    rows = read_csv(folder / "metadata.csv")
    real = {f.family: f for f in load_families()}
    per_family: dict[str, list[str]] = {}
    for r in rows:
        per_family.setdefault(r["family"], []).append(r["eol_page_id"])
        assert (folder / r["file_path"]).is_file()
    counts = {f: len(v) for f, v in per_family.items()}
    assert len(counts) == 12 and min(counts.values()) >= 8
    assert 240 <= len(rows) <= 240 + 12 * 8
    assert max(counts.values()) >= 3 * min(counts.values())  # real imbalance survives scaling
    for fam, pages in per_family.items():
        species = {p: pages.count(p) for p in set(pages)}
        assert len(species) == max(1, min(real[fam].n_species, counts[fam] // 2))
        assert min(species.values()) >= 2 or len(species) == 1
    for a in counts:  # scaling keeps the order of the real counts
        for b in counts:
            if real[a].n_images < real[b].n_images:
                assert counts[a] <= counts[b]


def test_images_per_family_range(tmp_path: Path) -> None:
    folder = generate(tmp_path / "d", n_families=5, images_per_family=(10, 20), image_px=16)
    counts: dict[str, int] = {}
    for r in read_csv(folder / "metadata.csv"):
        counts[r["family"]] = counts.get(r["family"], 0) + 1
    assert min(counts.values()) == 10 and max(counts.values()) == 20


def test_refuses_to_overwrite_and_bad_arguments(tmp_path: Path) -> None:
    target = tmp_path / "rare_species.zip"
    target.write_bytes(b"the user's real download")
    with pytest.raises(ConfigError, match="already exists"):
        generate(target, as_zip=True)
    assert target.read_bytes() == b"the user's real download"
    with pytest.raises(ConfigError, match="n_families"):
        generate(tmp_path / "x", n_families=500)
    with pytest.raises(ConfigError, match="unknown style 'cartoon'"):
        generate(tmp_path / "x", style="cartoon")
    assert not (tmp_path / "x").exists()


def test_photos_style_families_are_shapes_and_species_are_colours(tmp_path: Path) -> None:
    """In the photos style every family has its own body plan; its species share it and differ
    in coat; the images have the real layout like the coats style's."""
    plans = body_plans(40, np.random.default_rng(0))
    assert len({(p.legs, p.tail, p.head, p.extra, p.aspect) for p in plans}) == 40
    a_plan, a_coat = species_look(plans[0], seed=0, fam=0, sp=0)
    b_plan, b_coat = species_look(plans[0], seed=0, fam=0, sp=1)
    parts = ("legs", "tail", "head", "extra")
    assert all(getattr(a_plan, k) == getattr(b_plan, k) == getattr(plans[0], k) for k in parts)
    assert a_coat != b_coat
    folder = generate(tmp_path / "d", n_families=4, total_images=40, image_px=64, style="photos")
    rows = read_csv(folder / "metadata.csv")
    assert len({r["family"] for r in rows}) == 4 and len(rows) >= 40
    for r in rows:
        assert NAME.match(r["file_path"])
        with Image.open(folder / r["file_path"]) as img:
            assert img.format == "JPEG" and all(57 <= s <= 71 for s in img.size)


def test_learnable_but_not_trivial(tmp_path: Path) -> None:
    """A weak model (linear on raw pixels) beats chance, a better one (linear on colour and
    orientation-frequency features) beats it clearly, and neither is perfect."""
    folder = generate(tmp_path / "d", n_families=8, total_images=400, image_px=48, seed=0)
    rows = read_csv(folder / "metadata.csv")
    x = np.stack([decode_image(folder / r["file_path"], 32) for r in rows]).astype(np.float32)
    y = np.unique([r["family"] for r in rows], return_inverse=True)[1]
    raw = x[:, ::2, ::2].reshape(len(x), -1) / 255.0
    hsv = np.stack([np.asarray(Image.fromarray(a.astype(np.uint8)).convert("HSV")) for a in x])
    hist = np.stack(
        [
            np.histogramdd(h.reshape(-1, 3), bins=(12, 2, 2), range=((0, 256),) * 3)[0].ravel()
            for h in hsv.astype(np.float64)
        ]
    ) / (32 * 32)
    gray = x.mean(-1) - x.mean((1, 2, 3))[:, None, None]
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(gray), axes=(1, 2)))[:, 8:24, 8:24]
    better = np.hstack([hist, np.log1p(spectrum).reshape(len(x), -1)])
    train, test = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=0)
    scores = []
    for features in (raw, better):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=0.05))
        model.fit(features[train], y[train])
        scores.append(balanced_accuracy_score(y[test], model.predict(features[test])))
    weak, strong = scores
    chance = 1 / 8
    assert 2 * chance < weak < strong - 0.15
    assert 4 * chance < strong < 0.97


# --- full size: the real shape, the real spread of sizes, camera-roll variety ---------------


def _labels_csv(path: Path, families: dict[str, tuple[str, list[int]]]) -> Path:
    """A labels CSV of the rare_species_labels.csv form: family -> (phylum, images per species)."""
    lines = ["eol_content_id,eol_page_id,kingdom,phylum,family,file_path"]
    content, page = 100, 5000
    for fam, (phylum, species) in families.items():
        for n in species:
            page += 7
            for _ in range(n):
                content += 3
                name = f"{phylum}_{fam}/{content}_{page}_eol-full-size-copy.jpg"
                lines.append(f"{content},{page},animalia,{phylum},{fam},{name}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _zip_rows(path: Path) -> tuple[list[dict[str, str]], dict[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        rows = list(csv.DictReader(io.StringIO(zf.read("rare_species/metadata.csv").decode())))
        files = {n.removeprefix("rare_species/"): zf.read(n) for n in zf.namelist() if n[-1] != "/"}
    return rows, files


def test_real_shape_from_labels_has_exactly_its_rows(tmp_path: Path) -> None:
    spec = {"apidae": ("arthropoda", [3, 2]), "boidae": ("chordata", [4]), "oculinidae": (
        "cnidaria", [2, 2, 3])}  # fmt: skip
    labels = _labels_csv(tmp_path / "labels.csv", spec)
    out = generate(tmp_path / "r.zip", labels=labels, as_zip=True, image_px=24, style="photos")
    rows, files = _zip_rows(out)
    want = read_csv(labels)
    assert [{c: r[c] for c in METADATA_COLUMNS[1:]} for r in rows] == want
    assert len({r["rare_species_id"] for r in rows}) == len(rows)
    assert set(files) == {"metadata.csv"} | {r["file_path"] for r in want}
    per_species: dict[tuple[str, str], int] = {}
    for r in rows:
        per_species[(r["family"], r["eol_page_id"])] = (
            per_species.get((r["family"], r["eol_page_id"]), 0) + 1
        )
    assert sorted(per_species.values()) == sorted(n for _, s in spec.values() for n in s)


def test_real_shape_is_every_family_topped_up_to_the_real_total() -> None:
    table = load_families()
    counts = _real_counts(table)
    assert len(table) == 202 and sum(f.n_species for f in table) == 400
    assert {f.phylum for f in table} == {
        "chordata", "arthropoda", "cnidaria", "mollusca", "echinodermata"}  # fmt: skip
    assert sum(counts) == REAL_TOTAL == 11_983
    for f, n in zip(table, counts, strict=True):
        assert f.n_images <= n <= 30 * f.n_species
    assert min(counts) >= 23 and max(counts) == 300 and sorted(counts)[101] == 30  # median


def test_real_shape_refuses_family_counts_and_bad_labels(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="drop the number of families"):
        generate(tmp_path / "x", real_shape=True, n_families=3)
    bad = tmp_path / "bad.csv"
    bad.write_text("eol_content_id,eol_page_id,kingdom,phylum,family,file_path\n"
                   "1,2,animalia,chordata,boidae,../../etc/x.jpg\n")  # fmt: skip
    with pytest.raises(ConfigError, match="line 2: file_path '../../etc/x.jpg' is not"):
        generate(tmp_path / "x", labels=bad)
    bad.write_text("family,file_path\nboidae,chordata_boidae/1_2.jpg\n")
    with pytest.raises(ConfigError, match="lacks column"):
        generate(tmp_path / "x", labels=bad)
    with pytest.raises(ConfigError, match="need the photos style"):
        generate(tmp_path / "x", sizes="real")
    assert not (tmp_path / "x").exists()


def test_real_sizes_spread_extremes_and_variety() -> None:
    shots = _draw_shots(11_983, seed=0)
    longs = np.array([max(s.width, s.height) for s in shots])
    shorts = np.array([min(s.width, s.height) for s in shots])
    assert longs.min() == 297 and longs.max() == 8688 and shorts.min() == 160
    assert 560 <= np.percentile(longs, 10) <= 720 and 1550 <= np.median(longs) <= 1870
    assert 3600 <= np.percentile(longs, 90) <= 4350
    assert any(s.height > s.width for s in shots) and any(s.width > s.height for s in shots)
    modes = [s.mode for s in shots]
    assert 60 <= modes.count("L") <= 180 and 30 <= modes.count("CMYK") <= 90
    assert 150 <= sum(s.orientation != 1 for s in shots) <= 350


def _slow_paint(task: tuple[int, int, int, None]) -> bytes:
    time.sleep(0.05)
    return b"jpeg"


@pytest.mark.timeout(60)
def test_a_pool_stopped_midway_ends_even_under_a_parent_that_ignores_sigterm() -> None:
    """A worker run in-process once left its SIGTERM handler in the test process; the forked
    pool children inherited it, ignored `terminate()`, and generate() hung for 10 minutes."""
    rows = [{"_family": 0, "_species": 0, "_image": i, "file_path": f"{i}.jpg"} for i in range(40)]
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        images = _images(rows, _slow_paint, workers=2, progress=False)
        assert next(images) == ("0.jpg", b"jpeg")
        images.close()  # as when writing fails: the pool is terminated with work still queued
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert multiprocessing.active_children() == []


def test_real_sizes_files_decode_upright_and_same_bytes_with_a_pool(tmp_path: Path) -> None:
    labels = _labels_csv(tmp_path / "labels.csv", {"boidae": ("chordata", [6, 6])})
    kw = {"labels": labels, "as_zip": True, "style": "photos", "sizes": "real", "seed": 4}
    one = generate(tmp_path / "a.zip", workers=1, **kw)
    two = generate(tmp_path / "b.zip", workers=2, **kw)
    assert one.read_bytes() == two.read_bytes()
    rows, files = _zip_rows(one)
    shots = _draw_shots(len(rows), seed=4)
    seen = set()
    for r, shot in zip(rows, shots, strict=True):
        with Image.open(io.BytesIO(files[r["file_path"]])) as img:
            assert img.format == "JPEG" and img.mode == shot.mode
            turn = img.getexif().get(0x0112, 1)
            assert turn == shot.orientation
            upright = img.size if turn == 3 or turn == 1 else img.size[::-1]
            assert upright == (shot.width, shot.height)
            seen.add(img.mode if turn == 1 else "exif")
        assert decode_image(io.BytesIO(files[r["file_path"]]), 32).shape == (32, 32, 3)
    assert seen == {"RGB", "L", "CMYK", "exif"}
    assert {max(s.width, s.height) for s in shots} >= {297, 8688}
