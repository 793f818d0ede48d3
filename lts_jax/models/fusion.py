"""Top-down cross-modal fusion of C5 -> C4 -> C3 into F_m (stride 8).

Per level: concat 8-d coordinates -> 1x1 conv-BN-leaky projection; below C5,
merge with the 2x-upsampled coarser result (concat -> 3x3 conv-BN-leaky); then
modulate by the sentence (element-wise product with a linear projection of it)
and L2-normalise over channels, as in MCN. A final 3x3 conv-BN-leaky over
[fused C3, coordinates] gives F_m, so its scale is set by BatchNorm rather than
by the unit-norm product.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lts_jax.models.darknet import ConvBN, ModuleDef

COORD_CHANNELS = 8


def coord_features(batch: int, height: int, width: int, dtype: Any = jnp.float32) -> jax.Array:
    """Per-cell coordinates in [-1, 1] (f[batch, height, width, 8]).

    Channels: x_min, y_min, x_max, y_max, x_center, y_center, 1/W, 1/H.
    """
    xs = jnp.arange(width, dtype=jnp.float32)
    ys = jnp.arange(height, dtype=jnp.float32)
    x_min, x_max, x_ctr = (xs / width * 2 - 1, (xs + 1) / width * 2 - 1,
                           (xs + 0.5) / width * 2 - 1)
    y_min, y_max, y_ctr = (ys / height * 2 - 1, (ys + 1) / height * 2 - 1,
                           (ys + 0.5) / height * 2 - 1)

    def grid_x(v: jax.Array) -> jax.Array:
        return jnp.broadcast_to(v[None, :], (height, width))

    def grid_y(v: jax.Array) -> jax.Array:
        return jnp.broadcast_to(v[:, None], (height, width))

    ones = jnp.ones((height, width), jnp.float32)
    coords = jnp.stack(
        [
            grid_x(x_min),
            grid_y(y_min),
            grid_x(x_max),
            grid_y(y_max),
            grid_x(x_ctr),
            grid_y(y_ctr),
            ones / width,
            ones / height,
        ],
        axis=-1,
    )
    return jnp.broadcast_to(coords[None], (batch, height, width, COORD_CHANNELS)).astype(dtype)


def with_coords(x: jax.Array) -> jax.Array:
    """Appends the 8 coordinate channels to an NHWC map."""
    b, h, w, _ = x.shape
    return jnp.concatenate([x, coord_features(b, h, w, x.dtype)], axis=-1)


def upsample2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling (YOLOv3's top-down path)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Unit L2 norm over channels; the norm is taken in float32 for bfloat16 inputs."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps * eps)
    return (x32 / norm).astype(x.dtype)


class Fusion(nn.Module):
    """(C3, C4, C5, sentence) -> F_m f[B, H/8, W/8, dim]."""

    dim: int = 256
    dtype: Any = jnp.float32
    conv_bn: ModuleDef = ConvBN  # e.g. partial(ConvBN, bn_momentum=..., bn_epsilon=...)

    @nn.compact
    def __call__(
        self,
        c3: jax.Array,
        c4: jax.Array,
        c5: jax.Array,
        sentence: jax.Array,
        *,
        train: bool,
    ) -> jax.Array:
        conv_bn = functools.partial(self.conv_bn, dtype=self.dtype)
        use_ra = not train
        sentence = sentence.astype(self.dtype)
        for fine, coarse in ((c4, c5), (c3, c4)):
            if fine.shape[1:3] != (2 * coarse.shape[1], 2 * coarse.shape[2]):
                raise ValueError(
                    f"feature map {fine.shape} is not twice the size of the coarser level "
                    f"{coarse.shape}; use an image side divisible by 32"
                )
        fused = None
        for name, feat in (("c5", c5), ("c4", c4), ("c3", c3)):
            v = conv_bn(self.dim, 1, name=f"{name}_proj")(
                with_coords(feat.astype(self.dtype)), use_running_average=use_ra
            )
            if fused is not None:
                v = conv_bn(self.dim, 3, name=f"{name}_merge")(
                    jnp.concatenate([v, upsample2x(fused)], axis=-1), use_running_average=use_ra
                )
            text = nn.Dense(self.dim, dtype=self.dtype, name=f"{name}_text")(sentence)
            fused = l2_normalize(v * text[:, None, None, :])
        return conv_bn(self.dim, 3, name="out")(with_coords(fused), use_running_average=use_ra)
