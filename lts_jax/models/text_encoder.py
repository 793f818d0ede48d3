"""Expression encoder: embedding -> bidirectional GRU -> word + sentence features.

Tokens are SentencePiece ids, right-padded: ``token_mask`` is True on a prefix of
each row. The GRUs run with ``seq_lengths`` so the backward direction starts at
the last real token, never at padding; word features are zeroed at padded
positions, and the sentence feature is an attention pool (masked softmax) over
real words. Appending padding therefore changes no output.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Finite "minus infinity": exp() of it underflows to exactly 0, and an all-padded
# row (eval padding) still gives a finite, uniform softmax instead of NaN.
_MASKED_SCORE = -1e9


class TextEncoder(nn.Module):
    """Returns (words f[B, L, 2*hidden_dim] zero at padding, sentence f[B, 2*hidden_dim])."""

    vocab_size: int
    embed_dim: int = 300
    hidden_dim: int = 256
    dtype: Any = jnp.float32
    unroll: int = 1  # GRU scan unroll; the summary sets it to L so XLA counts every step

    @nn.compact
    def __call__(self, tokens: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        mask = token_mask.astype(bool)
        lengths = mask.sum(axis=-1).astype(jnp.int32)
        emb = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, name="embed")(tokens)

        def rnn(name: str) -> nn.RNN:
            cell = nn.GRUCell(self.hidden_dim, dtype=self.dtype, name=f"{name}_gru")
            return nn.RNN(cell, unroll=self.unroll, name=name)

        words = nn.Bidirectional(rnn("forward"), rnn("backward"), name="bigru")(
            emb, seq_lengths=lengths
        )
        words = jnp.where(mask[..., None], words, 0).astype(self.dtype)

        # Attention pooling. The final scoring layer has no bias: softmax ignores
        # a constant shift, so a bias would be a parameter with zero gradient.
        hidden = jnp.tanh(nn.Dense(self.hidden_dim, dtype=self.dtype, name="pool_hidden")(words))
        scores = nn.Dense(1, use_bias=False, dtype=self.dtype, name="pool_score")(hidden)[..., 0]
        scores = jnp.where(mask, scores.astype(jnp.float32), _MASKED_SCORE)
        weights = jax.nn.softmax(scores, axis=-1)
        sentence = jnp.einsum("bl,bld->bd", weights, words.astype(jnp.float32))
        return words, sentence.astype(self.dtype)
