"""SentencePiece tokenizer trained deterministically on a dataset's training expressions.

The model file lives under the TFDS data_dir, keyed by the prepared dataset (a generated RefShapes
of each size is its own) and requested vocab size, so every run (and every host) tokenises the
same way. Training is made reproducible: sorted input, no sentence sampling or shuffling, one
thread, a fixed global seed; the same expressions give a byte-identical model file.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import sentencepiece as spm
from etils import epath

PAD_ID = 0
UNK_ID = 1
_SEED = 0
# The trainer's random seed is process-global state in sentencepiece: serialise training.
_TRAIN_LOCK = threading.Lock()


def train_sentencepiece(expressions: Iterable[str], vocab_size: int) -> bytes:
    """Train a unigram SentencePiece model and return the serialised model proto.

    hard_vocab_limit=False lets tiny corpora (RefShapes) end up with fewer pieces than asked
    instead of failing. Duplicates are kept (their counts are what unigram training fits) but
    the input is sorted, so the result does not depend on dataset order.
    """
    corpus = sorted(e.strip() for e in expressions if e and e.strip())
    if not corpus:
        raise ValueError("cannot train a tokenizer on an empty set of expressions")
    writer = io.BytesIO()
    with _TRAIN_LOCK:
        spm.set_random_generator_seed(_SEED)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            hard_vocab_limit=False,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            # NFKC + case folding: expressions are matched case-insensitively.
            normalization_rule_name="nmt_nfkc_cf",
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            eos_id=-1,
            minloglevel=2,
        )
    return writer.getvalue()


class Tokenizer:
    """Text -> fixed-length ids with a padding mask. Picklable (for grain worker processes)."""

    pad_id: int = PAD_ID
    unk_id: int = UNK_ID

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        if self._sp.pad_id() != PAD_ID:
            raise ValueError(f"model pad id is {self._sp.pad_id()}, expected {PAD_ID}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        return cls(epath.Path(path).read_bytes())

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        """Actual number of pieces (can be below the requested size on small corpora)."""
        return int(self._sp.get_piece_size())

    def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32[max_len], mask bool[max_len]); long expressions are truncated.

        An expression with no pieces becomes a single unk token, so downstream pooling never
        sees an all-padding sequence.
        """
        ids = self._sp.encode(text)[:max_len] or [UNK_ID]
        out = np.full((max_len,), PAD_ID, dtype=np.int32)
        out[:len(ids)] = ids
        mask = np.zeros((max_len,), dtype=bool)
        mask[:len(ids)] = True
        return out, mask

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) != PAD_ID])

    def __getstate__(self) -> dict[str, Any]:
        return {"proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["proto"])


def tokenizer_path(data_dir: str | os.PathLike[str], dataset: str, vocab_size: int, *,
                   refshapes_num_images: int | None = None) -> epath.Path:
    """Where the model for (dataset config, requested vocab size) lives under data_dir.

    A RefShapes of another size than the default is another dataset (``refshapes_n<N>``,
    see tfds_refcoco.records.dataset_name), so its expressions get their own model.
    """
    if refshapes_num_images:  # deferred import, as in load_tokenizer
        from tfds_refcoco import records

        dataset = records.dataset_name(dataset, refshapes_num_images)
    return epath.Path(data_dir) / "lts_tokenizers" / f"{dataset}_unigram{vocab_size}.model"


def config_tokenizer_path(config: Any) -> epath.Path:
    """``tokenizer_path`` of the tokenizer ``load_tokenizer(config)`` uses."""
    data = config.data
    return tokenizer_path(data.data_dir, data.dataset, data.vocab_size,
                          refshapes_num_images=data.get("refshapes_num_images", 0) or None)


def train_or_load(path: str | os.PathLike[str], expressions_fn: Callable[[], Iterable[str]],
                  vocab_size: int) -> Tokenizer:
    """Load the model at `path`, or train it from expressions_fn() and save it there first."""
    path = epath.Path(path)
    if path.exists():
        return Tokenizer.from_file(path)
    proto = train_sentencepiece(expressions_fn(), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-replace: hosts training concurrently produce the same bytes, and a reader never
    # sees a half-written file. (epath's rename refuses an existing target: the slower of two
    # concurrent writers would fail.)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    tmp.write_bytes(proto)
    tmp.replace(path)
    return Tokenizer(proto)


def load_tokenizer(config: Any) -> Tokenizer:
    """Train-or-load the tokenizer for config.data.dataset (of the configured RefShapes size,
    config.data.refshapes_num_images) from its (prepared) train split."""
    from tfds_refcoco import records  # deferred: keeps this module usable without the builder

    data = config.data

    def expressions() -> list[str]:
        source = records.data_source(records.configured_dataset(data), data.train_split,
                                     data.data_dir)
        out: list[str] = []
        for i in range(len(source)):
            out.extend(records.decode_expressions(source[i]))
        return out

    return train_or_load(config_tokenizer_path(config), expressions, data.vocab_size)
