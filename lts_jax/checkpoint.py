"""Training checkpoints in workdir/checkpoints (Orbax), and loading a trained model back.

Each step directory holds three items:
  'variables'   {'params', 'batch_stats'}            (StandardSave; all inference needs)
  'train_state' {'opt_state', 'step'}                (StandardSave)
  'data'        the grain train-iterator state       (grain.checkpoint.CheckpointSave; one
                JSON file per process; restorable on another process count, see
                DataIteratorHandler)
and, for steps that were evaluated, Orbax's metrics file (validation oIoU, mIoU, ...).
A state with a weight average (``'ema_params'``, config.optim.ema_decay) stores the average as
the 'variables' params, since that is what inference uses, and the trained params in
'train_state' as 'params'.

Kept: the last ``keep`` checkpoints plus the one with the best validation oIoU. Saves are
synchronous: the train step donates its state buffers, so nothing may still be reading them
once ``save`` returns. Restoring takes abstract arrays that carry the *current* mesh's
sharding, so a checkpoint written on N devices loads on any other number.

A step that cannot be read back (a torn write, a bad disk) is never deleted: training moves
it to workdir/unreadable_checkpoints/<step> (``set_aside``) and resumes from the newest
readable one; inference stops with CheckpointUnreadableError, one line saying what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from lts_jax.mesh import make_mesh, replicated
from lts_jax.train_step import EMA_KEY
from lts_jax.workdir_config import read_config

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"  # where training moves steps it cannot read
BEST_METRIC = "oIoU"  # validation overall IoU decides which checkpoint is "best"
VARIABLE_KEYS = ("params", "batch_stats")


class CheckpointUnreadableError(OSError):
    """A saved step's files cannot be read back (truncated or damaged)."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def error_summary(err: BaseException, limit: int = 300) -> str:
    """'<type>: <first line>' of the exception that caused ``err`` (Orbax wraps TensorStore's
    error, which appends a many-line spec), at most ``limit`` characters."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _DropReadOnlyNotice(logging.Filter):
    """Orbax announces every read-only open ("Given directory is read only=..."), which is
    what eval and predict always ask for: nothing a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only_notice() -> Iterator[None]:
    # Orbax logs through absl, i.e. the 'absl' logger; the filter is there only meanwhile.
    absl_logger, notice = logging.getLogger("absl"), _DropReadOnlyNotice()
    absl_logger.addFilter(notice)
    try:
        yield
    finally:
        absl_logger.removeFilter(notice)


def _best_metric(metrics: dict[str, Any]) -> float:
    return float(metrics[BEST_METRIC])


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or shape structs) placed with ``sharding``."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )


