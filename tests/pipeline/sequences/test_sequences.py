"""Sequence data and token caches: tokenisers, text:/tokens: datasets, per-position cache rows,
padded heads, tokenizer mismatches, sequence students from dense/topk/sampled caches, hf:DIR."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from pipeline.cache.config import CacheConfig
from pipeline.cache.read import LogitCache
from pipeline.cache.writer import build_cache
from pipeline.checkpoints import save_checkpoint
from pipeline.datasets import default_eval_spec, load_dataset
from pipeline.models import KDModel, register_model
from pipeline.sequences.data import NO_LABEL, PAD, SequenceDataset, tokenizer_record
from pipeline.sequences.tokenizers import Tokenizer, train_bpe
from pipeline.training.losses import DistillationLoss
from pipeline.training.sequence import SequenceLoss, token_source
from pipeline.training.targets import flat_rows
from pipeline.training.train_config import TrainConfig
from stages.cli import main
from tests.helpers.data import make_corpus
from tests.helpers.optional import require

pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "c.txt")


@pytest.fixture(autouse=True)
def _output_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_OUTPUT_DIR", str(tmp_path / "out"))  # trained tokenizers go here


# ---------------------------------------------------------------------------------- tokenisers
def test_byte_tokenizer_round_trips_any_utf8() -> None:
    tok = Tokenizer()
    text = "In the beginning — 创世记 1:1 ✓\n"
    ids = tok.encode(text)
    assert ids.max() < 256 and ids.size == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.byte_lengths.sum() == 256


def test_bpe_round_trips_and_its_hash_is_its_content(corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    from pipeline.sequences.tokenizers import JsonTokenizer, save_tokenizer

    text = corpus.read_text()
    tok = train_bpe(text.splitlines(keepends=True), 300)
    assert tok.vocab_size == 300
    sample = text[:500] + "unseen wörds ✓\n"
    ids = tok.encode(sample)
    assert ids.size < len(sample.encode())  # merges happened
    assert tok.decode(ids) == sample
    # bits per byte counts each token's bytes: they add up to the text's
    assert tok.byte_lengths[ids].sum() == len(sample.encode())
    again = JsonTokenizer.load(save_tokenizer(tok, tmp_path / "t" / "tokenizer.json"))
    assert again.sha256 == tok.sha256 != Tokenizer().sha256


# ------------------------------------------------------------------------------------- datasets
def test_text_dataset_cuts_next_token_sequences_from_disjoint_splits(corpus: Path) -> None:
    train = load_dataset(f"text:{corpus}:train:seq=16")
    test = load_dataset(default_eval_spec(train.spec))
    assert isinstance(train, SequenceDataset) and test.spec.endswith(":test:seq=16")
    assert train.x.shape[1] == 16 and train.num_classes == 256
    np.testing.assert_array_equal(train.x[:, 1:], train.y[:, :-1])  # y = the next token
    text = corpus.read_text()
    tr = "".join(
        Tokenizer().decode(np.r_[r, y[-1:]]) for r, y in zip(train.x, train.y, strict=True)
    )
    te = "".join(Tokenizer().decode(np.r_[r, y[-1:]]) for r, y in zip(test.x, test.y, strict=True))
    assert len(tr) + len(te) <= len(text) and len(te) > 0
    # no line of the test split is in the train split
    assert not set(te.splitlines()[1:-1]) & set(tr.splitlines()[1:-1])
    sub = load_dataset(f"text:{corpus}:train:seq=16:count=10")
    np.testing.assert_array_equal(sub.x, train.x[sub.ids])


def test_fingerprint_includes_the_tokenizer(corpus: Path, tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.int64).reshape(4, 10) % 50
    for v in (60, 70):
        np.savez(tmp_path / f"t{v}.npz", x_train=x, vocab_size=np.int64(v))
    a, b = (load_dataset(f"tokens:{tmp_path / f't{v}.npz'}:train") for v in (60, 70))
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.fingerprint != b.fingerprint  # same ids, another tokenizer: other data
    assert a.describe()["tokenizer"]["sha256"] != b.describe()["tokenizer"]["sha256"]
    pytest.importorskip("tokenizers")
    byte, bpe = (load_dataset(f"text:{corpus}:train:seq=16{m}") for m in ("", ":vocab=300"))
    assert bpe.num_classes == 300 and bpe.describe()["tokenizer"]["kind"] == "bpe"
    assert Path(bpe.tokenizer.path).name == "tokenizer.json"
    assert load_dataset(bpe.spec).fingerprint == bpe.fingerprint  # the saved BPE is reused
    assert byte.fingerprint != bpe.fingerprint


def test_tokens_npz_masks_padding_and_the_last_position(tmp_path: Path) -> None:
    x = np.array([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    np.savez(tmp_path / "t.npz", x_train=x, mask_train=mask, vocab_size=np.int64(10))
    d = load_dataset(f"tokens:{tmp_path / 't.npz'}:train")
    np.testing.assert_array_equal(d.y, [[6, 7, NO_LABEL, PAD], [9, NO_LABEL, PAD, PAD]])
    assert d.byte_count(d.y) == 3


# -------------------------------------------------------------- a teacher that spells its input
class Echo(nn.Module):
    """Logits that spell the input: row (sample, p) peaks at token x[p] (+ p / 100 on token 0
    so positions are told apart); padded heads get huge logits, which the cache must drop."""

    token_inputs = True

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.scale = nn.Parameter(torch.tensor(8.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scale * nn.functional.one_hot(x.long(), self.width).float()
        out[..., 0] += torch.arange(x.shape[1]) / 100
        out[..., 256:] = 50.0  # padded heads
        return out


@register_model("seq-echo-test", "test only: a teacher whose logits spell its input")
def _echo(spec: str, parts: list, in_shape: tuple, num_classes: int) -> nn.Module:
    return Echo(num_classes + 8)


def echo_teacher(path: Path, data: SequenceDataset, tokenizer: dict | None = None) -> Path:
    model = KDModel("seq-echo-test", Echo(data.num_classes + 8), num_classes=data.num_classes)
    rec = {"tokenizer": tokenizer} if tokenizer else tokenizer_record(data)
    meta = {
        "model_spec": "seq-echo-test",
        "in_shape": [data.positions],
        "num_classes": data.num_classes,
        "dataset": {"spec": data.spec, "fingerprint": data.fingerprint, **rec},
    }
    return save_checkpoint(path, model, meta)


@pytest.mark.parametrize("store", ["dense", "topk:4", "sampled:8"])
def test_cache_rows_line_up_with_positions_and_padded_heads_are_dropped(
    corpus: Path, tmp_path: Path, store: str
) -> None:
    spec = f"text:{corpus}:train:seq=12:count=30"
    data = load_dataset(spec)
    teacher = echo_teacher(tmp_path / "echo.pt", data)
    out = tmp_path / "c.zarr"
    build_cache(
        CacheConfig(
            teachers=[str(teacher)], dataset=spec, out=str(out), store=store, rows_per_shard=7
        ),
        log=lambda s: None,
        progress=False,
    )
    cache = LogitCache(out)
    h = cache.header
    assert h.num_classes == 256 and dict(h.rows)["positions"] == 12 and h.n_rows == 30 * 12
    assert h.dataset.extra["tokenizer"]["sha256"] == data.tokenizer.sha256
    row_start, row_count = cache.read_row_index()
    np.testing.assert_array_equal(row_count, 12)
    for s in range(cache.n_shards):
        lo, hi = cache.shard_bounds(s)
        r0, _ = cache.row_bounds(s)
        a = cache.read_member(s, 0)
        rows = (row_start[lo:hi, None] - r0 + np.arange(12)).reshape(-1)
        if store == "dense":
            top = a["logits"].argmax(axis=1)
        else:
            top = a["indices"][np.arange(len(a["values"])), a["values"].argmax(axis=1)]
        np.testing.assert_array_equal(top[rows], data.x[lo:hi].reshape(-1))
    # the student's batches carry the rows of their own sequences, position by position
    # (T = 1: SparseTargets.probs of sampled rows weighs each draw by p_T * w, which at T = 1
    # is p / S; at other T it is not the teacher's ranking)
    # in memory and streamed by shards alike (a budget of one byte streams).
    for budget in (1 << 30, 1):
        source, plan = token_source(
            cache, data, [0], "mean-probs", 1.0, 8, budget, 0, cache.done_shards()
        )
        assert plan.mode == ("memory" if budget > 1 else "stream")
        seen = []
        for xb, soft, yb in source.epoch(0):
            soft = flat_rows(soft)
            got = soft.argmax(1) if isinstance(soft, torch.Tensor) else soft.top_class()
            np.testing.assert_array_equal(got.numpy(), xb.reshape(-1).numpy())
            assert yb.shape == xb.shape
            seen.append(xb)
        # every sequence once per epoch
        assert sorted(map(tuple, torch.cat(seen).tolist())) == sorted(map(tuple, data.x.tolist()))


def test_a_teacher_of_another_tokenizer_is_refused(corpus: Path, tmp_path: Path) -> None:
    spec = f"text:{corpus}:train:seq=12:count=20"
    data = load_dataset(spec)
    other = {"kind": "bpe", "sha256": "sha256:" + "0" * 64, "vocab_size": 256}
    teacher = echo_teacher(tmp_path / "echo.pt", data, other)
    res = CliRunner().invoke(
        main,
        [
            "cache-logits",
            "--teacher",
            str(teacher),
            "--dataset",
            spec,
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert res.exit_code == 2, res.output
    assert "tokenizer differs" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_sequence_loss_masks_padding_and_weights_terms() -> None:
    torch.manual_seed(0)
    z, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.tensor([1, 2, NO_LABEL, PAD, 0, PAD])
    parts = SequenceLoss(DistillationLoss(2.0, 0.25))(z, t, y)
    keep = torch.tensor([0, 1, 2, 4])
    ref = DistillationLoss(2.0, 1.0)(z[keep], t[keep], None)["soft"]
    hard = nn.functional.cross_entropy(z[[0, 1, 4]], y[[0, 1, 4]])
    assert torch.isclose(parts["soft"], ref) and torch.isclose(parts["hard"], hard)
    assert torch.isclose(parts["loss"], 0.25 * ref + 0.75 * hard)


# ------------------------------------------------------------------ the CLI, end to end (small)
def test_gpt_teacher_caches_rows_and_students_train_from_every_kind(
    corpus: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    spec = f"text:{corpus}:train:seq=16:count=48"
    test = f"text:{corpus}:test:seq=16:count=16"
    gpt = "gpt:layers=1,dim=16,heads=2,ctx=16,pad=48"  # 256 -> 288 logits: padded heads
    run = CliRunner().invoke
    common = ["--epochs", "1", "--batch-size", "16", "--eval", test]
    res = run(
        main,
        ["train-teacher", "--dataset", spec, "--model", gpt, "--members", "1"]
        + ["--out", str(tmp_path / "t"), *common],
    )
    assert res.exit_code == 0, res.output
    for store in ("dense", "topk:4", "sampled:4"):
        cache = tmp_path / store.replace(":", "")
        res = run(
            main,
            ["cache-logits", "--teacher", str(tmp_path / "t"), "--dataset", spec]
            + ["--store", store, "--rows-per-shard", "20", "--out", str(cache)],
        )
        assert res.exit_code == 0, res.output
        h = LogitCache(cache).header
        assert h.num_classes == 256 and h.n_rows == 48 * 16 and h.n_shards == 3
        res = run(
            main,
            [
                "train-student",
                "--cache",
                str(cache),
                "--student",
                "gpt:layers=1,dim=8,heads=2,ctx=16",
            ]
            + ["-T", "2", "--alpha", "0.5", "--out", str(tmp_path / f"s-{cache.name}"), *common],
        )
        assert res.exit_code == 0, res.output
        m = __import__("json").loads((tmp_path / f"s-{cache.name}" / "metrics.json").read_text())
        t = m["metrics"]["test"]
        assert t["tokens"] == 16 * 16 and math.isfinite(t["perplexity"]) and t["perplexity"] > 1
        assert t["bits_per_byte"] == pytest.approx(t["nll"] / math.log(2))  # bytes: 1 per token
        assert 0 <= t["teacher_agreement"] <= 1 and "teacher" in t
    # a student's --dataset tokenised otherwise is refused, naming the tokenizer
    pytest.importorskip("tokenizers")
    res = run(
        main,
        ["train-student", "--cache", str(tmp_path / "dense"), "--dataset", spec + ":vocab=300"]
        + ["--student", "gpt:layers=1,dim=8,heads=2,ctx=16", "--out", str(tmp_path / "bad")],
    )
    assert res.exit_code == 2 and "tokenizer differs" in res.output, res.output


def test_hf_dir_teacher_with_padded_heads(corpus: Path, tmp_path: Path) -> None:
    transformers = require("transformers")
    pytest.importorskip("tokenizers")
    from pipeline.sequences.tokenizers import save_tokenizer

    hf = tmp_path / "hf"
    tok = train_bpe(corpus.read_text().splitlines(keepends=True), 300)
    save_tokenizer(tok, hf / "tokenizer.json")
    config = transformers.GPT2Config(
        vocab_size=320, n_positions=32, n_embd=16, n_layer=1, n_head=2
    )  # 320 > 300: padded heads
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(hf)
    spec = f"text:{corpus}:train:seq=16:count=12:tokenizer={hf}"
    out = tmp_path / "c.zarr"
    res = CliRunner().invoke(
        main,
        ["cache-logits", "--teacher", f"hf:{hf}", "--dataset", spec, "--store", "topk:8"]
        + ["--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    cache = LogitCache(out)
    assert cache.num_classes == 300 and cache.header.n_rows == 12 * 16
    assert cache.members[0].model_spec == f"hf:{hf}"
    idx = cache.read_member(0, 0)["indices"]
    assert idx.max() < 300
    # the cached top values are the model's own logits at those positions (first 300 of 320)
    data = load_dataset(spec)
    model = transformers.GPT2LMHeadModel.from_pretrained(hf).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(data.x[:1]).long()).logits[0, :, :300]
    np.testing.assert_allclose(
        cache.read_member(0, 0)["values"][:16, 0], ref.max(dim=1).values.numpy(), atol=2e-2
    )


@pytest.fixture(scope="module")
def tiny_gpt(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(dataset spec, teacher directory): a 1-layer gpt trained for one epoch (seconds)."""
    from pipeline.training.config import TeacherConfig
    from pipeline.training.teacher import train_teacher

    spec = f"text:{corpus}:train:seq=16:count=40"
    out = tmp_path_factory.mktemp("gpt")
    train_teacher(
        TeacherConfig(
            dataset=spec,
            model="gpt:layers=1,dim=16,heads=2,ctx=16",
            members=1,
            eval="",
            out=str(out),
            train=TrainConfig(epochs=1, batch_size=16),
        ),
        log=lambda s: None,
    )
    return spec, out


