"""The read/prepare API the rest of lts-jax uses (the "Records" contract in docs/CONTRACTS.md).

No TensorFlow anywhere: the builder writes array_record, ``data_source`` returns
TFDS's ArrayRecordDataSource (random access: ``len``/``__getitem__``, works with
grain), and the decoders here use PIL only.

A raw example, as ``data_source(...)[i]`` returns it:
``image`` bytes (the original JPEG), ``mask`` bytes (PNG), ``expressions`` object
array of UTF-8 bytes, ``sent_ids`` int64[n], ``bbox`` float32[4] and the int64
scalars ``category_id``, ``image_id``, ``ann_id``, ``ref_id``, ``height``, ``width``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tfds_refcoco import builder as builder_lib
from tfds_refcoco import images, masks

BUILDER_NAME: str = builder_lib.BUILDER_NAME
CONFIG_NAMES: tuple[str, ...] = builder_lib.CONFIG_NAMES
_INT_KEYS = ("category_id", "image_id", "ann_id", "ref_id", "height", "width")


def get_builder(
    config_name: str, data_dir: str | os.PathLike, **kwargs: Any
) -> builder_lib.RefcocoMasks:
    """The builder for ``config_name`` under ``data_dir`` (built directly, not by name lookup:
    TFDS's name registry falls back to community datasets, which imports TensorFlow)."""
    if config_name not in CONFIG_NAMES:
        raise ValueError(f"unknown config {config_name!r}; choose one of {list(CONFIG_NAMES)}")
    return builder_lib.RefcocoMasks(config=config_name, data_dir=os.fspath(data_dir), **kwargs)


def _counts(b: builder_lib.RefcocoMasks) -> dict[str, dict[str, int]]:
    counts = b.info.metadata.get("counts")
    if not counts:
        raise RuntimeError(f"{b.data_path}: prepared without counts in metadata.json; rebuild it")
    # The metadata must agree with what TFDS itself recorded for the written files.
    written = {name: int(info.num_examples) for name, info in b.info.splits.items()}
    if written != {split: int(c["objects"]) for split, c in counts.items()}:
        raise RuntimeError(f"{b.data_path}: metadata counts {counts} disagree with the splits "
                           f"written {written}; delete the folder and prepare again")
    return {split: {k: int(v) for k, v in c.items()} for split, c in counts.items()}


def prepare(
    config_name: str,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    skip_corrupt: bool = False,
    *,
    refshapes_num_images: int | None = None,
    num_workers: int | None = None,
) -> dict[str, dict[str, int]]:
    """Builds ``config_name`` into ``data_dir`` unless it is already fully prepared there.

    ``manual_dir`` holds the raw refer layout (see RefcocoMasks.MANUAL_DOWNLOAD_INSTRUCTIONS);
    for ``refshapes`` it may be None, and the raw data is then generated under data_dir
    (``refshapes_num_images`` images; None = the generator's default). ``skip_corrupt``
    leaves out (and records, see ``skipped``) unusable objects instead of failing.
    ``num_workers``: build processes (None = every available core); the records do not
    depend on it. A build of the same config already running into ``data_dir`` makes
    this raise ``build_lock.BuildLockedError`` (one line naming it and its holder).

    Returns {split: {'objects': n, 'images': n, 'expressions': n}}. An existing
    dataset is returned as is, whatever the arguments (delete it to rebuild).
    """
    b = get_builder(
        config_name, data_dir, skip_corrupt=skip_corrupt,
        refshapes_num_images=refshapes_num_images, num_workers=num_workers,
    )
    if b.data_path.exists():
        if not b.is_prepared():  # only outside tampering leaves this; TFDS would "reuse" it
            raise RuntimeError(
                f"{b.data_path} exists but is not a complete dataset (no dataset_info.json / "
                "features.json); delete it and prepare again"
            )
    else:
        b.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual_dir) if manual_dir is not None else None,
                try_download_gcs=False,
            )
        )
        # Read back what is on disk: if a concurrent build finished first, TFDS reused
        # it and ``b`` still holds the info of the empty folder it started from.
        b = get_builder(config_name, data_dir)
    return _counts(b)


def skipped(config_name: str, data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Objects left out of a prepared dataset by skip_corrupt: [{ref_id, ann_id, split, reason}]."""
    b = _prepared_builder(config_name, data_dir)
    return list(b.info.metadata.get("skipped", []))


def combined_stats(config_name: str, data_dir: str | os.PathLike) -> dict[str, Any] | None:
    """What refcocox_combined's no-leak rule removed (see tfds_refcoco.combined.combine),
    or None for the other configs."""
    return _prepared_builder(config_name, data_dir).info.metadata.get("combined")


def latin1_fallback(config_name: str, data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Sentences whose Python 2 text was not valid UTF-8 and was read with the latin-1
    fallback (see tfds_refcoco.refer): [{ref_id, sent_id, source}], empty for clean files."""
    b = _prepared_builder(config_name, data_dir)
    return list(b.info.metadata.get("latin1_fallback", {}).get("sentences", []))


def _prepared_builder(config_name: str, data_dir: str | os.PathLike) -> builder_lib.RefcocoMasks:
    b = get_builder(config_name, data_dir)
    if not (b.data_path.exists() and b.is_prepared()):
        raise FileNotFoundError(
            f"{BUILDER_NAME}/{config_name} is not prepared in {data_dir}; run "
            f"`python -m tfds_refcoco.build --config {config_name} --data_dir {data_dir} "
            "--manual_dir <refer data>` (or tfds_refcoco.records.prepare) first"
        )
    return b


def data_source(config_name: str, split: str, data_dir: str | os.PathLike) -> Sequence[Any]:
    """Random-access source (``len``, ``__getitem__``) of raw examples of a prepared split."""
    b = _prepared_builder(config_name, data_dir)
    if split.split("[")[0] not in b.info.splits:  # 'train[:10]'-style slices are allowed
        raise ValueError(
            f"{BUILDER_NAME}/{config_name} has no split {split!r}; it has {list(b.info.splits)}"
        )
    return b.as_data_source(split=split)


def decode_expressions(raw: Mapping[str, Any]) -> list[str]:
    """The expressions of a raw example as text (no image decode)."""
    return [e.decode("utf-8") if isinstance(e, bytes) else str(e) for e in raw["expressions"]]


def decode_example(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Decodes a raw example: RGB pixels (grayscale/CMYK converted), {0, 1} mask, text, ids."""
    out: dict[str, Any] = {
        "image": images.decode_rgb(raw["image"]),
        "mask": masks.decode_mask_png(raw["mask"]),
        "expressions": decode_expressions(raw),
        "sent_ids": np.asarray(raw["sent_ids"], dtype=np.int64),
        "bbox": np.asarray(raw["bbox"], dtype=np.float32),
    }
    out.update({k: int(raw[k]) for k in _INT_KEYS})
    return out
