"""The paper's maths (Hinton, Vinyals & Dean 2015, section 2) checked numerically on small seeded
inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.errors import ConfigError
from pipeline.training.losses import (
    LOSSES,
    DistillationLoss,
    LogitMatchingLoss,
    combine_members,
    make_loss,
    softmax_t,
)


def _logits(b: int, c: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g, dtype=torch.float64).float() * scale


# -------------------------------------------------------------------------------- (a) soft gradient
@pytest.mark.parametrize("temperature", [1.0, 2.5, 20.0])
def test_soft_gradient_of_one_sample_is_t_times_q_minus_p(temperature: float) -> None:
    z = torch.tensor([[1.5, -0.3, 0.2, 2.0, -1.1]], requires_grad=True)
    v = torch.tensor([[0.4, 1.2, -0.7, 0.9, 0.0]])
    out = DistillationLoss(temperature, alpha=1.0)(z, v, None)
    out["loss"].backward()
    q = torch.softmax(z.detach() / temperature, dim=-1)
    p = torch.softmax(v / temperature, dim=-1)
    expected = temperature * (q - p)
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-6)
    # The gradient is not trivially zero: the check is meaningful.
    assert expected.abs().max() > 1e-3
    # alpha = 1: no hard term, the loss is the soft term.
    assert float(out["hard"]) == 0.0
    assert float(out["loss"].detach()) == pytest.approx(float(out["soft"].detach()))


def test_soft_gradient_is_averaged_over_the_batch() -> None:
    t, b = 4.0, 6
    z = _logits(b, 7, seed=1).requires_grad_(True)
    v = _logits(b, 7, seed=2)
    DistillationLoss(t, alpha=1.0)(z, v, None)["loss"].backward()
    expected = t * (torch.softmax(z.detach() / t, -1) - torch.softmax(v / t, -1)) / b
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-7)


def test_soft_term_value_is_t_squared_kl() -> None:
    t = 3.0
    z, v = _logits(4, 5, seed=3), _logits(4, 5, seed=4)
    p, q = torch.softmax(v.double() / t, -1), torch.softmax(z.double() / t, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    soft = DistillationLoss(t, alpha=1.0).soft_term(z, v)
    assert float(soft) == pytest.approx(t * t * float(kl), rel=1e-5)


def test_total_loss_mixes_soft_and_hard_with_alpha() -> None:
    z, v = _logits(5, 4, seed=5), _logits(5, 4, seed=6)
    y = torch.tensor([0, 3, 1, 1, 2])
    loss = DistillationLoss(2.0, alpha=0.3)
    out = loss(z, v, y)
    assert float(out["hard"]) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-6)
    assert float(out["soft"]) == pytest.approx(float(loss.soft_term(z, v)), rel=1e-6)
    assert float(out["loss"]) == pytest.approx(
        0.3 * float(out["soft"]) + 0.7 * float(out["hard"]), rel=1e-6
    )


# ------------------------------------------------------------------- (b) the high-temperature limit
def _zero_mean_pair(c: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    z, v = _logits(8, c, seed=7, scale=scale), _logits(8, c, seed=8, scale=scale)
    return z - z.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)


def test_logit_mse_soft_term_is_half_mean_squared_difference() -> None:
    c = 10
    z, v = _zero_mean_pair(c, 1.0)
    mse = LogitMatchingLoss(temperature=7.0, alpha=1.0).soft_term(z, v)  # T does not enter
    assert float(mse) == pytest.approx(float(((z - v) ** 2).sum(-1).mean()) / (2 * c), rel=1e-6)


def test_high_temperature_limit_of_the_formula_in_float64() -> None:
    """T^2 KL(softmax(v/T) || softmax(z/T)) -> (1/2C) sum (z - v)^2 for zero-mean logits
    (T = 1000).
    """
    c, t = 10, 1000.0
    z, v = _zero_mean_pair(c, 0.5)
    z, v = z.double(), v.double()
    p, q = torch.softmax(v / t, -1), torch.softmax(z / t, -1)
    t2kl = float((p * (p.log() - q.log())).sum(-1).mean()) * t * t
    mse = float(LogitMatchingLoss(alpha=1.0).soft_term(z, v))
    assert t2kl == pytest.approx(mse, rel=1e-3)


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_kd_soft_term_approaches_logit_matching_as_t_grows(scale: float) -> None:
    """The library's (float32) KD soft term: the gap to logit-mse shrinks like 1/T and is < 1%
    at T = 100.

    (T = 1000 is not used here: in float32 the KL of two near-uniform distributions is dominated by
    rounding in log-sum-exp, about 1e-7 absolute, which is several percent of T^-2 scaled values at
    T = 1000.)
    """
    c = 10
    z, v = _zero_mean_pair(c, scale)
    mse = float(LogitMatchingLoss(alpha=1.0).soft_term(z, v))
    gaps = []
    for t in (10.0, 30.0, 100.0):
        kd = float(DistillationLoss(temperature=t, alpha=1.0).soft_term(z, v))
        gaps.append(abs(kd - mse) / mse)
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1.5e-2 * scale
    assert (
        gaps[0] > 1e-2
    )  # at T = 10 they are measurably different: the limit is real, not an identity


def test_kd_and_logit_matching_differ_at_t_one() -> None:
    z, v = _zero_mean_pair(10, 0.5)
    kd1 = float(DistillationLoss(temperature=1.0, alpha=1.0).soft_term(z, v))
    mse = float(LogitMatchingLoss(alpha=1.0).soft_term(z, v))
    assert abs(kd1 - mse) / mse > 0.1


def test_high_temperature_limit_in_float32_single_row() -> None:
    c = 6
    z = torch.tensor([[0.5, -0.2, 0.1, -0.6, 0.3, -0.1]]) * 4
    v = torch.tensor([[-0.1, 0.4, -0.3, 0.2, 0.0, -0.2]]) * 4
    kd = DistillationLoss(temperature=100.0, alpha=1.0).soft_term(z, v)
    expected = float(((z - v) ** 2).sum()) / (2 * c)
    assert float(kd) == pytest.approx(expected, rel=1e-2)


def test_logit_matching_gradient_is_difference_over_c() -> None:
    c = 5
    z = _logits(1, c, seed=9).requires_grad_(True)
    v = _logits(1, c, seed=10)
    LogitMatchingLoss(alpha=1.0)(z, v, None)["loss"].backward()
    # Row means are removed (softmax ignores them), so the gradient is the centred difference
    # over C.
    d = z.detach() - v
    torch.testing.assert_close(z.grad, (d - d.mean(dim=-1, keepdim=True)) / c)


def test_logit_matching_ignores_a_per_row_shift_of_the_targets() -> None:
    # A mean-probs ensemble target is T log(mean p): shifted by about -T log C per row. The loss
    # must not care.
    z, v = _logits(6, 5, seed=21), _logits(6, 5, seed=22)
    shift = torch.arange(6.0)[:, None] * -7.0
    base = LogitMatchingLoss(alpha=1.0)(z, v, None)["soft"]
    torch.testing.assert_close(LogitMatchingLoss(alpha=1.0)(z, v + shift, None)["soft"], base)
    assert float(LogitMatchingLoss(alpha=1.0)(z, z + shift, None)["soft"]) < 1e-10


# ------------------------------------------------------------------------ (c) alpha = 0 is plain CE
def test_alpha_zero_is_exactly_cross_entropy_and_needs_no_teacher() -> None:
    z = _logits(9, 4, seed=11, scale=3.0)
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 0])
    out = DistillationLoss(temperature=5.0, alpha=0.0)(z, None, y)
    assert torch.equal(out["loss"], F.cross_entropy(z, y))
    assert float(out["soft"]) == 0.0
    # With a teacher given it is still only CE.
    out2 = DistillationLoss(temperature=5.0, alpha=0.0)(z, _logits(9, 4, seed=12), y)
    assert torch.equal(out2["loss"], F.cross_entropy(z, y))


# ---------------------------------------------------------------------- (d) huge logits stay finite
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("temperature", [1.0, 20.0])
def test_finite_loss_and_gradients_for_logits_of_magnitude_1e4(
    name: str, temperature: float
) -> None:
    z = (_logits(4, 10, seed=13) * 1e4).requires_grad_(True)
    v = _logits(4, 10, seed=14) * 1e4
    y = torch.tensor([1, 2, 3, 4])
    assert z.dtype == torch.float32
    out = make_loss(name, temperature, 0.5)(z, v, y)
    assert all(math.isfinite(float(out[k].detach())) for k in ("loss", "soft", "hard"))
    assert (
        float(out["loss"].detach()) > 0
    )  # distinct logits of this size: a real (large) loss, not 0
    out["loss"].backward()
    assert torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0


def test_kd_gradient_at_huge_logits_matches_the_formula() -> None:
    """At 1e4 the softmaxes are one-hot; the soft gradient is T (q - p) exactly, not NaN."""
    t = 2.0
    z = torch.tensor([[1e4, 0.0, -1e4]], requires_grad=True)
    v = torch.tensor([[0.0, 1e4, -1e4]])
    DistillationLoss(t, alpha=1.0)(z, v, None)["loss"].backward()
    torch.testing.assert_close(z.grad, torch.tensor([[t, -t, 0.0]]))


# ------------------------------------------------------------------------- (e) ensemble combination
MEMBERS = torch.tensor(
    [
        [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]],
        [[0.0, 1.0, 0.0], [-2.0, 1.0, 1.0]],
        [[1.0, -1.0, 2.0], [0.0, 0.0, 0.0]],
    ]
)  # (M=3, B=2, C=3)


@pytest.mark.parametrize("temperature", [1.0, 3.0, 20.0])
def test_mean_probs_is_the_arithmetic_mean_of_member_softmaxes(temperature: float) -> None:
    v = combine_members(MEMBERS, "mean-probs", temperature)
    assert v.shape == (2, 3) and v.dtype == torch.float32
    mean_p = torch.softmax(MEMBERS.double() / temperature, dim=-1).mean(dim=0)
    # v = T * log(mean p): its softmax at T is the mean itself (mean p sums to 1).
    torch.testing.assert_close(v.double(), temperature * mean_p.log(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(softmax_t(v, temperature).double(), mean_p, rtol=1e-5, atol=1e-6)


def test_mean_probs_by_hand() -> None:
    # Two members, one row, two classes: member probabilities (0.5, 0.5) and (e/(1+e), 1/(1+e)).
    member = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]]])
    e = math.e
    expected = [(0.5 + e / (1 + e)) / 2, (0.5 + 1 / (1 + e)) / 2]
    got = softmax_t(combine_members(member, "mean-probs", 1.0), 1.0)
    torch.testing.assert_close(got, torch.tensor([expected]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_mean_logits_is_the_normalised_geometric_mean(temperature: float) -> None:
    v = combine_members(MEMBERS, "mean-logits", temperature)
    torch.testing.assert_close(v, MEMBERS.mean(dim=0))
    p = torch.softmax(MEMBERS.double() / temperature, dim=-1)  # (M, B, C)
    geo = p.prod(dim=0) ** (1.0 / p.shape[0])
    geo = geo / geo.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(softmax_t(v, temperature).double(), geo, rtol=1e-5, atol=1e-6)


def test_mean_probs_and_mean_logits_differ_and_one_member_is_itself() -> None:
    a = softmax_t(combine_members(MEMBERS, "mean-probs"), 1.0)
    g = softmax_t(combine_members(MEMBERS, "mean-logits"), 1.0)
    assert (a - g).abs().max() > 1e-2
    one = MEMBERS[:1]
    for method in ("mean-probs", "mean-logits"):
        torch.testing.assert_close(
            softmax_t(combine_members(one, method), 1.0), torch.softmax(one[0], -1)
        )


def test_combine_members_is_stable_for_huge_logits() -> None:
    v = combine_members(MEMBERS * 1e4, "mean-probs", 1.0)
    assert torch.isfinite(v).all()
    # Row 0: members' argmaxes are 0, 1, 2 -> each class gets probability 1/3.
    torch.testing.assert_close(softmax_t(v, 1.0)[0], torch.full((3,), 1 / 3), rtol=1e-5, atol=1e-6)


def test_combine_members_unknown_method() -> None:
    with pytest.raises(ConfigError, match="mean-probs, mean-logits"):
        combine_members(MEMBERS, "median")


# ----------------------------------------------------------------------- (f) properties over logits
_row = arrays(
    "float32",
    (3, 5),
    elements=st.floats(-30, 30, allow_nan=False, allow_infinity=False, width=32),
)
_temp = st.sampled_from([0.5, 1.0, 3.0, 20.0])


@settings(max_examples=40, deadline=None, database=None)
@given(z=_row, v=_row, t=_temp)
def test_kd_soft_term_is_non_negative(z, v, t) -> None:
    soft = float(DistillationLoss(t, alpha=1.0).soft_term(torch.from_numpy(z), torch.from_numpy(v)))
    assert math.isfinite(soft)
    assert soft >= -1e-5 * max(1.0, t * t)


@settings(max_examples=40, deadline=None, database=None)
@given(z=_row, t=_temp)
def test_kd_soft_term_is_zero_when_student_equals_teacher(z, t) -> None:
    x = torch.from_numpy(z)
    soft = float(DistillationLoss(t, alpha=1.0).soft_term(x, x.clone()))
    assert soft == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=40, deadline=None, database=None)
@given(
    z=_row,
    v=_row,
    t=_temp,
    shift_z=st.floats(-50, 50, width=32),
    shift_v=st.floats(-50, 50, width=32),
    row=st.integers(0, 2),
)
def test_kd_soft_term_is_invariant_to_a_constant_added_to_a_row(
    z, v, t, shift_z, shift_v, row
) -> None:
    loss = DistillationLoss(t, alpha=1.0)
    zt, vt = torch.from_numpy(z), torch.from_numpy(v)
    z2, v2 = zt.clone(), vt.clone()
    z2[row] += shift_z
    v2[row] += shift_v
    a, b = float(loss.soft_term(zt, vt)), float(loss.soft_term(z2, v2))
    assert b == pytest.approx(a, rel=1e-3, abs=1e-3 * max(1.0, t * t))


@settings(max_examples=30, deadline=None, database=None)
@given(members=arrays("float32", (3, 2, 4), elements=st.floats(-20, 20, width=32)), t=_temp)
def test_mean_probs_softmax_is_always_the_member_average(members, t) -> None:
    m = torch.from_numpy(members)
    got = softmax_t(combine_members(m, "mean-probs", t), t)
    expected = torch.softmax(m.double() / t, -1).mean(0).float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------- (g) bad configs
def test_alpha_below_one_without_labels_raises_config_error() -> None:
    z, v = _logits(2, 3, seed=15), _logits(2, 3, seed=16)
    with pytest.raises(ConfigError, match="needs hard labels"):
        DistillationLoss(2.0, alpha=0.5)(z, v, None)
    # alpha = 1 on an unlabeled transfer set is fine.
    assert math.isfinite(float(DistillationLoss(2.0, alpha=1.0)(z, v, None)["loss"]))


def test_alpha_above_zero_without_teacher_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="teacher logits"):
        DistillationLoss(2.0, alpha=0.5)(_logits(2, 3, seed=17), None, torch.tensor([0, 1]))


@pytest.mark.parametrize("cls", [DistillationLoss, LogitMatchingLoss])
def test_bad_temperature_and_alpha_are_reported_together(cls) -> None:
    with pytest.raises(ConfigError) as info:
        cls(temperature=0.0, alpha=1.5)
    assert len(info.value.problems) == 2
    msg = str(info.value)
    assert "temperature must be > 0, got 0.0" in msg
    assert "alpha must be in [0, 1], got 1.5" in msg


@pytest.mark.parametrize(
    ("temperature", "alpha", "n"),
    [
        (-1.0, 0.5, 1),
        (float("nan"), 0.5, 1),
        (1.0, -0.1, 1),
        (1.0, float("nan"), 1),
        (0.0, float("nan"), 2),
    ],
)
def test_each_bad_value_is_a_problem(temperature: float, alpha: float, n: int) -> None:
    with pytest.raises(ConfigError) as info:
        DistillationLoss(temperature, alpha)
    assert len(info.value.problems) == n


def test_make_loss() -> None:
    kd = make_loss("kd", 3.0, 0.25)
    assert type(kd) is DistillationLoss and kd.temperature == 3.0 and kd.alpha == 0.25
    assert type(make_loss("logit-mse", 1.0, 1.0)) is LogitMatchingLoss
    with pytest.raises(ConfigError) as info:
        make_loss("mse-kd", 1.0, 1.0)
    assert "'mse-kd'" in str(info.value) and "kd, logit-mse" in str(info.value)
    with pytest.raises(ConfigError):
        make_loss("kd", -2.0, 0.5)
