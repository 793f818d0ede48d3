"""What the user commands (train.py, eval.py, predict.py) share: flags, multi-process set-up,
logging and the way they fail.

Every command takes ``--workdir``; train.py and eval.py also ``--config`` (with
``--config.<field>=<value>`` overrides) and the multi-process flags ``--multiprocess``,
``--coordinator_address``, ``--num_processes``, ``--process_id``, and ``--cpu_devices``. A
command defines its own flags next to these, then calls ``start(argv)`` first thing in ``main``.
"""

from __future__ import annotations

import inspect
import logging as py_logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from lts_jax.host_memory import keep_freed_memory_on_cpu
from tfds_refcoco.workers import default_num_workers

FLAGS = flags.FLAGS
COMPILATION_CACHE_DIR = "compilation_cache"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags(*, config: str | None, multiprocess: bool, workdir_help: str) -> None:
    """--workdir (required); ``config``: help text of --config (None: no such flag), and the
    multi-process flags when ``multiprocess``."""
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flag_as_required("workdir")
    flags.DEFINE_bool(
        "compilation_cache", True,
        f"Keep compiled XLA programs in <workdir>/{COMPILATION_CACHE_DIR} (JAX's persistent "
        "compilation cache), so eval.py, predict.py, demo.py and resumed runs of the same "
        "model skip recompiling. JAX_COMPILATION_CACHE_DIR, if set, names the place instead.")
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
        flags.DEFINE_string(
            "cpu_devices", None,
            "Split the CPU backend into this many single-threaded devices ('auto': one per "
            "core this process may use); the batch is sharded over them. XLA:CPU keeps about "
            "one core busy per device, so on a CPU-only machine this is faster than one "
            "multi-threaded device (README, Benchmarks). Unset: JAX's default (one device). "
            "GPU/TPU runs are unaffected.")


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


def _innermost(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return err


def config_error(err: BaseException, argv: list[str]) -> str:
    """One line for a --config file that did not load or an override that names no field."""
    root = _innermost(err)
    if isinstance(root, FileNotFoundError) or "No such file or directory" in str(err):
        filename = config_flags.get_config_filename(FLAGS["config"])
        folder = os.path.join(_REPO, "configs")
        configs = sorted(n for n in os.listdir(folder)
                         if n.endswith(".py") and n not in ("base.py", "__init__.py"))
        return f"--config: no such file {filename!r}; the configs are in {folder}: " + (
            ", ".join(configs))
    # ml_collections: KeyError("'num_train_step'\nDid you mean \"num_train_steps\" ...") a
    # few exceptions up the chain from the bare KeyError('num_train_step').
    chain, e = [], err
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    text = "\n".join(chain)
    missing = re.search(r"'(\w+)'", str(root))
    if isinstance(root, (KeyError, AttributeError)) and missing:
        name = missing.group(1)
        flag = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
                     and name in a.split("=", 1)[0].split(".")), f"an override of {name!r}")
        suggestion = re.search(r'Did you mean "([\w.]+)"', text)
        hint = f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""
        return f"{flag}: the config has no field {name!r}{hint}"
    return f"--config: {type(root).__name__}: {root}"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config mistakes (missing file, unknown field) in one line."""
    program = os.path.basename(argv[0])
    try:
        args = FLAGS(argv)
        if "config" in FLAGS and FLAGS["config"].present:
            FLAGS.config.keys()  # a file that failed to load raises only when used
    except flags.Error as err:
        if isinstance(_innermost(err), (KeyError, AttributeError)):
            raise SystemExit(f"{program}: error: {config_error(err, argv)}") from None
        # A config file's get_config error arrives with its traceback: keep the last line.
        lines = [line for line in str(err).splitlines() if line.strip()]
        message = lines[0] if len(lines) < 2 else (
            f"{lines[0].split(': Error whilst')[0]}: {lines[-1]}")
        raise SystemExit(f"{program}: error: {message}\nPass --helpshort for the flags."
                         ) from None
    except (OSError, KeyError, AttributeError) as err:
        raise SystemExit(f"{program}: error: {config_error(err, argv)}") from None
    return args


def run(main: Callable[[list[str]], None]) -> None:
    """``app.run(main)`` whose flag and config mistakes end in one line (exit status 1)."""
    app.run(main, flags_parser=_parse_flags)


def start(argv: list[str]) -> None:
    """Refuses stray arguments, sets up logging and, if asked, joins the other processes."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _quiet_abandoned_reads()
    if logging.get_verbosity() <= logging.INFO:  # unless --verbosity asks for debug output
        logging.get_absl_handler().addFilter(_OwnInfoOnly())
    if "cpu_devices" in FLAGS and FLAGS.cpu_devices is not None:
        config = FLAGS.config if "config" in FLAGS else None
        batch_sizes = [] if config is None else sharded_sizes(config)
        use_cpu_devices(parse_cpu_devices(FLAGS.cpu_devices, batch_sizes))
    if FLAGS.compilation_cache:
        use_compilation_cache(os.path.join(FLAGS.workdir, COMPILATION_CACHE_DIR))
    if "multiprocess" in FLAGS and (FLAGS.multiprocess or FLAGS.distributed):
        # Cross-process collectives on CPU need gloo; GPU/TPU ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    keep_freed_memory_on_cpu()
    logging.info("JAX %s, backend %s, %d device(s), process %d of %d", jax.__version__,
                 jax.default_backend(), jax.device_count(), jax.process_index(),
                 jax.process_count())


