"""Storage kinds of cache format 2 (pipeline/cache/kinds.py): encoding, checks, fidelity, bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.cache.builtin_kinds import sampled_weights
from pipeline.cache.kind_maths import index_dtype, logsumexp, lse_at
from pipeline.cache.kinds import (
    AUTO_DENSE_MAX_CLASSES,
    StorageSpec,
    bytes_per_row,
    measure_fidelity,
    summarise_fidelity,
)

C = 50


def logits(rows: int = 40, c: int = C, scale: float = 3.0, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, c)) * scale).astype(np.float32)


def softmax(v: np.ndarray, t: float) -> np.ndarray:
    z = v.astype(np.float64) / t
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def encode(text: str, v: np.ndarray, dtype: str = "float32", seed: int = 0) -> tuple:
    spec = StorageSpec.parse(text, v.shape[1])
    return spec, spec.impl.encode(spec, v, dtype, np.random.default_rng(seed))


# ------------------------------------------------------------------------------------------ specs
def test_parse_resolves_auto_by_classes_and_refuses_what_is_not_a_kind() -> None:
    assert StorageSpec.parse("auto", 10).text == "dense"
    assert StorageSpec.parse("auto", AUTO_DENSE_MAX_CLASSES).text == "dense"
    assert StorageSpec.parse("auto", AUTO_DENSE_MAX_CLASSES + 1).text == "topk:64"
    assert StorageSpec.parse("topk:500", 10).size == 10  # K is at most C
    s = StorageSpec.parse("sampled:12", 100, (1.0, 4.0), sample_temperature=2.0)
    assert s.temperatures == (1.0, 2.0, 4.0) and s.sample_temperature == 2.0
    assert StorageSpec.from_dict(s.to_dict()) == s
    assert StorageSpec.from_dict(None).text == "dense"  # a format 1 member
    for bad, says in [
        ("topk", "integer"),
        ("topk:x", "integer"),
        ("topk:0", ">= 1"),
        ("dense:3", "takes no size"),
        ("sparse:3", "expected one of auto, dense, topk:K, sampled:S"),
    ]:
        with pytest.raises(ValueError, match=says):
            StorageSpec.parse(bad, 100)


def test_index_dtype_is_the_smallest_that_holds_every_class() -> None:
    assert [index_dtype(c) for c in (10, 256, 257, 65536, 65537, 151_936)] == [
        "uint8",
        "uint8",
        "uint16",
        "uint16",
        "uint32",
        "uint32",
    ]


def test_bytes_per_row_at_the_issue_class_counts() -> None:
    """The byte figures the README quotes (raw, before zstd)."""
    rows = {
        c: [
            bytes_per_row(StorageSpec.parse(s, c), c, "float16")
            for s in ("dense", "topk:20", "sampled:12")
        ]
        for c in (10, 1000, 32000)
    }
    # dense 2C; topk 20 x (2 + index) + 5 x 4 tail; sampled 12 x (2 + index) + 5 x 4 (Ts = 1 is one)
    assert rows == {10: [20, 50, 56], 1000: [2000, 100, 68], 32000: [64000, 100, 68]}


# ------------------------------------------------------------------------------------------- top-k
def test_topk_keeps_the_k_largest_sorted_and_the_exact_tail_at_each_temperature() -> None:
    v = logits()
    spec, a = encode("topk:7", v)
    assert a["values"].shape == (40, 7) and a["indices"].dtype == np.uint8
    order = np.argsort(-v, axis=1, kind="stable")[:, :7]
    assert np.array_equal(a["indices"], order)
    assert np.array_equal(a["values"], np.take_along_axis(v, order, axis=1))
    for j, t in enumerate(spec.temperatures):
        rest = v.astype(np.float64).copy()
        np.put_along_axis(rest, order, -np.inf, axis=1)
        brute = np.log(np.exp(rest / t).sum(axis=1))
        np.testing.assert_allclose(a["tail_lse"][:, j], brute, rtol=1e-6)
    assert spec.impl.check(spec, a, C) == []


def test_topk_with_k_equal_c_is_dense_and_has_no_tail() -> None:
    v = logits()
    spec, a = encode(f"topk:{C}", v)
    assert np.isneginf(a["tail_lse"]).all()
    for t in spec.temperatures:
        np.testing.assert_allclose(spec.impl.stored_probs(spec, a, C, t), softmax(v, t), atol=1e-9)
    assert spec.impl.check(spec, a, C) == []


def test_topk_stored_distribution_is_exact_on_the_buckets() -> None:
    """At a recorded T, kept probabilities and the tail mass equal the full row's."""
    v = logits()
    spec, a = encode("topk:5", v)
    for t in spec.temperatures:
        p, q = softmax(v, t), spec.impl.stored_probs(spec, a, C, t)
        idx = a["indices"].astype(np.int64)
        np.testing.assert_allclose(
            np.take_along_axis(q, idx, 1), np.take_along_axis(p, idx, 1), rtol=1e-6
        )
        np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-9)


