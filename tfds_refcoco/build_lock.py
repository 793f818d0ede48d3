"""One build of a config at a time per data_dir, and cleanup of what killed builds left.

TFDS writes a build into ``<data_dir>/<builder>/<config>/incomplete.XXXXXX_<version>``
and renames it on success; a build that is killed (SIGKILL, OOM, a lost node) leaves
that folder behind, up to ~8 GB for RefCOCO. Two builds of the same config at once
would race on the final rename and fail with a TFDS traceback.

So a build holds an advisory ``fcntl.flock`` on ``<config>/.build.lock`` (next to the
version folder) while it runs. The kernel drops the lock when its process dies, however
it dies, so a lock is never stale. Holding it, every ``incomplete.*`` folder of that
config belongs to a dead build and is removed; without it, the build stops with one
line naming the data dir, the config and the holder.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".build.lock"
INCOMPLETE_PREFIX = "incomplete."  # tensorflow_datasets.core.constants.INCOMPLETE_PREFIX


class LockHeldError(RuntimeError):
    """``HolderLock.acquire`` found the lock held; ``holder`` is what its holder wrote."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder or "holder unknown")
        self.holder = holder


class HolderLock:
    """An exclusive, non-blocking ``fcntl.flock`` on ``path`` with "pid N on host H" written
    inside, so a refusal can name the holder. Shared by the build lock here and the training
    workdir lock (lts_jax/workdir_lock.py)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock, or raises LockHeldError at once (never waits)."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        # Its own open file description (flock is per description), not inherited by
        # workers or exec'd children.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise LockHeldError(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Empties the file and drops the lock (idempotent)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class BuildLockedError(RuntimeError):
    """Another live process is building the same config into the same data_dir."""


class BuildLock:
    """``with BuildLock(config_dir, what):`` holds the config's build lock, or raises
    BuildLockedError at once (it never waits: a RefCOCO build takes minutes).

    ``what`` names the dataset in the message, e.g. ``refcoco_masks/refcoco_unc in DIR``.
    """

    def __init__(self, config_dir: str | os.PathLike, what: str) -> None:
        self.path = Path(config_dir) / LOCK_NAME
        self.what = what
        self._lock = HolderLock(self.path)

    def __enter__(self) -> BuildLock:
        try:
            self._lock.acquire()
        except LockHeldError as held:
            raise BuildLockedError(
                f"{self.what}: another build is running ({held.holder or 'unknown'}, lock "
                f"{self.path}); wait for it to finish, then run again (it will reuse that build)"
            ) from None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()


def remove_stale_incomplete(config_dir: str | os.PathLike) -> list[Path]:
    """Removes the ``incomplete.*`` folders under ``config_dir``; returns them.

    Only call this holding the config's BuildLock: then no live build owns any of them.
    """
    config_dir = Path(config_dir)
    if not config_dir.is_dir():
        return []
    stale = sorted(p for p in config_dir.iterdir()
                   if p.name.startswith(INCOMPLETE_PREFIX) and p.is_dir())
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale
