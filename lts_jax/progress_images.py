"""A fixed set of validation pairs drawn at each evaluation during training (TensorBoard images).

The same pairs every time, so TensorBoard's step slider shows how the prediction and the
position prior of each one develop. Each row is ``visualize.prediction_panel`` of one pair
(image with the prediction and the ground-truth outline | prior heat map with its colour
bar | expression and IoU); the rows are stacked into one picture per evaluated split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lts_jax import visualize

NUM_PAIRS = 4  # rows per picture: enough to see progress, small enough to log every eval
PANEL_SIZE = 160  # longer side of each pair's image in px


def progress_pair_ids(num_pairs: int, count: int = NUM_PAIRS) -> list[int]:
    """``count`` pair ids spread evenly over a split of ``num_pairs`` (the same every eval)."""
    if num_pairs <= 0:
        return []
    count = min(count, num_pairs)
    return [int(i) for i in np.linspace(0, num_pairs - 1, count).round().astype(int)]


def pair_iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """IoU of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(gt, pred).sum()
    return float(np.logical_and(gt, pred).sum() / union) if union else 1.0


def progress_image(pictures: Sequence[Any], expressions: Sequence[str]) -> np.ndarray:
    """uint8[H, W, 3]: one prediction panel per pair, stacked (``pictures``:
    evaluate.PairPicture, ``expressions`` the text each was read with)."""
    if len(pictures) != len(expressions):
        raise ValueError(f"{len(pictures)} pictures but {len(expressions)} expressions")
    rows = []
    for picture, expression in zip(pictures, expressions, strict=True):
        drawn = visualize.outline_ground_truth(picture.image, picture.gt)
        rows.append(visualize.prediction_panel(
            drawn, picture.pred, picture.prior, expression, low=PANEL_SIZE, high=PANEL_SIZE,
            note=f"IoU {pair_iou(picture.gt, picture.pred):.3f}"))
    width = max(row.shape[1] for row in rows)
    padded = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255)
              for r in rows]
    return np.concatenate(padded, axis=0)


def draw_progress(evaluator: Any, variables: Any, split: str, pair_ids: Sequence[int],
                  expressions: Sequence[str]) -> np.ndarray:
    """The picture of ``pair_ids`` of ``split`` under ``variables`` (any process can call it;
    it runs on this process's first device, see Evaluator.pair_pictures)."""
    return progress_image(evaluator.pair_pictures(variables, split, pair_ids), expressions)
