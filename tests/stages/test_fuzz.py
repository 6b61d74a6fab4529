"""A fuzz test of every read command on damaged caches (issue 21, rule 5).

A small real cache (600 rows, 10 shards, 2 members) is mutated one object at a time — a byte
flipped, the object truncated, deleted, re-encoded, its JSON nested deeply, its chunk inflated to
a decompression bomb — as a directory, as a ``.zarr.zip`` bundle and on an S3 server, and every
read command runs on each mutant. Each run must end in one of two ways: exit 0 with exactly the
undamaged cache's results, or a refusal (exit 2, or ``cache verify``'s exit 1 listing problems)
with a message — never a Python traceback, and never exit 0 on data that changed.

The default suite tries a seeded sample of the mutations (``FUZZ_DEFAULT`` runs: 12 mutations as
a directory and a bundle, 6 on S3); ``-m slow`` tries all 75 mutations in the three locations
(225 runs of three commands each). The ids name the object and the damage.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from numcodecs import CRC32C, Zstd

from tests.helpers.cli import cli
from tests.helpers.damage import damaged

FUZZ_DEFAULT = 24  # mutations in the default suite (all of them run with -m slow)
TRAIN = [
    "--student",
    "mlp:16",
    "--epochs",
    "1",
    "--batch-size",
    "128",
    "--device",
    "cpu",
    "--quiet",
    "-T",
    "4",
]


# ------------------------------------------------------------------------------- the mutations
def flip(data: bytes, seed: int) -> bytes:
    if not data:
        return b"x"
    i = np.random.default_rng(seed).integers(len(data))
    return data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :]


def truncate(data: bytes, seed: int) -> bytes:
    return data[: len(data) // 2]


def reencode(data: bytes, seed: int) -> bytes:
    """The same content written another valid way: JSON re-indented, zstd at another level."""
    try:
        return json.dumps(json.loads(data), indent=4, sort_keys=True).encode()
    except ValueError:
        pass
    # A chunk is a zstd frame followed by zarr's crc32c of it (the last codec).
    try:
        raw = Zstd().decode(data[:-4])
    except RuntimeError:
        return data
    assert bytes(CRC32C().encode(data[:-4])) == data, "a chunk is zstd + crc32c"
    return bytes(CRC32C().encode(Zstd(level=19).encode(raw)))


def nest(data: bytes, seed: int) -> bytes:
    return b"[" * 100_000 + b"]" * 100_000


def inflate(data: bytes, seed: int) -> bytes:
    """A tiny object that decompresses to 256 MiB of zeros (with its size in the frame header)."""
    return Zstd(level=3).encode(bytes(256 << 20))


MUTATIONS: dict[str, Callable[[bytes, int], bytes]] = {
    "flip": flip,
    "truncate": truncate,
    "reencode": reencode,
    "nest": nest,
    "inflate": inflate,
}
DELETE = "delete"


def keys_of(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())


def cases(cache_keys: list[str]) -> list[tuple[str, str]]:
    out = []
    for key in cache_keys:
        is_json = key.endswith("zarr.json")
        for name in [*MUTATIONS, DELETE]:
            if name == "nest" and not is_json:
                continue
            if name == "inflate" and is_json:
                continue
            out.append((key, name))
    return out


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def baseline(cache_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What each read command gives on the undamaged cache."""
    tmp = tmp_path_factory.mktemp("fuzz-base")
    code, info = cli("cache", "info", str(cache_path), "--json")
    assert code == 0
    code, _ = cli("train-student", "--cache", str(cache_path), *TRAIN, "--out", str(tmp / "r"))
    assert code == 0
    metrics = json.loads((tmp / "r" / "metrics.json").read_text())
    return {"info": json.loads(info), "test": metrics["metrics"]["test"]}


def mutate(cache_path: Path, where: Path, key: str, how: str, kind: str) -> Path | str:
    """A copy of the cache with ``key`` damaged by ``how``: a directory, a bundle or an S3 URL."""

    def damage(root: Path) -> None:
        target = root / key
        if how == DELETE:
            target.unlink()
        else:
            target.write_bytes(MUTATIONS[how](target.read_bytes(), seed=len(key)))

    return damaged(cache_path, where, kind, damage, name="cache")


def changed(cache_path: Path, key: str, how: str) -> bool:
    """Whether the mutation changes what the cache holds (a re-encoding does not)."""
    return how != "reencode"


