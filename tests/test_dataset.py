"""prepare / load_prepared on real generated zips and folders, with every kind of bad row."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
from big_images import BIG, claimed_size_jpeg, flat_jpeg
from data_helpers import (
    RED,
    BadZip,
    build_bad_zip,
    encode,
    is_red_left_blue_right,
    read_csv,
    tree_digest,
)
from PIL import Image

from search.dataset import (
    MANIFEST_COLUMNS,
    SPLITS,
    NoUsableData,
    PrepareReport,
    _allocate,
    load_prepared,
    prepare,
)
from search.errors import ConfigError, DataError
from search.synth import generate
from tests.conftest import run_cli

SIZE = 24
FRACTIONS = (0.72, 0.18, 0.10)


@pytest.fixture(scope="module")
def synth_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 real families, ~400 images, 4 families with 3+ species."""
    root = tmp_path_factory.mktemp("synth")
    return generate(
        root / "rare_species.zip", n_families=16, total_images=400, image_px=40, seed=2, as_zip=True
    )


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> tuple[BadZip, PrepareReport, str, str]:
    root = tmp_path_factory.mktemp("bad")
    bz = build_bad_zip(root)
    before = tree_digest(bz.path)
    report = prepare(bz.path, root / "out" / "prepared", image_size=SIZE)
    return bz, report, before, tree_digest(bz.path)


def _prepared_by_path(out: Path) -> tuple[dict[str, dict[str, str]], np.ndarray]:
    manifest = read_csv(out / "manifest.csv")
    return {m["file_path"]: m for m in manifest}, np.load(out / "images.npy")


# --- validation ----------------------------------------------------------------------------


def test_every_bad_row_is_reported_with_row_and_reason(bad) -> None:
    bz, report, _, _ = bad
    rows = read_csv(report.out / "report.csv")
    with_row = [r for r in rows if r["row"]]
    for path, expect in bz.bad:
        hits = [r for r in with_row if r["file_path"] == path and r["problem"].startswith(expect)]
        assert len(hits) == 1, (path, expect, with_row)
    assert len(with_row) == len(bz.bad) == report.n_bad
    entries = {r["file_path"]: r["problem"] for r in rows if not r["row"]}
    assert entries.keys() == bz.entries.keys()
    for name, expect in bz.entries.items():
        assert entries[name].startswith(expect)


def test_good_and_odd_images_are_kept_and_converted(bad) -> None:
    bz, report, _, _ = bad
    by_path, images = _prepared_by_path(report.out)
    assert report.n_kept == len(by_path) == len(images)
    assert report.n_kept + report.n_bad == report.n_rows == bz.n_rows
    assert set(bz.kept) <= by_path.keys()
    bad_rows = {int(r["row"]) for r in read_csv(report.out / "report.csv") if r["row"]}
    kept_rows = {int(m["row"]) for m in by_path.values()}
    assert not bad_rows & kept_rows and bad_rows | kept_rows == set(range(1, bz.n_rows + 1))

    def image(name: str) -> np.ndarray:
        (path,) = [p for p in bz.kept if p.endswith(name)]
        return images[int(by_path[path]["index"])]

    gray = image("gray_1_eol-full-size-copy.jpg").reshape(-1, 3)
    assert (gray == gray[:, :1]).all() and abs(int(gray.mean()) - 77) <= 2
    np.testing.assert_allclose(image("cmyk_1_eol-full-size-copy.jpg").mean((0, 1)), RED, atol=4)
    np.testing.assert_array_equal(image("palette_1_eol-full-size-copy.jpg")[5, 5], [10, 200, 30])
    assert is_red_left_blue_right(image("rot6_1_eol-full-size-copy.jpg"))
    assert is_red_left_blue_right(image("rot8_1_eol-full-size-copy.jpg"))


def test_source_is_untouched_and_nothing_escapes(bad) -> None:
    bz, report, before, after = bad
    assert before == after
    for folder in (bz.path.parent, report.out.parent, report.out, Path.cwd()):
        assert not (folder / "evil.jpg").exists()
    assert {p.name for p in report.out.iterdir()} == {
        "manifest.csv",
        "images.npy",
        "prepared.json",
        "report.csv",
    }


def test_report_summary(bad) -> None:
    _, report, _, _ = bad
    text = report.summary()
    assert f"prepared {report.n_kept} of {report.n_rows} rows" in text
    assert f"{report.n_bad} bad rows" in text and "report.csv" in text
    assert "truncated JPEG 1" in text
    assert any(p.row is None for p in report.problems)


