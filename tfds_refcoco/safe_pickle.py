"""Load a pickle that may only hold plain containers and scalars.

The refer ``refs(*).p`` files are pickles, and unpickling an untrusted pickle can
run arbitrary code: any callable reachable through ``find_class`` (``os.system``,
``builtins.eval``...) can be invoked by the REDUCE/BUILD/NEWOBJ opcodes. Every
such path goes through ``find_class`` (and ``persistent_load`` for persistent
ids), so refusing both leaves only the opcodes that build dicts, lists, tuples,
sets, strings, bytes, numbers, booleans and None. Nothing in the file can run.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, NoReturn


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a Python object other than a plain container or scalar."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> NoReturn:
        raise UnsafePickleError(
            f"refusing to load the global {module}.{name}: only plain containers and "
            "scalars are allowed (loading other objects could execute code)"
        )

    def persistent_load(self, pid: Any) -> NoReturn:
        raise UnsafePickleError(f"refusing persistent id {pid!r} in a data pickle")


def loads_plain(data: bytes) -> Any:
    """Unpickle ``data``, admitting only plain containers and scalars.

    Python 2 ``str`` objects (the refer files were written by Python 2) are decoded
    as UTF-8, a superset of the ASCII that Python 3's default assumes.
    """
    return _PlainUnpickler(io.BytesIO(data), encoding="utf-8").load()


def load_plain(path: str | os.PathLike) -> Any:
    """``loads_plain`` on the contents of the file at ``path``."""
    with open(path, "rb") as f:
        return loads_plain(f.read())
