"""train_and_evaluate: data preparation, the training loop, checkpoints, evaluation, logging.

Rerunning with the same workdir resumes from its latest checkpoint (state and data iterator),
so a killed or preempted run continues exactly where it stopped. Host syncs happen only at
log, eval and checkpoint steps: metrics of the steps in between stay on device until then,
which is also when they are checked for NaN/Inf (before anything is saved).

Failure semantics (README, "Failure and resume semantics"): one run per workdir (WorkdirLock); an
unreadable latest checkpoint is set aside and the newest readable one resumed; metrics.jsonl
keeps one history, that of the checkpoint resumed; SIGTERM saves and raises Preempted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from orbax.checkpoint import multihost as orbax_multihost

from lts_jax import progress_images, results_table
from lts_jax.checkpoint import (
    CheckpointUnreadableError,
    TrainCheckpoints,
    checkpoint_dir,
    error_summary,
)
from lts_jax.evaluate import Evaluator, split_names
from lts_jax.mesh import make_mesh, shard_batch
from lts_jax.metric_writer import MetricWriter
from lts_jax.preemption import Preempted, PreemptionWatcher
from lts_jax.progress import ProgressBar
from lts_jax.train_setup import (
    TrainSetup,
    create_train_setup,
    ema_decay,
    low_res_steps,
    objects_per_image,
    resolve_config,
)
from lts_jax.train_step import TRAIN_INPUTS, TrainState, inference_params
from lts_jax.workdir_config import check_resumable, config_path, write_config
from lts_jax.workdir_lock import WorkdirLock

logger = logging.getLogger(__name__)

# How long the other processes wait for process 0 to build a dataset (a RefCOCO build from
# the raw downloads takes tens of minutes).
PREPARE_TIMEOUT_S = 6 * 3600

Results = dict[str, dict[str, float]]  # {split: {'mIoU', 'oIoU', 'prec@...', 'pairs'}}


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss, gradient or update; nothing after the last good save
    is kept."""


class RunSetupError(ValueError):
    """The config cannot run as given (found before training starts); the message says what to
    change. train.py prints it as one line; other ValueErrors are bugs and keep a traceback."""


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


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Raises RunSetupError for settings that cannot run here (before any slow preparation)."""
    devices = jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        size = int(config[name])
        if size % devices:
            lower, upper = size // devices * devices, (size // devices + 1) * devices
            choices = f"{lower} or {upper}" if lower else f"{upper}"
            raise RunSetupError(
                f"config.{name}={size} is not divisible by the {devices} devices "
                f"({jax.process_count()} process(es)): every device takes an equal share; "
                f"set --config.{name} to a multiple of {devices} (e.g. {choices})"
            )
    try:  # pure checks of config fields, so their ValueErrors are the user's to fix
        resolve_config(config)
        low_res_steps(config)
        ema_decay(config)
        per_image = objects_per_image(config)
    except ValueError as err:
        raise RunSetupError(str(err)) from None
    images = int(config.batch_size) // per_image
    if per_image > 1 and images % devices:
        raise RunSetupError(
            f"config.batch_size={config.batch_size} with config.data.objects_per_image="
            f"{per_image} gives {images} images per batch, not divisible by the {devices} "
            f"devices; set --config.batch_size to a multiple of {per_image * devices}")


def _check_run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The workdir holds no run of a different config; records the config."""
    check_resumable(workdir, config)
    if jax.process_index() == 0:
        write_config(workdir, config)


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
        checked = ("loss", "grad_norm", "update_norm")
        for step, m in zip(steps, host, strict=True):
            bad = [k for k in checked if not np.isfinite(m[k])]
            if bad:
                values = ", ".join(f"{k}={float(m[k])}" for k in checked)
                raise NonFiniteLossError(
                    f"Non-finite {' and '.join(bad)} at step {step} ({values})")
        summary = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        summary["learning_rate"] = float(host[-1]["learning_rate"])
        return summary


