"""Evaluation results as a Markdown table, CSV and JSON (eval_results.{md,csv,json}).

train.py writes them into the workdir at the end of training; eval.py into its own folder
under <workdir>/eval/ beside the per-pair tables and the HTML report (lts_jax/report.py).

Metric values arrive as fractions in [0, 1] (``lts_jax.metrics.finalize``) and are
written as percentages everywhere: two decimals in the Markdown table, full
precision in CSV and JSON.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lts_jax.metrics import METRIC_KEYS, PREC_THRESHOLDS

RESULTS_STEM = "eval_results"

METRIC_DEFINITIONS: dict[str, str] = {
    "mIoU": "mean over (object, expression) pairs of intersection/union at the original "
    "image resolution; a pair with an empty union scores empty_union_iou",
    "oIoU": "overall (cumulative) IoU: sum of intersections over sum of unions of all pairs",
    **{
        f"prec@{k}": f"percentage of pairs whose IoU >= {k} (exact comparison)"
        for k in PREC_THRESHOLDS
    },
    "pairs": "number of (object, expression) pairs evaluated",
    "threshold": "a pixel is foreground iff sigmoid(logit) >= threshold "
    "(computed as logit >= log(threshold / (1 - threshold)))",
}

METRIC_HEADERS: dict[str, str] = {"mIoU": "mIoU", "oIoU": "oIoU"} | {
    f"prec@{k}": f"Prec@{k}" for k in PREC_THRESHOLDS
}


# Metadata shown above the Markdown table (all of it goes into the JSON).
_CAPTION_KEYS = ("checkpoint", "checkpoint_step", "threshold", "empty_union_iou")


@dataclasses.dataclass(frozen=True)
class SplitResult:
    """Metrics of one dataset split; ``metrics`` holds fractions plus 'pairs'."""

    dataset: str
    split: str
    metrics: Mapping[str, float]
    shuffled: bool = False

    @property
    def label(self) -> str:
        """'dataset/split', marked when expressions were shuffled."""
        tag = " (shuffled expressions)" if self.shuffled else ""
        return f"{self.dataset}/{self.split}{tag}"

    def percentages(self) -> dict[str, float]:
        """Metric values in percent, in METRIC_KEYS order."""
        return {k: 100.0 * float(self.metrics[k]) for k in METRIC_KEYS}


def format_markdown(results: Sequence[SplitResult]) -> str:
    """A Markdown table: one row per split, one column per metric (percent, 2 decimals)."""
    header = ["dataset/split", "pairs", *(METRIC_HEADERS[k] for k in METRIC_KEYS)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for r in results:
        values = [f"{v:.2f}" for v in r.percentages().values()]
        lines.append("| " + " | ".join([r.label, str(int(r.metrics["pairs"])), *values]) + " |")
    return "\n".join(lines) + "\n"


def format_csv(results: Sequence[SplitResult]) -> str:
    """CSV with columns dataset, split, shuffled, pairs and the metrics in percent."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["dataset", "split", "shuffled", "pairs", *METRIC_KEYS])
    for r in results:
        pct = r.percentages()
        writer.writerow(
            [r.dataset, r.split, r.shuffled, int(r.metrics["pairs"]), *(repr(pct[k]) for k in pct)]
        )
    return buf.getvalue()


def results_json(results: Sequence[SplitResult], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready dict: metadata (threshold, step, ...), units, definitions and rows."""
    return {
        **metadata,
        "unit": "percent",
        "metric_definitions": METRIC_DEFINITIONS,
        "results": [
            {
                "dataset": r.dataset,
                "split": r.split,
                "shuffled": r.shuffled,
                "pairs": int(r.metrics["pairs"]),
                "metrics": r.percentages(),
            }
            for r in results
        ],
    }


def run_metadata(
    config: Any, workdir: str | Path, step: int, checkpoint: str
) -> dict[str, Any]:
    """What train.py and eval.py record beside their results: the run, which checkpoint
    ('best' or 'latest') at which step, and the settings the numbers depend on."""
    return {
        "workdir": str(workdir),
        "checkpoint": checkpoint,
        "checkpoint_step": int(step),
        "dataset": str(config.data.dataset),
        "threshold": float(config.threshold),
        "empty_union_iou": float(config.empty_union_iou),
        "image_size": int(config.data.image_size),
    }


def write_results(
    out_dir: str | Path, results: Sequence[SplitResult], metadata: Mapping[str, Any]
) -> dict[str, Path]:
    """Writes eval_results.md/.csv/.json into ``out_dir``; returns their paths by suffix."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{RESULTS_STEM}.{ext}" for ext in ("md", "csv", "json")}
    caption = ", ".join(f"{k}: {metadata[k]}" for k in _CAPTION_KEYS if k in metadata)
    paths["md"].write_text((f"{caption}\n\n" if caption else "") + format_markdown(results))
    paths["csv"].write_text(format_csv(results))
    paths["json"].write_text(json.dumps(results_json(results, metadata), indent=2) + "\n")
    return paths
