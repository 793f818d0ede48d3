"""Input-pipeline throughput: samples/s (and per core) of the train or eval loader.

Two sources:
  refshapes     the prepared RefShapes dataset (prepared into --data_dir if missing);
  coco_fixture  in-memory raw records of random 640x480 JPEGs + PNG masks, COCO-sized, decoded
                with the real tfds_refcoco decoders (no download needed).

Examples:
  python bench/input_pipeline.py --source refshapes --config configs/refshapes.py \
      --image_size 416 --workers 0 2
  python bench/input_pipeline.py --source coco_fixture --image_size 416 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
import time
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lts_jax import input_pipeline as ip  # noqa: E402
from lts_jax.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece  # noqa: E402
from tfds_refcoco import records  # noqa: E402


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
    colour fields plus noise, so the JPEG size and decode cost are COCO-like)."""
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
        png = io.BytesIO()
        Image.fromarray(mask * 255).save(png, format="PNG")
        exprs = [f"the {c} thing on the {s}".encode() for c, s in
                 [("red", "left"), ("blue", "right"), ("green", "left")][: 1 + i % 3]]
        out.append({"image": jpeg.getvalue(), "mask": png.getvalue(),
                    "expressions": np.asarray(exprs, dtype=object),
                    "sent_ids": np.arange(len(exprs), dtype=np.int64),
                    "bbox": np.asarray([x0, y0, w // 3, h // 3], np.float32),
                    "category_id": 1, "image_id": i, "ann_id": i, "ref_id": i,
                    "height": h, "width": w})
    return out


def measure(batches: Any, num_batches: int, batch_size: int) -> tuple[float, float]:
    """(seconds to first batch, samples/s over the next num_batches batches)."""
    it = iter(batches)
    t0 = time.perf_counter()
    next(it)  # includes worker start-up and the first decode
    t1 = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    t2 = time.perf_counter()
    if hasattr(it, "close"):
        it.close()
    return t1 - t0, num_batches * batch_size / (t2 - t1)


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
        source = records.data_source("refshapes", split, data.data_dir)
        kind = f"refshapes/{split} ({len(source)} objects)"
    else:
        source = coco_fixture(args.num_images)
        tok = Tokenizer(train_sentencepiece(
            [e for r in source for e in records.decode_expressions(r)], 64))
        kind = f"coco_fixture ({len(source)} objects, 640x480 JPEG)"

    cores = os.cpu_count() or 1
    print(f"source {kind}; mode {args.mode}; image {size}; batch {batch_size}; "
          f"threads {args.threads}; {cores} CPU cores")
    print("| workers | first batch s | samples/s | samples/s per core |")
    print("|---|---|---|---|")
    for workers in args.workers:
        if args.mode == "train":
            batches: Any = ip.make_train_iterator(
                source, tok, global_batch_size=batch_size, image_size=size,
                max_text_len=data.max_text_len, seed=0, decode_fn=records.decode_example,
                flip=data.flip, photometric=data.photometric, worker_count=workers,
                num_threads=args.threads)
        else:
            batches = ip.make_eval_loader(
                source, tok, global_batch_size=batch_size, image_size=size,
                max_text_len=data.max_text_len, decode_fn=records.decode_example,
                expressions_fn=records.decode_expressions, worker_count=workers,
                num_threads=args.threads, max_orig_size=640)
        n = args.batches if args.mode == "train" else min(args.batches, len(batches) - 1)
        first, rate = measure(batches, n, batch_size)
        used = min(cores, max(workers, 1))  # processes doing the decoding
        print(f"| {workers} | {first:.2f} | {rate:.1f} | {rate / used:.1f} |")


if __name__ == "__main__":  # guard required: grain workers are spawned processes
    main()
