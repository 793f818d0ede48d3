"""Training augmentation: horizontal flip with left/right word swap, photometric jitter.

A mirrored image makes "the man on the left" refer to the man on the right, so the flip must
swap the spatial words with it; everything else in the expression stays as written.
"""

from __future__ import annotations

import re

import numpy as np

_SWAP = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
# Whole words only ("bright" and "lefty" stay); hyphenated forms like "left-most" still swap.
_WORD = re.compile(r"\b(leftmost|rightmost|left|right)\b", re.IGNORECASE)


def _match_case(template: str, word: str) -> str:
    if template.isupper():
        return word.upper()
    if template[0].isupper():
        return word[0].upper() + word[1:]
    return word


def swap_left_right(text: str) -> str:
    """Swap left<->right and leftmost<->rightmost as whole words, keeping each word's case."""
    return _WORD.sub(lambda m: _match_case(m.group(0), _SWAP[m.group(0).lower()]), text)


def hflip(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror image [H, W, C] and mask [H, W] left-right (contiguous copies)."""
    return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])


BRIGHTNESS, CONTRAST, SATURATION = 0.15, 0.25, 0.25


def photometric_params(rng: np.random.Generator, *, brightness: float = BRIGHTNESS,
                       contrast: float = CONTRAST, saturation: float = SATURATION) -> np.ndarray:
    """float32[3] (brightness shift, contrast factor, saturation factor) drawn from ``rng``."""
    return np.asarray([rng.uniform(-brightness, brightness),
                       rng.uniform(1 - contrast, 1 + contrast),
                       rng.uniform(1 - saturation, 1 + saturation)], dtype=np.float32)


def apply_photometric(image: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Brightness shift, contrast and saturation scaling of float32[H, W, 3] in [0, 1].

    The host reference of ``transform.apply_photometric`` (which the train step runs).
    Geometry is untouched, so the mask needs no change.
    """
    shift, contrast, saturation = (np.float32(v) for v in params)
    out = image + shift
    grey_mean = np.float32(out.mean())
    out = (out - grey_mean) * contrast + grey_mean
    # Luma weights (ITU-R BT.601), as in common colour-jitter implementations.
    grey = out @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    grey = grey[..., None]
    out = (out - grey) * saturation + grey
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def photometric(image: np.ndarray, rng: np.random.Generator, *, brightness: float = BRIGHTNESS,
                contrast: float = CONTRAST, saturation: float = SATURATION) -> np.ndarray:
    """Random photometric jitter of float32[H, W, 3] in [0, 1] (params drawn, then applied)."""
    params = photometric_params(rng, brightness=brightness, contrast=contrast,
                                saturation=saturation)
    return apply_photometric(image, params)
