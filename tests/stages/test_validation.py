"""Option validation and internal errors (issue 27): every numeric option of every command is
refused when it is not finite or absurd, before anything is created, with one message (exit 2);
options that contradict the cache and users' code that fails are named, never a traceback.

Through the real CLI (click's runner in process), against the real caches of tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from pipeline.options import INT_LIMIT
from stages.params import FIELD_ATTR
from tests.helpers.cli import cli, commands, field_of, one_error

pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]


def numeric_params() -> list[tuple[str, click.Command, click.Parameter, str]]:
    """(command, its click command, the parameter, "float" or "int") for every numeric option."""
    found = []
    for name, cmd in commands():
        for param in cmd.params:
            qualified = getattr(param, FIELD_ATTR, None)
            if qualified is None or isinstance(param, click.Argument):
                continue
            hint = str(field_of(qualified).type)  # "float | None", "list[float]", "int", ...
            if "float" in hint:
                found.append((name, cmd, param, "float"))
            elif "int" in hint and "bool" not in hint:
                found.append((name, cmd, param, "int"))
    return found


NUMERIC = numeric_params()


def bad_value(param: click.Parameter, kind: str, value: str) -> str:
    """``value`` spelled as the option takes it (``CLASS=DELTA`` pairs, comma lists)."""
    if param.opts[0] == "--class-bias":
        return f"3={value}"
    if param.metavar and "," in param.metavar:
        return f"1,{value}"
    return value


def base_args(cmd: click.Command, tmp_path: Path) -> list[str]:
    """The command's required parameters with placeholder values, and ``--out`` under tmp_path:
    validation comes before any of them is used, so placeholders suffice."""
    existing = tmp_path / "existing"
    existing.mkdir(exist_ok=True)
    args: list[str] = []
    for param in cmd.params:
        if isinstance(param, click.Argument):
            args.append(str(tmp_path / "out") if param.name.endswith("__out") else str(existing))
        elif param.opts[0] == "--out":
            args += ["--out", str(tmp_path / "out")]
        elif param.required:
            args += [param.opts[0], str(existing)]
    return args


def test_the_walk_finds_every_numeric_option() -> None:
    flags = {(name, p.opts[0]) for name, _, p, _ in NUMERIC}
    for expected in [
        ("train-student", "--temperature"),
        ("train-student", "--alpha"),
        ("train-student", "--lr"),
        ("train-student", "--class-bias"),
        ("train-student", "--memory-budget"),
        ("cache-logits", "--sample-temperature"),
        ("cache-logits", "--tail-temperatures"),
        ("cache-logits", "--rows-per-shard"),
        ("sweep", "--temperature"),
        ("specialists run", "--kl-lr"),
        ("demo", "--transfer-fraction"),
        ("cache verify", "--replay"),
    ]:
        assert expected in flags
    assert len(NUMERIC) > 80


@pytest.mark.parametrize(
    "name,cmd,param,kind", NUMERIC, ids=[f"{n} {p.opts[0]}" for n, _, p, _ in NUMERIC]
)
def test_every_numeric_option_refuses_non_finite_and_absurd_values_before_out_exists(
    name: str, cmd: click.Command, param: click.Parameter, kind: str, tmp_path: Path
) -> None:
    field = field_of(getattr(param, FIELD_ATTR))
    values = ["inf", "nan", "-inf"] if kind == "float" else [str(10**18)]
    for value in values:
        args = [*name.split(), *base_args(cmd, tmp_path), param.opts[0]]
        args.append(bad_value(param, kind, value))
        code, out = cli(*args)
        assert code == 2, (args, out)
        assert "Traceback" not in out and "internal error" not in out, out
        if "Invalid value" not in out:  # a size such as --memory-budget inf: click's own message
            expected = "must be a finite number" if kind == "float" else "must be at most"
            line = next(line for line in out.splitlines() if expected in line)
            assert line.strip().startswith(f"- {field.name} "), out
        assert not (tmp_path / "out").exists(), args


@pytest.mark.parametrize(
    "args,fact",
    [
        (["--temperature", "1e300"], "temperature must be in [0.01, 1000], got 1e+300"),
        (["--temperature", "-1"], "temperature must be > 0, got -1.0"),
        (["--temperature", "1e-300"], "temperature must be in [0.01, 1000], got 1e-300"),
        (["--alpha", "1.5"], "alpha must be in [0, 1], got 1.5"),
        (["--alpha", "-0.1"], "alpha must be in [0, 1], got -0.1"),
        (["--lr", "1e300"], "lr must be at most 10, got 1e+300"),
        (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["--batch-size", str(10**12)], f"batch_size must be at most {INT_LIMIT}, got 10000"),
        (["--momentum", "2"], "momentum must be in [0, 1], got 2.0"),
        (["--weight-decay", "-1"], "weight_decay must be >= 0, got -1.0"),
        (["--seed", "-1"], "seed must be >= 0, got -1"),
        (["--memory-budget", "1e30"], "memory_budget must be at most"),
    ],
)
def test_train_student_refuses_absurd_values(
    cache_path: Path, tmp_path: Path, args: list[str], fact: str
) -> None:
    out = tmp_path / "run"
    code, text = cli("train-student", "--cache", str(cache_path), "--out", str(out), *args)
    assert code == 2 and fact in text and "Traceback" not in text, text
    assert not out.exists()


@pytest.mark.parametrize(
    "args,fact",
    [
        (["--batch-size", str(10**12)], "batch_size must be at most"),
        (["--rows-per-shard", "0"], "rows_per_shard must be >= 1, got 0"),
        (["--sample-temperature", "inf"], "sample_temperature must be a finite number, got inf"),
        (["--sample-temperature", "1e-300"], "sample_temperature must be in [0.01, 1000]"),
        (["--tail-temperatures", "1,nan"], "tail_temperatures must be a finite number"),
        (["--tail-temperatures", "1e-300"], "tail_temperatures must be in [0.01, 1000]"),
        (["--views", "100000", "--augment", "shift:2"], "views must be at most 1024"),
        (["--seed", "-3"], "seed must be >= 0, got -3"),
    ],
)
def test_cache_logits_refuses_absurd_values_before_out_exists(
    teacher_dir: Path, npz_path: Path, tmp_path: Path, args: list[str], fact: str
) -> None:
    out = tmp_path / "c.zarr"
    code, text = cli(
        *("cache-logits", "--teacher", str(teacher_dir), "--dataset", f"npz:{npz_path}:train"),
        *("--out", str(out), "--device", "cpu", "--quiet", *args),
    )
    assert code == 2 and fact in text and "Traceback" not in text, text
    assert not out.exists()


def test_every_problem_of_every_config_is_reported_at_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, text = cli(
        *("train-student", "--cache", "x.zarr", "--out", str(out), "--temperature", "nan"),
        *("--alpha", "2", "--lr", "inf", "--epochs", "0", "--quiet"),
    )
    assert code == 2, text
    problems = [line.strip() for line in text.splitlines() if line.strip().startswith("- ")]
    # One line per field (nan is not also reported as "not > 0"), all of them in one message.
    assert problems == [
        "- temperature must be a finite number, got nan",
        "- alpha must be in [0, 1], got 2.0",
        "- lr must be a finite number, got inf",
        "- epochs must be >= 1, got 0",
    ], text


def test_field_problems_walks_lists_and_mappings() -> None:
    from pipeline.options import field_problems
    from pipeline.training.config import StudentConfig

    cfg = StudentConfig(cache="c", out="o", class_bias={3: float("nan")}, memory_budget=1 << 60)
    assert field_problems(cfg) == [
        "class_bias must be a finite number, got {3: nan}",
        f"memory_budget must be at most {1 << 50}, got {1 << 60}",
    ]


# ----------------------------------------------------------------------- options against the cache
def test_views_per_epoch_above_the_caches_views_is_refused(
    teacher_dir: Path, npz_path: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "v.zarr"
    code, text = cli(
        *("cache-logits", "--teacher", str(teacher_dir), "--dataset", f"npz:{npz_path}:train"),
        *("--out", str(cache), "--device", "cpu", "--quiet", "--views", "2"),
        *("--augment", "shift:1", "--rows-per-shard", "300"),
    )
    assert code == 0, text
    run = tmp_path / "run"
    code, text = cli(
        *("train-student", "--cache", str(cache), "--student", "mlp:8", "--epochs", "1"),
        *("--device", "cpu", "--quiet", "--out", str(run), "--views-per-epoch", "3"),
    )
    assert code == 2 and "Traceback" not in text, text
    for fact in ("--views-per-epoch 3 is more than the 2 view(s) per sample", "--views 3"):
        assert fact in text, text
    assert not run.exists()


def test_resuming_with_another_seed_is_refused_and_the_cache_kept(
    partial_cache_path: Path, teacher_dir: Path, npz_path: Path, tmp_path: Path
) -> None:
    import shutil

    import zarr

    cache = tmp_path / "p.zarr"
    shutil.copytree(partial_cache_path, cache)
    args = [
        *("cache-logits", "--teacher", str(teacher_dir), "--dataset", f"npz:{npz_path}:train"),
        *("--out", str(cache), "--device", "cpu", "--quiet", "--rows-per-shard", "64"),
    ]
    code, text = cli(*args, "--seed", "7")
    assert code == 2 and "Traceback" not in text, text
    assert "seed: the cache was made with --seed 0, you gave --seed 7" in text
    assert "re-run with --seed 0" in text
    done = zarr.open_group(str(cache), mode="r", use_consolidated=False)["members/0/done"][:]
    assert done[3] == 0 and done.sum() == len(done) - 1  # nothing written by the refused run
    code, text = cli(*args, "--seed", "0")  # the same command as the cache's resumes it
    assert code == 0 and "complete" in text, text


# ----------------------------------------------------------------------- users' code that fails
USER_CODE = """
import numpy as np


