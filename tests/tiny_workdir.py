"""A tiny training workdir for end-to-end evaluation/prediction tests, built in seconds.

Training even the tiny config for two steps compiles the train step (about a minute on a
shared 2-core CPU), so instead this writes what training would leave behind: prepared
RefShapes data with its tokenizer, workdir/config.json (resolved config) and one Orbax
checkpoint through ``TrainCheckpoints.save`` holding random weights of the right shapes.
Built once per test session under pytest's base temp directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

NUM_IMAGES = 8  # RefShapes images over all splits; validation then has 9 pairs
EVAL_SPLIT = "validation"


def random_variables(model: Any, image_size: int, max_text_len: int, seed: int = 0) -> Any:
    """{'params', 'batch_stats'} of ``model`` filled with random values.

    ``jax.eval_shape`` gives the shapes without compiling ``model.init`` (slow on CPU).
    """
    from lts_jax.models.model import init_variables

    shapes = jax.eval_shape(
        lambda k: init_variables(model, k, image_size, max_text_len), jax.random.key(0)
    )
    rng = np.random.default_rng(seed)

    def fill(path: Any, leaf: Any) -> np.ndarray:
        name = jax.tree_util.keystr(path)
        if "batch_stats" in name:
            value = 1.0 if "var" in name else 0.0
            return np.full(leaf.shape, value, leaf.dtype)
        return (0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _build(root: Path) -> Path:
    from configs.refshapes import get_config
    from lts_jax.checkpoint import TrainCheckpoints
    from lts_jax.models.model import create_model
    from lts_jax.tokenizer import load_tokenizer
    from lts_jax.train_setup import resolve_config
    from lts_jax.workdir_config import write_config
    from tfds_refcoco import records

    config = get_config("tiny")
    config.unlock()
    config.data.data_dir = str(root / "data")
    config.data.refshapes_num_images = NUM_IMAGES
    config.data.eval_splits = EVAL_SPLIT
    records.prepare("refshapes", config.data.data_dir, None, refshapes_num_images=NUM_IMAGES)
    tokenizer = load_tokenizer(config)
    config = resolve_config(config, tokenizer.vocab_size)
    workdir = root / "run"
    write_config(str(workdir), config)
    model = create_model(config.model)
    variables = random_variables(model, config.data.image_size, config.data.max_text_len)
    state = {**variables, "opt_state": {"count": np.zeros((), np.int32)}, "step": np.int32(1)}
    store = TrainCheckpoints(str(workdir), keep=1)
    try:
        store.save(1, state, metrics={"oIoU": 0.0, "mIoU": 0.0})
    finally:
        store.close()
    (root / "done").write_text("ok")
    return workdir


def get_tiny_workdir(tmp_path_factory: Any) -> Path:
    """The session's tiny workdir (built on first use)."""
    root = tmp_path_factory.getbasetemp() / "lts_tiny_workdir"
    if (root / "done").exists():
        return root / "run"
    root.mkdir(exist_ok=True)
    return _build(root)