class _Throughput:
    """Steps/s over the steps since the last reset, leaving out compilation, evaluation and
    saving (the loop resets after each)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._start, self._steps = time.perf_counter(), 0

    def count(self) -> None:
        self._steps += 1

    def take(self) -> float | None:
        """The rate since the last reset (None if no step counted), then resets."""
        rate = self._steps / max(time.perf_counter() - self._start, 1e-9) if self._steps else None
        self.reset()
        return rate


@dataclasses.dataclass
class _Run:
    """The open resources one training run writes to, shared by the loop's helpers."""

    config: ml_collections.ConfigDict
    store: TrainCheckpoints
    train_iter: Iterator[dict[str, np.ndarray]]
    writer: MetricWriter
    bar: ProgressBar
    evaluator: Evaluator
    pending: _PendingMetrics = dataclasses.field(default_factory=_PendingMetrics)
    throughput: _Throughput = dataclasses.field(default_factory=_Throughput)
    # {split: (pair ids, expressions)} drawn at each evaluation (progress_images).
    progress_pairs: dict[str, tuple[list[int], list[str]]] = dataclasses.field(
        default_factory=dict)

    def flush(self) -> dict[str, float] | None:
        """The pending metrics' summary; a non-finite loss also names the last good save."""
        try:
            return self.pending.flush()
        except NonFiniteLossError as err:
            latest = self.store.latest_step()
            saved = (f"the last good checkpoint is step {latest} in {self.store.directory}"
                     if latest is not None else
                     f"no checkpoint has been saved yet in {self.store.directory}")
            raise NonFiniteLossError(f"{err}. Training stopped; {saved}.") from None


def _log(run: _Run, step: int) -> None:
    """Writes the mean train metrics since the last log (and the throughput) at ``step``."""
    summary = run.flush()
    rate = run.throughput.take()
    if rate is not None:
        summary.update(steps_per_sec=rate, images_per_sec=rate * int(run.config.batch_size))
    run.writer.write_scalars(step, summary, prefix="train")
    run.bar.update(step, {"loss": summary["loss"]})


def _evaluate(run: _Run, step: int, state: TrainState, splits: list[str]) -> Results:
    """Metrics of ``splits`` at ``step`` (of the weight average, if kept), logged; never of a
    diverged state."""
    run.flush()
    variables = {"params": inference_params(state), "batch_stats": state["batch_stats"]}
    results = {}
    for split in splits:
        metrics = results[split] = run.evaluator.evaluate(variables, split)
        run.writer.write_scalars(step, metrics, prefix=split)
        run.bar.write(f"step {step} {split}: mIoU {metrics['mIoU']:.4f} "
                      f"oIoU {metrics['oIoU']:.4f} ({int(metrics['pairs'])} pairs)")
    if run.writer.enabled and splits:
        _draw_progress(run, step, variables, splits[0])
    return results


def _draw_progress(run: _Run, step: int, variables: Any, split: str) -> None:
    """The same few pairs of ``split`` at every evaluation, as a TensorBoard image."""
    from lts_jax.evaluate import pair_infos

    if split not in run.progress_pairs:
        infos = pair_infos(run.config, split)
        ids = progress_images.progress_pair_ids(len(infos))
        run.progress_pairs[split] = (ids, [infos[i].expression for i in ids])
    ids, expressions = run.progress_pairs[split]
    if ids:
        picture = progress_images.draw_progress(run.evaluator, variables, split, ids,
                                                expressions)
        run.writer.write_image(step, f"{split}/pairs", picture)


def _save(run: _Run, step: int, state: TrainState, metrics: Mapping[str, float] | None = None
          ) -> None:
    """Checkpoints ``step`` (with the first split's metrics, if evaluated) after the check."""
    run.flush()
    run.store.save(step, state, data_iterator=run.train_iter,
                   metrics=dict(metrics) if metrics is not None else None)
    run.throughput.reset()  # evaluation and saving are not training time