def boom():
    raise RuntimeError("disk on fire")


class Words:
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return "not an image", 0


class Raising:
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise KeyError(f"row {i} is missing")


def words():
    return Words()


def raising():
    return Raising()


def model(in_shape, num_classes):
    raise ValueError("no such layer")
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request) -> str:  # noqa: ANN001
    """A module of failing user code on sys.path, named after the test (imports are cached)."""
    name = "kd_user_" + request.node.name.split("[")[0][-30:].replace("-", "_")
    (tmp_path / f"{name}.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.parametrize(
    "factory,facts",
    [
        ("boom", ["the factory", ".boom()", "raised RuntimeError: disk on fire"]),
        ("words", ["item 0 holds str 'not an image'", "not an array or tensor of numbers"]),
        ("raising", ["item 0 (its __getitem__)", "raised KeyError", "row 0 is missing"]),
    ],
)
def test_a_failing_py_dataset_is_named_as_the_failing_code(
    teacher_dir: Path, tmp_path: Path, user_module: str, factory: str, facts: list[str]
) -> None:
    out = tmp_path / "c.zarr"
    code, text = cli(
        *("cache-logits", "--teacher", str(teacher_dir), "--out", str(out)),
        *("--dataset", f"py:{user_module}:{factory}", "--device", "cpu", "--quiet"),
    )
    line = one_error(code, text, f"py:{user_module}:{factory}", *facts)
    assert "internal error" not in line
    assert not out.exists()