def test_check_finds_what_the_writer_never_stores() -> None:
    v = logits()
    spec, a = encode("topk:5", v)
    broken = {k: x.copy() for k, x in a.items()}
    broken["indices"][3, 1] = 60
    assert "indices outside 0..49 in rows [3]" in " ".join(spec.impl.check(spec, broken, C))
    broken = {k: x.copy() for k, x in a.items()}
    broken["values"][4, [0, 1]] = broken["values"][4, [1, 0]]
    assert spec.impl.check(spec, broken, C) == ["values are not sorted descending in rows [4]"]
    broken = {k: x.copy() for k, x in a.items()}
    broken["indices"][5, 2] = broken["indices"][5, 0]
    assert spec.impl.check(spec, broken, C) == ["indices repeat a class within rows [5]"]
    broken = {k: x.copy() for k, x in a.items()}
    broken["tail_lse"][6, 0] += 5.0  # a tail heavier than any C - K classes below v_K can be
    assert "tail_lse is larger than the kept values allow" in spec.impl.check(spec, broken, C)[0]
    broken = {k: x.copy() for k, x in a.items()}
    broken["tail_lse"][7, 2] = np.nan
    assert spec.impl.check(spec, broken, C) == ["tail_lse holds NaN/inf in rows [7]"]


# --------------------------------------------------------------------------------------- sampled
def test_sampled_draws_are_seeded_sorted_and_follow_the_teacher() -> None:
    v = logits(rows=2000, c=8, scale=1.5)
    spec, a = encode("sampled:16", v, seed=3)
    _, again = encode("sampled:16", v, seed=3)
    assert all(np.array_equal(a[k], again[k]) for k in a)
    assert (np.diff(a["indices"].astype(int), axis=1) >= 0).all()
    np.testing.assert_array_equal(a["values"], np.take_along_axis(v, a["indices"].astype(int), 1))
    # Draw frequencies match p at the sampling temperature (1): 32,000 draws, 8 classes.
    freq = np.stack([(a["indices"] == c).mean(axis=1) for c in range(8)], axis=1)
    assert np.abs(freq.mean(axis=0) - softmax(v, 1.0).mean(axis=0)).max() < 0.01
    np.testing.assert_allclose(a["lse"][:, 0], logsumexp(v.astype(np.float64)), rtol=1e-6)
    assert spec.impl.check(spec, a, 8) == []


def test_sampled_weights_are_unbiased_for_the_distribution_at_any_recorded_t() -> None:
    """E[sum of the weights on class i] = p_T(i), also at T != Ts (importance weights)."""
    v = logits(rows=1, c=6, scale=1.0)
    for t in (1.0, 4.0):
        est = np.zeros(6)
        for seed in range(2000):
            spec, a = encode("sampled:4", v, seed=seed)
            w = sampled_weights(spec, a, t, 6)
            np.add.at(est, a["indices"][0].astype(int), w[0])
        np.testing.assert_allclose(est / 2000, softmax(v, t)[0], atol=0.02)


