"""Sweep of the RSSM rollout kernel's variants (issue 4): which one is fastest, and is it right.

For every variant of ``hybrid_triton.kernels.rssm.rollout.VARIANTS`` and every point below
(the target K=5, H=256, T=50, I=64, S=32, O=5, B=1, then T=1/10/200, H=64/1024, K=16):

1. compile and check: worker processes (one per variant, in parallel, so compiling costs one
   variant's time, not the sum) run the variant once per point and compare traj, mean and var
   with ``rssm_rollout_ref`` in float64; a variant that fails or hangs (a spin barrier that
   never opens) is reported and left out of the timing;
2. time, in this process: the direct call (reused workspace) and the ``RolloutGraph`` replay,
   each checked against the reference again, then ``triton.testing.do_bench`` median; beside
   them the batched torch rollout replayed from a CUDA graph (the issue's 10x baseline).

Prints a table (µs, graph replay / direct call; ``*`` marks the variant that ``variant=None``
runs at that point, ``default_variant(H)``) headed by the machine line, and optionally a
long-format CSV. GPU only (tests/test_rssm_sweep.py runs the check path on CPU through the
interpreter, at a tiny point). The run of 2026-11-24 on the H100 is in
reports/rssm/2026-11-24_sweep_h100/; the ``folded*`` variants (rollout_folded.py) came after
it, and the ``folded_inkernel*`` ones (the fold inside the launch) after the second run
(reports/rssm/2026-11-25_sweep_h100/).

Instead of the named points, ``--K``, ``--H`` and ``--T`` (comma lists; one left out takes the
target's value) sweep their grid, points named ``K5-H256-T50``. Usage::

    python benchmarks/sweep_rssm.py [--csv sweep.csv] [--variants a,b] [--points target,T1]
    python benchmarks/sweep_rssm.py --variants fused_volatile,folded,folded_w8 --csv f.csv
    python benchmarks/sweep_rssm.py --variants fused_volatile,folded_inkernel_w8 \
        --K 5 --H 256,512 --T 1,10,50,200 --csv grid.csv
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import csv
import multiprocessing
import os
import subprocess
import sys
import time

import torch

# (name, K, H, T); I, S, O, B are the target's.
POINTS = [
    ("target", 5, 256, 50),
    ("T1", 5, 256, 1),
    ("T10", 5, 256, 10),
    ("T200", 5, 256, 200),
    ("H64", 5, 64, 50),
    ("H512", 5, 512, 50),
    ("H1024", 5, 1024, 50),
    ("K16", 16, 256, 50),
]
DEVICE = "cuda"  # the smoke test of the check path sets "cpu" (the interpreter)
ATOL, RTOL = 1e-4, 1e-3  # as benchmarks/kernels_rssm.py's check (fp32 kernel vs float64 ref)


def _kernels_rssm():
    """benchmarks/kernels_rssm.py (inputs and the torch CUDA-graph baseline), imported by path
    so the script also runs as ``python benchmarks/sweep_rssm.py`` and in worker processes."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import kernels_rssm

    return kernels_rssm


def _problem(K: int, H: int):
    return _kernels_rssm().make_inputs(K, H, DEVICE)


def _reference(problem, T: int):
    from hybrid_triton.kernels.rssm import rssm_rollout_ref

    x0, h0, z0, weights, feedback = problem
    return rssm_rollout_ref(x0.double(), h0.double(), z0.double(), weights, feedback, T)


def _mismatch(result, expected) -> str | None:
    """None when every output matches the reference, else a one-line description."""
    for field in ("traj", "mean", "var"):
        got, want = getattr(result, field).double(), getattr(expected, field).double()
        try:
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        except AssertionError:
            err = (got - want).abs()
            err = err.nan_to_num(float("inf"))
            return f"{field}: max abs err {err.max().item():.3g}"
    return None


def grid_points(Ks: list[int], Hs: list[int], Ts: list[int]) -> list[tuple[str, int, int, int]]:
    """Every (K, H, T) of the grid as a point ``(name, K, H, T)``, named ``K5-H256-T50``."""
    return [(f"K{K}-H{H}-T{T}", K, H, T) for K in Ks for H in Hs for T in Ts]


