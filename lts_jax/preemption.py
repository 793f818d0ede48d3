"""Noticing SIGTERM (preemption, `kill`, a scheduler's time limit) so training can save and stop.

Single process: a Python SIGTERM handler sets a flag that the loop polls each step (no
device sync). Several processes: every process must stop at the same step, so the JAX
coordination service's preemption sync point is used instead (it installs its own SIGTERM
notifier during jax.distributed.initialize; a Python handler would replace it).

Training that stopped this way raises ``Preempted`` after saving, and train.py exits with
``PREEMPTED_EXIT_STATUS`` (75, EX_TEMPFAIL: "try again later"), so that a scheduler can tell
"saved, resubmit the same command" from "finished" (0) and "failed" (1). SIGTERM before
the training loop (data preparation, set-up) kills the process as usual: the shell then
reports 143 (128 + SIGTERM) and nothing new was saved.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils

PREEMPTED_EXIT_STATUS = 75  # os.EX_TEMPFAIL


class Preempted(Exception):
    """Training stopped on SIGTERM after saving ``step``; rerunning the same command resumes."""

    def __init__(self, step: int, directory: str) -> None:
        super().__init__(f"stopped by SIGTERM: saved step {step} in {directory}; "
                         "rerun the same command to resume")
        self.step = step
        self.directory = directory


class PreemptionWatcher:
    """``should_stop(step)`` turns True once a SIGTERM arrived (at the same step everywhere)."""

    def __init__(self) -> None:
        self._requested = False
        self._previous: object = None
        self._installed = False
        self._multiprocess = jax.process_count() > 1

    def __enter__(self) -> PreemptionWatcher:
        # signal.signal only works in the main thread; elsewhere SIGTERM keeps its default.
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self._requested = True

    def should_stop(self, step: int) -> bool:
        if self._multiprocess:
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # preemption service disabled
                return False
        return self._requested
