"""Geometry and colour on the accelerator: letterbox, flip and photometric jitter inside jit.

The host only decodes: each example arrives as uint8 pixels on a fixed C x C canvas (content in
the top-left H x W corner, zeros elsewhere), its mask as packed bits on the same canvas, its
(H, W), and the per-example draws made on the host from (seed, stream position): the flip and
the photometric factors. Everything that costs milliseconds per sample in PIL/numpy on a host
core (the antialiased resize, float conversion, jitter) runs here, batched, for almost nothing
on an accelerator (README, "Feeding the accelerator").

The resize reproduces PIL's BILINEAR resampling (a triangle filter widened by the downscale
factor, taps clipped to the image and renormalised), so the device letterbox equals the host
reference ``letterbox.letterbox`` up to PIL's 8-bit rounding; the mask uses PIL's NEAREST
sampling (source pixel ``floor((i + 0.5) * in / out)``). Sizes come from
``letterbox.content_size`` arithmetic, so the host's ``letterbox_params`` describe the result.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lts_jax.letterbox import MEAN_GREY

Batch = Mapping[str, jax.Array]
# ITU-R BT.601 luma, as augment.apply_photometric.
_LUMA = (0.299, 0.587, 0.114)


def packed_width(canvas: int) -> int:
    """Bytes per row of a packed-bit mask canvas."""
    return -(-canvas // 8)


def num_taps(canvas: int, size: int) -> int:
    """Filter taps per output pixel that cover PIL's bilinear support for any image that fits
    the canvas (downscale factor up to canvas / size)."""
    support = max(1.0, canvas / size)
    return 2 * math.ceil(support) + 1


def _content_len(length: jax.Array, long_side: jax.Array, size: int) -> jax.Array:
    """letterbox.content_size for one side, traced: round(length * size / long), >= 1."""
    return jnp.maximum(1, (length * size + long_side // 2) // long_side)


def _axis_geometry(length: jax.Array, long_side: jax.Array, size: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(content length, padding before it, content index of each output pixel)."""
    out_len = jnp.where(length == long_side, size, _content_len(length, long_side, size))
    pad = (size - out_len) // 2
    index = jnp.arange(size) - pad
    return out_len, pad, index


def _bilinear_taps(in_len: jax.Array, out_len: jax.Array, index: jax.Array, canvas: int,
                   taps: int) -> tuple[jax.Array, jax.Array]:
    """PIL's bilinear coefficients: (source index int32[S, K], weight float32[S, K]).

    Output pixels outside the content (index < 0 or >= out_len) get all-zero weights.
    """
    in_f = in_len.astype(jnp.float32)
    scale = in_f / out_len.astype(jnp.float32)
    filterscale = jnp.maximum(scale, 1.0)
    center = (index.astype(jnp.float32) + 0.5) * scale
    first = jnp.maximum(jnp.floor(center - filterscale + 0.5), 0.0)
    stop = jnp.minimum(jnp.floor(center + filterscale + 0.5), in_f)
    source = first[:, None] + jnp.arange(taps, dtype=jnp.float32)[None, :]
    weight = jnp.maximum(0.0, 1.0 - jnp.abs((source - center[:, None] + 0.5) / filterscale))
    weight = jnp.where(source < stop[:, None], weight, 0.0)
    inside = (index >= 0) & (index < out_len)
    total = jnp.sum(weight, axis=1, keepdims=True)
    weight = jnp.where(inside[:, None], weight / jnp.maximum(total, 1e-12), 0.0)
    return jnp.clip(source, 0, canvas - 1).astype(jnp.int32), weight


def _nearest_source(in_len: jax.Array, out_len: jax.Array, index: jax.Array) -> jax.Array:
    """PIL's NEAREST source pixel of each output pixel, int32[S] (clipped into the image)."""
    scale = in_len.astype(jnp.float32) / out_len.astype(jnp.float32)
    source = jnp.floor((index.astype(jnp.float32) + 0.5) * scale).astype(jnp.int32)
    return jnp.clip(source, 0, in_len - 1)


def _letterbox_one(image: jax.Array, hw: jax.Array, size: int, taps: int) -> jax.Array:
    """uint8[C, C, 3] canvas -> float32[S, S, 3] in [0, 1], padding MEAN_GREY."""
    canvas = image.shape[0]
    h, w = hw[0], hw[1]
    long_side = jnp.maximum(h, w)
    out_h, _, rows = _axis_geometry(h, long_side, size)
    out_w, _, cols = _axis_geometry(w, long_side, size)
    src_y, wy = _bilinear_taps(h, out_h, rows, canvas, taps)
    src_x, wx = _bilinear_taps(w, out_w, cols, canvas, taps)
    pixels = image.astype(jnp.float32)
    # Vertical pass first: it shrinks C rows to S before the column gather.
    tall = jnp.einsum("sk,skwc->swc", wy, pixels[src_y])
    out = jnp.einsum("tk,stkc->stc", wx, tall[:, src_x])
    inside = (((rows >= 0) & (rows < out_h))[:, None] & ((cols >= 0) & (cols < out_w))[None, :])
    fill = jnp.asarray(MEAN_GREY, jnp.float32)
    return jnp.where(inside[..., None], out, fill) * (1.0 / 255.0)


