"""Where a training step's time goes: ``torch.profiler`` over a few steps of the recipes and of
the phase-aware trainer, phase by phase.

For each configuration (``baseline_bf16``, ``toolkit_memory``, and ``HybridTrainer`` with the
training suite's setup of issue 8's configuration 3), the top ops / CUDA kernels by self device
time (self CPU time on a CPU) per step, and the step's wall time (the device synchronized after
every step, so one step's work is not hidden behind the next one's host side). The trainer is
profiled per phase: ``warmup``, ``full`` (a Full step in ``train_every`` also trains the
dynamics model: both kinds are averaged in), ``predict`` and ``correct``, each phase's first
step apart (``predict:first``, ``correct:first``: they carry the entry work, the snapshot and
the restores). The Predict entry is forced when the Full phase ends (the confidence rule is
bypassed): this measures what the phases cost, not whether the model would enter them.

Usage (GPU, GPT-2 small, 8 x 1024; under 2 minutes on an H100)::

    python -m benchmarks.profile_training --out reports/profile/gpt2-small

CPU (a tiny model and the torch references; a test runs this)::

    HYBRID_TRITON_IMPL=torch python -m benchmarks.profile_training --model gpt2-tiny \\
        --batch 4 --seq 64 --out /tmp/profile

Writes ``ops.csv`` (configuration, phase, rank, op, self time per step in us, calls per step,
share of the step's self time), ``steps.csv`` (configuration, phase, steps, median and mean wall
ms) and ``summary.md`` (the same tables, as printed) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

TOP = 25


def _self_time_us(event, on_gpu: bool) -> float:
    """Self device time (GPU) or self CPU time of a ``key_averages`` row, in us."""
    if on_gpu:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, attr):
                return float(getattr(event, attr))
        return 0.0
    return float(event.self_cpu_time_total)


class PhaseProfile:
    """Ops' self time and wall time, summed per (configuration, phase) over profiled steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.ops: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(
            lambda: defaultdict(lambda: [0.0, 0.0])
        )
        self.wall_ms: dict[tuple[str, str], list[float]] = defaultdict(list)
        # Calls of rows with self time: on a GPU, kernel launches (what launch-bound work
        # such as the dynamics model's small ops costs).
        self.calls: dict[tuple[str, str], float] = defaultdict(float)

    def _sync(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)

    def step(self, config: str, phase_of: Callable[[], str], work: Callable[[], object]) -> str:
        """Run ``work`` (one step) under the profiler; ``phase_of()`` names its phase (called
        after the step)."""
        activities = [ProfilerActivity.CPU]
        if self.on_gpu:
            activities.append(ProfilerActivity.CUDA)
        self._sync()
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            work()
            self._sync()
            wall = (time.perf_counter() - t0) * 1e3
        phase = phase_of()
        key = (config, phase)
        self.wall_ms[key].append(wall)
        # Kernels are rows of their own (their self device time); the ops that launch them
        # have none of it, so nothing is counted twice.
        for event in prof.key_averages():
            t = _self_time_us(event, self.on_gpu)
            if t <= 0.0:
                continue
            row = self.ops[key][event.key]
            row[0] += t
            row[1] += event.count
            self.calls[key] += event.count
        return phase

    def tables(self, top: int = TOP) -> tuple[list[dict], list[dict]]:
        op_rows, step_rows = [], []
        for key, walls in self.wall_ms.items():
            config, phase = key
            n = len(walls)
            step_rows.append(
                {
                    "config": config,
                    "phase": phase,
                    "steps": n,
                    "wall_ms_median": statistics.median(walls),
                    "wall_ms_mean": statistics.fmean(walls),
                    "timed_calls_per_step": self.calls[key] / n,
                }
            )
            ops = self.ops[key]
            total = sum(v[0] for v in ops.values()) or 1.0
            ranked = sorted(ops.items(), key=lambda kv: kv[1][0], reverse=True)[:top]
            for rank, (name, (us, calls)) in enumerate(ranked, 1):
                op_rows.append(
                    {
                        "config": config,
                        "phase": phase,
                        "rank": rank,
                        "op": name,
                        "self_us_per_step": us / n,
                        "calls_per_step": calls / n,
                        "share_pct": 100.0 * us / total,
                    }
                )
        return op_rows, step_rows


