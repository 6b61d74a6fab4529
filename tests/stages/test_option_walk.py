"""Every ``train-student`` option, for every source of soft targets: honoured or refused, never
ignored (issue 28).

The tables below are total: a new field of :class:`StudentConfig` or :class:`TrainConfig` fails
``test_every_option_has_a_decision_for_every_source`` until it is given a decision per source.
Then, per source (a dense image cache, a top-k image cache, a token cache, an online image
teacher), one real run sets every honoured option away from its default at once and checks each
one's effect in what the run wrote (its history, metrics, checkpoint or files); and each refused
option is given alone and must be refused with a message naming it (exit 2, nothing trained).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeline.datasets import load_dataset
from pipeline.training.config import StudentConfig
from pipeline.training.train_config import TrainConfig
from tests.helpers.cli import cli
from tests.helpers.data import make_corpus

SOURCES = ("dense", "topk", "tokens", "online")
Run = dict  # {"out": Path, "metrics": dict, "config": dict, "history": [rows], "student": meta}
Check = Callable[[Run], bool]


def _history(run: Run, key: str) -> list:
    return [r.get(key) for r in run["history"]]


def _warm_lr(run: Run) -> bool:
    steps = _history(run, "steps")[-1]
    return _history(run, "lr")[-1] == pytest.approx(0.004 * (steps + 1) / 1001)


# field -> (flag arguments, what shows it was honoured), for the sources that honour it. Fields
# whose only effect is on how a run is found or written (cache, out, overwrite, device, data_dir,
# storage_options, trust_code, dataset) are honoured everywhere by construction: the run could
# not have happened otherwise; they are listed with the check that the record names them.
HONOURED: dict[str, tuple[list[str], Check]] = {
    "temperature": (["-T", "3"], lambda r: r["config"]["temperature"] == 3.0),
    "alpha": (["--alpha", "0.7"], lambda r: r["config"]["alpha"] == 0.7),
    "loss": (["--loss", "kd"], lambda r: r["config"]["loss"] == "kd"),
    "ensemble": (
        ["--ensemble", "mean-logits"],
        lambda r: r["config"]["ensemble"] == "mean-logits",
    ),
    "members": (["--members", "0"], lambda r: r["metrics"].get("cache", {}).get("members") == [0]),
    "eval": ([], lambda r: r["metrics"]["metrics"]["test"]["dataset"] == r["eval"]),
    "val": (
        [],
        lambda r: (
            r["metrics"]["metrics"]["selection"]["on"] == r["val"] and "val_nll" in r["history"][0]
        ),
    ),
    "memory_budget": (
        ["--memory-budget", "1MiB"],
        lambda r: r["metrics"]["cache"]["loader"]["budget"] == 1 << 20,
    ),
    "loader_workers": (
        ["--loader-workers", "0"],
        lambda r: r["config"]["loader_workers"] == 0,  # decodes lazy datasets; these are arrays
    ),
    "allow_partial": (["--allow-partial"], lambda r: r["config"]["allow_partial"] is True),
    "out": ([], lambda r: (r["out"] / "student.pt").exists()),
    # how an invocation treats an existing --out, not part of the run: test_student_checks
    "overwrite": (["--overwrite"], lambda r: "overwrite" not in r["config"]),
    "device": (["--device", "cpu"], lambda r: r["student"]["device"].startswith("cpu")),
    "student": ([], lambda r: r["student"]["model_spec"] == r["config"]["student"]),
    "cache": ([], lambda r: r["metrics"]["cache"]["location"] == r["config"]["cache"]),
    "online_teacher": ([], lambda r: bool(r["metrics"]["online_teacher"]["paths"])),
    "dataset": (
        [],
        lambda r: load_dataset(r["config"]["dataset"]).spec == r["metrics"]["metrics"]["dataset"],
    ),
    "data_dir": (["--data-dir", "."], lambda r: r["config"]["data_dir"] == "."),
    "storage_options": ([], lambda r: r["config"]["storage_options"] == {}),
    "trust_code": (["--trust-code", "json"], lambda r: r["config"]["trust_code"] == ["json"]),
    "class_bias": (
        ["--class-bias", "1=0.5"],
        lambda r: r["metrics"]["metrics"]["bias"]["manual"] == {"1": 0.5},
    ),
    "views_per_epoch": ([], lambda r: r["config"]["views_per_epoch"] == 1),
    "augment": (
        ["--augment", "shift:1"],
        lambda r: r["metrics"]["views"]["live_augment"] == "shift:1",
    ),
    "fit_bias_on": ([], lambda r: True),  # needs a transfer set with exclude=: test_distill
    # TrainConfig
    "epochs": (["--epochs", "2"], lambda r: len(r["history"]) == 2),
    "batch_size": ([], lambda r: r["config"]["train"]["batch_size"] == r["batch"]),
    # lr, schedule and warmup together: constant after a linear warmup of 1000 steps, so after
    # k steps the rate is 0.004 (k + 1) / 1001 (a cosine would be lower, no warmup higher).
    "lr": (["--lr", "0.004"], lambda r: _warm_lr(r)),
    "lr_schedule": (["--lr-schedule", "constant"], lambda r: _warm_lr(r)),
    "warmup_steps": (["--warmup-steps", "1000"], lambda r: _warm_lr(r)),
    "optimizer": (["--optimizer", "adamw"], lambda r: r["config"]["train"]["optimizer"] == "adamw"),
    "momentum": (["--momentum", "0.5"], lambda r: r["config"]["train"]["momentum"] == 0.5),
    "weight_decay": (
        ["--weight-decay", "0.01"],
        lambda r: r["config"]["train"]["weight_decay"] == 0.01,
    ),
    "grad_clip": (["--grad-clip", "1.0"], lambda r: r["config"]["train"]["grad_clip"] == 1.0),
    "grad_accum": (
        ["--grad-accum", "2"],
        lambda r: _history(r, "steps")[0] == -(-r["batches"] // 2),
    ),
    "max_steps": ([], lambda r: True),  # stops mid-epoch: test_training (it would end the run)
    "precision": (["--precision", "bf16"], lambda r: r["config"]["train"]["precision"] == "bf16"),
    "eval_every": (["--eval-every", "3"], lambda r: (r["out"] / "steps.csv").exists()),
    "seed": (["--seed", "3"], lambda r: r["config"]["train"]["seed"] == 3),
    # event files read back: tests/stages/test_tracking.py
    "log_to": (
        ["--log-to", "tensorboard"],
        lambda r: any((r["out"] / "tensorboard").glob("events.out.tfevents.*")),
    ),
}

# source -> {field: the words of its refusal}; everything else a source honours.
REFUSED: dict[str, dict[str, tuple[list[str], str]]] = {
    "dense": {"online_teacher": ([], "")},
    "topk": {"online_teacher": ([], "")},
    "tokens": {
        "class_bias": (["--class-bias", "1=0.5"], "--class-bias is not supported"),
        "fit_bias_on": (["--fit-bias-on", "x"], "--fit-bias-on is not supported"),
        "augment": (["--augment", "shift:1"], "--augment is not supported"),
        "views_per_epoch": (["--views-per-epoch", "2"], "--views-per-epoch 2"),
        "online_teacher": ([], ""),
    },
    "online": {
        "members": (["--members", "0"], "--members"),
        "memory_budget": (["--memory-budget", "1MiB"], "--memory-budget chooses how a cache"),
        "allow_partial": (["--allow-partial"], "--allow-partial"),
        "cache": ([], ""),
        "views_per_epoch": (["--views-per-epoch", "2"], "--views-per-epoch 2 picks stored"),
    },
}
# Exclusive alternatives: a run names either a cache or an online teacher (refused together by
# StudentConfig.validate); the ones marked "" above are those, not given to that source.
NOT_GIVEN = {"online_teacher", "cache", "memory_budget", "allow_partial"}


def fields() -> list[str]:
    skip = {"train"}
    top = [f.name for f in dataclasses.fields(StudentConfig) if f.name not in skip]
    return top + [f.name for f in dataclasses.fields(TrainConfig)]


def test_every_option_has_a_decision_for_every_source() -> None:
    for source in SOURCES:
        for name in fields():
            assert name in HONOURED or name in REFUSED[source], (
                f"{name}: decide whether the {source} source honours it (HONOURED, with a "
                "check) or refuses it (REFUSED, with the message)"
            )


# ------------------------------------------------------------------------------------ the runs
@pytest.fixture(scope="module")
def sources(
    tmp_path_factory: pytest.TempPathFactory,
    teacher_dir: Path,
    npz_path: Path,
    cache_path: Path,
    one_torch_thread: None,
) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("walk")
    image = {
        "student": "mlp:16",
        "dataset": f"npz:{npz_path}:train:holdout=0.2",
        "val": f"npz:{npz_path}:train:holdout=0.2:part=holdout",
        "eval": f"npz:{npz_path}:test",
    }
    topk = root / "topk.zarr"
    code, out = cli(
        *("cache-logits", "--teacher", str(teacher_dir), "--dataset", image["dataset"]),
        *("--store", "topk:2", "--rows-per-shard", "64", "--out", str(topk), "--quiet"),
    )
    assert code == 0, out
    dense = root / "dense.zarr"
    code, out = cli(
        *("cache-logits", "--teacher", str(teacher_dir), "--dataset", image["dataset"]),
        *("--rows-per-shard", "64", "--out", str(dense), "--quiet"),
    )
    assert code == 0, out
    corpus = make_corpus(root / "c.txt", lines=300)
    base = f"text:{corpus}:train:seq=16:holdout=0.2"
    tokens = {
        "student": "gpt:layers=1,dim=8,heads=2,ctx=16",
        "dataset": f"{base}:count=80",
        "val": f"{base}:part=holdout:count=16",
        "eval": f"text:{corpus}:test:seq=16:count=16",
    }
    code, out = cli(
        *("train-teacher", "--dataset", tokens["dataset"], "--model", "gpt:layers=1,dim=16"),
        *("--members", "1", "--epochs", "1", "--eval", "", "--out", str(root / "gpt")),
    )
    assert code == 0, out
    tcache = root / "tokens.zarr"
    code, out = cli(
        *("cache-logits", "--teacher", str(root / "gpt"), "--dataset", tokens["dataset"]),
        *("--rows-per-shard", "8", "--out", str(tcache), "--quiet"),
    )
    assert code == 0, out
    return {
        "dense": {**image, "source": ["--cache", str(dense)]},
        "topk": {**image, "source": ["--cache", str(topk)]},
        "tokens": {**tokens, "source": ["--cache", str(tcache)]},
        "online": {**image, "source": ["--online-teacher", str(teacher_dir)]},
    }


def run_all(src: dict, out: Path, names: list[str], batch: int) -> Run:
    args = [*src["source"], "--student", src["student"], "--batch-size", str(batch)]
    args += ["--eval", src["eval"], "--val", src["val"], "--out", str(out)]
    args += ["--dataset", src["dataset"]]  # a cache's: this machine's copy of its transfer set
    for name in names:
        args += HONOURED[name][0]
    code, output = cli("train-student", *args)
    assert code == 0, output
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "history.csv") as f:
        history = [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]
    meta = torch.load(out / "student.pt", weights_only=True)["meta"]
    n = metrics.get("cache", {}).get("rows_used") or 480
    return {
        "out": out,
        "metrics": metrics,
        "config": metrics["config"],
        "history": history,
        "student": meta,
        "eval": src["eval"],
        "val": src["val"],
        "batch": batch,
        "batches": -(-n // batch),
    }


def _num(v: str) -> object:
    try:
        return float(v)
    except ValueError:
        return v


@pytest.mark.parametrize("source", SOURCES)
def test_every_honoured_option_shows_in_the_run(sources: dict, tmp_path: Path, source: str) -> None:
    refused = REFUSED[source]
    names = [n for n in fields() if n in HONOURED and n not in refused]
    run = run_all(sources[source], tmp_path / "run", names, batch=32)
    failed = [n for n in names if not HONOURED[n][1](run)]
    assert not failed, f"{source}: options without their effect: {failed}"


@pytest.mark.parametrize(
    "source,name",
    [(s, n) for s in SOURCES for n, (args, _) in REFUSED[s].items() if args],
)
def test_every_refused_option_is_refused_by_name(
    sources: dict, tmp_path: Path, source: str, name: str
) -> None:
    src = sources[source]
    args, words = REFUSED[source][name]
    extra = ["--dataset", src["dataset"]] if "--online-teacher" in src["source"] else []
    code, out = cli(
        *("train-student", *src["source"], "--student", src["student"], "--epochs", "1"),
        *extra,
        *("--out", str(tmp_path / "r"), *args),
    )
    assert code == 2 and words in out and "Traceback" not in out, out
    assert not (tmp_path / "r" / "student.pt").exists()
