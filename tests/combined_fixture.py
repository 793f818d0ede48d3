"""A tiny refcoco / refcoco+ / refcocog layout whose datasets share images across splits.

Built on refer_fixture (its five images and ten annotations) plus three RGB images (6, 7, 8)
with four annotations, so that images move between splits from one dataset to another the
way they do in the real data:

    image   refcoco unc   refcoco+ unc   refcocog umd
      1     train         train          train        (all three: the same objects, 3 refs each)
      2     train         val            -            -> leaks from refcoco+ val
      3     testA         testA          train        -> leaks from refcoco/refcoco+ testA
      4     testB         testB          test
      5     val           -              val
      6     train         train          train
      7     -             train          train
      8     train         -              test         -> leaks from refcocog test

Not every dataset refers to every object of an image (OMITTED). ref_ids and sent_ids of
refcoco and refcoco+ are numbered alike (1000 + ann_id), as in the real files, so they
collide; each dataset's texts carry a "[dataset]" prefix so a test can tell them apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import refer_fixture as rf
from PIL import Image

DATASETS: dict[str, tuple[str, str]] = {  # source tag -> (refer folder, partition)
    "refcoco": ("refcoco", "unc"),
    "refcocoplus": ("refcoco+", "unc"),
    "refcocog": ("refcocog", "umd"),
}
EXTRA_IMAGES: dict[int, tuple[int, int]] = {6: (36, 28), 7: (28, 36), 8: (32, 32)}  # (w, h)
EXTRA_SENTENCES: dict[int, list[str]] = {
    601: ["the square top left"], 602: ["bottom right block", " "],
    701: ["tall bar"], 801: ["the whole middle"],
}
SPLITS: dict[str, dict[int, str]] = {  # source tag -> {image_id: raw split}
    "refcoco": {1: "train", 2: "train", 3: "testA", 4: "testB", 5: "val", 6: "train",
                8: "train"},
    "refcocoplus": {1: "train", 2: "val", 3: "testA", 4: "testB", 6: "train", 7: "train"},
    "refcocog": {1: "train", 3: "train", 4: "test", 5: "val", 6: "train", 7: "train",
                 8: "test"},
}
OMITTED: dict[str, set[int]] = {"refcoco": set(), "refcocoplus": {602}, "refcocog": {103}}
REF_BASE: dict[str, int] = {"refcoco": 1000, "refcocoplus": 1000, "refcocog": 3000}


def _extra_annotations() -> list[dict[str, Any]]:
    def poly(ann_id: int, image_id: int, cat: int, x0: int, y0: int, x1: int, y1: int) -> dict:
        return {"id": ann_id, "image_id": image_id, "category_id": cat,
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": 0.0, "iscrowd": 0}

    return [poly(601, 6, 1, 2, 2, 14, 12), poly(602, 6, 2, 20, 14, 34, 26),
            poly(701, 7, 3, 8, 4, 16, 30), poly(801, 8, 2, 6, 6, 26, 26)]


def annotations() -> list[dict[str, Any]]:
    return rf.annotations() + _extra_annotations()


def instances() -> dict[str, Any]:
    inst = rf.instances()
    inst["images"] += [{"id": i, "file_name": rf.file_name(i), "height": h, "width": w}
                       for i, (w, h) in EXTRA_IMAGES.items()]
    inst["annotations"] = annotations()
    return inst


def sentences(source: str, ann_id: int) -> list[str]:
    """Raw texts of ``source``'s ref to ``ann_id``; blank ones stay blank (and get dropped)."""
    raw = {**rf.SENTENCES, **EXTRA_SENTENCES}[ann_id]
    return [f"[{source}] {t}" if t.strip() else t for t in raw]


def make_refs(source: str) -> list[dict[str, Any]]:
    split_of, base = SPLITS[source], REF_BASE[source]
    refs, sent_id = [], base * 10
    for a in sorted(annotations(), key=lambda a: (a["image_id"], a["id"])):
        if a["image_id"] not in split_of or a["id"] in OMITTED[source]:
            continue
        sents = []
        for raw in sentences(source, a["id"]):
            sents.append({"raw": raw, "sent": raw.lower(), "tokens": raw.lower().split(),
                          "sent_id": sent_id})
            sent_id += 1
        refs.append({
            "ref_id": base + a["id"], "ann_id": a["id"], "image_id": a["image_id"],
            "category_id": a["category_id"], "split": split_of[a["image_id"]],
            "sent_ids": [s["sent_id"] for s in sents], "sentences": sents,
            "file_name": f"COCO_train2014_{a['image_id']:012d}_{a['id']}.jpg",
        })
    return refs


def write_combined_fixture(root: Path) -> Path:
    """Writes the three datasets and all eight images under ``root``; returns ``root``."""
    image_dir = root / "train2014"
    image_dir.mkdir(parents=True, exist_ok=True)
    for image_id in rf.IMAGES:
        (image_dir / rf.file_name(image_id)).write_bytes(rf.jpeg_bytes(rf.image_pixels(image_id)))
    for image_id, (w, h) in EXTRA_IMAGES.items():
        pixels = np.random.default_rng(image_id).integers(0, 256, (h, w, 3), dtype=np.uint8)
        (image_dir / rf.file_name(image_id)).write_bytes(rf.jpeg_bytes(Image.fromarray(pixels)))
    for source, (folder, partition) in DATASETS.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "instances.json").write_text(json.dumps(instances()), encoding="utf-8")
        rf.write_refs(root / folder / f"refs({partition}).p", make_refs(source))
    return root


# --- what the combined train split must be, derived from the tables above ---------------


def eval_images() -> set[int]:
    return {i for splits in SPLITS.values() for i, s in splits.items() if s != "train"}


def expected_train_keys() -> set[str]:
    """'<source>/<ref_id>' of every train ref on an image no eval split uses."""
    banned = eval_images()
    return {f"{source}/{r['ref_id']}" for source in DATASETS for r in make_refs(source)
            if r["split"] == "train" and r["image_id"] not in banned}
