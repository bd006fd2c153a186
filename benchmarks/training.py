"""The ``training`` suite: GPT-2 training runs (time, tokens/s, loss, peak memory per phase),
and the harness's own overhead on a training step.

Runs:

- every recipe of ``hybrid_triton.recipes`` (``baseline_fp32``, ``baseline_bf16``, and the
  toolkit's own when registered) through ``run_training`` on the standard-library corpus:
  training time, tokens/s, median step time, final train loss, validation loss and
  perplexity, peak allocated memory (CUDA; one phase, Full);
- ``HybridTrainer`` on the same model and data when it is available: a short run through
  Warmup → Full → Predict → Correct with :class:`~hybrid_triton.bench.probes.MemoryProbe`
  around every step: per-phase peaks, tokens/s, validation loss at the end;
- ``probe overhead``: the same bf16 step timed in alternating blocks with and without a
  ``MemoryProbe`` phase around every step, reporting the overhead in % of the step time
  (the target is at most 1% on a GPU; on CPU the probe tracks tensors through a dispatch
  mode and costs far more: the CPU figure only shows that the case runs).

Quick: ``gpt2-tiny``, byte tokenizer, a few steps of 4 x 64 tokens. Full (a GPU):
``gpt2-small``, 8 x 1024 tokens per step.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import torch

from hybrid_triton.bench.probes import MemoryProbe, free_device_memory, is_oom
from hybrid_triton.bench.results import STATUS_ERROR, STATUS_OK, STATUS_OOM
from hybrid_triton.bench.runner import SuiteContext, reference_path_on_cpu

GIB = 2**30


@dataclass(frozen=True)
class TrainingSize:
    model: str
    micro_batch: int
    seq_len: int
    accum: int
    steps: int
    eval_every: int
    eval_batches: int
    overhead_steps: int  # steps per timed block in the probe-overhead case
    tokenizer: str
    max_files: int | None
    val_every: int

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.accum * self.seq_len


def size_for(quick: bool) -> TrainingSize:
    if quick:
        return TrainingSize("gpt2-tiny", 4, 64, 1, 6, 3, 2, 3, "byte", 60, 10)
    return TrainingSize("gpt2-small", 8, 1024, 1, 200, 100, 20, 20, "auto", None, 50)


def model_config(size: TrainingSize, quick: bool):
    """The preset; quick runs shrink its vocabulary to the byte tokenizer's (rounded up to
    a multiple of 64) and its context to the sequence length, so a CPU step takes well
    under a second."""
    from hybrid_triton.models.gpt2 import GPT2Config

    if not quick:
        return GPT2Config.from_name(size.model)
    return GPT2Config.from_name(size.model, vocab_size=320, block_size=size.seq_len)


def _corpus(size: TrainingSize):
    from hybrid_triton.data import load_corpus

    return load_corpus(tokenizer=size.tokenizer, max_files=size.max_files, val_every=size.val_every)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- recipe runs


def run_recipe(ctx: SuiteContext, recipe: str, size: TrainingSize, corpus) -> None:
    from hybrid_triton.recipes import run_training

    rec = ctx.recorder
    case = f"{size.model} {recipe} {size.micro_batch}x{size.seq_len}x{size.accum}"
    config = {
        "recipe": recipe,
        "model": size.model,
        "micro_batch": size.micro_batch,
        "seq_len": size.seq_len,
        "accum": size.accum,
        "steps": size.steps,
        "phase": "full",
    }
    try:
        result = run_training(
            recipe,
            model_config(size, ctx.quick),
            tokens=size.steps * size.tokens_per_step,
            micro_batch=size.micro_batch,
            accum=size.accum,
            seq_len=size.seq_len,
            eval_every=size.eval_every,
            corpus=corpus,
            device=ctx.device,
            eval_batches=size.eval_batches,
        )
    except Exception as err:
        status = STATUS_OOM if is_oom(err) else STATUS_ERROR
        if status == STATUS_ERROR:
            ctx.log(traceback.format_exc())
        rec.status(case, "measured", status, config=config, message=f"{type(err).__name__}: {err}")
        free_device_memory()
        return
    timer = "cuda events" if ctx.device.type == "cuda" else "cpu perf_counter"
    steady = result.step_time_s[1:] or result.step_time_s  # the first step compiles/allocates
    rec.add(case, "measured", "train_time_s", "s", result.train_time_s, config=config, note=timer)
    rec.add(case, "measured", "tokens_per_s", "tok/s", result.tokens_per_s, config=config,
            note="whole run, evaluation left out")  # fmt: skip
    if steady:
        rec.add(
            case,
            "measured",
            "step_time_ms",
            "ms",
            1e3 * statistics.median(steady),
            config=config,
            note=f"median over steps 2..{len(result.step_time_s)}; {timer}",
        )
    rec.add(case, "measured", "final_train_loss", "nats", result.summary()["final_train_loss"],
            config=config)  # fmt: skip
    if result.evals:
        last = result.evals[-1]
        rec.add(case, "measured", "val_loss", "nats", last["val_loss"], config=config,
                note=f"after step {last['step']}")  # fmt: skip
        rec.add(case, "measured", "val_ppl", "", last["val_ppl"], config=config)
    peak = result.peak_memory_allocated
    rec.add(case, "measured", "peak_allocated", "GiB", None if peak is None else peak / GIB,
            config=config, note="" if peak is not None else "not measured on cpu")  # fmt: skip
    rec.status(case, "measured", STATUS_OK, config=config)
    del result
    free_device_memory()


# ----------------------------------------------------------------------------- trainer run


def run_trainer(ctx: SuiteContext, size: TrainingSize, corpus) -> None:
    rec = ctx.recorder
    case = f"{size.model} hybrid_trainer {size.micro_batch}x{size.seq_len}x{size.accum}"
    config = {"runner": "HybridTrainer", "model": size.model, "micro_batch": size.micro_batch,
              "seq_len": size.seq_len, "steps": size.steps}  # fmt: skip
    try:
        from hybrid_triton.data import TokenStream
        from hybrid_triton.models.gpt2 import GPT2
        from hybrid_triton.recipes import OptimConfig, evaluate
        from hybrid_triton.scheduler import TrainerConfig
        from hybrid_triton.trainer import HybridTrainer
    except ImportError as err:
        rec.status(case, "measured", "skipped", config=config, message=f"no trainer yet: {err}")
        return
    device = ctx.device
    try:
        torch.manual_seed(0)
        model = GPT2(model_config(size, ctx.quick)).to(device)
        phase_len = max(2, size.steps // 6)
        tcfg = TrainerConfig(
            warmup_steps=phase_len, full_steps=phase_len, min_predict_steps=2,
            max_predict_steps=phase_len, correct_steps=2,
            precision="bf16" if device.type == "cuda" else "fp32",
            offload="pinned" if device.type == "cuda" else "keep",
        )  # fmt: skip
        # The recipes' optimizer and schedule (OptimConfig: betas (0.9, 0.95), weight decay
        # 0.1, clipping at 1.0, linear warm-up then cosine decay), so the comparison is of the
        # phases alone. FusedAdamW has one weight decay for the whole arena: here it also
        # decays biases and norms, which the recipes leave alone.
        optim = OptimConfig()
        trainer = HybridTrainer(
            model,
            lambda m, b: m(b[0], b[1])[1],
            config=tcfg,
            lr=optim.lr_at(0, size.steps),
            optimizer_kwargs={
                "betas": optim.betas,
                "weight_decay": optim.weight_decay,
                "max_grad_norm": optim.grad_clip if optim.grad_clip > 0 else None,
            },
        )
        train = TokenStream(
            "train", size.micro_batch, size.seq_len, 0, corpus=corpus, device=device
        )
        val = TokenStream("val", size.micro_batch, size.seq_len, corpus=corpus, shuffle=False,
                          device=device)  # fmt: skip
        val_set = list(
            val.take(min(size.eval_batches, max(1, val.num_windows // size.micro_batch)))
        )
        probe = MemoryProbe(device)
        peaks: dict[str, int] = {}
        counts: dict[str, int] = {}
        _sync(device)
        start = time.perf_counter()
        for i in range(size.steps):
            # Set before the step: a Predict phase freezes the rate of its entry step.
            trainer.optimizer.param_groups[0]["lr"] = optim.lr_at(i, size.steps)
            with probe.phase("step", resident=() if device.type == "cpu" else None):
                out = trainer.step(train.batch(i))
            phase = str(out["phase"])
            peak = probe.results.pop("step").peak_allocated
            peaks[phase] = max(peaks.get(phase, 0), peak)
            counts[phase] = counts.get(phase, 0) + 1
        trainer.flush()
        _sync(device)
        elapsed = time.perf_counter() - start
        val_loss = evaluate(model, val_set)
        trainer.close()
    except Exception as err:
        status = STATUS_OOM if is_oom(err) else STATUS_ERROR
        if status == STATUS_ERROR:
            ctx.log(traceback.format_exc())
        rec.status(case, "measured", status, config=config, message=f"{type(err).__name__}: {err}")
        free_device_memory()
        return
    tokens = size.steps * size.tokens_per_step
    rec.add(case, "measured", "train_time_s", "s", elapsed, config=config,
            note="wall clock, includes the probes")  # fmt: skip
    rec.add(case, "measured", "tokens_per_s", "tok/s", tokens / elapsed, config=config)
    rec.add(case, "measured", "val_loss", "nats", val_loss, config=config)
    rec.add(case, "measured", "val_ppl", "", math.exp(min(val_loss, 700.0)), config=config)
    for phase, peak in peaks.items():
        c = {**config, "phase": phase, "phase_steps": counts[phase]}
        note = "" if device.type == "cuda" else "cpu: tensors allocated during the step only"
        rec.add(f"{case} [{phase}]", "measured", "peak_allocated", "GiB", peak / GIB, config=c,
                note=note)  # fmt: skip
    rec.status(case, "measured", STATUS_OK, config=config,
               message=f"phase steps: {counts}")  # fmt: skip
    free_device_memory()


# ----------------------------------------------------------------------------- probe overhead


@contextlib.contextmanager
def _no_probe() -> Iterator[None]:
    yield


def run_probe_overhead(ctx: SuiteContext, size: TrainingSize, corpus) -> None:
    """Time the same training step with and without a probe phase around it, in alternating
    blocks (so drift in clocks or thermals hits both), median step time of each."""
    from hybrid_triton.data import TokenStream
    from hybrid_triton.recipes import build_recipe

    rec = ctx.recorder
    case = f"probe overhead {size.model} baseline_bf16 {size.micro_batch}x{size.seq_len}"
    config = {
        "recipe": "baseline_bf16",
        "model": size.model,
        "steps_per_block": size.overhead_steps,
    }
    device = ctx.device
    try:
        parts = build_recipe("baseline_bf16", model_config(size, ctx.quick), device)
        stream = TokenStream(
            "train", size.micro_batch, size.seq_len, 0, corpus=corpus, device=device
        )
        batch = [stream.batch(0)]
        probe = MemoryProbe(device)
        resident = [parts.model, parts.optimizer, batch]
        for _ in range(2):  # warm-up: optimizer state, kernels, allocator
            parts.step(batch, 1e-4)
        times: dict[str, list[float]] = {"without": [], "with": []}
        blocks = 2 if ctx.quick else 4
        for _ in range(blocks):
            for mode in ("without", "with"):
                _sync(device)
                start = time.perf_counter()
                for _ in range(size.overhead_steps):
                    ctx_mgr = (
                        probe.phase("full", resident=resident) if mode == "with" else _no_probe()
                    )
                    with ctx_mgr:
                        parts.step(batch, 1e-4)
                _sync(device)
                times[mode].append((time.perf_counter() - start) / size.overhead_steps * 1e3)
    except Exception as err:
        status = STATUS_OOM if is_oom(err) else STATUS_ERROR
        rec.status(case, "-", status, config=config, message=f"{type(err).__name__}: {err}")
        free_device_memory()
        return
    without = statistics.median(times["without"])
    with_probe = statistics.median(times["with"])
    note = f"median of {blocks} blocks of {size.overhead_steps} steps"
    rec.add(case, "without_probe", "step_time_ms", "ms", without, config=config, note=note)
    rec.add(case, "with_probe", "step_time_ms", "ms", with_probe, config=config, note=note)
    rec.add(case, "with_probe", "probe_overhead_pct", "%", 100.0 * (with_probe - without) / without,
            config=config, note="target <= 1% on a GPU")  # fmt: skip
    rec.status(case, "-", STATUS_OK, config=config)
    free_device_memory()


# ----------------------------------------------------------------------------- the suite


def _on_reference_path(ctx: SuiteContext, job, *args) -> None:
    with reference_path_on_cpu(ctx.device):
        job(ctx, *args)


def run(ctx: SuiteContext) -> None:
    from hybrid_triton.recipes import RECIPES

    size = size_for(ctx.quick)
    corpus = _corpus(size)
    jobs = [
        (f"recipe {name}", lambda n=name: _on_reference_path(ctx, run_recipe, n, size, corpus))
        for name in RECIPES
    ]
    jobs.append(("hybrid_trainer", lambda: _on_reference_path(ctx, run_trainer, size, corpus)))
    jobs.append(("probe overhead", lambda: run_probe_overhead(ctx, size, corpus)))
    jobs = [(label, job) for label, job in jobs if ctx.selected(label)]
    for _label, job in ctx.bar(jobs, total=len(jobs), desc="training"):
        job()


def summary(df: pd.DataFrame) -> str:
    metrics = ["tokens_per_s", "step_time_ms", "val_loss", "peak_allocated", "probe_overhead_pct"]
    rows = df[df["metric"].isin(metrics)]
    if rows.empty:
        return "(no training results)"
    lines = [f"{'run':<52} {'provider':<14} {'metric':<20} {'value':>12}"]
    for r in rows.itertuples(index=False):
        lines.append(f"{r.case[:52]:<52} {r.provider:<14} {r.metric:<20} {r.value:>12.4g} {r.unit}")
    return "\n".join(lines)


if __name__ == "__main__":
    from hybrid_triton.bench.cli import main

    sys.exit(main(["training", *sys.argv[1:]]))
