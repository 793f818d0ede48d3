"""Reads the raw refer layout (instances.json + refs(*).p + COCO images) into plain records.

Everything here is validation and joining; no TFDS. Each problem raises
``ReferFormatError`` naming the file (and ref/ann id) and, for missing files, the
layout that was expected, so a user can fix the input without reading code.

Expression rules (documented in the builder too):
- the text is the sentence's ``raw`` field, stored verbatim as UTF-8;
- a sentence whose text is empty or only whitespace is dropped with its sent_id;
- non-ASCII text is kept: it is real annotator text (accents, curly quotes), and
  the tokenizer downstream is trained on exactly this text;
- an object left with no sentence cannot be used (see ``validate``: an error, or
  skipped and reported under skip_corrupt).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tfds_refcoco import safe_pickle

# refs(*).p split value -> TFDS split name.
SPLIT_NAMES: Mapping[str, str] = {
    "train": "train",
    "val": "validation",
    "testA": "testA",
    "testB": "testB",
    "test": "test",
}
# The split values each partition defines (refcocog's google partition has no test).
PARTITION_SPLITS: Mapping[str, tuple[str, ...]] = {
    "unc": ("train", "val", "testA", "testB"),
    "umd": ("train", "val", "test"),
    "google": ("train", "val", "test"),
}
IMAGE_DIRS = ("train2014", "images/train2014")

LAYOUT = """\
<manual_dir>/refcoco/{instances.json, refs(unc).p, refs(google).p}
<manual_dir>/refcoco+/{instances.json, refs(unc).p}
<manual_dir>/refcocog/{instances.json, refs(umd).p, refs(google).p}
<manual_dir>/refshapes/{instances.json, refs(unc).p}      (RefShapes only)
<manual_dir>/train2014/COCO_train2014_*.jpg   (or <manual_dir>/images/train2014/)"""


class ReferFormatError(ValueError):
    """The raw refer data is missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class RefObject:
    """One referred object with everything needed to write its example."""

    ref_id: int
    ann_id: int
    image_id: int
    category_id: int
    split: str  # TFDS split name
    sent_ids: tuple[int, ...]
    expressions: tuple[str, ...]
    image_path: Path
    height: int
    width: int
    bbox: tuple[float, float, float, float]
    segmentation: Any


def _missing(path: Path, what: str) -> ReferFormatError:
    return ReferFormatError(f"{what} not found: {path}\nExpected layout:\n{LAYOUT}")


def image_dir(manual_dir: Path) -> Path:
    """The COCO train2014 image folder: <manual_dir>/train2014 or <manual_dir>/images/train2014."""
    for sub in IMAGE_DIRS:
        if (manual_dir / sub).is_dir():
            return manual_dir / sub
    raise ReferFormatError(
        f"COCO train2014 image folder not found: looked for "
        f"{', '.join(str(manual_dir / s) for s in IMAGE_DIRS)}\nExpected layout:\n{LAYOUT}"
    )


def load_refs(path: Path) -> list[dict]:
    """The refs pickle at ``path``, loaded without executing anything (see safe_pickle)."""
    if not path.is_file():
        raise _missing(path, "refs file")
    try:
        refs = safe_pickle.load_plain(path)
    except safe_pickle.UnsafePickleError as e:
        raise ReferFormatError(f"{path}: not a plain-data pickle, refused: {e}") from e
    except Exception as e:  # truncated/garbled pickles raise many different types
        raise ReferFormatError(f"{path}: cannot read the pickle ({type(e).__name__}: {e})") from e
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ReferFormatError(f"{path}: expected a list of dicts (one per referred object)")
    return refs


