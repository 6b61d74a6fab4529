"""How ``cache info`` prints: class lists summarised, the fidelity table's columns aligned,
accuracies as percentages (on hand-made info dicts: no cache needed)."""

from __future__ import annotations

from stages.show import class_summary, format_cache_info


def info(num_classes: int = 3, fidelity_rows: int = 256) -> dict:
    member = {
        "index": 0,
        "model_spec": "mlp:8",
        "checkpoint_sha256": "sha256:" + "ab" * 32,
        "path": "member-0.pt",
        "metrics": {"accuracy": 0.788},
        "storage": "topk:4",
        "raw_bytes_per_row": 24,
        "dense_bytes_per_row": 2 * num_classes,
        "bytes_per_row_on_disk": 20.5,
        "ratio_to_dense": 0.5,
        "fidelity": {
            "rows": fidelity_rows,
            "temperatures": [1.0, 20.0],
            "kl_mean": [0.00123, 0.5],
            "kl_max": [0.01, 0.9],
            "kept_mass_mean": [0.99, 0.5],
            "kept_mass_min": [0.9, 0.25],
        },
    }
    return {
        "location": "c.zarr",
        "format": "kd-pipeline-logit-cache",
        "version": 2,
        "n": 100,
        "num_classes": num_classes,
        "class_names": [f"c{i}" for i in range(num_classes)],
        "dtype": "float16",
        "codecs": ["zstd"],
        "rows_per_shard": 50,
        "n_shards": 2,
        "shards_done": [0, 1],
        "complete": True,
        "labeled": True,
        "rows": 100,
        "views": 1,
        "positions": 1,
        "augment": None,
        "members": [member],
        "dataset": {"spec": "npz:x.npz:train", "n": 100, "fingerprint": "sha256:00"},
        "size_on_disk": 2**20,
        "raw_float32_size": 2**21,
        "created": "2026-01-01",
        "command": "tests",
        "tool_version": "0.1.0",
    }


def test_a_few_classes_are_all_listed_many_are_summarised() -> None:
    assert class_summary(["a", "b", "c"]) == "a, b, c"
    names = [str(i) for i in range(150_000)]
    assert class_summary(names) == (
        "0, 1, 2, 3, 4, 5, 6, 7, ..., 149999  (all 150000: `cache info --json`, class_names)"
    )
    text = format_cache_info(info(num_classes=1000))
    assert "classes    1000: c0, c1, c2, c3, c4, c5, c6, c7, ..., c999  (all 1000:" in text
    assert max(len(line) for line in text.splitlines()) < 110


def test_member_accuracy_is_a_percentage() -> None:
    text = format_cache_info(info())
    assert "test accuracy 78.80 %" in text and "0.7880" not in text
    assert "rows       100  (labeled)" in text and "(50 rows per shard)" in text
    assert "views" not in text


def test_fidelity_headers_sit_above_their_values() -> None:
    for rows in (256, 12_345_678):  # a label longer than the default column widens it
        lines = format_cache_info(info(fidelity_rows=rows)).splitlines()
        head = next(i for i, line in enumerate(lines) if "fidelity on" in line)
        header, first, second = lines[head : head + 3]
        # each header word ends where its column's values start or end
        assert header.index("T") == first.index("1") == second.index("20") + 1
        assert header.index("KL mean") == first.index("0.00123")
        assert header.index("KL worst") == first.index("0.01")
        assert header.index("kept mean") == first.index("0.9900")
        assert header.index("kept min") == first.index("0.9000")
