"""LTS losses against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from lts_jax.losses import binary_cross_entropy, dice_loss, lts_loss, pool_mask


def _example() -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    gt = np.zeros((1, 8, 8), np.float32)
    gt[0, :4, :4] = 1.0  # top-left quarter: pooled by 4 -> [[1, 0], [0, 0]]
    mask_logits = jnp.zeros((1, 2, 2))
    prior_logits = jnp.full((1, 1, 1), 2.0)  # pooled by 8 -> target 0.25
    return mask_logits, prior_logits, jnp.asarray(gt)


def test_pool_mask_gives_soft_targets() -> None:
    gt = np.zeros((1, 4, 4), np.float32)
    gt[0, 0, :3] = 1.0
    pooled = np.asarray(pool_mask(jnp.asarray(gt), 2, 2))
    np.testing.assert_allclose(pooled, [[[0.5, 0.25], [0.0, 0.0]]])
    with pytest.raises(ValueError, match="pool evenly"):
        pool_mask(jnp.asarray(gt), 3, 3)


def test_bce_matches_formula() -> None:
    x = jnp.array([-3.0, 0.0, 2.0, 40.0])
    z = jnp.array([0.0, 1.0, 0.25, 1.0])
    p = 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))
    zz = np.asarray(z, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        # -(z log p + (1 - z) log(1 - p)); the 0 * log(0) of the saturated case is 0.
        expect = -(zz * np.log(p) + np.where(zz < 1, (1 - zz) * np.log(1 - p), 0.0))
    np.testing.assert_allclose(np.asarray(binary_cross_entropy(x, z)), expect, rtol=1e-5, atol=1e-7)


def test_lts_loss_hand_computed() -> None:
    mask_logits, prior_logits, gt = _example()
    total, parts = lts_loss(mask_logits, prior_logits, gt, prior_weight=0.5, dice_weight=2.0)
    mask_expect = math.log(2.0)  # sigmoid(0) = 0.5 against any target
    prior_expect = 2.0 - 2.0 * 0.25 + math.log1p(math.exp(-2.0))
    dice_expect = 1.0 - (2 * 0.5 + 1.0) / (4 * 0.5 + 1.0 + 1.0)  # inter 0.5, sum p 2, sum t 1
    np.testing.assert_allclose(float(parts["mask_loss"]), mask_expect, rtol=1e-6)
    np.testing.assert_allclose(float(parts["prior_loss"]), prior_expect, rtol=1e-6)
    np.testing.assert_allclose(float(parts["dice_loss"]), dice_expect, rtol=1e-6)
    np.testing.assert_allclose(
        float(total), mask_expect + 0.5 * prior_expect + 2.0 * dice_expect, rtol=1e-6
    )
    np.testing.assert_allclose(float(dice_loss(mask_logits, pool_mask(gt, 2, 2))[0]), dice_expect,
                               rtol=1e-6)


def test_losses_are_float32_for_bfloat16_logits() -> None:
    mask_logits, prior_logits, gt = _example()
    total, parts = lts_loss(mask_logits.astype(jnp.bfloat16), prior_logits.astype(jnp.bfloat16),
                            gt, prior_weight=1.0, dice_weight=0.0)
    assert total.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in parts.values())
    np.testing.assert_allclose(float(parts["mask_loss"]), math.log(2.0), rtol=1e-6)
