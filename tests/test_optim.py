"""Optimiser: schedules, backbone learning-rate multiplier, weight-decay mask, clipping."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lts_jax.optim import create_optimizer, learning_rate_schedule
from lts_jax.train_step import global_norm


def _optim(**overrides) -> ml_collections.ConfigDict:
    base = dict(name="adam", learning_rate=1.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                warmup_steps=0, schedule="constant", decay_at=(0.5, 0.75), decay_factor=0.1,
                end_factor=0.0, clip_norm=0.0, backbone_lr_mult=1.0)
    base.update(overrides)
    return ml_collections.ConfigDict(base)


def _values(schedule, steps) -> np.ndarray:
    return np.asarray([float(schedule(s)) for s in steps])


def test_warmup_then_cosine():
    sched = learning_rate_schedule(
        _optim(learning_rate=0.1, warmup_steps=10, schedule="cosine", end_factor=0.1), 110
    )
    np.testing.assert_allclose(_values(sched, [0, 5, 10]), [0.0, 0.05, 0.1], rtol=1e-6)
    # Halfway through the 100 decay steps the cosine is at the mean of start and end.
    np.testing.assert_allclose(float(sched(60)), 0.5 * (0.1 + 0.01), rtol=1e-5)
    np.testing.assert_allclose(float(sched(110)), 0.01, rtol=1e-5)


def test_step_schedule_boundaries_are_fractions_of_the_run():
    sched = learning_rate_schedule(_optim(warmup_steps=4, schedule="step"), 100)
    np.testing.assert_allclose(
        _values(sched, [2, 4, 49, 50, 74, 75, 99]), [0.5, 1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6
    )


def test_constant_and_unknown():
    assert float(learning_rate_schedule(_optim(), 10)(7)) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        learning_rate_schedule(_optim(schedule="poly"), 10)
    with pytest.raises(ValueError, match="name"):
        create_optimizer(_optim(name="sgd"), 10)


def _params():
    return {"visual": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
            "text": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}


def _first_update(optim: ml_collections.ConfigDict, grads=None):
    tx, _ = create_optimizer(optim, 100)
    params = _params()
    grads = grads if grads is not None else {k: {n: jnp.full_like(v, 0.3) for n, v in d.items()}
                                             for k, d in params.items()}
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_backbone_multiplier_scales_only_visual():
    updates = _first_update(_optim(learning_rate=0.01, backbone_lr_mult=0.1))
    # Adam's first step is -lr * g / (|g| + eps), i.e. about -lr for every element.
    np.testing.assert_allclose(updates["text"]["kernel"], -0.01, rtol=1e-5)
    np.testing.assert_allclose(updates["visual"]["kernel"], -0.001, rtol=1e-5)
    np.testing.assert_allclose(updates["visual"]["bias"], -0.001, rtol=1e-5)


def test_adamw_decays_kernels_not_biases():
    zero = {k: {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros((2,))} for k in ("visual", "text")}
    updates = _first_update(_optim(name="adamw", learning_rate=0.1, weight_decay=0.5), zero)
    # Zero gradient: the only update is decoupled decay, lr * wd * param, kernels only.
    np.testing.assert_allclose(updates["text"]["kernel"], -0.05, rtol=1e-6)
    np.testing.assert_allclose(updates["text"]["bias"], 0.0)


def test_adam_l2_goes_through_the_moments():
    zero = {k: {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros((2,))} for k in ("visual", "text")}
    updates = _first_update(_optim(name="adam", learning_rate=0.1, weight_decay=0.5), zero)
    # L2 is added to the gradient and normalised by Adam: the first step is about -lr.
    np.testing.assert_allclose(updates["text"]["kernel"], -0.1, rtol=1e-5)
    np.testing.assert_allclose(updates["text"]["bias"], 0.0)


def test_gradient_clipping():
    tx, _ = create_optimizer(_optim(name="adamw", clip_norm=1.0), 10)
    params = _params()
    big = {k: {n: jnp.full_like(v, 100.0) for n, v in d.items()} for k, d in params.items()}
    state = tx.init(params)
    # The clip is the first link of the chain; its output feeds Adam's first moment.
    _, new_state = tx.update(big, state, params)
    mu = new_state[1].mu
    assert float(global_norm(mu)) == pytest.approx((1 - 0.9) * 1.0, rel=1e-5)


def test_rate_stays_at_its_final_value_past_the_schedule():
    """An extended run (num_train_steps > optim.schedule_steps) keeps the workdir's schedule."""
    optim = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=2, schedule="cosine",
                                           end_factor=0.05))
    schedule = learning_rate_schedule(optim, 6)
    assert float(schedule(3)) > float(schedule(6))
    for step in (6, 7, 10, 1000):
        np.testing.assert_allclose(float(schedule(step)), 5e-5, rtol=1e-5)
