"""Recompute the planner's per-phase estimates of a training report's trainer runs offline.

    python benchmarks/recheck_trainer_peaks.py reports/training/<run>/ [more runs ...]

For every ``hybrid_trainer`` phase row with a measured ``peak_allocated`` (GiB), the current
planner's estimate of that phase (``benchmarks.training.trainer_planner_estimate`` from the
configuration the row records: model, trainer config, state bits, checkpointed blocks) and the
error. Why: a report's own ``planner`` rows are those of the planner that ran with it; after a
planner change this says how the current one does on the same measurements, with no GPU.
Phase entries (``enter:<phase>``) and rollbacks have no estimate and are left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

if __package__ in (None, ""):  # run as a script: the repository root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def recheck(report: str | Path) -> pd.DataFrame:
    from benchmarks.training import model_config, size_for, trainer_planner_estimate
    from hybrid_triton.scheduler import TrainerConfig

    path = Path(report)
    df = pd.read_csv(path / "results.csv" if path.is_dir() else path)
    rows = df[
        df["case"].str.contains("hybrid_trainer")
        & (df["provider"] == "measured")
        & (df["metric"] == "peak_allocated")
    ]
    out = []
    for _, row in rows.iterrows():
        c = json.loads(row["config"])
        phase = c.get("phase", "")
        if phase not in ("warmup", "full", "predict", "correct"):
            continue
        size = size_for(False, c["model"])
        tcfg = TrainerConfig.from_dict(c["trainer_config"])
        est = trainer_planner_estimate(
            model_config(size, False), size, tcfg, c["state_bits"], c["checkpoint_blocks"]
        )
        planned = est.phases[phase].peak_bytes / 2**30
        out.append(
            {
                "case": row["case"],
                "planner_gib": round(planned, 3),
                "measured_gib": round(float(row["value"]), 3),
                "error_pct": round(100.0 * (planned / float(row["value"]) - 1.0), 2),
            }
        )
    return pd.DataFrame(out)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for report in argv:
        table = recheck(report)
        print(f"{report}: {len(table)} phase rows")
        print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
