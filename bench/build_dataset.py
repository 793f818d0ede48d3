"""Builds a RefCOCO (unc)-sized dataset with the real builder and reports its speed and memory.

    python bench/build_dataset.py --scale 0.1 [--workdir DIR] [--num_workers N] [--keep]

Raw data in the refer layout is generated first (once: cached under ``--workdir`` and
reused by later runs; its generation is never part of the measured figure), at
``--scale`` times the published refcoco_unc sizes:

    train 42,404 objects / 120,624 expressions / 16,994 images, validation 3,811 /
    10,834 / 1,500, testA 1,975 / 5,657 / 750, testB 1,810 / 5,095 / 750.

What makes it realistic enough to measure: photo-like COCO-sized JPEGs (smooth colour
fields, mid-frequency texture and noise, quality 90, ~110-170 KB, mostly 640x480, some
portrait and grayscale), polygon masks (some in two parts, some crossing the border),
an instances.json with COCO's ~7.3 annotations per image (most not referred to), and a
refs(unc).p written as Python 2 wrote it: protocol 2, with ``str`` (bytes) keys and
values and a few ``unicode`` sentences.

The build runs as ``python -m tfds_refcoco.build`` in a child process, so its peak RSS
(``getrusage`` of itself and of its pool workers) is the build's alone. The built
dataset is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/build_dataset.py`
    sys.path.insert(0, str(ROOT))

from tfds_refcoco import masks  # noqa: E402

CONFIG = "refcoco_unc"
# refs split value -> (objects, expressions, images), published refcoco_unc sizes.
PUBLISHED: dict[str, tuple[int, int, int]] = {
    "train": (42_404, 120_624, 16_994),
    "val": (3_811, 10_834, 1_500),
    "testA": (1_975, 5_657, 750),
    "testB": (1_810, 5_095, 750),
}
TFDS_SPLIT = {"train": "train", "val": "validation", "testA": "testA", "testB": "testB"}
ANNS_PER_IMAGE = 7.3  # COCO train2014: 604,907 annotations / 82,783 images
# (width, height, weight): COCO's common sizes.
SIZES = ((640, 480, 0.55), (480, 640, 0.15), (640, 427, 0.15), (427, 640, 0.05),
         (640, 512, 0.05), (500, 375, 0.05))
GENERATOR_VERSION = 1  # bump when the generated data changes, to invalidate caches
_WORDS = ("man woman left right middle red blue white black small big guy girl shirt chair "
          "table dog cat car front back far near closest top bottom person with the on in "
          "of at standing sitting").split()


# --- Python 2 pickles ---------------------------------------------------------------------


def dumps_py2(obj: Any) -> bytes:
    """A protocol-2 pickle of ``obj`` as Python 2's cPickle wrote the refer files.

    ``bytes`` become Python 2 ``str`` (SHORT_BINSTRING/BINSTRING), ``str`` become
    ``unicode`` (BINUNICODE). Python 3's own pickler cannot write the former: it
    pickles bytes through a ``_codecs.encode`` global, which no Python 2 file has.
    Containers are memoised (BINPUT) as cPickle does.
    """
    out = bytearray(b"\x80\x02")
    memo = 0

    def put() -> None:
        nonlocal memo
        out.extend(b"q" + bytes([memo]) if memo < 256 else b"r" + struct.pack("<I", memo))
        memo += 1

    def emit(x: Any) -> None:
        if x is None:
            out.extend(b"N")
        elif x is True or x is False:
            out.extend(b"\x88" if x else b"\x89")
        elif isinstance(x, int):
            if 0 <= x < 256:
                out.extend(b"K" + bytes([x]))
            elif 0 <= x < 65536:
                out.extend(b"M" + struct.pack("<H", x))
            elif -(2**31) <= x < 2**31:
                out.extend(b"J" + struct.pack("<i", x))
            else:
                raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
                out.extend(b"\x8a" + bytes([len(raw)]) + raw)
        elif isinstance(x, float):
            out.extend(b"G" + struct.pack(">d", x))
        elif isinstance(x, bytes):
            head = b"U" + bytes([len(x)]) if len(x) < 256 else b"T" + struct.pack("<i", len(x))
            out.extend(head + x)
            put()
        elif isinstance(x, str):
            data = x.encode("utf-8")
            out.extend(b"X" + struct.pack("<I", len(data)) + data)
            put()
        elif isinstance(x, list):
            out.extend(b"]")
            put()
            for i in range(0, len(x), 1000):  # cPickle batches appends by 1000
                out.extend(b"(")
                for item in x[i : i + 1000]:
                    emit(item)
                out.extend(b"e")
        elif isinstance(x, tuple):
            out.extend(b"(")
            for item in x:
                emit(item)
            out.extend(b"t")
            put()
        elif isinstance(x, dict):
            out.extend(b"}")
            put()
            items = list(x.items())
            for i in range(0, len(items), 1000):
                out.extend(b"(")
                for k, v in items[i : i + 1000]:
                    emit(k)
                    emit(v)
                out.extend(b"u")
        else:
            raise TypeError(f"dumps_py2: cannot pickle {type(x).__name__}")

    emit(obj)
    out.extend(b".")
    return bytes(out)


# --- raw data -----------------------------------------------------------------------------


def split_sizes(scale: float) -> dict[str, tuple[int, int, int]]:
    """Published sizes times ``scale``: (objects, expressions, images), each at least 1,
    with at least one expression per object and at most as many images as objects."""
    out = {}
    for split, (objs, exprs, imgs) in PUBLISHED.items():
        n_obj = max(1, round(objs * scale))
        n_img = min(n_obj, max(1, round(imgs * scale)))
        out[split] = (n_obj, max(n_obj, round(exprs * scale)), n_img)
    return out


def _spread(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` split into ``parts`` near-equal positive integers, in random order."""
    counts = np.full(parts, total // parts, np.int64)
    counts[: total % parts] += 1
    rng.shuffle(counts)
    return counts


def _pick_size(rng: np.random.Generator) -> tuple[int, int]:
    weights = np.asarray([s[2] for s in SIZES])
    w, h, _ = SIZES[rng.choice(len(SIZES), p=weights / weights.sum())]
    return int(w), int(h)


def photo_jpeg(seed: int, width: int, height: int) -> bytes:
    """A photo-like JPEG: smooth colour field + mid-frequency texture + noise, quality 90.

    Pure noise would be far larger than a photo and a flat field far smaller; this mix
    lands at the ~110-170 KB of a COCO 640x480 image. About 2% are grayscale, as in COCO.
    """
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    mid = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
    field = np.asarray(low.resize((width, height), Image.BICUBIC), np.float32) * 0.7
    field += np.asarray(mid.resize((width, height), Image.BILINEAR), np.float32) * 0.3
    field += rng.normal(0.0, rng.uniform(8.0, 16.0), (height, width, 1)).astype(np.float32)
    img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    if rng.random() < 0.02:
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _polygon(
    rng: np.random.Generator, width: int, height: int, border: bool = True
) -> list[float]:
    """A star-shaped polygon of 8-40 vertices; ~5% of them cross the image border."""
    r = rng.uniform(15, min(width, height) / 3)
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    if rng.random() < 0.05 and border:
        cx = rng.choice([rng.uniform(-r / 2, r / 2), width + rng.uniform(-r / 2, r / 2)])
    n = int(rng.integers(8, 41))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * rng.uniform(0.5, 1.0, n)
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return [round(float(v), 2) for v in pts.ravel()]


def _annotation(ann_id: int, image_id: int, rng: np.random.Generator, w: int, h: int) -> dict:
    parts = [_polygon(rng, w, h) for _ in range(2 if rng.random() < 0.1 else 1)]
    if masks.mask_area(parts, h, w) == 0:  # all outside the image: redraw it inside, from
        # its own generator, so the shared stream (image ids, sizes) stays as it was
        parts = [_polygon(np.random.default_rng(ann_id), w, h, border=False)]
    pts = np.concatenate([np.reshape(p, (-1, 2)) for p in parts])
    lo = np.clip(pts.min(axis=0), 0, [w, h])
    hi = np.clip(pts.max(axis=0), 0, [w, h])
    bbox = [round(float(v), 2) for v in (lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1])]
    return {"id": ann_id, "image_id": image_id, "category_id": int(rng.integers(1, 91)),
            "segmentation": parts, "area": float(bbox[2] * bbox[3]), "bbox": bbox,
            "iscrowd": 0}


