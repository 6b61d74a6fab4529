"""Stage two end to end on real caches: what train_student learns, records and refuses."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.lookup import cache_fingerprint
from pipeline.cache.read import LogitCache
from pipeline.checkpoints import load_checkpoint, load_models
from pipeline.datasets import load_dataset
from pipeline.errors import CacheError, ConfigError, KDError
from pipeline.metrics import predict_logits
from pipeline.training.config import StudentConfig, TeacherConfig
from pipeline.training.distill import train_student
from pipeline.training.train_config import TrainConfig
from tests.helpers.caches import teacher_cache
from tests.helpers.data import make_image_task, write_npz

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def quiet(_: str) -> None:
    pass


def _cache(
    teacher: Path, spec: str, out: Path, dtype: str | None = None, rows_per_shard: int = 64
) -> Path:
    teacher_cache(teacher, spec, out, dtype=dtype, rows_per_shard=rows_per_shard)
    return out


def _student(out: Path, **kw) -> StudentConfig:
    train = kw.pop("train", TrainConfig(epochs=1, batch_size=64))
    return StudentConfig(out=str(out), device="cpu", train=train, **{"student": "mlp:32", **kw})


def _argmax(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    return predict_logits(model, x, CPU).argmax(1).numpy()


# ---------------------------------------------------------------------------- a noisier seeded task
@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict:
    """A 5-class task with heavy noise (teacher ~10% test errors), 4000 train / 1000 test rows, and
    a 1-member mlp:64 teacher trained on all 4000 training rows."""
    d = tmp_path_factory.mktemp("noisy")
    x_tr, y_tr = make_image_task(4000, seed=10, noise=3.0)
    x_te, y_te = make_image_task(1000, seed=11, noise=3.0)
    npz = d / "noisy.npz"
    np.savez(npz, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, num_classes=np.int64(5))
    teacher = d / "teacher"
    from pipeline.training.teacher import train_teacher

    train_teacher(
        TeacherConfig(
            dataset=f"npz:{npz}:train",
            model="mlp:64",
            input_dropout=0.0,
            dropout=0.0,
            jitter=0,
            members=1,
            eval=f"npz:{npz}:test",
            out=str(teacher),
            device="cpu",
            train=TrainConfig(epochs=10, batch_size=128, seed=0),
        ),
        log=quiet,
    )
    return {"dir": d, "npz": npz, "teacher": teacher, "x_test": x_te, "y_test": y_te}


def test_soft_targets_regularise_a_student_on_a_small_transfer_set(noisy: dict) -> None:
    """The paper's section 4 effect: 60 transfer cases (1.5% of the teacher's training set) carry
    much more information as soft targets than as hard labels.

    Same student, epochs, seed and optimiser; only the loss differs (alpha = 1 soft targets at
    T = 10 vs alpha = 0 hard labels). Measured over subset seeds 0-4, train seeds 0-2 and two
    teacher seeds: soft/hard test-error ratio 0.49-0.65, soft agreement with the teacher 0.84-0.90
    vs 0.68-0.75 for hard.
    """
    spec = f"npz:{noisy['npz']}:train:count=60:seed=0"
    cache = _cache(noisy["teacher"], spec, noisy["dir"] / "small.zarr")
    assert LogitCache(cache).n == 60
    train = TrainConfig(epochs=50, batch_size=20, lr=3e-3, seed=0)
    runs = {}
    for name, temperature, alpha in (("soft", 10.0, 1.0), ("hard", 1.0, 0.0)):
        out = noisy["dir"] / name
        res = train_student(
            _student(
                out,
                cache=str(cache),
                student="mlp:64",
                temperature=temperature,
                alpha=alpha,
                train=train,
            ),
            log=quiet,
        )
        assert (
            res["metrics"]["test"]["dataset"] == f"npz:{noisy['npz']}:test"
            and res["metrics"]["test"]["n"] == 1000
        )
        runs[name] = (res["metrics"]["test"]["errors"], load_checkpoint(out / "student.pt").model)
    teacher = load_models([noisy["teacher"]])[0].model
    teacher_pred = _argmax(teacher, noisy["x_test"])
    teacher_errors = int((teacher_pred != noisy["y_test"]).sum())
    agree = {
        k: float((_argmax(m, noisy["x_test"]) == teacher_pred).mean()) for k, (_, m) in runs.items()
    }
    soft, hard = runs["soft"][0], runs["hard"][0]
    print(
        f"test errors of 1000: teacher {teacher_errors}, soft {soft}, hard {hard}; "
        f"agreement with the teacher: soft {agree['soft']:.3f}, hard {agree['hard']:.3f}"
    )
    assert teacher_errors < soft < 0.8 * hard
    assert agree["soft"] >= 0.8
    assert agree["soft"] > agree["hard"] + 0.05


def test_a_streamed_cache_trains_through_the_same_loop(noisy: dict) -> None:
    """4000 rows x (5 targets + 64 inputs) float32 = 1.1 MB: over a 1 MiB budget, so the run streams
    shards."""
    cache = _cache(
        noisy["teacher"],
        f"npz:{noisy['npz']}:train",
        noisy["dir"] / "full.zarr",
        rows_per_shard=256,
    )
    res = train_student(
        _student(
            noisy["dir"] / "streamed",
            cache=str(cache),
            student="mlp:64",
            temperature=4.0,
            memory_budget=1 << 20,
            train=TrainConfig(epochs=3, batch_size=128),
        ),
        log=quiet,
    )
    loader = res["cache"]["loader"]
    assert loader["mode"] == "stream" and loader["rows"] == 4000 and loader["buffer_shards"] >= 2
    assert res["cache"]["rows_used"] == 4000 and res["metrics"]["epochs"] == 3
    print(
        f"streamed: {res['metrics']['test']['errors']} test errors of 1000, transfer agreement "
        f"{res['metrics']['teacher_agreement_transfer']:.3f}"
    )
    assert res["metrics"]["test"]["errors"] < 300  # chance is 800 of 1000
    assert res["metrics"]["teacher_agreement_transfer"] > 0.7


# ---------------------------------------------------------------------------------- stable defaults
@pytest.mark.parametrize(("temperature", "alpha"), [(20.0, 0.9), (1.0, 0.0)])
def test_default_optimiser_is_stable_and_learns(
    cache_path: Path, tmp_path: Path, temperature: float, alpha: float
) -> None:
    cfg = StudentConfig(
        cache=str(cache_path),
        temperature=temperature,
        alpha=alpha,
        out=str(tmp_path / "run"),
        device="cpu",
        train=TrainConfig(epochs=3),
    )
    defaults = TrainConfig()
    assert (
        (cfg.student, cfg.train.optimizer, cfg.train.lr, cfg.train.grad_clip)
        == ("mlp:800,800", defaults.optimizer, defaults.lr, defaults.grad_clip)
        == ("mlp:800,800", "adam", 1e-3, 5.0)
    )
    res = train_student(cfg, log=quiet)
    with open(tmp_path / "run" / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert len(history) == 3
    assert all(math.isfinite(float(r[k])) for r in history for k in ("loss", "soft", "hard"))
    assert float(history[-1]["loss"]) < float(history[0]["loss"])
    test = res["metrics"]["test"]
    assert test["n"] == 300 and test["errors"] / test["n"] < 0.2  # chance is 0.8
    assert math.isfinite(test["nll"])


# ----------------------------------------------------------------------------------- ensemble types
@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("mean-probs", [0.455, 0.1995, 0.3455]),  # arithmetic mean of the members' distributions
        ("mean-logits", [0.3233, 0.5870, 0.0897]),  # normalised geometric mean
    ],
)
def test_student_learns_the_chosen_mean_of_the_members(
    logits_cache, tmp_path: Path, method: str, expected: list[float]
) -> None:
    """Every row's members say p_a = (0.9, 0.099, 0.001) and p_b = (0.01, 0.3, 0.69): the arithmetic
    mean picks class 0, the geometric mean class 1. A student distilled at T = 1 learns the one its
    run asked for."""
    p = np.array([[0.9, 0.099, 0.001], [0.01, 0.3, 0.69]])
    member_logits = np.repeat(np.log(p)[:, None, :], 32, axis=1)  # (2 members, 32 rows, 3 classes)
    location, spec = logits_cache(member_logits, rows_per_shard=8)
    res = train_student(
        _student(
            tmp_path / method,
            cache=str(location),
            student="mlp:8",
            temperature=1.0,
            alpha=1.0,
            ensemble=method,
            train=TrainConfig(epochs=40, batch_size=8, lr=1e-2),
        ),
        log=quiet,
    )
    assert res["config"]["ensemble"] == method
    assert json.loads((tmp_path / method / "config.json").read_text())["ensemble"] == method
    assert res["metrics"]["teacher_agreement_transfer"] == 1.0
    model = load_checkpoint(tmp_path / method / "student.pt").model
    probs = torch.softmax(predict_logits(model, load_dataset(spec).x, CPU), dim=1).mean(0).numpy()
    np.testing.assert_allclose(probs, expected, atol=0.03)


# ---------------------------------------------------------------------------------- bias correction
def test_bias_for_a_class_absent_from_the_transfer_set(
    npz_path: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    """Transfer set without class 3: the soft-target student rarely predicts 3; an offset fitted on
    held-out data recovers most of class 3, and --class-bias adds on top of it in the saved
    model."""
    cache = _cache(teacher_dir, f"npz:{npz_path}:train:exclude=3", tmp_path / "no3.zarr")
    assert 3 not in LogitCache(cache).read_labels()
    res = train_student(
        StudentConfig(
            cache=str(cache),
            alpha=1.0,
            fit_bias_on=f"npz:{npz_path}:test",
            class_bias={3: 2.0},
            out=str(tmp_path / "run"),
            device="cpu",
            train=TrainConfig(epochs=3),
        ),
        log=quiet,
    )
    m = res["metrics"]
    fitted = m["bias"]["fitted"]
    n3 = m["test"]["per_class_n"][3]
    before, after = fitted["class_errors_before"]["3"], fitted["class_errors_after"]["3"]
    print(
        f"class 3 test errors ({n3} samples): {before} before, "
        f"{after} after offset {fitted['offsets']}"
    )
    assert fitted["on"] == f"npz:{npz_path}:test" and fitted["classes"] == [3]
    assert (
        m["test_before_bias"]["per_class_errors"][3] == before >= 0.8 * n3
    )  # many errors on the unseen class
    assert fitted["errors_after"] < fitted["errors_before"]
    assert after < before / 2
    offset = fitted["offsets"]["3"]
    assert 0 < offset <= 15
    expected_bias = [0.0, 0.0, 0.0, offset + 2.0, 0.0]
    np.testing.assert_allclose(m["bias"]["output_bias"], expected_bias, atol=1e-6)
    assert m["bias"]["manual"] == {"3": 2.0}
    ckpt = load_checkpoint(tmp_path / "run" / "student.pt")
    np.testing.assert_allclose(ckpt.model.output_bias.numpy(), expected_bias, atol=1e-6)


def test_fit_bias_on_needs_an_absent_class(
    cache_path: Path, npz_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="no class is absent"):
        train_student(
            _student(tmp_path / "run", cache=str(cache_path), fit_bias_on=f"npz:{npz_path}:test"),
            log=quiet,
        )
    # Refused before training: no epoch ran, nothing was written.
    assert not (tmp_path / "run" / "history.csv").exists()


def test_bad_class_bias_is_refused_before_training(cache_path: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    with pytest.raises(ConfigError, match=r"--class-bias 9=1.0: class out of range 0..4"):
        train_student(
            _student(tmp_path / "run", cache=str(cache_path), class_bias={9: 1.0}), log=lines.append
        )
    assert not any("epoch" in line for line in lines)
    assert not (tmp_path / "run" / "history.csv").exists()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"members": [0, 0]}, "must not repeat"),
        ({"dataset": "fashion-mnist:train"}, "--dataset fashion-mnist:train has fingerprint"),
    ],
)
def test_options_that_would_be_ignored_or_double_counted_are_refused(
    cache_path: Path, tmp_path: Path, kw: dict, message: str
) -> None:
    # A --dataset with --cache that is other data than the cache's: refused naming both
    # fingerprints.
    with pytest.raises(KDError, match=message):
        train_student(_student(tmp_path / "run", cache=str(cache_path), **kw), log=quiet)


# ----------------------------------------------------------------------------------- online teacher
def test_online_teacher_baseline_matches_a_float32_cache(
    npz_path: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    """A live teacher forward pass each batch and a float32 cache of the same teacher give the same
    soft targets, so the one training loop produces the same run."""
    cache = _cache(teacher_dir, f"npz:{npz_path}:train", tmp_path / "f32.zarr", dtype="float32")
    common = {
        "student": "mlp:32",
        "temperature": 4.0,
        "alpha": 0.7,
        "train": TrainConfig(epochs=2, batch_size=64),
    }
    cached = train_student(_student(tmp_path / "cached", cache=str(cache), **common), log=quiet)
    online = train_student(
        _student(
            tmp_path / "online",
            online_teacher=[str(teacher_dir)],
            dataset=f"npz:{npz_path}:train",
            **common,
        ),
        log=quiet,
    )
    members = sorted(teacher_dir.glob("member-*.pt"))
    rec = online["online_teacher"]
    assert "cache" not in online and len(members) == 2
    assert rec["paths"] == [str(p) for p in members]
    assert rec["checkpoints"] == [m.checkpoint_sha256 for m in LogitCache(cache).members]
    assert rec["dataset"] == f"npz:{npz_path}:train"
    assert json.loads((tmp_path / "online" / "metrics.json").read_text())["online_teacher"] == rec
    for k in ("loss", "soft", "hard"):
        assert online["metrics"]["final_epoch"][k] == pytest.approx(
            cached["metrics"]["final_epoch"][k], rel=1e-4
        )
    assert online["metrics"]["final_epoch"]["soft"] > 0
    assert online["metrics"]["test"]["errors"] == cached["metrics"]["test"]["errors"]


# ------------------------------------------------------------------------------------------- errors
def test_changed_data_is_refused_with_both_fingerprints(
    npz_path: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    data_file = tmp_path / "task.npz"
    shutil.copy(npz_path, data_file)
    spec = f"npz:{data_file}:train"
    cache = _cache(teacher_dir, spec, tmp_path / "c.zarr")
    before = LogitCache(cache).dataset.fingerprint
    with np.load(data_file) as z:
        arrays = dict(z)
    arrays["x_train"][17, 0, 3, 4] += 0.5
    np.savez(data_file, **arrays)
    after = load_dataset(spec).fingerprint
    assert after != before
    with pytest.raises(CacheError) as err:
        train_student(_student(tmp_path / "run", cache=str(cache)), log=quiet)
    msg = str(err.value)
    assert before in msg and after in msg and spec in msg and "cache-logits" in msg
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("width", [3, 1, 5])
def test_student_width_must_match_the_cache_classes(
    cache_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    """A user's py:module:factory model with the wrong number of outputs is a ConfigError (a 1-wide
    output would otherwise broadcast against the 5-wide output bias and train silently)."""
    module = f"kd_test_student_w{width}"
    (tmp_path / f"{module}.py").write_text(
        "import math\nfrom torch import nn\n\n\n"
        "def make(in_shape, num_classes):\n"
        f"    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), {width}))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _student(tmp_path / "run", cache=str(cache_path), student=f"py:{module}:make")
    if width == 5:
        res = train_student(cfg, log=quiet)
        assert res["metrics"]["test"]["n"] == 300
        return
    with pytest.raises(ConfigError, match=f"outputs {width} logits but the teacher has 5 classes"):
        train_student(cfg, log=quiet)


def test_unlabeled_cache_needs_alpha_one(npz_path: Path, teacher_dir: Path, tmp_path: Path) -> None:
    unlabeled = write_npz(tmp_path / "unlabeled.npz", labeled=False)
    with np.load(unlabeled) as u, np.load(npz_path) as lab:
        assert "y_train" not in u.files
        np.testing.assert_array_equal(
            u["x_train"], lab["x_train"]
        )  # the teacher's own inputs, without labels
    spec = f"npz:{unlabeled}:train"
    cache = _cache(teacher_dir, spec, tmp_path / "u.zarr")
    assert not LogitCache(cache).labeled
    with pytest.raises(ConfigError) as err:
        train_student(_student(tmp_path / "bad", cache=str(cache), alpha=0.9), log=quiet)
    msg = str(err.value)
    assert (
        "--alpha 0.9 needs hard labels" in msg
        and "unlabeled" in msg
        and "--alpha 1" in msg
        and spec in msg
    )
    res = train_student(
        StudentConfig(
            cache=str(cache),
            alpha=1.0,
            out=str(tmp_path / "ok"),
            device="cpu",
            train=TrainConfig(epochs=3),
        ),
        log=quiet,
    )
    assert (
        res["metrics"]["final_epoch"]["train_errors"] is None
    )  # no labels to count errors against
    assert res["metrics"]["final_epoch"]["hard"] == 0.0
    assert res["metrics"]["test"]["errors"] / 300 < 0.2


def test_members_subset_and_out_of_range(cache_path: Path, tmp_path: Path) -> None:
    header = LogitCache(cache_path).header
    with pytest.raises(
        ConfigError, match=r"--members \[2\] out of range: the cache has members 0\.\.1"
    ):
        train_student(_student(tmp_path / "bad", cache=str(cache_path), members=[0, 2]), log=quiet)
    res = train_student(_student(tmp_path / "one", cache=str(cache_path), members=[1]), log=quiet)
    rec = res["cache"]
    assert rec["members"] == [1]
    assert rec["member_checkpoints"] == [header.members[1].checkpoint_sha256]
    assert rec["fingerprint"] == cache_fingerprint(header, [1]) != cache_fingerprint(header)


@pytest.mark.parametrize(("shape", "classes"), [((1, 4, 4), 5), ((1, 8, 8), 7)])
def test_online_teacher_must_fit_the_transfer_set(
    teacher_dir: Path, tmp_path: Path, shape: tuple, classes: int
) -> None:
    rng = np.random.default_rng(0)
    npz = tmp_path / "other.npz"
    np.savez(
        npz,
        x_train=rng.normal(size=(40, *shape)).astype(np.float32),
        y_train=rng.integers(0, 5, 40),
        num_classes=np.int64(classes),
    )
    with pytest.raises(
        ConfigError,
        match=rf"takes inputs \(1, 8, 8\) with 5 classes, but npz:\S+ has samples "
        rf"\(1, {shape[1]}, {shape[2]}\) with {classes} classes",
    ):
        train_student(
            _student(
                tmp_path / "run", online_teacher=[str(teacher_dir)], dataset=f"npz:{npz}:train"
            ),
            log=quiet,
        )
    assert not (tmp_path / "run").exists()


def test_fit_bias_on_rows_of_the_transfer_set_is_warned(
    npz_path: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    """A held-out set drawn from the transfer set's own split overlaps it; holdout= parts do not."""
    overlapping = _cache(teacher_dir, f"npz:{npz_path}:train:exclude=3", tmp_path / "a.zarr")
    lines: list[str] = []
    train_student(
        StudentConfig(
            cache=str(overlapping),
            alpha=1.0,
            fit_bias_on=f"npz:{npz_path}:train:count=100",
            out=str(tmp_path / "a"),
            device="cpu",
            train=TrainConfig(epochs=1),
        ),
        log=lines.append,
    )
    warned = [line for line in lines if line.startswith("warning: ")]
    assert (
        len(warned) == 1
        and "of the 100 rows of --fit-bias-on" in warned[0]
        and "holdout=F" in warned[0]
    )

    disjoint = _cache(
        teacher_dir, f"npz:{npz_path}:train:holdout=0.2:exclude=3", tmp_path / "b.zarr"
    )
    lines.clear()
    train_student(
        StudentConfig(
            cache=str(disjoint),
            alpha=1.0,
            fit_bias_on=f"npz:{npz_path}:train:holdout=0.2:part=holdout",
            out=str(tmp_path / "b"),
            device="cpu",
            train=TrainConfig(epochs=1),
        ),
        log=lines.append,
    )
    assert not [line for line in lines if line.startswith("warning: ")]


