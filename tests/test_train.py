"""Training: the jitted step on a toy model, and train_and_evaluate end to end (tiny config)."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lts_jax import input_pipeline, train_setup
from lts_jax import trainer as train_lib
from lts_jax.checkpoint import TrainCheckpoints, load_for_inference
from lts_jax.evaluate import Evaluator
from lts_jax.mesh import make_mesh, replicated, shard_batch
from lts_jax.metric_writer import read_metrics
from lts_jax.models.model import create_model
from lts_jax.optim import create_optimizer
from lts_jax.preemption import Preempted
from lts_jax.progress import ProgressBar
from lts_jax.tokenizer import load_tokenizer
from lts_jax.train_step import ema_decay_at, init_train_state, make_train_step
from lts_jax.workdir_config import ConfigMismatchError, read_config
from tests.train_fixtures import enable_compile_cache, tiny_config, tiny_data_dir

# ----------------------------------------------------------------------------- toy model


class ToyLTS(nn.Module):
    """The LTS call signature and outputs on a few cheap layers (BN, dropout, 'visual')."""

    @nn.compact
    def __call__(self, image, tokens, token_mask, *, train):
        x = nn.Conv(4, (4, 4), strides=(4, 4), name="visual")(image)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="fusion")(x)
        words = nn.Embed(16, 4, name="text")(tokens)
        m = token_mask[..., None].astype(x.dtype)
        sentence = (words * m).sum(1) / m.sum(1)
        x = nn.relu(x * sentence[:, None, None, :])
        x = nn.Dropout(0.5, deterministic=not train)(x)
        mask_logits = nn.Conv(1, (1, 1), name="segment")(x)[..., 0]
        b, h, w = mask_logits.shape
        prior = mask_logits.reshape(b, h // 4, 4, w // 4, 4).mean((2, 4))
        return mask_logits, {"prior_logits": prior, "relevance": jax.nn.sigmoid(prior)}


def _toy_batches(n: int, batch: int = 8, size: int = 32, length: int = 5):
    rng = np.random.default_rng(0)
    for _ in range(n):
        yield {
            "image": rng.random((batch, size, size, 3), dtype=np.float32),
            "mask": (rng.random((batch, size, size)) > 0.5).astype(np.float32),
            "tokens": rng.integers(1, 16, (batch, length)).astype(np.int32),
            "token_mask": np.arange(length)[None, :] < rng.integers(1, length + 1, (batch, 1)),
        }


def _toy_run(devices):
    optim = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=0.01, weight_decay=1e-4, b1=0.9, b2=0.999, eps=1e-8,
        warmup_steps=1, schedule="cosine", decay_at=(), decay_factor=0.1, end_factor=0.0,
        clip_norm=1.0, backbone_lr_mult=0.1))
    loss = ml_collections.ConfigDict(dict(prior_weight=1.0, dice_weight=0.5))
    mesh = make_mesh(devices)
    model = ToyLTS()
    tx, schedule = create_optimizer(optim, 10)
    state = init_train_state(model, tx, jax.random.key(0), image_size=32, max_text_len=5,
                             mesh=mesh)
    step_fn = make_train_step(model, tx, train_setup.make_loss_fn(loss), schedule, mesh)
    rng = jax.device_put(jax.random.key(1), replicated(mesh))
    history = []
    for batch in _toy_batches(3):
        previous = state
        state, metrics = step_fn(state, shard_batch(batch, mesh), rng)
        history.append({**jax.device_get(metrics),
                        "batch_stats": jax.device_get(state["batch_stats"])})
    return previous, state, history, step_fn


def test_train_step_is_the_same_on_4_and_1_devices_and_compiles_once():
    old4, state4, hist4, step4 = _toy_run(jax.devices())
    _, state1, hist1, step1 = _toy_run(jax.devices()[:1])
    assert step4._cache_size() == 1 and step1._cache_size() == 1  # no recompiles
    assert int(state4["step"]) == 3
    losses4 = [h["loss"] for h in hist4]
    np.testing.assert_allclose(losses4, [h["loss"] for h in hist1], rtol=1e-5)
    assert losses4[0] != losses4[1]
    for h in hist4:
        assert set(h) > {"loss", "mask_loss", "prior_loss", "dice_loss", "grad_norm",
                          "update_norm", "learning_rate"}
    # BatchNorm statistics under jit are over the global batch, whatever the sharding
    # (compared after the first step: later steps add Adam's amplified rounding noise).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 hist4[0]["batch_stats"], hist1[0]["batch_stats"])
    for leaf in jax.tree.leaves(state4["params"]):
        assert leaf.sharding.is_fully_replicated
    # The state argument is donated.
    assert all(x.is_deleted() for x in jax.tree.leaves(old4["params"]))


def test_weight_average_follows_the_trained_params_with_a_warmed_up_decay():
    optim = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=0.01, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
        warmup_steps=0, schedule="constant", decay_at=(), decay_factor=0.1, end_factor=0.0,
        clip_norm=0.0, backbone_lr_mult=1.0))
    loss = ml_collections.ConfigDict(dict(prior_weight=1.0, dice_weight=0.0))
    mesh, model = make_mesh(jax.devices()[:1]), ToyLTS()
    tx, schedule = create_optimizer(optim, 10)
    state = init_train_state(model, tx, jax.random.key(0), image_size=32, max_text_len=5,
                             mesh=mesh, ema=True)
    average = jax.device_get(state["params"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["ema_params"]), average)
    step_fn = make_train_step(model, tx, train_setup.make_loss_fn(loss), schedule, mesh,
                              ema_decay=0.95)
    rng = jax.device_put(jax.random.key(1), replicated(mesh))
    for step, batch in enumerate(_toy_batches(4)):
        state, _ = step_fn(state, shard_batch(batch, mesh), rng)
        keep = float(ema_decay_at(step, 0.95))
        average = jax.tree.map(lambda a, p, k=keep: k * a + (1 - k) * p, average,
                               jax.device_get(state["params"]))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     jax.device_get(state["ema_params"]), average)
    # Warm-up: 1/10 kept after step 0, then more, never more than the decay itself.
    assert float(ema_decay_at(0, 0.95)) == pytest.approx(0.1)
    assert float(ema_decay_at(3, 0.95)) == pytest.approx(4 / 13)
    assert float(ema_decay_at(10_000, 0.95)) == pytest.approx(0.95)
    assert not np.allclose(jax.device_get(state["ema_params"]["segment"]["kernel"]),
                           jax.device_get(state["params"]["segment"]["kernel"]))


def _loop_all_reduces(hlo: str) -> int:
    """All-reduce ops inside the bodies of while loops of an optimised HLO module."""
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    count, current = 0, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) ", line)  # unindented: a computation
        if header:
            current = header.group(1)
        elif current in bodies and "all-reduce(" in line:
            count += 1
    return count


def test_replicated_text_encoder_keeps_all_reduces_out_of_the_gru_loop():
    """replicate_text: the same loss and update as the batch-split step, without an
    all-reduce inside the GRU's scan (the point of the option)."""
    from configs.refshapes import get_config

    config = get_config("tiny")
    config.model.vocab_size = 16
    config.data.max_text_len = 5
    config = train_setup.resolve_config(config)
    mesh = make_mesh(jax.devices()[:2])
    model = create_model(config.model)
    tx, schedule = create_optimizer(config.optim, 4)
    loss_fn = train_setup.make_loss_fn(config.loss)
    batch = shard_batch(next(_toy_batches(1, size=64)), mesh)
    rng = jax.device_put(jax.random.key(1), replicated(mesh))
    # One initial state for both (the step donates its state argument, so each gets a copy),
    # and each step compiled once: the program whose HLO is inspected is the one that runs.
    initial = jax.device_get(init_train_state(model, tx, jax.random.key(0), image_size=64,
                                              max_text_len=5, mesh=mesh))
    results = {}
    for replicate in (False, True):
        state = jax.device_put(initial, replicated(mesh))
        step_fn = make_train_step(model, tx, loss_fn, schedule, mesh, replicate_text=replicate)
        compiled = step_fn.lower(state, batch, rng).compile()
        state, metrics = compiled(state, batch, rng)
        results[replicate] = (_loop_all_reduces(compiled.as_text()),
                              jax.device_get((metrics, state["params"])))
    assert results[False][0] > 0  # the batch-split GRU all-reduces inside its scan
    assert results[True][0] == 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 results[True][1], results[False][1])


