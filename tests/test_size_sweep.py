"""The size sweep's sizes and its chart (benchmarks/kernels_sizes.py, bench/size_chart.py)."""

from __future__ import annotations

import json

import pandas as pd

from benchmarks.kernels_sizes import PRIMES, cases, sweep_sizes
from hybrid_triton.bench.size_chart import chart_sizes


def test_full_sweep_sizes():
    sizes = dict(sweep_sizes(quick=False))
    for k in range(10, 29, 2):
        for d in (-17, -1, 0, 1, 17):
            assert (1 << k) + d in sizes
    assert set(PRIMES) <= set(sizes) and 2 * 10**8 + 7 in sizes
    for p in PRIMES:  # really primes: no divisor up to the square root
        assert all(p % q for q in range(2, int(p**0.5) + 1)), p
    assert sorted(sizes) == list(sizes)


def test_quick_cases_are_few_and_named():
    quick = cases(quick=True)
    assert 0 < len(quick) <= 8
    assert all(c.family == "sizes" for c in quick)
    assert any(c.numel % 16 for c in quick) and any(c.numel % 16 == 0 for c in quick)


def _row(case, provider, metric, value, config):
    return {"case": case, "provider": provider, "metric": metric, "value": value,
            "config": json.dumps(config, sort_keys=True)}  # fmt: skip


def test_chart_draws_only_for_a_sweep():
    rows = [_row("sizes/launch floor (empty kernel) [1]", "hybrid_triton", "time_ms", 0.005, {})]
    for n in (1023, 1024, 4097):
        cfg = {"sweep": True, "kernel": "cast_scale", "numel": n}
        for provider, pct in (("hybrid_triton", 95.0), ("torch_compile", 92.0)):
            rows.append(_row(f"sizes/cast_scale [{n}]", provider, "pct_of_copy", pct, cfg))
            rows.append(_row(f"sizes/cast_scale [{n}]", provider, "time_ms", 0.006, cfg))
    df = pd.DataFrame(rows)
    fig = chart_sizes(df, "t")
    assert fig is not None and len(fig.axes) == 2
    assert "0.005" in fig.axes[1].get_title()
    assert chart_sizes(df[~df["config"].str.contains("sweep")], "t") is None
