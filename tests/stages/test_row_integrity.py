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

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from stages.cli import main
from tests.conftest import S3_BUCKET

pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]

IMAGE_TRAIN = ["--student", "mlp:16", "--epochs", "1", "--batch-size", "128", "--device", "cpu"]
TOKEN_TRAIN = [
    *("--student", "gpt:layers=1,dim=8,heads=2,ctx=16", "--epochs", "1", "--batch-size", "16"),
    *("--device", "cpu"),
]


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(res.exception))
        pytest.fail(f"kd-pipeline {' '.join(args)} raised instead of refusing:\n{tb}")
    return res.exit_code, res.output


# ------------------------------------------------------------------------------------ the caches
@pytest.fixture(scope="module")
def caches(
    tmp_path_factory: pytest.TempPathFactory,
    teacher_dir: Path,
    npz_path: Path,
    one_torch_thread: None,
) -> dict[str, dict]:
    """One small cache of each row kind: {kind: {path, teacher, train args}}."""
    root = tmp_path_factory.mktemp("rows")
    image = ["--teacher", str(teacher_dir), "--dataset", f"npz:{npz_path}:train"]
    made = {
        "topk": [*image, "--store", "topk:2", "--rows-per-shard", "128"],
        "sampled": [*image, "--store", "sampled:3", "--rows-per-shard", "128"],
        "views": [*image, "--views", "4", "--augment", "shift:2+flip", "--rows-per-shard", "50"],
    }
    out = {}
    for kind, args in made.items():
        path = root / f"{kind}.zarr"
        code, output = cli("cache-logits", *args, "--out", str(path), "--device", "cpu", "--quiet")
        assert code == 0, output
        out[kind] = {"path": path, "teacher": teacher_dir, "train": IMAGE_TRAIN}
    # A token cache: a 1-layer gpt teacher over a small seeded corpus.
    from tests.pipeline.test_sequences import make_corpus

    corpus = make_corpus(root / "c.txt")
    spec = f"text:{corpus}:train:seq=16:count=40"
    gpt = "gpt:layers=1,dim=16,heads=2,ctx=16"
    code, output = cli(
        *("train-teacher", "--dataset", spec, "--model", gpt, "--members", "1", "--epochs", "1"),
        *("--batch-size", "16", "--eval", "", "--out", str(root / "gpt"), "--device", "cpu"),
    )
    assert code == 0, output
    path = root / "tokens.zarr"
    code, output = cli(
        *("cache-logits", "--teacher", str(root / "gpt"), "--dataset", spec),
        *("--store", "topk:4", "--rows-per-shard", "8", "--out", str(path), "--quiet"),
    )
    assert code == 0, output
    out["tokens"] = {"path": path, "teacher": root / "gpt", "train": TOKEN_TRAIN}
    return out


# ---------------------------------------------------------------------------------- the damage
Damage = Callable[[Path], None]


def edit(array: str, change: Callable[[np.ndarray], None]) -> Damage:
    """Rewrite a whole array after ``change`` edits it in place (valid chunks: zarr writes)."""

    def apply(root: Path) -> None:
        arr = zarr.open_group(str(root), mode="r+", use_consolidated=False)[array]
        a = arr[...]
        change(a)
        arr.with_config({"write_empty_chunks": True})[...] = a

    return apply


def header(change: Callable[[dict], None]) -> Damage:
    def apply(root: Path) -> None:
        g = zarr.open_group(str(root), mode="r+", use_consolidated=False)
        h = json.loads(json.dumps(dict(g.attrs["kd_cache"])))
        change(h)
        g.attrs["kd_cache"] = h

    return apply


def _set(a: np.ndarray, index: tuple, value: object) -> None:
    a[index] = value


def put(array: str, index: tuple | int, value: object) -> Damage:
    """``array[index] = value``."""
    return edit(array, lambda a: _set(a, index, value))


def add(array: str, row: int, delta: float) -> Damage:
    """``array[row] += delta``."""
    return edit(array, lambda a: _set(a, row, a[row] + delta))


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


def damaged_copy(src: Path, tmp: Path, damage: Damage, location: str) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    work = tmp / "cache.zarr"
    shutil.copytree(src, work)
    damage(work)
    if location == "dir":
        return str(work)
    if location == "zip":
        bundle = tmp / "cache.zarr.zip"
        with zipfile.ZipFile(bundle, "w") as z:
            for p in sorted(work.rglob("*")):
                if p.is_file():
                    z.write(p, p.relative_to(work).as_posix())
        return str(bundle)
    import boto3

    prefix = f"rows/{tmp.name}/cache.zarr"
    client = boto3.client("s3")
    for p in sorted(work.rglob("*")):
        if p.is_file():
            client.put_object(
                Bucket=S3_BUCKET, Key=f"{prefix}/{p.relative_to(work)}", Body=p.read_bytes()
            )
    return f"s3://{S3_BUCKET}/{prefix}"


def check(caches: dict, tmp: Path, kind: str, damage: Damage, caught: str, location: str) -> None:
    c = caches[kind]
    where = damaged_copy(c["path"], tmp, damage, location)
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
    where = damaged_copy(c["path"], tmp_path / "d", _lse_plus(1.0, 3.0), "dir")
    code, out = cli("train-student", "--cache", where, *args, "--out", str(tmp_path / "b"))
    assert code == 2 and "sampled member 0's KL estimate over a batch" in out, out
    assert "never negative" in out and "Traceback" not in out
    assert not (tmp_path / "b" / "student.pt").exists()
