"""LTS (Locate then Segment) model: configs, construction and the top-level module.

``LTS(image, tokens, token_mask, train=...)`` -> ``(mask_logits, aux)`` with
mask logits f32[B, S/o, S/o] (o = ``segment.out_stride``, 4 in the paper) and
aux {'prior_logits', 'relevance'}: f32[B, S/p, S/p] (p = ``locate.stride``,
relevance in [0, 1]). Parameters are float32 whatever the compute dtype;
outputs are cast to float32. ``image`` may hold a whole fraction of the batch, B/K images for
B expressions, K per image in order: the backbone then runs once per image and its levels
are repeated K times (config.data.objects_per_image).

Top-level parameter subtrees are 'visual', 'text', 'fusion', 'locate',
'segment' (the optimiser gives 'visual' its own learning-rate multiplier);
BatchNorm statistics live in the 'batch_stats' collection under the same names.
Dropout (transformer only) draws from the 'dropout' rng when ``train=True``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lts_jax.models.darknet import ConvBN, DarkNet, stage_blocks_for_depth
from lts_jax.models.fusion import Fusion
from lts_jax.models.locate import Locate
from lts_jax.models.segment import Segment
from lts_jax.models.text_encoder import TextEncoder

VARIANTS = ("tiny", "small", "full")
BN_MODES = ("train", "frozen")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
STAGES = ("visual", "text", "fusion", "locate", "segment")


def model_config(variant: str = "full") -> ml_collections.ConfigDict:
    """Model hyper-parameters. 'full' = paper setting; 'small' = CPU RefShapes; 'tiny' = tests.

    ``vocab_size`` is 0 here and must be set by the caller (the tokenizer's size).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; expected one of {VARIANTS}")
    cfg = ml_collections.ConfigDict()
    cfg.variant = variant
    cfg.vocab_size = 0
    cfg.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16'
    cfg.bn_mode = "train"  # backbone BatchNorm: 'train' (batch stats) | 'frozen' (stored stats)
    cfg.bn_momentum = 0.9  # EMA decay of BN statistics (PyTorch momentum 0.1)
    cfg.bn_epsilon = 1e-5

    cfg.visual = ml_collections.ConfigDict()
    cfg.visual.width_mult = 1.0
    cfg.visual.depth_mult = 1.0  # blocks per stage: ceil(depth_mult * (1, 2, 8, 8, 4))

    cfg.text = ml_collections.ConfigDict()
    cfg.text.embed_dim = 300
    cfg.text.hidden_dim = 256  # per direction; word/sentence features are 2x this

    cfg.fusion = ml_collections.ConfigDict()
    cfg.fusion.dim = 256

    cfg.locate = ml_collections.ConfigDict()
    cfg.locate.stride = 16
    cfg.locate.width = 256
    cfg.locate.num_layers = 2
    cfg.locate.num_heads = 8
    cfg.locate.mlp_dim = 2048
    cfg.locate.dropout = 0.1

    cfg.segment = ml_collections.ConfigDict()
    cfg.segment.dim = 256
    cfg.segment.num_convs = 2
    cfg.segment.out_stride = 4  # mask logits at S / out_stride
    cfg.segment.skip_dim = 0  # > 0: backbone C2 (and C1) skips of this width; 0 = paper

    if variant == "small":
        cfg.visual.width_mult = 0.25
        cfg.visual.depth_mult = 0.25  # 1, 1, 2, 2, 1 blocks
        cfg.text.embed_dim = 64
        cfg.text.hidden_dim = 32
        cfg.fusion.dim = 64
        cfg.locate.width = 64
        cfg.locate.num_layers = 1
        cfg.locate.num_heads = 4
        cfg.locate.mlp_dim = 128
        cfg.segment.dim = 64
    elif variant == "tiny":
        cfg.visual.width_mult = 1 / 16
        cfg.visual.depth_mult = 0.125  # 1 block per stage
        cfg.text.embed_dim = 16
        cfg.text.hidden_dim = 16
        cfg.fusion.dim = 16
        cfg.locate.width = 16
        cfg.locate.num_layers = 1
        cfg.locate.num_heads = 2
        cfg.locate.mlp_dim = 32
        cfg.segment.dim = 16
    return cfg


class LTS(nn.Module):
    """Locate then Segment. Submodules are fields so their names are the field names."""

    visual: DarkNet
    text: TextEncoder
    fusion: Fusion
    locate: Locate
    segment: Segment
    dtype: Any = jnp.float32
    # Where the text features live (a jax.sharding.Sharding; None: wherever XLA puts them).
    # The CPU train step replicates them: see train_step.make_train_step.
    text_sharding: Any = None

    def __call__(
        self,
        image: jax.Array,
        tokens: jax.Array,
        token_mask: jax.Array,
        *,
        train: bool,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if image.shape[1] % 32 or image.shape[2] % 32:
            raise ValueError(f"image sides must be multiples of 32, got {image.shape[1:3]}")
        levels = self.visual.levels(image.astype(self.dtype), train=train)
        if tokens.shape[0] != image.shape[0]:  # several expressions per image: one backbone pass
            per_image = tokens.shape[0] // image.shape[0]
            if per_image * image.shape[0] != tokens.shape[0]:
                raise ValueError(f"{tokens.shape[0]} expressions for {image.shape[0]} images: "
                                 "expected a whole number per image")
            levels = [jnp.repeat(x, per_image, axis=0) for x in levels]
        c1, c2, c3, c4, c5 = levels
        if self.text_sharding is not None:  # inputs and outputs, or XLA splits the scan
            tokens, token_mask = jax.lax.with_sharding_constraint(
                (tokens, token_mask), self.text_sharding)
        words, sentence = self.text(tokens, token_mask)
        if self.text_sharding is not None:
            words, sentence = jax.lax.with_sharding_constraint(
                (words, sentence), self.text_sharding)
        fused = self.fusion(c3, c4, c5, sentence, train=train)
        prior_logits, relevance = self.locate(fused, words, token_mask, sentence, train=train)
        mask_logits = self.segment(fused, prior_logits, train=train, skips={2: c1, 4: c2})
        aux = {
            "prior_logits": prior_logits.astype(jnp.float32),
            "relevance": relevance.astype(jnp.float32),
        }
        return mask_logits.astype(jnp.float32), aux


def create_model(cfg: ml_collections.ConfigDict, *, text_unroll: int = 1) -> LTS:
    """Builds LTS from ``model_config``-style fields (``cfg.vocab_size`` must be set).

    ``text_unroll`` only changes how the GRU scan is compiled (the summary fully
    unrolls it so XLA's cost analysis counts every time step).
    """
    if cfg.vocab_size < 1:
        raise ValueError("cfg.vocab_size must be set to the tokenizer's vocabulary size")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {cfg.dtype!r}")
    if cfg.bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {cfg.bn_mode!r}")
    dtype = DTYPES[cfg.dtype]
    # Every conv-BN layer (backbone, fusion, locate, segment) shares these BatchNorm settings;
    # each module binds its own compute dtype.
    conv_bn = functools.partial(ConvBN, bn_momentum=cfg.bn_momentum, bn_epsilon=cfg.bn_epsilon)
    return LTS(
        visual=DarkNet(
            width_mult=cfg.visual.width_mult,
            stage_blocks=stage_blocks_for_depth(cfg.visual.depth_mult),
            dtype=dtype,
            bn_frozen=cfg.bn_mode == "frozen",
            conv_bn=conv_bn,
        ),
        text=TextEncoder(
            vocab_size=cfg.vocab_size,
            embed_dim=cfg.text.embed_dim,
            hidden_dim=cfg.text.hidden_dim,
            dtype=dtype,
            unroll=text_unroll,
        ),
        fusion=Fusion(dim=cfg.fusion.dim, dtype=dtype, conv_bn=conv_bn),
        locate=Locate(
            width=cfg.locate.width,
            num_layers=cfg.locate.num_layers,
            num_heads=cfg.locate.num_heads,
            mlp_dim=cfg.locate.mlp_dim,
            dropout=cfg.locate.dropout,
            stride=cfg.locate.stride,
            dtype=dtype,
            conv_bn=conv_bn,
        ),
        segment=Segment(
            dim=cfg.segment.dim,
            num_convs=cfg.segment.num_convs,
            out_stride=cfg.segment.out_stride,
            skip_dim=cfg.segment.skip_dim,
            dtype=dtype,
            conv_bn=conv_bn,
        ),
        dtype=dtype,
    )


def init_variables(
    model: LTS, rng: jax.Array, image_size: int, max_text_len: int, batch_size: int = 1
) -> dict[str, Any]:
    """Initial {'params', 'batch_stats'} from dummy inputs of the given sizes."""
    image = jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)
    tokens = jnp.zeros((batch_size, max_text_len), jnp.int32)
    token_mask = jnp.ones((batch_size, max_text_len), bool)
    variables = model.init({"params": rng}, image, tokens, token_mask, train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
