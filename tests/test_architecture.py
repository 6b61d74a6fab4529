"""The tree's shape: ordered layers (imports go down, never up), no import circle, and one
registration mechanism (:class:`pipeline.registry.Registry`).

The checkers are plain functions over a module graph, tested here on tiny synthetic packages
written to a temporary directory, then run on the real tree.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The layers, lowest first: a module may import from its own layer and the ones before it. A
#: module belongs to the layer of the longest prefix that names it (``pipeline.data.stream`` sits
#: above the rest of ``pipeline.data``: it streams a cache's rows).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "pipeline",  # the package itself: its version only
            "pipeline.errors",
            "pipeline.builtins",
            "pipeline.registry",
            "pipeline.redact",
            "pipeline.files",
            "pipeline.progress",
            "pipeline.checks",
            "pipeline.options",
            "pipeline.step_options",
            "pipeline.devices",
            "pipeline.distributed",
            "pipeline.cluster",
            "pipeline.allocator",
            "pipeline.specs",
            "pipeline.runfile",
            "pipeline.tv",
        ),
    ),
    (
        "data and models",
        (
            "pipeline.data",
            "pipeline.datasets",
            "pipeline.augment",
            "pipeline.models",
            "pipeline.hf_image",
            "pipeline.sequences",
            "pipeline.checkpoints",
            "pipeline.ensemble",
            "pipeline.metrics",
        ),
    ),
    ("cache", ("pipeline.cache", "pipeline.data.stream")),
    # api: the library's face for other training loops (a dataset over a cache, kd_loss).
    ("training", ("pipeline.training", "pipeline.evaluation", "pipeline.api")),
    ("experiments", ("pipeline.experiments",)),
    ("cli", ("stages",)),
]


# ------------------------------------------------------------------------------------ the checkers
def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, at any depth of the file (lazy imports and
    type-checking imports too). An import names a module or a package (its ``__init__``, a node
    of its own: ``from pipeline import sequences`` is an edge into ``pipeline.sequences``);
    ``from P import NAME`` is an edge into ``P.NAME`` when that is a module, else into ``P``."""
    files = [p for pkg in packages for p in (root / pkg).rglob("*.py")]
    names = {module_name(root, p) for p in files}
    graph: dict[str, set[str]] = {}
    for p in files:
        me = module_name(root, p)
        package = me if p.name == "__init__.py" else me.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names
                ]
            deps.update(t for t in targets if t in names and t != me)
        graph[me] = deps
    return graph


def layer_of(module: str, layers: Sequence[tuple[str, Sequence[str]]]) -> int | None:
    """The index of ``module``'s layer: the one holding the longest prefix naming it."""
    best: tuple[int, int] | None = None
    for i, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            named = module == prefix or module.startswith(prefix + ".")
            if named and (best is None or len(prefix) > best[0]):
                best = (len(prefix), i)
    return None if best is None else best[1]


def upward_imports(
    graph: Mapping[str, set[str]], layers: Sequence[tuple[str, Sequence[str]]]
) -> list[str]:
    """``importer (layer) -> imported (higher layer)`` for every import that goes up."""
    found = []
    for m in sorted(graph):
        mine = layer_of(m, layers)
        for d in sorted(graph[m]):
            theirs = layer_of(d, layers)
            if mine is not None and theirs is not None and theirs > mine:
                found.append(f"{m} ({layers[mine][0]}) -> {d} ({layers[theirs][0]})")
    return found


def unlayered(graph: Mapping[str, set[str]], layers: Sequence[tuple[str, Sequence[str]]]) -> list:
    return sorted(m for m in graph if layer_of(m, layers) is None)