def select_points(
    names: str | None,
    Ks: list[int] | None = None,
    Hs: list[int] | None = None,
    Ts: list[int] | None = None,
) -> list[tuple[str, int, int, int]]:
    """The points to sweep: the grid of ``Ks x Hs x Ts`` when any is given (one left out takes
    the target's value), else the named ``POINTS`` in ``names`` (comma list; None: all)."""
    if Ks or Hs or Ts:
        if names is not None:
            sys.exit("give either --points or a grid (--K/--H/--T), not both")
        _, K0, H0, T0 = POINTS[0]  # the target
        return grid_points(Ks or [K0], Hs or [H0], Ts or [T0])
    wanted = [p for p in (names or ",".join(p[0] for p in POINTS)).split(",") if p]
    missing = sorted(set(wanted) - {p[0] for p in POINTS})
    if missing:
        sys.exit(f"unknown points {missing}; known: {[p[0] for p in POINTS]}")
    return [p for p in POINTS if p[0] in wanted]


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,10,50; got {text!r}")
    return values


def _compile_and_check(
    variant: str,
    point_names: list[str],
    points: list[tuple[str, int, int, int]] | None = None,
) -> dict[str, str]:
    """Worker: run ``variant`` once per point (compiling it), check it; point -> 'ok' or why.
    ``points``: the sweep's points (default ``POINTS``; passed explicitly because a spawned
    worker sees only the module's defaults)."""
    from hybrid_triton.kernels.rssm.rollout import make_workspace, rssm_rollout

    verdicts = {}
    for name, K, H, T in POINTS if points is None else points:
        if name not in point_names:
            continue
        problem = _problem(K, H)
        try:
            workspace = make_workspace(K, 1, H, DEVICE)
            result = rssm_rollout(*problem, T, workspace=workspace, variant=variant)
            again = rssm_rollout(*problem, T, workspace=workspace, variant=variant)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            why = _mismatch(result, _reference(problem, T)) or _mismatch(again, result)
            verdicts[name] = why or "ok"
        except Exception as exc:  # a compile error must not stop the other variants
            verdicts[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return verdicts


def _machine_line() -> str:
    import triton

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        sha = "?"
    driver = ""
    with contextlib.suppress(OSError):
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split("\n")[0]
    return (
        f"{torch.cuda.get_device_name()} | driver {driver} | torch {torch.__version__} | "
        f"triton {triton.__version__} | git {sha}"
    )


def _torch_graph(problem, T: int):
    return _kernels_rssm().torch_graph_replay(problem, T)


def main() -> None:
    from hybrid_triton.kernels.rssm.rollout import (
        VARIANTS,
        RolloutGraph,
        default_variant,
        make_workspace,
        rssm_rollout,
    )
    from triton.testing import do_bench

    parser = argparse.ArgumentParser(description="RSSM rollout variant sweep (GPU)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--points", default=None, help="named points (default: all of POINTS)")
    grid_help = "comma list; with --H/--K/--T the sweep runs their grid instead of --points"
    parser.add_argument("--K", type=_int_list, default=None, help=f"members: {grid_help}")
    parser.add_argument("--H", type=_int_list, default=None, help=f"hidden sizes: {grid_help}")
    parser.add_argument("--T", type=_int_list, default=None, help=f"steps: {grid_help}")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--rep-ms", type=int, default=40, help="do_bench rep (ms)")
    parser.add_argument("--hang-s", type=float, default=60.0, help="compile+check time limit")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_rssm.py needs a CUDA GPU")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    points = select_points(args.points, args.K, args.H, args.T)
    point_names = [p[0] for p in points]
    start = time.perf_counter()
    print(_machine_line(), flush=True)

    # 1. Compile and check every variant in parallel (spawned processes: each its own context).
    verdicts: dict[str, dict[str, str]] = {}
    pool = futures.ProcessPoolExecutor(
        max_workers=len(variants), mp_context=multiprocessing.get_context("spawn")
    )
    jobs = {pool.submit(_compile_and_check, v, point_names, points): v for v in variants}
    done, pending = futures.wait(jobs, timeout=args.hang_s)
    for job in done:
        try:
            verdicts[jobs[job]] = job.result()
        except Exception as exc:
            verdicts[jobs[job]] = {p: f"worker died: {exc}" for p in point_names}
    for job in pending:
        verdicts[jobs[job]] = {p: f"no answer in {args.hang_s:.0f} s (hang?)" for p in point_names}
    for proc in list(getattr(pool, "_processes", {}).values()):
        if proc.is_alive() and pending:
            proc.kill()  # only our own workers: a hung persistent kernel dies with its context
    pool.shutdown(wait=not pending, cancel_futures=True)
    print(f"compiled and checked in {time.perf_counter() - start:.1f} s", flush=True)
    for v in variants:
        bad = {p: why for p, why in verdicts[v].items() if why != "ok"}
        if bad:
            print(f"  {v}: FAILED {bad}", flush=True)

    # 2. Time what passed, point by point, in this process. Each row goes to the CSV as soon
    # as it is timed, so a sweep cut by a time limit still leaves the rows it got.
    rows = []  # (point, provider, mode, median_us)
    machine = torch.cuda.get_device_name()
    shape = {name: (K, H, T) for name, K, H, T in points}

    def write_csv_row(fields: list, mode: str = "a") -> None:
        if args.csv:
            with open(args.csv, mode, newline="") as f:
                csv.writer(f).writerow(fields)

    write_csv_row(["point", "provider", "mode", "median_us", "machine", "K", "H", "T"], "w")

    def record(point: str, provider: str, mode: str, us: float) -> None:
        rows.append((point, provider, mode, us))
        write_csv_row([point, provider, mode, f"{us:.2f}", machine, *shape[point]])

    for name, K, H, T in points:
        problem = _problem(K, H)
        expected = _reference(problem, T)
        baseline = _torch_graph(problem, T)
        record(
            name,
            "torch_cuda_graph",
            "graph",
            do_bench(baseline, warmup=10, rep=args.rep_ms, return_mode="median") * 1e3,
        )
        for v in variants:
            if verdicts[v].get(name) != "ok":
                continue
            workspace = make_workspace(K, 1, H, "cuda")

            def direct(v=v, workspace=workspace, problem=problem, T=T):
                return rssm_rollout(*problem, T, workspace=workspace, variant=v)

            replay = RolloutGraph(*problem, T, variant=v)
            why = _mismatch(direct(), expected) or _mismatch(replay.replay(), expected)
            if why is not None:
                verdicts[v][name] = why
                print(f"  {v} @ {name}: FAILED in the timing process: {why}", flush=True)
                continue
            for mode, fn in (("graph", replay.replay), ("direct", direct)):
                us = do_bench(fn, warmup=10, rep=args.rep_ms, return_mode="median") * 1e3
                record(name, v, mode, us)
        print(f"timed {name} ({time.perf_counter() - start:.1f} s)", flush=True)

    # 3. Table: one row per provider, one column per point, "graph / direct" in µs.
    cell = {(p, prov, mode): us for p, prov, mode, us in rows}
    cols = point_names
    default_at = {p: default_variant(H) for p, _, H, _ in points}
    head = f"{'variant (graph / direct, us)':30s}" + "".join(f"{c:>19s}" for c in cols)
    print()
    print(head)
    print("-" * len(head))
    for prov in ["torch_cuda_graph", *variants]:
        line = f"{prov:30s}"
        for c in cols:
            g, d = cell.get((c, prov, "graph")), cell.get((c, prov, "direct"))
            if g is None and d is None:
                text = "FAIL" if prov != "torch_cuda_graph" else "-"
            elif d is None:
                text = f"{g:.1f}"
            else:
                text = f"{g:.1f} / {d:.1f}"
            if prov == default_at[c]:
                text += " *"
            line += f"{text:>19s}"
        print(line)
    print("* the default at that point: default_variant(H), what variant=None runs")
    for c in cols:
        timed = [(cell[(c, v, "graph")], v) for v in variants if (c, v, "graph") in cell]
        if timed:
            best_us, best = min(timed)
            base = cell.get((c, "torch_cuda_graph", "graph"))
            ratio = f", {base / best_us:.1f}x the torch CUDA graph" if base else ""
            print(f"fastest at {c}: {best} {best_us:.1f} us (graph replay){ratio}")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