def test_missing_required_column_names_it(tmp_path: Path) -> None:
    zpath = tmp_path / "rare_species.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr(
            "rare_species/metadata.csv", "eol_content_id,eol_page_id,file_path\n1,2,a.jpg\n"
        )
    with pytest.raises(DataError, match="lacks required column.*family"):
        prepare(zpath, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_config_errors(synth_zip: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fractions"):
        prepare(synth_zip, tmp_path / "out", fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="split_by"):
        prepare(synth_zip, tmp_path / "out", split_by="genus")
    assert not (tmp_path / "out").exists()


def test_no_metadata_is_an_error(tmp_path: Path) -> None:
    zpath = tmp_path / "other.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("a/b/metadata.csv", "family\n")  # two levels down: not looked at
    with pytest.raises(DataError, match="no metadata.csv"):
        prepare(zpath, tmp_path / "out")
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "missing.zip", tmp_path / "out")


def test_root_level_metadata_and_malformed_rows(tmp_path: Path) -> None:
    base = generate(tmp_path / "base", n_families=3, total_images=30, image_px=32, seed=1)
    text = (base / "metadata.csv").read_text()
    lines = text.splitlines()
    lines.insert(3, "")  # a blank line is skipped but still counted in row numbers
    lines.append(lines[1] + ",extra")
    zpath = tmp_path / "flat.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("metadata.csv", "\n".join(lines) + "\n")
        for p in base.rglob("*.jpg"):
            zf.writestr(p.relative_to(base).as_posix(), p.read_bytes())
    report = prepare(zpath, tmp_path / "out", image_size=SIZE)
    (problem,) = read_csv(tmp_path / "out" / "report.csv")
    assert problem["problem"] == "malformed row: 8 fields, header has 7"
    assert int(problem["row"]) == len(lines) - 1
    rows = [int(m["row"]) for m in read_csv(tmp_path / "out" / "manifest.csv")]
    assert 3 not in rows and rows[:3] == [1, 2, 4]
    assert report.n_kept == len(lines) - 3


# --- splitting -----------------------------------------------------------------------------


def test_split_is_deterministic_and_stratified(synth_zip: Path, tmp_path: Path) -> None:
    a = prepare(synth_zip, tmp_path / "a", image_size=SIZE, seed=7)
    b = prepare(synth_zip, tmp_path / "b", image_size=SIZE, seed=7, workers=2)
    assert (a.out / "manifest.csv").read_bytes() == (b.out / "manifest.csv").read_bytes()
    info_a = json.loads((a.out / "prepared.json").read_text())
    info_b = json.loads((b.out / "prepared.json").read_text())
    assert info_a == info_b

    data = load_prepared(a.out)
    m = data.manifest
    per_family = m.groupby(["family", "split"]).size().unstack(fill_value=0)
    assert sorted(per_family.columns) == sorted(SPLITS)
    assert (per_family > 0).all().all(), per_family
    shares = m["split"].value_counts(normalize=True)
    for split, target in zip(SPLITS, FRACTIONS, strict=True):
        assert abs(shares[split] - target) < 0.04, shares
    assert info_a["counts"] == {
        **a.counts,
        "families": 16,
        "species": m["eol_page_id"].nunique(),
        "bad_rows": 0,
        "rows": len(m),
    }

    c = prepare(synth_zip, tmp_path / "c", image_size=SIZE, seed=8)
    other = load_prepared(c.out).manifest
    assert (other["file_path"] == m["file_path"]).all()
    assert (other["split"] != m["split"]).any()
    assert c.counts == a.counts  # same allocation, different images in it


def test_species_split_keeps_each_species_in_one_split(synth_zip: Path, tmp_path: Path) -> None:
    report = prepare(synth_zip, tmp_path / "sp", image_size=SIZE, split_by="species")
    m = load_prepared(report.out).manifest
    assert (m.groupby("eol_page_id")["split"].nunique() == 1).all()
    assert (m.groupby("family")["eol_page_id"].nunique() >= 3).all()
    assert (m.groupby("family")["split"].nunique() == 3).all()
    excluded = {p.problem for p in report.problems}
    assert excluded and all("split_by=species needs at least 3" in p for p in excluded)
    assert report.n_kept + report.n_bad == report.n_rows
    assert json.loads((report.out / "prepared.json").read_text())["split_by"] == "species"


def test_allocation_puts_something_in_every_split() -> None:
    for n in range(3, 200):
        counts = _allocate(n, FRACTIONS)
        assert sum(counts) == n and min(counts) >= 1
        slack = 1.0 if n >= 10 else 1.5  # below 10, "one in each split" outranks the fractions
        assert all(abs(c - n * f) <= slack for c, f in zip(counts, FRACTIONS, strict=True)), n
    assert _allocate(5, (0.8, 0.2, 0.0)) == [4, 1, 0]


def test_families_too_small_to_split_are_excluded(tmp_path: Path) -> None:
    base = generate(tmp_path / "base", n_families=3, total_images=30, image_px=32, seed=4)
    rows = read_csv(base / "metadata.csv")
    fam = rows[0]["family"]
    keep = [r for r in rows if r["family"] != fam] + [r for r in rows if r["family"] == fam][:2]
    with (base / "metadata.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(keep)
    report = prepare(base, tmp_path / "out", image_size=SIZE)
    assert [p.problem for p in report.problems] == [
        "family has 2 usable images; needs at least 3 (one per split)"
    ] * 2
    assert fam not in load_prepared(report.out).classes


def test_largest_real_photo_is_kept_and_a_hostile_size_is_reported(tmp_path: Path) -> None:
    """`search prepare` (two decoding processes) keeps an 8,688 px photo without a
    decompression-bomb warning, and refuses a JPEG whose header claims 50,000 x 50,000 px
    with one report.csv row, every other row kept."""
    base = generate(tmp_path / "base", n_families=3, total_images=30, image_px=32, seed=5)
    rows = read_csv(base / "metadata.csv")
    folder = rows[0]["file_path"].split("/")[0]
    big, hostile = (
        f"{folder}/big_1_eol-full-size-copy.jpg",
        f"{folder}/huge_1_eol-full-size-copy.jpg",
    )
    extra = [{**rows[0], "file_path": big}, {**rows[1], "file_path": hostile}]
    meta = io.StringIO()
    writer = csv.DictWriter(meta, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows + extra)
    zpath = tmp_path / "rare_species.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("rare_species/metadata.csv", meta.getvalue())
        for r in rows:
            zf.write(base / r["file_path"], f"rare_species/{r['file_path']}")
        # Stored, as photo zips usually are: deflate shrinks a flat-colour JPEG 600:1, which the
        # zip-bomb guard (100:1) would rightly refuse; real photos barely compress.
        zf.writestr(f"rare_species/{big}", flat_jpeg(BIG), zipfile.ZIP_STORED)
        zf.writestr(f"rare_species/{hostile}", claimed_size_jpeg(50_000, 50_000))
    out = tmp_path / "prepared"

    run = run_cli(["prepare", str(zpath), "--out", str(out), "--image-size", str(SIZE),
                   "--workers", "2"], dict(os.environ), tmp_path)  # fmt: skip

    assert run.returncode == 0, run.stderr
    assert "DecompressionBomb" not in run.stdout + run.stderr
    assert read_csv(out / "report.csv") == [
        {
            "row": str(len(rows) + 2),
            "file_path": hostile,
            "problem": "image too large (2,500 megapixels, decompression-bomb guard)",
        }
    ]
    by_path, images = _prepared_by_path(out)
    assert set(by_path) == {r["file_path"] for r in rows} | {big}
    np.testing.assert_allclose(
        images[int(by_path[big]["index"])].mean((0, 1)), (90, 140, 60), atol=3
    )


# --- sources and output ------------------------------------------------------------------


def test_folder_source_matches_zip_source(tmp_path: Path) -> None:
    kw = {"n_families": 4, "total_images": 60, "image_px": 32, "seed": 9}
    zpath = generate(tmp_path / "rare_species.zip", as_zip=True, **kw)
    folder = generate(tmp_path / "rare_species", **kw)
    before = tree_digest(folder)
    z = load_prepared(prepare(zpath, tmp_path / "pz", image_size=SIZE).out)
    f = load_prepared(prepare(folder, tmp_path / "pf", image_size=SIZE).out)
    assert tree_digest(folder) == before
    assert z.data_hash == f.data_hash
    assert z.manifest.equals(f.manifest)
    assert (z.info["source"], f.info["source"]) == ("rare_species.zip", "rare_species")
    # the folder the zip extracts to (metadata.csv one level down) works too
    with zipfile.ZipFile(zpath) as zf:
        zf.extractall(tmp_path / "extracted")
    e = load_prepared(prepare(tmp_path / "extracted", tmp_path / "pe", image_size=SIZE).out)
    assert e.data_hash == z.data_hash


def test_folder_source_refuses_paths_outside_it(tmp_path: Path) -> None:
    base = generate(tmp_path / "src", n_families=3, total_images=30, image_px=32, seed=1)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(encode(Image.new("RGB", (30, 30), (9, 9, 9))))
    rows = read_csv(base / "metadata.csv")
    folder = rows[0]["file_path"].split("/")[0]
    os.symlink(outside, base / folder / "link.jpg")
    paths = [f"{folder}/link.jpg", "../outside.jpg", str(outside)]
    extra = [{**rows[0], "file_path": p} for p in paths]
    with (base / "metadata.csv").open("a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n").writerows(extra)
    before = tree_digest(base)
    report = prepare(base, tmp_path / "out", image_size=SIZE)
    assert tree_digest(base) == before
    problems = {p.file_path: p.problem for p in report.problems}
    assert problems[f"{folder}/link.jpg"].startswith("unsafe file_path: resolves outside")
    assert problems["../outside.jpg"].startswith("unsafe file_path")
    assert problems[str(outside)].startswith("unsafe file_path")
    with pytest.raises(DataError, match="overlap"):
        prepare(base, base / "prepared")


def test_failed_prepare_leaves_previous_output_untouched(synth_zip: Path, tmp_path: Path) -> None:
    out = tmp_path / "data" / "prepared"
    prepare(synth_zip, out, image_size=SIZE)
    before = tree_digest(out)
    hopeless = tmp_path / "hopeless.zip"
    with zipfile.ZipFile(hopeless, "w") as zf:
        zf.writestr(
            "rare_species/metadata.csv",
            "eol_page_id,family,file_path\n1,a,x/1.jpg\n2,b,x/2.jpg\n3,c,x/3.jpg\n",
        )
        zf.writestr("rare_species/x/2.jpg", b"not a jpeg")
    with pytest.raises(NoUsableData, match="nothing usable") as info:
        prepare(hopeless, out, image_size=SIZE)
    assert [p.problem for p in info.value.problems] == [
        "missing file",
        "not an image",
        "missing file",
    ]
    assert tree_digest(out) == before
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")) == [
        "prepared"
    ]


def test_prepare_replaces_existing_output_whole(synth_zip: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare(synth_zip, out, image_size=SIZE)
    (out / "stale.txt").write_text("from an older run")
    report = prepare(synth_zip, out, image_size=16, seed=3)
    assert not (out / "stale.txt").exists()
    data = load_prepared(out)
    assert data.image_size == 16 and data.images().shape[1:] == (16, 16, 3)
    assert report.out == out
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["prepared"]


def test_refuses_to_replace_a_folder_that_is_not_prepared_data(
    synth_zip: Path, tmp_path: Path
) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="refusing to replace"):
        prepare(synth_zip, precious, image_size=SIZE)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_crashed_staging_folders_are_cleaned_up(synth_zip: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    report = prepare(synth_zip, out, image_size=SIZE)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    leftover = tmp_path / f".prepared.tmp-{socket.gethostname()}-{dead}-abcd"
    leftover.mkdir()
    prepare(synth_zip, out, image_size=SIZE)
    assert not leftover.exists()
    assert load_prepared(report.out).data_hash


# --- the read side -------------------------------------------------------------------------


def test_loaded_view(synth_zip: Path, tmp_path: Path) -> None:
    prepare(synth_zip, tmp_path / "p", image_size=SIZE)
    data = load_prepared(tmp_path / "p")
    assert list(data.manifest.columns) == list(MANIFEST_COLUMNS)
    assert data.classes == sorted(data.classes) and len(data.phyla) == len(data.classes)
    assert set(data.phyla) <= {"chordata", "arthropoda", "cnidaria", "mollusca", "echinodermata"}
    images = data.images()
    assert isinstance(images, np.memmap) and not images.flags.writeable
    x, y = data.arrays("train")
    assert type(x) is np.ndarray and x.dtype == np.uint8 and x.shape[1:] == (SIZE, SIZE, 3)
    idx = data.indices("train")
    np.testing.assert_array_equal(x, images[idx])
    np.testing.assert_array_equal(y, data.manifest["label"].to_numpy()[idx])
    assert sum(len(data.indices(s)) for s in SPLITS) == len(images)
    counts = np.bincount(y, minlength=len(data.classes))
    expected = {i: len(y) / (len(data.classes) * c) for i, c in enumerate(counts)}
    assert data.class_weights == pytest.approx(expected)
    assert data.manifest["eol_page_id"].map(type).eq(str).all()  # ids stay text
    data.verify()
    with pytest.raises(DataError, match="unknown split"):
        data.indices("holdout")


def test_load_prepared_errors(synth_zip: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no prepared data at .*search prepare SOURCE"):
        load_prepared(tmp_path / "nothing")
    prepare(synth_zip, tmp_path / "p", image_size=SIZE)
    manifest = tmp_path / "p" / "manifest.csv"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:-1]))
    with pytest.raises(DataError, match="malformed"):
        load_prepared(tmp_path / "p")
    manifest.write_text("".join(lines))
    data = load_prepared(tmp_path / "p")
    with (tmp_path / "p" / "images.npy").open("r+b") as fh:
        fh.seek(-1, io.SEEK_END)
        last = fh.read(1)[0]
        fh.seek(-1, io.SEEK_END)
        fh.write(bytes([last ^ 1]))
    with pytest.raises(DataError, match="data_hash"):
        data.verify()
