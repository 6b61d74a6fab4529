"""Sweeps: many stage-two runs over one cache, as dask tasks, with a results table and plots.

Once the teacher's logits are cached, a grid of students costs only student training.
:func:`run_sweep` turns the cross product students x temperatures x alphas x seeds into
:class:`Setting` s; each setting is one :func:`pipeline.distill.train_student` call (the same code
path as ``train-student``, no second loop) writing its own run directory, submitted as a task to a
dask cluster (a ``LocalCluster`` of worker processes, or an existing scheduler) or run in this
process with ``workers=0``::

    SWEEP_DIR/
      sweep.json                  the resolved sweep config and the cache fingerprint
      runs/<setting>/             one train-student run directory per setting
                                  (+ train.log, error.txt on failure)
      results.csv, results.json   one row per setting, rewritten as each setting finishes
      results.md                  the Markdown table (best setting per student in bold)
      test_error_vs_temperature.png       (image classes: test errors)
      test_perplexity_vs_temperature.png  (a token cache: test perplexity)

Resuming is by content, not by "the directory exists": a setting is finished when its run
directory's ``metrics.json`` (written last, atomically) records exactly the setting's config and the
same cache fingerprint. Re-running the same command therefore trains only what is missing or failed.
A failing setting is recorded with its error and the others go on.
"""

from __future__ import annotations

import csv
import json
import math
import signal
import statistics
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cache.lookup import cache_fingerprint
from pipeline.cache.read import LogitCache
from pipeline.checkpoints import file_sha256, member_paths
from pipeline.errors import KDError
from pipeline.experiments.config import SweepConfig, setting_name
from pipeline.files import atomic_write, atomic_write_json
from pipeline.metrics import percent
from pipeline.progress import progress_bar
from pipeline.redact import scrub_message
from pipeline.training.config import StudentConfig

RESULT_FIELDS = [
    "setting",
    "student",
    "temperature",
    "alpha",
    "seed",
    "loss",
    "ensemble",
    "status",
    "test_errors",
    "test_accuracy",
    "test_nll",
    "test_ece",
    "test_perplexity",
    "test_bits_per_byte",
    "teacher_agreement",
    "train_seconds",
    "wall_seconds",
    "epochs",
    "run_dir",
    "error",
]
PLOT_NAME = "test_error_vs_temperature.png"  # image classes; a token cache's: Measure.plot_name


@dataclass(frozen=True)
class Setting:
    """One point of the grid."""

    student: str
    temperature: float
    alpha: float
    seed: int

    @property
    def name(self) -> str:
        """A directory-safe name, e.g. ``mlp-800-800-T4-a0.9-s0``."""
        return setting_name(self.student, self.temperature, self.alpha, self.seed)


def grid(cfg: SweepConfig) -> list[Setting]:
    """The cross product in a stable order: student, alpha, temperature, seed."""
    return [
        Setting(s, float(t), float(a), int(seed))
        for s in cfg.students
        for a in cfg.alphas
        for t in cfg.temperatures
        for seed in cfg.seeds
    ]


def setting_config(cfg: SweepConfig, setting: Setting) -> StudentConfig:
    """The setting's ``train-student`` config: the sweep's base with the setting's values, run in
    ``OUT/runs/<setting>``."""
    return cfg.setting_config(
        setting.student,
        setting.temperature,
        setting.alpha,
        setting.seed,
        out=str(Path(cfg.out) / "runs" / setting.name),
    )


def source_fingerprint(base: StudentConfig) -> dict:
    """What a run's soft targets come from: the cache's fingerprint, or the online teachers'
    checkpoint hashes (a sweep passes its base config; ``train-student`` its own)."""
    if base.cache:
        cache = LogitCache(base.cache_location, allow_partial=base.allow_partial)
        members = base.members if base.members is not None else list(range(len(cache.members)))
        # The finished shards too: a run on a partial cache is not the run on more of it.
        shards = len(cache.done_shards(members))
        fingerprint = cache_fingerprint(cache.header, members)
        return {"cache": fingerprint, "rows": cache.n, "shards": shards}
    paths = [p for t in base.online_teacher or [] for p in member_paths(t)]
    return {"online_teacher": [file_sha256(p) for p in paths]}


