"""XLA:CPU options that trade run time for compile time, for the test suite.

The tests run a few tiny steps each, so XLA's optimisations cost far more compile time than
they save. conftest.py puts them in XLA_FLAGS; the subprocess and compiler-option tests take
them from here too, so every process of a test computes the same.
"""

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAST_COMPILE_FLAGS = " ".join(f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items())
