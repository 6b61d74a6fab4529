"""``kd-pipeline train-student`` through the real CLI (click's CliRunner on stages.cli:main)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.lookup import cache_fingerprint
from pipeline.cache.read import LogitCache
from pipeline.checkpoints import load_checkpoint
from pipeline.datasets import load_dataset
from pipeline.metrics import predict_logits
from tests.helpers.caches import teacher_cache
from tests.helpers.cli import cli
from tests.helpers.damage import damaged, edit_header, relabel, remove, write

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = ["--student", "mlp:32", "--batch-size", "64", "--device", "cpu"]


def run_cli(*args: str) -> tuple[int, str]:
    """``kd-pipeline train-student ARGS`` in process."""
    return cli("train-student", *args)


def test_train_student_writes_a_run_directory_that_describes_itself(
    cache_path: Path, npz_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code, output = run_cli(
        "--cache",
        str(cache_path),
        *BASE,
        "--epochs",
        "3",
        "-T",
        "4",
        "--alpha",
        "0.8",
        "--out",
        str(out),
        "--quiet",
    )
    assert code == 0, output
    files = "student.pt, metrics.json, history.csv, metrics.jsonl, config.json, config.toml"
    assert f"wrote {out} ({files})" in output
    assert {p.name for p in out.iterdir()} == {
        "student.pt",
        "metrics.json",
        "history.csv",
        "metrics.jsonl",
        "config.json",
        "config.toml",
    }

    config = json.loads((out / "config.json").read_text())
    assert (config["cache"], config["student"], config["temperature"], config["alpha"]) == (
        str(cache_path),
        "mlp:32",
        4.0,
        0.8,
    )
    assert (config["train"]["epochs"], config["train"]["batch_size"], config["ensemble"]) == (
        3,
        64,
        "mean-probs",
    )

    result = json.loads((out / "metrics.json").read_text())
    assert result["config"] == config
    test = result["metrics"]["test"]
    assert test["dataset"] == f"npz:{npz_path}:test" and test["n"] == 300
    assert sum(test["per_class_errors"]) == test["errors"] and len(test["per_class_errors"]) == 5
    assert test["accuracy"] == pytest.approx(1 - test["errors"] / 300)
    assert test["errors"] < 150 and math.isfinite(test["nll"]) and 0 <= test["ece"] <= 1
    assert 0.5 < result["metrics"]["teacher_agreement_transfer"] <= 1
    header = LogitCache(cache_path).header
    rec = result["cache"]
    assert rec["fingerprint"] == cache_fingerprint(header, [0, 1]) == cache_fingerprint(header)
    assert (rec["members"], rec["complete"], rec["partial_used"], rec["rows_used"]) == (
        [0, 1],
        True,
        False,
        600,
    )
    assert rec["dataset_fingerprint"] == header.dataset.fingerprint
    assert rec["loader"]["mode"] == "memory"

    with open(out / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    for r in history:
        assert all(math.isfinite(float(r[k])) for k in ("loss", "soft", "hard"))
        assert float(r["loss"]) == pytest.approx(
            0.8 * float(r["soft"]) + 0.2 * float(r["hard"]), rel=1e-4
        )
    assert [int(r["test_errors"]) for r in history][-1] == test[
        "errors"
    ]  # no bias: the final model's errors

    ckpt = load_checkpoint(out / "student.pt")
    assert ckpt.meta["cache"]["fingerprint"] == rec["fingerprint"]
    assert ckpt.meta["config"] == config
    assert ckpt.meta["metrics"] == test
    assert (ckpt.meta["model_spec"], ckpt.meta["num_classes"], ckpt.meta["in_shape"]) == (
        "mlp:32",
        5,
        [1, 8, 8],
    )
    data = load_dataset(f"npz:{npz_path}:test")
    pred = predict_logits(ckpt.model, data.x, torch.device("cpu")).argmax(1).numpy()
    assert int((pred != data.y).sum()) == test["errors"]  # the saved model is the evaluated one


def test_partial_cache_needs_allow_partial(partial_cache_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, output = run_cli(
        "--cache", str(partial_cache_path), *BASE, "--epochs", "1", "--out", str(out)
    )
    assert code == 2
    assert "error:" in output and "partial" in output and "--allow-partial" in output
    assert "Traceback" not in output and not out.exists()

    code, output = run_cli(
        "--cache",
        str(partial_cache_path),
        *BASE,
        "--epochs",
        "1",
        "--out",
        str(out),
        "--allow-partial",
    )
    assert code == 0, output
    assert (
        "is partial; training on 9/10 shards (536 rows) because --allow-partial was given" in output
    )
    rec = json.loads((out / "metrics.json").read_text())["cache"]
    assert (
        rec["partial_used"],
        rec["complete"],
        rec["shards_used"],
        rec["n_shards"],
        rec["rows_used"],
    ) == (True, False, 9, 10, 536)
    assert load_checkpoint(out / "student.pt").meta["cache"]["partial_used"] is True


def test_members_out_of_range_exits_2(cache_path: Path, tmp_path: Path) -> None:
    code, output = run_cli(
        "--cache", str(cache_path), *BASE, "--members", "0,5", "--out", str(tmp_path / "r")
    )
    assert code == 2
    assert "--members [5] out of range: the cache has members 0..1" in output
    code, output = run_cli(
        "--cache", str(cache_path), *BASE, "--members", "0,x", "--out", str(tmp_path / "r")
    )
    assert code == 2 and "expected indices like 0,2" in output


def test_class_bias_shifts_the_saved_output_bias(
    cache_path: Path, npz_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code, output = run_cli(
        "--cache",
        str(cache_path),
        *BASE,
        "--epochs",
        "1",
        "--class-bias",
        "3=+2",
        "--class-bias",
        "1=-0.5",
        "--out",
        str(out),
        "--quiet",
    )
    assert code == 0, output
    model = load_checkpoint(out / "student.pt").model
    assert model.output_bias.tolist() == [0.0, -0.5, 0.0, 2.0, 0.0]
    # The shift is in the logits the saved model produces.
    x = load_dataset(f"npz:{npz_path}:test").x[:20]
    shifted = predict_logits(model, x, torch.device("cpu"))
    model.output_bias.zero_()
    plain = predict_logits(model, x, torch.device("cpu"))
    torch.testing.assert_close(
        shifted - plain, torch.tensor([0.0, -0.5, 0.0, 2.0, 0.0]).expand(20, 5)
    )
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["bias"]["manual"] == {"3": 2.0, "1": -0.5}
    assert "test_before_bias" in metrics and "fitted" not in metrics["bias"]
    code, output = run_cli(
        "--cache", str(cache_path), *BASE, "--class-bias", "3", "--out", str(tmp_path / "x")
    )
    assert code == 2 and "expected CLASS=DELTA" in output
    code, output = run_cli(
        "--cache", str(cache_path), *BASE, "--class-bias", "7=1", "--out", str(tmp_path / "y")
    )
    assert code == 2 and "--class-bias 7=1.0: class out of range 0..4" in output


def test_online_teacher_baseline_through_the_cli(
    npz_path: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "online"
    code, output = run_cli(
        "--online-teacher",
        str(teacher_dir),
        "--dataset",
        f"npz:{npz_path}:train",
        *BASE,
        "--epochs",
        "2",
        "-T",
        "4",
        "--out",
        str(out),
    )
    assert code == 0, output
    assert "online teacher" in output and "student epoch 2/2" in output
    result = json.loads((out / "metrics.json").read_text())
    rec = result["online_teacher"]
    assert rec["paths"] == [str(p) for p in sorted(teacher_dir.glob("member-*.pt"))]
    assert rec["dataset"] == f"npz:{npz_path}:train"
    assert rec["dataset_fingerprint"] == load_dataset(f"npz:{npz_path}:train").fingerprint
    assert all(c.startswith("sha256:") for c in rec["checkpoints"])
    assert "cache" not in result and result["config"]["online_teacher"] == [str(teacher_dir)]
    with open(out / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert len(history) == 2 and all(float(r["soft"]) > 0 for r in history)
    assert result["metrics"]["test"]["errors"] < 150
    assert load_checkpoint(out / "student.pt").meta["online_teacher"] == rec

    code, output = run_cli(
        "--online-teacher", str(teacher_dir), *BASE, "--out", str(tmp_path / "x")
    )
    assert code == 2 and "--online-teacher needs --dataset SPEC" in output
    code, output = run_cli(*BASE, "--out", str(tmp_path / "y"))
    assert (
        code == 2
        and "--cache CACHE (or --online-teacher PATH with --dataset) must be given" in output
    )


def test_unlabeled_transfer_set_with_alpha_below_one_exits_2(
    teacher_dir: Path, tmp_path: Path
) -> None:
    from tests.helpers.data import write_npz

    unlabeled = write_npz(tmp_path / "u.npz", labeled=False)
    cache = tmp_path / "u.zarr"
    teacher_cache(teacher_dir, f"npz:{unlabeled}:train", cache, rows_per_shard=128)
    code, output = run_cli(
        "--cache", str(cache), *BASE, "--alpha", "0.5", "--out", str(tmp_path / "r")
    )
    assert code == 2 and "--alpha 0.5 needs hard labels" in output and "use --alpha 1" in output
    code, output = run_cli(
        "--cache",
        str(cache),
        *BASE,
        "--alpha",
        "1",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "r"),
        "--quiet",
    )
    assert code == 0, output
    assert np.isfinite(
        json.loads((tmp_path / "r" / "metrics.json").read_text())["metrics"]["test"]["nll"]
    )


# -------------------------------------------------------- damaged caches: refused, never trained on
DAMAGES = {
    # (damage, what the refusal must say)
    "deleted logits chunk": (
        remove("members/0/logits/c/4/0"),
        "chunk members/0/logits/c/4/0 (member 0's logits, shard 4: rows 256..319) is missing",
    ),
    "deleted done flag": (
        remove("members/1/done/c/3"),
        "the header says the cache is complete, but done flags are missing or "
        "zero (member 1 shards [3])",
    ),
    "zeroed done flag": (
        write("members/0/done", 7, 0),
        "done flags are missing or zero (member 0 shards [7])",
    ),
    "deleted labels chunk": (
        remove("labels/c/2"),
        "chunk labels/c/2 (labels, shard 2: rows 128..191) is missing",
    ),
    "labels rewritten": (relabel, "the cached labels of sample ids [130] (1 in all) hold labels"),
    "-inf logit": (
        write("members/0/logits", (200, 1), -np.inf),
        "member 0's logits in shard 3 hold NaN or inf for sample ids [200] (1 in all)",
    ),
    "+inf logit": (
        write("members/1/logits", (5, 0), np.inf),
        "member 1's logits in shard 0 hold NaN or inf for sample ids [5] (1 in all)",
    ),
    "NaN logit": (
        write("members/1/logits", (599, 4), np.nan),
        "member 1's logits in shard 9 hold NaN or inf for sample ids [599] (1 in all)",
    ),
    "label 99": (
        write("labels", 3, 99),
        "sample ids [3] (1 in all) hold labels outside 0..4 ([99])",
    ),
    "label -1": (
        write("labels", 64, -1),
        "sample ids [64] (1 in all) hold labels outside 0..4 ([-1])",
    ),
    "header class count": (
        edit_header(num_classes=6, class_names=[str(i) for i in range(6)]),
        "the arrays disagree with the header (n=600, num_classes=6",
    ),
    "header rows": (
        edit_header(n=599),
        "array ids has shape (600,), dtype int64, chunks (64,); the header says shape (599,)",
    ),
}


@pytest.mark.parametrize("kind", ["dir", "zip"])
@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_cache_is_refused_and_nothing_is_written(
    cache_path: Path, tmp_path: Path, case: str, kind: str
) -> None:
    """Issue 21's silently-wrong cases: each exits 2 with a message naming the damage, before
    anything is written to --out (the shards are read and checked before training starts)."""
    damage, says = DAMAGES[case]
    cache = damaged(cache_path, tmp_path, kind, damage)
    out = tmp_path / "run"
    code, output = run_cli("--cache", str(cache), *BASE, "--epochs", "1", "--out", str(out))
    assert code == 2, output
    assert says in output and "Traceback" not in output
    if case != "header rows":  # the header's n is refused by the format check first
        assert "kd-pipeline cache verify" in output, output  # says what to do
    assert not out.exists()


def test_a_missing_chunk_found_while_streaming_stops_the_run_before_any_result(
    logits_cache, tmp_path: Path
) -> None:
    """Streaming reads shards during the epoch: the refusal comes then, and no student or metrics
    are written (the run directory holds only its config)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 100, size=4000)
    location, _ = logits_cache(rng.normal(size=(1, 4000, 100)), labels=labels, rows_per_shard=200)
    (location / "members/0/logits/c/13/0").unlink()
    out = tmp_path / "run"
    code, output = run_cli(
        "--cache", str(location), *BASE, "--epochs", "1", "--memory-budget", "1M", "--out", str(out)
    )
    assert code == 2, output
    assert (
        "chunk members/0/logits/c/13/0 (member 0's logits, shard 13: rows 2600..2799) is missing"
    ) in output and "Traceback" not in output
    assert not (out / "student.pt").exists() and not (out / "metrics.json").exists()