def test_pending_metrics_name_the_first_bad_step():
    pending = train_lib._PendingMetrics()
    ok = {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(2.0),
          "update_norm": jnp.float32(0.1), "learning_rate": jnp.float32(0.5)}
    pending.add(1, ok)
    pending.add(2, ok)
    summary = pending.flush()
    assert summary["loss"] == 1.0 and summary["learning_rate"] == 0.5
    assert pending.flush() is None
    pending.add(3, ok)
    pending.add(4, {**ok, "update_norm": jnp.float32(np.inf)})
    pending.add(5, {**ok, "loss": jnp.float32(np.nan)})
    with pytest.raises(train_lib.NonFiniteLossError, match="at step 4"):
        pending.flush()


# ----------------------------------------------------------------------- end to end (tiny)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    enable_compile_cache()
    return tiny_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    """An uninterrupted 4-step run, with the jitted train step kept for inspection."""
    workdir = str(tmp_path_factory.mktemp("full") / "run")
    steps = []
    make = train_setup.make_train_step

    def recording(*args, **kwargs):
        steps.append(make(*args, **kwargs))
        return steps[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_setup, "make_train_step", recording)
        results = train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
    return workdir, results, steps[0]


def _variables(workdir: str, which: str = "latest"):
    _, variables, step = load_for_inference(workdir, which)
    return jax.device_get(variables), step


