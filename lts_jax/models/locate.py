"""Locate stage: relevance filtering + cross-modal transformer -> position prior.

1. F_m (stride 8) is brought to the locate stride (default 16) by stride-2
   3x3 conv-BN-leaky layers.
2. Relevance filtering: the sentence feature generates a 1x1 kernel (and a
   bias); its response over the features, through a sigmoid, is the relevance
   map R in [0, 1], which multiplies the features.
3. A pre-LayerNorm transformer over the visual tokens: self-attention with 2-D
   sine positions on queries/keys, cross-attention to the word features (padded
   words masked out), and an MLP.
4. A 1x1 projection (Dense over tokens) gives the position-prior logits P.

Attention projections have no biases: a key bias shifts every score of a query
by the same amount, so softmax ignores it and it would never receive gradient.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lts_jax.models.darknet import ConvBN, ModuleDef

FUSED_STRIDE = 8


def sine_positions(height: int, width: int, dim: int, temperature: float = 10000.0) -> jax.Array:
    """DETR-style 2-D sine position embedding, f32[height * width, dim] (y half, x half)."""
    if dim % 4:
        raise ValueError(f"sine positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = temperature ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)
    # Normalised cell centres in (0, 2*pi): resolution-independent like DETR's normalize=True.
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height * 2 * math.pi
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width * 2 * math.pi

    def embed(v: jax.Array) -> jax.Array:
        args = v[:, None] / freqs[None, :]
        return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)  # [n, dim/2]

    pos_y = jnp.broadcast_to(embed(ys)[:, None, :], (height, width, dim // 2))
    pos_x = jnp.broadcast_to(embed(xs)[None, :, :], (height, width, dim // 2))
    return jnp.concatenate([pos_y, pos_x], axis=-1).reshape(height * width, dim)


class CrossModalLayer(nn.Module):
    """Pre-LN block: self-attention, cross-attention to words, MLP; residual each."""

    width: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        pos: jax.Array,
        words: jax.Array,
        word_mask: jax.Array,
        *,
        train: bool,
    ) -> jax.Array:
        det = not train

        def attention(name: str) -> nn.MultiHeadDotProductAttention:
            return nn.MultiHeadDotProductAttention(
                num_heads=self.num_heads,
                dtype=self.dtype,
                dropout_rate=self.dropout,
                use_bias=False,
                name=name,
            )

        def drop(y: jax.Array) -> jax.Array:
            return nn.Dropout(self.dropout)(y, deterministic=det)

        h = nn.LayerNorm(dtype=self.dtype, name="norm_self")(x)
        q = h + pos
        with warnings.catch_warnings():
            # Flax warns whenever inputs_v is square (tokens == width), guessing it is a
            # mask passed positionally; here it really is the values (no positions, DETR).
            warnings.filterwarnings("ignore", message=".*to the `inputs_v` arg")
            y = attention("self_attn")(q, q, h, deterministic=det)
        x = x + drop(y)

        h = nn.LayerNorm(dtype=self.dtype, name="norm_cross")(x)
        mask = word_mask.astype(bool)[:, None, None, :]  # [B, heads=1, queries=1, L]
        x = x + drop(attention("cross_attn")(h + pos, words, mask=mask, deterministic=det))

        h = nn.LayerNorm(dtype=self.dtype, name="norm_mlp")(x)
        h = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(h))
        h = nn.Dense(self.width, dtype=self.dtype, name="mlp_out")(drop(h))
        return x + drop(h)


class Locate(nn.Module):
    """(F_m, words, word mask, sentence) -> (prior logits [B,h,w], relevance [B,h,w])."""

    width: int = 256
    num_layers: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    dropout: float = 0.1
    stride: int = 16  # relative to the image; F_m is at stride 8
    dtype: Any = jnp.float32
    conv_bn: ModuleDef = ConvBN  # e.g. partial(ConvBN, bn_momentum=..., bn_epsilon=...)

    @nn.compact
    def __call__(
        self,
        fused: jax.Array,
        words: jax.Array,
        word_mask: jax.Array,
        sentence: jax.Array,
        *,
        train: bool,
    ) -> tuple[jax.Array, jax.Array]:
        if self.stride not in (8, 16, 32):
            raise ValueError(f"locate stride must be 8, 16 or 32, got {self.stride}")
        conv_bn = functools.partial(self.conv_bn, dtype=self.dtype)
        x = fused.astype(self.dtype)
        dim = x.shape[-1]
        for i in range(int(math.log2(self.stride // FUSED_STRIDE))):
            x = conv_bn(dim, 3, strides=2, name=f"down{i}")(x, use_running_average=not train)
        b, h, w, _ = x.shape

        # Relevance filtering: a per-expression 1x1 conv over the visual features.
        sentence = sentence.astype(self.dtype)
        kernel = nn.Dense(dim, dtype=self.dtype, name="relevance_kernel")(sentence)
        bias = nn.Dense(1, dtype=self.dtype, name="relevance_bias")(sentence)
        response = jnp.einsum("bhwc,bc->bhw", x, kernel) / math.sqrt(dim) + bias[:, None, :]
        relevance = jax.nn.sigmoid(response.astype(jnp.float32))
        x = x * relevance[..., None].astype(self.dtype)

        tokens = nn.Dense(self.width, dtype=self.dtype, name="in_proj")(x.reshape(b, h * w, dim))
        pos = sine_positions(h, w, self.width).astype(self.dtype)[None]
        words = words.astype(self.dtype)
        for i in range(self.num_layers):
            tokens = CrossModalLayer(
                self.width, self.num_heads, self.mlp_dim, self.dropout, self.dtype, name=f"layer{i}"
            )(tokens, pos, words, word_mask, train=train)
        tokens = nn.LayerNorm(dtype=self.dtype, name="norm_out")(tokens)
        prior = nn.Dense(1, dtype=self.dtype, name="prior_head")(tokens)
        return prior.reshape(b, h, w), relevance
