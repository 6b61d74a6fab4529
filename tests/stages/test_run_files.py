"""Run files (issues 29 and 31): ``--config FILE.toml``, ``--print-config``, ``config.toml`` in run
directories, the shipped ``configs/``, and a ``kd-pipeline --help`` that imports no torch."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.runfile import RUN_FILE, Section, dump_toml
from stages.cli import COMMANDS, main
from tests.helpers.cli import commands
from tests.helpers.shipped_configs import CONFIGS, shipped, text

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    assert "Traceback" not in res.output, res.output
    return res.exit_code, res.output


def printed(*args: str) -> str:
    code, out = cli(*args, "--print-config")
    assert code == 0, (args, out)
    return out


def replayed(command: list[str], toml: str, tmp_path: Path, *flags: str) -> str:
    """``--print-config`` of ``toml`` given with ``--config`` (and ``flags``)."""
    path = tmp_path / "given.toml"
    path.write_text(toml)
    return printed(*command, "--config", str(path), *flags)


# ------------------------------------------------------------------------------- the TOML writer
def test_the_toml_writer_round_trips_every_value_a_config_holds() -> None:
    table = Section(
        plain="mlp:1200,1200",
        awkward='quote " backslash \\ tab \t newline \n bell \x07 del \x7f é ✓',
        ints=[0, -3, 2**62],
        floats=[0.1, 1e-05, 1e300, -0.0, 2.5e-320, 1 / 3, math.inf, -math.inf],
        flag=True,
        off=False,
        empty=[],
        mapping={"3": -1.5, "endpoint_url": "http://h:9", "client_kwargs": {"region": "eu"}},
        none={},
        **{"needs quotes": 1, "dotted.key": 2},
    )
    table["train"] = Section(epochs=3, inner=Section(seed=1))
    table["empty_section"] = Section()
    text = dump_toml(table)
    back = tomllib.loads(text)
    assert back == {k: v for k, v in table.items() if k != "empty_section"}
    assert [math.copysign(1, f) for f in back["floats"][3:4]] == [-1.0]  # -0.0 kept
    assert math.isnan(tomllib.loads(dump_toml({"x": math.nan}))["x"])
    # Plain keys come before the first section (TOML puts later keys in the last one).
    assert text.index("flag = true") < text.index("[train]") < text.index("[train.inner]")


# ----------------------------------------------------------------------- --print-config round trip
# The fewest arguments each command needs (a path that must exist is made in the test).
NEEDS = {
    "evaluate": ["--model", "{file}"],
    "cache-logits": ["--teacher", "t"],
    "train-student": ["--cache", "c.zarr"],
    "sweep": ["--cache", "c.zarr"],
    "specialists cluster": ["--cache", "c.zarr"],
    "specialists train": ["--cache", "c.zarr"],
    "specialists evaluate": ["--cache", "c.zarr"],
    "specialists run": ["--cache", "c.zarr"],
    "cache info": ["c.zarr"],
    "cache verify": ["c.zarr"],
    "cache pack": ["c.zarr", "c.zarr.zip"],
    "cache copy": ["c.zarr", "d.zarr"],
    "cache ls": ["caches"],
}


@pytest.mark.parametrize("name", [n for n, _ in commands(main)])
def test_print_config_round_trips_for_every_command(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Print, load the printed TOML with --config, print again: identical, for every command."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"")
    args = [a.format(file=tmp_path / "model.pt") for a in NEEDS.get(name, [])]
    first = printed(*name.split(), *args)
    tomllib.loads(first)  # valid TOML
    assert replayed(name.split(), first, tmp_path) == first


def test_print_config_prints_the_resolved_config_and_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = printed(
        "train-student",
        "--cache",
        "c.zarr",
        *("-T", "4", "--grad-clip", "0", "--class-bias", "3=+3.5", "--members", "0,1"),
        *("--storage-option", "endpoint_url=http://h:9", "--storage-option", "secret=hush"),
        "--quiet",  # how the command prints: never part of the printed config
    )
    table = tomllib.loads(out)
    assert table["out"] == "data/runs/c-mlp-800-800-kd-mean-probs-T4-a0.9-m0.1-s0"  # resolved
    assert (table["temperature"], table["members"]) == (4.0, [0, 1])
    assert table["class_bias"] == {"3": 3.5}
    assert table["train"]["grad_clip"] == 0  # None: no clipping, written as the flag takes it
    assert table["storage_options"] == {"endpoint_url": "http://h:9"}  # credentials never printed
    assert "hush" not in out and "quiet" not in table
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------ reading run files
def test_flags_given_on_the_command_line_override_the_file(tmp_path: Path) -> None:
    toml = 'cache = "c.zarr"\ntemperature = 4\nalpha = 0.5\n[train]\nepochs = 7\nseed = 2\n'
    table = tomllib.loads(replayed(["train-student"], toml, tmp_path, "-T", "8", "--seed", "3"))
    assert (table["temperature"], table["alpha"]) == (8.0, 0.5)
    assert (table["train"]["epochs"], table["train"]["seed"]) == (7, 3)


def test_values_read_as_their_flags_or_as_native_toml(tmp_path: Path) -> None:
    """Text goes through the field's declared parser; native TOML values are taken where they fit:
    both spellings give the same config."""
    as_text = (
        'cache = "c.zarr"\nmembers = "0,1"\nmemory_budget = "64M"\nclass_bias = ["3=+3.5"]\n'
        'storage_options = ["client_kwargs.region_name=eu", "anon=true"]\n'
        'temperature = "4"\n[train]\ngrad_clip = "0"\nepochs = "3"\n'
    )
    native = (
        'cache = "c.zarr"\nmembers = [0, 1]\nmemory_budget = 67108864\nclass_bias = {3 = 3.5}\n'
        'storage_options = { client_kwargs = { region_name = "eu" }, anon = true }\n'
        "temperature = 4\n[train]\ngrad_clip = 0\nepochs = 3\n"
    )
    first = replayed(["train-student"], as_text, tmp_path)
    assert first == replayed(["train-student"], native, tmp_path)
    table = tomllib.loads(first)
    assert table["memory_budget"] == 64 << 20 and table["class_bias"] == {"3": 3.5}
    assert table["storage_options"] == {"client_kwargs": {"region_name": "eu"}, "anon": True}
    grid = 'base = { cache = "c.zarr" }\ntemperatures = "2,4"\nseeds = [0, 1]\n'
    table = tomllib.loads(replayed(["sweep"], grid, tmp_path))
    assert (table["temperatures"], table["seeds"], table["base"]["cache"]) == (
        [2.0, 4.0],
        [0, 1],
        "c.zarr",
    )


def test_unknown_keys_and_bad_values_are_refused_all_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'cache = "c.zarr"\nepochs = 3\nloss = "nope"\ntemperature = true\nbogus = 1\n'
        '[train]\nepoch = 2\nbatch_size = 1.5\nlr = "fast"\n[sampler]\nx = 1\n'
    )
    code, out = cli("train-student", "--config", str(bad))
    assert code == 2
    for problem in (
        "unknown key 'epochs'; did you mean train.epochs?",
        "unknown key 'bogus'",
        "unknown key 'train.epoch'; did you mean train.epochs?",
        "unknown key 'sampler'",
        "loss: expected one of kd, ",
        "temperature: expected a number, got True",
        "train.batch_size: expected an integer, got 1.5",
        "train.lr: expected a number, got 'fast'",
    ):
        assert problem in out, (problem, out)
    assert out.count(f"--config {bad}:") == 8
    assert not (tmp_path / "data").exists()


def test_a_file_that_is_not_toml_is_one_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("temperature = = 4\n")
    code, out = cli("train-student", "--config", str(bad))
    assert code == 2 and f"--config {bad}: not a TOML file" in out and "line 1" in out


def test_required_options_may_come_from_the_file_and_are_still_required(tmp_path: Path) -> None:
    given = tmp_path / "info.toml"
    given.write_text('cache = "c.zarr"\n')
    assert printed("cache", "info", "--config", str(given)) == (
        'cache = "c.zarr"\nstorage_options = {}\n'
    )
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    code, out = cli("cache", "info", "--config", str(empty))
    assert code == 2 and "Missing argument 'CACHE'" in out
    code, out = cli("cache-logits", "--config", str(empty))
    assert code == 2 and "Missing option '--teacher'" in out


def test_owned_fields_of_a_nested_config_are_unknown_keys(tmp_path: Path) -> None:
    """A sweep sets each setting's temperature itself: base.temperature is not a key of it."""
    bad = tmp_path / "grid.toml"
    bad.write_text('[base]\ncache = "c.zarr"\ntemperature = 4.0\n')
    code, out = cli("sweep", "--config", str(bad))
    assert code == 2 and "unknown key 'base.temperature'; did you mean temperatures?" in out