def build_token_cache(spec: str, teacher: Path, out: Path, **kw: object) -> dict[str, np.ndarray]:
    """A sampled:4 cache of 8 sequences (128 rows) per shard; its member arrays."""
    import zarr

    cfg = CacheConfig(
        teachers=[str(teacher)],
        dataset=spec,
        out=str(out),
        store="sampled:4",
        rows_per_shard=8,
        **kw,
    )
    build_cache(cfg, log=lambda s: None, progress=False)
    g = zarr.open_group(str(out), mode="r", use_consolidated=False)
    return {k: g[f"members/0/{k}"][:] for k in ("values", "indices", "lse")}


def test_a_resumed_token_cache_is_bit_identical(tiny_gpt: tuple, tmp_path: Path) -> None:
    import zarr

    spec, teacher = tiny_gpt
    whole = build_token_cache(spec, teacher, tmp_path / "c.zarr")
    # an interrupted write: shard 2 (rows 256..383) not done, the header not complete
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+", use_consolidated=False)
    g["members/0/done"][2] = 0
    g["members/0/values"][256:384] = 0
    header = dict(g.attrs["kd_cache"])
    header["complete"] = False
    g.attrs["kd_cache"] = header
    resumed = build_token_cache(spec, teacher, tmp_path / "c.zarr")
    assert not (resumed["values"][256:384] == 0).all()
    for k in whole:
        np.testing.assert_array_equal(whole[k], resumed[k])


