"""``--log-to`` naming one tracker twice is refused before anything runs (two TensorBoard writers
in one folder wrote two event files: every point shown twice), from flags and from a run file."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from stages.cli import main

MESSAGE = "log_to names tensorboard more than once; give each tracker once"


def test_a_tracker_named_twice_is_refused(tmp_path: Path) -> None:
    flags = ["train-student", "--cache", "c.zarr", "--student", "mlp:8", "--print-config"]
    res = CliRunner().invoke(main, [*flags, "--log-to", "tensorboard", "--log-to", "tensorboard"])
    assert res.exit_code == 2 and MESSAGE in res.output, res.output
    run = tmp_path / "run.toml"
    run.write_text('cache = "c.zarr"\n[train]\nlog_to = ["tensorboard", "tensorboard"]\n')
    res = CliRunner().invoke(main, ["train-student", "--config", str(run), "--print-config"])
    assert res.exit_code == 2 and MESSAGE in res.output, res.output
    res = CliRunner().invoke(main, [*flags, "--log-to", "tensorboard"])
    assert res.exit_code == 0 and 'log_to = ["tensorboard"]' in res.output, res.output
