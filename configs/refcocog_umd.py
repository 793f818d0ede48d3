"""RefCOCOg (UMD splits) in the paper setting: 416x416, DarkNet-53, bfloat16 on GPU/TPU.

Needs the raw refer downloads and COCO train2014 under config.data.manual_dir (see README)::

    python train.py --config configs/refcocog_umd.py --workdir runs/refcocog_umd \
        --config.init.visual_weights=data/weights/darknet53.conv.74

The optional argument picks the model compute dtype: `configs/refcocog_umd.py:cpu` (float32),
`:gpu` / `:tpu` (bfloat16); without it ('auto') the dtype follows jax.default_backend().
Any field can be overridden, e.g. `--config.batch_size=16`.
"""

from __future__ import annotations

import ml_collections

from configs.base import paper_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return paper_config("refcocog_umd", "validation,test", arg)
