"""Pictures of predictions: binary mask PNG, tinted overlay and a prior heat map.

All functions take and return uint8 RGB / L numpy arrays at the original image size;
``save_png`` writes them. No plotting library: the colour map is a small
closed-form "jet" so the project needs only Pillow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

MASK_COLOUR: tuple[int, int, int] = (255, 40, 40)


def mask_image(mask: np.ndarray) -> np.ndarray:
    """uint8[H, W] with 255 for foreground and 0 for background."""
    return np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8)


def _check_image(image: np.ndarray, hw: tuple[int, ...]) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8[H, W, 3] image, got {image.dtype}{image.shape}")
    if image.shape[:2] != tuple(hw):
        raise ValueError(f"image size {image.shape[:2]} != map size {tuple(hw)}")
    return image


def overlay_mask(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    colour: tuple[int, int, int] = MASK_COLOUR,
    alpha: float = 0.5,
) -> np.ndarray:
    """The image with foreground pixels blended towards ``colour``."""
    mask = np.asarray(mask, dtype=bool)
    image = _check_image(image, mask.shape)
    out = image.astype(np.float32)
    tint = np.asarray(colour, np.float32)
    out[mask] = (1.0 - alpha) * out[mask] + alpha * tint
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """Maps values in [0, 1] (clipped) to uint8 RGB: blue (0) -> red (1)."""
    x = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
    centres = np.asarray([3.0, 2.0, 1.0], np.float32)  # red, green, blue peaks at 4x
    rgb = np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8)


def heatmap_overlay(image: np.ndarray, prob: np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
    """``prob`` ([H, W] in [0, 1]) colour-mapped and blended over the whole image."""
    prob = np.asarray(prob, np.float32)
    image = _check_image(image, prob.shape)
    heat = jet_colormap(prob).astype(np.float32)
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Writes a uint8 [H, W] (greyscale) or [H, W, 3] (RGB) array as PNG."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8, got {array.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path
