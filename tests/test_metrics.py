"""Metric rules against hand-computed cases."""

import math

import numpy as np
import pytest

from lts_jax import metrics
from lts_jax.metrics import MetricSums


def test_binarize_boundary_at_half_is_logit_zero():
    zero = np.float32(0.0)
    tiny_neg, tiny_pos = np.nextafter(zero, np.float32(-1)), np.nextafter(zero, np.float32(1))
    logits = np.array([0.0, -0.0, tiny_neg, tiny_pos, -3.0, 3.0], np.float32)
    assert metrics.binarize(logits, 0.5).tolist() == [True, True, False, True, False, True]


def test_binarize_exactly_at_non_half_threshold_counts():
    t = 0.35
    at = metrics.logit_threshold(t)
    assert at == pytest.approx(math.log(0.35 / 0.65))
    logits = np.array([at, np.nextafter(at, -np.inf), np.nextafter(at, np.inf)], np.float64)
    assert metrics.binarize(logits, t).tolist() == [True, False, True]
    # Agrees with sigmoid(x) >= t away from the boundary.
    xs = np.linspace(-4, 4, 101)
    assert np.array_equal(metrics.binarize(xs, t), 1 / (1 + np.exp(-xs)) >= t)


def test_binarize_float32_input_uses_exact_boundary():
    # The float32 value just below logit(0.35) must stay background even though
    # rounding the threshold to float32 could land on it.
    at = metrics.logit_threshold(0.35)
    below = np.float32(at)
    if float(below) >= at:
        below = np.nextafter(below, np.float32(-np.inf))
    above = np.nextafter(below, np.float32(np.inf))
    assert metrics.binarize(np.array([below, above], np.float32), 0.35).tolist() == [False, True]


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_logit_threshold_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="threshold"):
        metrics.logit_threshold(bad)


def test_intersection_union_counts():
    pred = np.array([[1, 1, 0], [0, 0, 0]])
    gt = np.array([[0, 1, 1], [0, 0, 1]])
    assert metrics.intersection_union(pred, gt) == (1, 4)
    with pytest.raises(ValueError, match="shape"):
        metrics.intersection_union(pred, gt[:, :2])


def test_empty_prediction_scores_zero():
    s = metrics.pair_sums([0], [5])
    r = metrics.finalize(s)
    assert r["mIoU"] == 0.0 and r["oIoU"] == 0.0 and r["prec@0.5"] == 0.0 and r["pairs"] == 1


def test_empty_union_uses_configured_value():
    s = metrics.pair_sums([0, 2], [0, 4])  # both empty; IoU 0.5
    assert metrics.finalize(s)["mIoU"] == pytest.approx(0.25)
    assert metrics.finalize(s)["prec@0.5"] == 0.5
    s1 = metrics.pair_sums([0, 2], [0, 4], empty_union_iou=1.0)
    r1 = metrics.finalize(s1, empty_union_iou=1.0)
    assert r1["mIoU"] == pytest.approx(0.75)
    assert r1["prec@0.9"] == 0.5  # the empty pair hits every threshold
    assert r1["oIoU"] == 0.5  # oIoU ignores empty unions (they add nothing)
    # Every union empty: oIoU is the configured value, not a division by zero.
    assert metrics.finalize(metrics.pair_sums([0], [0]), empty_union_iou=1.0)["oIoU"] == 1.0
    assert metrics.finalize(metrics.pair_sums([0], [0]))["oIoU"] == 0.0


def test_prec_threshold_boundaries_are_inclusive_and_exact():
    # IoUs exactly 0.5, 0.6, 0.7, 0.8, 0.9 and 1.0 and one just below 0.7.
    inters = [1, 3, 7, 4, 9, 5, 699]
    unions = [2, 5, 10, 5, 10, 5, 1000]
    s = metrics.pair_sums(inters, unions)
    # Pair j (IoU k_j) hits thresholds <= k_j.
    assert s.hits == (7, 6, 4, 3, 2)
    r = metrics.finalize(s)
    assert r["prec@0.5"] == 1.0 and r["prec@0.9"] == pytest.approx(2 / 7)
    assert r["oIoU"] == pytest.approx(sum(inters) / sum(unions))
    assert r["mIoU"] == pytest.approx(np.mean(np.array(inters) / np.array(unions)))


def test_invalid_counts_rejected():
    with pytest.raises(ValueError, match="invalid"):
        metrics.pair_sums([3], [2])


