"""Tiny datasets in the real refer raw layout, written from scratch for the tests.

Layout (as the refer downloads + COCO train2014 give it):

    root/<dataset>/instances.json      COCO style: images, annotations, categories
    root/<dataset>/refs(<partition>).p  pickled list of ref dicts (protocol 2, like the originals)
    root/train2014/COCO_train2014_%012d.jpg   (or root/images/train2014/)

Five images: RGB 64x48, RGB 40x56, grayscale 32x36, CMYK 48x40 and RGB 30x30 JPEGs.
Ten annotations covering: two disjoint polygons, two overlapping polygons (union must
not double count), polygons partly outside the image, an uncompressed RLE and a
compressed (string) RLE. Every image has two or three referred objects; sentences
include an empty one (must be dropped) and non-ASCII text (must be kept).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# image_id -> (mode, width, height)
IMAGES: dict[int, tuple[str, int, int]] = {
    1: ("RGB", 64, 48),
    2: ("RGB", 40, 56),
    3: ("L", 32, 36),
    4: ("CMYK", 48, 40),
    5: ("RGB", 30, 30),
}
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 2, "name": "chair"}, {"id": 3, "name": "dog"}]

# Polygons partly outside image 1 (64 x 48) and the same shapes clipped by hand.
OUTSIDE_POLYGONS = [[50, 2, 80, 2, 80, 18, 50, 18], [-10, -10, 10, -10, 10, 10, -10, 10]]
OUTSIDE_CLIPPED = [[50, 2, 64, 2, 64, 18, 50, 18], [0, 0, 10, 0, 10, 10, 0, 10]]

# Which image each partition puts in which split (all refs of an image share a split).
PARTITIONS: dict[str, dict[int, str]] = {
    "unc": {1: "train", 2: "val", 3: "testA", 4: "testB", 5: "val"},
    "google": {1: "train", 2: "train", 3: "val", 4: "test", 5: "train"},
    "umd": {1: "train", 2: "val", 3: "test", 4: "test", 5: "val"},
}
DATASET_PARTITIONS: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "refshapes": ("unc",),
}
# refcocog's google partition has no test split.
GOOGLE_REFCOCOG: dict[int, str] = {1: "train", 2: "train", 3: "val", 4: "val", 5: "train"}

# ann_id -> sentences (raw texts); '' and '   ' are empty and must be dropped.
SENTENCES: dict[int, list[str]] = {
    101: ["two small boxes on the left", "left boxes"],
    102: ["the overlapping squares", "   ", "middle thing"],
    103: ["cut off at the edges", "corner pieces"],
    201: ["the café chair “on top”", "top region"],
    202: ["lower blob"],
    301: ["gray triangle", "the triangle", ""],
    302: ["gray square"],
    401: ["red side", "left half"],
    402: ["blue square on the right"],
    501: ["the diamond"],
}


def file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def image_pixels(image_id: int) -> Image.Image:
    """Deterministic content; image 4 is red on the left, blue on the right (then CMYK)."""
    mode, w, h = IMAGES[image_id]
    rng = np.random.default_rng(image_id)
    if image_id == 4:
        rgb = np.zeros((h, w, 3), np.uint8)
        rgb[:, : w // 2] = (220, 20, 20)
        rgb[:, w // 2 :] = (20, 20, 220)
        return Image.fromarray(rgb).convert("CMYK")
    if mode == "L":
        grad = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
        return Image.fromarray(grad, mode="L")
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE, counted by hand: column-major runs, starting with zeros."""
    flat = mask.T.ravel()  # column-major (Fortran) order, as COCO stores it
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = int(v), 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _rect_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def annotations() -> list[dict]:
    anns: list[dict[str, Any]] = []

    def add(ann_id: int, image_id: int, cat: int, seg: Any, bbox: list[float]) -> None:
        anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": seg,
                     "bbox": bbox, "area": 0.0, "iscrowd": int(isinstance(seg, dict))})

    add(101, 1, 1, [[4, 4, 14, 4, 14, 14, 4, 14], [20, 4, 28, 4, 28, 12, 20, 12]], [4, 4, 24, 10])
    add(102, 1, 2, [[30, 20, 50, 20, 50, 40, 30, 40], [40, 30, 60, 30, 60, 46, 40, 46]],
        [30, 20, 30, 26])
    add(103, 1, 3, OUTSIDE_POLYGONS, [0, 0, 64, 18])
    h2, w2 = IMAGES[2][2], IMAGES[2][1]
    add(201, 2, 1, uncompressed_rle(_rect_mask(h2, w2, 3, 20, 5, 30)), [5, 3, 25, 17])
    compressed = mask_utils.encode(np.asfortranarray(_rect_mask(h2, w2, 30, 50, 10, 35)))
    add(202, 2, 2, {"size": [h2, w2], "counts": compressed["counts"].decode("ascii")},
        [10, 30, 25, 20])
    add(301, 3, 1, [[2, 30, 16, 4, 30, 30]], [2, 4, 28, 26])
    add(302, 3, 2, [[20, 2.5, 30.5, 2.5, 30.5, 12, 20, 12]], [20, 2.5, 10.5, 9.5])
    add(401, 4, 1, [[1, 1, 22, 1, 22, 38, 1, 38]], [1, 1, 21, 37])
    add(402, 4, 3, [[30, 10, 44, 10, 44, 30, 30, 30]], [30, 10, 14, 20])
    add(501, 5, 2, [[15, 2, 28, 15, 15, 28, 2, 15]], [2, 2, 26, 26])
    return anns


