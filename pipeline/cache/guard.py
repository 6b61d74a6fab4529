"""What a cache's stored bytes may be, checked before anything parses or decompresses them.

A cache from someone else (a bundle, a bucket) is data that zarr would otherwise parse and
decompress as it finds it: a ``zarr.json`` of any size or nesting, a chunk whose zstd frame
expands a few KiB into GiB. :class:`GuardedStore` wraps every read-only store
(:meth:`CacheLocation.open`) and lets a key's bytes through only when they fit what the cache's
header allows:

- every ``zarr.json`` is read with a bounded request (at most ``MAX_METADATA_BYTES``), its JSON
  nesting measured before it is parsed (at most ``MAX_JSON_DEPTH``), parsed strictly, and checked
  by zarr's own metadata parser, so damage is reported by its key before zarr sees it; an array's
  metadata may only use this format's codecs (bytes, zstd, crc32c), dtypes and chunk-key
  encoding, and its chunk and array sizes may not exceed what the header implies;
- every chunk is read with a bounded request of what its array's chunk can hold compressed
  (``rows_per_shard x classes x itemsize`` for logits, plus zstd's worst-case overhead and the
  checksum), and its zstd frames must declare a total content size within the raw chunk size
  (a frame without one would be decompressed as a stream, without bound);
- a ``.zarr.zip`` bundle's entries are checked against the same limits from their declared sizes
  as soon as the header is known (the zip module never inflates an entry past its declared size).

Failures of the underlying store (credentials, a missing bucket, an endpoint that is down) are
translated once here (:func:`pipeline.errors.storage_errors`), naming the location.

This module imports without torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.abc.store import ByteRequest, RangeByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore, WrapperStore, ZipStore

from pipeline.cache.header import ATTR_KEY, CacheHeader, expected_arrays
from pipeline.errors import CacheError, KDError, storage_errors

META = "zarr.json"
ZARR_V2_NAMES = frozenset({".zgroup", ".zattrs", ".zarray", ".zmetadata"})
MAX_METADATA_BYTES = 16 << 20  # any zarr.json bigger than this is not a cache's
MAX_JSON_DEPTH = 64  # a cache's metadata nests about 8 deep
MAX_BOOKKEEPING_BYTES = 1 << 16  # kd-writer.lock, kd-creating: a few hundred bytes
CODEC_CHAINS = (("bytes", "zstd", "crc32c"), ("bytes", "crc32c"))  # data arrays, done flags
DTYPES = {
    "int64": 8,
    "int32": 4,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "float16": 2,
    "float32": 4,
    "float64": 8,
}
ZSTD_MAGIC = 0xFD2FB528
KEEP = (FileNotFoundError,)  # a store's answer for a missing key or root, not a failure
REFUSE = "Do not use it; get a good copy, or ask its sender for one made by kd-pipeline"


def is_meta(key: str) -> bool:
    """Whether ``key`` is a Zarr metadata document (``zarr.json`` at any level)."""
    return key == META or key.endswith("/" + META)


def array_of(key: str) -> str:
    """The array a chunk key belongs to: ``members/0/logits/c/3/0`` -> ``members/0/logits``."""
    head, sep, _ = key.partition("/c/")
    if sep:
        return head
    return key[:-2] if key.endswith("/c") else key.rpartition("/")[0]


# ------------------------------------------------------------------------------------- JSON
def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[`` / ``{`` in JSON text, outside strings, in linear time.

    Measured before parsing, so a document nested a million deep never reaches a recursive
    parser. Text that is not JSON gets some number; the parser then rejects it.
    """
    a = np.frombuffer(data, dtype=np.uint8)
    if a.size == 0:
        return 0
    idx = np.arange(a.size)
    # A quote is escaped when an odd number of backslashes runs right up to it.
    last_plain = np.maximum.accumulate(np.where(a != ord("\\"), idx, -1))
    run = idx - 1 - np.concatenate(([-1], last_plain[:-1]))
    quote = (a == ord('"')) & (run % 2 == 0)
    inside = (np.cumsum(quote) - quote) % 2 == 1  # after an odd number of real quotes
    opens = ((a == ord("[")) | (a == ord("{"))) & ~inside
    closes = ((a == ord("]")) | (a == ord("}"))) & ~inside
    depth = np.cumsum(opens.astype(np.int64) - closes.astype(np.int64))
    return int(depth.max(initial=0))


