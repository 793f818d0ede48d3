"""TFDS builder ``refcoco_masks``: RefCOCO / RefCOCO+ / RefCOCOg with masks, and RefShapes.

Named ``refcoco_masks`` because TFDS ships its own ``ref_coco`` (boxes only, no
masks, needs TensorFlow). This builder needs no TensorFlow: it writes array_record
files, uses only Tensor/Scalar features (no nested Sequence), and is driven from
Python (``tfds_refcoco.records.prepare`` or ``python -m tfds_refcoco.build``).

Configs and splits: one example per referred object. Sizes of the real data as
objects (images) per split, from TFDS's ``ref_coco`` README; expression counts for
refcoco_unc from the lts-jax design brief (120,624 / 10,834 / 5,657 / 5,095):

================  =================  =============================================
config            raw files          train / validation / testA / testB or test
================  =================  =============================================
refcoco_unc       refcoco/refs(unc)  42,404 (16,994) / 3,811 (1,500) /
                                     1,975 (750) / 1,810 (750)
refcoco_google    refcoco/           40,000 (19,213) / 5,000 (4,559) /
                  refs(google)       test 5,000 (4,527)
refcocoplus_unc   refcoco+/          42,278 (16,992) / 3,805 (1,500) /
                  refs(unc)          1,975 (750) / 1,798 (750)
refcocog_umd      refcocog/          42,226 (21,899) / 2,573 (1,300) /
                  refs(umd)          test 5,023 (2,600)
refcocog_google   refcocog/          44,822 (24,698) / 5,000 (4,650); no test
                  refs(google)
refshapes         refshapes/         train / validation / testA / testB, synthetic,
                  refs(unc)          generated under data_dir if no manual_dir;
                                     refshapes_n<N>: generated with N images
refcocox_combined the three above:   train: the three train splits minus every
                  refcoco/refs(unc), object on an image of any of their eval splits;
                  refcoco+/refs(unc) plus those eight eval splits unchanged, as
                  refcocog/refs(umd) <source>_<split> (see tfds_refcoco.combined)
================  =================  =============================================

Each example stores its image's full JPEG, so an image with k referred objects is
stored k times (RefCOCO unc: ~50k objects x ~160 KB, about 8 GB per config).

Features of an example (all flat Tensors/Scalars):
- ``image``: the original image file bytes (JPEG), never re-encoded;
- ``mask``: 1-bit PNG of the object's mask at the original size, the union of its
  polygons/RLE (pycocotools decode(merge(frPyObjects(seg, h, w)))), polygons
  clipped to the image;
- ``expressions``: every non-empty ``raw`` sentence, UTF-8, verbatim (non-ASCII
  kept); ``sent_ids``: their sent_ids, same order;
- ``bbox``: float32 [x, y, w, h] in pixels (instances.json);
- ``category_id``, ``image_id``, ``ann_id``, ``ref_id``, ``height``, ``width``;
- refcocox_combined only: ``source`` (b'refcoco', b'refcocoplus' or b'refcocog'),
  since ref_ids repeat across datasets (its records are keyed by source/ref_id).

Per-split counts of objects/images/expressions and every skipped object are stored
in the dataset's ``metadata.json`` (``info.metadata``), so a prepared dataset can
report them without a pass over the records.

Bad input: before writing anything, every object is checked (``validate``: an
expression left, the image decodes fully at the annotated size, the segmentation is
well formed and has area inside the image); all problems are reported in one
``ReferFormatError`` naming ref/ann ids and files, or, with ``skip_corrupt``, those
objects are left out and listed in ``metadata.json``. Missing files and malformed
refs/instances raise ``ReferFormatError`` naming the file and the expected layout.
Any other error during generation propagates; TFDS writes into a temporary
``incomplete.*`` directory and renames it only on success, so a failed build leaves
nothing that looks prepared, and a rerun starts from scratch.

A missing image file is an error naming the files (or, with ``skip_corrupt``, its
objects are skipped with the reason ``image file missing: <path>``). Python 2 refs
strings that are not valid UTF-8 are read with a latin-1 fallback (see ``refer``),
warned about and listed in ``metadata.json`` (``latin1_fallback``).

Speed: validation (a full decode of every image) and the masks (rasterise + PNG)
run on ``num_workers`` processes (default: every core this process may use), in
order, so the records are byte-identical to a one-worker build. One build of a
config per data_dir at a time (``build_lock``: a second one stops with a one-line
message), and holding that lock a build first removes the ``incomplete.*`` folders
that killed builds left.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from tfds_refcoco import (
    build_lock,
    combined,
    masks,
    refer,
    tf_free_shuffle,
    validate,
    workers,
)

BUILDER_NAME = "refcoco_masks"
REFSHAPES_RAW_DIR = "downloads/refshapes_raw"  # relative to data_dir

_CITATION = """\
@inproceedings{jing2021locate,
  title={Locate then Segment: A Strong Pipeline for Referring Image Segmentation},
  author={Jing, Ya and Kong, Tao and Wang, Wei and Wang, Liang and Li, Lei and Tan, Tieniu},
  booktitle={CVPR}, year={2021}
}
@inproceedings{yu2016modeling,
  title={Modeling Context in Referring Expressions},
  author={Yu, Licheng and Poirson, Patrick and Yang, Shan and Berg, Alexander C and
          Berg, Tamara L},
  booktitle={ECCV}, year={2016}
}
@inproceedings{mao2016generation,
  title={Generation and Comprehension of Unambiguous Object Descriptions},
  author={Mao, Junhua and Huang, Jonathan and Toshev, Alexander and Camburu, Oana and
          Yuille, Alan L and Murphy, Kevin},
  booktitle={CVPR}, year={2016}
}
"""

_ARCHIVE = "https://web.archive.org/web/2022/https://bvisionweb1.cs.unc.edu/licheng/referit/data"


@dataclasses.dataclass(eq=False)
class RefConfig(tfds.core.BuilderConfig):
    """Which refer folder and which partition's refs file a config reads; ``num_images``: the
    size of a generated RefShapes (0 = the generator's default)."""

    dataset: str = ""
    partition: str = ""
    num_images: int = 0


def _config(name: str, dataset: str, partition: str, description: str) -> RefConfig:
    return RefConfig(name=name, dataset=dataset, partition=partition, description=description)


CONFIGS: tuple[RefConfig, ...] = (
    _config("refcoco_unc", "refcoco", "unc", "RefCOCO, UNC partition (train/val/testA/testB)."),
    _config("refcoco_google", "refcoco", "google", "RefCOCO, Google partition (train/val/test)."),
    _config("refcocoplus_unc", "refcoco+", "unc", "RefCOCO+, UNC partition (no location words)."),
    _config("refcocog_umd", "refcocog", "umd", "RefCOCOg, UMD partition (train/val/test)."),
    _config("refcocog_google", "refcocog", "google", "RefCOCOg, Google partition (train/val)."),
    _config("refshapes", "refshapes", "unc", "RefShapes: synthetic shapes in the refer layout."),
    _config(combined.CONFIG_NAME, "refcocox", "combined",
            "refcoco_unc + refcocoplus_unc + refcocog_umd train minus every object on an image "
            "of any of their eval splits; those eight splits as <source>_<split>."),
)
CONFIG_NAMES: tuple[str, ...] = tuple(c.name for c in CONFIGS)
REFSHAPES = "refshapes"
_SIZED_REFSHAPES = re.compile(r"refshapes_n([1-9][0-9]*)")


def default_refshapes_images() -> int:
    """The number of images of the generator's default RefShapes."""
    from tfds_refcoco import refshapes  # imported late: only RefShapes needs it

    return sum(n for _, n in refshapes.DEFAULT_SPLIT_IMAGES)


def refshapes_config_name(num_images: int | None) -> str:
    """The config of a generated RefShapes of ``num_images`` images: ``refshapes`` for the
    generator's default (None, 0 or that very number), else ``refshapes_n<num_images>``.
    Each size is its own dataset, so switching sizes on one data_dir never reuses another's.
    """
    if not num_images or num_images == default_refshapes_images():
        return REFSHAPES
    from tfds_refcoco import refshapes

    try:  # refused here, before anything is written
        refshapes.split_sizes(num_images)
    except ValueError as e:
        raise ValueError(f"refshapes_num_images={num_images}: {e} (0 = the default size, "
                         f"{default_refshapes_images()} images)") from None
    return f"{REFSHAPES}_n{num_images}"


def sized_refshapes_images(config_name: str) -> int | None:
    """N for a ``refshapes_n<N>`` config name, else None."""
    match = _SIZED_REFSHAPES.fullmatch(config_name)
    return int(match.group(1)) if match else None


@functools.cache
def _sized_refshapes_config(num_images: int) -> RefConfig:
    base = next(c for c in CONFIGS if c.name == REFSHAPES)
    return RefConfig(name=f"{REFSHAPES}_n{num_images}", dataset=base.dataset,
                     partition=base.partition, num_images=num_images,
                     description=f"RefShapes generated with {num_images} images.")


def raw_refshapes_dir(data_dir: str | os.PathLike, num_images: int | None = None) -> Path:
    """Where a generated RefShapes' raw files live under ``data_dir``."""
    tag = "default" if num_images is None else str(num_images)
    return Path(data_dir) / REFSHAPES_RAW_DIR / f"n{tag}"


def _record_key(obj: refer.RefObject) -> int | str:
    # Combined: ref_ids repeat across datasets, (source, ref_id) does not.
    return combined.record_key(obj) if isinstance(obj, combined.SourcedObject) else obj.ref_id


class RefcocoMasks(tfds.core.GeneratorBasedBuilder):
    """Referring expressions with object masks (RefCOCO family, RefShapes); see module doc."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: union masks, original JPEG bytes."}
    BUILDER_CONFIGS = list(CONFIGS)  # and a refshapes_n<N> per RefShapes size, made on demand
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download and unzip into one folder, <manual_dir>:

1. The refer annotations (each zip holds a folder of the same name):
     refcoco.zip, refcoco+.zip, refcocog.zip
   from https://bvisionweb1.cs.unc.edu/licheng/referit/data/ (the original host, often down)
   or the archived copies:
     {_ARCHIVE}/refcoco.zip
     {_ARCHIVE}/refcoco+.zip
     {_ARCHIVE}/refcocog.zip
2. The COCO 2014 train images (13 GB): http://images.cocodataset.org/zips/train2014.zip

The result must look like this (only the folders of the configs you build are needed):
{refer.LAYOUT}

Then run:  python -m tfds_refcoco.build --config refcoco_unc --manual_dir <manual_dir> \\
               --data_dir <data_dir>
RefShapes needs no download: without --manual_dir it is generated under <data_dir>.
"""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.x resolves a packaged builder's path through `importlib_resources`,
        # which it no longer installs on Python >= 3.9 (ModuleNotFoundError at prepare
        # time). The file itself is all TFDS needs (to look for a checksums.tsv beside it).
        return epath.Path(__file__)

    @classmethod
    def get_builder_config(
        cls, name: str, version: str | tfds.core.Version | None = None
    ) -> tfds.core.BuilderConfig | None:
        """TFDS's lookup, plus ``refshapes_n<N>`` (RefShapes of N images) for any N: known
        to TFDS this way, no "custom data configuration" warning, and a pickled builder
        (which keeps the config by name) finds it again."""
        config = super().get_builder_config(name, version)
        num_images = sized_refshapes_images(name)
        if config is None and num_images is not None:
            config = _sized_refshapes_config(num_images)
        return config

    def __init__(
        self,
        *,
        skip_corrupt: bool = False,
        num_workers: int | None = None,
        **kwargs: Any,
    ) -> None:
        """``skip_corrupt``: leave out (and report) objects that fail validation (corrupt
        image, malformed or zero-area segmentation, no expression) instead of failing.
        ``num_workers``: processes for validation and masks (None = every available
        core; 1 = all in this process). The records do not depend on it.
        Other keyword arguments go to ``tfds.core.GeneratorBasedBuilder``; a generated
        RefShapes' size is its config (``refshapes_config_name``).
        """
        kwargs.setdefault("file_format", "array_record")  # random access, no TensorFlow
        super().__init__(**kwargs)
        self._skip_corrupt = skip_corrupt
        self._num_workers = num_workers or workers.default_num_workers()
        self._original_state.update(  # so a pickled builder keeps its options
            skip_corrupt=skip_corrupt, num_workers=num_workers,
        )
        # The build's worker pool, only while _download_and_prepare runs (never pickled:
        # TFDS pickles a builder through _original_state).
        self._pool = workers.OrderedPool(1)
        self._latin1: list[dict[str, Any]] = []
        self._explicit_manual_dir: Path | None = None
        self._counts: dict[str, dict[str, int]] = {}
        self._skipped: list[validate.Problem] = []
        self._combined_stats: dict[str, Any] = {}

    def _is_combined(self) -> bool:
        return self.builder_config.name == combined.CONFIG_NAME

    def _info(self) -> tfds.core.DatasetInfo:
        string = np.object_
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=string),
                    "mask": tfds.features.Tensor(shape=(), dtype=string),
                    "expressions": tfds.features.Tensor(shape=(None,), dtype=string),
                    "sent_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                    "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "category_id": tfds.features.Scalar(dtype=np.int64),
                    "image_id": tfds.features.Scalar(dtype=np.int64),
                    "ann_id": tfds.features.Scalar(dtype=np.int64),
                    "ref_id": tfds.features.Scalar(dtype=np.int64),
                    "height": tfds.features.Scalar(dtype=np.int64),
                    "width": tfds.features.Scalar(dtype=np.int64),
                    # refcocox_combined only: which dataset the example comes from.
                    **({"source": tfds.features.Tensor(shape=(), dtype=string)}
                       if self._is_combined() else {}),
                }
            ),
            homepage="https://github.com/lichengunc/refer",
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
        )

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded
    # and prepared to ..." to stdout around every build: nothing is downloaded here, and
    # build.py / the trainer say what was built themselves.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
        """TFDS's download_and_prepare, holding this config's build lock (see build_lock):
        a concurrent build of the same config stops with BuildLockedError, and the
        ``incomplete.*`` folders of killed builds are removed first."""
        if self.data_path.exists():  # complete (TFDS renames atomically): nothing to lock,
            return super().download_and_prepare(*args, **kwargs)  # and maybe a read-only dir
        config_dir = Path(os.fspath(self.data_path)).parent
        what = f"{self.name}/{self.builder_config.name} in {self.data_dir_root}"
        with build_lock.BuildLock(config_dir, what):
            for stale in build_lock.remove_stale_incomplete(config_dir):
                logging.warning("Removed %s, left by a build that did not finish", stale)
            super().download_and_prepare(*args, **kwargs)

    def _download_and_prepare(self, dl_manager: Any, download_config: Any) -> None:
        # Remember whether the user named a manual_dir: only then is RefShapes read
        # from it rather than generated.
        self._explicit_manual_dir = (
            Path(download_config.manual_dir) if download_config.manual_dir else None
        )
        self._counts, self._skipped, self._latin1 = {}, [], []
        # The pool lives exactly as long as the build: closed (workers joined) however
        # this ends, so an error never leaves processes behind.
        # tf_free_shuffle: a split over 1 GB is shuffled through files TFDS opens with
        # tf.io.gfile; without TensorFlow that needs the stand-in.
        with workers.OrderedPool(self._num_workers) as pool, tf_free_shuffle.local_buckets():
            self._pool = pool
            try:
                super()._download_and_prepare(dl_manager, download_config)
            finally:
                self._pool = workers.OrderedPool(1)
        # Written with dataset_info.json into the temporary dir, so only on success.
        self.info.metadata["counts"] = self._counts
        self.info.metadata["skipped"] = [dataclasses.asdict(s) for s in self._skipped]
        self.info.metadata["source"] = {
            "dataset": self.builder_config.dataset,
            "partition": self.builder_config.partition,
        }
        if self._is_combined():
            self.info.metadata["combined"] = self._combined_stats
        if self.builder_config.dataset == REFSHAPES:  # the size generated; None: a manual dir
            self.info.metadata["refshapes_num_images"] = (
                None if self._explicit_manual_dir else self.builder_config.num_images)
        self.info.metadata["latin1_fallback"] = {
            "count": len(self._latin1), "sentences": self._latin1}

    def _raw_root(self, dl_manager: Any) -> Path:
        cfg = self.builder_config
        if cfg.dataset == REFSHAPES and self._explicit_manual_dir is None:
            from tfds_refcoco import refshapes  # imported late: only this config needs it

            num_images = cfg.num_images or None
            root = raw_refshapes_dir(self.data_dir_root, num_images)
            logging.info("Generating RefShapes raw data under %s", root)
            refshapes.generate(root, num_images=num_images)
            return root
        try:
            return Path(dl_manager.manual_dir)
        except AssertionError as e:  # TFDS's message names the dir and has the instructions
            raise refer.ReferFormatError(str(e)) from e

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        cfg = self.builder_config
        if self._is_combined():
            by_split, self._combined_stats = combined.read_combined(self._raw_root(dl_manager))
        else:
            by_split = refer.read_refer(self._raw_root(dl_manager), cfg.dataset, cfg.partition)
        self._latin1 = [  # source: as in Problem, "" but for refcocox_combined
            {"ref_id": o.ref_id, "sent_id": s, "source": getattr(o, "source", "")}
            for objs in by_split.values() for o in objs for s in o.latin1_sent_ids
        ]
        if not self._skip_corrupt:  # a clear error before decoding 20k images
            refer.check_images_exist(by_split)
        problems = validate.find_problems(by_split, self._pool)
        if problems and not self._skip_corrupt:
            raise refer.ReferFormatError(
                f"{len(problems)} object(s) cannot be used (pass skip_corrupt to leave them "
                f"out and list them):\n{validate.format_problems(problems)}"
            )
        for p in problems:
            logging.warning("Skipped ref_id=%d (ann_id=%d): %s", p.ref_id, p.ann_id, p.reason)
        bad = {(p.source, p.ref_id) for p in problems}  # combined: ref_ids repeat per source
        by_split = {
            s: [o for o in objs if (getattr(o, "source", ""), o.ref_id) not in bad]
            for s, objs in by_split.items()
        }
        emptied = sorted(s for s, objs in by_split.items() if not objs)
        if emptied:  # TFDS cannot write an empty split; say why instead
            raise refer.ReferFormatError(
                f"every object of split(s) {emptied} was skipped:\n"
                f"{validate.format_problems(problems)}"
            )
        self._skipped = problems
        self._counts = {
            split: {
                "objects": len(objs),
                "images": len({o.image_id for o in objs}),
                "expressions": sum(len(o.expressions) for o in objs),
            }
            for split, objs in by_split.items()
        }
        return {split: self._generate_examples(objs) for split, objs in by_split.items()}

    def _example(
        self, obj: refer.RefObject, image_bytes: bytes, mask_png: bytes
    ) -> dict[str, Any]:
        return {
            "image": image_bytes,  # the file as is: no re-encode
            "mask": mask_png,
            "expressions": list(obj.expressions),
            "sent_ids": list(obj.sent_ids),
            "bbox": np.asarray(obj.bbox, np.float32),
            "category_id": obj.category_id,
            "image_id": obj.image_id,
            "ann_id": obj.ann_id,
            "ref_id": obj.ref_id,
            "height": obj.height,
            "width": obj.width,
            **({"source": obj.source} if isinstance(obj, combined.SourcedObject) else {}),
        }

    def _generate_examples(
        self, objects: list[refer.RefObject]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        # Every object here passed validation; sorted by image, so each file is read once.
        # The masks (the costly part) come from the pool's workers, in order; the image
        # bytes are read here, not shipped through a pipe.
        pngs = self._pool.map(
            masks.segmentation_png, ((o.segmentation, o.height, o.width) for o in objects))
        current_id, current_bytes = None, b""
        for obj, png in zip(objects, pngs, strict=True):
            if obj.image_id != current_id:
                current_id, current_bytes = obj.image_id, obj.image_path.read_bytes()
            yield _record_key(obj), self._example(obj, current_bytes, png)
