"""The one training loop: batch sources, jitter, fit() and its config."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, KDError
from pipeline.metrics import classification_metrics, predict_logits
from pipeline.models import build_model
from pipeline.training.fit_callbacks import write_history_csv
from pipeline.training.loop import Callback, FitState, fit, make_schedule
from pipeline.training.losses import DistillationLoss
from pipeline.training.sources import InMemorySource, random_shift
from pipeline.training.train_config import TrainConfig
from tests.helpers.data import make_image_task

CPU = torch.device("cpu")
HISTORY_KEYS = {
    "epoch",
    "loss",
    "soft",
    "hard",
    "train_errors",
    "steps",
    "train_error_rate",
    "lr",
    "seconds",
}


# ----------------------------------------------------------------------------------- InMemorySource
def _source(n: int = 23, batch_size: int = 5, seed: int = 0, **kw: object) -> InMemorySource:
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    y = np.arange(n) % 3
    teacher = np.stack([np.arange(n), -np.arange(n)], axis=1).astype(np.float32)
    return InMemorySource(x, y, teacher, batch_size=batch_size, seed=seed, **kw)


def _order(src: InMemorySource, epoch: int) -> list[int]:
    return [int(v) for xb, _, _ in src.epoch(epoch) for v in xb[:, 0]]


def test_every_row_exactly_once_per_epoch_in_aligned_batches() -> None:
    src = _source()
    assert len(src) == 5 and src.num_rows == 23  # ceil(23 / 5) batches
    for epoch in range(3):
        batches = list(src.epoch(epoch))
        assert [b[0].shape[0] for b in batches] == [5, 5, 5, 5, 3]
        rows = []
        for xb, tb, yb in batches:
            ids = xb[:, 0].long()
            assert torch.equal(yb, ids % 3)  # labels travel with their rows
            assert torch.equal(tb, torch.stack([ids, -ids], 1).float())  # and teacher logits too
            assert yb.dtype == torch.int64
            rows += ids.tolist()
        assert sorted(rows) == list(range(23))


def test_shuffled_differently_per_epoch_and_reproducible_by_seed() -> None:
    a, b = _source(seed=3), _source(seed=3)
    orders = [_order(a, e) for e in range(4)]
    assert orders == [_order(b, e) for e in range(4)]  # same seed, same orders
    assert len({tuple(o) for o in orders}) == 4  # each epoch its own permutation
    assert orders[0] != list(range(23))  # actually shuffled
    assert _order(_source(seed=4), 0) != orders[0]
    # The documented rule: epoch e's permutation comes from the seed sequence [seed, e] ...
    assert orders[0] == np.random.default_rng([3, 0]).permutation(23).tolist()
    assert orders[2] == np.random.default_rng([3, 2]).permutation(23).tolist()
    # ... so seed s, epoch e+1 is not seed s+1, epoch e (ensemble members get distinct orders).
    assert _order(_source(seed=3), 1) != _order(_source(seed=4), 0)


def test_unshuffled_and_unlabeled_sources() -> None:
    src = InMemorySource(np.arange(7, dtype=np.float32)[:, None], None, batch_size=3, shuffle=False)
    batches = list(src.epoch(5))
    assert [b[0][:, 0].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert all(tb is None and yb is None for _, tb, yb in batches)


# ------------------------------------------------------------------------------------- random_shift
def test_random_shift_moves_a_single_pixel_by_at_most_max_shift() -> None:
    g = torch.Generator().manual_seed(0)
    b, s = 400, 2
    x = torch.zeros(b, 1, 9, 9)
    x[:, 0, 4, 4] = 7.0
    out = random_shift(x, s, generator=g)
    assert out.shape == x.shape and out.dtype == x.dtype
    offsets = set()
    for i in range(b):
        nz = out[i, 0].nonzero()
        assert nz.shape[0] == 1  # the pixel moved, it was not smeared
        r, c = nz[0].tolist()
        assert out[i, 0, r, c] == 7.0 and float(out[i].sum()) == 7.0
        dy, dx = r - 4, c - 4
        assert abs(dy) <= s and abs(dx) <= s
        offsets.add((dy, dx))
    assert len(offsets) == (2 * s + 1) ** 2  # every integer offset occurs


def _shift_by_hand(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(img)
    h, w = img.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_random_shift_is_an_integer_translation_with_zero_fill() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(
        1, 255, (60, 2, 6, 5), dtype=torch.uint8
    )  # no zeros: zeros in the output are fill
    out = random_shift(x, 1, generator=g)
    assert out.dtype == torch.uint8
    xs, outs = x.numpy(), out.numpy()
    for i in range(60):
        matches = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if np.array_equal(outs[i], _shift_by_hand(xs[i], dy, dx))
        ]
        assert len(matches) == 1
        dy, dx = matches[0]
        assert int((outs[i] == 0).sum()) == 2 * (abs(dy) * 5 + abs(dx) * 6 - abs(dy * dx))
        # Both channels move together.
        assert np.array_equal(outs[i, 1], _shift_by_hand(xs[i, 1], dy, dx))


def test_random_shift_zero_is_identity_and_generator_reproducible() -> None:
    x = torch.rand(4, 1, 5, 5)
    assert random_shift(x, 0) is x
    a = random_shift(x, 2, generator=torch.Generator().manual_seed(9))
    b = random_shift(x, 2, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- fit
@pytest.fixture(scope="module")
def task() -> tuple:
    x, y = make_image_task(400, seed=0)
    xt, yt = make_image_task(200, seed=1)
    return x, y, xt, yt


def _fit(task: tuple, epochs: int = 4, seed: int = 0, **kw: object) -> tuple:
    x, y, xt, yt = task
    torch.manual_seed(seed)
    mean, std = float(x.mean()), float(x.std())
    model = build_model("mlp:32", (1, 8, 8), 5, input_stats=(mean, std))

    def evaluate(m: torch.nn.Module) -> dict:
        met = classification_metrics(predict_logits(m, xt, CPU), torch.as_tensor(yt))
        return {"test_errors": met["errors"]}

    cfg = TrainConfig(epochs=epochs, batch_size=32, seed=seed)
    history = fit(
        model,
        InMemorySource(x, y, batch_size=32, seed=seed),
        DistillationLoss(1.0, 0.0),
        cfg,
        CPU,
        evaluate=evaluate,
        **kw,
    )
    return model, history


def test_fit_learns_the_task_and_reports_history(task: tuple, tmp_path: Path) -> None:
    lines: list[str] = []
    model, history = _fit(task, history_csv=tmp_path / "h.csv", log=lines.append)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    for row in history:
        assert set(row) == HISTORY_KEYS | {"test_errors"}
        assert row["soft"] == 0.0 and row["hard"] == pytest.approx(
            row["loss"]
        )  # alpha = 0: CE only
        assert row["train_error_rate"] == pytest.approx(row["train_errors"] / 400)
        assert row["seconds"] >= 0
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["train_error_rate"] < 0.1
    assert history[-1]["test_errors"] < 20  # < 10% of 200
    assert history[0]["lr"] < 1e-3 and history[-1]["lr"] == pytest.approx(
        0.0, abs=1e-12
    )  # cosine to 0
    assert not model.training
    final = classification_metrics(predict_logits(model, task[2], CPU), torch.as_tensor(task[3]))
    assert final["errors"] == history[-1]["test_errors"]
    # One log line per epoch, and the CSV mirrors the rows.
    assert (
        len(lines) == 4 and "test_errors=" in lines[-1] and lines[0].startswith("train epoch 1/4")
    )
    with open(tmp_path / "h.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and set(rows[0]) == HISTORY_KEYS | {"test_errors"}
    assert float(rows[2]["loss"]) == pytest.approx(history[2]["loss"])


def test_fit_is_reproducible_by_seed(task: tuple) -> None:
    _, h1 = _fit(task, epochs=1, seed=5)
    _, h2 = _fit(task, epochs=1, seed=5)
    _, h3 = _fit(task, epochs=1, seed=6)
    assert h1[0]["loss"] == h2[0]["loss"] and h1[0]["train_errors"] == h2[0]["train_errors"]
    assert h1[0]["loss"] != h3[0]["loss"]


def test_fit_with_soft_targets_only_and_constant_lr(task: tuple) -> None:
    x, _, _, _ = task
    teacher = torch.tensor(np.random.default_rng(0).normal(size=(400, 5)), dtype=torch.float32)
    torch.manual_seed(0)
    model = build_model("mlp:16:max_norm=1.0", (1, 8, 8), 5)
    cfg = TrainConfig(epochs=2, batch_size=50, lr=5e-3, lr_schedule="constant")
    history = fit(
        model, InMemorySource(x, None, teacher, batch_size=50), DistillationLoss(2.0, 1.0), cfg, CPU
    )
    assert all(r["train_errors"] is None and r["train_error_rate"] is None for r in history)
    assert all(
        r["hard"] == 0.0 and r["soft"] == pytest.approx(r["loss"]) and r["soft"] > 0
        for r in history
    )
    assert history[1]["loss"] < history[0]["loss"]
    assert history[-1]["lr"] == 5e-3
    # The max-norm constraint was applied after the steps.
    for m in model.body.modules():
        if isinstance(m, torch.nn.Linear):
            assert float(m.weight.detach().norm(dim=1).max()) <= 1.0 + 1e-5


def test_fit_online_teacher_sees_the_augmented_inputs(task: tuple) -> None:
    x, y, _, _ = task
    seen: list[torch.Tensor] = []

    def teacher_fn(xb: torch.Tensor) -> torch.Tensor:
        seen.append(xb)
        return torch.zeros(xb.shape[0], 5)

    def augment(xb: torch.Tensor) -> torch.Tensor:
        return xb + 100.0

    model = build_model("mlp:8", (1, 8, 8), 5)
    fit(
        model,
        InMemorySource(x[:64], y[:64], batch_size=32),
        DistillationLoss(1.0, 0.5),
        TrainConfig(epochs=1, batch_size=32),
        CPU,
        teacher_fn=teacher_fn,
        augment=augment,
    )
    assert len(seen) == 2 and all(float(s.min()) > 90 for s in seen)


def test_fit_refuses_a_diverging_loss(task: tuple) -> None:
    x, y, _, _ = task

    def nan_loss(z: torch.Tensor, t: object, labels: object) -> dict:
        loss = z.sum() * float("nan")
        return {"loss": loss, "soft": loss, "hard": loss}

    model = build_model("mlp:8", (1, 8, 8), 5)
    with pytest.raises(KDError, match="training diverged in epoch 1"):
        fit(
            model,
            InMemorySource(x[:32], y[:32], batch_size=32),
            nan_loss,
            TrainConfig(epochs=3),
            CPU,
        )


def test_write_history_csv_skips_nested_values(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    write_history_csv(
        path, [{"epoch": 1, "loss": 0.5, "per_class": [1, 2]}, {"epoch": 2, "loss": 0.25, "x": 3}]
    )
    assert path.read_text().splitlines() == ["epoch,loss,x", "1,0.5,", "2,0.25,3"]


# -------------------------------------------------------------------------------------- TrainConfig
def test_train_config_validate_lists_all_problems() -> None:
    TrainConfig().validate()
    cfg = TrainConfig(
        epochs=0, batch_size=0, lr=0.0, optimizer="lbfgs", lr_schedule="step", grad_clip=-1.0
    )
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    problems = info.value.problems
    assert len(problems) == 6
    msg = str(info.value)
    for fragment in (
        "epochs must be >= 1, got 0",
        "batch_size must be >= 1, got 0",
        "lr must be > 0, got 0.0",
        "unknown optimizer 'lbfgs'; expected one of adam, adamw, sgd",
        "unknown lr schedule 'step'; expected one of cosine, constant",
        "grad_clip must be > 0 or None, got -1.0",
    ):
        assert fragment in msg
    assert msg.count("\n  - ") == 6


def test_train_config_nan_lr_and_none_grad_clip() -> None:
    TrainConfig(grad_clip=None).validate()
    with pytest.raises(ConfigError) as info:
        TrainConfig(lr=math.nan).validate()
    # One line per field: the non-finite check says it, not also "> 0" (nan fails every check).
    assert info.value.problems == ["lr must be a finite number, got nan"]


def test_fit_validates_its_config_first(task: tuple) -> None:
    model = build_model("mlp:8", (1, 8, 8), 5)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ConfigError):
        fit(
            model,
            InMemorySource(task[0], task[1]),
            DistillationLoss(1.0, 0.0),
            TrainConfig(epochs=0),
            CPU,
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_best_epoch_keeps_the_fewest_errors_then_the_lowest_nll_then_the_earliest() -> None:
    from pipeline.training.fit_callbacks import BestEpoch

    model = torch.nn.Linear(2, 1)
    best = BestEpoch()
    rows = [(5, 0.9), (3, 0.8), (3, 0.7), (3, 0.7), (4, 0.1)]
    kept = []
    for epoch, (errors, nll) in enumerate(rows, 1):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        kept.append(best.offer(model, {"epoch": epoch, "val_errors": errors, "val_nll": nll}))
    assert kept == [True, True, True, False, False]
    best.restore(model)
    assert float(model.weight[0, 0]) == 3.0  # epoch 3's weights, not the last epoch's (5)
    assert best.record(5) == {
        "by": "val_errors, then val_nll",
        "epochs_trained": 5,
        "epoch": 3,
        "val_errors": 3,
        "val_nll": 0.7,
    }


# ------------------------------------------------------------- the loop's features and callbacks
def _train(task: tuple, batch_size: int, **cfg_kw: object) -> tuple:
    """An mlp trained on 384 rows (divisible by every batch used here), with its history."""
    x, y, *_ = task
    x, y = x[:384], y[:384]
    torch.manual_seed(0)
    model = build_model("mlp:32", (1, 8, 8), 5, input_stats=(0.0, 1.0))
    cfg = TrainConfig(batch_size=batch_size, seed=0, **{"epochs": 2, **cfg_kw})
    steps: list[int] = []
    probe = _Record(steps)
    history = fit(
        model,
        InMemorySource(x, y, batch_size=batch_size, seed=0),
        DistillationLoss(1.0, 0.0),
        cfg,
        CPU,
        callbacks=[probe],
    )
    return model, history, probe


class _Record(Callback):
    """Records the optimiser steps as they happen."""

    def __init__(self, steps: list) -> None:
        self.steps = steps

    def on_step_end(self, state: FitState) -> None:
        self.steps.append(state.step)


def test_gradient_accumulation_equals_the_larger_batch(task: tuple) -> None:
    """Two micro-batches of 32 then one step = one batch of 64: the same rows (the permutation
    depends on the seed only) and the same mean loss, so the same weights up to rounding."""
    big, h_big, _ = _train(task, 64)
    acc, h_acc, probe = _train(task, 32, grad_accum=2)
    assert probe.steps[-1] == h_acc[-1]["steps"] == h_big[-1]["steps"] == 2 * 384 // 64
    for a, b in zip(big.state_dict().values(), acc.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert h_acc[-1]["loss"] == pytest.approx(h_big[-1]["loss"], rel=1e-4)


def test_warmup_then_cosine_schedule() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_schedule(opt, TrainConfig(warmup_steps=4, lr_schedule="cosine"), 14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear from 0 to the peak
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.5)  # half way through the 10 decay steps
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    flat = make_schedule(opt, TrainConfig(warmup_steps=2, lr_schedule="constant"), 10)
    assert flat is not None
    assert make_schedule(opt, TrainConfig(lr_schedule="constant"), 10) is None


def test_max_steps_stops_mid_epoch_and_the_schedule_spans_them(task: tuple) -> None:
    _, history, probe = _train(task, 32, epochs=5, max_steps=17)  # 12 steps per epoch
    assert probe.steps == list(range(1, 18))
    assert [r["epoch"] for r in history] == [1, 2] and history[-1]["steps"] == 17
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine reached its end
    # a step budget replaces --epochs: as many epochs as it takes
    _, history, probe = _train(task, 32, epochs=1, max_steps=30)
    assert probe.steps[-1] == 30 and [r["epoch"] for r in history] == [1, 2, 3]


def test_a_short_last_accumulation_group_is_a_mean_over_its_own_batches(task: tuple) -> None:
    """384 rows in batches of 64 = 6 batches; accumulating 4 makes groups of 4 and 2: the second
    step is the mean over its 2 batches, i.e. one batch of 128, as training with 256 then 128
    rows per step would give (SGD: any weighting error would show in the weights)."""
    sgd = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "lr_schedule": "constant"}
    acc, _, probe = _train(task, 64, epochs=1, grad_accum=4, **sgd)
    assert probe.steps == [1, 2]
    x, y, *_ = task
    torch.manual_seed(0)
    ref = build_model("mlp:32", (1, 8, 8), 5, input_stats=(0.0, 1.0))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    order = torch.from_numpy(np.random.default_rng([0, 0]).permutation(384))
    for lo, hi in ((0, 256), (256, 384)):
        idx = order[lo:hi]
        loss = DistillationLoss(1.0, 0.0)(
            ref(torch.as_tensor(x[:384])[idx]), None, torch.as_tensor(y[:384])[idx]
        )["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 5.0)
        opt.step()
    for a, b in zip(ref.state_dict().values(), acc.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_trains_on_the_cpu_and_fp16_is_refused_there(task: tuple) -> None:
    model, history, _ = _train(task, 32, precision="bf16")
    assert all(math.isfinite(r["loss"]) for r in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert next(model.parameters()).dtype == torch.float32  # weights stay float32
    with pytest.raises(ConfigError, match="--precision fp16 needs a GPU"):
        _train(task, 32, precision="fp16")


def test_evaluation_every_n_steps_and_a_callback_that_stops(task: tuple) -> None:
    x, y, xt, yt = task
    model = build_model("mlp:32", (1, 8, 8), 5, input_stats=(0.0, 1.0))
    lines: list[str] = []

    class StopAtFive(Callback):
        def on_step_end(self, state: FitState) -> None:
            state.stop = state.step >= 5

    calls = []

    def evaluate(m: torch.nn.Module) -> dict:
        calls.append(m.training)
        wrong = predict_logits(m, xt, CPU).argmax(1) != torch.as_tensor(yt)
        return {"test_errors": int(wrong.sum())}

    history = fit(
        model,
        InMemorySource(x, y, batch_size=32, seed=0),
        DistillationLoss(1.0, 0.0),
        TrainConfig(epochs=3, batch_size=32, eval_every=2),
        CPU,
        evaluate=evaluate,
        log=lines.append,
        callbacks=[StopAtFive()],
    )
    assert len(history) == 1 and history[0]["steps"] == 5
    assert not any(calls)  # measured in eval mode
    assert len(calls) == 3  # steps 2 and 4, then the epoch's end
    assert sum("epoch 1 step 2: test_errors=" in line for line in lines) == 1
    assert model.training is False


def test_in_memory_source_stacks_a_list_of_rows_without_torchs_slow_path_warning() -> None:
    import warnings

    import numpy as np

    from pipeline.training.sources import InMemorySource

    rows = [np.full((2, 2), i, np.float32) for i in range(5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Creating a tensor from a list of numpy.ndarrays ..."
        src = InMemorySource(rows, np.arange(5), batch_size=2, shuffle=False)
    assert src.x.shape == (5, 2, 2) and float(src.x[3, 0, 0]) == 3.0


def test_a_long_epoch_prints_progress_lines_where_no_bar_draws(
    task: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output redirected (pytest's stderr is no terminal): a line every KD_PROGRESS_SECONDS of an
    epoch with batches done, rows per second and time left; none in an epoch shorter than that."""
    import re

    x = task[0]
    batches = -(-len(x) // 32)
    monkeypatch.setenv("KD_PROGRESS_SECONDS", "0")  # every batch counts as a long wait
    lines: list[str] = []
    _fit(task, epochs=2, log=lines.append)
    progress = [line for line in lines if " batches, " in line]
    assert [line.split(",")[0] for line in progress] == [
        f"train epoch {e}/2: {b}/{batches} batches" for e in (1, 2) for b in range(1, batches)
    ]
    assert all(re.fullmatch(r"[^,]+, [\d,]+ rows/s, \d+s left", line) for line in progress)
    quiet: list[str] = []
    _fit(task, epochs=1, log=quiet.append, progress=False)  # --quiet: no progress at all
    monkeypatch.delenv("KD_PROGRESS_SECONDS")  # the default 30 s: a short epoch says nothing
    _fit(task, epochs=1, log=quiet.append)
    assert [line for line in quiet if " batches, " in line] == [] and len(quiet) == 2