def finished_result(scfg: StudentConfig, fingerprint: dict) -> dict | None:
    """The run's recorded result if it is a finished run of exactly this config on the same soft
    targets, with the logs of every ``--log-to`` tracker asked for now (where the metrics are
    also logged is not part of what a run is, but a run without those logs is trained again)."""
    if not all((Path(scfg.out) / name).is_dir() for name in scfg.train.log_to):
        return None
    path = Path(scfg.out) / "metrics.json"
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    from pipeline.training.run_dir import same_run_config

    # Options added to StudentConfig after a run was made take their defaults there, and the
    # cache's location may differ (a bucket, its bundle): still the same run on the same cache.
    if not same_run_config(previous.get("config") or {}, scfg.to_dict()):
        return None
    if "cache" in fingerprint:
        before = previous.get("cache", {})
        shards = fingerprint.get("shards")  # finished shards now, when the caller counted them
        ok = before.get("fingerprint") == fingerprint["cache"] and (
            shards is None or before.get("shards_used", shards) == shards
        )
    else:
        ok = previous.get("online_teacher", {}).get("checkpoints") == fingerprint["online_teacher"]
    return previous if ok else None


def run_setting(scfg: StudentConfig, torch_threads: int = 0) -> dict:
    """One setting, as a dask task or in-process: train_student, its log in ``train.log``; never
    raises.

    Returns:
        ``{"status": "ok", "result": <metrics.json>}`` or
        ``{"status": "failed", "error": message}``.
    """
    import torch

    from pipeline.training.distill import train_student

    if torch_threads:
        torch.set_num_threads(torch_threads)
    _pin_worker_gpu(scfg.device)
    out = Path(scfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.txt").unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(out / "train.log", "w") as logf:

        def log(line: str) -> None:
            logf.write(scrub_message(line) + "\n")
            logf.flush()

        try:
            result = train_student(scfg, log=log, progress=False)
            return {"status": "ok", "result": result, "seconds": time.perf_counter() - t0}
        except Exception as e:  # noqa: BLE001 - a failed setting is a result, the sweep goes on
            message = str(e) if isinstance(e, KDError) else f"{type(e).__name__}: {e}"
            (out / "error.txt").write_text(scrub_message(traceback.format_exc()))
            log(f"failed: {message}")
            return {"status": "failed", "error": message, "seconds": time.perf_counter() - t0}


def _pin_worker_gpu(device: str) -> None:
    """On a dask worker of a multi-GPU machine, worker i trains on GPU i mod count (its current CUDA
    device).

    The setting's config keeps saying ``auto``/``cuda``, so its recorded config (what resuming
    compares) does not depend on which worker ran it.
    """
    if device not in ("auto", "cuda"):
        return
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return
    if str(name).isdigit():
        torch.cuda.set_device(int(name) % torch.cuda.device_count())


def make_row(setting: Setting, cfg: SweepConfig, outcome: dict) -> dict:
    """A flat results row (RESULT_FIELDS) from a task's outcome."""
    row = {
        "setting": setting.name,
        "student": setting.student,
        "temperature": setting.temperature,
        "alpha": setting.alpha,
        "seed": setting.seed,
        "loss": cfg.base.loss,
        "ensemble": cfg.base.ensemble,
        "status": outcome["status"],
        "run_dir": str(Path(cfg.out) / "runs" / setting.name),
        "error": outcome.get("error", ""),
    }
    result = outcome.get("result")
    if result:
        m = result["metrics"]
        test = m.get("test") or {}
        row.update(
            test_errors=test.get("errors"),
            test_accuracy=test.get("accuracy"),
            test_nll=test.get("nll"),
            test_ece=test.get("ece"),
            test_perplexity=test.get("perplexity"),
            test_bits_per_byte=test.get("bits_per_byte"),
            # Image runs measure agreement on the transfer set; sequence runs on the test tokens.
            teacher_agreement=m.get("teacher_agreement_transfer", test.get("teacher_agreement")),
            train_seconds=m.get("train_seconds"),
            wall_seconds=m.get("wall_seconds"),
            epochs=m.get("epochs"),
        )
    return {k: row.get(k) for k in RESULT_FIELDS}


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]
    trained: int = 0
    reused: int = 0
    failed: int = 0
    reused_settings: set[str] = field(default_factory=set)  # finished by an earlier invocation
    interrupted: bool = False
    seconds: float = 0.0
    table: str = ""
    files: dict = field(default_factory=dict)


