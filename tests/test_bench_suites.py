"""The memory and training suites on CPU: a filtered quick run end to end, a simulated
out-of-memory configuration recorded with the planner's estimate beside it, savings rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hybrid_triton.bench.results import Recorder, machine_info, read_csv
from hybrid_triton.bench.runner import SuiteContext, load_module, run_suite

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "benchmarks"


@pytest.fixture(scope="module")
def machine():
    return machine_info()


@pytest.fixture(scope="module")
def memory_suite():
    return load_module(SUITES / "memory.py", "_test_memory_suite")


def _ctx(machine, suite: str, pattern: str | None = None) -> SuiteContext:
    return SuiteContext(suite=suite, recorder=Recorder(suite, machine), quick=True,
                        pattern=pattern, suites_dir=SUITES, progress=False)  # fmt: skip


def test_memory_quick_baseline_end_to_end(tmp_path, machine):
    report_dir = run_suite(
        "memory", quick=True, out=tmp_path, pattern="fp32 32b 2x64", progress=False,
        machine=machine,
    )  # fmt: skip
    df = read_csv(report_dir / "results.csv")
    case = "gpt2-micro fp32 32b 2x64 [full]"
    measured = df[(df["case"] == case) & (df["provider"] == "measured")]
    peak = measured[measured["metric"] == "peak_allocated"]["value"].iloc[0]
    start = measured[measured["metric"] == "allocated_at_start"]["value"].iloc[0]
    assert peak > start > 0  # weights, grads, moments resident; activations on top
    reserved = measured[measured["metric"] == "peak_reserved"]
    if machine.device_kind == "cuda":  # the caching allocator reserves at least what it hands out
        assert reserved["value"].iloc[0] >= peak
    else:  # CPU: no caching allocator, so nothing reserved to measure
        assert math.isnan(reserved["value"].iloc[0]) and "not measured" in reserved["note"].iloc[0]
    planner = df[(df["case"] == case) & (df["provider"] == "planner")]
    assert planner[planner["metric"] == "total"]["value"].iloc[0] > 0
    assert (planner["metric"].str.startswith("component:")).sum() >= 3
    traced = df[(df["case"] == case) & (df["provider"] == "traced")]
    assert traced[traced["metric"] == "total"]["value"].iloc[0] > 0  # fake-tensor trace
    saving = df[
        (df["metric"] == "saving_vs_fp32") & (df["case"] == "gpt2-micro fp32 32b 2x64 [peak]")
    ]
    assert set(saving["provider"]) == {"measured", "planner"}
    assert saving["value"].to_numpy() == pytest.approx([0.0, 0.0])  # a baseline against itself
    assert (report_dir / "memory.png").read_bytes()[:4] == b"\x89PNG"
    assert (report_dir / "savings.png").is_file()


def test_memory_oom_is_recorded_with_the_estimate(machine, memory_suite, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")

    monkeypatch.setattr(memory_suite, "measure_recipe", out_of_memory)
    ctx = _ctx(machine, "memory", pattern="fp32 32b 2x64")
    memory_suite.run(ctx)
    df = ctx.recorder.frame()
    status = df[(df["metric"] == "status") & (df["provider"] == "measured")]
    assert list(status["case"]) == ["gpt2-micro fp32 32b 2x64"]
    note = status["note"].iloc[0]
    assert note.startswith("oom: OutOfMemoryError") and "planner estimate:" in note
    # The estimate is still there, and the suite went on to the savings (not measurable).
    assert (df["provider"] == "planner").any()
    measured_saving = df[(df["metric"] == "saving_vs_fp32") & (df["provider"] == "measured")]
    assert measured_saving["value"].isna().all()


def test_memory_matrix_labels_are_unique(memory_suite):
    for quick in (True, False):
        labels = [c.label for c in memory_suite.configurations(quick)]
        assert len(labels) == len(set(labels))


def test_training_probe_overhead_case(tmp_path, machine):
    report_dir = run_suite(
        "training", quick=True, out=tmp_path, pattern="probe overhead", progress=False,
        machine=machine,
    )  # fmt: skip
    df = read_csv(report_dir / "results.csv")
    status = df[df["metric"] == "status"]
    assert status["note"].str.startswith("ok").all(), status["note"].tolist()
    times = df[df["metric"] == "step_time_ms"]
    assert set(times["provider"]) == {"without_probe", "with_probe"}
    assert (times["value"] > 0).all()
    assert times["note"].str.contains("pairs of blocks").all()

    def value(metric: str) -> float:
        (v,) = df[df["metric"] == metric]["value"]
        return v

    # The median paired difference sits inside its own interval; the config says how.
    overhead = value("probe_overhead_pct")
    assert value("probe_overhead_ci_low_pct") <= overhead <= value("probe_overhead_ci_high_pct")
    assert json.loads(times["config"].iloc[0])["pairs"] == 3
    assert value("block_spread_pct") >= 0
    host_us = value("probe_host_us")
    assert host_us > 0
    without = times[times["provider"] == "without_probe"]["value"].iloc[0]
    assert value("probe_host_pct") == pytest.approx(100 * host_us * 1e-3 / without, rel=1e-4)
    nvml = df[df["metric"] == "nvml_query_us"]
    if machine.device_kind != "cuda":
        assert nvml["value"].isna().all() and nvml["note"].str.contains("not measured").all()


def test_memory_hf_quick_records_the_planner_and_draws_one_panel_per_model(tmp_path, machine):
    pytest.importorskip("transformers")
    report_dir = run_suite(
        "memory_hf", quick=True, out=tmp_path, pattern="gpt2 *", progress=False,
        machine=machine, options={"setups": "fp32,bf16"},
    )  # fmt: skip
    df = read_csv(report_dir / "results.csv")
    planner = df[(df["provider"] == "planner") & (df["metric"] == "total")]
    assert set(planner["case"]) == {"gpt2 fp32 2x64 [full]", "gpt2 bf16 2x64 [full]"}
    assert (planner["value"] > 0).all()
    assert planner["note"].str.startswith("traced").all()  # the HF module as it runs
    reserved = df[(df["provider"] == "planner") & (df["metric"] == "reserved")]
    assert (reserved["value"].to_numpy() >= planner["value"].to_numpy()).all()
    assert (report_dir / "memory_by_model.png").is_file()
    if machine.device_kind != "cuda":  # a CPU has no allocator statistics to set beside it
        assert df[df["provider"] == "measured"].empty