def test_a_failing_py_model_factory_is_named_as_the_failing_code(
    npz_path: Path, tmp_path: Path, user_module: str
) -> None:
    out = tmp_path / "teacher"
    code, text = cli(
        *("train-teacher", "--dataset", f"npz:{npz_path}:train", "--model"),
        *(f"py:{user_module}:model", "--out", str(out), "--epochs", "1", "--device", "cpu"),
    )
    one_error(
        code,
        text,
        f"the factory {user_module}.model(in_shape=(1, 8, 8), num_classes=5)",
        "raised ValueError: no such layer",
    )


# ------------------------------------------------------------------ conflicting storage options
@pytest.mark.parametrize(
    "options,facts",
    [
        (
            ["region_name=eu-west-1", "region_name=us-east-1"],
            ["region_name is given twice, as 'eu-west-1' and 'us-east-1'", "give it once"],
        ),
        (["secret=abc123", "secret=def456"], ["secret is given twice, as *** and ***"]),
        (
            ["client_kwargs=1", "client_kwargs.region_name=x"],
            ["client_kwargs.region_name sets an option inside client_kwargs", "either a value"],
        ),
        (
            ["client_kwargs.region_name=x", "client_kwargs=1"],
            ["client_kwargs=1 replaces the dotted options client_kwargs.*"],
        ),
        (["anon=true", "profile=team"], ["anon=true (no credentials) contradicts profile"]),
        (
            ["endpoint_url=http://a:9000", "client_kwargs.endpoint_url=http://b:9000"],
            ["endpoint_url=http://a:9000 contradicts client_kwargs.endpoint_url=http://b:9000"],
        ),
    ],
)
def test_conflicting_storage_options_are_refused(
    cache_path: Path, tmp_path: Path, options: list[str], facts: list[str]
) -> None:
    out = tmp_path / "run"
    args = [a for o in options for a in ("--storage-option", o)]
    code, text = cli("train-student", "--cache", str(cache_path), "--out", str(out), *args)
    assert code == 2 and "Traceback" not in text, text
    for fact in facts:
        assert fact in text, text
    assert "abc123" not in text and "def456" not in text  # a credential is never echoed
    assert not out.exists()


def test_the_same_storage_option_twice_with_one_value_is_fine() -> None:
    from pipeline.cache.location import parse_storage_options

    assert parse_storage_options(["anon=true", "anon=true", "client_kwargs.region_name=x"]) == {
        "anon": True,
        "client_kwargs": {"region_name": "x"},
    }


# ------------------------------------------------------------------ a folder dataset that changed
def test_verify_dataset_after_a_file_was_added_to_the_folder_reports_the_fingerprint(
    tmp_path: Path,
) -> None:
    import numpy as np
    from PIL import Image

    from tests.helpers.images import make_image_folder

    imgs = make_image_folder(tmp_path / "imgs", {"train": 6, "test": 2})
    spec = f"folder:{imgs}:train"
    teacher, cache = tmp_path / "t", tmp_path / "c.zarr"
    code, text = cli(
        *("train-teacher", "--dataset", spec, "--model", "mlp:8", "--members", "1"),
        *("--epochs", "1", "--jitter", "0", "--eval", "", "--out", str(teacher), "--device", "cpu"),
    )
    assert code == 0, text
    code, text = cli(
        *("cache-logits", "--teacher", str(teacher), "--dataset", spec, "--out", str(cache)),
        *("--quiet", "--device", "cpu", "--loader-workers", "0"),
    )
    assert code == 0, text
    first_class = sorted((imgs / "train").iterdir())[0]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(first_class / "zz-added.png")
    code, text = cli("cache", "verify", str(cache), "--dataset", spec, "--quiet")
    assert code == 1 and "Traceback" not in text and "internal error" not in text, text
    assert f"dataset {spec} has fingerprint" in text and "the cache was made on" in text
    assert "result     1 PROBLEM(S)" in text
