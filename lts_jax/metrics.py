"""Referring-segmentation metrics: mIoU, oIoU and Prec@k, computed from exact sums.

Evaluation accumulates a ``MetricSums`` (integer pixel counts, a float64 IoU sum and
integer hit counts) over batches and hosts, and only then turns it into ratios with
``finalize``. Rules (all at the original image resolution, one entry per
(object, expression) pair):

* a pixel is foreground iff ``logit >= log(t / (1 - t))`` in float64, i.e. iff
  ``sigmoid(logit) >= t`` for the configured threshold ``t`` (0.5 -> ``logit >= 0``);
* pair IoU = I / U; a pair whose union is empty (empty prediction and empty
  ground truth) scores ``empty_union_iou`` (0 by default);
* mIoU = mean over pairs of the pair IoU;
* oIoU (overall / cumulative IoU) = sum of I / sum of U over all pairs
  (``empty_union_iou`` if every union is empty);
* Prec@k = fraction of pairs with IoU >= k; the comparison is exact rational
  arithmetic (I * 10 >= 5 * U for k = 0.5), so IoU exactly at k counts.

``PairCounts`` keeps each pair's intersection and union (by pair id) so any of these, or
another paper's metric, can be recomputed from the per-pair table eval.py writes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

PREC_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
METRIC_KEYS: tuple[str, ...] = ("mIoU", "oIoU") + tuple(f"prec@{k}" for k in PREC_THRESHOLDS)


def logit_threshold(threshold: float) -> float:
    """The logit at which ``sigmoid(logit) == threshold`` (exactly 0.0 for 0.5)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    # log(t / (1 - t)) rather than log(t) - log1p(-t): the ratio is exactly 1.0 for 0.5.
    return math.log(threshold / (1.0 - threshold))


