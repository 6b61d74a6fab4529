"""View caches end to end: the real CLI writes them (resumably, over dask workers), stage two
replays each stored view with its own rows, and ``cache verify --replay`` proves the replay."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from pipeline.augment import ViewPlan
from pipeline.cache.header import ATTR_KEY
from pipeline.cache.read import LogitCache
from pipeline.checkpoints import load_checkpoint, member_paths
from pipeline.datasets import load_dataset
from pipeline.training.config import StudentConfig
from pipeline.training.views import view_source, view_use
from stages.cli import main
from tests.helpers.data import write_npz
from tests.helpers.process import cli_command, kill, run, start

pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]
AUG = "shift:2+flip"
ARGS = ["--views", "4", "--augment", AUG, "--include-identity", "--rows-per-shard", "50"]


def cache_cmd(teacher: Path, spec: str, out: Path, *extra: str) -> list[str]:
    return cli_command(
        *("cache-logits", "--teacher", str(teacher)),
        *("--dataset", spec, "--out", str(out), "--quiet", "--device", "cpu", *ARGS, *extra),
    )


def arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r", use_consolidated=False)
    h = g.attrs[ATTR_KEY]
    names = ["ids", "labels", "view_params", "row_start", "row_count"]
    names += [f"members/{m['index']}/{a}" for m in h["members"] for a in ("logits", "done")]
    return {n: g[n][:] for n in names}


def assert_same(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    for name in x:
        assert x[name].dtype == y[name].dtype and np.array_equal(x[name], y[name]), name


@pytest.fixture(scope="module")
def view_cache(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, npz_path: Path) -> Path:
    out = tmp_path_factory.mktemp("views") / "v.zarr"
    res = CliRunner().invoke(
        main,
        [
            *("cache-logits", "--teacher", str(teacher_dir), "--dataset", f"npz:{npz_path}:train"),
            *("--out", str(out), "--quiet", "--device", "cpu", *ARGS),
        ],
    )
    assert res.exit_code == 0, res.output
    return out


def test_the_cache_holds_each_views_logits_and_explicit_parameters(
    view_cache: Path, teacher_dir: Path, npz_path: Path
) -> None:
    cache = LogitCache(view_cache)
    h = cache.header
    assert h.rows == {"n": 2400, "per_shard": 200, "views": 4, "positions": 1}
    assert h.augment["spec"] == "shift:max=2+flip:p=0.5" and h.augment["version"] == 1
    assert list(h.augment["params"]) == ["shift.dy", "shift.dx", "flip.on"]
    data = load_dataset(f"npz:{npz_path}:train")
    plan = ViewPlan.make(AUG, 4, seed=0, include_identity=True, shape=(8, 8))
    params = cache.read_view_params()
    assert params.dtype == np.float32 and np.array_equal(params, plan.params(data.ids))
    assert not params[::4].any()  # view 0: the identity
    # Each row is the teacher's logits on its own view, rebuilt from the stored numbers.
    model = load_checkpoint(member_paths(teacher_dir)[1]).model.eval()
    x = plan.augment_pipeline.apply(np.repeat(data.x[:50], 4, axis=0), params[:200])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy().astype(np.float16)
    assert np.allclose(cache.read_member(0, 1)["logits"], want, atol=2e-3)
    assert not np.array_equal(want[0], want[1])  # the views really differ


@pytest.mark.parametrize("budget", [2 << 30, 20_000])
def test_training_batches_pair_each_replayed_view_with_its_own_row(
    view_cache: Path, teacher_dir: Path, npz_path: Path, budget: int
) -> None:
    """The teacher's logits on the batch's (replayed) inputs are exactly the batch's targets: a
    row taken by batch order or from another view would differ (views shift and flip)."""
    cache = LogitCache(view_cache)
    data = load_dataset(f"npz:{npz_path}:train")
    cfg = StudentConfig(cache=str(view_cache), views_per_epoch=2, out="unused")
    source, plan = view_source(
        cache,
        data.x,
        view_use(cfg, cache),
        [0],
        "mean-probs",
        1.0,
        64,
        budget,
        3,
        cache.done_shards(),
        data.y,
    )
    assert plan.mode == ("memory" if budget > 1 << 20 else "stream")
    model = load_checkpoint(member_paths(teacher_dir)[0]).model.eval()
    served = []
    for xb, tb, yb, rows in source.epoch(1, with_rows=True):
        with torch.no_grad():
            fresh = model(xb).half().float()
        assert torch.allclose(fresh, tb, atol=2e-3)
        assert torch.equal(yb, torch.from_numpy(data.y[rows]))
        served.append(rows)
    counts = np.bincount(np.concatenate(served), minlength=len(data))
    assert (counts == 2).all() and source.num_rows == 1200


def test_train_student_records_how_it_used_views(
    view_cache: Path, npz_path: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    base = [
        *("train-student", "--cache", str(view_cache), "--student", "mlp:16", "--epochs", "1"),
        *("--device", "cpu", "--quiet"),
    ]
    modes = {
        "consistent": [],
        "none": ["--views-per-epoch", "0"],
        "inconsistent": ["--views-per-epoch", "0", "--augment", "shift:2"],
    }
    for mode, extra in modes.items():
        out = tmp_path / mode
        res = runner.invoke(main, [*base, *extra, "--out", str(out)])
        assert res.exit_code == 0, res.output
        record = json.loads((out / "metrics.json").read_text())["views"]
        assert record["mode"] == mode and record["cache_views"] == 4
    refused = runner.invoke(main, [*base, "--augment", "shift:2", "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "already replayed" in refused.output
    assert "Traceback" not in refused.output


def test_verify_replay_passes_then_names_the_altered_view(
    view_cache: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    args = ["cache", "verify", "--quiet", "--replay", "2400", "--teacher", str(teacher_dir)]
    ok = runner.invoke(main, [*args, str(view_cache)])
    assert ok.exit_code == 0, ok.output
    assert "replay: 4800 stored rows" in ok.output and "OK" in ok.output
    bad = tmp_path / "bad.zarr"
    res = runner.invoke(main, ["cache", "copy", str(view_cache), str(bad), "--quiet"])
    assert res.exit_code == 0, res.output
    g = zarr.open_group(str(bad), mode="r+", use_consolidated=False)
    params = g["view_params"][:200]
    params[6] = [2, 2, 1] if not np.array_equal(params[6], [2, 2, 1]) else [-2, -2, 0]
    g["view_params"][:200] = params
    failed = runner.invoke(main, [*args, str(bad)])
    assert failed.exit_code == 1, failed.output
    # The parameters are drawn again from (seed, sample id, view) by every read and by verify,
    # before the replay is needed.
    assert "row 6, view 2 of sample id 1" in failed.output
    assert "differ from the ones drawn again from the cache's seed" in failed.output
    run = ["train-student", "--cache", str(bad), "--out", str(tmp_path / "run"), "--epochs", "1"]
    trained = runner.invoke(main, run)
    assert trained.exit_code == 2 and "row 6, view 2 of sample id 1" in trained.output
    assert "Traceback" not in failed.output


@pytest.mark.slow
def test_view_cache_resumes_after_sigkill_and_on_dask_workers_bit_identically(
    tmp_path: Path, teacher_dir: Path
) -> None:
    spec = f"npz:{write_npz(tmp_path / 'big.npz', n_train=6000, n_test=10)}:train"
    ref = tmp_path / "ref.zarr"
    done = run(cache_cmd(teacher_dir, spec, ref), timeout=180)
    assert done.returncode == 0, done.stderr
    rng = random.Random(5)
    killed = tmp_path / "killed.zarr"
    for _ in range(3):
        p = start(
            cache_cmd(teacher_dir, spec, killed),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(1.0, 2.5))
        kill(p)
    resumed = run(cache_cmd(teacher_dir, spec, killed), timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert_same(killed, ref)
    runner = CliRunner()
    dist = tmp_path / "dist.zarr"
    res = runner.invoke(
        main,
        [
            *("cache-logits", "--teacher", str(teacher_dir), "--dataset", spec),
            *("--out", str(dist), "--quiet", "--device", "cpu", "--workers", "2", *ARGS),
        ],
    )
    assert res.exit_code == 0, res.output
    assert_same(dist, ref)


@pytest.mark.slow
def test_quick_consistency_experiment_writes_its_report(tmp_path: Path, npz_path: Path) -> None:
    out = tmp_path / "rep"
    res = CliRunner().invoke(
        main,
        [
            *("reproduce", "consistency", "--dataset", f"npz:{npz_path}", "--scale", "quick"),
            *("--student", "mlp:16", "--seeds", "0,1", "--views", "1,2", "--device", "cpu"),
            *("--out", str(out)),
        ],
    )
    assert res.exit_code == 0, res.output
    report = (out / "report.md").read_text()
    for arm in (
        "hard labels + live augmentation",
        "single-view cache + live augmentation",
        "view cache K = 1",
        "view cache K = 2",
        "online KD + live augmentation",
    ):
        assert arm in report
    figures = json.loads((out / "reproduce.json").read_text())["experiments"]["consistency"]
    arms = figures["figures"]["arms"]
    assert arms["view cache K = 2"]["mode"] == "consistent"
    assert arms["single-view cache + live augmentation"]["mode"] == "inconsistent"
    assert len(arms["online KD + live augmentation"]["errors"]) == 2
    assert arms["view cache K = 2"]["bytes"] > arms["view cache K = 1"]["bytes"] > 0
    assert (out / "consistency.png").is_file()


def test_cache_info_counts_every_views_row(view_cache: Path) -> None:
    """600 samples x 4 views: 2400 rows, 200 of them per 50-sample shard, and the augment line
    (a view cache once showed its sample count as its rows and no views)."""
    res = CliRunner().invoke(main, ["cache", "info", str(view_cache)])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "rows       2400 (600 samples x 4 views; labeled)" in out
    assert "(50 samples = 200 rows per shard)" in out
    spec = json.loads(CliRunner().invoke(main, ["cache", "info", str(view_cache), "--json"]).output)
    assert spec["rows"] == 2400 and spec["views"] == 4 and spec["positions"] == 1
    assert f"views      4 per sample, augment {spec['augment']}; view 0 is the input itself" in out
