"""RefCOCO + RefCOCO+ + RefCOCOg (refcocox_combined) in the paper setting: one model for all eight.

Trains on the combined train split: refcoco unc + refcoco+ unc + refcocog umd train, minus
every object whose image is in any of the eight evaluation splits (see README "Combined
training set (refcocox_combined)" and tfds_refcoco/combined.py). Needs the three refer
downloads and COCO train2014 under config.data.manual_dir (see README)::

    python train.py --config configs/refcocox_combined.py --workdir runs/refcocox_combined \
        --config.init.visual_weights=data/weights/darknet53.conv.74

Evaluation: the prepared dataset also holds each dataset's own evaluation splits, unchanged,
as refcoco_{validation,testA,testB}, refcocoplus_{validation,testA,testB} and
refcocog_{validation,test}; they are the eval_splits here, so the end of training (and
`python eval.py --workdir runs/refcocox_combined`) reports all eight with this config.
Evaluate through this config, not through each dataset's own config file: the tokenizer is
stored per dataset config, and the one this model was trained with is refcocox_combined's
(trained on the combined train split); configs/refcoco.py etc. would tokenise with another.
The periodic validation during training and the choice of the best checkpoint use the first
split, refcoco_validation.

The schedule is the per-dataset paper setting unchanged (same steps, so about a third of the
epochs of a single-dataset run over roughly three times the objects); raise
`--config.num_train_steps` to train for as many epochs.

The optional argument picks the model compute dtype: `configs/refcocox_combined.py:cpu`
(float32), `:gpu` / `:tpu` (bfloat16); without it ('auto') the dtype follows
jax.default_backend(). Any field can be overridden, e.g. `--config.batch_size=16`.
"""

from __future__ import annotations

import ml_collections

from configs.base import paper_config

# tfds_refcoco.combined.eval_split_names(), spelled out so loading a config imports no builder.
EVAL_SPLITS = (
    "refcoco_validation,refcoco_testA,refcoco_testB,"
    "refcocoplus_validation,refcocoplus_testA,refcocoplus_testB,"
    "refcocog_validation,refcocog_test"
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return paper_config("refcocox_combined", EVAL_SPLITS, arg)
