"""Parameter counts and forward FLOPs per LTS stage, without running the model.

Shapes come from ``jax.eval_shape`` and FLOPs from XLA's cost analysis of the
lowered (uncompiled) inference forward pass, so the full 416x416 model is
summarised on a CPU in seconds. FLOPs are XLA's count: a multiply-add is 2
FLOPs (papers quoting "FLOPs" for CNNs often mean multiply-adds, half of this).

    python -m lts_jax.summary --config configs/refshapes.py
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lts_jax.models.model import DTYPES, LTS, STAGES, create_model, init_variables


def _count(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def _flops(model: LTS, variables: Any, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """(forward FLOPs, abstract outputs) of ``fn(module, *args)`` applied to the model."""

    def run(v: Any, *a: Any) -> Any:
        return model.apply(v, *a, method=fn)

    lowered = jax.jit(run).lower(variables, *args)
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX returned one dict per computation
        cost = cost[0] if cost else None
    flops = float(cost.get("flops", 0.0)) if cost else float("nan")
    return flops, jax.eval_shape(run, variables, *args)


def stage_costs(
    model_cfg: ml_collections.ConfigDict,
    image_size: int,
    max_text_len: int,
    batch_size: int = 1,
) -> dict[str, dict[str, float]]:
    """{stage: {'params': count, 'flops': forward FLOPs}} for visual, text, fusion, locate,
    segment and 'total' (the whole forward pass, train=False, for ``batch_size`` examples)."""
    model = create_model(model_cfg, text_unroll=max_text_len)  # unrolled: XLA counts each step
    variables = jax.eval_shape(
        lambda: init_variables(model, jax.random.key(0), image_size, max_text_len, batch_size)
    )
    sds = jax.ShapeDtypeStruct
    image = sds((batch_size, image_size, image_size, 3), jnp.float32)
    tokens = sds((batch_size, max_text_len), jnp.int32)
    token_mask = sds((batch_size, max_text_len), jnp.bool_)

    out: dict[str, dict[str, float]] = {}
    flops_v, (c1, c2, c3, c4, c5) = _flops(
        model, variables, lambda m, x: m.visual.levels(x.astype(m.dtype), train=False), image
    )
    flops_t, (words, sentence) = _flops(
        model, variables, lambda m, t, k: m.text(t, k), tokens, token_mask
    )
    flops_f, fused = _flops(
        model, variables, lambda m, *a: m.fusion(*a, train=False), c3, c4, c5, sentence
    )
    flops_l, (prior, _) = _flops(
        model, variables, lambda m, *a: m.locate(*a, train=False),
        fused, words, token_mask, sentence,
    )
    flops_s, _ = _flops(
        model, variables,
        lambda m, f, p, s1, s2: m.segment(f, p, train=False, skips={2: s1, 4: s2}),
        fused, prior, c1, c2,
    )
    flops_total, _ = _flops(
        model, variables, lambda m, *a: m(*a, train=False), image, tokens, token_mask
    )
    for stage, flops in zip(STAGES, (flops_v, flops_t, flops_f, flops_l, flops_s), strict=True):
        out[stage] = {"params": float(_count(variables["params"][stage])), "flops": flops}
    out["total"] = {"params": float(_count(variables["params"])), "flops": flops_total}
    return out


def format_costs(costs: dict[str, dict[str, float]], title: str = "") -> str:
    """A Markdown table of ``stage_costs`` in M params and GFLOPs."""
    lines = [title] if title else []
    lines += ["| stage | params (M) | GFLOPs |", "|---|---:|---:|"]
    for stage, c in costs.items():
        lines.append(f"| {stage} | {c['params'] / 1e6:.3f} | {c['flops'] / 1e9:.3f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    cfg = _CONFIG.value
    model_cfg = ml_collections.ConfigDict(cfg.model.to_dict())  # an unlocked copy
    if model_cfg.vocab_size < 1:
        model_cfg.vocab_size = cfg.data.vocab_size
    if model_cfg.dtype not in DTYPES:  # e.g. 'auto', resolved per device by training
        model_cfg.dtype = "float32"
    s, length = cfg.data.image_size, cfg.data.max_text_len
    costs = stage_costs(model_cfg, s, length, _BATCH.value)
    title = (f"LTS '{model_cfg.variant}' at {s}x{s}, L={length}, vocab={model_cfg.vocab_size}, "
             f"batch {_BATCH.value}, dtype {model_cfg.dtype} (FLOPs: multiply-add = 2)")
    print(format_costs(costs, title))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "config file (get_config)")
    _BATCH = flags.DEFINE_integer("batch_size", 1, "examples per forward pass")
    flags.mark_flags_as_required(["config"])
    app.run(main)
