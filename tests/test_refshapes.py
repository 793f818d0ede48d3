"""RefShapes generator: layout, determinism, masks, expression semantics and difficulty."""

from __future__ import annotations

import io
import json
import math
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tfds_refcoco import refshapes
from tfds_refcoco.refshapes_grammar import (
    COLORS,
    LR_SWAP,
    SceneObject,
    mirror_text,
    parse,
    resolve,
)

# pycocotools' own numpy-2 deprecation noise
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NUM_IMAGES = 24
SIZE = refshapes.DEFAULT_IMAGE_SIZE


class PlainUnpickler(pickle.Unpickler):
    """Admits no globals at all: only the built-in containers and scalars survive."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def load_refs(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return PlainUnpickler(f).load()


def load(root: Path) -> tuple[dict, list[dict]]:
    instances = json.loads((root / "refshapes" / "instances.json").read_text())
    return instances, load_refs(root / "refshapes" / "refs(unc).p")


def coco_mask(ann: dict, h: int, w: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w)))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("refshapes")
    refshapes.generate(path, seed=0, num_images=NUM_IMAGES)
    return path


@pytest.fixture(scope="module")
def data(root: Path) -> dict:
    """Per image: its objects (annotation order), annotations and (ann index, sentence) pairs."""
    instances, refs = load(root)
    names = {c["id"]: c["name"] for c in instances["categories"]}
    by_image: dict[int, dict] = {
        im["id"]: {"image": im, "anns": [], "pairs": [], "refs": []} for im in instances["images"]
    }
    for ann in instances["annotations"]:
        by_image[ann["image_id"]]["anns"].append(ann)
    for entry in by_image.values():
        entry["objects"] = [
            {"shape": names[a["category_id"]], "color": a["color"], "bbox": a["bbox"]}
            for a in entry["anns"]
        ]
    for ref in refs:
        entry = by_image[ref["image_id"]]
        idx = [a["id"] for a in entry["anns"]].index(ref["ann_id"])
        entry["refs"].append(ref)
        entry["pairs"] += [(idx, s["sent"]) for s in ref["sentences"]]
    return by_image


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_deterministic_per_seed(root: Path, tmp_path: Path) -> None:
    refshapes.generate(tmp_path / "same", seed=0, num_images=NUM_IMAGES)
    refshapes.generate(tmp_path / "other", seed=1, num_images=NUM_IMAGES)
    a, b, c = tree_bytes(root), tree_bytes(tmp_path / "same"), tree_bytes(tmp_path / "other")
    assert a == b
    assert set(a) == set(c)
    assert a["refshapes/instances.json"] != c["refshapes/instances.json"]
    assert a["refshapes/refs(unc).p"] != c["refshapes/refs(unc).p"]
    assert sum(a[k] != c[k] for k in a if k.endswith(".jpg")) >= NUM_IMAGES - 1


def test_layout_and_formats(root: Path) -> None:
    instances, refs = load(root)
    assert {c["name"] for c in instances["categories"]} == {"circle", "square", "triangle", "star"}
    assert len(instances["images"]) == NUM_IMAGES
    images = {im["id"]: im for im in instances["images"]}
    for im in instances["images"]:
        assert set(im) == {"id", "file_name", "height", "width"}
        with Image.open(root / "train2014" / im["file_name"]) as pil:
            assert pil.format == "JPEG" and pil.mode == "RGB"
            assert pil.size == (im["width"], im["height"]) == (SIZE, SIZE)
    anns = {a["id"]: a for a in instances["annotations"]}
    cat_ids = {c["id"] for c in instances["categories"]}
    for a in anns.values():
        assert a["iscrowd"] == 0 and a["category_id"] in cat_ids and a["image_id"] in images
        assert len(a["bbox"]) == 4 and a["area"] > 0
        poly = a["segmentation"]
        assert isinstance(poly, list) and all(len(p) % 2 == 0 and len(p) >= 6 for p in poly)
    sent_ids = [s["sent_id"] for r in refs for s in r["sentences"]]
    assert len(set(sent_ids)) == len(sent_ids)
    assert len({r["ref_id"] for r in refs}) == len(refs)
    for r in refs:
        assert type(r) is dict and r["split"] in {"train", "val", "testA", "testB"}
        ann = anns[r["ann_id"]]
        assert (r["image_id"], r["category_id"]) == (ann["image_id"], ann["category_id"])
        assert isinstance(r["file_name"], str)
        assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]]
        for s in r["sentences"]:
            assert set(s) == {"raw", "sent", "tokens", "sent_id"}
            assert s["sent"] == s["raw"].lower() and s["tokens"] == s["sent"].split()


def test_restricted_unpickler_refuses_objects() -> None:
    with pytest.raises(pickle.UnpicklingError):
        PlainUnpickler(io.BytesIO(pickle.dumps([Path("x")], protocol=2))).load()


def test_scene_statistics(data: dict) -> None:
    for entry in data.values():
        assert 3 <= len(entry["anns"]) <= 5
        assert len(entry["refs"]) >= 3  # several referents per image
        assert all(1 <= len(r["sentences"]) <= 3 for r in entry["refs"])
        boxes = [a["bbox"] for a in entry["anns"]]
        for i, (x, y, w, h) in enumerate(boxes):  # never overlapping
            assert 0 <= x and x + w <= SIZE and 0 <= y and y + h <= SIZE
            for x2, y2, w2, h2 in boxes[i + 1 :]:
                assert x + w < x2 or x2 + w2 < x or y + h < y2 or y2 + h2 < y


def test_expressions_pick_exactly_their_referent(data: dict) -> None:
    m = refshapes.margins(SIZE)
    # "clear" means something: >= 8% of the image side apart, sizes >= 1.2x apart
    assert m["pos_margin"] >= 0.08 * SIZE and m["size_margin"] >= math.log(1.2)
    lenient = {k: -v for k, v in m.items()}
    for entry in data.values():
        for idx, sent in entry["pairs"]:
            assert resolve(sent, entry["objects"]) == [idx], sent
            assert resolve(sent, entry["objects"], **m) == [idx], sent
            assert resolve(sent, entry["objects"], **lenient) == [idx], sent
            assert oracle(sent, entry["objects"]) == [idx], sent


def oracle(sent: str, objects: list[dict]) -> list[int]:
    """Independent numpy reading of the grammar at the generator's strict margins."""
    e = parse(sent)
    box = np.array([o["bbox"] for o in objects], float)
    cx, cy, size = box[:, 0] + box[:, 2] / 2, box[:, 1] + box[:, 3] / 2, box[:, 2:].max(1)

    def match(d) -> np.ndarray:  # noqa: ANN001
        return np.array(
            [(d.color in (None, o["color"])) and d.noun in ("shape", o["shape"]) for o in objects]
        )

    ok = match(e.head)
    margin = refshapes.POS_MARGIN_FRAC * SIZE
    if e.relation:
        (lm,) = np.flatnonzero(match(e.landmark))
        d = {"left of": cx[lm] - cx, "right of": cx - cx[lm], "above": cy[lm] - cy}
        d["below"] = cy - cy[lm]
        ok &= d[e.relation] > margin
        ok[lm] = False
        others = match(e.head) & (np.arange(len(objects)) != lm)
        assert not (others & (np.abs(d[e.relation]) <= margin)).any()  # nobody borderline
    if e.superlative:
        assert ok.sum() >= 2
        key = {"leftmost": -cx, "rightmost": cx, "top": -cy, "bottom": cy}
        key |= {"big": np.log(size), "small": -np.log(size)}
        k = np.where(ok, key[e.superlative], -np.inf)
        best, second = np.sort(k)[-1], np.sort(k)[-2]
        gap = math.log(1.25) if e.superlative in ("big", "small") else margin
        assert best - second > gap  # clearly the most extreme of its comparison set
        ok &= k == best
    return np.flatnonzero(ok).tolist()


