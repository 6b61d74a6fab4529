"""The cache format over time and its typed pieces: caches written before (a frozen v1 bundle)
read, verify and keep every data chunk bit for bit; the typed header; the parsed cache location.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.header import ATTR_KEY
from pipeline.cache.read import LogitCache
from pipeline.errors import CacheError
from tests.helpers.process import REPO
from tests.helpers.writer import (
    raw_group,
)

# pytest resets the warning filters pipeline.cache installs; these two are expected and harmless.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]


# ------------------------------------------------------------- 11. caches from before, bit for bit
FIXTURE = REPO / "tests" / "fixtures" / "v1-cache.zarr.zip"  # by tests/fixtures/make_v1_cache.py


def fixture_objects() -> dict[str, bytes]:
    import zipfile

    with zipfile.ZipFile(FIXTURE) as z:
        return {name: z.read(name) for name in z.namelist()}


def test_a_cache_written_before_the_location_change_reads_and_verifies(tmp_path: Path) -> None:
    """The fixture was written by the code before CacheLocation / CacheHeader (commit 144087a)."""
    from pipeline.cache import copying, verify
    from pipeline.cache.header import CacheHeader
    from pipeline.cache.lookup import cache_fingerprint
    from tests.fixtures import make_v1_cache as v1

    given = v1.inputs()
    cache = LogitCache(FIXTURE)
    assert cache.complete and (cache.n, cache.num_classes, cache.n_shards) == (50, 5, 4)
    assert np.array_equal(cache.read_ids(), given["ids"])
    assert np.array_equal(cache.read_labels(), given["labels"])
    assert np.array_equal(cache.read_logits(3), given["logits"][:, 48:].astype(np.float16))
    assert [m.path for m in cache.members] == [m["path"] for m in given["members"]]
    assert cache.members[1].metrics["per_class_errors"] == (1, 0, 2, 0, 1)
    report = verify.verify_cache(FIXTURE)
    assert report.ok and report.chunks_read == 24, report.problems
    # The typed header gives back the very JSON it was read from: same keys, order and values.
    raw = json.loads(fixture_objects()["zarr.json"])["attributes"][ATTR_KEY]
    header = CacheHeader.from_dict(raw)
    assert header == cache.header
    assert json.dumps(header.to_dict()) == json.dumps(raw)
    # The fingerprint as the code before the change computed it (from the raw header).
    ident = {
        "dataset": raw["dataset"]["fingerprint"],
        "members": [m["checkpoint_sha256"] for m in raw["members"]],
        "dtype": raw["dtype"],
        "n": raw["n"],
        "num_classes": raw["num_classes"],
    }
    expected = "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    assert cache_fingerprint(cache.header) == expected == cache_fingerprint(raw)
    # Copied by today's code into a directory: object for object the same bytes, and it verifies.
    res = copying.copy_cache(FIXTURE, tmp_path / "copy.zarr", progress=False, log=lambda s: None)
    assert res.report.ok and res.copied == len(fixture_objects())
    assert {
        str(p.relative_to(tmp_path / "copy.zarr")): p.read_bytes()
        for p in (tmp_path / "copy.zarr").rglob("*")
        if p.is_file()
    } == fixture_objects()


def test_the_same_inputs_written_today_keep_every_v1_data_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """create_cache / write_shard / mark_complete now write format 2; a dense member's data is
    still stored exactly as format 1 stored it (same chunks, same bytes): only the header, the
    row index and the fidelity measurements are new."""
    from pipeline.cache import create, write
    from tests.fixtures import make_v1_cache as v1

    raw = json.loads(fixture_objects()["zarr.json"])["attributes"][ATTR_KEY]
    for module in (create, write):
        monkeypatch.setattr(module, "now", lambda: v1.FROZEN)  # the fixture's frozen timestamps
    monkeypatch.setattr(create, "__version__", raw["tool_version"])
    out = tmp_path / "today.zarr"
    v1.write(out)
    today = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    before = fixture_objects()
    data = [k for k in before if "/c/" in k]
    assert len(data) == 4 * (2 + 2 + 2) and [k for k in data if today[k] != before[k]] == []
    new = sorted(k.split("/c/")[0] for k in set(today) - set(before) if "/c/" in k)
    assert sorted(set(new)) == [
        "members/0/fidelity",
        "members/1/fidelity",
        "row_count",
        "row_start",
    ]
    assert json.loads(today["zarr.json"])["attributes"][ATTR_KEY]["version"] == 2


# ----------------------------------------------------------------------------- 12. the typed header
def test_header_round_trip_keeps_unknown_keys_and_order_and_is_frozen(complete_cache: Path) -> None:
    import dataclasses

    from pipeline.cache.header import CacheHeader

    raw = raw_group(complete_cache).attrs[ATTR_KEY]
    h = CacheHeader.from_dict(raw)
    assert json.dumps(h.to_dict()) == json.dumps(raw)
    assert h.members[0].index == 0 and h.dataset.sample_shape == (1, 8, 8) and h.complete
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.n = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        h.dataset.source["file"] = "elsewhere"  # nested JSON is read-only too
    # Keys this version does not know (a newer writer's, a tool's note) survive a rewrite, in place.
    extended = {**raw, "note": {"by": "someone"}, "dataset": {"x_first": 1, **raw["dataset"]}}
    extended["members"] = [{**m, "extra": [1, 2]} for m in raw["members"]]
    again = CacheHeader.from_dict(extended)
    assert json.dumps(again.to_dict()) == json.dumps(extended)
    # Changes give new headers; a key the header lacked is appended, as a dict update would.
    without = {k: v for k, v in raw.items() if k != "completed_at"}
    done = CacheHeader.from_dict(without).completed("now")
    assert list(done.to_dict())[-1] == "completed_at" and done.to_dict()["completed_at"] == "now"
    added = h.with_member({**raw["members"][1], "index": 2, "array": "members/2/logits"})
    assert len(added.members) == 3 and not added.complete and added.completed_at is None
    assert len(h.members) == 2 and h.complete


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"format": "other"}, "format is 'other', expected 'kd-pipeline-logit-cache'"),
        ({"version": 99}, "cache format version 99 is not supported"),
        ({"n_shards": 3}, "n_shards=3 does not match n=600 / rows_per_shard=64"),
        ({"dtype": "int8"}, "dtype 'int8' is not float16 or float32"),
        ({"labeled": "yes"}, "labeled should be bool, found str"),
    ],
)
def test_header_from_dict_is_as_strict_as_the_schema(
    complete_cache: Path, change: dict, says: str
) -> None:
    from pipeline.cache.header import CacheHeader, validate_header

    bad = {**raw_group(complete_cache).attrs[ATTR_KEY], **change}
    with pytest.raises(CacheError) as strict:
        CacheHeader.from_dict(bad, "here")
    with pytest.raises(CacheError) as schema:
        validate_header(bad, "here")
    assert str(strict.value) == str(schema.value) and says in str(strict.value)
    assert str(strict.value).startswith("here: ")


# --------------------------------------------------------------------------- 13. the cache location
def test_location_is_parsed_once_into_a_value() -> None:
    import pickle

    from pipeline.cache.location import CacheLocation

    d = CacheLocation.parse("data/caches/fmnist.zarr/")
    assert (d.kind, d.text, d.name, d.display) == (
        "dir",
        "data/caches/fmnist.zarr",
        "fmnist",
        "data/caches/fmnist.zarr",
    )
    assert d.local_path == Path("data/caches/fmnist.zarr")
    z = CacheLocation.parse(Path("x/fmnist.zarr.zip"))
    assert (z.kind, z.name) == ("zip", "fmnist")
    opts = {
        "endpoint_url": "http://127.0.0.1:9000",
        "key": "AKIA-SECRET",
        "client_kwargs": {"token": "t"},
    }
    u = CacheLocation.parse("s3://team/caches/fmnist.zarr", opts)
    assert (u.kind, u.name, u.local_path, u.storage_options) == ("url", "fmnist", None, opts)
    assert "AKIA-SECRET" not in repr(u) and "'t'" not in repr(u) and "127.0.0.1" in repr(u)
    assert str(u) == "s3://team/caches/fmnist.zarr"
    # Hashable and picklable (dask tasks carry it), equal by text, kind and options.
    assert pickle.loads(pickle.dumps(u)) == u and hash(pickle.loads(pickle.dumps(u))) == hash(u)
    assert u != CacheLocation.parse("s3://team/caches/fmnist.zarr")
    assert CacheLocation.parse(u) is u
    assert u.child("sub/c.zarr") == CacheLocation.parse(
        "s3://team/caches/fmnist.zarr/sub/c.zarr", opts
    )
    # Storage options only apply to URLs: a local location (one side of `cache copy`) ignores them.
    assert CacheLocation.parse("data/c.zarr", opts) == CacheLocation.parse("data/c.zarr")
    with pytest.raises(CacheError, match="no cache location given"):
        CacheLocation.parse("")
    with pytest.raises(CacheError, match="plain JSON values"):
        CacheLocation.parse("s3://team/c.zarr", {"session": object()})


def test_location_opens_each_store_once(complete_cache: Path, tmp_path: Path) -> None:
    from pipeline.cache.location import CacheLocation

    where = CacheLocation.parse(complete_cache)
    assert where.exists() and not CacheLocation.parse(tmp_path / "none.zarr").exists()
    store = where.open("r")
    assert where.open("r") is store and store.read_only and not where.open("w").read_only
    cache = LogitCache(where)
    assert cache.store is store and cache.location is where
    bundle = CacheLocation.parse(tmp_path / "c.zarr.zip")
    with pytest.raises(CacheError, match="a .zarr.zip bundle is read-only"):
        bundle.open("w")
