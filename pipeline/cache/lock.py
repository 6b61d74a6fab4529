"""One writer at a time: the writer lock of a cache (:class:`CacheLock`), a lock file in a
directory or a lease in an object store (:class:`StoreLease`), both at ``CACHE/kd-writer.lock``.

This module imports without torch.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from zarr.core.sync import sync
from zarr.storage import FsspecStore

from pipeline.cache.location import CacheLocation, local_path
from pipeline.errors import CacheError, StorageError, explain

LEASE_NAME = "kd-writer.lock"
LEASE_SECONDS = 120.0  # an object-store lease not renewed for this long is taken over
LEASE_RENEW_SECONDS = 30.0


# -------------------------------------------------------------------------------------------- lease
def _clock(epoch: object) -> str:
    """``HH:MM:SS`` local time of a POSIX timestamp (a lease's expiry)."""
    return time.strftime("%H:%M:%S", time.localtime(float(epoch)))  # type: ignore[arg-type]


class StoreLease:
    """An object-store cache's writer lock: ``<cache>/kd-writer.lock``, a lease (owner, expiry).

    Taking it is one conditional PUT (``If-None-Match: *``), which S3 (and moto) perform atomically:
    of two writers exactly one creates the object, and the second is refused with a message naming
    the first. A lease whose expiry has passed (its writer died without releasing it) is taken over
    by a compare-and-swap PUT (``If-Match: <its ETag>``), so two writers taking over the same dead
    lease cannot both win either. The holder renews it every ``LEASE_RENEW_SECONDS`` (again
    compare-and-swap on its own ETag); a renewal that fails means the lease was lost (the holder
    stalled past its expiry and another writer took over), which :meth:`check` reports before the
    cache is marked complete.

    Limits: stores without conditional writes are refused (no silent fallback). A writer frozen
    longer than ``LEASE_SECONDS`` loses its lease and may still write shards before it notices;
    those shards carry the same deterministic bytes the new writer computes, and each shard is one
    object, so the damage is duplicate work.
    """

    def __init__(self, location: str | CacheLocation, seconds: float = LEASE_SECONDS) -> None:
        where = CacheLocation.parse(location)
        self.location = where.display
        store = where.open("w")
        if not isinstance(store, FsspecStore):
            raise CacheError(f"{where}: an object-store lease needs an object-store URL (s3://...)")
        self.fs = store.fs
        self.key = f"{store.path.rstrip('/')}/{LEASE_NAME}"
        self.seconds = seconds
        self.owner = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "owner": self.owner,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "renewed": now,
                "expires": now + self.seconds,
            }
        ).encode()

    def _put(self, **cond: str) -> str:
        out = sync(self.fs._pipe_file(self.key, self._body(), **cond))
        return out["ETag"]

    def read(self) -> tuple[dict, str | None]:
        """(the lease's content, its ETag), or ({}, None) when there is none."""
        try:
            info = sync(self.fs._info(self.key))
            body = sync(self.fs._cat_file(self.key))
        except FileNotFoundError:
            return {}, None
        try:
            content = json.loads(body)
        except ValueError:
            content = {}
        return (content if isinstance(content, dict) else {}), info.get("ETag")

    def acquire(self) -> StoreLease:
        for _ in range(3):
            try:
                self.etag = self._put(mode="create")
            except FileExistsError:
                other, etag = self.read()
                if etag is None:
                    continue  # released between our PUT and our read: try again
                if float(other.get("expires", 0)) > time.time():
                    raise CacheError(
                        f"{self.location}: another process is writing this cache (pid "
                        f"{other.get('pid')} on {other.get('host')}, since {other.get('since')}, "
                        f"lease {other.get('owner')} valid until "
                        f"{_clock(other.get('expires', 0))}); wait for it to finish, or for its "
                        "lease to expire if that process is gone"
                    ) from None
                try:  # expired: take it over, atomically against other takers
                    self.etag = self._put(IfMatch=etag)
                except (OSError, FileExistsError):
                    continue  # someone else took it over (or renewed it) first: look again
            except OSError as e:
                # A missing bucket or refused credentials fail this first write too: say that, not
                # that conditional writes are missing.
                reason = explain(e, self.location)
                if isinstance(reason, StorageError) and not _conditional_write_refused(e):
                    raise reason from e
                raise CacheError(
                    f"{self.location}: could not take the writer lease ({e}); the "
                    "object store must support conditional writes (If-None-Match), as "
                    "AWS S3 does"
                ) from None
            self._thread = threading.Thread(target=self._renew_loop, name="kd-lease", daemon=True)
            self._thread.start()
            return self
        raise CacheError(
            f"{self.location}: could not take the writer lease (it changed hands while we tried)"
        )

    def _renew_loop(self) -> None:
        renewed = time.time()
        while not self._stop.wait(min(LEASE_RENEW_SECONDS, self.seconds / 4)):
            try:
                self.etag = self._put(IfMatch=self.etag or "")
                renewed = time.time()
                continue
            except Exception as e:  # noqa: BLE001 - decided below; reported by check()
                error = f"{type(e).__name__}: {e}"
            # A failed renewal is not yet a lost lease: a throttled or dropped request leaves it
            # ours. It is lost when someone else holds it, or when we could not renew it before it
            # expired.
            try:
                other, _ = self.read()
                taken = other.get("owner") != self.owner
            except Exception:  # noqa: BLE001 - the store is unreachable: only expiry decides
                taken = False
            if taken or time.time() > renewed + self.seconds:
                self.lost = (
                    error if not taken else f"taken over by lease {other.get('owner')} ({error})"
                )
                return

    def check(self) -> None:
        """Raise if the lease was lost (taken over by another writer after this one stalled)."""
        if self.lost:
            raise CacheError(
                f"{self.location}: this writer lost its lease ({self.lost}); another "
                "process may be writing the cache. Re-run the command to resume it"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.etag is not None and not self.lost:
            other, etag = self.read()
            if other.get("owner") == self.owner:  # never delete a lease someone else took over
                sync(self.fs._rm_file(self.key))
        self.etag = None


def _conditional_write_refused(e: BaseException) -> bool:
    """Whether the store rejected the conditional PUT itself (501 NotImplemented, or a 400 naming
    the If-None-Match header), rather than failing for a reason any write would."""
    for cause in (e, e.__cause__, e.__context__):
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            text = str(response.get("Error", {}).get("Message", ""))
            return code in ("NotImplemented", "501") or "If-None-Match" in text
    return "If-None-Match" in str(e) or "NotImplemented" in str(e)


# --------------------------------------------------------------------------------------------- lock
class CacheLock:
    """One writer at a time: ``CACHE/kd-writer.lock`` (created exclusively) names the writer.

    In a directory: a lock left by a process that died (SIGKILL) on this host is taken over; a live
    one makes the second writer fail with a message naming the first. The lock file appears with its
    content (written to a temp file, then hard-linked into place), so a kill can never leave an
    empty lock that names no one. In an object store (``s3://``) the same key holds a lease taken
    with a conditional PUT (see :class:`StoreLease`).
    """

    NAME = LEASE_NAME

    def __init__(self, location: str | Path | CacheLocation) -> None:
        where = CacheLocation.parse(location)
        self.lease = StoreLease(where) if where.kind == "url" else None
        self.path = local_path(where.text) / self.NAME if self.lease is None else None
        self.held = False

    def check(self) -> None:
        """Raise ``CacheError`` if an object-store lease was lost meanwhile (a lock file is not)."""
        if self.lease is not None:
            self.lease.check()

    def acquire(self) -> CacheLock:
        if self.lease is not None:
            self.lease.acquire()
            self.held = True
            return self
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        tmp = self.path.with_name(f"{self.NAME}.{me['pid']}.tmp")
        try:
            tmp.write_text(json.dumps(me))  # inside: a full disk must not leave it behind
            return self._acquire(tmp, me)
        finally:
            tmp.unlink(missing_ok=True)

    def _acquire(self, tmp: Path, me: dict) -> CacheLock:
        for _ in range(2):
            try:
                os.link(tmp, self.path)  # atomic, and fails if the lock exists
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == me["host"] and not _pid_alive(int(other.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # stale: its writer is gone
                    continue
                raise CacheError(
                    f"{self.path.parent}: another process is writing this cache (pid "
                    f"{other.get('pid')} on {other.get('host')}, since {other.get('since')}); wait "
                    f"for it to finish, or remove {self.path} if that process is gone"
                ) from None
            self.held = True
            self._remove_stale_temps(me["pid"])
            return self
        raise CacheError(f"{self.path}: could not take the writer lock")

    def _remove_stale_temps(self, mine: int) -> None:
        """Delete lock temp files of writers killed between writing and unlinking them (a kill
        can land there; the lock itself is then taken over, its temp file would stay forever)."""
        for tmp in self.path.parent.glob(f"{self.NAME}.*.tmp"):
            try:
                pid = int(tmp.name[len(self.NAME) + 1 : -len(".tmp")])
            except ValueError:
                continue
            if pid != mine and not _pid_alive(pid):
                tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            if self.lease is not None:
                self.lease.release()
            else:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> CacheLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed child not yet reaped) is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True
