"""Letterbox forward/inverse: placement, padding, and mask round trips at several aspect ratios."""

from __future__ import annotations

import numpy as np
import pytest

from lts_jax.letterbox import (
    MEAN_GREY,
    content_size,
    letterbox,
    letterbox_mask,
    letterbox_params,
    unletterbox,
)

S = 64


def _ellipse_mask(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((((yy - 0.45 * h) / (0.3 * h)) ** 2 + ((xx - 0.4 * w) / (0.25 * w)) ** 2) < 1).astype(
        np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("hw,expected", [((48, 64), (48, 64)), ((64, 48), (64, 48)),
                                         ((30, 60), (32, 64)), ((31, 17), (64, 35)),
                                         ((1, 500), (1, 64)), ((128, 128), (64, 64))])
def test_content_size_keeps_aspect_ratio(hw, expected):
    assert content_size(*hw, S) == expected


def test_letterbox_places_content_centred_and_pads_with_grey():
    h, w = 20, 40  # content 32 x 64: 16 rows of padding above, 16 below
    image = np.full((h, w, 3), 200, np.uint8)
    out, params = letterbox(image, S)
    assert out.shape == (S, S, 3) and out.dtype == np.uint8
    assert params == letterbox_params(h, w, S) and (params.pad_x, params.pad_y) == (0, 16)
    assert params.scale == pytest.approx(S / w)
    assert (out[16:48] == 200).all()
    assert (out[:16] == MEAN_GREY).all() and (out[48:] == MEAN_GREY).all()
    row = params.as_array()
    assert row.dtype == np.float32 and row.tolist() == pytest.approx([1.6, 0, 16])


def test_letterbox_mask_is_binary_and_zero_padded():
    mask = np.ones((10, 7), np.uint8)
    out = letterbox_mask(mask, S)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1}
    ch, cw = content_size(10, 7, S)
    p = letterbox_params(10, 7, S)
    assert out.sum() == ch * cw and out[:, p.pad_x:p.pad_x + cw].all()


# Upscaling (content side >= original side): nearest neighbour is invertible, round trip exact.
@pytest.mark.parametrize("hw", [(32, 32), (64, 48), (48, 64), (31, 17), (17, 31), (3, 5),
                                (63, 64), (21, 60)])
def test_mask_round_trip_is_exact_when_upscaling(hw):
    mask = _ellipse_mask(*hw)
    params = letterbox_params(*hw, S)
    back = unletterbox(letterbox_mask(mask, S).astype(bool), params, hw)
    assert back.dtype == np.bool_ and back.shape == hw
    assert np.array_equal(back, mask.astype(bool))


# Downscaling loses detail: the round trip is only close.
@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (101, 77), (333, 500)])
def test_mask_round_trip_iou_when_downscaling(hw):
    mask = _ellipse_mask(*hw)
    params = letterbox_params(*hw, S).as_array()  # as the batch carries it (float32)
    back = unletterbox(letterbox_mask(mask, S).astype(bool), params, hw)
    assert _iou(back, mask.astype(bool)) > 0.93
    soft = unletterbox(letterbox_mask(mask, S).astype(np.float32), params, hw)
    assert soft.dtype == np.float32 and soft.shape == hw
    assert _iou(soft > 0.5, mask.astype(bool)) > 0.93


def test_unletterbox_ignores_the_padding():
    hw = (16, 64)  # content is rows 24..39
    map_s = np.full((S, S), 5.0, np.float32)
    p = letterbox_params(*hw, S)
    map_s[p.pad_y:p.pad_y + 16] = -1.0
    assert (unletterbox(map_s, p, hw) == -1.0).all()


def test_unletterbox_rejects_params_of_another_image():
    with pytest.raises(ValueError, match="do not match"):
        unletterbox(np.zeros((S, S), np.float32), letterbox_params(20, 40, S), (40, 20))
