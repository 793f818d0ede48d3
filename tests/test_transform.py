"""The device-side input transform against the host references (PIL letterbox, numpy flip and
photometric jitter), and the letterbox round trip of image and mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lts_jax import transform
from lts_jax.augment import apply_photometric, hflip, photometric_params
from lts_jax.input_pipeline import place_image, place_mask
from lts_jax.letterbox import letterbox, letterbox_mask, letterbox_params, unletterbox

CANVAS = 64
# Jitted once per output side (eagerly, every op of the vmapped plan would dispatch alone).
letterbox_images = jax.jit(transform.letterbox_images, static_argnums=2,
                           static_argnames="method")
letterbox_masks = jax.jit(transform.letterbox_masks, static_argnums=2)
# (H, W, S): downscale, upscale, portrait, square, odd leftovers, degenerate strips, identity.
SHAPES = [(48, 64, 32), (64, 48, 32), (20, 30, 32), (64, 64, 32), (17, 63, 40), (1, 64, 32),
          (64, 3, 16), (33, 50, 50), (64, 64, 64)]


def _canvases(image: np.ndarray, mask: np.ndarray, garbage: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    image_c = np.full((CANVAS, CANVAS, 3), garbage, np.uint8)
    mask_c = np.full((CANVAS, transform.packed_width(CANVAS)), garbage, np.uint8)
    place_image(image, image_c)
    place_mask(mask, mask_c)
    return image_c, mask_c


def _device(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape
    image_c, mask_c = _canvases(image, mask)
    hw = jnp.asarray([[h, w]], jnp.int32)
    out_image = letterbox_images(jnp.asarray(image_c[None]), hw, size)
    out_mask = letterbox_masks(jnp.asarray(mask_c[None]), hw, size)
    return np.asarray(out_image[0]), np.asarray(out_mask[0])


def _example(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = (rng.random((h, w)) < 0.4).astype(np.uint8)
    return image, mask


@pytest.mark.parametrize("h,w,size", SHAPES)
def test_device_letterbox_matches_pil(h, w, size):
    image, mask = _example(h, w)
    out_image, out_mask = _device(image, mask, size)
    ref_image, _ = letterbox(image, size)
    assert out_image.shape == (size, size, 3) and out_image.dtype == np.float32
    # PIL resamples in 8-bit fixed point, two passes: at most one level apart.
    assert np.abs(out_image * 255 - ref_image.astype(np.float32)).max() <= 1.0
    np.testing.assert_array_equal(out_mask, letterbox_mask(mask, size))


@pytest.mark.parametrize("h,w,size", [(48, 64, 32), (17, 63, 40), (64, 64, 64)])
def test_matmul_and_gather_resampling_agree(h, w, size):
    image, mask = _example(h, w, seed=2)
    image_c, _ = _canvases(image, mask)
    args = (jnp.asarray(image_c[None]), jnp.asarray([[h, w]], jnp.int32), size)
    flip = jnp.asarray([True])
    for f in (None, flip):
        gather = letterbox_images(*args, flip=f, method="gather")
        matmul = letterbox_images(*args, flip=f, method="matmul")
        np.testing.assert_allclose(np.asarray(gather), np.asarray(matmul), atol=1e-5)
    with pytest.raises(ValueError, match="resampling method"):
        letterbox_images(*args, method="bicubic")


@pytest.mark.parametrize("h,w,size", [(40, 52, 32), (63, 17, 48)])
def test_flip_in_the_step_mirrors_the_letterbox(h, w, size):
    image, mask = _example(h, w, seed=4)
    image_c, mask_c = _canvases(image, mask)
    args = (jnp.asarray([[h, w]], jnp.int32), size, jnp.asarray([True]))
    flipped = letterbox_images(jnp.asarray(image_c[None]), *args)
    flipped_mask = letterbox_masks(jnp.asarray(mask_c[None]), *args)
    plain, plain_mask = _device(image, mask, size)
    np.testing.assert_allclose(np.asarray(flipped[0]), plain[:, ::-1], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(flipped_mask[0]), plain_mask[:, ::-1])


@pytest.mark.parametrize("h,w,size", [(40, 52, 32), (64, 20, 48), (10, 10, 32)])
def test_canvas_padding_never_leaks_into_the_result(h, w, size):
    image, mask = _example(h, w, seed=3)
    hw = jnp.asarray([[h, w]], jnp.int32)
    outputs = []
    for garbage in (0, 255):
        image_c, mask_c = _canvases(image, mask, garbage=garbage)
        outputs.append((letterbox_images(jnp.asarray(image_c[None]), hw, size),
                        letterbox_masks(jnp.asarray(mask_c[None]), hw, size)))
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])


def test_mask_packing_round_trips():
    _, mask = _example(37, 61, seed=5)
    packed = np.zeros((CANVAS, transform.packed_width(CANVAS)), np.uint8)
    place_mask(mask, packed)
    bits = np.unpackbits(packed, axis=1)[:, :CANVAS]
    np.testing.assert_array_equal(bits[:37, :61], mask)
    assert bits[37:].sum() == 0 and bits[:, 61:].sum() == 0


def _near_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of the other value."""
    padded = np.pad(mask, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    return ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
            | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))


