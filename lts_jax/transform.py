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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lts_jax.letterbox import MEAN_GREY

Batch = Mapping[str, jax.Array]
# ITU-R BT.601 luma, as augment.apply_photometric.
_LUMA = (0.299, 0.587, 0.114)
# Fields of a training batch with one row per image; the rest have one per (image, object)
# pair, objects_per_image rows per image (config.data.objects_per_image).
IMAGE_FIELDS = ("image", "hw", "flip", "photometric")
# Largest canvas that the CPU resamples with dense matrices (default_method).
_MATMUL_MAX_CANVAS = 128


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
                   ) -> tuple[jax.Array, jax.Array]:
    """(content length, content index of each output pixel; the padding is centred)."""
    out_len = jnp.where(length == long_side, size, _content_len(length, long_side, size))
    return out_len, jnp.arange(size) - (size - out_len) // 2


def _bilinear_taps(in_len: jax.Array, out_len: jax.Array, index: jax.Array, canvas: int,
                   taps: int) -> tuple[jax.Array, jax.Array]:
    """PIL's bilinear coefficients: (source index int32[S, K], weight float32[S, K]).

    Output pixels outside the content get arbitrary taps: the caller fills them.
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
    weight = weight / jnp.maximum(jnp.sum(weight, axis=1, keepdims=True), 1e-12)
    return jnp.clip(source, 0, canvas - 1).astype(jnp.int32), weight


def _nearest_source(in_len: jax.Array, out_len: jax.Array, index: jax.Array) -> jax.Array:
    """PIL's NEAREST source pixel of each output pixel, int32[S] (clipped into the image)."""
    scale = in_len.astype(jnp.float32) / out_len.astype(jnp.float32)
    source = jnp.floor((index.astype(jnp.float32) + 0.5) * scale).astype(jnp.int32)
    return jnp.clip(source, 0, in_len - 1)


class Plan(NamedTuple):
    """Per-example resampling plan (leading batch axis once vmapped)."""

    src_y: jax.Array  # int32[S, K] bilinear source rows
    wy: jax.Array  # float32[S, K] their weights
    src_x: jax.Array  # int32[S, K] bilinear source columns
    wx: jax.Array  # float32[S, K]
    near_y: jax.Array  # int32[S] nearest source row (masks)
    near_x: jax.Array  # int32[S] nearest source column
    inside: jax.Array  # bool[S, S] output pixels that hold content


def _geometry(hw: jax.Array, size: int, canvas: int, taps: int, flip: jax.Array) -> Plan:
    """The plan of one example. A flipped example reads its columns in reverse, so the flip
    costs nothing."""
    h, w = hw[0], hw[1]
    long_side = jnp.maximum(h, w)
    out_h, rows = _axis_geometry(h, long_side, size)
    out_w, cols = _axis_geometry(w, long_side, size)
    cols = jnp.where(flip, cols[::-1], cols)
    src_y, wy = _bilinear_taps(h, out_h, rows, canvas, taps)
    src_x, wx = _bilinear_taps(w, out_w, cols, canvas, taps)
    inside = ((rows >= 0) & (rows < out_h))[:, None] & ((cols >= 0) & (cols < out_w))[None, :]
    return Plan(src_y, wy, src_x, wx, _nearest_source(h, out_h, rows),
                _nearest_source(w, out_w, cols), inside)


def _resample_gather(image: jax.Array, src_y: jax.Array, wy: jax.Array, src_x: jax.Array,
                     wx: jax.Array) -> jax.Array:
    """Separable resampling by gathering each tap (fastest under XLA:CPU)."""
    taps = wy.shape[1]
    # Vertical pass first: it shrinks C rows to S before the column gather.
    tall = sum(wy[:, k, None, None] * jnp.take(image, src_y[:, k], axis=0).astype(jnp.float32)
               for k in range(taps))
    return sum(wx[None, :, k, None] * jnp.take(tall, src_x[:, k], axis=1) for k in range(taps))


def _resample_matmul(image: jax.Array, src_y: jax.Array, wy: jax.Array, src_x: jax.Array,
                     wx: jax.Array) -> jax.Array:
    """Separable resampling as two matmuls with dense [S, C] weight matrices (what TPUs and
    GPUs do fastest; gathers are slow on TPU)."""
    canvas = image.shape[0]
    onehot_y = src_y[..., None] == jnp.arange(canvas)
    onehot_x = src_x[..., None] == jnp.arange(canvas)
    weights_y = jnp.sum(jnp.where(onehot_y, wy[..., None], 0.0), axis=1)  # [S, C]
    weights_x = jnp.sum(jnp.where(onehot_x, wx[..., None], 0.0), axis=1)
    return jnp.einsum("sh,hwc,tw->stc", weights_y, image.astype(jnp.float32), weights_x)


def _letterbox_one(image: jax.Array, plan: Plan, method: str) -> jax.Array:
    """uint8[C, C, 3] canvas -> float32[S, S, 3] in [0, 1], padding MEAN_GREY."""
    resample = _resample_matmul if method == "matmul" else _resample_gather
    out = resample(image, plan.src_y, plan.wy, plan.src_x, plan.wx)
    fill = jnp.asarray(MEAN_GREY, jnp.float32)
    return jnp.where(plan.inside[..., None], out, fill) * (1.0 / 255.0)


def _letterbox_mask_one(packed: jax.Array, plan: Plan) -> jax.Array:
    """uint8[C, ceil(C/8)] packed-bit canvas -> float32[S, S] in {0, 1}, padding 0."""
    byte = packed[plan.near_y][:, plan.near_x >> 3]  # [S, S]
    bit = (byte >> (7 - (plan.near_x & 7)).astype(jnp.uint8)[None, :]) & 1
    return jnp.where(plan.inside, bit, 0).astype(jnp.float32)


