"""Every command-line parameter is generated from one config field's declaration."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from pipeline.experiments.config import SweepConfig
from pipeline.options import declared, show_size
from pipeline.training.config import StudentConfig
from pipeline.training.train_config import TrainConfig
from stages.cli import main
from stages.params import FIELD_ATTR
from tests.helpers.cli import commands, field_of

ALL = list(commands(main))


def test_every_command_is_walked() -> None:
    names = {n for n, _ in ALL}
    assert {
        "train-teacher",
        "evaluate",
        "cache-logits",
        "train-student",
        "sweep",
        "reproduce",
        "bench",
        "demo",
        "cache info",
        "cache verify",
        "cache copy",
        "cache pack",
        "cache ls",
        "specialists cluster",
        "specialists train",
        "specialists evaluate",
        "specialists run",
    } <= names


@pytest.mark.parametrize("name,cmd", ALL, ids=[n for n, _ in ALL])
def test_every_parameter_comes_from_a_config_field(name: str, cmd: click.Command) -> None:
    for param in cmd.params:
        if param.name == "help":
            continue
        qualified = getattr(param, FIELD_ATTR, None)
        assert qualified, f"{name}: {param.opts} is not generated from a config field"
        f = field_of(qualified)
        opt = declared(f)
        assert opt is not None
        if opt.choices is not None:  # the registry itself, not a copy
            assert list(param.type.choices) == list(opt.choices)
        if isinstance(param, click.Option) and opt.help:
            # the field's help, then (for a registry's choices) each choice's own
            assert param.help is not None and param.help.startswith(opt.help)
            assert param.help == opt.help or param.help[len(opt.help) :].startswith(" Choices: ")


def test_shown_defaults_are_the_fields_defaults() -> None:
    cmd = main.commands["train-student"]
    by_name = {p.opts[0]: p for p in cmd.params}
    assert by_name["--temperature"].default == StudentConfig().temperature == 20.0
    assert by_name["--epochs"].default == TrainConfig().epochs
    assert by_name["--memory-budget"].default == show_size(StudentConfig().memory_budget) == "2G"
    sweep = {p.opts[0]: p for p in main.commands["sweep"].params}
    assert sweep["--temperature"].default == "1,2,4,8,20"
    assert "--seed" not in sweep  # each setting's seed comes from --seeds


def test_cli_builds_the_same_config_as_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a command receives equals the config built in Python with the same values."""
    from pipeline.experiments import sweep as sweep_mod

    seen = {}
    monkeypatch.setattr(
        sweep_mod, "sweep_command", lambda cfg, **kw: seen.setdefault("cfg", cfg) and None
    )
    res = CliRunner().invoke(
        main,
        [
            "sweep",
            "--cache",
            "c.zarr",
            "-T",
            "2,4",
            "--alpha",
            "1",
            "--student",
            "mlp:8",
            "--student",
            "mlp:16",
            "--epochs",
            "3",
            "--memory-budget",
            "64M",
            "--grad-clip",
            "0",
            "--out",
            "o",
            "--dry-run",
        ],
    )
    assert res.exit_code == 0, res.output
    expected = SweepConfig(
        base=StudentConfig(
            cache="c.zarr",
            memory_budget=64 << 20,
            train=dataclasses.replace(TrainConfig(), epochs=3, grad_clip=None),
        ),
        temperatures=[2.0, 4.0],
        alphas=[1.0],
        students=["mlp:8", "mlp:16"],
        out="o",
    )
    assert seen["cfg"] == expected


def test_specialists_default_epochs_agree() -> None:
    """The library and the CLI once disagreed (3 vs 10 epochs); there is one default now."""
    from pipeline.experiments.specialists.config import SpecialistsConfig

    param = {p.opts[0]: p for p in main.commands["specialists"].commands["run"].params}
    assert param["--epochs"].default == SpecialistsConfig().train.epochs == 10


def test_bad_values_name_the_option() -> None:
    res = CliRunner().invoke(main, ["train-student", "--cache", "c", "--memory-budget", "lots"])
    assert res.exit_code == 2
    assert "--memory-budget" in res.output and "expected a size like 512M" in res.output
    res = CliRunner().invoke(main, ["train-student", "--cache", "c", "--class-bias", "3"])
    assert res.exit_code == 2 and "expected CLASS=DELTA" in res.output


def test_a_flag_two_fields_declare_is_refused_and_owned_fields_are_not_offered() -> None:
    from pipeline.options import nested_config, option
    from stages.params import configured

    @dataclasses.dataclass
    class Grid:
        base: StudentConfig = dataclasses.field(default_factory=StudentConfig)
        out: str = option("", help="The grid's own directory.")

    with pytest.raises(TypeError, match="--out is declared by both Grid.out and StudentConfig.out"):
        configured(Grid)(lambda cfg: None)

    @dataclasses.dataclass
    class Owned:
        base: StudentConfig = nested_config(StudentConfig, owned=("out", "train.seed"))
        out: str = option("", help="The grid's own directory.")

    params = configured(Owned)(lambda cfg: None).__click_params__
    flags = {p.opts[0]: getattr(p, FIELD_ATTR) for p in params}
    assert flags["--out"] == "Owned.out" and "--seed" not in flags and "--epochs" in flags
