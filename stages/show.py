"""How the commands print their results: plain text tables for a terminal."""

from __future__ import annotations

from pathlib import Path

from pipeline.metrics import percent

# evaluate's columns: (header, width, the cell of one member's metrics).
_CLASSIFIER_COLUMNS = (
    ("errors", 7, lambda m: str(m["errors"])),
    ("accuracy", 9, lambda m: percent(m["accuracy"])),
    ("NLL", 7, lambda m: f"{m['nll']:.4f}"),
    ("ECE", 7, lambda m: f"{m['ece']:.4f}"),
)
_SEQUENCE_COLUMNS = (  # language models: next-token perplexity, bits per byte, token accuracy
    ("perplexity", 10, lambda m: f"{m['perplexity']:.3f}"),
    ("bits/byte", 9, lambda m: f"{m['bits_per_byte']:.4f}"),
    ("accuracy", 9, lambda m: percent(m["accuracy"])),
    ("tokens", 8, lambda m: str(m["tokens"])),
)


def evaluation_table(res: dict) -> str:
    """``evaluate``'s result as one line per member (and the ensemble when there are several)."""
    columns = _SEQUENCE_COLUMNS if res.get("sequence") else _CLASSIFIER_COLUMNS
    head = " ".join(f"{h:>{w}}" for h, w, _ in columns)
    lines = [f"{'model':<28} {head}   on {res['dataset']}"]
    rows = [(Path(p).name, m) for p, m in zip(res["paths"], res["members"], strict=True)]
    if len(rows) > 1:
        rows.append((f"ensemble ({res['method']})", res["ensemble"]))
    for name, m in rows:
        lines.append(f"{name:<28} " + " ".join(f"{cell(m):>{w}}" for _, w, cell in columns))
    return "\n".join(lines)


def student_result_line(result: dict | None) -> str:
    """A student run's test result as its training prints it (classification or sequence); ""
    when it was not evaluated."""
    t = ((result or {}).get("metrics") or {}).get("test")
    if not t:
        return ""
    on = (result.get("config") or {}).get("eval")
    if "perplexity" in t:
        return (
            f"student: test perplexity {t['perplexity']:.3f}, {t['bits_per_byte']:.4f} bits per "
            f"byte, token accuracy {percent(t['accuracy'])}"
        )
    return (
        f"student: {t['errors']} test errors ({percent(t['accuracy'])} accuracy, "
        f"NLL {t['nll']:.4f}, ECE {t['ece']:.4f})" + (f" on {on}" if on else "")
    )


# More class names than this are summarised: a 150k vocabulary on one line is unreadable.
CLASSES_SHOWN = 10


def format_cache_info(i: dict) -> str:
    """``cache info``'s text form: samples, rows per sample (views, token positions), classes
    summarised, members with their accuracy as a percentage."""
    from pipeline.cache.info import describe_rows  # zarr: only for the commands that need it

    ratio = i["size_on_disk"] / i["raw_float32_size"] if i["raw_float32_size"] else float("nan")
    views, positions = i.get("views") or 1, i.get("positions") or 1
    per_sample = views * positions
    # rows_per_shard counts samples; with several rows per sample say both, or 64 reads as rows.
    unit = "sequences" if positions > 1 else "samples"
    per_shard = (
        f"{i['rows_per_shard']} rows per shard"
        if per_sample == 1
        else f"{i['rows_per_shard']} {unit} = {i['rows_per_shard'] * per_sample} rows per shard"
    )
    if positions > 1:  # a sequence's labels are its next tokens, held by the dataset
        labels = "labels: the next tokens, kept with the dataset"
    else:
        labels = "labeled" if i["labeled"] else "unlabeled"
    rows = describe_rows(i["n"], views, positions).replace(" rows", "", 1)
    # "8000 (2000 samples x 4 views; labeled)", or "600  (labeled)" as before
    rows = f"{rows[:-1]}; {labels})" if per_sample > 1 else f"{rows}  ({labels})"
    lines = [
        f"cache      {i['location']}  ({i['format']} v{i['version']})",
        f"status     {'complete' if i['complete'] else 'PARTIAL'}: "
        f"{len(i['shards_done'])}/{i['n_shards']} shards done by every member ({per_shard})",
        f"rows       {rows}",
    ]
    if views > 1 or i.get("augment"):
        identity = "; view 0 is the input itself" if i.get("include_identity") else ""
        lines.append(
            f"views      {views} per sample, augment {i.get('augment') or 'none'}{identity}"
        )
    lines += [
        f"classes    {i['num_classes']}: {class_summary(i['class_names'])}",
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
            + (f"  test accuracy {percent(acc)}" if acc is not None else "")
        )
        lines += _storage_lines(m)
    lines.append(f"created    {i['created']} by kd-pipeline {i['tool_version']}: {i['command']}")
    return "\n".join(lines)


def class_summary(names: list[str], shown: int = CLASSES_SHOWN) -> str:
    """Every class name when there are few, else the first few and where the full list is."""
    if len(names) <= shown:
        return ", ".join(names)
    return (
        ", ".join(names[: shown - 2])
        + f", ..., {names[-1]}  (all {len(names)}: `cache info --json`, class_names)"
    )


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
        # One label column, as wide as the label, then every column header right above its values.
        label = f"fidelity on {fid['rows']} rows:"
        width = max(24, len(label) + 1)
        lines.append(
            f"      {label:<{width}}{'T':>4}  {'KL mean':<10} {'KL worst':<10} "
            f"{'kept mean':<10} kept min"
        )
        for j, t in enumerate(fid["temperatures"]):
            kl, worst = fid["kl_mean"][j], fid["kl_max"][j]
            lines.append(
                f"      {'':<{width}}{t:>4g}  "
                + (f"{kl:<10.3g} {worst:<10.3g}" if kl is not None else f"{'n/a':<10} {'n/a':<10}")
                + f" {fid['kept_mass_mean'][j]:<10.4f} {fid['kept_mass_min'][j]:.4f}"
            )
    return lines