def load_instances(path: Path) -> dict:
    """The COCO-style instances.json at ``path``."""
    if not path.is_file():
        raise _missing(path, "instances file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ReferFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not {"images", "annotations"} <= data.keys():
        raise ReferFormatError(f"{path}: expected a COCO dict with 'images' and 'annotations'")
    return data


def _as_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value if isinstance(value, str) else None


def _clean_sentences(ref: dict, where: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    sentences = ref.get("sentences")
    if not isinstance(sentences, list):
        raise ReferFormatError(f"{where}: 'sentences' must be a list")
    sent_ids, texts = [], []
    for s in sentences:
        if not isinstance(s, dict) or "sent_id" not in s or "raw" not in s:
            raise ReferFormatError(f"{where}: each sentence needs 'sent_id' and 'raw'")
        text = _as_text(s["raw"])
        if text is None:
            raise ReferFormatError(f"{where}: sentence {s['sent_id']} 'raw' is not text")
        if text.strip():
            sent_ids.append(int(s["sent_id"]))
            texts.append(text)
    return tuple(sent_ids), tuple(texts)


def read_refer(
    manual_dir: str | os.PathLike, dataset: str, partition: str
) -> dict[str, list[RefObject]]:
    """Joins <manual_dir>/<dataset>/refs(<partition>).p with instances.json and the images.

    Returns {tfds split: [RefObject sorted by image then ref id]} for the splits that
    occur in the refs file. Objects left with no expression are returned too (with
    none): whether that is an error is for ``validate`` and the builder to decide.
    """
    root = Path(manual_dir)
    ds_dir = root / dataset
    if not ds_dir.is_dir():
        raise _missing(ds_dir, f"{dataset} folder")
    refs_path = ds_dir / f"refs({partition}).p"
    inst_path = ds_dir / "instances.json"
    refs = load_refs(refs_path)
    inst = load_instances(inst_path)
    img_dir = image_dir(root)

    try:
        images = {int(im["id"]): im for im in inst["images"]}
        anns = {int(a["id"]): a for a in inst["annotations"]}
    except (KeyError, TypeError, ValueError) as e:
        raise ReferFormatError(f"{inst_path}: every image and annotation needs an 'id'") from e

    if not refs:
        raise ReferFormatError(f"{refs_path}: holds no refs")
    by_split: dict[str, list[RefObject]] = {}
    seen: set[int] = set()
    checked_images: set[int] = set()
    missing_images: list[Path] = []
    for i, ref in enumerate(refs):
        where = f"{refs_path}: ref #{i} (ref_id={ref.get('ref_id')})"
        try:
            ref_id, ann_id = int(ref["ref_id"]), int(ref["ann_id"])
            image_id, category_id = int(ref["image_id"]), int(ref["category_id"])
            raw_split = ref["split"]
        except (KeyError, TypeError, ValueError) as e:
            raise ReferFormatError(
                f"{where}: needs integer ref_id, ann_id, image_id, category_id and a split ({e!r})"
            ) from e
        if ref_id in seen:
            raise ReferFormatError(f"{where}: duplicate ref_id {ref_id}")
        seen.add(ref_id)
        allowed = PARTITION_SPLITS.get(partition, tuple(SPLIT_NAMES))
        if raw_split not in allowed:
            raise ReferFormatError(
                f"{where}: unknown split {raw_split!r}; the {partition} partition defines "
                f"{list(allowed)}"
            )
        split = SPLIT_NAMES[raw_split]
        ann = anns.get(ann_id)
        if ann is None:
            raise ReferFormatError(f"{where}: ann_id {ann_id} is not in {inst_path}")
        im = images.get(image_id)
        if im is None:
            raise ReferFormatError(f"{where}: image_id {image_id} is not in {inst_path}")
        if int(ann.get("image_id", image_id)) != image_id:
            raise ReferFormatError(
                f"{where}: ann {ann_id} belongs to image {ann['image_id']}, not {image_id}"
            )
        try:
            file_name, height, width = str(im["file_name"]), int(im["height"]), int(im["width"])
            bbox = tuple(float(v) for v in ann["bbox"])
            segmentation = ann["segmentation"]
        except (KeyError, TypeError, ValueError) as e:
            raise ReferFormatError(
                f"{inst_path}: image {image_id} needs file_name/height/width and ann {ann_id} "
                f"needs bbox/segmentation ({e!r})"
            ) from e
        if len(bbox) != 4 or height <= 0 or width <= 0:
            raise ReferFormatError(f"{inst_path}: bad bbox or size for ann {ann_id}")
        # The refs' own file_name is not a real file: always go through instances.json.
        image_path = img_dir / file_name
        if image_id not in checked_images:
            checked_images.add(image_id)
            if not image_path.is_file():
                missing_images.append(image_path)
        sent_ids, texts = _clean_sentences(ref, where)
        by_split.setdefault(split, []).append(
            RefObject(
                ref_id=ref_id,
                ann_id=ann_id,
                image_id=image_id,
                category_id=category_id,
                split=split,
                sent_ids=sent_ids,
                expressions=texts,
                image_path=image_path,
                height=height,
                width=width,
                bbox=bbox,  # type: ignore[arg-type]
                segmentation=segmentation,
            )
        )
    if missing_images:
        listed = "\n".join(f"  {p}" for p in missing_images[:20])
        more = f"\n  ... and {len(missing_images) - 20} more" if len(missing_images) > 20 else ""
        raise ReferFormatError(
            f"{len(missing_images)} image(s) referred to by {refs_path} not found:\n{listed}{more}"
            f"\nExpected layout:\n{LAYOUT}"
        )
    for objs in by_split.values():
        objs.sort(key=lambda o: (o.image_id, o.ref_id))
    return by_split
