"""The library API (``pipeline.api``): ``CacheDataset`` over every kind of cache and ``kd_loss``,
checked against stage two's own loader and loss on real caches written by the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.api import CacheDataset, SparseTargets, collate_soft_targets, kd_loss
from pipeline.errors import ConfigError, DistributedError
from pipeline.training.classification import CLASSIFICATION
from pipeline.training.config import StudentConfig
from pipeline.training.soft_targets import SEQUENCE, setup_soft_targets
from pipeline.training.train_config import TrainConfig
from stages.cli import main
from tests.helpers.data import make_corpus
from tests.helpers.optional import require

pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[3]


def cli(*args: str) -> None:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def caches(
    tmp_path_factory: pytest.TempPathFactory,
    teacher_dir: Path,
    npz_path: Path,
    cache_path: Path,
    one_torch_thread: None,
) -> dict[str, Path]:
    """The session's dense cache, and top-k, sampled and view caches of the same teacher."""
    root = tmp_path_factory.mktemp("api")
    out = {"dense": cache_path}
    base = ["--teacher", str(teacher_dir), "--dataset", f"npz:{npz_path}:train", "--device", "cpu"]
    for store in ("topk:2", "sampled:3"):
        out[store] = root / f"{store[:4]}.zarr"
        cli("cache-logits", *base, "--store", store, "--rows-per-shard", "128",
            "--out", str(out[store]), "--quiet")  # fmt: skip
    out["views"] = root / "views.zarr"
    cli("cache-logits", *base, "--views", "3", "--augment", "shift:2", "--include-identity",
        "--rows-per-shard", "100", "--out", str(out["views"]), "--quiet")  # fmt: skip
    return out


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """A top-k token cache of a 1-layer gpt teacher over 96 sequences of 16 tokens (trained
    enough that its top token is the next one about a fifth of the time)."""
    root = tmp_path_factory.mktemp("api-tokens")
    corpus = make_corpus(root / "c.txt", lines=200)
    spec = f"text:{corpus}:train:seq=16:count=96"
    cli("train-teacher", "--dataset", spec, "--model", "gpt:layers=1,dim=32,heads=2",
        "--members", "1", "--epochs", "4", "--batch-size", "16", "--lr", "0.01", "--eval", "",
        "--out", str(root / "teacher"), "--device", "cpu")  # fmt: skip
    cli("cache-logits", "--teacher", str(root / "teacher"), "--dataset", spec, "--store",
        "topk:4", "--rows-per-shard", "8", "--out", str(root / "t.zarr"), "--quiet")  # fmt: skip
    return root / "t.zarr"


def stage_two_batch(cache: Path, t: float, alpha: float, batch: int, seed: int) -> tuple:
    """Stage two's first batch of epoch 0 and its loss, as ``train-student`` sets them up."""
    cfg = StudentConfig(
        cache=str(cache), temperature=t, alpha=alpha, train=TrainConfig(batch_size=batch, seed=seed)
    )
    targets = setup_soft_targets(cfg, CPU, lambda line: None)
    return next(iter(targets.source.epoch(0))), targets.task.loss(cfg), targets.task


def first_batch(ds: CacheDataset, n: int) -> dict:
    items = []
    for item in ds:
        items.append(item)
        if len(items) == n:
            break
    return collate_soft_targets(items)


