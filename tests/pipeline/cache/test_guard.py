"""The read guard's pieces (JSON depth, zstd frame sizes, limits) and the one translation of
storage failures (``pipeline.errors.explain``), each against real inputs: frames made by the
codec zarr uses, exceptions raised by the libraries the stores use."""

from __future__ import annotations

import errno
import json
import random

import numpy as np
import pytest
from numcodecs import Zstd

from pipeline.cache.guard import (
    MAX_JSON_DEPTH,
    MAX_METADATA_BYTES,
    Limits,
    check_array_metadata,
    check_group_metadata,
    json_depth,
    parse_json,
    zstd_content_size,
)
from pipeline.errors import CacheError, KDError, StorageError, explain, storage_errors
from tests.helpers.damage import rle_frame


# ------------------------------------------------------------------------------------ JSON
def reference_depth(obj: object) -> int:
    if isinstance(obj, dict):
        return 1 + max((reference_depth(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return 1 + max((reference_depth(v) for v in obj), default=0)
    return 0


def random_json(rng: random.Random, depth: int) -> object:
    if depth == 0 or rng.random() < 0.3:
        return rng.choice(['[{"', "\\", 'a\\"]}', 1, None, "\\\\", "}}]]"])
    if rng.random() < 0.5:
        return [random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {
        rng.choice(["k", "[", '\\"{', "}"]) + str(i): random_json(rng, depth - 1)
        for i in range(rng.randint(0, 3))
    }


def test_json_depth_matches_the_parsed_depth_with_brackets_and_escapes_in_strings() -> None:
    rng = random.Random(0)
    for _ in range(300):
        obj = random_json(rng, 7)
        text = json.dumps(obj).encode()
        assert json_depth(text) == reference_depth(obj), text
    assert json_depth(b'{"a": "\\\\"}') == 1  # an escaped backslash ends before the real quote


def test_parse_json_refuses_deep_big_and_broken_documents_with_the_name() -> None:
    deep = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(CacheError, match="x/zarr.json nests 100001 levels deep"):
        parse_json(deep, "x/zarr.json")
    ok = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json(ok, "ok") is not None
    with pytest.raises(CacheError, match="is over 16777216 bytes"):
        parse_json(b" " * (MAX_METADATA_BYTES + 1), "big")
    with pytest.raises(CacheError, match="is not valid JSON \\(UnicodeDecodeError"):
        parse_json(b'{"a": "\xff"}', "bad")
    with pytest.raises(CacheError, match="is not valid JSON \\(JSONDecodeError"):
        parse_json(b'z"zarr_format": 3}', "flipped")
    with pytest.raises(CacheError, match="NaN is not JSON"):
        parse_json(b'{"fill_value": NaN}', "nan")


# ------------------------------------------------------------------------------------ zstd
def test_zstd_content_size_reads_what_the_codec_writes() -> None:
    codec = Zstd(level=3)
    for n in (0, 1, 1000, 300_000):
        data = np.random.default_rng(n).integers(0, 4, n, dtype=np.uint8).tobytes()
        assert zstd_content_size(codec.encode(data)) == n
    two = codec.encode(b"a" * 10) + codec.encode(b"b" * 20)
    assert zstd_content_size(two) == 30  # frames concatenated: what the decoder allocates
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"xyz"
    assert zstd_content_size(skippable + codec.encode(b"c" * 5)) == 5


def test_zstd_frames_that_would_expand_without_bound_are_found() -> None:
    bomb = rle_frame(64, None)  # 266 bytes that the codec streams out to 8 MiB
    assert len(bomb) < 300 and len(Zstd().decode(bomb)) == 64 << 17
    assert zstd_content_size(bomb) is None
    assert zstd_content_size(rle_frame(3, 1 << 30)) == 1 << 30  # declares 1 GiB
    with pytest.raises(ValueError, match="cut short"):
        zstd_content_size(rle_frame(3, 3 << 17)[:-2])
    with pytest.raises(ValueError, match="no zstd frame"):
        zstd_content_size(b"not zstd at all")


# ---------------------------------------------------------------------------------- limits
HEADER = {
    "rows_per_shard": 64,
    "num_classes": 5,
    "n_shards": 10,
    "dtype": "float16",
    "members": [{}, {}],
}


def array_meta(**changes: object) -> dict:
    meta = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [600, 5],
        "data_type": "float16",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [64, 5]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "codecs": [{"name": "bytes"}, {"name": "zstd"}, {"name": "crc32c"}],
    }
    return {**meta, **changes}


def test_limits_come_from_the_header() -> None:
    lim = Limits.from_header(HEADER)
    assert lim.raw("members/1/logits") == 64 * 5 * 2 and lim.raw("ids") == 64 * 8
    assert lim.raw("members/0/done") == 1 and lim.raw("junk") == 64 * 5 * 2  # the widest
    assert Limits.from_header({**HEADER, "dtype": "complex256"}) is None
    assert Limits.from_header({**HEADER, "rows_per_shard": "64"}) is None
    check_array_metadata(array_meta(), "members/0/logits", lim, "m")  # the writer's own


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"codecs": [{"name": "bytes"}, {"name": "gzip"}]}, "codecs ['bytes', 'gzip']"),
        ({"data_type": "float64"}, "data type 'float64'"),
        (
            {"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1 << 20, 5]}}},
            "chunks of 10485760 bytes (the header allows 640 per chunk of members/0/logits)",
        ),
        ({"shape": [10**9, 5]}, "shape [1000000000, 5] (more than the header's 10 chunks"),
        ({"chunk_key_encoding": {"name": "v2"}}, "chunk key encoding"),
        # A flipped byte in a key name: zarr ignores the key, the format does not.
        (
            {
                "codecs": [
                    {"name": "bytes", "configu(ation": {"endian": "little"}},
                    {"name": "zstd"},
                    {"name": "crc32c"},
                ]
            },
            "unexpected 'configu(ation' in codecs",
        ),
        ({"fill_valu%": 0}, "unexpected 'fill_valu%' in the document"),
    ],
)
def test_array_metadata_beyond_the_format_or_the_header_is_refused(
    changes: dict, says: str
) -> None:
    with pytest.raises(
        CacheError,
        match="m declares .*"
        + says.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[").replace("]", "\\]"),
    ):
        check_array_metadata(
            array_meta(**changes), "members/0/logits", Limits.from_header(HEADER), "m"
        )


