"""Tokenisers for sequence datasets: byte-level (no training) and BPE (the ``tokenizers`` library).

A tokenizer turns text into token ids ``0..V-1`` and back. Its identity is a content hash
(:attr:`Tokenizer.sha256`): the canonical JSON of a ``tokenizer.json``, or a fixed string for the
byte-level one. The hash is part of a sequence dataset's fingerprint and is recorded in teacher
checkpoints and caches, so a cache, a teacher and a student made with different tokenizers are
refused rather than silently mixed (a token id means nothing without its tokenizer).

- ``bytes``: the UTF-8 bytes of the text, V = 256. Lossless, no training, no dependency.
- BPE: a byte-level BPE (GPT-2 style, lossless) trained with ``tokenizers`` on the training split,
  saved as ``tokenizer.json``; any other ``tokenizer.json`` (e.g. a Hugging Face model's) loads too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.errors import DatasetError
from pipeline.files import atomic_write

BYTES_IDENTITY = b"kd-pipeline byte-level tokenizer v1: token i is the byte i"


class Tokenizer:
    """What a sequence dataset needs of a tokenizer (the byte-level one is this base class).

    Attributes:
        kind: ``bytes`` or ``bpe`` (a ``tokenizer.json``).
        path: the ``tokenizer.json`` it was read from (None for bytes).
    """

    kind = "bytes"
    path: str | None = None

    @property
    def vocab_size(self) -> int:
        """V: token ids are ``0..V-1`` (the real vocabulary, whatever a model's head width)."""
        return 256

    @cached_property
    def sha256(self) -> str:
        """``sha256:<hex>`` of the tokenizer's content (its identity)."""
        return "sha256:" + hashlib.sha256(BYTES_IDENTITY).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        """(T,) int32 token ids of ``text``."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    @cached_property
    def byte_lengths(self) -> np.ndarray:
        """(V,) int64 the UTF-8 bytes each token stands for (for bits per byte)."""
        return np.ones(self.vocab_size, dtype=np.int64)

    def describe(self) -> dict:
        """JSON record for datasets, checkpoints and caches."""
        return {
            "kind": self.kind,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "path": self.path,
        }


class JsonTokenizer(Tokenizer):
    """A ``tokenizer.json`` of the ``tokenizers`` library (trained here or by anyone else)."""

    kind = "bpe"

    def __init__(self, text: str, path: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:  # pragma: no cover - the optional extra
            raise DatasetError(
                "a BPE tokenizer needs the `tokenizers` package: pip install 'kd-pipeline[text]'"
            ) from None
        try:
            self.impl = HFTokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - the library raises its own exception types
            raise DatasetError(f"{path or 'tokenizer'}: not a readable tokenizer.json ({e})") from e
        self.text = text
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> JsonTokenizer:
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        try:
            return cls(p.read_text(encoding="utf-8"), str(p))
        except OSError as e:
            raise DatasetError(f"tokenizer={path}: cannot read it ({e})") from e

    @property
    def vocab_size(self) -> int:
        return int(self.impl.get_vocab_size(with_added_tokens=True))

    @cached_property
    def sha256(self) -> str:
        # Canonical JSON: the same tokenizer saved twice (key order, spacing) has one identity.
        canon = json.dumps(json.loads(self.text), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        # Encoded line by line (a corpus in one string is slow and memory-hungry in the
        # library); byte-level BPE never merges across the newline, so the ids are the same.
        lines = text.splitlines(keepends=True)
        out = self.impl.encode_batch(lines, add_special_tokens=False)
        return np.fromiter((i for e in out for i in e.ids), dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.impl.decode([int(i) for i in ids], skip_special_tokens=False)

    @cached_property
    def byte_lengths(self) -> np.ndarray:
        vocab = self.impl.get_vocab(with_added_tokens=True)
        out = np.zeros(self.vocab_size, dtype=np.int64)
        byte_level = '"ByteLevel"' in json.dumps(json.loads(self.text).get("pre_tokenizer"))
        for token, i in vocab.items():
            if i < out.size:
                # Byte-level tokens spell one byte per character; others: their decoded text.
                out[i] = len(token) if byte_level else len(self.decode([i]).encode("utf-8"))
        return np.maximum(out, 1)


def train_bpe(texts: Iterable[str], vocab_size: int) -> JsonTokenizer:
    """A byte-level BPE with ``vocab_size`` tokens trained on ``texts`` (deterministic).

    Raises:
        DatasetError: ``tokenizers`` is missing, or ``vocab_size`` is below the 256 byte symbols.
    """
    if vocab_size < 257:
        raise DatasetError(
            f"vocab={vocab_size}: a byte-level BPE starts from 256 byte symbols; ask for more "
            "(e.g. vocab=4096), or use the byte-level tokenizer (no vocab=)"
        )
    try:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise DatasetError(
            "vocab= trains a BPE tokenizer, which needs the `tokenizers` package: "
            "pip install 'kd-pipeline[text]' (or drop vocab= for the byte-level tokenizer)"
        ) from None
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return JsonTokenizer(tok.to_str())


def save_tokenizer(tok: JsonTokenizer, path: Path) -> Path:
    """Write ``tok`` to ``path`` (``tokenizer.json``) atomically; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(tok.text, encoding="utf-8"))
    tok.path = str(path)
    return path
