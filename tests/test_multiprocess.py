"""Multi-process training: a run started on 1 process resumes on 2 and matches a 1-process run.

``train.py`` processes run the tiny RefShapes config on CPU. The reference trains 4 steps in
one process (4 simulated devices), saving steps 2 and 4. A copy of its workdir cut back to
step 2 is then resumed by a pair of processes joined by ``jax.distributed`` (gloo collectives
over 127.0.0.1, 2 devices each, the global batch split between them) for steps 3 and 4. The
data stream is the same under any process count, so every step's loss, the checkpoints and
the final evaluation must agree up to all-reduce rounding.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lts_jax.metric_writer import read_metrics
from lts_jax.tokenizer import load_tokenizer
from tests.train_fixtures import NUM_IMAGES, tiny_config, tiny_data_dir
from tests.xla_options import FAST_COMPILE_FLAGS

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # for each of the two stages


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_command(data_dir: str, workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "train.py"),
        "--config", str(REPO / "configs" / "refshapes.py") + ":tiny",
        "--workdir", str(workdir),
        f"--config.data.data_dir={data_dir}",
        f"--config.data.refshapes_num_images={NUM_IMAGES}",
        "--config.data.eval_splits=validation",
        "--config.log_every=1",  # every step's own loss in metrics.jsonl
        *extra,
    ]


def _env(num_devices: int) -> dict[str, str]:
    """This environment with ``num_devices`` CPU devices, set before the child imports JAX."""
    env = dict(os.environ)
    # XLA:CPU spends most of this test compiling: every process gets the suite's fast-compile
    # flags, so the runs stay comparable.
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE_FLAGS}"
    env["JAX_PLATFORMS"] = "cpu"
    # Each run keeps its compiled programs in its workdir (train.py's default; only process 0
    # of the pair writes there), not in the test session's cache.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


class _Runs:
    """Child processes with their output in files; ``kill`` stops any still running."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        with (open(self.log_dir / f"{name}.out", "wb") as out,
              open(self.log_dir / f"{name}.err", "wb") as err):
            self.procs[name] = subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                                stderr=err, stdin=subprocess.DEVNULL)

    def wait(self, timeout_s: float) -> str | None:
        """Waits for all; returns why it gave up (a failure or the timeout), None if all ran."""
        deadline = time.monotonic() + timeout_s
        while True:
            codes = {name: p.poll() for name, p in self.procs.items()}
            failed = [f"{n} exited with {c}" for n, c in codes.items() if c not in (None, 0)]
            if failed:
                # The other process of a pair would only hang on its next collective.
                return "; ".join(failed)
            if all(c == 0 for c in codes.values()):
                return None
            if time.monotonic() > deadline:
                running = [n for n, c in codes.items() if c is None]
                return f"timed out after {timeout_s:.0f} s waiting for {running}"
            time.sleep(0.5)

    def kill(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    def report(self, reason: str) -> str:
        parts = [reason]
        for name in self.procs:
            for stream in ("out", "err"):
                text = (self.log_dir / f"{name}.{stream}").read_text(errors="replace")
                parts.append(f"----- {name} std{stream} (last 4000 chars) -----\n{text[-4000:]}")
        return "\n".join(parts)


def _train_losses(workdir: Path) -> dict[int, float]:
    return {int(r["step"]): r["train/loss"] for r in read_metrics(str(workdir))
            if "train/loss" in r}


def _eval_metrics(workdir: Path) -> dict[str, float]:
    """The final validation metrics (fractions, and 'pairs') as logged to metrics.jsonl."""
    records = [r for r in read_metrics(str(workdir)) if "validation/mIoU" in r]
    assert records and (workdir / "eval_results.json").exists()
    return {k.split("/", 1)[1]: v for k, v in records[-1].items() if k.startswith("validation/")}


def _saved_steps(workdir: Path) -> list[int]:
    names = os.listdir(workdir / "checkpoints")
    return sorted(int(n) for n in names if n.isdigit())


def test_resume_on_two_processes_matches_one_uninterrupted_process(tmp_path_factory, tmp_path):
    data_dir = tiny_data_dir(tmp_path_factory)
    load_tokenizer(tiny_config(data_dir))  # data and tokenizer ready: no run builds them
    single, multi = tmp_path / "single", tmp_path / "multi"
    port = _free_port()
    runs = _Runs(tmp_path)
    start = time.monotonic()
    try:
        runs.start("single", _train_command(data_dir, single, "--config.checkpoint_every=2"),
                   _env(4))
        failure = runs.wait(TIMEOUT_S)
        if failure is None:
            # The same run stopped after step 2: its checkpoint 2 and the records up to it
            # (the resume cuts metrics.jsonl back to the step it resumes).
            shutil.copytree(single, multi, ignore=shutil.ignore_patterns("compilation_cache"))
            shutil.rmtree(multi / "checkpoints" / "4")
            for i in range(2):
                flags = ["--multiprocess", f"--coordinator_address=127.0.0.1:{port}",
                         "--num_processes=2", f"--process_id={i}",
                         "--config.checkpoint_every=4"]
                runs.start(f"process{i}", _train_command(data_dir, multi, *flags), _env(2))
            failure = runs.wait(TIMEOUT_S)
    finally:
        runs.kill()
    assert failure is None, runs.report(failure)
    elapsed = time.monotonic() - start

    context = runs.report(f"runs finished in {elapsed:.0f} s")
    losses, mp_losses = _train_losses(single), _train_losses(multi)
    assert sorted(losses) == sorted(mp_losses) == [1, 2, 3, 4], context
    np.testing.assert_allclose([mp_losses[s] for s in sorted(losses)],
                               [losses[s] for s in sorted(losses)], rtol=1e-4, err_msg=context)
    assert losses[1] != losses[4]  # it did train

    evals, mp_evals = _eval_metrics(single), _eval_metrics(multi)
    assert mp_evals["pairs"] == evals["pairs"] > 0, context
    # Thresholded masks: a pixel whose logit sits at the threshold may flip with the rounding.
    for key in ("mIoU", "oIoU"):
        np.testing.assert_allclose(mp_evals[key], evals[key], rtol=0, atol=2e-3,
                                   err_msg=f"{key}\n{context}")
    # The single process saved step 2; both processes wrote step 4 together, each with its
    # own data-iterator state.
    assert _saved_steps(single) == [2, 4] and _saved_steps(multi) == [2, 4], context
    data_dir_2 = multi / "checkpoints" / "2" / "data"
    data_dir_4 = multi / "checkpoints" / "4" / "data"
    assert sorted(n for n in os.listdir(data_dir_2) if n.endswith(".json")) == [
        "process_0-of-1.json"], context
    data_files = sorted(n for n in os.listdir(data_dir_4) if n.endswith(".json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"], context
