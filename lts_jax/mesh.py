"""Device mesh and batch sharding for data-parallel training and evaluation.

One 1-D mesh axis, ``data``, over every device of every process. Parameters are
replicated; batches are split on their leading axis. Each process feeds only its
own slice of the global batch (see ``shard_batch``), so the same code runs on one
CPU, one GPU host or a multi-host TPU pod.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: all global devices)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that places a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's slice of a batch into global arrays sharded on ``data``.

    Every process passes its local rows (global batch // process_count); the
    result is the global batch, laid out so each device holds its own rows.
    """
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
    }


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree of host arrays (or typed PRNG keys) on every device of the mesh.

    Keys go through a jitted identity: device_put cannot place a typed key on a sharding that
    spans other processes' devices (multi-process runs).
    """
    sharding = replicated(mesh)

    def put(x: Any) -> Any:
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.jit(lambda k: k, out_shardings=sharding)(x)
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)
