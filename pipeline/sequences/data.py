"""Sequence datasets: token sequences of fixed length P, each with next-token labels per position.

Two sources (registered in :mod:`pipeline.datasets`, so every step takes them as ``--dataset``):

- ``text:FILE:SPLIT[:seq=N][:vocab=V | :tokenizer=PATH][:test=F]``: a UTF-8 corpus (``.gz`` read
  transparently). The text is cut into blocks of whole lines (about 4 KB each); a seeded share of
  blocks (``test=0.1``, seed 0) is the ``test`` split, the rest ``train``. Each split's text is
  tokenised and cut into sequences of ``seq`` tokens (default 128) plus the one after (the last
  position's label), so every position of every sequence has a next-token target and no text of
  one split is seen by the other. Tokenizer: byte-level by default (V = 256); ``vocab=V`` trains a
  byte-level BPE on the **train** split's text (saved once under ``<output dir>/tokenizers/`` and
  reused, so every step sees the same file); ``tokenizer=PATH`` loads a ``tokenizer.json`` (or a
  directory holding one, e.g. a Hugging Face model's).
- ``tokens:FILE:SPLIT``: a ``.npz`` of token ids for users who tokenise elsewhere: ``x_<split>``
  (N, P) integers; optional ``y_<split>`` (N, P) next-token labels (default: the next position's
  token, the last position unlabeled), ``mask_<split>`` (N, P) 1 for real tokens and 0 for padding,
  ``vocab_size`` (scalar; default max id + 1) and ``tokenizer`` (a ``tokenizer.json`` string).

A :class:`SequenceDataset` is a :class:`~pipeline.datasets.Dataset` with ``x`` (N, P) int32 token
ids, ``y`` (N, P) int64 labels (:data:`NO_LABEL` where a position has no next token, :data:`PAD`
on padding), ``num_classes`` = V, and its tokenizer's record; its fingerprint covers the tokens,
labels, mask and the tokenizer's content hash.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.datasets import Dataset, register_dataset
from pipeline.errors import DatasetError
from pipeline.files import data_root
from pipeline.sequences.tokenizers import (
    JsonTokenizer,
    Tokenizer,
    save_tokenizer,
    train_bpe,
)
from pipeline.specs import SourceData

NO_LABEL = -100  # a position with no next-token target (soft targets still apply)
PAD = -101  # padding: neither term sees it
BLOCK_CHARS = 4096  # the unit of the train/test split: whole lines, about this many characters
DEFAULT_SEQ = 128
DEFAULT_TEST_SHARE = 0.1
SPLITS = ("train", "test")


@dataclass
class SequenceDataset(Dataset):
    """Token sequences (see the module docstring).

    Attributes:
        tokenizer: the tokenizer the ids belong to.
        mask: (N, P) bool, False on padding; None when every position is real.
        doc_starts: (N, P) bool, True where a document begins (packed documents of an ``hf:``
            text source); None when the source has no documents. Attention is not blocked there.
    """

    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    mask: np.ndarray | None = None
    doc_starts: np.ndarray | None = None

    @property
    def positions(self) -> int:
        """P: positions (cache rows) per sequence."""
        return int(self.x.shape[1])

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(super().fingerprint.encode())
        h.update(self.tokenizer.sha256.encode())
        if self.mask is not None:
            h.update(np.ascontiguousarray(self.mask, dtype=np.uint8).tobytes())
        if self.doc_starts is not None:  # not implied by the ids where documents end in text
            h.update(b"doc_starts")
            h.update(np.packbits(self.doc_starts).tobytes())
        return "sha256:" + h.hexdigest()

    def describe(self) -> dict:
        return {**super().describe(), "positions": self.positions, **tokenizer_record(self)}

    def valid(self) -> np.ndarray:
        """(N, P) bool: real (non-padding) positions."""
        return self.y != PAD

    def byte_count(self, labels: np.ndarray) -> int:
        """Bytes of text the labelled tokens in ``labels`` stand for (for bits per byte)."""
        ok = labels[labels >= 0]
        return int(self.tokenizer.byte_lengths[ok].sum())


def tokenizer_record(data: Dataset) -> dict:
    """``{"tokenizer": {...}}`` for a sequence dataset, else ``{}`` (for checkpoints and caches)."""
    return {"tokenizer": data.tokenizer.describe()} if isinstance(data, SequenceDataset) else {}


def is_sequence(data: Dataset) -> bool:
    return isinstance(data, SequenceDataset)


# ------------------------------------------------------------------------------------------ options
def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise ValueError("expected a positive integer")
    return n


def _share(v: str) -> float:
    f = float(v)
    if not 0 < f < 1:
        raise ValueError("expected a share in (0, 1)")
    return f


# ------------------------------------------------------------------------------------------ corpora
def read_corpus(path: Path) -> str:
    """The UTF-8 text of ``path`` (gzip when it ends in ``.gz``)."""
    if not path.is_file():
        raise DatasetError(f"text:{path}: no such file; give a UTF-8 text file (.txt or .txt.gz)")
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read it ({e})") from e
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{path}: not UTF-8 text ({e}); convert it, e.g. iconv -t UTF-8, or tokenise it "
            "yourself and use tokens:FILE.npz:SPLIT"
        ) from e


def split_text(text: str, split: str, test_share: float) -> str:
    """The text of one split: blocks of whole lines, a seeded ``test_share`` of them for test."""
    blocks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= BLOCK_CHARS:
            blocks.append("".join(current))
            current, size = [], 0
    if current:
        blocks.append("".join(current))
    n_test = max(1, int(round(test_share * len(blocks)))) if len(blocks) > 1 else 0
    held = np.zeros(len(blocks), dtype=bool)
    held[np.random.default_rng(0).permutation(len(blocks))[:n_test]] = True
    chosen = held if split == "test" else ~held
    return "".join(b for b, keep in zip(blocks, chosen, strict=True) if keep)


def corpus_tokenizer(
    path: Path, text: str, vocab: int | None, tokenizer: str | None, test_share: float
) -> Tokenizer:
    """The tokenizer a ``text:`` spec names: a file, a BPE trained on the train split, or bytes."""
    if tokenizer and vocab:
        raise DatasetError("text: give vocab=N (train a BPE) or tokenizer=PATH, not both")
    if tokenizer:
        return JsonTokenizer.load(tokenizer)
    if not vocab:
        return Tokenizer()
    # Trained once per (corpus content, vocab, split) and reused: a tokenizer trained again could
    # differ (ties), and every step and worker must see the very same ids.
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    where = data_root() / "tokenizers" / f"{path.stem}-{digest}-t{test_share:g}-bpe{vocab}"
    saved = where / "tokenizer.json"
    if saved.is_file():
        return JsonTokenizer.load(saved)
    train_text = split_text(text, "train", test_share)
    tok = train_bpe(train_text.splitlines(keepends=True), vocab)
    save_tokenizer(tok, saved)
    return tok


def cut_sequences(ids: np.ndarray, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of ``seq + 1`` tokens: inputs (N, seq) and next tokens (N, seq)."""
    n = ids.size // (seq + 1)
    win = ids[: n * (seq + 1)].reshape(n, seq + 1)
    return np.ascontiguousarray(win[:, :-1]), win[:, 1:].astype(np.int64)


