"""Markdown / CSV / JSON results files."""

import csv
import io
import json

import pytest

from lts_jax import results_table
from lts_jax.results_table import SplitResult

METRICS = {
    "mIoU": 0.5,
    "oIoU": 0.123456,
    "prec@0.5": 1.0,
    "prec@0.6": 0.75,
    "prec@0.7": 0.5,
    "prec@0.8": 0.25,
    "prec@0.9": 0.0,
    "pairs": 4,
}


def _results():
    return [
        SplitResult("refshapes", "validation", METRICS),
        SplitResult("refshapes", "validation", {**METRICS, "oIoU": 0.05}, shuffled=True),
    ]


def test_markdown_table_rows_and_percentages():
    md = results_table.format_markdown(_results())
    lines = md.strip().splitlines()
    assert lines[0] == (
        "| dataset/split | pairs | mIoU | oIoU | Prec@0.5 | Prec@0.6 | Prec@0.7 | Prec@0.8 "
        "| Prec@0.9 |"
    )
    assert lines[2] == (
        "| refshapes/validation | 4 | 50.00 | 12.35 | 100.00 | 75.00 | 50.00 | 25.00 | 0.00 |"
    )
    assert lines[3].startswith("| refshapes/validation (shuffled expressions) | 4 | 50.00 | 5.00 |")
    assert len(lines) == 4


def test_csv_content():
    rows = list(csv.DictReader(io.StringIO(results_table.format_csv(_results()))))
    assert [r["shuffled"] for r in rows] == ["False", "True"]
    assert rows[0]["dataset"] == "refshapes" and rows[0]["split"] == "validation"
    assert rows[0]["pairs"] == "4"
    assert float(rows[0]["oIoU"]) == pytest.approx(12.3456)
    assert float(rows[1]["oIoU"]) == pytest.approx(5.0)


def test_write_results_files(tmp_path):
    meta = {"checkpoint": "best", "checkpoint_step": 17, "threshold": 0.35, "empty_union_iou": 0.0}
    paths = results_table.write_results(tmp_path, _results(), meta)
    assert {p.name for p in paths.values()} == {
        "eval_results.md", "eval_results.csv", "eval_results.json"
    }
    md = paths["md"].read_text()
    assert "checkpoint_step: 17" in md and "threshold: 0.35" in md
    assert "| refshapes/validation | 4 | 50.00 |" in md
    data = json.loads(paths["json"].read_text())
    assert data["checkpoint_step"] == 17 and data["threshold"] == 0.35
    assert data["unit"] == "percent"
    assert set(data["metric_definitions"]) >= {"mIoU", "oIoU", "prec@0.5", "prec@0.9", "threshold"}
    first, second = data["results"]
    assert first["pairs"] == 4 and not first["shuffled"] and second["shuffled"]
    assert first["metrics"]["oIoU"] == pytest.approx(12.3456)
    assert first["metrics"]["prec@0.6"] == pytest.approx(75.0)
    assert paths["csv"].read_text() == results_table.format_csv(_results())