def _sentence(rng: np.random.Generator, sent_id: int) -> dict:
    words = [str(w) for w in rng.choice(_WORDS, int(rng.integers(1, 9)))]
    text = " ".join(words)
    u = rng.random()
    if u < 0.01:  # py2 str holding UTF-8 (an annotator's accent)
        raw: bytes | str = (text + " café").encode("utf-8")
    elif u < 0.015:  # py2 unicode
        raw = text + " “quoted”"
    else:
        raw = text.encode("ascii")
    tokens = [t.encode("ascii") for t in text.split()]
    return {b"raw": raw, b"sent": text.encode("ascii"), b"tokens": tokens, b"sent_id": sent_id}


def _write_image(job: tuple[Path, int, int, int]) -> int:
    path, seed, w, h = job
    data = photo_jpeg(seed, w, h)
    path.write_bytes(data)
    return len(data)


def generate(raw_dir: Path, scale: float, seed: int = 0, num_workers: int = 1) -> dict:
    """Writes the refer layout for refcoco unc at ``scale`` under ``raw_dir``.

    Returns {split: {objects, images, expressions}} (TFDS split names), also saved as
    ``expected_counts.json``; its presence marks a complete generation.
    """
    rng = np.random.default_rng(seed)
    img_dir = raw_dir / "train2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    (raw_dir / "refcoco").mkdir(parents=True, exist_ok=True)
    images, annotations, refs, jobs = [], [], [], []
    expected: dict[str, dict[str, int]] = {}
    image_id, ann_id, ref_id, sent_id = 100, 1000, 0, 0
    for split, (n_obj, n_expr, n_img) in split_sizes(scale).items():
        expected[TFDS_SPLIT[split]] = {"objects": n_obj, "images": n_img, "expressions": n_expr}
        per_image = _spread(n_obj, n_img, rng)
        per_object = iter(_spread(n_expr, n_obj, rng))
        for k in per_image:
            image_id += int(rng.integers(1, 30))  # COCO ids have gaps
            w, h = _pick_size(rng)
            name = f"COCO_train2014_{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            jobs.append((img_dir / name, seed * 10_000_019 + image_id, w, h))
            n_anns = max(int(k), int(rng.poisson(ANNS_PER_IMAGE)))
            for j in range(n_anns):
                ann_id += 1
                ann = _annotation(ann_id, image_id, rng, w, h)
                annotations.append(ann)
                if j >= k:
                    continue  # in instances.json, not referred to
                sentences = []
                for _ in range(int(next(per_object))):
                    sentences.append(_sentence(rng, sent_id))
                    sent_id += 1
                refs.append({
                    b"ref_id": ref_id, b"ann_id": ann_id, b"image_id": image_id,
                    b"category_id": ann["category_id"], b"split": split.encode(),
                    b"sent_ids": [s[b"sent_id"] for s in sentences], b"sentences": sentences,
                    b"file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg".encode(),
                })
                ref_id += 1
    (raw_dir / "refcoco" / "refs(unc).p").write_bytes(dumps_py2(refs))
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": i, "name": f"cat{i}"} for i in range(1, 91)]}
    (raw_dir / "refcoco" / "instances.json").write_text(json.dumps(instances))
    todo = [j for j in jobs if not j[0].is_file()]  # resumable: a killed run keeps its images
    if num_workers > 1:
        with ProcessPoolExecutor(num_workers) as pool:
            list(pool.map(_write_image, todo, chunksize=16))
    else:
        for job in todo:
            _write_image(job)
    (raw_dir / "expected_counts.json").write_text(json.dumps(expected, indent=1))
    return expected


