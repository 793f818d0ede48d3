"""What eval.py leaves behind: one folder per evaluation with tables, per-pair CSVs and an
HTML report.

    <workdir>/eval/step_001500_validation-testA-testB_shuffled/
        eval_results.{md,csv,json}     the tables (results_table.write_results)
        pairs_<split>.csv              one row per evaluated pair (+ pairs_<split>_shuffled.csv)
        report.html                    self-contained: table, IoU histogram, Prec@X curve and
                                       galleries of the worst, median and best pairs

The folder is named by the checkpoint step, the splits, ``_shuffled`` and any evaluation
setting that differs from the checkpoint's config (``eval_dir_name``), so evaluations with
other splits or settings never overwrite one another; rerunning the same evaluation replaces
its folder (written under a temporary name and renamed when complete).

The per-pair CSV has each pair's intersection and union in pixels at the original
resolution, so mIoU, oIoU, Prec@X or another paper's metric can be recomputed from it.
The HTML embeds its pictures as base64 PNG/JPEG and its charts as inline SVG: it opens
offline, and with ``GALLERY_PER_GROUP`` pairs per group and thumbnails of at most
``THUMB_HIGH`` px it stays at a few hundred KB.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import html
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lts_jax import visualize
from lts_jax.metrics import METRIC_KEYS, PREC_THRESHOLDS, PairCounts
from lts_jax.results_table import METRIC_HEADERS, SplitResult, write_results

EVAL_DIR = "eval"
REPORT_NAME = "report.html"
GALLERY_PER_GROUP = 4
GROUPS: tuple[str, ...] = ("worst", "median", "best")
# Gallery pictures: shrunk to at most THUMB_HIGH px on the longer side; smaller ones are
# stored as they are and shown enlarged by an integer factor to at least THUMB_LOW px.
THUMB_LOW, THUMB_HIGH = 160, 160
# Eval-relevant config fields beyond threshold/empty_union_iou: a difference from the
# checkpoint's config marks the folder name with a hash.
_OTHER_FIELDS = ("dataset", "data_dir", "image_size", "canvas_size", "max_text_len")
_SERIES_COLOURS = ("#1f6fd1", "#e0591b")  # expressions as given, shuffled


# --------------------------------------------------------------------------------------------
# Folder naming


def _fmt(value: float) -> str:
    return f"{float(value):g}"


def config_tags(config: Any, saved: Any) -> list[str]:
    """Name tags for evaluation settings in ``config`` that differ from the checkpoint's
    ``saved`` config: 'threshold0.35', 'emptyiou1', 'cfg<hash>' (dataset, data_dir, sizes)."""
    tags = []
    if float(config.threshold) != float(saved.threshold):
        tags.append(f"threshold{_fmt(config.threshold)}")
    if float(config.empty_union_iou) != float(saved.empty_union_iou):
        tags.append(f"emptyiou{_fmt(config.empty_union_iou)}")
    mine = {k: str(config.data.get(k)) for k in _OTHER_FIELDS}
    theirs = {k: str(saved.data.get(k)) for k in _OTHER_FIELDS}
    if mine != theirs:
        digest = hashlib.sha1(json.dumps(mine, sort_keys=True).encode()).hexdigest()[:8]
        tags.append(f"cfg{digest}")
    return tags


def eval_dir_name(step: int, splits: Sequence[str], *, shuffled: bool,
                  tags: Sequence[str] = ()) -> str:
    """'step_001500_validation-testA[_shuffled][_<tag>...]' (filesystem-safe)."""
    parts = [f"step_{int(step):06d}", "-".join(splits), *(["shuffled"] if shuffled else []),
             *tags]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts))


def eval_dir(workdir: str | Path, name: str) -> Path:
    """<workdir>/eval/<name>."""
    return Path(workdir) / EVAL_DIR / name


# --------------------------------------------------------------------------------------------
# Per-pair tables


def pairs_csv_name(split: str, shuffled: bool) -> str:
    return f"pairs_{split}{'_shuffled' if shuffled else ''}.csv"


def write_pairs_csv(path: str | Path, infos: Sequence[Any], counts: PairCounts, *,
                    empty_union_iou: float, shuffled: bool) -> Path:
    """One row per pair in ``counts`` (pair-id order): pair_id, [source,] ref_id, ann_id,
    image_id, sent_id, expression, [expression_pair_id, shuffled_expression,] intersection,
    union, iou. ``infos[pair_id]`` is the pair's ``evaluate.PairInfo``."""
    counts = counts.sorted()
    with_source = any(getattr(i, "source", "") for i in infos)
    header = ["pair_id", *(["source"] if with_source else []), "ref_id", "ann_id", "image_id",
              "sent_id", "expression",
              *(["expression_pair_id", "shuffled_expression"] if shuffled else []),
              "intersection", "union", "iou"]
    ious = counts.iou(empty_union_iou=empty_union_iou)
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        for k in range(len(counts)):
            info = infos[int(counts.pair_id[k])]
            row = [info.pair_id, *([info.source] if with_source else []), info.ref_id,
                   info.ann_id, info.image_id, info.sent_id, info.expression]
            if shuffled:
                other = int(counts.expression_pair_id[k])
                row += [other, infos[other].expression]
            row += [int(counts.intersection[k]), int(counts.union[k]), repr(float(ious[k]))]
            writer.writerow(row)
    return path


