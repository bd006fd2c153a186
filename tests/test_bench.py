"""The benchmark harness itself, on CPU: records and CSV schema, probes, timing, charts,
OOM and error handling, atomic report writing, quick mode end to end, compare."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import torch

from hybrid_triton.bench import report as report_mod
from hybrid_triton.bench.probes import MemoryProbe, is_oom, resident_bytes
from hybrid_triton.bench.results import (
    COLUMNS,
    Recorder,
    SchemaError,
    machine_info,
    read_csv,
    to_frame,
    validate,
    write_csv,
)
from hybrid_triton.bench.runner import run_suite
from hybrid_triton.bench.timing import METHOD_CPU, time_cpu

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def machine():
    return machine_info()


def _assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    pixels = matplotlib.image.imread(path)  # decodes the whole file: fails on a broken PNG
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50


# ----------------------------------------------------------------------------- records


def test_records_round_trip_through_csv(tmp_path, machine):
    rec = Recorder("kernels", machine)
    rec.add("cast [2^10]", "hybrid_triton", "time_ms", "ms", 0.125, config={"n": 1024})
    rec.add("cast [2^10]", "hybrid_triton", "peak_reserved", "GiB", None, note="not measured")
    rec.status("cast [2^10]", "torch_compile", "oom", message="CUDA out of\nmemory")
    df = rec.frame()
    assert tuple(df.columns) == COLUMNS
    path = tmp_path / "results.csv"
    write_csv(df, path)
    header = path.read_text().splitlines()[0]
    assert header == ",".join(COLUMNS)
    back = read_csv(path)
    assert tuple(back.columns) == COLUMNS
    assert back["value"].iloc[0] == pytest.approx(0.125)
    assert math.isnan(back["value"].iloc[1]) and math.isnan(back["value"].iloc[2])
    assert json.loads(back["config"].iloc[0]) == {"n": 1024}
    assert back["note"].iloc[2] == "oom: CUDA out of memory"  # one line per row
    assert (back["device"] == machine.device).all()
    assert (back["git_sha"] == machine.git_sha).all()
    assert back["versions"].iloc[0].startswith(f"torch={torch.__version__};")
    pd.testing.assert_frame_equal(back, validate(df))


def test_schema_rejects_missing_columns():
    bad = pd.DataFrame({"suite": ["k"], "case": ["c"], "value": [1.0]})
    with pytest.raises(SchemaError, match="missing columns"):
        validate(bad)


def test_machine_line_names_versions_and_sha(machine):
    line = machine.line()
    for part in (machine.device, torch.__version__, machine.triton, machine.git_sha):
        assert part in line
    assert machine.slug and "/" not in machine.slug and " " not in machine.slug


# ----------------------------------------------------------------------------- probes, timing


def test_cpu_probe_tracks_tensor_peak_exactly():
    layer = torch.nn.Linear(64, 32)
    resident = resident_bytes([layer])
    assert resident == (64 * 32 + 32) * 4
    probe = MemoryProbe("cpu")
    mib = 2**20
    with probe.phase("Full", resident=[layer]):
        a = torch.empty(mib // 4)  # 1 MiB
        b = a.view(-1, 4)  # a view: no new memory
        c = torch.ones(mib // 4) * 2  # ones (1 MiB) and the product (1 MiB) alive together
        del a, b
        d = c + 1  # 1 MiB, while c is alive
        del c, d
    result = probe.results["Full"]
    assert result.allocated_at_start == resident
    assert result.peak_allocated == resident + 3 * mib
    assert result.allocated_at_end == resident
    assert result.peak_reserved is None and "not measured on cpu" in result.note
    rows = {m: (v, n) for m, _, v, n in result.as_metrics()}
    assert rows["peak_allocated"][0] == pytest.approx((resident + 3 * mib) / 2**30)
    assert rows["peak_reserved"][0] is None and "not measured" in rows["peak_reserved"][1]


def test_cpu_probe_can_leave_out_earlier_tensors():
    earlier = torch.zeros(4096)  # 16 KiB alive before the model under test
    probe = MemoryProbe("cpu")
    probe.exclude_current_tensors()
    kept = torch.zeros(1024)  # 4 KiB, alive at the phase start
    with probe.phase("Full"):
        x = torch.zeros(256)
        del x
    result = probe.results["Full"]
    assert result.allocated_at_start == 4096 and result.peak_allocated == 4096 + 1024
    del earlier, kept


def test_probe_resets_per_phase():
    # CPU tensors that earlier tests in this worker left alive count toward allocated_at_start
    # (a GC scan of the process): judge each phase's peak against its own start.
    probe = MemoryProbe("cpu")
    with probe.phase("Full"):
        x = torch.zeros(1024)
        del x
    with probe.phase("Predict"):
        pass
    full, predict = probe.results["Full"], probe.results["Predict"]
    assert full.peak_allocated - full.allocated_at_start == 4096
    assert full.allocated_at_end == full.allocated_at_start  # x was freed
    assert predict.peak_allocated == predict.allocated_at_start  # Full's peak did not carry over
    assert [r.phase for r in probe.history] == ["Full", "Predict"]


def test_is_oom():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_time_cpu_median_and_spread():
    calls = []
    timing = time_cpu(lambda: calls.append(1), warmup=2, repeats=7)
    assert len(calls) == 9
    assert timing.repeats == 7 and timing.method == METHOD_CPU
    assert 0 <= timing.p20_ms <= timing.median_ms <= timing.p80_ms
    with pytest.raises(ValueError, match="repeats"):
        time_cpu(lambda: None, repeats=0)


# ----------------------------------------------------------------------------- charts


def _chart_frame(machine) -> pd.DataFrame:
    rec = Recorder("mixed", machine)
    for case, ours, eager in (("cast [2^16]", 40.0, 20.0), ("acc [2^16]", 30.0, 25.0)):
        rec.add(case, "torch_copy", "copy_gbps", "GB/s", 50.0)
        rec.add(case, "hybrid_triton", "gbps", "GB/s", ours)
        rec.add(case, "torch_eager", "gbps", "GB/s", eager)
        rec.add(case, "hybrid_triton", "speedup_vs_torch_eager", "x", ours / eager)
    rec.status("rssm [T=50]", "-", "ok", config={"kind": "latency"})
    rec.add("rssm [T=50]", "hybrid_triton", "time_ms", "ms", 1.5, config={"kind": "latency"})
    rec.add("rssm [T=50]", "torch_eager", "time_ms", "ms", 26.0, config={"kind": "latency"})
    for case in ("tiny fp32 [Full]", "tiny bf16 [Full]"):
        rec.add(case, "measured", "peak_allocated", "GiB", 1.0)
        rec.add(case, "planner", "total", "GiB", 1.1)
        rec.add(case, "planner", "component:weights", "GiB", 0.4)
        rec.add(case, "planner", "component:activations", "GiB", 0.7)
        rec.add(case, "measured", "saving_vs_fp32", "%", 10.0)
        rec.add(case, "planner", "saving_vs_fp32", "%", 12.0)
    rec.status("tiny fp32 b64 [Full]", "measured", "oom")
    rec.add("tiny fp32 b64 [Full]", "planner", "total", "GiB", 90.0)
    rec.add("gpt2-tiny bf16", "measured", "tokens_per_s", "tok/s", 1000.0)
    for case in ("llama fp32 1x64 [full]", "qwen2 bf16 1x64 [full]"):  # memory_hf rows
        rec.add(case, "measured", "peak_reserved", "GiB", 1.2)
        rec.add(case, "planner", "reserved", "GiB", 1.25)
    rec.add("sizes/launch floor (empty kernel) [1]", "hybrid_triton", "time_ms", "ms", 0.005)
    for n in (4095, 4096):
        cfg = {"sweep": True, "kernel": "cast", "numel": n}
        rec.add(f"sizes/cast [{n}]", "hybrid_triton", "pct_of_copy", "%", 90.0, config=cfg)
        rec.add(f"sizes/cast [{n}]", "hybrid_triton", "time_ms", "ms", 0.007, config=cfg)
    return rec.frame()


def test_every_chart_is_a_valid_png(tmp_path, machine):
    written = report_mod.write_charts(_chart_frame(machine), tmp_path, "test")
    names = sorted(p.name for p in written)
    assert names == sorted(report_mod.CHARTS), names
    for path in written:
        _assert_png(path)


def test_no_chart_without_its_metrics(tmp_path, machine):
    rec = Recorder("x", machine)
    rec.add("c", "p", "something_else", "u", 1.0)
    assert report_mod.write_charts(rec.frame(), tmp_path, "t") == []


def test_table_lists_oom_and_machine_line(machine):
    text = report_mod.table_markdown(_chart_frame(machine), "t")
    assert machine.line().split(" | ")[0] in text
    assert f"git {machine.git_sha}" in text
    assert "tiny fp32 b64 [Full]" in text and "| oom |" in text
    assert "Errors, out-of-memory and skipped" in text


# ----------------------------------------------------------------------------- atomic writing


def test_report_is_atomic_on_failure(tmp_path, machine, monkeypatch):
    df = _chart_frame(machine)

    def explode(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(report_mod, "write_charts", explode)
    with pytest.raises(RuntimeError, match="simulated"):
        report_mod.write_report(df, tmp_path, "kernels")
    leftovers = list((tmp_path / "kernels").iterdir())
    assert leftovers == [], f"a failed write left {leftovers}"
    assert not (tmp_path / "README.md").exists()


def test_report_layout_and_index(tmp_path, machine):
    df = _chart_frame(machine)
    first = report_mod.write_report(df, tmp_path, "memory")
    second = report_mod.write_report(df, tmp_path, "memory")  # same stamp: a new dir
    assert first != second and first.parent == second.parent == tmp_path / "memory"
    assert {"results.csv", "table.md", "memory.png"} <= {p.name for p in second.iterdir()}
    index = (tmp_path / "README.md").read_text()
    assert f"({second.relative_to(tmp_path).as_posix()}/table.md)" in index
    assert report_mod.latest_runs(tmp_path) == {"memory": second}
    # A suite written with its own --out one level down (reports/gpt2/training/<run>).
    nested = report_mod.write_report(df, tmp_path / "gpt2", "training")
    assert report_mod.latest_runs(tmp_path) == {"gpt2/training": nested, "memory": second}
    plain = tmp_path / "plain"
    plain.mkdir()  # a report directory gets the same permissions as any new directory
    assert second.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


# ----------------------------------------------------------------------------- kernels suite

FAKE_FAMILY = """
import weakref
import torch
from hybrid_triton.bench.kernel_case import CaseRun, KernelCase

