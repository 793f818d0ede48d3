"""LTS training losses, always computed in float32.

Targets: the S x S ground-truth mask is average-pooled to each logit grid (by
S/h), giving soft targets equal to the fraction of each cell covered by the
object. Average pooling, rather than nearest sampling, keeps thin objects that
fall between sample points and makes the loss a smooth function of the mask;
its minimum is the targets' entropy rather than 0 on boundary cells.

- mask loss: BCE(mask logits at the segment out_stride, 4 in the paper, pooled mask)
- prior loss: BCE(prior logits at the locate stride, pooled mask)
- dice loss: 1 - soft Dice(sigmoid(mask logits), pooled mask), smoothing 1
total = mask + prior_weight * prior + dice_weight * dice

Each loss is a per-example pixel mean, then averaged over the batch (training
batches have no padding rows, so every example counts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DICE_SMOOTH = 1.0


def pool_mask(mask: jax.Array, height: int, width: int) -> jax.Array:
    """Average-pools f[B, S, S'] to f[B, height, width]; sides must divide evenly."""
    b, s_h, s_w = mask.shape
    if s_h % height or s_w % width:
        raise ValueError(f"mask {s_h}x{s_w} does not pool evenly to {height}x{width}")
    fh, fw = s_h // height, s_w // width
    return mask.astype(jnp.float32).reshape(b, height, fh, width, fw).mean(axis=(2, 4))


def binary_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Element-wise BCE with logits and (soft) targets, numerically stable."""
    x = logits.astype(jnp.float32)
    z = targets.astype(jnp.float32)
    return jnp.maximum(x, 0) - x * z + jnp.log1p(jnp.exp(-jnp.abs(x)))


def dice_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example 1 - soft Dice over all pixels: f[B]."""
    p = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(logits.shape[0], -1)
    t = targets.astype(jnp.float32).reshape(targets.shape[0], -1)
    inter = jnp.sum(p * t, axis=-1)
    return 1.0 - (2.0 * inter + DICE_SMOOTH) / (p.sum(-1) + t.sum(-1) + DICE_SMOOTH)


def lts_loss(
    mask_logits: jax.Array,
    prior_logits: jax.Array,
    gt_mask: jax.Array,
    *,
    prior_weight: float = 1.0,
    dice_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and its parts {'mask_loss', 'prior_loss', 'dice_loss'} (float32 scalars).

    mask_logits f[B, S/o, S/o], prior_logits f[B, S/p, S/p], gt_mask f[B, S, S] in
    {0, 1}. The Dice term is reported even when ``dice_weight`` is 0.
    """
    mask_logits = mask_logits.astype(jnp.float32)
    prior_logits = prior_logits.astype(jnp.float32)
    mask_t = pool_mask(gt_mask, *mask_logits.shape[1:])
    prior_t = pool_mask(gt_mask, *prior_logits.shape[1:])
    mask_l = binary_cross_entropy(mask_logits, mask_t).mean(axis=(1, 2))
    prior_l = binary_cross_entropy(prior_logits, prior_t).mean(axis=(1, 2))
    dice_l = dice_loss(mask_logits, mask_t)

    parts = {
        "mask_loss": jnp.mean(mask_l),
        "prior_loss": jnp.mean(prior_l),
        "dice_loss": jnp.mean(dice_l),
    }
    total = (
        parts["mask_loss"] + prior_weight * parts["prior_loss"] + dice_weight * parts["dice_loss"]
    )
    return total, parts
