"""How the commands print their results: plain text tables for a terminal."""

from __future__ import annotations

from pathlib import Path

from pipeline.metrics import percent


def evaluation_table(res: dict) -> str:
    """``evaluate``'s result as one line per member (and the ensemble when there are several)."""
    if res.get("sequence"):
        return _sequence_evaluation_table(res)
    lines = [
        f"{'model':<28} {'errors':>7} {'accuracy':>9} {'NLL':>7} {'ECE':>7}   on {res['dataset']}"
    ]
    rows = [(Path(p).name, m) for p, m in zip(res["paths"], res["members"], strict=True)]
    if len(rows) > 1:
        rows.append((f"ensemble ({res['method']})", res["ensemble"]))
    for name, m in rows:
        lines.append(
            f"{name:<28} {m['errors']:>7} {percent(m['accuracy']):>9} {m['nll']:>7.4f} "
            f"{m['ece']:>7.4f}"
        )
    return "\n".join(lines)


def _sequence_evaluation_table(res: dict) -> str:
    """``evaluate`` of language models: next-token perplexity, bits per byte, token accuracy."""
    lines = [
        f"{'model':<28} {'perplexity':>10} {'bits/byte':>9} {'accuracy':>9} {'tokens':>8}"
        f"   on {res['dataset']}"
    ]
    rows = [(Path(p).name, m) for p, m in zip(res["paths"], res["members"], strict=True)]
    if len(rows) > 1:
        rows.append((f"ensemble ({res['method']})", res["ensemble"]))
    for name, m in rows:
        lines.append(
            f"{name:<28} {m['perplexity']:>10.3f} {m['bits_per_byte']:>9.4f} "
            f"{percent(m['accuracy']):>9} {m['tokens']:>8}"
        )
    return "\n".join(lines)


def format_cache_info(i: dict) -> str:
    ratio = i["size_on_disk"] / i["raw_float32_size"] if i["raw_float32_size"] else float("nan")
    lines = [
        f"cache      {i['location']}  ({i['format']} v{i['version']})",
        f"status     {'complete' if i['complete'] else 'PARTIAL'}: "
        f"{len(i['shards_done'])}/{i['n_shards']} shards done by every member "
        f"({i['rows_per_shard']} rows per shard)",
        f"rows       {i['n']}  ({'labeled' if i['labeled'] else 'unlabeled'})",
        f"classes    {i['num_classes']}: {', '.join(i['class_names'])}",
        f"dtype      {i['dtype']}  codecs {' -> '.join(i['codecs'])}",
        f"size       {i['size_on_disk'] / 2**20:.2f} MiB on disk vs "
        f"{i['raw_float32_size'] / 2**20:.2f} MiB raw float32 ({ratio:.2f}x)",
        f"dataset    {i['dataset']['spec']}  n={i['dataset']['n']}  {i['dataset']['fingerprint']}",
        f"members    {len(i['members'])}",
    ]
    for m in i["members"]:
        acc = (m.get("metrics") or {}).get("accuracy")
        lines.append(
            f"  [{m['index']}] {m['model_spec']}  {m['checkpoint_sha256'][:23]}…  {m['path']}"
            + (f"  test acc {acc:.4f}" if acc is not None else "")
        )
        lines += _storage_lines(m)
    lines.append(f"created    {i['created']} by kd-pipeline {i['tool_version']}: {i['command']}")
    return "\n".join(lines)


def _storage_lines(m: dict) -> list[str]:
    """A member's storage kind, bytes per row and the fidelity recorded when it was written."""
    if m.get("storage") is None:
        return []
    disk = m.get("bytes_per_row_on_disk")
    lines = [
        f"      storage {m['storage']}: {m['raw_bytes_per_row']} B/row raw"
        + (f", {disk:.1f} B/row on disk" if disk is not None else "")
        + f" (dense: {m['dense_bytes_per_row']} B/row raw"
        + (f"; on disk {m['ratio_to_dense']:.3g}x of dense raw)" if disk is not None else ")")
    ]
    fid = m.get("fidelity")
    if fid and fid.get("rows"):
        lines.append(
            f"      fidelity on {fid['rows']} rows:   T  KL mean    KL worst   kept mean  kept min"
        )
        for j, t in enumerate(fid["temperatures"]):
            kl, worst = fid["kl_mean"][j], fid["kl_max"][j]
            lines.append(
                f"      {'':>24}{t:>4g}  "
                + (f"{kl:<10.3g} {worst:<10.3g}" if kl is not None else f"{'n/a':<10} {'n/a':<10}")
                + f" {fid['kept_mass_mean'][j]:<10.4f} {fid['kept_mass_min'][j]:.4f}"
            )
    return lines
