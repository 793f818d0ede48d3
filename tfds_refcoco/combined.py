"""``refcocox_combined``: one training set from RefCOCO, RefCOCO+ and RefCOCOg, without leakage.

The three datasets draw on the same COCO train2014 images, and an image that is in one
dataset's validation or test split is often in another's train split. The combined train
split is therefore

    (refcoco unc train  +  refcoco+ unc train  +  refcocog umd train)
    minus every object whose image is in ANY of the eight evaluation splits
    (refcoco unc val/testA/testB, refcoco+ unc val/testA/testB, refcocog umd val/test),

the rule big_vision's ``refcocox_combined`` applies. The eight evaluation splits are
copied unchanged, as ``<source>_<split>`` (``refcoco_validation``, ..., ``refcocog_test``),
so one prepared dataset (and one tokenizer, trained on the combined train split) serves
training and the evaluation on all eight splits.

Duplicates: the same COCO object (ann_id) is often referred to by two or three of the
datasets, under unrelated ref_ids and sent_ids (each dataset numbers its own, so ids can repeat).
Each (source, ref_id) stays its own example with that dataset's expressions; examples are
keyed by ``"<source>/<ref_id>"``. big_vision instead merges the refs of one ann_id into one
object; the set of (object, expression) pairs is the same, but merging would mix sent_id
numberings and lose which dataset (e.g. RefCOCO+'s no-location-words rule) an expression
follows. The cost: an object referred to by k datasets is drawn k times as often when
training samples objects uniformly.

The rule and its stats work on the refs as read, before validation: an image stays
forbidden even when skip_corrupt later drops its evaluation objects, and the builder's
per-split counts (after skip_corrupt) can be lower than ``kept_objects``.

Everything here is a pure function of what ``refer.read_refer`` returns, except
``read_combined``, which calls it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from tfds_refcoco import refer

CONFIG_NAME = "refcocox_combined"


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset the combination reads: its tag, refer folder and partition."""

    tag: str  # prefix of its eval split names and of record keys
    dataset: str
    partition: str


SOURCES: tuple[Source, ...] = (
    Source("refcoco", "refcoco", "unc"),
    Source("refcocoplus", "refcoco+", "unc"),
    Source("refcocog", "refcocog", "umd"),
)
SOURCE_TAGS: tuple[str, ...] = tuple(s.tag for s in SOURCES)
TRAIN = "train"


@dataclasses.dataclass(frozen=True)
class SourcedObject(refer.RefObject):
    """A RefObject tagged with the dataset it comes from (``Source.tag``)."""

    source: str


def tag(obj: refer.RefObject, source: str) -> SourcedObject:
    """``obj`` with its source tag."""
    fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(refer.RefObject)}
    return SourcedObject(**fields, source=source)


def record_key(obj: SourcedObject) -> str:
    """Unique within the combined dataset: ref_ids repeat across datasets, (source, ref_id) not."""
    return f"{obj.source}/{obj.ref_id}"


def eval_split_name(source: str, split: str) -> str:
    """The combined config's name for ``source``'s own eval ``split``: 'refcoco_testA'."""
    return f"{source}_{split}"


def eval_split_names() -> tuple[str, ...]:
    """The eight evaluation splits of the combined config, in the papers' table order."""
    return tuple(
        eval_split_name(s.tag, refer.SPLIT_NAMES[raw])
        for s in SOURCES
        for raw in refer.PARTITION_SPLITS[s.partition]
        if raw != "train"
    )


def _check_sources(by_dataset: Mapping[str, Mapping[str, Sequence[refer.RefObject]]]) -> None:
    if set(by_dataset) != set(SOURCE_TAGS):
        raise ValueError(f"expected the sources {list(SOURCE_TAGS)}, got {sorted(by_dataset)}")


def eval_images(by_dataset: Mapping[str, Mapping[str, Sequence[refer.RefObject]]]) -> set[int]:
    """Every image_id in any non-train split of any source: none of them may be trained on."""
    _check_sources(by_dataset)
    return {
        o.image_id
        for splits in by_dataset.values()
        for split, objs in splits.items()
        if split != TRAIN
        for o in objs
    }


