"""Every ```python block of the README runs as written (on CPU, through the interpreter)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    if "CUDA_VISIBLE_DEVICES" not in env and not os.environ.get("HT_README_GPU"):
        env["CUDA_VISIBLE_DEVICES"] = ""  # the README examples are written for any machine
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{out.stderr}"


def test_readme_has_blocks():
    assert len(BLOCKS) >= 2
