"""The data mesh splits batches across devices and replicates parameters."""

import jax
import numpy as np

from lts_jax import mesh as mesh_lib


def test_mesh_spans_all_devices():
    mesh = mesh_lib.make_mesh()
    assert mesh.axis_names == (mesh_lib.DATA_AXIS,)
    assert mesh.devices.size == jax.device_count() == 4


def test_shard_batch_splits_leading_axis():
    mesh = mesh_lib.make_mesh()
    batch = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "v": np.ones(8, bool)}
    sharded = mesh_lib.shard_batch(batch, mesh)
    np.testing.assert_array_equal(np.asarray(sharded["x"]), batch["x"])
    shards = sharded["x"].addressable_shards
    assert len(shards) == 4
    assert {s.data.shape for s in shards} == {(2, 3)}
    # Device i holds rows [2i, 2i + 2).
    for s in shards:
        np.testing.assert_array_equal(np.asarray(s.data), batch["x"][s.index])


def test_replicate_puts_full_copy_everywhere():
    mesh = mesh_lib.make_mesh()
    tree = {"w": np.arange(6, dtype=np.float32)}
    out = mesh_lib.replicate(tree, mesh)
    for s in out["w"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), tree["w"])


def test_replicate_places_typed_keys_too():
    mesh = mesh_lib.make_mesh()
    key = jax.random.key(3)
    out = mesh_lib.replicate({"rng": key, "w": np.ones(2, np.float32)}, mesh)
    assert out["rng"].sharding.is_fully_replicated
    assert len(out["rng"].sharding.device_set) == 4
    np.testing.assert_array_equal(jax.random.key_data(out["rng"]), jax.random.key_data(key))
    np.testing.assert_array_equal(np.asarray(out["w"]), np.ones(2, np.float32))
