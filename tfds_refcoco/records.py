"""The read/prepare API the rest of lts-jax uses (the "Records" contract in docs/CONTRACTS.md).

No TensorFlow anywhere: the builder writes array_record, ``data_source`` returns
TFDS's ArrayRecordDataSource (random access: ``len``/``__getitem__``, works with
grain), and the decoders here use PIL only.

A raw example, as ``data_source(...)[i]`` returns it:
``image`` bytes (the original JPEG), ``mask`` bytes (PNG), ``expressions`` object
array of UTF-8 bytes, ``sent_ids`` int64[n], ``bbox`` float32[4] and the int64
scalars ``category_id``, ``image_id``, ``ann_id``, ``ref_id``, ``height``, ``width``.

A generated RefShapes of each size is its own dataset (``dataset_name``): every function
here takes ``refshapes_num_images`` (None or 0 = the generator's default) or the sized name
``refshapes_n<N>`` itself; ``configured_dataset(config.data)`` gives the name a config reads.
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


class UnusableDatasetError(RuntimeError):
    """A dataset on disk that cannot be used as it is; the message says what to delete."""


def dataset_name(config_name: str, refshapes_num_images: int | None = None) -> str:
    """The prepared dataset (builder config) that ``config_name`` names at this RefShapes
    size: ``refshapes_n<N>`` for a generated RefShapes of N images, ``refshapes`` for the
    default size (None, 0 or the default number), any other config unchanged (the size
    only concerns RefShapes). Raises ValueError for a size the generator refuses."""
    sized = builder_lib.sized_refshapes_images(config_name)
    if sized is not None:  # already a sized name: normalised ('refshapes_n1080' = default)
        if refshapes_num_images and int(refshapes_num_images) != sized:
            raise ValueError(f"{config_name} is RefShapes of {sized} images, not "
                             f"refshapes_num_images={refshapes_num_images}")
        return builder_lib.refshapes_config_name(sized)
    if config_name != builder_lib.REFSHAPES or not refshapes_num_images:
        return config_name
    return builder_lib.refshapes_config_name(int(refshapes_num_images))


def configured_dataset(data: Any) -> str:
    """The prepared dataset a config reads: ``dataset_name(data.dataset,
    data.refshapes_num_images)`` for ``config.data`` (a missing size = the default)."""
    return dataset_name(str(data.dataset), data.get("refshapes_num_images", 0) or None)


def _known(name: str) -> bool:
    return name in CONFIG_NAMES or builder_lib.sized_refshapes_images(name) is not None


def get_builder(
    config_name: str,
    data_dir: str | os.PathLike,
    *,
    refshapes_num_images: int | None = None,
    **kwargs: Any,
) -> builder_lib.RefcocoMasks:
    """The builder for ``config_name`` (at this RefShapes size) under ``data_dir`` (built
    directly, not by name lookup: TFDS's name registry falls back to community datasets,
    which imports TensorFlow)."""
    if not _known(config_name):
        raise ValueError(f"unknown config {config_name!r}; choose one of {list(CONFIG_NAMES)}")
    name = dataset_name(config_name, refshapes_num_images)
    return builder_lib.RefcocoMasks(config=name, data_dir=os.fspath(data_dir), **kwargs)


def _counts(b: builder_lib.RefcocoMasks) -> dict[str, dict[str, int]]:
    counts = b.info.metadata.get("counts")
    if not counts:
        raise UnusableDatasetError(
            f"{b.data_path}: prepared without counts in metadata.json; rebuild it")
    # The metadata must agree with what TFDS itself recorded for the written files.
    written = {name: int(info.num_examples) for name, info in b.info.splits.items()}
    if written != {split: int(c["objects"]) for split, c in counts.items()}:
        raise UnusableDatasetError(
            f"{b.data_path}: metadata counts {counts} disagree with the splits written "
            f"{written}; delete the folder and prepare again")
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
    (``refshapes_num_images`` images, its own dataset ``dataset_name(...)`` per size;
    None or 0 = the generator's default; not with a manual_dir). ``skip_corrupt``
    leaves out (and records, see ``skipped``) unusable objects instead of failing.
    ``num_workers``: build processes (None = every available core); the records do not
    depend on it. A build of the same config already running into ``data_dir`` makes
    this raise ``build_lock.BuildLockedError`` (one line naming it and its holder).

    Returns {split: {'objects': n, 'images': n, 'expressions': n}}. An existing
    dataset is returned as is, whatever the other arguments (delete it to rebuild).
    """
    name = build_name(config_name, manual_dir, refshapes_num_images)
    b = get_builder(name, data_dir, skip_corrupt=skip_corrupt, num_workers=num_workers)
    if b.data_path.exists():
        if not b.is_prepared():  # only outside tampering leaves this; TFDS would "reuse" it
            raise UnusableDatasetError(
                f"{b.data_path} exists but is not a complete dataset (no dataset_info.json / "
                "features.json); delete it and prepare again"
            )
        _check_legacy_refshapes(b)
    else:
        b.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual_dir) if manual_dir is not None else None,
                try_download_gcs=False,
            )
        )
        # Read back what is on disk: if a concurrent build finished first, TFDS reused
        # it and ``b`` still holds the info of the empty folder it started from.
        b = get_builder(b.builder_config.name, data_dir)
    return _counts(b)