def parse_json(data: bytes, what: str) -> Any:
    """Strict JSON of at most ``MAX_METADATA_BYTES`` and ``MAX_JSON_DEPTH``, or ``CacheError``.

    Args:
        data: the document's bytes.
        what: the document, as messages name it (``s3://b/c.zarr: members/0/logits/zarr.json``).
    """
    if len(data) > MAX_METADATA_BYTES:
        raise CacheError(
            f"{what} is over {MAX_METADATA_BYTES} bytes, far more than a cache's "
            f"metadata; refusing to parse it. {REFUSE}"
        )
    depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise CacheError(
            f"{what} nests {depth} levels deep (a cache's metadata nests about 8, "
            f"the limit is {MAX_JSON_DEPTH}); refusing to parse it. {REFUSE}"
        )
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise CacheError(
            f"{what} is not valid JSON ({type(e).__name__}: {e}); the metadata is damaged. {REFUSE}"
        ) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# ------------------------------------------------------------------------------------- zstd
def zstd_content_size(data: bytes) -> int | None:
    """The total content size the zstd frames in ``data`` declare; None if a frame declares none.

    Walks frame and block headers only (nothing is decompressed). Skippable frames count 0.

    Raises:
        ValueError: ``data`` is not a sequence of whole zstd frames.
    """
    pos, total, n = 0, 0, len(data)
    while pos < n:
        magic = int.from_bytes(data[pos : pos + 4], "little")
        if n - pos >= 8 and magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
            pos += 8 + int.from_bytes(data[pos + 4 : pos + 8], "little")
            continue
        if n - pos < 6 or magic != ZSTD_MAGIC:
            raise ValueError(f"no zstd frame at byte {pos}")
        fhd = data[pos + 4]
        single, has_checksum, fcs_flag = (fhd >> 5) & 1, (fhd >> 2) & 1, fhd >> 6
        pos += 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
        fcs_len = (single, 2, 4, 8)[fcs_flag]
        if fcs_len == 0:
            return None
        total += int.from_bytes(data[pos : pos + fcs_len], "little") + (256 if fcs_len == 2 else 0)
        pos += fcs_len
        last = 0
        while not last:
            if pos + 3 > n:
                raise ValueError("a zstd frame is cut short")
            block = int.from_bytes(data[pos : pos + 3], "little")
            last, kind, size = block & 1, (block >> 1) & 3, block >> 3
            if kind == 3:
                raise ValueError("a zstd block of a reserved type")
            pos += 3 + (1 if kind == 1 else size)  # an RLE block stores one byte
        pos += 4 * has_checksum
    if pos > n:
        raise ValueError("a zstd frame is cut short")
    return total