def same_targets(a: torch.Tensor | SparseTargets, b: torch.Tensor | SparseTargets) -> None:
    if isinstance(a, SparseTargets):
        assert isinstance(b, SparseTargets) and a.kind == b.kind
        for f in SparseTargets._ROW_FIELDS:
            assert torch.equal(getattr(a, f), getattr(b, f)), f
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["dense", "topk:2", "sampled:3", "views"])
def test_batches_and_kd_loss_equal_stage_twos(caches: dict[str, Path], kind: str) -> None:
    """The dataset serves stage two's rows in stage two's order (the same seed and block size),
    and kd_loss on them is the loss train-student minimises, to the bit."""
    (xb, tb, yb), stage_loss, task = stage_two_batch(caches[kind], 4.0, 0.7, 40, seed=5)
    assert task is CLASSIFICATION
    ds = CacheDataset(caches[kind], temperature=4.0, seed=5, block_rows=40)
    batch = first_batch(ds, 40)
    assert torch.equal(batch["inputs"], xb) and torch.equal(batch["labels"], yb)
    same_targets(batch["targets"], tb)
    logits = torch.randn(40, ds.num_classes, generator=torch.Generator().manual_seed(1)) * 3
    want = stage_loss(logits, tb, yb)
    got = kd_loss(logits, batch["targets"], 4.0, 0.7, batch["labels"], return_parts=True)
    for part in ("loss", "soft", "hard"):
        assert torch.equal(got[part], want[part]), part
    assert float(got["soft"]) > 0 and float(got["hard"]) > 0
    assert torch.equal(kd_loss(logits, batch["targets"], 4.0, 0.7, batch["labels"]), want["loss"])


def test_kd_loss_is_the_papers_formula_on_dense_targets() -> None:
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g) * 4
    y = torch.arange(8) % 5
    t, a = 4.0, 0.25
    p, log_q = torch.softmax(v / t, 1), torch.log_softmax(z / t, 1)
    kl = (p * (p.log() - log_q)).sum(1).mean()
    want = a * t * t * kl + (1 - a) * torch.nn.functional.cross_entropy(z, y)
    assert torch.allclose(kd_loss(z, v, t, a, y), want, atol=1e-6)
    assert torch.allclose(kd_loss(z, None, t, 0.0, y), torch.nn.functional.cross_entropy(z, y))
    with pytest.raises(ConfigError, match="hard labels"):
        kd_loss(z, v, t, 0.5)
    with pytest.raises(ConfigError, match="6 classes, the targets 5"):
        kd_loss(torch.randn(8, 6), v, t, 1.0)


def test_token_batches_and_kd_loss_equal_stage_twos(token_cache: Path) -> None:
    (xb, tb, yb), stage_loss, task = stage_two_batch(token_cache, 2.0, 0.5, 6, seed=3)
    assert task is SEQUENCE
    ds = CacheDataset(token_cache, temperature=2.0, seed=3, block_rows=6)
    assert ds.tokens and ds.labeled and len(ds) == 96
    batch = first_batch(ds, 6)
    p = 16
    assert batch["inputs"].shape == (6, p) and batch["labels"].shape == (6, p)
    sparse = batch["targets"]
    assert isinstance(sparse, SparseTargets) and sparse.index.shape == (1, 6, p, 4)
    assert torch.equal(batch["inputs"], xb) and torch.equal(batch["labels"], yb)
    same_targets(batch["targets"], tb)
    logits = torch.randn(6, p, ds.num_classes, generator=torch.Generator().manual_seed(2))
    # Stage two's loop flattens a sequence batch to rows (pipeline.training.loop.fit).
    want = stage_loss(logits.reshape(-1, ds.num_classes), tb.flat(), yb.reshape(-1))
    got = kd_loss(logits, batch["targets"], 2.0, 0.5, batch["labels"], return_parts=True)
    for part in ("loss", "soft", "hard"):
        assert torch.equal(got[part], want[part]), part
    with pytest.raises(ConfigError, match="token cache, which holds no augmented views"):
        CacheDataset(token_cache, views_per_epoch=2)


def rows_served(ds: CacheDataset, epoch: int, **loader: object) -> np.ndarray:
    """The epoch's inputs, as rows of the transfer set (each input is unique)."""
    ds.set_epoch(epoch)
    x = torch.cat([b["inputs"] for b in ds.loader(batch_size=50, **loader)])
    flat = ds.data.x.reshape(len(ds.data.x), -1)
    lookup = {row.tobytes(): i for i, row in enumerate(flat)}
    return np.array([lookup[r.numpy().tobytes()] for r in x.reshape(len(x), -1)])