def cached_raw(workdir: Path, scale: float, num_workers: int) -> tuple[Path, dict, float]:
    """The raw data for ``scale`` under ``workdir`` (generated if absent), its expected
    counts and the seconds spent generating (0 when cached)."""
    raw_dir = workdir / f"raw_v{GENERATOR_VERSION}_scale{scale:g}"
    marker = raw_dir / "expected_counts.json"
    if marker.is_file():
        return raw_dir, json.loads(marker.read_text()), 0.0
    t0 = time.perf_counter()
    expected = generate(raw_dir, scale, num_workers=num_workers)
    return raw_dir, expected, time.perf_counter() - t0


# --- measuring the build ------------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0  # gone, or a zombie


def _descendants(pid: int) -> list[int]:
    try:
        kids = [int(k) for t in os.listdir(f"/proc/{pid}/task")
                for k in open(f"/proc/{pid}/task/{t}/children").read().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


class _RssSampler(threading.Thread):
    """Largest sum of RSS of this process and its workers, sampled every 0.2 s.

    RUSAGE_CHILDREN's maxrss is no use here: a spawned worker inherits its parent's
    high-water mark at fork, before exec, so it reports the parent's size.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kb = self.peak_workers_kb = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            workers = sum(_rss_kb(p) for p in _descendants(os.getpid()))
            self.peak_kb = max(self.peak_kb, _rss_kb(os.getpid()) + workers)
            self.peak_workers_kb = max(self.peak_workers_kb, workers)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _build_child(argv: Sequence[str]) -> int:
    """Runs the real CLI in this (child) process and prints its timing and rusage as JSON."""
    from tfds_refcoco import build

    sampler = _RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    rc = build.main(argv)
    wall = time.perf_counter() - t0
    sampler.stop()
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool's workers, once joined
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    print("BUILD_STATS " + json.dumps({"rc": rc, "wall_s": wall, "cpu_s": cpu,
                                        "self_maxrss_kb": me.ru_maxrss,
                                        "children_maxrss_kb": kids.ru_maxrss,
                                        "sampled_peak_kb": sampler.peak_kb,
                                        "sampled_workers_kb": sampler.peak_workers_kb}))
    return rc


def cpu_description() -> str:
    """``lscpu``'s model name, core count and whether AVX-512 is there."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    model = fields.get("Model name", "unknown CPU").strip()
    flags = fields.get("Flags", "")
    avx = "avx512" if "avx512" in flags else ("AVX2, no AVX-512" if "avx2" in flags else "no AVX2")
    return f"{model}, {len(os.sched_getaffinity(0))} cores available, {avx}"


def disk_bytes(path: Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.1,
                        help="fraction of the published refcoco_unc sizes (1.0 = full)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lts_build_bench"),
                        help="where the raw data is cached and the dataset built")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="build workers (default: the builder's, all available cores)")
    parser.add_argument("--keep", action="store_true", help="keep the built dataset")
    args = parser.parse_args(argv)

    cores = len(os.sched_getaffinity(0))
    raw_dir, expected, gen_s = cached_raw(args.workdir, args.scale, cores)
    print(f"raw data: {raw_dir} (" + (f"generated in {gen_s:.0f} s" if gen_s else "cached") + ")")
    data_dir = args.workdir / f"tfds_scale{args.scale:g}"
    shutil.rmtree(data_dir, ignore_errors=True)
    cmd = ["--config", CONFIG, "--manual_dir", str(raw_dir), "--data_dir", str(data_dir)]
    if args.num_workers is not None:
        cmd += ["--num_workers", str(args.num_workers)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--_build", *cmd],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    stats_lines = [s for s in proc.stdout.splitlines() if s.startswith("BUILD_STATS ")]
    if proc.returncode != 0 or not stats_lines:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        return 1
    stats = json.loads(stats_lines[-1].removeprefix("BUILD_STATS "))
    table = "\n".join(s for s in proc.stdout.splitlines() if s.startswith("|"))
    built = {cells[0]: {"objects": int(cells[1]), "images": int(cells[2]),
                        "expressions": int(cells[3])}
             for row in table.splitlines()[2:]
             if (cells := [c.strip().replace(",", "") for c in row.strip("|").split("|")])
             and cells[0] != "total"}
    objects = sum(c["objects"] for c in expected.values())
    size = disk_bytes(data_dir)

    print(f"CPU: {cpu_description()}")
    print(f"command: python -m tfds_refcoco.build {' '.join(cmd)}")
    print(table)
    print("built counts == generated counts:", "yes" if built == expected else
          f"NO, generated {json.dumps(expected)}")
    print(f"build wall time: {stats['wall_s']:.1f} s  ({objects / stats['wall_s']:.0f} objects/s, "
          f"{stats['cpu_s']:.0f} CPU-s in the build and its workers)")
    print(f"peak RSS: build process {stats['self_maxrss_kb'] / 1024:.0f} MiB (getrusage "
          f"SELF); build + workers together {stats['sampled_peak_kb'] / 1024:.0f} MiB, workers "
          f"{stats['sampled_workers_kb'] / 1024:.0f} MiB (sampled /proc every 0.2 s; getrusage "
          f"CHILDREN says {stats['children_maxrss_kb'] / 1024:.0f} MiB, but a spawned worker "
          "inherits its parent's high-water mark)")
    print(f"on disk: {size:,} bytes ({size / 2**30:.2f} GiB) in {data_dir}")
    if not args.keep:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_build":
        sys.exit(_build_child(sys.argv[2:]))
    sys.exit(main())
