"""The guides (docs/guides/*.md) say only what runs.

- Every ```python block of a guide runs as written: the blocks of one guide run in order, in
  one fresh interpreter (a shared namespace, like a notebook), in an empty working directory,
  with ``TRITON_INTERPRET=1`` when there is no GPU (so the kernels are the real Triton ones,
  through the interpreter). A failure names the guide and the block's line.
- Every relative link of a guide (reports, examples, other docs) points to a file that exists:
  each figure links to the report it came from.
- A ```text block preceded by ``<!-- output of: hybrid-triton ARGS -->`` is that command's
  real output: the test runs the command and compares.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GUIDES_DIR = ROOT / "docs" / "guides"
EXPECTED = [
    "integration.md",
    "memory.md",
    "mixed-precision.md",
    "planning.md",
    "troubleshooting.md",
]
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
OUTPUT_OF = re.compile(
    r"<!-- output of: (?P<cmd>hybrid-triton [^>]*?) -->\s*\n```text\n(?P<body>.*?)^```", re.M | re.S
)


def guides() -> list[Path]:
    return sorted(GUIDES_DIR.glob("*.md"))


def blocks(text: str, lang: str) -> list[tuple[int, str]]:
    """(line number of the fence, code) of every fenced block in language ``lang``."""
    out = []
    for m in FENCE.finditer(text):
        if m["lang"] == lang:
            out.append((text.count("\n", 0, m.start()) + 1, m["body"]))
    return out


RUNNER = textwrap.dedent(
    """
    import json, sys, traceback
    blocks = json.load(open(sys.argv[1]))
    namespace = {"__name__": "__main__"}
    for line, code in blocks:
        try:
            exec(compile(code, f"{sys.argv[2]}, block at line {line}", "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED: {sys.argv[2]}, python block at line {line}", file=sys.stderr)
            sys.exit(1)
    """
)


def test_the_five_guides_exist():
    assert [p.name for p in guides()] == EXPECTED


@pytest.mark.parametrize("guide", EXPECTED)
def test_python_blocks_run(guide, tmp_path):
    import json

    path = GUIDES_DIR / guide
    code = blocks(path.read_text(), "python")
    if not code:
        pytest.skip(f"{guide} has no python blocks")
    (tmp_path / "blocks.json").write_text(json.dumps(code))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "runner.py", "blocks.json", f"docs/guides/{guide}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.mark.parametrize("guide", EXPECTED)
def test_links_resolve(guide):
    path = GUIDES_DIR / guide
    text = path.read_text()
    broken = []
    for m in LINK.finditer(text):
        target = m["target"].split("#")[0]
        if not target or "://" in target or target.startswith("mailto:"):
            continue
        if not (path.parent / target).resolve().exists():
            broken.append(m["target"])
    assert not broken, f"{guide}: links to missing files: {broken}"


def test_figures_link_reports():
    """A guide that quotes a report links it (reports/<suite>/<run>/...)."""
    for path in guides():
        text = path.read_text()
        for m in re.finditer(r"reports/(\w+)/(\d{4}-\d\d-\d\d[\w-]*)/", text):
            assert (ROOT / "reports" / m[1] / m[2]).is_dir(), f"{path.name}: {m[0]} does not exist"


def recorded_outputs() -> list[tuple[str, str, str]]:
    out = []
    for path in guides():
        for m in OUTPUT_OF.finditer(path.read_text()):
            out.append((path.name, m["cmd"], m["body"]))
    return out


@pytest.mark.parametrize(("guide", "command", "expected"), recorded_outputs())
def test_recorded_cli_output_is_real(guide, command, expected):
    from hybrid_triton.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(shlex.split(command)[1:])
    assert code in (0, 1), f"{command} exited with {code}"
    assert buf.getvalue().rstrip() == expected.rstrip(), (
        f"{guide}: the output of `{command}` changed; paste the new output:\n{buf.getvalue()}"
    )


def test_runner_reports_the_failing_block(tmp_path):
    """The runner shares one namespace between blocks and names the block that fails."""
    import json

    (tmp_path / "blocks.json").write_text(json.dumps([[3, "x = 1\n"], [9, "assert x == 2\n"]]))
    (tmp_path / "runner.py").write_text(RUNNER)
    proc = subprocess.run(
        [sys.executable, "runner.py", "blocks.json", "docs/guides/demo.md"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "FAILED: docs/guides/demo.md, python block at line 9" in proc.stderr


def test_block_extraction_takes_only_python_fences():
    text = (
        "intro\n```python\na = 1\n```\n```text\nnot code\n```\n"
        "```bash\nls\n```\n```python\nb = 2\n```\n"
    )
    assert blocks(text, "python") == [(2, "a = 1\n"), (11, "b = 2\n")]
