"""What people read about a model: HTML reports, the error gallery, the model card, the note.

Reports open offline (air-gapped machines): plotly.js is written once as `plotly.min.js` beside the
pages and loaded by a relative <script src>, thumbnails are inline base64 JPEGs, nothing is
fetched from a network. Every page is static HTML plus plotly figures.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from search.ensemble import champion_members
from search.evaluate import confused_pairs, to_json

if TYPE_CHECKING:
    from search.evaluate import HeldOutSplit

EVALUATION_FILE = "evaluation.json"
PER_FAMILY_FILE = "per_family.csv"
REPORTS_DIR = "reports"
EVALUATIONS_DIR = "evaluations"
PER_FAMILY_COLUMNS = (
    "family",
    "phylum",
    "precision",
    "recall",
    "f1",
    "support",
    "train_images",
    "size_bucket",
)
PLOTLY_JS = "plotly.min.js"
INDEX_PAGE = "index.html"
CONFUSION_PAGE = "confusion_matrix.html"
GALLERY_PAGE = "errors.html"
# Caps that keep the pages light at the real size (202 families, ~1,200 test photos, hundreds of
# errors): the gallery shows at most MAX_GALLERY_IMAGES small thumbnails (~3 kB each).
THUMBNAIL_PX = 96
THUMBNAIL_QUALITY = 80
GALLERY_PAIRS = 30  # sections: the most-confused (true, predicted) pairs
PER_PAIR_IMAGES = 6
OTHER_ERROR_IMAGES = 60  # the most confident of the remaining errors
MAX_GALLERY_IMAGES = 240
CONFUSION_PAIRS = 30  # rows of the pairs table under the confusion matrix
CELL_TEXT_MAX = 40  # counts written in the cells up to this many families
CELL_PX = 12  # cell side beyond that: every family keeps a readable tick label
CARD_FAMILIES = 10  # worst and best families in the model card; all of them: index.html, CSV
# plotly's "Blues", stretched so a single error (share >= ~3%) is visibly blue, not white.
SHARE_COLORS = [
    [0.0, "rgb(247,251,255)"],
    [0.02, "rgb(198,219,239)"],
    [0.15, "rgb(107,174,214)"],
    [0.5, "rgb(33,113,181)"],
    [1.0, "rgb(8,48,107)"],
]
HEADLINE = (
    ("accuracy", "accuracy"),
    ("top5_accuracy", "top-5 accuracy"),
    ("macro_f1", "macro F1"),
    ("weighted_f1", "weighted F1"),
    ("auc", "one-vs-rest AUC"),
    ("loss", "log loss"),
    ("phylum_accuracy", "phylum accuracy (of the predicted family)"),
)
# Click a heading of a table.sortable to sort its rows by that column (again: reversed).
SORT_TABLES_JS = """
document.querySelectorAll("table.sortable th").forEach((th, col) => {
  th.addEventListener("click", () => {
    const body = th.closest("table").tBodies[0];
    const rows = Array.from(body.rows);
    const numeric = rows.every((r) => r.cells[col].classList.contains("n"));
    const key = (r) => {
      const text = r.cells[col].textContent;
      const value = parseFloat(text);
      return numeric ? (Number.isNaN(value) ? -Infinity : value) : text;
    };
    const sign = th.dataset.order === "up" ? -1 : 1;
    th.dataset.order = sign === 1 ? "up" : "down";
    rows.sort((a, b) => (key(a) < key(b) ? -sign : key(a) > key(b) ? sign : 0));
    rows.forEach((r) => body.appendChild(r));
  });
});
"""
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
table.sortable th { cursor: pointer; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.6rem; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.worse { color: #b00020; } .better { color: #006b2d; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.6rem; }
figure { margin: 0; width: 190px; border: 1px solid #ddd; padding: 0.4rem; font-size: 0.8rem; }
figure img { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
figcaption ol { margin: 0.2rem 0 0; padding-left: 1.2rem; }
.path { color: #666; word-break: break-all; }
"""