SIZE_FIELDS = ("bytes_per_row_on_disk", "ratio_to_dense")  # what damage to the bytes may change


def _content(value: object) -> object:
    """What ``cache info`` says about the content: members without their measured sizes."""
    if isinstance(value, list):
        return [
            {k: v for k, v in m.items() if k not in SIZE_FIELDS} if isinstance(m, dict) else m
            for m in value
        ]
    return value


def check_cache(location: str, base: dict, damaged: bool, tmp: Path, extra: tuple = ()) -> None:
    code, out = cli("cache", "info", location, "--json", *extra)
    if code == 0:
        info = json.loads(out)
        for k in ("n", "num_classes", "members", "dataset", "shards_done", "complete"):
            assert _content(info[k]) == _content(base["info"][k]), (
                f"cache info exit 0 with a different {k}"
            )
    else:
        assert code == 2 and "error:" in out, out
    code, out = cli("cache", "verify", location, "--quiet", *extra)
    assert code in (0, 1, 2), out
    if damaged:
        assert code != 0, f"cache verify said OK on a damaged cache:\n{out}"
    code, out = cli("train-student", "--cache", location, *TRAIN, "--out", str(tmp / "run"), *extra)
    if code == 0:  # only when what it read is intact: then it must be exactly the baseline
        got = json.loads((tmp / "run" / "metrics.json").read_text())["metrics"]["test"]
        assert got["errors"] == base["test"]["errors"]
        assert got["nll"] == pytest.approx(base["test"]["nll"], rel=1e-6)
    else:
        assert code == 2 and "error:" in out, out
        assert not (tmp / "run" / "student.pt").exists()


def _sampled(all_cases: list, n: int) -> list:
    rng = np.random.default_rng(0)
    pick = set(rng.choice(len(all_cases), size=min(n, len(all_cases)), replace=False).tolist())
    return [
        pytest.param(*c, marks=() if i in pick else pytest.mark.slow, id=f"{c[0]}:{c[1]}")
        for i, c in enumerate(all_cases)
    ]


def _keys_for_collection() -> list[str]:
    """The objects of a 10-shard, 2-member cache (the layout the ``cache_path`` fixture makes)."""
    keys = ["zarr.json", "ids/zarr.json", "labels/zarr.json", "ids/c/0", "labels/c/3"]
    for m in (0, 1):
        keys += [
            f"members/{m}/zarr.json",
            f"members/{m}/logits/zarr.json",
            f"members/{m}/logits/c/{3 * m}/0",
            f"members/{m}/done/zarr.json",
            f"members/{m}/done/c/0",
        ]
    return keys


ALL_CASES = cases(_keys_for_collection())


@pytest.mark.parametrize("kind", ["dir", "zip"])
@pytest.mark.parametrize("key,how", _sampled(ALL_CASES, FUZZ_DEFAULT // 2))
def test_read_commands_on_a_damaged_cache(
    cache_path: Path,
    baseline: dict,
    tmp_path: Path,
    key: str,
    how: str,
    kind: str,
    one_torch_thread: None,
) -> None:
    if not (cache_path / key).exists():
        pytest.skip(f"{key} is not an object of this cache")
    location = mutate(cache_path, tmp_path, key, how, kind)
    check_cache(str(location), baseline, changed(cache_path, key, how), tmp_path)


@pytest.mark.parametrize("key,how", _sampled(ALL_CASES, FUZZ_DEFAULT // 4))
def test_read_commands_on_a_damaged_s3_cache(
    cache_path: Path,
    baseline: dict,
    tmp_path: Path,
    s3_server: str,
    key: str,
    how: str,
    one_torch_thread: None,
) -> None:
    if not (cache_path / key).exists():
        pytest.skip(f"{key} is not an object of this cache")
    location = mutate(cache_path, tmp_path, key, how, "s3")
    check_cache(str(location), baseline, changed(cache_path, key, how), tmp_path)


def test_the_fuzz_cases_cover_every_kind_of_damage() -> None:
    kinds = {how for _, how in ALL_CASES}
    assert kinds == {*MUTATIONS, DELETE}
    # 9 metadata objects x 5 damages + 6 chunks x 5 damages, each as a directory and a bundle
    assert len(ALL_CASES) == 75