# ------------------------------------------------------------------ a run from flags or from a file
def test_a_run_file_reproduces_the_run_its_flags_make(
    cache_path: Path, npz_path: Path, tmp_path: Path
) -> None:
    """train-student --config FILE writes the byte-identical config.json of the same flags, and the
    run's config.toml replays it (the finished run is recognised and reused)."""
    out = tmp_path / "run"
    flags = [
        *("--cache", str(cache_path), "--student", "mlp:16", "-T", "4", "--alpha", "0.8"),
        *("--memory-budget", "64M", "--class-bias", "1=0.5", "--members", "0"),
        *("--epochs", "1", "--batch-size", "64", "--grad-clip", "0", "--device", "cpu"),
        *("--eval", f"npz:{npz_path}:test", "--out", str(out), "--quiet"),
    ]
    code, log = cli("train-student", *flags)
    assert code == 0, log
    by_flags = (out / "config.json").read_bytes()
    recorded = (out / RUN_FILE).read_text()
    shutil.rmtree(out)

    run_file = tmp_path / "student.toml"
    run_file.write_text(
        f'cache = "{cache_path}"\nstudent = "mlp:16"\ntemperature = 4\nalpha = 0.8\n'
        'memory_budget = "64M"\nclass_bias = { 1 = 0.5 }\nmembers = [0]\ndevice = "cpu"\n'
        f'eval = "npz:{npz_path}:test"\nout = "{out}"\n'
        "[train]\nepochs = 1\nbatch_size = 64\ngrad_clip = 0\n"
    )
    code, log = cli("train-student", "--config", str(run_file), "--quiet")
    assert code == 0, log
    assert (out / "config.json").read_bytes() == by_flags
    assert (out / RUN_FILE).read_text() == recorded
    # config.toml is what --print-config says of the same options, and replays the same run.
    assert printed("train-student", *flags) == recorded
    code, log = cli("train-student", "--config", str(out / RUN_FILE))
    assert code == 0 and f"reusing the finished run in {out}" in log
    assert json.loads(by_flags)["train"]["grad_clip"] is None


