"""Sharing caches safely (issue 27): credentials are never recorded or printed, a copy never
destroys what its destination holds and never looks complete before it verified, nothing unchecked
is uploaded, a refusal leaves no asyncio noise, and a refused pickle is never met with advice to
unpickle it. Real stores, moto's S3 server on 127.0.0.1, the real CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

from pipeline.cache import copying, reports
from pipeline.cache.store_keys import COPY_MARKER
from pipeline.errors import CacheError, StorageError
from pipeline.redact import (
    load_failure,
    redact_command,
    redact_options,
    redact_record,
    redact_text,
    scrub_message,
)
from tests.helpers.caches import teacher_cache
from tests.helpers.cli import cli
from tests.helpers.damage import edit_header
from tests.helpers.process import kd
from tests.helpers.s3 import S3_BUCKET

SECRET, KEY, TOKEN = "sEcReT-5501", "kEy-id-7702", "tOkEn-9903"
CREDS = (SECRET, KEY, TOKEN)
NOISE = ("Traceback", "never retrieved", "Exception ignored")
pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def bucket_objects(prefix: str) -> dict[str, bytes]:
    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=S3_BUCKET, Key=o["Key"])["Body"].read() for o in listed}


def leaked(texts: dict[str, bytes | str], secrets: tuple[str, ...] = CREDS) -> list[str]:
    """``where: secret`` for every secret found in any of ``texts``."""
    out = []
    for where, text in texts.items():
        raw = text.encode() if isinstance(text, str) else text
        out += [f"{where}: {s}" for s in secrets if s.encode() in raw]
    return out


def copy_quietly(src: str | Path, dst: str | Path) -> reports.CopyResult:
    return copying.copy_cache(src, dst, progress=False, log=lambda s: None)


# ------------------------------------------------------------------------------------ the rule
def test_one_redaction_rule_for_options_commands_texts_and_records() -> None:
    opts = {"key": KEY, "endpoint_url": "http://h:9", "client_kwargs": {"aws_secret_access_key": 1}}
    assert redact_options(opts) == {
        "key": "***",
        "endpoint_url": "http://h:9",
        "client_kwargs": {"aws_secret_access_key": "***"},
    }
    cmd = (
        f"kd-pipeline cache-logits --out s3://b/c.zarr --storage-option secret={SECRET} "
        f"--storage-option=token={TOKEN} --storage-option 'key={KEY} x' "
        "--storage-option endpoint_url=http://u:pw@h:9000"
    )
    assert redact_command(cmd) == (
        "kd-pipeline cache-logits --out s3://b/c.zarr --storage-option 'secret=***' "
        "'--storage-option=token=***' --storage-option 'key=***' "
        "--storage-option endpoint_url=http://***@h:9000"
    )
    assert redact_text(f"ran with --storage-option secret={SECRET} on s3://b") == (
        "ran with --storage-option secret=*** on s3://b"
    )
    # A record's own fields named like credentials (tokens, sort_key) are data, kept as they are.
    record = {"tokens": 7, "command": cmd, "storage_options": {"token": TOKEN}, "n": [1, 2]}
    clean = redact_record(record)
    assert (
        clean["tokens"] == 7
        and clean["n"] == [1, 2]
        and clean["storage_options"] == {"token": "***"}
    )
    assert not leaked({"record": json.dumps(clean)})


def test_secret_storage_options_are_never_recorded_or_printed(
    s3_server: str, teacher_dir: Path, npz_path: Path, tmp_path: Path
) -> None:
    """Every file a run and a cache produce, every object in the bucket and everything printed:
    none holds the credentials given as storage options."""
    url = f"s3://{S3_BUCKET}/creds/c.zarr"
    opts = [f"secret={SECRET}", f"key={KEY}", f"token={TOKEN}"]
    flags = [a for o in opts for a in ("--storage-option", o)]
    printed: dict[str, str] = {}
    made = kd(
        "cache-logits",
        "--teacher",
        str(teacher_dir),
        "--dataset",
        f"npz:{npz_path}:train",
        "--out",
        url,
        "--rows-per-shard",
        "200",
        "--device",
        "cpu",
        "--quiet",
        *flags,
    )
    assert made.returncode == 0, made.stderr
    printed["cache-logits"] = made.stdout + made.stderr
    header = json.loads(bucket_objects("creds/c.zarr/zarr.json")["creds/c.zarr/zarr.json"])
    command = header["attributes"]["kd_cache"]["command"]
    assert "--storage-option 'secret=***'" in command and f"--out {url}" in command, command
    for args in (["cache", "info", url], ["cache", "info", url, "--json"]):
        code, out = cli(*args, *flags)
        assert code == 0, out
        printed[" ".join(args)] = out
    copy, bundle, run = tmp_path / "c.zarr", tmp_path / "c.zarr.zip", tmp_path / "run"
    for args in (
        ["cache", "copy", url, str(copy), "--quiet"],
        ["cache", "pack", url, str(bundle), "--quiet"],
        ["cache", "verify", url, "--quiet"],
    ):
        code, out = cli(*args, *flags)
        assert code == 0, out
        printed[" ".join(args[:2])] = out
    trained = kd(
        "train-student",
        "--cache",
        url,
        *flags,
        "--student",
        "mlp:8",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        str(run),
        "--quiet",
    )
    assert trained.returncode == 0, trained.stderr
    printed["train-student"] = trained.stdout + trained.stderr
    assert json.loads((run / "config.json").read_text())["storage_options"]["secret"] == "***"
    stored = {
        **bucket_objects("creds/"),
        **{f"copy/{k}": v for k, v in files_under(copy).items()},
        **{f"run/{k}": v for k, v in files_under(run).items()},
        "bundle": bundle.read_bytes(),  # zstd chunks, but metadata entries are stored as they are
    }
    import zipfile

    with zipfile.ZipFile(bundle) as z:
        stored |= {f"bundle/{n}": z.read(n) for n in z.namelist()}
    assert len(stored) > 30
    assert leaked(stored) == [] and leaked(printed) == []


def test_a_header_that_already_records_secrets_is_neither_printed_nor_carried(
    cache_path: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old.zarr"
    shutil.copytree(cache_path, old)
    recorded = (
        f"kd-pipeline cache-logits --out {old} --storage-option secret={SECRET} "
        f"--storage-option key={KEY} --storage-option token={TOKEN}"
    )
    edit_header(command=recorded)(old)  # as a cache made before commands were redacted
    assert SECRET in (old / "zarr.json").read_text()
    outputs = {}
    for args in (["cache", "info", str(old)], ["cache", "info", str(old), "--json"]):
        code, outputs[" ".join(args)] = cli(*args)
        assert code == 0, outputs
    info = json.loads(outputs[f"cache info {old} --json"])
    assert info["command"] == redact_command(recorded) and "secret=***" in info["command"]
    copy, bundle = tmp_path / "copy.zarr", tmp_path / "b.zarr.zip"
    assert cli("cache", "copy", str(old), str(copy), "--quiet")[0] == 0
    assert cli("cache", "pack", str(old), str(bundle), "--quiet")[0] == 0
    import zipfile

    with zipfile.ZipFile(bundle) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    assert leaked(outputs) == [] and leaked(files_under(copy)) == [] and leaked(entries) == []
    # Only the command changed: the copies are the same cache, and verify.
    theirs = json.loads((copy / "zarr.json").read_text())["attributes"]["kd_cache"]
    ours = json.loads((old / "zarr.json").read_text())["attributes"]["kd_cache"]
    assert {**ours, "command": None} == {**theirs, "command": None}
    assert cli("cache", "verify", str(copy), "--quiet")[0] == 0
    assert cli("cache", "verify", str(bundle), "--quiet")[0] == 0


# ------------------------------------------------------------------------ a copy never destroys
@pytest.fixture(scope="module")
def other_cache(
    tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, npz_path: Path
) -> Path:
    """Another cache of the same teachers and dataset, in shards of 200 rows (not 64): the same
    fingerprint, a different cache. Never write to it."""
    out = tmp_path_factory.mktemp("other") / "other.zarr"
    teacher_cache(teacher_dir, f"npz:{npz_path}:train", out, rows_per_shard=200)
    return out


def test_copy_onto_another_cache_is_refused_and_leaves_it_whole(
    cache_path: Path, other_cache: Path, tmp_path: Path
) -> None:
    b = tmp_path / "b.zarr"
    shutil.copytree(other_cache, b)
    before = files_under(b)
    code, out = cli("cache", "copy", str(cache_path), str(b), "--quiet")
    assert code == 2, out
    assert f"{b} already holds something else (another cache" in out and "remove" in out
    assert {k: v for k, v in files_under(b).items() if "kd-writer" not in k} == before
    code, out = cli("cache", "verify", str(b), "--quiet")
    assert code == 0 and "600 rows x 5 classes x 2 member(s), 3 shards" in out, out
    # A bundle that exists is refused too, and kept as it was.
    bundle = tmp_path / "b.zarr.zip"
    copying.pack_cache(other_cache, bundle, progress=False, log=lambda s: None)
    kept = bundle.read_bytes()
    code, out = cli("cache", "pack", str(cache_path), str(bundle), "--quiet")
    assert code == 2 and "is not a sound copy of the source" in out, out
    assert bundle.read_bytes() == kept


def test_copy_into_a_non_empty_s3_prefix_is_refused(s3_server: str, cache_path: Path) -> None:
    boto3.client("s3").put_object(Bucket=S3_BUCKET, Key="notes/x.zarr/readme.txt", Body=b"hi")
    code, out = cli("cache", "copy", str(cache_path), f"s3://{S3_BUCKET}/notes/x.zarr")
    assert code == 2 and "already holds other objects (readme.txt)" in out, out
    assert set(bucket_objects("notes/")) <= {
        "notes/x.zarr/readme.txt",
        "notes/x.zarr/kd-writer.lock",
    }


def test_a_killed_copy_is_incomplete_everywhere_until_a_rerun_completes_it(
    cache_path: Path, npz_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = tmp_path / "shelf" / "c.zarr"
    real_copy = copying._copy_object

    async def dying_copy(*args) -> None:  # noqa: ANN002
        if args[2] == "zarr.json":  # every other object written: the disk fills at the last
            raise OSError(28, "No space left on device")
        await real_copy(*args)

    monkeypatch.setattr(copying, "_copy_object", dying_copy)
    with pytest.raises(StorageError, match="no space left on the device"):
        copy_quietly(cache_path, dst)
    monkeypatch.setattr(copying, "_copy_object", real_copy)
    assert (dst / COPY_MARKER).exists() and (dst / "members/0/logits/zarr.json").exists()
    # Simulate the worst moment: the root's zarr.json landed, the verification did not run.
    shutil.copy(cache_path / "zarr.json", dst / "zarr.json")
    incomplete = f"{dst}: INCOMPLETE: an unfinished copy of {cache_path}"
    code, out = cli("cache", "ls", str(tmp_path / "shelf"))
    assert (
        code == 0 and f"{dst}  INCOMPLETE: an unfinished copy" in out and "  complete  " not in out
    )
    code, out = cli("cache", "info", str(dst))
    assert code == 2 and incomplete in out, out
    code, out = cli("cache", "verify", str(dst), "--quiet")
    assert code == 1 and f"{COPY_MARKER} present: an unfinished copy" in out, out
    code, out = cli(
        "train-student", "--cache", str(dst), "--student", "mlp:8", "--epochs", "1",
        "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet",
    )  # fmt: skip
    assert code == 2 and incomplete in out and "re-running `kd-pipeline cache copy" in out, out
    assert not (tmp_path / "run" / "student.pt").exists()
    # Another cache cannot take the unfinished copy over; the same source completes it.
    with pytest.raises(CacheError, match="is an unfinished copy of another cache"):
        copy_quietly(_variant(cache_path, tmp_path), dst)
    res = copy_quietly(cache_path, dst)
    assert (
        res.report.ok and res.copied == 0 and res.skipped > 60 and not (dst / COPY_MARKER).exists()
    )
    code, out = cli("cache", "ls", str(tmp_path / "shelf"))
    assert f"{dst}  complete" in out, out


def _variant(cache_path: Path, tmp_path: Path) -> Path:
    """``cache_path`` with another seed in its header: another cache."""
    v = tmp_path / "variant.zarr"
    shutil.copytree(cache_path, v)
    edit_header(seed=12345)(v)
    return v


def test_a_copy_that_fails_its_checks_uploads_nothing_unchecked_and_is_marked(
    s3_server: str, cache_path: Path, tmp_path: Path
) -> None:
    """A chunk that is a symlink to another file, and one with a flipped byte: neither is uploaded,
    the message quotes no file content, and what was uploaded is an unfinished copy."""
    outside = tmp_path / "private.txt"
    outside.write_bytes(b"PRIVATE-DATA-" * 40)
    linked = tmp_path / "linked.zarr"
    shutil.copytree(cache_path, linked)
    chunk = linked / "members/0/logits/c/2/0"
    chunk.unlink()
    chunk.symlink_to(outside)
    url = f"s3://{S3_BUCKET}/checked/linked.zarr"
    code, out = cli("cache", "copy", str(linked), url, "--quiet")
    assert code == 2 and "members/0/logits/c/2/0 is a symbolic link" in out, out
    assert "PRIVATE" not in out and "RIVA" not in out
    objects = bucket_objects("checked/linked.zarr/")
    assert "checked/linked.zarr/members/0/logits/c/2/0" not in objects
    assert not any(b"PRIVATE" in v for v in objects.values())
    assert "checked/linked.zarr/" + COPY_MARKER in objects
    code, out = cli("cache", "verify", str(linked), "--quiet")
    assert code == 1 and "is a symbolic link" in out and "PRIVATE" not in out, out

    flipped = tmp_path / "flipped.zarr"
    shutil.copytree(cache_path, flipped)
    chunk = flipped / "members/1/logits/c/4/0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    url = f"s3://{S3_BUCKET}/checked/flipped.zarr"
    code, out = cli("cache", "copy", str(flipped), url, "--quiet")
    assert code == 2 and "chunk members/1/logits/c/4/0 fails its checksum (crc32c)" in out, out
    objects = bucket_objects("checked/flipped.zarr/")
    assert "checked/flipped.zarr/members/1/logits/c/4/0" not in objects
    code, out = cli("cache", "ls", f"s3://{S3_BUCKET}/checked")
    assert "  complete  " not in out, out
    code, out = cli("cache", "verify", str(flipped), "--quiet")
    assert code == 1 and "chunk members/1/logits/c/4/0 is corrupt" in out, out
    assert "b'" not in out  # zarr's message quotes the stored checksum bytes: never echoed


def test_outputs_of_other_commands_refuse_a_cache(
    cache_path: Path, other_cache: Path, tmp_path: Path
) -> None:
    b = tmp_path / "b.zarr"
    shutil.copytree(other_cache, b)
    before = files_under(b)
    bundle = tmp_path / "b.zarr.zip"
    copying.pack_cache(other_cache, bundle, progress=False, log=lambda s: None)
    for out_at in (b, bundle):
        code, out = cli(
            "train-student", "--cache", str(cache_path), "--student", "mlp:8", "--epochs", "1",
            "--device", "cpu", "--out", str(out_at), "--quiet",
        )  # fmt: skip
        assert code == 2 and f"--out {out_at} is a logit cache" in out, out
    code, out = cli("train-teacher", "--dataset", "npz:x.npz:train", "--out", str(b))
    assert code == 2 and f"--out {b} is a logit cache" in out, out
    assert files_under(b) == before


# ------------------------------------------------------------------- no noise after a refusal
def test_refusals_leave_no_traceback_or_asyncio_warning(
    s3_server: str, cache_path: Path, tmp_path: Path
) -> None:
    """Damaged root metadata (a header edit, unparsable JSON) on a directory and in the bucket:
    each refusal is one message, never followed by "Future exception was never retrieved" or
    "Exception ignored in coroutine" (they came about half the time: run several times)."""
    views = tmp_path / "views.zarr"
    shutil.copytree(cache_path, views)
    edit_header(rows={"n": 600, "per_shard": 64, "views": 3, "positions": 1})(views)
    url = f"s3://{S3_BUCKET}/noise/c.zarr"
    copy_quietly(cache_path, url)
    boto3.client("s3").put_object(Bucket=S3_BUCKET, Key="noise/c.zarr/zarr.json", Body=b"{not")
    cases = [
        (["cache", "ls", str(tmp_path)], 0),
        (["cache", "verify", url, "--quiet"], 1),
    ]
    # A process each: the warnings came when a process exited right after the refusal, with
    # zarr's concurrent reads still pending (so one long-lived process does not show them).
    for args, want in cases:
        for _ in range(2):
            r = kd(*args, timeout=120)
            assert r.returncode == want, (args, r.stdout, r.stderr)
            assert not [n for n in NOISE if n in r.stderr + r.stdout], (args, r.stderr)


# ------------------------------------------------------------------------------ pickled .pt files
def test_a_pickled_checkpoint_is_refused_without_advice_to_unpickle_it(
    tmp_path: Path, npz_path: Path
) -> None:
    bad = tmp_path / "pickled.pt"
    torch.save({"kd_checkpoint": 1, "obj": np.random.default_rng(0)}, bad)
    try:
        torch.load(bad, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's own refusal, with its advice
        assert "weights_only` set to `False`" in str(e)
        reason = load_failure(e)
    assert (
        "numpy.random" in reason and "weights_only" not in reason and "safe_globals" not in reason
    )
    code, out = cli("evaluate", "--model", str(bad), "--dataset", f"npz:{npz_path}:test")
    assert code == 2 and f"{bad}: cannot load as a kd-pipeline checkpoint" in out, out
    assert "pickled Python object" in out
    for advice in ("weights_only=False", "set to `False`", "safe_globals", "allowlist"):
        assert advice not in out
    assert "weights_only" not in scrub_message(
        "Weights only load failed.\n Re-running `torch.load` with `weights_only` set to `False` "
        "will likely succeed"
    )
