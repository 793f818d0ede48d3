"""Segment stage: position prior + F_m -> mask logits at ``out_stride`` (4 in the paper).

sigmoid(P) is bilinearly upsampled to F_m's grid (stride 8) and concatenated
with F_m; ``num_convs`` 3x3 conv-BN-ReLU blocks at stride 8, then per x2
step down to ``out_stride`` a bilinear x2 upsampling and a 3x3 conv-BN-ReLU
(each at half the previous width, since it runs on 4x the cells), and a 1x1
conv to one channel. ``out_stride`` 2 is for small images (RefShapes at 96x96),
where stride-4 cells are too coarse for object boundaries.

``skip_dim`` > 0 (0 in the paper setting) adds low-level skips, as in U-Net or
DeepLabv3+ decoders: at each upsampled stride s the backbone's stride-s feature
(C2 at 4, C1 at 2) is projected by a 1x1 conv-BN-ReLU to ``skip_dim`` channels and
concatenated before that stride's 3x3 conv. Stride-8 features alone leave object
boundaries blurred on small objects; the skips give the decoder the edges.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lts_jax.models.darknet import ConvBN, ModuleDef


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear NHWC resize (half-pixel centres, like align_corners=False)."""
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, height, width, c), method="bilinear")


OUT_STRIDES = (1, 2, 4, 8)


class Segment(nn.Module):
    """(F_m f[B,h8,w8,C], prior logits f[B,hp,wp]) -> mask logits f[B, k*h8, k*w8].

    k = 8 / ``out_stride``. With ``skip_dim`` > 0, ``skips`` maps each upsampled
    stride (4, and 2 when ``out_stride`` <= 2, ...) to the backbone feature at that stride.
    """

    dim: int = 256
    num_convs: int = 2
    out_stride: int = 4
    skip_dim: int = 0
    dtype: Any = jnp.float32
    conv_bn: ModuleDef = ConvBN  # e.g. partial(ConvBN, bn_momentum=..., bn_epsilon=...)

    def __post_init__(self) -> None:
        # At construction, so create_model fails before any tracing, with the config's names.
        if self.out_stride not in OUT_STRIDES:
            raise ValueError(
                f"segment.out_stride must be one of {OUT_STRIDES}, got {self.out_stride}"
            )
        if self.skip_dim < 0 or (self.skip_dim > 0 and self.out_stride < 2):
            raise ValueError(
                f"segment.skip_dim={self.skip_dim} with segment.out_stride={self.out_stride}: "
                "skips need skip_dim >= 0 and out_stride >= 2 (the backbone has no stride-1 "
                "feature)"
            )
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        fused: jax.Array,
        prior_logits: jax.Array,
        *,
        train: bool,
        skips: Mapping[int, jax.Array] | None = None,
    ) -> jax.Array:
        conv_bn = functools.partial(self.conv_bn, act="relu", dtype=self.dtype)
        b, h, w, _ = fused.shape
        prior = jax.nn.sigmoid(prior_logits.astype(jnp.float32))[..., None]
        prior = resize_bilinear(prior, h, w).astype(self.dtype)
        x = jnp.concatenate([fused.astype(self.dtype), prior], axis=-1)
        for i in range(self.num_convs):
            x = conv_bn(self.dim, 3, name=f"conv{i}")(x, use_running_average=not train)
        stride, width = 8, self.dim
        while stride > self.out_stride:
            stride, width, h, w = stride // 2, max(1, width // 2), 2 * h, 2 * w
            x = resize_bilinear(x, h, w)
            if self.skip_dim > 0:
                if skips is None or stride not in skips:
                    raise ValueError(f"segment skip_dim > 0 needs the stride-{stride} feature")
                skip = conv_bn(self.skip_dim, 1, name=f"skip_s{stride}")(
                    skips[stride].astype(self.dtype), use_running_average=not train
                )
                x = jnp.concatenate([x, skip], axis=-1)
            # The stride-4 block keeps its original name, so paper-setting checkpoints load.
            name = "conv_up" if stride == 4 else f"conv_up_s{stride}"
            x = conv_bn(width, 3, name=name)(x, use_running_average=not train)
        logits = nn.Conv(1, (1, 1), dtype=self.dtype, name="head")(x)
        return logits[..., 0]