# ----------------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class Limits:
    """What a cache's header allows its arrays to hold, in bytes.

    Attributes:
        chunk: raw (decompressed) bytes of one chunk, by array path.
        shards: chunks per array (the header's ``n_shards``).
        widest: the largest raw chunk of any array (for keys of arrays the header does not name).
    """

    chunk: Mapping[str, int]
    shards: int
    widest: int
    dtypes: Mapping[str, str] | None = None  # each array's data type, when the header is known

    @classmethod
    def from_header(cls, h: Any) -> Limits | None:
        """The limits of a header dict (raw JSON), or None when it lacks what they need."""
        if not isinstance(h, dict):
            return None
        rows, classes, members = h.get("rows_per_shard"), h.get("num_classes"), h.get("members")
        n_shards, itemsize = h.get("n_shards"), DTYPES.get(h.get("dtype"), 0)
        if not all(isinstance(v, int) and v > 0 for v in (rows, classes, n_shards, itemsize)):
            return None
        try:  # format 2 (and 1): every array the header implies, by its chunk's bytes
            header = CacheHeader.from_dict(h)
            arrays = expected_arrays(header)
            chunk = {name: math.prod(chunks) * DTYPES[dtype] for name, _, dtype, chunks in arrays}
            dtypes = {name: dtype for name, _, dtype, _ in arrays}
            return cls(chunk, n_shards, max(chunk.values()), dtypes)
        except (KDError, KeyError, ValueError, TypeError):
            pass  # a header the schema refuses: bound by what its numbers say, as format 1 does
        logits = rows * classes * itemsize
        chunk = {"ids": rows * 8, "labels": rows * 8}
        dtypes = {"ids": "int64", "labels": "int64"}
        for k in range(len(members) if isinstance(members, list) else 0):
            chunk[f"members/{k}/logits"] = logits
            chunk[f"members/{k}/done"] = 1
            dtypes[f"members/{k}/logits"] = h["dtype"]
            dtypes[f"members/{k}/done"] = "uint8"
        return cls(chunk, n_shards, max(logits, rows * 8), dtypes)

    def raw(self, array: str) -> int:
        """At most this many bytes in one decompressed chunk of ``array``."""
        return self.chunk.get(array, self.widest)

    def stored(self, array: str) -> int:
        """At most this many bytes stored for one chunk: zstd's worst case plus the checksum."""
        raw = self.raw(array)
        return raw + raw // 128 + 1024


def check_array_metadata(meta: Any, array: str, limits: Limits | None, what: str) -> None:
    """An array's metadata may use only this format's codecs, dtypes and chunk keys, and hold no
    more than the header allows.

    Raises:
        CacheError: naming the document and what it declares.
    """
    if not isinstance(meta, dict):
        raise CacheError(f"{what} is not a JSON object; the metadata is damaged. {REFUSE}")
    problems = unknown_keys(meta)
    codecs = meta.get("codecs")
    names = tuple(
        c.get("name") if isinstance(c, dict) else c
        for c in (codecs if isinstance(codecs, list) else ())
    )
    if names not in CODEC_CHAINS:
        problems.append(
            f"codecs {list(names)} (a cache uses {' or '.join(str(list(c)) for c in CODEC_CHAINS)})"
        )
    dtype = meta.get("data_type")
    if dtype not in DTYPES:
        problems.append(f"data type {dtype!r} (a cache uses {', '.join(DTYPES)})")
    elif limits is not None and limits.dtypes and limits.dtypes.get(array, dtype) != dtype:
        problems.append(f"data type {dtype!r} (the header says {limits.dtypes[array]} for {array})")
    encoding = _obj(meta.get("chunk_key_encoding"))
    if (
        encoding.get("name") != "default"
        or _obj(encoding.get("configuration")).get("separator", "/") != "/"
    ):
        problems.append(f"chunk key encoding {encoding!r} (a cache uses 'default' with '/')")
    grid = _obj(_obj(meta.get("chunk_grid")).get("configuration"))
    chunks, shape = grid.get("chunk_shape"), meta.get("shape")
    dims = [chunks, shape]
    if not all(isinstance(d, list) and all(isinstance(v, int) and v >= 0 for v in d) for d in dims):
        problems.append(f"shape {shape!r} and chunk shape {chunks!r} (lists of sizes expected)")
    elif limits is not None and dtype in DTYPES:
        chunk_bytes = math.prod(chunks) * DTYPES[dtype]
        if chunk_bytes > limits.raw(array):
            problems.append(
                f"chunks of {chunk_bytes} bytes (the header allows "
                f"{limits.raw(array)} per chunk of {array})"
            )
        if math.prod(shape) * DTYPES[dtype] > limits.raw(array) * limits.shards:
            problems.append(
                f"shape {shape} (more than the header's {limits.shards} chunks of {array})"
            )
    if problems:
        raise CacheError(
            f"{what} declares {'; '.join(problems)}: not this cache format's metadata. {REFUSE}"
        )