def _letterbox_mask_one(packed: jax.Array, hw: jax.Array, size: int) -> jax.Array:
    """uint8[C, ceil(C/8)] packed-bit canvas -> float32[S, S] in {0, 1}, padding 0."""
    h, w = hw[0], hw[1]
    long_side = jnp.maximum(h, w)
    out_h, _, rows = _axis_geometry(h, long_side, size)
    out_w, _, cols = _axis_geometry(w, long_side, size)
    src_y = _nearest_source(h, out_h, rows)
    src_x = _nearest_source(w, out_w, cols)
    row_bytes = packed[src_y]  # [S, ceil(C/8)]
    byte = row_bytes[:, src_x >> 3]  # [S, S]
    bit = (byte >> (7 - (src_x & 7)).astype(jnp.uint8)[None, :]) & 1
    inside = (((rows >= 0) & (rows < out_h))[:, None] & ((cols >= 0) & (cols < out_w))[None, :])
    return jnp.where(inside, bit, 0).astype(jnp.float32)


def letterbox_images(images: jax.Array, hw: jax.Array, size: int) -> jax.Array:
    """uint8[B, C, C, 3] canvases with int32[B, 2] (H, W) -> float32[B, S, S, 3] in [0, 1]."""
    taps = num_taps(images.shape[1], size)
    return jax.vmap(lambda im, s: _letterbox_one(im, s, size, taps))(images, hw)


def letterbox_masks(packed: jax.Array, hw: jax.Array, size: int) -> jax.Array:
    """uint8[B, C, ceil(C/8)] packed-bit canvases -> float32[B, S, S] in {0, 1}."""
    return jax.vmap(lambda m, s: _letterbox_mask_one(m, s, size))(packed, hw)


def flip_where(x: jax.Array, flip: jax.Array) -> jax.Array:
    """Mirrors x[b] left-right (axis 2) where flip[b]."""
    cond = flip.reshape(flip.shape + (1,) * (x.ndim - 1))
    return jnp.where(cond, x[:, :, ::-1], x)


def apply_photometric(images: jax.Array, params: jax.Array) -> jax.Array:
    """float32[B, S, S, 3] in [0, 1] with float32[B, 3] (brightness shift, contrast factor,
    saturation factor) per example; (0, 1, 1) is the identity. Same formula as
    ``augment.apply_photometric`` (the host reference)."""
    shift, contrast, saturation = (params[:, i, None, None, None] for i in range(3))
    out = images + shift
    grey_mean = jnp.mean(out, axis=(1, 2, 3), keepdims=True)
    out = (out - grey_mean) * contrast + grey_mean
    grey = jnp.einsum("bhwc,c->bhw", out, jnp.asarray(_LUMA, jnp.float32))[..., None]
    out = (out - grey) * saturation + grey
    return jnp.clip(out, 0.0, 1.0)


def train_inputs(batch: Batch, size: int) -> dict[str, jax.Array]:
    """A host training batch (see input_pipeline) -> the model's inputs and targets.

    Letterbox to S x S, flip where the host drew a flip (it has already swapped the
    left/right words), photometric jitter with the host's factors.
    """
    image = letterbox_images(batch["image"], batch["hw"], size)
    mask = letterbox_masks(batch["mask"], batch["hw"], size)
    image = flip_where(image, batch["flip"])
    mask = flip_where(mask, batch["flip"])
    image = apply_photometric(image, batch["photometric"])
    return {"image": image, "mask": mask, "tokens": batch["tokens"],
            "token_mask": batch["token_mask"]}


def eval_inputs(batch: Batch, size: int) -> dict[str, jax.Array]:
    """A host eval batch -> the model's inputs (letterboxed image, tokens)."""
    return {"image": letterbox_images(batch["image"], batch["orig_hw"], size),
            "tokens": batch["tokens"], "token_mask": batch["token_mask"]}


def train_inputs_fn(image_size: int) -> Callable[[Batch], dict[str, jax.Array]]:
    """``train_inputs`` at side ``image_size``, the train step's ``inputs_fn``."""
    return functools.partial(train_inputs, size=int(image_size))


def identity_photometric(batch_size: int) -> np.ndarray:
    """float32[B, 3] photometric parameters that change nothing."""
    return np.tile(np.asarray([0.0, 1.0, 1.0], np.float32), (batch_size, 1))
