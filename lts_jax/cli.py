"""What the user commands (train.py, eval.py, predict.py) share: flags, multi-process set-up,
logging and the way they fail.

Every command takes ``--workdir``; train.py and eval.py also ``--config`` (with
``--config.<field>=<value>`` overrides) and the multi-process flags ``--multiprocess``,
``--coordinator_address``, ``--num_processes``, ``--process_id``. A command defines its own
flags next to these, then calls ``start(argv)`` first thing in ``main``.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
from typing import NoReturn

import jax
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags(*, config: str | None, multiprocess: bool, workdir_help: str) -> None:
    """--workdir (required); ``config``: help text of --config (None: no such flag), and the
    multi-process flags when ``multiprocess``."""
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flag_as_required("workdir")
    if config is not None:
        config_flags.DEFINE_config_file("config", None, config, lock_config=True)
    if multiprocess:
        flags.DEFINE_bool("multiprocess", False,
                          "Call jax.distributed.initialize (multi-host GPU/TPU, or CPU + gloo).")
        flags.DEFINE_bool("distributed", False, "Deprecated alias of --multiprocess.")
        flags.DEFINE_string("coordinator_address", None,
                            "host:port of process 0 (default: auto-detected).")
        flags.DEFINE_integer("num_processes", None, "Process count (auto if unset).")
        flags.DEFINE_integer("process_id", None, "This process's index (auto if unset).")


class _OwnInfoOnly(py_logging.Filter):
    """Keeps INFO lines from this repository's code; libraries (Orbax, TFDS) only warn.

    Their per-save and per-restore INFO chatter would otherwise bury the progress bar and
    the results.
    """

    def filter(self, record: py_logging.LogRecord) -> bool:
        path = record.pathname
        own = path.startswith(_REPO) and f"{os.sep}site-packages{os.sep}" not in path
        if record.getMessage().startswith("Requested `tracked_metric`"):
            return False  # Orbax: a checkpoint saved between evaluations has no metrics
        return record.levelno >= py_logging.WARNING or own


def start(argv: list[str]) -> None:
    """Refuses stray arguments, sets up logging and, if asked, joins the other processes."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if logging.get_verbosity() <= logging.INFO:  # unless --verbosity asks for debug output
        logging.get_absl_handler().addFilter(_OwnInfoOnly())
    if "multiprocess" in FLAGS and (FLAGS.multiprocess or FLAGS.distributed):
        # Cross-process collectives on CPU need gloo; GPU/TPU ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    logging.info("JAX %s, backend %s, %d device(s), process %d of %d", jax.__version__,
                 jax.default_backend(), jax.device_count(), jax.process_index(),
                 jax.process_count())


def fail(err: Exception) -> NoReturn:
    """Exits with status 1 and '<command>: error: <err>' on stderr (no traceback)."""
    raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {err}") from err
