"""The one redaction rule: what kd-pipeline records or prints never holds a credential.

Every record the tool writes (a cache header, a run's ``config.json`` and ``metrics.json``) and
every message it prints goes through these functions, so one rule decides what is a secret:

- a storage option whose name (its last dotted part, any case) contains ``key``, ``secret``,
  ``token``, ``password`` or ``credential`` (:func:`is_secret`): its value is never recorded;
- the ``user:password@`` part of a URL;
- any value given as such a storage option in this process (:func:`register_secrets`, called
  where storage options are parsed), wherever it appears in a text.

Messages are also cleared of advice that would turn a refused file into running code: torch's
"re-run with ``weights_only=False``" (:func:`scrub_message`).

This module imports nothing but the standard library (the cache modules import it without torch).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

# A name containing any of these holds a credential: cloud keys and tokens, passwords, HTTP
# authorisation headers (client_kwargs.headers.Authorization), Azure SAS signatures.
SECRET_WORDS = (
    "key",
    "secret",
    "token",
    "password",
    "passwd",
    "credential",
    "auth",
    "sas",
    "signature",
)
MASK = "***"
STORAGE_FLAG = "--storage-option"

# Values given as credentials in this process: scrubbed from any text printed or recorded. Short
# values are not (a 1-character "secret" would mask every such character of every message).
_SECRETS: set[str] = set()
MIN_SECRET_CHARS = 4

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
# --storage-option KEY=VALUE (or --storage-option=KEY=VALUE) in free text, VALUE up to a blank or
# a quote (a shell-quoted value is masked by redact_command, which parses the command).
_FLAG_IN_TEXT = re.compile(
    r"(?P<flag>--storage-option(?:=|\s+))(?P<key>[^=\s'\"]+)="
    r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s'\"]+)"
)
# torch's advice on a refused pickle (and any like it): loading untrusted pickles runs code.
_UNSAFE_ADVICE = re.compile(
    r"[^.\n]*(weights_only\W{0,3}(set to|=)\W{0,3}False|add_safe_globals|safe_globals\()[^\n]*",
    re.IGNORECASE,
)


def is_secret(name: str) -> bool:
    """Whether a storage option (or config field) named ``name`` holds a credential.

    Args:
        name: the option's name; a dotted one (``client_kwargs.aws_secret_access_key``) is judged
            by its last part.
    """
    leaf = str(name).rsplit(".", 1)[-1].lower()
    return any(w in leaf for w in SECRET_WORDS)


def register_secrets(values: Iterable[Any]) -> None:
    """Remember credential values given in this process, so :func:`redact_text` masks them."""
    for v in values:
        if isinstance(v, str | int | float) and not isinstance(v, bool):
            text = str(v)
            if len(text) >= MIN_SECRET_CHARS:
                _SECRETS.add(text)


def secret_values(options: Mapping[str, Any]) -> list[Any]:
    """The values of ``options`` (nested mappings included) whose names are credentials."""
    out: list[Any] = []
    for k, v in options.items():
        if isinstance(v, Mapping):
            out += secret_values(v)
        elif is_secret(k):
            out.append(v)
    return out


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with every credential's value replaced by ``"***"`` (nested mappings too)."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, Mapping):
            out[k] = redact_options(v)
        else:
            out[k] = MASK if is_secret(k) else v
    return out


def _mask_registered(text: str) -> str:
    for s in sorted(_SECRETS, key=len, reverse=True):  # the longest first: one may hold another
        text = text.replace(s, MASK)
    return text


def redact_text(text: str) -> str:
    """``text`` without credentials: URL user info, ``--storage-option SECRET=VALUE`` values and
    every credential value registered in this process, each replaced by ``***``."""
    if not text:
        return text

    def flag(m: re.Match[str]) -> str:
        if not is_secret(m["key"]):
            return m[0]
        return f"{m['flag']}{m['key']}={MASK}"

    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _FLAG_IN_TEXT.sub(flag, text)
    return _mask_registered(text)


def redact_command(command: str) -> str:
    """A recorded command line without credentials: every ``--storage-option KEY=VALUE`` whose
    KEY is a credential keeps its KEY and loses its VALUE (``KEY=***``); URLs lose user info."""
    if not command:
        return command
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: not a command we wrote; mask what the text shows
        return redact_text(command)
    out: list[str] = []
    after_flag = changed = False
    for w in words:
        if after_flag or w.startswith(STORAGE_FLAG + "="):
            prefix = STORAGE_FLAG + "=" if not after_flag else ""
            key, eq, _ = w.removeprefix(prefix).partition("=")
            if eq and is_secret(key):
                w, changed = f"{prefix}{key}={MASK}", True
        after_flag = w == STORAGE_FLAG
        out.append(w)
    # A command without credentials is kept as it was written (re-quoting would change headers).
    return redact_text(shlex.join(out) if changed else command)


def redact_record(obj: Any) -> Any:
    """A JSON-like record (a header, a config, metrics) as it may be written or printed.

    ``storage_options`` mappings lose their credentials' values, ``command`` strings are redacted
    as command lines, every other string as text. Other field names are not judged: a record's
    own fields (``tokens``, ``sort_key``) are not credentials.
    """
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if k == "storage_options" and isinstance(v, Mapping):
                out[k] = redact_record(redact_options(v))
            elif k == "command" and isinstance(v, str):
                out[k] = redact_command(v)
            else:
                out[k] = redact_record(v)
        return out
    if isinstance(obj, list | tuple):  # JSON writes both as arrays
        return [redact_record(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def scrub_message(message: str) -> str:
    """A message as it may be printed: credentials redacted, and no advice to load a file with
    ``weights_only=False`` (or to allowlist its classes): a file from someone else is data, and
    unpickling it would run its code."""
    return _UNSAFE_ADVICE.sub("", redact_text(message))


def load_failure(e: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, without torch's advice.

    Torch suggests re-running with ``weights_only=False`` or allowlisting the file's classes: both
    would run code from the file. A file from someone else is data: never suggested.
    """
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (
            f"it holds a pickled Python object ({found[1]}), and kd-pipeline loads tensors and "
            "plain containers only: loading it otherwise would run code from the file"
        )
    why = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    if why:  # torch's own reason, without the paragraphs of advice around it
        first = why[1].split(" Please use")[0]
    else:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        if first.startswith("Weights only load failed"):
            first = "not plain tensors and containers"
    return f"{type(e).__name__}: {scrub_message(first)[:200]}"