def sharded_sizes(config: Any) -> list[int]:
    """The batch dimensions of ``config`` that are split over the devices: the train and eval
    batches and, with several objects per image, the images of a train batch."""
    sizes = [int(config[k]) for k in ("batch_size", "eval_batch_size") if k in config]
    per_image = int(config.data.get("objects_per_image", 1)) if "data" in config else 1
    if per_image > 1 and "batch_size" in config:
        sizes.append(int(config.batch_size) // per_image)
    return sizes


def parse_cpu_devices(value: str, batch_sizes: Sequence[int] = ()) -> int:
    """The device count --cpu_devices asks for: a positive integer, or 'auto': the cores this
    process may use, lowered until it divides every one of ``batch_sizes``."""
    if value.strip().lower() == "auto":
        count = default_num_workers()
        while count > 1 and any(size % count for size in batch_sizes):
            count -= 1
        return count
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise app.UsageError(f"--cpu_devices={value!r}: expected 'auto' or a positive integer")
    return count


def use_cpu_devices(count: int) -> None:
    """Makes the CPU backend ``count`` devices, each single-threaded when there are several.

    Must run before JAX creates its backends (the first ``jax.devices()``): XLA reads its
    flags then. Measured on a 2-core AVX2 EPYC, RefShapes training: two devices of one thread
    each ran the 64x64 step about 25% faster than one two-threaded device, whose second
    thread was mostly idle (README, Benchmarks).
    """
    if count < 1:
        raise ValueError(f"need at least one CPU device, got {count}")
    jax.config.update("jax_num_cpu_devices", count)
    if count > 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false").strip()


def use_compilation_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache in ``path`` (created at the first compile
    worth keeping, >= 1 s), unless JAX already has a cache directory.

    Entries hold machine code for this CPU; XLA:CPU's loader refuses one compiled for
    features the CPU lacks and JAX then compiles afresh (jax-ml/jax#38445 shows that check,
    and that some AVX-512 Intel CPUs refuse even their own entries, which costs only the
    cache's benefit). Measured on a 2-core AVX-512 EPYC: the main job's eval.py 19.6 -> 15.3 s.
    """
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)


def fail(err: Exception) -> NoReturn:
    """Exits with status 1 and '<command>: error: <err>' on stderr (no traceback)."""
    raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {err}") from err


def _is_closed_loop_error(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class _NoUnretrievedTaskErrors(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Task exception was never retrieved")


_QUIET = "_lts_quiet_abandoned_reads"  # marks the hooks installed below


def _quiet_abandoned_reads() -> None:
    """Drops the tracebacks of checkpoint reads that a failed restore abandoned.

    When one read of a damaged checkpoint fails, Orbax gives up on the restore while
    TensorStore completes its other reads: each then posts to a closed asyncio loop ('Event
    loop is closed'), or leaves a coroutine or task whose exception nobody retrieves, and every
    one prints a traceback around the command's one-line error (tests/test_train.py,
    test_restore_falls_back_past_an_unreadable_latest_checkpoint). Only those kinds are
    dropped; this project runs no asyncio code of its own, and everything else is printed.
    """
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def quiet_excepthook(exc_type: Any, exc: Any, tb: Any) -> None:
        if not _is_closed_loop_error(exc):
            excepthook(exc_type, exc, tb)

    def quiet_unraisablehook(unraisable: Any) -> None:
        if not (_is_closed_loop_error(unraisable.exc_value)
                or inspect.iscoroutine(unraisable.object)):
            unraisablehook(unraisable)

    # Once per process: a process that starts several commands (the tests) keeps one wrapper.
    if not getattr(excepthook, _QUIET, False):
        setattr(quiet_excepthook, _QUIET, True)
        sys.excepthook = quiet_excepthook
    if not getattr(unraisablehook, _QUIET, False):
        setattr(quiet_unraisablehook, _QUIET, True)
        sys.unraisablehook = quiet_unraisablehook
    asyncio_logger = py_logging.getLogger("asyncio")
    if not any(isinstance(f, _NoUnretrievedTaskErrors) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_NoUnretrievedTaskErrors())
