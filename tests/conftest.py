"""Test-wide settings.

Four simulated CPU devices let the sharding tests run on a laptop or CI box;
the flag must be set before JAX initialises its backends.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