# --------------------------------------------------------------------------------------------
# Gallery selection


def select_gallery(counts: PairCounts, *, empty_union_iou: float,
                   per_group: int = GALLERY_PER_GROUP) -> dict[str, list[int]]:
    """Pair ids of the worst, median and best pairs by IoU (ties by pair id), disjoint:
    worst lowest first, best highest first, median the ``per_group`` around the middle of
    the rest."""
    ious = counts.iou(empty_union_iou=empty_union_iou)
    order = np.lexsort((counts.pair_id, ious))  # by IoU, then pair id
    ids = counts.pair_id[order]
    n = len(ids)
    worst = ids[: min(per_group, n)]
    best = ids[max(len(worst), n - per_group):][::-1]
    middle = ids[len(worst): n - len(best)]
    k = min(per_group, len(middle))
    start = max(0, (len(middle) - k) // 2)
    median = middle[start: start + k]
    return {"worst": [int(i) for i in worst], "median": [int(i) for i in median],
            "best": [int(i) for i in best]}


# --------------------------------------------------------------------------------------------
# Charts (inline SVG)


def _series_ious(series: Sequence[tuple[str, PairCounts]], empty_union_iou: float
                 ) -> list[tuple[str, str, np.ndarray]]:
    return [(label, _SERIES_COLOURS[i % len(_SERIES_COLOURS)],
             counts.iou(empty_union_iou=empty_union_iou))
            for i, (label, counts) in enumerate(series)]


def _axes(width: int, height: int, left: int, bottom: int, top: int, right: int,
          x_ticks: Sequence[float], y_ticks: Sequence[tuple[float, str]], x_label: str,
          y_label: str) -> tuple[list[str], Any, Any]:
    """Frame, ticks and labels of a chart; y ticks are (position in [0, 1], label). Returns
    (svg parts, x_of, y_of) mapping data in [0, 1] to pixels."""
    pw, ph = width - left - right, height - top - bottom

    def x_of(v: float) -> float:
        return left + v * pw

    def y_of(v: float) -> float:
        return top + (1.0 - v) * ph

    parts = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" '
             'stroke="#999"/>']
    for t in x_ticks:
        x = x_of(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" '
                     'stroke="#444"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{t:g}</text>')
    for t, label in y_ticks:
        y = y_of(t)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 4}" text-anchor="middle">'
                 f'{html.escape(x_label)}</text>')
    parts.append(f'<text x="12" y="{top + ph / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + ph / 2:.1f})">{html.escape(y_label)}</text>')
    return parts, x_of, y_of


