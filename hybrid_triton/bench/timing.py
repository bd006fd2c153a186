"""Timing: the median of repeats after warm-up, with its spread and how it was measured.

On CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed between repeats) is asked for
the median explicitly: its default return mode is the mean, which one slow outlier moves.
On CPU, ``time.perf_counter`` around each call, median of repeats; the result says so
(``method``), because CPU times (and the Triton interpreter's above all) say nothing about
GPU performance.

``run_paired_blocks`` and ``paired_overhead`` measure a small cost on top of a noisy one
(e.g. a memory probe around every training step): alternating blocks with and without it,
the median of the paired differences and a distribution-free confidence interval.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
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


# ----------------------------------------------------------------------------- paired blocks


@dataclass(frozen=True)
class PairedOverhead:
    """The cost of a treatment (e.g. a probe around every step) from paired blocks.

    ``median_pct``: the median over pairs of (treated - baseline) / baseline, in %;
    ``ci_low_pct``, ``ci_high_pct``: a distribution-free confidence interval of that median
    (order statistics of the paired differences), at ``confidence`` (the level reached with
    this many pairs, at least the one asked for when there are enough pairs);
    ``baseline_spread_pct``: (p80 - p20) / median of the baseline blocks, in %: how much
    the step time itself moves from block to block.
    """

    median_pct: float
    ci_low_pct: float
    ci_high_pct: float
    confidence: float
    pairs: int
    baseline_ms: float  # median of the baseline blocks
    treated_ms: float  # median of the treated blocks
    baseline_spread_pct: float


def block_order(pairs: int, modes: tuple[str, str] = ("baseline", "treated")) -> list[str]:
    """The order of ``2 * pairs`` blocks: A B, B A, A B, ... (each pair swaps which mode runs
    first, so a linear drift of the clock or the temperature adds to half of the paired
    differences and subtracts from the other half)."""
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    a, b = modes
    order: list[str] = []
    for i in range(pairs):
        order += [a, b] if i % 2 == 0 else [b, a]
    return order


def run_paired_blocks(
    run_block: Callable[[str], float],
    pairs: int,
    modes: tuple[str, str] = ("baseline", "treated"),
) -> dict[str, list[float]]:
    """Call ``run_block(mode)`` (it returns the block's time) in ``block_order``; returns
    each mode's times in pair order (``times[a][i]`` and ``times[b][i]`` form pair ``i``)."""
    times: dict[str, list[float]] = {m: [] for m in modes}
    for mode in block_order(pairs, modes):
        times[mode].append(float(run_block(mode)))
    return times


def _median_ci(sorted_values: list[float], confidence: float) -> tuple[float, float, float]:
    """Order-statistic interval [x_(k), x_(n+1-k)] for the median: the largest k whose
    coverage 1 - 2 P(Binomial(n, 1/2) < k) is at least ``confidence``; with too few values
    for that, the full range and its (lower) coverage."""
    n = len(sorted_values)

    def coverage(k: int) -> float:
        below = sum(math.comb(n, i) for i in range(k)) / 2**n
        return 1.0 - 2.0 * below

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return sorted_values[k - 1], sorted_values[n - k], coverage(k)


def paired_overhead(
    baseline_ms: Sequence[float], treated_ms: Sequence[float], confidence: float = 0.95
) -> PairedOverhead:
    """Median and confidence interval of the paired relative differences (see
    ``PairedOverhead``). ``baseline_ms[i]`` and ``treated_ms[i]`` are pair ``i``."""
    if len(baseline_ms) != len(treated_ms):
        raise ValueError(
            f"paired blocks need as many baseline as treated times, got {len(baseline_ms)} "
            f"and {len(treated_ms)}"
        )
    if not baseline_ms:
        raise ValueError("paired_overhead needs at least one pair of blocks")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if any(not (b > 0) or not math.isfinite(b) for b in baseline_ms) or any(
        not math.isfinite(t) for t in treated_ms
    ):
        raise ValueError("block times must be finite and the baseline's positive")
    diffs = sorted(100.0 * (t - b) / b for b, t in zip(baseline_ms, treated_ms))
    low, high, reached = _median_ci(diffs, confidence)
    base_sorted = sorted(baseline_ms)
    base_median = statistics.median(base_sorted)
    spread = 100.0 * (_quantile(base_sorted, 0.8) - _quantile(base_sorted, 0.2)) / base_median
    return PairedOverhead(
        median_pct=statistics.median(diffs),
        ci_low_pct=low,
        ci_high_pct=high,
        confidence=reached,
        pairs=len(diffs),
        baseline_ms=base_median,
        treated_ms=statistics.median(treated_ms),
        baseline_spread_pct=spread,
    )