def test_train_and_evaluate_outputs(full_run):
    workdir, results, step_fn = full_run
    assert set(results) == {"validation"}
    assert set(results["validation"]) >= {"mIoU", "oIoU", "prec@0.5", "pairs"}
    assert 0.0 <= results["validation"]["mIoU"] <= 1.0 and results["validation"]["pairs"] > 0
    assert step_fn._cache_size() == 1  # compiled once for all steps

    records = read_metrics(workdir)
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == [2, 4]
    last = [r for r in records if "train/loss" in r][-1]
    for key in ("train/mask_loss", "train/prior_loss", "train/learning_rate",
                "train/grad_norm", "train/steps_per_sec", "train/images_per_sec"):
        assert np.isfinite(last[key]), key
    assert any(r["step"] == 4 and "validation/oIoU" in r for r in records)
    scalars, images = _tensorboard_tags(os.path.join(workdir, "tensorboard"))
    assert {"train/loss", "validation/mIoU", "validation/prec_0.5"} <= scalars
    assert "validation/pairs" not in scalars  # a count, not a curve
    # The fixed validation pairs drawn at the evaluation (step 4) as one PNG.
    ((step, png),) = images["validation/pairs"]
    assert step == 4 and png.startswith(b"\x89PNG")
    assert os.path.exists(os.path.join(workdir, "eval_results.md"))
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["model"]["vocab_size"] > 0 and saved["model"]["dtype"] == "float32"

    store = TrainCheckpoints(workdir, read_only=True)
    assert store.all_steps() == [2, 4] and store.best_step() == 4
    store.close()


