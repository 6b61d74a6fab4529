"""The ``hf:`` source with ``text=COLUMN``: a Hugging Face dataset's text as token sequences.

The text comes from a dataset on disk and is packed into token sequences.

``hf:DIR:SPLIT:text=COLUMN[:tokenizer=PATH][:seq=N][:test=F]``, where ``DIR`` is

- a directory written by ``datasets``' ``save_to_disk`` (``DIR/dataset_dict.json`` with the split,
  or ``DIR/SPLIT/state.json``), or parquet / JSON-lines files of the split (``DIR/SPLIT/*.parquet``,
  ``DIR/SPLIT-*.parquet``, ``DIR/SPLIT.parquet``, the same with ``.jsonl``): ``SPLIT`` names one;
- one local ``.parquet`` or ``.jsonl`` file: its documents are divided by a seeded share
  (``test=0.1``, seed 0, by document) into ``train`` and ``test``, as ``text:`` divides a corpus.

The rule for the one ``hf:`` prefix: ``text=COLUMN`` makes it a text source (token sequences for
language models); without it, ``hf:`` is the image / array source of
:mod:`pipeline.data.sources` (``x=``, ``y=``, ``size=`` ...). The two sets of options do not mix.

Each row's ``COLUMN`` is one document. Documents are tokenised with ``tokenizer=PATH`` (a
``tokenizer.json``, or the directory of a Hugging Face model holding one: give the teacher's own,
e.g. ``tokenizer=models/teacher``), else byte-level, and joined in row order with the tokenizer's
end-of-sequence token after each (its ``eos_token`` in ``tokenizer_config.json``, else a special
token spelled ``<|endoftext|>``, ``</s>`` or ``<eos>``; a tokenizer with none, like the byte-level
one, separates documents with a blank line, ``"\\n\\n"``). The stream is packed into windows of
``seq + 1`` tokens (the inputs and the next token of each position); the last partial window is
dropped. Where each document starts is recorded (``SequenceDataset.doc_starts``, (N, P) bool), but
attention is **not** blocked there: every model attends across a boundary within a sequence, as
in GPT-2's packed pre-training (the EOS token tells it that a new document begins).

No download ever: ``HF_DATASETS_OFFLINE=1``, local paths only. The tokenizer's hash is part of the
dataset's fingerprint (as for ``text:``), so a cache made with another tokenizer is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import sources as lazy_sources
from pipeline.datasets import register_dataset
from pipeline.errors import DatasetError
from pipeline.sequences.data import (
    DEFAULT_SEQ,
    DEFAULT_TEST_SHARE,
    SPLITS,
    _base,
    _positive,
    _share,
    cut_sequences,
)
from pipeline.sequences.tokenizers import JsonTokenizer, Tokenizer
from pipeline.specs import SourceData

TEXT_OPTIONS = ("text", "tokenizer", "seq", "test")
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>")
SEPARATOR = "\n\n"  # between documents when the tokenizer has no end-of-sequence token
FILE_SUFFIXES = (".parquet", ".jsonl", ".json")


@register_dataset(
    "hf",
    ("dir", "split"),
    "a Hugging Face dataset on disk: hf:DIR:SPLIT[:x=image:y=label][:size=S...], or its text "
    "as token sequences: hf:DIR:SPLIT:text=COLUMN[:tokenizer=PATH][:seq=128]",
    (*lazy_sources.HF_OPTIONS, *TEXT_OPTIONS),
)
def load_hf_any(
    directory: str, split: str, data_dir: str | None = None, **options: str
) -> SourceData | lazy_sources.LazyBase:
    """One ``hf:`` prefix, two sources: ``text=COLUMN`` selects text packed into token sequences
    (:func:`load_hf_text`), else the image / array source (:func:`pipeline.data.sources.load_hf`);
    their options do not mix."""
    spec = f"hf:{directory}:{split}"
    text_keys = [k for k in options if k in TEXT_OPTIONS]
    image_keys = [k for k in options if k not in TEXT_OPTIONS]
    if "text" in options:
        if image_keys:
            raise DatasetError(
                f"{spec}: text= reads a text column as token sequences; "
                f"{', '.join(k + '=' for k in image_keys)} {_apply(image_keys)} to image or "
                "array columns "
                "(without text=)"
            )
        return load_hf_text(directory, split, **options)
    if text_keys:
        raise DatasetError(
            f"{spec}: {', '.join(k + '=' for k in text_keys)} {_apply(text_keys)} to text "
            "columns; name the "
            "column with text=COLUMN (e.g. text=text)"
        )
    return lazy_sources.load_hf(directory, split, data_dir, **options)


def load_hf_text(
    directory: str,
    split: str,
    text: str,
    tokenizer: str | None = None,
    seq: str | None = None,
    test: str | None = None,
) -> SourceData:
    """The ``hf:DIR:SPLIT:text=COLUMN`` source (see the module docstring) as token sequences."""
    spec = f"hf:{directory}:{split}:text={text}"
    length = _option(spec, "seq", seq, _positive, DEFAULT_SEQ)
    share = _option(spec, "test", test, _share, DEFAULT_TEST_SHARE)
    root = Path(directory)
    if root.is_file():
        docs = _file_documents(root, split, text, share, spec)
    elif root.is_dir():
        if test is not None:
            raise DatasetError(
                f"{spec}: test= divides one file's documents; {root} is a directory, whose "
                "splits are its own"
            )
        docs = _column(_open_split(root, split, spec), text, spec)
    else:
        raise DatasetError(
            f"{spec}: no such file or directory {root}; give a save_to_disk directory, a "
            "directory of parquet/jsonl files, or one .parquet / .jsonl file"
        )
    tok = JsonTokenizer.load(tokenizer) if tokenizer else Tokenizer()
    eos = eos_id(tok)
    sep = np.asarray([eos], dtype=np.int32) if eos is not None else tok.encode(SEPARATOR)
    pieces, starts, at = [], [], 0
    for doc in docs:
        ids = tok.encode(doc)
        starts.append(at)
        pieces += [ids, sep]
        at += ids.size + sep.size
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    x, y = cut_sequences(stream, length)
    if not len(x):
        raise DatasetError(
            f"{spec}: {len(docs)} documents make {stream.size} tokens, no sequence of seq="
            f"{length} (+1); give more text or a smaller seq="
        )
    # Where documents start, per window position (a window is seq + 1 tokens of the stream).
    begins = np.zeros(stream.size, dtype=bool)
    begins[np.asarray(starts, dtype=np.int64)] = True
    doc_starts = begins[: len(x) * (length + 1)].reshape(len(x), length + 1)[:, :-1]
    source = {
        "path": str(root.resolve()),
        "split": split,
        "column": text,
        "documents": len(docs),
        "separator": {"eos_id": eos} if eos is not None else {"text": SEPARATOR},
    }
    return _base(x, y, None, tok, source, doc_starts=np.ascontiguousarray(doc_starts))


def _option(spec: str, key: str, value: str | None, parse: Any, default: Any) -> Any:
    if value is None:
        return default
    try:
        return parse(value)
    except ValueError as e:
        raise DatasetError(f"{spec}: bad {key}={value!r} ({e})") from None


def eos_id(tok: Tokenizer) -> int | None:
    """The tokenizer's end-of-sequence id: ``eos_token`` of the ``tokenizer_config.json`` beside
    its ``tokenizer.json``, else a known EOS spelling among its tokens; None for none."""
    if not isinstance(tok, JsonTokenizer):
        return None
    names: list[str] = []
    if tok.path:
        config = Path(tok.path).parent / "tokenizer_config.json"
        if config.is_file():
            try:
                value = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
            except (OSError, ValueError, AttributeError):
                value = None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names.append(value)
    for name in (*names, *EOS_NAMES):
        i = tok.impl.token_to_id(name)
        if i is not None:
            return int(i)
    return None


def _apply(keys: list[str]) -> str:
    """``applies`` for one option, ``apply`` for several (the messages name them)."""
    return "applies" if len(keys) == 1 else "apply"


def _datasets(spec: str) -> Any:
    """The ``datasets`` module (offline), or one message saying why it cannot be used."""
    datasets = lazy_sources.import_datasets(spec)
    datasets.disable_progress_bars()  # drawn into log files too
    return datasets


def _open_split(root: Path, split: str, spec: str) -> Any:
    """A directory's split: save_to_disk output, parquet or JSON-lines files."""
    from pipeline.data.sources import _hf_open

    datasets = _datasets(spec)
    jsonl = sorted((root / split).glob("*.jsonl")) + sorted(root.glob(f"{split}-*.jsonl"))
    jsonl += sorted(root.glob(f"{split}.jsonl"))
    saved = (root / "dataset_dict.json").is_file() or (root / split / "state.json").is_file()
    if jsonl and not saved:
        return datasets.Dataset.from_json([str(f) for f in jsonl])
    return _hf_open(root, split, spec)


