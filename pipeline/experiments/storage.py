"""``kd-pipeline storage-study``: what each storage kind costs and loses, measured end to end.

For a teacher with many classes, the same transfer set is cached once per storage kind
(``dense``, ``topk:K``, ``sampled:S``), and the same student is trained from each cache with the
same seeds; the report puts bytes per row, the fidelity recorded at write time (KL to the full
distribution at T = 1, 4, 20; kept mass) and the students' test errors side by side, with each
kind's test error relative to the dense cache's. Everything runs through the public steps
(``train-teacher``, ``cache-logits``, ``train-student``); artefacts are reused when re-run::

    OUT/
      task.npz             the synthetic task (unless --dataset names one)
      teacher/             the teacher ensemble
      caches/<kind>.zarr   one cache per storage kind
      runs/<kind>-T<T>-s<seed>/   one student run each
      report.md, storage.json

The synthetic task has hierarchical classes (groups of ten whose prototypes share a centre), so a
teacher's mistakes and soft targets concentrate on a class's siblings, as they do for real data:
the dark knowledge a top-k cache must keep.

:func:`byte_table` (also part of ``kd-pipeline bench``) measures bytes per row per member on disk
for each kind at C = 10, 1,000 and 32,000 from synthetic logits written through the real writer.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline.cache.config import CacheConfig
from pipeline.cache.create import create_cache
from pipeline.cache.kinds import StorageSpec, bytes_per_row
from pipeline.cache.read import LogitCache
from pipeline.cache.write import mark_complete, write_shard
from pipeline.checks import collect, in_range, temperature
from pipeline.errors import ConfigError
from pipeline.options import field_problems, option, parse_floats, parse_ints, show_list
from pipeline.registry import Registry
from pipeline.step_options import device_option, output_dir
from pipeline.training.config import StudentConfig, TeacherConfig
from pipeline.training.train_config import TrainConfig

DEFAULT_STORES = ("dense", "topk:1", "topk:5", "topk:20", "topk:100", "sampled:4", "sampled:16")
# classes, groups, train rows, test rows, teacher epochs, student epochs
SCALES: Registry[dict] = Registry("storage_scales", "scale", lambda message: ConfigError([message]))
SCALES.register(
    "quick",
    "100 classes, a few epochs (a smoke test)",
    {
        "classes": 100,
        "groups": 10,
        "train": 4000,
        "test": 1000,
        "t_epochs": 4,
        "epochs": 4,
    },
)
SCALES.register(
    "full",
    "1,000 classes, the study's scale",
    {
        "classes": 1000,
        "groups": 100,
        "train": 20_000,
        "test": 10_000,
        "t_epochs": 12,
        "epochs": 10,
    },
)


def _parse_stores(value: str | Sequence[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    out = [s.strip() for s in items if s.strip()]
    for s in out:
        StorageSpec.parse(s, 1 << 20)  # raises ValueError with what is expected
    return out


@dataclass
class StorageStudyConfig:
    """``storage-study``: every storage kind cached from one teacher, one student from each."""

    scale: str = option(
        "full",
        choices=SCALES,
        help="full: 1,000 classes, 20k transfer rows (about 15 minutes on 2 idle CPU cores); "
        "quick: 100 classes (a smoke test).",
    )
    stores: list[str] = option(
        default_factory=lambda: list(DEFAULT_STORES),
        parse=_parse_stores,
        show=show_list,
        metavar="KIND,KIND,...",
        help="Storage kinds to compare (dense is always included, as the reference).",
    )
    temperatures: list[float] = option(
        default_factory=lambda: [4.0],
        parse=parse_floats,
        show=show_list,
        metavar="T,T,...",
        help="Training temperatures of the students.",
    )
    seeds: list[int] = option(
        default_factory=lambda: [0, 1, 2],
        parse=parse_ints,
        show=show_list,
        metavar="S,S,...",
        least=0,
        help="Student seeds (mean and spread are reported).",
    )
    train_from: list[str] | None = option(
        None,
        parse=_parse_stores,
        show=show_list,
        metavar="KIND,KIND,...",
        help="Train students from these kinds only [default: every one of --stores]; the others "
        "are cached and measured (bytes, fidelity).",
    )
    teacher_model: str = option("mlp:512,512", help="The teacher ensemble's members.")
    student: str = option("mlp:64", help="The student trained from every cache.")
    alpha: float = option(0.9, help="Weight of the soft term.")
    out: str = option("", help="Output directory [default: data/storage-study/<scale>].")
    device: str = device_option()
    fidelity_temperatures: list[float] = field(default_factory=lambda: [1.0, 4.0, 20.0])

    def resolve(self) -> StorageStudyConfig:
        return self if self.out else replace(self, out=output_dir("storage-study", self.scale))

    def validate(self) -> None:
        problems = field_problems(self) + collect(in_range("alpha", self.alpha, 0, 1))
        if self.scale not in SCALES:
            problems.append(SCALES.unknown(self.scale))
        if not self.seeds or not self.temperatures:
            problems.append("--seeds and --temperatures need at least one value each")
        problems += collect(*(temperature("temperatures", t) for t in self.temperatures))
        if problems:
            raise ConfigError(problems)


# ------------------------------------------------------------------------------------------- data
def hierarchical_task(
    classes: int, groups: int, n_train: int, n_test: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """A seeded classification task whose classes come in groups of similar classes.

    Group centres are far apart, a group's class prototypes near their centre, and samples are
    prototypes plus noise: a model confuses siblings, so its soft targets spread over a few
    classes (dark knowledge), not over all of them.

    Returns:
        npz arrays: ``x_train`` (n, 1, 8, 8) float32, ``y_train`` (n,) int64, ``x_test``,
        ``y_test``, ``num_classes``.
    """
    rng = np.random.default_rng(seed)
    dim = 64
    centres = rng.normal(0, 2.0, size=(groups, dim))
    protos = centres[np.arange(classes) % groups] + rng.normal(0, 0.9, size=(classes, dim))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        # Noise 3: the nearest true prototype misses ~23 % of samples, nearly all within the
        # right group of ten: a teacher's uncertainty is spread over a sample's siblings.
        y = rng.integers(0, classes, size=n)
        x = protos[y] + rng.normal(0, 3.0, size=(n, dim))
        return x.reshape(n, 1, 8, 8).astype(np.float32), y.astype(np.int64)

    x_tr, y_tr = split(n_train)
    x_te, y_te = split(n_test)
    return {
        "x_train": x_tr,
        "y_train": y_tr,
        "x_test": x_te,
        "y_test": y_te,
        "num_classes": np.int64(classes),
    }


# ------------------------------------------------------------------------------------------ study
def run_storage_study(cfg: StorageStudyConfig, log: Callable[[str], None] = print) -> dict:
    """Teacher, one cache per storage kind, students from each; ``report.md`` and
    ``storage.json``."""
    from pipeline.cache.writer import build_cache
    from pipeline.training.distill import train_student
    from pipeline.training.teacher import train_teacher

    cfg = cfg.resolve()
    cfg.validate()
    sc = SCALES[cfg.scale]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    npz = out / "task.npz"
    if not npz.exists():
        np.savez(npz, **hierarchical_task(sc["classes"], sc["groups"], sc["train"], sc["test"]))
    train_spec, test_spec = f"npz:{npz}:train", f"npz:{npz}:test"
    quiet = lambda s: None  # noqa: E731 - the study logs its own progress
    teacher = out / "teacher"
    t = time.perf_counter()
    if not (teacher / "ensemble.json").exists():
        log(f"teacher: 2 x {cfg.teacher_model} on {sc['classes']} classes")
        train_teacher(
            TeacherConfig(
                dataset=train_spec,
                model=cfg.teacher_model,
                input_dropout=0.0,
                dropout=0.2,
                jitter=0,
                members=2,
                eval=test_spec,
                out=str(teacher),
                device=cfg.device,
                train=TrainConfig(epochs=sc["t_epochs"], batch_size=256, seed=0),
            ),
            log=quiet,
        )
    teacher_s = time.perf_counter() - t
    stores = ["dense", *[s for s in cfg.stores if s != "dense"]]
    caches: dict[str, dict] = {}
    for store in stores:
        where = out / "caches" / f"{store.replace(':', '')}.zarr"
        t = time.perf_counter()
        build_cache(
            CacheConfig(
                teachers=[str(teacher)],
                dataset=train_spec,
                out=str(where),
                store=store,
                device=cfg.device,
                command=f"storage-study {store}",
            ),
            log=quiet,
            progress=False,
        )
        info = LogitCache(where).info().to_dict()
        caches[store] = {
            "location": str(where),
            "seconds": time.perf_counter() - t,
            "members": info["members"],
        }
        log(f"cache {store}: {_bytes(info['members'])} B/row/member on disk")
    runs: dict[str, dict] = {}
    trained = stores if cfg.train_from is None else ["dense", *cfg.train_from]
    for store in dict.fromkeys(trained):
        for temp in cfg.temperatures:
            errs = []
            for seed in cfg.seeds:
                run = out / "runs" / f"{store.replace(':', '')}-T{temp:g}-s{seed}"
                metrics = _read_metrics(run)
                if metrics is None:
                    metrics = train_student(
                        StudentConfig(
                            cache=caches[store]["location"],
                            student=cfg.student,
                            temperature=temp,
                            alpha=cfg.alpha,
                            eval=test_spec,
                            out=str(run),
                            overwrite=True,
                            device=cfg.device,
                            train=TrainConfig(epochs=sc["epochs"], batch_size=128, seed=seed),
                        ),
                        log=quiet,
                        progress=False,
                    )
                errs.append(int(metrics["metrics"]["test"]["errors"]))
                exact = metrics["cache"]["soft_targets"]["exact"]
            runs[f"{store}|{temp:g}"] = {"errors": errs, "exact": exact}
            log(f"student from {store} at T={temp:g}: test errors {errs}")
    result = {
        "config": asdict(cfg),
        "scale": sc,
        "test_rows": sc["test"],
        "teacher": json.loads((teacher / "ensemble.json").read_text()),
        "teacher_seconds": teacher_s,
        "caches": caches,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "storage.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "report.md").write_text(render_study(result))
    log(f"wrote {out / 'report.md'} and {out / 'storage.json'}")
    return result


def _read_metrics(run: Path) -> dict | None:
    try:
        return json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def _bytes(members: list[dict]) -> str:
    return f"{statistics.mean(m['bytes_per_row_on_disk'] for m in members):.1f}"


def render_study(r: dict) -> str:
    """The study as Markdown: one row per storage kind."""
    temps = r["config"]["temperatures"]
    ftemps = r["config"]["fidelity_temperatures"]
    seeds = r["config"]["seeds"]
    dense = {t: statistics.mean(r["runs"][f"dense|{t:g}"]["errors"]) for t in temps}
    head = (
        "| storage | B/row/member on disk | vs dense | "
        + " | ".join(f"KL T={t:g}" for t in ftemps)
        + " | kept mass T=1 | "
        + " | ".join(f"student errors T={t:g} (rel. to dense)" for t in temps)
        + " |"
    )
    lines = [
        f"Storage study ({r['date']}): {r['scale']['classes']} classes, "
        f"{r['scale']['train']} transfer rows, teacher 2 x {r['config']['teacher_model']}, "
        f"student {r['config']['student']} x {len(seeds)} seeds ({seeds}), alpha "
        f"{r['config']['alpha']}, {r['scale']['epochs']} epochs; errors on "
        f"{r['test_rows']} test rows (mean ± sd). Total wall time "
        f"{r['seconds'] / 60:.1f} min (teacher {r['teacher_seconds']:.0f} s).",
        "",
        head,
        "|" + "---|" * (4 + len(ftemps) + len(temps)),
    ]
    dense_b = statistics.mean(m["bytes_per_row_on_disk"] for m in r["caches"]["dense"]["members"])
    for store, c in r["caches"].items():
        members = c["members"]
        b = statistics.mean(m["bytes_per_row_on_disk"] for m in members)
        fid = members[0]["fidelity"]
        kls = []
        for t in ftemps:
            j = _index(fid["temperatures"], t)
            vals = [m["fidelity"]["kl_mean"][j] for m in members] if j is not None else [None]
            kls.append("n/a" if None in vals else f"{statistics.mean(vals):.3g}")
        j1 = _index(fid["temperatures"], 1.0)
        kept = statistics.mean(m["fidelity"]["kept_mass_mean"][j1] for m in members)
        cells = []
        for t in temps:
            if f"{store}|{t:g}" not in r["runs"]:
                cells.append("(not trained)")
                continue
            errs = r["runs"][f"{store}|{t:g}"]["errors"]
            mean = statistics.mean(errs)
            sd = statistics.stdev(errs) if len(errs) > 1 else 0.0
            rel = (mean - dense[t]) / dense[t] if dense[t] else 0.0
            mark = "" if r["runs"][f"{store}|{t:g}"]["exact"] else " (T interpolated)"
            cells.append(f"{mean:.1f} ± {sd:.1f} ({rel:+.1%}){mark}")
        lines.append(
            f"| {store} | {b:.1f} | {b / dense_b:.3f} | "
            + " | ".join(kls)
            + f" | {kept:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _index(values: Sequence[float], t: float) -> int | None:
    for j, v in enumerate(values):
        if math.isclose(v, t):
            return j
    return None


# --------------------------------------------------------------------------------------- bytes
def synthetic_logits(rows: int, classes: int, seed: int = 0) -> np.ndarray:
    """(rows, C) float32 logits of a confident synthetic teacher: Gaussian logits (sd 2) with one
    class per row raised by 8 (top-1 probability about 0.5 at 1,000 classes)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 2.0, size=(rows, classes)).astype(np.float32)
    v[np.arange(rows), rng.integers(0, classes, size=rows)] += 8.0
    return v


