"""grain input pipelines: training (infinite, reshuffled per epoch) and evaluation (each pair once).

Both pipelines are grain MapDatasets of whole batches, so a batch's contents depend only on the
seed, the position in the stream and the process layout, never on worker or thread counts.

Training stream: epoch e is a permutation of the N objects (grain's index shuffle, reseeded per
epoch). Global stream position t = e * N + i. With B rows per process and G = B*P, global batch b
is positions [b*G, (b+1)*G) in order, process p holding [b*G + p*B, b*G + (p+1)*B), so a global
batch is the same, row for row, under any process count. Each position draws its own RNG from
(seed, t): which expression, flip, photometric jitter.

Eval stream: pairs (object, expression) in source order, then expression order. Global batch b
holds pairs [b*G, (b+1)*G) (G = global eval batch), process p the slice [p*B, (p+1)*B) of it.
The tail is padded with valid=False rows so every process yields the same number of full batches.

Checkpointing the training iterator with Orbax (grain's handler accepts any iterator with
get_state() -> bytes / set_state(bytes) / start_prefetch()):

    import grain
    import orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(workdir, options=ocp.CheckpointManagerOptions(max_to_keep=3))
    train_iter = create_train_loader(config, tokenizer)
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(train_iter)))
    # resume: build a fresh iterator the same way, then
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(train_iter)))  # restores train_iter in place

grain writes one file per JAX process (process_<i>-of-<n>.json). The state is the number of
batches consumed, so it restores exactly under any worker count.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from lts_jax.augment import hflip, photometric, swap_left_right
from lts_jax.letterbox import letterbox, letterbox_mask, letterbox_params
from lts_jax.tokenizer import UNK_ID, Tokenizer

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


@dataclasses.dataclass(frozen=True, eq=False)
class _TrainExample:
    """(stream position, object index) -> one training example. Runs in grain workers."""

    source: Any
    decode_fn: DecodeFn
    tokenizer: Tokenizer
    image_size: int
    max_text_len: int
    flip: bool
    photometric: bool
    seed: int

    def __call__(self, position: int, obj: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, position])
        ex = self.decode_fn(self.source[obj])
        expressions = ex["expressions"]
        text = expressions[int(rng.integers(len(expressions)))]
        image, _ = letterbox(ex["image"], self.image_size)
        mask = letterbox_mask(ex["mask"], self.image_size)
        if self.flip and rng.random() < 0.5:
            image, mask = hflip(image, mask)
            text = swap_left_right(text)
        image = image.astype(np.float32) * np.float32(1 / 255)
        if self.photometric:
            image = photometric(image, rng)
        tokens, token_mask = self.tokenizer.encode(text, self.max_text_len)
        return {"image": image, "mask": mask.astype(np.float32), "tokens": tokens,
                "token_mask": token_mask, "valid": np.bool_(True)}


def train_batches(source: Any, tokenizer: Tokenizer, *, batch_size: int, image_size: int,
                  max_text_len: int, seed: int, decode_fn: DecodeFn = _identity,
                  process_index: int = 0, process_count: int = 1, flip: bool = False,
                  photometric: bool = False, num_epochs: int | None = None) -> grain.MapDataset:
    """MapDataset of this process's training batches (batch_size is per process).

    source: random-access (len, __getitem__) of raw examples; decode_fn turns one into the
    decoded dict of CONTRACTS.md (identity for an in-memory source of decoded dicts).
    num_epochs=None repeats forever. Batches may span an epoch boundary.
    """
    _check_process(process_index, process_count)
    if len(source) == 0:
        raise ValueError("empty training source")
    shuffle_seed, aug_seed = _split_seed(seed)
    example = _TrainExample(source, decode_fn, tokenizer, image_size, max_text_len, flip,
                            photometric, aug_seed)
    ds = grain.MapDataset.range(len(source)).shuffle(seed=shuffle_seed).repeat(num_epochs)
    # map_with_index before slicing, so the RNG is keyed by the global stream position.
    ds = ds.map_with_index(example)
    # Process p's k-th batch is the p-th block of global batch k, so a global batch has the
    # same rows in the same order for any process count (per-row dropout masks included).
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds[: len(ds) // process_count * process_count]  # the same count on every process
    return ds[process_index::process_count]


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
        if parsed.get("fingerprint") != self._fingerprint:
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
                        image_size: int, max_text_len: int, seed: int,
                        decode_fn: DecodeFn = _identity, process_index: int = 0,
                        process_count: int = 1, flip: bool = False, photometric: bool = False,
                        worker_count: int = 0, num_threads: int = 2,
                        num_epochs: int | None = None) -> TrainIterator:
    """Checkpointable training iterator over explicit arguments (see train_batches)."""
    batch_size = per_process_batch_size(global_batch_size, process_count)
    batches = train_batches(source, tokenizer, batch_size=batch_size, image_size=image_size,
                            max_text_len=max_text_len, seed=seed, decode_fn=decode_fn,
                            process_index=process_index, process_count=process_count,
                            flip=flip, photometric=photometric, num_epochs=num_epochs)
    # What fixes the stream at a given batch index; a state from another stream is refused.
    fingerprint = {"num_objects": len(source), "global_batch_size": global_batch_size,
                   "process_index": process_index, "process_count": process_count,
                   "seed": int(seed)}
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
                 pairs: np.ndarray, image_size: int, max_text_len: int, max_orig_size: int,
                 global_batch_size: int, batch_size: int, process_index: int):
        self.source, self.decode_fn, self.tokenizer = source, decode_fn, tokenizer
        self.pairs, self.image_size, self.max_text_len = pairs, image_size, max_text_len
        self.max_orig_size = max_orig_size
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
        if h > self.max_orig_size or w > self.max_orig_size:
            raise ValueError(f"object {obj}: image {h}x{w} exceeds max_orig_size "
                             f"{self.max_orig_size}")
        image, params = letterbox(ex["image"], self.image_size)
        image = image.astype(np.float32) * np.float32(1 / 255)
        mask = letterbox_mask(ex["mask"], self.image_size).astype(np.float32)
        orig = np.zeros((self.max_orig_size, self.max_orig_size), dtype=np.uint8)
        orig[:h, :w] = ex["mask"]
        value = (ex, image, mask, orig, params)
        self._local.entry = (obj, value)
        return value

    def __call__(self, local_index: int) -> dict[str, np.ndarray]:
        b, slot = divmod(local_index, self.batch_size)
        pair_id = b * self.global_batch_size + self.process_index * self.batch_size + slot
        if pair_id >= len(self.pairs):
            return self._padding()
        obj, j = (int(v) for v in self.pairs[pair_id])
        ex, image, mask, orig, params = self._object(obj)
        tokens, token_mask = self.tokenizer.encode(ex["expressions"][j], self.max_text_len)
        h, w = ex["mask"].shape
        return {"image": image, "mask": mask, "tokens": tokens, "token_mask": token_mask,
                "valid": np.bool_(True), "orig_mask": orig,
                "orig_hw": np.asarray([h, w], dtype=np.int32), "letterbox": params.as_array(),
                "pair_id": np.int64(pair_id)}

    def _padding(self) -> dict[str, np.ndarray]:
        # A well-formed dummy (1x1 image, one unk token) so that code that does not look at
        # 'valid' (unletterbox, text pooling) still runs without errors or NaNs.
        s, length = self.image_size, self.max_text_len
        tokens = np.zeros((length,), dtype=np.int32)
        tokens[0] = UNK_ID
        token_mask = np.zeros((length,), dtype=bool)
        token_mask[0] = True
        return {"image": np.zeros((s, s, 3), np.float32), "mask": np.zeros((s, s), np.float32),
                "tokens": tokens, "token_mask": token_mask, "valid": np.bool_(False),
                "orig_mask": np.zeros((self.max_orig_size, self.max_orig_size), np.uint8),
                "orig_hw": np.asarray([1, 1], dtype=np.int32),
                "letterbox": letterbox_params(1, 1, s).as_array(), "pair_id": np.int64(-1)}


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
                     process_count: int = 1, max_orig_size: int = 640, worker_count: int = 0,
                     num_threads: int = 2) -> EvalLoader:
    """Eval loader over explicit arguments. Give `pairs` (from eval_pairs) or `expressions_fn`
    (raw example -> expressions; defaults to decode_fn(raw)['expressions'])."""
    _check_process(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, process_count)
    if pairs is None:
        pairs = eval_pairs(source, expressions_fn or (lambda raw: decode_fn(raw)["expressions"]))
    nb = num_eval_batches(len(pairs), global_batch_size)
    example = _EvalExample(source, decode_fn, tokenizer, pairs, image_size, max_text_len,
                           max_orig_size, global_batch_size, batch_size, process_index)
    batches = grain.MapDataset.range(nb * batch_size).map(example).batch(batch_size)
    return EvalLoader(batches, num_pairs=len(pairs), worker_count=worker_count,
                      num_threads=num_threads)


# --------------------------------------------------------------------------------------------
# Config-level entry points (config schema: docs/CONTRACTS.md)


def create_train_loader(config: Any, tokenizer: Tokenizer, *, process_index: int = 0,
                        process_count: int = 1, seed: int | None = None) -> TrainIterator:
    """Infinite, checkpointable iterator of this process's training batches."""
    from tfds_refcoco import records  # deferred: the builder is only needed for real data

    data = config.data
    source = records.data_source(data.dataset, data.train_split, data.data_dir)
    return make_train_iterator(
        source, tokenizer, global_batch_size=config.batch_size, image_size=data.image_size,
        max_text_len=data.max_text_len, seed=config.seed if seed is None else seed,
        decode_fn=records.decode_example, process_index=process_index,
        process_count=process_count, flip=data.flip, photometric=data.photometric,
        worker_count=data.num_workers)


