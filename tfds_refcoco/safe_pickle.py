"""Load a pickle that may only hold plain containers and scalars.

The refer ``refs(*).p`` files are pickles, and unpickling an untrusted pickle can
run arbitrary code: any callable reachable through ``find_class`` (``os.system``,
``builtins.eval``...) can be invoked by the REDUCE/BUILD/NEWOBJ opcodes. Every
such path goes through ``find_class`` (and ``persistent_load`` for persistent
ids), so refusing both leaves only the opcodes that build dicts, lists, tuples,
sets, strings, bytes, numbers, booleans and None. Nothing in the file can run.

Python 2 ``str`` values (the refer files were written by Python 2) are bytes with no
declared encoding. They are decoded as UTF-8; a file in which some are not valid
UTF-8 (an annotation tool that wrote latin-1) is not refused: each byte that is not
part of valid UTF-8 is read as latin-1 instead, and every string so decoded comes
back as a ``Latin1Text`` (a ``str``), so callers can report which ones.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, NoReturn

# surrogateescape turns an undecodable byte b (0x80-0xFF) into U+DC00+b; this maps it
# to the latin-1 character of that byte.
_ESCAPED_TO_LATIN1 = {0xDC00 + b: b for b in range(0x80, 0x100)}


class Latin1Text(str):
    """Text decoded from a Python 2 ``str`` with the latin-1 fallback (see module doc)."""


def _from_escaped(text: str) -> str:
    if text.isascii() or not any(0xDC80 <= ord(c) <= 0xDCFF for c in text):
        return text
    return Latin1Text(text.translate(_ESCAPED_TO_LATIN1))


def decode_py2_str(data: bytes) -> str:
    """A Python 2 ``str``'s bytes as text: UTF-8, else a ``Latin1Text`` (module doc)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return _from_escaped(data.decode("utf-8", "surrogateescape"))


def _repair(obj: Any) -> Any:
    """``obj`` with every escaped string turned into its Latin1Text (containers rebuilt)."""
    if isinstance(obj, str):
        return _from_escaped(obj)
    if isinstance(obj, list):
        return [_repair(x) for x in obj]
    if isinstance(obj, dict):
        return {_repair(k): _repair(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_repair(x) for x in obj)
    if isinstance(obj, set | frozenset):
        return type(obj)(_repair(x) for x in obj)
    return obj


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
    as UTF-8, a superset of the ASCII that Python 3's default assumes, with the
    latin-1 fallback of the module doc for bytes that are not valid UTF-8.
    """
    try:
        return _PlainUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except UnicodeDecodeError:
        pass  # rare: pay for the second pass and the walk only then
    escaped = _PlainUnpickler(io.BytesIO(data), encoding="utf-8", errors="surrogateescape")
    return _repair(escaped.load())


def load_plain(path: str | os.PathLike) -> Any:
    """``loads_plain`` on the contents of the file at ``path``."""
    with open(path, "rb") as f:
        return loads_plain(f.read())