def import_circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Every circle a depth-first walk meets, as ``[a, b, ..., a]``."""
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                circles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return circles


def choice_dispatch(path: Path) -> list[str]:
    """Module-level sets of user choices that code dispatches on by name, and home-made
    registries, instead of a :class:`pipeline.registry.Registry`.

    A *choice set* is a module-level tuple, list or set of two or more strings, or a dict with two
    or more string keys, that the module offers as choices: passed as ``choices=``, checked with
    ``one_of(...)``, or named ``*_CHOICES``. It is *dispatched* when an ``if`` / ``elif`` test
    compares a value with ``==`` / ``!=`` against one of its strings. A *home-made registry* is a
    ``register*`` function that fills a module-level collection (``NAME[key] = ...``).
    (Sets of states or record fields that are no user choice, such as a writer's statuses, are
    not choice sets.)
    """
    tree = ast.parse(path.read_text())
    collections: dict[str, set[str]] = {}
    for node in tree.body:
        target, value = None, None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if not isinstance(target, ast.Name) or value is None:
            continue
        items: list[ast.expr | None] = []
        if isinstance(value, ast.Tuple | ast.List | ast.Set):
            items = list(value.elts)
        elif isinstance(value, ast.Dict):
            items = list(value.keys)
        strings = {
            i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)
        }
        if not items or (len(strings) >= 2 and len(strings) == len(items)):
            collections[target.id] = strings
    offered = {name for name in collections if name.endswith("_CHOICES")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            args = [k.value for k in node.keywords if k.arg == "choices"]
            if getattr(node.func, "id", None) == "one_of":
                args += node.args
            offered |= {a.id for a in args if isinstance(a, ast.Name) and a.id in collections}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            for cmp in ast.walk(node.test):
                if not isinstance(cmp, ast.Compare) or not all(
                    isinstance(op, ast.Eq | ast.NotEq) for op in cmp.ops
                ):
                    continue
                for side in [cmp.left, *cmp.comparators]:
                    if not (isinstance(side, ast.Constant) and isinstance(side.value, str)):
                        continue
                    for name in sorted(offered):
                        if side.value in collections[name]:
                            problems.append(
                                f"{path.name}:{node.lineno}: if ... == {side.value!r} "
                                f"dispatches on {name}"
                            )
        if isinstance(node, ast.FunctionDef) and node.name.startswith("register"):
            for sub in ast.walk(node):
                if (
                    isinstance(sub, ast.Assign)
                    and isinstance(sub.targets[0], ast.Subscript)
                    and isinstance(sub.targets[0].value, ast.Name)
                    and sub.targets[0].value.id in collections
                ):
                    problems.append(
                        f"{path.name}:{sub.lineno}: {node.name}() fills {sub.targets[0].value.id}"
                    )
    return problems


# --------------------------------------------------------------------- the checkers, on a toy tree
def _write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


TOY_LAYERS = [("low", ("toy", "toy.base")), ("mid", ("toy.mid",)), ("high", ("toy.top",))]


def test_the_checkers_pass_a_sound_toy_tree(tmp_path: Path) -> None:
    _write_tree(
        tmp_path,
        {
            "toy/__init__.py": "",
            "toy/base.py": "X = 1\n",
            "toy/mid/__init__.py": "from toy.mid import work as work\n",
            "toy/mid/work.py": "from toy import base\n",
            "toy/top.py": "import toy.mid\n\ndef f():\n    from toy.mid.work import base\n",
        },
    )
    graph = import_graph(tmp_path, ["toy"])
    assert graph["toy.mid"] == {"toy.mid.work"}
    assert graph["toy.mid.work"] == {"toy.base"}
    assert graph["toy.top"] == {"toy.mid", "toy.mid.work"}  # a lazy import counts
    assert import_circles(graph) == []
    assert upward_imports(graph, TOY_LAYERS) == []
    assert unlayered(graph, TOY_LAYERS) == []


def test_a_planted_circle_through_a_package_is_found(tmp_path: Path) -> None:
    """The circle the old check missed: a module imports its package, whose ``__init__`` imports
    the module back (as ``pipeline.datasets`` and ``pipeline.sequences`` did)."""
    _write_tree(
        tmp_path,
        {
            "toy/__init__.py": "",
            "toy/base.py": "from toy import mid  # the package\n",
            "toy/mid/__init__.py": "from .work import run\n",
            "toy/mid/work.py": "from toy.base import X\n",
        },
    )
    graph = import_graph(tmp_path, ["toy"])
    assert graph["toy.base"] == {"toy.mid"}
    assert graph["toy.mid"] == {"toy.mid.work"}  # a relative import resolves
    assert import_circles(graph) == [["toy.base", "toy.mid", "toy.mid.work", "toy.base"]]
    assert upward_imports(graph, TOY_LAYERS) == ["toy.base (low) -> toy.mid (mid)"]


def test_a_planted_upward_import_is_found(tmp_path: Path) -> None:
    _write_tree(
        tmp_path,
        {
            "toy/__init__.py": "",
            "toy/base.py": "def f():\n    import toy.top\n",
            "toy/top.py": "",
            "toy/stray.py": "",
        },
    )
    graph = import_graph(tmp_path, ["toy"])
    assert upward_imports(graph, TOY_LAYERS) == ["toy.base (low) -> toy.top (high)"]
    assert import_circles(graph) == []
    assert unlayered(graph, [("high", ("toy.top",))]) == ["toy", "toy.base", "toy.stray"]


def test_dispatch_on_a_choice_set_is_found(tmp_path: Path) -> None:
    _write_tree(
        tmp_path,
        {
            "bad.py": """
                KINDS = ("dense", "topk")
                RULES = {}
                kind: str = option("dense", choices=KINDS)

                def register(name, fn):
                    RULES[name] = fn

                def run(kind):
                    if kind == "dense":
                        return 1
                    elif kind == "topk":
                        return 2
            """,
            "good.py": """
                from registry import KINDS
                STATUS = ("create", "resume")  # states, not user choices
                MEMO = {}

                def run(kind, status):
                    MEMO[kind] = 1  # a cache, not a registry
                    if status == "create":
                        return KINDS.get(kind)
            """,
        },
    )
    assert sorted(choice_dispatch(tmp_path / "bad.py")) == [
        "bad.py:10: if ... == 'dense' dispatches on KINDS",
        "bad.py:12: if ... == 'topk' dispatches on KINDS",
        "bad.py:7: register() fills RULES",
    ]
    assert choice_dispatch(tmp_path / "good.py") == []


# ------------------------------------------------------------------------------- the real tree
def test_every_module_has_a_layer() -> None:
    assert unlayered(import_graph(ROOT, ["pipeline", "stages"]), LAYERS) == []


def test_no_upward_imports() -> None:
    assert upward_imports(import_graph(ROOT, ["pipeline", "stages"]), LAYERS) == []


def test_no_import_circles() -> None:
    assert import_circles(import_graph(ROOT, ["pipeline", "stages"])) == []


def test_pipeline_never_imports_stages() -> None:
    graph = import_graph(ROOT, ["pipeline", "stages"])
    upward = {m: sorted(d for d in deps if d.startswith("stages")) for m, deps in graph.items()}
    assert {m: d for m, d in upward.items() if d and m.startswith("pipeline")} == {}


def test_no_module_bottom_imports() -> None:
    """Built-ins join their registries through pipeline.builtins, never by an import placed at
    the end of a module (``# noqa: E402``), the pattern that hid the datasets/sequences circle."""
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in (ROOT / "pipeline").rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if line.lstrip().startswith(("import ", "from ")) and "E402" in line
    ]
    assert found == []


