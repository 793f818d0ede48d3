"""Input-pipeline throughput: samples/s (and per core used) of the train or eval loader, the
bare JPEG decode rate of the same images, and where the time goes.

Two sources:
  refshapes     the prepared RefShapes dataset (prepared into --data_dir if missing);
  coco_fixture  in-memory raw records of photo-like 640x480 JPEGs + 1-bit PNG masks, COCO-sized,
                decoded with the real tfds_refcoco decoders (no download needed).

The issue's measurement (one core, paper config: flip + photometric on):
  taskset -c 0 python bench/input_pipeline.py --source coco_fixture --config configs/refcoco.py \
      --image_size 416 --workers 0 --threads 1 --batches 10

The host only decodes; letterbox, flip, jitter and float conversion run in the jitted step
(lts_jax/transform.py). "samples/s per core" divides by the CPU time the process and its grain
workers actually used (every thread counts), read from /proc.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lts_jax import input_pipeline as ip  # noqa: E402
from lts_jax.augment import photometric, photometric_params, swap_left_right  # noqa: E402
from lts_jax.letterbox import letterbox  # noqa: E402
from lts_jax.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece  # noqa: E402
from lts_jax.transform import packed_width  # noqa: E402
from tfds_refcoco import images, masks, records  # noqa: E402


def load_config(spec: str) -> Any:
    """configs/<file>.py[:arg] -> get_config(arg), like ml_collections' config_flags."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.unlock()
    return config


