"""Small seeded caches made in code, and reading a cache's arrays raw.

Builders: ``write_logits_cache`` (given member logits, no teacher), ``teacher_cache`` (a real
teacher through the library's writer) and ``kind_caches`` (one small cache of each row kind:
top-k, sampled, views and tokens, through the real CLI).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_logits_cache(
    base: Path,
    member_logits: np.ndarray,
    labels: np.ndarray | None = None,
    rows_per_shard: int = 4,
    dtype: str = "float32",
    in_dim: int = 2,
    seed: int = 0,
    out: str | None = None,
) -> tuple[Path | str, str]:
    """A complete cache holding ``member_logits`` (M, N, C) (no teacher), on an npz dataset of
    matching rows, written as ``BASE.npz`` and ``BASE.zarr`` (or ``out``: any location the writer
    takes, such as an ``s3://`` URL).

    The dataset's inputs are seeded random (N, in_dim) float32 and its test split is the same
    inputs (with the labels, or zeros). Returns ``(cache location, transfer-set spec)``.
    """
    from pipeline.cache.create import create_cache
    from pipeline.cache.write import mark_complete, write_shard
    from pipeline.datasets import load_dataset

    member_logits = np.asarray(member_logits, dtype=np.float32)
    m, n, c = member_logits.shape
    x = np.random.default_rng(seed).normal(size=(n, in_dim)).astype(np.float32)
    arrays = {
        "x_train": x,
        "x_test": x,
        "num_classes": np.int64(c),
        "y_test": np.zeros(n, np.int64) if labels is None else np.asarray(labels, np.int64),
    }
    if labels is not None:
        arrays["y_train"] = np.asarray(labels, np.int64)
    np.savez(base.with_suffix(".npz"), **arrays)
    spec = f"npz:{base.with_suffix('.npz')}:train"
    data = load_dataset(spec)
    members = [
        {
            "path": f"member-{i}.pt",
            "checkpoint_sha256": f"sha256:{i:064x}",
            "model_spec": "given",
            "num_classes": c,
        }
        for i in range(m)
    ]
    location = base.with_suffix(".zarr") if out is None else out
    group = create_cache(
        location,
        dataset=data.describe(),
        ids=data.ids,
        labels=data.y,
        num_classes=c,
        class_names=[str(i) for i in range(c)],
        members=members,
        dtype=dtype,
        rows_per_shard=rows_per_shard,
        command="tests",
    )
    for s in range(-(-n // rows_per_shard)):
        lo, hi = s * rows_per_shard, min(n, (s + 1) * rows_per_shard)
        for k in range(m):
            write_shard(group, k, s, member_logits[k, lo:hi], data.ids[lo:hi])
    mark_complete(location)
    return location, spec


def teacher_cache(teacher: Path, dataset: str, out: Path | str, **config: object) -> Path | str:
    """``teacher``'s cache of ``dataset`` written by the library's writer on the CPU, quietly;
    ``config`` are further ``CacheConfig`` fields (``rows_per_shard``, ``store``, ...)."""
    from pipeline.cache.config import CacheConfig
    from pipeline.cache.writer import build_cache

    build_cache(
        CacheConfig(teachers=[str(teacher)], dataset=dataset, out=str(out), device="cpu", **config),
        log=lambda s: None,
        progress=False,
    )
    return out


TOKEN_SPEC = "text:{corpus}:train:seq=16:count=40"
TOKEN_TEACHER = "gpt:layers=1,dim=16,heads=2,ctx=16"


def kind_caches(root: Path, teacher: Path, npz: Path) -> dict[str, dict[str, Path]]:
    """One small cache of each row kind, made with the real CLI under ``root``: ``topk`` (top-2)
    and ``sampled`` (3 draws) of ``teacher`` on ``npz:NPZ:train``, ``views`` (4 augmented views
    per sample) and ``tokens`` (top-4 of a 1-layer gpt teacher trained here on a seeded corpus of
    40 sequences of 16 tokens). Returns ``{kind: {"path": cache, "teacher": teacher dir}}``."""
    from tests.helpers.cli import cli
    from tests.helpers.data import make_corpus

    image = ["--teacher", str(teacher), "--dataset", f"npz:{npz}:train"]
    made = {
        "topk": [*image, "--store", "topk:2", "--rows-per-shard", "128"],
        "sampled": [*image, "--store", "sampled:3", "--rows-per-shard", "128"],
        "views": [*image, "--views", "4", "--augment", "shift:2+flip", "--rows-per-shard", "50"],
    }
    out = {}
    for kind, args in made.items():
        path = root / f"{kind}.zarr"
        code, output = cli("cache-logits", *args, "--out", str(path), "--device", "cpu", "--quiet")
        assert code == 0, output
        out[kind] = {"path": path, "teacher": teacher}
    spec = TOKEN_SPEC.format(corpus=make_corpus(root / "c.txt"))
    code, output = cli(
        *("train-teacher", "--dataset", spec, "--model", TOKEN_TEACHER, "--members", "1"),
        *("--epochs", "1", "--batch-size", "16", "--eval", "", "--out", str(root / "gpt")),
        *("--device", "cpu"),
    )
    assert code == 0, output
    path = root / "tokens.zarr"
    code, output = cli(
        *("cache-logits", "--teacher", str(root / "gpt"), "--dataset", spec),
        *("--store", "topk:4", "--rows-per-shard", "8", "--out", str(path), "--quiet"),
    )
    assert code == 0, output
    out["tokens"] = {"path": path, "teacher": root / "gpt"}
    return out


def raw_arrays(location: str | Path) -> dict[str, np.ndarray]:
    """The ids, labels and every member's dense logits and done flags of a cache at any location,
    raw (float16 logits stay float16), by name."""
    import zarr

    from pipeline.cache.header import ATTR_KEY
    from pipeline.cache.location import open_store

    g = zarr.open_group(open_store(location, "r"), mode="r", use_consolidated=False)
    h = g.attrs[ATTR_KEY]
    names = ["ids", "labels"] + [
        f"members/{m['index']}/{a}" for m in h["members"] for a in ("logits", "done")
    ]
    return {n: g[n][:] for n in names}


def assert_same_cache(got: Path, ref: Path) -> None:
    """Two complete dense caches hold bit-identical arrays and the same header facts."""
    import zarr

    from pipeline.cache.header import ATTR_KEY

    a, b = raw_arrays(got), raw_arrays(ref)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert np.array_equal(a[name], b[name]), f"{name} differs between {got} and {ref}"
    ha = zarr.open_group(str(got), mode="r", use_consolidated=False).attrs[ATTR_KEY]
    hb = zarr.open_group(str(ref), mode="r", use_consolidated=False).attrs[ATTR_KEY]
    assert ha["complete"] is True and hb["complete"] is True
    for key in ("n", "num_classes", "rows_per_shard", "n_shards", "dtype", "dataset"):
        assert ha[key] == hb[key], key
    assert [m["checkpoint_sha256"] for m in ha["members"]] == [
        m["checkpoint_sha256"] for m in hb["members"]
    ]


def done_count(path: Path) -> int | None:
    """Member-shards marked done, read raw (None while the store has no header yet)."""
    import zarr

    from pipeline.cache.header import ATTR_KEY

    try:
        g = zarr.open_group(str(path), mode="r", use_consolidated=False)
        h = g.attrs[ATTR_KEY]
        return sum(int(g[f"members/{m['index']}/done"][:].sum()) for m in h["members"])
    except Exception:  # noqa: BLE001 - killed before the schema was complete
        return None
