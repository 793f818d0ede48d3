"""Segment stage: position prior + F_m -> mask logits at stride 4.

sigmoid(P) is bilinearly upsampled to F_m's grid (stride 8) and concatenated
with F_m; ``num_convs`` 3x3 conv-BN-ReLU blocks at stride 8, one bilinear x2
upsampling, one more 3x3 conv-BN-ReLU (at half width, since it runs on 4x the
cells) and a 1x1 conv to one channel.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lts_jax.darknet import ConvBN


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear NHWC resize (half-pixel centres, like align_corners=False)."""
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, height, width, c), method="bilinear")


class Segment(nn.Module):
    """(F_m f[B,h8,w8,C], prior logits f[B,hp,wp]) -> mask logits f[B, 2*h8, 2*w8]."""

    dim: int = 256
    num_convs: int = 2
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, fused: jax.Array, prior_logits: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(
            act="relu", dtype=self.dtype, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon
        )
        b, h, w, _ = fused.shape
        prior = jax.nn.sigmoid(prior_logits.astype(jnp.float32))[..., None]
        prior = resize_bilinear(prior, h, w).astype(self.dtype)
        x = jnp.concatenate([fused.astype(self.dtype), prior], axis=-1)
        for i in range(self.num_convs):
            x = ConvBN(self.dim, 3, name=f"conv{i}", **kw)(x, use_running_average=not train)
        x = resize_bilinear(x, 2 * h, 2 * w)
        x = ConvBN(max(1, self.dim // 2), 3, name="conv_up", **kw)(x, use_running_average=not train)
        logits = nn.Conv(1, (1, 1), dtype=self.dtype, name="head")(x)
        return logits[..., 0]
