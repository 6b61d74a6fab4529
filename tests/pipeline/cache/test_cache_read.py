"""Reading a cache (``pipeline.cache.read.LogitCache``) on real stores on disk: damaged chunks
named, read-time integrity checks (missing chunks, done flags, non-finite logits, labels, arrays
unlike the header), what is not a cache, and reading without torch.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache.header import ATTR_KEY, FORMAT_VERSION
from pipeline.cache.lookup import read_header
from pipeline.cache.read import LogitCache
from pipeline.cache.read_checks import MissingChunkError
from pipeline.datasets import load_dataset
from pipeline.errors import CacheError
from tests.helpers.process import REPO
from tests.helpers.writer import (
    RPS,
    ids_in,
    make,
    set_complete_flag,
    snapshot,
)

# pytest resets the warning filters pipeline.cache installs; these two are expected and harmless.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]


# ------------------------------------------------------------------------------------ 5. corruption
def test_corrupt_chunk_is_named(cache_copy: Path) -> None:
    chunk = cache_copy / "members/0/logits/c/3/0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    cache = LogitCache(cache_copy)  # opening reads no chunk data
    with pytest.raises(CacheError) as e:
        cache.read_logits(3)
    msg = str(e.value)
    assert "'members/0/logits'" in msg and "chunk (3, 0)" in msg and "corrupted" in msg
    # Other chunks, and the other member's same shard, still read.
    assert cache.read_logits(2).shape == (2, RPS, 5)
    assert cache.read_logits(3, members=[1]).shape == (1, RPS, 5)


def test_truncated_chunk_is_named(cache_copy: Path) -> None:
    chunk = cache_copy / "members/1/logits/c/9/0"
    chunk.write_bytes(chunk.read_bytes()[:5])
    with pytest.raises(CacheError, match=r"chunk \(9, 0\) of array 'members/1/logits'"):
        LogitCache(cache_copy).read_logits(9)


# ----------------------------------------------------------------------- 8b. read-time integrity
def test_a_missing_data_chunk_is_an_error_never_the_fill_value(cache_copy: Path) -> None:
    for key in ("members/1/logits/c/4/0", "labels/c/6", "ids/c/9"):
        (cache_copy / key).unlink()
    cache = LogitCache(cache_copy)  # opening reads no data chunk
    with pytest.raises(MissingChunkError, match="member 1's logits, shard 4: rows 256..319") as e:
        cache.read_logits(4)
    assert e.value.key == "members/1/logits/c/4/0"
    assert cache.read_logits(4, members=[0]).shape == (1, RPS, 5)  # member 0's shard is there
    with pytest.raises(MissingChunkError, match=r"chunk labels/c/6 \(labels, shard 6"):
        cache.read_labels(6)
    with pytest.raises(MissingChunkError, match="chunk labels/c/6"):
        cache.read_labels()  # all rows: the same refusal
    with pytest.raises(MissingChunkError, match=r"chunk ids/c/9 \(ids, shard 9: rows 576..599\)"):
        cache.read_ids()


def test_done_flags_are_read_once_per_reader(cache_copy: Path) -> None:
    """One reader is one snapshot of the finished shards: what a writer finishes later is seen by
    the next reader, never half-way through a run."""
    set_complete_flag(cache_copy, False)
    flags = zarr.open_group(str(cache_copy), mode="r+", use_consolidated=False)["members/0/done"]
    flags[3] = 0
    cache = LogitCache(cache_copy, allow_partial=True)
    assert cache.done_shards().tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    flags[3] = 1  # the writer finishes shard 3
    assert cache.done_shards().tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert cache.count_done() == (19, 20) and not cache.done_flags(0)[3]
    assert LogitCache(cache_copy, allow_partial=True).done_shards().size == 10


@pytest.mark.parametrize("how", ["deleted", "zeroed"])
def test_a_complete_header_with_a_flag_not_done_is_refused(cache_copy: Path, how: str) -> None:
    if how == "deleted":
        (cache_copy / "members/1/done/c/8").unlink()
    else:
        arr = zarr.open_group(str(cache_copy), mode="r+", use_consolidated=False)["members/1/done"]
        arr.with_config({"write_empty_chunks": True})[8] = 0
        assert (cache_copy / "members/1/done/c/8").is_file()
    cache = LogitCache(cache_copy)  # the header alone is usable (what cache info shows)
    with pytest.raises(
        CacheError,
        match=r"complete, but done flags are missing or zero \(member "
        r"1 shards \[8\]\).*silently train on fewer rows",
    ):
        cache.done_shards()


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_non_finite_logits_are_refused_naming_member_shard_and_ids(
    logits_cache, value: float, dtype: str
) -> None:  # noqa: ANN001
    logits = np.random.default_rng(0).normal(size=(2, 12, 3)).astype(np.float32)
    logits[:, 0, 0] = [65504.0, -65504.0]  # float16's extremes are finite: served
    location, _ = logits_cache(logits, rows_per_shard=4, dtype=dtype)
    group = zarr.open_group(str(location), mode="r+", use_consolidated=False)
    group["members/1/logits"][6, 2] = value
    cache = LogitCache(location)
    assert cache.read_logits(0)[:, 0, 0].tolist() == [65504.0, -65504.0]
    assert cache.read_logits(1, members=[0]).shape == (1, 4, 3)
    with pytest.raises(CacheError, match="member 1's logits in shard 1 hold NaN or inf") as e:
        cache.read_logits(1)
    assert ids_in(str(e.value)) == [6]


def test_labels_are_checked_for_range_and_against_the_dataset(logits_cache) -> None:  # noqa: ANN001
    labels = np.arange(12) % 3
    location, spec = logits_cache(np.zeros((1, 12, 3)), labels=labels, rows_per_shard=4)
    stored = zarr.open_group(str(location), mode="r+", use_consolidated=False)["labels"]
    stored[[1, 5, 9]] = [3, 0, -1]  # row 5 was class 2
    cache = LogitCache(location)
    with pytest.raises(
        CacheError,
        match=r"sample ids \[1\] \(1 in all\) hold labels outside "
        r"0..2 \(\[3\]\)",
    ):
        cache.read_labels(0)
    assert cache.read_labels(1).tolist() == [1, 0, 0, 1]  # a valid class: only the data can tell
    truth = load_dataset(spec).y
    with pytest.raises(
        CacheError,
        match=r"sample ids \[5\] \(1 in all\) hold labels \[0\] "
        r"where the dataset npz:.* has \[2\]: they were altered",
    ):
        cache.read_labels(1, truth=truth)
    with pytest.raises(CacheError, match=r"sample ids \[9\] .* outside 0..2 \(\[-1\]\)"):
        cache.read_labels(2, truth=truth)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            {"num_classes": 7},
            "array members/0/logits has shape (600, 5), dtype float16, chunks "
            "(64, 5); the header says shape (600, 7)",
        ),
        (
            {"n": 590},
            "array ids has shape (600,), dtype int64, chunks (64,); the header says shape (590,)",
        ),
        # Refused before zarr parses it: the read guard bounds a chunk by the header's rows per
        # shard.
        (
            {"rows_per_shard": 60},
            "ids/zarr.json declares chunks of 512 bytes (the header allows 480 per chunk of ids)",
        ),
        (
            {"dtype": "float32"},
            # refused by the read guard before zarr opens the array
            "declares data type 'float16' (the header says float32 for members/0/logits)",
        ),
    ],
)
def test_arrays_unlike_the_header_are_refused_at_open(
    cache_copy: Path, change: dict, says: str
) -> None:
    g = zarr.open_group(str(cache_copy), mode="r+", use_consolidated=False)
    h = {**g.attrs[ATTR_KEY], **change}
    if "num_classes" in change:
        h["members"] = [{**m, "num_classes": change["num_classes"]} for m in h["members"]]
    if "rows_per_shard" in change:
        h["n_shards"] = 10
    # Format 2's row layout follows n and rows_per_shard (one row per sample): the header stays
    # consistent in itself, and only the arrays disagree with it.
    h["rows"] = {**h["rows"], "n": h["n"], "per_shard": h["rows_per_shard"]}
    g.attrs[ATTR_KEY] = h
    with pytest.raises(CacheError) as e:
        LogitCache(cache_copy)
    assert says in str(e.value)
    # The read guard refuses metadata beyond the header before zarr parses it; the rest is
    # refused when the arrays are compared with the header.
    assert "the arrays disagree with the header" in str(e.value) or "declares" in says


# ------------------------------------------------------------------------------------- misc readers
def test_reader_refuses_what_is_not_a_cache(tmp_path: Path, complete_cache: Path) -> None:
    with pytest.raises(CacheError, match="no such cache"):
        LogitCache(tmp_path / "missing.zarr")
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w", zarr_format=3)
    with pytest.raises(CacheError, match="no kd-pipeline cache header"):
        LogitCache(plain)
    (tmp_path / "notzarr").mkdir()
    (tmp_path / "notzarr" / "file.txt").write_text("hello")
    with pytest.raises(CacheError, match="not a Zarr store"):
        read_header(tmp_path / "notzarr")
    newer = tmp_path / "newer.zarr"
    shutil.copytree(complete_cache, newer)
    g = zarr.open_group(str(newer), mode="r+", use_consolidated=False)
    g.attrs[ATTR_KEY] = {**g.attrs[ATTR_KEY], "version": FORMAT_VERSION + 1}
    with pytest.raises(CacheError, match="upgrade kd-pipeline"):
        LogitCache(newer)


def test_existing_non_cache_directory_is_not_written_into(
    tmp_path: Path, teacher_dir: Path, dataset_spec: str
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    before = snapshot(out)
    with pytest.raises(CacheError, match="not a Zarr store"):
        make(out, [teacher_dir], dataset_spec)
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# -------------------------------------------------------------------------------------- 9. no torch
def test_cache_module_imports_without_torch() -> None:
    code = (
        "import sys; import pipeline.cache; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cache_reads_without_torch(complete_cache: Path) -> None:
    code = (
        "import sys; from pipeline.cache import LogitCache; c = LogitCache(sys.argv[1]); "
        "print(c.read_logits(0).shape, c.n); assert 'torch' not in sys.modules"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(complete_cache)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 64, 5) 600"