def plan_text(cfg: SweepConfig) -> tuple[list[Setting], str]:
    """The grid and its cost (what ``--dry-run`` prints): settings, which are already done,
    student-epochs."""
    cfg.validate()
    settings = grid(cfg)
    fp = source_fingerprint(cfg.base)
    done = [finished_result(setting_config(cfg, s), fp) is not None for s in settings]
    pending = len(settings) - sum(done)
    lines = [f"{'#':>3}  {'setting':<40} {'student':<20} {'T':>6} {'alpha':>6} {'seed':>5}  status"]
    for i, (s, d) in enumerate(zip(settings, done, strict=True)):
        lines.append(
            f"{i:>3}  {s.name:<40} {s.student:<20} {s.temperature:>6g} {s.alpha:>6g} {s.seed:>5}  "
            + ("done" if d else "to run")
        )
    rows = fp.get("rows")
    epochs = cfg.base.train.epochs
    cost = pending * epochs
    lines.append(
        f"\n{len(settings)} settings = {len(cfg.students)} students x "
        f"{len(cfg.temperatures)} temperatures x {len(cfg.alphas)} alphas x "
        f"{len(cfg.seeds)} seeds; {sum(done)} done, {pending} to run"
    )
    lines.append(
        f"estimated cost: {pending} settings x {epochs} epochs = {cost} student-epochs"
        + (f" over {rows} cached rows each ({cost * rows:,} row passes)" if rows else "")
        + f", on {_workers_text(cfg)}"
    )
    return settings, "\n".join(lines)


def _workers_text(cfg: SweepConfig) -> str:
    if cfg.scheduler:
        return f"the dask scheduler at {cfg.scheduler}"
    n = _n_workers(cfg)
    return "this process (--workers 0)" if n == 0 else f"a LocalCluster of {n} worker processes"


def _n_workers(cfg: SweepConfig) -> int:
    return 2 if cfg.workers is None else cfg.workers


