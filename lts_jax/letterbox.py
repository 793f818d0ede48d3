"""Letterboxing: fit an image into an S x S square keeping its aspect ratio, and the inverse.

The content size is computed with integer arithmetic from (H, W, S) alone, so the forward and the
inverse agree exactly whatever precision the stored parameters went through (the batch carries
them as float32). Content is centred; when the leftover is odd the extra pixel goes to the
right/bottom.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

# ImageNet mean as uint8: padding then looks like "average image" to a pretrained backbone.
MEAN_GREY: tuple[int, int, int] = (124, 116, 104)


class LetterboxParams(NamedTuple):
    """How an H x W image was placed in the S x S square."""

    scale: float  # content pixels per original pixel
    pad_x: int  # columns of padding left of the content
    pad_y: int  # rows of padding above the content

    def as_array(self) -> np.ndarray:
        """float32[3] (scale, pad_x, pad_y), the layout of the batch field 'letterbox'."""
        return np.asarray([self.scale, self.pad_x, self.pad_y], dtype=np.float32)


def content_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) of the resized content: long side = size, short side rounded half up, >= 1."""
    if height <= 0 or width <= 0 or size <= 0:
        raise ValueError(f"sizes must be positive, got {height=} {width=} {size=}")
    if width >= height:
        return max(1, (height * size + width // 2) // width), size
    return size, max(1, (width * size + height // 2) // height)


def letterbox_params(height: int, width: int, size: int) -> LetterboxParams:
    """Parameters letterbox() uses for an H x W input and side S."""
    ch, cw = content_size(height, width, size)
    return LetterboxParams(scale=size / max(height, width), pad_x=(size - cw) // 2,
                           pad_y=(size - ch) // 2)


def _place(content: np.ndarray, size: int, params: LetterboxParams, fill: object) -> np.ndarray:
    out = np.empty((size, size) + content.shape[2:], dtype=content.dtype)
    out[...] = fill
    ch, cw = content.shape[:2]
    out[params.pad_y:params.pad_y + ch, params.pad_x:params.pad_x + cw] = content
    return out


def letterbox(image: np.ndarray, size: int,
              fill: Sequence[int] = MEAN_GREY) -> tuple[np.ndarray, LetterboxParams]:
    """uint8[H, W, 3] -> (uint8[S, S, 3], params); bilinear resize, constant padding."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
    h, w = image.shape[:2]
    params = letterbox_params(h, w, size)
    ch, cw = content_size(h, w, size)
    content = np.asarray(Image.fromarray(image).resize((cw, ch), Image.Resampling.BILINEAR))
    return _place(content, size, params, np.asarray(fill, dtype=np.uint8)), params


def letterbox_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8/bool[H, W] -> uint8[S, S]; nearest resize so the mask stays binary, 0 padding."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    h, w = mask.shape
    params = letterbox_params(h, w, size)
    ch, cw = content_size(h, w, size)
    content = np.asarray(
        Image.fromarray(mask.astype(np.uint8)).resize((cw, ch), Image.Resampling.NEAREST))
    return _place(content, size, params, 0)


def unletterbox(map_s: np.ndarray, params: LetterboxParams | Sequence[float] | np.ndarray,
                orig_hw: tuple[int, int] | Sequence[int] | np.ndarray) -> np.ndarray:
    """Map an S x S prediction back to the original H x W: crop the padding, then resize.

    Float maps (probabilities or logits) are resized bilinearly and come back float32; boolean
    maps are resized with nearest neighbour and come back bool. `params` is a LetterboxParams or
    the batch's float32[3] row; it is checked against (H, W, S) to catch a mismatched pairing.
    """
    if map_s.ndim != 2 or map_s.shape[0] != map_s.shape[1]:
        raise ValueError(f"expected a square 2-D map, got shape {map_s.shape}")
    size = map_s.shape[0]
    h, w = int(orig_hw[0]), int(orig_hw[1])
    expected = letterbox_params(h, w, size)
    _, pad_x, pad_y = (float(v) for v in params)
    if abs(pad_x - expected.pad_x) > 0.5 or abs(pad_y - expected.pad_y) > 0.5:
        raise ValueError(f"letterbox params {tuple(params)} do not match an {h}x{w} image at "
                         f"side {size} (expected pads {expected.pad_x}, {expected.pad_y})")
    ch, cw = content_size(h, w, size)
    crop = map_s[expected.pad_y:expected.pad_y + ch, expected.pad_x:expected.pad_x + cw]
    if map_s.dtype == np.bool_:
        img = Image.fromarray(crop.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST)
        return np.asarray(img).astype(bool)
    img = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32))
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