def _restore_or_init(setup: TrainSetup, store: TrainCheckpoints, train_iter: Any,
                     workdir: str, *, expect_checkpoint: bool) -> tuple[TrainState, int]:
    """(state, step): the newest readable checkpoint (moving ``train_iter`` to its position),
    or a fresh state at step 0.

    Steps newer than the one resumed could not be read: they are set aside (moved, never
    deleted), so they are neither resumed, nor kept as the best, nor left in the way of the
    steps this run saves again. ``expect_checkpoint``: the workdir held a run (config.json).
    """
    steps = sorted(store.all_steps(), reverse=True)
    if not steps:
        if expect_checkpoint:
            logger.warning("%s has a config.json but no checkpoint in %s: starting from step 0 "
                           "(metrics.jsonl is cut back to match)", workdir,
                           checkpoint_dir(workdir))
        return setup.init_state(str(setup.config.init.visual_weights)), 0
    abstract = setup.abstract_state()
    unreadable: list[tuple[int, Exception]] = []
    for step in steps:
        try:
            state = store.restore(step, abstract, data_iterator=train_iter)
            break
        # Any error: the same code and target restore the older steps, so a failure that
        # an older step does not share lies in this step's files.
        except Exception as err:
            logger.warning("Checkpoint step %d in %s is unreadable (%s); trying the one before",
                           step, store.directory, error_summary(err))
            unreadable.append((step, err))
    else:
        first, err = unreadable[0]
        raise CheckpointUnreadableError(
            f"no checkpoint in {store.directory} can be restored (steps "
            f"{', '.join(map(str, steps))}; step {first}: {error_summary(err)}); if other code "
            "or another model wrote them, use a new --workdir; if they are damaged, move "
            f"{store.directory} away to start over from step 0"
        ) from err
    if unreadable:
        _set_aside(store, [s for s, _ in unreadable], resumed=step)
    logger.info("Resumed from %s at step %d", checkpoint_dir(workdir), step)
    return state, int(step)


def _set_aside(store: TrainCheckpoints, steps: list[int], *, resumed: int) -> None:
    """Moves unreadable ``steps`` out of the checkpoint directory (process 0, once every
    process is done reading them) and makes every process forget them."""
    _barrier("lts_unreadable_read", 600)
    if jax.process_index() == 0:
        for step in steps:
            target = store.set_aside(step)
            logger.warning("Checkpoint step %d is unreadable: moved to %s (kept for inspection; "
                           "delete it when done). Resuming from step %d.", step, target, resumed)
    _barrier("lts_unreadable_moved", 600)
    store.reload()