def run_sweep(
    cfg: SweepConfig, log: Callable[[str], None] = print, progress: bool = True
) -> SweepResult:
    """Run (or resume) a sweep; results files are rewritten as settings finish. See the module
    docstring."""
    t0 = time.perf_counter()
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = grid(cfg)
    fp = source_fingerprint(cfg.base)
    atomic_write_json(
        out / "sweep.json",
        {"config": cfg.to_dict(), "source": fp, "settings": [s.name for s in settings]},
    )
    res = SweepResult(out, [])
    rows: dict[str, dict] = {}
    pending: list[tuple[Setting, StudentConfig]] = []
    for s in settings:
        scfg = setting_config(cfg, s)
        previous = finished_result(scfg, fp)
        if previous is not None:
            rows[s.name] = make_row(s, cfg, {"status": "ok", "result": previous})
            res.reused += 1
            res.reused_settings.add(s.name)
        else:
            missing = [n for n in scfg.train.log_to if not (Path(scfg.out) / n).is_dir()]
            if (Path(scfg.out) / "metrics.json").exists() and missing:
                log(f"{s.name}: its run has no {', '.join(missing)} log; it will be trained again")
            elif (Path(scfg.out) / "metrics.json").exists():
                log(
                    f"{s.name}: its run directory holds a run with another config or cache; "
                    "it will be replaced"
                )
            pending.append((s, scfg))
    log(
        f"sweep {out}: {len(settings)} settings, {res.reused} already done, "
        f"{len(pending)} to run on {_workers_text(cfg)}"
    )

    def ordered() -> list[dict]:
        return [rows[s.name] for s in settings if s.name in rows]

    bar = progress_bar(
        total=len(pending), enabled=progress, log=log, unit="setting", desc="sweep"
    )
    say = log if bar.disable else bar.write  # above a drawn bar; else the caller's own log

    def finish(setting: Setting, outcome: dict) -> None:
        rows[setting.name] = make_row(setting, cfg, outcome)
        if outcome["status"] == "ok":
            res.trained += 1
            r = rows[setting.name]
            say(f"{setting.name}: {measure_of([r]).describe(r)} ({outcome['seconds']:.1f}s)")
        else:
            res.failed += 1
            say(f"{setting.name}: FAILED: {outcome['error']}")
        write_results(out, ordered())
        bar.update(1)

    use_dask = bool(pending) and bool(cfg.scheduler or _n_workers(cfg))
    stop = threading.Event()
    saved_handlers = _install_stop_handlers(stop, raise_now=not use_dask)
    try:
        if pending:
            if use_dask:
                _run_dask(cfg, pending, finish, stop)
            else:
                for s, scfg in pending:
                    finish(s, run_setting(scfg, cfg.torch_threads))
    except KeyboardInterrupt:
        res.interrupted = True
        # Settings in flight may have finished while the cluster shut down: record what is on disk.
        for s, scfg in pending:
            previous = None if s.name in rows else finished_result(scfg, fp)
            if previous is not None:
                rows[s.name] = make_row(s, cfg, {"status": "ok", "result": previous})
                res.trained += 1
        say("interrupted: finished settings are kept; re-run the same command to run the rest")
    finally:
        bar.close()
        for signum, handler in saved_handlers.items():
            signal.signal(signum, handler)
    res.rows = ordered()
    res.files = write_results(out, res.rows)
    res.table = markdown_table(res.rows, cfg)
    (out / "results.md").write_text(res.table + "\n")
    from pipeline.experiments.plots import optional_plot

    plot = optional_plot(lambda: plot_results(res.rows, out), log)
    if plot:
        res.files["plot"] = str(plot)
    res.seconds = time.perf_counter() - t0
    return res


def _install_stop_handlers(stop: threading.Event, raise_now: bool) -> dict:
    """Ctrl-C (SIGINT) and SIGTERM end the sweep cleanly: finished settings stay recorded.

    In-process settings are interrupted at once (KeyboardInterrupt); a dask sweep only sets
    ``stop``, which its loop checks every fraction of a second: an exception raised inside the dask
    client's machinery could be lost.

    Returns:
        The previous handlers, to restore (empty when not on the main thread, where signals cannot
        be handled).
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: object) -> None:
        stop.set()
        if raise_now:
            raise KeyboardInterrupt

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _run_dask(
    cfg: SweepConfig,
    pending: list[tuple[Setting, StudentConfig]],
    finish: Callable[[Setting, dict], None],
    stop: threading.Event,
) -> None:
    """Submit every pending setting to dask and hand outcomes to ``finish`` as they complete."""
    from pipeline.cluster import dask_cluster
    from pipeline.devices import resolve_device

    futures = {}
    with dask_cluster(
        _n_workers(cfg),
        cfg.scheduler,
        gpu=resolve_device(cfg.base.device).type == "cuda",
        torch_threads=cfg.torch_threads,
        quiet_workers=True,
    ) as cluster:
        try:
            for s, scfg in pending:
                # Each task may ask for a GPU: each GPU then trains one student at a time.
                fut = cluster.client.submit(
                    run_setting,
                    scfg,
                    cluster.torch_threads,
                    key=f"sweep-{s.name}-{time.time_ns()}",
                    pure=False,
                    resources=cluster.resources,
                )
                futures[fut] = s
            remaining = dict(futures)
            while remaining:
                if stop.is_set():
                    raise KeyboardInterrupt
                done = [f for f in remaining if f.done()]
                if not done:
                    time.sleep(0.1)
                    continue
                for fut in done:
                    try:
                        outcome = fut.result()
                    except Exception as e:  # noqa: BLE001 - a lost worker fails its setting, not the sweep
                        outcome = {
                            "status": "failed",
                            "error": f"{type(e).__name__}: {e}",
                            "seconds": 0.0,
                        }
                    finish(remaining.pop(fut), outcome)
        finally:
            cluster.client.cancel(list(futures), force=True)


def write_results(out: Path, rows: list[dict]) -> dict:
    """``results.csv`` and ``results.json`` (atomically replaced, so a reader never sees half a
    file)."""

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
            w.writeheader()
            w.writerows(rows)

    atomic_write(out / "results.csv", write_csv)
    atomic_write_json(out / "results.json", rows)
    return {"csv": str(out / "results.csv"), "json": str(out / "results.json")}


def _group(rows: list[dict]) -> dict[tuple[str, float, float], list[dict]]:
    """Rows by (student, temperature, alpha), seeds together."""
    groups: dict[tuple[str, float, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["student"], r["temperature"], r["alpha"]), []).append(r)
    return groups


def _mean(values: list) -> float:
    return statistics.fmean(values) if values else math.nan


@dataclass(frozen=True)
class Measure:
    """What a sweep ranks its settings by (lower is better), and the columns shown beside it.

    Image students are ranked by test errors; students of a token cache by test perplexity (their
    error count, argmax tokens, says little about a language model).
    """

    key: str  # the ranked row field
    title: str  # its column header, axis label and log line
    columns: tuple[tuple[str, str, Callable[[float], str]], ...]  # (header, row field, format)
    plot_name: str
    digits: int  # decimals of a mean over seeds (and of a single value, for non-counts)

    def cell(self, values: list) -> str:
        """One setting's value, or its mean ± sd over seeds."""
        if len(values) > 1:
            return f"{_mean(values):.{self.digits}f} ± {statistics.stdev(values):.{self.digits}f}"
        v = values[0]
        return str(v) if isinstance(v, int) else f"{v:.{self.digits}f}"

    def describe(self, row: dict) -> str:
        """A finished setting's log line: ``812 test errors`` or ``test perplexity 7.812``."""
        v = row[self.key]
        if self.key == "test_errors":
            return f"{v} test errors"
        return f"{self.title} {v:.{self.digits}f}" if v is not None else "no test set"


