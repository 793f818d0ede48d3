"""Reads the raw refer layout (instances.json + refs(*).p + COCO images) into plain records.

Everything here is validation and joining; no TFDS. Each problem raises
``ReferFormatError`` naming the file (and ref/ann id) and, for missing files, the
layout that was expected, so a user can fix the input without reading code.

Expression rules (documented in the builder too):
- the text is the sentence's ``raw`` field, stored verbatim as UTF-8;
- a sentence whose text is empty or only whitespace is dropped with its sent_id;
- a Python 2 ``str`` is decoded as UTF-8; bytes in it that are not valid UTF-8 are
  read as latin-1 (so an old editor's latin-1 ``é``, 0xE9, stays ``é``), and such
  sentences are listed (``RefObject.latin1_sent_ids``, a warning, the dataset's
  metadata) rather than failing the whole file (see ``safe_pickle``);
- non-ASCII text is kept: it is real annotator text (accents, curly quotes), and
  the tokenizer downstream is trained on exactly this text;
- an object left with no sentence cannot be used (see ``validate``: an error, or
  skipped and reported under skip_corrupt).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from absl import logging

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
    # sent_ids whose text needed the latin-1 fallback. Keyword-only, so subclasses can
    # still add fields without defaults.
    latin1_sent_ids: tuple[int, ...] = dataclasses.field(default=(), kw_only=True)


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
        return safe_pickle.decode_py2_str(value)
    return value if isinstance(value, str) else None


def _clean_sentences(
    ref: dict, where: str
) -> tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...]]:
    """(sent_ids, texts) of the non-empty sentences, and the sent_ids read as latin-1."""
    sentences = ref.get("sentences")
    if not isinstance(sentences, list):
        raise ReferFormatError(f"{where}: 'sentences' must be a list")
    sent_ids, texts, latin1 = [], [], []
    for s in sentences:
        if not isinstance(s, dict) or "sent_id" not in s or "raw" not in s:
            raise ReferFormatError(f"{where}: each sentence needs 'sent_id' and 'raw'")
        text = _as_text(s["raw"])
        if text is None:
            raise ReferFormatError(f"{where}: sentence {s['sent_id']} 'raw' is not text")
        if isinstance(text, safe_pickle.Latin1Text):
            latin1.append(int(s["sent_id"]))
            text = str(text)  # a plain str from here on
        if text.strip():
            sent_ids.append(int(s["sent_id"]))
            texts.append(text)
    return tuple(sent_ids), tuple(texts), tuple(latin1)


def read_refer(
    manual_dir: str | os.PathLike, dataset: str, partition: str
) -> dict[str, list[RefObject]]:
    """Joins <manual_dir>/<dataset>/refs(<partition>).p with instances.json and the images.

    Returns {tfds split: [RefObject sorted by image then ref id]} for the splits that
    occur in the refs file. Objects left with no expression, and objects whose image
    file is missing, are returned too: whether that is an error is for ``validate``,
    ``check_images_exist`` and the builder (skip_corrupt) to decide. Sentences that
    needed the latin-1 fallback are logged as a warning, naming ref and sent ids.
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
    latin1: list[tuple[int, int]] = []  # (ref_id, sent_id)
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
        sent_ids, texts, latin1_ids = _clean_sentences(ref, where)
        latin1 += [(ref_id, s) for s in latin1_ids]
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
                latin1_sent_ids=latin1_ids,
            )
        )
    if latin1:
        listed = ", ".join(f"ref_id={r} sent_id={s}" for r, s in latin1[:20])
        more = f" and {len(latin1) - 20} more" if len(latin1) > 20 else ""
        logging.warning(
            "%s: %d sentence(s) are not valid UTF-8; their non-UTF-8 bytes were read as "
            "latin-1: %s%s", refs_path, len(latin1), listed, more)
    for objs in by_split.values():
        objs.sort(key=lambda o: (o.image_id, o.ref_id))
    return by_split


def missing_images(objects: Iterable[RefObject]) -> list[Path]:
    """The image files of ``objects`` that do not exist, each once, sorted."""
    seen: set[Path] = set()
    missing = []
    for obj in objects:
        if obj.image_path not in seen:
            seen.add(obj.image_path)
            if not obj.image_path.is_file():
                missing.append(obj.image_path)
    return sorted(missing)


def check_images_exist(by_split: Mapping[str, Iterable[RefObject]], shown: int = 10) -> None:
    """Raises ReferFormatError naming the missing image files (the first ``shown`` and a
    count) and what to do, if any object's image file is missing."""
    objects = [o for objs in by_split.values() for o in objs]
    missing = missing_images(objects)
    if not missing:
        return
    gone = set(missing)
    n_objects = sum(o.image_path in gone for o in objects)
    listed = "\n".join(f"  {p}" for p in missing[:shown])
    more = f"\n  ... and {len(missing) - shown} more" if len(missing) > shown else ""
    raise ReferFormatError(
        f"{len(missing)} image(s) referred to by the refs not found:\n{listed}{more}\n"
        f"Pass --skip_corrupt (skip_corrupt=True) to leave out their {n_objects} object(s) "
        f"and list them, or put the COCO train2014 images where the layout expects them:\n"
        f"{LAYOUT}"
    )
