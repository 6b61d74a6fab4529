"""The documentation's tested commands run as written; the generated CLI reference and module
tree are current.

A fenced ``bash`` block in ``docs/*.md`` is *tested* when the line before it (a blank line between
is allowed) is an HTML comment that MkDocs renders as nothing::

    <!-- tested -->
    <!-- tested: slow s3 exit=2
    expect: complete: 1000 rows x 10 classes
    -->

Words after ``tested:`` are options: ``slow`` (the page's test is marked slow: ``pytest -m slow``
runs it), ``s3`` (the page's commands reach a real S3 API, moto's server, through the standard
``AWS_*`` variables; the page creates its own bucket) and ``exit=N`` (the block is a refusal and
must exit N, default 0). Each ``expect: TEXT`` line names text the block's output must contain.

Every page's tested blocks run in order, each as one ``bash -e -o pipefail`` script, in one fresh
directory per page that holds the shipped data (``data/fashion-mnist``, ``data/kjv``), with this
interpreter's ``python`` and ``kd-pipeline`` first on ``PATH`` and the repository importable: what a
reader who cloned the repository and ran the quick start's install has. Every other ``bash`` block
says why it is not run, in a comment the test reads: ``<!-- untested: a GPU and a cluster -->``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCRIPTS = ROOT / "scripts"

#: A tested block: the comment (its options and expectations) and the bash fence after it.
BLOCK = re.compile(
    r"^<!-- tested(?::(?P<opts>[^\n]*?))?[ \t]*(?P<expect>\n.*?)?-->\n\n?"
    r"```bash\n(?P<code>.*?)^```",
    re.S | re.M,
)
OPTIONS = re.compile(r"slow|s3|exit=\d+")


@dataclass
class Block:
    """One tested block of a page: its commands, options and expected output lines."""

    page: str
    line: int
    code: str
    options: list[str] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return next((int(o[5:]) for o in self.options if o.startswith("exit=")), 0)


def marked_blocks(page: Path) -> list[Block]:
    """The tested blocks of ``page`` in order; a marker that does not parse fails here, so none
    drops out unnoticed."""
    text = page.read_text()
    blocks = []
    for m in BLOCK.finditer(text):
        options = (m["opts"] or "").split()
        bad = [o for o in options if not OPTIONS.fullmatch(o)]
        assert not bad, f"{page.name}: unknown option(s) {bad} in a tested marker"
        expect = []
        for line in (m["expect"] or "").splitlines():
            if line.strip():
                assert line.startswith("expect: "), f"{page.name}: not an expect line: {line!r}"
                expect.append(line[len("expect: ") :])
        line_no = text.count("\n", 0, m.start()) + 1
        blocks.append(Block(page.name, line_no, m["code"], options, expect))
    markers = text.count("<!-- tested")
    assert markers == len(blocks), (
        f"{page.name}: {markers} tested marker(s) but {len(blocks)} followed by a ```bash block"
    )
    return blocks


def pages_with_tests() -> list[object]:
    """One pytest parameter per page with tested blocks, marked slow if any block is."""
    params = []
    for page in sorted(DOCS.glob("*.md")):
        blocks = marked_blocks(page)
        if blocks:
            slow = any("slow" in b.options for b in blocks)
            marks = [pytest.mark.slow] if slow else []
            params.append(pytest.param(page.name, marks=marks, id=page.stem))
    return params


def shell_env() -> dict[str, str]:
    """This interpreter's ``python`` and ``kd-pipeline`` first on PATH, the project importable."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    env.pop("KD_OUTPUT_DIR", None)  # outputs under the page's directory, as the pages say
    return env


def run_block(block: Block, cwd: Path) -> str:
    """Run ``block`` in ``cwd``; its exit status and expected lines must be what it says."""
    res = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.code],
        cwd=cwd,
        env=shell_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = res.stdout + res.stderr
    where = f"docs/{block.page}, the block at line {block.line}"
    assert res.returncode == block.exit_status, (
        f"{where} exited {res.returncode} (expected {block.exit_status}):\n{block.code}\n{out}"
    )
    for text in block.expect:
        assert text in out, f"{where}: expected {text!r} in its output:\n{out}"
    return out


