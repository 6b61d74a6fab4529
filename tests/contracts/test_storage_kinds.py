"""The contract every registered storage kind (``pipeline.cache.kinds.STORAGE_KINDS``) keeps.

The suite runs once per registered kind, at a small size (3 of 8 classes) and at full size (all
8), in float32 and float16, on seeded logits:

1. what ``encode`` makes is what ``arrays`` declares (names, widths, dtypes), and ``check`` finds
   nothing wrong with it;
2. the distribution the stored arrays stand for (``stored_probs``) is made of probabilities: rows
   of values in 0..1 summing to 1 at every recorded temperature. A *weighted* kind (``WEIGHTED``:
   importance-weighted draws, ``sampled``) stands for an unbiased estimate instead: probabilities
   at its sampling temperature, and at every recorded temperature a mean over seeded draws that
   approaches the teacher's distribution (one draw's estimate of a class may exceed 1);
3. the fidelity record is honest: a kind measures zero loss (KL and total variation) exactly when
   its stored distribution is the teacher's, and a *lossless* kind (dense, and top-k keeping every
   class) is such a kind, so ``topk:C`` stands for the same distribution as ``dense``;
4. a damaged row (a NaN in a float array, a class index out of range in an integer array) is
   named by the kind's ``check``.

A kind is named by its registry key; a sized kind (``SIZED``) is given as ``NAME:SIZE``.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cache.kinds import STORAGE_KINDS, StorageSpec, measure_fidelity

C = 8  # classes
ROWS = 40
DAMAGED_ROW = 7
SEEDS = 200  # seeded draws averaged for a weighted kind's estimate
LOSSLESS = {"dense", "topk"}  # kinds whose full-size spec stores the whole row exactly


def spec_of(kind: str, size: int) -> StorageSpec:
    """``kind``'s spec keeping ``size`` of the C classes (the size ignored for unsized kinds)."""
    text = f"{kind}:{size}" if STORAGE_KINDS[kind].SIZED else kind
    return StorageSpec.parse(text, C)


def logits(seed: int = 0) -> np.ndarray:
    """(ROWS, C) float32 seeded raw logits, spread like a confident teacher's."""
    return (np.random.default_rng(seed).normal(size=(ROWS, C)) * 3.0).astype(np.float32)


def softmax(v: np.ndarray, t: float) -> np.ndarray:
    z = v.astype(np.float64) / t
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def encoded(spec: StorageSpec, dtype: str = "float32", seed: int = 0) -> dict[str, np.ndarray]:
    """``spec``'s arrays for the seed-0 logits, its draws (if any) seeded by ``seed``."""
    return spec.impl.encode(spec, logits(), dtype, np.random.default_rng(seed))


def weighted(kind: str) -> bool:
    """Whether ``kind`` stores importance-weighted draws (an estimate of the distribution)."""
    # Before StorageKind.WEIGHTED existed, sampled was the one such kind.
    return bool(getattr(STORAGE_KINDS[kind], "WEIGHTED", kind == "sampled"))


