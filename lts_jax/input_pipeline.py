"""grain input pipelines: training (infinite, reshuffled per epoch) and evaluation (each pair once).

Both pipelines are grain MapDatasets of whole batches, so a batch's contents depend only on the
seed, the position in the stream and the process layout, never on worker or thread counts.

The host only decodes. A batch carries uint8 pixels on a fixed C x C canvas
(``config.data.canvas_size``, content top-left, zeros elsewhere) with each image's (H, W); the
letterbox to S x S, the flip, the photometric jitter and the float conversion run inside the
jitted step (``transform.train_inputs`` / ``transform.eval_inputs``). See docs/CONTRACTS.md for
the fields.

Training stream: epoch e is a permutation of the N objects (numpy, seeded by (seed, e)).
Global stream position t = e * N + i. With B rows per process and G = B*P, global batch b
is positions [b*G, (b+1)*G) in order, process p holding [b*G + p*B, b*G + (p+1)*B), so a global
batch is the same, row for row, under any process count. Each position draws its own RNG from
(seed, t): which expression, flip, photometric factors. A batch is built as one grain element,
decoding straight into the batch arrays. With ``objects_per_image`` K > 1 the stream is one of
images instead: each position brings K of its image's objects, the image fields (pixels, size,
flip, photometric) once and the pair fields (mask, tokens) K times (docs/CONTRACTS.md).

Eval stream: pairs (object, expression) in source order, then expression order. Global batch b
holds pairs [b*G, (b+1)*G) (G = global eval batch), process p the slice [p*B, (p+1)*B) of it.
The tail is padded with valid=False rows so every process yields the same number of full batches.

Checkpointing: ``TrainIterator.get_state()`` is the number of batches consumed (and a
fingerprint of the stream), so a restore is exact under any worker count; lts_jax/checkpoint.py
saves it beside the train state.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from lts_jax.augment import photometric_params, swap_left_right
from lts_jax.letterbox import letterbox_params
from lts_jax.tokenizer import UNK_ID, Tokenizer
from lts_jax.transform import identity_photometric, packed_width

Batch = dict[str, np.ndarray]
DecodeFn = Callable[[Any], dict[str, Any]]
ExpressionsFn = Callable[[Any], Sequence[str]]

_STATE_VERSION = 1


def _identity(example: Any) -> Any:
    return example


def _split_seed(seed: int) -> tuple[int, int]:
    """Independent (shuffle, augmentation) seeds in [0, 2**32) from one config seed."""
    a, b = np.random.SeedSequence(int(seed)).generate_state(2, dtype=np.uint32)
    return int(a), int(b)


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    if process_count <= 0 or global_batch_size <= 0:
        raise ValueError(f"need positive sizes, got {global_batch_size=} {process_count=}")
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"process count {process_count}")
    return global_batch_size // process_count


def _mp_options(worker_count: int) -> grain.MultiprocessingOptions:
    # grain reads absl flags when starting workers; outside absl.app (tests, notebooks) they
    # are unparsed and the read raises. Their defaults are what we want.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=2)


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")


# --------------------------------------------------------------------------------------------
# Training


def _canvas_error(what: str, h: int, w: int, canvas: int) -> ValueError:
    return ValueError(f"{what}: image {h}x{w} does not fit the {canvas}x{canvas} canvas; raise "
                      "config.data.canvas_size to at least its longest side")


def place_image(image: np.ndarray, out: np.ndarray) -> None:
    """Copies uint8[H, W, 3] into the top-left of a zero-filled uint8[C, C, 3] canvas.

    Only the content is written: batches come from np.zeros, whose untouched pages cost
    nothing, and the device transform never reads beyond (H, W) anyway.
    """
    h, w = image.shape[:2]
    out[:h, :w] = image


def place_mask(mask: np.ndarray, out: np.ndarray) -> None:
    """Packs a {0, 1} uint8[H, W] mask (MSB first) into the top-left of a zero-filled
    uint8[C, ceil(C/8)] canvas."""
    packed = np.packbits(mask, axis=1)
    out[:packed.shape[0], :packed.shape[1]] = packed


def _in_grain_worker() -> bool:
    try:  # private in grain 0.2; without it, batches are copied to shared memory once more
        from grain._src.python.dataset.transformations import process_prefetch
    except ImportError:
        return False
    return process_prefetch.is_in_worker_process()


def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    """A zero-filled uint8 array; in a grain worker, directly in shared memory, so the 40 MB
    batch is not copied there again on its way to the main process."""
    if _in_grain_worker():
        return grain.multiprocessing.SharedMemoryArray(shape, np.uint8)  # zero-filled shm
    return np.zeros(shape, np.uint8)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, num_objects: int, epoch: int) -> np.ndarray:
    """The object order of one training epoch (cached: a batch reads 32 positions of it)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_objects)
    order.flags.writeable = False
    return order


