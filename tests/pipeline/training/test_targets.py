"""Sparse soft targets and their losses (pipeline/training/targets.py, losses.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cache.kinds import StorageSpec
from pipeline.errors import ConfigError
from pipeline.training.losses import DistillationLoss, LogitMatchingLoss, combine_members
from pipeline.training.targets import SparseTargets, cat_targets, sparse_kl, sparse_rows

C = 12


def member_logits(members: int = 2, rows: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((members, rows, C)) * 2.5).astype(np.float32)


def targets(v: np.ndarray, text: str, method: str, t: float, seed: int = 0) -> SparseTargets:
    spec = StorageSpec.parse(text, C)
    arrays = [spec.impl.encode(spec, m, "float32", np.random.default_rng(seed)) for m in v]
    return sparse_rows([spec] * len(v), arrays, C, method, t)


def student(rows: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, C, generator=g).requires_grad_(True)


def grad_of(loss: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, z)
    return g


@pytest.mark.parametrize("method", ["mean-probs", "mean-logits"])
@pytest.mark.parametrize("t", [1.0, 4.0])
def test_topk_with_k_equal_c_trains_exactly_like_dense(method: str, t: float) -> None:
    """K = C: the buckets are the classes; loss (one member) and gradient (any mix) are dense's."""
    v = member_logits()
    z = student()
    kd = DistillationLoss(temperature=t, alpha=1.0)
    dense_teacher = combine_members(torch.from_numpy(v), method, t)
    dense = kd(z, dense_teacher, None)["loss"]
    sparse = kd(z, targets(v, f"topk:{C}", method, t), None)["loss"]
    torch.testing.assert_close(grad_of(sparse, z), grad_of(dense, z), atol=1e-5, rtol=1e-4)
    one = targets(v[:1], f"topk:{C}", method, t)
    torch.testing.assert_close(
        kd(z, one, None)["loss"], kd(z, torch.from_numpy(v[0]), None)["loss"], atol=1e-5, rtol=1e-5
    )


def test_topk_loss_is_the_exact_k_plus_1_bucket_kl() -> None:
    """The teacher's buckets (top K + tail) against the student's softmax collapsed onto them."""
    v = member_logits(members=1)
    t, k = 4.0, 3
    z = student()
    got = sparse_kl(z, targets(v, f"topk:{k}", "mean-probs", t), t)
    p = torch.softmax(torch.from_numpy(v[0]).double() / t, dim=1)
    q = torch.softmax(z.detach().double() / t, dim=1)
    top = torch.from_numpy(np.argsort(-v[0], axis=1)[:, :k].copy())
    pk, qk = p.gather(1, top), q.gather(1, top)
    pt, qt = 1 - pk.sum(1), 1 - qk.sum(1)
    want = (pk * (pk / qk).log()).sum(1) + pt * (pt / qt).log()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_sampled_loss_has_the_full_kd_gradient_in_expectation() -> None:
    v = member_logits(members=2, rows=1)
    z = student(rows=1)
    kd = DistillationLoss(temperature=2.0, alpha=1.0)
    want = grad_of(kd(z, combine_members(torch.from_numpy(v), "mean-probs", 2.0), None)["loss"], z)
    draws = 600
    got = torch.stack(
        [
            grad_of(kd(z, targets(v, "sampled:4", "mean-probs", 2.0, seed), None)["loss"], z)
            for seed in range(draws)
        ]
    )
    # Unbiased: the mean over independent draws is within 4.5 standard errors of the dense
    # gradient for every class (a biased estimator, e.g. renormalised draws, is not).
    stderr = got.std(dim=0) / draws**0.5
    assert ((got.mean(dim=0) - want).abs() < 4.5 * stderr + 1e-6).all()
    assert (got.mean(dim=0) - want).abs().max() < 0.1 * want.abs().max()


def test_kept_logit_matching_with_k_equal_c_is_dense_logit_matching() -> None:
    v = member_logits(members=1)
    z = student()
    mse = LogitMatchingLoss(temperature=1.0, alpha=1.0)
    torch.testing.assert_close(
        mse(z, targets(v, f"topk:{C}", "mean-probs", 1.0), None)["loss"],
        mse(z, torch.from_numpy(v[0]), None)["loss"],
    )
    with pytest.raises(ConfigError, match="needs a dense or topk cache"):
        mse(z, targets(v, "sampled:3", "mean-probs", 1.0), None)