def _fixed(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"


ERRORS = Measure(
    "test_errors",
    "test errors",
    (
        ("accuracy", "test_accuracy", percent),
        ("NLL", "test_nll", _fixed(4)),
        ("ECE", "test_ece", _fixed(4)),
        ("teacher agreement", "teacher_agreement", _fixed(4)),
        ("train s", "train_seconds", _fixed(1)),
    ),
    PLOT_NAME,
    1,
)
PERPLEXITY = Measure(
    "test_perplexity",
    "test perplexity",
    (
        ("bits/byte", "test_bits_per_byte", _fixed(4)),
        ("token accuracy", "test_accuracy", percent),
        ("NLL/token", "test_nll", _fixed(4)),
        ("teacher agreement (test)", "teacher_agreement", _fixed(4)),
        ("train s", "train_seconds", _fixed(1)),
    ),
    "test_perplexity_vs_temperature.png",
    3,
)


def measure_of(rows: list[dict]) -> Measure:
    """Perplexity when the finished rows are a sequence model's (they record it), else errors."""
    seq = any(r.get("test_perplexity") is not None for r in rows if r["status"] == "ok")
    return PERPLEXITY if seq else ERRORS


def markdown_table(rows: list[dict], cfg: SweepConfig) -> str:
    """One line per (student, T, alpha), means over seeds; each student's lowest mean test error
    (a token cache's: test perplexity) in bold."""
    measure = measure_of(rows)
    groups = _group(rows)
    seeds = max((len(v) for v in groups.values()), default=1)
    heads = [h for h, _, _ in measure.columns]
    head = (
        f"| student | T | alpha | {measure.title}"
        + (" (mean ± sd over seeds)" if seeds > 1 else "")
        + " | "
        + " | ".join(heads)
        + " |"
    )
    blanks = "| " * len(heads) + "|"
    lines = [head, "|---|---|---|---|" + "---|" * len(heads)]
    best: dict[str, float] = {}
    for (student, _, _), rs in groups.items():
        ok = [r[measure.key] for r in rs if r["status"] == "ok" and r[measure.key] is not None]
        if ok and len(ok) == len(rs):
            best[student] = min(best.get(student, math.inf), _mean(ok))
    for (student, t, a), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        if len(ok) < len(rs):
            failed = next(r for r in rs if r["status"] != "ok")
            # one table cell: no newlines, no |
            reason = " ".join(failed["error"].split()).replace("|", "/")[:80]
            lines.append(f"| {student} | {t:g} | {a:g} | failed: {reason} {blanks}")
            continue
        values = [r[measure.key] for r in ok]
        if None in values:
            lines.append(f"| {student} | {t:g} | {a:g} | (no test set) {blanks}")
            continue
        cell = measure.cell(values)
        if best.get(student) == _mean(values):
            cell = f"**{cell}**"
        others = []
        for _, key, fmt in measure.columns:
            vals = [r[key] for r in ok if r.get(key) is not None]
            others.append(fmt(_mean(vals)) if vals else "")
        lines.append(f"| {student} | {t:g} | {a:g} | {cell} | " + " | ".join(others) + " |")
    base = cfg.base
    source = (
        f"cache {base.cache}"
        if base.cache
        else "online teacher " + ", ".join(base.online_teacher or [])
    )
    return (
        f"Sweep over {source}: loss {base.loss}, ensemble {base.ensemble}, "
        f"{base.train.epochs} epochs, "
        f"{seeds} seed(s); bold: each student's best.\n\n" + "\n".join(lines)
    )


def plot_results(rows: list[dict], out: Path) -> Path | None:
    """Test errors (a token cache's: test perplexity) vs temperature (log scale), one line per
    alpha, one panel per student; min-max bars over seeds. Written into ``out`` as the measure's
    ``plot_name``.

    Returns:
        The PNG's path, or None when there is nothing to plot (no finished rows with a test
        measure).
    """
    measure = measure_of(rows)
    key = measure.key
    groups = _group([r for r in rows if r["status"] == "ok" and r[key] is not None])
    if not groups:
        return None
    from pipeline.experiments.plots import pyplot, save

    plt = pyplot()
    students = list(dict.fromkeys(k[0] for k in groups))
    fig, axes = plt.subplots(1, len(students), figsize=(5 * len(students), 4), squeeze=False)
    for ax, student in zip(axes[0], students, strict=True):
        alphas = sorted({k[2] for k in groups if k[0] == student})
        temps: set[float] = set()
        for a in alphas:
            pts = sorted(
                (k[1], [r[key] for r in v])
                for k, v in groups.items()
                if k[0] == student and k[2] == a
            )
            ts = [t for t, _ in pts]
            temps.update(ts)
            means = [_mean(e) for _, e in pts]
            lo = [m - min(e) for m, (_, e) in zip(means, pts, strict=True)]
            hi = [max(e) - m for m, (_, e) in zip(means, pts, strict=True)]
            ax.errorbar(ts, means, yerr=[lo, hi], marker="o", capsize=3, label=f"alpha = {a:g}")
        ax.set_xscale("log")
        ax.set_xticks(sorted(temps))
        ax.set_xticklabels([f"{t:g}" for t in sorted(temps)])
        ax.minorticks_off()
        ax.set_xlabel("temperature T")
        ax.set_ylabel(measure.title)
        ax.set_title(student)
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, Path(out) / measure.plot_name, dpi=110)


def sweep_command(
    cfg: SweepConfig,
    log: Callable[[str], None] = print,
    progress: bool = True,
    dry_run: bool = False,
) -> SweepResult | None:
    """Print the grid and its cost (``dry_run``), or run / resume the sweep and print its table."""
    if dry_run:
        log(plan_text(cfg)[1])
        return None
    res = run_sweep(cfg, log=log, progress=progress)
    log("")
    log(res.table)
    log(
        f"\n{len(res.rows)} settings: {res.trained} trained, {res.reused} reused, "
        f"{res.failed} failed"
        + (", interrupted" if res.interrupted else "")
        + f" in {res.seconds:.1f}s"
    )
    log(
        f"results: {res.files.get('csv')}, {res.files.get('json')}, {cfg.out}/results.md"
        + (f"\nplot:    {res.files['plot']}" if "plot" in res.files else "")
    )
    return res
