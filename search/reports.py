"""What people read about a model: HTML reports, the error gallery, the model card, the note.

Reports open offline (air-gapped machines): plotly.js is written once as `plotly.min.js` beside the
pages and loaded by a relative <script src>, thumbnails are inline base64 JPEGs, nothing is
fetched from a network. Every page is static HTML plus plotly figures.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image

if TYPE_CHECKING:
    from search.evaluate import HeldOutSplit

PLOTLY_JS = "plotly.min.js"
INDEX_PAGE = "index.html"
CONFUSION_PAGE = "confusion_matrix.html"
GALLERY_PAGE = "errors.html"
THUMBNAIL_PX = 128
PER_PAIR_IMAGES = 12
OTHER_ERROR_IMAGES = 60
HEADLINE = (
    ("accuracy", "accuracy"),
    ("top5_accuracy", "top-5 accuracy"),
    ("macro_f1", "macro F1"),
    ("weighted_f1", "weighted F1"),
    ("auc", "one-vs-rest AUC"),
    ("loss", "log loss"),
)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.6rem; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.worse { color: #b00020; } .better { color: #006b2d; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.6rem; }
figure { margin: 0; width: 190px; border: 1px solid #ddd; padding: 0.4rem; font-size: 0.8rem; }
figure img { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
figcaption ol { margin: 0.2rem 0 0; padding-left: 1.2rem; }
.path { color: #666; word-break: break-all; }
"""


