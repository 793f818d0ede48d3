"""Fusion, Locate and Segment stages in isolation (tiny sizes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lts_jax.models.fusion import Fusion, coord_features, l2_normalize
from lts_jax.models.locate import Locate, sine_positions
from lts_jax.models.segment import Segment

KEY = jax.random.key(0, impl="rbg")
B, L, D = 2, 5, 16


def _normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    # numpy, not jax.random: each new threefry shape costs a compile on CPU
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


WORDS = _normal(1, (B, L, 12))
WORD_MASK = np.array([[True] * 3 + [False] * 2, [True] * 5])
SENTENCE = _normal(2, (B, 12))


def test_coordinate_features_hand_values() -> None:
    c = np.asarray(coord_features(1, 2, 4))
    assert c.shape == (1, 2, 4, 8)
    np.testing.assert_allclose(c[0, 0, 0], [-1, -1, -0.5, 0, -0.75, -0.5, 0.25, 0.5])
    np.testing.assert_allclose(c[0, 1, 3], [0.5, 0, 1, 1, 0.75, 0.5, 0.25, 0.5])
    assert c.min() >= -1 and c.max() <= 1


def test_l2_normalize_and_sine_positions() -> None:
    x = jnp.asarray(_normal(3, (2, 3, 3, 7)), jnp.bfloat16)
    y = l2_normalize(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y, np.float32), axis=-1), 1.0, atol=1e-2)
    pos = np.asarray(sine_positions(3, 4, 16))
    assert pos.shape == (12, 16) and np.abs(pos).max() <= 1.0
    assert len({tuple(np.round(r, 5)) for r in pos}) == 12  # every cell distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_positions(2, 2, 6)


def test_fusion_shapes_and_sentence_modulation() -> None:
    c3, c4, c5 = _normal(4, (B, 8, 8, 8)), _normal(5, (B, 4, 4, 16)), _normal(6, (B, 2, 2, 32))
    model = Fusion(dim=D)
    variables = jax.jit(lambda k: model.init(k, c3, c4, c5, SENTENCE, train=False))(KEY)
    apply = jax.jit(lambda v, s: model.apply(v, c3, c4, c5, s, train=False))
    fused = apply(variables, SENTENCE)
    assert fused.shape == (B, 8, 8, D)
    swapped = apply(variables, SENTENCE[::-1])  # each image with the other sentence
    assert not np.allclose(fused, swapped[::-1], atol=1e-4)
    with pytest.raises(ValueError, match="twice the size"):
        model.apply(variables, c3[:, :6, :6], c4, c5, SENTENCE, train=False)


@pytest.fixture(scope="module")
def locate_setup() -> tuple:
    fused = _normal(7, (B, 8, 8, D))
    model = Locate(width=16, num_layers=1, num_heads=2, mlp_dim=32, dropout=0.1, stride=16)
    variables = jax.jit(lambda k: model.init(k, fused, WORDS, WORD_MASK, SENTENCE, train=False))(
        KEY
    )
    return model, variables, fused


def test_locate_shapes_and_relevance_range(locate_setup: tuple) -> None:
    model, variables, fused = locate_setup
    prior, relevance = jax.jit(
        lambda v: model.apply(v, fused, WORDS, WORD_MASK, SENTENCE, train=False)
    )(variables)
    assert prior.shape == relevance.shape == (B, 4, 4)
    assert float(relevance.min()) >= 0.0 and float(relevance.max()) <= 1.0
    for stride, side in ((8, 8), (32, 2)):
        m = Locate(width=16, num_layers=1, num_heads=2, mlp_dim=32, stride=stride)
        v = jax.eval_shape(
            lambda k, m=m: m.init(k, fused, WORDS, WORD_MASK, SENTENCE, train=False), KEY
        )
        out = jax.eval_shape(
            lambda v, m=m: m.apply(v, fused, WORDS, WORD_MASK, SENTENCE, train=False), v
        )
        assert out[0].shape == out[1].shape == (B, side, side)


def test_locate_ignores_padded_words_and_uses_dropout_only_in_training(
    locate_setup: tuple,
) -> None:
    model, variables, fused = locate_setup

    @jax.jit
    def run(words: jax.Array, key: jax.Array) -> tuple:
        evaluation = model.apply(variables, fused, words, WORD_MASK, SENTENCE, train=False)
        training, _ = model.apply(
            variables,
            fused,
            words,
            WORD_MASK,
            SENTENCE,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        return evaluation, training

    base_eval, train_a = run(WORDS, jax.random.key(1))
    garbage = WORDS.copy()
    garbage[0, 3:] = 100.0  # padded positions of row 0
    eval_g, train_b = run(garbage, jax.random.key(2))
    np.testing.assert_allclose(eval_g[0], base_eval[0], rtol=1e-5, atol=1e-5)
    # different dropout keys give different training outputs
    assert not np.allclose(train_a[0], train_b[0], atol=1e-4)


def test_segment_output_at_stride_four() -> None:
    fused, prior = _normal(8, (B, 8, 8, D)), _normal(9, (B, 4, 4))
    model = Segment(dim=D, num_convs=2)
    variables = jax.jit(lambda k: model.init(k, fused, prior, train=False))(KEY)
    apply = jax.jit(lambda v, p: model.apply(v, fused, p, train=False))
    logits = apply(variables, prior)
    assert logits.shape == (B, 16, 16) and logits.dtype == jnp.float32
    assert not np.allclose(apply(variables, -prior), logits, atol=1e-4)  # the prior is used


@pytest.mark.parametrize(
    "out_stride, side, up_layers",
    [
        (8, 8, set()),
        (2, 32, {"conv_up", "conv_up_s2"}),
        (1, 64, {"conv_up", "conv_up_s2", "conv_up_s1"}),
    ],
)
def test_segment_out_stride_sets_mask_resolution(out_stride, side, up_layers) -> None:
    fused, prior = _normal(8, (B, 8, 8, D)), _normal(9, (B, 4, 4))
    model = Segment(dim=D, num_convs=1, out_stride=out_stride)
    variables = model.init(KEY, fused, prior, train=False)
    assert {k for k in variables["params"] if k.startswith("conv_up")} == up_layers
    logits = model.apply(variables, fused, prior, train=False)
    assert logits.shape == (B, side, side)


def test_segment_rejects_unknown_out_stride() -> None:
    fused, prior = _normal(8, (B, 8, 8, D)), _normal(9, (B, 4, 4))
    with pytest.raises(ValueError, match="out_stride must be one of"):
        Segment(dim=D, out_stride=3).init(KEY, fused, prior, train=False)


def test_segment_skips_feed_each_upsampled_stride() -> None:
    fused, prior = _normal(8, (B, 8, 8, D)), _normal(9, (B, 4, 4))
    skips = {4: _normal(10, (B, 16, 16, 6)), 2: _normal(11, (B, 32, 32, 3))}
    model = Segment(dim=D, num_convs=1, out_stride=2, skip_dim=4)
    variables = model.init(KEY, fused, prior, train=False, skips=skips)
    assert {"skip_s4", "skip_s2"} <= set(variables["params"])
    apply = jax.jit(lambda v, s: model.apply(v, fused, prior, train=False, skips=s))
    logits = apply(variables, skips)
    assert logits.shape == (B, 32, 32)
    # each skip reaches the output
    for stride in (4, 2):
        changed = {**skips, stride: -skips[stride]}
        assert not np.allclose(apply(variables, changed), logits, atol=1e-4)
    with pytest.raises(ValueError, match="needs the stride-2 feature"):
        model.apply(variables, fused, prior, train=False, skips={4: skips[4]})
