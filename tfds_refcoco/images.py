"""Image checks at build time and RGB decoding at read time (PIL only, no TensorFlow).

The dataset stores each image's original file bytes, never a re-encoded copy, so
the checks here only read. Decoding always ends in ``convert('RGB')``: COCO holds
grayscale and CMYK JPEGs, and every consumer wants three channels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile


class CorruptImageError(ValueError):
    """An image file that cannot be fully decoded, or whose size is not the annotated one."""


def check_image(data: bytes, name: str, height: int, width: int) -> None:
    """Fully decodes ``data`` and checks it is ``height`` x ``width``.

    A full decode (not just the header) is what catches truncated and corrupt
    JPEGs. Raises CorruptImageError naming ``name`` otherwise.
    """
    # Never accept a partially decoded image, whatever another module set globally
    # (the build is single-threaded, so the temporary switch is safe).
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size = img.size
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise CorruptImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    if size != (width, height):
        raise CorruptImageError(
            f"{name}: image is {size[0]}x{size[1]} (w x h) but instances.json says "
            f"{width}x{height}; masks would not line up"
        )


def decode_rgb(data: bytes) -> np.ndarray:
    """uint8[H, W, 3] RGB pixels of an encoded image (grayscale/CMYK converted)."""
    with Image.open(io.BytesIO(data)) as img:
        # convert() copies even an RGB image; only grayscale/CMYK need it.
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