def _legend(series: Sequence[tuple[str, str, np.ndarray]], x: float, y: float) -> list[str]:
    parts = []
    for i, (label, colour, _) in enumerate(series):
        yy = y + 15 * i
        parts.append(f'<rect x="{x}" y="{yy - 9}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{x + 14}" y="{yy}">{html.escape(label)}</text>')
    return parts


def _svg(width: int, height: int, title: str, parts: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" '
            f'role="img" aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>'
            + "".join(parts) + "</svg>")


def histogram_svg(series: Sequence[tuple[str, PairCounts]], *, empty_union_iou: float,
                  bins: int = 20, width: int = 380, height: int = 220) -> str:
    """Inline SVG: share of pairs per IoU bin ([0, 0.05), ..., [0.95, 1]), one bar colour per
    series (label, counts)."""
    data = _series_ious(series, empty_union_iou)
    shares = []
    for _, _, ious in data:
        hist, _ = np.histogram(np.clip(ious, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
        shares.append(hist / max(len(ious), 1))
    top_share = max([float(s.max()) for s in shares if s.size] + [0.05])
    y_max = float(min(1.0, np.ceil(top_share * 10) / 10))
    step = 0.1 if y_max <= 0.5 else 0.2
    ticks = [(t / y_max, f"{100 * t:.0f}%") for t in np.arange(0.0, y_max + 1e-9, step)]
    top = 12 + 15 * len(data)
    parts, x_of, y_of = _axes(width, height + top, 46, 34, top, 10, [0, 0.25, 0.5, 0.75, 1.0],
                              ticks, "IoU", "share of pairs")
    slot = 1.0 / bins
    bar = slot / max(len(data), 1) * 0.9
    for s, ((_, colour, _), share) in enumerate(zip(data, shares, strict=True)):
        for b, v in enumerate(share):
            if v <= 0:
                continue
            left = b * slot + 0.05 * slot + s * bar
            x0, x1, y0 = x_of(left), x_of(left + bar), y_of(v / y_max)
            parts.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" '
                         f'height="{y_of(0.0) - y0:.1f}" fill="{colour}"><title>'
                         f'IoU {b * slot:.2f}-{(b + 1) * slot:.2f}: {100 * v:.1f}%</title></rect>')
    parts += _legend(data, 56, 16)
    return _svg(width, height + top, "IoU histogram", parts)


def precision_curve(counts: PairCounts, thresholds: Sequence[float], *,
                    empty_union_iou: float) -> np.ndarray:
    """Share of pairs with IoU >= x for each x, compared exactly (I * 100 >= round(100 x) * U
    at percent resolution); an empty union scores ``empty_union_iou``."""
    inter, union = counts.intersection, counts.union
    out = []
    for x in thresholds:
        pct = int(round(100 * x))
        hit = np.where(union == 0, empty_union_iou >= x, inter * 100 >= pct * union)
        out.append(hit.mean() if len(counts) else 0.0)
    return np.asarray(out, np.float64)


def precision_svg(series: Sequence[tuple[str, PairCounts]], *, empty_union_iou: float,
                  width: int = 380, height: int = 220) -> str:
    """Inline SVG: Prec@X (share of pairs with IoU >= X) for X in 0..1, with the table's
    thresholds 0.5..0.9 marked."""
    xs = np.round(np.linspace(0.0, 1.0, 101), 2)
    ticks = [(f, f"{100 * f:.0f}%") for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    data = _series_ious(series, empty_union_iou)
    top = 12 + 15 * len(data)
    parts, x_of, y_of = _axes(width, height + top, 46, 34, top, 10, [0, 0.25, 0.5, 0.75, 1.0],
                              ticks, "IoU threshold X", "Prec@X")
    for (label, colour, _), (_, counts) in zip(data, series, strict=True):
        ys = precision_curve(counts, xs, empty_union_iou=empty_union_iou)
        points = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in zip(xs, ys, strict=True))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                     'stroke-width="2"/>')
        marks = precision_curve(counts, PREC_THRESHOLDS, empty_union_iou=empty_union_iou)
        for x, y in zip(PREC_THRESHOLDS, marks, strict=True):
            parts.append(f'<circle cx="{x_of(x):.1f}" cy="{y_of(y):.1f}" r="3" fill="{colour}">'
                         f'<title>{html.escape(label)}: Prec@{x:g} = {100 * y:.2f}%</title>'
                         '</circle>')
    parts += _legend(data, 56, 16)
    return _svg(width, height + top, "Prec@X curve", parts)


