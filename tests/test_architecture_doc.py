"""The plug-in example of ``docs/architecture.md`` works as printed: the page's loss module and
entry point, installed as a real distribution, add a ``--loss`` choice with its help, and the
loss computes the reverse KL it claims."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"


def _install_example(root: Path) -> None:
    """The page's ``kd_extras/losses.py`` and its ``pyproject.toml`` entry point, as an installed
    distribution (a dist-info folder with ``entry_points.txt``, what ``pip install`` writes)."""
    page = PAGE.read_text()
    code = re.search(r"```python\n(# kd_extras/losses\.py\n.*?)```", page, re.S)
    toml = re.search(r'```toml\n\[project\.entry-points\."(.+?)"\]\n(.*?)```', page, re.S)
    assert code is not None and toml is not None
    (root / "kd_extras").mkdir()
    (root / "kd_extras" / "__init__.py").write_text("")
    (root / "kd_extras" / "losses.py").write_text(code.group(1))
    info = root / "kd_extras-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kd-extras\nVersion: 0.1\n")
    lines = [line.replace('"', "") for line in toml.group(2).splitlines() if line.strip()]
    (info / "entry_points.txt").write_text(f"[{toml.group(1)}]\n" + "\n".join(lines) + "\n")


def _run(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{root}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, cwd=root
    )


def test_the_plugin_example_adds_a_loss(tmp_path: Path) -> None:
    _install_example(tmp_path)
    res = _run(tmp_path, "-m", "stages.cli", "train-student", "--help")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "[kd|logit-mse|reverse-kl]" in text
    assert "reverse-kl: reverse KL: alpha T^2 KL(q_T || p_T) + (1 - alpha) CE" in text

    check = """
import torch
from pipeline.training.losses import make_loss
torch.manual_seed(0)
z, v, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
out = make_loss("reverse-kl", 4.0, 0.9)(z, v, y)
q, p = torch.log_softmax(z / 4, -1), torch.log_softmax(v / 4, -1)
want = 16 * (q.exp() * (q - p)).sum(-1).mean()
hard = torch.nn.functional.cross_entropy(z, y)
assert torch.allclose(out["soft"], want, atol=1e-5), (out, want)
assert torch.allclose(out["loss"], 0.9 * want + 0.1 * hard, atol=1e-5)
print("ok", float(out["soft"]))
"""
    res = _run(tmp_path, "-c", check)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok ")
