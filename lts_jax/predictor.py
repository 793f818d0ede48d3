"""Prediction on a user's image: masks, overlays, position-prior heat maps and panels as PNGs.

All expressions for one image go through the model in one batch (the letterboxed image
repeated). The mask follows the evaluation path exactly: mask logits [S/o, S/o] ->
bilinear to S x S (device) -> ``unletterbox`` to H x W -> ``metrics.binarize`` with
``config.threshold``. The prior heat map is sigmoid(prior logits) -> bilinear to S x S
-> ``unletterbox`` to H x W.

Each ``Prediction`` carries one-line warnings for what a user should know: an empty
expression, an expression cut to ``max_text_len`` tokens, an empty mask. ``read_pairs``
reads many (image, expression) pairs from a JSONL file for ``predict_to_files``.
"""

from __future__ import annotations

import dataclasses
import json
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

OUTPUT_KINDS: tuple[str, ...] = ("mask", "overlay", "prior", "panel")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One expression's result at the original image size."""

    expression: str
    mask: np.ndarray  # bool[H, W]
    probability: np.ndarray  # float32[H, W], sigmoid of the mask logits
    prior: np.ndarray  # float32[H, W], sigmoid of the position-prior logits
    num_tokens: int = 0  # tokens of the whole expression (the model reads max_text_len)
    warnings: tuple[str, ...] = ()  # one line each, for the user


@dataclasses.dataclass(frozen=True)
class PairRequest:
    """One (image, expression) to segment; ``index`` numbers its output files."""

    image: Path
    expression: str
    index: int


@dataclasses.dataclass(frozen=True)
class Written:
    """What ``predict_to_files`` wrote for one request."""

    request: PairRequest
    paths: dict[str, Path]
    warnings: tuple[str, ...]


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def expression_warnings(expression: str, num_tokens: int, max_text_len: int) -> list[str]:
    """Warnings about the text itself: empty, or longer than the model reads."""
    if not expression.strip():
        return ["empty expression: the model reads only an unknown token and segments "
                "whatever its prior favours"]
    if num_tokens > max_text_len:
        return [f"expression {_short(expression)!r} is {num_tokens} tokens long; the model "
                f"reads the first {max_text_len} (max_text_len), {num_tokens - max_text_len} "
                "dropped"]
    return []


def mask_warnings(expression: str, mask: np.ndarray, probability: np.ndarray,
                  threshold: float) -> list[str]:
    """A warning when nothing was segmented, with the highest probability reached."""
    if np.asarray(mask).any():
        return []
    top = float(np.max(probability)) if np.size(probability) else 0.0
    return [f"empty mask for {_short(expression)!r}: the highest pixel probability is "
            f"{top:.3f}, below the threshold {threshold:g}"]


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
    """'<stem>_<index>_<slug>_{mask,overlay,prior,panel}.png' in ``out_dir``, keyed by kind."""
    base = f"{Path(image_path).stem}_{index:02d}_{slugify(expression)}"
    return {kind: Path(out_dir) / f"{base}_{kind}.png" for kind in OUTPUT_KINDS}


def read_pairs(path: str | Path) -> list[PairRequest]:
    """Requests from a JSONL file: one ``{"image": path, "expression": text}`` object per
    line (blank lines skipped). A relative image path is relative to the file's folder.
    ``index`` is the line number (from 1), so outputs are named per line. Errors name the
    file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg})") from err
        if not isinstance(item, dict):
            raise ValueError(f'{where}: expected an object {{"image": ..., "expression": ...}}')
        missing = [k for k in ("image", "expression") if not isinstance(item.get(k), str)]
        if missing:
            raise ValueError(f"{where}: needs string field(s) {', '.join(missing)}")
        image = Path(item["image"]).expanduser()
        out.append(PairRequest(image if image.is_absolute() else path.parent / image,
                               item["expression"], number))
    if not out:
        raise ValueError(f"{path} holds no pairs")
    return out


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
            mask = metrics.binarize(logits, self.threshold)
            # tanh form of the sigmoid: no overflow warnings for large |logit|
            probability = (0.5 + 0.5 * np.tanh(0.5 * logits)).astype(np.float32)
            num_tokens = self.count_tokens(expression)
            notes = expression_warnings(expression, num_tokens, max_len) + mask_warnings(
                expression, mask, probability, self.threshold)
            out.append(
                Prediction(
                    expression=expression,
                    mask=mask,
                    probability=probability,
                    prior=np.clip(prior, 0.0, 1.0),
                    num_tokens=num_tokens,
                    warnings=tuple(notes),
                )
            )
        return out

    def count_tokens(self, expression: str) -> int:
        """Tokens of the whole expression (0 for an empty one), before truncation."""
        if not expression.strip():
            return 0
        # A piece covers at least one character (plus a possible leading word marker).
        _, mask = self.tokenizer.encode(expression, len(expression) + 2)
        return int(np.count_nonzero(mask))


def write_prediction(
    image: np.ndarray, prediction: Prediction, paths: dict[str, Path]
) -> dict[str, Path]:
    """Saves the mask (0/255), the overlay (fill + outline in a colour contrasting with the
    object) and the prior heat map (scale 0..1) at the original size, and the panel
    (overlay | prior scaled 0..max with its colour bar, the expression below)."""
    visualize.save_png(visualize.mask_image(prediction.mask), paths["mask"])
    visualize.save_png(visualize.overlay_mask(image, prediction.mask), paths["overlay"])
    visualize.save_png(visualize.heatmap_overlay(image, prediction.prior), paths["prior"])
    share = 100.0 * float(prediction.mask.mean()) if prediction.mask.size else 0.0
    note = (f"left: mask, {int(prediction.mask.sum()):,} px ({share:.1f}% of the image); "
            f"right: position prior, 0..max")
    panel = visualize.prediction_panel(image, prediction.mask, prediction.prior,
                                       prediction.expression, note=note)
    visualize.save_png(panel, paths["panel"])
    return paths


def _load_tokenizer(config: ml_collections.ConfigDict) -> Any:
    from lts_jax.tokenizer import config_tokenizer_path, load_tokenizer

    path = config_tokenizer_path(config)
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


def image_requests(image_path: str | Path, expressions: Sequence[str]) -> list[PairRequest]:
    """One image with several expressions, numbered 0, 1, ..."""
    return [PairRequest(Path(image_path), e, i) for i, e in enumerate(expressions)]


def predict_to_files(
    workdir: str | Path,
    requests: Sequence[PairRequest],
    out_dir: str | Path,
    *,
    which: str = "best",
    data_dir: str | None = None,
) -> list[Written]:
    """Writes mask, overlay, prior and panel PNGs for every request, in request order; the
    expressions of one image run as one batch."""
    if not requests:
        raise ValueError("give at least one (image, expression) pair")
    by_image: dict[Path, list[int]] = {}
    for k, request in enumerate(requests):
        by_image.setdefault(Path(request.image), []).append(k)
    for path in by_image:  # before the (slow) checkpoint load: fail fast
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
    load_image(next(iter(by_image)))
    predictor, _ = load_predictor(workdir, which=which, data_dir=data_dir)
    written: list[Written | None] = [None] * len(requests)
    for path, ks in by_image.items():
        image = load_image(path)
        predictions = predictor.predict(image, [requests[k].expression for k in ks])
        for k, p in zip(ks, predictions, strict=True):
            r = requests[k]
            paths = write_prediction(image, p, output_paths(out_dir, r.image, r.index,
                                                            r.expression))
            written[k] = Written(r, paths, p.warnings)
    return [w for w in written if w is not None]
