"""benchmarks/streaming.py --quick on CPU: it runs the streaming providers on a tiny Llama and
writes a report with a measured row per provider (the GPU proof itself is for a GPU session).
The torch reference path is forced (HYBRID_TRITON_IMPL=torch) to keep it short."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from hybrid_triton.bench.results import read_csv

ROOT = Path(__file__).resolve().parents[1]


def test_quick_report(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HYBRID_TRITON_IMPL", "torch")
    path = ROOT / "benchmarks" / "streaming.py"
    spec = importlib.util.spec_from_file_location("bench_streaming", path)
    suite = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, suite)  # dataclasses look their module up
    spec.loader.exec_module(suite)
    providers = ["stream_device", "stream_host"]
    target = suite.run(tmp_path, quick=True, caps=[16.0], providers=providers)
    df = read_csv(target / "results.csv")
    for provider in ("stream_device", "stream_host"):
        rows = df[(df.provider == provider) & (df.metric == "tokens_per_s")]
        assert len(rows) == 1 and rows.value.iloc[0] > 0 and math.isfinite(rows.value.iloc[0])
    assert (target / "table.md").read_text().startswith("# Streamed optimizer state")
