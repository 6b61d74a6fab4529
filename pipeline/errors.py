"""Errors users see, and the one place that turns storage and OS failures into them.

Every error raised on bad input is a ``KDError`` whose message says what was expected, what was
found and what to do next; the CLI prints it without a traceback and exits with status 2.

Failures that come from below the library (a full disk, a refused credential, a missing bucket,
an endpoint that is down, metadata that is not JSON) arrive as ``OSError``, botocore, aiohttp,
``json`` or zarr exceptions. :func:`explain` is the one translation of those into a
:class:`StorageError` (or a :class:`CacheError` for damaged metadata) with the same three parts;
:func:`storage_errors` applies it to a block, naming the location the block works on. The
optional libraries are never imported here: exceptions are recognised by their class names, so
this module stays the lowest layer.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


class KDError(Exception):
    """A user-facing error: bad input, a refused operation, a corrupt artefact."""


class MissingExtraError(KDError):
    """An optional dependency that one command needs is not installed (named with its extra)."""

    def __init__(self, what: str, module: str, extra: str) -> None:
        super().__init__(
            f"{what} needs {module}, which is not installed: pip install 'kd-pipeline[{extra}]'"
        )


class DatasetError(KDError):
    """A dataset spec or file is wrong."""


class ModelSpecError(KDError):
    """A model spec cannot be parsed or built."""


class UntrustedCodeError(ModelSpecError):
    """A recorded model spec would import code the user did not allow (``--trust-code``)."""


class CheckpointError(KDError):
    """A checkpoint cannot be loaded or does not describe itself."""


class CacheError(KDError):
    """A logit cache is missing, partial, corrupt or does not match what it is used with."""


class StorageError(KDError):
    """Storage failed: credentials, a missing bucket, an unreachable endpoint, a full disk, ..."""


class DistributedError(KDError):
    """A torchrun job cannot run: bad launch variables, a failed rendezvous, ranks that disagree."""


#: How :func:`pipeline.options.field_problems` words a non-finite value (``ConfigError`` keys on
#: it: a field reported non-finite needs no second line saying ``nan`` is not ``> 0``).
NOT_FINITE = "must be a finite number"


def distinct_problems(problems: list[str]) -> list[str]:
    """``problems`` in order, each once, and nothing more about a field already reported as not
    finite (the problems start with the field's name: "lr must be > 0, got nan")."""
    out: list[str] = []
    not_finite: set[str] = set()
    for p in problems:
        name = p.split(" ", 1)[0]
        if p in out or name in not_finite:
            continue
        out.append(p)
        if NOT_FINITE in p:
            not_finite.add(name)
    return out


class ConfigError(KDError):
    """One or more configuration values are invalid (all problems are listed at once)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = distinct_problems(list(problems))
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


# ------------------------------------------------------------------------------ translation
CREDENTIAL_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
    "credentials) or AWS_PROFILE, or pass --storage-option profile=NAME"
)
ENDPOINT_HINT = (
    "check the endpoint (AWS_ENDPOINT_URL or --storage-option endpoint_url=URL) and the network, "
    "then re-run the command"
)
# botocore's ClientError codes, by what they mean for the user.
BAD_CREDENTIALS = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "InvalidClientTokenId",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
    }
)
DENIED = frozenset({"AccessDenied", "AllAccessDisabled", "Forbidden", "403"})
NO_CREDENTIALS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
)
# Connection failures of botocore, aiohttp and asyncio (no answer at all from the endpoint).
UNREACHABLE = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ServerTimeoutError",
        "ClientConnectionError",
        "ConnectionError",
        "TimeoutError",
        "InvalidURL",
        "InvalidUrlClientError",
    }
)
ZARR_METADATA = frozenset(
    {
        "MetadataValidationError",
        "NodeTypeValidationError",
        "GroupNotFoundError",
        "ArrayNotFoundError",
        "NodeNotFoundError",
        "ContainsArrayError",
        "ContainsGroupError",
        "ContainsArrayAndGroupError",
        "UnknownCodecError",
    }
)
OS_ERRORS = {
    errno.ENOSPC: "no space left on the device{at}; free some space or write somewhere else, "
    "then re-run the command",
    errno.EDQUOT: "disk quota exceeded{at}; free some space or write somewhere else, then re-run "
    "the command",
    errno.EACCES: "permission denied{at}; check the permissions, or use another location",
    errno.EPERM: "operation not permitted{at}; check the permissions, or use another location",
    errno.EROFS: "read-only file system{at}; write to another location",
    errno.ENOENT: "no such file or directory{at}; check the path",
    errno.ENOTDIR: "not a directory{at}; check the path",
    errno.EISDIR: "is a directory{at}; expected a file there",
    errno.EIO: "input/output error{at}: the disk or network file system failed; check it and "
    "re-run the command",
    errno.EMFILE: "too many open files{at}; raise the limit (`ulimit -n`) and re-run",
    errno.ENAMETOOLONG: "file name too long{at}; use a shorter path",
}


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it (``__cause__`` / ``__context__``), outermost first."""
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in out and len(out) < 20:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _client_code(e: BaseException) -> str | None:
    """The error code of a botocore ``ClientError`` (``NoSuchBucket``, ``AccessDenied``...)."""
    response = getattr(e, "response", None)
    if isinstance(response, dict) and isinstance(response.get("Error"), dict):
        code = response["Error"].get("Code")
        return str(code) if code is not None else None
    return None


def _from_object_store(chain: list[BaseException]) -> str | None:
    """A message for credential, permission, bucket and connection failures, or None."""
    for e in chain:
        names, code = _names(e), _client_code(e)
        if names & NO_CREDENTIALS:
            return (
                f"no credentials for the object store were found ({_one_line(e)}); "
                + CREDENTIAL_HINT
            )
        if code in BAD_CREDENTIALS:
            return (
                f"the object store refused the credentials ({code}: {_message(e)}); check "
                f"them: {CREDENTIAL_HINT}"
            )
        if code in DENIED:
            return (
                f"access denied by the object store ({code}: {_message(e)}); these credentials "
                "may not use this bucket or prefix: ask its owner for access, or use other "
                "credentials"
            )
        if code in ("NoSuchBucket", "404") and "bucket" in str(e).lower():
            return (
                "the bucket does not exist (NoSuchBucket); check the bucket name in the URL, "
                "and the endpoint and region the credentials belong to"
            )
        # A broken pipe is the reader of our output going away, not the store.
        if names & UNREACHABLE and not names & {
            "FileNotFoundError",
            "PermissionError",
            "BrokenPipeError",
        }:
            return f"cannot reach the storage endpoint ({_one_line(e)}); {ENDPOINT_HINT}"
        if code is not None:
            return (
                f"the object store answered {code} ({_message(e)}); check the URL and the "
                "permissions, or re-run later if the store is busy"
            )
    return None


def _message(e: BaseException) -> str:
    response = getattr(e, "response", None)
    msg = response.get("Error", {}).get("Message") if isinstance(response, dict) else None
    return str(msg or e).strip()


def _from_os(e: OSError) -> str:
    at = f": {e.filename}" if e.filename else ""
    if e.errno in OS_ERRORS:
        return OS_ERRORS[e.errno].format(at=at) + f" ([Errno {e.errno}] {e.strerror})"
    return f"{e.strerror or _one_line(e)}{at}; check the location and re-run the command"


def explain(exc: BaseException, where: object = None) -> KDError | None:
    """The user-facing error for a failure from below the library, or None if it is not one.

    Args:
        exc: what was raised. A ``KDError`` is returned as it is.
        where: the location being worked on (a path or URL), named first in the message.

    Returns:
        A ``StorageError`` (object store or file system), a ``CacheError`` (metadata that is not
        JSON, nested too deeply, or that zarr rejects), a ``KDError`` (out of memory), or None
        for anything else (a bug, which the caller should not dress up as bad input).
    """
    if isinstance(exc, KDError):
        return exc
    prefix = f"{where}: " if where is not None else ""
    chain = _chain(exc)
    text = _from_object_store(chain)
    if text is not None:
        return StorageError(prefix + text)
    for e in chain:
        if isinstance(e, OSError) and e.errno is not None:
            return StorageError(prefix + _from_os(e))
        names = _names(e)
        if names & {"JSONDecodeError", "UnicodeDecodeError", "RecursionError"}:
            return CacheError(
                f"{prefix}metadata that should be JSON could not be read "
                f"({_one_line(e)}); the file is damaged or not one kd-pipeline "
                "wrote: get a good copy, or write it again"
            )
        if names & ZARR_METADATA:
            return CacheError(
                f"{prefix}the Zarr metadata is damaged or not a cache's "
                f"({_one_line(e)}); check it with `kd-pipeline cache verify`, or "
                "get a good copy"
            )
        if isinstance(e, MemoryError):
            return KDError(
                f"{prefix}ran out of memory ({_one_line(e)}); lower --batch-size or "
                "--memory-budget, or use a machine with more memory"
            )
    if isinstance(exc, OSError):  # an OSError without an errno (s3fs raises some)
        return StorageError(f"{prefix}{_one_line(exc)}; check the location and re-run")
    return None


@contextlib.contextmanager
def storage_errors(
    where: object = None, keep: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Re-raise storage and OS failures inside the block as :func:`explain`'s ``KDError``.

    Args:
        where: the location the block works on, named in the message.
        keep: exception types that pass through unless an object store caused them (a store's
            ``FileNotFoundError`` for a missing key is an answer, a missing bucket is a failure).

    ``KDError`` and failures :func:`explain` does not know pass through unchanged.
    """
    try:
        yield
    except KDError:
        raise
    except Exception as e:
        if isinstance(e, keep) and _from_object_store(_chain(e)) is None:
            raise
        err = explain(e, where)
        if err is None:
            raise
        raise err from e