def _obj(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


# Every key this format's metadata may have; zarr ignores some unknown keys, so damage to a key
# name (a flipped byte) would otherwise pass.
ARRAY_KEYS = frozenset(
    {
        "zarr_format",
        "node_type",
        "shape",
        "data_type",
        "chunk_grid",
        "chunk_key_encoding",
        "fill_value",
        "codecs",
        "attributes",
        "dimension_names",
        "storage_transformers",
    }
)
GROUP_KEYS = frozenset({"zarr_format", "node_type", "attributes", "consolidated_metadata"})
NAMED = frozenset({"name", "configuration"})
CONFIG_KEYS = {
    "regular": {"chunk_shape"},
    "default": {"separator"},
    "bytes": {"endian"},
    "zstd": {"level", "checksum"},
    "crc32c": set(),
}


def unknown_keys(meta: dict) -> list[str]:
    """Problems with the keys of an array's or group's metadata: keys this format never writes."""
    problems = []

    def allow(obj: Any, keys: Iterable[str], where: str) -> None:
        if obj is None:
            return
        extra = sorted(set(obj) - set(keys)) if isinstance(obj, dict) else [type(obj).__name__]
        if extra:
            problems.append(f"unexpected {', '.join(map(repr, extra))} in {where}")

    allow(meta, ARRAY_KEYS if meta.get("node_type") == "array" else GROUP_KEYS, "the document")
    named = [
        (meta.get("chunk_grid"), "chunk_grid"),
        (meta.get("chunk_key_encoding"), "chunk_key_encoding"),
    ]
    codecs = meta.get("codecs")
    named += [(c, "codecs") for c in (codecs if isinstance(codecs, list) else [])]
    for part, where in named:
        allow(part, NAMED, where)
        name = _obj(part).get("name")
        allow(_obj(part).get("configuration"), CONFIG_KEYS.get(name, ()), f"{where} {name!r}")
    if meta.get("storage_transformers"):
        problems.append("storage transformers (a cache uses none)")
    return problems


def check_group_metadata(meta: dict, what: str) -> None:
    """A group's metadata may hold only the keys a group of this format has."""
    problems = unknown_keys(meta)
    if problems:
        raise CacheError(
            f"{what} declares {'; '.join(problems)}: not this cache format's metadata. {REFUSE}"
        )


def check_with_zarr(meta: dict, what: str) -> None:
    """zarr's own parser over a metadata document, so its complaints name the document."""
    from zarr.core.group import GroupMetadata
    from zarr.core.metadata.v3 import ArrayV3Metadata

    node = meta.get("node_type")
    try:
        if meta.get("zarr_format") != 3 or node not in ("array", "group"):
            raise ValueError(
                f"zarr_format {meta.get('zarr_format')!r}, node_type {node!r}; "
                "expected Zarr v3 array or group metadata"
            )
        (ArrayV3Metadata if node == "array" else GroupMetadata).from_dict(dict(meta))
    except Exception as e:  # noqa: BLE001 - zarr raises many types for bad metadata
        raise CacheError(
            f"{what} is not valid Zarr metadata ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the metadata is damaged. "
            f"{REFUSE}"
        ) from None


# ------------------------------------------------------------------------------------ store
class GuardedStore(WrapperStore[Store]):
    """A read-only store whose bytes are checked against the cache's header before zarr sees
    them (see the module docstring).

    Args:
        store: the store to read (a ``LocalStore``, ``ZipStore`` or ``FsspecStore``).
        where: the location, as messages name it.
    """

    def __init__(self, store: Store, where: str = "cache") -> None:
        super().__init__(store)
        self.where = where
        self._limits: Limits | None = None

    def _with_store(self, store: Store) -> GuardedStore:
        return type(self)(store, self.where)

    def __str__(self) -> str:
        return str(self._store)

    def __repr__(self) -> str:
        return f"GuardedStore({self._store!r})"

    @property
    def inner(self) -> Store:
        """The wrapped store (for listings that need its own interface)."""
        return self._store

    # -- reads
    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        prototype = prototype or default_buffer_prototype()
        name = key.rsplit("/", 1)[-1]
        if name in ZARR_V2_NAMES:  # zarr looks for these on every open: absent in a cache
            return await self._v2_metadata(key, prototype)
        if is_meta(key):
            cap = MAX_METADATA_BYTES
            if key != META and self._limits is None:
                await self.get(META)  # an array's sizes are bounded by the root's header
        elif name.startswith("kd-"):
            cap = MAX_BOOKKEEPING_BYTES
        else:
            cap = (await self.limits()).stored(array_of(key))
        if byte_range is not None:  # only bounded ranges (nothing here asks for others)
            if not (
                isinstance(byte_range, RangeByteRequest)
                and byte_range.end - byte_range.start <= cap + 1
            ):
                raise CacheError(f"{self.where}: refusing to read {key} with {byte_range}")
            return await self._read(key, prototype, byte_range)
        buf = await self._read(key, prototype, RangeByteRequest(0, cap + 1))
        if buf is None:
            return None
        data = buf.to_bytes()
        if len(data) > cap:
            raise CacheError(
                f"{self.where}: {key} holds more than {cap} bytes, more than "
                f"{'a metadata document' if is_meta(key) else 'its chunk'} may; "
                f"refusing to read it. {REFUSE}"
            )
        if is_meta(key):
            self._check_metadata(key, data)
        elif not name.startswith("kd-"):
            self._check_chunk(key, data, await self.limits())
        return buf

    async def _v2_metadata(self, key: str, prototype: BufferPrototype) -> None:
        if await self._read(key, prototype, RangeByteRequest(0, 1)) is not None:
            raise CacheError(
                f"{self.where}: {key} is Zarr format 2 metadata; a kd-pipeline cache "
                f"is Zarr format 3 only. {REFUSE}"
            )
        return None

    async def _read(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest
    ) -> Buffer | None:
        self._refuse_links(key)
        with storage_errors(self.where, keep=KEEP):
            return await self._store.get(key, prototype, byte_range)

    def _refuse_links(self, key: str) -> None:
        """A directory cache holds regular files and folders only: a symbolic link could point at
        any file of this machine, which a copy would then upload (bundles refuse links too)."""
        if not isinstance(self._store, LocalStore):
            return
        path = str(self._store.root)
        for part in key.split("/"):
            path = os.path.join(path, part)
            if os.path.islink(path):
                raise CacheError(
                    f"{self.where}: {key} is a symbolic link; a cache directory holds only "
                    "regular files and folders (a link can point at any file of this machine). "
                    f"Refusing to read it. {REFUSE}"
                )

    def _check_metadata(self, key: str, data: bytes) -> None:
        what = f"{self.where}: {key}"
        meta = parse_json(data, what)
        if not isinstance(meta, dict):
            raise CacheError(f"{what} is not a JSON object; the metadata is damaged. {REFUSE}")
        if key == META:  # the root: its header bounds everything else
            attrs = meta.get("attributes")
            limits = Limits.from_header(attrs.get(ATTR_KEY) if isinstance(attrs, dict) else None)
            if limits is not None:
                self._limits = limits
            self._check_consolidated(meta.get("consolidated_metadata"), limits, what)
        if meta.get("node_type") == "array":
            check_array_metadata(meta, key.rpartition("/")[0], self._limits, what)
        else:
            check_group_metadata(meta, what)
        check_with_zarr(meta, what)

    @staticmethod
    def _check_consolidated(consolidated: Any, limits: Limits | None, what: str) -> None:
        """The root's copy of every node's metadata, checked as the nodes' own documents are."""
        if consolidated is None:
            return
        extra = (
            sorted(set(consolidated) - {"kind", "must_understand", "metadata"})
            if isinstance(consolidated, dict)
            else ["not an object"]
        )
        if extra:
            raise CacheError(
                f"{what} declares unexpected {extra} in its consolidated metadata: "
                f"not this cache format's metadata. {REFUSE}"
            )
        for path, sub in _obj(consolidated.get("metadata")).items():
            entry = f"{what} (entry {path})"
            if _obj(sub).get("node_type") == "array":
                check_array_metadata(sub, path, limits, entry)
            else:
                check_group_metadata(_obj(sub), entry)
                GuardedStore._check_consolidated(
                    _obj(sub).get("consolidated_metadata"), limits, entry
                )

    def _check_chunk(self, key: str, data: bytes, limits: Limits) -> None:
        array = array_of(key)
        # Stored as zstd frames then a 4-byte crc32c (or, for done flags, the value then crc32c).
        if int.from_bytes(data[:4], "little") != ZSTD_MAGIC:
            return  # not zstd: its stored size, already bounded, is its decoded size
        try:
            size = zstd_content_size(data[:-4])
        except ValueError as e:
            raise CacheError(
                f"{self.where}: chunk {key} is not whole zstd frames ({e}); the "
                f"chunk is corrupt. {REFUSE}"
            ) from None
        if size is None or size > limits.raw(array):
            said = "no size" if size is None else f"{size} bytes"
            raise CacheError(
                f"{self.where}: chunk {key} would decompress to {said}; a chunk of "
                f"{array} holds at most {limits.raw(array)} bytes by the cache's "
                f"header. Refusing to decompress it. {REFUSE}"
            )

    async def limits(self) -> Limits:
        """The header's limits, read from the root ``zarr.json`` the first time they are needed."""
        if self._limits is None:
            await self.get(META)  # sets them when the header is readable
        if self._limits is None:
            raise CacheError(
                f"{self.where}: no readable kd-pipeline cache header, so no chunk "
                "can be read safely; is this a cache made by kd-pipeline?"
            )
        return self._limits

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(k, prototype, r) for k, r in key_ranges]

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    # -- everything else passes through, with storage failures named
    async def exists(self, key: str) -> bool:
        with storage_errors(self.where, keep=KEEP):
            return await self._store.exists(key)

    async def getsize(self, key: str) -> int:
        with storage_errors(self.where, keep=KEEP):
            return await self._store.getsize(key)

    def list(self) -> AsyncIterator[str]:
        return self._listing(self._store.list())

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        return self._listing(self._store.list_prefix(prefix))

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        return self._listing(self._store.list_dir(prefix))

    async def _listing(self, keys: AsyncIterator[str]) -> AsyncIterator[str]:
        with storage_errors(self.where, keep=KEEP):
            async for key in keys:
                yield key