def write_evaluation(
    folder: Path, evaluation: dict[str, Any], split: HeldOutSplit, probs: np.ndarray, title: str
) -> dict[str, Path]:
    """evaluation.json, per_family.csv and reports/ (HTML pages) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EVALUATION_FILE).write_text(to_json(evaluation))
    with open(folder / PER_FAMILY_FILE, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=PER_FAMILY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(evaluation["per_family"])
    pages = write_reports(folder / REPORTS_DIR, evaluation, split, probs, title)
    return {
        "evaluation": folder / EVALUATION_FILE,
        "per_family": folder / PER_FAMILY_FILE,
        **pages,
    }


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


def _table(header: list[str], rows: list[list[Any]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>\n" for row in rows)
    attr = f' class="{css}"' if css else ""
    return f"<table{attr}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>"


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
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Test split: {evaluation['n_images']} images, {evaluation['n_families']} families "
        f"(data {html.escape(evaluation['data_hash'][:12])}). "
        f'<a href="{CONFUSION_PAGE}">Confusion matrix</a> · '
        f'<a href="{GALLERY_PAGE}">Error gallery</a> · '
        '<a href="#all-families">all families</a> · '
        '<a href="../per_family.csv">per_family.csv</a> · '
        '<a href="../evaluation.json">evaluation.json</a></p>',
        "<h2>Metrics</h2>",
        _table(header, rows),
        "<h2>Per family</h2>",
        _figure(_per_family_figure(families), "per-family"),
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
        _pairs_table(evaluation["confused_pairs"], evaluation),
        f'<h2 id="all-families">All {len(families)} families</h2>',
        "<p>Worst F1 first; click a column heading to sort by it. The same numbers: "
        '<a href="../per_family.csv">per_family.csv</a>.</p>',
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
            ],
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
                ]
                for r in families
            ],
            css="sortable",
        ),
        f"<script>{SORT_TABLES_JS}</script>",
    ]
    return _page(f"{title}: evaluation", "\n".join(parts), plotly=True)


def _per_family_figure(families: list[dict[str, Any]]) -> go.Figure:
    """F1 of every family, worst first, one colour per phylum; precision, recall and test
    images on hover (three grouped bars per family are unreadable at 202 families)."""
    fig = go.Figure()
    for phylum in sorted({r["phylum"] for r in families}):
        rows = [r for r in families if r["phylum"] == phylum]
        fig.add_bar(
            x=[r["family"] for r in rows],
            y=[r["f1"] for r in rows],
            name=phylum,
            customdata=[[r["precision"], r["recall"], r["support"]] for r in rows],
            hovertemplate=(
                "%{x} (" + html.escape(phylum) + ")<br>F1 %{y:.3f}, precision "
                "%{customdata[0]:.3f}, recall %{customdata[1]:.3f}<br>%{customdata[2]} test "
                "images<extra></extra>"
            ),
        )
    fig.update_layout(
        title="Per-family F1 on the test split (worst first; hover for precision and recall)",
        xaxis={"categoryorder": "array", "categoryarray": [r["family"] for r in families]},
        yaxis={"range": [0, 1], "title": "F1"},
        legend={"title": {"text": "phylum"}},
        bargap=0.1,
        height=460,
        margin={"b": 140},
    )
    return fig


def _largest_changes(rows: list[dict[str, Any]], n: int = 10) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-abs(r["delta"]), r["family"]))[:n]


def _pairs_table(pairs: list[dict[str, Any]], evaluation: dict[str, Any]) -> str:
    if not pairs:
        return "<p>No misclassified test image.</p>"
    phylum = {r["family"]: r["phylum"] for r in evaluation["per_family"]}
    return _table(
        ["true family", "phylum", "predicted as", "phylum", "images", "share of the true family"],
        [
            [
                p["true"],
                phylum[p["true"]],
                p["predicted"],
                phylum[p["predicted"]],
                p["count"],
                p["share_of_true"],
            ]
            for p in pairs
        ],
    )


def confusion_page(evaluation: dict[str, Any], title: str) -> str:
    """The heatmap, how to read it, and the most-confused pairs (capped) with their phyla."""
    n = len(evaluation["confusion_matrix"]["labels"])
    phyla = sorted({r["phylum"] for r in evaluation["per_family"]})
    pairs = _top_pairs(evaluation, CONFUSION_PAIRS)
    body = (
        f"<h1>{html.escape(title)}: confusion matrix</h1>\n"
        f'<p><a href="{INDEX_PAGE}">Evaluation</a> · <a href="{GALLERY_PAGE}">Error gallery</a>'
        "</p>\n"
        f"<p>Test split: {evaluation['n_images']} images, {n} families in {_phyla(len(phyla))}. "
        "Rows: true family, columns: predicted family, both grouped by phylum "
        f"({html.escape(', '.join(phyla))}; lines between the groups). Colour: share of the true "
        "family's test images (row-normalised: recall on the diagonal); hover for the phyla and "
        "the number of images. Drag to zoom, double-click to zoom out.</p>\n"
        + _figure(confusion_figure(evaluation), "confusion-matrix")
        + f"\n<h2>Most confused family pairs (at most {CONFUSION_PAIRS})</h2>\n"
        + _pairs_table(pairs, evaluation)
    )
    return _page(f"{title}: confusion matrix", body, plotly=True)


def _top_pairs(evaluation: dict[str, Any], top: int) -> list[dict[str, Any]]:
    """The `top` largest off-diagonal cells, same order and fields as evaluation's pairs."""
    counts = np.asarray(evaluation["confusion_matrix"]["counts"], dtype=np.int64)
    return confused_pairs(counts, evaluation["confusion_matrix"]["labels"], top=top)


