"""The transform registry: explicit parameters, exact replay, draws keyed by (seed, id, view)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.augment import TRANSFORMS, ViewPlan, live_augment, parse_augment, view_uniforms
from pipeline.errors import ConfigError

SPECS = ["shift:2", "crop:pad=4", "flip", "rrc:scale=0.35,1", "crop:pad=4+flip", "rrc+flip"]


def images(n: int = 12, side: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, side, side)).astype(np.uint8)


@pytest.mark.parametrize("spec", SPECS)
def test_replay_is_exact_and_identity_is_the_input(spec: str) -> None:
    x = images()
    plan = ViewPlan.make(spec, 5, seed=3, include_identity=True, shape=(10, 10))
    ids = np.arange(100, 112)
    first, params = plan.inputs(x, ids)
    again, params2 = plan.inputs(x.copy(), ids)
    assert first.dtype == np.float32 and first.shape == (60, 1, 10, 10)
    assert first.tobytes() == again.tobytes() and params.tobytes() == params2.tobytes()
    # Replaying the stored parameters alone (no seed) rebuilds the same bytes.
    replayed = plan.augment_pipeline.apply(np.repeat(x, 5, axis=0), params.copy())
    assert replayed.tobytes() == first.tobytes()
    # View 0 is the unaugmented input, exactly; the other views are not all unchanged.
    assert np.array_equal(first[::5], x.astype(np.float32))
    assert not all(np.array_equal(first[i], first[i - i % 5]) for i in range(60))


def test_each_transform_means_what_its_parameters_say() -> None:
    x = images(1, 6)
    shift = parse_augment("shift:2")
    moved = shift.apply(x, np.array([[1, -2]], np.float32))[0, 0]
    assert np.array_equal(moved[1:, :4], x[0, 0, :5, 2:].astype(np.float32))  # down 1, left 2
    assert not moved[0].any() and not moved[:, 4:].any()  # zero fill
    crop = parse_augment("crop:pad=3").apply(x, np.array([[3, 3]], np.float32))
    assert np.array_equal(crop[0], x[0].astype(np.float32))  # the centred crop is the image
    flip = parse_augment("flip").apply(x, np.array([[1]], np.float32))
    assert np.array_equal(flip[0, 0], x[0, 0, :, ::-1].astype(np.float32))
    rrc = parse_augment("rrc").apply(x, np.array([[0, 0, 6, 6]], np.float32))
    assert np.array_equal(rrc[0], x[0].astype(np.float32))  # the whole box: bilinear is exact
    half = parse_augment("rrc").apply(x, np.array([[0, 0, 3, 3]], np.float32))[0, 0]
    assert half.min() >= x[0, 0, :3, :3].min() and half.max() <= x[0, 0, :3, :3].max()


def test_draws_depend_only_on_seed_id_and_view() -> None:
    plan = ViewPlan.make("rrc:scale=0.35,1+flip", 4, seed=7, include_identity=False, shape=(28, 28))
    ids = np.arange(1000)
    whole = plan.params(ids).reshape(1000, 4, -1)
    # Any subset (a shard, another worker's shards) draws the same views for its ids.
    part = plan.params(ids[[5, 999, 17]]).reshape(3, 4, -1)
    assert np.array_equal(part, whole[[5, 999, 17]])
    other_seed = ViewPlan.make(plan.augment, 4, seed=8, include_identity=False, shape=(28, 28))
    assert not np.array_equal(other_seed.params(ids), plan.params(ids))
    boxes = whole[..., :4].reshape(-1, 4)
    area = boxes[:, 2] * boxes[:, 3] / 28**2
    assert (boxes[:, 0] + boxes[:, 2] <= 28).all() and (boxes[:, 1] + boxes[:, 3] <= 28).all()
    assert area.min() > 0.3 and area.max() <= 1.0
    u = view_uniforms(0, np.arange(20000), 1, 2)
    assert 0.49 < u.mean() < 0.51 and u.min() >= 0 and u.max() < 1
    shifts = parse_augment("shift:2").draw(u.reshape(-1, 2), (8, 8))
    counts = np.bincount(shifts.astype(int).ravel() + 2)
    assert len(counts) == 5 and counts.min() > 0.18 * shifts.size


def test_canonical_text_round_trips_and_live_draws_are_seeded() -> None:
    for spec in SPECS:
        a = parse_augment(spec)
        assert parse_augment(a.text) == a
        assert len(a.params) == sum(len(t.PARAMS) for t in a.transforms)
    x = images(8)
    one, two = live_augment("shift:2", 0), live_augment("shift:2", 0)
    assert one(x).tobytes() == two(x).tobytes()
    assert set(TRANSFORMS) >= {"shift", "crop", "flip", "rrc"}


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("blur:2", "unknown transform 'blur'"),
        ("shift:x", "shift max='x' should be int"),
        ("rrc:scale=0.5", "should be 2 comma-separated numbers"),
        ("flip:q=1", "flip has no argument 'q'"),
        ("rrc:scale=0.8,0.2", "needs 0 < lo <= hi <= 1"),
    ],
)
def test_bad_specs_are_one_clear_message(spec: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_augment(spec)
    assert says in str(e.value)
