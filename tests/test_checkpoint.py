"""Checkpoints: last-K + best retention, iterator state, restore on other meshes, inference load."""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import pytest

from lts_jax.checkpoint import TrainCheckpoints, abstract_like, load_for_inference
from lts_jax.mesh import make_mesh, replicate, replicated
from lts_jax.workdir_config import write_config


class CountingIterator:
    """A minimal grain-checkpointable iterator: its state is how many items it produced."""

    def __init__(self) -> None:
        self.position = 0

    def __next__(self) -> int:
        self.position += 1
        return self.position

    def get_state(self) -> bytes:
        return json.dumps({"position": self.position}).encode()

    def set_state(self, state: bytes) -> None:
        self.position = json.loads(state.decode())["position"]

    def start_prefetch(self) -> None:
        pass


def _state(step: int, mesh) -> dict:
    rng = np.random.default_rng(step)
    host = {
        "params": {"visual": {"kernel": rng.standard_normal((3, 4)).astype(np.float32)},
                   "text": {"bias": rng.standard_normal((4,)).astype(np.float32)}},
        "batch_stats": {"visual": {"mean": rng.standard_normal((4,)).astype(np.float32)}},
        "opt_state": ({"mu": rng.standard_normal((3, 4)).astype(np.float32)}, ()),
        "step": np.int32(step),
    }
    return replicate(host, mesh)


def test_keeps_last_k_plus_best_and_survives_reopening(tmp_path):
    mesh = make_mesh()
    store = TrainCheckpoints(str(tmp_path), keep=2)
    o_iou = {2: 0.3, 4: 0.7, 6: 0.5, 8: None, 10: 0.6, 12: None}
    for step, value in o_iou.items():
        metrics = None if value is None else {"oIoU": value, "mIoU": value}
        assert store.save(step, _state(step, mesh), metrics=metrics)
    assert not store.save(12, _state(12, mesh))  # an existing step is left alone
    assert store.all_steps() == [4, 10, 12]  # best (4) + last two
    assert store.best_step() == 4 and store.latest_step() == 12
    store.close()
    reopened = TrainCheckpoints(str(tmp_path), keep=2)
    assert reopened.best_step() == 4 and reopened.metrics(4)["oIoU"] == pytest.approx(0.7)
    reopened.close()


def test_restore_onto_fewer_devices_and_iterator_state(tmp_path):
    assert jax.device_count() == 4
    mesh4 = make_mesh()
    saved = _state(3, mesh4)
    it = CountingIterator()
    for _ in range(5):
        next(it)
    store = TrainCheckpoints(str(tmp_path), keep=1)
    store.save(3, saved, data_iterator=it)
    expected = jax.device_get(saved)
    for devices in (jax.devices()[:2], jax.devices()[:1]):
        mesh = make_mesh(devices)
        target = abstract_like(jax.eval_shape(lambda: saved), replicated(mesh))
        fresh = CountingIterator()
        restored = store.restore(3, target, data_iterator=fresh)
        assert fresh.position == 5
        for leaf in jax.tree.leaves(restored):
            assert leaf.sharding.mesh.devices.size == len(devices)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
    store.close()


def test_load_for_inference_best_latest_and_errors(tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="run"):
        load_for_inference(workdir)
    config = ml_collections.ConfigDict({"seed": 1, "model": {"dtype": "float32"}})
    write_config(workdir, config)
    with pytest.raises(FileNotFoundError, match="No checkpoint in .*run"):
        load_for_inference(workdir)
    mesh = make_mesh()
    store = TrainCheckpoints(workdir, keep=3)
    store.save(1, _state(1, mesh))  # no metrics: 'best' falls back to the latest
    _, _, step = load_for_inference(workdir, "best")
    assert step == 1
    store.save(2, _state(2, mesh), metrics={"oIoU": 0.9})
    store.save(3, _state(3, mesh), metrics={"oIoU": 0.1})
    store.close()
    loaded_config, variables, step = load_for_inference(workdir, "best")
    assert step == 2 and loaded_config.seed == 1
    assert set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(
        np.asarray(variables["params"]["visual"]["kernel"]),
        np.asarray(_state(2, mesh)["params"]["visual"]["kernel"]),
    )
    assert load_for_inference(workdir, "latest")[2] == 3
    with pytest.raises(ValueError, match="which"):
        load_for_inference(workdir, "first")