@contextlib.contextmanager
def _open_run(config: ml_collections.ConfigDict, workdir: str, setup: TrainSetup,
              tokenizer: Any, *, expect_checkpoint: bool
              ) -> Iterator[tuple[_Run, TrainState, int]]:
    """Opens checkpoints, data, logs and the progress bar; restores or initialises."""
    from lts_jax.input_pipeline import (  # deferred: TFDS/grain
        DecodedCacheTooLargeError,
        create_train_loader,
    )

    is_chief = jax.process_index() == 0
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(contextlib.closing(
            TrainCheckpoints(workdir, keep=int(config.keep_checkpoints))))
        try:
            loader = create_train_loader(config, tokenizer, process_index=jax.process_index(),
                                         process_count=jax.process_count(),
                                         seed=int(config.seed))
        except DecodedCacheTooLargeError as err:
            raise RunSetupError(str(err)) from None
        train_iter = stack.enter_context(contextlib.closing(loader))
        state, start_step = _restore_or_init(setup, store, train_iter, workdir,
                                             expect_checkpoint=expect_checkpoint)
        # Records after start_step belong to steps this run trains again.
        writer = stack.enter_context(contextlib.closing(
            MetricWriter(workdir, enabled=is_chief, resume_step=start_step)))
        bar = stack.enter_context(contextlib.closing(
            ProgressBar(int(config.num_train_steps), start_step, enabled=is_chief)))
        evaluator = Evaluator(config, setup.model, setup.mesh, tokenizer)
        yield _Run(config, store, train_iter, writer, bar, evaluator), state, start_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Results:
    """Trains ``config`` in ``workdir`` (resuming if it holds a run) and evaluates it.

    Returns {split: {'mIoU', 'oIoU', 'prec@...', 'pairs'}} for every eval split at the end
    of training. Raises Preempted when stopped early by SIGTERM (after saving a checkpoint),
    RunSetupError for a config that cannot run here, WorkdirLockedError when another run
    holds the workdir, CheckpointUnreadableError when no checkpoint can be read back.
    """
    _check_config(config)
    # Process 0 locks for all: every process of a run shares the workdir.
    with WorkdirLock(workdir, enabled=jax.process_index() == 0):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Results:
    expect_checkpoint = os.path.exists(config_path(workdir))  # before _check_run writes it
    tokenizer = prepare_data(config)
    config = resolve_config(config, tokenizer.vocab_size)
    _check_run(config, workdir)
    setup = create_train_setup(config, make_mesh())
    total_steps = int(config.num_train_steps)
    splits = split_names(config.data.eval_splits, config)
    with (_open_run(config, workdir, setup, tokenizer, expect_checkpoint=expect_checkpoint)
          as (run, state, start_step),
          PreemptionWatcher() as watcher):
        _log_start(state, start_step, total_steps, int(config.batch_size))
        low_steps = low_res_steps(config)
        for step in range(start_step + 1, total_steps + 1):  # ``step``: the one trained now
            if watcher.should_stop(step - 1):
                _save(run, step - 1, state)
                raise Preempted(step - 1, run.store.directory)
            batch = next(run.train_iter)
            batch = shard_batch({k: batch[k] for k in TRAIN_INPUTS}, setup.mesh)
            state, metrics = setup.step_fn(step)(state, batch, setup.dropout_rng)
            run.pending.add(step, metrics)
            # One sync after each compilation (the first step, and the first at full size
            # after progressive resizing), so throughput leaves compilation out.
            switched = low_steps > 0 and step == low_steps + 1  # first full-size step
            if step == start_step + 1 or switched:
                jax.block_until_ready(metrics)
                run.throughput.reset()
                if switched:
                    run.bar.restart_rate()
            else:
                run.throughput.count()
            if step % int(config.log_every) == 0 or step == total_steps:
                _log(run, step)
            else:
                run.bar.update(step)
            if step < total_steps and step % int(config.eval_every) == 0:
                _save(run, step, state, _evaluate(run, step, state, splits[:1])[splits[0]])
            elif step < total_steps and step % int(config.checkpoint_every) == 0:
                _save(run, step, state)
        # The end (also of a finished run rerun): every split, saved with the first one's.
        final_step = max(start_step, total_steps)
        results = _evaluate(run, final_step, state, splits)
        if final_step > start_step:
            _save(run, final_step, state, results[splits[0]])
        _write_results(config, workdir, final_step, results)
        return results


def _log_start(state: TrainState, start_step: int, total_steps: int, batch_size: int) -> None:
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    logger.info(
        "%d parameters; %d device(s) over %d process(es); global batch %d; steps %d -> %d",
        num_params, jax.device_count(), jax.process_count(), batch_size, start_step, total_steps,
    )


def _write_results(config: ml_collections.ConfigDict, workdir: str, step: int,
                   results: Results) -> None:
    """eval_results.{md,csv,json} in the workdir (process 0)."""
    if jax.process_index() == 0:
        metadata = results_table.run_metadata(config, workdir, step, "latest")
        results_table.write_results(workdir, _result_rows(config, results), metadata)


def final_metrics_table(config: ml_collections.ConfigDict, results: Mapping[str, Any]) -> str:
    """The Markdown table (percent) of train_and_evaluate's result."""
    return results_table.format_markdown(_result_rows(config, results))


def _result_rows(
    config: ml_collections.ConfigDict, results: Mapping[str, Mapping[str, float]]
) -> list[results_table.SplitResult]:
    return [results_table.SplitResult(config.data.dataset, s, m) for s, m in results.items()]