def test_every_bash_block_is_tested_or_says_why_not() -> None:
    for page in sorted(DOCS.glob("*.md")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line != "```bash":
                continue
            before = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
            untested = re.fullmatch(r"<!-- untested: \S.* -->", before)
            assert untested or before == "-->" or re.fullmatch(r"<!-- tested.*-->", before), (
                f"docs/{page.name}:{i + 1}: a bash block neither tested nor saying why not "
                "(<!-- tested --> or <!-- untested: REASON -->)"
            )


def test_markers_parse(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n<!-- tested -->\n```bash\necho one\n```\n\n"
        "<!-- tested: slow s3 exit=2\nexpect: two words\nexpect: three\n-->\n\n"
        "```bash\necho two words three; exit 2\n```\n\n"
        "<!-- untested: a GPU -->\n```bash\nnvidia-smi\n```\n"
    )
    first, second = marked_blocks(page)
    assert (first.code, first.options, first.expect, first.line) == ("echo one\n", [], [], 3)
    assert second.options == ["slow", "s3", "exit=2"] and second.exit_status == 2
    assert second.expect == ["two words", "three"]
    assert run_block(second, tmp_path).strip() == "two words three"
    with pytest.raises(AssertionError, match="expected 'three'"):
        run_block(Block("page.md", 1, "echo two words\n", [], ["three"]), tmp_path)
    page.write_text("<!-- tested: fast -->\n```bash\ntrue\n```\n")
    with pytest.raises(AssertionError, match="unknown option"):
        marked_blocks(page)
    page.write_text("<!-- tested -->\n```python\npass\n```\n")
    with pytest.raises(AssertionError, match="followed by a ```bash block"):
        marked_blocks(page)


def test_every_tested_marker_is_found() -> None:
    # The pages that must keep tested commands: a marker that stopped parsing would drop them.
    pages = {p.values[0] for p in pages_with_tests()}
    assert {"getting-started.md", "sharing.md", "sparse-caches.md"} <= pages
    assert {"image-teacher.md", "your-own-model.md"} <= pages


@pytest.mark.parametrize("page", pages_with_tests())
def test_page_commands_run_as_written(
    page: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    blocks = marked_blocks(DOCS / page)
    if any("s3" in b.options for b in blocks):
        request.getfixturevalue("s3_server")  # sets the AWS_* variables the commands inherit
    (tmp_path / "data").mkdir()
    for shipped in ("fashion-mnist", "kjv"):
        (tmp_path / "data" / shipped).symlink_to(ROOT / "data" / shipped)
    for block in blocks:
        run_block(block, tmp_path)


def test_cli_reference_is_current() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_cli_reference.py"), "--check"],
        env=shell_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr + res.stdout


def test_module_tree_is_current() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_module_tree.py"), "--check"],
        env=shell_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr + res.stdout


def test_module_tree_summaries_and_markers() -> None:
    """The tree's one-line summaries: a first sentence, cut where it is too long; the page around
    the markers kept as written."""
    spec = importlib.util.spec_from_file_location("gen_module_tree", SCRIPTS / "gen_module_tree.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    # A period inside brackets does not end the sentence; markup is shown as plain text.
    doc = "Specialists (Hinton et al. 2015, section 5) on :class:`~a.b.Cache` rows.\n\nMore."
    assert gen.summary(doc) == "Specialists (Hinton et al. 2015, section 5) on Cache rows"
    assert gen.summary("Losses (ensembles: :mod:`pipeline.ensemble`).") == (
        "Losses (ensembles: pipeline.ensemble)"
    )
    long = (
        "Lazy inputs: a split that stays on disk, decoded batch by batch through a torch\n"
        "``DataLoader`` (one per epoch)."
    )
    assert gen.summary(long) == "Lazy inputs: a split that stays on disk"
    assert gen.summary(None) == ""
    page = f"# A\n\nbefore\n\n{gen.BEGIN}\nold tree\n{gen.END}\n\nafter\n"
    new = gen.updated(page, gen.render())
    assert new.startswith("# A\n\nbefore\n\n" + gen.BEGIN) and new.endswith(gen.END + "\n\nafter\n")
    assert "old tree" not in new
    assert "    kinds.py" in new and "stages/" in new