def build_name(
    config_name: str,
    manual_dir: str | os.PathLike | None = None,
    refshapes_num_images: int | None = None,
) -> str:
    """The dataset ``prepare`` builds for these arguments (``dataset_name``); ValueError,
    before anything is written, for a size the generator refuses or a size with a
    manual_dir (which is read as it is)."""
    if not _known(config_name):
        raise ValueError(f"unknown config {config_name!r}; choose one of {list(CONFIG_NAMES)}")
    name = dataset_name(config_name, refshapes_num_images)
    num_images = builder_lib.sized_refshapes_images(name)
    if num_images is not None and manual_dir is not None:
        raise ValueError(
            f"refshapes_num_images={num_images} sizes a generated RefShapes, but a manual_dir "
            "is read as it is: pass one or the other"
        )
    return name


def skipped(
    config_name: str, data_dir: str | os.PathLike, *, refshapes_num_images: int | None = None
) -> list[dict[str, Any]]:
    """Objects left out of a prepared dataset by skip_corrupt: [{ref_id, ann_id, split, reason}]."""
    b = _prepared_builder(config_name, data_dir, refshapes_num_images)
    return list(b.info.metadata.get("skipped", []))


def combined_stats(
    config_name: str, data_dir: str | os.PathLike, *, refshapes_num_images: int | None = None
) -> dict[str, Any] | None:
    """What refcocox_combined's no-leak rule removed (see tfds_refcoco.combined.combine),
    or None for the other configs."""
    b = _prepared_builder(config_name, data_dir, refshapes_num_images)
    return b.info.metadata.get("combined")


def latin1_fallback(
    config_name: str, data_dir: str | os.PathLike, *, refshapes_num_images: int | None = None
) -> list[dict[str, Any]]:
    """Sentences whose Python 2 text was not valid UTF-8 and was read with the latin-1
    fallback (see tfds_refcoco.refer): [{ref_id, sent_id, source}], empty for clean files."""
    b = _prepared_builder(config_name, data_dir, refshapes_num_images)
    return list(b.info.metadata.get("latin1_fallback", {}).get("sentences", []))


def _build_command(name: str, data_dir: str | os.PathLike) -> str:
    num_images = builder_lib.sized_refshapes_images(name)
    if num_images is not None:
        return (f"python -m tfds_refcoco.build --config {builder_lib.REFSHAPES} "
                f"--refshapes_num_images {num_images} --data_dir {data_dir}")
    if name == builder_lib.REFSHAPES:
        return f"python -m tfds_refcoco.build --config {name} --data_dir {data_dir}"
    return (f"python -m tfds_refcoco.build --config {name} --data_dir {data_dir} "
            "--manual_dir <refer data>")


def _check_legacy_refshapes(b: builder_lib.RefcocoMasks) -> None:
    """Refuses a resized RefShapes at the default size's path: before each size had its own
    dataset, the first size built into a data_dir took that path for every size. Such a
    build lacks ``refshapes_num_images`` in its metadata, was generated (the raw files of
    its size exist, the default's do not) and has another number of images."""
    if b.builder_config.name != builder_lib.REFSHAPES or "refshapes_num_images" in b.info.metadata:
        return
    counts = b.info.metadata.get("counts") or {}
    total = sum(int(c.get("images", 0)) for c in counts.values())
    data_dir = b.data_dir_root
    default = builder_lib.default_refshapes_images()
    if (total != default and not builder_lib.raw_refshapes_dir(data_dir).exists()
            and builder_lib.raw_refshapes_dir(data_dir, total).exists()):
        tokenizers = os.path.join(data_dir, "lts_tokenizers", "refshapes_unigram*.model")
        raise UnusableDatasetError(
            f"{b.data_path} holds a RefShapes generated with refshapes_num_images={total}, "
            f"not the default {default} images (older builds reused one size for all); "
            f"delete it and {tokenizers}, then prepare again"
        )


def _prepared_builder(
    config_name: str, data_dir: str | os.PathLike, refshapes_num_images: int | None = None
) -> builder_lib.RefcocoMasks:
    b = get_builder(config_name, data_dir, refshapes_num_images=refshapes_num_images)
    if not (b.data_path.exists() and b.is_prepared()):
        name = b.builder_config.name
        raise FileNotFoundError(
            f"{BUILDER_NAME}/{name} is not prepared in {data_dir}; run "
            f"`{_build_command(name, data_dir)}` (or tfds_refcoco.records.prepare) first"
        )
    _check_legacy_refshapes(b)
    return b


def check_splits(
    config_name: str,
    names: Sequence[str],
    data_dir: str | os.PathLike,
    *,
    refshapes_num_images: int | None = None,
) -> None:
    """Raises ValueError, one line naming the first unknown split and the available ones,
    unless every name (or its 'train[:10]'-style slice) is a split of the prepared dataset."""
    _check_split_names(_prepared_builder(config_name, data_dir, refshapes_num_images), names)


def _check_split_names(b: builder_lib.RefcocoMasks, names: Sequence[str]) -> None:
    available = list(b.info.splits)  # in the order they were written: train first
    for name in names:
        if name.split("[")[0] not in available:
            raise ValueError(f"unknown split {name!r} for {b.builder_config.name}; "
                             f"available: {', '.join(available)}")


def data_source(
    config_name: str,
    split: str,
    data_dir: str | os.PathLike,
    *,
    refshapes_num_images: int | None = None,
) -> Sequence[Any]:
    """Random-access source (``len``, ``__getitem__``) of raw examples of a prepared split
    ('train[:10]'-style slices allowed)."""
    b = _prepared_builder(config_name, data_dir, refshapes_num_images)
    _check_split_names(b, [split])
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
