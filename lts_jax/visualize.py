"""Pictures of predictions: mask PNG, overlays, prior heat maps, side-by-side panels.

All functions take and return uint8 RGB / L numpy arrays; ``save_png`` writes them and
``png_bytes`` encodes them. No plotting library: the colour map is a small closed-form
"jet" and text is drawn with Pillow's default font, so the project needs only Pillow.

Overlays draw the mask as a semi-transparent fill plus an opaque outline, in the colour of
``PALETTE`` farthest from the mean colour of the pixels under the mask (``contrast_colour``),
so a prediction stays visible on an object of any colour. Ground truth (report galleries) is
a white outline with a dark halo, visible on any background.
"""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Saturated colours far apart in RGB; overlays pick the one farthest from the object.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 40, 40),  # red
    (0, 220, 60),  # green
    (40, 110, 255),  # blue
    (255, 220, 0),  # yellow
    (255, 0, 255),  # magenta
    (0, 230, 255),  # cyan
)
GT_COLOUR: tuple[int, int, int] = (255, 255, 255)
HALO_COLOUR: tuple[int, int, int] = (0, 0, 0)
FILL_ALPHA = 0.4
_WHITE = (255, 255, 255)
_TEXT = (20, 20, 20)


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


def contrast_colour(
    image: np.ndarray,
    mask: np.ndarray,
    palette: tuple[tuple[int, int, int], ...] = PALETTE,
) -> tuple[int, int, int]:
    """The palette colour farthest (Euclidean RGB) from the mean colour under ``mask``
    (under the whole image when the mask is empty); ties go to the earlier colour."""
    mask = np.asarray(mask, dtype=bool)
    image = _check_image(image, mask.shape)
    pixels = image[mask] if mask.any() else image.reshape(-1, 3)
    mean = pixels.astype(np.float64).mean(axis=0)
    distances = np.linalg.norm(np.asarray(palette, np.float64) - mean, axis=1)
    return tuple(int(c) for c in palette[int(np.argmax(distances))])


def default_outline_width(hw: tuple[int, ...]) -> int:
    """Outline width in pixels for a picture of size ``hw``: 1 up to ~240 px, then wider."""
    return max(1, int(round(max(hw) / 160)))


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour erosion ``steps`` times; outside the image counts as background."""
    inner = np.asarray(mask, dtype=bool)
    for _ in range(steps):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return inner


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    return ~_erode(~np.asarray(mask, dtype=bool), steps)


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """bool[H, W]: the mask's pixels within ``width`` (4-neighbour steps) of its border,
    the image edge included."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~_erode(mask, width)


def _paint(out: np.ndarray, where: np.ndarray, colour: tuple[int, int, int],
           alpha: float = 1.0) -> None:
    tint = np.asarray(colour, np.float32)
    out[where] = (1.0 - alpha) * out[where] + alpha * tint


def _to_uint8(out: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay_mask(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    colour: tuple[int, int, int] | None = None,
    alpha: float = FILL_ALPHA,
    outline_width: int | None = None,
) -> np.ndarray:
    """The image with the mask filled (blended ``alpha`` towards ``colour``) and outlined
    (opaque, ``outline_width`` px; 0 = no outline, None = ``default_outline_width``).
    ``colour`` None: ``contrast_colour(image, mask)``."""
    mask = np.asarray(mask, dtype=bool)
    image = _check_image(image, mask.shape)
    if colour is None:
        colour = contrast_colour(image, mask)
    width = default_outline_width(mask.shape) if outline_width is None else outline_width
    out = image.astype(np.float32)
    _paint(out, mask, colour, alpha)
    if width > 0:
        _paint(out, mask_outline(mask, width), colour)
    return _to_uint8(out)


def outline_ground_truth(image: np.ndarray, mask: np.ndarray, *, width: int | None = None
                         ) -> np.ndarray:
    """The image with the mask's border in ``GT_COLOUR`` and a ``HALO_COLOUR`` line just
    outside it."""
    mask = np.asarray(mask, dtype=bool)
    image = _check_image(image, mask.shape)
    width = default_outline_width(mask.shape) if width is None else width
    out = image.astype(np.float32)
    _paint(out, _dilate(mask, width) & ~mask, HALO_COLOUR)
    _paint(out, mask_outline(mask, width), GT_COLOUR)
    return _to_uint8(out)


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """Maps values in [0, 1] (clipped) to uint8 RGB: blue (0) -> red (1)."""
    x = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
    centres = np.asarray([3.0, 2.0, 1.0], np.float32)  # red, green, blue peaks at 4x
    rgb = np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8)


def heatmap_overlay(
    image: np.ndarray, prob: np.ndarray, *, alpha: float = 0.5, vmax: float = 1.0
) -> np.ndarray:
    """``prob`` ([H, W]) colour-mapped over [0, ``vmax``] and blended over the whole image."""
    prob = np.asarray(prob, np.float32)
    image = _check_image(image, prob.shape)
    heat = jet_colormap(prob / np.float32(max(vmax, 1e-12))).astype(np.float32)
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    return _to_uint8(out)