def combine(
    by_dataset: Mapping[str, Mapping[str, Sequence[refer.RefObject]]],
) -> tuple[list[SourcedObject], dict[str, Any]]:
    """The combined train objects and what the no-leak rule removed.

    ``by_dataset``: {source tag: read_refer(...) of that source}, for all of SOURCE_TAGS.
    Returns (objects sorted by image, source order, ref_id — so a writer reads each image
    once and the order never depends on dict order), stats (JSON-ready):
    ``eval_images`` (the forbidden image ids, counted), per source ``train_objects``,
    ``train_images``, ``removed_objects``, ``removed_images``, ``kept_objects``,
    ``kept_images``, and overall ``removed_objects``, ``removed_images`` (distinct),
    ``kept_objects``, ``kept_images``, ``shared_ann_ids`` (kept ann_ids that more than
    one source refers to: kept as separate examples, see the module doc).
    """
    forbidden = eval_images(by_dataset)
    order = {t: i for i, t in enumerate(SOURCE_TAGS)}
    kept: list[SourcedObject] = []
    per_source: dict[str, dict[str, int]] = {}
    removed_images: set[int] = set()
    for source in SOURCE_TAGS:
        train = by_dataset[source].get(TRAIN, [])
        ok = [o for o in train if o.image_id not in forbidden]
        gone = {o.image_id for o in train if o.image_id in forbidden}
        removed_images |= gone
        per_source[source] = {
            "train_objects": len(train),
            "train_images": len({o.image_id for o in train}),
            "removed_objects": len(train) - len(ok),
            "removed_images": len(gone),
            "kept_objects": len(ok),
            "kept_images": len({o.image_id for o in ok}),
        }
        kept.extend(tag(o, source) for o in ok)
    kept.sort(key=lambda o: (o.image_id, order[o.source], o.ref_id))
    keys = [record_key(o) for o in kept]
    if len(set(keys)) != len(keys):  # read_refer rejects repeated ref_ids within a file
        raise refer.ReferFormatError("repeated (source, ref_id) in the combined train split")
    sources_of_ann: dict[int, set[str]] = {}
    for o in kept:
        sources_of_ann.setdefault(o.ann_id, set()).add(o.source)
    stats: dict[str, Any] = {
        "eval_images": len(forbidden),
        "sources": per_source,
        "removed_objects": sum(s["removed_objects"] for s in per_source.values()),
        "removed_images": len(removed_images),
        "kept_objects": len(kept),
        "kept_images": len({o.image_id for o in kept}),
        "shared_ann_ids": sum(1 for s in sources_of_ann.values() if len(s) > 1),
    }
    return kept, stats


def combined_splits(
    by_dataset: Mapping[str, Mapping[str, Sequence[refer.RefObject]]],
) -> tuple[dict[str, list[SourcedObject]], dict[str, Any]]:
    """All splits of the combined config: ``train`` (see ``combine``) and the eight eval
    splits, each source's own objects unchanged, named by ``eval_split_name``."""
    train, stats = combine(by_dataset)
    out: dict[str, list[SourcedObject]] = {TRAIN: train}
    for s in SOURCES:
        for raw in refer.PARTITION_SPLITS[s.partition]:
            split = refer.SPLIT_NAMES[raw]
            if split == TRAIN:
                continue
            objs = by_dataset[s.tag].get(split)
            if not objs:  # a real refs file always has it; TFDS cannot write an empty split
                raise refer.ReferFormatError(
                    f"{s.dataset}/refs({s.partition}).p has no {raw!r} objects; the combined "
                    "config needs every evaluation split of the three datasets"
                )
            out[eval_split_name(s.tag, split)] = [tag(o, s.tag) for o in objs]
    return out, stats


def read_sources(manual_dir: str | os.PathLike) -> dict[str, dict[str, list[refer.RefObject]]]:
    """read_refer of each source under ``manual_dir``: {source tag: {split: objects}}."""
    return {s.tag: refer.read_refer(manual_dir, s.dataset, s.partition) for s in SOURCES}


def read_combined(
    manual_dir: str | os.PathLike,
) -> tuple[dict[str, list[SourcedObject]], dict[str, Any]]:
    """``combined_splits`` of the three datasets under ``manual_dir`` (the refer layout)."""
    return combined_splits(read_sources(manual_dir))


def format_stats(stats: Mapping[str, Any]) -> str:
    """What the no-leak rule removed, as printed by ``python -m tfds_refcoco.build``."""
    lines = [
        f"no-leak rule: {stats['eval_images']:,} image(s) are in an evaluation split of "
        f"refcoco/refcoco+/refcocog; train objects on them removed:"
    ]
    for source, s in stats["sources"].items():
        lines.append(
            f"  {source}: {s['removed_objects']:,} of {s['train_objects']:,} objects "
            f"({s['removed_images']:,} of {s['train_images']:,} images) removed; "
            f"{s['kept_objects']:,} kept"
        )
    lines.append(
        f"  total: {stats['removed_objects']:,} objects removed ({stats['removed_images']:,} "
        f"distinct images); {stats['kept_objects']:,} objects on {stats['kept_images']:,} "
        f"images kept; {stats['shared_ann_ids']:,} COCO objects referred to by more than one "
        "dataset kept once per dataset"
    )
    return "\n".join(lines)
