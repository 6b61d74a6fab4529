"""``kd-pipeline sequence-study``: sequence distillation on the shipped corpus, end to end.

On the King James Version (``data/kjv/kjv.txt.gz``) with its held-out test split: a teacher
transformer (``train-teacher``), its per-token distributions cached in each storage kind
(``cache-logits``), and the same smaller student trained (1) on next tokens only (alpha = 0), (2)
from the dense cache, (3) from ``topk:K`` caches (exact tail bucket), (4) from ``sampled:S``, and
(5) with online KD (the teacher run on every batch). Everything goes through the public steps;
artefacts are reused when re-run::

    OUT/
      teacher/                 the teacher (member-0.pt)
      caches/<kind>.zarr       one cache per storage kind
      runs/<name>/             one student run each
      sequence.json, report.md

Reported per student: test perplexity, bits per byte, agreement with the teacher's argmax
tokens, wall time with the teacher's training (and, from a cache, the cache's writing) included,
and the cache's bytes per token on disk.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipeline.cache.config import CacheConfig
from pipeline.cache.read import LogitCache
from pipeline.checks import collect, in_range, temperature
from pipeline.errors import ConfigError
from pipeline.files import atomic_write_json, atomic_write_text
from pipeline.options import field_problems, option, parse_ints, show_list
from pipeline.registry import Registry
from pipeline.step_options import device_option, output_dir
from pipeline.training.config import StudentConfig, TeacherConfig
from pipeline.training.train_config import TrainConfig

CORPUS = Path(__file__).resolve().parents[2] / "data" / "kjv" / "kjv.txt.gz"
SCALES: Registry[dict] = Registry(
    "sequence_scales", "scale", lambda message: ConfigError([message])
)
SCALES.register(
    "quick",
    "a smoke test (about a minute)",
    {  # a smoke test (about a minute)
        "seq": 32,
        "train": 200,
        "test": 40,
        "teacher": "gpt:layers=1,dim=32,heads=2,ctx=32,dropout=0",
        "student": "gpt:layers=1,dim=16,heads=2,ctx=32,dropout=0",
        "t_epochs": 1,
        "epochs": 1,
    },
)
SCALES.register(
    "full",
    "2,000 sequences of 64 tokens",
    {  # about 20-30 minutes on 2 shared CPU cores
        "seq": 64,
        "train": 2000,
        "test": 250,
        "teacher": "gpt:layers=2,dim=128,heads=4,ctx=64,dropout=0.1",
        "student": "gpt:layers=1,dim=64,heads=4,ctx=64,dropout=0",
        "t_epochs": 5,
        "epochs": 3,
    },
)
DEFAULT_STORES = ("dense", "topk:1", "topk:8", "topk:32", "sampled:16")


@dataclass
class SequenceStudyConfig:
    """``sequence-study``: teacher LM, caches of every storage kind, students from each."""

    scale: str = option(
        "full",
        choices=SCALES,
        help="full: 2,000 sequences of 64 tokens (about 20-30 minutes on 2 CPU cores); "
        "quick: a smoke test.",
    )
    vocab: int = option(0, help="Train a BPE of this many tokens (0: byte-level, V = 256).")
    temperature: float = option(2.0, short="-T", help="Temperature of the soft targets.")
    alpha: float = option(0.7, help="Weight of the soft term (1 - alpha: next-token CE).")
    seeds: list[int] = option(
        default_factory=lambda: [0],
        parse=parse_ints,
        show=show_list,
        metavar="S,S,...",
        least=0,
        help="Student seeds.",
    )
    corpus: str = option(str(CORPUS), help="The UTF-8 corpus (.txt or .txt.gz).")
    out: str = option("", help="Output directory [default: data/sequence-study/<scale>].")
    device: str = device_option()

    def resolve(self) -> SequenceStudyConfig:
        name = self.scale + (f"-bpe{self.vocab}" if self.vocab else "")
        return self if self.out else replace(self, out=output_dir("sequence-study", name))

    def validate(self) -> None:
        problems = field_problems(self)
        if self.vocab and self.vocab < 257:
            problems.append(f"--vocab must be 0 (bytes) or above 256, got {self.vocab}")
        problems += collect(
            in_range("alpha", self.alpha, 0, 1), temperature("temperature", self.temperature)
        )
        if not self.seeds:
            problems.append("--seeds needs at least one seed")
        if problems:
            raise ConfigError(problems)


def run_sequence_study(cfg: SequenceStudyConfig, log: Callable[[str], None] = print) -> dict:
    """Teacher, caches, students; writes ``sequence.json`` and ``report.md`` under ``cfg.out``."""
    from pipeline.cache.writer import build_cache
    from pipeline.training.distill import train_student
    from pipeline.training.teacher import train_teacher

    cfg = cfg.resolve()
    cfg.validate()
    sc = SCALES[cfg.scale]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = f":vocab={cfg.vocab}" if cfg.vocab else ""
    # A BPE token stands for ~4 bytes: half the sequences still hold twice the text.
    n_train = sc["train"] // 2 if cfg.vocab else sc["train"]
    train_spec = f"text:{cfg.corpus}:train:seq={sc['seq']}{tok}:count={n_train}"
    test_spec = f"text:{cfg.corpus}:test:seq={sc['seq']}{tok}:count={sc['test']}"
    quiet = lambda s: None  # noqa: E731 - the study logs its own progress
    teacher = out / "teacher"
    t = time.perf_counter()
    if not (teacher / "ensemble.json").exists():
        log(f"teacher: {sc['teacher']} on {train_spec}")
        train_teacher(
            TeacherConfig(
                dataset=train_spec,
                model=sc["teacher"],
                members=1,
                eval=test_spec,
                out=str(teacher),
                device=cfg.device,
                train=TrainConfig(epochs=sc["t_epochs"], batch_size=32, lr=2e-3, seed=0),
            ),
            log=quiet,
        )
        _record_seconds(teacher, time.perf_counter() - t)
    teacher_s = json.loads((teacher / "ensemble.json").read_text())["study_seconds"]
    teacher_metrics = json.loads((teacher / "ensemble.json").read_text())["test"]["members"][0]
    log(
        f"teacher: perplexity {teacher_metrics['perplexity']:.3f}, "
        f"{teacher_metrics['bits_per_byte']:.4f} bits/byte ({teacher_s:.0f}s)"
    )
    caches: dict[str, dict] = {}
    # With a BPE vocabulary a dense cache is what sparse kinds avoid (V x 2 bytes per token): the
    # online teacher is the full-distribution reference instead.
    stores = DEFAULT_STORES if not cfg.vocab else DEFAULT_STORES[1:]
    for store in stores:
        where = out / "caches" / f"{store.replace(':', '')}.zarr"
        t = time.perf_counter()
        build_cache(
            CacheConfig(
                teachers=[str(teacher)],
                dataset=train_spec,
                out=str(where),
                store=store,
                batch_size=64,
                device=cfg.device,
                command=f"sequence-study {store}",
            ),
            log=quiet,
            progress=False,
        )
        seconds = time.perf_counter() - t
        stamp = where / "study-seconds.json"
        if not stamp.exists():
            atomic_write_json(stamp, {"seconds": seconds})
        seconds = json.loads(stamp.read_text())["seconds"]
        member = LogitCache(where).info().to_dict()["members"][0]
        caches[store] = {
            "location": str(where),
            "seconds": seconds,
            "bytes_per_token": member.get("bytes_per_row_on_disk"),
            "fidelity": member.get("fidelity"),
        }
        log(f"cache {store}: {caches[store]['bytes_per_token']} B/token on disk ({seconds:.0f}s)")
    settings = [("next tokens only", stores[0], 0.0), *[(s, s, cfg.alpha) for s in stores]]
    settings.append(("online KD", None, cfg.alpha))
    rows = []
    for name, store, alpha in settings:
        for seed in cfg.seeds:
            slug = name.replace(" ", "-").replace(":", "")
            # T and alpha in the name: another setting never reuses this one's run
            run = out / "runs" / f"{slug}-T{cfg.temperature:g}-a{alpha:g}-s{seed}"
            result = _read(run / "metrics.json")
            if result is None:
                common = {
                    "student": sc["student"],
                    "temperature": cfg.temperature,
                    "alpha": alpha,
                    "eval": test_spec,
                    "out": str(run),
                    "overwrite": True,
                    "device": cfg.device,
                    "train": TrainConfig(epochs=sc["epochs"], batch_size=32, lr=2e-3, seed=seed),
                }
                if store is None:
                    scfg = StudentConfig(
                        online_teacher=[str(teacher)], dataset=train_spec, **common
                    )
                else:
                    scfg = StudentConfig(cache=caches[store]["location"], **common)
                result = train_student(scfg, log=quiet, progress=False)
            m = result["metrics"]
            test = m["test"]
            cache_s = caches[store]["seconds"] if store is not None and alpha > 0 else 0.0
            rows.append(
                {
                    "name": name,
                    "seed": seed,
                    "perplexity": test["perplexity"],
                    "bits_per_byte": test["bits_per_byte"],
                    "teacher_agreement": test.get("teacher_agreement"),
                    "student_seconds": m["wall_seconds"],
                    "wall_seconds": teacher_s + cache_s + m["wall_seconds"],
                    "bytes_per_token": caches[store]["bytes_per_token"]
                    if store is not None and alpha > 0
                    else None,
                }
            )
            log(
                f"{name} (seed {seed}): perplexity {test['perplexity']:.3f}, "
                f"{test['bits_per_byte']:.4f} bits/byte, {m['wall_seconds']:.0f}s"
            )
    result = {
        "config": asdict(cfg),
        "train": train_spec,
        "test": test_spec,
        "scale": sc,
        "teacher": {**teacher_metrics, "seconds": teacher_s},
        "caches": caches,
        "students": rows,
    }
    atomic_write_json(out / "sequence.json", result)
    atomic_write_text(out / "report.md", render(result))
    log(f"wrote {out / 'report.md'}")
    return result


def render(result: dict) -> str:
    """The study's table in Markdown."""
    t = result["teacher"]
    ref_name = "dense" if "dense" in result["caches"] else "online KD"
    dense = [r for r in result["students"] if r["name"] == ref_name]
    ref = sum(r["perplexity"] for r in dense) / len(dense) if dense else None
    lines = [
        f"Teacher {result['scale']['teacher']}: test perplexity {t['perplexity']:.3f}, "
        f"{t['bits_per_byte']:.4f} bits/byte, trained in {t['seconds']:.0f} s.",
        "",
        f"| student | test perplexity | vs {ref_name} | bits/byte | agreement with teacher | "
        "wall s (teacher + cache + student) | bytes/token on disk |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["students"]:
        rel = f"{100 * (r['perplexity'] / ref - 1):+.2f} %" if ref else ""
        agree = "" if r["teacher_agreement"] is None else f"{100 * r['teacher_agreement']:.1f} %"
        size = "" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.1f}"
        lines.append(
            f"| {r['name']} (s{r['seed']}) | {r['perplexity']:.3f} | {rel} | "
            f"{r['bits_per_byte']:.4f} | {agree} | {r['wall_seconds']:.0f} | {size} |"
        )
    return "\n".join(lines) + "\n"


def _record_seconds(teacher: Path, seconds: float) -> None:
    path = teacher / "ensemble.json"
    data = json.loads(path.read_text())
    atomic_write_json(path, {**data, "study_seconds": seconds})


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
