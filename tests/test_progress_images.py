"""The TensorBoard progress picture: fixed pairs, one prediction panel each, stacked."""

from __future__ import annotations

import numpy as np
import pytest

from lts_jax import progress_images
from lts_jax.evaluate import PairPicture


def _picture(shift: int) -> PairPicture:
    image = np.full((48, 64, 3), 90, np.uint8)
    gt = np.zeros((48, 64), bool)
    gt[10:30, 20:40] = True
    prior = np.zeros((48, 64), np.float32)
    prior[15:25, 25:35] = 0.8
    return PairPicture(image, gt, np.roll(gt, shift, axis=1), prior)


def test_pair_ids_are_fixed_and_spread_over_the_split():
    assert progress_images.progress_pair_ids(628) == [0, 209, 418, 627]
    assert progress_images.progress_pair_ids(628) == progress_images.progress_pair_ids(628)
    assert progress_images.progress_pair_ids(2) == [0, 1]
    assert progress_images.progress_pair_ids(0) == []


def test_pair_iou():
    picture = _picture(10)
    assert progress_images.pair_iou(picture.gt, picture.gt) == 1.0
    assert progress_images.pair_iou(picture.gt, picture.pred) == pytest.approx(200 / 600)
    assert progress_images.pair_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_progress_image_stacks_one_panel_per_pair():
    one = progress_images.progress_image([_picture(0)], ["the grey square"])
    three = progress_images.progress_image([_picture(0), _picture(5), _picture(10)],
                                           ["a", "b", "a much longer expression " * 4])
    assert one.dtype == np.uint8 and one.ndim == 3 and one.shape[2] == 3
    # Enlarged towards PANEL_SIZE on the longer side, image and prior side by side.
    assert one.shape[1] > 1.5 * progress_images.PANEL_SIZE
    assert three.shape[0] > 3 * 120 and three.shape[1] >= one.shape[1]
    # The prediction and the prior are drawn: colours other than the grey background.
    assert len(np.unique(one.reshape(-1, 3), axis=0)) > 10
    with pytest.raises(ValueError, match="1 pictures but 2 expressions"):
        progress_images.progress_image([_picture(0)], ["a", "b"])
