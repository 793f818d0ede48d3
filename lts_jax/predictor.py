"""Prediction on a user's image: masks, overlays and position-prior heat maps as PNGs.

All expressions for one image go through the model in one batch (the letterboxed image
repeated). The mask follows the evaluation path exactly: mask logits [S/o, S/o] ->
bilinear to S x S (device) -> ``unletterbox`` to H x W -> ``metrics.binarize`` with
``config.threshold``. The prior heat map is sigmoid(prior logits) -> bilinear to S x S
-> ``unletterbox`` to H x W.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lts_jax import metrics, visualize
from lts_jax.evaluate import upsample_square
from lts_jax.letterbox import letterbox, unletterbox
from lts_jax.models.model import create_model

OUTPUT_KINDS: tuple[str, ...] = ("mask", "overlay", "prior")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One expression's result at the original image size."""

    expression: str
    mask: np.ndarray  # bool[H, W]
    probability: np.ndarray  # float32[H, W], sigmoid of the mask logits
    prior: np.ndarray  # float32[H, W], sigmoid of the position-prior logits


def load_image(path: str | Path) -> np.ndarray:
    """uint8[H, W, 3] RGB, rotated as its EXIF orientation says (as viewers show it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def slugify(text: str, max_len: int = 40) -> str:
    """Lower-case ASCII words joined by '-', at most ``max_len`` characters ('' -> 'expr')."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].rstrip("-")
    return slug or "expr"


def output_paths(
    out_dir: str | Path, image_path: str | Path, index: int, expression: str
) -> dict[str, Path]:
    """'<stem>_<index>_<slug>_{mask,overlay,prior}.png' in ``out_dir``, keyed by kind."""
    base = f"{Path(image_path).stem}_{index:02d}_{slugify(expression)}"
    return {kind: Path(out_dir) / f"{base}_{kind}.png" for kind in OUTPUT_KINDS}


class Predictor:
    """A trained model plus its tokenizer, ready to segment images."""

    def __init__(
        self, config: ml_collections.ConfigDict, variables: Any, tokenizer: Any
    ) -> None:
        if int(config.model.vocab_size) != int(tokenizer.vocab_size):
            raise ValueError(
                f"the checkpoint's vocabulary has {config.model.vocab_size} entries but the "
                f"tokenizer has {tokenizer.vocab_size}: wrong data_dir or tokenizer?"
            )
        self.config = config
        self.tokenizer = tokenizer
        self.model = create_model(config.model)
        device = jax.local_devices()[0]
        self.variables = jax.device_put(variables, device)
        self.image_size = int(config.data.image_size)
        self.threshold = float(config.threshold)
        self._forward = jax.jit(self._forward_impl)

    def _forward_impl(
        self, variables: Any, image: jax.Array, tokens: jax.Array, token_mask: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        mask_logits, aux = self.model.apply(variables, image, tokens, token_mask, train=False)
        prior = jax.nn.sigmoid(aux["prior_logits"].astype(jnp.float32))
        return upsample_square(mask_logits, self.image_size), upsample_square(
            prior, self.image_size
        )

    def predict(self, image: np.ndarray, expressions: Sequence[str]) -> list[Prediction]:
        """Segments ``image`` (uint8[H, W, 3]) once per expression, in one batch."""
        if not expressions:
            raise ValueError("give at least one expression")
        h, w = image.shape[:2]
        boxed, params = letterbox(image, self.image_size)
        n = len(expressions)
        batch_image = np.broadcast_to(
            boxed.astype(np.float32) * np.float32(1 / 255), (n, *boxed.shape)
        )
        max_len = int(self.config.data.max_text_len)
        encoded = [self.tokenizer.encode(e, max_len) for e in expressions]
        tokens = np.stack([t for t, _ in encoded])
        token_mask = np.stack([m for _, m in encoded])
        logits_s, prior_s = jax.device_get(
            self._forward(self.variables, batch_image, tokens, token_mask)
        )
        out = []
        for i, expression in enumerate(expressions):
            logits = unletterbox(logits_s[i], params, (h, w))
            prior = unletterbox(prior_s[i], params, (h, w))
            out.append(
                Prediction(
                    expression=expression,
                    mask=metrics.binarize(logits, self.threshold),
                    # tanh form of the sigmoid: no overflow warnings for large |logit|
                    probability=(0.5 + 0.5 * np.tanh(0.5 * logits)).astype(np.float32),
                    prior=np.clip(prior, 0.0, 1.0),
                )
            )
        return out


def write_prediction(
    image: np.ndarray, prediction: Prediction, paths: dict[str, Path]
) -> dict[str, Path]:
    """Saves the mask (0/255), the tinted overlay and the prior heat map as PNGs."""
    visualize.save_png(visualize.mask_image(prediction.mask), paths["mask"])
    visualize.save_png(visualize.overlay_mask(image, prediction.mask), paths["overlay"])
    visualize.save_png(visualize.heatmap_overlay(image, prediction.prior), paths["prior"])
    return paths


def _load_tokenizer(config: ml_collections.ConfigDict) -> Any:
    from lts_jax.tokenizer import load_tokenizer, tokenizer_path

    path = tokenizer_path(config.data.data_dir, config.data.dataset, config.data.vocab_size)
    try:  # load_tokenizer rebuilds a missing model from the prepared training split
        return load_tokenizer(config)
    except Exception as err:
        if path.exists():
            raise
        raise FileNotFoundError(
            f"tokenizer {path} is missing and could not be rebuilt from the "
            f"{config.data.dataset} data in {config.data.data_dir} ({err}); "
            "pass the data_dir the model was trained with"
        ) from err


def load_predictor(
    workdir: str | Path, *, which: str = "best", data_dir: str | None = None
) -> tuple[Predictor, int]:
    """(Predictor, checkpoint step) from a training workdir; ``data_dir`` overrides where
    the tokenizer is looked for (the workdir's config.json records the training one)."""
    from lts_jax.checkpoint import load_for_inference
    from lts_jax.mesh import make_mesh

    # One device: prediction batches (one row per expression) need not split evenly.
    mesh = make_mesh(jax.local_devices()[:1])
    config, variables, step = load_for_inference(str(workdir), which, mesh=mesh)
    if data_dir:
        config.data.data_dir = data_dir
    return Predictor(config, variables, _load_tokenizer(config)), step


def predict_to_files(
    workdir: str | Path,
    image_path: str | Path,
    expressions: Sequence[str],
    out_dir: str | Path,
    *,
    which: str = "best",
    data_dir: str | None = None,
) -> list[dict[str, Path]]:
    """Writes mask, overlay and prior PNGs for every expression; returns their paths."""
    image = load_image(image_path)  # before the (slow) checkpoint load: fail fast
    predictor, _ = load_predictor(workdir, which=which, data_dir=data_dir)
    predictions = predictor.predict(image, expressions)
    return [
        write_prediction(image, p, output_paths(out_dir, image_path, i, p.expression))
        for i, p in enumerate(predictions)
    ]
