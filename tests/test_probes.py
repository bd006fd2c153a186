"""The probe's per-phase cost on CUDA (counted with a fake allocator: no GPU needed), the run
peaks, memory caps, and the paired-block timing the probe-overhead case relies on."""

from __future__ import annotations

import math
import types

import pytest
import torch

from hybrid_triton.bench import probes
from hybrid_triton.bench.probes import MemoryProbe, memory_cap, parse_memory_caps
from hybrid_triton.bench.timing import (
    block_order,
    paired_overhead,
    run_paired_blocks,
)

GIB = 2**30

# ----------------------------------------------------------------------------- fake allocator


def _counters(current: int, peak: int, reserved_peak: int, retries: int = 0, ooms: int = 0):
    def stat(cur: int, pk: int) -> dict:
        return {"all": {"current": cur, "peak": pk, "allocated": 0, "freed": 0}}

    return {
        "allocated_bytes": stat(current, peak),
        "reserved_bytes": stat(reserved_peak, reserved_peak),
        "inactive_split_bytes": stat(0, 7),
        "num_alloc_retries": retries,
        "num_ooms": ooms,
    }


class FakeAllocator:
    """Counts every call the probe makes into torch.cuda; the slow or syncing ones fail."""

    def __init__(self, monkeypatch, readings: list[dict]):
        self.readings = list(readings)
        self.reads = 0
        self.resets = 0
        self.nvml = 0
        monkeypatch.setattr(probes, "_allocator_counters", self._read)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self._reset)
        monkeypatch.setattr(probes, "_nvml_used", self._nvml)
        monkeypatch.setattr(torch.cuda, "init", lambda: None)

        def forbidden(name):
            def call(*args, **kwargs):
                raise AssertionError(f"the probe called torch.cuda.{name} inside a phase")

            return call

        # Each of these flattens ~250 counters in Python, or waits for the GPU.
        for name in ("memory_stats", "memory_allocated", "max_memory_allocated",
                     "max_memory_reserved", "synchronize"):  # fmt: skip
            monkeypatch.setattr(torch.cuda, name, forbidden(name))

    def _read(self, device):
        assert device == torch.device("cuda", 0)
        self.reads += 1
        return self.readings.pop(0)

    def _reset(self, device=None):
        self.resets += 1

    def _nvml(self, index=0):
        self.nvml += 1
        return 5 * GIB


def test_cuda_phase_reads_the_allocator_once_per_edge_and_never_syncs(monkeypatch):
    start = _counters(current=100, peak=100, reserved_peak=200, retries=1)
    end = _counters(current=120, peak=900, reserved_peak=1000, retries=3, ooms=0)
    fake = FakeAllocator(monkeypatch, [start, end])
    probe = MemoryProbe("cuda:0")
    with probe.phase("full"):
        pass
    assert (fake.reads, fake.resets, fake.nvml) == (2, 1, 0)
    r = probe.results["full"]
    assert (r.peak_allocated, r.peak_reserved) == (900, 1000)
    assert (r.allocated_at_start, r.allocated_at_end) == (100, 120)
    assert (r.inactive_split_peak, r.alloc_retries, r.num_ooms) == (7, 2, 0)
    assert r.device_used is None
    rows = {m: (v, n) for m, _, v, n in r.as_metrics()}
    assert rows["device_used"][0] is None and "device_level=False" in rows["device_used"][1]


def test_device_level_probe_adds_one_nvml_query_per_phase(monkeypatch):
    c = _counters(0, 0, 0)
    fake = FakeAllocator(monkeypatch, [c] * 4)
    probe = MemoryProbe("cuda:0", device_level=True)
    for name in ("a", "b"):
        with probe.phase(name):
            pass
    assert (fake.reads, fake.resets, fake.nvml) == (4, 2, 2)
    assert probe.results["b"].device_used == 5 * GIB
    rows = {m: n for m, _, _, n in probe.results["b"].as_metrics()}
    assert rows["device_used"] == "nvml"


