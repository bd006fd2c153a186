"""The bench command's output folder: checked before anything runs; rows kept as measured."""

from __future__ import annotations

import os
import textwrap

import pandas as pd
import pytest

from hybrid_triton.bench.results import machine_info
from hybrid_triton.bench.runner import ReportDirError, check_report_dir, run_suite

SUITE = """
def run(ctx):
    ctx.recorder.add("a", "p", "time_ms", "ms", 1.0)
    ctx.recorder.add("b", "p", "time_ms", "ms", 2.0)
    raise KeyboardInterrupt  # a kill after two measurements
"""


def test_unwritable_out_is_refused_before_anything_runs(tmp_path, capsys):
    from hybrid_triton.bench.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    suites = tmp_path / "suites"
    suites.mkdir()
    ran = tmp_path / "ran"
    (suites / "memory.py").write_text(f"def run(ctx):\n    open({str(ran)!r}, 'w').close()\n")
    rc = main(["memory", "--quick", "--suites-dir", str(suites), "--out", str(blocker / "x")])
    assert rc == 2
    assert "cannot write" in capsys.readouterr().err
    assert not ran.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ReportDirError, match="cannot write"):
            check_report_dir(ro)
    finally:
        ro.chmod(0o700)


def test_rows_are_kept_as_they_are_measured(tmp_path):
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "memory.py").write_text(textwrap.dedent(SUITE))
    out = tmp_path / "reports"
    with pytest.raises(KeyboardInterrupt):
        run_suite("memory", out=out, suites_dir=suites, progress=False, machine=machine_info())
    partial = list((out / "memory").glob("partial_*.csv"))
    assert len(partial) == 1
    df = pd.read_csv(partial[0])
    assert list(df["case"]) == ["a", "b"] and list(df["value"]) == [1.0, 2.0]