# ----------------------------------------------------------------------------- translation
def botocore_error(code: str, message: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}}, "ListObjectsV2")


def s3fs_style(e: Exception, as_type: type[OSError]) -> OSError:
    """What s3fs raises: an OSError subclass with the botocore error as its cause."""
    try:
        raise as_type(str(e)) from e
    except OSError as wrapped:
        return wrapped


@pytest.mark.parametrize(
    ("exc", "kind", "says"),
    [
        (
            botocore_error("InvalidAccessKeyId", "no such key id"),
            StorageError,
            "refused the credentials (InvalidAccessKeyId: no such key id)",
        ),
        (
            s3fs_style(botocore_error("SignatureDoesNotMatch", "bad secret"), PermissionError),
            StorageError,
            "refused the credentials (SignatureDoesNotMatch",
        ),
        (
            s3fs_style(botocore_error("AccessDenied", "Access Denied"), PermissionError),
            StorageError,
            "access denied by the object store (AccessDenied",
        ),
        (
            s3fs_style(
                botocore_error("NoSuchBucket", "The specified bucket does not exist"),
                FileNotFoundError,
            ),
            StorageError,
            "the bucket does not exist",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/d/student.pt.tmp-1"),
            StorageError,
            "no space left on the device: /d/student.pt.tmp-1; free some space",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/d/x"),
            StorageError,
            "permission denied: /d/x",
        ),
        (json.JSONDecodeError("Expecting value", "z", 0), CacheError, "could not be read"),
        (RecursionError("maximum recursion depth exceeded"), CacheError, "RecursionError"),
        (MemoryError(), KDError, "ran out of memory"),
    ],
)
def test_explain_maps_library_failures_to_messages(exc: Exception, kind: type, says: str) -> None:
    err = explain(exc, "s3://b/c.zarr")
    assert type(err) is kind and str(err).startswith("s3://b/c.zarr: ") and says in str(err)


def test_explain_knows_no_credentials_and_unreachable_endpoints() -> None:
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    assert "no credentials for the object store" in str(explain(NoCredentialsError()))
    down = EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    assert "cannot reach the storage endpoint" in str(explain(down))
    from zarr.errors import MetadataValidationError

    assert "Zarr metadata is damaged" in str(explain(MetadataValidationError("x", "y", "z")))
    assert explain(RuntimeError("a bug")) is None and explain(ValueError("a bug")) is None


def test_storage_errors_keeps_a_stores_missing_key_answer() -> None:
    with pytest.raises(FileNotFoundError), storage_errors("c", keep=(FileNotFoundError,)):
        raise FileNotFoundError(errno.ENOENT, "No such file", "c/ids/c/0")
    bucket = s3fs_style(
        botocore_error("NoSuchBucket", "The specified bucket does not exist"), FileNotFoundError
    )
    with (
        pytest.raises(StorageError, match="c: the bucket does not exist"),
        storage_errors("c", keep=(FileNotFoundError,)),
    ):
        raise bucket
    with pytest.raises(RuntimeError), storage_errors("c"):
        raise RuntimeError("not a storage failure")


def test_group_metadata_may_hold_only_a_groups_keys() -> None:
    check_group_metadata({"zarr_format": 3, "node_type": "group", "attributes": {}}, "g")
    with pytest.raises(CacheError, match="g declares unexpected 'attr\\\\x1ebutes'"):
        check_group_metadata({"zarr_format": 3, "node_type": "group", "attr\x1ebutes": {}}, "g")
