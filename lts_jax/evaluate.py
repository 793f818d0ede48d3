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
        self.image_size = int(config.data.image_size)
        self.threshold = float(config.threshold)
        self.empty_union_iou = float(config.empty_union_iou)
        # ``(variables, batch) -> mask logits f32[B, S, S]``, batch-sharded.
        self.forward: ForwardFn = jax.jit(self._forward, out_shardings=batch_sharding(mesh))
        self._loaders: dict[tuple[str, int, int], Any] = {}

    def _forward(self, variables: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        inputs = eval_inputs(batch, self.image_size)
        mask_logits, _ = self.model.apply(
            variables, inputs["image"], inputs["tokens"], inputs["token_mask"], train=False
        )
        return upsample_square(mask_logits, self.image_size)

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

    def local_sums(
        self,
        variables: Any,
        batches: Iterable[Mapping[str, np.ndarray]],
        *,
        shuffle_rng: np.random.Generator | None = None,
    ) -> metrics.MetricSums:
        """This process's metric sums over host-local eval batches (not yet combined)."""
        total = metrics.MetricSums()
        pending: tuple[jax.Array, Mapping[str, np.ndarray]] | None = None
        with ThreadPoolExecutor(HOST_THREADS) as pool:
            for batch in batches:
                if shuffle_rng is not None:
                    batch = shuffle_expressions(batch, shuffle_rng)
                # Dispatch is asynchronous: the device computes this batch while the host
                # post-processes the previous one.
                inputs = shard_batch({k: batch[k] for k in MODEL_INPUTS}, self.mesh)
                logits = self.forward(variables, inputs)
                if pending is not None:
                    total = total + self._host_sums(*pending, pool)
                pending = (logits, batch)
            if pending is not None:
                total = total + self._host_sums(*pending, pool)
        return total

    def _host_sums(
        self, logits: jax.Array, batch: Mapping[str, np.ndarray], pool: Executor
    ) -> metrics.MetricSums:
        return batch_sums(local_rows(logits, self.mesh), batch, threshold=self.threshold,
                          empty_union_iou=self.empty_union_iou, pool=pool)

    def sums(
        self, variables: Any, split: str, *, shuffle_expressions: bool = False
    ) -> metrics.MetricSums:
        """Global (all-host) metric sums over every (object, expression) pair of ``split``."""
        rng = None
        if shuffle_expressions:  # seeded per split and host: a shuffled run is reproducible
            seed = [int(self.config.seed), jax.process_index(), zlib.crc32(split.encode())]
            rng = np.random.default_rng(seed)
        local = self.local_sums(replicate(variables, self.mesh), self.loader(split),
                                shuffle_rng=rng)
        return metrics.allgather_sums(local)

    def evaluate(
        self, variables: Any, split: str, *, shuffle_expressions: bool = False
    ) -> dict[str, float]:
        """Metrics of one split: 'mIoU', 'oIoU', 'prec@0.5'..'prec@0.9' in [0, 1] and 'pairs'."""
        sums = self.sums(variables, split, shuffle_expressions=shuffle_expressions)
        return metrics.finalize(sums, empty_union_iou=self.empty_union_iou)


def split_names(splits: str) -> list[str]:
    """'validation, testA,,testB' -> ['validation', 'testA', 'testB']."""
    return [s.strip() for s in str(splits).split(",") if s.strip()]
