"""The entry points' user mistakes end in one short line (exit status 1), not a traceback."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from lts_jax import cli

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "refshapes.py") + ":tiny"


def _run(script: str, *args: str, workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args, f"--workdir={workdir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


def _start_probe(tmp_path: Path, command: str, *, before: str, after: str) -> Path:
    """A script that runs ``before``, loads ``command``'s flags, parses its argv, calls
    cli.start as the command's main does, then runs ``after``."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        + before +
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('probed', {str(REPO / command)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "from absl import flags\n"
        "argv = flags.FLAGS(sys.argv)\n"
        "from lts_jax import cli\n"
        "cli.start(argv)\n"
        + after)
    return script


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/nope.py"], "train.py: error: --config: no such file 'configs/nope.py'; "
     "the configs are in "),
    (["--config=" + TINY, "--config.num_train_step=3"],
     "train.py: error: --config.num_train_step: the config has no field 'num_train_step'; "
     "did you mean 'num_train_steps'?"),
    (["--config=" + TINY, "--config.optim.lr=3"],
     "train.py: error: --config.optim.lr: the config has no field 'lr'"),
    (["--config=" + TINY[:-4] + "tiyn"],
     "Unknown refshapes variant 'tiyn'; expected '', 'tiny' or 'test'"),
])
def test_config_mistakes_end_in_one_line(tmp_path, args, expected):
    result = _run("train.py", *args, workdir=tmp_path / "run")
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "run").exists()  # nothing was started