# --------------------------------------------------------------------------------------------
# Pictures


def data_uri(array: np.ndarray) -> str:
    data, mime = visualize.compact_image_bytes(array)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def gallery_images(picture: Any) -> tuple[np.ndarray, np.ndarray]:
    """(image with the ground-truth outline and the prediction, prior heat map on a 0..1
    scale), at most ``THUMB_HIGH`` px on the longer side. ``picture``: evaluate.PairPicture."""
    hw = visualize.display_size(picture.image.shape[:2], low=1, high=THUMB_HIGH)
    image = visualize.resize(picture.image, hw)
    pred = visualize.resize(picture.pred, hw)
    gt = visualize.resize(picture.gt, hw)
    colour = visualize.contrast_colour(picture.image, picture.pred if picture.pred.any()
                                       else picture.gt)
    drawn = visualize.overlay_mask(image, pred, colour=colour, outline_width=1)
    drawn = visualize.outline_ground_truth(drawn, gt, width=1)
    prior = visualize.heatmap_overlay(image, visualize.resize(picture.prior, hw), alpha=0.6)
    return drawn, prior


@dataclasses.dataclass(frozen=True)
class Shown:
    """One prediction in a gallery: what the model read, how it scored, the pictures."""

    expression: str
    iou: float
    intersection: int
    union: int
    picture: Any  # evaluate.PairPicture


@dataclasses.dataclass(frozen=True)
class GalleryItem:
    group: str  # 'worst' | 'median' | 'best'
    info: Any  # evaluate.PairInfo
    own: Shown
    shuffled: Shown | None = None


@dataclasses.dataclass(frozen=True)
class SplitSection:
    split: str
    series: list[tuple[str, PairCounts]]  # ('expressions as given', ...), ('shuffled', ...)
    gallery: list[GalleryItem]
    csv_names: list[str]


