"""RefCOCOg (Google splits, no public test split), paper setting: 416x416, DarkNet-53.

Needs the raw refer downloads and COCO train2014 under config.data.manual_dir (see README)::

    python train.py --config configs/refcocog_google.py --workdir runs/refcocog_google \
        --config.init.visual_weights=data/weights/darknet53.conv.74

The optional argument picks the model compute dtype: `configs/refcocog_google.py:cpu` (float32),
`:gpu` / `:tpu` (bfloat16); without it ('auto') the dtype follows jax.default_backend().
Any field can be overridden, e.g. `--config.batch_size=16`.
"""

from __future__ import annotations

import ml_collections

from configs.base import paper_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return paper_config("refcocog_google", "validation", arg)
