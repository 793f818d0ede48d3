"""Train (and evaluate) LTS: ``python train.py --config configs/<name>.py[:arg] --workdir DIR``.

Rerunning the same command resumes from the workdir's latest checkpoint. Config fields are
overridden with ``--config.<field>=<value>`` (a mistyped field is an error). Several hosts:
add ``--multiprocess`` (plus the coordinator flags where the cluster is not auto-detected).
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py), optionally ':arg'.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, config.json.")
_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False, "Call jax.distributed.initialize (multi-host GPU/TPU or CPU+gloo)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default: auto-detected)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (auto if unset).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (auto if unset).")
flags.mark_flags_as_required(["config", "workdir"])


_REPO = os.path.dirname(os.path.abspath(__file__))


class _OwnInfoOnly(py_logging.Filter):
    """Keeps INFO lines from this repository's code; libraries (Orbax, TFDS) only warn.

    Their per-save INFO chatter would otherwise bury the progress bar.
    """

    def filter(self, record: py_logging.LogRecord) -> bool:
        path = record.pathname
        own = path.startswith(_REPO) and f"{os.sep}site-packages{os.sep}" not in path
        if record.getMessage().startswith("Requested `tracked_metric`"):
            return False  # Orbax: a checkpoint saved between evaluations has no metrics
        return record.levelno >= py_logging.WARNING or own


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if logging.get_verbosity() <= logging.INFO:  # unless --verbosity asks for debug output
        logging.get_absl_handler().addFilter(_OwnInfoOnly())
    if _MULTIPROCESS.value:
        # Cross-process collectives on CPU need gloo; GPU/TPU ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    # Deferred so that jax.distributed.initialize runs before anything touches a backend.
    from lts_jax.train import NonFiniteLossError, final_metrics_table, train_and_evaluate
    from lts_jax.workdir_config import ConfigMismatchError

    logging.info("JAX %s, backend %s, %d device(s), process %d of %d", jax.__version__,
                 jax.default_backend(), jax.device_count(), jax.process_index(),
                 jax.process_count())
    try:
        results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (NonFiniteLossError, ConfigMismatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if results and jax.process_index() == 0:
        print(final_metrics_table(_CONFIG.value, results))


if __name__ == "__main__":
    app.run(main)
