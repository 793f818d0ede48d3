"""bench/train_step.py: the benchmark runs the real train step and reports sane figures."""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import pytest

from bench.train_step import (
    flops_lowered_on_cpu,
    format_report,
    peak_tflops_for,
    run_benchmark,
    synthetic_batch,
)
from lts_jax.models.model import create_model
from lts_jax.optim import create_optimizer
from lts_jax.train_setup import make_loss_fn, resolve_config
from lts_jax.train_step import abstract_train_state
from lts_jax.transform import train_inputs_fn
from tests.xla_options import FAST_COMPILE


def _tiny_config() -> ml_collections.ConfigDict:
    from configs.refshapes import get_config

    return get_config("tiny")


@pytest.fixture(scope="module")
def tiny_result() -> dict[str, Any]:
    # Unoptimised XLA code compiles in a fraction of the time; the figures only need to be sane.
    return run_benchmark(
        _tiny_config(), steps=2, warmup=1, peak_tflops=1.0,
        compiler_options=FAST_COMPILE,
    )


def test_peak_table() -> None:
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert peak_tflops_for("NVIDIA H200", "float32") == 67.0
    assert peak_tflops_for("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert peak_tflops_for("TPU v5 lite", "bfloat16") == 197.0
    assert peak_tflops_for("TPU v4", "float32") is None
    assert peak_tflops_for("cpu", "float32") is None


def test_run_benchmark_tiny(tiny_result: dict[str, Any]) -> None:
    r = tiny_result
    assert r["num_devices"] == jax.device_count()
    assert r["batch_size"] == 8 and r["image_size"] == 64
    for key in ("num_params", "compile_s", "step_ms_mean", "step_ms_median",
                "step_ms_pipelined", "images_per_s", "images_per_s_per_device",
                "flops_per_step", "tflops_per_s", "mfu", "final_loss"):
        assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    assert r["flops_source"] == "lowered"  # the CPU analyses its own lowered program
    assert r["flops_per_step"] > 1e6  # the tiny model's step is ~1e8 FLOPs
    assert math.isclose(r["images_per_s"], 8e3 / r["step_ms_mean"])
    assert math.isclose(r["mfu"], r["tflops_per_s"] / r["num_devices"])
    report = format_report(r, "configs/refshapes.py:tiny")
    assert "MFU" in report and "configs/refshapes.py:tiny" in report
    pipelined = next(line for line in report.splitlines() if line.startswith("pipelined"))
    assert f"{r['step_ms_pipelined']:.1f} ms per step" in pipelined


def test_flops_lowered_on_cpu_matches_the_backend_count(tiny_result: dict[str, Any]) -> None:
    """The GPU fallback (one CPU device, abstract arguments) counts the whole global step."""
    config = resolve_config(_tiny_config(), int(_tiny_config().data.vocab_size))
    model = create_model(config.model)
    tx, schedule = create_optimizer(config.optim, int(config.num_train_steps))
    state = abstract_train_state(model, tx, image_size=64, max_text_len=12)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in synthetic_batch(config, int(config.batch_size)).items()}
    args = (state, batch, jax.eval_shape(jax.random.key, 0))
    flops = flops_lowered_on_cpu(model, tx, make_loss_fn(config.loss), schedule, args,
                                 train_inputs_fn(64))
    assert math.isclose(flops, tiny_result["flops_per_step"], rel_tol=1e-6)
