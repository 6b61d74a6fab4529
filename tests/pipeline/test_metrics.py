"""Metrics on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.metrics import classification_metrics, evaluate_ensemble, predict_logits

CPU = torch.device("cpu")

# Five samples, three classes, given as probabilities (logits = log p, so softmax gives them back).
PROBS = torch.tensor(
    [
        [0.70, 0.20, 0.10],  # y=0: right, confidence 0.70  (ECE bin (0.667, 0.733])
        [0.10, 0.78, 0.12],  # y=1: right, confidence 0.78  (bin (0.733, 0.800])
        [0.20, 0.75, 0.05],  # y=0: wrong (says 1), conf 0.75 (same bin as the row above)
        [0.25, 0.25, 0.50],  # y=2: right, confidence 0.50  (bin (0.467, 0.533])
        [0.12, 0.30, 0.58],  # y=1: wrong (says 2), conf 0.58 (bin (0.533, 0.600])
    ]
)
LABELS = torch.tensor([0, 1, 0, 2, 1])
LOGITS = PROBS.log()


def test_metrics_on_a_hand_computed_example() -> None:
    m = classification_metrics(LOGITS, LABELS)
    assert m["n"] == 5
    assert m["errors"] == 2
    assert m["accuracy"] == pytest.approx(0.6)
    nll = -(math.log(0.70) + math.log(0.78) + math.log(0.20) + math.log(0.50) + math.log(0.30)) / 5
    assert m["nll"] == pytest.approx(nll, rel=1e-5)
    # ECE = sum over bins of (bin share) * |mean confidence - accuracy|:
    ece = (
        1 / 5 * abs(0.70 - 1)
        + 2 / 5 * abs((0.78 + 0.75) / 2 - 0.5)
        + 1 / 5 * abs(0.50 - 1)
        + 1 / 5 * 0.58
    )
    assert ece == pytest.approx(0.382)
    assert m["ece"] == pytest.approx(ece, abs=1e-5)
    assert m["per_class_errors"] == [1, 1, 0]
    assert m["per_class_n"] == [2, 2, 1]
    assert "teacher_agreement" not in m


def test_metrics_are_shift_invariant_in_logits() -> None:
    a = classification_metrics(LOGITS, LABELS)
    b = classification_metrics(LOGITS + torch.tensor([[3.0], [-2.0], [10.0], [0.5], [7.0]]), LABELS)
    for k in ("errors", "per_class_errors"):
        assert a[k] == b[k]
    assert b["nll"] == pytest.approx(a["nll"], rel=1e-5) and b["ece"] == pytest.approx(
        a["ece"], abs=1e-5
    )


def test_per_class_errors_with_more_classes_than_columns_seen() -> None:
    logits = torch.tensor(
        [[2.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [0.0, 2.0, 0.0, 0.0]]
    )
    labels = torch.tensor([3, 0, 3, 1])
    m = classification_metrics(logits, labels, num_classes=6)
    assert m["errors"] == 1
    assert m["per_class_errors"] == [0, 0, 0, 1, 0, 0]
    assert m["per_class_n"] == [1, 1, 0, 2, 0, 0]
    assert sum(m["per_class_errors"]) == m["errors"] and sum(m["per_class_n"]) == m["n"]


def test_perfect_confident_predictions() -> None:
    logits = torch.eye(4) * 50
    m = classification_metrics(logits, torch.arange(4))
    assert m["errors"] == 0 and m["accuracy"] == 1.0
    assert m["nll"] == pytest.approx(0.0, abs=1e-6)
    assert m["ece"] == pytest.approx(0.0, abs=1e-6)


def test_teacher_agreement() -> None:
    # Student predictions: [0, 1, 1, 2, 2]; teacher's argmaxes: [0, 0, 1, 2, 1] -> agree on 3 of 5.
    teacher = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [0, 5.0, 0]])
    m = classification_metrics(LOGITS, LABELS, teacher_logits=teacher)
    assert m["teacher_agreement"] == pytest.approx(0.6)
    assert (
        classification_metrics(LOGITS, LABELS, teacher_logits=LOGITS * 2)["teacher_agreement"]
        == 1.0
    )


class _Fixed(nn.Module):
    """Returns the input row as logits (times a scale); records its train/eval mode per call."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return x.float() * self.scale


def test_predict_logits_batches_in_eval_mode_and_restores_the_mode() -> None:
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    model = _Fixed(2.0)
    model.train()
    out = predict_logits(model, x, CPU, batch_size=4)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, torch.from_numpy(x) * 2)
    assert model.modes == [False, False, False]  # 4 + 4 + 2 rows, each in eval mode
    assert model.training  # restored


def test_evaluate_ensemble_by_hand() -> None:
    x = LOGITS.numpy()
    members = [_Fixed(1.0), _Fixed(0.0)]  # the second says uniform for every row
    res = evaluate_ensemble(members, x, LABELS.numpy(), CPU, num_classes=3, method="mean-probs")
    assert res["method"] == "mean-probs"
    assert res["members"][0] == classification_metrics(LOGITS, LABELS, 3)
    assert res["members"][1]["nll"] == pytest.approx(math.log(3), rel=1e-6)
    # The ensemble's probabilities are (p + 1/3) / 2: its NLL follows by hand.
    p_true = PROBS[torch.arange(5), LABELS]
    expected_nll = float(-((p_true + 1 / 3) / 2).log().mean())
    assert res["ensemble"]["nll"] == pytest.approx(expected_nll, rel=1e-5)
    assert res["ensemble"]["errors"] == 2


def test_evaluate_ensemble_of_one_is_that_member() -> None:
    res = evaluate_ensemble(
        [_Fixed()], LOGITS.numpy(), LABELS.numpy(), CPU, 3, method="mean-logits"
    )
    m, e = res["members"][0], res["ensemble"]
    assert e["errors"] == m["errors"] and e["per_class_errors"] == m["per_class_errors"]
    assert e["nll"] == pytest.approx(m["nll"], rel=1e-6) and e["ece"] == pytest.approx(
        m["ece"], abs=1e-6
    )