@dataclasses.dataclass(frozen=True, eq=False)
class _TrainBatch:
    """Batch index -> this process's batch of undecoded-geometry training examples.

    Runs in grain workers. A whole batch is one element so that decoded pixels are written
    once, straight into the batch arrays (stacking 32 canvases would copy 40 MB per batch).
    Row j of process p in batch b is global stream position b * G + p * B + j.
    """

    source: Any
    shuffle_seed: int
    decode_fn: DecodeFn
    tokenizer: Tokenizer
    canvas_size: int
    max_text_len: int
    flip: bool
    photometric: bool
    seed: int
    batch_size: int
    process_index: int
    process_count: int
    # {object index: decoded example}, filled as objects are first drawn, when the source is
    # small enough to keep decoded (config.data.cache_decoded): later epochs then skip the
    # record parsing and JPEG/PNG decoding, most of the host's work per batch. Per process
    # (each grain worker keeps its own); two read threads may both decode an object the first
    # time, which costs a decode, not a difference.
    cache: dict[int, dict[str, Any]] | None = None

    # objects_per_image > 1: the stream is one of images (image_objects[k] = the object
    # indices of image k) and each image brings that many of its objects, sharing its pixels,
    # its flip and its photometric draw.
    image_objects: tuple[tuple[int, ...], ...] | None = None
    objects_per_image: int = 1

    def __call__(self, batch_index: int) -> Batch:
        b, c, length = self.batch_size, self.canvas_size, self.max_text_len
        n = b // self.objects_per_image  # images per batch
        out = {"image": _zeros((n, c, c, 3)), "mask": _zeros((b, c, packed_width(c))),
               "hw": np.empty((n, 2), np.int32), "flip": np.zeros((n,), np.bool_),
               "photometric": identity_photometric(n),
               "tokens": np.empty((b, length), np.int32),
               "token_mask": np.empty((b, length), np.bool_),
               "valid": np.ones((b,), np.bool_)}
        first = (batch_index * self.process_count + self.process_index) * n
        fill = self._fill if self.objects_per_image == 1 else self._fill_image
        for row in range(n):
            fill(out, row, first + row)
        return out

    def _decoded(self, obj: int) -> dict[str, Any]:
        if self.cache is None:
            return self.decode_fn(self.source[obj])
        ex = self.cache.get(obj)
        if ex is None:
            ex = self.cache[obj] = self.decode_fn(self.source[obj])
        return ex

    def _object(self, obj: int) -> tuple[dict[str, Any], int, int]:
        """Object ``obj`` decoded, with its image's (H, W), checked to fit the canvas."""
        ex = self._decoded(obj)
        h, w = ex["mask"].shape
        if h > self.canvas_size or w > self.canvas_size:
            raise _canvas_error(f"training object {obj}", h, w, self.canvas_size)
        return ex, h, w

    def _place_pair(self, out: Batch, row: int, ex: dict[str, Any], text: str) -> None:
        """The pair fields of ``row``: the object's mask and the (already flipped) text."""
        place_mask(ex["mask"], out["mask"][row])
        out["tokens"][row], out["token_mask"][row] = self.tokenizer.encode(text,
                                                                           self.max_text_len)

    def _fill(self, out: Batch, row: int, position: int) -> None:
        rng = np.random.default_rng([self.seed, position])
        epoch, index = divmod(position, len(self.source))
        obj = int(_epoch_order(self.shuffle_seed, len(self.source), epoch)[index])
        ex, h, w = self._object(obj)
        expressions = ex["expressions"]
        text = expressions[int(rng.integers(len(expressions)))]
        place_image(ex["image"], out["image"][row])
        out["hw"][row] = (h, w)
        if self.flip and rng.random() < 0.5:
            out["flip"][row] = True
            text = swap_left_right(text)
        if self.photometric:
            out["photometric"][row] = photometric_params(rng)
        self._place_pair(out, row, ex, text)

    def _fill_image(self, out: Batch, k: int, position: int) -> None:
        """Image k of the batch and its objects_per_image pairs, rows k*G .. k*G + G - 1."""
        g, groups = self.objects_per_image, self.image_objects
        assert groups is not None
        rng = np.random.default_rng([self.seed, position])
        epoch, index = divmod(position, len(groups))
        objects = groups[int(_epoch_order(self.shuffle_seed, len(groups), epoch)[index])]
        # Distinct objects while the image has enough, then round again.
        chosen = [objects[i % len(objects)] for i in rng.permutation(max(g, len(objects)))[:g]]
        flip = self.flip and rng.random() < 0.5
        for j, obj in enumerate(chosen):
            ex, h, w = self._object(obj)
            if j == 0:
                place_image(ex["image"], out["image"][k])
                out["hw"][k] = (h, w)
                out["flip"][k] = flip
                if self.photometric:
                    out["photometric"][k] = photometric_params(rng)
            expressions = ex["expressions"]
            text = expressions[int(rng.integers(len(expressions)))]
            self._place_pair(out, k * g + j, ex, swap_left_right(text) if flip else text)