# ------------------------------------------------------------------------------ the shipped configs
@pytest.mark.parametrize("name", sorted(shipped()))
def test_every_shipped_config_holds_what_its_run_runs_and_round_trips(
    name: str, tmp_path: Path
) -> None:
    path = CONFIGS / name
    command, _ = shipped()[name]
    # The file is the config its run runs (built by that code), as --print-config writes it.
    assert path.read_text() == text(name), "regenerate: python -m tests.helpers.shipped_configs"
    first = printed(*command, "--config", str(path))
    assert tomllib.loads(first) == tomllib.loads(path.read_text())
    assert replayed(command, first, tmp_path) == first


def test_configs_holds_only_the_checked_files() -> None:
    assert sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.toml")) == sorted(shipped())


# ------------------------------------------------------------------------- a light --help/--version
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_the_group_help_and_version_import_no_torch(flag: str) -> None:
    code = (
        "import sys\nfrom stages.cli import main\n"
        f"try:\n    main([{flag!r}])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('torch' in sys.modules, 'pipeline.training.config' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == "False False", res.stdout + res.stderr


def test_the_group_lists_each_command_with_its_own_short_help() -> None:
    assert set(COMMANDS) == set(main.commands)
    for name, (_, short) in COMMANDS.items():
        assert main.commands[name].get_short_help_str(10_000) == short, name


def test_a_specialists_directory_records_its_run_file(cache_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "spec"
    args = ["--cache", str(cache_path), "--specialists", "2", "--out", str(out), "--device", "cpu"]
    code, log = cli("specialists", "cluster", *args)
    assert code == 0, log
    recorded = (out / RUN_FILE).read_text()
    assert printed("specialists", "cluster", *args) == recorded
    assert printed("specialists", "cluster", "--config", str(out / RUN_FILE)) == recorded
