"""Test-wide settings.

Four simulated CPU devices let the sharding tests run on a laptop or CI box;
the flag must be set before JAX initialises its backends. The tests run a few tiny steps
each, so XLA:CPU's optimisations cost far more compile time than they save: the suite
compiles with them off (subprocesses inherit the flags, so in-process and subprocess runs
still compute the same). Set XLA_FLAGS yourself to test with other flags. The tests' own
processes keep freed host memory for reuse, as train.py does on CPU (lts_jax/host_memory.py).
"""

import os

from lts_jax.host_memory import keep_freed_memory
from tests.xla_options import FAST_COMPILE_FLAGS

os.environ.setdefault(
    "XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {FAST_COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
keep_freed_memory()
