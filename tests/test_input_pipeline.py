"""grain pipelines: batch layout, eval completeness and padding, sharding, determinism, resume.

Most tests use an in-memory source of decoded examples in which object i's image is a flat
colour (red channel 10 * i) and its expressions are "thing <i> take <j>", so every example in a
batch can be traced back to its (object, expression).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import grain
import ml_collections
import numpy as np
import pytest

from lts_jax import input_pipeline as ip
from lts_jax import transform
from lts_jax.letterbox import letterbox, unletterbox
from lts_jax.tokenizer import Tokenizer, train_sentencepiece

S, L, MAX_ORIG = 32, 24, 48
NUM_OBJECTS = 12


def _source() -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(NUM_OBJECTS):
        h, w = int(rng.integers(10, MAX_ORIG + 1)), int(rng.integers(10, MAX_ORIG + 1))
        image = np.zeros((h, w, 3), np.uint8)
        image[..., 0] = 10 * i
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4:h // 2, w // 3:] = 1
        out.append({"image": image, "mask": mask,
                    "expressions": [f"thing {i} take {j}" for j in range(1 + i % 3)]})
    return out


SOURCE = _source()
NUM_PAIRS = sum(len(s["expressions"]) for s in SOURCE)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(train_sentencepiece([e for s in SOURCE for e in s["expressions"]], 64))


def _objects(batch: dict) -> list[int]:
    """Object index of each example (top-left canvas pixel of the flat red image)."""
    return [int(v) // 10 for v in batch["image"][:, 0, 0, 0]]


def _train(tok: Tokenizer, **kw) -> ip.TrainIterator:
    args = dict(global_batch_size=4, canvas_size=MAX_ORIG, max_text_len=L, seed=0)
    args.update(kw)
    return ip.make_train_iterator(SOURCE, tok, **args)


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


def test_train_batch_layout(tok):
    it = _train(tok, flip=True, photometric=True)
    batch = next(it)
    packed = transform.packed_width(MAX_ORIG)
    expected = {"image": ((4, MAX_ORIG, MAX_ORIG, 3), np.uint8),
                "mask": ((4, MAX_ORIG, packed), np.uint8), "hw": ((4, 2), np.int32),
                "flip": ((4,), np.bool_), "photometric": ((4, 3), np.float32),
                "tokens": ((4, L), np.int32), "token_mask": ((4, L), np.bool_),
                "valid": ((4,), np.bool_)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    for i, obj in enumerate(_objects(batch)):
        h, w = SOURCE[obj]["mask"].shape
        assert tuple(batch["hw"][i]) == (h, w)
        assert np.array_equal(batch["image"][i, :h, :w], SOURCE[obj]["image"])
        assert not batch["image"][i, h:].any() and not batch["image"][i, :, w:].any()
        bits = np.unpackbits(batch["mask"][i], axis=1)[:, :MAX_ORIG]
        assert np.array_equal(bits[:h, :w], SOURCE[obj]["mask"])
        assert bits.sum() == bits[:h, :w].sum()
    params = np.concatenate([batch["photometric"]] + [next(it)["photometric"] for _ in range(5)])
    assert (np.abs(params[:, 0]) <= 0.15).all() and (np.abs(params[:, 1:] - 1) <= 0.25).all()
    assert batch["valid"].all() and (batch["tokens"][~batch["token_mask"]] == 0).all()
    # What the train step makes of it.
    inputs = transform.train_inputs(batch, S)
    assert inputs["image"].shape == (4, S, S, 3) and inputs["mask"].shape == (4, S, S)
    assert 0.0 <= float(inputs["image"].min()) and float(inputs["image"].max()) <= 1.0
    assert set(np.unique(np.asarray(inputs["mask"]))) <= {0.0, 1.0}


def test_train_rows_off_by_default(tok):
    batch = next(_train(tok))
    assert not batch["flip"].any()
    assert np.array_equal(batch["photometric"], transform.identity_photometric(4))


def test_image_larger_than_canvas_is_refused_naming_the_field(tok):
    with pytest.raises(ValueError, match="canvas_size"):
        next(_train(tok, canvas_size=16))
    with pytest.raises(ValueError, match="canvas_size"):
        next(iter(_eval(tok, canvas_size=16)))


def test_train_sharding_is_disjoint_and_covering_per_epoch(tok):
    # Global batch 4 over 2 processes: an epoch of 12 objects is 3 batches on each process.
    iters = [_train(tok, process_index=p, process_count=2) for p in range(2)]
    epochs = []
    for _ in range(2):
        per_process = [[o for _ in range(3) for o in _objects(next(it))] for it in iters]
        assert set(per_process[0]).isdisjoint(per_process[1])
        assert sorted(per_process[0] + per_process[1]) == list(range(NUM_OBJECTS))
        epochs.append(per_process)
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_train_is_deterministic_in_seed_and_varies_expressions(tok):
    a = [next(it) for it in [_train(tok, flip=True, photometric=True)] for _ in range(6)]
    it = _train(tok, flip=True, photometric=True)
    _assert_same(a, [next(it) for _ in range(6)])
    other = _train(tok, seed=1)
    assert [_objects(next(other)) for _ in range(3)] != [_objects(b) for b in a[:3]]
    # One expression per object per epoch, and over many epochs not always the same one.
    it = _train(tok)
    picks: dict[int, set[str]] = {}
    for _ in range(3 * 8):  # 8 epochs
        batch = next(it)
        for obj, ids in zip(_objects(batch), batch["tokens"], strict=True):
            text = tok.decode(ids)
            assert text.startswith(f"thing {obj} take ")
            picks.setdefault(obj, set()).add(text)
    assert len(picks[2]) > 1 and len(picks[5]) > 1 and len(picks[0]) == 1


def test_cache_decoded_gives_the_same_batches_and_decodes_each_object_once(tok):
    calls: list[int] = []

    def decode(ex: dict) -> dict:
        calls.append(int(ex["image"][0, 0, 0]) // 10)
        return ex

    kw = dict(batch_size=4, canvas_size=MAX_ORIG, max_text_len=L, seed=0, flip=True,
              photometric=True, decode_fn=decode)
    plain = ip.train_batches(SOURCE, tok, **kw)
    expected = [plain[i] for i in range(3 * 4)]  # 4 epochs, read in order (no threads)
    assert len(calls) == 4 * NUM_OBJECTS
    calls.clear()
    cached = ip.train_batches(SOURCE, tok, cache_decoded=True, **kw)
    _assert_same([cached[i] for i in range(3 * 4)], expected)
    assert sorted(calls) == list(range(NUM_OBJECTS))  # once each, in the first epoch
    # Through the checkpointable iterator (grain's read threads), fresh and restored.
    it = _train(tok, flip=True, photometric=True, cache_decoded=True)
    _assert_same([next(it) for _ in range(6)], expected[:6])
    state = it.get_state()
    restored = _train(tok, flip=True, photometric=True, cache_decoded=True)
    restored.set_state(state)
    _assert_same([next(restored) for _ in range(6)], expected[6:])


def test_cache_decoded_is_refused_when_the_split_could_fill_memory():
    ip.check_decoded_cache_fits(2949, 96, memory_bytes=24 * 10**9)  # RefShapes: 0.11 GB
    with pytest.raises(ip.DecodedCacheTooLargeError,
                       match=r"config.data.cache_decoded: the 120,000 training objects could "
                             r"take up to 196.6 GB decoded \(canvas 640\), more than half of "
                             r"this machine's 24.0 GB; set --config.data.cache_decoded=false"):
        ip.check_decoded_cache_fits(120_000, 640, memory_bytes=24 * 10**9)
    ip.check_decoded_cache_fits(1000, 640)  # 1.6 GB: fits the machine running the tests


def test_train_state_restore_is_exact_across_worker_counts(tok):
    it = _train(tok, flip=True, photometric=True)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = _train(tok, flip=True, photometric=True)
    fresh.set_state(state)
    _assert_same([next(fresh) for _ in range(4)], expected)
    with_workers = _train(tok, flip=True, photometric=True, worker_count=2)
    with_workers.set_state(state)
    try:
        _assert_same([next(with_workers) for _ in range(4)], expected)
        assert with_workers.batches_consumed == 7
    finally:
        with_workers.close()


def test_orbax_checkpoint_round_trip(tok, tmp_path):
    import orbax.checkpoint as ocp

    it = _train(tok)
    for _ in range(2):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = [next(it) for _ in range(3)]
        fresh = _train(tok)
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same([next(fresh) for _ in range(3)], expected)


def test_state_restores_on_another_process_count(tok):
    """A state saved by 1 process resumes on 2 (and back): each process continues with its
    rows of the same global batches, and a state from before process fields left the
    fingerprint still loads."""
    single = _train(tok)
    next(single)
    state = single.get_state()
    expected = [_objects(next(single)) for _ in range(3)]
    pair = [_train(tok, process_index=p, process_count=2) for p in range(2)]
    for it in pair:
        it.set_state(state)
    got = [sorted(_objects(next(pair[0])) + _objects(next(pair[1]))) for _ in range(3)]
    assert got == [sorted(b) for b in expected]
    back = _train(tok)
    back.set_state(pair[1].get_state())
    assert back.batches_consumed == 4
    legacy = json.loads(state)
    legacy["fingerprint"].update(process_index=0, process_count=1)
    old = _train(tok)
    old.set_state(json.dumps(legacy).encode())
    assert _objects(next(old)) == expected[0]


def test_state_of_another_pipeline_is_refused(tok):
    state = _train(tok, seed=0).get_state()
    with pytest.raises(ValueError, match="different pipeline"):
        _train(tok, seed=1).set_state(state)


def test_global_batch_must_divide_over_processes(tok):
    with pytest.raises(ValueError, match="not divisible"):
        _train(tok, global_batch_size=5, process_count=2)
    with pytest.raises(ValueError, match="not divisible"):
        ip.make_eval_loader(SOURCE, tok, global_batch_size=3, image_size=S, max_text_len=L,
                            process_count=2, canvas_size=MAX_ORIG)


def _eval(tok: Tokenizer, **kw) -> ip.EvalLoader:
    args = dict(global_batch_size=4, image_size=S, max_text_len=L, canvas_size=MAX_ORIG)
    args.update(kw)
    return ip.make_eval_loader(SOURCE, tok, **args)


def test_eval_batch_layout_maps_back_to_original(tok):
    batch = next(iter(_eval(tok)))
    expected = {"image": ((4, MAX_ORIG, MAX_ORIG, 3), np.uint8),
                "tokens": ((4, L), np.int32), "token_mask": ((4, L), np.bool_),
                "valid": ((4,), np.bool_), "orig_mask": ((4, MAX_ORIG, MAX_ORIG), np.uint8),
                "orig_hw": ((4, 2), np.int32), "letterbox": ((4, 3), np.float32),
                "pair_id": ((4,), np.int64)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    boxed = np.asarray(transform.eval_inputs(batch, S)["image"])
    for i in range(4):
        h, w = batch["orig_hw"][i]
        obj = _objects(batch)[i]
        assert (h, w) == SOURCE[obj]["mask"].shape
        assert np.array_equal(batch["orig_mask"][i, :h, :w], SOURCE[obj]["mask"])
        assert batch["orig_mask"][i, h:].sum() == 0 and batch["orig_mask"][i, :, w:].sum() == 0
        assert np.array_equal(batch["image"][i, :h, :w], SOURCE[obj]["image"])
        reference, params = letterbox(SOURCE[obj]["image"], S)
        assert np.abs(boxed[i] * 255 - reference).max() <= 1.0
        assert np.array_equal(batch["letterbox"][i], params.as_array())
        # The row is accepted by unletterbox (its consistency check) and maps S x S to h x w.
        assert unletterbox(boxed[i, ..., 0] > 0.5, batch["letterbox"][i], (h, w)).shape == (h, w)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_pair_once_in_order(tok, process_count):
    loaders = [_eval(tok, process_index=p, process_count=process_count)
               for p in range(process_count)]
    assert {ld.num_batches for ld in loaders} == {ip.num_eval_batches(NUM_PAIRS, 4)}
    assert all(ld.num_pairs == NUM_PAIRS for ld in loaders)
    passes = [list(ld) for ld in loaders]
    assert all(len(p) == loaders[0].num_batches for p in passes)  # equal counts, no hang
    _assert_same(passes[0], list(loaders[0]))  # a second pass is identical
    # Global batch b = process 0's rows, then process 1's, ...: pairs in order, then padding.
    rows = [(batch["pair_id"][r], batch["valid"][r], batch["tokens"][r], batch["image"][r])
            for b in range(loaders[0].num_batches) for p in passes
            for batch in [p[b]] for r in range(4 // process_count)]
    ids = [int(r[0]) for r in rows]
    assert ids == list(range(NUM_PAIRS)) + [-1] * (len(rows) - NUM_PAIRS)
    assert [bool(r[1]) for r in rows] == [i >= 0 for i in ids]
    expected = [(o, j) for o in range(NUM_OBJECTS) for j in range(len(SOURCE[o]["expressions"]))]
    for (obj, j), (_, _, tokens, image) in zip(expected, rows, strict=False):
        assert tok.decode(tokens) == f"thing {obj} take {j}"
        assert int(image[0, 0, 0]) // 10 == obj
    for pad in rows[NUM_PAIRS:]:  # well-formed dummies: one token, nothing else
        assert pad[2][0] != 0 and (pad[2][1:] == 0).all() and not pad[3].any()


def test_eval_with_workers_matches_in_process(tok):
    _assert_same(list(_eval(tok, worker_count=2)), list(_eval(tok)))


# --------------------------------------------------------------------------------------------
# Real prepared data (tfds_refcoco builder, RefShapes)


def _config(data_dir: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = 4
    config.eval_batch_size = 4
    config.data = ml_collections.ConfigDict(dict(
        dataset="refshapes", data_dir=data_dir, manual_dir="", image_size=S, canvas_size=128,
        max_text_len=L,
        vocab_size=128, train_split="train", eval_splits="validation", num_workers=0,
        refshapes_num_images=8,
        flip=True, photometric=True))
    return config


@pytest.fixture(scope="module")
def refshapes(tmp_path_factory) -> tuple[ml_collections.ConfigDict, dict]:
    from tfds_refcoco import records

    data_dir = str(tmp_path_factory.mktemp("refshapes_data"))
    counts = records.prepare("refshapes", data_dir, None, refshapes_num_images=8)
    return _config(data_dir), counts


def test_refshapes_loaders_end_to_end(refshapes):
    from lts_jax.tokenizer import load_tokenizer, tokenizer_path

    config, counts = refshapes
    tok = load_tokenizer(config)
    path = tokenizer_path(config.data.data_dir, "refshapes", 128, refshapes_num_images=8)
    assert path.exists() and 2 < tok.vocab_size <= 128
    assert load_tokenizer(config).model_proto == path.read_bytes() == tok.model_proto

    it = ip.create_train_loader(config, tok, process_index=1, process_count=2)
    batch = next(it)
    assert batch["image"].shape == (2, 128, 128, 3) and batch["mask"].any()
    assert (batch["hw"] == 96).all()  # RefShapes images are 96x96
    assert batch["token_mask"][:, 0].all()

    n_batches, n_pairs = ip.eval_size(config, "validation")
    assert n_pairs == counts["validation"]["expressions"]
    loaders = [ip.create_eval_loader(config, "validation", tok, process_index=p, process_count=2)
               for p in range(2)]
    assert all(ld.num_batches == n_batches and ld.num_pairs == n_pairs for ld in loaders)
    ids = [int(i) for ld in loaders for b in ld for i in b["pair_id"]]
    assert sorted(i for i in ids if i >= 0) == list(range(n_pairs))


_NO_TF = """
import sys
from lts_jax import input_pipeline as ip
from lts_jax.tokenizer import load_tokenizer
import ml_collections
config = ml_collections.ConfigDict({cfg!r})
tok = load_tokenizer(config)
next(ip.create_train_loader(config, tok))
next(iter(ip.create_eval_loader(config, "validation", tok)))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras", "keras"))
assert not loaded, loaded
print("ok")
"""


def test_pipeline_never_imports_tensorflow(refshapes):
    config, _ = refshapes
    code = textwrap.dedent(_NO_TF.format(cfg=config.to_dict()))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


# Several objects per image (config.data.objects_per_image): image k's pixels are 10 * k, and
# object j of it has its mask in rows 4j .. 4j + 3.
IMAGE_SIZES = (3, 2, 4, 3)


def _grouped_source() -> list[dict]:
    out = []
    for k, count in enumerate(IMAGE_SIZES):
        image = np.full((20, 24, 3), 10 * k, np.uint8)
        for j in range(count):
            mask = np.zeros((20, 24), np.uint8)
            mask[4 * j:4 * j + 4] = 1
            out.append({"image": image, "mask": mask, "image_id": 100 + k,
                        "expressions": [f"image {k} object {j} left"]})
    return out


GROUPED = _grouped_source()


@pytest.fixture(scope="module")
def group_tok() -> Tokenizer:
    return Tokenizer(train_sentencepiece([e for s in GROUPED for e in s["expressions"]]
                                         + ["right"], 40))


def _grouped(tok: Tokenizer, per_image: int, **kw) -> ip.TrainIterator:
    args = dict(global_batch_size=2 * per_image, canvas_size=MAX_ORIG, max_text_len=L, seed=0,
                objects_per_image=per_image)
    args.update(kw)
    return ip.make_train_iterator(GROUPED, tok, **args)


def _pairs(batch: dict, tok: Tokenizer, per_image: int) -> list[tuple[int, int, str]]:
    """(image of the row's group, object of the row's mask, the row's expression)."""
    out = []
    for row in range(len(batch["mask"])):
        image = int(batch["image"][row // per_image, 0, 0, 0]) // 10
        bits = np.unpackbits(batch["mask"][row], axis=1)
        obj = int(np.flatnonzero(bits.any(axis=1))[0]) // 4
        out.append((image, obj, tok.decode(batch["tokens"][row])))
    return out


def test_image_objects_groups_by_image_id():
    assert ip.image_objects(GROUPED) == ((0, 1, 2), (3, 4), (5, 6, 7, 8), (9, 10, 11))


@pytest.mark.parametrize("per_image", [2, 3, 4])
def test_grouped_batches_bring_each_image_with_its_own_objects(group_tok, per_image):
    it = _grouped(group_tok, per_image, flip=True, photometric=True)
    batch = next(it)
    packed = transform.packed_width(MAX_ORIG)
    assert {k: v.shape for k, v in batch.items()} == {
        "image": (2, MAX_ORIG, MAX_ORIG, 3), "hw": (2, 2), "flip": (2,), "photometric": (2, 3),
        "mask": (2 * per_image, MAX_ORIG, packed), "tokens": (2 * per_image, L),
        "token_mask": (2 * per_image, L), "valid": (2 * per_image,)}
    seen = []
    for i in range(2 * 3):  # 3 epochs of 4 images
        batch = batch if i == 0 else next(it)
        pairs = _pairs(batch, group_tok, per_image)
        for k in range(2):
            group = pairs[k * per_image:(k + 1) * per_image]
            image = group[0][0]
            seen.append(image)
            assert tuple(batch["hw"][k]) == (20, 24)
            objects = [obj for _, obj, _ in group]
            # Distinct objects while the image has enough; then every one of them.
            assert len(set(objects)) == min(per_image, IMAGE_SIZES[image])
            side = "right" if batch["flip"][k] else "left"  # the group's flip swapped words
            assert [text for _, _, text in group] == [f"image {image} object {j} {side}"
                                                      for j in objects]
    assert [sorted(seen[i:i + 4]) for i in range(0, 12, 4)] == [[0, 1, 2, 3]] * 3
    # The stream state resumes exactly, and a state of the one-pair-per-image stream is refused.
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    fresh = _grouped(group_tok, per_image, flip=True, photometric=True)
    fresh.set_state(state)
    _assert_same([next(fresh) for _ in range(3)], expected)
    with pytest.raises(ValueError, match="different pipeline"):
        _grouped(group_tok, per_image).set_state(_grouped(group_tok, 1).get_state())


def test_grouped_global_batch_is_the_same_under_two_processes(group_tok):
    """Process p holds images [p*n, (p+1)*n) of each global batch and their pairs."""
    single = _grouped(group_tok, 2, global_batch_size=8, flip=True, photometric=True)
    pair = [_grouped(group_tok, 2, global_batch_size=8, flip=True, photometric=True,
                     process_index=p, process_count=2) for p in range(2)]
    for _ in range(3):
        whole, halves = next(single), [next(it) for it in pair]
        assert halves[0]["image"].shape[0] == 2 and halves[0]["tokens"].shape[0] == 4
        for name, value in whole.items():
            np.testing.assert_array_equal(
                value, np.concatenate([h[name] for h in halves]), err_msg=name)


def test_grouped_batch_must_hold_whole_images(group_tok):
    with pytest.raises(ValueError, match="objects_per_image"):
        _grouped(group_tok, 3, global_batch_size=4)


def test_grouped_train_inputs_match_the_batch_with_each_image_repeated(group_tok):
    batch = next(_grouped(group_tok, 3, flip=True, photometric=True, seed=5))
    assert batch["flip"].any() and not batch["flip"].all()  # one of each with this seed
    repeated = {k: np.repeat(v, 3, axis=0) if k in transform.IMAGE_FIELDS else v
                for k, v in batch.items()}
    grouped, expected = transform.train_inputs(batch, S), transform.train_inputs(repeated, S)
    np.testing.assert_array_equal(grouped["mask"], expected["mask"])
    np.testing.assert_allclose(grouped["image"], expected["image"][::3], atol=1e-6)
