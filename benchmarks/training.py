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
- ``probe overhead``: the same bf16 step timed in pairs of blocks with and without a
  ``MemoryProbe`` phase around every step (order A B, B A, ...; CUDA events at the block
  edges only), reporting the median paired overhead in % of the step time with a 95%
  interval, and the probe's host cost per phase (the target is at most 1% on a GPU; on CPU
  the probe tracks tensors through a dispatch mode and costs far more: the CPU figure only
  shows that the case runs).

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
from hybrid_triton.bench.timing import paired_overhead, run_paired_blocks

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
    # What the recipe ran with, choices it made itself included (toolkit_memory's planned
    # checkpointing): every row of the case carries it.
    config["recipe_options"] = result.config.get("recipe_options", {})
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
    """``HybridTrainer`` (a preset, default ``balanced``) on GPT-2 with bf16 parameters and
    fp32 master weights (``FusedAdamW``, ``trainer_state_bits`` moments, activation
    checkpointing on a GPU): the memory suite's ``hybrid`` setup, trained for ``steps`` steps.

    Records: wall clock and tokens/s, final validation loss (the recipes' validation set), the
    fraction of steps without backward (Predict), steps and entries per phase, rollbacks,
    per-phase peak allocated memory from the trainer's own counters (CUDA; reset at every
    phase boundary, each phase's entry work apart as ``enter:<phase>``), median step time per
    phase, the first Correct step after Predict against the median Full step (and against the
    other Correct steps: the exposed cost of the restore), and the restore's hidden fraction.

    Options (``--option KEY=VALUE``): ``steps`` (every run of the suite), ``trainer_preset``,
    ``trainer_warmup`` (override the preset's warm-up steps), ``trainer_state_bits``,
    ``trainer_checkpointing`` (0/1), ``trainer_baseline`` (a recipe trained right after on the
    same steps and data, e.g. ``baseline_bf16``; ``none`` for none).
    """
    rec = ctx.recorder
    preset = ctx.option("trainer_preset", "balanced")
    state_bits = ctx.option("trainer_state_bits", 8)
    on_gpu = ctx.device.type == "cuda"
    checkpointing = bool(ctx.option("trainer_checkpointing", 1 if on_gpu else 0))
    case = f"{size.model} hybrid_trainer {preset} {size.micro_batch}x{size.seq_len}x{size.accum}"
    config = {"runner": "HybridTrainer", "preset": preset, "model": size.model,
              "micro_batch": size.micro_batch, "seq_len": size.seq_len, "steps": size.steps,
              "state_bits": state_bits, "checkpointing": checkpointing,
              "params": "bf16 + fp32 master"}  # fmt: skip
    try:
        from dataclasses import replace as dc_replace

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
        model_cfg = dc_replace(model_config(size, ctx.quick),
                               activation_checkpointing=checkpointing)  # fmt: skip
        model = GPT2(model_cfg).to(device)
        fp32_init = {id(p): p.detach().clone() for p in model.parameters()}
        model.to(torch.bfloat16)  # the same Parameter objects, bf16 data
        overrides = {}
        if "trainer_warmup" in ctx.options:
            overrides["warmup_steps"] = ctx.option("trainer_warmup", 100)
        if ctx.quick:  # a few steps: short phases so that the run is more than a warm-up
            overrides.update(warmup_steps=2, full_steps=2, max_predict_steps=2, correct_steps=1)
        # bf16 parameters compute in bf16 without autocast (as the toolkit recipe).
        tcfg = TrainerConfig.preset(preset, precision="fp32", **overrides)
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
                "state_bits": state_bits,
            },
        )
        with torch.no_grad():  # the master starts from the fp32 initialisation, not its bf16
            for view, p in zip(trainer.group.views(trainer.master), trainer.group.params):
                view.copy_(fp32_init[id(p)])
        del fp32_init
        train = TokenStream(
            "train", size.micro_batch, size.seq_len, 0, corpus=corpus, device=device
        )
        val = TokenStream("val", size.micro_batch, size.seq_len, corpus=corpus, shuffle=False,
                          device=device)  # fmt: skip
        val_set = list(
            val.take(min(size.eval_batches, max(1, val.num_windows // size.micro_batch)))
        )
        probe = MemoryProbe(device) if not on_gpu else None
        cpu_peaks: dict[str, int] = {}
        _sync(device)
        start = time.perf_counter()
        for i in range(size.steps):
            # Set before the step: a Predict phase freezes the rate of its entry step.
            trainer.optimizer.param_groups[0]["lr"] = optim.lr_at(i, size.steps)
            if probe is None:  # CUDA: the trainer's own per-phase peak counters
                trainer.step(train.batch(i))
                continue
            with probe.phase("step", resident=()):
                out = trainer.step(train.batch(i))
            phase = str(out["phase"])
            cpu_peaks[phase] = max(
                cpu_peaks.get(phase, 0), probe.results.pop("step").peak_allocated
            )
        trainer.flush()
        _sync(device)
        elapsed = time.perf_counter() - start
        summary = trainer.summary()
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
    counts = summary["phase_steps"]
    rec.add(case, "measured", "train_time_s", "s", elapsed, config=config,
            note="wall clock" + ("" if on_gpu else ", includes the cpu memory probe"))  # fmt: skip
    rec.add(case, "measured", "tokens_per_s", "tok/s", tokens / elapsed, config=config)
    rec.add(case, "measured", "val_loss", "nats", val_loss, config=config,
            note=f"after step {size.steps}")  # fmt: skip
    rec.add(case, "measured", "val_ppl", "", math.exp(min(val_loss, 700.0)), config=config)
    no_backward = counts.get("predict", 0) / max(1, size.steps)
    rec.add(
        case,
        "measured",
        "steps_without_backward_pct",
        "%",
        100.0 * no_backward,
        config=config,
        note=f"phase steps {counts}; entries {summary['phase_entries']}",
    )
    rec.add(case, "measured", "rollbacks", "count", summary["rollbacks"], config=config)
    if on_gpu:
        peaks = {k: v["allocated"] for k, v in summary["phase_peaks"].items()}
        note = "torch.cuda.max_memory_allocated, reset at each phase boundary"
    else:
        peaks, note = cpu_peaks, "cpu: tensors allocated during the step only"
    for phase, peak in peaks.items():
        c = {**config, "phase": phase, "phase_steps": counts.get(phase, 0)}
        rec.add(f"{case} [{phase}]", "measured", "peak_allocated", "GiB", peak / GIB, config=c,
                note=note)  # fmt: skip
    if peaks.get("full") and peaks.get("predict"):
        rec.add(f"{case} [predict]", "measured", "predict_vs_full_peak_pct", "%",
                100.0 * peaks["predict"] / peaks["full"], config=config,
                note="Predict phase's peak / Full phase's peak (target <= 25%)")  # fmt: skip
    medians, firsts = summary["step_ms_median"], summary["first_step_ms_median"]
    timer = "cuda events" if on_gpu else "cpu perf_counter"
    for phase, ms in medians.items():
        if ms is not None:
            rec.add(
                f"{case} [{phase}]",
                "measured",
                "step_time_ms",
                "ms",
                ms,
                config=config,
                note=f"median; {timer}; a phase's first step includes its entry work",
            )
    first_correct = firsts.get("correct")
    if first_correct is not None and medians.get("full"):
        rec.add(f"{case} [correct]", "measured", "first_correct_step_ms", "ms", first_correct,
                config=config, note="median over Correct phases of their first step")  # fmt: skip
        rec.add(f"{case} [correct]", "measured", "first_correct_vs_full_pct", "%",
                100.0 * (first_correct / medians["full"] - 1.0), config=config,
                note="vs the median Full step (target <= 5%); Full steps also train the "
                "dynamics model")  # fmt: skip
        if medians.get("correct"):
            rec.add(
                f"{case} [correct]",
                "measured",
                "first_correct_vs_correct_pct",
                "%",
                100.0 * (first_correct / medians["correct"] - 1.0),
                config=config,
                note="vs the median of all Correct steps: the exposed cost of the restore",
            )
    for key, label in (("offload", "moments"), ("master_offload", "master")):
        stats = summary[key]
        if stats.get("restores"):
            rec.add(f"{case} [predict]", "measured", f"restore_hidden_pct:{label}", "%",
                    100.0 * stats["hidden_fraction"], config=config,
                    note=f"{stats['restores']} restores, {stats['restore_s']:.3f} s in all, "
                    f"{stats['exposed_s']:.3f} s exposed")  # fmt: skip
    rec.status(case, "measured", STATUS_OK, config=config,
               message=f"phase steps: {counts}")  # fmt: skip
    del trainer, model
    free_device_memory()
    baseline = ctx.option("trainer_baseline", "none")
    if baseline != "none":
        # Plain training on the same steps, data (train stream seed 0) and validation set.
        run_recipe(ctx, baseline, size, corpus)


# ----------------------------------------------------------------------------- probe overhead


# Pairs of blocks (with / without a probe phase around every step). Quick: the case runs;
# full: enough pairs for a 95% interval of the median paired difference (12 pairs: 96%).
OVERHEAD_PAIRS = {True: 3, False: 12}
PROBE_HOST_CALLS = 200  # empty probe phases timed on the host, for the per-phase host cost


@contextlib.contextmanager
def _no_probe() -> Iterator[None]:
    yield


class BlockTimer:
    """Time of a block of work: CUDA events recorded at the block's edges and read once
    the end event completes (the only wait, at the block's edge, never inside it); on CPU
    ``time.perf_counter``. Returns milliseconds."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda events at block edges" if device.type == "cuda" else "cpu perf_counter"

    def __call__(self, block) -> float:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)  # the previous block has drained
            start.record()
            block()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        block()
        return (time.perf_counter() - t0) * 1e3


def probe_host_cost_us(probe: MemoryProbe, calls: int = PROBE_HOST_CALLS) -> float:
    """Median host time of one empty probe phase (enter + exit), in microseconds: what the
    probe adds to the host's side of a step (an upper bound of its cost when the host is
    the bottleneck; hidden behind GPU work otherwise)."""
    samples = []
    resident = () if probe.device.type == "cpu" else None  # CPU: no GC scan per phase
    for _ in range(calls):
        t0 = time.perf_counter()
        with probe.phase("empty", resident=resident):
            pass
        samples.append((time.perf_counter() - t0) * 1e6)
    probe.history.clear()
    probe.results.pop("empty", None)
    return statistics.median(samples)


def nvml_query_us(device: torch.device, calls: int = 50) -> float | None:
    """Median time of one NVML memory query (``device_level=True`` adds one per phase), in
    microseconds; ``None`` without CUDA or NVML."""
    from hybrid_triton.bench.probes import _nvml_used

    if device.type != "cuda" or _nvml_used(device.index or 0) is None:
        return None
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        _nvml_used(device.index or 0)
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def run_probe_overhead(ctx: SuiteContext, size: TrainingSize, corpus) -> None:
    """The harness's own cost on a training step: the same bf16 step timed in blocks of
    ``overhead_steps`` steps with and without a ``MemoryProbe`` phase around every step
    (the default probe, as a user wraps a step), in pairs whose order alternates (A B, B A,
    ...); the overhead is the median of the paired relative differences, with a
    distribution-free 95% interval. Also the probe's host cost per phase, timed directly."""
    from hybrid_triton.data import TokenStream
    from hybrid_triton.recipes import build_recipe

    rec = ctx.recorder
    case = f"probe overhead {size.model} baseline_bf16 {size.micro_batch}x{size.seq_len}"
    pairs = OVERHEAD_PAIRS[ctx.quick]
    device = ctx.device
    config = {
        "recipe": "baseline_bf16",
        "model": size.model,
        "steps_per_block": size.overhead_steps,
        "pairs": pairs,
    }
    try:
        parts = build_recipe("baseline_bf16", model_config(size, ctx.quick), device)
        stream = TokenStream(
            "train", size.micro_batch, size.seq_len, 0, corpus=corpus, device=device
        )
        batch = [stream.batch(0)]
        probe = MemoryProbe(device)
        resident = [parts.model, parts.optimizer, batch]
        for _ in range(3):  # warm-up: optimizer state, kernels, allocator, the probe itself
            with probe.phase("full", resident=resident):
                parts.step(batch, 1e-4)
        timer = BlockTimer(device)

        def run_block(mode: str) -> float:
            def steps() -> None:
                for _ in range(size.overhead_steps):
                    with probe.phase("full", resident=resident) if mode == "with" else _no_probe():
                        parts.step(batch, 1e-4)

            return timer(steps) / size.overhead_steps

        times = run_paired_blocks(run_block, pairs, modes=("without", "with"))
        result = paired_overhead(times["without"], times["with"])
        host_us = probe_host_cost_us(probe)
        nvml_us = nvml_query_us(device)
    except Exception as err:
        status = STATUS_OOM if is_oom(err) else STATUS_ERROR
        if status == STATUS_ERROR:
            ctx.log(traceback.format_exc())
        rec.status(case, "-", status, config=config, message=f"{type(err).__name__}: {err}")
        free_device_memory()
        return
    how = f"{pairs} pairs of blocks of {size.overhead_steps} steps, order ABBA..., {timer.method}"
    rec.add(case, "without_probe", "step_time_ms", "ms", result.baseline_ms, config=config,
            note=f"median of {pairs} blocks; {how}")  # fmt: skip
    rec.add(case, "with_probe", "step_time_ms", "ms", result.treated_ms, config=config,
            note=f"median of {pairs} blocks; {how}")  # fmt: skip
    rec.add(case, "without_probe", "block_spread_pct", "%", result.baseline_spread_pct,
            config=config, note="(p80 - p20) / median of the blocks without the probe")  # fmt: skip
    ci = (
        f"{100 * result.confidence:.0f}% interval [{result.ci_low_pct:.3g}, "
        f"{result.ci_high_pct:.3g}] %"
    )
    target = "target <= 1% on a GPU" if device.type == "cuda" else "cpu: the probe tracks tensors"
    rec.add(case, "with_probe", "probe_overhead_pct", "%", result.median_pct, config=config,
            note=f"median of {pairs} paired differences; {ci}; {target}")  # fmt: skip
    rec.add(case, "with_probe", "probe_overhead_ci_low_pct", "%", result.ci_low_pct,
            config=config, note=f"{100 * result.confidence:.0f}% interval")  # fmt: skip
    rec.add(case, "with_probe", "probe_overhead_ci_high_pct", "%", result.ci_high_pct,
            config=config, note=f"{100 * result.confidence:.0f}% interval")  # fmt: skip
    rec.add(case, "with_probe", "probe_host_us", "us", host_us, config=config,
            note=f"median host time of an empty probe phase over {PROBE_HOST_CALLS}")  # fmt: skip
    rec.add(case, "with_probe", "probe_host_pct", "%", 100.0 * host_us * 1e-3 / result.baseline_ms,
            config=config, note="host cost per phase / step time: the overhead if the host "
            "were the bottleneck")  # fmt: skip
    rec.add(case, "nvml", "nvml_query_us", "us", nvml_us, config=config,
            note="one NVML memory query (MemoryProbe(device_level=True) adds one per phase)"
            if nvml_us is not None else "not measured: no CUDA device or no NVML")  # fmt: skip
    rec.status(case, "-", STATUS_OK, config=config)
    free_device_memory()


# ----------------------------------------------------------------------------- the suite


def _on_reference_path(ctx: SuiteContext, job, *args) -> None:
    with reference_path_on_cpu(ctx.device):
        job(ctx, *args)


def run(ctx: SuiteContext) -> None:
    from hybrid_triton.recipes import RECIPES

    size = size_for(ctx.quick)
    if "steps" in ctx.options:  # e.g. the 2,000-step trainer proof
        from dataclasses import replace

        size = replace(size, steps=ctx.option("steps", size.steps))
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
