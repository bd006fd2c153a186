"""Reports: ``results.csv``, ``table.md`` and PNG charts, written atomically; ``compare``.

A report lives in ``<out>/<suite>/<date>_<device>/``. It is built in a temporary sibling
directory (``_tmp...``, git-ignored) and renamed into place at the end, so an interrupted run
leaves no half-written report. ``<out>/README.md`` links the latest run of each suite.

Charts are drawn from the metrics present, whatever the suite:

- ``gbps.png``          kernel GB/s per provider, with the copy ceiling measured in the run;
- ``speedup.png``       hybrid_triton's speedup over each PyTorch path;
- ``latency.png``       latency-bound kernel cases (median ms per provider);
- ``memory.png``        measured peak per configuration and phase beside the planner's
                        estimate, the estimate stacked by component;
- ``savings.png``       memory saved against the fp32 / bf16-autocast baselines, measured
                        and estimated side by side;
- ``training.png``      tokens/s and peak memory of the training runs.

Command line (``hybrid-triton report``; exit status 0, or 2 with a one-line error for a file
that is not a results table or a path that cannot be read or written)::

    hybrid-triton report reports/kernels/2026-11-24_191438_cpu/results.csv   # regenerate
    hybrid-triton report --compare BEFORE.csv AFTER.csv [--out compare.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from hybrid_triton.bench.results import COLUMNS, read_csv, validate, write_csv

REPORT_FILES = ("results.csv", "table.md")
_KEY = ["suite", "case", "provider", "metric", "unit"]


# --------------------------------------------------------------------------- tables


def machine_line(df: pd.DataFrame) -> str:
    """The machine line, rebuilt from the rows (so a regenerated report has it too)."""
    if df.empty:
        return "Machine: (no rows)"
    first = df.iloc[0]
    versions = dict(part.split("=", 1) for part in str(first["versions"]).split(";") if "=" in part)
    return (
        f"Machine: {first['device']} | driver {versions.get('driver', '?')} | "
        f"torch {versions.get('torch', '?')} | triton {versions.get('triton', '?')} | "
        f"CUDA {versions.get('cuda', '?')} | git {first['git_sha']} | {first['date']}"
    )


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.3g}"


def _md_table(frame: pd.DataFrame) -> str:
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for row in frame.itertuples(index=False):
        cells = [_fmt(v) if isinstance(v, float) else str(v).replace("|", "/") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _value_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["metric"] != "status"]


def problems(df: pd.DataFrame) -> pd.DataFrame:
    """Status rows that are not ``ok``: errors, out-of-memory, skipped."""
    status = df[df["metric"] == "status"]
    return status[~status["note"].str.startswith("ok")]


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (case, provider), one column per "metric (unit)": wide, for reading."""
    values = _value_rows(df)
    if values.empty:
        return pd.DataFrame(columns=["case", "provider"])
    columns = list(dict.fromkeys(f"{m} ({u})" if u else m for m, u in
                                 zip(values["metric"], values["unit"])))  # fmt: skip
    table: dict[tuple[str, str], dict[str, float]] = {}
    for row in values.itertuples(index=False):
        col = f"{row.metric} ({row.unit})" if row.unit else row.metric
        table.setdefault((row.case, row.provider), {})[col] = row.value
    records = [
        {"case": case, "provider": provider, **{c: cells.get(c, math.nan) for c in columns}}
        for (case, provider), cells in table.items()
    ]
    return pd.DataFrame(records, columns=["case", "provider", *columns])


def table_markdown(df: pd.DataFrame, title: str) -> str:
    df = validate(df)
    parts = [f"# {title}", "", machine_line(df), ""]
    suites = list(dict.fromkeys(df["suite"]))
    for suite in suites:
        sub = df[df["suite"] == suite]
        parts += [f"## {suite}", "", _md_table(summary_table(sub)), ""]
    bad = problems(df)
    if not bad.empty:
        parts += [
            "## Errors, out-of-memory and skipped",
            "",
            _md_table(bad[["suite", "case", "provider", "note"]]),
            "",
        ]
    notes = _value_rows(df)
    methods = sorted({n for n in notes["note"] if n})
    if methods:
        parts += ["## How values were measured", ""] + [f"- {m}" for m in methods] + [""]
    parts.append("Generated by `hybrid-triton bench` / `hybrid-triton report`; do not edit.")
    return "\n".join(parts) + "\n"


