"""Test-wide settings.

Four simulated CPU devices let the sharding tests run on a laptop or CI box;
the flag must be set before JAX initialises its backends. The tests run a few tiny steps
each, so XLA:CPU's optimisations cost far more compile time than they save: the suite
compiles with them off (subprocesses inherit the flags, so in-process and subprocess runs
still compute the same). Set XLA_FLAGS yourself to test with other flags.
"""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
