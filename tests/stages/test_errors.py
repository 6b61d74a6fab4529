"""Nothing silently wrong, no tracebacks (issue 21): every command, on damaged metadata, failing
storage, a full disk, a hostile bundle or a checkpoint naming code, ends with one message line
(``error: ...``, exit 2; ``cache verify`` reports problems with exit 1) and never a traceback.

Through the real CLI (click's runner in process, a subprocess where the process's own output
matters), against real caches, a real S3 API (moto) and, where the machine allows, a real full
file system (a small tmpfs).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from pipeline.cache import copying, listing
from tests.helpers.cli import cli, one_error
from tests.helpers.damage import flip_first_byte, rle_frame
from tests.helpers.process import free_port, kd, peak_rss
from tests.helpers.s3 import S3_BUCKET

ZEN = "Beautiful is better than ugly"
pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]


def copy_of(cache: Path, to: Path) -> Path:
    shutil.copytree(cache, to)
    return to


def train(cache: str | Path, out: Path, *extra: str) -> tuple[int, str]:
    return cli(
        "train-student",
        "--cache",
        str(cache),
        "--student",
        "mlp:16",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--quiet",
        *extra,
    )


# ------------------------------------------------------------------------ damaged metadata
def test_flipped_byte_in_an_array_zarr_json_is_named_by_verify_and_train(
    cache_path: Path, tmp_path: Path
) -> None:
    bad = copy_of(cache_path, tmp_path / "bad.zarr")
    flip_first_byte(bad / "members/1/logits/zarr.json")
    code, out = cli("cache", "verify", str(bad), "--quiet")
    assert code == 1 and "Traceback" not in out, out
    assert "array members/1/logits:" in out
    assert "members/1/logits/zarr.json is not valid JSON" in out
    assert "result     1 PROBLEM(S)" in out
    one_error(
        *train(bad, tmp_path / "run"), str(bad), "members/1/logits/zarr.json", "is not valid JSON"
    )


def test_array_metadata_that_parses_but_is_not_the_formats_is_refused(
    cache_path: Path, tmp_path: Path
) -> None:
    bad = copy_of(cache_path, tmp_path / "bad.zarr")
    meta = bad / "members/0/logits/zarr.json"
    meta.write_text(meta.read_text().replace('"float16"', '"float64"'))
    code, out = cli("cache", "verify", str(bad), "--quiet")
    assert code == 1 and "data type 'float64'" in out, out
    one_error(*train(bad, tmp_path / "run"), "members/0/logits/zarr.json declares data type")


@pytest.mark.parametrize("damage", ["flipped", "nested"])
def test_damaged_root_metadata_is_refused_by_copy_and_pack(
    cache_path: Path, tmp_path: Path, damage: str
) -> None:
    bad = copy_of(cache_path, tmp_path / "bad.zarr")
    if damage == "flipped":
        flip_first_byte(bad / "zarr.json")
        says = "zarr.json is not valid JSON"
    else:  # RecursionError in json.loads before
        (bad / "zarr.json").write_bytes(b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
        says = "zarr.json nests 50001 levels deep"
    one_error(*cli("cache", "copy", str(bad), str(tmp_path / "c.zarr"), "--quiet"), says)
    one_error(*cli("cache", "pack", str(bad), str(tmp_path / "c.zarr.zip"), "--quiet"), says)
    assert not (tmp_path / "c.zarr").exists() and not list(tmp_path.glob("c*.zip"))
    one_error(*train(bad, tmp_path / "run"), says)


def test_an_out_whose_zarr_json_is_not_json_is_refused(
    teacher_dir: Path, npz_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    out.mkdir()
    (out / "zarr.json").write_text("this is not JSON")
    one_error(
        *cli(
            "cache-logits",
            "--teacher",
            str(teacher_dir),
            "--dataset",
            f"npz:{npz_path}:train",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ),
        f"{out}: zarr.json is not valid JSON",
    )


def test_cache_ls_lists_damaged_caches_and_goes_on(cache_path: Path, tmp_path: Path) -> None:
    shelf = tmp_path / "shelf"
    copy_of(cache_path, shelf / "a.zarr")
    flip_first_byte(copy_of(cache_path, shelf / "b.zarr") / "zarr.json")
    flip_first_byte(copy_of(cache_path, shelf / "c.zarr") / "members/0/done/zarr.json")
    code, out = cli("cache", "ls", str(shelf))
    assert code == 0 and "Traceback" not in out, out
    lines = out.splitlines()
    assert lines[0].startswith(f"{shelf / 'a.zarr'}  complete")
    assert lines[1].startswith(f"{shelf / 'b.zarr'}  UNREADABLE: ")
    assert "zarr.json is not valid JSON" in lines[1]
    assert lines[2].startswith(f"{shelf / 'c.zarr'}  UNREADABLE: ")
    assert "members/0/done/zarr.json" in lines[2]
    assert lines[3] == f"3 cache(s) under {shelf}, 2 unreadable"


# --------------------------------------------------------------------------------- storage
@pytest.fixture
def fresh_s3fs(s3_server: str) -> Iterator[str]:
    """s3fs keeps filesystems (and their credentials) per process: start each case afresh."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