# ------------------------------------------------------------------------------- temperatures
def test_lse_at_is_exact_at_recorded_temperatures_and_close_between_them() -> None:
    v = logits(scale=2.0).astype(np.float64)
    temps = (1.0, 2.0, 4.0, 8.0, 20.0)
    lse = np.stack([logsumexp(v / t) for t in temps], axis=1)
    exact, is_exact = lse_at(lse, temps, 4.0, C)
    assert is_exact and np.array_equal(exact, lse[:, 2])
    for t in (3.0, 6.0, 12.0, 100.0):
        got, is_exact = lse_at(lse, temps, t, C)
        assert not is_exact
        assert np.abs(got - logsumexp(v / t)).max() < 0.05  # convex in 1/T: chords are close
    # Infinite temperature: every class weighs 1.
    far, _ = lse_at(lse, temps, 1e12, C)
    np.testing.assert_allclose(far, math.log(C), rtol=1e-6)


# ------------------------------------------------------------------------------------- fidelity
def test_fidelity_is_zero_for_lossless_storage_and_the_exact_kl_for_topk() -> None:
    v = logits()
    spec, a = encode("dense", v, "float32")
    fid = summarise_fidelity(spec, measure_fidelity(spec, v, a, np.random.default_rng(0))[None])
    assert fid["rows"] == 40 and max(fid["kl_max"]) < 1e-12 and fid["kept_mass_min"] == [1.0] * 5
    spec, a = encode("topk:5", v)
    per = measure_fidelity(spec, v, a, np.random.default_rng(0))
    j = spec.temperatures.index(1.0)
    p = softmax(v, 1.0)
    q = spec.impl.stored_probs(spec, a, C, 1.0)
    kl = (p * (np.log(p) - np.log(q))).sum(axis=1)
    assert per[j, 0] == 40
    np.testing.assert_allclose(per[j, 1], kl.sum(), rtol=1e-6)
    np.testing.assert_allclose(per[j, 2], kl.max(), rtol=1e-6)
    kept = np.take_along_axis(p, a["indices"].astype(int), 1).sum(axis=1)
    np.testing.assert_allclose([per[j, 3], per[j, 4]], [kept.sum(), kept.min()], rtol=1e-6)
    # Higher temperatures spread mass into the tail: less kept, here also lower KL per row.
    fid = summarise_fidelity(spec, per[None])
    assert fid["kept_mass_mean"] == sorted(fid["kept_mass_mean"], reverse=True)
    spec, a = encode("sampled:8", v)
    fid = summarise_fidelity(spec, measure_fidelity(spec, v, a, np.random.default_rng(0))[None])
    assert fid["kl_mean"] == [None] * 5 and 0 < fid["kept_mass_mean"][0] < 1


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("ts", [1.0, 20.0])
def test_what_the_writer_stores_passes_every_read_time_check(dtype: str, ts: float) -> None:
    """No false refusal: rows of many scales and offsets, extreme recorded temperatures, draws
    that cover almost all the mass (each stored value rounded, all weighing alike at T = 20)."""
    rng = np.random.default_rng(0)
    for c, scale, offset in ((3, 0.01, 0.0), (10, 1.0, -50.0), (10, 10.0, 40.0), (300, 3.0, 0.0)):
        logits = (rng.normal(0, scale, (64, c)) + offset).astype(np.float32)
        logits[0] = np.log(np.array([0.95] + [0.05 / (c - 1)] * (c - 1)))
        for temps in ((1.0, 2.0, 4.0, 8.0, 20.0), (0.01, 1.0, 1000.0)):
            for text in ("sampled:256", "sampled:4", f"topk:{min(4, c)}", f"topk:{c}"):
                spec = StorageSpec.parse(text, c, temps, ts)
                arrays = spec.impl.encode(spec, logits, dtype, np.random.default_rng(1))
                assert spec.impl.check(spec, arrays, c) == [], (c, scale, offset, temps, text)


def test_edited_log_sum_exps_break_the_curve_checks() -> None:
    """A sampled row's lse at an interior temperature raised, or the columns reordered: the
    recorded values are no longer one convex curve in 1/T."""
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (32, 20)).astype(np.float32)
    spec = StorageSpec.parse("sampled:8", 20)
    arrays = spec.impl.encode(spec, logits, "float16", np.random.default_rng(0))
    raised = {**arrays, "lse": arrays["lse"].copy()}
    raised["lse"][:, 2] += 3.0  # T = 4
    assert any("not convex in 1/T" in p for p in spec.impl.check(spec, raised, 20))
    flipped = {**arrays, "lse": arrays["lse"][:, ::-1].copy()}
    assert spec.impl.check(spec, flipped, 20)
