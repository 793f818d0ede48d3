"""Optimiser and learning-rate schedule, built from ``config.optim``.

The chain is: clip the global gradient norm -> Adam moments (with L2 added to the gradient for
'adam', decoupled weight decay for 'adamw') -> scale by the scheduled rate -> scale the
'visual' (backbone) subtree by ``backbone_lr_mult``. Scaling the final update is the same as
giving the backbone its own learning rate (as PyTorch parameter groups do), decoupled decay
included.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

BACKBONE_SUBTREE = "visual"


def learning_rate_schedule(
    optim: ml_collections.ConfigDict, num_train_steps: int
) -> optax.Schedule:
    """Linear warmup from 0, then 'constant', 'step' or 'cosine' decay up to num_train_steps."""
    base = float(optim.learning_rate)
    warmup = int(optim.warmup_steps)
    decay_steps = max(int(num_train_steps) - warmup, 1)
    if optim.schedule == "constant":
        main = optax.constant_schedule(base)
    elif optim.schedule == "step":
        # Boundaries are fractions of the whole run, counted from step 0 like the warmup.
        boundaries: dict[int, float] = {}
        for frac in optim.decay_at:
            at = max(int(round(frac * num_train_steps)) - warmup, 0)
            boundaries[at] = boundaries.get(at, 1.0) * float(optim.decay_factor)
        main = optax.piecewise_constant_schedule(base, boundaries)
    elif optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(base, decay_steps, alpha=float(optim.end_factor))
    else:
        raise ValueError(
            f"Unknown config.optim.schedule {optim.schedule!r}; expected constant, step, cosine"
        )
    if warmup <= 0:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, base, warmup), main], boundaries=[warmup]
    )


def _decay_mask(params: Any) -> Any:
    # Biases and normalisation scales (ndim <= 1) are not decayed.
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def _backbone_labels(params: Any) -> dict[str, Any]:
    return {
        name: jax.tree.map(lambda _, n=name: "backbone" if n == BACKBONE_SUBTREE else "head",
                           subtree)
        for name, subtree in params.items()
    }


def create_optimizer(
    optim: ml_collections.ConfigDict, num_train_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation for ``config.optim`` and the schedule it follows (for logging).

    ``params`` given to ``init`` must be a mapping whose top-level keys are the model's
    subtrees of params ('visual', 'text', ...).
    """
    schedule = learning_rate_schedule(optim, num_train_steps)
    weight_decay = float(optim.weight_decay)
    parts: list[optax.GradientTransformation] = []
    if float(optim.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    if optim.name == "adam":
        if weight_decay > 0:
            parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
        parts.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps))
    elif optim.name == "adamw":
        parts.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps))
        if weight_decay > 0:
            parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
    else:
        raise ValueError(f"Unknown config.optim.name {optim.name!r}; expected 'adam' or 'adamw'")
    parts.append(optax.scale_by_learning_rate(schedule))
    mult = float(optim.backbone_lr_mult)
    if mult != 1.0:
        parts.append(
            optax.multi_transform(
                {"backbone": optax.scale(mult), "head": optax.identity()}, _backbone_labels
            )
        )
    return optax.chain(*parts), schedule
