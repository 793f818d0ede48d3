"""Defaults shared by every config file in configs/ (not a config file itself).

Each dataset file calls ``base_config`` and changes what differs. Field names follow
docs/CONTRACTS.md. Fields whose value is ``'auto'`` are resolved at run time by
``lts_jax.train_setup.resolve_config`` (the model compute dtype: bfloat16 on GPU/TPU, float32 on
CPU) and the resolved config is what lands in ``workdir/config.json``.
"""

from __future__ import annotations

import os

import ml_collections

from lts_jax.models.model import model_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prepared datasets and their tokenizers; raw downloads go under data/refer (see README).
DEFAULT_DATA_DIR = os.path.join(REPO_ROOT, "data", "tfds")
DEFAULT_MANUAL_DIR = os.path.join(REPO_ROOT, "data", "refer")

# Accepted by get_config(arg) of the dataset files: which compute dtype the model uses.
DTYPE_ARGS = {"": "auto", "auto": "auto", "cpu": "float32", "gpu": "bfloat16", "tpu": "bfloat16"}


def dtype_from_arg(arg: str | None) -> str:
    """Maps a config-file argument ('', 'auto', 'cpu', 'gpu', 'tpu') to a dtype name."""
    key = (arg or "").strip().lower()
    if key not in DTYPE_ARGS:
        raise ValueError(f"Unknown config argument {arg!r}; expected one of {sorted(DTYPE_ARGS)}")
    return DTYPE_ARGS[key]


def base_config(model_variant: str) -> ml_collections.ConfigDict:
    """Every field the code reads, with the paper-setting defaults."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "refcoco_unc"
    config.data.data_dir = DEFAULT_DATA_DIR
    config.data.manual_dir = DEFAULT_MANUAL_DIR
    config.data.image_size = 416
    # Decoded images travel to the device on a fixed canvas (static shapes); the letterbox to
    # image_size happens in the jitted step. COCO's longest side is 640.
    config.data.canvas_size = 640
    config.data.max_text_len = 20
    config.data.vocab_size = 8000
    config.data.train_split = "train"
    config.data.eval_splits = "validation"
    config.data.num_workers = 0
    # Keep each training example decoded in memory after its first use (the whole train split
    # ends up there, ~36 kB per RefShapes object): for small datasets only. Same batches.
    config.data.cache_decoded = False
    # Training pairs per image in a batch, sharing one backbone pass (1 = each pair its own
    # image). batch_size counts pairs and must be a multiple of it.
    config.data.objects_per_image = 1
    config.data.flip = False
    config.data.photometric = False
    # RefShapes only: images generated (0 = the generator's default size).
    config.data.refshapes_num_images = 0
    # Progressive resizing: the first low_res_steps train steps letterbox to low_res_image_size
    # (same host batches; only the jitted step's resize differs), the rest and every evaluation
    # to image_size. 0 = off. The model is fully convolutional, so the parameters are the same.
    config.data.low_res_image_size = 0
    config.data.low_res_steps = 0

    config.model = model_config(model_variant)
    # Set from the tokenizer by training; kept here so the field exists in a locked config.
    if "vocab_size" not in config.model:
        config.model.vocab_size = 0
    if "dtype" not in config.model:
        config.model.dtype = "auto"

    # Optional pretrained DarkNet-53 weights for the 'visual' subtree ('' = random init).
    config.init = ml_collections.ConfigDict()
    config.init.visual_weights = ""

    config.loss = ml_collections.ConfigDict()
    config.loss.prior_weight = 1.0
    config.loss.dice_weight = 0.0

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adamw"  # 'adam' (L2 added to the gradient) | 'adamw' (decoupled)
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.0  # applied to kernels/embeddings only (ndim > 1)
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.warmup_steps = 0
    # Steps the learning-rate schedule spans (0 = num_train_steps; resolved and saved in
    # config.json). Past it the rate stays at its final value: extend a run by raising
    # num_train_steps with schedule_steps kept at the workdir's value (README, "Failure and
    # resume semantics").
    config.optim.schedule_steps = 0
    config.optim.schedule = "step"  # 'constant' | 'step' | 'cosine'
    # 'step': multiply the rate by decay_factor at each of these fractions of schedule_steps.
    config.optim.decay_at = (0.6, 0.85)
    config.optim.decay_factor = 0.1
    # 'cosine': the rate falls to learning_rate * end_factor at schedule_steps.
    config.optim.end_factor = 0.0
    config.optim.clip_norm = 0.0  # global gradient-norm clip; 0 = off
    config.optim.backbone_lr_mult = 0.1  # learning-rate multiplier for the 'visual' subtree
    # > 0: keep an exponential moving average of the params (decay warmed up over the first
    # steps) and evaluate, save for inference and export that instead. 0 = off.
    config.optim.ema_decay = 0.0

    config.batch_size = 32  # global, over all processes and devices
    config.eval_batch_size = 32  # global
    config.num_train_steps = 100_000
    config.log_every = 100
    config.eval_every = 5000
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3  # the last K; the best by validation oIoU is kept on top
    config.threshold = 0.5
    config.empty_union_iou = 0.0
    return config


def paper_config(dataset: str, eval_splits: str, arg: str | None) -> ml_collections.ConfigDict:
    """The paper setting on a RefCOCO-family dataset: 416x416, DarkNet-53 ('full').

    Optimiser details the paper does not pin down follow the MCN family: Adam, 5e-4 with a
    0.1 multiplier on the backbone, 1k warmup steps, x0.1 at 60% and 85% of training.
    """
    config = base_config("full")
    # Only what differs from base_config; its defaults already are the paper setting
    # (416x416, batch 32, step schedule, the 0.1 backbone multiplier, ...).
    config.model.dtype = dtype_from_arg(arg)
    config.data.dataset = dataset
    config.data.eval_splits = eval_splits
    config.data.num_workers = 8
    config.data.flip = True
    config.data.photometric = True
    config.optim.name = "adam"
    config.optim.learning_rate = 5e-4
    config.optim.warmup_steps = 1000
    config.optim.clip_norm = 1.0
    config.eval_batch_size = 64
    config.num_train_steps = 50_000
    config.threshold = 0.35
    return config
