"""The reports at the real data set's size: 202 families in 5 phyla, ~1,200 test photos.

Predictions are made up (no training) but shaped like real ones: most errors go to a look-alike
family of the same phylum, so some pairs are confused often and many only once. Families, phyla
and image counts come from search/families.csv, the real set's list that ships in the package.
"""

from __future__ import annotations

import base64
import csv
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import search
from search.evaluate import HeldOutSplit, compare, evaluate, with_version
from search.reports import (
    CARD_FAMILIES,
    CELL_PX,
    CONFUSION_PAGE,
    CONFUSION_PAIRS,
    GALLERY_PAGE,
    GALLERY_PAIRS,
    INDEX_PAGE,
    MAX_GALLERY_IMAGES,
    OTHER_ERROR_IMAGES,
    PER_FAMILY_FILE,
    PER_PAIR_IMAGES,
    THUMBNAIL_PX,
    confusion_figure,
    model_card,
    thumbnail,
    write_evaluation,
)
from tests.conftest import HEAD

FAMILIES_CSV = Path(search.__file__).parent / "families.csv"
TEST_SHARE = 0.10
TRAIN_SHARE = 0.72


def real_families(phyla: tuple[str, ...] = (), per_phylum: int = 0) -> list[dict[str, str]]:
    """Rows of families.csv (all 202 by default), or the first `per_phylum` of each of `phyla`."""
    with open(FAMILIES_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if phyla:
        rows = [r for p in phyla for r in [r for r in rows if r["phylum"] == p][:per_phylum]]
    return sorted(rows, key=lambda r: r["family"])  # class order of `search prepare`


def synthetic_split(rows: list[dict[str, str]], image_px: int, seed: int = 0) -> HeldOutSplit:
    """A test split with the real families' proportions: 10% of each family's photos (>= 1)."""
    rng = np.random.default_rng(seed)
    n_images = np.array([int(r["n_images"]) for r in rows])
    test = np.maximum(1, np.round(n_images * TEST_SHARE)).astype(np.int64)
    labels = np.repeat(np.arange(len(rows)), test)
    return HeldOutSplit(
        images=photos(len(labels), image_px, rng),
        labels=labels,
        paths=[f"{rows[c]['phylum']}/{rows[c]['family']}/{i}.jpg" for i, c in enumerate(labels)],
        classes=[r["family"] for r in rows],
        phyla=[r["phylum"] for r in rows],
        train_counts=np.round(n_images * TRAIN_SHARE).astype(np.int64),
        data_hash="5ca1e" * 8,
    )


def photos(n: int, px: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour fields plus sensor-like noise: JPEG sizes near those of real photos."""
    coarse = rng.integers(0, 256, size=(n, 6, 6, 3), dtype=np.uint8)
    out = np.empty((n, px, px, 3), dtype=np.uint8)
    for i in range(n):
        smooth = np.asarray(Image.fromarray(coarse[i]).resize((px, px), Image.BILINEAR))
        noisy = smooth.astype(np.int16) + rng.normal(0, 10, size=smooth.shape).astype(np.int16)
        out[i] = np.clip(noisy, 0, 255)
    return out


def confused_probs(split: HeldOutSplit, seed: int = 0, skill: float = 2.6) -> np.ndarray:
    """Softmax scores where each family has a look-alike in its phylum that takes many errors."""
    rng = np.random.default_rng(seed)
    k, n = len(split.classes), len(split.labels)
    look_alike = np.arange(k)
    for phylum in sorted(set(split.phyla)):
        members = [c for c in range(k) if split.phyla[c] == phylum]
        look_alike[members] = np.roll(members, 1)
    logits = rng.normal(0.0, 1.0, size=(n, k))
    logits[np.arange(n), split.labels] += skill
    logits[np.arange(n), look_alike[split.labels]] += skill * 0.8
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def html_table_rows(page: str, marker: str) -> list[list[str]]:
    """Cell texts of each body row of the first table after `marker` in a report page."""
    table = page[page.index(marker) :]
    body = table[table.index("<tbody>") : table.index("</table>")]
    return [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in body.split("<tr>")[1:]]


@pytest.fixture(scope="module")
def thirty() -> tuple[HeldOutSplit, np.ndarray, dict[str, Any]]:
    """30 families, 10 from each of three phyla, whose alphabetical order mixes the phyla."""
    split = synthetic_split(real_families(("cnidaria", "arthropoda", "chordata"), 10), 16)
    probs = confused_probs(split, skill=2.0)
    return split, probs, evaluate(probs, split)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[HeldOutSplit, dict[str, Any], Path]:
    """All 202 families and ~1,200 test photos, hundreds misclassified, every file written by
    the real `write_evaluation` (as `search evaluate` and promotion do)."""
    split = synthetic_split(real_families(), 24)
    probs = confused_probs(split)
    evaluation = evaluate(probs, split)
    older = evaluate(np.roll(probs, 1, axis=0), split)
    evaluation = with_version("v-202", evaluation, compare(evaluation, older, "v-old"))
    folder = tmp_path_factory.mktemp("reports-202")
    write_evaluation(folder, evaluation, split, probs, "v-202")
    return split, evaluation, folder


def test_confusion_axes_group_families_by_phylum(thirty) -> None:
    split, _, evaluation = thirty
    phylum_of = dict(zip(split.classes, split.phyla, strict=True))
    assert split.phyla != sorted(split.phyla)  # the class order alone would mix the phyla
    fig = confusion_figure(evaluation)
    heat = fig.data[0]
    names = list(fig.layout.yaxis.ticktext)
    assert names == list(fig.layout.xaxis.ticktext) and sorted(names) == sorted(split.classes)
    assert names == sorted(names, key=lambda f: (phylum_of[f], f))  # phylum, then family
    # Hover names the phylum of both families; the ticks stay plain family names.
    assert list(heat.y) == list(heat.x) == [f"{f} ({phylum_of[f]})" for f in names]
    # One line each way between neighbouring phyla, at the boundary between their blocks.
    boundaries = sorted({s.x0 for s in fig.layout.shapes if s.x0 == s.x1})
    assert boundaries == [9.5, 19.5] and len(fig.layout.shapes) == 4
    assert {a.text for a in fig.layout.annotations} == {
        f"<b>{p}</b>" for p in ("arthropoda", "chordata", "cnidaria")
    }
    # The cells moved with their labels: counts, row shares and recall on the diagonal.
    counts = np.asarray(evaluation["confusion_matrix"]["counts"])
    at = [split.classes.index(f) for f in names]
    assert np.array_equal(np.asarray(heat.customdata), counts[np.ix_(at, at)])
    recall = {r["family"]: r["recall"] for r in evaluation["per_family"]}
    share = np.asarray(heat.z, dtype=np.float64)
    assert np.allclose(share.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.diag(share), [recall[f] for f in names], atol=1e-6)
    assert heat.texttemplate == "%{text}"  # 30 families: counts written in the cells


def test_confusion_page_at_202_families_stays_light(full) -> None:
    split, evaluation, folder = full
    page = (folder / "reports" / CONFUSION_PAGE).read_text()
    assert len(page.encode()) < 600_000  # about 0.3 MB (plotly 7: typed arrays)
    assert '"texttemplate"' not in page  # no 40,804 cell labels
    fig = confusion_figure(evaluation)
    assert len(fig.layout.yaxis.ticktext) == len(fig.layout.yaxis.tickvals) == 202
    assert fig.layout.height >= 202 * CELL_PX and fig.layout.width >= 202 * CELL_PX
    assert len(fig.layout.shapes) == 2 * (5 - 1)  # lines between the five phyla
    pairs = html_table_rows(page, "Most confused family pairs")
    assert len(pairs) == CONFUSION_PAIRS
    phylum_of = dict(zip(split.classes, split.phyla, strict=True))
    assert all(phylum_of[r[0]] == r[1] and phylum_of[r[2]] == r[3] for r in pairs)
    assert [int(r[4]) for r in pairs] == sorted((int(r[4]) for r in pairs), reverse=True)


def test_error_gallery_is_capped_and_says_what_it_leaves_out(full) -> None:
    split, evaluation, folder = full
    page = (folder / "reports" / GALLERY_PAGE).read_text()
    counts = np.asarray(evaluation["confusion_matrix"]["counts"])
    n_wrong = int(counts.sum() - np.trace(counts))
    assert n_wrong > 2 * MAX_GALLERY_IMAGES  # hundreds of errors, as at the real size
    cards = page.count("<figure>")
    assert 0 < cards <= MAX_GALLERY_IMAGES and page.count("base64,") == cards
    shown, left = map(int, re.search(r"(\d+) shown; (\d+) misclassified", page).groups())
    assert shown == cards and shown + left == n_wrong
    sections = page.split("<h2>")[1:]
    assert len(sections) == GALLERY_PAIRS + 1  # the pairs, then the other errors
    assert all(s.count("<figure>") <= PER_PAIR_IMAGES for s in sections[:-1])
    assert sections[-1].startswith("Other misclassified test images")
    assert sections[-1].count("<figure>") <= OTHER_ERROR_IMAGES
    assert len(page.encode()) < 1_000_000


def test_thumbnails_are_small_jpegs() -> None:
    photo = photos(1, 224, np.random.default_rng(1))[0]
    text = thumbnail(photo)
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    assert image.format == "JPEG" and max(image.size) == THUMBNAIL_PX
    assert len(text) < 8_000  # ~2.7 kB of base64 for a noisy 224 px photo


def test_all_families_in_index_and_csv_while_the_card_stays_short(full) -> None:
    split, evaluation, folder = full
    index = (folder / "reports" / INDEX_PAGE).read_text()
    rows = html_table_rows(index, 'id="all-families"')
    assert sorted(r[0] for r in rows) == sorted(split.classes)
    assert [float(r[4]) for r in rows] == sorted(float(r[4]) for r in rows)  # worst F1 first
    with open(folder / PER_FAMILY_FILE, newline="") as handle:
        assert [r["family"] for r in csv.DictReader(handle)] == split.classes

    card = model_card(card_info(split), evaluation, {"states": {"COMPLETE": 40}}, {})
    lines = card.splitlines()
    assert len(lines) < 130
    families = [line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ")]
    named = [f for f in families if f in split.classes]
    ranked = sorted(evaluation["per_family"], key=lambda r: (r["f1"], -r["support"], r["family"]))
    assert named[:CARD_FAMILIES] == [r["family"] for r in ranked[:CARD_FAMILIES]]
    best = sorted(ranked, key=lambda r: (-r["f1"], -r["support"], r["family"]))
    assert named[CARD_FAMILIES:] == [r["family"] for r in best[:CARD_FAMILIES]]
    phyla = [f for f in families if f in split.phyla]
    assert phyla == [r["phylum"] for r in evaluation["per_phylum"]] and len(phyla) == 5
    assert "All 202 families: `per_family.csv`" in card


def card_info(split: HeldOutSplit) -> dict[str, Any]:
    """champion.json as promotion writes it, for a model of `split`'s families."""
    return {
        "version": "v-202",
        "study": "rare-species",
        "trial": 41,
        "promoted_at": "2026-01-01T00:00:00Z",
        "promoted_by": "someone@host",
        "backbone": HEAD["backbone"],
        "weights": "imagenet",
        "image_size": split.images.shape[1],
        "classes": split.classes,
        "phyla": split.phyla,
        "data_hash": split.data_hash,
        "split_by": "image",
        "params": HEAD,
        "seed": 0,
        "validation": {"macro_f1": 0.5},
    }
