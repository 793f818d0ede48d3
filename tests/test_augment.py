"""Flip with left/right word swap (alone and through the training pipeline), photometric jitter."""

from __future__ import annotations

import numpy as np
import pytest

from lts_jax.augment import hflip, photometric, swap_left_right
from lts_jax.input_pipeline import make_train_iterator
from lts_jax.tokenizer import Tokenizer, train_sentencepiece
from lts_jax.transform import train_inputs


@pytest.mark.parametrize("text,expected", [
    ("man on the left", "man on the right"),
    ("Left guy", "Right guy"),
    ("RIGHT PERSON", "LEFT PERSON"),
    ("leftmost zebra, right of the car", "rightmost zebra, left of the car"),
    ("Rightmost bus", "Leftmost bus"),
    ("left-most chair", "right-most chair"),
    ("bright light, lefty leftover", "bright light, lefty leftover"),
    ("copyright", "copyright"),
])
def test_swap_left_right_whole_words_case_preserving(text, expected):
    assert swap_left_right(text) == expected
    assert swap_left_right(expected) == text


def test_hflip_mirrors_image_and_mask_together():
    image = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    mask = np.zeros((2, 5), np.uint8)
    mask[:, 0] = 1
    fi, fm = hflip(image, mask)
    assert np.array_equal(fi[:, ::-1], image) and fm[:, -1].all() and fm[:, :-1].sum() == 0
    assert fi.flags.c_contiguous and fm.flags.c_contiguous


def test_photometric_is_seeded_and_stays_in_range():
    image = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
    a = photometric(image, np.random.default_rng(1))
    b = photometric(image, np.random.default_rng(1))
    assert a.dtype == np.float32 and a.shape == image.shape
    assert np.array_equal(a, b) and not np.allclose(a, image)
    assert a.min() >= 0.0 and a.max() <= 1.0


def _side_source(n: int = 8, size: int = 32) -> list[dict]:
    """Object i: a red block on the left (even i) or right (odd i) of a background of grey
    level 90 + i (so the example can be traced back); its one expression names the side."""
    out = []
    for i in range(n):
        image = np.full((size, size, 3), 90 + i, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[6:18, (slice(2, 8) if i % 2 == 0 else slice(size - 8, size - 2))] = 1
        image[mask > 0] = (255, 0, 0)
        side = "left" if i % 2 == 0 else "right"
        out.append({"image": image, "mask": mask, "expressions": [f"red block on the {side}"]})
    return out


def test_training_flip_keeps_words_image_and_mask_consistent():
    source = _side_source()
    tok = Tokenizer(train_sentencepiece([e for s in source for e in s["expressions"]], 40))
    it = make_train_iterator(source, tok, global_batch_size=8, canvas_size=32, max_text_len=32,
                             seed=3, flip=True)
    flipped = kept = 0
    for _ in range(4):
        host = next(it)
        batch = {k: np.asarray(v) for k, v in train_inputs(host, 32).items()}
        for image, mask, ids in zip(batch["image"], batch["mask"], batch["tokens"], strict=True):
            mask_side = "left" if mask[:, :16].sum() > 0 else "right"
            assert mask[:, :16].sum() == 0 or mask[:, 16:].sum() == 0
            assert tok.decode(ids) == f"red block on the {mask_side}"
            red = (image[..., 0] > 0.9) & (image[..., 1] < 0.1)
            assert np.array_equal(red, mask > 0.5)
            obj = round(float(image[16, 16, 1]) * 255) - 90  # background between the sides
            source_side = "left" if obj % 2 == 0 else "right"
            flipped += source_side != mask_side
            kept += source_side == mask_side
    assert flipped > 0 and kept > 0