def image_objects(source: Any) -> tuple[tuple[int, ...], ...]:
    """The object indices of each image of ``source`` (by 'image_id'), images in order of
    their first object."""
    groups: dict[int, list[int]] = {}
    for obj in range(len(source)):
        groups.setdefault(int(source[obj]["image_id"]), []).append(obj)
    return tuple(tuple(v) for v in groups.values())


def train_batches(source: Any, tokenizer: Tokenizer, *, batch_size: int, canvas_size: int,
                  max_text_len: int, seed: int, decode_fn: DecodeFn = _identity,
                  process_index: int = 0, process_count: int = 1, flip: bool = False,
                  photometric: bool = False, num_epochs: int | None = None,
                  cache_decoded: bool = False, objects_per_image: int = 1) -> grain.MapDataset:
    """MapDataset of this process's training batches (batch_size is per process).

    source: random-access (len, __getitem__) of raw examples; decode_fn turns one into the
    decoded dict of CONTRACTS.md (identity for an in-memory source of decoded dicts).
    num_epochs=None repeats forever. Batches may span an epoch boundary. Rows hold canvases;
    ``transform.train_inputs`` (inside the train step) letterboxes, flips and jitters them.
    cache_decoded keeps every decoded example in memory once drawn (the whole split ends up
    there: only for small datasets such as RefShapes); the batches are the same either way.
    objects_per_image K > 1: a stream of images (grouped by 'image_id'), batch_size / K of
    them per batch with K objects each; batch_size still counts pairs.
    """
    _check_process(process_index, process_count)
    if len(source) == 0:
        raise ValueError("empty training source")
    shuffle_seed, aug_seed = _split_seed(seed)
    groups = image_objects(source) if objects_per_image > 1 else None
    units = len(source) if groups is None else len(groups)
    positions = sys.maxsize if num_epochs is None else units * num_epochs
    make = _TrainBatch(source, shuffle_seed, decode_fn, tokenizer, canvas_size,
                       max_text_len, flip, photometric, aug_seed, batch_size, process_index,
                       process_count, {} if cache_decoded else None, groups,
                       objects_per_image)
    # Every process yields the same number of batches: whole global batches only.
    per_batch = batch_size // objects_per_image * process_count
    return grain.MapDataset.range(positions // per_batch).map(make)


class TrainIterator(Iterator[Batch]):
    """Iterator over a batch MapDataset whose state is "batches consumed so far".

    Restoring rebuilds the grain pipeline from that batch on, so the result is exact and does
    not depend on worker count or prefetch depth. Compatible with grain.checkpoint handlers.
    """

    def __init__(self, batches: grain.MapDataset, *, worker_count: int = 0,
                 num_threads: int = 2, prefetch: int = 2,
                 fingerprint: dict[str, Any] | None = None):
        self._batches = batches
        self._worker_count = worker_count
        self._read_options = grain.ReadOptions(num_threads=num_threads,
                                               prefetch_buffer_size=max(prefetch, 1))
        self._fingerprint = dict(fingerprint or {})
        self._next_batch = 0
        self._it: Any = None

    def _start(self) -> None:
        ds = self._batches[self._next_batch:].to_iter_dataset(self._read_options)
        if self._worker_count > 0:
            ds = ds.mp_prefetch(_mp_options(self._worker_count))
        self._it = iter(ds)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._start()
        batch = next(self._it)
        self._next_batch += 1
        return batch

    @property
    def batches_consumed(self) -> int:
        return self._next_batch

    def get_state(self) -> bytes:
        return json.dumps({"version": _STATE_VERSION, "next_batch": self._next_batch,
                           "fingerprint": self._fingerprint}, sort_keys=True).encode()

    def set_state(self, state: bytes) -> None:
        parsed = json.loads(bytes(state).decode())
        saved = dict(parsed.get("fingerprint") or {})
        for legacy in ("process_index", "process_count"):  # in states saved before they
            saved.pop(legacy, None)  # were dropped (they never changed the global stream)
        if saved != self._fingerprint:
            raise ValueError("iterator state comes from a different pipeline: saved "
                             f"{parsed.get('fingerprint')}, this one {self._fingerprint}")
        self.close()
        self._next_batch = int(parsed["next_batch"])

    def start_prefetch(self) -> None:
        """Start producing batches in the background (grain's restore handler calls this)."""
        if self._it is None:
            self._start()
        if hasattr(self._it, "start_prefetch"):
            self._it.start_prefetch()

    def close(self) -> None:
        """Stop worker processes / threads; iteration can continue afterwards (restarts)."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None


def make_train_iterator(source: Any, tokenizer: Tokenizer, *, global_batch_size: int,
                        canvas_size: int, max_text_len: int, seed: int,
                        decode_fn: DecodeFn = _identity, process_index: int = 0,
                        process_count: int = 1, flip: bool = False, photometric: bool = False,
                        worker_count: int = 0, num_threads: int = 2,
                        num_epochs: int | None = None, cache_decoded: bool = False,
                        objects_per_image: int = 1) -> TrainIterator:
    """Checkpointable training iterator over explicit arguments (see train_batches)."""
    batch_size = per_process_batch_size(global_batch_size, process_count)
    if objects_per_image < 1 or batch_size % objects_per_image:
        raise ValueError(f"{batch_size} pairs per process are not a whole number of images "
                         f"of {objects_per_image} objects (config.data.objects_per_image)")
    batches = train_batches(source, tokenizer, batch_size=batch_size, canvas_size=canvas_size,
                            max_text_len=max_text_len, seed=seed, decode_fn=decode_fn,
                            process_index=process_index, process_count=process_count,
                            flip=flip, photometric=photometric, num_epochs=num_epochs,
                            cache_decoded=cache_decoded, objects_per_image=objects_per_image)
    # What fixes the global stream at a given batch index; a state from another stream is
    # refused. Not the process index or count: every process count slices the same global
    # batches, so a run may resume on another number of processes.
    fingerprint = {"num_objects": len(source), "global_batch_size": global_batch_size,
                   "seed": int(seed)}
    if objects_per_image > 1:  # absent at 1, so states saved before the option still load
        fingerprint["objects_per_image"] = int(objects_per_image)
    return TrainIterator(batches, worker_count=worker_count, num_threads=num_threads,
                         fingerprint=fingerprint)


# --------------------------------------------------------------------------------------------
# Evaluation


def eval_pairs(source: Any, expressions_fn: ExpressionsFn) -> np.ndarray:
    """int64[N, 2] (object index, expression index) in evaluation order."""
    rows = [(obj, j) for obj in range(len(source))
            for j in range(len(expressions_fn(source[obj])))]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def num_eval_batches(num_pairs: int, global_eval_batch_size: int) -> int:
    """Batches every process yields for num_pairs pairs (the same on every process)."""
    return max(1, -(-num_pairs // global_eval_batch_size))


class _EvalExample:
    """Padded eval slot -> example. Runs in grain workers; caches the last decoded object per
    thread, since consecutive pairs usually share an object."""

    def __init__(self, source: Any, decode_fn: DecodeFn, tokenizer: Tokenizer,
                 pairs: np.ndarray, image_size: int, max_text_len: int, canvas_size: int,
                 global_batch_size: int, batch_size: int, process_index: int):
        self.source, self.decode_fn, self.tokenizer = source, decode_fn, tokenizer
        self.pairs, self.image_size, self.max_text_len = pairs, image_size, max_text_len
        self.canvas_size = canvas_size
        self.global_batch_size, self.batch_size = global_batch_size, batch_size
        self.process_index = process_index
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _object(self, obj: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
        cached = getattr(self._local, "entry", None)
        if cached is not None and cached[0] == obj:
            return cached[1]
        ex = self.decode_fn(self.source[obj])
        h, w = ex["mask"].shape
        c = self.canvas_size
        if h > c or w > c:
            raise _canvas_error(f"eval object {obj}", h, w, c)
        image = np.zeros((c, c, 3), np.uint8)
        place_image(ex["image"], image)
        orig = np.zeros((c, c), dtype=np.uint8)
        orig[:h, :w] = ex["mask"]
        value = (ex, image, orig, letterbox_params(h, w, self.image_size).as_array())
        self._local.entry = (obj, value)
        return value

    def __call__(self, local_index: int) -> dict[str, np.ndarray]:
        b, slot = divmod(local_index, self.batch_size)
        pair_id = b * self.global_batch_size + self.process_index * self.batch_size + slot
        if pair_id >= len(self.pairs):
            return self._padding()
        obj, j = (int(v) for v in self.pairs[pair_id])
        ex, image, orig, params = self._object(obj)
        tokens, token_mask = self.tokenizer.encode(ex["expressions"][j], self.max_text_len)
        h, w = ex["mask"].shape
        return {"image": image, "tokens": tokens, "token_mask": token_mask,
                "valid": np.bool_(True), "orig_mask": orig,
                "orig_hw": np.asarray([h, w], dtype=np.int32), "letterbox": params,
                "pair_id": np.int64(pair_id)}

    def _padding(self) -> dict[str, np.ndarray]:
        # A well-formed dummy (1x1 image, one unk token) so that code that does not look at
        # 'valid' (letterbox, unletterbox, text pooling) still runs without errors or NaNs.
        c, length = self.canvas_size, self.max_text_len
        tokens = np.zeros((length,), dtype=np.int32)
        tokens[0] = UNK_ID
        token_mask = np.zeros((length,), dtype=bool)
        token_mask[0] = True
        return {"image": np.zeros((c, c, 3), np.uint8), "tokens": tokens,
                "token_mask": token_mask, "valid": np.bool_(False),
                "orig_mask": np.zeros((c, c), np.uint8),
                "orig_hw": np.asarray([1, 1], dtype=np.int32),
                "letterbox": letterbox_params(1, 1, self.image_size).as_array(),
                "pair_id": np.int64(-1)}


class EvalLoader:
    """Re-iterable eval pipeline: each iter() is one full pass, identical on every call."""

    def __init__(self, batches: grain.MapDataset, *, num_pairs: int, worker_count: int = 0,
                 num_threads: int = 2, prefetch: int = 2):
        self._batches = batches
        self.num_pairs = num_pairs
        self.num_batches = len(batches)
        self._worker_count = worker_count
        self._read_options = grain.ReadOptions(num_threads=num_threads,
                                               prefetch_buffer_size=max(prefetch, 1))

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        ds = self._batches.to_iter_dataset(self._read_options)
        if self._worker_count > 0:
            ds = ds.mp_prefetch(_mp_options(self._worker_count))
        return iter(ds)


def make_eval_loader(source: Any, tokenizer: Tokenizer, *, global_batch_size: int,
                     image_size: int, max_text_len: int, decode_fn: DecodeFn = _identity,
                     expressions_fn: ExpressionsFn | None = None,
                     pairs: np.ndarray | None = None, process_index: int = 0,
                     process_count: int = 1, canvas_size: int = 640, worker_count: int = 0,
                     num_threads: int = 2) -> EvalLoader:
    """Eval loader over explicit arguments. Give `pairs` (from eval_pairs) or `expressions_fn`
    (raw example -> expressions; defaults to decode_fn(raw)['expressions'])."""
    _check_process(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, process_count)
    if pairs is None:
        pairs = eval_pairs(source, expressions_fn or (lambda raw: decode_fn(raw)["expressions"]))
    nb = num_eval_batches(len(pairs), global_batch_size)
    example = _EvalExample(source, decode_fn, tokenizer, pairs, image_size, max_text_len,
                           canvas_size, global_batch_size, batch_size, process_index)
    batches = grain.MapDataset.range(nb * batch_size).map(example).batch(batch_size)
    return EvalLoader(batches, num_pairs=len(pairs), worker_count=worker_count,
                      num_threads=num_threads)


# --------------------------------------------------------------------------------------------
# Config-level entry points (config schema: docs/CONTRACTS.md)


class DecodedCacheTooLargeError(ValueError):
    """config.data.cache_decoded asks to keep more decoded examples than this machine holds."""


def check_decoded_cache_fits(num_objects: int, canvas_size: int,
                             memory_bytes: int | None = None) -> None:
    """Refuses config.data.cache_decoded when the decoded split could fill over half of memory.

    Counts the bound per object, a full canvas of RGB pixels plus a one-byte mask: RefShapes
    (2,949 objects on a 96 canvas) comes to 0.11 GB, RefCOCO (about 120,000 on 640) to 197 GB.
    """
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    bound = num_objects * canvas_size * canvas_size * 4
    if bound > memory_bytes // 2:
        raise DecodedCacheTooLargeError(
            f"config.data.cache_decoded: the {num_objects:,} training objects could take up to "
            f"{bound / 1e9:.1f} GB decoded (canvas {canvas_size}), more than half of this "
            f"machine's {memory_bytes / 1e9:.1f} GB; set --config.data.cache_decoded=false "
            "(it is meant for small datasets such as RefShapes)")


def create_train_loader(config: Any, tokenizer: Tokenizer, *, process_index: int = 0,
                        process_count: int = 1, seed: int | None = None) -> TrainIterator:
    """Infinite, checkpointable iterator of this process's training batches."""
    from tfds_refcoco import records  # deferred: the builder is only needed for real data

    data = config.data
    source = records.data_source(records.configured_dataset(data), data.train_split, data.data_dir)
    cache_decoded = bool(data.get("cache_decoded", False))
    if cache_decoded:
        check_decoded_cache_fits(len(source), int(data.canvas_size))
    return make_train_iterator(
        source, tokenizer, global_batch_size=config.batch_size, canvas_size=data.canvas_size,
        max_text_len=data.max_text_len, seed=config.seed if seed is None else seed,
        decode_fn=records.decode_example, process_index=process_index,
        process_count=process_count, flip=data.flip, photometric=data.photometric,
        worker_count=data.num_workers, cache_decoded=cache_decoded,
        objects_per_image=int(data.get("objects_per_image", 1)))


@functools.lru_cache(maxsize=32)
def _split_pairs(dataset: str, split: str, data_dir: str) -> np.ndarray:
    """Pairs of a prepared split. Cached: validation runs every eval_every steps and the scan
    reads every record of the split."""
    from tfds_refcoco import records

    pairs = eval_pairs(records.data_source(dataset, split, data_dir), records.decode_expressions)
    pairs.flags.writeable = False
    return pairs


def create_eval_loader(config: Any, split: str, tokenizer: Tokenizer, *, process_index: int = 0,
                       process_count: int = 1) -> EvalLoader:
    """Eval loader for one split; .num_batches and .num_pairs give its size."""
    from tfds_refcoco import records

    data = config.data
    source = records.data_source(records.configured_dataset(data), split, data.data_dir)
    return make_eval_loader(
        source, tokenizer, global_batch_size=config.eval_batch_size, image_size=data.image_size,
        max_text_len=data.max_text_len, decode_fn=records.decode_example,
        pairs=_split_pairs(records.configured_dataset(data), split, str(data.data_dir)),
        process_index=process_index, process_count=process_count,
        canvas_size=data.canvas_size, worker_count=data.num_workers)


def eval_size(config: Any, split: str) -> tuple[int, int]:
    """(batches per process, number of (object, expression) pairs) for an eval split."""
    from tfds_refcoco import records

    n = len(_split_pairs(records.configured_dataset(config.data), split, str(config.data.data_dir)))
    return num_eval_batches(n, config.eval_batch_size), n
