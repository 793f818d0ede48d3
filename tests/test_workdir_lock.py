"""One training run per workdir: the second one stops at once; a killed holder leaves no lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lts_jax.workdir_lock import WorkdirLock, WorkdirLockedError

REPO = Path(__file__).resolve().parents[1]
# Holds the lock of the workdir in argv[1] until killed (stdlib only: starts in ~0.1 s).
_HOLDER = """
import sys, time
from lts_jax.workdir_lock import WorkdirLock
with WorkdirLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_lock_fails_fast_naming_the_holder(tmp_path):
    workdir = str(tmp_path / "run")
    with WorkdirLock(workdir):
        start = time.monotonic()
        # flock is per open file description: a second open in this process is a rival.
        with pytest.raises(WorkdirLockedError) as err, WorkdirLock(workdir):
            pass
        assert time.monotonic() - start < 1.0
    message = str(err.value)
    assert "\n" not in message and workdir in message
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    with WorkdirLock(workdir):  # released on exit
        pass
    with WorkdirLock(workdir), WorkdirLock(workdir, enabled=False):
        pass  # processes other than 0 take no lock: they share process 0's workdir


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    workdir = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLockedError, match=f"pid {proc.pid} on host"):
            WorkdirLock(workdir).__enter__()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert os.path.exists(os.path.join(workdir, ".lock"))  # the file stays, unlocked
    with WorkdirLock(workdir):
        pass


def test_train_and_evaluate_refuses_a_workdir_in_use(tmp_path):
    from lts_jax import trainer
    from tests.train_fixtures import tiny_config

    workdir = str(tmp_path / "run")
    # No data is prepared: the lock is taken before anything slow happens.
    with WorkdirLock(workdir), pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
        trainer.train_and_evaluate(tiny_config(str(tmp_path / "no_data")), workdir)
    assert not os.path.exists(tmp_path / "no_data")
