"""Train-step throughput: step time, images/s and model FLOP utilisation (MFU) of one config.

Builds the model, optimiser and jitted, data-parallel train step exactly as ``train.py`` does
(``lts_jax.train_setup``: ``resolve_config``, ``create_train_setup``) on every device JAX
finds, and times it on a synthetic random batch that is already on the devices (no dataset,
no host->device copy in the timing).

Examples:
  python bench/train_step.py --config configs/refshapes.py --steps 10
  python bench/train_step.py --config configs/refshapes.py:tiny
  python bench/train_step.py --config configs/refcoco.py --config.batch_size=64 --peak_tflops 989

Figures:
  compile s      lowering + XLA compilation of the train step (timed apart from the steps);
  step ms        mean and median over --steps steps after --warmup untimed ones, each step
                 waited for with jax.block_until_ready;
  pipelined      wall time of another --steps steps dispatched back to back, waited for once
                 at the end, per step: how the training loop runs them. With several devices
                 it can be lower than the step time, because a device that finishes its part
                 of a step early starts the next one instead of waiting at the step's end
                 (per-step waiting counts every imbalance between the devices in full);
  images/s       global batch (image-expression pairs) / mean step time (and that divided by
                 the device count);
  TFLOP/step     XLA's cost-analysis estimate for the whole train step (forward, backward and
                 optimiser update) over the global batch, from the lowered (not yet optimised
                 or partitioned) program. It is an estimate: a multiply-add counts as 2 FLOPs
                 and a loop body (the text GRU's scan) is counted once, not once per step
                 (negligible here). The compiled program's own count (per device, times the
                 device count) is shown beside it but not used: on GPU it leaves out the
                 convolutions, which XLA hands to cuDNN as custom calls (about 20x too low).
                 Backends that cannot analyse a lowered program (JAX's CUDA plugin) get the
                 count of the same step lowered for the CPU ('lowered for CPU');
  TFLOP/s, MFU   TFLOP/step / mean step time, and that / (peak per device x device count).

Peak per device: ``--peak_tflops`` if given, else dense peaks by device kind and the config's
compute dtype (``model.dtype``; 'auto' resolves to bfloat16 on GPU/TPU, float32 on CPU):

  device           bfloat16   float32
  H100 SXM, H200      989       67   (float32: non-tensor-core FP32)
  H100 PCIe           756       51
  A100                312       19.5
  TPU v4              275       -
  TPU v5e             197       -
  TPU v5p             459       -

The float32 figures are the non-tensor-core ones; XLA on Ampere/Hopper GPUs may run float32
matmuls and convolutions as TF32 on tensor cores (JAX's default matmul precision), in which
case the float32 MFU overstates utilisation (pass the TF32 peak, 495 on H100 SXM, 156 on A100,
with --peak_tflops). Unknown devices (e.g. CPUs) report MFU as n/a unless --peak_tflops is given.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lts_jax.host_memory import keep_freed_memory_on_cpu  # noqa: E402
from lts_jax.mesh import make_mesh, shard_batch  # noqa: E402
from lts_jax.train_setup import create_train_setup, low_res_steps, resolve_config  # noqa: E402
from lts_jax.train_step import LossFn, make_train_step  # noqa: E402
from lts_jax.transform import IMAGE_FIELDS, packed_width, train_inputs_fn  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py), optionally ':arg'.", lock_config=True
)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", None, "Peak TFLOP/s per device for MFU (default: by device kind and dtype)."
)
flags.mark_flags_as_required(["config"])

# (device_kind substring, lower case; {dtype: dense peak TFLOP/s per device}); first match wins.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100 pcie", {"bfloat16": 756.0, "float32": 51.0}),
    ("h100", {"bfloat16": 989.0, "float32": 67.0}),
    ("h200", {"bfloat16": 989.0, "float32": 67.0}),
    ("a100", {"bfloat16": 312.0, "float32": 19.5}),
    ("tpu v4", {"bfloat16": 275.0}),
    ("tpu v5 lite", {"bfloat16": 197.0}),
    ("tpu v5e", {"bfloat16": 197.0}),
    ("tpu v5p", {"bfloat16": 459.0}),
    ("tpu v5", {"bfloat16": 459.0}),
)


def peak_tflops_for(device_kind: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s per device for ``device_kind`` in ``dtype``, or None if unknown."""
    kind = device_kind.lower()
    for pattern, peaks in PEAK_TFLOPS:
        if pattern in kind:
            return peaks.get(dtype)
    return None


