"""The report pages open in a real headless browser, offline, without JavaScript errors.

Chromium (Debian: `apt-get install -y chromium`) loads each page from file:// with every network
request sent to a dead proxy, so a page that needed the internet (a CDN copy of plotly.js) would
come up empty. The DOM after scripts ran must hold plotly's rendered SVG; the console log must
hold no error. Screenshots of the confusion matrix and the error gallery are kept in
benchmarks/results/ for people to look at.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search.dataset import load_prepared
from search.evaluate import HeldOutSplit, compare, evaluate, with_version
from search.reports import CONFUSION_PAGE, GALLERY_PAGE, INDEX_PAGE, PLOTLY_JS, write_evaluation
from tests.conftest import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless browser check needs chromium: apt-get install -y chromium (.ci/run does)",
)
SCREENSHOTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    """Reports of made-up but realistic predictions on the real test split: some families
    confused with others, compared with a worse previous model."""
    split = HeldOutSplit.of(load_prepared(prepared_dir))
    rng = np.random.default_rng(0)
    n, k = len(split.labels), len(split.classes)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), split.labels] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    worse = np.roll(probs, 1, axis=1) * 0.5 + probs * 0.5
    evaluation = evaluate(probs, split)
    evaluation = with_version(
        "v-test", evaluation, compare(evaluation, evaluate(worse, split), "v0")
    )
    folder = tmp_path_factory.mktemp("reports")
    write_evaluation(folder, evaluation, split, probs, "v-test")
    assert evaluation["confused_pairs"], "the fixture must have misclassified images"
    return folder / "reports"


def chromium(page: Path, profile: Path, *args: str) -> subprocess.Popen[str]:
    """Headless Chromium on a local page; networking goes to a dead proxy."""
    return subprocess.Popen(
        [
            str(CHROMIUM),
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
            "--v=0",
            "--proxy-server=127.0.0.1:9",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            *args,
            page.as_uri(),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def console_errors(log: str) -> list[str]:
    """Console messages and uncaught exceptions of the page (Chromium logs them as CONSOLE)."""
    return [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def test_pages_render_offline_without_errors(reports: Path, tmp_path: Path) -> None:
    pages = {name: reports / name for name in (INDEX_PAGE, CONFUSION_PAGE, GALLERY_PAGE)}
    for page in pages.values():  # only relative scripts: nothing to fetch from a network
        sources = re.findall(r'<script[^>]*src="([^"]+)"', page.read_text())
        assert all(src == PLOTLY_JS for src in sources), sources
    shots = {
        CONFUSION_PAGE: tmp_path / "confusion_matrix.png",
        GALLERY_PAGE: tmp_path / "error_gallery.png",
    }
    runs = {
        ("dom", name): chromium(page, tmp_path / f"profile-dom-{i}", "--dump-dom")
        for i, (name, page) in enumerate(pages.items())
    }
    runs.update(
        {
            ("shot", name): chromium(
                pages[name],
                tmp_path / f"profile-shot-{i}",
                f"--screenshot={shot}",
                "--window-size=1200,900",
                "--hide-scrollbars",
            )
            for i, (name, shot) in enumerate(shots.items())
        }
    )
    out = {key: proc.communicate(timeout=120) for key, proc in runs.items()}
    for key, (_, log) in out.items():
        assert runs[key].returncode == 0, (key, log[-2000:])
        assert not console_errors(log), (key, console_errors(log))

    # plotly.js ran (from the relative plotly.min.js) and drew the figures.
    matrix = out[("dom", CONFUSION_PAGE)][0]
    assert 'id="confusion-matrix"' in matrix and "main-svg" in matrix
    assert 'class="hm"' in matrix  # the heatmap image plotly draws
    families = json.loads((reports.parent / "evaluation.json").read_text())["confusion_matrix"]
    assert all(f">{name}</text>" in matrix for name in families["labels"])  # axis ticks
    index = out[("dom", INDEX_PAGE)][0]
    assert 'id="per-family"' in index and "main-svg" in index and "Accuracy per phylum" in index
    gallery = out[("dom", GALLERY_PAGE)][0]
    n_cards = gallery.count("<figure>")
    assert n_cards > 0 and gallery.count("data:image/jpeg;base64,") == n_cards
    assert "predicted as" in gallery and "true <b>" in gallery

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name, shot in shots.items():
        pixels = np.asarray(Image.open(shot).convert("RGB"))
        assert pixels.shape[:2] == (900, 1200)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, f"{name} looks blank"
        shutil.copy(shot, SCREENSHOTS / f"report_{shot.name}")
    # The heatmap is drawn in plotly's "Blues": some strongly blue pixels must be on screen.
    matrix_png = np.asarray(Image.open(shots[CONFUSION_PAGE]).convert("RGB")).astype(int)
    blue = (matrix_png[..., 2] > 120) & (matrix_png[..., 2] - matrix_png[..., 0] > 60)
    assert blue.sum() > 1000
