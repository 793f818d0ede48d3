"""eval.py's folder: naming, per-pair CSV, gallery choice, charts and the HTML (no model)."""

import csv
import re
import xml.etree.ElementTree as ET

import ml_collections
import numpy as np
import pytest

from lts_jax import evaluate, metrics, report
from lts_jax.evaluate import PairInfo, PairPicture
from lts_jax.metrics import PairCounts
from lts_jax.results_table import SplitResult


def _config(**changes):
    config = ml_collections.ConfigDict({
        "threshold": 0.5, "empty_union_iou": 0.0,
        "data": {"dataset": "refshapes", "data_dir": "/d", "image_size": 96,
                 "canvas_size": 96, "max_text_len": 16}})
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split("__")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def test_folder_names():
    assert report.eval_dir_name(1500, ["validation", "testA"], shuffled=False) == (
        "step_001500_validation-testA")
    assert report.eval_dir_name(7, ["testB"], shuffled=True, tags=["threshold0.35"]) == (
        "step_000007_testB_shuffled_threshold0.35")
    assert report.eval_dir_name(7, ["a/b c"], shuffled=False) == "step_000007_a-b-c"
    saved = _config()
    assert report.config_tags(_config(), saved) == []
    assert report.config_tags(_config(threshold=0.35), saved) == ["threshold0.35"]
    tags = report.config_tags(_config(data__image_size=128, empty_union_iou=1.0), saved)
    assert tags[0] == "emptyiou1" and re.fullmatch(r"cfg[0-9a-f]{8}", tags[1])
    # Only evaluation settings count: the batch size does not change the numbers.
    assert report.config_tags(_config(eval_batch_size=3), saved) == []


def _counts(ious_x100, shuffle=False):
    n = len(ious_x100)
    inter = np.asarray(ious_x100)
    union = np.full(n, 100)
    expr = np.roll(np.arange(n), 1) if shuffle else np.arange(n)
    return PairCounts(np.arange(n), inter, union, expr)


def test_gallery_groups_are_disjoint_and_ordered():
    counts = _counts([50, 10, 90, 30, 70, 20, 80, 60, 40, 0, 100, 55, 45])
    groups = report.select_gallery(counts, empty_union_iou=0.0, per_group=3)
    assert groups == {"worst": [9, 1, 5], "median": [12, 0, 11], "best": [10, 2, 6]}
    # Few pairs: the groups never repeat a pair.
    small = report.select_gallery(_counts([5, 1, 3, 2, 4]), empty_union_iou=0.0, per_group=4)
    ids = [i for g in report.GROUPS for i in small[g]]
    assert sorted(ids) == [0, 1, 2, 3, 4] and small["worst"] == [1, 3, 2, 4]
    # Ties go by pair id.
    tied = report.select_gallery(_counts([0] * 9), empty_union_iou=0.0, per_group=4)
    assert tied == {"worst": [0, 1, 2, 3], "median": [4], "best": [8, 7, 6, 5]}


