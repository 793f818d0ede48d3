"""Finds every referred object that cannot become an example, before anything is written.

One pass up front (each image fully decoded once, each mask's area from its RLE)
means a bad input fails fast, with every problem listed in one error, instead of
after minutes of writing and one problem at a time. The builder then either stops
(default) or leaves exactly these objects out and records them (skip_corrupt).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from tfds_refcoco import images, masks
from tfds_refcoco.refer import RefObject


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why one object cannot be used."""

    ref_id: int
    ann_id: int
    split: str
    reason: str
    source: str = ""  # refcocox_combined: the dataset (ref_ids repeat across datasets)


def find_problems(by_split: Mapping[str, Sequence[RefObject]]) -> list[Problem]:
    """Problems of all objects, in split then image then ref order.

    Checked: at least one non-empty expression; the image decodes completely and has
    the size instances.json gives; the segmentation is well formed; the mask (after
    clipping to the image) has a non-zero area.
    """
    image_errors: dict[int, str | None] = {}
    problems: list[Problem] = []
    for split, objects in by_split.items():
        for obj in objects:
            reason = _problem(obj, image_errors)
            if reason is not None:
                source = getattr(obj, "source", "")
                problems.append(Problem(obj.ref_id, obj.ann_id, split, reason, source))
    return problems


def _problem(obj: RefObject, image_errors: dict[int, str | None]) -> str | None:
    if not obj.expressions:
        return "no non-empty expression"
    if obj.image_id not in image_errors:  # each image is decoded once, whatever its refs
        try:
            data = obj.image_path.read_bytes()
            images.check_image(data, str(obj.image_path), obj.height, obj.width)
            image_errors[obj.image_id] = None
        except (OSError, images.CorruptImageError) as e:
            image_errors[obj.image_id] = str(e)
    if image_errors[obj.image_id] is not None:
        return image_errors[obj.image_id]
    try:
        area = masks.mask_area(obj.segmentation, obj.height, obj.width)
    except masks.SegmentationError as e:
        return f"bad segmentation: {e}"
    if area == 0:
        return "mask has zero area inside the image"
    return None


def format_problems(problems: Sequence[Problem], limit: int = 50) -> str:
    """One line per problem (the first ``limit``), each naming the ref and ann ids."""
    lines = [
        f"  {f'source={p.source} ' if p.source else ''}ref_id={p.ref_id} ann_id={p.ann_id} "
        f"split={p.split}: {p.reason}"
        for p in problems[:limit]
    ]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