def compare(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Join two runs on (suite, case, provider, metric, unit): before, after, change %."""
    a = _value_rows(validate(before))[[*_KEY, "value"]].drop_duplicates(_KEY, keep="last")
    b = _value_rows(validate(after))[[*_KEY, "value"]].drop_duplicates(_KEY, keep="last")
    joined = a.merge(b, on=_KEY, how="outer", suffixes=("_before", "_after"), sort=False)
    base = joined["value_before"]
    joined["change_pct"] = (joined["value_after"] - base) / base.abs() * 100.0
    joined.loc[base == 0, "change_pct"] = math.nan
    return joined.rename(columns={"value_before": "before", "value_after": "after"})


def compare_markdown(before: pd.DataFrame, after: pd.DataFrame) -> str:
    table = compare(before, after)
    return "\n".join(
        [
            "# Comparison of two runs",
            "",
            f"- before: {machine_line(validate(before))}",
            f"- after: {machine_line(validate(after))}",
            "",
            _md_table(table),
            "",
        ]
    )


# --------------------------------------------------------------------------- charts


def _figure(width: float, height: float):
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _title(ax, text: str) -> None:
    ax.set_title(text, fontsize=9)


def _grouped_bars(ax, wide: pd.DataFrame, label: str) -> None:
    """Horizontal grouped bars: one group per row of ``wide`` (case labels stay readable
    however long they are), one bar per column."""
    import numpy as np

    n_groups, n_series = wide.shape
    y = np.arange(n_groups)
    height = 0.8 / max(n_series, 1)
    for i, col in enumerate(wide.columns):
        offset = (i - (n_series - 1) / 2) * height
        ax.barh(y + offset, wide[col].to_numpy(float), height, label=col)
    ax.set_yticks(y)
    ax.set_yticklabels([str(i) for i in wide.index], fontsize=7)
    ax.invert_yaxis()  # first case on top, as in the table
    ax.set_xlabel(label)
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="x", alpha=0.3)


def _size_for(n_groups: int, n_series: int = 1) -> tuple[float, float]:
    return (11.0, max(3.0, min(60.0, 1.2 + 0.18 * n_groups * max(1.5, min(n_series, 3)))))


def _chart_gbps(df: pd.DataFrame, fig_title: str):
    rows = df[(df["metric"] == "gbps")]
    if rows.empty:
        return None
    ceiling = df[df["metric"] == "copy_gbps"]
    wide = rows.pivot_table(index="case", columns="provider", values="value", sort=False)
    fig = _figure(*_size_for(len(wide), wide.shape[1]))
    ax = fig.add_subplot(1, 1, 1)
    _grouped_bars(ax, wide, "GB/s (read + write)")
    if not ceiling.empty:
        per_case = ceiling.groupby("case", sort=False)["value"].first().reindex(wide.index)
        ax.scatter(
            per_case.to_numpy(float), range(len(wide)), marker="|", s=300, c="k",
            label="copy ceiling (same run)", zorder=3,
        )  # fmt: skip
        ax.legend(fontsize=7)
    _title(ax, f"{fig_title}: kernel bandwidth against the measured copy ceiling")
    fig.tight_layout()
    return fig


def _chart_speedup(df: pd.DataFrame, fig_title: str):
    rows = df[df["metric"].str.startswith("speedup_vs_")]
    if rows.empty:
        return None
    rows = rows.assign(baseline=rows["metric"].str.removeprefix("speedup_vs_"))
    wide = rows.pivot_table(index="case", columns="baseline", values="value", sort=False)
    fig = _figure(*_size_for(len(wide), wide.shape[1]))
    ax = fig.add_subplot(1, 1, 1)
    _grouped_bars(ax, wide, "speedup of hybrid_triton (x, log scale)")
    ax.axvline(1.0, color="k", lw=0.8)
    if (wide.to_numpy(float) > 0).any():
        ax.set_xscale("log")  # ratios: 0.5x and 2x are the same distance from 1x
    _title(ax, f"{fig_title}: speedup over PyTorch's paths (>1: hybrid_triton faster)")
    fig.tight_layout()
    return fig


def _chart_latency(df: pd.DataFrame, fig_title: str):
    cases = df[(df["metric"] == "status") & df["config"].str.contains('"kind": "latency"')]
    rows = df[(df["metric"] == "time_ms") & df["case"].isin(set(cases["case"]))]
    if rows.empty:
        return None
    wide = rows.pivot_table(index="case", columns="provider", values="value", sort=False)
    fig = _figure(*_size_for(len(wide), wide.shape[1]))
    ax = fig.add_subplot(1, 1, 1)
    _grouped_bars(ax, wide, "median time (ms)")
    _title(ax, f"{fig_title}: latency-bound cases")
    fig.tight_layout()
    return fig


def _chart_memory(df: pd.DataFrame, fig_title: str):
    measured = df[(df["provider"] == "measured") & (df["metric"] == "peak_allocated")]
    estimate = df[(df["provider"] == "planner") & df["metric"].str.startswith("component:")]
    total = df[(df["provider"] == "planner") & (df["metric"] == "total")]
    if measured.empty and total.empty:
        return None
    import matplotlib
    import numpy as np

    cases = list(dict.fromkeys([*measured["case"], *total["case"]]))
    x = np.arange(len(cases))
    fig = _figure(max(8.0, min(40.0, 2.0 + 0.8 * len(cases))), 6.0)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.4
    m = measured.groupby("case", sort=False)["value"].first().reindex(cases).to_numpy(float)
    ax.bar(x - w / 2, m, w, label="measured peak allocated", color="tab:blue")
    on_cpu = str(df["device"].iloc[0]).startswith("cpu")
    if on_cpu:
        # The planner models CUDA; its cuBLAS workspace does not exist on CPU.
        estimate = estimate[estimate["metric"] != "component:workspace"]
    if not estimate.empty:
        comp = estimate.assign(component=estimate["metric"].str.removeprefix("component:"))
        wide = comp.pivot_table(index="case", columns="component", values="value", sort=False)
        wide = wide.reindex(cases).fillna(0.0)
        bottom = np.zeros(len(cases))
        palette = matplotlib.colormaps["tab20"]
        for i, col in enumerate(wide.columns):
            vals = wide[col].to_numpy(float)
            ax.bar(x + w / 2, vals, w, bottom=bottom, label=f"estimate: {col}",
                   color=palette((i + 2) % 20))  # fmt: skip
            bottom += vals
    else:
        t = total.groupby("case", sort=False)["value"].first().reindex(cases).to_numpy(float)
        ax.bar(x + w / 2, t, w, label="planner estimate", color="tab:orange")
    traced = df[(df["provider"] == "traced") & (df["metric"] == "total")]
    if not traced.empty:
        tv = traced.groupby("case", sort=False)["value"].first().reindex(cases).to_numpy(float)
        ax.scatter(x + w / 2, tv, marker="D", color="k", s=18, zorder=3,
                   label="traced (fake tensors)")  # fmt: skip
    oom = problems(df)
    oom_cases = set(oom[oom["note"].str.startswith("oom")]["case"])
    for i, c in enumerate(cases):
        if c in oom_cases:
            ax.annotate("OOM", (x[i] - w / 2, 0), ha="center", va="bottom", color="red", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("GiB")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    cpu_note = " (CPU: no CUDA workspace)" if on_cpu else ""
    _title(ax, f"{fig_title}: measured peak per phase vs the planner, by component{cpu_note}")
    fig.tight_layout()
    return fig


def _chart_savings(df: pd.DataFrame, fig_title: str):
    rows = df[df["metric"].str.startswith("saving_vs_")]
    if rows.empty:
        return None
    rows = rows.assign(
        series=rows["provider"] + " vs " + rows["metric"].str.removeprefix("saving_vs_")
    )
    wide = rows.pivot_table(index="case", columns="series", values="value", sort=False)
    fig = _figure(*_size_for(len(wide), wide.shape[1]))
    ax = fig.add_subplot(1, 1, 1)
    _grouped_bars(ax, wide, "memory saved (%)")
    ax.axvline(0.0, color="k", lw=0.8)
    _title(ax, f"{fig_title}: savings against the baselines, measured and estimated")
    fig.tight_layout()
    return fig


def _chart_training(df: pd.DataFrame, fig_title: str):
    tps = df[df["metric"] == "tokens_per_s"]
    if tps.empty:
        return None
    peak = df[(df["metric"] == "peak_allocated") & (df["provider"] == "measured")]
    fig = _figure(12.0, 4.8)
    ax1 = fig.add_subplot(1, 2, 1)
    s = tps.groupby("case", sort=False)["value"].first()
    ax1.bar(range(len(s)), s.to_numpy(float), color="tab:green")
    ax1.set_xticks(range(len(s)))
    ax1.set_xticklabels(s.index, rotation=30, ha="right", fontsize=7)
    ax1.set_ylabel("tokens/s")
    _title(ax1, "throughput")
    ax2 = fig.add_subplot(1, 2, 2)
    if not peak.empty:
        p = peak.groupby("case", sort=False)["value"].first()
        ax2.bar(range(len(p)), p.to_numpy(float), color="tab:blue")
        ax2.set_xticks(range(len(p)))
        ax2.set_xticklabels(p.index, rotation=30, ha="right", fontsize=7)
    ax2.set_ylabel("peak allocated (GiB)")
    _title(ax2, "peak memory per run and phase")
    fig.suptitle(f"{fig_title}: training runs")
    fig.tight_layout()
    return fig


def _chart_memory_by_model(df: pd.DataFrame, fig_title: str):
    """One panel per model (the first word of the case): measured and planned allocated and
    reserved peaks per setup and batch shape, in GiB. Drawn for suites that record the
    planner's reserved figure beside the measured one (memory_hf)."""
    planned_reserved = df[(df["provider"] == "planner") & (df["metric"] == "reserved")]
    if planned_reserved.empty:
        return None
    series = {
        "measured allocated": ("measured", "peak_allocated"),
        "planner allocated": ("planner", "total"),
        "measured reserved": ("measured", "peak_reserved"),
        "planner reserved": ("planner", "reserved"),
    }
    rows = df[df["case"].str.endswith("[full]")]
    models = list(dict.fromkeys(rows["case"].str.split().str[0]))
    cols = 2 if len(models) > 1 else 1
    grid_rows = -(-len(models) // cols)
    fig = _figure(7.0 * cols, 3.6 * grid_rows)
    for i, model in enumerate(models):
        ax = fig.add_subplot(grid_rows, cols, i + 1)
        mine = rows[rows["case"].str.split().str[0] == model]
        wide = pd.DataFrame(
            {
                name: mine[(mine["provider"] == prov) & (mine["metric"] == metric)]
                .groupby("case", sort=False)["value"]
                .first()
                for name, (prov, metric) in series.items()
            }
        )
        wide.index = [c.removeprefix(model).removesuffix("[full]").strip() for c in wide.index]
        _grouped_bars(ax, wide, "GiB")
        _title(ax, model)
    fig.suptitle(f"{fig_title}: peak memory, measured and planned (GiB)", fontsize=10)
    fig.tight_layout()
    return fig


def _chart_sizes(df: pd.DataFrame, fig_title: str):
    from hybrid_triton.bench.size_chart import chart_sizes

    return chart_sizes(df, fig_title)


CHARTS: dict[str, Callable] = {
    "memory_by_model.png": _chart_memory_by_model,
    "gbps.png": _chart_gbps,
    "speedup.png": _chart_speedup,
    "latency.png": _chart_latency,
    "memory.png": _chart_memory,
    "savings.png": _chart_savings,
    "training.png": _chart_training,
    "sizes.png": _chart_sizes,
}


def write_charts(df: pd.DataFrame, directory: str | os.PathLike, title: str) -> list[Path]:
    """Draw every chart the rows support into ``directory``; return the files written."""
    values = df[df["value"].notna() | (df["metric"] == "status")]
    written = []
    for name, draw in CHARTS.items():
        fig = draw(values, title)
        if fig is None:
            continue
        path = Path(directory) / name
        fig.savefig(path, format="png")
        written.append(path)
    return written


# --------------------------------------------------------------------------- writing


def _stamp(date_iso: str) -> str:
    try:
        when = _dt.datetime.fromisoformat(date_iso)
    except ValueError:
        when = _dt.datetime.now(_dt.timezone.utc)
    return when.strftime("%Y-%m-%d_%H%M%S")


def _slug(text: str) -> str:
    base = "cpu" if text.startswith("cpu") else text
    out = "".join(ch.lower() if ch.isalnum() else "-" for ch in base)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "unknown"


def _temp_dir(parent: Path) -> Path:
    # mkdir (not tempfile.mkdtemp, which makes it 0700): the renamed report keeps the
    # permissions the user's umask gives a new directory.
    tmp = parent / f"_tmp_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _fill_report_dir(df: pd.DataFrame, directory: Path, title: str) -> None:
    write_csv(df, directory / "results.csv")
    (directory / "table.md").write_text(table_markdown(df, title))
    write_charts(df, directory, title)


def write_report(df: pd.DataFrame, out: str | os.PathLike, suite: str) -> Path:
    """Write ``<out>/<suite>/<date>_<device>/`` atomically and update ``<out>/README.md``.

    Everything is written into a temporary directory next to the final one, then renamed:
    an exception (or a kill) mid-write leaves no report directory, only a ``_tmp`` folder
    that is removed on exceptions and ignored by git otherwise.
    """
    df = validate(df)
    parent = Path(out) / suite
    parent.mkdir(parents=True, exist_ok=True)
    date = df["date"].iloc[0] if not df.empty else ""
    device = df["device"].iloc[0] if not df.empty else "unknown"
    name = f"{_stamp(date)}_{_slug(device)}"
    final = parent / name
    n = 1
    while final.exists():
        n += 1
        final = parent / f"{name}_{n}"
    tmp = _temp_dir(parent)
    try:
        _fill_report_dir(df, tmp, f"{suite} suite")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    update_index(out)
    return final


def latest_runs(out: str | os.PathLike) -> dict[str, Path]:
    """The latest complete report directory of each suite under ``out``: ``<suite>/<run>``,
    or one level deeper for a suite written with its own ``--out`` (``gpt2/training/<run>``,
    listed as ``gpt2/training``)."""
    latest: dict[str, Path] = {}
    root = Path(out)
    if not root.is_dir():
        return latest

    def complete_runs(folder: Path) -> list[Path]:
        return [
            p
            for p in folder.iterdir()
            if p.is_dir() and not p.name.startswith("_tmp") and (p / "results.csv").is_file()
        ]

    for suite_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        runs = complete_runs(suite_dir)
        if runs:
            latest[suite_dir.name] = max(runs, key=lambda p: p.name)
            continue
        for nested in sorted(p for p in suite_dir.iterdir() if p.is_dir()):
            runs = complete_runs(nested)
            if runs:
                latest[f"{suite_dir.name}/{nested.name}"] = max(runs, key=lambda p: p.name)
    return latest


def update_index(out: str | os.PathLike) -> Path:
    """(Re)write ``<out>/README.md`` with a link to the latest run of each suite."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Reports",
        "",
        "Generated by `hybrid-triton bench` (never edited by hand). The latest run of each",
        "suite; every run has `results.csv` (long format), `table.md` and PNG charts.",
        "",
        "| suite | latest run | machine |",
        "| --- | --- | --- |",
    ]
    for suite, path in latest_runs(root).items():
        rel = path.relative_to(root).as_posix()
        try:
            machine = machine_line(read_csv(path / "results.csv")).removeprefix("Machine: ")
        except Exception as err:  # a damaged CSV should not stop the index
            machine = f"(unreadable results.csv: {err})"
        lines.append(f"| {suite} | [{path.name}]({rel}/table.md) | {machine.replace('|', '/')} |")
    index = root / "README.md"
    tmp = index.with_name(".README.md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, index)
    return index


def regenerate(csv_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Rebuild ``table.md`` and the charts from a ``results.csv`` (in its directory by
    default, else in ``out_dir``); the CSV itself is not modified."""
    csv_path = Path(csv_path)
    df = read_csv(csv_path)
    target = Path(out_dir) if out_dir else csv_path.parent
    target.mkdir(parents=True, exist_ok=True)
    suites = ", ".join(dict.fromkeys(df["suite"])) or "empty"
    title = f"{suites} suite"
    tmp = _temp_dir(target)
    try:
        (tmp / "table.md").write_text(table_markdown(df, title))
        charts = write_charts(df, tmp, title)
        for f in [tmp / "table.md", *charts]:
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hybrid-triton report",
        description="Regenerate table.md and charts from a results.csv, or compare two runs.",
    )
    parser.add_argument("csv", nargs="?", help="a results.csv to regenerate the report from")
    parser.add_argument(
        "--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two results.csv files"
    )
    parser.add_argument("--out", help="where to write (a directory; with --compare a .md file)")
    args = parser.parse_args(argv)
    if bool(args.csv) == bool(args.compare):
        parser.error("give either one results.csv, or --compare BEFORE AFTER")
    try:
        if args.compare:
            before, after = (read_csv(p) for p in args.compare)
            text = compare_markdown(before, after)
            if args.out:
                _write_text_atomically(Path(args.out), text)
                print(f"wrote {args.out}")
            else:
                print(text)
            return 0
        target = regenerate(args.csv, args.out)
        print(f"regenerated {target}")
        return 0
    except OSError as err:  # an unreadable input, an unwritable output
        where = f" {err.filename!r}" if err.filename else ""
        print(f"hybrid-triton report: error:{where} {err.strerror or err}", file=sys.stderr)
        return 2
    except ValueError as err:  # not a results table (SchemaError), not UTF-8, not CSV
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"hybrid-triton report: error: {first}", file=sys.stderr)
        return 2


def _write_text_atomically(path: Path, text: str) -> None:
    """The whole file or nothing: a temporary sibling renamed into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = [
    "COLUMNS",
    "compare",
    "compare_markdown",
    "latest_runs",
    "main",
    "regenerate",
    "table_markdown",
    "update_index",
    "write_charts",
    "write_report",
]

if __name__ == "__main__":
    sys.exit(main())