def _tensorboard_tags(logdir: str) -> tuple[set[str], dict[str, list[tuple[int, bytes]]]]:
    """(scalar tags, {image tag: [(step, encoded image)]}) of the event files in ``logdir``
    (TFRecord framing: length, its CRC, the Event proto, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: set[str] = set()
    images: dict[str, list[tuple[int, bytes]]] = {}
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    images.setdefault(value.tag, []).append(
                        (event.step, value.image.encoded_image_string))
                else:
                    scalars.add(value.tag)
    return scalars, images


def _preempt_after_step_1(config: ml_collections.ConfigDict, workdir: str) -> Preempted:
    """Trains ``config`` in ``workdir`` with a SIGTERM after step 1 (as if the scheduler
    preempted the run); the Preempted it stopped with."""
    update = ProgressBar.update

    def update_then_sigterm(self, step, scalars=None):
        update(self, step, scalars)
        if step == 1:
            signal.raise_signal(signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProgressBar, "update", update_then_sigterm)
        with pytest.raises(Preempted, match="saved step 1") as stop:
            train_lib.train_and_evaluate(config, workdir)
    return stop.value


def test_sigterm_saves_and_rerun_resumes_bit_identically(full_run, data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    assert _preempt_after_step_1(tiny_config(data_dir), workdir).step == 1
    store = TrainCheckpoints(workdir, read_only=True)
    assert store.latest_step() == 1  # saved on SIGTERM (checkpoint_every is 2)
    store.close()

    results = train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
    resumed, step = _variables(workdir)
    reference, ref_step = _variables(full_run[0])
    assert step == ref_step == 4
    # Same parameters bit for bit: the data iterator and RNG resumed exactly.
    jax.tree.map(np.testing.assert_array_equal, resumed, reference)
    assert results["validation"] == full_run[1]["validation"]


def test_weight_average_is_evaluated_saved_for_inference_and_resumed(data_dir, tmp_path):
    """config.optim.ema_decay: the run reports the average's metrics, eval/predict load the
    average, and a run stopped at step 1 resumes to the same average and params."""
    config = tiny_config(data_dir, optim__ema_decay=0.9)
    full = train_lib.train_and_evaluate(config, str(tmp_path / "full"))
    _preempt_after_step_1(config, str(tmp_path / "resumed"))
    resumed = train_lib.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert resumed["validation"] == full["validation"]

    setup = train_setup.create_train_setup(read_config(str(tmp_path / "full")), make_mesh())
    states = []
    for name in ("full", "resumed"):
        store = TrainCheckpoints(str(tmp_path / name), read_only=True)
        states.append(jax.device_get(store.restore(4, setup.abstract_state())))
        store.close()
    jax.tree.map(np.testing.assert_array_equal, states[0], states[1])
    inference, _ = _variables(str(tmp_path / "full"))
    jax.tree.map(np.testing.assert_array_equal, inference["params"], states[0]["ema_params"])
    assert not np.array_equal(states[0]["ema_params"]["segment"]["head"]["kernel"],
                              states[0]["params"]["segment"]["head"]["kernel"])
    # The reported metrics are the average's: evaluating the loaded variables gives them.
    evaluator = Evaluator(setup.config, setup.model, setup.mesh, load_tokenizer(config))
    assert evaluator.evaluate(inference, "validation") == full["validation"]
    with pytest.raises(train_lib.RunSetupError, match="config.optim.ema_decay=1.0"):
        train_lib.train_and_evaluate(tiny_config(data_dir, optim__ema_decay=1.0),
                                     str(tmp_path / "bad"))


class _NaNImageAt:
    """Wraps the train iterator; batch number ``bad`` (1-based) gets a NaN image (through its
    photometric brightness shift: the pixels themselves travel as uint8)."""

    def __init__(self, inner, bad: int) -> None:
        self.inner, self.bad, self.count = inner, bad, 0

    def __next__(self):
        batch = dict(next(self.inner))
        self.count += 1
        if self.count == self.bad:
            batch["photometric"] = np.full_like(batch["photometric"], np.nan)
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state) -> None:
        self.inner.set_state(state)

    def start_prefetch(self) -> None:
        self.inner.start_prefetch()

    def close(self) -> None:
        self.inner.close()


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch
):
    workdir = str(tmp_path / "run")
    create = input_pipeline.create_train_loader
    monkeypatch.setattr(input_pipeline, "create_train_loader",
                        lambda *a, **k: _NaNImageAt(create(*a, **k), bad=3))
    with pytest.raises(train_lib.NonFiniteLossError,
                       match=r"step 3.*last good checkpoint is step 2"):
        train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
    variables, step = _variables(workdir)
    assert step == 2
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


def test_refuses_to_resume_with_a_different_model(full_run, data_dir):
    with pytest.raises(ConfigMismatchError, match="model.fusion.dim"):
        train_lib.train_and_evaluate(tiny_config(data_dir, model__fusion__dim=32), full_run[0])


def test_progressive_resizing_trains_the_first_steps_small(data_dir, tmp_path, monkeypatch):
    """config.data.low_res_*: steps 1..low_res_steps letterbox to the low size, the rest and
    the evaluation to image_size; each step compiles once."""
    sizes, calls, jitted = [], [], []
    make, inputs_fn = train_setup.make_train_step, train_setup.train_inputs_fn

    def recording_inputs_fn(size):
        sizes.append(size)
        return inputs_fn(size)

    def recording_step(*args, **kwargs):
        fn, size = make(*args, **kwargs), sizes[-1]

        def step(state, batch, rng):
            calls.append(size)
            return fn(state, batch, rng)

        jitted.append(fn)
        return step

    monkeypatch.setattr(train_setup, "train_inputs_fn", recording_inputs_fn)
    monkeypatch.setattr(train_setup, "make_train_step", recording_step)
    # full_run's step count and learning-rate schedule, so that the session's compile cache
    # can serve the programs the two runs share.
    config = tiny_config(data_dir, checkpoint_every=4,
                         data__low_res_image_size=32, data__low_res_steps=2)
    setup = train_setup.create_train_setup(
        train_setup.resolve_config(config, int(config.data.vocab_size)), make_mesh())
    assert setup.step_fn(1) is setup.step_fn(2) is setup.low_res_train_step
    assert setup.step_fn(3) is setup.step_fn(4) is setup.train_step
    calls.clear()
    jitted.clear()
    results = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert calls == [32, 32, 64, 64]
    assert [fn._cache_size() for fn in jitted] == [1, 1]
    assert 0.0 <= results["validation"]["mIoU"] <= 1.0
    for name in ("low_res_image_size", "low_res_steps"):
        with pytest.raises(ValueError, match="set both config.data.low_res_image_size"):
            train_setup.low_res_steps(tiny_config(data_dir, **{f"data__{name}": 2}))


# ------------------------------------------------------- failure and resume semantics (cheap)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OK_METRICS = {"loss": 1.0, "grad_norm": 2.0, "update_norm": 0.1, "learning_rate": 0.5}


def test_nonfinite_message_names_what_was_not_finite():
    pending = train_lib._PendingMetrics()
    pending.add(3, {k: jnp.float32(v) for k, v in _OK_METRICS.items()})
    pending.add(4, {**{k: jnp.float32(v) for k, v in _OK_METRICS.items()},
                    "update_norm": jnp.float32(np.inf)})
    with pytest.raises(train_lib.NonFiniteLossError) as err:
        pending.flush()
    assert str(err.value).startswith("Non-finite update_norm at step 4 ")
    assert "update_norm=inf" in str(err.value) and "Non-finite loss" not in str(err.value)


class _StubStore:
    directory = "/runs/x/checkpoints"

    def __init__(self, latest):
        self.latest = latest

    def latest_step(self):
        return self.latest


@pytest.mark.parametrize("latest", [None, 2])
def test_nonfinite_message_says_which_checkpoint_is_good(latest):
    run = train_lib._Run(None, _StubStore(latest), None, None, None, None)
    run.pending.add(3, {**{k: jnp.float32(v) for k, v in _OK_METRICS.items()},
                        "loss": jnp.float32(np.nan)})
    with pytest.raises(train_lib.NonFiniteLossError) as err:
        run.flush()
    message = str(err.value)
    assert "Non-finite loss at step 3" in message and "None" not in message
    if latest is None:
        assert "no checkpoint has been saved yet" in message
    else:
        assert "the last good checkpoint is step 2 in /runs/x/checkpoints" in message


def test_batch_size_not_divisible_by_devices_is_a_one_line_setup_error(tmp_path):
    assert jax.device_count() == 4
    config = tiny_config(str(tmp_path / "no_data"), batch_size=6)
    with pytest.raises(train_lib.RunSetupError) as err:
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    message = str(err.value)
    assert "\n" not in message and "config.batch_size=6" in message
    assert "4 devices" in message and "multiple of 4" in message
    assert not (tmp_path / "no_data").exists()  # refused before any data preparation
    # Several objects per image: pairs a whole number of images, images split over devices.
    for per_image, batch, expected in ((3, 8, "--config.batch_size=6"),
                                       (4, 8, "2 images per batch, not divisible by the 4 "
                                              "devices; set --config.batch_size to a "
                                              "multiple of 16")):
        config = tiny_config(str(tmp_path / "no_data"), batch_size=batch,
                             data__objects_per_image=per_image)
        with pytest.raises(train_lib.RunSetupError, match=expected):
            train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "no_data").exists()


def test_several_objects_per_image_train_and_cannot_resume_as_another_stream(data_dir, tmp_path):
    """config.data.objects_per_image=2: batches of 4 images x 2 expressions train and
    evaluate; the workdir refuses a rerun with one object per image (another data stream).
    Resuming the grouped stream exactly is test_input_pipeline's."""
    workdir = str(tmp_path / "run")
    results = train_lib.train_and_evaluate(tiny_config(data_dir, data__objects_per_image=2),
                                           workdir)
    assert 0.0 <= results["validation"]["mIoU"] <= 1.0 and results["validation"]["pairs"] > 0
    assert _variables(workdir)[1] == 4
    with pytest.raises(ConfigMismatchError, match="data.objects_per_image: workdir has 2"):
        train_lib.train_and_evaluate(tiny_config(data_dir), workdir)


