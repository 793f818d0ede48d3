"""The jitted, data-parallel train step and the train-state pytree it updates.

State is an explicit pytree ``{'params', 'batch_stats', 'opt_state', 'step'}`` (plus
``'ema_params'``, a moving average of the params that evaluation uses, when
``config.optim.ema_decay`` > 0), replicated on every device of the mesh; batches are split on
the mesh's ``data`` axis. XLA inserts the gradient all-reduce, and BatchNorm statistics
computed under jit on the global (sharded) batch are global statistics. The state argument
is donated, so the caller must drop its reference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lts_jax.mesh import batch_sharding, replicated
from lts_jax.models.model import init_variables

TrainState = dict[str, Any]
Batch = Mapping[str, jax.Array]
# (mask_logits, aux, batch) -> (total loss, {part name: scalar})
LossFn = Callable[[jax.Array, Mapping[str, jax.Array], Batch], tuple[jax.Array, dict[str, Any]]]
TrainStepFn = Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]

# Fields of a pipeline batch the train step reads (uint8 canvases, packed masks and the
# per-example draws; see transform.train_inputs); the rest stays on the host.
TRAIN_INPUTS = ("image", "mask", "hw", "flip", "photometric", "tokens", "token_mask")
InputsFn = Callable[[Batch], Batch]
EMA_KEY = "ema_params"


def global_norm(tree: Any) -> jax.Array:
    """L2 norm over all leaves, in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def create_train_state(
    variables: Mapping[str, Any], tx: optax.GradientTransformation, *, ema: bool = False
) -> TrainState:
    """A fresh state at step 0 around ``variables``; ``ema``: with a weight average that
    starts at the initial params."""
    state = {
        "params": variables["params"],
        "batch_stats": variables.get("batch_stats", {}),
        "opt_state": tx.init(variables["params"]),
        "step": jnp.zeros((), jnp.int32),
    }
    if ema:  # a copy: the train step donates both, so they must not share buffers
        state[EMA_KEY] = jax.tree.map(jnp.copy, variables["params"])
    return state


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """The average's decay when updating after ``step`` (0-based): ``decay``, warmed up as
    ``(1 + step) / (10 + step)`` (TensorFlow's ExponentialMovingAverage with num_updates) so
    that a short run's average forgets the random initialisation."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def inference_params(state: Mapping[str, Any]) -> Any:
    """The params evaluation and inference use: the average if the state keeps one."""
    return state[EMA_KEY] if EMA_KEY in state else state["params"]


def init_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    *,
    image_size: int,
    max_text_len: int,
    mesh: Mesh,
    variables_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ema: bool = False,
) -> TrainState:
    """Initialises the model and optimiser directly into replicated arrays on ``mesh``.

    ``variables_fn`` (host side, e.g. loading pretrained backbone weights) may replace parts
    of the freshly initialised variables before the optimiser state is built from them.
    """
    def fresh(r: jax.Array) -> TrainState:
        return create_train_state(init_variables(model, r, image_size, max_text_len), tx,
                                  ema=ema)

    if variables_fn is None:
        return _run_once(fresh, rng, mesh)
    variables = _run_once(lambda r: init_variables(model, r, image_size, max_text_len), rng, mesh)
    variables = variables_fn(jax.device_get(variables))
    return _run_once(lambda v: create_train_state(v, tx, ema=ema), variables, mesh)


def _run_once(fn: Callable[[Any], Any], arg: Any, mesh: Mesh) -> Any:
    """Runs ``fn(arg)`` jitted into replicated arrays, compiled cheaply on CPU.

    Initialisation runs once, but XLA:CPU spends tens of seconds optimising the per-parameter
    random-number code; its result does not depend on how well that code is optimised.
    """
    lowered = jax.jit(fn, out_shardings=replicated(mesh)).lower(arg)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    return lowered.compile(compiler_options=options)(arg)


def abstract_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    image_size: int,
    max_text_len: int,
    ema: bool = False,
) -> TrainState:
    """Shapes and dtypes of the state (no computation); used to restore checkpoints."""
    return jax.eval_shape(
        lambda r: create_train_state(init_variables(model, r, image_size, max_text_len), tx,
                                     ema=ema),
        jax.random.key(0),
    )


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    learning_rate_fn: optax.Schedule,
    mesh: Mesh,
    inputs_fn: InputsFn | None = None,
    ema_decay: float = 0.0,
    replicate_text: bool = False,
) -> TrainStepFn:
    """``step(state, batch, rng) -> (state, metrics)``, jitted over ``mesh`` with donation.

    ``inputs_fn`` turns the pipeline's batch into model inputs and targets inside the jitted
    step (``transform.train_inputs``: letterbox, flip, jitter); None = the batch already holds
    float ``image`` [B, S, S, 3] and ``mask`` [B, S, S].

    Per-step randomness (dropout) is ``fold_in(rng, state['step'])``, so a resumed run draws
    the same numbers as an uninterrupted one. Metrics are replicated scalars: the loss parts,
    'loss', 'grad_norm' (before clipping), 'update_norm' and 'learning_rate' (the base rate at
    this step).

    ``ema_decay`` > 0 (the state must then hold ``'ema_params'``): after each update the
    average moves towards the new params by ``1 - ema_decay_at(step, ema_decay)``.

    ``replicate_text`` (an ``LTS`` model only): every device encodes the whole batch's
    expressions. Split over the batch like the rest, the GRU's backward scan all-reduces its
    weight gradients across devices at every time step (64 rendezvous per step at 16 tokens);
    on XLA:CPU those cost more than running the tiny text encoder on the whole batch (README,
    Benchmarks). Same maths; the gradients are summed in another order.
    """
    if replicate_text:
        model = model.clone(text_sharding=replicated(mesh))

    def step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict]:
        step_rng = jax.random.fold_in(rng, state["step"])
        if inputs_fn is not None:
            batch = inputs_fn(batch)

        def loss_of(params: Any) -> tuple[jax.Array, tuple[dict[str, Any], Any]]:
            (mask_logits, aux), updates = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]},
                batch["image"],
                batch["tokens"],
                batch["token_mask"],
                train=True,
                rngs={"dropout": step_rng},
                mutable=["batch_stats"],
            )
            total, parts = loss_fn(mask_logits, aux, batch)
            return total, (parts, updates.get("batch_stats", state["batch_stats"]))

        (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state["params"]
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {
            "params": params,
            "batch_stats": batch_stats,
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        if ema_decay > 0:
            keep = ema_decay_at(state["step"], ema_decay)
            new_state[EMA_KEY] = optax.incremental_update(params, state[EMA_KEY], 1.0 - keep)
        metrics = {
            **{k: jnp.asarray(v, jnp.float32) for k, v in parts.items()},
            "loss": loss.astype(jnp.float32),
            "grad_norm": global_norm(grads),
            # Non-finite iff some update is: catches a NaN/Inf rate even when loss and
            # gradients are still finite.
            "update_norm": global_norm(updates),
            "learning_rate": jnp.asarray(learning_rate_fn(state["step"]), jnp.float32),
        }
        return new_state, metrics

    repl = replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(repl, batch_sharding(mesh), repl),
        out_shardings=(repl, repl),
        donate_argnums=0,
    )
