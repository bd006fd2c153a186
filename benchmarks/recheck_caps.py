"""Recheck a memory report's cap checks against the current planner, offline (no GPU).

    python benchmarks/recheck_caps.py reports/memory/2026-11-24_223017_nvidia-h100-80gb-hbm3

For every recorded outcome of a run under a memory cap (``measured`` / ``fits_cap`` rows with
a value: 1 ran, 0 out of memory; ``derived`` or ``run``, see
``benchmarks.memory.derived_cap_verdict``), the planner's estimate of the same configuration
is recomputed with the allocator the run used (the row's ``allocator``; reports written before
the field existed ran under PyTorch's default, "native", which is what their rows assume) or
with ``--allocator``. Its verdict (estimated reserved peak <= cap) is compared with the
outcome; the script prints one line per check and the agreement, and counts the optimistic
misses apart (the planner said "fits" and the run ran out of memory: the error a user pays
for). Exit status 1 when a check is optimistic, so a test or CI can hold the line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

if __package__ in (None, ""):  # run as a file (python benchmarks/recheck_caps.py): repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory import MemoryConfig, planner_estimate
from hybrid_triton.planner.setup import ALLOCATORS

GIB = 2**30
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")


@dataclass(frozen=True)
class CapCheck:
    case: str
    allocator: str
    cap_gib: float
    ran: bool  # what happened
    how: str  # "derived" or "run"
    planned: bool  # the planner's verdict now
    reserved_gib: float  # the planner's estimated reserved peak now

    @property
    def agrees(self) -> bool:
        return self.ran == self.planned

    @property
    def optimistic(self) -> bool:
        return self.planned and not self.ran


def _config(row_config: str) -> tuple[MemoryConfig, dict]:
    c = json.loads(row_config)
    cfg = MemoryConfig(
        c["model"],
        tuple((f, c[f]) for f in MODEL_FIELDS),
        c["setup"],
        c["state_bits"],
        c["checkpointing"],
        c["micro_batch"],
        c["seq_len"],
        c.get("grad_path", "hooks"),  # reports before the field ran the trainer with hooks
    )
    return cfg, c


def recheck(results_csv: str | Path, allocator: str | None = None) -> list[CapCheck]:
    """The report's cap checks with the current planner's verdicts. ``allocator``: None = the
    one each row records ("native" when it records none)."""
    df = pd.read_csv(results_csv)
    rows = df[(df["provider"] == "measured") & (df["metric"] == "fits_cap")]
    rows = rows[rows["value"].notna()]
    device = torch.device("cuda")  # the planner's CUDA view (no device is touched)
    estimates = {}
    checks = []
    for _, row in rows.iterrows():
        cfg, c = _config(row["config"])
        alloc = allocator or c.get("allocator", "native")
        key = (cfg, alloc)
        if key not in estimates:
            estimates[key] = planner_estimate(cfg, device, alloc)
        reserved = estimates[key].reserved_peak_bytes
        cap = float(c["cap_gib"])
        checks.append(
            CapCheck(
                case=row["case"],
                allocator=alloc,
                cap_gib=cap,
                ran=bool(row["value"]),
                how=c.get("how", ""),
                planned=reserved <= int(cap * GIB),
                reserved_gib=reserved / GIB,
            )
        )
    return checks


def summary(checks: list[CapCheck]) -> str:
    agree = sum(c.agrees for c in checks)
    optimistic = sum(c.optimistic for c in checks)
    pct = 100.0 * agree / len(checks) if checks else math.nan
    return (
        f"{agree} of {len(checks)} agree ({pct:.1f}%); optimistic (planner: fits, run: out of "
        f"memory): {optimistic}; pessimistic (planner: no, run: ran): "
        f"{len(checks) - agree - optimistic}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/recheck_caps.py", description=__doc__)
    p.add_argument("report", help="a memory report folder (or its results.csv)")
    p.add_argument("--allocator", choices=ALLOCATORS, help="override the rows' allocator")
    args = p.parse_args(argv)
    path = Path(args.report)
    csv = path / "results.csv" if path.is_dir() else path
    if not csv.is_file():
        print(f"recheck_caps: no results.csv at {path}", file=sys.stderr)
        return 2
    checks = recheck(csv, args.allocator)
    if not checks:
        print(f"recheck_caps: {csv} has no recorded cap outcomes (fits_cap rows)")
        return 2
    print(f"{'configuration [cap]':<58} {'alloc':>10} {'ran':>4} {'how':>8} {'est GiB':>8} "
          f"{'planner':>7} {'agree':>5}")  # fmt: skip
    for c in checks:
        verdict = "fits" if c.planned else "no"
        agree = "yes" if c.agrees else ("OPTIM" if c.optimistic else "pess")
        print(f"{c.case[:58]:<58} {c.allocator:>10} {'yes' if c.ran else 'oom':>4} "
              f"{c.how:>8} {c.reserved_gib:>8.3f} {verdict:>7} {agree:>5}")  # fmt: skip
    print(summary(checks))
    return 1 if any(c.optimistic for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