def s3_commands(
    cache_path: Path, teacher_dir: Path, npz_path: Path, url: str, tmp_path: Path
) -> list[list[str]]:
    """Every kind of s3 use: read a cache, list, train from it, copy into it, write it."""
    return [
        ["cache", "info", url],
        ["cache", "ls", url.rsplit("/", 1)[0]],
        ["cache", "verify", url, "--quiet"],
        ["train-student", "--cache", url, "--device", "cpu", "--out", str(tmp_path / "r")],
        ["cache", "copy", str(cache_path), url, "--quiet"],
        [
            "cache-logits",
            "--teacher",
            str(teacher_dir),
            "--dataset",
            f"npz:{npz_path}:train",
            "--out",
            url,
            "--device",
            "cpu",
            "--quiet",
        ],
    ]


def test_wrong_credentials_are_named_for_every_s3_command(
    fresh_s3fs: str,
    cache_path: Path,
    teacher_dir: Path,
    npz_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moto.core.authorization import enable_iam_authentication

    url = f"s3://{S3_BUCKET}/creds/c.zarr"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    with enable_iam_authentication():
        for args in s3_commands(cache_path, teacher_dir, npz_path, url, tmp_path):
            line = one_error(
                *cli(*args), "refused the credentials (InvalidAccessKeyId", "AWS_ACCESS_KEY_ID"
            )
            assert "conditional writes" not in line, args


def test_credentials_without_permission_are_named(
    fresh_s3fs: str, cache_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3
    import s3fs
    from moto.core.authorization import enable_iam_authentication

    iam = boto3.client("iam")
    iam.create_user(UserName="no-rights")
    key = iam.create_access_key(UserName="no-rights")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    url = f"s3://{S3_BUCKET}/denied/c.zarr"
    with enable_iam_authentication():
        one_error(*cli("cache", "info", url), f"{url}: access denied by the object store")
        one_error(*cli("cache", "copy", str(cache_path), url, "--quiet"), "access denied")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        s3fs.S3FileSystem.clear_instance_cache()  # it holds the credentials it was made with
        one_error(*cli("cache", "info", url), "refused the credentials (SignatureDoesNotMatch")


def test_a_missing_bucket_is_named_for_every_s3_command(
    fresh_s3fs: str, cache_path: Path, teacher_dir: Path, npz_path: Path, tmp_path: Path
) -> None:
    url = "s3://no-such-bucket/team/c.zarr"
    for args in s3_commands(cache_path, teacher_dir, npz_path, url, tmp_path):
        line = one_error(*cli(*args), "the bucket does not exist (NoSuchBucket)")
        assert "conditional writes" not in line and "no-such-bucket" in line, args


def test_an_endpoint_that_is_down_is_named(
    fresh_s3fs: str, cache_path: Path, tmp_path: Path
) -> None:
    down = ["--storage-option", f"endpoint_url=http://127.0.0.1:{free_port()}"]  # nothing listens
    url = f"s3://{S3_BUCKET}/down/c.zarr"
    one_error(
        *cli("cache", "info", url, *down),
        f"{url}: cannot reach the storage endpoint",
        "endpoint_url",
    )
    one_error(
        *cli("cache", "copy", str(cache_path), url, "--quiet", *down),
        "cannot reach the storage endpoint",
    )


def test_no_credentials_at_all_is_named(
    fresh_s3fs: str, cache_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probing
    url = f"s3://{S3_BUCKET}/nocreds/c.zarr"
    one_error(
        *cli("cache", "info", url), "no credentials for the object store", "AWS_ACCESS_KEY_ID"
    )
    one_error(*cli("cache", "copy", str(cache_path), url, "--quiet"), "no credentials")


# ------------------------------------------------------------------------------- full disk
@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB file system (tmpfs), filled by the test; skipped where it cannot be mounted."""
    where = tmp_path / "tiny"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` but ``leave`` bytes; returns the filler (delete it to free the space)."""
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - leave))
    return filler


def leftovers(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if ".tmp" in p.name or p.name.endswith(".partial") or ".partial." in p.name
    )


def test_full_disk_during_train_student_leaves_no_partial_checkpoint(
    cache_path: Path, tiny_disk: Path
) -> None:
    fill(tiny_disk, leave=96 << 10)  # the run's JSON and CSV fit; a 1 MiB student does not
    run = tiny_disk / "run"
    one_error(
        *train(cache_path, run, "--student", "mlp:4096"),
        "no space left on the device",
        str(run),
        "free some space",
    )
    assert not (run / "student.pt").exists() and leftovers(tiny_disk) == []


def test_full_disk_during_cache_logits_copy_and_pack(
    cache_path: Path, teacher_dir: Path, npz_path: Path, tiny_disk: Path
) -> None:
    filler = fill(tiny_disk, leave=24 << 10)
    out = tiny_disk / "c.zarr"
    args = [
        "cache-logits",
        "--teacher",
        str(teacher_dir),
        "--dataset",
        f"npz:{npz_path}:train",
        "--out",
        str(out),
        "--rows-per-shard",
        "64",
        "--device",
        "cpu",
        "--quiet",
    ]
    one_error(*cli(*args), f"{out}: no space left on the device")
    one_error(
        *cli("cache", "copy", str(cache_path), str(tiny_disk / "copy.zarr"), "--quiet"),
        "no space left on the device",
    )
    one_error(
        *cli("cache", "pack", str(cache_path), str(tiny_disk / "p.zarr.zip"), "--quiet"),
        "no space left on the device",
    )
    assert leftovers(tiny_disk) == [] and not list(tiny_disk.glob("p*.zip"))
    filler.unlink()  # with space again, the same command resumes the cache
    code, text = cli(*args)
    assert code == 0 and "complete" in text, text


def test_no_space_while_saving_the_student_cleans_up(
    cache_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same, where no tmpfs can be mounted: the checkpoint's write fails half-way."""
    import torch

    def full_disk_save(obj: object, path: Path) -> None:
        Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", full_disk_save)
    run = tmp_path / "run"
    one_error(*train(cache_path, run), "no space left on the device", "student.pt.tmp-")
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json",
        "config.toml",
        "history.csv",
        "metrics.jsonl",
    ]


# -------------------------------------------------------------------------- trusting code
def checkpoint_recording(path: Path, spec: str) -> Path:
    """A real checkpoint whose recorded model spec is ``spec`` (the weights are an mlp's)."""
    from pipeline.checkpoints import save_checkpoint
    from pipeline.models import build_model

    model = build_model("mlp:8", (1, 8, 8), 5)
    save_checkpoint(path, model, {"model_spec": spec, "in_shape": [1, 8, 8], "num_classes": 5})
    return path


def test_a_checkpoint_naming_this_never_prints_the_zen_of_python(
    tmp_path: Path, npz_path: Path
) -> None:
    ckpt = checkpoint_recording(tmp_path / "evil.pt", "py:this:x")
    sys.modules.pop("this", None)
    for args in (
        ["evaluate", "--model", str(ckpt), "--dataset", f"npz:{npz_path}:test"],
        [
            "cache-logits",
            "--teacher",
            str(ckpt),
            "--dataset",
            f"npz:{npz_path}:train",
            "--out",
            str(tmp_path / "c.zarr"),
            "--device",
            "cpu",
            "--quiet",
        ],
        [
            "train-student",
            "--online-teacher",
            str(ckpt),
            "--dataset",
            f"npz:{npz_path}:train",
            "--out",
            str(tmp_path / "r"),
            "--device",
            "cpu",
        ],
    ):
        code, out = cli(*args)
        one_error(
            code,
            out,
            f"{ckpt} records the model spec 'py:this:x'",
            "import and run the Python module 'this'",
            "--trust-code this",
        )
        assert ZEN not in out and "this" not in sys.modules
    # The real process: nothing on stdout or stderr but the one line.
    done = kd("evaluate", "--model", str(ckpt), "--dataset", f"npz:{npz_path}:test")
    assert done.returncode == 2 and done.stdout == "" and ZEN not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr


def test_a_users_module_runs_only_when_trusted(
    tmp_path: Path, npz_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "kd_user_model.py").write_text(
        "import pathlib, torch\n"
        f"pathlib.Path({str(marker)!r}).write_text('code ran')\n"
        "class Net(torch.nn.Module):  # the layers of mlp:8, as the weights are\n"
        "    def __init__(self, classes):\n"
        "        super().__init__()\n"
        "        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8),\n"
        "                                       torch.nn.ReLU(), torch.nn.Linear(8, classes))\n"
        "    def forward(self, x):\n"
        "        return self.net(x)\n"
        "def factory(in_shape, num_classes):\n"
        "    return Net(num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = checkpoint_recording(tmp_path / "user.pt", "py:kd_user_model:factory")
    evaluate = ["evaluate", "--model", str(ckpt), "--dataset", f"npz:{npz_path}:test"]
    one_error(*cli(*evaluate), "--trust-code kd_user_model")
    one_error(*cli(*evaluate, "--trust-code", "kd_user"), "--trust-code kd_user_model")
    assert not marker.exists()
    code, out = cli(*evaluate, "--trust-code", "kd_user_model")
    assert code == 0 and marker.read_text() == "code ran", out
    ts = checkpoint_recording(tmp_path / "ts.pt", f"torchscript:{tmp_path / 'prog.pt'}")
    one_error(
        *cli("evaluate", "--model", str(ts), "--dataset", f"npz:{npz_path}:test"),
        "load and run the TorchScript program",
        f"--trust-code {tmp_path / 'prog.pt'}",
    )


def test_specialists_refuse_a_cache_whose_members_name_code(logits_cache, tmp_path: Path) -> None:
    import zarr

    rng = np.random.default_rng(0)
    location, _ = logits_cache(
        rng.normal(size=(1, 64, 4)), labels=rng.integers(0, 4, 64), rows_per_shard=16
    )
    group = zarr.open_group(str(location), mode="r+", use_consolidated=False)
    header = dict(group.attrs["kd_cache"])
    header["members"] = [{**header["members"][0], "model_spec": "py:this:x"}]
    group.attrs["kd_cache"] = header
    sys.modules.pop("this", None)
    code, out = cli(
        "specialists",
        "run",
        "--cache",
        str(location),
        "--out",
        str(tmp_path / "s"),
        "--specialists",
        "2",
        "--epochs",
        "1",
        "--device",
        "cpu",
    )
    one_error(code, out, "(member 0) records the model spec 'py:this:x'", "--trust-code this")
    assert ZEN not in out and "this" not in sys.modules


# ---------------------------------------------------------------------- decompression bombs
def rewrite_bundle(src: Path, dst: Path, replace: dict[str, int | bytes]) -> Path:
    """``src``'s entries into ``dst``; ``replace`` gives new content: bytes, or a number of zero
    bytes written as a deflated stream (a bomb: small on disk, huge when read)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        names = zin.namelist() + [k for k in replace if k not in zin.namelist()]
        for name in names:
            new = replace.get(name)
            if isinstance(new, int):
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(info, "w", force_zip64=True) as f:
                    for _ in range(new >> 20):
                        f.write(bytes(1 << 20))
            else:
                zout.writestr(name, new if new is not None else zin.read(name))
    return dst


def test_a_bundle_holding_a_huge_chunk_is_refused_before_it_is_inflated(
    cache_path: Path, tmp_path: Path
) -> None:
    good = tmp_path / "good.zarr.zip"
    copying.pack_cache(cache_path, good, progress=False, log=lambda s: None)
    bomb = rewrite_bundle(good, tmp_path / "bomb.zarr.zip", {"members/0/logits/c/0/0": 256 << 20})
    assert bomb.stat().st_size < 2 << 20  # 256 MiB of zeros, deflated
    says = "entry 'members/0/logits/c/0/0' expands to 268435456 bytes"
    code, out = cli("cache", "verify", str(bomb), "--quiet")
    assert code == 1 and says in out and "Traceback" not in out, out
    one_error(*train(bomb, tmp_path / "run"), "refusing this bundle", says)
    one_error(*cli("cache", "copy", str(bomb), str(tmp_path / "c.zarr"), "--quiet"), says)
    assert not (tmp_path / "c.zarr").exists()
    code, err, bomb_rss = peak_rss("cache", "verify", str(bomb), "--quiet")
    assert code == 1 and "Traceback" not in err
    code, _, good_rss = peak_rss("cache", "verify", str(good), "--quiet")
    assert code == 0 and bomb_rss < good_rss + (64 << 20), (bomb_rss, good_rss)


def crc(data: bytes) -> bytes:
    return np.uint32(google_crc32c.value(data)).tobytes()


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        (rle_frame(3, 1 << 30), "would decompress to 1073741824 bytes"),  # declares 1 GiB
        (rle_frame(64, None), "would decompress to no size"),  # streams out 8 MiB from 266 bytes
    ],
)
def test_a_chunk_whose_zstd_frame_would_expand_is_refused(
    cache_path: Path, tmp_path: Path, frame: bytes, says: str
) -> None:
    bad = copy_of(cache_path, tmp_path / "bad.zarr")
    (bad / "members/0/logits/c/2/0").write_bytes(frame + crc(frame))  # a valid checksum
    code, out = cli("cache", "verify", str(bad), "--quiet")
    assert code == 1 and "Traceback" not in out, out
    assert f"chunk members/0/logits/c/2/0 is corrupt (CacheError: {bad}: chunk " in out
    assert says in out and "holds at most 640 bytes" in out
    one_error(*train(bad, tmp_path / "run"), says)


def test_a_bundle_with_objects_besides_the_cache_is_not_copied_or_packed(
    cache_path: Path, tmp_path: Path
) -> None:
    good = tmp_path / "good.zarr.zip"
    copying.pack_cache(cache_path, good, progress=False, log=lambda s: None)
    big = rewrite_bundle(good, tmp_path / "big.zarr.zip", {f"junk/{i}": 2 << 20 for i in range(20)})
    for cmd, out in (("copy", tmp_path / "c.zarr"), ("pack", tmp_path / "p.zarr.zip")):
        one_error(
            *cli("cache", cmd, str(big), str(out), "--quiet"),
            "refusing this bundle",
            "entry 'junk/0' expands to 2097152 bytes",
            "(20 in all)",
        )
        assert not out.exists()
    small = rewrite_bundle(
        good,
        tmp_path / "small.zarr.zip",
        {f"junk/{i}": b"x" * 10 for i in range(3)} | {"notes.txt": b"hi"},
    )
    for cmd, out in (("copy", tmp_path / "c.zarr"), ("pack", tmp_path / "p.zarr.zip")):
        one_error(
            *cli("cache", cmd, str(small), str(out), "--quiet"),
            "holds 4 object(s) that are not part of the cache (junk/0, junk/1, junk/2, notes.txt)",
        )
        assert not out.exists()
    code, out = cli("cache", "verify", str(small), "--quiet")
    assert code == 1 and "4 object(s) are not part of the cache" in out, out


# ------------------------------------------------------------------------------ last resort
def test_a_bug_is_one_line_too(cache_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(prefix: object) -> list:
        raise RuntimeError("boom")

    monkeypatch.setattr(listing, "list_caches", broken)
    monkeypatch.delenv("KD_TRACEBACK", raising=False)
    one_error(
        *cli("cache", "ls", str(cache_path)), "internal error (RuntimeError: boom)", "this is a bug"
    )
    monkeypatch.setenv("KD_TRACEBACK", "1")
    with pytest.raises(AssertionError, match="let RuntimeError"):
        cli("cache", "ls", str(cache_path))


def test_json_reports_stay_json(cache_path: Path) -> None:
    """The success paths still print what they printed (no message machinery in the way)."""
    code, out = cli("cache", "info", str(cache_path), "--json")
    assert code == 0 and json.loads(out)["complete"] is True
