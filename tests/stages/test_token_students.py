"""Token students through the one stage two: streamed under ``--memory-budget``, under torchrun,
choosing the epoch on ``--val`` by perplexity, refusing what sequences cannot honour, and
``evaluate`` on sequence checkpoints; a tiny seeded corpus and a 1-layer gpt teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.cli import cli
from tests.helpers.data import make_corpus
from tests.helpers.process import peak_rss
from tests.helpers.s3 import S3_BUCKET
from tests.helpers.torchrun import rows_per_epoch, single, torchrun

STUDENT = "gpt:layers=1,dim=8,heads=2,ctx=16"
EPOCHS = 3


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict:
    """A corpus, a gpt teacher, a dense token cache (1.5 MiB of targets in memory: a 1 MiB
    budget streams it) and the specs of its transfer, validation and test sets."""
    root = tmp_path_factory.mktemp("lm")
    corpus = make_corpus(root / "c.txt", lines=600)
    base = f"text:{corpus}:train:seq=16:holdout=0.2"
    sets = {
        "transfer": f"{base}:count=96",
        "val": f"{base}:part=holdout:count=32",
        "test": f"text:{corpus}:test:seq=16:count=32",
    }
    code, out = cli(
        *("train-teacher", "--dataset", sets["transfer"], "--model", "gpt:layers=1,dim=32,heads=2"),
        *("--members", "1", "--epochs", "3", "--batch-size", "16", "--lr", "0.01"),
        *("--eval", sets["test"]),
        *("--out", str(root / "teacher"), "--device", "cpu"),
    )
    assert code == 0, out
    cache = root / "tokens.zarr"
    code, out = cli(
        *("cache-logits", "--teacher", str(root / "teacher"), "--dataset", sets["transfer"]),
        *("--store", "dense", "--rows-per-shard", "8", "--out", str(cache), "--quiet"),
    )
    assert code == 0, out
    return {"root": root, "cache": cache, "teacher": root / "teacher", **sets}


def train(lm: dict, out: Path, *extra: str) -> dict:
    code, output = cli(
        *("train-student", "--cache", str(lm["cache"]), "--student", STUDENT, "-T", "2"),
        *("--alpha", "0.5", "--epochs", str(EPOCHS), "--batch-size", "16", "--eval", lm["test"]),
        *("--lr", "0.01", "--device", "cpu", "--out", str(out), *extra),
    )
    assert code == 0, output
    return json.loads((out / "metrics.json").read_text())


def test_a_token_student_streams_like_it_trains_in_memory(lm: dict, tmp_path: Path) -> None:
    memory = train(lm, tmp_path / "memory")
    stream = train(lm, tmp_path / "stream", "--memory-budget", "1MiB")
    assert memory["cache"]["loader"]["mode"] == "memory"
    assert stream["cache"]["loader"]["mode"] == "stream"
    for m in (memory, stream):
        assert m["cache"]["rows_used"] == 96 and m["cache"]["positions"] == 16
        t = m["metrics"]["test"]
        # it learns (uniform over 256 bytes would be 256), and the teacher is at hand
        assert t["tokens"] == 32 * 16 and t["perplexity"] < 150
        assert t["teacher"]["perplexity"] < t["perplexity"]
        assert 0 <= t["teacher_agreement"] <= 1  # the cache's one teacher is at hand
    # The two loaders shuffle differently (whole shards in a buffer vs one permutation), so
    # the students differ by their order only: perplexities within 5 %.
    a, b = memory["metrics"]["test"]["perplexity"], stream["metrics"]["test"]["perplexity"]
    print(f"test perplexity: in memory {a:.3f}, streamed {b:.3f}")
    assert b == pytest.approx(a, rel=0.05)
    history = (tmp_path / "stream" / "history.csv").read_text().splitlines()
    assert len(history) == EPOCHS + 1 and "test_perplexity" in history[0]


def test_val_chooses_the_epoch_by_validation_perplexity(lm: dict, tmp_path: Path) -> None:
    m = train(lm, tmp_path / "run", "--val", lm["val"])
    sel = m["metrics"]["selection"]
    rows = [line.split(",") for line in (tmp_path / "run" / "history.csv").read_text().split()]
    head, body = rows[0], rows[1:]
    nll = [float(r[head.index("val_nll")]) for r in body]
    assert sel["on"] == lm["val"] and sel["epoch"] == int(np.argmin(nll)) + 1
    assert "val_perplexity" in head
    # a validation set that shares sequences with the transfer set is refused
    code, out = cli(
        *("train-student", "--cache", str(lm["cache"]), "--student", STUDENT, "--epochs", "1"),
        *("--val", lm["transfer"], "--out", str(tmp_path / "bad"), "--device", "cpu"),
    )
    assert code == 2 and "shares 96 sample(s) with the transfer set" in out, out


@pytest.mark.parametrize(
    "extra,named",
    [
        (["--class-bias", "3=1.0"], "--class-bias is not supported for token sequences"),
        (["--augment", "shift:1"], "--augment is not supported for token sequences"),
        (["--views-per-epoch", "2"], "--views-per-epoch 2 is for view caches of images"),
    ],
)
def test_options_sequences_cannot_honour_are_refused(
    lm: dict, tmp_path: Path, extra: list[str], named: str
) -> None:
    code, out = cli(
        *("train-student", "--cache", str(lm["cache"]), "--student", STUDENT, "--epochs", "1"),
        *("--out", str(tmp_path / "r"), "--device", "cpu", *extra),
    )
    assert code == 2 and named in out and "Traceback" not in out, out
    assert not (tmp_path / "r" / "student.pt").exists()


def test_evaluate_measures_sequence_checkpoints(lm: dict, tmp_path: Path) -> None:
    m = train(lm, tmp_path / "s")
    code, out = cli(
        "evaluate", "--model", str(tmp_path / "s" / "student.pt"), "--dataset", lm["test"], "--json"
    )
    assert code == 0, out
    res = json.loads(out)
    got, want = res["members"][0], m["metrics"]["test"]
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-5)
    student = str(tmp_path / "s" / "student.pt")
    code, out = cli("evaluate", "--model", student, "--dataset", lm["test"])
    assert code == 0 and "perplexity" in out.splitlines()[0] and "student.pt" in out


def ddp_vs_one(lm: dict, tmp: Path, cache: str) -> tuple[dict, dict]:
    args = [
        *("train-student", "--cache", cache, "--student", STUDENT, "-T", "2", "--alpha", "0.5"),
        *("--epochs", str(EPOCHS), "--eval", lm["test"], "--device", "cpu", "--quiet"),
        *("--lr", "0.01"),
    ]
    res = torchrun(
        tmp,
        [*args, "--batch-size", "8", "--out", str(tmp / "ddp")],
        KD_RECORD_ROWS=str(tmp / "rows"),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(f"wrote {tmp / 'ddp'}") == 1  # rank 0 alone
    sizes = rows_per_epoch(tmp / "rows", 96, EPOCHS)  # every sequence once an epoch over ranks
    assert all(abs(a - b) <= 1 for a, b in sizes)
    one = single(tmp, [*args, "--batch-size", "16", "--out", str(tmp / "one")])
    assert one.returncode == 0, one.stdout + one.stderr
    read = [json.loads((tmp / d / "metrics.json").read_text()) for d in ("ddp", "one")]
    return read[0], read[1]


def _same_run(ddp: dict, one: dict) -> None:
    assert ddp["config"]["distributed"]["effective_batch_size"] == 16
    got, want = ddp["metrics"]["test"], one["metrics"]["test"]
    print(f"perplexity: 2 ranks x 8 {got['perplexity']:.4f}, 1 x 16 {want['perplexity']:.4f}")
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=0.01)
    assert want["perplexity"] < 150  # the student learned something to agree on
    loss = [m["metrics"]["final_epoch"]["loss"] for m in (ddp, one)]
    assert loss[0] == pytest.approx(loss[1], rel=0.01)


def test_two_ranks_train_a_token_student_like_one_process(lm: dict, tmp_path: Path) -> None:
    _same_run(*ddp_vs_one(lm, tmp_path, str(lm["cache"])))


@pytest.mark.slow
def test_two_ranks_train_a_token_student_from_a_bundle_and_s3(
    lm: dict, tmp_path: Path, s3_server: str
) -> None:
    bundle = tmp_path / "tokens.zarr.zip"
    url = f"s3://{S3_BUCKET}/tokens/ddp.zarr"
    for verb, dst in (("pack", str(bundle)), ("copy", url)):
        code, out = cli("cache", verb, str(lm["cache"]), dst, "--quiet")
        assert code == 0, out
    for name, where in (("zip", str(bundle)), ("s3", url)):
        _same_run(*ddp_vs_one(lm, tmp_path / name, where))


@pytest.mark.slow
def test_a_token_cache_ten_times_the_budget_streams_within_it(tmp_path: Path) -> None:
    """Peak RSS of ``train-student`` on a dense token cache whose rows are over 10x the
    ``--memory-budget`` (streamed) against the same command on a cache of a few sequences: the
    growth stays within the budget plus a fixed allowance (allocator arenas, torch's buffers)."""
    budget, allowance = 4 << 20, 300 << 20
    corpus = make_corpus(tmp_path / "c.txt", lines=4000)
    teacher = tmp_path / "teacher"
    code, out = cli(
        *("train-teacher", "--dataset", f"text:{corpus}:train:seq=16:count=64"),
        *("--model", "gpt:layers=1,dim=16,heads=2", "--members", "1", "--epochs", "1"),
        *("--eval", "", "--out", str(teacher), "--device", "cpu"),
    )
    assert code == 0, out
    rss = {}
    for name, count in (("small", 64), ("big", 3200)):  # 3,200 x 16 rows x 1 KiB: 50 MiB
        spec = f"text:{corpus}:train:seq=16:count={count}"
        cache = tmp_path / f"{name}.zarr"
        code, out = cli(
            *("cache-logits", "--teacher", str(teacher), "--dataset", spec, "--store", "dense"),
            *("--rows-per-shard", "64", "--out", str(cache), "--quiet"),
        )
        assert code == 0, out
        run = tmp_path / f"run-{name}"
        code, out, rss[name] = peak_rss(
            *("train-student", "--cache", str(cache), "--student", STUDENT, "--epochs", "1"),
            *("--memory-budget", str(budget), "--eval", "", "--out", str(run), "--quiet"),
            *("--device", "cpu"),
        )
        assert code == 0, out
        mode = json.loads((run / "metrics.json").read_text())["cache"]["loader"]["mode"]
        assert mode == ("stream" if name == "big" else "memory")
    growth = rss["big"] - rss["small"]
    print(f"peak RSS {rss['small'] >> 20} -> {rss['big'] >> 20} MiB (budget {budget >> 20} MiB)")
    assert growth <= budget + allowance, growth
