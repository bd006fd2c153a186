"""The ``kernels`` suite: every kernel against the copy ceiling and PyTorch's own paths.

Discovers every ``benchmarks/kernels_<family>.py`` module, asks it for its cases
(``cases(quick) -> list[KernelCase]``), and for each case, one at a time:

1. measures the copy ceiling ``y.copy_(x)`` on fp32 tensors of the case's ``numel`` in this
   same run (bandwidth cases; cached per size, its tensors freed before the case starts);
2. calls ``setup()`` (the only moment the case's tensors exist), runs ``check`` (accuracy
   first: a mismatch is recorded as an error and the case is not timed);
3. times every provider (median of repeats: CUDA events on a GPU, perf_counter on CPU);
4. records time, GB/s from ``bytes_moved``, % of the copy rate, and the speedup of
   ``hybrid_triton`` over each other provider;
5. drops the case's tensors before the next one.

A module that fails to import, a ``cases`` that raises, a provider that fails or runs out
of memory: each becomes a ``status`` row and the suite goes on.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from pathlib import Path

import pandas as pd
import torch

from hybrid_triton.bench.kernel_case import KernelCase
from hybrid_triton.bench.probes import free_device_memory, is_oom
from hybrid_triton.bench.results import STATUS_ERROR, STATUS_OK, STATUS_OOM
from hybrid_triton.bench.runner import SuiteContext, load_module
from hybrid_triton.bench.timing import Timing, time_fn

OURS = "hybrid_triton"
COPY_PROVIDER = "torch_copy"


def case_label(case: KernelCase) -> str:
    return f"{case.family}/{case.name} [{case.size_label}]"


def discover(folder: Path) -> list[tuple[str, object]]:
    """``(family module name, module or the exception that stopped its import)``."""
    found: list[tuple[str, object]] = []
    for path in sorted(folder.glob("kernels_*.py")):
        try:
            found.append((path.stem, load_module(path, f"benchmarks.{path.stem}")))
        except Exception as err:
            found.append((path.stem, err))
    return found


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _impl_path(device: torch.device) -> str:
    from hybrid_triton.kernels._dispatch import impl_for_device

    try:
        return impl_for_device(device)
    except RuntimeError as err:
        return f"error: {err}"


class CopyCeiling:
    """The measured ``y.copy_(x)`` time per size, in this run (fp32, read + write counted).
    Cached per numel; its tensors are freed before the case's own are allocated."""

    def __init__(self, ctx: SuiteContext):
        self.ctx = ctx
        self.cache: dict[int, Timing | BaseException] = {}

    def measure(self, numel: int) -> Timing | BaseException:
        if numel not in self.cache:
            self.cache[numel] = self._measure(numel)
        return self.cache[numel]

    def _measure(self, numel: int) -> Timing | BaseException:
        try:
            return _time_copy(numel, self.ctx.device, self.ctx.quick)
        except Exception as err:
            return err
        finally:
            free_device_memory()


def _time_copy(numel: int, device: torch.device, quick: bool) -> Timing:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device=device, quick=quick)


def run_case(ctx: SuiteContext, case: KernelCase, ceiling: CopyCeiling) -> None:
    rec = ctx.recorder
    label = case_label(case)
    config = {
        **case.config,
        "family": case.family,
        "numel": case.numel,
        "bytes_moved": case.bytes_moved,
        "size": case.size_label,
        "kind": case.metric,
        "impl": _impl_path(ctx.device),
    }
    bandwidth = case.metric == "bandwidth" and case.bytes_moved > 0
    copy_gbps = None
    if bandwidth and case.numel > 0:
        copy = ceiling.measure(case.numel)
        if isinstance(copy, BaseException):
            status = STATUS_OOM if is_oom(copy) else STATUS_ERROR
            rec.status(label, COPY_PROVIDER, status, config=config, message=_short(copy))
        else:
            copy_gbps = 2 * 4 * case.numel / (copy.median_ms * 1e-3) / 1e9
            rec.add(label, COPY_PROVIDER, "time_ms", "ms", copy.median_ms, config=config,
                    note=copy.method)  # fmt: skip
            rec.add(label, COPY_PROVIDER, "copy_gbps", "GB/s", copy_gbps, config=config,
                    note="y.copy_(x) on fp32 tensors of the case's numel, same run")  # fmt: skip
    run = None
    try:
        run = case.setup()
        if OURS not in run.providers:
            rec.status(label, OURS, STATUS_ERROR, config=config,
                       message="the case has no 'hybrid_triton' provider")  # fmt: skip
        if run.check is not None:
            run.check()
    except Exception as err:
        status = STATUS_OOM if is_oom(err) else STATUS_ERROR
        stage = "check failed" if run is not None else "setup failed"
        rec.status(label, "-", status, config=config, message=f"{stage}: {_short(err)}")
        run = None
        free_device_memory()
        return
    rec.status(label, "-", STATUS_OK, config=config, message="accuracy check passed"
               if run.check is not None else "no accuracy check in this case")  # fmt: skip

    times: dict[str, float] = {}
    for provider, fn in run.providers.items():
        try:
            timing = time_fn(fn, device=ctx.device, quick=ctx.quick)
        except Exception as err:
            status = STATUS_OOM if is_oom(err) else STATUS_ERROR
            rec.status(label, provider, status, config=config, message=_short(err))
            if status == STATUS_OOM:
                free_device_memory()
            continue
        times[provider] = timing.median_ms
        rec.add(label, provider, "time_ms", "ms", timing.median_ms, config=config,
                note=timing.method)  # fmt: skip
        rec.add(label, provider, "time_p20_ms", "ms", timing.p20_ms, config=config)
        rec.add(label, provider, "time_p80_ms", "ms", timing.p80_ms, config=config)
        if bandwidth and timing.median_ms > 0:
            gbps = case.bytes_moved / (timing.median_ms * 1e-3) / 1e9
            rec.add(label, provider, "gbps", "GB/s", gbps, config=config)
            if copy_gbps:
                rec.add(label, provider, "pct_of_copy", "%", 100.0 * gbps / copy_gbps,
                        config=config)  # fmt: skip
    ours = times.get(OURS)
    if ours and ours > 0:
        for provider, t in times.items():
            if provider != OURS:
                rec.add(label, OURS, f"speedup_vs_{provider}", "x", t / ours, config=config)
    run = None
    gc.collect()
    free_device_memory()