def instances() -> dict:
    return {
        "images": [{"id": i, "file_name": file_name(i), "height": h, "width": w}
                   for i, (_, w, h) in IMAGES.items()],
        "annotations": annotations(),
        "categories": CATEGORIES,
    }


def make_refs(dataset: str, partition: str) -> list[dict]:
    """Refs in the refer format; ref_id and sent_id ranges differ per file, as in the originals."""
    split_of = GOOGLE_REFCOCOG if (dataset, partition) == ("refcocog", "google") else (
        PARTITIONS[partition])
    base = {"unc": 1000, "google": 2000, "umd": 3000}[partition]
    refs, sent_id = [], base * 10
    anns = sorted(annotations(), key=lambda a: (a["image_id"], a["id"]))
    for a in anns:
        sentences = []
        for raw in SENTENCES[a["id"]]:
            sentences.append({"raw": raw, "sent": raw.lower(), "tokens": raw.lower().split(),
                              "sent_id": sent_id})
            sent_id += 1
        refs.append({
            "ref_id": base + a["id"],
            "ann_id": a["id"],
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "split": split_of[a["image_id"]],
            "sent_ids": [s["sent_id"] for s in sentences],
            "sentences": sentences,
            # Like the originals: not a real file name (image_id -> instances.json is).
            "file_name": f"COCO_train2014_{a['image_id']:012d}_{a['id']}.jpg",
        })
    return refs


def write_refs(path: Path, refs: Any) -> None:
    path.write_bytes(pickle.dumps(refs, protocol=2))


def write_py2_refs(path: Path, refs: list[dict], latin1_sent_ids: Sequence[int] = ()) -> None:
    """``refs`` pickled as Python 2 wrote them: every text a py2 ``str`` (bytes), UTF-8,
    except the ``raw`` of the sentences in ``latin1_sent_ids``, written as latin-1 bytes."""
    from bench.build_dataset import dumps_py2  # the bench's generator writes these too

    def py2(x: Any, latin1: bool = False) -> Any:
        if isinstance(x, str):
            return x.encode("latin-1" if latin1 else "utf-8")
        if isinstance(x, list):
            return [py2(v) for v in x]
        if isinstance(x, dict):
            return {py2(k): py2(v, latin1=k == "raw" and x.get("sent_id") in latin1_sent_ids)
                    for k, v in x.items()}
        return x

    path.write_bytes(dumps_py2(py2(refs)))


@dataclasses.dataclass
class ReferFixture:
    root: Path
    image_dir: Path

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / file_name(image_id)

    def refs_path(self, dataset: str, partition: str) -> Path:
        return self.root / dataset / f"refs({partition}).p"


def write_refer_fixture(
    root: Path,
    datasets: Sequence[str] = ("refcoco", "refcoco+", "refcocog"),
    image_subdir: str = "train2014",
) -> ReferFixture:
    """Writes the given refer datasets (all their partitions) and the images under ``root``."""
    image_dir = root / image_subdir
    image_dir.mkdir(parents=True, exist_ok=True)
    for image_id in IMAGES:
        (image_dir / file_name(image_id)).write_bytes(jpeg_bytes(image_pixels(image_id)))
    for ds in datasets:
        (root / ds).mkdir(parents=True, exist_ok=True)
        (root / ds / "instances.json").write_text(json.dumps(instances()), encoding="utf-8")
        for partition in DATASET_PARTITIONS[ds]:
            write_refs(root / ds / f"refs({partition}).p", make_refs(ds, partition))
    return ReferFixture(root=root, image_dir=image_dir)


def expected_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """The reference mask straight from pycocotools (COCO API's annToRLE logic)."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)
