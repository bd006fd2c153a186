"""The size-sweep chart (benchmarks/kernels_sizes.py): one panel pair per kernel.

Left: % of the copy rate measured at the same size in the same run, against the number of
elements (log x), for ``hybrid_triton`` and ``torch.compile`` of the same math. Right: median
time over the launch floor (an empty Triton kernel's time in the same run), the figure to
read below about 2^20 elements where every kernel is launch-bound. Sizes that are not a
multiple of 16 are drawn hollow: that is where a masked, unvectorized launch would show.
"""

from __future__ import annotations

import json

import pandas as pd

FLOOR_NAME = "launch floor (empty kernel)"
SERIES = {"hybrid_triton": "tab:blue", "torch_compile": "tab:orange"}


def _sweep_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Value rows of sweep cases, with ``kernel`` and ``numel`` columns from the config."""
    rows = df[df["config"].fillna("").str.contains('"sweep": true') & df["value"].notna()]
    if rows.empty:
        return rows
    configs = rows["config"].map(json.loads)
    return rows.assign(
        kernel=configs.map(lambda c: c.get("kernel", "?")),
        numel=configs.map(lambda c: int(c.get("numel", 0))),
    )


def _floor_ms(df: pd.DataFrame) -> float | None:
    floor = df[
        df["case"].str.contains(FLOOR_NAME, regex=False)
        & (df["metric"] == "time_ms")
        & (df["provider"] == "hybrid_triton")
    ]
    return float(floor["value"].iloc[0]) if not floor.empty else None


def _plot(ax, rows: pd.DataFrame, metric: str, scale: float = 1.0) -> None:
    for provider, color in SERIES.items():
        r = rows[(rows["provider"] == provider) & (rows["metric"] == metric)].sort_values("numel")
        if r.empty:
            continue
        x, y = r["numel"].to_numpy(float), r["value"].to_numpy(float) / scale
        aligned = r["numel"].to_numpy() % 16 == 0
        ax.plot(x, y, color=color, lw=1, alpha=0.6, label=provider)
        ax.scatter(x[aligned], y[aligned], color=color, s=14)
        ax.scatter(x[~aligned], y[~aligned], facecolors="none", edgecolors=color, s=14)
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)


def chart_sizes(df: pd.DataFrame, fig_title: str):
    """The figure, or None when the rows hold no sweep."""
    rows = _sweep_rows(df)
    if rows.empty:
        return None
    from hybrid_triton.bench.report import _figure  # the shared Agg canvas

    kernels = list(dict.fromkeys(rows["kernel"]))
    floor = _floor_ms(df)
    fig = _figure(11.0, 2.6 * len(kernels) + 0.6)
    for i, kernel in enumerate(kernels):
        k_rows = rows[rows["kernel"] == kernel]
        left = fig.add_subplot(len(kernels), 2, 2 * i + 1)
        _plot(left, k_rows, "pct_of_copy")
        left.axhline(90, color="k", lw=0.6, ls="--")
        left.set_ylabel("% of copy", fontsize=8)
        left.set_title(f"{kernel}: % of the copy rate (hollow: n % 16 != 0)", fontsize=8)
        left.legend(fontsize=7, loc="lower right")
        right = fig.add_subplot(len(kernels), 2, 2 * i + 2)
        if floor:
            _plot(right, k_rows, "time_ms", scale=floor)
            right.axhline(2, color="k", lw=0.6, ls="--")
            right.set_yscale("log", base=2)
            right.set_ylabel("time / launch floor", fontsize=8)
            right.set_title(f"{kernel}: time over an empty kernel's ({floor:.3g} ms)", fontsize=8)
        else:
            _plot(right, k_rows, "time_ms")
            right.set_yscale("log")
            right.set_ylabel("median ms", fontsize=8)
            right.set_title(f"{kernel}: median time (no launch floor measured)", fontsize=8)
        if i == len(kernels) - 1:
            left.set_xlabel("elements", fontsize=8)
            right.set_xlabel("elements", fontsize=8)
    fig.suptitle(f"{fig_title}: size sweep", fontsize=9)
    fig.tight_layout()
    return fig
