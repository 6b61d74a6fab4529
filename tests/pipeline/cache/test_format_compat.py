"""Format-2 caches written before the second renovation (``tests/fixtures/v2/``, by
``tests/fixtures/make_v2_caches.py`` at commit bf80ab4) still read and verify, and the current code
writes the same bytes for the same inputs: every chunk and done flag identical, and the metadata
identical but for when and where it was written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.read import LogitCache
from pipeline.cache.verify import verify_cache
from pipeline.checkpoints import load_checkpoint
from tests.fixtures.make_v2_caches import KINDS, cache_command

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "tests" / "fixtures" / "v2"
#: What differs between two writes of the same inputs: the clock and the folder they ran in.
VOLATILE = {"created", "added", "completed_at", "file"}


def _stable(value: object) -> object:
    """``value`` (parsed JSON) without the keys that record when and where it was written."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _objects_of_bundle(bundle: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(bundle) as zf:
        return {n: zf.read(n) for n in zf.namelist() if not n.endswith("/")}


def _objects_of_directory(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("store", list(KINDS))
def test_an_old_format_2_cache_reads_and_verifies(store: str) -> None:
    bundle = FIXTURES / f"{KINDS[store]}.zarr.zip"
    report = verify_cache(str(bundle), progress=False)
    assert report.ok, report
    cache = LogitCache(str(bundle))
    assert (cache.n, cache.num_classes, len(cache.members)) == (40, 5, 1)
    assert cache.storage(0).kind == store.partition(":")[0]
    # The stored rows are the teacher's logits (float16), read through today's reader and its
    # checks: every kept value is the teacher's logit of the class stored beside it.
    data = np.load(FIXTURES / "data.npz")
    teacher = load_checkpoint(FIXTURES / "teacher.pt").model.eval()
    with torch.no_grad():
        want = teacher(torch.from_numpy(data["x_train"])).numpy()
    shards = [cache.read_member(s, 0) for s in range(3)]
    if store == "dense":
        got = np.concatenate([s["logits"] for s in shards]).astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    else:
        idx = np.concatenate([s["indices"] for s in shards]).astype(np.int64)
        values = np.concatenate([s["values"] for s in shards]).astype(np.float32)
        np.testing.assert_allclose(values, np.take_along_axis(want, idx, 1), rtol=1e-3, atol=1e-3)
        if store.startswith("topk"):  # the K largest, largest first
            np.testing.assert_array_equal(idx, np.argsort(-want, 1, kind="stable")[:, :3])


@pytest.mark.parametrize("store", list(KINDS))
def test_the_same_inputs_give_the_same_bytes(store: str, tmp_path: Path) -> None:
    for name in ("data.npz", "teacher.pt"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    name = KINDS[store]
    subprocess.run(cache_command(store, f"{name}.zarr"), cwd=tmp_path, env=env, check=True)
    old = _objects_of_bundle(FIXTURES / f"{name}.zarr.zip")
    new = _objects_of_directory(tmp_path / f"{name}.zarr")
    assert sorted(new) == sorted(old)
    for key, blob in old.items():
        if key.endswith("zarr.json"):
            assert _stable(json.loads(new[key])) == _stable(json.loads(blob)), key
        else:
            assert new[key] == blob, key