@pytest.fixture(params=list(STORAGE_KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    """Each registered storage kind, by name."""
    return request.param


@pytest.fixture(params=[3, C], ids=["small", "full"])
def size(request: pytest.FixtureRequest) -> int:
    return request.param


class TestStorageKindContract:
    """What every storage kind keeps (see the module docstring)."""

    @pytest.mark.parametrize("dtype", ["float32", "float16"])
    def test_encode_makes_the_declared_arrays_and_check_is_clean(
        self, kind: str, size: int, dtype: str
    ) -> None:
        spec = spec_of(kind, size)
        arrays = encoded(spec, dtype)
        declared = spec.impl.arrays(spec, C, dtype)
        assert [name for name, _, _ in declared] == list(arrays)
        for name, width, dt in declared:
            assert arrays[name].shape == (ROWS, width), name
            assert arrays[name].dtype == np.dtype(dt), name
        assert spec.impl.check(spec, arrays, C) == []

    def test_stored_probabilities_are_probabilities(self, kind: str, size: int) -> None:
        spec = spec_of(kind, size)
        arrays = encoded(spec)
        exact_at = spec.temperatures if not weighted(kind) else (spec.sample_temperature,)
        for t in spec.temperatures:
            q = spec.impl.stored_probs(spec, arrays, C, t)
            assert q.shape == (ROWS, C)
            assert np.isfinite(q).all() and q.min() >= 0.0, t
            if t in exact_at:
                assert q.max() <= 1.0 + 1e-12, (t, q.max())
                assert np.allclose(q.sum(axis=1), 1.0, rtol=0, atol=1e-9), t

    def test_a_weighted_kind_is_an_unbiased_estimate(self, kind: str, size: int) -> None:
        if not weighted(kind):
            pytest.skip(f"{kind} stores probabilities, not an estimate")
        spec = spec_of(kind, size)
        v = logits()
        # Far above the sampling temperature the weights are heavy-tailed and the means converge
        # too slowly to test in a few hundred draws; up to twice it they are tested.
        near = [t for t in spec.temperatures if t <= 2 * (spec.sample_temperature or 1.0)]
        assert len(near) >= 2
        for t in near:
            # The same logits every time: only the seeded draws vary.
            q = np.stack(
                [spec.impl.stored_probs(spec, encoded(spec, seed=s), C, t) for s in range(SEEDS)]
            )
            assert abs(q.sum(axis=2).mean() - 1.0) < 0.02, t  # the mass averages to 1
            err = np.abs(q.mean(axis=0) - softmax(v, t)).mean()  # each class's to its probability
            assert err < 0.02, (t, err)

    def test_fidelity_reports_zero_loss_exactly_when_nothing_is_lost(
        self, kind: str, size: int
    ) -> None:
        spec = spec_of(kind, size)
        v = logits()
        arrays = encoded(spec)
        measured = measure_fidelity(spec, v, arrays, np.random.default_rng(0))
        for j, t in enumerate(spec.temperatures):
            q = spec.impl.stored_probs(spec, arrays, C, t)
            exact = np.allclose(q, softmax(v, t), rtol=0, atol=1e-9)
            kl_max, tv_max = measured[j, 2], measured[j, 6]
            assert (tv_max <= 1e-9) == exact, (t, tv_max)
            if exact:
                assert kl_max <= 1e-9, (t, kl_max)
            if kind in LOSSLESS and size == C:
                assert exact and tv_max <= 1e-9 and kl_max <= 1e-9, (t, kl_max, tv_max)

    def test_a_damaged_row_is_caught_by_check(self, kind: str, size: int) -> None:
        spec = spec_of(kind, size)
        clean = encoded(spec)
        for name, _, dt in spec.impl.arrays(spec, C, "float32"):
            arrays = {k: a.copy() for k, a in clean.items()}
            if np.issubdtype(np.dtype(dt), np.integer):
                arrays[name][DAMAGED_ROW] = C  # a class that does not exist
            else:
                arrays[name][DAMAGED_ROW] = np.nan
            problems = spec.impl.check(spec, arrays, C)
            assert problems, f"{kind}: {name} damaged in row {DAMAGED_ROW} passed check"
            assert any(f"[{DAMAGED_ROW}]" in p for p in problems), (name, problems)


def test_topk_of_every_class_stands_for_the_same_distribution_as_dense() -> None:
    dense, topk = spec_of("dense", C), spec_of("topk", C)
    d, k = encoded(dense), encoded(topk)
    assert dense.temperatures == topk.temperatures
    for t in dense.temperatures:
        want = dense.impl.stored_probs(dense, d, C, t)
        assert np.allclose(topk.impl.stored_probs(topk, k, C, t), want, rtol=0, atol=1e-12), t


def test_the_lossless_kinds_are_registered() -> None:
    assert set(STORAGE_KINDS) >= LOSSLESS