def test_streamed_under_a_small_budget_every_row_once_with_its_targets(
    caches: dict[str, Path],
) -> None:
    memory = CacheDataset(caches["dense"], temperature=2.0)
    stream = CacheDataset(caches["dense"], temperature=2.0, memory_budget=40_000)
    assert memory.plan.mode == "memory" and stream.plan.mode == "stream"
    for epoch in (0, 1):
        rows = rows_served(stream, epoch)
        assert sorted(rows) == list(range(600))
    # The same row's targets either way (the members combined at T).
    by_row = {}
    for item in memory:
        by_row[item["inputs"].numpy().tobytes()] = item["targets"]
    for item in stream:
        assert torch.allclose(by_row[item["inputs"].numpy().tobytes()], item["targets"])
    # Loader workers split the shards: still every row once.
    rows = rows_served(stream, 2, num_workers=2)
    assert sorted(rows) == list(range(600))


@pytest.mark.parametrize("budget", [2 << 30, 40_000])
def test_ranks_serve_disjoint_equal_shares(caches: dict[str, Path], budget: int) -> None:
    shares = [
        CacheDataset(caches["dense"], memory_budget=budget, rank=r, world_size=3) for r in range(3)
    ]
    lengths = {len(s) for s in shares}
    assert len(lengths) == 1 and 3 * lengths.pop() >= 600 - 3
    served = [rows_served(s, 1) for s in shares]
    assert all(len(r) == len(shares[0]) for r in served)
    union = np.concatenate(served)
    assert len(set(union.tolist())) == len(union)  # disjoint
    with pytest.raises(DistributedError, match="num_workers=0"):
        rows_served(shares[0], 0, num_workers=2)
    loader = torch.utils.data.DataLoader(shares[0], batch_size=8, num_workers=2)
    with pytest.raises(DistributedError, match="num_workers=0"):  # raised in a worker
        next(iter(loader))
    with pytest.raises(ConfigError, match="rank=3 with world_size=3"):
        CacheDataset(caches["dense"], rank=3, world_size=3)


DDP_SCRIPT = """
import json, sys
import numpy as np
import torch
import torch.distributed as dist
from pipeline.api import CacheDataset, kd_loss

cache, budget, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo")
torch.manual_seed(0)
ds = CacheDataset(cache, temperature=2.0, memory_budget=budget)  # rank, world: torch.distributed's
student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, ds.num_classes))
model = torch.nn.parallel.DistributedDataParallel(student)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
steps, seen = [], []
for epoch in range(2):
    ds.set_epoch(epoch)
    n = 0
    for batch in ds.loader(batch_size=32):
        loss = kd_loss(model(batch["inputs"]), batch["targets"], 2.0, 0.9, batch["labels"])
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients: every rank must take this step
        opt.step()
        n += 1
        seen += [x.numpy().tobytes().hex() for x in batch["inputs"]] if epoch == 0 else []
    steps.append(n)
record = {"rank": dist.get_rank(), "world": ds.world_size, "len": len(ds), "steps": steps,
          "seen": seen, "weights": [float(w) for w in student[1].weight.flatten()]}
with open(f"{out}-{dist.get_rank()}.json", "w") as f:
    json.dump(record, f)
dist.destroy_process_group()
"""


