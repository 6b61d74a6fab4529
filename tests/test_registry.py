"""The one registration mechanism (pipeline.registry): registering, lookups, plug-ins."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, KDError, ModelSpecError
from pipeline.registry import Registry, unknown_name

ROOT = Path(__file__).resolve().parents[1]


def test_decorator_and_call_forms_register_with_help() -> None:
    reg: Registry[object] = Registry("test-shapes", "shape")

    @reg.register("square", "four equal sides")
    def square() -> int:
        return 4

    assert reg.register("triangle", "three sides", 3) == 3
    assert square() == 4  # the decorator returns what it decorates
    assert reg.get("square") is square and reg["triangle"] == 3
    assert reg.choices() == ["square", "triangle"]  # registration order
    assert reg.help("triangle") == "three sides"
    assert reg.help_lines() == ["square    four equal sides", "triangle  three sides"]
    assert "square" in reg and "circle" not in reg and 3 not in reg
    assert list(reg) == ["square", "triangle"] and len(reg) == 2
    assert dict(reg.items()) == {"square": square, "triangle": 3}
    assert reg.get("circle", None) is None


def test_sorted_registries_list_names_sorted() -> None:
    reg: Registry[int] = Registry("test-sorted", "thing", sort=True)
    reg.register("b", "bee", 2)
    reg.register("a", "ay", 1)
    assert reg.choices() == ["a", "b"]


def test_unknown_names_have_one_wording() -> None:
    reg: Registry[int] = Registry("test-words", "model", ModelSpecError)
    reg.register("mlp", "an MLP", 1)
    reg.register("cnn", "a CNN", 2)
    with pytest.raises(ModelSpecError) as info:
        reg.get("vit", where=" in spec 'vit:1'")
    assert str(info.value) == "unknown model 'vit' in spec 'vit:1'; expected one of mlp, cnn"
    with pytest.raises(KeyError, match="unknown model 'vit'; expected one of mlp, cnn"):
        reg["vit"]
    assert reg.problem("student", "vit") == (
        "unknown model 'vit' (student); expected one of mlp, cnn"
    )
    assert reg.problem("model", "mlp") is None
    assert unknown_name("loss", "x", ["a", "b"]) == "unknown loss 'x'; expected one of a, b"
    cfg: Registry[int] = Registry("test-cfg", "loss", lambda m: ConfigError([m]))
    with pytest.raises(ConfigError, match="unknown loss 'x'; expected one of "):
        cfg.get("x")


def test_a_taken_name_or_a_long_help_is_refused() -> None:
    reg: Registry[int] = Registry("test-taken", "thing")
    reg.register("a", "one", 1)
    with pytest.raises(ValueError, match="'a' is already registered in test-taken"):
        reg.register("a", "again", 2)
    with pytest.raises(ValueError, match="one non-empty line"):
        reg.register("b", "two\nlines", 2)
    assert reg["a"] == 1


def _install_plugin(root: Path, group: str, lines: list[str], module: str, source: str) -> None:
    """A real installed distribution: a dist-info folder with entry points, and its module."""
    info = root / "kdplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "\n".join(lines) + "\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


def test_plugins_load_from_entry_points_on_first_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_plugin(
        tmp_path,
        "kd_pipeline.test-plugins",
        ["triple = kdplug_mod:triple", "self = kdplug_mod:REGISTERED"],
        "kdplug_mod",
        '''
        def triple(x):
            """Three times x."""
            return 3 * x

        REGISTERED = True
        ''',
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    reg: Registry[object] = Registry("test-plugins", "plug")
    reg.register("self", "a built-in keeps its name", 1)
    reg.register("double", "two times x", lambda x: 2 * x)
    assert not reg._loaded  # nothing looked up yet: no entry point scanned
    assert reg.choices() == ["self", "double", "triple"]
    assert reg.get("triple")(5) == 15
    assert reg.help("triple") == "Three times x."
    assert reg["self"] == 1


def test_a_broken_plugin_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_plugin(
        tmp_path,
        "kd_pipeline.test-broken",
        ["bad = kdplug_broken:thing"],
        "kdplug_broken",
        "1 / 0\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    # ValueError as the registry's own error kind (as storage kinds have): a broken plug-in is
    # still a KDError, which the CLI prints as the user's problem (exit 2), not as a bug.
    reg: Registry[int] = Registry("test-broken", "loss", ValueError)
    with pytest.raises(KDError) as info:
        reg.get("bad")
    assert (
        "the loss plug-in 'bad' (kdplug_broken:thing, entry point group kd_pipeline.test-broken) "
        "failed to load: ZeroDivisionError: division by zero" in str(info.value)
    )


def test_built_ins_above_a_registry_join_on_the_first_lookup() -> None:
    """The token-sequence sources and models live above datasets.py and models.py; the registries
    import them (pipeline.builtins) on their first lookup, not when they are imported."""
    code = textwrap.dedent(
        """
        import sys
        from pipeline.datasets import DATASETS
        from pipeline.models import MODELS
        before = "pipeline.sequences.data" in sys.modules
        print(before, "text" in DATASETS, "gpt" in MODELS, "pipeline.sequences.data" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.split() == ["False", "True", "True", "True"]
