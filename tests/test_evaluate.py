"""Evaluation: mapping back to the original resolution, padding, shuffling, sums, caching."""

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tiny_workdir import EVAL_SPLIT, get_tiny_workdir

from lts_jax import evaluate, metrics, transform
from lts_jax.letterbox import letterbox_mask, letterbox_params
from lts_jax.mesh import make_mesh, replicate

S = 16  # letterbox side; model logits are S/4 = 4


def _ramp_logits(axis: int) -> np.ndarray:
    """A 4x4 logit map 3, 1, -1, -3 along ``axis``: zero half way (upsampled row/col 7.5)."""
    ramp = np.array([3.0, 1.0, -1.0, -3.0], np.float32)
    return np.broadcast_to(ramp[:, None] if axis == 0 else ramp[None, :], (4, 4)).copy()


@pytest.mark.parametrize(
    "hw, axis",
    [((30, 60), 0), ((60, 30), 1)],  # the ramp runs along the padded axis
    ids=["wide-image-row-split", "tall-image-column-split"],
)
def test_mapping_back_non_square_gives_known_mask(hw, axis):
    h, w = hw
    logits_s = np.asarray(evaluate.upsample_square(jnp.asarray(_ramp_logits(axis))[None], S))[0]
    assert logits_s.shape == (S, S)
    params = letterbox_params(h, w, S).as_array()
    # Known answer: the zero crossing sits in the middle of the content, i.e. the first
    # half of the original rows (wide) / columns (tall) is foreground.
    known = np.zeros((h, w), bool)
    if axis == 0:
        known[: h // 2] = True
    else:
        known[:, : w // 2] = True
    padded_gt = np.zeros((64, 64), np.uint8)
    padded_gt[:h, :w] = known
    inter, union = evaluate.example_counts(logits_s, params, np.array([h, w]), padded_gt, 0.5)
    assert inter == union == known.sum()
    # Shifting the ground truth by one line costs exactly one line.
    shifted = np.zeros_like(padded_gt)
    if axis == 0:
        shifted[1 : h // 2 + 1, :w] = 1
        line = w
    else:
        shifted[:h, 1 : w // 2 + 1] = 1
        line = h
    inter, union = evaluate.example_counts(logits_s, params, np.array([h, w]), shifted, 0.5)
    assert (inter, union) == (known.sum() - line, known.sum() + line)


def _host_batch(rng, n, valid):
    hw = np.array([[30, 60], [60, 30], [16, 16], [20, 40]])[np.arange(n) % 4]
    orig_mask = np.zeros((n, 64, 64), np.uint8)
    image = np.zeros((n, 64, 64, 3), np.uint8)  # uint8 canvases, as the eval pipeline gives
    for i, (h, w) in enumerate(hw):
        orig_mask[i, :h, :w] = rng.integers(0, 2, size=(h, w))
        image[i, :h, :w] = rng.integers(0, 256, size=(h, w, 3))
    return {
        "image": image,
        "tokens": rng.integers(1, 50, size=(n, 5)).astype(np.int32),
        "token_mask": rng.uniform(size=(n, 5)) < 0.7,
        "valid": np.asarray(valid, bool),
        "orig_mask": orig_mask,
        "orig_hw": hw.astype(np.int32),
        "letterbox": np.stack([letterbox_params(h, w, S).as_array() for h, w in hw]),
        "pair_id": np.arange(n, dtype=np.int64),
    }


def test_batch_sums_ignores_padded_examples():
    rng = np.random.default_rng(0)
    batch = _host_batch(rng, 4, [True, False, True, False])
    logits = rng.normal(size=(4, S, S)).astype(np.float32)
    sums = evaluate.batch_sums(logits, batch, threshold=0.5, empty_union_iou=0.0)
    assert sums.pairs == 2
    # Garbage in the padded rows changes nothing.
    garbage = logits.copy()
    garbage[[1, 3]] = 100.0
    batch2 = dict(batch, orig_mask=batch["orig_mask"].copy())
    batch2["orig_mask"][[1, 3]] = 1
    assert evaluate.batch_sums(garbage, batch2, threshold=0.5, empty_union_iou=0.0) == sums
    expected = [
        evaluate.example_counts(logits[i], batch["letterbox"][i], batch["orig_hw"][i],
                                batch["orig_mask"][i], 0.5)
        for i in (0, 2)
    ]
    assert sums == metrics.pair_sums([e[0] for e in expected], [e[1] for e in expected])
    pairs = evaluate.batch_pairs(logits, batch, threshold=0.5)
    assert pairs.pair_id.tolist() == [0, 2] and pairs.expression_pair_id.tolist() == [0, 2]
    assert list(zip(pairs.intersection.tolist(), pairs.union.tolist(), strict=True)) == expected


def test_shuffle_moves_expressions_only_among_valid_examples():
    rng = np.random.default_rng(0)
    valid = [True, True, False, True, False, True]
    batch = _host_batch(rng, 6, valid)
    batch["tokens"] = np.arange(6 * 5, dtype=np.int32).reshape(6, 5)  # rows all distinct
    before = {k: v.copy() for k, v in batch.items()}
    out = evaluate.shuffle_expressions(batch, np.random.default_rng(42))
    for k, v in before.items():  # the input batch is not modified
        np.testing.assert_array_equal(batch[k], v)
    for k in ("image", "valid", "orig_mask", "orig_hw", "letterbox", "pair_id"):
        assert out[k] is batch[k]
    v_idx = np.flatnonzero(valid)
    np.testing.assert_array_equal(out["tokens"][[2, 4]], before["tokens"][[2, 4]])
    np.testing.assert_array_equal(out["token_mask"][[2, 4]], before["token_mask"][[2, 4]])
    # Valid rows: a permutation of the valid rows' expressions, no row keeps its own, and
    # each row's token_mask travels with its tokens.
    src = [int(out["tokens"][i, 0]) // 5 for i in v_idx]
    assert sorted(src) == list(v_idx)
    assert all(s != i for s, i in zip(src, v_idx, strict=True))
    np.testing.assert_array_equal(out["token_mask"][v_idx], before["token_mask"][src])
    # ... and each row says whose expression it now has (padded rows: their own).
    np.testing.assert_array_equal(out["expression_pair_id"][v_idx], before["pair_id"][src])
    np.testing.assert_array_equal(out["expression_pair_id"][[2, 4]], [2, 4])
    # Seeded: the same generator state gives the same permutation.
    again = evaluate.shuffle_expressions(batch, np.random.default_rng(42))
    np.testing.assert_array_equal(again["tokens"], out["tokens"])
    # Fewer than two valid rows: nothing to exchange.
    lone = dict(batch, valid=np.array([True] + [False] * 5))
    np.testing.assert_array_equal(
        evaluate.shuffle_expressions(lone, np.random.default_rng(0))["tokens"], batch["tokens"]
    )


class _PoolModel(nn.Module):
    """Stand-in with LTS's call signature: logits = a * (mean over 4x4 cells of channel 0 - .5)
    plus a per-example offset from the tokens, so shuffling changes the output."""

    @nn.compact
    def __call__(self, image, tokens, token_mask, *, train):
        a = self.param("a", lambda _: jnp.asarray(8.0))
        b, s = image.shape[:2]
        cells = image[..., 0].reshape(b, s // 4, 4, s // 4, 4).mean(axis=(2, 4))
        offset = (tokens * token_mask).sum(axis=1) % 3 - 1.0
        logits = a * (cells - 0.5) + offset[:, None, None]
        return logits, {"prior_logits": logits[:, ::4, ::4], "relevance": logits[:, ::4, ::4]}


def _reference_sums(model, variables, batches, threshold=0.5):
    total = metrics.MetricSums()
    for batch in batches:
        image = transform.eval_inputs(batch, S)["image"]
        logits, _ = model.apply(variables, image, batch["tokens"], batch["token_mask"],
                                train=False)
        logits_s = np.asarray(evaluate.upsample_square(logits, S))
        total = total + evaluate.batch_sums(logits_s, batch, threshold=threshold,
                                            empty_union_iou=0.0)
    return total


def _toy_config() -> ml_collections.ConfigDict:
    """The fields an Evaluator reads, for the stand-in model."""
    return ml_collections.ConfigDict(
        {"seed": 0, "threshold": 0.5, "empty_union_iou": 0.0, "data": {"image_size": S}})


def test_evaluate_batches_matches_reference_and_simulated_hosts():
    rng = np.random.default_rng(3)
    batches = [_host_batch(rng, 8, [True] * 8), _host_batch(rng, 8, [True] * 5 + [False] * 3)]
    model = _PoolModel()
    variables = model.init(jax.random.key(0), jnp.zeros((8, S, S, 3)), batches[0]["tokens"],
                           batches[0]["token_mask"], train=False)
    mesh = make_mesh()
    evaluator = evaluate.Evaluator(_toy_config(), model, mesh)
    forward = evaluator.forward
    assert evaluator.forward is forward  # cached, no re-jit
    sums = evaluator.local_sums(replicate(variables, mesh), batches)
    reference = _reference_sums(model, variables, batches)
    assert sums.pairs == 13
    assert (sums.intersection, sums.union, sums.hits) == (
        reference.intersection, reference.union, reference.hits)
    assert sums.iou_sum == pytest.approx(reference.iou_sum, rel=1e-12)
    # Two "hosts" each see half of every batch; their sums add up to the single-host ones.
    halves = [[{k: v[h * 4 : h * 4 + 4] for k, v in b.items()} for b in batches] for h in (0, 1)]
    parts = [evaluator.local_sums(variables, hb) for hb in halves]
    combined = metrics.sum_over(parts)
    assert (combined.intersection, combined.union, combined.pairs, combined.hits) == (
        sums.intersection, sums.union, sums.pairs, sums.hits)
    assert metrics.finalize(combined) == pytest.approx(metrics.finalize(sums), rel=1e-12)
    compiled = forward._cache_size()
    # Shuffled expressions change the result here (the offset depends on the tokens).
    shuffled = evaluator.local_sums(replicate(variables, mesh), batches,
                                    shuffle_rng=np.random.default_rng(0))
    assert shuffled.pairs == sums.pairs and shuffled != sums
    # The same batch shapes again did not compile again.
    assert forward._cache_size() == compiled


def test_eval_forward_cache_distinguishes_models():
    mesh = make_mesh()
    f1 = evaluate.Evaluator(_toy_config(), _PoolModel(), mesh).forward
    f2 = evaluate.Evaluator(_toy_config(), _PoolModel(), mesh).forward
    assert f1 is not f2


def test_config_fields_used_by_evaluation_exist():
    # The Evaluator reads these; a typo would only surface in a long run.
    from configs.refshapes import get_config

    config: ml_collections.ConfigDict = get_config("tiny")
    for field in ("seed", "threshold", "empty_union_iou", "eval_batch_size"):
        assert field in config
    assert "image_size" in config.data


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from lts_jax.checkpoint import load_for_inference

    workdir = get_tiny_workdir(tmp_path_factory)
    config, variables, step = load_for_inference(str(workdir), "best")
    return workdir, config, variables, step


def test_evaluate_split_end_to_end(tiny_run):
    from lts_jax.input_pipeline import eval_size
    from lts_jax.models.model import create_model
    from lts_jax.tokenizer import load_tokenizer

    _, config, variables, _ = tiny_run
    model, tokenizer, mesh = create_model(config.model), load_tokenizer(config), make_mesh()
    evaluator = evaluate.Evaluator(config, model, mesh, tokenizer)
    result = evaluator.evaluate(variables, EVAL_SPLIT)
    assert set(result) == set(metrics.METRIC_KEYS) | {"pairs"}
    assert result["pairs"] == eval_size(config, EVAL_SPLIT)[1] > 0
    assert all(0.0 <= result[k] <= 1.0 for k in metrics.METRIC_KEYS)
    forward = evaluator.forward
    compiled = forward._cache_size()
    # Two simulated hosts, each loading its half of every batch, add up to the same sums;
    # evaluating again (as validation does every eval_every steps) does not recompile.
    single = evaluator.sums(variables, EVAL_SPLIT)
    assert forward._cache_size() == compiled
    hosts = [
        evaluator.local_sums(variables, evaluator.loader(EVAL_SPLIT, process_index=i,
                                                         process_count=2))
        for i in range(2)
    ]
    combined = metrics.sum_over(hosts)
    assert (combined.intersection, combined.union, combined.pairs, combined.hits) == (
        single.intersection, single.union, single.pairs, single.hits)
    assert combined.iou_sum == pytest.approx(single.iou_sum, rel=1e-12)
    assert metrics.finalize(single) == pytest.approx(result, rel=1e-12)
    # Per-pair counts: every pair once, in pair-id order, adding up to the same metrics.
    again, pairs = evaluator.evaluate_pairs(variables, EVAL_SPLIT)
    assert again == pytest.approx(result, rel=1e-12)
    assert pairs.pair_id.tolist() == list(range(result["pairs"]))
    assert pairs.expression_pair_id.tolist() == pairs.pair_id.tolist()
    assert (int(pairs.intersection.sum()), int(pairs.union.sum())) == (
        single.intersection, single.union)
    infos = evaluate.pair_infos(config, EVAL_SPLIT)
    assert [i.pair_id for i in infos] == list(range(result["pairs"]))
    # The report's pictures go through the same forward: their masks give the same counts.
    # (Reusing the compiled forward: no new compilation.)
    ids = [0, result["pairs"] - 1, 3]
    compiled = forward._cache_size()
    pictures = evaluator.pair_pictures(variables, EVAL_SPLIT, ids)
    assert forward._cache_size() == compiled
    for pid, pic in zip(ids, pictures, strict=True):
        assert pic.image.shape[:2] == pic.gt.shape == pic.pred.shape == pic.prior.shape
        assert metrics.intersection_union(pic.pred, pic.gt) == (
            pairs.intersection[pid], pairs.union[pid])
        assert 0.0 <= pic.prior.min() and pic.prior.max() <= 1.0
    # Shuffled: each pair names the pair whose expression it read.
    _, shuffled = evaluator.evaluate_pairs(variables, EVAL_SPLIT, shuffle_expressions=True)
    assert shuffled.pair_id.tolist() == pairs.pair_id.tolist()
    assert sorted(shuffled.expression_pair_id.tolist()) == pairs.pair_id.tolist()
    assert (shuffled.expression_pair_id != shuffled.pair_id).any()


def test_ground_truth_logits_score_near_perfect_through_real_loader(tiny_run):
    # Logits made from each example's letterboxed ground truth must map back onto the
    # original mask: any misalignment in unletterboxing would show as a low IoU.
    from lts_jax.input_pipeline import create_eval_loader, eval_size
    from lts_jax.tokenizer import load_tokenizer

    _, config, _, _ = tiny_run
    loader = create_eval_loader(config, EVAL_SPLIT, load_tokenizer(config))
    total, padded = metrics.MetricSums(), 0
    for batch in loader:
        padded += int((~batch["valid"]).sum())
        size = int(config.data.image_size)
        boxed = np.stack([letterbox_mask(m[:h, :w], size)
                          for m, (h, w) in zip(batch["orig_mask"], batch["orig_hw"], strict=True)])
        logits_s = np.where(boxed > 0.5, 10.0, -10.0).astype(np.float32)
        total = total + evaluate.batch_sums(logits_s, batch, threshold=0.5, empty_union_iou=0.0)
    result = metrics.finalize(total)
    assert padded > 0 and result["pairs"] == eval_size(config, EVAL_SPLIT)[1]
    # (measured 0.95; shifting the logits by one letterbox pixel drops it to 0.83)
    assert result["oIoU"] > 0.93 and result["prec@0.9"] == 1.0


def _run_eval(workdir, *args):
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, str(repo / "eval.py"), "--workdir", str(workdir), *args],
        cwd=repo, env=env, capture_output=True, text=True, timeout=240,
    )


def test_eval_cli_writes_its_own_folder_with_report(tiny_run):
    import csv
    import re

    from train_fixtures import enable_compile_cache

    enable_compile_cache()  # the second eval.py loads the first one's compiled forward
    workdir, config, _, step = tiny_run
    res = _run_eval(workdir, "--splits", EVAL_SPLIT, "--shuffle_expressions")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"| refshapes/{EVAL_SPLIT} |" in res.stdout
    assert f"| refshapes/{EVAL_SPLIT} (shuffled expressions) |" in res.stdout
    first = workdir / "eval" / f"step_{step:06d}_{EVAL_SPLIT}_shuffled"
    assert str(first) in res.stdout
    data = json.loads((first / "eval_results.json").read_text())
    assert data["checkpoint_step"] == step and data["threshold"] == config.threshold
    assert data["splits"] == [EVAL_SPLIT] and data["shuffle_expressions"] is True
    assert [(r["split"], r["shuffled"]) for r in data["results"]] == [
        (EVAL_SPLIT, False), (EVAL_SPLIT, True)]
    pairs = data["results"][0]["pairs"]
    assert pairs == data["results"][1]["pairs"] > 0
    assert (first / "eval_results.csv").exists() and (first / "eval_results.md").exists()
    # Per-pair tables: exactly one row per evaluated pair, and the table's numbers follow
    # from them.
    for name, row in (("pairs_validation.csv", 0), ("pairs_validation_shuffled.csv", 1)):
        with (first / name).open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == pairs
        assert [int(r["pair_id"]) for r in rows] == list(range(pairs))
        inter = [int(r["intersection"]) for r in rows]
        union = [int(r["union"]) for r in rows]
        recomputed = metrics.finalize(metrics.pair_sums(inter, union))
        assert recomputed["oIoU"] * 100 == pytest.approx(data["results"][row]["metrics"]["oIoU"])
        assert recomputed["mIoU"] * 100 == pytest.approx(data["results"][row]["metrics"]["mIoU"])
        assert all(r["expression"] and int(r["ref_id"]) >= 0 for r in rows)
    # The report: self-contained (no external references), with the gallery pictures.
    page = (first / "report.html").read_text()
    pictures = re.findall(r'<img src="data:image/(?:png|jpeg);base64,', page)
    assert len(pictures) >= 6
    assert page.count("<svg") == 2 and "shuffled: " in page
    assert not re.search(r'(src|href)="(http|/)', page)
    # A second evaluation with other splits leaves the first one in place.
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    res = _run_eval(workdir, "--splits", "testA", "--gallery=0")
    assert res.returncode == 0, res.stderr[-3000:]
    second = workdir / "eval" / f"step_{step:06d}_testA"
    assert (second / "pairs_testA.csv").exists() and (second / "report.html").exists()
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert not (workdir / "eval_results.json").exists()  # eval.py no longer writes there