def plans(hw: jax.Array, size: int, canvas: int, flip: jax.Array | None = None) -> Plan:
    """The batch's resampling plans from int32[B, 2] (H, W) and bool[B] flips (None = none);
    images and masks of one batch share them."""
    flip = jnp.zeros(hw.shape[:1], bool) if flip is None else flip
    taps = num_taps(canvas, size)
    return jax.vmap(lambda s, f: _geometry(s, size, canvas, taps, f))(hw, flip)


def default_method(canvas: int, size: int) -> str:
    """'matmul' on accelerators (TPUs are slow at gathers) and for small canvases on CPU;
    'gather' for large ones on CPU, where dense [S, C] weights cost C / taps times the work.
    Measured under XLA:CPU (2-core AMD EPYC, AVX2, JAX 0.10.2), batch 32: 96 -> 64 matmul
    14 ms vs gather 35 ms; 96 -> 96 22 vs 27; 128 -> 64 31 vs 38; 640 -> 416 matmul 1.54 s
    vs gather 0.40 s."""
    if jax.default_backend() != "cpu" or canvas <= max(size, _MATMUL_MAX_CANVAS):
        return "matmul"
    return "gather"


def letterbox_images(images: jax.Array, hw: jax.Array, size: int,
                     flip: jax.Array | None = None, method: str | None = None,
                     plan: Plan | None = None) -> jax.Array:
    """uint8[B, C, C, 3] canvases with int32[B, 2] (H, W) -> float32[B, S, S, 3] in [0, 1],
    mirrored left-right where ``flip`` (bool[B]) is set. ``plan``: ``plans(hw, size, C,
    flip)`` if the caller already has it."""
    method = method or default_method(images.shape[1], size)
    if method not in ("gather", "matmul"):
        raise ValueError(f"unknown resampling method {method!r}; use 'gather' or 'matmul'")
    plan = plans(hw, size, images.shape[1], flip) if plan is None else plan
    return jax.vmap(lambda im, p: _letterbox_one(im, p, method))(images, plan)


def letterbox_masks(packed: jax.Array, hw: jax.Array, size: int,
                    flip: jax.Array | None = None, plan: Plan | None = None) -> jax.Array:
    """uint8[B, C, ceil(C/8)] packed-bit canvases (on the same C x C canvas as the images)
    -> float32[B, S, S] in {0, 1}."""
    plan = plans(hw, size, packed.shape[1], flip) if plan is None else plan
    return jax.vmap(_letterbox_mask_one)(packed, plan)


def apply_photometric(images: jax.Array, params: jax.Array) -> jax.Array:
    """float32[B, S, S, 3] in [0, 1] with float32[B, 3] (brightness shift, contrast factor,
    saturation factor) per example; (0, 1, 1) is the identity. Equal (up to float rounding)
    to ``augment.apply_photometric``, the host reference, in one elementwise pass: with luma
    weights summing to 1, brightness then contrast then saturation is
    c*s*(x - g) + c*(g - m) + m + b, where g is the pixel's luma and m the image mean."""
    shift, contrast, saturation = (params[:, i, None, None, None] for i in range(3))
    mean = jnp.mean(images, axis=(1, 2, 3), keepdims=True)
    r, g, b = _LUMA
    grey = images[..., 0:1] * r + images[..., 1:2] * g + images[..., 2:3] * b
    out = contrast * saturation * (images - grey) + contrast * (grey - mean) + mean + shift
    return jnp.clip(out, 0.0, 1.0)


def train_inputs(batch: Batch, size: int, method: str | None = None) -> dict[str, jax.Array]:
    """A host training batch (see input_pipeline) -> the model's inputs and targets.

    Letterbox to S x S, flip where the host drew a flip (it has already swapped the
    left/right words), photometric jitter with the host's factors. ``method``: resampling
    ('gather' | 'matmul', None = default_method(C, S)).
    """
    hw, flip = batch["hw"], batch["flip"]
    plan = plans(hw, size, batch["image"].shape[1], flip)  # shared by image and mask
    image = letterbox_images(batch["image"], hw, size, flip, method, plan)
    per_image = batch["mask"].shape[0] // batch["image"].shape[0]
    if per_image > 1:  # several objects per image (config.data.objects_per_image): each
        # image's plan serves its masks
        plan = jax.tree.map(lambda a: jnp.repeat(a, per_image, axis=0), plan)
    mask = letterbox_masks(batch["mask"], hw, size, flip, plan)
    image = apply_photometric(image, batch["photometric"])
    return {"image": image, "mask": mask, "tokens": batch["tokens"],
            "token_mask": batch["token_mask"]}


def eval_inputs(batch: Batch, size: int, method: str | None = None) -> dict[str, jax.Array]:
    """A host eval batch -> the model's inputs (letterboxed image, tokens)."""
    return {"image": letterbox_images(batch["image"], batch["orig_hw"], size, method=method),
            "tokens": batch["tokens"], "token_mask": batch["token_mask"]}


def train_inputs_fn(image_size: int) -> Callable[[Batch], dict[str, jax.Array]]:
    """``train_inputs`` at side ``image_size``, the train step's ``inputs_fn``."""
    return functools.partial(train_inputs, size=int(image_size))


def identity_photometric(batch_size: int) -> np.ndarray:
    """float32[B, 3] photometric parameters that change nothing."""
    return np.tile(np.asarray([0.0, 1.0, 1.0], np.float32), (batch_size, 1))
