"""Lets TFDS's shuffler spill to disk without TensorFlow.

TFDS shuffles a split in memory up to 1 GB (``shuffle.MAX_MEM_BUFFER_SIZE``) and then
writes it to 1,000 temporary bucket files through ``tf.io.gfile``: any split over
1 GB (RefCOCO's train split is ~6 GB) fails with ``No module named 'tensorflow'``.
While a build runs, ``local_buckets`` gives the shuffle module a stand-in for the
three ``tf.io.gfile`` calls it makes, on local files (the buckets live in the
build's own temporary folder). With TensorFlow installed nothing is changed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import resource
from collections.abc import Iterator
from types import SimpleNamespace

from tensorflow_datasets.core import shuffle

_BUCKET_FILES = shuffle.BUCKETS_NUMBER  # open at once while a large split is written


class _NeverRaised(Exception):
    """tf.errors.ResourceExhaustedError's stand-in: plain files raise OSError instead."""


_LOCAL_GFILE = SimpleNamespace(
    io=SimpleNamespace(gfile=SimpleNamespace(GFile=open, exists=os.path.exists,
                                             remove=os.remove)),
    errors=SimpleNamespace(ResourceExhaustedError=_NeverRaised),
)


def _allow_open_files(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@contextlib.contextmanager
def local_buckets() -> Iterator[None]:
    """Within: TFDS's shuffle buckets are plain local files if TensorFlow is absent."""
    if importlib.util.find_spec("tensorflow") is not None:
        yield
        return
    _allow_open_files(_BUCKET_FILES + 1024)
    saved = shuffle.tf
    shuffle.tf = _LOCAL_GFILE
    try:
        yield
    finally:
        shuffle.tf = saved
