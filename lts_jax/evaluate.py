"""Evaluation of one split: jitted forward over the mesh, metrics at the original resolution.

Per batch the device letterboxes the uint8 canvases (``transform.eval_inputs``), runs the model
and upsamples the [S/o, S/o] mask logits
(o = ``segment.out_stride``) bilinearly to S x S (static shapes, so one compilation
per model/mesh/batch shape). The host then maps every valid example back to its
original H x W (``letterbox.unletterbox``: crop the padding, bilinear resize),
thresholds it (``metrics.binarize``) and counts intersection and union against
``orig_mask[:H, :W]``. The next batch is dispatched before the host work on the
current one so device and host overlap. Sums are combined across hosts exactly
(``metrics.allgather_sums``) and only then turned into ratios.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable, Mapping
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

ForwardFn = Callable[[Any, Mapping[str, jax.Array]], jax.Array]


def upsample_square(maps: jax.Array, size: int) -> jax.Array:
    """[B, h, w] -> float32 [B, size, size], bilinear with half-pixel centres."""
    maps = maps.astype(jnp.float32)
    return jax.image.resize(maps, (maps.shape[0], size, size), method="bilinear")


# Jitted forwards keyed by object identity: linen modules holding a ConfigDict are not
# hashable, and a fresh jax.jit per call would recompile on every validation run.
_FORWARD_CACHE: dict[tuple[int, int, int], tuple[nn.Module, Mesh, ForwardFn]] = {}
_FORWARD_CACHE_SIZE = 4


def eval_forward(model: nn.Module, mesh: Mesh, image_size: int) -> ForwardFn:
    """Cached jitted ``(variables, inputs) -> mask logits f32[B, S, S]``, batch-sharded."""
    key = (id(model), id(mesh), int(image_size))
    hit = _FORWARD_CACHE.get(key)
    if hit is not None and hit[0] is model and hit[1] is mesh:
        return hit[2]

    def forward(variables: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        inputs = eval_inputs(batch, image_size)
        mask_logits, _ = model.apply(
            variables, inputs["image"], inputs["tokens"], inputs["token_mask"], train=False
        )
        return upsample_square(mask_logits, image_size)

    fn = jax.jit(forward, out_shardings=batch_sharding(mesh))
    if len(_FORWARD_CACHE) >= _FORWARD_CACHE_SIZE:
        _FORWARD_CACHE.pop(next(iter(_FORWARD_CACHE)))
    _FORWARD_CACHE[key] = (model, mesh, fn)
    return fn


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
    other fields are untouched.
    """
    out = dict(batch)
    valid = np.flatnonzero(np.asarray(batch["valid"], dtype=bool))
    if valid.size < 2:
        return out
    order = rng.permutation(valid)
    source = np.roll(order, -1)
    for key in ("tokens", "token_mask"):
        moved = np.array(batch[key], copy=True)
        moved[order] = np.asarray(batch[key])[source]
        out[key] = moved
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


def batch_sums(
    logits_s: np.ndarray,
    batch: Mapping[str, np.ndarray],
    *,
    threshold: float,
    empty_union_iou: float,
    pool: Executor | None = None,
) -> metrics.MetricSums:
    """Metric sums over the valid rows of one (host-local) batch."""

    def counts(i: int) -> tuple[int, int]:
        return example_counts(
            logits_s[i], batch["letterbox"][i], batch["orig_hw"][i], batch["orig_mask"][i],
            threshold,
        )

    rows = np.flatnonzero(np.asarray(batch["valid"], dtype=bool)).tolist()
    results = list(pool.map(counts, rows) if pool is not None else map(counts, rows))
    return metrics.pair_sums(
        [c[0] for c in results], [c[1] for c in results], empty_union_iou=empty_union_iou
    )


def evaluate_batches(
    batches: Iterable[Mapping[str, np.ndarray]],
    forward: ForwardFn,
    variables: Any,
    mesh: Mesh,
    *,
    threshold: float,
    empty_union_iou: float,
    shuffle_rng: np.random.Generator | None = None,
) -> metrics.MetricSums:
    """This process's metric sums over host-local eval batches (not yet combined)."""
    total = metrics.MetricSums()
    pending: tuple[jax.Array, Mapping[str, np.ndarray]] | None = None

    def finish(logits: jax.Array, batch: Mapping[str, np.ndarray]) -> metrics.MetricSums:
        return batch_sums(local_rows(logits, mesh), batch, threshold=threshold,
                          empty_union_iou=empty_union_iou, pool=pool)

    with ThreadPoolExecutor(HOST_THREADS) as pool:
        for batch in batches:
            if shuffle_rng is not None:
                batch = shuffle_expressions(batch, shuffle_rng)
            # Dispatch is asynchronous: the device computes this batch while the host
            # post-processes the previous one.
            logits = forward(variables, shard_batch({k: batch[k] for k in MODEL_INPUTS}, mesh))
            if pending is not None:
                total = total + finish(*pending)
            pending = (logits, batch)
        if pending is not None:
            total = total + finish(*pending)
    return total


def evaluate_split_sums(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    variables: Any,
    split: str,
    tokenizer: Any,
    mesh: Mesh,
    *,
    shuffle_expressions: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
) -> metrics.MetricSums:
    """Global (all-host) metric sums over every (object, expression) pair of ``split``."""
    from lts_jax import input_pipeline  # deferred: the pipeline pulls in TFDS/grain

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    loader = input_pipeline.create_eval_loader(
        config, split, tokenizer, process_index=process_index, process_count=process_count
    )
    # Seeded per split and host so a shuffled evaluation is reproducible.
    rng = (
        np.random.default_rng([int(config.seed), process_index, zlib.crc32(split.encode())])
        if shuffle_expressions
        else None
    )
    forward = eval_forward(model, mesh, int(config.data.image_size))
    local = evaluate_batches(
        loader,
        forward,
        replicate(variables, mesh),
        mesh,
        threshold=float(config.threshold),
        empty_union_iou=float(config.empty_union_iou),
        shuffle_rng=rng,
    )
    return metrics.allgather_sums(local)


def evaluate_split(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    variables: Any,
    split: str,
    tokenizer: Any,
    mesh: Mesh,
    *,
    shuffle_expressions: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
) -> dict[str, float]:
    """Metrics of one split: 'mIoU', 'oIoU', 'prec@0.5'..'prec@0.9' in [0, 1] and 'pairs'."""
    sums = evaluate_split_sums(
        config, model, variables, split, tokenizer, mesh,
        shuffle_expressions=shuffle_expressions,
        process_index=process_index, process_count=process_count,
    )
    return metrics.finalize(sums, empty_union_iou=float(config.empty_union_iou))

