"""The ``bench`` report: each figure's verdict against its goal, the warnings that make figures
unreliable (a loaded machine, repeats that disagree), and the Markdown table.
"""

from __future__ import annotations

import statistics

# A figure whose repeats differ by more than this share of their median is not a measurement of
# the code but of the machine (another job took the cores meanwhile).
MAX_SPREAD = 0.25
# A 1-minute load average above this share of the cores before the bench: someone else is busy.
MAX_LOAD_SHARE = 0.5


def spread(fig: dict) -> float:
    """The largest (max - min) / median over a figure's timed repeats (0 without repeats)."""
    out = 0.0
    for times in (fig.get("runs") or {}).values():
        if len(times) > 1 and statistics.median(times) > 0:
            out = max(out, (max(times) - min(times)) / statistics.median(times))
    return out


def verdict(fig: dict) -> str:
    """``met`` or ``not met`` against the figure's goal; ``reported`` for figures without one."""
    goal = fig.get("goal", "reported")
    if "limit" in fig:  # P4 rss: peak growth against budget + 300 MiB
        return "met" if fig["ok"] else "not met"
    if goal == "reported":
        return "reported"
    op, bound = goal.split()[:2]
    value = fig["vs_ideal"] if "x ideal" in goal else fig["ratio"]
    ok = value <= float(bound) if op == "<=" else value >= float(bound)
    return "met" if ok else "not met"


def bench_warnings(results: dict) -> list[str]:
    """Why some figures may not be trusted: a loaded machine, repeats that disagree."""
    m, out = results["machine"], []
    cores = m.get("cores") or 1
    load = m.get("load_before")
    if load is not None and load > MAX_LOAD_SHARE * cores:
        out.append(
            f"the load average was {load:.1f} on {cores} cores before the bench started: "
            "other processes share the CPU, so the ratios are unreliable; re-run on an "
            "idle machine"
        )
    for key, fig in results["figures"].items():
        s = spread(fig)
        if s > MAX_SPREAD:
            out.append(
                f"{key}: its repeats differ by {s:.0%} of their median (more than "
                f"{MAX_SPREAD:.0%}): the machine was busy meanwhile, the figure is "
                "unreliable"
            )
    return out


def _row(key: str, measures: str, value: str, fig: dict) -> str:
    unreliable = " (unreliable)" if spread(fig) > MAX_SPREAD else ""
    goal = fig.get("goal", "reported")
    return f"| {key.split()[0]} | {measures} | {value} | {goal} | {verdict(fig)}{unreliable} |"


def format_table(results: dict) -> str:
    """The figures as a Markdown table, P1 to P5, each with its goal and whether it is met; then
    the warnings (a loaded machine, repeats that disagree)."""
    f = results["figures"]
    m = results["machine"]
    lines = [
        f"kd-pipeline bench --scale {results['scale']}: {results['rows']} rows; "
        f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, {m['device']}",
        "",
        "| id | measures | value | goal | verdict |",
        "|---|---|---|---|---|",
    ]
    if "P1" in f:
        v = f["P1"]
        lines.append(
            _row(
                "P1",
                f"KD epoch from cache {v['kd_epoch_from_cache_s']:.2f}s / CE epoch "
                f"{v['ce_epoch_s']:.2f}s ({v['loader']} loader)",
                f"{v['ratio']:.3f}",
                v,
            )
        )
    if "P2" in f:
        v = f["P2"]
        lines.append(
            _row(
                "P2",
                f"cache-logits {v['cache_logits_s']:.2f}s + sweep of {v['k']} "
                f"from cache {v['sweep_cached_s']:.2f}s / online-KD sweep "
                f"{v['sweep_online_s']:.2f}s (ideal {v['ideal']:.3f})",
                f"{v['ratio']:.3f} ({v['vs_ideal']:.2f} x ideal)",
                v,
            )
        )
    for key in sorted((k for k in f if k.startswith("P3")), key=_classes):
        v = f[key]
        if "skipped" in v:
            lines.append(f"| P3 | {key[3:]}: skipped ({v['skipped']}) | | | |")
            continue
        lines.append(
            _row(
                key,
                f"cache-logits {v['cache_logits_s']:.2f}s{_rate(v)} / inference "
                f"{v['inference_only_s']:.2f}s ({key[3:]})",
                f"{v['ratio']:.3f}",
                v,
            )
        )
    for key in sorted((k for k in f if k.startswith("P4 ") and k != "P4 rss"), key=_classes):
        v = f[key]
        lines.append(
            _row(
                key,
                f"loader {v['stream_MBps']:.0f} MB/s / the codec limit (whole-shard reads "
                f"on every core) {v['codec_MBps']:.0f} MB/s ({key[3:]})",
                f"{v['ratio']:.3f}",
                v,
            )
        )
        lines.append(
            f"| P4 | loader / raw .npy read {v['raw_npy_MBps']:.0f} MB/s; one-thread shard reads "
            f"{v['reads_MBps']:.0f} MB/s ({key[3:]}) | {v['raw_ratio']:.3f} | (information) | |"
        )
    if "P4 rss" in f:
        r = f["P4 rss"]
        lines.append(
            _row(
                "P4",
                f"peak RSS growth streaming {r['raw_payload'] / 2**20:.0f} MiB "
                f"cache, budget {r['budget'] / 2**20:.0f} MiB ({r['mode']})",
                f"{r['rss_growth'] / 2**20:.0f} MiB",
                {**r, "goal": f"<= {r['limit'] / 2**20:.0f} MiB"},
            )
        )
    for key in sorted((k for k in f if k.startswith("P5")), key=_classes):
        v = f[key]
        lines.append(
            _row(
                key,
                f"bytes/sample/member on disk vs float32 ({key[3:]})",
                f"{v['bytes_per_sample_per_member']:.1f} vs {v['raw_float32']} ({v['ratio']:.2f}x)",
                v,
            )
        )
    if "P6 1000 classes" in f:
        v = f["P6 1000 classes"]
        e = v["epoch_s"]
        lines.append(
            _row(
                "P6",
                f"loader epoch topk:20 {e['topk:20']:.2f}s / dense {e['dense']:.2f}s "
                f"(1000 classes; sampled:12 {e['sampled:12']:.2f}s, "
                f"{v['sampled_ratio']:.2f}x)",
                f"{v['ratio']:.3f}",
                v,
            )
        )
        for b in v["bytes"]:
            lines.append(
                f"| P5 | {b['store']} bytes/row/member on disk, C = {b['classes']:,} "
                f"(synthetic logits; raw {b['raw']:,}) | {b['on_disk']:,.1f} "
                f"({b['vs_dense_raw']:.4f}x dense float16) | reported | |"
            )
    warnings = results.get("warnings", bench_warnings(results))
    if warnings:
        lines += ["", *(f"warning: {w}" for w in warnings)]
    return "\n".join(lines)


def _rate(v: dict) -> str:
    """`` (12,345 rows/s)``: the cache's absolute rate, when the figure has it (older reports
    did not record it)."""
    return f" ({v['cache_rows_per_s']:,.0f} rows/s)" if "cache_rows_per_s" in v else ""


def _classes(key: str) -> int:
    """``"P3 1000 classes"`` -> 1000: rows of one id in class order (10 before 1000)."""
    parts = key.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
