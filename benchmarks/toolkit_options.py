"""Quick GPU check of the toolkit_memory recipe's speed and memory options (issue 8).

One process, GPT-2 small at 8 x 1024 tokens per step (one micro-batch): the baseline_bf16 step,
then toolkit_memory with each option below; for every one the median step time over timed
steps (CUDA events, after warm-up steps), tokens/s and its ratio to baseline_bf16, the peak
allocated memory over the timed steps (reset after warm-up) and the planner's estimate beside
it (toolkit options only). Prints a Markdown table; with ``--csv PATH`` (or ``$OUT`` set) also
writes it as CSV. Random tokens: this measures speed and memory, not learning.

    python benchmarks/toolkit_options.py [--steps 10] [--warmup 3] [--csv PATH]

Options timed (``checkpointing``: the first K blocks recomputed in backward):
"auto" (the planner's choice for 4 GiB), 0, 2, 4, every block; the fused loss off with every
block checkpointed (the recipe before the fused loss, without autocast).
"""

from __future__ import annotations

import argparse
import csv
import gc
import itertools
import os
import statistics
import sys
import time

import torch

OPTIONS: list[tuple[str, dict]] = [
    ("auto", {}),
    ("ckpt 0", {"checkpointing": 0}),
    ("ckpt 2", {"checkpointing": 2}),
    ("ckpt 4", {"checkpointing": 4}),
    ("ckpt all", {"checkpointing": True}),
    ("ckpt all, plain loss", {"checkpointing": True, "fused_loss": False}),
]


def _time_steps(parts, batch, steps: int, warmup: int) -> tuple[float, int | None]:
    """Median step time (s) over ``steps`` steps after ``warmup``, and the peak allocated over
    the timed steps (CUDA; None on CPU, where the times come from the wall clock)."""
    for _ in range(warmup):
        parts.step([batch], 1e-4)
    if not torch.cuda.is_available():
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            parts.step([batch], 1e-4)
            times.append(time.perf_counter() - start)
        return statistics.median(times), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        parts.step([batch], 1e-4)
        events[i + 1].record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(events)]
    return statistics.median(times), torch.cuda.max_memory_allocated()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--csv", default=None)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny GPT-2 at 2 x 64 tokens (runs on a CPU: checks the script, times nothing)",
    )
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.quick:
        print("toolkit_options: needs a CUDA GPU (or --quick)", file=sys.stderr)
        return 2
    if not on_gpu:
        os.environ.setdefault("HYBRID_TRITON_IMPL", "torch")  # the interpreter is too slow
    from hybrid_triton.models.gpt2 import GPT2Config
    from hybrid_triton.planner.estimate import estimate
    from hybrid_triton.recipes import build_recipe, plan_checkpoint_blocks, toolkit_setup

    device = "cuda" if on_gpu else "cpu"
    if args.quick:
        cfg = GPT2Config.from_name("gpt2-tiny", vocab_size=320, block_size=64)
        b, t, vocab = 2, 64, 320
    else:
        cfg = GPT2Config.from_name("gpt2-small")
        b, t, vocab = args.micro_batch, args.seq_len, 50257
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, vocab, (b, t), device=device, generator=gen)
    y = torch.randint(0, vocab, (b, t), device=device, generator=gen)
    tokens = b * t
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"# toolkit_memory options: {name}, torch {torch.__version__}")
    print(f"{cfg.n_layer} layers x {cfg.n_embd}, {b} x {t} tokens per step, median of {args.steps}")
    rows = []
    base_time = None
    for label, recipe, options in [("baseline_bf16", "baseline_bf16", {})] + [
        (f"toolkit {name}", "toolkit_memory", opts)
        for name, opts in OPTIONS
        # a block count past the model's depth (--quick's 2 layers) is not an option
        if isinstance(opts.get("checkpointing"), bool)
        or opts.get("checkpointing", 0) <= cfg.n_layer
    ]:
        torch.manual_seed(0)
        parts = build_recipe(recipe, cfg, device, **options)
        try:
            step_s, peak = _time_steps(parts, (x, y), args.steps, args.warmup)
        except torch.OutOfMemoryError as err:
            print(f"{label}: out of memory ({err})")
            continue
        base_time = base_time or step_s
        planned = None
        if recipe == "toolkit_memory":
            blocks = parts.options["checkpoint_blocks"]
            spec, setup = toolkit_setup(
                cfg,
                b,
                t,
                checkpoint_blocks=blocks,
                fused_loss=parts.options["fused_loss"],
                loss_chunk_tokens=parts.options["loss_chunk_tokens"],
            )
            planned = estimate(spec, setup).peak_bytes
        else:
            blocks = None
        rows.append(
            dict(
                option=label,
                checkpoint_blocks="" if blocks is None else blocks,
                step_ms=round(1e3 * step_s, 2),
                tokens_per_s=round(tokens / step_s),
                vs_bf16_pct=round(100 * base_time / step_s, 1),
                peak_gib="" if peak is None else round(peak / 2**30, 3),
                planner_gib="" if planned is None else round(planned / 2**30, 3),
                planner_err_pct=""
                if planned is None or peak is None
                else round(100 * (planned / peak - 1), 1),
            )
        )
        # Hooks and the optimizer keep reference cycles to the model: without a collection the
        # previous option's tensors stay allocated and inflate the next option's peak.
        del parts
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
            left = torch.cuda.memory_allocated() / 2**20
            if left > 64:
                print(f"warning: {left:.0f} MiB still allocated after {label}")
    k, _ = plan_checkpoint_blocks(cfg, b, t)
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    print(f"planner's choice for 4 GiB ('auto'): the first {k} blocks checkpointed")
    path = args.csv or (
        os.path.join(os.environ["OUT"], "toolkit_options.csv") if os.environ.get("OUT") else None
    )
    if path:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
