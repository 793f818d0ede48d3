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

import fcntl
import os
import socket
from types import TracebackType

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
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        if not self.enabled:
            return self
        os.makedirs(self.workdir, exist_ok=True)
        # Its own open file description (flock is per description), closed on exec.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise WorkdirLockedError(
                f"workdir {self.workdir} is in use by another training run "
                f"({holder or 'holder unknown'}; lock {self.path}); wait for it to finish or "
                "stop it, or pass another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