def test_expressions_use_two_attributes_or_a_relation(data: dict) -> None:
    exprs = [parse(s) for e in data.values() for _, s in e["pairs"]]
    rich = [x.num_attributes() >= 2 or x.relation is not None for x in exprs]
    assert np.mean(rich) >= 0.5
    # every kind of word is in use
    words = Counter(w for e in data.values() for _, s in e["pairs"] for w in s.split())
    for group in (COLORS, ("circle", "square", "triangle", "star"), ("small", "big")):
        assert any(words[w] for w in group)
    assert words["leftmost"] + words["rightmost"] + words["left"] + words["right"] > 0


def test_flip_consistency(data: dict) -> None:
    assert set(LR_SWAP) == {"left", "right", "leftmost", "rightmost"}
    m = refshapes.margins(SIZE)
    for entry in data.values():
        mirrored = [
            SceneObject.from_bbox(o["shape"], o["color"], [SIZE - x - w, y, w, h])
            for o in entry["objects"]
            for x, y, w, h in [o["bbox"]]
        ]
        for idx, sent in entry["pairs"]:
            flipped = mirror_text(sent)
            assert resolve(flipped, mirrored, **m) == [idx], flipped
            assert resolve(flipped, mirrored, **{k: -v for k, v in m.items()}) == [idx]