def binarize(logits: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground mask: ``logits >= logit(threshold)``, compared in float64.

    Comparing in float64 keeps the boundary exact: a float32 comparison would round
    the threshold logit and move the boundary for thresholds other than 0.5.
    """
    return np.asarray(logits, dtype=np.float64) >= logit_threshold(threshold)


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Pixel counts of pred AND gt and pred OR gt (both boolean-like, same shape)."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


# Prec@k thresholds as exact fractions: 0.7 -> 7/10, not the binary float 0.69999...
_PREC_FRACTIONS: tuple[Fraction, ...] = tuple(Fraction(str(k)) for k in PREC_THRESHOLDS)


def _threshold_hits(inter: int, union: int) -> list[int]:
    """1 per Prec@k threshold with I / U >= k, decided in exact integer arithmetic."""
    return [int(inter * f.denominator >= f.numerator * union) for f in _PREC_FRACTIONS]


@dataclasses.dataclass(frozen=True)
class MetricSums:
    """Additive evaluation state; add with ``+``, finalise with ``finalize``.

    ``hits[j]`` counts pairs with IoU >= ``PREC_THRESHOLDS[j]``. Counts are Python ints
    (exact, unbounded); ``iou_sum`` is a float64 sum of per-pair IoUs.
    """

    intersection: int = 0
    union: int = 0
    iou_sum: float = 0.0
    pairs: int = 0
    hits: tuple[int, ...] = (0,) * len(PREC_THRESHOLDS)

    def __add__(self, other: MetricSums) -> MetricSums:
        return MetricSums(
            intersection=self.intersection + other.intersection,
            union=self.union + other.union,
            iou_sum=float(np.float64(self.iou_sum) + np.float64(other.iou_sum)),
            pairs=self.pairs + other.pairs,
            hits=tuple(a + b for a, b in zip(self.hits, other.hits, strict=True)),
        )

    def to_array(self) -> np.ndarray:
        """int64 vector [I, U, pairs, hits..., iou_sum bits] for cross-host gathering."""
        iou_bits = np.array([self.iou_sum], dtype=np.float64).view(np.int64)
        counts = np.array([self.intersection, self.union, self.pairs, *self.hits], np.int64)
        return np.concatenate([counts, iou_bits])

    @classmethod
    def from_array(cls, vec: np.ndarray) -> MetricSums:
        """Inverse of ``to_array``."""
        vec = np.asarray(vec, dtype=np.int64)
        n_hits = len(PREC_THRESHOLDS)
        if vec.shape != (4 + n_hits,):
            raise ValueError(f"expected a vector of length {4 + n_hits}, got shape {vec.shape}")
        return cls(
            intersection=int(vec[0]),
            union=int(vec[1]),
            pairs=int(vec[2]),
            hits=tuple(int(h) for h in vec[3 : 3 + n_hits]),
            iou_sum=float(vec[3 + n_hits :].view(np.float64)[0]),
        )


def pair_sums(
    intersections: Sequence[int] | np.ndarray,
    unions: Sequence[int] | np.ndarray,
    *,
    empty_union_iou: float = 0.0,
) -> MetricSums:
    """Sums over a set of pairs given each pair's intersection and union pixel counts."""
    inters = [int(i) for i in np.asarray(intersections).reshape(-1)]
    unis = [int(u) for u in np.asarray(unions).reshape(-1)]
    if len(inters) != len(unis):
        raise ValueError("intersections and unions differ in length")
    iou_sum = np.float64(0.0)
    hits = [0] * len(PREC_THRESHOLDS)
    for inter, union in zip(inters, unis, strict=True):
        if inter > union or inter < 0:
            raise ValueError(f"invalid counts: intersection {inter}, union {union}")
        if union == 0:
            iou = np.float64(empty_union_iou)
            pair_hits = [int(iou >= k) for k in PREC_THRESHOLDS]
        else:
            iou = np.float64(inter) / np.float64(union)
            pair_hits = _threshold_hits(inter, union)
        iou_sum += iou
        hits = [h + p for h, p in zip(hits, pair_hits, strict=True)]
    return MetricSums(
        intersection=sum(inters),
        union=sum(unis),
        iou_sum=float(iou_sum),
        pairs=len(inters),
        hits=tuple(hits),
    )


def sum_over(parts: Sequence[MetricSums]) -> MetricSums:
    """Adds up per-batch or per-host sums."""
    total = MetricSums()
    for part in parts:
        total = total + part
    return total


def allgather_sums(sums: MetricSums) -> MetricSums:
    """Adds this process's sums to every other process's (a no-op on one process).

    The int64 vector travels as int32 pairs because JAX (x64 disabled) would
    truncate int64 to int32; the bit-level view keeps counts and the float64 IoU
    sum exact. The host-side total is the same on every process.
    """
    from jax.experimental import multihost_utils

    vec = sums.to_array()
    gathered = multihost_utils.process_allgather(vec.view(np.int32))
    gathered = np.asarray(gathered, dtype=np.int32).reshape(-1, vec.size * 2)
    return sum_over([MetricSums.from_array(row.view(np.int64)) for row in gathered])


def mean_iou(sums: MetricSums) -> float:
    """Mean over pairs of the pair IoU."""
    return sums.iou_sum / sums.pairs


def overall_iou(sums: MetricSums, *, empty_union_iou: float = 0.0) -> float:
    """Cumulative intersection over cumulative union."""
    if sums.union == 0:
        return float(empty_union_iou)
    return sums.intersection / sums.union


def finalize(sums: MetricSums, *, empty_union_iou: float = 0.0) -> dict[str, float]:
    """Ratios in [0, 1] keyed 'mIoU', 'oIoU', 'prec@0.5'..'prec@0.9', plus 'pairs'."""
    if sums.pairs == 0:
        raise ValueError("no (object, expression) pairs were evaluated")
    out = {
        "mIoU": mean_iou(sums),
        "oIoU": overall_iou(sums, empty_union_iou=empty_union_iou),
    }
    for k, hit in zip(PREC_THRESHOLDS, sums.hits, strict=True):
        out[f"prec@{k}"] = hit / sums.pairs
    out["pairs"] = sums.pairs
    return out


@dataclasses.dataclass(frozen=True)
class PairCounts:
    """Per-pair pixel counts, one entry per evaluated (object, expression) pair.

    ``pair_id`` is the pair's index in evaluation order; ``expression_pair_id`` the pair whose
    expression the model read (the same pair unless expressions were shuffled). All int64[n].
    """

    pair_id: np.ndarray
    intersection: np.ndarray
    union: np.ndarray
    expression_pair_id: np.ndarray

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name,
                               np.asarray(getattr(self, field.name), np.int64).reshape(-1))
        n = self.pair_id.size
        if any(getattr(self, f.name).size != n for f in dataclasses.fields(self)):
            raise ValueError("PairCounts fields differ in length")

    @classmethod
    def empty(cls) -> PairCounts:
        return cls(*(np.zeros((0,), np.int64) for _ in range(4)))

    def __len__(self) -> int:
        return int(self.pair_id.size)

    def __add__(self, other: PairCounts) -> PairCounts:
        """Both sets of pairs (concatenated; see ``sorted``)."""
        return PairCounts(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                            for f in dataclasses.fields(self)))

    def sorted(self) -> PairCounts:
        """The pairs in pair-id order."""
        order = np.argsort(self.pair_id, kind="stable")
        return PairCounts(*(getattr(self, f.name)[order] for f in dataclasses.fields(self)))

    def iou(self, *, empty_union_iou: float = 0.0) -> np.ndarray:
        """float64[n] per-pair IoU; an empty union scores ``empty_union_iou``."""
        union = self.union.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = self.intersection.astype(np.float64) / union
        return np.where(self.union == 0, np.float64(empty_union_iou), iou)

    def sums(self, *, empty_union_iou: float = 0.0) -> MetricSums:
        """The ``MetricSums`` of these pairs (``pair_sums``)."""
        return pair_sums(self.intersection, self.union, empty_union_iou=empty_union_iou)

    def to_array(self) -> np.ndarray:
        """int64[4, n]: pair_id, intersection, union, expression_pair_id."""
        return np.stack([getattr(self, f.name) for f in dataclasses.fields(self)])


def allgather_pairs(pairs: PairCounts) -> PairCounts:
    """Every process's pairs, in pair-id order, on every process (a sort on one process).

    Processes may hold different numbers of pairs: each pads to the longest with pair id -1
    (dropped after the gather). int64 travels as int32 pairs, as in ``allgather_sums``.
    """
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return pairs.sorted()
    sizes = multihost_utils.process_allgather(np.asarray([len(pairs)], np.int32))
    longest = int(np.max(np.asarray(sizes)))
    table = np.full((4, longest), -1, np.int64)
    table[:, : len(pairs)] = pairs.to_array()
    gathered = multihost_utils.process_allgather(table.view(np.int32))
    rows = np.asarray(gathered, np.int32).reshape(-1, 4, 2 * longest).view(np.int64)
    merged = np.concatenate(list(rows), axis=1)
    merged = merged[:, merged[0] >= 0]
    return PairCounts(*merged).sorted()