def family_order(evaluation: dict[str, Any]) -> list[int]:
    """Class indices grouped by phylum (alphabetical), families alphabetical within each: the
    confusion matrix's axis order, so confusions inside a phylum sit in one block."""
    labels = evaluation["confusion_matrix"]["labels"]
    phylum = {r["family"]: r["phylum"] for r in evaluation["per_family"]}
    return sorted(range(len(labels)), key=lambda i: (phylum[labels[i]], labels[i]))


def confusion_figure(evaluation: dict[str, Any]) -> go.Figure:
    """Row-normalised heatmap (recall on the diagonal), families grouped by phylum with lines
    between the groups; hover: true and predicted family with phyla, images, share of true.

    Sized to stay light at 202 families: one int matrix (counts) and one float32 matrix (shares),
    no per-cell text beyond CELL_TEXT_MAX families; every family keeps its tick label."""
    labels = evaluation["confusion_matrix"]["labels"]
    counts = np.asarray(evaluation["confusion_matrix"]["counts"], dtype=np.int64)
    phylum = {r["family"]: r["phylum"] for r in evaluation["per_family"]}
    order = family_order(evaluation)
    counts = counts[np.ix_(order, order)]
    names = [labels[i] for i in order]
    groups = [phylum[name] for name in names]
    # Hover shows the category ("family (phylum)"), the ticks just the family.
    categories = [f"{name} ({group})" for name, group in zip(names, groups, strict=True)]
    support = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, support, out=np.zeros(counts.shape), where=support > 0)
    n = len(names)
    small = n <= CELL_TEXT_MAX
    # Few families: cells big enough for their counts, the matrix about 560 px square.
    cell = max(28, 560 // n) if small else CELL_PX
    fig = go.Figure(
        go.Heatmap(
            z=share.astype(np.float32),
            x=categories,
            y=categories,
            customdata=counts,  # plotly stores it in the smallest integer type that fits
            colorscale=SHARE_COLORS,
            zmin=0,
            zmax=1,
            xgap=0,
            ygap=0,
            colorbar={
                "title": {"text": "share of true"},
                "tickformat": ".0%",
                "x": 1.0,
                "xanchor": "left",
                "xpad": 130,  # room for the phylum names beside the rows
                "y": 1.0,
                "yanchor": "top",
                "len": min(1.0, 400 / (cell * n)),
            },
            hovertemplate=(
                "true %{y}<br>predicted %{x}<br>%{customdata} images, %{z:.0%} of the true "
                "family's test images<extra></extra>"
            ),
            # Non-zero counts in the cells while the cells are large enough to read.
            text=[[str(c) if c else "" for c in row] for row in counts.tolist()] if small else None,
            texttemplate="%{text}" if small else None,
        )
    )
    margin = {"l": 170, "r": 260, "t": 120, "b": 170}
    axis = {
        "tickmode": "array",
        "tickvals": categories,
        "ticktext": names,
        "tickfont": {"size": 11 if small else 9},
        "showgrid": False,
    }
    fig.update_layout(
        xaxis={**axis, "title": "predicted family", "tickangle": -60, "side": "bottom"},
        yaxis={**axis, "title": "true family", "autorange": "reversed"},
        width=max(520, cell * n + margin["l"] + margin["r"]),
        height=max(520, cell * n + margin["t"] + margin["b"]),
        margin=margin,
        shapes=_phylum_lines(groups),
        annotations=_phylum_labels(groups, cell),
    )
    return fig


def _phylum_blocks(groups: list[str]) -> list[tuple[str, int, int]]:
    """(phylum, first index, last index) of each run of one phylum along the axis."""
    blocks: list[tuple[str, int, int]] = []
    for i, group in enumerate(groups):
        if blocks and blocks[-1][0] == group:
            blocks[-1] = (group, blocks[-1][1], i)
        else:
            blocks.append((group, i, i))
    return blocks


def _phylum_lines(groups: list[str]) -> list[dict[str, Any]]:
    """A line across the matrix at each phylum boundary, both ways."""
    end = len(groups) - 0.5
    line = {"color": "rgba(60,60,60,0.8)", "width": 1.5}
    shapes = []
    for _, first, _ in _phylum_blocks(groups)[1:]:
        at = first - 0.5
        shapes.append({"type": "line", "x0": at, "x1": at, "y0": -0.5, "y1": end, "line": line})
        shapes.append({"type": "line", "y0": at, "y1": at, "x0": -0.5, "x1": end, "line": line})
    return shapes


def _phylum_labels(groups: list[str], cell: int) -> list[dict[str, Any]]:
    """Each phylum's name beside its rows (right) and above its columns (top; turned upright
    where its columns are too narrow for the name)."""
    notes = []
    for group, first, last in _phylum_blocks(groups):
        middle = (first + last) / 2
        narrow = (last - first + 1) * cell < 8 * len(group) + 12
        beside = {"x": 1.0, "xref": "paper", "xanchor": "left", "xshift": 6, "y": middle}
        above = {"y": 1.0, "yref": "paper", "yanchor": "bottom", "yshift": 6, "x": middle}
        notes += [
            {"text": f"<b>{html.escape(group)}</b>", "showarrow": False, **where}
            for where in (
                beside | {"yref": "y"},
                above | {"xref": "x", "textangle": -90 if narrow else 0},
            )
        ]
    return notes


def gallery_page(
    evaluation: dict[str, Any], split: HeldOutSplit, probs: np.ndarray, title: str
) -> str:
    """Misclassified test images, capped so the page stays light at hundreds of errors: the
    GALLERY_PAIRS most-confused pairs (PER_PAIR_IMAGES each), then the most confident of the
    other errors, MAX_GALLERY_IMAGES in all; it says how many it leaves out."""
    probs = np.asarray(probs)
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != split.labels)
    # Most confident mistakes first: those say most about what the model gets wrong.
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")]
    index = {name: i for i, name in enumerate(split.classes)}
    phylum = dict(zip(split.classes, split.phyla, strict=True))
    pairs = _top_pairs(evaluation, GALLERY_PAIRS)
    in_pairs: set[int] = set()
    shown = 0
    sections = []
    for pair in pairs:
        t, p = index[pair["true"]], index[pair["predicted"]]
        members = [int(i) for i in wrong if split.labels[i] == t and predicted[i] == p]
        in_pairs.update(members)
        take = members[: min(PER_PAIR_IMAGES, MAX_GALLERY_IMAGES - shown)]
        shown += len(take)
        heading = (
            f"{pair['true']} ({phylum[pair['true']]}) predicted as {pair['predicted']} "
            f"({phylum[pair['predicted']]}): {_images(pair['count'])} "
            f"({pair['share_of_true']:.0%} of {pair['true']})"
            + (f", {len(take)} shown" if len(take) < len(members) else "")
        )
        sections.append(_gallery_section(heading, take, split, probs))
    others = [int(i) for i in wrong if int(i) not in in_pairs]
    if others:
        take = others[: max(0, min(OTHER_ERROR_IMAGES, MAX_GALLERY_IMAGES - shown))]
        shown += len(take)
        heading = f"Other misclassified test images: {len(others)}" + (
            f", the {len(take)} most confident shown" if len(take) < len(others) else ""
        )
        sections.append(_gallery_section(heading, take, split, probs))
    left_out = len(wrong) - shown
    intro = (
        f"<h1>{html.escape(title)}: misclassified test images</h1>\n"
        f"<p>{len(wrong)} of {len(split.labels)} test images are misclassified. Grouped by the "
        f"{GALLERY_PAIRS} most-confused family pairs (at most {PER_PAIR_IMAGES} images each), "
        f"then the most confident of the other errors (at most {OTHER_ERROR_IMAGES}); at most "
        f"{MAX_GALLERY_IMAGES} images in all. "
        f'<a href="{INDEX_PAGE}">Evaluation</a> · <a href="{CONFUSION_PAGE}">Confusion matrix'
        "</a></p>\n"
        + (
            f'<p class="left-out">{shown} shown; {left_out} misclassified test images are left '
            "out here (the confusion matrix counts every one).</p>"
            if left_out
            else ""
        )
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
    img.save(buf, "JPEG", quality=THUMBNAIL_QUALITY)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# model card and dashboard note


def _make_up(info: dict[str, Any]) -> str:
    members = champion_members(info)
    text = f"trial {members[0]['trial']}"
    if len(members) > 1:
        text = f"an ensemble of {len(members)} trials"
    return text + (" with flip test-time augmentation" if info.get("tta") == "flip" else "")


def _members_section(info: dict[str, Any]) -> list[str]:
    """The ensemble's trials and weights, and how the make-up was chosen."""
    members = champion_members(info)
    selection = info.get("selection") or {}
    if len(members) < 2 and info.get("tta") != "flip":
        return []
    lines = [
        "## Ensemble members" if len(members) > 1 else "## Test-time augmentation",
        "",
    ]
    if len(members) > 1:
        lines += [
            f"Greedy ensemble selection with replacement (Caruana et al., 2004), "
            f"{selection.get('rounds', '?')} rounds over the {len(selection.get('library', []))} "
            "best trials, on validation probabilities"
            + (" averaged with the mirrored photo" if info.get("tta") == "flip" else "")
            + f"; the average scores validation macro-F1 "
            f"{_num(selection.get('selected_val_macro_f1'))} (on the data it was selected on).",
            "",
            "| trial | weight | backbone | validation macro-F1 |",
            "|---|---|---|---|",
            *[
                f"| {m['trial']} | {m['weight']:.3f} | {m.get('backbone', '')} | "
                f"{_num(m.get('val_macro_f1'))} |"
                for m in members
            ],
            "",
        ]
    held = selection.get("held_out")
    if held:
        lines += [
            f"Chosen over the best single trial on validation halves the selection did not see: "
            f"macro-F1 {_num(held['ensemble'])} against {_num(held['single'])}.",
            "",
        ]
    if info.get("tta") == "flip":
        lines += [
            "Every prediction averages the photo and its mirror image (inside the model).",
            "",
        ]
    return lines


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
        f"Family classifier for photos of rare species: {_make_up(info)} of study "
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
        *_members_section(info),
        "## Chosen parameters"
        + (" (the heaviest member)" if len(champion_members(info)) > 1 else ""),
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
    """Short at any number of families: the worst and best CARD_FAMILIES and a per-phylum table;
    the full per-family table lives in reports/index.html and per_family.csv."""
    families = sorted(evaluation["per_family"], key=lambda r: (r["f1"], -r["support"], r["family"]))
    n = len(families)
    if n <= 2 * CARD_FAMILIES:
        tables = ["Families by test F1, worst first (few test images make these noisy):", ""]
        tables += [*_card_families(families), ""]
    else:
        best = sorted(families, key=lambda r: (-r["f1"], -r["support"], r["family"]))
        worst_of = f"The {CARD_FAMILIES} worst of {n} families by test F1"
        tables = [f"{worst_of} (few test images make these noisy):", ""]
        tables += [*_card_families(families[:CARD_FAMILIES]), ""]
        tables += [f"The {CARD_FAMILIES} best:", "", *_card_families(best[:CARD_FAMILIES]), ""]
        tables += [
            f"All {n} families: `per_family.csv`, [evaluation summary](reports/{INDEX_PAGE}).",
            "",
        ]
    lines = [
        *tables,
        "Per phylum (worst accuracy first):",
        "",
        "| phylum | families | test images | accuracy | mean family F1 |",
        "|---|---|---|---|---|",
        *[
            f"| {r['phylum']} | {r['families']} | {r['n']} | {r['accuracy']:.3f} | "
            f"{_mean_f1(families, r['phylum'])} |"
            for r in evaluation["per_phylum"]
        ],
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


def _card_families(rows: list[dict[str, Any]]) -> list[str]:
    return [
        "| family | phylum | F1 | precision | recall | test images | train images |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['family']} | {r['phylum']} | {r['f1']:.3f} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['support']} | {r['train_images']} |"
            for r in rows
        ],
    ]


def _mean_f1(families: list[dict[str, Any]], phylum: str) -> str:
    """Macro F1 over the families of one phylum (those with test images)."""
    f1 = [r["f1"] for r in families if r["phylum"] == phylum and r["support"]]
    return _num(float(np.mean(f1)) if f1 else None)


def dashboard_note(info: dict[str, Any], evaluation: dict[str, Any], report: str) -> str:
    """The study note in optuna-dashboard: who the champion is and where its report lives."""
    m = evaluation["metrics"]
    previous = evaluation.get("previous") or {}
    lines = [
        f"## Champion: {info['version']}",
        "",
        f"{_make_up(info).capitalize()} ({info['backbone']}), promoted {info['promoted_at']} "
        f"by {info.get('promoted_by', 'unknown')}."
        + (
            " Members (trial x weight): "
            + ", ".join(f"{m['trial']} x{m['weight']:.2f}" for m in champion_members(info))
            + "."
            if len(champion_members(info)) > 1
            else ""
        ),
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
