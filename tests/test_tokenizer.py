"""SentencePiece tokenizer: deterministic training, padding mask, truncation, save/reload."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from lts_jax import tokenizer as tok_lib
from lts_jax.tokenizer import PAD_ID, UNK_ID, Tokenizer, train_or_load, train_sentencepiece

EXPRESSIONS = [
    "the man in the red shirt on the left", "woman holding an umbrella", "left most zebra",
    "the big blue bus on the right", "small dog near the bench", "rightmost chair",
    "guy with glasses", "the red car behind the truck", "person standing in the middle",
    "white cup on the table", "the second giraffe from the left", "brown horse eating grass",
] * 3

_SUBPROCESS = """
import sys
from lts_jax.tokenizer import train_sentencepiece
exprs = sys.stdin.read().split("\\n")
sys.stdout.buffer.write(train_sentencepiece(exprs, 60))
"""


@pytest.fixture(scope="module")
def proto() -> bytes:
    return train_sentencepiece(EXPRESSIONS, 60)


def test_training_is_byte_identical_regardless_of_order_and_process(proto):
    shuffled = list(np.random.default_rng(0).permutation(EXPRESSIONS))
    assert train_sentencepiece(shuffled, 60) == proto
    # A fresh interpreter (no shared sentencepiece state) gives the same bytes.
    out = subprocess.run([sys.executable, "-c", _SUBPROCESS],
                         input="\n".join(EXPRESSIONS[::-1]).encode(), capture_output=True,
                         check=True)
    assert out.stdout == proto


def test_tiny_corpus_with_large_requested_vocab_does_not_fail():
    tok = Tokenizer(train_sentencepiece(["red circle", "blue square", "red square"], 8000))
    assert 2 < tok.vocab_size < 8000
    ids, mask = tok.encode("blue circle", 6)
    assert mask.sum() >= 2 and (ids[mask] > UNK_ID).all()


def test_encode_pads_with_zero_and_masks(proto):
    tok = Tokenizer(proto)
    assert tok.pad_id == PAD_ID == 0
    ids, mask = tok.encode("red car", 10)
    assert ids.dtype == np.int32 and ids.shape == (10,)
    assert mask.dtype == np.bool_ and mask.shape == (10,)
    n = int(mask.sum())
    assert 1 <= n < 10 and mask[:n].all() and not mask[n:].any()
    assert (ids[n:] == PAD_ID).all() and (ids[:n] != PAD_ID).all()
    assert tok.decode(ids) == "red car"
    # Case folding: the model lowercases.
    assert np.array_equal(tok.encode("RED Car", 10)[0], ids)


def test_encode_truncates_long_expressions(proto):
    tok = Tokenizer(proto)
    long_text = " ".join(["the man in the red shirt on the left"] * 5)
    full, _ = tok.encode(long_text, 200)
    ids, mask = tok.encode(long_text, 7)
    assert mask.all() and np.array_equal(ids, full[:7])


def test_empty_expression_becomes_one_unk_token(proto):
    ids, mask = Tokenizer(proto).encode("", 5)
    assert ids.tolist() == [UNK_ID, 0, 0, 0, 0] and mask.tolist() == [True] + [False] * 4


def test_pickle_round_trip_for_worker_processes(proto):
    tok = pickle.loads(pickle.dumps(Tokenizer(proto)))
    assert tok.model_proto == proto and tok.encode("white cup", 4)[0].tolist() == \
        Tokenizer(proto).encode("white cup", 4)[0].tolist()


def test_train_or_load_saves_then_reuses(tmp_path):
    path = tok_lib.tokenizer_path(tmp_path, "refshapes", 60)
    assert "refshapes" in path.name and "60" in path.name
    first = train_or_load(path, lambda: EXPRESSIONS, 60)
    assert path.exists() and path.read_bytes() == first.model_proto

    def must_not_train() -> list[str]:
        raise AssertionError("the saved model should have been reused")

    again = train_or_load(path, must_not_train, 60)
    assert again.model_proto == first.model_proto and again.vocab_size == first.vocab_size
    # Nothing but the model is left behind (no temp files).
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
