"""An option whose choices are a registry shows each choice's own help in ``--help``: the registry
entry, not the option, describes a choice, so a new entry documents itself."""

from __future__ import annotations

from click.testing import CliRunner

from pipeline.training.optim import OPTIMIZERS
from stages.cli import main


def _help(command: str) -> str:
    res = CliRunner().invoke(main, [command, "--help"], terminal_width=400)
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())


def test_every_optimizer_is_described_by_its_registry_entry() -> None:
    text = _help("train-student")
    for name in OPTIMIZERS:
        assert f"{name}: {OPTIMIZERS.help(name)}" in text


def test_a_help_that_already_describes_every_choice_is_left_alone() -> None:
    text = _help("train-student")
    loss = text[text.index("--loss") : text.index("--ensemble")]
    assert "Choices:" not in loss  # its help names kd: and logit-mse: itself