def test_allow_partial_with_no_finished_shard_is_refused(
    partial_cache_path: Path, tmp_path: Path
) -> None:
    import shutil

    cache = tmp_path / "empty.zarr"
    shutil.copytree(partial_cache_path, cache)
    for m in (0, 1):
        shutil.rmtree(cache / f"members/{m}/done/c")  # as just after creation: no shard done
    out = tmp_path / "run"
    code, output = run_cli("--cache", str(cache), *BASE, "--allow-partial", "--out", str(out))
    assert code == 2, output
    assert "no finished shards yet (0/10 done for members [0, 1]); wait for cache-logits" in output
    assert not out.exists()


def test_one_run_uses_one_snapshot_of_the_done_shards(
    partial_cache_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer finishing shard 3 while the run sets up changes nothing: the run trains on, and
    records, the 9 shards it saw first."""
    import shutil

    import zarr

    import pipeline.training.soft_targets as soft_targets

    cache = tmp_path / "filling.zarr"
    shutil.copytree(partial_cache_path, cache)
    real = soft_targets.cache_source

    def source_then_writer_finishes(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        made = real(*args, **kwargs)
        zarr.open_group(str(cache), mode="r+", use_consolidated=False)["members/0/done"][3] = 1
        return made

    monkeypatch.setattr(soft_targets, "cache_source", source_then_writer_finishes)
    out = tmp_path / "run"
    code, output = run_cli(
        "--cache",
        str(cache),
        *BASE,
        "--epochs",
        "1",
        "--allow-partial",
        "--out",
        str(out),
        "--quiet",
    )
    assert code == 0, output
    assert LogitCache(cache, allow_partial=True).done_shards().size == 10  # the writer finished it
    rec = json.loads((out / "metrics.json").read_text())["cache"]
    used = (rec["shards_used"], rec["rows_used"], rec["loader"]["rows"], rec["loader"]["shards"])
    assert used == (9, 536, 536, 9)