def check_bundle(store: ZipStore, where: str) -> None:
    """Refuse a bundle whose entries declare more bytes than its header allows for their keys.

    Run when a bundle is opened, before zarr reads it. The zip module never inflates an entry
    beyond its declared size, so bounding declared sizes bounds what reading it can cost. A
    bundle without a readable header is left to the readers, which say what is missing.
    """
    if not store._is_open:
        store._sync_open()
    try:
        info = store._zf.getinfo(META)
    except KeyError:
        return
    if info.file_size > MAX_METADATA_BYTES:
        raise CacheError(
            f"{where}: refusing this bundle: its {META} declares {info.file_size} "
            f"bytes (at most {MAX_METADATA_BYTES}). {REFUSE}"
        )
    with store._zf.open(info) as f:
        meta = parse_json(f.read(MAX_METADATA_BYTES + 1), f"{where}: {META}")
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    limits = Limits.from_header(attrs.get(ATTR_KEY) if isinstance(attrs, dict) else None)
    if limits is None:
        return
    problems = []
    for info in store._zf.infolist():
        key = info.filename
        cap = (
            MAX_METADATA_BYTES
            if is_meta(key)
            else MAX_BOOKKEEPING_BYTES
            if key.rsplit("/", 1)[-1].startswith("kd-")
            else limits.stored(array_of(key))
        )
        if info.file_size > cap or info.compress_size > cap:
            problems.append(
                f"entry {key!r} expands to {info.file_size} bytes (at most {cap} for "
                "this key by the cache's header)"
            )
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; ... ({len(problems)} in all)" if len(problems) > 5 else ""
        )
        raise CacheError(f"{where}: refusing this bundle: {shown}. {REFUSE}")


async def read_json(store: Store, key: str, where: str) -> Any:
    """A metadata document of any store (guarded or not), size- and depth-checked; None if absent.

    Raises:
        CacheError: too big, too deep, or not JSON.
    """
    proto = default_buffer_prototype()
    if isinstance(store, GuardedStore):
        buf = await store.get(key, proto)  # checked there, zarr's parser included
    else:
        buf = await store.get(key, proto, RangeByteRequest(0, MAX_METADATA_BYTES + 1))
    return None if buf is None else parse_json(buf.to_bytes(), f"{where}: {key}")