def flops_of(stage: Any) -> float:
    """FLOPs of a ``jax.stages.Lowered`` or ``Compiled`` from XLA's cost analysis.

    ``cost_analysis()`` returns a dict, or (older JAX) a list with one dict per computation;
    NaN when XLA gives no estimate.
    """
    cost = stage.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return float("nan")
    return float(cost["flops"])


def flops_lowered_on_cpu(
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    learning_rate_fn: optax.Schedule,
    args: tuple[Any, ...],
    inputs_fn: Any = None,
) -> float:
    """FLOPs of the same train step lowered for one CPU device (nothing is run or compiled).

    PJRT plugin backends (JAX's CUDA plugin) cannot analyse a lowered program, so the step is
    lowered again, from abstract ``(state, batch, rng)``, for the CPU, which can: the count of
    the unoptimised program does not depend on the platform. NaN if there is no CPU backend.
    """
    try:
        cpu = jax.devices("cpu")[:1]
    except RuntimeError:
        return float("nan")
    step = make_train_step(model, tx, loss_fn, learning_rate_fn, make_mesh(cpu), inputs_fn)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    return flops_of(step.lower(*abstract))


def synthetic_batch(
    config: ml_collections.ConfigDict, batch_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random host arrays shaped and typed like a pipeline train batch (the fields the step
    reads): uint8 canvases with 3:4 content, packed masks, flips and photometric draws."""
    rng = np.random.default_rng(seed)
    canvas, length = int(config.data.canvas_size), int(config.data.max_text_len)
    vocab = int(config.model.vocab_size)
    lengths = rng.integers(1, length + 1, (batch_size, 1))
    token_mask = np.arange(length)[None, :] < lengths  # the first few tokens are real
    tokens = rng.integers(1, vocab, (batch_size, length), dtype=np.int32)
    hw = np.tile(np.asarray([canvas * 3 // 4, canvas], np.int32), (batch_size, 1))
    hw[1::2] = hw[1::2, ::-1]  # portrait and landscape
    photometric = np.stack([rng.uniform(-0.15, 0.15, batch_size),
                            rng.uniform(0.75, 1.25, batch_size),
                            rng.uniform(0.75, 1.25, batch_size)], axis=1).astype(np.float32)
    batch = {
        "image": rng.integers(0, 256, (batch_size, canvas, canvas, 3), dtype=np.uint8),
        "mask": rng.integers(0, 256, (batch_size, canvas, packed_width(canvas)), dtype=np.uint8),
        "hw": hw,
        "flip": rng.random(batch_size) < 0.5,
        "photometric": photometric,
        "tokens": np.where(token_mask, tokens, 0).astype(np.int32),  # 0 = padding
        "token_mask": token_mask,
    }
    # Several pairs per image: the image fields have one row per image.
    images = batch_size // int(config.data.get("objects_per_image", 1))
    for name in IMAGE_FIELDS:
        batch[name] = batch[name][:images]
    return batch


def time_transform(config: ml_collections.ConfigDict, batch: Any, steps: int) -> float:
    """Mean ms of the jitted device-side input transform alone (letterbox, flip, jitter)."""
    fn = jax.jit(train_inputs_fn(int(config.data.image_size)))
    jax.block_until_ready(fn(batch))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(batch))
        times.append(time.perf_counter() - t0)
    return statistics.fmean(times) * 1e3


def _time_steps(compiled: Any, state: Any, batch: Any, rng: Any, warmup: int, steps: int
                ) -> tuple[Any, Any, list[float], float]:
    """(state, last metrics, seconds per step, pipelined seconds per step): ``warmup`` untimed
    steps, then ``steps`` timed ones, each waited for, then ``steps`` more dispatched back to
    back and waited for once. The state is donated, so each call rebinds it."""
    for _ in range(warmup):
        state, metrics = compiled(state, batch, rng)
        jax.block_until_ready((state, metrics))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, rng)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    return state, metrics, times, (time.perf_counter() - t0) / steps


def run_benchmark(
    config: ml_collections.ConfigDict,
    steps: int = 20,
    warmup: int = 3,
    peak_tflops: float | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compiles and times the train step of ``config``; returns the figures of the report.

    ``compiler_options`` go to XLA's compile (default: none, as in training); the tests pass
    cheaper optimisation settings to compile faster on CPU.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    config = resolve_config(config, int(config.data.vocab_size))
    batch_size, num_devices = int(config.batch_size), jax.device_count()
    if batch_size % num_devices or batch_size % jax.process_count():
        raise ValueError(f"batch_size={batch_size} must be divisible by {num_devices} devices")

    setup = create_train_setup(config, make_mesh())
    train_step, dropout_rng = setup.train_step, setup.dropout_rng
    state = setup.init_state()
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    # This process's rows of the global batch, put on the devices before anything is timed.
    local = synthetic_batch(config, batch_size // jax.process_count(), seed=jax.process_index())
    batch = jax.block_until_ready(shard_batch(local, setup.mesh))

    t0 = time.perf_counter()
    lowered = train_step.lower(state, batch, dropout_rng)
    compiled = lowered.compile(compiler_options=compiler_options)
    compile_s = time.perf_counter() - t0
    # The lowered program is the whole step over the global batch; the compiled one is what
    # one device runs, and on GPU it leaves out the convolutions (cuDNN custom calls).
    flops_per_step, flops_source = flops_of(lowered), "lowered"
    if not flops_per_step > 0:  # NaN: not available on this backend
        flops_per_step, flops_source = flops_lowered_on_cpu(
            setup.model, setup.tx, setup.loss_fn, setup.lr_schedule, (state, batch, dropout_rng),
            setup.inputs_fn,
        ), "lowered for CPU"
    compiled_flops_per_step = flops_of(compiled) * num_devices

    state, metrics, times, pipelined_s = _time_steps(compiled, state, batch, dropout_rng,
                                                     warmup, steps)
    loss = float(metrics["loss"])
    transform_ms = time_transform(config, batch, steps)
    low_res = _low_res_figures(setup, state, batch, steps, compiler_options)
    host_bytes = sum(np.asarray(v).nbytes for v in local.values()) / len(local["tokens"])

    step_s = statistics.fmean(times)
    device_kind = jax.devices()[0].device_kind
    dtype = str(config.model.dtype)
    peak = peak_tflops if peak_tflops is not None else peak_tflops_for(device_kind, dtype)
    tflops = flops_per_step / step_s / 1e12
    return {
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "device_kind": device_kind,
        "num_devices": num_devices,
        "num_processes": jax.process_count(),
        "model_variant": str(config.model.get("variant", "?")),
        "dtype": dtype,
        "image_size": int(config.data.image_size),
        "max_text_len": int(config.data.max_text_len),
        "batch_size": batch_size,
        "num_params": num_params,
        "compile_s": compile_s,
        "steps": steps,
        "warmup": warmup,
        "step_ms_mean": step_s * 1e3,
        "step_ms_median": statistics.median(times) * 1e3,
        "step_ms_min": min(times) * 1e3,
        "step_ms_pipelined": pipelined_s * 1e3,
        "images_per_s": batch_size / step_s,
        "images_per_s_per_device": batch_size / step_s / num_devices,
        "flops_per_step": flops_per_step,
        "flops_source": flops_source,
        "compiled_flops_per_step": compiled_flops_per_step,
        "tflops_per_s": tflops,
        "peak_tflops_per_device": peak,
        "mfu": tflops / (peak * num_devices) if peak else None,
        "final_loss": loss,
        "canvas_size": int(config.data.canvas_size),
        "transform_ms": transform_ms,
        "host_to_device_bytes_per_sample": host_bytes,
        "num_train_steps": int(config.num_train_steps),
        **low_res,
        "job_flops": _job_flops(config, flops_per_step, low_res.get("low_res_flops_per_step")),
    }


def _low_res_figures(setup: Any, state: Any, batch: Any, steps: int,
                     compiler_options: dict[str, Any] | None) -> dict[str, Any]:
    """FLOPs and step time of the progressive-resizing step ({} when the config has none)."""
    if setup.low_res_train_step is None:
        return {}
    lowered = setup.low_res_train_step.lower(state, batch, setup.dropout_rng)
    flops = flops_of(lowered)
    if not flops > 0:  # as for the main step: count the CPU lowering
        flops = flops_lowered_on_cpu(
            setup.model, setup.tx, setup.loss_fn, setup.lr_schedule,
            (state, batch, setup.dropout_rng),
            train_inputs_fn(int(setup.config.data.low_res_image_size)))
    compiled = lowered.compile(compiler_options=compiler_options)
    _, _, times, pipelined_s = _time_steps(compiled, state, batch, setup.dropout_rng, 1, steps)
    return {"low_res_image_size": int(setup.config.data.low_res_image_size),
            "low_res_steps": low_res_steps(setup.config),
            "low_res_flops_per_step": flops,
            "low_res_step_ms_mean": statistics.fmean(times) * 1e3,
            "low_res_step_ms_pipelined": pipelined_s * 1e3}


def _job_flops(config: ml_collections.ConfigDict, flops_per_step: float,
               low_res_flops_per_step: float | None) -> float:
    """Training FLOPs of the whole run: config.num_train_steps steps, the first
    low_res_steps of them at the low-res step's cost."""
    total, low = int(config.num_train_steps), low_res_steps(config)
    if low_res_flops_per_step is None:
        return total * flops_per_step
    low = min(low, total)
    return low * low_res_flops_per_step + (total - low) * flops_per_step


def format_report(r: dict[str, Any], config_name: str = "") -> str:
    """The figures of ``run_benchmark`` as aligned 'name  value' lines."""
    if r["mfu"] is None:
        mfu = "n/a (pass --peak_tflops)"
    else:
        mfu = f"{100 * r['mfu']:.2f}% of {r['peak_tflops_per_device']:g} TFLOP/s per device"
    rows = [
        ("backend", f"{r['backend']} (JAX {r['jax_version']})"),
        ("devices", f"{r['num_devices']} x {r['device_kind']} "
                    f"({r['num_processes']} process(es))"),
        ("config", f"{config_name} (model {r['model_variant']}, {r['dtype']})".lstrip()),
        ("image / text", f"{r['image_size']}x{r['image_size']}, {r['max_text_len']} tokens"),
        ("global batch", f"{r['batch_size']} ({r['batch_size'] // r['num_devices']} per device)"),
        ("params", f"{r['num_params'] / 1e6:.3f} M"),
        ("compile", f"{r['compile_s']:.1f} s"),
        ("step", f"{r['step_ms_mean']:.1f} ms mean, {r['step_ms_median']:.1f} ms median, "
                 f"{r['step_ms_min']:.1f} ms min ({r['steps']} steps after {r['warmup']} warmup)"),
        ("pipelined", f"{r['step_ms_pipelined']:.1f} ms per step ({r['steps']} more steps "
                      "dispatched back to back, as the training loop runs them)"),
        ("images/s", f"{r['images_per_s']:.1f} ({r['images_per_s_per_device']:.1f} per device)"),
        ("TFLOP/step", f"{r['flops_per_step'] / 1e12:.4g} (XLA estimate, {r['flops_source']}; "
                       f"compiled program: {r['compiled_flops_per_step'] / 1e12:.4g})"),
        ("TFLOP/s", f"{r['tflops_per_s']:.4g}"),
        ("MFU", mfu),
        ("input transform", f"{r['transform_ms']:.2f} ms per step of the above (letterbox from "
                            f"a {r['canvas_size']}x{r['canvas_size']} canvas, flip, jitter; "
                            "included in the step)"),
        ("host->device", f"{r['host_to_device_bytes_per_sample'] / 1e3:.1f} kB per sample"),
    ]
    if "low_res_flops_per_step" in r:
        low = r["low_res_image_size"]
        rows.append(("low-res step", f"{low}x{low} for the first {r['low_res_steps']} steps: "
                                     f"{r['low_res_flops_per_step'] / 1e12:.4g} TFLOP/step, "
                                     f"{r['low_res_step_ms_mean']:.1f} ms mean, "
                                     f"{r['low_res_step_ms_pipelined']:.1f} ms pipelined"))
    rows.append(("job TFLOP", f"{r['job_flops'] / 1e12:.4g} over {r['num_train_steps']} "
                              "train steps (config.num_train_steps; XLA estimate)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    keep_freed_memory_on_cpu()  # as train.py does (lts_jax.cli.start)
    results = run_benchmark(_CONFIG.value, _STEPS.value, _WARMUP.value, _PEAK_TFLOPS.value)
    if jax.process_index() == 0:
        print(format_report(results, config_flags.get_config_filename(flags.FLAGS["config"])))


if __name__ == "__main__":
    app.run(main)