def test_decoded_cache_too_large_for_the_machine_is_a_setup_error(data_dir, tmp_path,
                                                                   monkeypatch):
    sizes, check = [], input_pipeline.check_decoded_cache_fits

    def too_small_machine(num_objects, canvas_size, memory_bytes=None):
        sizes.append((num_objects, canvas_size))
        check(num_objects, canvas_size, memory_bytes=1)

    monkeypatch.setattr(input_pipeline, "check_decoded_cache_fits", too_small_machine)
    config = tiny_config(data_dir, data__cache_decoded=True)
    with pytest.raises(train_lib.RunSetupError, match="--config.data.cache_decoded=false"):
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert sizes and sizes[0][1] == config.data.canvas_size
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(
        tmp_path / "run" / "checkpoints")  # nothing trained or saved


@pytest.fixture
def train_cli(monkeypatch):
    """train.py imported as a module, its flags parsed; they are removed again afterwards."""
    import importlib.util

    from absl import flags

    # Flags another test module defined in this process (bench/train_step.py's --config) are
    # set aside while train.py defines its own, and put back afterwards.
    taken = {}
    for name in ("config", "workdir"):
        if name in flags.FLAGS:
            taken[name] = flags.FLAGS[name]
            for derived in [n for n in flags.FLAGS if n.startswith(f"{name}.")]:
                taken[derived] = flags.FLAGS[derived]
                delattr(flags.FLAGS, derived)
            delattr(flags.FLAGS, name)
    before = set(flags.FLAGS)
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(REPO, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr("sys.argv", ["train.py"])
    try:
        flags.FLAGS(["train.py", f"--config={REPO}/configs/refshapes.py:tiny",
                     "--workdir=/nonexistent/run"])
        yield module
    finally:
        flags.FLAGS.unparse_flags()
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)
        for name, flag in taken.items():
            flags.FLAGS[name] = flag


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections
def test_train_cli_exit_statuses(train_cli, monkeypatch, capsys):
    from lts_jax.checkpoint import CheckpointUnreadableError
    from lts_jax.preemption import PREEMPTED_EXIT_STATUS
    from lts_jax.workdir_lock import WorkdirLockedError

    def raising(err):
        def train_and_evaluate(config, workdir):
            raise err
        return train_and_evaluate

    monkeypatch.setattr(train_lib, "train_and_evaluate",
                        raising(Preempted(3, "/nonexistent/run/checkpoints")))
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(["train.py"])
    assert exit_.value.code == PREEMPTED_EXIT_STATUS == 75
    assert "saved step 3" in capsys.readouterr().err
    for err in (train_lib.RunSetupError("config.batch_size=6 ..."),
                WorkdirLockedError("workdir in use"), CheckpointUnreadableError("step 4 ...")):
        monkeypatch.setattr(train_lib, "train_and_evaluate", raising(err))
        with pytest.raises(SystemExit) as exit_:
            train_cli.main(["train.py"])
        assert exit_.value.code == f"train.py: error: {err}"  # printed, status 1
    # A ValueError from anywhere else is a bug: it keeps its traceback.
    monkeypatch.setattr(train_lib, "train_and_evaluate", raising(ValueError("bug")))
    with pytest.raises(ValueError, match="bug"):
        train_cli.main(["train.py"])


