"""The whole LTS model: configs, shapes, gradients, overfitting, sharding, bfloat16."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lts_jax.losses import lts_loss
from lts_jax.models.model import STAGES, create_model, init_variables, model_config

S, L, VOCAB = 64, 6, 12
RED, BLUE, BOX = 1, 2, 3
# 'rbg' keys: threefry initialisers take seconds to compile on a CPU.
KEY = jax.random.key(0, impl="rbg")


def make_batch() -> dict[str, np.ndarray]:
    """Two scenes, each with a red and a blue box; one expression per box.

    Boxes lie on the 16-px grid so the pooled targets are exactly 0/1 and the
    loss can approach zero.
    """
    boxes = [  # (y0, y1, x0, x1) of the red box, then the blue box
        [(0, 16, 0, 32), (32, 64, 32, 48)],
        [(16, 48, 48, 64), (0, 16, 0, 16)],
    ]
    images, masks, tokens = [], [], []
    for scene in boxes:
        image = np.full((S, S, 3), 0.5, np.float32)
        for (y0, y1, x0, x1), colour in zip(scene, ((1, 0, 0), (0, 0, 1)), strict=True):
            image[y0:y1, x0:x1] = colour
        for (y0, y1, x0, x1), word in zip(scene, (RED, BLUE), strict=True):
            mask = np.zeros((S, S), np.float32)
            mask[y0:y1, x0:x1] = 1.0
            images.append(image)
            masks.append(mask)
            tokens.append([word, BOX, 0, 0, 0, 0])
    tokens_arr = np.array(tokens, np.int32)
    return {"image": np.stack(images), "mask": np.stack(masks), "tokens": tokens_arr,
            "token_mask": tokens_arr > 0}


def tiny_config(**overrides: object) -> object:
    cfg = model_config("tiny")
    cfg.vocab_size = VOCAB
    cfg.locate.dropout = 0.0  # deterministic train-mode passes for these tests
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def tiny() -> dict:
    model = create_model(tiny_config())
    variables = jax.jit(lambda k: init_variables(model, k, S, L))(KEY)
    batch = make_batch()

    @partial(jax.jit, static_argnames="train")
    def forward(v: dict, b: dict, train: bool) -> tuple:
        if train:
            out, new = model.apply(v, b["image"], b["tokens"], b["token_mask"], train=True,
                                   mutable=["batch_stats"])
            return out, new["batch_stats"]
        return model.apply(v, b["image"], b["tokens"], b["token_mask"], train=False), None

    tx = optax.adam(3e-3)

    def loss_fn(params: dict, stats: dict, b: dict) -> tuple:
        (mask_logits, aux), new = model.apply(
            {"params": params, "batch_stats": stats}, b["image"], b["tokens"], b["token_mask"],
            train=True, mutable=["batch_stats"],
        )
        loss, _ = lts_loss(mask_logits, aux["prior_logits"], b["mask"], prior_weight=1.0,
                           dice_weight=0.0)
        return loss, new["batch_stats"]

    @jax.jit
    def train_step(params: dict, stats: dict, opt: object, b: dict) -> tuple:
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, b)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt, loss, grads

    return {"model": model, "variables": variables, "batch": batch, "forward": forward,
            "train_step": train_step, "tx": tx}


def test_model_configs() -> None:
    full = model_config("full")
    assert (full.visual.width_mult, full.visual.depth_mult) == (1.0, 1.0)
    assert (full.text.embed_dim, full.text.hidden_dim, full.fusion.dim) == (300, 256, 256)
    assert (full.locate.num_layers, full.locate.num_heads, full.locate.width) == (2, 8, 256)
    assert (full.locate.stride, full.locate.dropout) == (16, 0.1)
    assert (full.dtype, full.bn_mode, full.vocab_size) == ("float32", "train", 0)
    small = model_config("small")
    assert small.visual.width_mult == 0.25 and small.fusion.dim == 64
    with pytest.raises(ValueError, match="variant"):
        model_config("huge")
    with pytest.raises(ValueError, match="vocab_size"):
        create_model(model_config("tiny"))
    for field, bad in (("dtype", "float16"), ("bn_mode", "sync")):
        with pytest.raises(ValueError, match=field):
            create_model(tiny_config(**{field: bad}))
    for out_stride, skip_dim in ((3, 0), (1, 4), (4, -1)):
        cfg = tiny_config()
        cfg.segment.out_stride, cfg.segment.skip_dim = out_stride, skip_dim
        with pytest.raises(ValueError, match="segment"):
            create_model(cfg)


def test_full_model_shapes_at_416() -> None:
    cfg = model_config("full")
    cfg.vocab_size = 8000
    model = create_model(cfg)
    b, length = 2, 20
    variables = jax.eval_shape(lambda: init_variables(model, KEY, 416, length, b))
    assert set(variables["params"]) == set(STAGES)
    image = jax.ShapeDtypeStruct((b, 416, 416, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((b, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, length), jnp.bool_)

    def stages(m: object, x: jax.Array, t: jax.Array, k: jax.Array) -> dict:
        c3, c4, c5 = m.visual(x, train=False)
        words, sentence = m.text(t, k)
        fused = m.fusion(c3, c4, c5, sentence, train=False)
        prior, relevance = m.locate(fused, words, k, sentence, train=False)
        return {"c3": c3, "c4": c4, "c5": c5, "words": words, "sentence": sentence,
                "fused": fused, "prior": prior, "relevance": relevance,
                "mask": m.segment(fused, prior, train=False)}

    shapes = jax.eval_shape(partial(model.apply, method=stages), variables, image, tokens, mask)
    assert {k: v.shape for k, v in shapes.items()} == {
        "c3": (b, 52, 52, 256), "c4": (b, 26, 26, 512), "c5": (b, 13, 13, 1024),
        "words": (b, length, 512), "sentence": (b, 512), "fused": (b, 52, 52, 256),
        "prior": (b, 26, 26), "relevance": (b, 26, 26), "mask": (b, 104, 104),
    }
    mask_logits, aux = jax.eval_shape(
        partial(model.apply, train=False), variables, image, tokens, mask
    )
    assert mask_logits.shape == (b, 104, 104) and mask_logits.dtype == jnp.float32
    assert {k: v.shape for k, v in aux.items()} == {
        "prior_logits": (b, 26, 26), "relevance": (b, 26, 26)
    }
    with pytest.raises(ValueError, match="multiples of 32"):
        jax.eval_shape(partial(model.apply, train=False), variables,
                       jax.ShapeDtypeStruct((b, 400, 400, 3), jnp.float32), tokens, mask)


def test_tiny_forward_shapes_and_language_dependence(tiny: dict) -> None:
    variables = tiny["variables"]
    assert set(variables["params"]) == set(STAGES)
    assert set(variables["batch_stats"]) == {"visual", "fusion", "locate", "segment"}
    mask_logits, aux = tiny["forward"](variables, tiny["batch"], train=False)[0]
    assert mask_logits.shape == (4, S // 4, S // 4) and mask_logits.dtype == jnp.float32
    assert aux["prior_logits"].shape == aux["relevance"].shape == (4, S // 16, S // 16)
    # Examples 0 and 1 share an image but not an expression.
    assert not np.allclose(mask_logits[0], mask_logits[1], atol=1e-4)
    assert not np.allclose(aux["prior_logits"][0], aux["prior_logits"][1], atol=1e-4)


def test_padding_tokens_do_not_change_outputs(tiny: dict) -> None:
    batch = tiny["batch"]
    ref = tiny["forward"](tiny["variables"], batch, train=False)[0]
    longer = dict(batch)
    longer["tokens"] = np.concatenate([batch["tokens"], np.full((4, 3), 7, np.int32)], axis=1)
    longer["token_mask"] = np.concatenate([batch["token_mask"], np.zeros((4, 3), bool)], axis=1)
    out = tiny["forward"](tiny["variables"], longer, train=False)[0]
    jax.tree_util.tree_map(partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5), out, ref)


def test_gradients_reach_every_parameter_and_one_batch_overfits(tiny: dict) -> None:
    params, stats = tiny["variables"]["params"], tiny["variables"]["batch_stats"]
    opt = tiny["tx"].init(params)
    step, batch = tiny["train_step"], tiny["batch"]
    params, stats, opt, first_loss, grads = step(params, stats, opt, batch)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    dead = [jax.tree_util.keystr(k) for k, g in flat if not np.any(np.asarray(g) != 0)]
    assert not dead, f"parameters without gradient: {dead}"
    assert all(np.all(np.isfinite(g)) for _, g in flat)

    for _ in range(150):
        params, stats, opt, loss, _ = step(params, stats, opt, batch)
    assert float(loss) < float(first_loss) / 10, (float(first_loss), float(loss))


def test_sharded_forward_matches_single_device(tiny: dict) -> None:
    """jit over a 4-device mesh with the batch sharded: same outputs, and train-mode
    BatchNorm uses global batch statistics (one example per device here)."""
    devices = jax.devices()
    assert len(devices) >= 4, "tests/conftest.py should give 4 CPU devices"
    mesh = Mesh(np.asarray(devices[:4]), ("data",))
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    variables, batch = tiny["variables"], tiny["batch"]
    sharded_batch = jax.device_put(batch, data)
    sharded_vars = jax.device_put(variables, replicated)
    assert len(sharded_batch["image"].sharding.device_set) == 4

    model = tiny["model"]

    @partial(jax.jit, static_argnames="train")
    def sharded_forward(v: dict, b: dict, train: bool) -> tuple:
        out, new = model.apply(v, b["image"], b["tokens"], b["token_mask"], train=train,
                               mutable=["batch_stats"])
        return out, new["batch_stats"]

    for train in (False, True):
        ref_out, ref_stats = tiny["forward"](variables, batch, train=train)
        out, stats = sharded_forward(sharded_vars, sharded_batch, train=train)
        assert len(out[0].sharding.device_set) == 4
        # Reduction order differs across devices; per-device BatchNorm statistics
        # (the failure this guards against) would differ by O(1), not 1e-4.
        jax.tree_util.tree_map(partial(np.testing.assert_allclose, rtol=1e-3, atol=1e-4),
                               out, ref_out)
        if train:
            jax.tree_util.tree_map(partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
                                   stats, ref_stats)


def test_one_backbone_pass_per_image_matches_the_repeated_image(tiny: dict) -> None:
    """Two expressions per image (config.data.objects_per_image=2, used in training only):
    the image batch is half the expression batch and the backbone runs once per image. Same
    loss, BatchNorm statistics and gradients as with each image repeated (a repeat leaves
    batch mean and variance unchanged)."""
    batch = tiny["batch"]
    assert np.array_equal(batch["image"][0::2], batch["image"][1::2])  # two rows per image
    grouped = {**batch, "image": batch["image"][0::2]}
    params, stats = tiny["variables"]["params"], tiny["variables"]["batch_stats"]
    opt = tiny["tx"].init(params)
    # (batch_stats, loss, grads) of one train-mode step; not the Adam update, which turns
    # rounding in near-zero gradients into whole steps
    steps = [tiny["train_step"](params, stats, opt, b)[1::2] for b in (grouped, batch)]
    jax.tree_util.tree_map(partial(np.testing.assert_allclose, rtol=1e-3, atol=1e-5), *steps)
    with pytest.raises(ValueError, match="whole number per image"):
        tiny["forward"](tiny["variables"], {**batch, "image": batch["image"][:3]}, train=False)


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny: dict) -> None:
    model = create_model(tiny_config(dtype="bfloat16"))
    shapes = jax.eval_shape(lambda: init_variables(model, KEY, S, L))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))
    batch = tiny["batch"]
    mask_logits, aux = jax.jit(partial(model.apply, train=False))(
        tiny["variables"], batch["image"], batch["tokens"], batch["token_mask"]
    )
    ref_logits, _ = tiny["forward"](tiny["variables"], batch, train=False)[0]
    assert mask_logits.dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in aux.values())
    assert np.all(np.isfinite(mask_logits))
    # Same function at lower precision: strongly correlated with the float32 result.
    corr = np.corrcoef(np.ravel(mask_logits), np.ravel(ref_logits))[0, 1]
    assert corr > 0.95, corr
