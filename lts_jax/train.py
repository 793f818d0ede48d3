"""train_and_evaluate: data preparation, the training loop, checkpoints, evaluation, logging.

Rerunning with the same workdir resumes from its latest checkpoint (state and data iterator),
so a killed or preempted run continues exactly where it stopped. Host syncs happen only at
log, eval and checkpoint steps: metrics of the steps in between stay on device until then,
which is also when they are checked for NaN/Inf (before anything is saved).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from orbax.checkpoint import multihost as orbax_multihost

from lts_jax import results_table
from lts_jax.checkpoint import TrainCheckpoints, abstract_like, checkpoint_dir
from lts_jax.mesh import make_mesh, replicate, replicated, shard_batch
from lts_jax.metric_writer import MetricWriter
from lts_jax.optim import create_optimizer
from lts_jax.preemption import PreemptionWatcher
from lts_jax.progress import ProgressBar
from lts_jax.train_step import (
    TRAIN_INPUTS,
    LossFn,
    abstract_train_state,
    init_train_state,
    make_train_step,
)
from lts_jax.transform import train_inputs_fn
from lts_jax.workdir_config import check_resumable, write_config

logger = logging.getLogger(__name__)

ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient; nothing after the last good save is kept."""


def resolve_dtype(name: str) -> str:
    """'auto' -> 'bfloat16' on GPU/TPU, 'float32' on CPU; other names pass through."""
    if name != "auto":
        return name
    return "bfloat16" if jax.default_backend() in ACCELERATOR_BACKENDS else "float32"


def resolve_config(
    config: ml_collections.ConfigDict, vocab_size: int | None = None
) -> ml_collections.ConfigDict:
    """A copy with run-time fields filled in: model.vocab_size (tokenizer) and model.dtype."""
    config = ml_collections.ConfigDict(config.to_dict())
    if vocab_size is not None:
        config.model.vocab_size = int(vocab_size)
    config.model.dtype = resolve_dtype(config.model.dtype)
    return config


# How long the other processes wait for process 0 to build a dataset (a RefCOCO build from
# the raw downloads takes tens of minutes).
PREPARE_TIMEOUT_S = 6 * 3600


def _barrier(name: str, timeout_s: int) -> None:
    """Waits for every process through the coordination service.

    Not a device collective: on CPU, gloo gives up when processes arrive more than ~30 s apart,
    which a dataset build easily exceeds.
    """
    if jax.process_count() > 1:
        orbax_multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s) * 1000)


def prepare_data(config: ml_collections.ConfigDict) -> Any:
    """Builds the dataset if needed and returns the tokenizer (process 0 first, then the rest,
    so hosts sharing a filesystem never build the same files concurrently)."""
    from lts_jax.tokenizer import load_tokenizer  # deferred: pulls in sentencepiece
    from tfds_refcoco import records

    num_images = int(config.data.get("refshapes_num_images", 0))
    extra = {"refshapes_num_images": num_images} if num_images > 0 else {}

    def build() -> Any:
        records.prepare(
            config.data.dataset, config.data.data_dir, config.data.manual_dir or None, **extra
        )
        return load_tokenizer(config)

    tokenizer = build() if jax.process_index() == 0 else None
    _barrier("lts_prepare_data", PREPARE_TIMEOUT_S)
    return tokenizer if tokenizer is not None else build()


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


def _check_batch_sizes(config: ml_collections.ConfigDict) -> None:
    for name in ("batch_size", "eval_batch_size"):
        size = int(config[name])
        if size % jax.device_count():
            raise ValueError(
                f"config.{name}={size} must be divisible by the number of devices "
                f"({jax.device_count()} over {jax.process_count()} process(es))"
            )


def _visual_weights_fn(path: str) -> Any:
    """Host-side hook that puts pretrained DarkNet weights into the 'visual' subtree."""
    from lts_jax.models.darknet_weights import load_visual_variables

    def apply(variables: dict[str, Any]) -> dict[str, Any]:
        loaded = load_visual_variables(path)
        for collection, subtree in loaded.items():
            current = variables[collection]["visual"]
            want = jax.tree.map(np.shape, current)
            got = jax.tree.map(np.shape, subtree)
            if want != got:
                raise ValueError(
                    f"{path}: '{collection}/visual' does not match the model "
                    "(check config.model.visual width/depth against the weights file)"
                )
            variables[collection] = {**variables[collection], "visual": subtree}
        logger.info("Loaded pretrained visual weights from %s", path)
        return variables

    return apply


