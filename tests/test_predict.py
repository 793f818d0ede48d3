"""Prediction library, pictures, and predict.py end to end."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from tiny_workdir import get_tiny_workdir, random_variables

from lts_jax import predictor, visualize
from lts_jax.models.model import create_model, model_config
from lts_jax.tokenizer import Tokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]


def test_slug_and_output_paths(tmp_path):
    assert predictor.slugify("The cup on the LEFT!") == "the-cup-on-the-left"
    assert predictor.slugify("???") == "expr"
    assert len(predictor.slugify("word " * 40)) <= 40
    paths = predictor.output_paths(tmp_path, "/x/photo.v1.jpg", 3, "red mug")
    assert {k: p.name for k, p in paths.items()} == {
        "mask": "photo.v1_03_red-mug_mask.png",
        "overlay": "photo.v1_03_red-mug_overlay.png",
        "prior": "photo.v1_03_red-mug_prior.png",
    }


def test_load_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        predictor.load_image(missing)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        predictor.load_image(broken)
    good = tmp_path / "grey.png"
    Image.fromarray(np.full((5, 7), 9, np.uint8)).save(good)
    img = predictor.load_image(good)
    assert img.shape == (5, 7, 3) and img.dtype == np.uint8


def test_visualize_pictures(tmp_path):
    image = np.full((3, 4, 3), 100, np.uint8)
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = True
    assert visualize.mask_image(mask).tolist()[1] == [0, 0, 255, 0]
    over = visualize.overlay_mask(image, mask, colour=(200, 0, 0), alpha=0.5)
    assert over[1, 2].tolist() == [150, 50, 50] and over[0, 0].tolist() == [100, 100, 100]
    cmap = visualize.jet_colormap(np.array([0.0, 0.5, 1.0]))
    assert cmap[0].tolist() == [0, 0, 128] and cmap[2].tolist() == [128, 0, 0]
    assert cmap[1].tolist() == [128, 255, 128]
    heat = visualize.heatmap_overlay(image, np.zeros((3, 4)), alpha=1.0)
    assert (heat == [0, 0, 128]).all()
    with pytest.raises(ValueError, match="size"):
        visualize.overlay_mask(image, np.zeros((4, 4), bool))
    path = visualize.save_png(over, tmp_path / "sub" / "o.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), over)


@pytest.fixture(scope="module")
def tiny_predictor():
    import ml_collections

    tokenizer = Tokenizer(train_sentencepiece(
        ["the red circle", "a blue square on the left", "green triangle at the top right"] * 5,
        vocab_size=40))
    config = ml_collections.ConfigDict({
        "model": model_config("tiny"),
        "data": {"image_size": 64, "max_text_len": 8},
        "threshold": 0.5,
    })
    config.model.vocab_size = tokenizer.vocab_size
    variables = random_variables(create_model(config.model), 64, 8)
    return predictor.Predictor(config, variables, tokenizer)


def test_predictor_outputs_original_size_and_matches_eval_path(tiny_predictor):
    from lts_jax import evaluate, metrics
    from lts_jax.letterbox import letterbox, unletterbox

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(37, 90, 3), dtype=np.uint8)
    preds = tiny_predictor.predict(image, ["the red circle", "blue square"])
    assert [p.expression for p in preds] == ["the red circle", "blue square"]
    for p in preds:
        assert p.mask.shape == p.prior.shape == p.probability.shape == (37, 90)
        assert p.mask.dtype == bool and 0 <= p.prior.min() and p.prior.max() <= 1
    # The mask is what evaluation would compute for the same logits.
    p = tiny_predictor
    boxed, params = letterbox(image, 64)
    tokens, token_mask = p.tokenizer.encode("blue square", 8)
    apply = jax.jit(lambda v, *x: p.model.apply(v, *x, train=False)[0])
    logits = apply(p.variables, boxed[None].astype(np.float32) / 255, tokens[None],
                   token_mask[None])
    logits_s = np.asarray(evaluate.upsample_square(logits, 64))[0]
    expected = metrics.binarize(unletterbox(logits_s, params, (37, 90)), 0.5)
    assert (preds[1].mask != expected).mean() < 1e-3  # batched vs single forward rounding


def test_predictor_rejects_vocab_mismatch(tiny_predictor):
    config = tiny_predictor.config.copy_and_resolve_references()
    config.model.vocab_size += 1
    with pytest.raises(ValueError, match="vocabulary"):
        predictor.Predictor(config, tiny_predictor.variables, tiny_predictor.tokenizer)


def _run_cli(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(REPO / "predict.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_missing_image_is_named(tmp_path):
    res = _run_cli("--workdir", str(tmp_path), "--image", str(tmp_path / "absent.jpg"),
                   "--expression", "x", "--out", str(tmp_path / "out"))
    assert res.returncode != 0
    assert "absent.jpg" in res.stderr and "Traceback" not in res.stderr


def test_cli_empty_workdir_is_named(tmp_path):
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(image)
    workdir = tmp_path / "empty_run"
    workdir.mkdir()
    res = _run_cli("--workdir", str(workdir), "--image", str(image), "--expression", "x",
                   "--out", str(tmp_path / "out"))
    assert res.returncode != 0
    assert "empty_run" in res.stderr and "Traceback" not in res.stderr


def test_cli_end_to_end_writes_original_size_pngs(tmp_path_factory, tmp_path):
    workdir = get_tiny_workdir(tmp_path_factory)
    image_path = tmp_path / "my photo.jpg"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, size=(50, 83, 3), dtype=np.uint8)).save(image_path)
    out = tmp_path / "out"
    expressions = ["the red circle", "big blue square on the left"]
    res = _run_cli("--workdir", str(workdir), "--image", str(image_path), "--expression",
                   expressions[0], "--expression", expressions[1], "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    written = sorted(p.name for p in out.iterdir())
    expected = sorted(
        p.name for i, e in enumerate(expressions)
        for p in predictor.output_paths(out, image_path, i, e).values()
    )
    assert written == expected and len(written) == 6
    assert "my photo_01_big-blue-square-on-the-left_mask.png" in written
    for name in written:
        with Image.open(out / name) as img:
            assert img.size == (83, 50)  # PIL: (width, height)
            if name.endswith("_mask.png"):
                assert img.mode == "L"
                assert set(np.unique(np.asarray(img)).tolist()) <= {0, 255}
            else:
                assert img.mode == "RGB"
    assert "the red circle" in res.stdout