def format_tables(op_rows: list[dict], step_rows: list[dict], on_gpu: bool) -> str:
    what = "self CUDA time" if on_gpu else "self CPU time"
    calls = "kernels / step" if on_gpu else "timed ops / step"
    lines = [f"| configuration | phase | steps | wall ms (median) | wall ms (mean) | {calls} |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in step_rows:
        lines.append(
            f"| {r['config']} | {r['phase']} | {r['steps']} | {r['wall_ms_median']:.2f} | "
            f"{r['wall_ms_mean']:.2f} | {r['timed_calls_per_step']:.0f} |"
        )
    by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in op_rows:
        by_key[(r["config"], r["phase"])].append(r)
    for (config, phase), rows in by_key.items():
        lines += ["", f"### {config} / {phase}: top {len(rows)} by {what} per step", "",
                  "| # | op | us / step | calls / step | % |",
                  "| ---: | --- | ---: | ---: | ---: |"]  # fmt: skip
        for r in rows:
            name = r["op"].replace("|", "/")
            if len(name) > 90:
                name = name[:87] + "..."
            lines.append(
                f"| {r['rank']} | `{name}` | {r['self_us_per_step']:.1f} | "
                f"{r['calls_per_step']:.1f} | {r['share_pct']:.1f} |"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- runs


def profile_recipe(prof: PhaseProfile, recipe: str, model_cfg, stream, args) -> None:
    from hybrid_triton.recipes import OptimConfig, build_recipe

    parts = build_recipe(recipe, model_cfg, prof.device, OptimConfig())
    lr = OptimConfig().lr
    for i in range(args.warmup):
        parts.step([stream.batch(i)], lr)
    for i in range(args.steps):
        batch = stream.batch(args.warmup + i)
        prof.step(recipe, lambda: "full", lambda b=batch: parts.step([b], lr))


def profile_trainer(prof: PhaseProfile, model_cfg, stream, args) -> None:
    from benchmarks.training import build_gpt2_trainer, trainer_config_for
    from hybrid_triton.recipes import OptimConfig

    settings = dict(
        warmup_steps=args.warmup + args.steps,
        full_steps=max(args.steps, 4),  # the dynamics model trains on one Full step in 4
        min_predict_steps=args.steps + 1,
        max_predict_steps=args.steps + 1,
        correct_steps=args.steps + 1,
    )
    tcfg = trainer_config_for(args.preset, settings)
    total = settings["warmup_steps"] + settings["full_steps"] + 2 * (args.steps + 1)
    trainer, _ = build_gpt2_trainer(
        model_cfg, tcfg, prof.device, OptimConfig(), total, args.state_bits,
        args.checkpoint_blocks,
    )  # fmt: skip
    if tcfg.predict:
        # Enter Predict when the Full phase ends, whatever the confidence (see the docstring).
        trainer.controller.may_predict = lambda confidence: True
    name = f"trainer {args.preset}"
    for i in range(total):
        batch = stream.batch(i)
        if i < args.warmup:  # not profiled: compilation, allocator, first optimizer step
            trainer.step(batch)
            continue
        out: dict = {}

        def label(out=out) -> str:
            phase = out["phase"]
            return f"{phase}:first" if out["new_phase"] and phase != "full" else phase

        # The step includes its phase's entry work (prepare_step runs inside it).
        prof.step(name, label, lambda b=batch, out=out: out.update(trainer.step(b)))
        if out["phase"] == "correct" and trainer.controller.steps_until_phase_end == 0:
            break
    trainer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per phase")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled steps first")
    parser.add_argument("--preset", default="balanced", help="trainer preset (off: Predict off)")
    parser.add_argument("--state-bits", type=int, default=8)
    parser.add_argument(
        "--checkpoint-blocks",
        default="auto",
        help="trainer: auto (toolkit_memory's planned blocks), or a block count",
    )
    parser.add_argument(
        "--configs",
        default="baseline_bf16,toolkit_memory,trainer",
        help="comma list of baseline_bf16, toolkit_memory, trainer",
    )
    parser.add_argument("--out", required=True, help="folder for ops.csv, steps.csv, summary.md")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    from dataclasses import replace

    from benchmarks.training import TRAINER_PRESET_ALIASES
    from hybrid_triton.data import TokenStream, load_corpus
    from hybrid_triton.models.gpt2 import GPT2Config
    from hybrid_triton.recipes import plan_checkpoint_blocks

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = sorted(set(configs) - {"baseline_bf16", "toolkit_memory", "trainer"})
    if bad or not configs:
        parser.error(f"--configs: unknown {bad}")
    tiny = args.model == "gpt2-tiny"
    tokenizer = "byte" if tiny else "auto"
    corpus = load_corpus(tokenizer=tokenizer, max_files=60 if tiny else None)
    model_cfg = GPT2Config.from_name(args.model)
    if tiny:  # the byte tokenizer's vocabulary, the profiled context
        model_cfg = GPT2Config.from_name(args.model, vocab_size=320, block_size=args.seq)
    if args.seq > model_cfg.block_size:
        parser.error(f"--seq {args.seq} exceeds the model's block size {model_cfg.block_size}")
    if args.checkpoint_blocks == "auto":
        args.checkpoint_blocks, _ = plan_checkpoint_blocks(
            model_cfg, args.batch, args.seq, 1, memory_budget_gib=4.0,
            state_bits=args.state_bits, fused_loss=True, loss_chunk_tokens=1024,
        )  # fmt: skip
    else:
        args.checkpoint_blocks = int(args.checkpoint_blocks)
    args.preset = TRAINER_PRESET_ALIASES.get(args.preset, args.preset)
    stream = TokenStream("train", args.batch, args.seq, 0, corpus=corpus, device=device)
    prof = PhaseProfile(device)
    started = time.perf_counter()
    for config in configs:
        if config == "trainer":
            profile_trainer(prof, replace(model_cfg), stream, args)
        else:
            profile_recipe(prof, config, model_cfg, stream, args)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    op_rows, step_rows = prof.tables()
    head = (
        f"profile: {args.model} {args.batch}x{args.seq}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", torch {torch.__version__}, impl {os.environ.get('HYBRID_TRITON_IMPL', 'auto')}, "
        f"trainer checkpoint blocks {args.checkpoint_blocks}, "
        f"{time.perf_counter() - started:.1f} s"
    )
    text = head + "\n\n" + format_tables(op_rows, step_rows, device.type == "cuda")
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("ops.csv", op_rows), ("steps.csv", step_rows)):
        with open(out / name, "w", newline="") as fh:
            if rows:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    (out / "summary.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