def _split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the 'variables' item, the 'train_state' item) of a train state (see the docstring)."""
    variables = {k: state[k] for k in VARIABLE_KEYS}
    train_state = {"opt_state": state["opt_state"], "step": state["step"]}
    if EMA_KEY in state:
        variables["params"], train_state["params"] = state[EMA_KEY], state["params"]
    return variables, train_state


def _join_state(variables: dict[str, Any], train_state: dict[str, Any]) -> dict[str, Any]:
    """The train state back from its two items (inverse of ``_split_state``)."""
    state = {**variables, **train_state}
    if "params" in train_state:
        state[EMA_KEY], state["params"] = variables["params"], train_state["params"]
    return state


def _process_index_and_count() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


class DataIteratorHandler(grain.checkpoint.CheckpointHandler):
    """grain's handler (one JSON state file per process), restorable on another process count.

    The train iterator's state is the position in the global batch stream, the same in every
    process (input_pipeline.TrainIterator; each process reads its own rows of every global
    batch). A run saved by N processes resumes on M: a process without its own file takes
    process 0's, after checking that all saved files agree.
    """

    def restore(self, directory: Any, item: Any = None, args: Any = None) -> Any:
        item = item if item is not None else args.item
        index, count = _process_index_and_count()
        if (directory / f"process_{index}-of-{count}.json").exists():
            return super().restore(directory, item=item)
        saved = sorted(directory.glob("process_*-of-*.json"))
        states = {f.read_text() for f in saved}
        if len(states) != 1:
            found = ", ".join(f.name for f in saved) or "no state files"
            raise ValueError(f"{directory}: cannot resume the data stream on {count} "
                             f"process(es) from {found} (the saved states differ or are "
                             "missing); resume with the process count that saved it")
        item.set_state(states.pop().encode())
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    """Saves a grain-checkpointable iterator with DataIteratorHandler."""

    item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    """Restores a grain-checkpointable iterator (in place) with DataIteratorHandler."""

    item: Any


class TrainCheckpoints:
    """An Orbax CheckpointManager for the train state, the data iterator and eval metrics."""

    def __init__(self, workdir: str, *, keep: int = 3, read_only: bool = False) -> None:
        self.directory = checkpoint_dir(workdir)
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(n=max(int(keep), 1)),
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=_best_metric, reverse=False, n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            # best_fn makes the manager record metrics and answer best_step(); which steps
            # survive is decided by the preservation policy above.
            best_fn=_best_metric,
            best_mode="max",
            preservation_policy=None if read_only else policy,
            enable_async_checkpointing=False,
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            read_only=read_only,
        )
        # Naming each item's handler lets item_metadata() read every item (without it Orbax
        # warns, per item, that it cannot restore what it has no handler for).
        handlers = {
            "variables": ocp.StandardCheckpointHandler(),
            "train_state": ocp.StandardCheckpointHandler(),
            "data": DataIteratorHandler(),
        }
        quiet = _quiet_read_only_notice() if read_only else contextlib.nullcontext()
        with quiet:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The evaluated step with the highest oIoU (None if no step was evaluated)."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def metrics(self, step: int) -> dict[str, Any] | None:
        return self._manager.metrics(step)

    def save(
        self,
        step: int,
        state: dict[str, Any],
        *,
        data_iterator: Any = None,
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Writes ``state`` ({params, batch_stats, opt_state, step}) at ``step``.

        Returns False (and writes nothing) when that step is already saved.
        """
        if step in self._manager.all_steps():
            return False
        variables, train_state = _split_state(state)
        items = {
            "variables": ocp.args.StandardSave(variables),
            "train_state": ocp.args.StandardSave(train_state),
        }
        if data_iterator is not None:
            items["data"] = DataSave(data_iterator)
        saved = self._manager.save(
            step, args=ocp.args.Composite(**items), metrics=metrics, force=True
        )
        self._manager.wait_until_finished()
        return bool(saved)

    def restore(
        self, step: int, abstract_state: dict[str, Any], *, data_iterator: Any = None
    ) -> dict[str, Any]:
        """The state at ``step``, laid out as ``abstract_state`` says (shapes and shardings).

        ``data_iterator`` (if given) is set to the saved position in place.
        """
        variables, train_state = _split_state(abstract_state)
        items = {
            "variables": ocp.args.StandardRestore(variables),
            "train_state": ocp.args.StandardRestore(train_state),
        }
        if data_iterator is not None:
            items["data"] = DataRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return _join_state(restored["variables"], restored["train_state"])

    def restore_variables(self, step: int, sharding: jax.sharding.Sharding) -> dict[str, Any]:
        """Only {'params', 'batch_stats'} at ``step``, shaped from the checkpoint's metadata."""
        metadata = self._manager.item_metadata(step)["variables"]
        target = abstract_like(metadata, sharding)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(variables=ocp.args.StandardRestore(target))
        )
        return dict(restored["variables"])

    def step_dir(self, step: int) -> str:
        """The directory of a saved ``step`` (Orbax's default naming: the bare number)."""
        return os.path.join(self.directory, str(int(step)))

    def set_aside(self, step: int) -> str:
        """Moves ``step``'s directory to workdir/unreadable_checkpoints/ (kept, not deleted,
        and no longer a candidate for latest or best); returns where it went.

        Call ``reload`` afterwards (on every process) so the manager forgets the step.
        """
        parent = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR)
        os.makedirs(parent, exist_ok=True)
        target, n = os.path.join(parent, str(int(step))), 0
        while os.path.exists(target):  # the same step set aside before
            n += 1
            target = os.path.join(parent, f"{int(step)}.{n}")
        os.rename(self.step_dir(step), target)
        return target

    def reload(self) -> None:
        """Re-reads the saved steps from disk (after ``set_aside``)."""
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()


def load_for_inference(
    workdir: str, which: str = "best", mesh: Mesh | None = None
) -> tuple[ml_collections.ConfigDict, dict[str, Any], int]:
    """(config, {'params', 'batch_stats'}, step) of a training workdir.

    ``which``: 'best' (highest validation oIoU; the latest when no step was evaluated) or
    'latest'. Arrays come back replicated over ``mesh`` (default: all devices).
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    config = read_config(workdir)
    if config is None:
        raise FileNotFoundError(
            f"No training run in {workdir}: {os.path.join(workdir, 'config.json')} is missing"
        )
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise FileNotFoundError(f"No checkpoint in {workdir}: {checkpoint_dir(workdir)} is missing")
    store = TrainCheckpoints(workdir, read_only=True)
    try:
        step = store.best_step() if which == "best" else None
        if step is None:
            step = store.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"No checkpoint in {workdir}: {checkpoint_dir(workdir)} holds no saved step"
            )
        try:
            variables = store.restore_variables(step, replicated(mesh or make_mesh()))
        except Exception as err:  # TensorStore/JSON errors of damaged files; see below
            raise _unreadable_for_inference(store, step, which, err) from err
    finally:
        store.close()
    return config, variables, int(step)


def _unreadable_for_inference(
    store: TrainCheckpoints, step: int, which: str, err: BaseException
) -> CheckpointUnreadableError:
    """One line: which step is unreadable, why, and what to do instead.

    Any exception counts: the same code restores every intact checkpoint of a workdir, so a
    failure belongs to this step's files.
    """
    other_which = "latest" if which == "best" else "best"
    other = store.latest_step() if other_which == "latest" else store.best_step()
    alternative = (f"pass --checkpoint {other_which} (step {other}), or "
                   if other is not None and other != step else "")
    return CheckpointUnreadableError(
        f"checkpoint step {step} in {store.directory} is unreadable ({error_summary(err)}); "
        f"{alternative}move or delete {store.step_dir(step)} and run again to use the other "
        "checkpoints (rerunning train.py on this workdir sets it aside by itself and resumes "
        "from the newest readable one)"
    )

