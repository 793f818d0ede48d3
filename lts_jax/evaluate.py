"""The Evaluator: a jitted forward over the mesh, metrics at the original resolution.

Per batch the device letterboxes the uint8 canvases (``transform.eval_inputs``), runs the model
and upsamples the [S/o, S/o] mask logits
(o = ``segment.out_stride``) bilinearly to S x S (static shapes, so one compilation
per ``Evaluator`` and batch shape). The host then maps every valid example back to its
original H x W (``letterbox.unletterbox``: crop the padding, bilinear resize),
thresholds it (``metrics.binarize``) and counts intersection and union against
``orig_mask[:H, :W]``. The next batch is dispatched before the host work on the
current one so device and host overlap. Sums are combined across hosts exactly
(``metrics.allgather_sums``) and only then turned into ratios.

The same host pass keeps every pair's counts (``metrics.PairCounts``, by pair id):
``Evaluator.evaluate_pairs`` gathers them from all hosts for eval.py's per-pair table and
report. The forward also returns the position prior (sigmoid, S x S), which only
``Evaluator.pair_pictures`` reads: it re-runs a few chosen pairs, padded to an eval batch, for
the report's galleries.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec

from lts_jax import metrics
from lts_jax.letterbox import unletterbox
from lts_jax.mesh import batch_sharding, replicate, shard_batch
from lts_jax.transform import eval_inputs

# Batch fields the forward pass needs on device (the uint8 canvas and its size: the letterbox
# runs in the jitted forward); everything else stays on the host.
MODEL_INPUTS: tuple[str, ...] = ("image", "orig_hw", "tokens", "token_mask")
# Threads for the per-example host work (PIL resize and numpy counting release the GIL).
HOST_THREADS = min(4, os.cpu_count() or 1)

# (variables, batch) -> (mask logits f32[B, S, S], prior probability f32[B, S, S])
ForwardFn = Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, jax.Array]]


def upsample_square(maps: jax.Array, size: int) -> jax.Array:
    """[B, h, w] -> float32 [B, size, size], bilinear with half-pixel centres."""
    maps = maps.astype(jnp.float32)
    return jax.image.resize(maps, (maps.shape[0], size, size), method="bilinear")


def local_rows(array: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in its local batch order."""
    if jax.process_count() == 1:
        return np.asarray(array)
    local = multihost_utils.global_array_to_host_local_array(array, mesh, PartitionSpec("data"))
    return np.asarray(local)