def write_reports(
    folder: Path,
    evaluation: dict[str, Any],
    split: HeldOutSplit,
    probs: np.ndarray,
    title: str,
) -> dict[str, Path]:
    """index.html (metrics, per family/phylum/size), confusion_matrix.html, errors.html."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_plotly_js(folder)
    pages = {
        "index": (folder / INDEX_PAGE, index_page(evaluation, title)),
        "confusion_matrix": (folder / CONFUSION_PAGE, confusion_page(evaluation, title)),
        "errors": (folder / GALLERY_PAGE, gallery_page(evaluation, split, probs, title)),
    }
    for path, text in pages.values():
        path.write_text(text, encoding="utf-8")
    return {name: path for name, (path, _) in pages.items()}


def write_plotly_js(folder: Path) -> Path:
    """plotly.js beside the pages, once (about 4.8 MB), so each page stays small."""
    from plotly.offline import get_plotlyjs

    path = Path(folder) / PLOTLY_JS
    if not path.exists():
        path.write_text(get_plotlyjs(), encoding="utf-8")
    return path


def _page(title: str, body: str, plotly: bool = False) -> str:
    script = f'<script src="{PLOTLY_JS}" charset="utf-8"></script>' if plotly else ""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n{script}\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def _figure(fig: go.Figure, div_id: str) -> str:
    return fig.to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,
        config={"responsive": True, "displaylogo": False},
    )


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="n">{value:.3f}</td>'
    if isinstance(value, int):
        return f'<td class="n">{value}</td>'
    if value is None:
        return '<td class="n">n/a</td>'
    if isinstance(value, tuple):  # (text, css class)
        return f'<td class="n {value[1]}">{html.escape(value[0])}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _delta(value: float | None, lower_is_better: bool = False) -> tuple[str, str] | None:
    if value is None:
        return None
    good = value < 0 if lower_is_better else value > 0
    css = "" if value == 0 else ("better" if good else "worse")
    return (f"{value:+.3f}", css)


def index_page(evaluation: dict[str, Any], title: str) -> str:
    """Headline metrics (with the previous champion), then where the model fails."""
    m = evaluation["metrics"]
    previous = evaluation.get("previous") or {}
    old, delta = previous.get("metrics", {}), previous.get("delta", {})
    header = ["metric", title]
    if previous:
        header += [f"previous ({previous.get('version')})", "change"]
    rows = []
    for key, name in HEADLINE:
        row: list[Any] = [name, m.get(key)]
        if previous:
            row += [old.get(key), _delta(delta.get(key), lower_is_better=key == "loss")]
        rows.append(row)
    families = sorted(evaluation["per_family"], key=lambda r: (r["f1"], r["family"]))
    fig = go.Figure()
    names = [r["family"] for r in families]
    for key in ("precision", "recall", "f1"):
        fig.add_bar(x=names, y=[r[key] for r in families], name=key)
    fig.update_layout(
        title="Per-family precision, recall and F1 on the test split (worst F1 first)",
        barmode="group",
        yaxis={"range": [0, 1]},
        height=460,
        margin={"b": 140},
    )
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Test split: {evaluation['n_images']} images, {evaluation['n_families']} families "
        f"(data {html.escape(evaluation['data_hash'][:12])}). "
        f'<a href="{CONFUSION_PAGE}">Confusion matrix</a> · '
        f'<a href="{GALLERY_PAGE}">Error gallery</a> · '
        '<a href="../per_family.csv">per_family.csv</a> · '
        '<a href="../evaluation.json">evaluation.json</a></p>',
        "<h2>Metrics</h2>",
        _table(header, rows),
        "<h2>Per family</h2>",
        _figure(fig, "per-family"),
        _table(
            [
                "family",
                "phylum",
                "precision",
                "recall",
                "F1",
                "test images",
                "train images",
                "size bucket",
            ],  # fmt: skip
            [
                [
                    r["family"],
                    r["phylum"],
                    r["precision"],
                    r["recall"],
                    r["f1"],
                    r["support"],
                    r["train_images"],
                    r["size_bucket"],
                ]  # fmt: skip
                for r in families
            ],
        ),
    ]
    if previous.get("per_family_f1_delta"):
        parts += [
            "<h2>Largest per-family F1 changes vs the previous champion</h2>",
            _table(
                ["family", "F1", "change"],
                [
                    [r["family"], r["f1"], _delta(r["delta"])]
                    for r in _largest_changes(previous["per_family_f1_delta"])
                ],
            ),
        ]
    parts += [
        "<h2>Accuracy per phylum</h2>",
        _table(
            ["phylum", "test images", "families", "accuracy"],
            [[r["phylum"], r["n"], r["families"], r["accuracy"]] for r in evaluation["per_phylum"]],
        ),
        "<h2>Accuracy per family size (training images)</h2>",
        _table(
            ["bucket", "rule", "families", "test images", "accuracy"],
            [
                [r["bucket"], r["rule"], r["families"], r["n"], r["accuracy"]]
                for r in evaluation["per_size_bucket"]
            ],
        ),
        "<h2>Most confused family pairs</h2>",
        _pairs_table(evaluation["confused_pairs"]),
    ]
    return _page(f"{title}: evaluation", "\n".join(parts), plotly=True)


def _largest_changes(rows: list[dict[str, Any]], n: int = 10) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-abs(r["delta"]), r["family"]))[:n]


def _pairs_table(pairs: list[dict[str, Any]]) -> str:
    if not pairs:
        return "<p>No misclassified test image.</p>"
    return _table(
        ["true family", "predicted as", "images", "share of the true family"],
        [[p["true"], p["predicted"], p["count"], p["share_of_true"]] for p in pairs],
    )


def confusion_page(evaluation: dict[str, Any], title: str) -> str:
    """Row-normalised heatmap (recall on the diagonal); counts in the hover text."""
    labels = evaluation["confusion_matrix"]["labels"]
    counts = np.asarray(evaluation["confusion_matrix"]["counts"], dtype=np.int64)
    phylum = {r["family"]: r["phylum"] for r in evaluation["per_family"]}
    order = sorted(range(len(labels)), key=lambda i: (phylum[labels[i]], labels[i]))
    counts = counts[np.ix_(order, order)]
    names = [labels[i] for i in order]
    support = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, support, out=np.zeros(counts.shape), where=support > 0)
    fig = go.Figure(
        go.Heatmap(
            z=share,
            x=names,
            y=names,
            customdata=counts,
            colorscale="Blues",
            zmin=0,
            zmax=1,
            colorbar={"title": {"text": "share of true"}},
            hovertemplate=(
                "true %{y}<br>predicted %{x}<br>%{customdata} images (%{z:.0%})<extra></extra>"
            ),
            # Non-zero counts in the cells while the cells are large enough to read.
            text=[[str(c) if c else "" for c in row] for row in counts.tolist()],
            texttemplate="%{text}" if len(names) <= 40 else None,
        )
    )
    side = max(520, 16 * len(names) + 220)
    fig.update_layout(
        title=f"Confusion matrix on the test split ({evaluation['n_images']} images; rows: "
        "true family, columns: predicted; sorted by phylum)",
        xaxis={"title": "predicted family", "tickangle": -60},
        yaxis={"title": "true family", "autorange": "reversed"},
        height=side,
    )
    body = (
        f'<h1>{html.escape(title)}</h1><p><a href="{INDEX_PAGE}">Evaluation</a> · '
        f'<a href="{GALLERY_PAGE}">Error gallery</a></p>\n' + _figure(fig, "confusion-matrix")
    )
    return _page(f"{title}: confusion matrix", body, plotly=True)


def gallery_page(
    evaluation: dict[str, Any], split: HeldOutSplit, probs: np.ndarray, title: str
) -> str:
    """Misclassified test images, grouped by the most-confused pairs, then the others."""
    probs = np.asarray(probs)
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != split.labels)
    index = {name: i for i, name in enumerate(split.classes)}
    shown: set[int] = set()
    sections = []
    for pair in evaluation["confused_pairs"]:
        t, p = index[pair["true"]], index[pair["predicted"]]
        members = [int(i) for i in wrong if split.labels[i] == t and predicted[i] == p]
        shown.update(members)
        heading = (
            f"{pair['true']} predicted as {pair['predicted']}: {_images(pair['count'])} "
            f"({pair['share_of_true']:.0%} of {pair['true']})"
        )
        sections.append(_gallery_section(heading, members[:PER_PAIR_IMAGES], split, probs))
    others = [int(i) for i in wrong if int(i) not in shown]
    if others:
        sections.append(
            _gallery_section(
                f"Other misclassified test images: {len(others)}",
                others[:OTHER_ERROR_IMAGES],
                split,
                probs,
            )
        )
    intro = (
        f"<h1>{html.escape(title)}: misclassified test images</h1>\n"
        f"<p>{len(wrong)} of {len(split.labels)} test images are misclassified. Grouped by the "
        f"most-confused family pairs (at most {PER_PAIR_IMAGES} each). "
        f'<a href="{INDEX_PAGE}">Evaluation</a> · <a href="{CONFUSION_PAGE}">Confusion matrix'
        "</a></p>"
    )
    if not len(wrong):
        sections.append("<p>No misclassified test image.</p>")
    return _page(f"{title}: error gallery", intro + "\n" + "\n".join(sections))


def _gallery_section(
    heading: str, members: list[int], split: HeldOutSplit, probs: np.ndarray
) -> str:
    cards = []
    for i in members:
        top = np.argsort(-probs[i], kind="stable")[:3]
        items = "".join(f"<li>{html.escape(split.classes[c])} {probs[i, c]:.2f}</li>" for c in top)
        cards.append(
            f'<figure><img alt="{html.escape(split.paths[i])}" '
            f'src="data:image/jpeg;base64,{thumbnail(split.images[i])}">'
            f"<figcaption>true <b>{html.escape(split.classes[split.labels[i]])}</b><br>"
            f"predicted <b>{html.escape(split.classes[top[0]])}</b><ol>{items}</ol>"
            f'<span class="path">{html.escape(split.paths[i])}</span></figcaption></figure>'
        )
    return f'<h2>{html.escape(heading)}</h2>\n<div class="gallery">{"".join(cards)}</div>'


def thumbnail(image: np.ndarray) -> str:
    """Base64 JPEG of a uint8 RGB image, at most THUMBNAIL_PX on a side."""
    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# model card and dashboard note


def model_card(
    info: dict[str, Any], evaluation: dict[str, Any], budget: dict[str, Any], data: dict[str, Any]
) -> str:
    """MODEL_CARD.md: data, search budget, params, metrics with comparison, weaknesses, usage."""
    m = evaluation["metrics"]
    previous = evaluation.get("previous") or {}
    counts = data.get("counts", {})
    size = info["image_size"]
    lines = [
        f"# Model card: {info['version']}",
        "",
        f"Family classifier for photos of rare species: trial {info['trial']} of study "
        f"`{info['study']}`, backbone `{info['backbone']}` (weights: {info.get('weights')}), "
        f"promoted {info['promoted_at']} by {info.get('promoted_by', 'unknown')}.",
        "",
        "## Data and split",
        "",
        f"- Source: `{data.get('source', '?')}`, prepared data hash `{info['data_hash'][:16]}`.",
        f"- {len(info['classes'])} families in {_phyla(len(set(info['phyla'])))}; images decoded "
        f"to {size}x{size} RGB.",
        f"- Split by **{info.get('split_by', 'image')}** "
        + (
            "(every image of a species in one split: test families are scored on species never "
            "seen in training)"
            if info.get("split_by") == "species"
            else "(stratified per family: test images are new photos, but their species may "
            "appear in training)"
        )
        + f", fractions {data.get('fractions', '?')}, seed {data.get('seed', '?')}: "
        f"train {counts.get('train', '?')}, validation {counts.get('val', '?')}, "
        f"test {counts.get('test', '?')} images.",
        "",
        "## Search budget",
        "",
        f"- Trials by state: {_states(budget.get('states', {}))}.",
        f"- Training time summed over trials: {_duration(budget.get('trial_seconds'))}; "
        f"wall time from the first trial's start to the last one's end: "
        f"{_duration(budget.get('wall_seconds'))}.",
        f"- Chosen by validation macro-F1 {_num(info.get('validation', {}).get('macro_f1'))}.",
        "",
        "## Chosen parameters",
        "",
        "| parameter | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(info["params"].items())],
        f"| seed | {info.get('seed')} |",
        "",
        "## Test metrics",
        "",
        f"On the held-out test split ({evaluation['n_images']} images). "
        + (
            f"Compared with the previous champion `{previous.get('version')}` on the same split."
            if previous
            else "No previous champion to compare with."
        ),
        "",
        "| metric | this model |" + (" previous | change |" if previous else ""),
        "|---|---|" + ("---|---|" if previous else ""),
    ]
    for key, name in HEADLINE:
        row = f"| {name} | {_num(m.get(key))} |"
        if previous:
            row += (
                f" {_num(previous.get('metrics', {}).get(key))} |"
                f" {_signed(previous.get('delta', {}).get(key))} |"
            )
        lines.append(row)
    lines += ["", "## Known weaknesses", "", *_weaknesses(evaluation), ""]
    lines += [
        "## Reports",
        "",
        f"- [evaluation summary]({'reports/' + INDEX_PAGE}) (per family, phylum, size bucket)",
        f"- [confusion matrix]({'reports/' + CONFUSION_PAGE}) (interactive, works offline)",
        f"- [error gallery]({'reports/' + GALLERY_PAGE}) (misclassified test photos)",
        "- `per_family.csv`, `evaluation.json` (the numbers), `champion.json` (provenance)",
        "",
        "## How to use it",
        "",
        f"Input: RGB images, **{size}x{size}**, pixel values **0-255** (uint8 or float32, not "
        "rescaled: preprocessing is inside the model), shape `(batch, "
        f"{size}, {size}, 3)`. Output: softmax probabilities over the families in "
        "`champion.json` `classes` (same order).",
        "",
        "```python",
        "import json, keras, numpy as np",
        "from search.images import decode_image  # upright RGB, resized and centre-cropped",
        "",
        'model = keras.models.load_model("models/champion/model.keras", compile=False)',
        'classes = json.load(open("models/champion/champion.json"))["classes"]',
        f'x = decode_image("photo.jpg", {size})[None].astype("float32")',
        "probs = model.predict(x)[0]",
        "print(classes[int(np.argmax(probs))])",
        "```",
        "",
        "Or from the shell, for files and folders, as CSV or JSON:",
        "",
        "```sh",
        "search predict photos/ --top-k 5 --format csv --output predictions.csv",
        "```",
        "",
    ]
    return "\n".join(lines)


def _weaknesses(evaluation: dict[str, Any]) -> list[str]:
    families = sorted(evaluation["per_family"], key=lambda r: (r["f1"], -r["support"], r["family"]))
    lines = [
        "Worst families by test F1 (few test images make these noisy):",
        "",
        "| family | phylum | F1 | precision | recall | test images | train images |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['family']} | {r['phylum']} | {r['f1']:.3f} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['support']} | {r['train_images']} |"
            for r in families[:5]
        ],
        "",
        "Accuracy per phylum (worst first): "
        + ", ".join(
            f"{r['phylum']} {r['accuracy']:.3f} (n={r['n']})" for r in evaluation["per_phylum"]
        )
        + ".",
        "",
        "Accuracy per family size: "
        + ", ".join(
            f"{r['bucket']} ({r['rule']}) {_num(r['accuracy'])} (n={r['n']})"
            for r in evaluation["per_size_bucket"]
        )
        + ".",
        "",
    ]
    pairs = evaluation["confused_pairs"][:5]
    if pairs:
        lines.append(
            "Most confused pairs (true -> predicted): "
            + ", ".join(
                f"{p['true']} -> {p['predicted']} ({p['count']}, {p['share_of_true']:.0%})"
                for p in pairs
            )
            + "."
        )
    else:
        lines.append("No misclassified test image.")
    previous = evaluation.get("previous") or {}
    worse = [r for r in previous.get("per_family_f1_delta", []) if r["delta"] < 0][:5]
    if worse:
        lines += [
            "",
            "Families that got worse than under the previous champion: "
            + ", ".join(f"{r['family']} ({r['delta']:+.3f} F1)" for r in worse)
            + ".",
        ]
    return lines


def dashboard_note(info: dict[str, Any], evaluation: dict[str, Any], report: str) -> str:
    """The study note in optuna-dashboard: who the champion is and where its report lives."""
    m = evaluation["metrics"]
    previous = evaluation.get("previous") or {}
    lines = [
        f"## Champion: {info['version']}",
        "",
        f"Trial **{info['trial']}** ({info['backbone']}), promoted {info['promoted_at']} by "
        f"{info.get('promoted_by', 'unknown')}.",
        "",
        f"Test split ({evaluation['n_images']} images): accuracy {_num(m['accuracy'])}, "
        f"top-5 {_num(m['top5_accuracy'])}, macro-F1 {_num(m['macro_f1'])}, "
        f"AUC {_num(m['auc'])}, loss {_num(m['loss'])}.",
    ]
    if previous.get("delta"):
        d = previous["delta"]
        lines.append(
            f"Vs previous champion {previous['version']}: macro-F1 {_signed(d.get('macro_f1'))}, "
            f"accuracy {_signed(d.get('accuracy'))}."
        )
    lines += [
        "",
        f"Report: `{report}` (open it from the project folder; model card: "
        f"`{report.rsplit('/reports/', 1)[0]}/MODEL_CARD.md`).",
    ]
    return "\n".join(lines) + "\n"


def _states(states: dict[str, int]) -> str:
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "none"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _phyla(n: int) -> str:
    return "1 phylum" if n == 1 else f"{n} phyla"


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"