# ------------------------------------------------------------------------ model selection (--val)
def test_val_keeps_the_best_epochs_weights_and_records_the_choice(noisy: dict) -> None:
    """A hard-label student on 200 noisy rows overfits: its validation errors bottom out early.
    With --val it ends with the weights of that epoch (the test errors measured at the end are
    the chosen epoch's, as recorded in history.csv), and metrics.json says which epoch and why."""
    spec = f"npz:{noisy['npz']}:train"
    cache = _cache(
        noisy["teacher"], f"{spec}:holdout=0.2:seed=1:fraction=0.0625", noisy["dir"] / "v.zarr"
    )
    val_spec = f"{spec}:holdout=0.2:part=holdout:seed=1"
    out = noisy["dir"] / "val-run"
    res = train_student(
        _student(
            out,
            cache=str(cache),
            student="mlp:64",
            alpha=0.0,
            val=val_spec,
            train=TrainConfig(epochs=30, batch_size=20, lr=3e-3, lr_schedule="constant"),
        ),
        log=quiet,
    )
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    val = [int(r["val_errors"]) for r in rows]
    nll = [float(r["val_nll"]) for r in rows]
    best = min(range(len(rows)), key=lambda i: (val[i], nll[i]))
    sel = res["metrics"]["selection"]
    assert sel["on"] == load_dataset(val_spec).spec
    assert sel["epoch"] == best + 1 and sel["val_errors"] == val[best]
    assert sel["epochs_trained"] == 30 and sel["by"] == "val_errors, then val_nll"
    assert res["metrics"]["test"]["errors"] == int(rows[best]["test_errors"])
    # It did overfit (else the choice would be trivially the last epoch).
    assert best + 1 < 30 and val[-1] > val[best]
    assert load_checkpoint(out / "student.pt").meta["metrics"]["errors"] == int(
        rows[best]["test_errors"]
    )


def test_val_must_be_held_out_from_the_transfer_set_and_the_test_set(
    cache_path: Path, npz_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as err:
        train_student(
            _student(tmp_path / "a", cache=str(cache_path), val=f"npz:{npz_path}:train:count=50"),
            log=quiet,
        )
    assert "shares 50 sample(s) with the transfer set" in str(err.value)
    with pytest.raises(ConfigError) as err:
        train_student(
            _student(tmp_path / "b", cache=str(cache_path), val=f"npz:{npz_path}:test"),
            log=quiet,
        )
    assert "shares 300 sample(s) with the test set" in str(err.value)
    assert "never choose the epoch on the test set" in str(err.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
