"""Timing: the median of repeats after warm-up, with its spread and how it was measured.

On CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed between repeats) is asked for
the median explicitly: its default return mode is the mean, which one slow outlier moves.
On CPU, ``time.perf_counter`` around each call, median of repeats; the result says so
(``method``), because CPU times (and the Triton interpreter's above all) say nothing about
GPU performance.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

METHOD_CUDA = "cuda-events (triton do_bench, median)"
METHOD_CPU = "cpu perf_counter (median)"


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int  # repeats the median is taken over (do_bench: its own count; -1 = unknown)
    method: str

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: the relative spread of the repeats."""
        return (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms > 0 else 0.0


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_cpu(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Median wall time of ``fn()`` on CPU over ``repeats`` calls after ``warmup`` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(max(warmup, 0)):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return Timing(
        median_ms=statistics.median(samples),
        p20_ms=_quantile(samples, 0.2),
        p80_ms=_quantile(samples, 0.8),
        repeats=repeats,
        method=METHOD_CPU,
    )


def time_cuda(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """Median of CUDA-event timings via ``triton.testing.do_bench`` (median asked for)."""
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(
        fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8], return_mode="median"
    )
    return Timing(
        median_ms=float(p50), p20_ms=float(p20), p80_ms=float(p80), repeats=-1, method=METHOD_CUDA
    )


def time_fn(
    fn: Callable[[], object],
    *,
    device: str | torch.device | None = None,
    quick: bool = False,
) -> Timing:
    """Time ``fn`` on ``device`` (default: CUDA when available): CUDA events on a GPU,
    perf_counter on CPU. ``quick`` shortens warm-up and repeats."""
    dev = torch.device(device) if device is not None else None
    use_cuda = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
    if use_cuda:
        return time_cuda(fn, warmup_ms=10 if quick else 25, rep_ms=30 if quick else 100)
    return time_cpu(fn, warmup=1, repeats=3 if quick else 10)
