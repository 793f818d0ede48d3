"""One training run per workdir at a time.

Two train.py on one workdir would write the same checkpoints, config.json and metrics.jsonl,
and one of them dies inside Orbax (e.g. ``FileNotFoundError: ...manifest.ocdbt.__lock``). So
training holds an advisory ``fcntl.flock`` on ``<workdir>/.lock`` while it runs. The kernel
drops the lock when its holder dies, however it dies (``kill -9`` included), so it is never
stale: the file stays behind, and an unlocked file means nothing. The holder writes its pid
and host into the file only so that the refusal can name it.

In a multi-process run every process shares the workdir and only process 0 locks it (the
others pass ``enabled=False``). flock reaches other hosts on NFS (Linux emulates it with
byte-range locks); some cluster filesystems (Lustre) need the ``flock`` mount option.
"""

from __future__ import annotations

import os
from types import TracebackType

from tfds_refcoco.build_lock import HolderLock, LockHeldError

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another live process is training in the same workdir."""


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir's lock, or raises WorkdirLockedError
    at once (it never waits: the other run may go on for days)."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True) -> None:
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.enabled = enabled
        self._lock = HolderLock(self.path)

    def __enter__(self) -> WorkdirLock:
        if not self.enabled:
            return self
        try:
            self._lock.acquire()
        except LockHeldError as held:
            raise WorkdirLockedError(
                f"workdir {self.workdir} is in use by another training run "
                f"({held.holder or 'holder unknown'}; lock {self.path}); wait for it to finish "
                "or stop it, or pass another --workdir"
            ) from None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()