def test_run_peaks_survive_the_phase_resets(monkeypatch):
    # Before phase 1 the run had peaked at 50 (model build, a warm-up step outside phases);
    # phase 1 peaks at 30; between the phases something peaks at 70; phase 2 peaks at 40.
    readings = [
        _counters(10, 50, 60),  # phase 1 start: the peak since start_run
        _counters(10, 30, 35),  # phase 1 end
        _counters(10, 70, 80),  # phase 2 start: what happened between the phases
        _counters(10, 40, 45),  # phase 2 end
        _counters(10, 20, 45),  # run_peaks(): after phase 2
    ]
    fake = FakeAllocator(monkeypatch, readings)
    probe = MemoryProbe("cuda:0")
    probe.start_run()
    for name in ("one", "two"):
        with probe.phase(name):
            pass
    assert probe.run_peaks() == (70, 80)
    assert [probe.results[n].peak_allocated for n in ("one", "two")] == [30, 40]
    assert fake.resets == 3  # start_run + one per phase


def test_cpu_run_peak_is_the_highest_phase():
    probe = MemoryProbe("cpu")
    probe.start_run()
    with probe.phase("a", resident=()):
        x = torch.zeros(1024)
        del x
    with probe.phase("b", resident=()):
        y = torch.zeros(256)
        del y
    assert probe.run_peaks() == (4096, None)


# ----------------------------------------------------------------------------- memory caps


def test_parse_memory_caps():
    assert parse_memory_caps("8,16,24") == (8.0, 16.0, 24.0)
    assert parse_memory_caps(" 24, 8 ,8") == (8.0, 24.0)
    assert parse_memory_caps("12.5") == (12.5,)
    for bad in ("8,x", "0", "-4", "nan", "inf", ""):
        with pytest.raises(ValueError, match="GiB"):
            parse_memory_caps(bad)


def test_memory_cap_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine can cap")
    with pytest.raises(RuntimeError, match="needs a CUDA device"), memory_cap(8):
        pass


def test_memory_cap_restores_the_fraction_after_an_oom(monkeypatch):
    fractions: list[float] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d=0: 1.0,
                        raising=False)  # fmt: skip
    props = types.SimpleNamespace(total_memory=80 * GIB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=0: props)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, d=0: fractions.append(f))  # fmt: skip
    with pytest.raises(torch.OutOfMemoryError), memory_cap(16) as fraction:
        assert fraction == pytest.approx(0.2)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    assert fractions == [pytest.approx(0.2), 1.0]
    with memory_cap(200):  # more than the device: the whole device
        pass
    assert fractions[-2:] == [1.0, 1.0]
    with pytest.raises(ValueError, match="positive"), memory_cap(0):
        pass


# ----------------------------------------------------------------------------- paired blocks


def test_block_order_alternates_within_pairs():
    assert block_order(4, ("a", "b")) == ["a", "b", "b", "a", "a", "b", "b", "a"]
    with pytest.raises(ValueError, match="pairs"):
        block_order(0)


def test_paired_blocks_cancel_a_linear_drift():
    # Every block is slower than the one before by 1 ms (clocks, heat); the treatment costs
    # 0.5 ms on 100 ms. Alternating the order within pairs cancels the drift in the median;
    # running "baseline, treated" every time would report 1.5 ms.
    clock = {"t": 0}

    def run_block(mode: str) -> float:
        clock["t"] += 1
        return 100.0 + 1.0 * clock["t"] + (0.5 if mode == "treated" else 0.0)

    times = run_paired_blocks(run_block, pairs=10)
    assert len(times["baseline"]) == len(times["treated"]) == 10
    result = paired_overhead(times["baseline"], times["treated"])
    # 0.5 ms on blocks of 101 to 120 ms: 0.42% to 0.50%.
    assert 0.40 < result.median_pct < 0.52
    assert result.ci_low_pct < result.median_pct < result.ci_high_pct
    assert result.pairs == 10 and result.confidence >= 0.95
    naive = [100.0 + 2 * i + 1 for i in range(10)], [100.0 + 2 * i + 2.5 for i in range(10)]
    assert paired_overhead(*naive).median_pct > 1.2  # what the alternation removes