def test_multi_batch_sum_equals_single_pass():
    rng = np.random.default_rng(0)
    unions = rng.integers(0, 50, size=37)
    inters = np.array([rng.integers(0, u + 1) for u in unions])
    single = metrics.pair_sums(inters, unions)
    batches = [metrics.pair_sums(inters[i : i + 8], unions[i : i + 8]) for i in range(0, 37, 8)]
    total = metrics.sum_over(batches)
    assert (total.intersection, total.union, total.pairs, total.hits) == (
        single.intersection,
        single.union,
        single.pairs,
        single.hits,
    )
    assert total.iou_sum == pytest.approx(single.iou_sum, rel=1e-12)
    assert metrics.finalize(total) == pytest.approx(metrics.finalize(single), rel=1e-12)


def test_array_roundtrip_is_exact_beyond_int32():
    s = MetricSums(
        intersection=5_000_000_000, union=7_000_000_001, iou_sum=1234.5678901234567,
        pairs=10_001, hits=(9, 8, 7, 6, 5),
    )
    assert MetricSums.from_array(s.to_array()) == s


def test_simulated_hosts_combine_to_single_host_result():
    rng = np.random.default_rng(1)
    unions = rng.integers(1, 400_000, size=24)
    inters = (unions * rng.uniform(0, 1, size=24)).astype(np.int64)
    single = metrics.pair_sums(inters, unions)
    # Each "host" serialises its sums the way allgather_sums does (int32 view),
    # the receiver decodes and adds them.
    wire = np.stack([metrics.pair_sums(inters[h::3], unions[h::3]).to_array().view(np.int32)
                     for h in range(3)])
    combined = metrics.sum_over([MetricSums.from_array(row.view(np.int64)) for row in wire])
    assert combined.intersection == single.intersection and combined.hits == single.hits
    assert metrics.finalize(combined) == pytest.approx(metrics.finalize(single), rel=1e-12)


def test_allgather_sums_single_process_is_identity():
    s = metrics.pair_sums([3_000_000_000 // 4, 5], [3_000_000_000 // 2, 10])
    s = s + s + s  # intersection sum exceeds int32
    assert metrics.allgather_sums(s) == s


def test_finalize_rejects_zero_pairs():
    with pytest.raises(ValueError, match="no"):
        metrics.finalize(MetricSums())


def test_pair_counts_iou_sums_sort_and_concatenate():
    a = metrics.PairCounts([3, 0], [1, 0], [4, 0], [3, 0])
    b = metrics.PairCounts([1, 2], [5, 2], [5, 3], [2, 1])
    both = (a + b).sorted()
    assert both.pair_id.tolist() == [0, 1, 2, 3] and len(both) == 4
    assert both.expression_pair_id.tolist() == [0, 2, 1, 3]
    assert both.iou().tolist() == [0.0, 1.0, 2 / 3, 0.25]
    assert both.iou(empty_union_iou=1.0)[0] == 1.0
    # The same sums as pair_sums over the same counts, and the same metrics.
    assert both.sums() == metrics.pair_sums([0, 5, 2, 1], [0, 5, 3, 4])
    assert both.to_array().shape == (4, 4) and both.to_array().dtype == np.int64
    assert len(metrics.PairCounts.empty()) == 0
    with pytest.raises(ValueError, match="length"):
        metrics.PairCounts([0, 1], [0], [0], [0])


def test_allgather_pairs_single_process_sorts():
    pairs = metrics.PairCounts([2, 0, 1], [1, 2, 3], [4, 5, 6], [2, 0, 1])
    out = metrics.allgather_pairs(pairs)
    assert out.pair_id.tolist() == [0, 1, 2] and out.intersection.tolist() == [2, 3, 1]


def test_allgather_pairs_two_simulated_processes_of_different_lengths(monkeypatch):
    import jax
    from jax.experimental import multihost_utils

    mine = metrics.PairCounts([4, 0], [1, 2], [3, 4], [0, 4])
    other = metrics.PairCounts([1, 3, 2], [5, 6, 7], [8, 9, 2**40], [1, 2, 3])

    def fake_allgather(x):
        x = np.asarray(x)
        if x.shape == (1,):
            return np.stack([x, np.asarray([len(other)], np.int32)])
        table = np.full((4, x.shape[1] // 2), -1, np.int64)
        table[:, : len(other)] = other.to_array()
        return np.stack([x, table.view(np.int32)])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
    out = metrics.allgather_pairs(mine)
    assert out.pair_id.tolist() == [0, 1, 2, 3, 4]
    assert out.intersection.tolist() == [2, 5, 7, 6, 1]
    assert out.union.tolist() == [4, 8, 2**40, 9, 3]  # int64 survives the int32 transport
    assert out.expression_pair_id.tolist() == [4, 1, 3, 2, 0]