def test_metric_writer_keeps_one_record_per_step_and_key(tmp_path):
    from lts_jax.metric_writer import METRICS_FILE, MetricWriter

    workdir = str(tmp_path)
    with MetricWriter(workdir) as writer:
        for step in (1, 2, 3, 4):
            writer.write_scalars(step, {"loss": float(step)}, prefix="train")
        writer.write_scalars(4, {"oIoU": 0.5}, prefix="validation")
    with open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8") as f:
        f.write('{"step": 5, "train/lo')  # killed mid-write
    # Resuming from step 2's checkpoint: what came after it is not this run's history.
    with MetricWriter(workdir, resume_step=2) as writer:
        assert [r["step"] for r in read_metrics(workdir)] == [1, 2]
        writer.write_scalars(2, {"loss": 9.0}, prefix="train")  # already there: skipped
        for step in (3, 4):
            writer.write_scalars(step, {"loss": 10.0 + step}, prefix="train")
        writer.write_scalars(4, {"oIoU": 0.6}, prefix="validation")
    # A finished run rerun at step 4 re-evaluates: no second record, but a new split's is kept.
    with MetricWriter(workdir, resume_step=4) as writer:
        writer.write_scalars(4, {"oIoU": 0.7}, prefix="validation")
        writer.write_scalars(4, {"oIoU": 0.2}, prefix="testA")
    records = read_metrics(workdir)
    keys = [(r["step"], k) for r in records for k in r if k not in ("step", "time")]
    assert len(keys) == len(set(keys))
    assert [(r["step"], r.get("train/loss")) for r in records if "train/loss" in r] == [
        (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    assert [r["validation/oIoU"] for r in records if "validation/oIoU" in r] == [0.6]
    assert [r["testA/oIoU"] for r in records if "testA/oIoU" in r] == [0.2]
    # Starting over from step 0 (checkpoints deleted) empties it.
    MetricWriter(workdir, resume_step=0).close()
    assert read_metrics(workdir) == []


def _stub_setup():
    import types

    config = ml_collections.ConfigDict({"init": {"visual_weights": ""}})
    return types.SimpleNamespace(config=config, init_state=lambda weights: "fresh state")


def test_restore_warns_when_config_json_has_no_checkpoints(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    store = TrainCheckpoints(workdir)
    with caplog.at_level("WARNING", logger=train_lib.logger.name):
        assert train_lib._restore_or_init(_stub_setup(), store, None, workdir,
                                          expect_checkpoint=False) == ("fresh state", 0)
        assert not caplog.records
        assert train_lib._restore_or_init(_stub_setup(), store, None, workdir,
                                          expect_checkpoint=True) == ("fresh state", 0)
    store.close()
    assert "config.json but no checkpoint" in caplog.text
    assert "starting from step 0" in caplog.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see below
def test_restore_falls_back_past_an_unreadable_latest_checkpoint(full_run, data_dir, tmp_path,
                                                                 caplog):
    import shutil

    from lts_jax.checkpoint import UNREADABLE_DIR

    workdir = str(tmp_path / "run")
    shutil.copytree(full_run[0], workdir)
    variables = os.path.join(workdir, "checkpoints", "4", "variables")
    files = [os.path.join(d, n) for d, _, names in os.walk(variables) for n in names]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)
    broken = os.path.relpath(largest, os.path.join(workdir, "checkpoints", "4"))

    # eval.py names the broken step in one line (and leaves it in place).
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), "--workdir", workdir,
                          "--checkpoint", "latest"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith(
        f"eval.py: error: checkpoint step 4 in {workdir}/checkpoints is unreadable")

    config = tiny_config(data_dir)
    config = train_setup.resolve_config(config, load_tokenizer(config).vocab_size)
    setup = train_setup.create_train_setup(config, make_mesh())
    store = TrainCheckpoints(workdir)
    with caplog.at_level("WARNING", logger=train_lib.logger.name):
        state, step = train_lib._restore_or_init(setup, store, None, workdir,
                                                 expect_checkpoint=True)
    assert step == 2 and int(state["step"]) == 2
    aside = os.path.join(workdir, UNREADABLE_DIR, "4")
    assert "step 4" in caplog.text and aside in caplog.text
    assert os.path.exists(os.path.join(aside, broken))  # set aside, not deleted
    # Step 4 is no longer the latest nor the best (it was the only evaluated one).
    assert store.all_steps() == [2] and store.best_step() is None
    store.close()
    # Orbax leaves the other reads of the failed restore as coroutines that complain when
    # collected: collect them here, under this test's warning filter.
    caplog.clear()
    gc.collect()
