"""Shared helpers for the training tests: a tiny prepared RefShapes and a compile cache.

Compiling the real model's train step takes tens of seconds on a shared 2-core CPU, and the
training tests run it several times (fresh run, interrupted + resumed run, NaN run, the
multi-process workers). A persistent compilation cache for the test session makes every
compile after the first a cache load; it changes how long tests take, not what they run.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import ml_collections

NUM_IMAGES = 8  # RefShapes images over all splits: ~5 train images (~16 objects), 9 val pairs
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def enable_compile_cache() -> str:
    """Points JAX (and subprocesses, via the environment) at one cache dir per session."""
    path = os.environ.get(_CACHE_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="lts_jax_compile_cache_")
        os.environ[_CACHE_ENV] = path
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        from jax._src import compilation_cache

        # The cache is set up at the first compile of the process; start over with this dir.
        compilation_cache.reset_cache()
    return path


def tiny_data_dir(tmp_path_factory: Any) -> str:
    """A data_dir holding the prepared tiny RefShapes (prepared once per session)."""
    from tfds_refcoco import records

    root = tmp_path_factory.getbasetemp() / "lts_train_data"
    records.prepare("refshapes", str(root), None, refshapes_num_images=NUM_IMAGES)
    return str(root)


def tiny_config(data_dir: str, **overrides: Any) -> ml_collections.ConfigDict:
    """configs/refshapes.py:tiny on ``data_dir``, evaluating 'validation' only.

    ``overrides`` use '__' for nesting: ``optim__learning_rate=0.1``.
    """
    from configs.refshapes import get_config

    config = get_config("tiny")
    config.data.data_dir = data_dir
    config.data.refshapes_num_images = NUM_IMAGES
    config.data.eval_splits = "validation"
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split("__")
        for name in parents:
            node = node[name]
        node[leaf] = value
    config.lock()
    return config