def test_median_interval_is_the_order_statistic_one():
    # n = 12: the 95% interval of the median is [x(3), x(10)] (coverage 1 - 2 * 79/4096).
    base = [100.0] * 12
    treated = [100.0 + d for d in (5, 1, 12, 3, 8, 2, 11, 4, 10, 6, 9, 7)]
    result = paired_overhead(base, treated)
    assert result.median_pct == pytest.approx(6.5)
    assert (result.ci_low_pct, result.ci_high_pct) == (pytest.approx(3.0), pytest.approx(10.0))
    assert result.confidence == pytest.approx(1 - 2 * 79 / 4096)
    assert result.baseline_spread_pct == 0.0
    # Too few pairs for 95%: the full range, at the coverage it has.
    few = paired_overhead([10.0, 10.0, 10.0], [11.0, 10.0, 12.0])
    assert (few.ci_low_pct, few.ci_high_pct) == (pytest.approx(0.0), pytest.approx(20.0))
    assert few.confidence == pytest.approx(0.75)


def test_paired_overhead_rejects_bad_input():
    with pytest.raises(ValueError, match="as many"):
        paired_overhead([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        paired_overhead([], [])
    with pytest.raises(ValueError, match="positive"):
        paired_overhead([0.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        paired_overhead([1.0], [math.nan])
    with pytest.raises(ValueError, match="confidence"):
        paired_overhead([1.0], [1.0], confidence=1.0)


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_gpu_probe_measures_a_known_allocation_and_the_run_peak():
    mib = 2**20
    probe = MemoryProbe("cuda")
    probe.start_run()
    spike = torch.empty(96 * mib, dtype=torch.uint8, device="cuda")  # before any phase
    del spike
    with probe.phase("full"):
        kept = torch.empty(64 * mib, dtype=torch.uint8, device="cuda")
        tmp = torch.empty(32 * mib, dtype=torch.uint8, device="cuda")
        del tmp
    r = probe.results["full"]
    assert r.peak_allocated - r.allocated_at_start == 96 * mib
    assert r.allocated_at_end - r.allocated_at_start == 64 * mib
    assert r.peak_reserved >= r.peak_allocated and r.device_used is None
    allocated, reserved = probe.run_peaks()
    assert allocated >= r.allocated_at_start + 96 * mib and reserved >= allocated
    del kept


@pytest.mark.gpu
def test_gpu_cap_turns_a_fitting_allocation_into_an_oom_and_lifts():
    probes.free_device_memory()
    with pytest.raises(torch.OutOfMemoryError), memory_cap(1):
        torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
    probes.free_device_memory()
    x = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")  # the cap is gone
    del x
    probes.free_device_memory()


@pytest.mark.gpu
def test_gpu_probe_phase_host_cost_is_small_against_a_step():
    # A loose sanity bound, not a figure: a phase is two counter reads and a reset, far below
    # a millisecond; the training suite measures the real overhead on a step.
    import time

    probe = MemoryProbe("cuda")
    torch.empty(1, device="cuda")
    samples = []
    for _ in range(200):
        t0 = time.perf_counter()
        with probe.phase("empty"):
            pass
        samples.append(time.perf_counter() - t0)
    samples.sort()
    assert samples[100] < 1e-3


def test_live_tensor_bytes_skips_fake_tensors_left_alive():
    """torch.compile's caches keep fake tensors alive in the process (their storages refuse
    a data pointer); a memory probe scanning live tensors must not fail on them."""
    from hybrid_triton.bench.probes import live_tensor_bytes

    compiled = torch.compile(lambda x: x * 2, fullgraph=True, backend="aot_eager")
    compiled(torch.randn(8))
    kept = torch.ones(1000)  # a real tensor: counted
    try:
        assert live_tensor_bytes("cpu") >= kept.numel() * 4
    finally:
        torch._dynamo.reset()