def _pipeline_modules() -> list:
    import pipeline

    return [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(pipeline.__path__, "pipeline.")
    ]


def test_one_registration_mechanism() -> None:
    """Every registry is a Registry; every option's choices come from one; every registry that
    pipeline.builtins extends exists; and no module keeps a choice set that it dispatches on by
    name or fills from a function."""
    from pipeline.builtins import BUILTINS
    from pipeline.options import META_KEY
    from pipeline.registry import Registry

    modules = _pipeline_modules()
    registries = {
        id(v): v for m in modules for v in vars(m).values() if isinstance(v, Registry)
    }.values()
    names = sorted(r.name for r in registries)
    assert len(names) == len(set(names)), names  # one registry per name (entry point group)
    assert set(BUILTINS) <= set(names)
    for registry in registries:
        assert registry.choices(), registry.name  # built-ins loaded, every entry has a help line
        assert len(registry.help_lines()) == len(registry)

    not_registries = []
    for m in modules:
        for cls in vars(m).values():
            if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
                continue
            for f in dataclasses.fields(cls):
                opt = f.metadata.get(META_KEY)
                choices = None if opt is None else opt.choices
                if choices is not None and not isinstance(choices, Registry):
                    not_registries.append(f"{cls.__name__}.{f.name}")
    assert not_registries == []

    dispatch = [d for p in sorted((ROOT / "pipeline").rglob("*.py")) for d in choice_dispatch(p)]
    assert dispatch == []


@pytest.mark.parametrize(
    ("registry", "name"),
    [
        ("pipeline.datasets:DATASETS", "cifar"),
        ("pipeline.models:MODELS", "vit"),
        ("pipeline.augment:TRANSFORMS", "blur"),
        ("pipeline.cache.kinds:STORAGE_KINDS", "sparse"),
        ("pipeline.training.losses:LOSSES", "l2"),
        ("pipeline.ensemble:ENSEMBLE_METHODS", "median"),
        ("pipeline.training.optim:OPTIMIZERS", "lbfgs"),
        ("pipeline.training.optim:LR_SCHEDULES", "step"),
        ("pipeline.experiments.specialists.clustering:SIMILARITIES", "cosine"),
    ],
)
def test_unknown_names_have_one_wording(registry: str, name: str) -> None:
    module, _, attr = registry.partition(":")
    reg = getattr(importlib.import_module(module), attr)
    with pytest.raises(Exception) as info:
        reg.get(name)
    text = str(info.value)
    assert f"unknown {reg.what} {name!r}; expected one of {', '.join(reg.choices())}" in text


def test_the_module_index_names_every_module() -> None:
    """``pipeline/__init__.py`` indexes every module (a sub-package's own ``__init__`` may index
    its modules instead), so the index cannot fall behind the tree again."""
    missing = []
    for info in pkgutil.walk_packages([str(ROOT / "pipeline")], "pipeline."):
        parts = info.name.split(".")
        indexes = [importlib.import_module(".".join(parts[:i])) for i in range(1, len(parts))]
        # ``stream`` in its package's index, ``data.stream`` or ``data/`` in a higher one
        names = {".".join(parts[k:]) for k in range(1, len(parts))}
        names |= {n + "/" for n in names}
        if not any(f"``{n}``" in (m.__doc__ or "") for m in indexes for n in names):
            missing.append(info.name)
    assert missing == []


def test_the_cli_is_small() -> None:
    """Options are generated from config fields, so the CLI is wiring only (it had 666 lines)."""
    lines = (ROOT / "stages" / "cli.py").read_text().count("\n")
    assert lines < 333
