"""DarkNet-53 visual encoder (YOLOv3 backbone) returning C3/C4/C5.

Layout: a 3x3 stem conv (32 ch), then five stages; each stage is a stride-2 3x3
conv followed by residual blocks (1x1 conv to half width, 3x3 conv back, add).
Every conv is conv (no bias) -> BatchNorm -> LeakyReLU(0.1), as in Darknet.
Full width/depth: stages of 1, 2, 8, 8, 4 blocks with 64..1024 channels, and the
outputs of the last three stages are C3 (stride 8, 256 ch), C4 (stride 16, 512 ch)
and C5 (stride 32, 1024 ch).

Input is RGB in [0, 1] with no mean/std normalisation, which is what Darknet's
own pretrained weights expect.

Parameter names (used by the weight importers, ``darknet_weights.py``):
``stem``, ``down{i}``, ``stage{i}_block{j}/conv1``, ``stage{i}_block{j}/conv2``,
each holding ``conv/kernel`` (HWIO) and ``bn/{scale,bias}`` + ``bn/{mean,var}``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

FULL_STAGE_BLOCKS: tuple[int, ...] = (1, 2, 8, 8, 4)
STEM_CHANNELS = 32
STAGE_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 1024)
LEAKY_SLOPE = 0.1

# A Module class or a functools.partial of one, passed down the way flax's ImageNet ResNet
# passes ``conv``/``norm``: the BatchNorm settings are bound once (``create_model``) instead
# of every module carrying and forwarding them.
ModuleDef = Any


def scale_channels(channels: int, width_mult: float, minimum: int = 4) -> int:
    """Channel count after a width multiplier (never below ``minimum``)."""
    return max(minimum, int(round(channels * width_mult)))


def stage_blocks_for_depth(depth_mult: float) -> tuple[int, ...]:
    """Residual blocks per stage: ceil(n * depth_mult), at least one.

    depth 1.0 -> 1,2,8,8,4 (DarkNet-53); 0.25 -> 1,1,2,2,1; 0.125 -> 1,1,1,1,1.
    """
    return tuple(max(1, math.ceil(n * depth_mult - 1e-9)) for n in FULL_STAGE_BLOCKS)


def darknet_channels(width_mult: float) -> tuple[int, tuple[int, ...]]:
    """(stem channels, per-stage channels) for a width multiplier."""
    stem = scale_channels(STEM_CHANNELS, width_mult)
    # Residual blocks halve the width inside, so keep stage widths even.
    stages = tuple(2 * scale_channels(c // 2, width_mult, 2) for c in STAGE_CHANNELS)
    return stem, stages


class ConvSpec(NamedTuple):
    """One conv-BN layer: module path, input/output channels, kernel size."""

    path: tuple[str, ...]
    in_channels: int
    out_channels: int
    kernel_size: int


def darknet_conv_specs(
    width_mult: float = 1.0, stage_blocks: Sequence[int] = FULL_STAGE_BLOCKS
) -> list[ConvSpec]:
    """Every conv layer in Darknet's network order (52 for DarkNet-53)."""
    stem, stage_channels = darknet_channels(width_mult)
    specs = [ConvSpec(("stem",), 3, stem, 3)]
    cin = stem
    for i, (channels, blocks) in enumerate(zip(stage_channels, stage_blocks, strict=True)):
        specs.append(ConvSpec((f"down{i}",), cin, channels, 3))
        for j in range(blocks):
            specs.append(ConvSpec((f"stage{i}_block{j}", "conv1"), channels, channels // 2, 1))
            specs.append(ConvSpec((f"stage{i}_block{j}", "conv2"), channels // 2, channels, 3))
        cin = channels
    return specs


def is_full_darknet53(width_mult: float, stage_blocks: Sequence[int]) -> bool:
    """True for the full-width, full-depth DarkNet-53 that pretrained files describe."""
    return width_mult == 1.0 and tuple(stage_blocks) == FULL_STAGE_BLOCKS


# A convolution with at most this many output positions runs as one matmul over its im2col
# patches. XLA:CPU leaves such tiny maps (stage 4's 2x2 at a 64x64 input, 3x3 at 96x96) to its
# generic convolution, whose gradients take 5-9x longer there: at 64x64, batch 16, one core,
# 24.4 ms vs 2.7 ms for down4's and 16.7 vs 2.4 for its block's 3x3 (README, "Where an AVX2
# machine's time goes"). At 4x4 and above the two are level, so larger maps keep XLA's own.
IM2COL_MAX_OUTPUT_POSITIONS = 9


class Conv(nn.Module):
    """Square, bias-free 2-D convolution with symmetric ``k // 2`` padding on NHWC inputs.

    The parameter (``kernel``, HWIO, LeCun-normal init), its random draw and the maths are
    those of ``nn.Conv``; only how tiny outputs are computed differs (im2col + matmul, see
    IM2COL_MAX_OUTPUT_POSITIONS), which changes the result by float rounding alone.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, pad = self.kernel_size, self.strides, self.kernel_size // 2
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (k, k, x.shape[-1], self.features), jnp.float32)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        out_h = (x.shape[1] + 2 * pad - k) // s + 1
        out_w = (x.shape[2] + 2 * pad - k) // s + 1
        if out_h * out_w <= IM2COL_MAX_OUTPUT_POSITIONS:
            return im2col_conv(x, kernel, s, pad)
        return lax.conv_general_dilated(x, kernel, (s, s), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """The convolution of NHWC ``x`` with HWIO ``kernel`` as one matmul over its patches."""
    k_h, k_w, c_in, c_out = kernel.shape
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_h = (x.shape[1] - k_h) // stride + 1
    out_w = (x.shape[2] - k_w) // stride + 1
    # Taps in the kernel's (row, column, channel) order, so the HWIO kernel reshapes in place.
    patches = jnp.concatenate(
        [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
         for i in range(k_h) for j in range(k_w)], axis=-1)
    return jnp.einsum("nhwk,ko->nhwo", patches, kernel.reshape(k_h * k_w * c_in, c_out))


class ConvBN(nn.Module):
    """Conv (no bias: BatchNorm's shift replaces it) -> BatchNorm -> activation.

    ``padding`` is symmetric k//2 like Darknet/PyTorch; flax 'SAME' would pad a
    stride-2 conv asymmetrically and misalign pretrained weights.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    act: str = "leaky"  # 'leaky' | 'relu' | 'none'
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
        x = Conv(self.features, self.kernel_size, self.strides, dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(
            use_running_average=use_running_average,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            name="bn",
        )(x)
        if self.act == "leaky":
            return nn.leaky_relu(x, LEAKY_SLOPE)
        if self.act == "relu":
            return nn.relu(x)
        if self.act == "none":
            return x
        raise ValueError(f"unknown activation {self.act!r}")


class ResidualBlock(nn.Module):
    """Darknet residual unit: 1x1 to half width, 3x3 back, identity shortcut."""

    channels: int
    conv_bn: ModuleDef = ConvBN  # dtype and BatchNorm settings already bound by the caller

    @nn.compact
    def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
        y = self.conv_bn(self.channels // 2, 1, name="conv1")(
            x, use_running_average=use_running_average
        )
        y = self.conv_bn(self.channels, 3, name="conv2")(
            y, use_running_average=use_running_average
        )
        return x + y


class DarkNet(nn.Module):
    """DarkNet-53 (or a thinner/shallower variant); returns (C3, C4, C5).

    ``bn_frozen`` keeps the stored statistics even when ``train=True`` (the usual
    choice with small per-device batches and a pretrained backbone).
    """

    width_mult: float = 1.0
    stage_blocks: tuple[int, ...] = FULL_STAGE_BLOCKS
    dtype: Any = jnp.float32
    bn_frozen: bool = False
    conv_bn: ModuleDef = ConvBN  # e.g. partial(ConvBN, bn_momentum=..., bn_epsilon=...)

    def __call__(
        self, image: jax.Array, *, train: bool
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(C3, C4, C5): strides 8, 16, 32."""
        return self.levels(image, train=train)[2:]

    @nn.compact
    def levels(self, image: jax.Array, *, train: bool) -> tuple[jax.Array, ...]:
        """Every stage's output, (C1, ..., C5) at strides 2, 4, 8, 16, 32.

        The segment stage's optional skips read C1/C2; the same parameters as ``__call__``.
        """
        if len(self.stage_blocks) != 5:
            raise ValueError(f"DarkNet needs 5 stages, got {self.stage_blocks}")
        use_ra = self.bn_frozen or not train
        conv_bn = functools.partial(self.conv_bn, dtype=self.dtype)
        stem, stage_channels = darknet_channels(self.width_mult)
        x = conv_bn(stem, 3, name="stem")(image.astype(self.dtype), use_running_average=use_ra)
        outputs = []
        for i, (channels, blocks) in enumerate(zip(stage_channels, self.stage_blocks, strict=True)):
            x = conv_bn(channels, 3, strides=2, name=f"down{i}")(x, use_running_average=use_ra)
            for j in range(blocks):
                x = ResidualBlock(channels, conv_bn=conv_bn, name=f"stage{i}_block{j}")(
                    x, use_running_average=use_ra
                )
            outputs.append(x)
        return tuple(outputs)