@functools.lru_cache(maxsize=8)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px (its fixed bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_width(text: str, size: int) -> float:
    return float(font(size).getlength(text))


def wrap_text(text: str, width_px: int, size: int) -> list[str]:
    """Words of ``text`` in lines no wider than ``width_px`` (a longer word is cut)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if _text_width(candidate, size) <= width_px:
            line = candidate
            continue
        if line:
            lines.append(line)
        while _text_width(word, size) > width_px and len(word) > 1:
            cut = max(1, int(len(word) * width_px / _text_width(word, size)))
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines or [""]


def colour_bar(height: int, vmax: float, *, bar_width: int = 14, size: int = 13) -> np.ndarray:
    """uint8[height, w, 3]: a vertical jet scale, 0 at the bottom and ``vmax`` at the top,
    labelled '0', the middle and ``vmax`` (two decimals) to its right, on white."""
    labels = ["0", f"{vmax / 2:.2f}", f"{vmax:.2f}"]
    label_w = int(math.ceil(max(_text_width(t, size) for t in labels)))
    pad = size // 2 + 1
    width = bar_width + 4 + label_w + 2
    img = Image.new("RGB", (width, height), _WHITE)
    inner = max(height - 2 * pad, 2)
    ramp = jet_colormap(np.linspace(1.0, 0.0, inner, dtype=np.float32))
    bar = np.broadcast_to(ramp[:, None, :], (inner, bar_width, 3))
    img.paste(Image.fromarray(np.ascontiguousarray(bar)), (0, pad))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, pad, bar_width - 1, pad + inner - 1], outline=_TEXT)
    for text, y in zip(labels, (pad + inner - 1, pad + (inner - 1) // 2, pad), strict=True):
        draw.line([bar_width, y, bar_width + 2, y], fill=_TEXT)
        draw.text((bar_width + 4, y), text, fill=_TEXT, font=font(size), anchor="lm")
    return np.asarray(img)


def display_size(hw: tuple[int, int], *, low: int, high: int) -> tuple[int, int]:
    """(H, W) scaled so that the longer side lies in [low, high]: small pictures grow by an
    integer factor (crisp pixels), large ones shrink."""
    h, w = int(hw[0]), int(hw[1])
    side = max(h, w)
    if side < low:
        factor = math.ceil(low / side)
        if side * factor > high:
            factor = max(1, high // side)
        return h * factor, w * factor
    if side > high:
        scale = high / side
        return max(1, round(h * scale)), max(1, round(w * scale))
    return h, w


def resize(array: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A uint8 image (bilinear; box when shrinking), a bool mask (nearest) or a float map
    (bilinear) resized to ``hw``."""
    array = np.asarray(array)
    h, w = hw
    if array.shape[:2] == (h, w):
        return array
    if array.dtype == bool:
        out = Image.fromarray(array.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
        return np.asarray(out) > 127
    if array.dtype == np.uint8:
        shrink = h < array.shape[0]
        enlarge_by_int = h % array.shape[0] == 0 and w % array.shape[1] == 0
        method = Image.BOX if shrink else (Image.NEAREST if enlarge_by_int else Image.BILINEAR)
        return np.asarray(Image.fromarray(array).resize((w, h), method))
    out = Image.fromarray(np.asarray(array, np.float32), mode="F").resize((w, h), Image.BILINEAR)
    return np.asarray(out, np.float32)


def _stack_caption(picture: np.ndarray, lines: list[str], size: int) -> np.ndarray:
    line_h = int(size * 1.35)
    pad = 6
    h, w = picture.shape[:2]
    img = Image.new("RGB", (w, h + pad + line_h * len(lines) + pad), _WHITE)
    img.paste(Image.fromarray(picture), (0, 0))
    draw = ImageDraw.Draw(img)
    for k, line in enumerate(lines):
        draw.text((pad, h + pad + k * line_h), line, fill=_TEXT, font=font(size))
    return np.asarray(img)


def prediction_panel(
    image: np.ndarray,
    mask: np.ndarray,
    prior: np.ndarray,
    expression: str,
    *,
    low: int = 256,
    high: int = 480,
    note: str = "",
) -> np.ndarray:
    """Side by side: the image with the prediction | the prior heat map (scaled 0..max) and
    its colour bar, the expression (and ``note``) as caption below. The pictures are resized
    so their longer side lies in [low, high] px."""
    mask = np.asarray(mask, dtype=bool)
    image = _check_image(image, mask.shape)
    prior = np.asarray(prior, np.float32)
    hw = display_size(image.shape[:2], low=low, high=high)
    small, small_mask, small_prior = resize(image, hw), resize(mask, hw), resize(prior, hw)
    left = overlay_mask(small, small_mask, colour=contrast_colour(image, mask))
    vmax = float(prior.max()) if prior.size and prior.max() > 0 else 1.0
    right = heatmap_overlay(small, small_prior, alpha=0.6, vmax=vmax)
    bar = colour_bar(hw[0], vmax)
    gap = np.full((hw[0], 8, 3), 255, np.uint8)
    row = np.concatenate([left, gap, right, gap[:, :4], bar], axis=1)
    size = 16
    shown = f"\u201c{expression}\u201d" if expression.strip() else "(empty expression)"
    lines = wrap_text(shown, row.shape[1] - 12, size)
    if note:
        lines += wrap_text(note, row.shape[1] - 12, size)
    return _stack_caption(row, lines, size)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Writes a uint8 [H, W] (greyscale) or [H, W, 3] (RGB) array as PNG."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8, got {array.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 [H, W] or [H, W, 3] array as PNG bytes (optimised)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8, got {array.dtype}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def compact_image_bytes(array: np.ndarray, *, quality: int = 80) -> tuple[bytes, str]:
    """(bytes, MIME type): PNG, or JPEG (4:4:4, so thin coloured outlines stay sharp) when
    that is less than half the size (photos, noisy backgrounds)."""
    png = png_bytes(array)
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, format="JPEG", quality=quality, subsampling=0)
    if 2 * buf.tell() < len(png):
        return buf.getvalue(), "image/jpeg"
    return png, "image/png"