EVENTS = []
ALIVE = []


def _case(name, providers, check=None, numel=1024):
    def setup():
        # Only one case's tensors may be alive: the previous case's are gone by now.
        assert all(ref() is None for ref in ALIVE), "previous case still holds its tensors"
        x = torch.ones(numel)
        ALIVE.append(weakref.ref(x))
        EVENTS.append(("setup", name))

        def wrap(p, fn):
            def call():
                EVENTS.append((p, name))
                return fn(x)
            return call

        def run_check():
            EVENTS.append(("check", name))
            if check is not None:
                check(x)

        return CaseRun({p: wrap(p, fn) for p, fn in providers.items()}, run_check)

    return KernelCase("fake", name, "2^10", numel, 8 * numel, setup, config={"k": 1})


def _oom(x):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (simulated)")


def _boom(x):
    raise RuntimeError("provider bug (simulated)")


def _bad_check(x):
    raise AssertionError("max abs err 1.0 (simulated)")


def cases(quick):
    return [
        _case("good", {"hybrid_triton": lambda x: x * 2, "torch_eager": lambda x: x + x}),
        _case("oom", {"hybrid_triton": lambda x: x * 2, "torch_compile": _oom}),
        _case("broken", {"hybrid_triton": _boom, "torch_eager": lambda x: x + x}),
        _case("wrong", {"hybrid_triton": lambda x: x, "torch_eager": lambda x: x}, _bad_check),
        _case("latency", {"hybrid_triton": lambda x: x.sum()}, numel=0),
    ]
