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
        self._fd: int | None = None

    def __enter__(self) -> BuildLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by workers
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise BuildLockedError(
                f"{self.what}: another build is running ({holder}, lock {self.path}); "
                "wait for it to finish, then run again (it will reuse that build)"
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