def test_eval_config_file_not_found(tmp_path):
    result = _run("eval.py", "--config=configs/nope.py", workdir=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "eval.py: error: --config: no such file 'configs/nope.py'" in result.stderr
    assert "refshapes.py" in result.stderr and "base.py" not in result.stderr


def test_eval_multiprocess_flags_join_with_gloo_like_train(tmp_path):
    """eval.py --distributed (and --multiprocess) goes through cli.start as train.py does:
    gloo collectives on CPU, then jax.distributed.initialize with the coordinator flags."""
    script = _start_probe(
        tmp_path, "eval.py",
        before="import jax\ncalls = []\n"
               "jax.distributed.initialize = lambda **kw: calls.append(kw)\n",
        after="print(jax.config.jax_cpu_collectives_implementation, calls)\n")
    for flag in ("--distributed", "--multiprocess"):
        result = subprocess.run(
            [sys.executable, str(script), "--workdir=/nonexistent", flag,
             "--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=1"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == ("gloo [{'coordinator_address': '127.0.0.1:1234', "
                                         "'num_processes': 2, 'process_id': 1}]")


@pytest.mark.parametrize("value, batch_sizes, cores, expected", [
    ("3", (), 2, 3),
    ("auto", (), 2, 2),
    ("auto", (32, 64), 6, 4),  # 6 and 5 do not divide 32: the largest count <= 6 that does
    ("auto", (32, 64), 1, 1),
    (" AUTO ", (9,), 4, 3),
])
def test_cpu_devices_counts(monkeypatch, value, batch_sizes, cores, expected):
    from lts_jax import cli

    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(cores)),
                        raising=False)
    assert cli.parse_cpu_devices(value, batch_sizes) == expected


def test_cpu_devices_auto_also_divides_the_images_of_a_grouped_batch(monkeypatch):
    from configs.refshapes import get_config
    from lts_jax import cli

    config = get_config()  # 30 pairs on 10 images, eval batch 64
    config.data.objects_per_image, config.batch_size = 3, 30
    assert cli.sharded_sizes(config) == [30, 64, 10]
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert cli.parse_cpu_devices("auto", cli.sharded_sizes(config)) == 2  # not 3 (64), not 4
    config.data.objects_per_image = 1
    assert cli.sharded_sizes(config) == [30, 64]


@pytest.mark.parametrize("value", ["0", "-2", "two", ""])
def test_cpu_devices_mistakes_name_the_flag(value):
    from absl import app

    from lts_jax import cli

    with pytest.raises(app.UsageError, match="--cpu_devices="):
        cli.parse_cpu_devices(value)


def test_train_cpu_devices_splits_the_cpu_into_single_threaded_devices(tmp_path):
    """--cpu_devices=auto on train.py: one CPU device per core (capped by the batch) before
    JAX starts, each with XLA's multi-threaded Eigen off; an XLA_FLAGS choice is kept."""
    script = _start_probe(
        tmp_path, "train.py",
        before="import os\nos.sched_getaffinity = lambda pid: set(range(3))\n",  # 32 needs 2
        after="import jax\nprint(jax.device_count(), os.environ.get('XLA_FLAGS'))\n")
    for extra, flags_out in (({}, "--xla_cpu_multi_thread_eigen=false"),
                             ({"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true"},
                              "--xla_cpu_multi_thread_eigen=true")):
        result = subprocess.run(
            [sys.executable, str(script), "--workdir=/nonexistent", "--cpu_devices=auto",
             "--config=" + str(REPO / "configs" / "refshapes.py"), "--config.batch_size=32",
             "--config.eval_batch_size=64"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", **extra})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"2 {flags_out}"


@pytest.mark.parametrize("command, flags", [("train.py", ["--config=" + TINY]), ("eval.py", [])])
def test_cpu_runs_keep_freed_host_memory(tmp_path, command, flags):
    """On the CPU backend cli.start tells malloc to keep freed blocks (lts_jax/host_memory.py:
    XLA:CPU's per-step scratch is then not faulted in anew every step)."""
    script = _start_probe(
        tmp_path, command,
        before="from lts_jax import host_memory\ncalls = []\n"
               "host_memory.keep_freed_memory = lambda: calls.append(1) or True\n",
        after="print(len(calls))\n")
    result = subprocess.run([sys.executable, str(script), f"--workdir={tmp_path}", *flags],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


@pytest.mark.parametrize("command, flags", [("train.py", ["--config=" + TINY]),
                                            ("eval.py", []), ("predict.py", ["--out=predictions"])])
def test_compiled_programs_are_kept_in_the_workdir(tmp_path, command, flags):
    """JAX's persistent compilation cache goes to <workdir>/compilation_cache (so eval.py
    reuses what train.py compiled), unless --nocompilation_cache or JAX_COMPILATION_CACHE_DIR
    says otherwise."""
    script = _start_probe(
        tmp_path, command, before="",
        after="import jax, jax.numpy as jnp\n"
              "print(jax.config.jax_compilation_cache_dir)\n"
              "jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()\n")
    workdir = tmp_path / "run"
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # keep even a tiny program
    for args, extra, expected in (
            ([], {}, str(workdir / "compilation_cache")),
            (["--nocompilation_cache"], {}, "None"),
            ([], {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine")}, str(tmp_path / "mine"))):
        result = subprocess.run([sys.executable, str(script), f"--workdir={workdir}", *flags,
                                 *args],
                                cwd=REPO, capture_output=True, text=True, timeout=120,
                                env={**env, **extra})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected
    for cache in (workdir / "compilation_cache", tmp_path / "mine"):
        assert len([p for p in cache.iterdir() if p.name.startswith("jit__lambda-")]) == 1


def test_abandoned_read_hooks_are_installed_once_per_process(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    asyncio_logger = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_logger, "filters", list(asyncio_logger.filters))
    cli._quiet_abandoned_reads()
    hooks = sys.excepthook, sys.unraisablehook, list(asyncio_logger.filters)
    assert hooks[0] is not sys.__excepthook__ and hooks[1] is not sys.__unraisablehook__
    cli._quiet_abandoned_reads()
    assert (sys.excepthook, sys.unraisablehook, list(asyncio_logger.filters)) == hooks


def test_abandoned_checkpoint_reads_print_nothing_but_other_errors_do(tmp_path):
    """What a failed restore leaves behind (TensorStore callbacks hitting a closed asyncio
    loop, coroutines and tasks collected with their exceptions) stays out of the output;
    any other uncaught or unraisable error is still printed."""
    script = _start_probe(tmp_path, "eval.py", before="", after=(
        "import asyncio, gc, sys, types\n"
        "sys.excepthook(RuntimeError, RuntimeError('Event loop is closed'), None)\n"
        "@types.coroutine\n"
        "def pause():\n"
        "    yield\n"
        "async def read():\n"
        "    try:\n"
        "        await pause()\n"
        "    finally:\n"
        "        raise OSError('abandoned read')\n"
        "coro = read()\n"
        "coro.send(None)\n"  # suspended; closing it at collection raises
        "del coro\n"
        "loop = asyncio.new_event_loop()\n"
        "task = loop.create_task(read())\n"
        "loop.run_until_complete(asyncio.sleep(0))\n"
        "task.cancel()\n"
        "loop.run_until_complete(asyncio.sleep(0))\n"  # the task ends with the OSError
        "loop.close()\n"
        "del task\n"
        "gc.collect()\n"
        "sys.excepthook(ValueError, ValueError('a real error'), None)\n"))
    result = subprocess.run([sys.executable, str(script), f"--workdir={tmp_path}"], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "ValueError: a real error" in result.stderr
    for quiet in ("Event loop is closed", "abandoned read", "never retrieved", "never awaited"):
        assert quiet not in result.stderr, result.stderr