def _infos(n):
    return [PairInfo(i, 100 + i // 2, 200 + i // 2, 7, 300 + i, f"expression {i}, \"quoted\"")
            for i in range(n)]


def test_pairs_csv_recomputes_the_metrics(tmp_path):
    counts = PairCounts([2, 0, 1, 3], [3, 0, 7, 5], [4, 0, 7, 10], [1, 2, 3, 0])
    path = report.write_pairs_csv(tmp_path / "p.csv", _infos(4), counts, empty_union_iou=0.0,
                                  shuffled=False)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["pair_id", "ref_id", "ann_id", "image_id", "sent_id", "expression",
                             "intersection", "union", "iou"]
    assert [r["pair_id"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[1]["expression"] == 'expression 1, "quoted"' and rows[3]["ref_id"] == "101"
    assert [float(r["iou"]) for r in rows] == [0.0, 1.0, 0.75, 0.5]
    again = metrics.pair_sums([int(r["intersection"]) for r in rows],
                              [int(r["union"]) for r in rows])
    assert again == counts.sums()
    path = report.write_pairs_csv(tmp_path / "s.csv", _infos(4), counts, empty_union_iou=0.0,
                                  shuffled=True)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["expression_pair_id"] == "2" and rows[0]["shuffled_expression"] == (
        'expression 2, "quoted"')
    infos = [PairInfo(i, 1, 2, 3, 4, "x", source="refcocog") for i in range(4)]
    with report.write_pairs_csv(tmp_path / "c.csv", infos, counts, empty_union_iou=0.0,
                                shuffled=False).open() as f:
        assert f.readline().startswith("pair_id,source,ref_id")


def test_precision_curve_matches_the_table_exactly():
    # IoUs exactly at the thresholds count, as in metrics.finalize.
    counts = PairCounts(np.arange(6), [5, 6, 69, 7, 0, 9], [10, 10, 100, 10, 0, 10],
                        np.arange(6))
    curve = report.precision_curve(counts, metrics.PREC_THRESHOLDS, empty_union_iou=0.0)
    table = metrics.finalize(counts.sums())
    assert curve.tolist() == [table[f"prec@{k}"] for k in metrics.PREC_THRESHOLDS]
    assert report.precision_curve(counts, [0.0], empty_union_iou=0.0).tolist() == [1.0]
    assert report.precision_curve(counts, [0.0], empty_union_iou=-1.0).tolist() == [5 / 6]


def test_charts_are_well_formed_svg():
    series = [("as given", _counts([90, 80, 100, 40])),
              ("shuffled", _counts([0, 10, 5, 100], shuffle=True))]
    for svg in (report.histogram_svg(series, empty_union_iou=0.0),
                report.precision_svg(series, empty_union_iou=0.0)):
        root = ET.fromstring(svg)
        assert root.tag.endswith("svg")
        assert "as given" in svg and "shuffled" in svg
    hist = report.histogram_svg(series[:1], empty_union_iou=0.0)
    assert hist.count("<rect") == 1 + 4 + 1  # frame, 4 non-empty bins (0.4, 0.8, 0.9, 1), legend


class _FakeEvaluator:
    """What write_evaluation reads from an Evaluator: config, empty_union_iou, pictures."""

    empty_union_iou = 0.0
    config = _config()

    def __init__(self):
        self.calls = []

    def pair_pictures(self, variables, split, pair_ids, expression_pair_ids=None):
        self.calls.append((split, list(pair_ids), list(expression_pair_ids)))
        rng = np.random.default_rng(0)
        out = []
        for _ in pair_ids:
            # Flat colours like RefShapes (noise would measure the PNG coder, not the page).
            image = np.full((48, 64, 3), rng.integers(0, 256, size=3), dtype=np.uint8)
            image[5:20, 5:25] = rng.integers(0, 256, size=3)
            gt = np.zeros((48, 64), bool)
            gt[10:30, 20:40] = True
            out.append(PairPicture(image, gt, np.roll(gt, 3, axis=1),
                                   rng.uniform(size=(48, 64)).astype(np.float32)))
        return out


def _runs(n=9):
    own, shuf = _counts(list(range(0, 90, 10))[:n]), _counts(list(range(n)), shuffle=True)
    metrics_own = metrics.finalize(own.sums())
    metrics_shuf = metrics.finalize(shuf.sums())
    return [report.EvalRun(SplitResult("refshapes", "validation", metrics_own), own),
            report.EvalRun(SplitResult("refshapes", "validation", metrics_shuf, True), shuf)]


def test_write_evaluation_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "pair_infos", lambda config, split: _infos(9))
    fake = _FakeEvaluator()
    out = tmp_path / "eval" / "step_000001_validation_shuffled"
    paths = report.write_evaluation(out, _runs(), {"checkpoint_step": 1, "dataset": "x"},
                                    evaluator=fake, variables=None)
    assert sorted(p.name for p in out.iterdir()) == [
        "eval_results.csv", "eval_results.json", "eval_results.md", "pairs_validation.csv",
        "pairs_validation_shuffled.csv", "report.html"]
    assert paths["report"] == out / "report.html"
    # One pictures call: the 9 pairs (worst 4, median 1, best 4), then the same pairs with
    # the expressions they read in the shuffled run.
    ((split, ids, expression_ids),) = fake.calls
    assert split == "validation" and ids[:9] == [0, 1, 2, 3, 4, 8, 7, 6, 5] == ids[9:]
    assert expression_ids[:9] == ids[:9]
    assert expression_ids[9:] == [(i - 1) % 9 for i in ids[:9]]
    page = (out / "report.html").read_text()
    assert len(re.findall(r'<img src="data:image/(?:png|jpeg);base64,', page)) == 9 * 4 + 1
    assert "Worst 4" in page and "Median 1" in page and "Best 4" in page
    assert "expression 8, &quot;quoted&quot;" in page
    assert len(page) < 300_000
    # The same evaluation again replaces the folder (no temporary folders left behind).
    (out / "stray.txt").write_text("old")
    report.write_evaluation(out, _runs(), {"checkpoint_step": 1}, evaluator=fake,
                            variables=None, gallery=0)
    assert not (out / "stray.txt").exists()
    assert "<img src=\"data:image" not in (out / "report.html").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    # A mismatch between evaluated pairs and the split leaves the previous folder alone.
    monkeypatch.setattr(evaluate, "pair_infos", lambda config, split: _infos(10))
    with pytest.raises(ValueError, match="9 evaluated pairs"):
        report.write_evaluation(out, _runs(), {}, evaluator=fake, variables=None)
    assert (out / "report.html").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
