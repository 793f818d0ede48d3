"""One config's training pieces, built in one place for ``trainer`` and ``bench/train_step.py``.

``resolve_config`` fills the run-time fields (vocabulary size, compute dtype);
``create_train_setup`` builds the model, the optimiser, the LTS loss and the jitted,
data-parallel train step over a mesh, plus the init and dropout keys drawn from
``config.seed``. The setup then makes a fresh state (optionally with pretrained DarkNet
weights) or the abstract state a checkpoint restores into.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from jax.sharding import Mesh

from lts_jax.checkpoint import abstract_like
from lts_jax.mesh import replicate, replicated
from lts_jax.optim import create_optimizer
from lts_jax.train_step import (
    LossFn,
    TrainState,
    TrainStepFn,
    abstract_train_state,
    init_train_state,
    make_train_step,
)
from lts_jax.transform import train_inputs_fn

logger = logging.getLogger(__name__)

ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def resolve_dtype(name: str) -> str:
    """'auto' -> 'bfloat16' on GPU/TPU, 'float32' on CPU; other names pass through."""
    if name != "auto":
        return name
    return "bfloat16" if jax.default_backend() in ACCELERATOR_BACKENDS else "float32"


def resolve_config(
    config: ml_collections.ConfigDict, vocab_size: int | None = None
) -> ml_collections.ConfigDict:
    """A copy with run-time fields filled in: model.vocab_size (tokenizer), model.dtype and
    optim.schedule_steps (0 -> num_train_steps, so config.json records the schedule's length)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if vocab_size is not None:
        config.model.vocab_size = int(vocab_size)
    config.model.dtype = resolve_dtype(config.model.dtype)
    schedule_steps = int(config.optim.get("schedule_steps", 0))
    if schedule_steps < 0:
        raise ValueError(f"config.optim.schedule_steps={schedule_steps} must be >= 0 "
                         "(0: the schedule spans num_train_steps)")
    config.optim.schedule_steps = schedule_steps or int(config.num_train_steps)
    return config


def make_loss_fn(loss_config: ml_collections.ConfigDict) -> LossFn:
    """The LTS loss (mask BCE [+ Dice] + weighted position-prior BCE) for the train step."""
    from lts_jax.losses import lts_loss

    def loss_fn(mask_logits: jax.Array, aux: Mapping[str, jax.Array], batch: Any) -> Any:
        return lts_loss(
            mask_logits,
            aux["prior_logits"],
            batch["mask"],
            prior_weight=float(loss_config.prior_weight),
            dice_weight=float(loss_config.dice_weight),
        )

    return loss_fn


def visual_weights_fn(path: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Host-side hook that puts pretrained DarkNet weights into the 'visual' subtree."""
    from lts_jax.models.darknet_weights import load_visual_variables, merge_visual_variables

    def apply(variables: dict[str, Any]) -> dict[str, Any]:
        try:
            merged = merge_visual_variables(variables, load_visual_variables(path))
        except ValueError as err:
            raise ValueError(
                f"{path}: {err} (check config.model.visual width/depth against the weights file)"
            ) from None
        logger.info("Loaded pretrained visual weights from %s", path)
        return merged

    return apply


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What training a resolved config needs: model, optimiser, loss, jitted step, keys."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    model: nn.Module
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    loss_fn: LossFn
    inputs_fn: Callable[..., Any]
    train_step: TrainStepFn
    init_rng: jax.Array
    dropout_rng: jax.Array  # replicated over the mesh
    # The step of the first config.data.low_res_steps steps (progressive resizing), or None.
    low_res_train_step: TrainStepFn | None = None

    def step_fn(self, step: int) -> TrainStepFn:
        """The jitted train step that trains step number ``step`` (1-based)."""
        if self.low_res_train_step is not None and step <= low_res_steps(self.config):
            return self.low_res_train_step
        return self.train_step

    @property
    def _state_args(self) -> dict[str, Any]:
        """What the state's shape depends on besides the model and optimiser."""
        data = self.config.data
        return {"image_size": int(data.image_size), "max_text_len": int(data.max_text_len),
                "ema": ema_decay(self.config) > 0}

    def init_state(self, visual_weights: str = "") -> TrainState:
        """A fresh replicated state; ``visual_weights``: a DarkNet file for 'visual' ('' = none)."""
        hook = visual_weights_fn(visual_weights) if visual_weights else None
        return init_train_state(self.model, self.tx, self.init_rng, mesh=self.mesh,
                                variables_fn=hook, **self._state_args)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and (replicated) shardings of the state, to restore a checkpoint."""
        shapes = abstract_train_state(self.model, self.tx, **self._state_args)
        return abstract_like(shapes, replicated(self.mesh))


def low_res_steps(config: ml_collections.ConfigDict) -> int:
    """How many leading train steps run at config.data.low_res_image_size (0: none)."""
    data = config.data
    size, steps = int(data.get("low_res_image_size", 0)), int(data.get("low_res_steps", 0))
    if size < 0 or steps < 0:
        raise ValueError(f"config.data.low_res_image_size={size} and config.data.low_res_steps="
                         f"{steps} must be >= 0 (0 turns progressive resizing off)")
    if (size > 0) != (steps > 0):
        raise ValueError("set both config.data.low_res_image_size and config.data.low_res_steps "
                         f"(got {size} and {steps}), or neither")
    return steps


def objects_per_image(config: ml_collections.ConfigDict) -> int:
    """config.data.objects_per_image, checked: >= 1 and a divisor of config.batch_size."""
    per_image, batch = int(config.data.get("objects_per_image", 1)), int(config.batch_size)
    if per_image < 1:
        raise ValueError(f"config.data.objects_per_image={per_image} must be >= 1 (1: every "
                         "training pair brings its own image)")
    if batch % per_image:
        raise ValueError(f"config.batch_size={batch} counts (image, expression) pairs and must "
                         f"be a multiple of config.data.objects_per_image={per_image}; set "
                         f"--config.batch_size={batch // per_image * per_image or per_image}")
    return per_image


def ema_decay(config: ml_collections.ConfigDict) -> float:
    """config.optim.ema_decay (0: no weight average), checked to lie in [0, 1)."""
    decay = float(config.optim.get("ema_decay", 0.0))
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"config.optim.ema_decay={decay} must be in [0, 1) (0 turns the "
                         "weight average off; e.g. 0.99 averages about the last 100 steps)")
    return decay


def create_train_setup(config: ml_collections.ConfigDict, mesh: Mesh) -> TrainSetup:
    """Model, optimiser, LTS loss and the jitted train step(s) of a resolved ``config``."""
    from lts_jax.models.model import create_model

    model = create_model(config.model)
    schedule_steps = int(config.optim.get("schedule_steps", 0)) or int(config.num_train_steps)
    tx, lr_schedule = create_optimizer(config.optim, schedule_steps)
    if int(config.num_train_steps) > schedule_steps:
        logger.warning("Steps %d-%d run past the learning-rate schedule (optim.schedule_steps="
                       "%d) at its final rate %.3g", schedule_steps + 1,
                       int(config.num_train_steps), schedule_steps,
                       float(lr_schedule(schedule_steps)))
    loss_fn = make_loss_fn(config.loss)
    inputs_fn = train_inputs_fn(int(config.data.image_size))
    # Measured on CPU only (2-core EPYC); on GPU/TPU the text encoder follows the batch.
    options = {"ema_decay": ema_decay(config),
               "replicate_text": jax.default_backend() == "cpu" and mesh.size > 1}
    train_step = make_train_step(model, tx, loss_fn, lr_schedule, mesh, inputs_fn=inputs_fn,
                                 **options)
    low_res_step = None
    if low_res_steps(config):
        low_res_step = make_train_step(
            model, tx, loss_fn, lr_schedule, mesh,
            inputs_fn=train_inputs_fn(int(config.data.low_res_image_size)), **options)
    init_rng, dropout_rng = jax.random.split(jax.random.key(int(config.seed)))
    return TrainSetup(config, mesh, model, tx, lr_schedule, loss_fn, inputs_fn, train_step,
                      init_rng, replicate(dropout_rng, mesh), low_res_step)
