"""Prediction library, pictures, and predict.py end to end."""

import json
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
        "panel": "photo.v1_03_red-mug_panel.png",
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
    over = visualize.overlay_mask(image, mask, colour=(200, 0, 0), alpha=0.5, outline_width=0)
    assert over[1, 2].tolist() == [150, 50, 50] and over[0, 0].tolist() == [100, 100, 100]
    outlined = visualize.overlay_mask(image, mask, colour=(200, 0, 0), alpha=0.5)
    assert outlined[1, 2].tolist() == [200, 0, 0]  # a one-pixel mask is all outline
    cmap = visualize.jet_colormap(np.array([0.0, 0.5, 1.0]))
    assert cmap[0].tolist() == [0, 0, 128] and cmap[2].tolist() == [128, 0, 0]
    assert cmap[1].tolist() == [128, 255, 128]
    heat = visualize.heatmap_overlay(image, np.zeros((3, 4)), alpha=1.0)
    assert (heat == [0, 0, 128]).all()
    # vmax rescales: 0.2 of a 0..0.2 scale is the top colour.
    assert visualize.heatmap_overlay(image, np.full((3, 4), 0.2), alpha=1.0,
                                     vmax=0.2)[0, 0].tolist() == [128, 0, 0]
    with pytest.raises(ValueError, match="size"):
        visualize.overlay_mask(image, np.zeros((4, 4), bool))
    path = visualize.save_png(over, tmp_path / "sub" / "o.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), over)


def _scene(object_colour):
    """A dark 40x40 image with a 16x16 square of ``object_colour`` and its mask."""
    image = np.full((40, 40, 3), 30, np.uint8)
    image[12:28, 12:28] = object_colour
    mask = np.zeros((40, 40), bool)
    mask[12:28, 12:28] = True
    return image, mask


def _distance(a, b):
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


@pytest.mark.parametrize("object_colour", [(220, 20, 30), (30, 200, 40), (250, 250, 250),
                                           (255, 220, 0)])
def test_overlay_colour_contrasts_with_the_object(object_colour):
    image, mask = _scene(object_colour)
    colour = visualize.contrast_colour(image, mask)
    assert colour in visualize.PALETTE
    # Farther from the object than any other palette colour, so never red on a red object.
    assert _distance(colour, object_colour) == max(
        _distance(c, object_colour) for c in visualize.PALETTE)
    over = visualize.overlay_mask(image, mask)  # colour chosen by default
    outline = visualize.mask_outline(mask, visualize.default_outline_width(mask.shape))
    assert (over[outline] == colour).all()  # opaque outline
    inside = mask & ~outline
    assert _distance(over[inside][0], object_colour) > 50  # the fill shows on the object
    assert (over[~mask] == image[~mask]).all()


def test_red_object_gets_a_non_red_fill():
    image, mask = _scene((230, 25, 25))
    r, g, b = visualize.contrast_colour(image, mask)
    assert max(g, b) > r  # not red
    # The old fixed tint (255, 40, 40) all but vanished on a red object; the new one does not.
    old = visualize.overlay_mask(image, mask, colour=(255, 40, 40), outline_width=0)
    new = visualize.overlay_mask(image, mask)
    assert _distance(new[20, 20], image[20, 20]) > 4 * _distance(old[20, 20], image[20, 20])


def test_mask_outline_and_ground_truth_halo():
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    assert visualize.mask_outline(mask, 1).sum() == 16
    assert visualize.mask_outline(mask, 2).sum() == 24
    assert not visualize.mask_outline(np.zeros((4, 4), bool)).any()
    edge = np.ones((3, 3), bool)  # the image border counts as the mask's border
    assert visualize.mask_outline(edge, 1).sum() == 8
    image = np.full((9, 9, 3), 120, np.uint8)
    drawn = visualize.outline_ground_truth(image, mask, width=1)
    assert (drawn[2, 4] == visualize.GT_COLOUR).all() and (drawn[1, 4] == 0).all()
    assert (drawn[4, 4] == 120).all()


def test_colour_bar_and_panel():
    bar = visualize.colour_bar(100, 0.4)
    column = bar[:, 3]
    coloured = np.flatnonzero(np.abs(column.astype(int) - 255).sum(axis=1) > 30)
    top, bottom = column[coloured[1]], column[coloured[-2]]
    assert top[0] > 100 and top[2] < 50  # red end at the top (max)
    assert bottom[2] > 100 and bottom[0] < 50  # blue end at the bottom (0)
    image, mask = _scene((230, 25, 25))
    prior = np.zeros((40, 40), np.float32)
    prior[20, 20] = 0.3
    panel = visualize.prediction_panel(image, mask, prior, "the red square " * 8)
    # 40 px images are enlarged 7x (280 px): prediction | prior | colour bar, caption below.
    assert panel.dtype == np.uint8 and panel.shape[1] > 2 * 280 and panel.shape[0] > 280 + 40
    caption = panel[290:]
    assert (caption < 100).any()  # text drawn
    assert visualize.display_size((40, 60), low=256, high=480) == (200, 300)
    assert visualize.display_size((960, 1280), low=256, high=480) == (360, 480)


def test_read_pairs(tmp_path):
    jsonl = tmp_path / "sub" / "pairs.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text('{"image": "a.png", "expression": "the cup"}\n\n'
                     f'{{"image": "{tmp_path / "b.jpg"}", "expression": ""}}\n')
    requests = predictor.read_pairs(jsonl)
    assert [(r.image, r.expression, r.index) for r in requests] == [
        (jsonl.parent / "a.png", "the cup", 1), (tmp_path / "b.jpg", "", 3)]
    jsonl.write_text('{"image": "a.png", "expression": "x"}\n{"image": "a.png"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: .*expression"):
        predictor.read_pairs(jsonl)
    jsonl.write_text("not json\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: not JSON"):
        predictor.read_pairs(jsonl)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        predictor.read_pairs(tmp_path / "absent.jsonl")


def test_warning_texts():
    assert predictor.expression_warnings("the red cup", 3, 8) == []
    (empty,) = predictor.expression_warnings("  ", 0, 8)
    assert "empty expression" in empty
    (long,) = predictor.expression_warnings("w " * 11, 11, 8)
    assert "11 tokens" in long and "first 8" in long and "3 dropped" in long
    (nothing,) = predictor.mask_warnings("the cup", np.zeros((2, 2), bool),
                                         np.full((2, 2), 0.3125, np.float32), 0.5)
    assert "empty mask" in nothing and "0.312" in nothing and "0.5" in nothing
    assert predictor.mask_warnings("x", np.ones((2, 2), bool), np.ones((2, 2)), 0.5) == []


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


def test_predictor_warnings(tiny_predictor, monkeypatch):
    # Batches of two expressions, as in the test above: the compiled forward is reused.
    image = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    long = "the red circle a blue square on the left green triangle at the top right"
    assert tiny_predictor.count_tokens(long) > 8  # max_text_len of the fixture
    assert tiny_predictor.count_tokens("the red circle") <= 8
    empty, cut = tiny_predictor.predict(image, ["", long])
    assert any("empty expression" in w for w in empty.warnings) and empty.num_tokens == 0
    dropped = cut.num_tokens - 8
    assert [w for w in cut.warnings if "token" in w] == [
        f"expression {long[:57] + '...'!r} is {cut.num_tokens} tokens long; the model reads "
        f"the first 8 (max_text_len), {dropped} dropped"]
    # A threshold no pixel reaches: every mask is empty, and each says so.
    threshold = 1.0 - 1e-15
    monkeypatch.setattr(tiny_predictor, "threshold", threshold)
    plain, _ = tiny_predictor.predict(image, ["the red circle", "blue square"])
    assert not plain.mask.any() and plain.num_tokens <= 8
    assert plain.warnings == (
        f"empty mask for 'the red circle': the highest pixel probability is "
        f"{plain.probability.max():.3f}, below the threshold {threshold:g}",)


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
    assert written == expected and len(written) == 8
    assert "my photo_01_big-blue-square-on-the-left_mask.png" in written
    for name in written:
        with Image.open(out / name) as img:
            if name.endswith("_panel.png"):
                assert img.width > 2 * 83 and img.mode == "RGB"
                continue
            assert img.size == (83, 50)  # PIL: (width, height)
            if name.endswith("_mask.png"):
                assert img.mode == "L"
                assert set(np.unique(np.asarray(img)).tolist()) <= {0, 255}
            else:
                assert img.mode == "RGB"
    assert "the red circle" in res.stdout


def test_cli_pairs_file_names_outputs_per_line_and_warns(tmp_path_factory, tmp_path):
    workdir = get_tiny_workdir(tmp_path_factory)
    rng = np.random.default_rng(2)
    for name, size in (("a.png", (30, 40)), ("b.jpg", (44, 22))):
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(
            tmp_path / name)
    long = " ".join(["the big red circle left of the small blue square"] * 3)
    lines = [{"image": "a.png", "expression": "the red circle"},
             {"image": "b.jpg", "expression": ""},
             {"image": "a.png", "expression": long}]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    res = _run_cli("--workdir", str(workdir), "--pairs", str(jsonl), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    expected = sorted(
        p.name for i, x in enumerate(lines, start=1)
        for p in predictor.output_paths(out, x["image"], i, x["expression"]).values())
    assert sorted(p.name for p in out.iterdir()) == expected and len(expected) == 12
    assert "a_01_the-red-circle_panel.png" in expected and "b_02_expr_mask.png" in expected
    with Image.open(out / "b_02_expr_mask.png") as img:
        assert img.size == (22, 44)
    warnings = [line for line in res.stderr.splitlines() if "predict.py: warning:" in line]
    assert sum("b.jpg: empty expression" in w for w in warnings) == 1
    assert sum("tokens long" in w and "dropped" in w for w in warnings) == 1
    # Either --pairs or --image/--expression.
    res = _run_cli("--workdir", str(workdir), "--pairs", str(jsonl), "--image", "x.png",
                   "--out", str(out))
    assert res.returncode != 0 and "either --pairs" in res.stderr