class _PendingMetrics:
    """Per-step device metrics since the last host sync."""

    def __init__(self) -> None:
        self._items: list[tuple[int, dict[str, jax.Array]]] = []

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self._items.append((step, metrics))

    def flush(self) -> dict[str, float] | None:
        """Means over the pending steps (learning_rate: the latest), after a finiteness check.

        Raises NonFiniteLossError naming the first bad step.
        """
        if not self._items:
            return None
        steps = [s for s, _ in self._items]
        host = jax.device_get([m for _, m in self._items])
        self._items = []
        for step, m in zip(steps, host, strict=True):
            checked = ("loss", "grad_norm", "update_norm")
            if not all(np.isfinite(m[k]) for k in checked):
                values = ", ".join(f"{k}={float(m[k])}" for k in checked)
                raise NonFiniteLossError(f"Non-finite loss at step {step}: {values}")
        summary = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        summary["learning_rate"] = float(host[-1]["learning_rate"])
        return summary


@dataclasses.dataclass
class _Loop:
    """The step loop: train, log, evaluate the first split, checkpoint, honour SIGTERM."""

    config: ml_collections.ConfigDict
    mesh: Any
    train_iter: Iterator[dict[str, np.ndarray]]
    train_step: Callable[..., Any]
    dropout_rng: jax.Array
    store: TrainCheckpoints
    writer: MetricWriter
    bar: ProgressBar
    evaluate: Callable[[int, dict[str, Any]], dict[str, float]]  # (step, state) -> metrics

    def run(
        self, state: dict[str, Any], start_step: int
    ) -> tuple[dict[str, Any], int, tuple[int, dict[str, float]] | None, bool]:
        """Trains up to num_train_steps; returns (state, step, (step, eval metrics), preempted)."""
        config, store = self.config, self.store
        total_steps = int(config.num_train_steps)
        pending = _PendingMetrics()
        last_eval = None
        step = start_step
        timer, timed_steps = time.perf_counter(), 0
        try:
            with PreemptionWatcher() as watcher:
                while step < total_steps:
                    if watcher.should_stop(step):
                        pending.flush()
                        store.save(step, state, data_iterator=self.train_iter)
                        self.bar.write(f"SIGTERM: saved step {step} in {store.directory}")
                        return state, step, last_eval, True
                    batch = next(self.train_iter)
                    batch = shard_batch({k: batch[k] for k in TRAIN_INPUTS}, self.mesh)
                    state, metrics = self.train_step(state, batch, self.dropout_rng)
                    step += 1
                    pending.add(step, metrics)
                    if step == start_step + 1:
                        # One sync after the first step so throughput excludes compilation.
                        jax.block_until_ready(metrics)
                        timer, timed_steps = time.perf_counter(), 0
                    else:
                        timed_steps += 1
                    is_last = step == total_steps
                    if step % int(config.log_every) == 0 or is_last:
                        summary = pending.flush()
                        now = time.perf_counter()
                        if timed_steps:
                            rate = timed_steps / max(now - timer, 1e-9)
                            summary.update(steps_per_sec=rate,
                                           images_per_sec=rate * int(config.batch_size))
                        self.writer.write_scalars(step, summary, prefix="train")
                        self.bar.update(step, {"loss": summary["loss"]})
                        timer, timed_steps = now, 0
                    else:
                        self.bar.update(step)
                    eval_metrics = None
                    if step % int(config.eval_every) == 0 or is_last:
                        pending.flush()  # never evaluate or save a diverged state
                        eval_metrics = self.evaluate(step, state)
                        last_eval = (step, eval_metrics)
                    if step % int(config.checkpoint_every) == 0 or eval_metrics is not None:
                        pending.flush()
                        store.save(step, state, data_iterator=self.train_iter,
                                   metrics=eval_metrics)
                        timer, timed_steps = time.perf_counter(), 0  # exclude eval/save time
        except NonFiniteLossError as err:
            raise NonFiniteLossError(
                f"{err}. Training stopped; the last good checkpoint is step "
                f"{store.latest_step()} in {store.directory}."
            ) from None
        return state, step, last_eval, False