def test_masks_match_pixels(root: Path, data: dict) -> None:
    palette = np.array(list(COLORS.values()), float)
    for entry in data.values():
        im = entry["image"]
        h, w = im["height"], im["width"]
        pix = np.asarray(Image.open(root / "train2014" / im["file_name"]), float)
        union = np.zeros((h, w), bool)
        for ann in entry["anns"]:
            mask = coco_mask(ann, h, w).astype(bool)
            assert mask.sum() == ann["area"]
            union |= mask
            inner = mask & _erode(mask)
            mean = pix[inner].mean(0)
            assert list(COLORS)[np.argmin(((palette - mean) ** 2).sum(1))] == ann["color"]
            assert np.abs(mean - COLORS[ann["color"]]).max() < 25
            # pixels near the shape that look like it coincide with the mask
            x, y, bw, bh = (int(round(v)) for v in ann["bbox"])
            win = (slice(max(y - 2, 0), y + bh + 3), slice(max(x - 2, 0), x + bw + 3))
            looks = np.abs(pix[win] - mean).max(-1) < 60
            iou = (looks & mask[win]).sum() / (looks | mask[win]).sum()
            assert iou > 0.9, iou
        background = pix[~union & _erode(~union)]
        assert background.max(-1).mean() < 90  # dark, so every palette colour stands out


def _erode(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def language_blind_miou(data: dict, root: Path) -> float:
    """mIoU of the best single mask per image (each object, or the referents' union)."""
    total, count = 0.0, 0
    for entry in data.values():
        h, w = entry["image"]["height"], entry["image"]["width"]
        masks = [coco_mask(a, h, w).astype(bool) for a in entry["anns"]]
        targets = [masks[i] for i, _ in entry["pairs"]]
        guesses = masks + [np.logical_or.reduce([masks[i] for i, _ in entry["pairs"]])]
        best = max(sum((g & t).sum() / (g | t).sum() for t in targets) for g in guesses)
        total, count = total + best, count + len(targets)
    return total / count


def test_language_blind_bound(data: dict, root: Path) -> None:
    assert language_blind_miou(data, root) < 0.5


def test_splits(data: dict) -> None:
    splits = Counter()
    for entry in data.values():
        per_image = {r["split"] for r in entry["refs"]}
        assert len(per_image) == 1
        splits[per_image.pop()] += 1
    assert set(splits) == {"train", "val", "testA", "testB"}
    assert splits["train"] > splits["val"] >= splits["testA"]
    assert refshapes.split_sizes(None) == list(refshapes.DEFAULT_SPLIT_IMAGES)
    assert [n for _, n in refshapes.split_sizes(NUM_IMAGES)] == [20, 2, 1, 1]
    with pytest.raises(ValueError):
        refshapes.split_sizes(3)


def test_interrupted_generation_never_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = {"seed": 3, "num_images": 6}
    refshapes.generate(tmp_path, **kw)
    assert refshapes.is_complete(tmp_path, **kw)
    marker = tmp_path / "refshapes" / "generator.json"
    stamp = marker.stat().st_mtime_ns
    refshapes.generate(tmp_path, **kw)  # complete with the same parameters: kept
    assert marker.stat().st_mtime_ns == stamp

    def boom(*args: object, **kwargs: object) -> bytes:
        raise KeyboardInterrupt

    monkeypatch.setattr(refshapes.pickle, "dumps", boom)
    with pytest.raises(KeyboardInterrupt):
        refshapes.generate(tmp_path, seed=4, num_images=6)
    assert not (tmp_path / "refshapes").exists()
    assert not refshapes.is_complete(tmp_path, **kw)
    assert [p.name for p in tmp_path.iterdir()] == ["train2014"]  # no temp dir left behind
    monkeypatch.undo()
    refshapes.generate(tmp_path, **kw)
    assert refshapes.is_complete(tmp_path, **kw)
    (tmp_path / "train2014" / "refshapes_000000000002.jpg").unlink()
    assert not refshapes.is_complete(tmp_path, **kw)


def test_grammar_round_trip_and_errors() -> None:
    for text in [
        "the red circle",
        "the leftmost shape",
        "the small blue triangle left of the red circle",
        "the big green shape below the star",
    ]:
        assert parse(text).text() == text
        assert mirror_text(mirror_text(text)) == text
    for bad in ["red circle", "the red", "the circle next to the star", "the circle left the star"]:
        with pytest.raises(ValueError):
            parse(bad)


def test_grammar_margins() -> None:
    objs = [
        {"shape": "circle", "color": "red", "bbox": [10, 40, 20, 20]},
        {"shape": "circle", "color": "blue", "bbox": [16, 10, 12, 12]},
        {"shape": "star", "color": "red", "bbox": [60, 40, 20, 20]},
    ]
    assert resolve("the leftmost circle", objs) == [0]
    assert resolve("the leftmost circle", objs, pos_margin=5) == []  # centres only 2 px apart
    assert resolve("the leftmost circle", objs, pos_margin=-5) == [0, 1]
    assert resolve("the big circle", objs, size_margin=math.log(1.25)) == [0]
    assert resolve("the big star", objs) == []  # nothing to compare with
    assert resolve("the shape left of the star", objs) == [0, 1]
    assert resolve("the red shape left of the star", objs) == [0]
    assert resolve("the shape left of the circle", objs) == []  # landmark not unique
    assert resolve("the shape above the red circle", objs, pos_margin=20) == [1]
