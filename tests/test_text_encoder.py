"""Text encoder: shapes, and invariance to padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lts_jax.models.text_encoder import TextEncoder

MODEL = TextEncoder(vocab_size=20, embed_dim=8, hidden_dim=6)
TOKENS = np.array([[3, 4, 5, 0, 0], [7, 2, 0, 0, 0], [1, 2, 3, 4, 5]], np.int32)
LENGTHS = np.array([3, 2, 5])


@pytest.fixture(scope="module")
def setup() -> tuple[dict, object]:
    mask = np.arange(5)[None] < LENGTHS[:, None]
    variables = jax.jit(lambda k: MODEL.init(k, TOKENS, mask))(jax.random.key(0, impl="rbg"))
    return variables, jax.jit(MODEL.apply)


def _mask(tokens_len: int, lengths: np.ndarray) -> np.ndarray:
    return np.arange(tokens_len)[None] < lengths[:, None]


def test_shapes_and_zero_padding(setup: tuple) -> None:
    variables, apply = setup
    words, sentence = apply(variables, TOKENS, _mask(5, LENGTHS))
    assert words.shape == (3, 5, 12) and sentence.shape == (3, 12)
    assert words.dtype == jnp.float32 and sentence.dtype == jnp.float32
    np.testing.assert_array_equal(words[0, 3:], 0.0)
    assert np.all(np.abs(words[0, :3]).sum(-1) > 0)


def test_padding_never_changes_outputs(setup: tuple) -> None:
    variables, apply = setup
    words, sentence = apply(variables, TOKENS, _mask(5, LENGTHS))
    # Extra padding with arbitrary ids, including pad ids that are real words.
    padded = np.concatenate([TOKENS, np.full((3, 4), 9, np.int32)], axis=1)
    padded[0, 3:5] = 11
    words_p, sentence_p = apply(variables, padded, _mask(9, LENGTHS))
    np.testing.assert_allclose(words_p[:, :5], words, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(words_p[:, 5:], 0.0)
    np.testing.assert_allclose(sentence_p, sentence, rtol=1e-6, atol=1e-6)
    # The backward GRU starts at the last real token: row 1 alone, unpadded, agrees.
    words_1, sentence_1 = apply(variables, TOKENS[1:2, :2], np.ones((1, 2), bool))
    np.testing.assert_allclose(words[1, :2], words_1[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sentence[1], sentence_1[0], rtol=1e-6, atol=1e-6)


def test_all_padding_row_is_finite_and_content_matters(setup: tuple) -> None:
    variables, apply = setup
    _, sentence_empty = apply(variables, TOKENS, _mask(5, np.array([0, 2, 5])))
    np.testing.assert_array_equal(sentence_empty[0], 0.0)
    assert np.all(np.isfinite(sentence_empty))
    _, sentence = apply(variables, TOKENS, _mask(5, LENGTHS))
    other = TOKENS.copy()
    other[2, 4] = 6  # one word changed
    _, sentence_o = apply(variables, other, _mask(5, LENGTHS))
    assert not np.allclose(sentence_o[2], sentence[2], atol=1e-4)
    np.testing.assert_allclose(sentence_o[:2], sentence[:2], rtol=1e-6, atol=1e-6)