@pytest.mark.parametrize("h,w,size", [(48, 64, 32), (64, 40, 48), (30, 30, 64)])
def test_mask_letterbox_round_trip_within_one_pixel_at_boundaries(h, w, size):
    mask = np.zeros((h, w), np.uint8)
    mask[h // 5:h // 2, w // 4:w - 3] = 1
    mask[h - 8:h - 2, 2:9] = 1
    image = np.zeros((h, w, 3), np.uint8)
    _, boxed = _device(image, mask, size)
    back = unletterbox(boxed > 0.5, letterbox_params(h, w, size), (h, w))
    wrong = back != mask.astype(bool)
    assert wrong.sum() < 0.1 * mask.size
    assert not (wrong & ~_near_boundary(mask)).any()


def test_image_letterbox_round_trip_is_close():
    # A smooth image survives letterbox and unletterbox up to resampling blur.
    h, w, size = 40, 60, 48
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 4, yy * 6, (xx + yy) * 2], axis=-1).astype(np.uint8)
    boxed, _ = _device(image, np.zeros((h, w), np.uint8), size)
    back = np.stack([unletterbox(boxed[..., c], letterbox_params(h, w, size), (h, w))
                     for c in range(3)], axis=-1)
    assert np.abs(back * 255 - image).mean() < 3.0


def _batch(images: list[np.ndarray], masks: list[np.ndarray], flips: list[bool],
           params: np.ndarray) -> dict[str, jnp.ndarray]:
    pairs = [_canvases(i, m) for i, m in zip(images, masks, strict=True)]
    return {"image": jnp.asarray(np.stack([p[0] for p in pairs])),
            "mask": jnp.asarray(np.stack([p[1] for p in pairs])),
            "hw": jnp.asarray([m.shape for m in masks], jnp.int32),
            "flip": jnp.asarray(flips), "photometric": jnp.asarray(params),
            "tokens": jnp.zeros((len(images), 4), jnp.int32),
            "token_mask": jnp.ones((len(images), 4), bool)}


def test_train_inputs_equal_host_letterbox_flip_and_photometric():
    size = 32
    examples = [_example(48, 64, seed=s) for s in range(3)]
    rng = np.random.default_rng(7)
    params = np.stack([photometric_params(rng) for _ in examples])
    flips = [True, False, True]
    batch = _batch([e[0] for e in examples], [e[1] for e in examples], flips, params)
    out = jax.jit(transform.train_inputs, static_argnums=1)(batch, size)
    for i, (image, mask) in enumerate(examples):
        ref_image, _ = letterbox(image, size)
        ref_mask = letterbox_mask(mask, size)
        if flips[i]:
            ref_image, ref_mask = hflip(ref_image, ref_mask)
        ref = apply_photometric(ref_image.astype(np.float32) / 255, params[i])
        # One 8-bit level before jitter, scaled by at most the contrast x saturation factors.
        assert np.abs(np.asarray(out["image"][i]) - ref).max() <= 1.6 / 255
        np.testing.assert_array_equal(np.asarray(out["mask"][i]), ref_mask)


def test_photometric_device_equals_host_and_stays_in_range():
    rng = np.random.default_rng(1)
    images = rng.random((4, 16, 16, 3), dtype=np.float32)
    params = np.stack([photometric_params(rng) for _ in range(4)])
    out = np.asarray(transform.apply_photometric(jnp.asarray(images), jnp.asarray(params)))
    for i in range(4):
        np.testing.assert_allclose(out[i], apply_photometric(images[i], params[i]), atol=1e-5)
    assert out.min() >= 0.0 and out.max() <= 1.0 and not np.allclose(out, images)
    identity = transform.apply_photometric(jnp.asarray(images),
                                           jnp.asarray(transform.identity_photometric(4)))
    np.testing.assert_allclose(np.asarray(identity), images, atol=1e-6)


def test_num_taps_covers_the_widest_downscale():
    assert transform.num_taps(640, 416) == 5  # support 1.54 -> 2 on each side
    assert transform.num_taps(96, 96) == 3
    assert transform.num_taps(640, 64) == 21


def test_default_method_follows_the_measurements_on_cpu():
    # jax runs on the CPU in the tests: dense weights for small canvases (RefShapes' 96 px,
    # downscaled or not), gathers for large ones (COCO's 640 px).
    assert transform.default_method(96, 96) == "matmul"
    assert transform.default_method(96, 64) == "matmul"
    assert transform.default_method(128, 64) == "matmul"
    assert transform.default_method(640, 416) == "gather"
    assert transform.default_method(192, 96) == "gather"