def test_sparse_row_gathers_and_joins_into_reused_space_equal_plain_indexing() -> None:
    """The loader's fast paths: a gather of row numbers (index_select, numpy or torch indices,
    repeats allowed) equals advanced indexing field by field; a join into reused tensors equals
    torch.cat, keeps using the same memory while the shape holds and replaces it when not."""
    tg = targets(member_logits(members=3, rows=10), "topk:4", "mean-probs", 2.0)
    rows = np.array([9, 2, 2, 0, 7])
    for picked in (tg[rows], tg[torch.from_numpy(rows)], tg.take(torch.from_numpy(rows))):
        for f in SparseTargets._ROW_FIELDS:
            assert torch.equal(getattr(picked, f), getattr(tg, f)[:, torch.from_numpy(rows)])
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 3]] = True
    assert torch.equal(tg[mask].logp, tg.logp[:, mask])  # a mask still selects by advanced indexing
    space: dict[str, torch.Tensor] = {}
    halves = [tg[torch.arange(5)], tg[torch.arange(5, 10)]]
    first = SparseTargets.cat(halves, space)
    memory = first.logp.data_ptr()
    assert all(torch.equal(getattr(first, f), getattr(tg, f)) for f in SparseTargets._ROW_FIELDS)
    again = SparseTargets.cat(halves[::-1], space)
    assert again.logp.data_ptr() == memory  # the same shape: written into the same tensors
    assert torch.equal(again.index, torch.cat([tg.index[:, 5:], tg.index[:, :5]], dim=1))
    shorter = SparseTargets.cat(halves[:1], space)
    assert shorter.logp.shape == (3, 5, 4) and torch.equal(shorter.values, tg.values[:, :5])


def test_sparse_targets_index_concatenate_and_move_like_a_tensor() -> None:
    v = member_logits(rows=6)
    tg = targets(v, "topk:4", "mean-probs", 2.0)
    assert len(tg) == 6 and tg.index.shape == (2, 6, 4)
    rows = torch.tensor([4, 0])
    picked = tg[rows]
    assert torch.equal(picked.index, tg.index[:, rows]) and len(picked) == 2
    both = cat_targets([tg[torch.arange(3)], tg[torch.arange(3, 6)]])
    assert all(torch.equal(getattr(both, f), getattr(tg, f)) for f in SparseTargets._ROW_FIELDS)
    assert tg.to("cpu").index.device.type == "cpu"
    dense_top = combine_members(torch.from_numpy(v), "mean-probs", 2.0).argmax(1)
    assert torch.equal(targets(v, f"topk:{C}", "mean-probs", 2.0).top_class(), dense_top)


def test_the_negative_kl_stop_needs_an_exact_temperature_and_enough_rows() -> None:
    """At a recorded T the estimate is unbiased, so a batch mean far below 0 is damage; at an
    interpolated T (the lse is overestimated, biasing it negative) or on a handful of rows it
    says nothing, and training goes on."""
    from pipeline.errors import CacheError

    rng = np.random.default_rng(0)
    c = 50
    logits = rng.normal(0, 2, (256, c)).astype(np.float32)
    logits[:, 0] += 10.0  # a peaked teacher: interpolation in 1/T is far off
    spec = StorageSpec.parse("sampled:16", c)
    arrays = spec.impl.encode(spec, logits, "float32", np.random.default_rng(1))
    student = torch.from_numpy(logits)  # a student equal to the teacher: KL = 0
    ok = sparse_rows([spec], [arrays], c, "mean-probs", 1.0)
    assert ok.exact and float(sparse_kl(student, ok, 1.0).mean()) == pytest.approx(0.0, abs=0.05)
    shifted = {**arrays, "lse": arrays["lse"].copy()}
    shifted["lse"][:, 0] += 3.0  # T = 1, the sampling temperature
    bad = sparse_rows([spec], [shifted], c, "mean-probs", 1.0)
    with pytest.raises(CacheError, match="KL estimate over a batch of 256 rows is -3"):
        sparse_kl(student, bad, 1.0)
    sparse_kl(student[:16], bad[:16], 1.0)  # too few rows for a verdict
    between = sparse_rows([spec], [arrays], c, "mean-probs", 3.0)
    assert not between.exact
    sparse_kl(student, between, 3.0)  # interpolated: biased, never refused
