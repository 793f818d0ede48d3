"""Build one refcoco_masks config without TensorFlow and print its per-split counts.

    python -m tfds_refcoco.build --config refcoco_unc --manual_dir DIR --data_dir DIR \
        [--skip_corrupt] [--refshapes_num_images N] [--num_workers N]

(The ``tfds build`` CLI and ``tfds.testing`` import TensorFlow; this drives
``download_and_prepare`` from Python instead, through ``records.prepare``.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from tfds_refcoco import build_lock, combined, records, refer

SPLIT_ORDER = ("train", "validation", "testA", "testB", "test", *combined.eval_split_names())
_COLUMNS = ("objects", "images", "expressions")


def format_counts(counts: Mapping[str, Mapping[str, int]]) -> str:
    """A Markdown table of {split: {objects, images, expressions}} with a total row."""
    splits = sorted(counts, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 99, s))
    rows = [[s] + [f"{counts[s][c]:,}" for c in _COLUMNS] for s in splits]
    rows.append(["total"] + [f"{sum(counts[s][c] for s in splits):,}" for c in _COLUMNS])
    header = ["split", *_COLUMNS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join([first, *rest]) + " |"

    sep = "|" + "|".join(
        ["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]
    ) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def format_skipped(skipped: Sequence[Mapping[str, Any]]) -> str:
    """One line per skipped object, naming its ref id, or '' when nothing was skipped."""
    if not skipped:
        return ""
    lines = [f"skipped {len(skipped)} object(s):"]
    lines += [
        f"  {'source=' + s['source'] + ' ' if s.get('source') else ''}ref_id={s['ref_id']} "
        f"ann_id={s['ann_id']} split={s['split']}: {s['reason']}"
        for s in skipped
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, choices=records.CONFIG_NAMES)
    parser.add_argument("--data_dir", required=True, help="TFDS data_dir to write into")
    parser.add_argument(
        "--manual_dir", default=None,
        help="folder with the raw refer layout (optional for refshapes: generated if absent)",
    )
    parser.add_argument(
        "--skip_corrupt", action="store_true",
        help="leave out (and list) objects with a missing or corrupt image, an empty mask or no "
        "expression",
    )
    parser.add_argument(
        "--refshapes_num_images", type=int, default=None,
        help="number of images of a generated RefShapes (default: the generator's); each "
        "size is its own dataset, refshapes_n<N>",
    )
    parser.add_argument(
        "--num_workers", type=int, default=None,
        help="processes for image checks and masks (default: every available core; 1 = "
        "serial); the written records are the same whatever the number",
    )
    args = parser.parse_args(argv)
    try:  # the dataset built: refshapes_n<N> for a RefShapes of another size
        name = records.build_name(args.config, args.manual_dir, args.refshapes_num_images)
    except ValueError as e:
        parser.error(str(e))
    try:
        counts = records.prepare(
            args.config,
            args.data_dir,
            manual_dir=args.manual_dir,
            skip_corrupt=args.skip_corrupt,
            refshapes_num_images=args.refshapes_num_images,
            num_workers=args.num_workers,
        )
    except (refer.ReferFormatError, FileNotFoundError, build_lock.BuildLockedError,
            records.UnusableDatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{records.BUILDER_NAME}/{name} in {args.data_dir}")
    print(format_counts(counts))
    stats = records.combined_stats(name, args.data_dir)
    if stats:
        print(combined.format_stats(stats))
    report = format_skipped(records.skipped(name, args.data_dir))
    if report:
        print(report)
    latin1 = records.latin1_fallback(name, args.data_dir)
    if latin1:
        print(f"{len(latin1)} expression(s) were not valid UTF-8; their other bytes were read "
              "as latin-1: " + ", ".join(f"ref_id={s['ref_id']} sent_id={s['sent_id']}"
                                         for s in latin1[:20])
              + (f" and {len(latin1) - 20} more" if len(latin1) > 20 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