def _file_documents(path: Path, split: str, column: str, share: float, spec: str) -> list[str]:
    """One file's documents of ``split``: a seeded ``share`` of them (by document) for test."""
    if split not in SPLITS:
        raise DatasetError(
            f"{spec}: one file is divided into train and test (test={share:g}); the split must "
            "be train or test"
        )
    datasets = _datasets(spec)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DatasetError(
            f"{spec}: {path.name} is not a .parquet or .jsonl file; give one of those, or a "
            "directory"
        )
    try:
        ds = (
            datasets.Dataset.from_parquet(str(path))
            if suffix == ".parquet"
            else datasets.Dataset.from_json(str(path))
        )
    except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds for a damaged file
        raise DatasetError(f"{spec}: cannot read {path} ({type(e).__name__}: {e})") from e
    docs = _column(ds, column, spec)
    n_test = max(1, int(round(share * len(docs)))) if len(docs) > 1 else 0
    held = np.zeros(len(docs), dtype=bool)
    held[np.random.default_rng(0).permutation(len(docs))[:n_test]] = True
    chosen = held if split == "test" else ~held
    return [d for d, keep in zip(docs, chosen, strict=True) if keep]


def _column(ds: Any, column: str, spec: str) -> list[str]:
    """The documents: one string column, None rows read as empty."""
    cols = list(ds.column_names)
    if column not in cols:
        raise DatasetError(f"{spec}: no text column {column!r}; columns: {cols}; choose with text=")
    values = ds[column]
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise DatasetError(
            f"{spec}: column {column!r} holds {type(bad).__name__} values, not text "
            f"(feature {ds.features[column]}); give a string column with text="
        )
    return [v or "" for v in values]