def test_under_torchrun_each_rank_trains_on_its_share(
    caches: dict[str, Path], tmp_path: Path
) -> None:
    """Two DDP processes (torchrun, gloo) streaming the cache under a small budget: the ranks
    come from torch.distributed, their shares are disjoint, they take the same steps (no hang),
    and DDP keeps their weights equal. (In-memory shares: test_ranks_serve_disjoint_...)"""
    budget = 40_000
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "rank"
    res = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", str(script), str(caches["dense"]),
         str(budget), str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    a, b = (json.loads(Path(f"{out}-{r}.json").read_text()) for r in (0, 1))
    assert a["world"] == b["world"] == 2 and a["len"] == b["len"] == 300
    assert a["steps"] == b["steps"] == [10, 10]
    assert not set(a["seen"]) & set(b["seen"]) and len(a["seen"]) == len(b["seen"]) == 300
    assert a["weights"] == b["weights"]


def test_views_are_replayed_per_epoch(caches: dict[str, Path]) -> None:
    ds = CacheDataset(caches["views"], views_per_epoch=2, temperature=2.0)
    assert len(ds) == 1200
    ds.set_epoch(0)
    a = torch.stack([it["inputs"] for it in ds])
    ds.set_epoch(1)
    b = torch.stack([it["inputs"] for it in ds])
    assert a.shape == (1200, 1, 8, 8) and not torch.equal(a, b)
    with pytest.raises(ConfigError, match="more than the 3 view"):
        CacheDataset(caches["views"], views_per_epoch=4)


def test_bad_arguments_are_refused(caches: dict[str, Path]) -> None:
    with pytest.raises(ConfigError) as e:
        CacheDataset(caches["dense"], temperature=0, ensemble="median")
    assert "temperature" in str(e.value) and "ensemble" in str(e.value)
    with pytest.raises(ConfigError, match="out of range"):
        CacheDataset(caches["dense"], members=[2])
    with pytest.raises(ConfigError, match="mean-logits"):
        CacheDataset(caches["sampled:3"], ensemble="mean-logits")


def test_a_temperature_the_sparse_cache_did_not_record_is_noted(caches: dict[str, Path]) -> None:
    """What train-student prints as a note (interpolated tails) is a warning here."""
    with pytest.warns(UserWarning, match="T=3.0 is not a recorded temperature"):
        ds = CacheDataset(caches["topk:2"], temperature=3.0)
    assert ds.soft_targets["exact"] is False and ds.soft_targets["storage"] == ["topk:2"] * 2
    exact = CacheDataset(caches["topk:2"], temperature=4.0)
    assert exact.soft_targets["exact"] is True


# ------------------------------------------------------------------------------------ examples
def run_example(name: str, *args: str) -> dict:
    """Run ``examples/NAME`` as a user would (a script, this tree importable); its JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, str(REPO / "examples" / name), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_the_plain_loop_example_distils_a_student(caches: dict[str, Path]) -> None:
    out = run_example("plain_loop.py", str(caches["dense"]), "--epochs", "4")
    assert len(out["losses"]) == 4 and out["losses"][-1] < 0.8 * out["losses"][0]
    assert out["agreement_before"] < 0.5 and out["agreement_after"] > 0.9


def test_the_hf_trainer_example_distils_a_gpt2(token_cache: Path, tmp_path: Path) -> None:
    require("accelerate")  # transformers' Trainer needs it
    out = run_example("hf_trainer.py", str(token_cache), str(tmp_path / "run"), "--epochs", "3")
    losses = out["losses"]
    assert len(losses) >= 8 and losses[-1] < 0.75 * losses[0]
    assert out["agreement_after"] > out["agreement_before"] + 0.3


def test_the_docs_code_is_the_examples_code() -> None:
    """Every code block of docs/library-api.md headed ``# examples/NAME.py`` is a verbatim part
    of that file, which the tests above run: the page and the examples cannot drift apart."""
    page = (REPO / "docs" / "library-api.md").read_text()
    blocks = [b.split("```", 1)[0] for b in page.split("```python\n")[1:]]
    quoted = [b for b in blocks if b.startswith("# examples/")]
    assert len(quoted) == 3
    for block in quoted:
        head, _, code = block.partition("\n")
        assert code.strip() and code in (REPO / head[2:]).read_text(), head
