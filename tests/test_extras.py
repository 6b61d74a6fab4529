"""What only some commands need is an extra (s3, plots, specialists): the base install imports
none of it, and a command that needs a missing one names the extra to install."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.errors import MissingExtraError

EXTRAS = {
    "s3fs": "s3",
    "matplotlib": "plots",
    "sklearn": "specialists",
    "tensorboard": "tensorboard",
}


def test_the_cli_and_the_core_stages_import_no_extra() -> None:
    code = (
        "import sys, stages.cli, pipeline.cache.writer, pipeline.training.distill, "
        "pipeline.experiments.sweep, pipeline.experiments.demo, pipeline.experiments.reproduce, "
        "pipeline.experiments.specialists; "
        f"print(sorted(m for m in {sorted(EXTRAS)!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_missing_matplotlib_skips_the_plot_naming_the_plots_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    from pipeline.experiments.plots import bar_chart, optional_plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    lines: list[str] = []
    got = optional_plot(lambda: bar_chart(tmp_path / "p.png", ["a"], [1.0], "y"), lines.append)
    assert got is None and not (tmp_path / "p.png").exists()
    assert lines == [
        "no plot: drawing a PNG plot needs matplotlib, which is not installed: "
        "pip install 'kd-pipeline[plots]'"
    ]


def test_a_missing_scikit_learn_names_the_specialists_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline.experiments.specialists.clustering import cluster_classes

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    probs = np.random.default_rng(0).dirichlet(np.ones(6), size=40)
    with pytest.raises(MissingExtraError, match=r"pip install 'kd-pipeline\[specialists\]'"):
        cluster_classes(probs, None, k=2)


def test_an_s3_cache_without_s3fs_is_one_error_naming_the_s3_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    from stages.cli import main

    monkeypatch.setitem(sys.modules, "s3fs", None)
    # fsspec keeps the class of a backend an earlier test imported: forget it here.
    # (``fsspec.registry`` the attribute is a mapping view; the module holds the dict.)
    known = importlib.import_module("fsspec.registry")._registry
    for proto in ("s3", "s3a"):
        if proto in known:
            monkeypatch.delitem(known, proto)
    res = CliRunner().invoke(main, ["cache", "info", "s3://team-kd/caches/x.zarr"])
    assert res.exit_code == 2, res.output
    assert "pip install 'kd-pipeline[s3]'" in res.output and "Traceback" not in res.output