def coco_fixture(num_images: int, seed: int = 0) -> list[dict[str, Any]]:
    """Raw records like data_source() returns, with natural-looking 640x480 JPEGs (smooth
    colour fields plus noise, so the JPEG size and decode cost are COCO-like) and masks as the
    builder stores them (1-bit PNG)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_images):
        h, w = (480, 640) if i % 3 else (640, 480)
        low = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC))
        pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        jpeg = io.BytesIO()
        Image.fromarray(pixels).save(jpeg, format="JPEG", quality=90)
        mask = np.zeros((h, w), np.uint8)
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        mask[y0:y0 + h // 3, x0:x0 + w // 3] = 1
        exprs = [f"the {c} thing on the {s}".encode() for c, s in
                 [("red", "left"), ("blue", "right"), ("green", "left")][: 1 + i % 3]]
        out.append({"image": jpeg.getvalue(), "mask": masks.encode_mask_png(mask),
                    "expressions": np.asarray(exprs, dtype=object),
                    "sent_ids": np.arange(len(exprs), dtype=np.int64),
                    "bbox": np.asarray([x0, y0, w // 3, h // 3], np.float32),
                    "category_id": 1, "image_id": i, "ann_id": i, "ref_id": i,
                    "height": h, "width": w})
    return out


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (all threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [os.getpid()], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        todo += _children(pid)
    return total


def measure(batches: Any, num_batches: int, batch_size: int) -> tuple[float, float, float]:
    """(seconds to first batch, samples/s, CPU seconds used) over the next num_batches."""
    it = iter(batches)
    t0 = time.perf_counter()
    next(it)  # includes worker start-up and the first decode
    t1 = time.perf_counter()
    cpu0 = tree_cpu_seconds()
    for _ in range(num_batches):
        next(it)
    t2 = time.perf_counter()
    cpu = tree_cpu_seconds() - cpu0
    if hasattr(it, "close"):
        it.close()
    return t1 - t0, num_batches * batch_size / (t2 - t1), cpu


def per_sample_ms(fn: Callable[[int], Any], n: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` mean ms of fn(i) over i < n (one thread)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / n * 1e3)
    return best


def breakdown(source: Any, tok: Tokenizer, config: Any, size: int) -> dict[str, float]:
    """ms per sample of each host stage, measured one at a time on the same records."""
    n = min(len(source), 48)
    raws = [source[i] for i in range(n)]
    decoded = [records.decode_example(r) for r in raws]
    canvas = int(config.data.canvas_size)
    image_out = np.empty((canvas, canvas, 3), np.uint8)
    mask_out = np.empty((canvas, packed_width(canvas)), np.uint8)
    length = int(config.data.max_text_len)
    rng = np.random.default_rng(0)
    boxed = [letterbox(d["image"], size)[0] for d in decoded]

    def draws(i: int) -> None:
        r = np.random.default_rng([0, i])
        r.integers(3)
        r.random()
        photometric_params(r)

    return {
        "bare JPEG decode (decode_rgb)": per_sample_ms(
            lambda i: images.decode_rgb(raws[i]["image"]), n),
        "decode (JPEG -> pixels, into canvas)": per_sample_ms(
            lambda i: ip.place_image(images.decode_rgb(raws[i]["image"]), image_out), n),
        "mask (PNG -> packed bits on canvas)": per_sample_ms(
            lambda i: ip.place_mask(masks.decode_mask_png(raws[i]["mask"]), mask_out), n),
        "tokenise (+ left/right swap)": per_sample_ms(
            lambda i: tok.encode(swap_left_right(decoded[i]["expressions"][0]), length), n),
        "per-example draws (expression, flip, jitter)": per_sample_ms(draws, n),
        "host letterbox, if it ran on the host (PIL)": per_sample_ms(
            lambda i: letterbox(decoded[i]["image"], size), n),
        "host float + photometric, if on the host (numpy)": per_sample_ms(
            lambda i: photometric(boxed[i].astype(np.float32) * np.float32(1 / 255), rng), n),
    }


def time_device_transform(batch: dict[str, np.ndarray], mode: str, size: int, method: str,
                          repeats: int = 3) -> tuple[float, str]:
    """(best ms, backend) of the jitted device-side transform of one host batch."""
    import jax

    from lts_jax import transform

    fn = transform.train_inputs if mode == "train" else transform.eval_inputs
    jitted = jax.jit(lambda b: fn(b, size, method))
    fields = {k: jax.device_put(v) for k, v in batch.items()
              if k in ("image", "mask", "hw", "flip", "photometric", "orig_hw", "tokens",
                       "token_mask")}
    jax.block_until_ready(jitted(fields))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(jitted(fields))
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, jax.default_backend()


def cpu_description() -> str:
    """lscpu's model name and whether the CPU has AVX-512."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), "unknown CPU")
    return f"{model}, {'AVX-512' if 'avx512f' in text else 'AVX2, no AVX-512'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=["refshapes", "coco_fixture"], default="refshapes")
    parser.add_argument("--config", default="configs/refshapes.py",
                        help="config file[:arg] giving batch size, text length, flip, ...")
    parser.add_argument("--data_dir", default="",
                        help="refshapes: prepared data dir (default: config.data.data_dir)")
    parser.add_argument("--image_size", type=int, default=0, help="0 = the config's")
    parser.add_argument("--batch_size", type=int, default=0, help="0 = the config's")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=2, help="grain read threads per process")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    parser.add_argument("--mode", choices=["train", "eval"], default="train")
    parser.add_argument("--num_images", type=int, default=96, help="coco_fixture size")
    parser.add_argument("--no_breakdown", action="store_true", help="skip the per-stage table")
    args = parser.parse_args()

    config = load_config(args.config)
    data = config.data
    size = args.image_size or data.image_size
    batch_size = args.batch_size or config.batch_size
    if args.source == "refshapes":
        if args.data_dir:
            data.data_dir = args.data_dir
        records.prepare("refshapes", data.data_dir, None,
                        refshapes_num_images=data.get("refshapes_num_images") or None)
        tok = load_tokenizer(config)
        split = data.train_split if args.mode == "train" else data.eval_splits.split(",")[0]
        source = records.data_source(records.configured_dataset(data), split, data.data_dir)
        kind = f"refshapes/{split} ({len(source)} objects)"
    else:
        source = coco_fixture(args.num_images)
        tok = Tokenizer(train_sentencepiece(
            [e for r in source for e in records.decode_expressions(r)], 64))
        kind = f"coco_fixture ({len(source)} objects, 640x480 JPEG)"

    cores = len(os.sched_getaffinity(0))
    canvas = int(data.canvas_size)
    per_image = int(data.get("objects_per_image", 1)) if args.mode == "train" else 1
    print(f"source {kind}; mode {args.mode}; image {size}; canvas {canvas}; batch {batch_size}; "
          f"objects per image {per_image}; "
          f"threads {args.threads}; flip {data.flip}; photometric {data.photometric}")
    print(f"CPU: {cpu_description()}; {cores} core(s) available to this process")
    print("| workers | first batch s | samples/s | samples/s per core |")
    print("|---|---|---|---|")
    rates = {}
    for workers in args.workers:
        if args.mode == "train":
            batches: Any = ip.make_train_iterator(
                source, tok, global_batch_size=batch_size, canvas_size=canvas,
                max_text_len=data.max_text_len, seed=0, decode_fn=records.decode_example,
                flip=data.flip, photometric=data.photometric, worker_count=workers,
                num_threads=args.threads, objects_per_image=per_image)
        else:
            batches = ip.make_eval_loader(
                source, tok, global_batch_size=batch_size, image_size=size,
                max_text_len=data.max_text_len, decode_fn=records.decode_example,
                expressions_fn=records.decode_expressions, worker_count=workers,
                num_threads=args.threads, canvas_size=canvas)
        n = args.batches if args.mode == "train" else min(args.batches, len(batches) - 1)
        first, rate, cpu_s = measure(batches, n, batch_size)
        wall = n * batch_size / rate
        rates[workers] = (rate, cpu_s / wall)
        print(f"| {workers} | {first:.2f} | {rate:.1f} | {n * batch_size / cpu_s:.1f} |")
    for workers, (_, used) in rates.items():
        print(f"workers {workers}: {used:.2f} cores busy on average while timed")

    sample = next(iter(batches)) if args.mode == "eval" else next(ip.make_train_iterator(
        source, tok, global_batch_size=batch_size, canvas_size=canvas,
        max_text_len=data.max_text_len, seed=0, decode_fn=records.decode_example,
        flip=data.flip, photometric=data.photometric, objects_per_image=per_image))
    device_fields = (("image", "mask", "hw", "flip", "photometric", "tokens", "token_mask")
                     if args.mode == "train" else ("image", "orig_hw", "tokens", "token_mask"))
    to_device = sum(sample[k].nbytes for k in device_fields) / batch_size
    print(f"host->device: {to_device / 1e3:.1f} kB per sample ({', '.join(device_fields)})")
    # The per-stage table before any JAX work, so XLA's threads cannot disturb it.
    stages = {} if args.no_breakdown else breakdown(source, tok, config, size)
    name = "train_inputs" if args.mode == "train" else "eval_inputs"
    for method in ("gather", "matmul"):
        ms, backend = time_device_transform(sample, args.mode, size, method)
        print(f"device-side transform ({name}, jitted, {backend}, {method} resampling): "
              f"{ms:.1f} ms per batch of {batch_size}")
    if args.no_breakdown:
        return
    bare = stages["bare JPEG decode (decode_rgb)"]
    best = max(r for r, _ in rates.values())
    pipeline_ms = 1e3 / best
    in_pipeline = [k for k in stages if not k.startswith(("bare", "host "))]
    assembly = pipeline_ms - sum(stages[k] for k in in_pipeline)
    print("\n| stage (one thread) | ms per sample |")
    print("|---|---|")
    for name, ms in stages.items():
        print(f"| {name} | {ms:.3f} |")
    print(f"| batch assembly and the rest (pipeline - stages above) | {assembly:.3f} |")
    print(f"| pipeline, best row above | {pipeline_ms:.3f} |")
    print(f"\nbare JPEG decode: {1e3 / bare:.1f} samples/s; best pipeline / bare decode = "
          f"{best * bare / 1e3:.2f}")


if __name__ == "__main__":  # guard required: grain workers are spawned processes
    main()
