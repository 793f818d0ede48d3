"""Keeps freed host memory in the process, so XLA:CPU's per-step buffers are not faulted in anew.

XLA:CPU allocates each execution's scratch memory (one block per device: about 35 MB for the
RefShapes 64x64 train step) with malloc and frees it when the step ends. glibc serves a block
of 32 MB or more with a fresh ``mmap`` and unmaps it on free, so every step the kernel
page-faults and zeroes the whole block again: about 8,400 faults per device per step. On a
2-core AMD EPYC (AVX-512) that cost the 64x64 step about a fifth of its time (README,
Benchmarks). ``keep_freed_memory`` sets glibc's ``M_MMAP_MAX`` to 0 (no mmap for large
blocks) and ``M_TRIM_THRESHOLD`` to 2 GiB (free memory at the top of a heap stays there):
the next step reuses the same pages. The process keeps its peak heap size instead of
returning it, which is what a training process does anyway.

A thread's heap (arena) holds at most 64 MB, so glibc still maps larger blocks with mmap,
e.g. the 96x96 step's 70 MB. For those, glibc's ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
(read when the process starts, so it goes in the environment, as ``scripts/run_refshapes.sh``
does) backs mapped blocks with transparent huge pages: one fault per 2 MB instead of 4 kB.
"""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # bytes; the largest value mallopt's int takes


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
        libc.gnu_get_libc_version  # noqa: B018 -- present in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def is_glibc() -> bool:
    """Whether ``keep_freed_memory`` can act here (glibc on Linux)."""
    return _glibc() is not None


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed blocks for reuse (see the module docstring).

    Returns whether it did: False where the C library is not glibc (macOS, musl), which keep
    their own policies. Safe to call more than once and at any time; it affects later
    allocations only.
    """
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


def keep_freed_memory_on_cpu() -> bool:
    """``keep_freed_memory`` when JAX runs on the CPU backend, whose step buffers live in host
    memory (the entry points call this after JAX's set-up); False elsewhere."""
    import jax  # here, not at import: tests/conftest.py uses this module before JAX starts

    return jax.default_backend() == "cpu" and keep_freed_memory()