def _eval_splits(config: ml_collections.ConfigDict) -> list[str]:
    return [s.strip() for s in str(config.data.eval_splits).split(",") if s.strip()]


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, dict[str, float]]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a run) and evaluates it.

    Returns {split: {'mIoU', 'oIoU', 'prec@...', 'pairs'}} for every eval split at the end
    of training, or {} when stopped early by SIGTERM (after saving a checkpoint).
    """
    process_index, process_count = jax.process_index(), jax.process_count()
    is_chief = process_index == 0
    tokenizer = prepare_data(config)
    config = resolve_config(config, tokenizer.vocab_size)
    _check_batch_sizes(config)
    check_resumable(workdir, config)
    if is_chief:
        write_config(workdir, config)

    from lts_jax.evaluate import evaluate_split  # deferred: needs the pipeline
    from lts_jax.input_pipeline import create_train_loader
    from lts_jax.models.model import create_model

    mesh = make_mesh()
    model = create_model(config.model)
    total_steps = int(config.num_train_steps)
    tx, lr_schedule = create_optimizer(config.optim, total_steps)
    train_step = make_train_step(model, tx, make_loss_fn(config.loss), lr_schedule, mesh,
                                 inputs_fn=train_inputs_fn(int(config.data.image_size)))
    sizes = dict(image_size=int(config.data.image_size), max_text_len=int(config.data.max_text_len))
    rng = jax.random.key(int(config.seed))
    init_rng, dropout_rng = jax.random.split(rng)
    dropout_rng = replicate(dropout_rng, mesh)

    store = TrainCheckpoints(workdir, keep=int(config.keep_checkpoints))
    train_iter = create_train_loader(
        config, tokenizer, process_index=process_index, process_count=process_count,
        seed=int(config.seed),
    )
    latest = store.latest_step()
    if latest is not None:
        target = abstract_like(abstract_train_state(model, tx, **sizes), replicated(mesh))
        state = store.restore(latest, target, data_iterator=train_iter)
        start_step = int(latest)
        logger.info("Resumed from %s at step %d", checkpoint_dir(workdir), start_step)
    else:
        weights = str(config.init.visual_weights)
        state = init_train_state(
            model, tx, init_rng, mesh=mesh,
            variables_fn=_visual_weights_fn(weights) if weights else None, **sizes,
        )
        start_step = 0
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    logger.info(
        "%d parameters; %d device(s) over %d process(es); global batch %d; steps %d -> %d",
        num_params, jax.device_count(), process_count, config.batch_size, start_step, total_steps,
    )

    splits = _eval_splits(config)
    writer = MetricWriter(workdir, enabled=is_chief)
    bar = ProgressBar(total_steps, start_step, enabled=is_chief)

    def evaluate(split: str, step: int, state: dict[str, Any]) -> dict[str, float]:
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        metrics = evaluate_split(config, model, variables, split, tokenizer, mesh)
        writer.write_scalars(step, metrics, prefix=split)
        bar.write(
            f"step {step} {split}: mIoU {metrics['mIoU']:.4f} oIoU {metrics['oIoU']:.4f} "
            f"({int(metrics['pairs'])} pairs)"
        )
        return metrics

    try:
        loop = _Loop(config, mesh, train_iter, train_step, dropout_rng, store, writer, bar,
                     functools.partial(evaluate, splits[0]))
        state, step, last_eval, preempted = loop.run(state, start_step)
        if preempted:
            return {}
        results: dict[str, dict[str, float]] = {}
        for split in splits:
            if last_eval is not None and last_eval[0] == step and split == splits[0]:
                results[split] = last_eval[1]
            else:
                results[split] = evaluate(split, step, state)
        if is_chief:
            results_table.write_results(
                workdir,
                _result_rows(config, results),
                {
                    "checkpoint": checkpoint_dir(workdir),
                    "checkpoint_step": step,
                    "threshold": float(config.threshold),
                    "empty_union_iou": float(config.empty_union_iou),
                },
            )
        return results
    finally:
        bar.close()
        if hasattr(train_iter, "close"):
            train_iter.close()
        writer.close()
        store.close()


def final_metrics_table(
    config: ml_collections.ConfigDict, results: Mapping[str, Mapping[str, float]]
) -> str:
    """The Markdown table (percent) of train_and_evaluate's result."""
    return results_table.format_markdown(_result_rows(config, results))


def _result_rows(
    config: ml_collections.ConfigDict, results: Mapping[str, Mapping[str, float]]
) -> list[results_table.SplitResult]:
    return [results_table.SplitResult(config.data.dataset, s, m) for s, m in results.items()]