def byte_table(
    classes: Sequence[int] = (10, 1000, 32000),
    stores: Sequence[str] = ("dense", "topk:20", "sampled:12"),
    rows: int = 2048,
) -> list[dict]:
    """Bytes per row per member of each storage kind, written by the real writer (zstd + crc32c)
    from :func:`synthetic_logits`; float16 values.

    Returns:
        one dict per (C, store): ``classes``, ``store``, ``raw`` (B/row before compression),
        ``on_disk`` (B/row stored), ``vs_dense_raw`` (on disk / dense float16 raw).
    """
    out = []
    with tempfile.TemporaryDirectory(prefix="kd-bytes-") as tmp:
        for c in classes:
            logits = synthetic_logits(rows, c)
            for store in stores:
                spec = StorageSpec.parse(store, c)
                where = Path(tmp) / f"{c}-{store.replace(':', '')}.zarr"
                group = create_cache(
                    where,
                    dataset={"spec": "synthetic", "fingerprint": "sha256:" + "0" * 64, "n": rows},
                    ids=np.arange(rows),
                    labels=None,
                    num_classes=c,
                    class_names=[str(i) for i in range(c)],
                    members=[
                        {"path": "synthetic", "checkpoint_sha256": "synthetic", "num_classes": c}
                    ],
                    dtype="float16",
                    rows_per_shard=rows,
                    command="byte_table",
                    storage=spec,
                )
                write_shard(group, 0, 0, logits, np.arange(rows))
                mark_complete(where)
                on_disk = _member_row_bytes(where) / rows
                out.append(
                    {
                        "classes": c,
                        "store": spec.text,
                        "raw": bytes_per_row(spec, c, "float16"),
                        "on_disk": round(on_disk, 1),
                        "vs_dense_raw": round(on_disk / (2 * c), 5),
                    }
                )
    return out


def _member_row_bytes(where: Path) -> int:
    """Bytes of member 0's row arrays' chunks (not its done flags or fidelity measurements)."""
    total = 0
    for arr in (where / "members" / "0").iterdir():
        if arr.is_dir() and arr.name not in ("done", "fidelity"):
            total += sum(f.stat().st_size for f in (arr / "c").rglob("*") if f.is_file())
    return total


def format_byte_table(table: list[dict]) -> str:
    lines = [
        "| classes | storage | raw B/row | on disk B/row | on disk / dense float16 raw |",
        "|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['classes']:,} | {r['store']} | {r['raw']:,} | {r['on_disk']:,.1f} | "
            f"{r['vs_dense_raw']:.4f} |"
        )
    return "\n".join(lines)