def shuffle_expressions(
    batch: Mapping[str, np.ndarray], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Gives every valid example another valid example's tokens/token_mask.

    The valid rows are put in a random order and each takes the expression of the next
    one in a single cycle, so with two or more valid rows no row keeps its own
    expression (another row may still describe the same object). Padded rows and all
    other fields are untouched. When the batch has 'pair_id', the result also has
    'expression_pair_id': the pair id whose expression each row now carries.
    """
    out = dict(batch)
    valid = np.flatnonzero(np.asarray(batch["valid"], dtype=bool))
    keys = ("tokens", "token_mask") + (("pair_id",) if "pair_id" in batch else ())
    moved = {k: np.array(batch[k], copy=True) for k in keys}
    if valid.size >= 2:
        order = rng.permutation(valid)
        source = np.roll(order, -1)
        for key in keys:
            moved[key][order] = np.asarray(batch[key])[source]
    out["tokens"], out["token_mask"] = moved["tokens"], moved["token_mask"]
    if "pair_id" in batch:
        out["expression_pair_id"] = moved["pair_id"]
    return out


def example_counts(
    logits_s: np.ndarray,
    letterbox_row: np.ndarray,
    orig_hw: np.ndarray,
    orig_mask: np.ndarray,
    threshold: float,
) -> tuple[int, int]:
    """(intersection, union) of one example at its original resolution.

    ``logits_s`` is the S x S upsampled logit map; ``orig_mask`` may be zero padded
    beyond (H, W).
    """
    h, w = int(orig_hw[0]), int(orig_hw[1])
    logits = unletterbox(np.asarray(logits_s, np.float32), letterbox_row, (h, w))
    pred = metrics.binarize(logits, threshold)
    return metrics.intersection_union(pred, np.asarray(orig_mask)[:h, :w] > 0)


def batch_pairs(
    logits_s: np.ndarray,
    batch: Mapping[str, np.ndarray],
    *,
    threshold: float,
    pool: Executor | None = None,
) -> metrics.PairCounts:
    """Per-pair counts of the valid rows of one (host-local) batch.

    Pair ids come from the batch's 'pair_id' (row numbers when it has none); the expression's
    pair id from 'expression_pair_id' (set by ``shuffle_expressions``), else the pair's own.
    """

    def counts(i: int) -> tuple[int, int]:
        return example_counts(
            logits_s[i], batch["letterbox"][i], batch["orig_hw"][i], batch["orig_mask"][i],
            threshold,
        )

    rows = np.flatnonzero(np.asarray(batch["valid"], dtype=bool))
    results = list(pool.map(counts, rows.tolist()) if pool is not None
                   else map(counts, rows.tolist()))
    pair_id = np.asarray(batch["pair_id"])[rows] if "pair_id" in batch else rows
    expression_pair_id = (np.asarray(batch["expression_pair_id"])[rows]
                          if "expression_pair_id" in batch else pair_id)
    return metrics.PairCounts(pair_id, [c[0] for c in results], [c[1] for c in results],
                              expression_pair_id)


def batch_sums(
    logits_s: np.ndarray,
    batch: Mapping[str, np.ndarray],
    *,
    threshold: float,
    empty_union_iou: float,
    pool: Executor | None = None,
) -> metrics.MetricSums:
    """Metric sums over the valid rows of one (host-local) batch."""
    pairs = batch_pairs(logits_s, batch, threshold=threshold, pool=pool)
    return pairs.sums(empty_union_iou=empty_union_iou)


@dataclasses.dataclass(frozen=True)
class PairPicture:
    """One pair as the model saw it, at the image's original size (for the report)."""

    image: np.ndarray  # uint8[H, W, 3]
    gt: np.ndarray  # bool[H, W]
    pred: np.ndarray  # bool[H, W], thresholded as in evaluation
    prior: np.ndarray  # float32[H, W], sigmoid of the position-prior logits


def host_local(tree: Any) -> Any:
    """``tree`` as numpy arrays this process holds whole (replicated jax.Arrays: its copy)."""

    def local(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(local, tree)




class Evaluator:
    """Evaluation of one model on one mesh under one config, as big_vision's evaluators.

    It owns the jitted forward (compiled once per batch shape and reused at every validation)
    and this process's eval loaders, one per split, built on first use (an ``EvalLoader`` is
    re-iterable). ``sums`` returns exact integer/float sums combined over all hosts;
    ``evaluate`` turns them into the metrics. ``tokenizer`` may be None when only
    ``local_sums`` over given batches is used.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        model: nn.Module,
        mesh: Mesh,
        tokenizer: Any = None,
    ) -> None:
        self.config, self.model, self.mesh, self.tokenizer = config, model, mesh, tokenizer
        if tokenizer is not None:  # it reads the data: refuse a mistyped split before compiling
            try:
                split_names(config.data.eval_splits, config)
            except ValueError as err:
                raise ValueError(f"config.data.eval_splits: {err}") from None
        self.image_size = int(config.data.image_size)
        self.threshold = float(config.threshold)
        self.empty_union_iou = float(config.empty_union_iou)
        # ``(variables, batch) -> (mask logits, prior probability)``, f32[B, S, S] each,
        # batch-sharded; compiled once per batch shape.
        self.forward: ForwardFn = jax.jit(self._forward, out_shardings=batch_sharding(mesh))
        self._loaders: dict[tuple[str, int, int], Any] = {}
        self._local_forward: Any = None  # pair_pictures under several processes

    def _forward(
        self, variables: Any, batch: Mapping[str, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        inputs = eval_inputs(batch, self.image_size)
        mask_logits, aux = self.model.apply(
            variables, inputs["image"], inputs["tokens"], inputs["token_mask"], train=False
        )
        prior = jax.nn.sigmoid(aux["prior_logits"].astype(jnp.float32))
        return (upsample_square(mask_logits, self.image_size),
                upsample_square(prior, self.image_size))

    def loader(
        self, split: str, *, process_index: int | None = None, process_count: int | None = None
    ) -> Any:
        """This process's eval batches of ``split`` (another process's, to simulate hosts)."""
        from lts_jax import input_pipeline  # deferred: the pipeline pulls in TFDS/grain

        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        key = (split, index, count)
        if key not in self._loaders:
            self._loaders[key] = input_pipeline.create_eval_loader(
                self.config, split, self.tokenizer, process_index=index, process_count=count
            )
        return self._loaders[key]

    def local_pairs(
        self,
        variables: Any,
        batches: Iterable[Mapping[str, np.ndarray]],
        *,
        shuffle_rng: np.random.Generator | None = None,
    ) -> metrics.PairCounts:
        """This process's per-pair counts over host-local eval batches (not yet combined)."""
        parts = [metrics.PairCounts.empty()]
        pending: tuple[jax.Array, Mapping[str, np.ndarray]] | None = None
        with ThreadPoolExecutor(HOST_THREADS) as pool:
            for batch in batches:
                if shuffle_rng is not None:
                    batch = shuffle_expressions(batch, shuffle_rng)
                # Dispatch is asynchronous: the device computes this batch while the host
                # post-processes the previous one.
                inputs = shard_batch({k: batch[k] for k in MODEL_INPUTS}, self.mesh)
                logits, _ = self.forward(variables, inputs)
                if pending is not None:
                    parts.append(self._host_pairs(*pending, pool))
                pending = (logits, batch)
            if pending is not None:
                parts.append(self._host_pairs(*pending, pool))
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def local_sums(
        self,
        variables: Any,
        batches: Iterable[Mapping[str, np.ndarray]],
        *,
        shuffle_rng: np.random.Generator | None = None,
    ) -> metrics.MetricSums:
        """This process's metric sums over host-local eval batches (not yet combined)."""
        pairs = self.local_pairs(variables, batches, shuffle_rng=shuffle_rng)
        return pairs.sums(empty_union_iou=self.empty_union_iou)

    def _host_pairs(
        self, logits: jax.Array, batch: Mapping[str, np.ndarray], pool: Executor
    ) -> metrics.PairCounts:
        return batch_pairs(local_rows(logits, self.mesh), batch, threshold=self.threshold,
                           pool=pool)

    def _split_local_pairs(self, variables: Any, split: str,
                           shuffle_expressions: bool) -> metrics.PairCounts:
        rng = None
        if shuffle_expressions:  # seeded per split and host: a shuffled run is reproducible
            seed = [int(self.config.seed), jax.process_index(), zlib.crc32(split.encode())]
            rng = np.random.default_rng(seed)
        return self.local_pairs(replicate(variables, self.mesh), self.loader(split),
                                shuffle_rng=rng)

    def sums(
        self, variables: Any, split: str, *, shuffle_expressions: bool = False
    ) -> metrics.MetricSums:
        """Global (all-host) metric sums over every (object, expression) pair of ``split``."""
        local = self._split_local_pairs(variables, split, shuffle_expressions)
        return metrics.allgather_sums(local.sums(empty_union_iou=self.empty_union_iou))

    def evaluate(
        self, variables: Any, split: str, *, shuffle_expressions: bool = False
    ) -> dict[str, float]:
        """Metrics of one split: 'mIoU', 'oIoU', 'prec@0.5'..'prec@0.9' in [0, 1] and 'pairs'."""
        sums = self.sums(variables, split, shuffle_expressions=shuffle_expressions)
        return metrics.finalize(sums, empty_union_iou=self.empty_union_iou)

    def evaluate_pairs(
        self, variables: Any, split: str, *, shuffle_expressions: bool = False
    ) -> tuple[dict[str, float], metrics.PairCounts]:
        """``evaluate``'s metrics and every pair's counts (all hosts, in pair-id order; the
        same on every process). The metrics are computed from those counts."""
        local = self._split_local_pairs(variables, split, shuffle_expressions)
        pairs = metrics.allgather_pairs(local)
        sums = pairs.sums(empty_union_iou=self.empty_union_iou)
        return metrics.finalize(sums, empty_union_iou=self.empty_union_iou), pairs

    def pair_pictures(
        self,
        variables: Any,
        split: str,
        pair_ids: Sequence[int],
        expression_pair_ids: Sequence[int] | None = None,
    ) -> list[PairPicture]:
        """Pictures of chosen pairs of ``split``: each pair's image and ground truth, with the
        prediction and the prior for the expression of ``expression_pair_ids[i]`` (default:
        its own), through the same forward as evaluation. It needs no other process: on one
        process it reuses the compiled forward (batches padded to ``eval_batch_size``); under
        several, this process runs a local copy on its first device."""
        from lts_jax import input_pipeline  # deferred: the pipeline pulls in TFDS/grain
        from tfds_refcoco import records

        pair_ids = [int(p) for p in pair_ids]
        expression_pair_ids = (pair_ids if expression_pair_ids is None
                               else [int(p) for p in expression_pair_ids])
        if len(expression_pair_ids) != len(pair_ids):
            raise ValueError("pair_ids and expression_pair_ids differ in length")
        if not pair_ids:
            return []
        data = self.config.data
        source = records.data_source(records.configured_dataset(data), split, data.data_dir)
        order = split_pair_index(records.configured_dataset(data), split, str(data.data_dir))

        def loader(ids: list[int]) -> Any:
            return input_pipeline.make_eval_loader(
                source, self.tokenizer, global_batch_size=int(self.config.eval_batch_size),
                image_size=self.image_size, max_text_len=int(data.max_text_len),
                decode_fn=records.decode_example, pairs=order[np.asarray(ids, np.int64)],
                canvas_size=int(data.canvas_size), num_threads=1)

        if jax.process_count() == 1:
            forward, variables = self.forward, replicate(variables, self.mesh)
        else:
            if self._local_forward is None:
                self._local_forward = (jax.jit(self._forward), host_local(variables))
            forward, variables = self._local_forward
        out = []
        for batch, text in zip(loader(pair_ids), loader(expression_pair_ids), strict=True):
            batch = dict(batch, tokens=text["tokens"], token_mask=text["token_mask"])
            inputs = {k: batch[k] for k in MODEL_INPUTS}
            if jax.process_count() == 1:
                inputs = shard_batch(inputs, self.mesh)
            logits_s, prior_s = (np.asarray(x) for x in forward(variables, inputs))
            for i in np.flatnonzero(batch["valid"]):
                h, w = (int(v) for v in batch["orig_hw"][i])
                logits = unletterbox(logits_s[i], batch["letterbox"][i], (h, w))
                prior = unletterbox(prior_s[i], batch["letterbox"][i], (h, w))
                out.append(PairPicture(
                    image=np.array(batch["image"][i, :h, :w]),
                    gt=batch["orig_mask"][i, :h, :w] > 0,
                    pred=metrics.binarize(logits, self.threshold),
                    prior=np.clip(prior, 0.0, 1.0).astype(np.float32)))
        return out


def split_names(splits: str, config: ml_collections.ConfigDict | None = None) -> list[str]:
    """'validation, testA,,testB' -> ['validation', 'testA', 'testB'].

    With ``config``, each must be a split of the prepared config.data dataset: a typo is a
    one-line ValueError naming it and the available splits, before anything compiles.
    """
    names = [s.strip() for s in str(splits).split(",") if s.strip()]
    if config is not None:
        from tfds_refcoco import records  # deferred: the builder pulls in TFDS

        data = config.data
        records.check_splits(records.configured_dataset(data), names, data.data_dir)
    return names


@dataclasses.dataclass(frozen=True)
class PairInfo:
    """Who a pair is: its ids and expression (``source`` only for refcocox_combined)."""

    pair_id: int
    ref_id: int
    ann_id: int
    image_id: int
    sent_id: int
    expression: str
    source: str = ""


@functools.lru_cache(maxsize=8)
def split_pair_index(dataset: str, split: str, data_dir: str) -> np.ndarray:
    """int64[N, 2] (object index, expression index) of every pair, in evaluation order."""
    from lts_jax import input_pipeline
    from tfds_refcoco import records

    return input_pipeline.eval_pairs(records.data_source(dataset, split, data_dir),
                                     records.decode_expressions)


def pair_infos(config: ml_collections.ConfigDict, split: str) -> list[PairInfo]:
    """``PairInfo`` of every pair of ``split`` in evaluation order (index = pair id): objects
    in source order, each object's expressions in order. Reads the records (no image
    decode)."""
    from tfds_refcoco import records

    data = config.data
    source = records.data_source(records.configured_dataset(data), split, data.data_dir)
    out: list[PairInfo] = []
    for obj in range(len(source)):
        raw = source[obj]
        origin = raw.get("source", b"")
        origin = origin.decode("utf-8") if isinstance(origin, bytes) else str(origin)
        sent_ids = np.asarray(raw["sent_ids"]).reshape(-1)
        for j, expression in enumerate(records.decode_expressions(raw)):
            out.append(PairInfo(len(out), int(raw["ref_id"]), int(raw["ann_id"]),
                                int(raw["image_id"]), int(sent_ids[j]), expression, origin))
    return out
