"""Finds every referred object that cannot become an example, before anything is written.

One pass up front (each image fully decoded once, each mask's area from its RLE)
means a bad input fails fast, with every problem listed in one error, instead of
after minutes of writing and one problem at a time. The builder then either stops
(default) or leaves exactly these objects out and records them (skip_corrupt).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tfds_refcoco import images, masks
from tfds_refcoco.refer import RefObject
from tfds_refcoco.workers import OrderedPool


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why one object cannot be used."""

    ref_id: int
    ann_id: int
    split: str
    reason: str
    source: str = ""  # refcocox_combined: the dataset (ref_ids repeat across datasets)


def find_problems(
    by_split: Mapping[str, Sequence[RefObject]], pool: OrderedPool | None = None
) -> list[Problem]:
    """Problems of all objects, in split then image then ref order.

    Checked: at least one non-empty expression; the image file exists, decodes
    completely and has the size instances.json gives; the segmentation is well
    formed; the mask (after clipping to the image) has a non-zero area. With a
    ``pool`` the image decodes and mask areas run on its workers (same result).
    """
    pool = pool or OrderedPool(1)
    entries = [(split, obj) for split, objs in by_split.items() for obj in objs]
    objects = [obj for _, obj in entries]
    # Each image is checked once, whatever its number of refs (or splits).
    image_jobs = {o.image_id: (o.image_path, o.height, o.width) for o in objects}
    image_errors = dict(zip(image_jobs, pool.map(image_problem, image_jobs.values()),
                            strict=True))
    seg_errors = pool.map(segmentation_problem,
                          ((o.segmentation, o.height, o.width) for o in objects))
    problems: list[Problem] = []
    for (split, obj), seg_error in zip(entries, seg_errors, strict=True):
        if not obj.expressions:
            reason = "no non-empty expression"
        else:
            reason = image_errors[obj.image_id] or seg_error
        if reason is not None:
            source = getattr(obj, "source", "")
            problems.append(Problem(obj.ref_id, obj.ann_id, split, reason, source))
    return problems


def image_problem(job: tuple[Path, int, int]) -> str | None:
    """Why the image ``(path, height, width)`` cannot be used, or None."""
    path, height, width = job
    if not path.is_file():
        return f"image file missing: {path}"
    try:
        images.check_image(path.read_bytes(), str(path), height, width)
    except (OSError, images.CorruptImageError) as e:
        return str(e)
    return None


def segmentation_problem(job: tuple[Any, int, int]) -> str | None:
    """Why ``(segmentation, height, width)`` gives no usable mask, or None."""
    segmentation, height, width = job
    try:
        area = masks.mask_area(segmentation, height, width)
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
