"""keep_freed_memory: a large block freed and allocated again reuses its pages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lts_jax import host_memory

REPO = Path(__file__).resolve().parents[1]
# In a fresh interpreter with glibc's defaults (the tests' own process keeps freed memory,
# conftest.py; GLIBC_TUNABLES could change the page size): allocate a 40 MB block (above
# glibc's largest mmap threshold), write every page, free it; four times. Prints the page
# faults of rounds 2-4, where a kept block costs none.
_ROUNDS = """
import ctypes, resource, sys
from lts_jax.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 40 << 20
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def _later_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True,
                         check=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
    return int(out.stdout.strip())


def test_a_freed_large_block_is_reused_instead_of_faulted_in_again():
    if not host_memory.is_glibc():
        assert host_memory.keep_freed_memory() is False
        return
    pages = 3 * (40 << 20) // 4096  # rounds 2-4, 4 kB pages
    assert _later_faults("default") > pages // 2  # mapped afresh and zeroed every round
    assert _later_faults("keep") < pages // 20


def test_is_idempotent():
    first = host_memory.keep_freed_memory()
    assert host_memory.keep_freed_memory() is first


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_other_platforms_are_left_alone(monkeypatch, platform):
    monkeypatch.setattr(sys, "platform", platform)
    assert host_memory.keep_freed_memory() is False


def test_only_the_cpu_backend_changes_the_setting(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert host_memory.keep_freed_memory_on_cpu() is False and not calls
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert host_memory.keep_freed_memory_on_cpu() is True and calls == [1]