def run(ctx: SuiteContext) -> None:
    cases: list[KernelCase] = []
    for family, module in discover(ctx.suites_dir):
        if isinstance(module, BaseException):
            ctx.recorder.status(family, "-", STATUS_ERROR,
                                message=f"import failed: {_short(module)}")  # fmt: skip
            continue
        make = getattr(module, "cases", None)
        if make is None:
            ctx.recorder.status(family, "-", STATUS_ERROR,
                                message="module has no cases(quick) function")  # fmt: skip
            continue
        try:
            family_cases = list(make(ctx.quick))
        except Exception as err:
            ctx.log(traceback.format_exc())
            ctx.recorder.status(family, "-", STATUS_ERROR, message=f"cases() failed: {_short(err)}")
            continue
        cases += [c for c in family_cases if ctx.selected(case_label(c))]
    ceiling = CopyCeiling(ctx)
    bar = ctx.bar(cases, total=len(cases), desc="kernels")
    for case in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(case_label(case))
        t0 = time.perf_counter()
        try:
            run_case(ctx, case, ceiling)
        except Exception as err:  # a bug in the case itself: record it and go on
            ctx.recorder.status(case_label(case), "-", STATUS_ERROR, message=_short(err))
            free_device_memory()
        _checkpoint_rows(ctx, case, time.perf_counter() - t0)


def _checkpoint_rows(ctx: SuiteContext, case: KernelCase, seconds: float) -> None:
    """One progress line per case; with ``HYBRID_TRITON_PARTIAL_CSV`` set, also the rows so
    far, so a run stopped by a time limit still leaves its finished cases behind (the report
    itself is only ever written whole)."""
    print(f"[kernels] {case_label(case)}: done in {seconds:.1f} s", file=sys.stderr, flush=True)
    partial = os.environ.get("HYBRID_TRITON_PARTIAL_CSV")
    if partial:
        tmp = f"{partial}.tmp"
        ctx.recorder.frame().to_csv(tmp, index=False)
        os.replace(tmp, partial)


def summary(df: pd.DataFrame) -> str:
    """A short table: median ms, GB/s and % of copy per case and provider."""
    rows = df[df["metric"].isin(["time_ms", "gbps", "pct_of_copy"])]
    rows = rows[rows["provider"] != COPY_PROVIDER]
    if rows.empty:
        return "(no kernel timings)"
    wide = rows.pivot_table(
        index=["case", "provider"], columns="metric", values="value", sort=False
    ).reset_index()
    for col in ("time_ms", "gbps", "pct_of_copy"):
        if col not in wide:
            wide[col] = float("nan")
    speed = df[df["metric"].str.startswith("speedup_vs_")]
    lines = [f"{'case':<52} {'provider':<18} {'ms':>10} {'GB/s':>9} {'%copy':>6}"]
    for r in wide.itertuples(index=False):
        lines.append(
            f"{r.case[:52]:<52} {r.provider[:18]:<18} {r.time_ms:>10.4g} "
            f"{r.gbps:>9.1f} {r.pct_of_copy:>6.1f}"
        )
    for r in speed.itertuples(index=False):
        lines.append(f"{r.case[:52]:<52} {r.metric:<30} {r.value:>7.3g}x")
    return "\n".join(lines)


if __name__ == "__main__":
    from hybrid_triton.bench.cli import main

    sys.exit(main(["kernels", *sys.argv[1:]]))
