"""The memory suite's cap checks, time limits and partial rows, on CPU: caps are simulated
(a fake ``memory_cap`` and a measurement that runs out of memory under a small cap)."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from pathlib import Path

import pytest
import torch

from hybrid_triton.bench.results import Recorder, machine_info, read_csv
from hybrid_triton.bench.runner import (
    PARTIAL_CSV_ENV,
    CaseTimeout,
    SuiteContext,
    load_module,
    run_suite,
    time_limit,
)

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "benchmarks"
GIB = 2**30
FP32_CONFIGS = "gpt2-micro fp32*"  # the fp32 configuration with and without checkpointing
TINY_CAP = 0.0001  # GiB (~100 KiB): below any micro GPT-2 run


@pytest.fixture(scope="module")
def machine():
    return machine_info()


@pytest.fixture(scope="module")
def memory_suite():
    return load_module(SUITES / "memory.py", "_test_memory_suite_caps")


def _ctx(machine, pattern, caps=(), **options) -> SuiteContext:
    return SuiteContext(suite="memory", recorder=Recorder("memory", machine), quick=True,
                        pattern=pattern, suites_dir=SUITES, progress=False,
                        memory_caps=tuple(caps),
                        options={k: str(v) for k, v in options.items()})  # fmt: skip


class SimulatedCaps:
    """A fake ``memory_cap`` and a ``measure_recipe`` that runs out of memory under caps
    below ``oom_below`` GiB; counts what happened."""

    def __init__(self, memory_suite, monkeypatch, oom_below: float):
        self.cap: float | None = None
        self.entered: list[float] = []
        self.calls: list[tuple[str, float | None]] = []
        self.freed = 0
        real_measure = memory_suite.measure_recipe
        real_free = memory_suite.free_device_memory

        @contextlib.contextmanager
        def fake_cap(gib):
            self.entered.append(gib)
            self.cap = gib
            try:
                yield gib / 80
            finally:
                self.cap = None

        def measure_recipe(cfg, device, steps, probe):
            self.calls.append((cfg.label, self.cap))
            if self.cap is not None and self.cap < oom_below:
                big = torch.empty(1024)  # something allocated before the OOM, to be freed
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate 2.00 GiB (simulated, {big.numel()})"
                )
            return real_measure(cfg, device, steps, probe)

        def free():
            self.freed += 1
            real_free()

        monkeypatch.setattr(memory_suite, "memory_cap", fake_cap)
        monkeypatch.setattr(memory_suite, "measure_recipe", measure_recipe)
        monkeypatch.setattr(memory_suite, "free_device_memory", free)


def _rows(df, metric, provider=None):
    sel = df["metric"] == metric
    if provider is not None:
        sel &= df["provider"] == provider
    return df[sel]


def test_caps_run_for_real_and_an_oom_does_not_stop_the_suite(machine, memory_suite,
                                                             monkeypatch):  # fmt: skip
    sim = SimulatedCaps(memory_suite, monkeypatch, oom_below=0.01)
    ctx = _ctx(machine, FP32_CONFIGS, caps=(0.005, 4.0), cap_runs="all", traced="none")
    memory_suite.run(ctx)
    df = ctx.recorder.frame()
    labels = ["gpt2-micro fp32 32b 2x64", "gpt2-micro fp32 32b ckpt 2x64"]
    # Each configuration: the uncapped run, then one real run per cap, the cap lifted after
    # each (also after the OOM), memory freed around every run.
    assert sim.calls == [(lab, cap) for lab in labels for cap in (None, 0.005, 4.0)]
    assert sim.entered == [0.005, 4.0] * 2 and sim.cap is None
    assert sim.freed >= 2 * len(sim.calls)
    status = _rows(df, "status", "measured")
    assert list(status["case"]) == labels and status["note"].str.startswith("ok").all()
    fits = _rows(df, "fits_cap", "measured").set_index("case")
    for lab in labels:
        oom = fits.loc[f"{lab} [cap 0.005 GiB]"]
        assert oom["value"] == 0.0 and "out of memory under the cap" in oom["note"]
        ran = fits.loc[f"{lab} [cap 4 GiB]"]
        assert ran["value"] == 1.0 and ran["note"].startswith("ran under the cap")
        assert json.loads(ran["config"])["how"] == "run"
    # The planner: its reserved peak (a few MiB) fits 4 GiB and not 5 MiB: all agree.
    planner = _rows(df, "fits_cap", "planner").set_index("case")["value"]
    assert planner[f"{labels[0]} [cap 0.005 GiB]"] == 0.0
    assert planner[f"{labels[0]} [cap 4 GiB]"] == 1.0
    assert (_rows(df, "fit_agrees")["value"] == 1.0).all()
    (summary,) = _rows(df, "fit_agreement_pct").itertuples()
    assert summary.value == 100.0 and summary.note == "4 of 4 agree"
    assert _rows(df, "total", "traced").empty  # traced=none: no trace rows
    text = memory_suite.cap_summary(df)
    assert "gpt2-micro fp32 32b 2x64 [cap 0.005 GiB]" in text
    assert "oom (run)" in text and "ran (run)" in text and " NO" not in text
    assert "planner agreement: 100.0% (4 of 4 agree)" in text


def test_caps_the_uncapped_run_decides_are_not_run_again(machine, memory_suite, monkeypatch):
    sim = SimulatedCaps(memory_suite, monkeypatch, oom_below=0.01)
    ctx = _ctx(machine, "gpt2-micro fp32 32b 2x64", caps=(TINY_CAP, 4.0), traced="none")
    memory_suite.run(ctx)
    df = ctx.recorder.frame()
    label = "gpt2-micro fp32 32b 2x64"
    # The tiny cap is below the uncapped peak allocated: decided without a run. On CPU there
    # is no reserved figure, so "it fits 4 GiB" still needs a run under that cap.
    expected = [(label, None)] + ([(label, 4.0)] if machine.device_kind != "cuda" else [])
    assert sim.calls == expected
    fits = _rows(df, "fits_cap", "measured").set_index("case")
    tiny = fits.loc[f"{label} [cap {TINY_CAP:g} GiB]"]
    assert tiny["value"] == 0.0 and tiny["note"].startswith("derived: uncapped peak allocated")
    assert json.loads(tiny["config"])["how"] == "derived"
    assert fits.loc[f"{label} [cap 4 GiB]"]["value"] == 1.0
    assert (_rows(df, "fit_agrees")["value"] == 1.0).all()


def test_a_disagreement_is_named(machine, memory_suite, monkeypatch):
    SimulatedCaps(memory_suite, monkeypatch, oom_below=5.0)  # OOM where the planner says fits
    ctx = _ctx(machine, "gpt2-micro fp32 32b 2x64", caps=(4.0,), cap_runs="all", traced="none")
    memory_suite.run(ctx)
    df = ctx.recorder.frame()
    case = "gpt2-micro fp32 32b 2x64 [cap 4 GiB]"
    assert _rows(df, "fit_agrees")["value"].tolist() == [0.0]
    (summary,) = _rows(df, "fit_agreement_pct").itertuples()
    assert summary.value == 0.0 and summary.note == f"0 of 1 agree; disagree: {case}"
    assert " NO" in memory_suite.cap_summary(df)


def _measured(memory_suite, status="ok", allocated=None, reserved=None):
    return memory_suite.Measurement(status, {}, allocated, reserved)


def test_derived_cap_verdicts(memory_suite):
    verdict = memory_suite.derived_cap_verdict
    cap = 16 * GIB
    # Reserved never reached the cap: the same run under it.
    fits, why = verdict(_measured(memory_suite, allocated=10 * GIB, reserved=12 * GIB), cap)
    assert fits and why.startswith("derived: uncapped peak reserved 12.000 GiB")
    # The live tensors alone exceed it.
    fits, why = verdict(_measured(memory_suite, allocated=17 * GIB, reserved=18 * GIB), cap)
    assert not fits and "peak allocated 17.000 GiB > cap" in why
    # In between: only a capped run can say (fragmentation, freeing cached blocks).
    assert verdict(_measured(memory_suite, allocated=15 * GIB, reserved=17 * GIB), cap) is None
    # CPU: no reserved figure, so "fits" is never derived.
    assert verdict(_measured(memory_suite, allocated=1 * GIB), cap) is None
    assert verdict(_measured(memory_suite, "oom"), cap) == (
        False, "derived: the uncapped run already ran out of memory"
    )  # fmt: skip
    assert verdict(_measured(memory_suite, "error"), cap) is None


def test_a_slow_configuration_times_out_alone(machine, memory_suite, monkeypatch):
    def slow(*args, **kwargs):
        while True:
            time.sleep(0.05)

    monkeypatch.setattr(memory_suite, "measure_recipe", slow)
    ctx = _ctx(machine, FP32_CONFIGS, config_timeout=0.3, traced="none")
    t0 = time.perf_counter()
    memory_suite.run(ctx)
    assert time.perf_counter() - t0 < 10
    df = ctx.recorder.frame()
    status = _rows(df, "status", "measured")
    assert len(status) == 2  # the second configuration ran after the first timed out
    assert status["note"].str.startswith("error: CaseTimeout").all()
    assert (_rows(df, "total", "planner")["value"] > 0).all()  # estimates still recorded


def test_a_failed_run_is_not_checked_under_caps(machine, memory_suite, monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("a bug (simulated)")

    monkeypatch.setattr(memory_suite, "measure_recipe", broken)
    ctx = _ctx(machine, "gpt2-micro fp32 32b 2x64", caps=(1.0, 2.0), cap_runs="all",
               traced="none")  # fmt: skip
    memory_suite.run(ctx)
    df = ctx.recorder.frame()
    assert calls == [1]  # no capped runs after the uncapped one failed
    fits = _rows(df, "fits_cap", "measured")
    assert fits["value"].isna().all() and len(fits) == 2
    assert fits["note"].str.startswith("not checked: the uncapped run failed").all()
    assert _rows(df, "fit_agrees")["value"].isna().all()
    assert _rows(df, "fit_agreement_pct").empty  # nothing was checked


def test_time_limit_restores_the_previous_handler():
    before = signal.getsignal(signal.SIGALRM)
    with (
        pytest.raises(CaseTimeout, match=r"slow thing ran past its time limit of 0\.1 s"),
        time_limit(0.1, "slow thing"),
    ):
        time.sleep(5)
    assert signal.getsignal(signal.SIGALRM) is before
    with time_limit(5):  # finished in time: the timer is cancelled
        pass
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with time_limit(None):
        pass


def test_partial_rows_are_written_after_each_configuration(tmp_path, machine, monkeypatch):
    partial = tmp_path / "partial.csv"
    monkeypatch.setenv(PARTIAL_CSV_ENV, str(partial))
    report_dir = run_suite(
        "memory", quick=True, out=tmp_path, pattern="gpt2-micro fp32 32b 2x64",
        progress=False, machine=machine, options={"traced": "none"},
    )  # fmt: skip
    rows = read_csv(partial)
    assert set(rows["case"]) >= {"gpt2-micro fp32 32b 2x64", "gpt2-micro fp32 32b 2x64 [full]"}
    assert rows[rows["provider"] == "traced"].empty
    assert len(rows) <= len(read_csv(report_dir / "results.csv"))


def test_bad_options_are_clear_errors(machine, memory_suite):
    ctx = _ctx(machine, "gpt2-micro fp32 32b 2x64", traced="sometimes")
    with pytest.raises(ValueError, match="traced='sometimes'"):
        memory_suite.run(ctx)
    ctx = _ctx(machine, "gpt2-micro fp32 32b 2x64", config_timeout="soon")
    with pytest.raises(ValueError, match="config_timeout='soon'"):
        memory_suite.run(ctx)


def test_cli_caps_and_options(tmp_path, capsys):
    from hybrid_triton.bench.cli import main

    args = ["memory", "--quick", "--out", str(tmp_path), "--no-progress"]
    assert main([*args, "--option", "traced"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main([*args, "--memory-cap", "8,x"]) == 2
    assert "GiB numbers" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "--memory-cap", "8,16,24"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
    assert main(["training", "--quick", "--out", str(tmp_path), "--memory-cap", "8,16"]) == 2
    err = capsys.readouterr().err
    assert "memory suite only" in err or "needs a CUDA device" in err


# ----------------------------------------------------------------------------- the allocator

H100_REPORT = REPO / "reports/memory/2026-11-24_223017_nvidia-h100-80gb-hbm3"
# The three checks of that report where the old planner (allocated peak + segment rounding)
# said "fits" and the run under the cap ran out of memory (native allocator fragmentation).
H100_NATIVE_MISSES = {
    "gpt2-medium bf16-autocast 32b ckpt 16x1024 [cap 16 GiB]",
    "gpt2-medium bf16-master 32b 16x1024 [cap 24 GiB]",
    "gpt2-small fp32 32b 16x1024 [cap 24 GiB]",
}


@pytest.mark.parametrize(
    "conf, expected",
    [
        ("", "native"),
        ("expandable_segments:True", "expandable"),
        ("max_split_size_mb:128,expandable_segments:True", "expandable"),
        ("expandable_segments:true", "expandable"),
        ("expandable_segments:False", "native"),
        ("expandable_segments:True,expandable_segments:False", "native"),
        ("max_split_size_mb:128", "native"),
    ],
    ids=["unset", "on", "with-others", "lowercase", "off", "last-wins", "other-key"],
)
def test_process_allocator_reads_the_alloc_conf(memory_suite, conf, expected):
    assert memory_suite.process_allocator(conf) == expected


def test_rows_record_the_allocator_the_process_runs_under(machine, memory_suite, monkeypatch):
    conf = "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", conf)
    SimulatedCaps(memory_suite, monkeypatch, oom_below=0.01)
    ctx = _ctx(machine, "gpt2-micro fp32 32b 2x64", caps=(4.0,), cap_runs="all", traced="none")
    memory_suite.run(ctx)
    df = ctx.recorder.frame()
    configs = [json.loads(c) for c in df[df["case"] != "cap checks"]["config"]]
    assert configs and all(c["allocator"] == "expandable" for c in configs)
    assert all(c["alloc_conf"] == conf for c in configs)
    case = "gpt2-micro fp32 32b 2x64 [cap 4 GiB]"
    planned = _rows(df, "fits_cap", "planner").set_index("case").loc[case]
    assert "expandable allocator slack" in planned["note"] and conf in planned["note"]
    measured = _rows(df, "fits_cap", "measured").set_index("case").loc[case]
    assert measured["note"].endswith("allocator expandable")
    # The planner's reserved rows are the expandable model: the peak rounded up to 20 MiB
    # pages plus one page, per phase.
    reserved = _rows(df, "reserved", "planner").set_index("case")["value"]
    total = _rows(df, "total", "planner").set_index("case")["value"]
    pages = (total * GIB / (20 * 2**20)).apply(math.ceil) + 1
    assert (reserved * GIB).round().astype(int).tolist() == (pages * 20 * 2**20).tolist()


def test_the_planner_follows_the_alloc_conf(memory_suite, monkeypatch):
    cfg = memory_suite.configurations(quick=True)[0]
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    device = torch.device("cuda")  # the planner's CUDA view; nothing touches a device
    native = memory_suite.planner_estimate(cfg, device)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    expandable = memory_suite.planner_estimate(cfg, device)
    assert (native.setup.allocator, expandable.setup.allocator) == ("native", "expandable")
    assert native.phase_peak_bytes == expandable.phase_peak_bytes  # allocated: the same
    assert memory_suite.planner_reserved_bytes(native) == native.reserved_peak_bytes
    assert memory_suite.planner_reserved_bytes(expandable) == expandable.reserved_peak_bytes


@pytest.fixture(scope="module")
def recheck_caps():
    return load_module(SUITES / "recheck_caps.py", "_test_recheck_caps")


def test_recheck_caps_agrees_with_every_h100_cap_check(recheck_caps, capsys):
    """The native rule against the 84 recorded outcomes of the H100 run (native allocator).
    The fragmentation allowance was fitted on these checks: this holds the fit, it does not
    validate it independently."""
    checks = recheck_caps.recheck(H100_REPORT / "results.csv")
    assert len(checks) == 84 and {c.allocator for c in checks} == {"native"}
    assert [c.case for c in checks if not c.agrees] == []
    assert sum(c.how == "run" for c in checks) >= 3  # real capped runs among them
    assert recheck_caps.main([str(H100_REPORT)]) == 0
    out = capsys.readouterr().out
    assert "84 of 84 agree (100.0%); optimistic (planner: fits, run: out of memory): 0" in out


def test_recheck_caps_flags_optimistic_verdicts(recheck_caps, capsys):
    # The expandable model (no fragmentation allowance) against runs made under the native
    # allocator says "fits" exactly where they ran out of memory: the script must say so.
    checks = recheck_caps.recheck(H100_REPORT / "results.csv", allocator="expandable")
    assert {c.case for c in checks if c.optimistic} == H100_NATIVE_MISSES
    assert all(c.agrees for c in checks if c.case not in H100_NATIVE_MISSES)
    assert recheck_caps.main([str(H100_REPORT), "--allocator", "expandable"]) == 1
    assert "optimistic (planner: fits, run: out of memory): 3" in capsys.readouterr().out
    assert recheck_caps.main([str(H100_REPORT / "nothing-here")]) == 2