"""


@pytest.fixture
def fake_suites(tmp_path) -> Path:
    folder = tmp_path / "suites"
    folder.mkdir()
    shutil.copy(REPO / "benchmarks" / "kernels.py", folder / "kernels.py")
    (folder / "kernels_fake.py").write_text(textwrap.dedent(FAKE_FAMILY))
    (folder / "kernels_syntaxerror.py").write_text("def cases(quick):\n    return [\n")
    (folder / "kernels_nocases.py").write_text("X = 1\n")
    return folder


def _rows(df, case, provider=None, metric=None):
    sel = df["case"].str.startswith(case)
    if provider is not None:
        sel &= df["provider"] == provider
    if metric is not None:
        sel &= df["metric"] == metric
    return df[sel]


def test_kernels_suite_records_errors_and_ooms_and_goes_on(tmp_path, fake_suites, machine):
    out = tmp_path / "reports"
    report_dir = run_suite(
        "kernels", quick=True, out=out, suites_dir=fake_suites, progress=False, machine=machine
    )
    df = read_csv(report_dir / "results.csv")
    status = df[df["metric"] == "status"]
    notes = dict(zip(status["case"] + "|" + status["provider"], status["note"]))
    # A module that does not import, or has no cases(): error rows, the suite went on.
    assert notes["kernels_syntaxerror|-"].startswith("error: import failed: SyntaxError")
    assert notes["kernels_nocases|-"].startswith("error: module has no cases")
    # The good case: timed, GB/s and % of the copy ceiling measured in this run, speedup.
    good = _rows(df, "fake/good")
    copy = _rows(good, "fake/good", "torch_copy", "copy_gbps")["value"]
    assert len(copy) == 1 and copy.iloc[0] > 0
    for provider in ("hybrid_triton", "torch_eager"):
        t = _rows(good, "fake/good", provider, "time_ms")["value"].iloc[0]
        gbps = _rows(good, "fake/good", provider, "gbps")["value"].iloc[0]
        assert gbps == pytest.approx(8 * 1024 / (t * 1e-3) / 1e9, rel=1e-5)  # CSV: 6 digits
        pct = _rows(good, "fake/good", provider, "pct_of_copy")["value"].iloc[0]
        assert pct == pytest.approx(100 * gbps / copy.iloc[0], rel=1e-5)
    speed = _rows(good, "fake/good", "hybrid_triton", "speedup_vs_torch_eager")["value"]
    t_ours = _rows(good, "fake/good", "hybrid_triton", "time_ms")["value"].iloc[0]
    t_eager = _rows(good, "fake/good", "torch_eager", "time_ms")["value"].iloc[0]
    assert speed.iloc[0] == pytest.approx(t_eager / t_ours, rel=1e-5)
    # Simulated OOM in one provider: recorded as oom, the other provider still timed.
    assert notes["fake/oom [2^10]|torch_compile"].startswith("oom: ")
    assert len(_rows(df, "fake/oom", "hybrid_triton", "time_ms")) == 1
    # A failing provider: an error row; the other provider still timed, no speedup.
    assert notes["fake/broken [2^10]|hybrid_triton"].startswith("error: RuntimeError")
    assert len(_rows(df, "fake/broken", "torch_eager", "time_ms")) == 1
    assert _rows(df, "fake/broken", metric="speedup_vs_torch_eager").empty
    # Accuracy first: a failing check means the case is not timed at all.
    assert notes["fake/wrong [2^10]|-"].startswith("error: check failed: AssertionError")
    wrong_times = _rows(df, "fake/wrong", metric="time_ms")
    assert set(wrong_times["provider"]) == {"torch_copy"}  # only the ceiling, measured first
    # numel 0: no copy ceiling, still timed.
    assert _rows(df, "fake/latency", "torch_copy").empty
    assert len(_rows(df, "fake/latency", "hybrid_triton", "time_ms")) == 1
    # The table shows the problems; the index links this run.
    table = (report_dir / "table.md").read_text()
    assert "fake/oom [2^10]" in table and "simulated" in table
    assert report_dir.name in (out / "README.md").read_text()


def test_kernels_suite_checks_before_timing(tmp_path, fake_suites, machine):
    import sys

    run_suite(
        "kernels", quick=True, out=tmp_path, suites_dir=fake_suites, progress=False,
        machine=machine, pattern="fake/good",
    )  # fmt: skip
    events = sys.modules["benchmarks.kernels_fake"].EVENTS
    assert events[0] == ("setup", "good") and events[1] == ("check", "good")
    assert {e[0] for e in events[2:]} == {"hybrid_triton", "torch_eager"}


def test_kernels_suite_pattern_filters_cases(tmp_path, fake_suites, machine):
    report_dir = run_suite(
        "kernels", quick=True, out=tmp_path, suites_dir=fake_suites, progress=False,
        machine=machine, pattern="*latency*",
    )  # fmt: skip
    df = read_csv(report_dir / "results.csv")
    cases = set(df[df["case"].str.startswith("fake/")]["case"])
    assert cases == {"fake/latency [2^10]"}


def test_quick_kernels_suite_end_to_end_via_cli(tmp_path, capsys):
    from hybrid_triton.bench.cli import main

    out = tmp_path / "reports"
    rc = main(["kernels", "--quick", "--out", str(out), "--no-progress", "--cases", "elementwise"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Machine:" in printed and "elementwise/scale fp32" in printed
    (report_dir,) = list((out / "kernels").iterdir())
    df = read_csv(report_dir / "results.csv")
    assert set(df["suite"]) == {"kernels"}
    assert (df[df["metric"] == "status"]["note"].str.startswith("ok")).all()
    scale = df[df["case"].str.startswith("elementwise/scale") & (df["metric"] == "gbps")]
    assert len(scale) >= 2 and (scale["value"] > 0).all()
    for name in ("gbps.png", "speedup.png"):
        _assert_png(report_dir / name)
    assert (report_dir / "table.md").read_text().startswith("# kernels suite\n\nMachine: ")
    assert report_dir.name in (out / "README.md").read_text()


def test_unknown_suites_dir_is_a_clear_error(tmp_path, capsys):
    from hybrid_triton.bench.cli import main

    rc = main(
        ["kernels", "--quick", "--suites-dir", str(tmp_path / "nope"), "--out", str(tmp_path)]
    )
    assert rc == 2
    assert "--suites-dir" in capsys.readouterr().err


# ----------------------------------------------------------------------------- report command


def test_report_regenerate_and_compare(tmp_path, machine, capsys):
    before = _chart_frame(machine)
    after = before.copy()
    after.loc[after["metric"] == "gbps", "value"] *= 1.5
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    write_csv(before, a)
    write_csv(after, b)
    assert report_mod.main([str(a), "--out", str(tmp_path / "regen")]) == 0
    _assert_png(tmp_path / "regen" / "gbps.png")
    assert "Machine:" in (tmp_path / "regen" / "table.md").read_text()
    assert sorted(p.name for p in (tmp_path / "regen").iterdir() if p.name.startswith("_")) == []

    table = report_mod.compare(before, after)
    gbps = table[table["metric"] == "gbps"]
    assert len(gbps) == 4
    assert gbps["change_pct"].to_numpy() == pytest.approx([50.0] * 4)
    unchanged = table[table["metric"] == "copy_gbps"]["change_pct"]
    assert (unchanged == 0).all()
    md = tmp_path / "cmp.md"
    assert report_mod.main(["--compare", str(a), str(b), "--out", str(md)]) == 0
    text = md.read_text()
    assert "before" in text and "after" in text and "change_pct" in text and "50.0" in text


def test_compare_keeps_rows_present_in_one_run_only(machine):
    rec_a, rec_b = Recorder("k", machine), Recorder("k", machine)
    rec_a.add("old case", "p", "time_ms", "ms", 1.0)
    rec_b.add("new case", "p", "time_ms", "ms", 2.0)
    table = report_mod.compare(rec_a.frame(), rec_b.frame())
    assert set(table["case"]) == {"old case", "new case"}
    assert table["change_pct"].isna().all()


def test_report_command_needs_one_mode(capsys):
    with pytest.raises(SystemExit):
        report_mod.main([])


def test_to_frame_empty_has_schema():
    assert tuple(to_frame([]).columns) == COLUMNS