@register_dataset(
    "text",
    ("file", "split"),
    "a UTF-8 corpus cut into token sequences: text:FILE:train|test[:seq=128][:vocab=4096]",
    options={"seq": _positive, "vocab": _positive, "tokenizer": str, "test": _share},
)
def _text(
    file: str,
    split: str,
    data_dir: str | None = None,
    seq: int = DEFAULT_SEQ,
    vocab: int | None = None,
    tokenizer: str | None = None,
    test: float = DEFAULT_TEST_SHARE,
) -> SourceData:
    if split not in SPLITS:
        raise DatasetError(f"text:{file}:{split}: the split must be train or test")
    path = Path(file)
    text = read_corpus(path)
    tok = corpus_tokenizer(path, text, vocab, tokenizer, test)
    ids = tok.encode(split_text(text, split, test))
    x, y = cut_sequences(ids, seq)
    if not len(x):
        raise DatasetError(
            f"text:{file}:{split}: {ids.size} tokens make no sequence of seq={seq} (+1); give a "
            "longer text or a smaller seq="
        )
    return _base(x, y, None, tok, {"file": str(path.resolve())})


@register_dataset(
    "tokens",
    ("file", "split"),
    "token ids in a .npz: x_<split> (N, P) [y_<split>, mask_<split>, vocab_size, tokenizer]",
)
def _tokens(file: str, split: str, data_dir: str | None = None) -> SourceData:
    path = Path(file)
    if not path.is_file():
        raise DatasetError(f"tokens:{file}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if f"x_{split}" not in keys:
                raise DatasetError(
                    f"{path}: no array 'x_{split}' for split {split!r}; it holds {sorted(keys)}. "
                    "Expected x_<split> (N, P) token ids, optionally y_<split> and mask_<split>."
                )
            x = np.asarray(z[f"x_{split}"])
            y = np.asarray(z[f"y_{split}"]) if f"y_{split}" in keys else None
            mask = np.asarray(z[f"mask_{split}"]).astype(bool) if f"mask_{split}" in keys else None
            vocab = int(z["vocab_size"]) if "vocab_size" in keys else None
            tok_json = str(z["tokenizer"]) if "tokenizer" in keys else None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable .npz file without pickles ({e})") from e
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise DatasetError(
            f"{path}: x_{split} should be (N, P) integer token ids, found {x.dtype} {x.shape}"
        )
    for name, arr in (("y", y), ("mask", mask)):
        if arr is not None and arr.shape != x.shape:
            raise DatasetError(
                f"{path}: {name}_{split} has shape {arr.shape}, x_{split} has {x.shape}; they "
                "must match"
            )
    if y is None:
        y = np.full(x.shape, NO_LABEL, dtype=np.int64)
        y[:, :-1] = x[:, 1:]
        if mask is not None:  # a real token followed by padding has no next token
            y[:, :-1][~mask[:, 1:]] = NO_LABEL
    y = y.astype(np.int64)
    tok: Tokenizer
    if tok_json is not None:
        tok = JsonTokenizer(tok_json, f"{path}[tokenizer]")
    else:
        tok = _IdsOnly(vocab or int(max(x.max(initial=0), y.max(initial=0))) + 1)
    if mask is not None:
        y[~mask] = PAD
    v = tok.vocab_size
    bad = (x < 0) | (x >= v) | ((y >= v) | ((y < 0) & (y != NO_LABEL) & (y != PAD)))
    if mask is not None:
        bad &= mask
    if bad.any():
        raise DatasetError(
            f"{path}: {int(bad.sum())} token ids of split {split!r} are outside 0..{v - 1} (the "
            "vocabulary); fix the ids or give vocab_size"
        )
    return _base(x.astype(np.int32), y, mask, tok, {"file": str(path.resolve())})


class _IdsOnly(Tokenizer):
    """Token ids without a tokenizer file: identity = the vocabulary size (one byte per token)."""

    kind = "ids"

    def __init__(self, vocab: int) -> None:
        self._v = vocab

    @property
    def vocab_size(self) -> int:
        return self._v

    @cached_property
    def sha256(self) -> str:
        return (
            "sha256:" + hashlib.sha256(f"kd-pipeline token ids, V={self._v}".encode()).hexdigest()
        )

    def encode(self, text: str) -> np.ndarray:
        raise DatasetError("tokens: these token ids come without a tokenizer; cannot encode text")


def _base(
    x: np.ndarray,
    y: np.ndarray,
    mask: np.ndarray | None,
    tok: Tokenizer,
    source: dict,
    doc_starts: np.ndarray | None = None,
) -> SourceData:
    # Labels stay class indices for the generic checks (masked positions read as 0 there); the
    # sequence dataset puts the markers back once the rows are chosen.
    markers = y < 0
    clean = np.where(markers, 0, y)
    names = [str(i) for i in range(tok.vocab_size)]

    def extend(data: Dataset, kept: np.ndarray) -> SequenceDataset:
        labels = np.where(markers[kept], y[kept], data.y) if markers.any() else data.y
        return SequenceDataset(
            spec=data.spec,
            x=data.x,
            y=labels,
            ids=data.ids,
            num_classes=data.num_classes,
            class_names=data.class_names,
            source={**data.source, "tokenizer": tok.path},
            modifiers=data.modifiers,
            tokenizer=tok,
            mask=None if mask is None else mask[kept],
            doc_starts=None if doc_starts is None else doc_starts[kept],
        )

    return SourceData(x, clean, names, source, extend)