@pytest.mark.slow
def test_token_caches_are_bit_identical_over_dask(tiny_gpt: tuple, tmp_path: Path) -> None:
    spec, teacher = tiny_gpt
    local = build_token_cache(spec, teacher, tmp_path / "local.zarr")
    on_dask = build_token_cache(spec, teacher, tmp_path / "dask.zarr", workers=2)
    for k in local:
        np.testing.assert_array_equal(local[k], on_dask[k])


def test_cache_info_and_completion_line_count_token_rows(corpus: Path, tmp_path: Path) -> None:
    """30 sequences of 12 positions are 360 rows; a shard of 7 sequences holds 84 of them (info
    once said "rows 30 (unlabeled)" and "7 rows per shard"); 256 byte classes are summarised."""
    from click.testing import CliRunner

    from stages.cli import main

    spec = f"text:{corpus}:train:seq=12:count=30"
    teacher = echo_teacher(tmp_path / "echo.pt", load_dataset(spec))
    out = tmp_path / "c.zarr"
    res = build_cache(
        CacheConfig(teachers=[str(teacher)], dataset=spec, out=str(out), rows_per_shard=7),
        log=lambda s: None,
        progress=False,
    )
    assert "complete: 360 rows (30 sequences x 12 token positions) x 256 classes" in res.message
    text = CliRunner().invoke(main, ["cache", "info", str(out)]).output
    assert "rows       360 (30 sequences x 12 token positions; labels: the next tokens" in text
    assert "(7 sequences = 84 rows per shard)" in text
    classes = next(line for line in text.splitlines() if line.startswith("classes"))
    assert classes.endswith("(all 256: `cache info --json`, class_names)") and len(classes) < 100
