"""Semantic damage to every kind of row, as a careless script or a bad writer would make it.

``test_fuzz.py`` damages the bytes of a cache (checksums catch those). Here the arrays and the
header are edited *with zarr itself*, so every chunk is valid: top-k, sampled, token and view
caches, each edit one row or one header field. Each case runs ``cache verify`` and
``train-student`` (and ``cache verify --replay`` where only the teacher's full logits can tell),
as a directory; a seeded sample also as a ``.zarr.zip`` bundle and on an S3 server (all of them
with ``-m slow``). The rules:

- a ``read`` case is refused by ``verify`` (exit 1, naming the damage) and by ``train-student``
  (exit 2, one message, no traceback, no checkpoint written);
- a ``replay`` case passes the read-time checks (it contradicts nothing in the row itself) but is
  named by ``verify --replay``;
- in every case, ``train-student`` never exits 0 on a cache that ``verify`` flags.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.helpers.caches import kind_caches
from tests.helpers.cli import cli
from tests.helpers.damage import Damage, add, damaged, edit, header, put

pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]

IMAGE_TRAIN = ["--student", "mlp:16", "--epochs", "1", "--batch-size", "128", "--device", "cpu"]
TOKEN_TRAIN = [
    *("--student", "gpt:layers=1,dim=8,heads=2,ctx=16", "--epochs", "1", "--batch-size", "16"),
    *("--device", "cpu"),
]


# ------------------------------------------------------------------------------------ the caches
@pytest.fixture(scope="module")
def caches(
    tmp_path_factory: pytest.TempPathFactory,
    teacher_dir: Path,
    npz_path: Path,
    one_torch_thread: None,
) -> dict[str, dict]:
    """One small cache of each row kind: {kind: {path, teacher, train args}}."""
    made = kind_caches(tmp_path_factory.mktemp("rows"), teacher_dir, npz_path)
    return {
        k: {**c, "train": TOKEN_TRAIN if k == "tokens" else IMAGE_TRAIN} for k, c in made.items()
    }


# ---------------------------------------------------------------------------------- the damage
def _swap_rows(a: np.ndarray, i: int, j: int) -> None:
    a[[i, j]] = a[[j, i]]


def _repeat_class(a: np.ndarray) -> None:
    a[5, 1] = a[5, 0]


def _unsort_values(a: np.ndarray) -> None:
    row = int(np.flatnonzero(a[:, 0] > a[:, 1])[0])
    a[row] = a[row, ::-1]


def _unsort_indices(a: np.ndarray) -> None:
    row = int(np.flatnonzero(a[:, 0] < a[:, -1])[0])
    a[row] = a[row, ::-1]


def _column(h: dict, t: float) -> int:
    return h["members"][0]["storage"]["temperatures"].index(t)


def _reverse_temperatures(h: dict) -> None:
    for m in h["members"]:
        m["storage"]["temperatures"] = m["storage"]["temperatures"][::-1]


def _lse_plus(t: float, delta: float) -> Damage:
    """``lse[:, column of T] += delta`` on member 0 of a sampled cache (T's column looked up)."""

    def apply(root: Path) -> None:
        g = zarr.open_group(str(root), mode="r", use_consolidated=False)
        j = _column(dict(g.attrs["kd_cache"]), t)
        edit("members/0/lse", lambda a: a.__setitem__((slice(None), j), a[:, j] + delta))(root)

    return apply


def _shift_param(value_from: float, value_to: float) -> Damage:
    def change(a: np.ndarray) -> None:
        row = int(np.flatnonzero(a[:, 0] == value_from)[0])
        a[row, 0] = value_to

    return edit("view_params", change)


# (kind, name, damage, what catches it)
CASES: list[tuple[str, str, Damage, str]] = [
    ("topk", "indices-repeat", edit("members/0/indices", _repeat_class), "read"),
    ("topk", "values-unsorted", edit("members/1/values", _unsort_values), "read"),
    ("topk", "tail-above-bound", add("members/0/tail_lse", 7, 50), "read"),
    ("topk", "tail-neg-inf", put("members/0/tail_lse", (9, 0), -np.inf), "read"),
    ("topk", "temperatures-reordered", header(_reverse_temperatures), "read"),
    ("topk", "tail-minus-5", edit("members/0/tail_lse", lambda a: a.__isub__(5)), "replay"),
    ("sampled", "indices-unsorted", edit("members/0/indices", _unsort_indices), "read"),
    ("sampled", "lse-below-draw", put("members/0/lse", 11, -40.0), "read"),
    ("sampled", "values-shifted", add("members/1/values", 3, 30), "read"),
    ("sampled", "lse-T4-plus-3", _lse_plus(4.0, 3.0), "read"),
    ("sampled", "lse-T1-plus-3", _lse_plus(1.0, 3.0), "replay"),
    ("sampled", "temperatures-reordered", header(_reverse_temperatures), "read"),
    (
        "sampled",
        "sample-temperature-4",
        header(lambda h: h["members"][0]["storage"].__setitem__("sample_temperature", 4.0)),
        "replay",
    ),
    ("tokens", "row-start-swapped", edit("row_start", lambda a: _swap_rows(a, 1, 2)), "read"),
    ("tokens", "row-start-plus-1", add("row_start", 3, 1), "read"),
    ("tokens", "row-start-minus-3", put("row_start", 3, -3), "read"),
    ("tokens", "row-start-huge", put("row_start", 3, 10**9), "read"),
    ("tokens", "row-count-zero", put("row_count", 0, 0), "read"),
    ("tokens", "tail-above-bound", add("members/0/tail_lse", 4, 50), "read"),
    (
        "views",
        "dense-storage-size",
        header(lambda h: h["members"][0]["storage"].__setitem__("size", 7)),
        "read",
    ),
    ("views", "shift-2-made-1", _shift_param(2.0, 1.0), "read"),
    ("views", "shift-made-half", _shift_param(-2.0, 0.5), "read"),
    ("views", "shift-out-of-range", _shift_param(1.0, 100.0), "read"),
    ("views", "flip-made-2", put("view_params", (1, 2), 2.0), "read"),
    ("views", "no-augment-record", header(lambda h: h.pop("augment")), "read"),
    (
        "views",
        "views-in-header-3",
        header(lambda h: h["rows"].update(views=3, per_shard=150, n=1800)),
        "read",
    ),
]


def check(caches: dict, tmp: Path, kind: str, damage: Damage, caught: str, location: str) -> None:
    c = caches[kind]
    where = str(damaged(c["path"], tmp, location, damage, name="cache"))
    v_code, v_out = cli("cache", "verify", where, "--quiet")
    assert v_code in (0, 1, 2), v_out
    assert "Traceback" not in v_out
    run = tmp / "run"
    t_code, t_out = cli("train-student", "--cache", where, *c["train"], "--out", str(run))
    assert "Traceback" not in t_out
    if v_code != 0:  # never exit 0 on a cache that verify flags
        assert t_code == 2 and "error:" in t_out, t_out
        assert not (run / "student.pt").exists()
    if caught == "read":
        assert v_code != 0, f"verify passed a damaged cache:\n{v_out}"
        return
    assert v_code == 0, v_out  # the row itself is consistent: only the teacher can tell
    r_code, r_out = cli(
        *("cache", "verify", where, "--quiet", "--replay", "400", "--teacher", str(c["teacher"]))
    )
    assert r_code == 1 and "replay:" in r_out, r_out
    assert "Traceback" not in r_out


def _params() -> list:
    rng = np.random.default_rng(3)
    elsewhere = set(rng.choice(len(CASES), size=4, replace=False).tolist())
    out = []
    for i, (kind, name, damage, caught) in enumerate(CASES):
        for location in ("dir", "zip", "s3"):
            slow = location != "dir" and i not in elsewhere
            marks = [pytest.mark.slow] if slow else []
            out.append(
                pytest.param(
                    kind, damage, caught, location, marks=marks, id=f"{kind}:{name}:{location}"
                )
            )
    return out


@pytest.mark.parametrize("kind,damage,caught,location", _params())
def test_semantic_damage_never_trains_silently(
    caches: dict,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    kind: str,
    damage: Damage,
    caught: str,
    location: str,
) -> None:
    if location == "s3":
        request.getfixturevalue("s3_server")
    check(caches, tmp_path, kind, damage, caught, location)


def test_every_row_kind_is_damaged() -> None:
    kinds = {k for k, *_ in CASES}
    assert kinds == {"topk", "sampled", "tokens", "views"}
    assert {c for *_, c in CASES} == {"read", "replay"}


def test_a_negative_sampled_kl_estimate_stops_training(caches: dict, tmp_path: Path) -> None:
    """``lse`` at the sampling temperature shifted up: every row is still self-consistent (only the
    replay can see it), but training at that T gets KL estimates near -3 and must stop."""
    c = caches["sampled"]
    args = [*c["train"], "-T", "1", "--epochs", "2"]
    code, out = cli("train-student", "--cache", str(c["path"]), *args, "--out", str(tmp_path / "a"))
    assert code == 0, out  # the undamaged cache: estimates are noisy, never refused
    where = str(damaged(c["path"], tmp_path / "d", "dir", _lse_plus(1.0, 3.0), name="cache"))
    code, out = cli("train-student", "--cache", where, *args, "--out", str(tmp_path / "b"))
    assert code == 2 and "sampled member 0's KL estimate over a batch" in out, out
    assert "never negative" in out and "Traceback" not in out
    assert not (tmp_path / "b" / "student.pt").exists()