def build_gallery(evaluator: Any, variables: Any, split: str, infos: Sequence[Any],
                  counts: PairCounts, shuffled: PairCounts | None, *, empty_union_iou: float,
                  per_group: int = GALLERY_PER_GROUP) -> list[GalleryItem]:
    """The worst/median/best pairs of ``counts`` with their pictures, and for each the same
    pair under the shuffled run (its expression, IoU and pictures) when ``shuffled``."""
    groups = select_gallery(counts, empty_union_iou=empty_union_iou, per_group=per_group)
    chosen = [(g, pid) for g in GROUPS for pid in groups[g]]
    ids = [pid for _, pid in chosen]
    counts, ious = counts.sorted(), counts.sorted().iou(empty_union_iou=empty_union_iou)
    rows = np.searchsorted(counts.pair_id, ids)
    expression_ids = ids
    if shuffled is not None:
        shuffled = shuffled.sorted()
        shuffled_ious = shuffled.iou(empty_union_iou=empty_union_iou)
        shuffled_rows = np.searchsorted(shuffled.pair_id, ids)
        expression_ids = ids + [int(shuffled.expression_pair_id[r]) for r in shuffled_rows]
        ids = ids + ids
    pictures = evaluator.pair_pictures(variables, split, ids, expression_ids)
    items = []
    for k, (group, pid) in enumerate(chosen):
        r = rows[k]
        own = Shown(infos[pid].expression, float(ious[r]), int(counts.intersection[r]),
                    int(counts.union[r]), pictures[k])
        other = None
        if shuffled is not None:
            s = shuffled_rows[k]
            other = Shown(infos[int(shuffled.expression_pair_id[s])].expression,
                          float(shuffled_ious[s]), int(shuffled.intersection[s]),
                          int(shuffled.union[s]), pictures[len(chosen) + k])
        items.append(GalleryItem(group, infos[pid], own, other))
    return items


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 8px}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}
.charts{display:flex;flex-wrap:wrap;gap:12px}.meta{color:#555;font-size:90%}
.gallery{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:1em}
.card{border:1px solid #ddd;border-radius:4px;padding:6px;width:min-content;background:#fafafa}
.pics{display:flex;gap:4px}.card img{image-rendering:pixelated;display:block}
.cap{font-size:85%;margin:4px 0 2px;min-width:240px}.iou{font-weight:bold}
.shuf{border-top:1px dashed #bbb;margin-top:6px;padding-top:4px}.shuf .cap{color:#8a3b12}
.legend img{vertical-align:middle}
"""


def _results_table(results: Sequence[SplitResult]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in
                   ["dataset/split", "pairs", *(METRIC_HEADERS[k] for k in METRIC_KEYS)])
    rows = []
    for r in results:
        cells = "".join(f'<td class="n">{v:.2f}</td>' for v in r.percentages().values())
        rows.append(f"<tr><td>{html.escape(r.label)}</td>"
                    f'<td class="n">{int(r.metrics["pairs"])}</td>{cells}</tr>')
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _shown_html(shown: Shown, extra: str = "") -> str:
    drawn, prior = gallery_images(shown.picture)
    h, w = drawn.shape[:2]
    factor = -(-THUMB_LOW // max(h, w))  # shown enlarged (pixelated), not stored larger
    h, w = h * factor, w * factor
    return (f'<div class="pics"><img src="{data_uri(drawn)}" width="{w}" height="{h}" '
            f'alt="prediction and ground truth"><img src="{data_uri(prior)}" width="{w}" '
            f'height="{h}" alt="position prior"></div>'
            f'<div class="cap">{extra}\u201c{html.escape(shown.expression)}\u201d<br>'
            f'<span class="iou">IoU {shown.iou:.3f}</span> (I {shown.intersection:,} / '
            f'U {shown.union:,} px)</div>')


def _gallery_html(items: Sequence[GalleryItem]) -> str:
    out = []
    for group in GROUPS:
        cards = []
        for item in (i for i in items if i.group == group):
            info = item.info
            ids = (f"pair {info.pair_id}, ref {info.ref_id}, ann {info.ann_id}, "
                   f"image {info.image_id}" + (f", {info.source}" if info.source else ""))
            card = f'<div class="card">{_shown_html(item.own)}<div class="meta">{ids}</div>'
            if item.shuffled is not None:
                card += (f'<div class="shuf">{_shown_html(item.shuffled, "shuffled: ")}</div>')
            cards.append(card + "</div>")
        if cards:
            out.append(f"<h3>{group.capitalize()} {len(cards)}</h3>"
                       f'<div class="gallery">{"".join(cards)}</div>')
    return "".join(out)


def _legend_html() -> str:
    bar = visualize.colour_bar(90, 1.0, size=11)
    return ('<p class="legend">Pictures: <b>white outline with a dark edge</b> = ground truth; '
            '<b>coloured fill and outline</b> = prediction (the colour is picked to contrast '
            'with the object); right of each, the <b>position prior</b> (sigmoid of the locate '
            f'stage) on a fixed 0..1 scale <img src="{data_uri(bar)}" alt="colour scale 0 to 1">'
            '</p>')


def render_html(results: Sequence[SplitResult], metadata: Mapping[str, Any],
                sections: Sequence[SplitSection], *, empty_union_iou: float) -> str:
    """The whole report as one HTML string (pictures and charts embedded)."""
    title = (f"LTS evaluation: {metadata.get('dataset', '')}, checkpoint step "
             f"{metadata.get('checkpoint_step', '?')}")
    meta = ", ".join(f"{html.escape(str(k))}: {html.escape(str(v))}"
                     for k, v in metadata.items() if k != "folder")
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="meta">{meta}</p>',
            _results_table(results),
            '<p class="meta">mIoU: mean of per-pair IoU; oIoU: total intersection / total '
            "union; Prec@X: share of pairs with IoU &ge; X; all at the original resolution.</p>"]
    if any(s.gallery for s in sections):
        body.append(_legend_html())
    for section in sections:
        links = ", ".join(f'<a href="{html.escape(n)}">{html.escape(n)}</a>'
                          for n in section.csv_names)
        body.append(f"<h2>{html.escape(section.split)}</h2>"
                    f'<p class="meta">Per-pair tables: {links}</p>'
                    '<div class="charts">'
                    + histogram_svg(section.series, empty_union_iou=empty_union_iou)
                    + precision_svg(section.series, empty_union_iou=empty_union_iou)
                    + "</div>" + _gallery_html(section.gallery))
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# --------------------------------------------------------------------------------------------
# The whole folder


@dataclasses.dataclass(frozen=True)
class EvalRun:
    """One evaluated (split, shuffled) combination: its table row and per-pair counts."""

    result: SplitResult
    pairs: PairCounts


def write_evaluation(out_dir: str | Path, runs: Sequence[EvalRun], metadata: Mapping[str, Any],
                     *, evaluator: Any, variables: Any, gallery: int = GALLERY_PER_GROUP
                     ) -> dict[str, Path]:
    """Writes the tables, the per-pair CSVs and report.html into ``out_dir`` (replacing a
    previous folder of that name only once the new one is complete). ``evaluator``
    (evaluate.Evaluator) provides the pair ids and the gallery pictures; ``gallery`` pairs
    per group (0: none)."""
    from lts_jax.evaluate import pair_infos

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        results = [r.result for r in runs]
        paths = {f"table_{k}": v for k, v in write_results(tmp, results, metadata).items()}
        empty_union_iou = float(evaluator.empty_union_iou)
        sections = []
        for split in dict.fromkeys(r.result.split for r in runs):
            infos = pair_infos(evaluator.config, split)
            own = [r for r in runs if r.result.split == split and not r.result.shuffled]
            shuf = [r for r in runs if r.result.split == split and r.result.shuffled]
            names = []
            for run in own + shuf:
                if len(run.pairs) != len(infos) or not np.array_equal(
                        np.sort(run.pairs.pair_id), np.arange(len(infos))):
                    raise ValueError(f"{split}: {len(run.pairs)} evaluated pairs do not match "
                                     f"the {len(infos)} pairs of the split")
                name = pairs_csv_name(split, run.result.shuffled)
                paths[name] = write_pairs_csv(tmp / name, infos, run.pairs,
                                              empty_union_iou=empty_union_iou,
                                              shuffled=run.result.shuffled)
                names.append(name)
            series = ([("expressions as given", own[0].pairs)] if own else []) + (
                [("shuffled expressions", shuf[0].pairs)] if shuf else [])
            items = []
            if gallery > 0 and own:
                items = build_gallery(evaluator, variables, split, infos, own[0].pairs,
                                      shuf[0].pairs if shuf else None,
                                      empty_union_iou=empty_union_iou, per_group=gallery)
            sections.append(SplitSection(split, series, items, names))
        report = tmp / REPORT_NAME
        report.write_text(render_html(results, metadata, sections,
                                      empty_union_iou=empty_union_iou), encoding="utf-8")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    paths = {k: out_dir / Path(v).name for k, v in paths.items()}
    paths["report"] = out_dir / REPORT_NAME
    return paths
