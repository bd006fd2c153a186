"""Record a real (small) training run, then replay it through DynamicsModel.

``record``: a character-level MLP language model trained on the Python standard library's own
source files (real text that every Python install has), AdamW, a few hundred steps on CPU.
Each step writes the stats the trainer would give ``DynamicsModel.observe``: loss, gradient
norm, the update norm of each parameter group (embedding, hidden, output), lr, step, and an
optimizer summary (mean of sqrt(v)). Output: a small CSV (``benchmarks/data/``).

``evaluate``: feeds the CSV to ``DynamicsModel.observe`` step by step (prequential: every
forecast is scored on steps the model had not yet trained on) and prints the mean relative
loss error at each lead 1..T, next to persistence (next loss = last loss) on the same steps.

    python benchmarks/dynamics_replay.py record
    python benchmarks/dynamics_replay.py evaluate [--hidden 256 --ensemble 5 --horizon 10]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn

DATA = Path(__file__).parent / "data" / "rssm_run_charmlp.csv"
SOURCES = ["argparse.py", "collections/__init__.py", "json/decoder.py", "textwrap.py", "string.py"]


def _text() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((stdlib / name).read_text(encoding="utf-8") for name in SOURCES)


class CharMLP(nn.Module):
    def __init__(self, vocab: int, context: int = 16, embed: int = 24, hidden: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.hidden = nn.Sequential(
            nn.Linear(context * embed, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()
        )
        self.out = nn.Linear(hidden, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.embed(idx).flatten(1)))


def record(steps: int = 400, batch: int = 64, context: int = 16, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    text = _text()
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    model = CharMLP(len(vocab), context)
    groups = {
        "embed": list(model.embed.parameters()),
        "hidden": list(model.hidden.parameters()),
        "out": list(model.out.parameters()),
    }
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    DATA.parent.mkdir(parents=True, exist_ok=True)
    with DATA.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["step", "loss", "grad_norm", "lr", "opt_rms_v", *(f"upd_{g}" for g in groups)]
        )
        for step in range(steps):
            starts = torch.randint(0, data.numel() - context - 1, (batch,))
            idx = torch.stack([data[s : s + context] for s in starts])
            target = data[starts + context]
            loss = nn.functional.cross_entropy(model(idx), target)
            opt.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
            before = {g: [p.detach().clone() for p in ps] for g, ps in groups.items()}
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            upd = [
                torch.sqrt(
                    sum(((p.detach() - b) ** 2).sum() for p, b in zip(ps, before[g], strict=True))
                ).item()
                for g, ps in groups.items()
            ]
            v = [opt.state[p]["exp_avg_sq"] for p in model.parameters()]
            rms_v = torch.cat([x.flatten() for x in v]).sqrt().mean().item()
            writer.writerow(
                [
                    step,
                    f"{loss.item():.6g}",
                    f"{grad_norm.item():.6g}",
                    f"{lr:.6g}",
                    f"{rms_v:.6g}",
                    *(f"{u:.6g}" for u in upd),
                ]
            )
    return DATA


def load() -> list[dict]:
    with DATA.open() as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        upd = [float(v) for k, v in r.items() if k.startswith("upd_")]
        out.append(
            dict(
                loss=float(r["loss"]),
                grad_norm=float(r["grad_norm"]),
                lr=float(r["lr"]),
                optimizer=float(r["opt_rms_v"]),
                update_norms=upd,
                step=float(r["step"]),
                phase="full",
            )
        )
    return out


def evaluate(hidden: int = 64, ensemble: int = 5, horizon: int = 10, skip: int = 50) -> dict:
    from hybrid_triton.dynamics import DynamicsConfig, DynamicsModel

    rows = load()
    cfg = DynamicsConfig(
        ensemble=ensemble, hidden=hidden, calibration_horizon=horizon, calibration_size=4096
    )
    model = DynamicsModel(len(rows[0]["update_norms"]), cfg)
    start = time.perf_counter()
    # Score only after `skip` warm-up steps: reset the calibration ring at that point.
    for i, stats in enumerate(rows):
        if i == skip:
            model._calib_written = 0
        model.observe(stats)
    per_step_ms = (time.perf_counter() - start) / len(rows) * 1e3
    errors = {lead: float(v) for lead, v in model.relative_errors().items()}
    losses = [r["loss"] for r in rows]
    persistence = {}
    for lead in errors:
        idx = range(skip + 1, len(losses) - lead)  # forecasts issued at i, scored at i + lead
        persistence[lead] = sum(
            abs(losses[i + lead] - losses[i]) / losses[i + lead] for i in idx
        ) / len(idx)
    print(
        f"replay of {DATA.name}: {len(rows)} steps, K={ensemble}, H={hidden}, "
        f"observe {per_step_ms:.1f} ms/step (CPU)"
    )
    print("lead  model_rel_err  persistence_rel_err")
    for lead in errors:
        print(f"{lead:4d}  {errors[lead]:13.4f}  {persistence[lead]:19.4f}")
    print(f"confidence at the end (T={horizon}): {float(model.confidence()):.3f}")
    return {"model": errors, "persistence": persistence}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["record", "evaluate"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--horizon", type=int, default=10)
    args = parser.parse_args()
    if args.what == "record":
        print(record(args.steps))
    else:
        os.environ.setdefault("HYBRID_TRITON_IMPL", "torch")  # CPU replay: the torch reference
        evaluate(args.hidden, args.ensemble, args.horizon)


if __name__ == "__main__":
    main()
