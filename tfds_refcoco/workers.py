"""An ordered process pool for the build's per-object work (masks, image checks).

Results come back in input order whatever the number of workers, so a build is
byte-identical however many cores it used. Work is sent in chunks with a bounded
number in flight, so memory stays flat on a 50k-object split. Workers are started
with ``spawn``: ``fork`` would copy a parent that may hold JAX or other threads
(``train.py`` builds on first use), and the functions they run live in light modules
(masks, validate), so a worker holds tens of MB, not a copy of the parent.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_num_workers() -> int:
    """The cores this process may run on (what a container or ``taskset`` allows)."""
    return len(os.sched_getaffinity(0))


def _apply_chunk(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(item) for item in chunk]


class OrderedPool:
    """``with OrderedPool(n) as pool: pool.map(fn, items)`` -> fn(item) for each, in order.

    ``n == 1`` runs everything in the calling process (no pool at all): the serial
    build. ``fn`` must be a module-level function (it is pickled by reference).
    Leaving the ``with`` block, normally or by an error, cancels what is queued and
    waits for the workers to exit, so no process outlives the build.
    """

    def __init__(self, num_workers: int, chunk_size: int = 32) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.chunk_size = chunk_size
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> OrderedPool:
        if self.num_workers > 1:
            self._executor = ProcessPoolExecutor(
                self.num_workers, mp_context=multiprocessing.get_context("spawn")
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Cancels queued work and waits for the workers to exit (idempotent)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """fn(item) for each item, in order; lazily, with a bounded amount of work ahead."""
        if self._executor is None:
            yield from map(fn, items)
            return
        max_ahead = 2 * self.num_workers  # enough to keep every worker busy
        pending: collections.deque[Future] = collections.deque()
        it = iter(items)
        try:
            while True:
                while len(pending) < max_ahead:
                    chunk = list(itertools.islice(it, self.chunk_size))
                    if not chunk:
                        break
                    pending.append(self._executor.submit(_apply_chunk, fn, chunk))
                if not pending:
                    return
                yield from pending.popleft().result()
        finally:  # a consumer that stops early (or fails) leaves nothing running for it
            for f in pending:
                f.cancel()