@functools.lru_cache(maxsize=32)
def _split_pairs(dataset: str, split: str, data_dir: str) -> np.ndarray:
    """Pairs of a prepared split. Cached: validation runs every eval_every steps and the scan
    reads every record of the split."""
    from tfds_refcoco import records

    pairs = eval_pairs(records.data_source(dataset, split, data_dir), records.decode_expressions)
    pairs.flags.writeable = False
    return pairs


def create_eval_loader(config: Any, split: str, tokenizer: Tokenizer, *, process_index: int = 0,
                       process_count: int = 1, max_orig_size: int = 640) -> EvalLoader:
    """Eval loader for one split; .num_batches and .num_pairs give its size."""
    from tfds_refcoco import records

    data = config.data
    source = records.data_source(data.dataset, split, data.data_dir)
    return make_eval_loader(
        source, tokenizer, global_batch_size=config.eval_batch_size, image_size=data.image_size,
        max_text_len=data.max_text_len, decode_fn=records.decode_example,
        pairs=_split_pairs(data.dataset, split, str(data.data_dir)),
        process_index=process_index, process_count=process_count,
        max_orig_size=max_orig_size, worker_count=data.num_workers)


def eval_size(config: Any, split: str) -> tuple[int, int]:
    """(batches per process, number of (object, expression) pairs) for an eval split."""
    n = len(_split_pairs(config.data.dataset, split, str(config.data.data_dir)))
    return num_eval_batches(n, config.eval_batch_size), n
