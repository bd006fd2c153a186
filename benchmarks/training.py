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

Recipe-run options (``--option KEY=VALUE``; docs/gpt2.md has the GPU commands):

- ``model``: ``gpt2-small`` (default), ``gpt2-medium`` or ``gpt2-1b``: the run's size
  (``MODEL_RUNS``). ``gpt2-1b`` is the 16 GiB run of issue 8: 100 steps of 8 x 1024 tokens,
  learning rate 2e-4, initialization on the GPU, validation at the start and at the end,
  toolkit_memory with a bf16 gradient buffer and a 14 GiB planning budget, at most 150 s of
  training per recipe; run it with ``--memory-cap 16`` (the baselines are expected to run
  out of memory and are recorded as such). Quick mode keeps ``gpt2-tiny`` shapes and runs
  the same configuration paths.
- ``seeds``: e.g. ``0,1``: every recipe run once per seed (model init and data order); the
  cases of seed ``s > 0`` end in ``seed<s>``, and a ``[seeds]`` case gives the mean and the
  range of each recipe's validation loss and toolkit_memory's gap to baseline_bf16.
- ``recipes``: e.g. ``baseline_bf16,toolkit_memory`` (default: every registered recipe).
- ``lr``, ``max_train_s``, ``steps``: override the size's.
- ``<recipe>.<option>``: a recipe option, e.g. ``toolkit_memory.state_bits=4`` (values are
  parsed as int, float, true/false or text).
- ``trainer_outlier_every``: N > 0 makes every N-th batch of the trainer runs an outlier
  batch (random targets, ``outlier_batch``); compare with the same run without it.

Each recipe run also records the planner's estimate of its step (provider ``planner``;
before the run, so an out-of-memory run has it too), the peak while building and while
training, the peak reserved, and its loss curve (``[curve]`` case, one row per point).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

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
    # Recipe runs only (the trainer and probe-overhead cases ignore these):
    lr: float | None = None  # None: OptimConfig's
    eval_at_start: bool = False
    init_on_device: bool = False  # the fp32 init on the training device (fast for big models)
    max_train_s: float | None = None  # per recipe run (run_training's)
    # Recipe options by recipe, e.g. {"toolkit_memory": {"grad_dtype": "bf16"}}.
    recipe_options: dict = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.accum * self.seq_len


# What ``--option model=NAME`` changes besides the preset (full size; quick mode keeps the
# tiny shapes and applies the rest). Learning rates follow GPT-3's table for the size
# (Brown et al. 2020, table 2.1: 125M 6e-4, 350M 3e-4, 1.3B 2e-4).
MODEL_RUNS: dict[str, dict] = {
    "gpt2-small": {},
    "gpt2-medium": dict(lr=3e-4),
    # Issue 8's 1B run under a 16 GiB cap: one call of a few minutes on an H100. The fp32
    # gradient accumulator does not fit with margin (planner, 8 x 1024, every block
    # checkpointed: 16.35 GiB; 1 x 1024: 15.53 GiB); a bf16 gradient buffer (one micro-batch
    # per step) is 2 bytes per parameter less: 13.90 GiB at 8 x 1024. The 14 GiB budget
    # leaves the rest of the cap to the allocator's fragmentation.
    "gpt2-1b": dict(
        micro_batch=8,
        steps=100,
        eval_every=50,
        eval_batches=10,
        lr=2e-4,
        eval_at_start=True,
        init_on_device=True,
        max_train_s=150.0,
        recipe_options={"toolkit_memory": {"grad_dtype": "bf16", "memory_budget_gib": 14.0}},
    ),
}
# Fields that only size the full run (quick mode keeps its tiny ones).
_FULL_ONLY = ("micro_batch", "seq_len", "accum", "steps", "eval_every", "eval_batches")


def size_for(quick: bool, model: str = "gpt2-small") -> TrainingSize:
    if model not in MODEL_RUNS:
        raise ValueError(f"--option model={model!r}: expected one of {sorted(MODEL_RUNS)}")
    run = MODEL_RUNS[model]
    if quick:
        size = TrainingSize("gpt2-tiny", 4, 64, 1, 6, 3, 2, 3, "byte", 60, 10)
        return replace(size, **{k: v for k, v in run.items() if k not in _FULL_ONLY})
    size = TrainingSize(model, 8, 1024, 1, 200, 100, 20, 20, "auto", None, 50)
    return replace(size, **run)


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


def recipe_case(size: TrainingSize, recipe: str, seed: int = 0) -> str:
    """The case name of a recipe run (seed 0 keeps the name earlier reports used)."""
    name = f"{size.model} {recipe} {size.micro_batch}x{size.seq_len}x{size.accum}"
    return name if seed == 0 else f"{name} seed{seed}"


def parse_value(text: str):
    """A ``--option`` value as int, float, bool (true/false) or text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text.strip()


def recipe_options_for(ctx: SuiteContext, size: TrainingSize, recipe: str) -> dict:
    """The size's options for ``recipe`` with ``--option <recipe>.<key>=value`` on top."""
    options = dict(size.recipe_options.get(recipe, {}))
    prefix = f"{recipe}."
    for key, value in ctx.options.items():
        if key.startswith(prefix):
            options[key[len(prefix) :]] = parse_value(value)
    return options


def _process_cap_gib(device: torch.device) -> float | None:
    """The per-process memory cap set on ``device`` (``--memory-cap``), in GiB, if any."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if device.type != "cuda" or getter is None:
        return None
    # The getter wants an index: "cuda" alone is refused.
    index = device.index if device.index is not None else torch.cuda.current_device()
    fraction = float(getter(index))
    if fraction >= 1.0:
        return None
    return fraction * torch.cuda.get_device_properties(index).total_memory / GIB


def curve_points(num_steps: int, evals: list[dict], points: int = 10) -> list[int]:
    """Steps at which the loss curve is reported: about ``points`` evenly spaced ones, the
    evaluation steps and the last step."""
    every = max(1, num_steps // points)
    steps = set(range(every, num_steps + 1, every)) | {e["step"] for e in evals}
    if num_steps:
        steps.add(num_steps)
    return sorted(steps)


def run_recipe(
    ctx: SuiteContext,
    recipe: str,
    size: TrainingSize,
    corpus,
    seed: int = 0,
    results: dict | None = None,
) -> None:
    """Train ``recipe`` with ``run_training`` and record it (``results[(recipe, seed)]``
    gets the final validation loss and tokens/s, for the cross-seed summary)."""
    from hybrid_triton.recipes import OptimConfig, planned_peak_bytes, run_training

    rec = ctx.recorder
    case = recipe_case(size, recipe, seed)
    options = recipe_options_for(ctx, size, recipe)
    optim = OptimConfig() if size.lr is None else OptimConfig(lr=size.lr)
    config = {
        "recipe": recipe,
        "model": size.model,
        "micro_batch": size.micro_batch,
        "seq_len": size.seq_len,
        "accum": size.accum,
        "steps": size.steps,
        "seed": seed,
        "lr": optim.lr,
        "phase": "full",
    }
    if options:
        config["recipe_options"] = options
    cap = _process_cap_gib(ctx.device)
    if cap is not None:
        config["memory_cap_gib"] = round(cap, 3)
    cfg = model_config(size, ctx.quick)
    # The planner's estimate first, so a run that runs out of memory has it beside its row.
    try:
        planned = planned_peak_bytes(recipe, cfg, size.micro_batch, size.seq_len, size.accum,
                                     options)  # fmt: skip
    except ValueError as err:  # a recipe the planner has no setup for
        planned = None
        ctx.log(f"{case}: no planner estimate ({err})")
    if planned is not None:
        rec.add(
            case,
            "planner",
            "peak_allocated",
            "GiB",
            planned / GIB,
            config=config,
            note="planner estimate of one training step (allocated; context apart)",
        )
    try:
        result = run_training(
            recipe,
            cfg,
            tokens=size.steps * size.tokens_per_step,
            micro_batch=size.micro_batch,
            accum=size.accum,
            seq_len=size.seq_len,
            eval_every=size.eval_every,
            seed=seed,
            corpus=corpus,
            device=ctx.device,
            optim=optim,
            eval_batches=size.eval_batches,
            recipe_options=options,
            init_device=ctx.device if size.init_on_device else None,
            eval_at_start=size.eval_at_start,
            max_train_s=size.max_train_s,
        )
    except Exception as err:
        status = STATUS_OOM if is_oom(err) else STATUS_ERROR
        if status == STATUS_ERROR:
            ctx.log(traceback.format_exc())
        rec.status(case, "measured", status, config=config, message=f"{type(err).__name__}: {err}")
        del err
        free_device_memory()
        return
    # What the recipe ran with, choices it made itself included (toolkit_memory's planned
    # checkpointing): every row of the case carries it.
    config["recipe_options"] = result.config.get("recipe_options", {})
    steps_done = len(result.step_loss)
    config["steps_done"] = steps_done
    timer = "cuda events" if ctx.device.type == "cuda" else "cpu perf_counter"
    steady = result.step_time_s[1:] or result.step_time_s  # the first step compiles/allocates
    rec.add(case, "measured", "train_time_s", "s", result.train_time_s, config=config, note=timer)
    rec.add(case, "measured", "tokens_per_s", "tok/s", result.tokens_per_s, config=config,
            note="whole run, evaluation left out")  # fmt: skip
    if steady:
        median_s = statistics.median(steady)
        rec.add(
            case,
            "measured",
            "step_time_ms",
            "ms",
            1e3 * median_s,
            config=config,
            note=f"median over steps 2..{len(result.step_time_s)}; {timer}",
        )
        rec.add(case, "measured", "tokens_per_s_steady", "tok/s", size.tokens_per_step / median_s,
                config=config, note="tokens per step / median step time (steps 2..)")  # fmt: skip
    if result.stopped_early:
        rec.add(
            case,
            "measured",
            "steps_done",
            "count",
            steps_done,
            config=config,
            note=f"stopped at max_train_s={size.max_train_s} s of {size.steps} planned",
        )
    rec.add(case, "measured", "final_train_loss", "nats", result.summary()["final_train_loss"],
            config=config)  # fmt: skip
    if result.evals:
        last = result.evals[-1]
        rec.add(case, "measured", "val_loss", "nats", last["val_loss"], config=config,
                note=f"after step {last['step']}")  # fmt: skip
        rec.add(case, "measured", "val_ppl", "", last["val_ppl"], config=config)
        if results is not None:
            results[(recipe, seed)] = {"val_loss": last["val_loss"],
                                       "tokens_per_s": result.tokens_per_s,
                                       "train_time_s": result.train_time_s,
                                       "curve": _eval_times(result)}  # fmt: skip
    peak = result.peak_memory_allocated
    rec.add(case, "measured", "peak_allocated", "GiB", None if peak is None else peak / GIB,
            config=config, note="whole run, build included" if peak is not None
            else "not measured on cpu")  # fmt: skip
    if result.peak_memory_train is not None:
        rec.add(case, "measured", "peak_allocated_train", "GiB", result.peak_memory_train / GIB,
                config=config, note="from the first training step on (the planner's "
                "estimate is of a step)")  # fmt: skip
        rec.add(case, "measured", "peak_allocated_build", "GiB", result.peak_memory_build / GIB,
                config=config, note="while the recipe was built")  # fmt: skip
        rec.add(case, "measured", "peak_reserved", "GiB", result.peak_memory_reserved / GIB,
                config=config, note="whole run: what a --memory-cap limits")  # fmt: skip
        if planned is not None:
            rec.add(
                case,
                "planner",
                "estimate_vs_measured_pct",
                "%",
                100.0 * (planned / result.peak_memory_train - 1.0),
                config=config,
                note="planner estimate / measured training peak - 1 (target within 5%)",
            )
    _record_curve(ctx, case, result, config)
    rec.status(case, "measured", STATUS_OK, config=config)
    del result
    free_device_memory()


def _record_curve(ctx: SuiteContext, case: str, result, config: dict) -> None:
    """The loss curve as rows of ``<case> [curve]``, provider ``step N``: the mean training
    loss over the steps since the previous point, and the validation loss where evaluated."""
    losses = result.step_loss
    evals = {e["step"]: e["val_loss"] for e in result.evals}
    previous = 0
    for step in sorted(set(curve_points(len(losses), result.evals)) | set(evals)):
        c = {**config, "step": step}
        if step > previous:
            window = losses[previous:step]
            ctx.recorder.add(f"{case} [curve]", f"step {step}", "train_loss", "nats",
                             sum(window) / len(window), config=c,
                             note=f"mean over steps {previous + 1}..{step}")  # fmt: skip
            previous = step
        if step in evals:
            ctx.recorder.add(f"{case} [curve]", f"step {step}", "val_loss", "nats", evals[step],
                             config=c)  # fmt: skip


def record_seed_summary(ctx: SuiteContext, size: TrainingSize, seeds, results: dict) -> None:
    """Across seeds: each recipe's mean and range of the final validation loss, and
    toolkit_memory's validation-loss gap and tokens/s ratio to baseline_bf16 per seed."""
    rec = ctx.recorder
    label = ",".join(str(s) for s in seeds)
    case = f"{size.model} {size.micro_batch}x{size.seq_len}x{size.accum} [seeds {label}]"
    recipes = list(dict.fromkeys(r for r, _ in results))
    for recipe in recipes:
        losses = [results[(recipe, s)]["val_loss"] for s in seeds if (recipe, s) in results]
        if not losses:
            continue
        config = {"recipe": recipe, "seeds": list(seeds), "runs": len(losses)}
        rec.add(case, recipe, "val_loss_mean", "nats", statistics.fmean(losses), config=config)
        rec.add(case, recipe, "val_loss_range", "nats", max(losses) - min(losses), config=config,
                note="max - min over the seeds")  # fmt: skip
    for seed in seeds:
        ours, ref = results.get(("toolkit_memory", seed)), results.get(("baseline_bf16", seed))
        if ours is None or ref is None:
            continue
        config = {"seed": seed}
        rec.add(
            case,
            f"seed {seed}",
            "val_gap_vs_bf16_pct",
            "%",
            100.0 * (ours["val_loss"] / ref["val_loss"] - 1.0),
            config=config,
            note="toolkit_memory / baseline_bf16 final validation loss - 1 (target <= 1%)",
        )
        rec.add(case, f"seed {seed}", "tokens_per_s_vs_bf16_pct", "%",
                100.0 * ours["tokens_per_s"] / ref["tokens_per_s"], config=config,
                note="toolkit_memory / baseline_bf16 tokens/s (target >= 70%)")  # fmt: skip


# ----------------------------------------------------------------------------- trainer run


# Trainer configurations by the name ``trainer_presets`` takes: a TrainerConfig preset, or
# "off" (the balanced preset with Predict off: the trainer's own setup, plain Full steps).
TRAINER_PRESET_ALIASES = {"off": "full_only"}


def parse_trainer_presets(text: str) -> list[str]:
    """``"off,balanced"`` -> ``["off", "balanced"]`` (each a preset name or an alias)."""
    from hybrid_triton.scheduler import PRESETS

    names = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    known = sorted({*PRESETS, *TRAINER_PRESET_ALIASES})
    unknown = [n for n in names if n not in PRESETS and n not in TRAINER_PRESET_ALIASES]
    if not names or unknown:
        raise ValueError(
            f"--option trainer_presets={text!r}: unknown {unknown}; expected names from {known}"
        )
    return names


def parse_trainer_overrides(text: str) -> dict:
    """``"field:value;field:value"`` -> ``{field: value}`` (values as ``parse_value``); the
    fields are checked against TrainerConfig (a clear error names a bad one)."""
    from hybrid_triton.scheduler import TrainerConfig

    overrides = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition(":")
        if not sep or not key.strip():
            raise ValueError(
                f"--option trainer_overrides={text!r}: expected field:value;field:value, got "
                f"{part!r}"
            )
        overrides[key.strip()] = parse_value(value)
    TrainerConfig.from_dict({"preset": "balanced", **overrides})  # validates names and values
    return overrides


def trainer_checkpoint_blocks(
    ctx: SuiteContext, size: TrainingSize, model_cfg, state_bits, grad_dtype: str = "auto"
) -> int:
    """Blocks the trainer case checkpoints (the first K): ``trainer_checkpointing`` is
    ``auto`` (GPU default: the toolkit_memory recipe's planned choice,
    :func:`hybrid_triton.recipes.plan_checkpoint_blocks` with its 4 GiB budget, so the trainer
    runs on top of configuration 3), ``all``, ``none`` (CPU default) or a block count."""
    default = "auto" if ctx.device.type == "cuda" else "none"
    text = str(ctx.options.get("trainer_checkpointing", default)).strip().lower()
    n_layer = model_cfg.n_layer
    if text == "auto":
        from hybrid_triton.recipes import plan_checkpoint_blocks, recipe_option_defaults

        opts = recipe_option_defaults("toolkit_memory")
        blocks, _ = plan_checkpoint_blocks(
            model_cfg,
            size.micro_batch,
            size.seq_len,
            size.accum,
            memory_budget_gib=opts["memory_budget_gib"],
            state_bits=state_bits,
            fused_loss=True,
            loss_chunk_tokens=opts["loss_chunk_tokens"],
            grad_dtype=grad_dtype,  # the trainer's gradient path, as the recipe's
        )
        return blocks
    if text == "all":
        return n_layer
    if text == "none":
        return 0
    try:
        blocks = int(text)
    except ValueError:
        blocks = -1
    if not 0 <= blocks <= n_layer:
        raise ValueError(
            f"--option trainer_checkpointing={text!r}: expected auto, all, none or a block count "
            f"in [0, {n_layer}]"
        )
    return blocks


# TrainerConfig.offload -> the planner's Predict moments policy.
PREDICT_MOMENTS_FOR_OFFLOAD = {
    "keep": "keep",
    "cpu": "offload",
    "pinned": "offload",
    "compress": "compress",
    "drop": "drop",
}


def trainer_planner_estimate(model_cfg, size: TrainingSize, tcfg, state_bits: int, blocks: int):
    """The planner's per-phase estimate of a trainer run of :func:`build_gpt2_trainer` (the
    ``hybrid`` preset: bf16 parameters, fp32 master, ``state_bits`` moments, the fused chunked
    loss, the first ``blocks`` blocks checkpointed) under ``tcfg``: its gradient path, its split
    of each step's ``size.micro_batch`` sequences into ``tcfg.micro_batches`` pieces (per-phase
    counts are not modelled) and its Predict moments policy."""
    pieces = tcfg.micro_batches
    from hybrid_triton.planner.estimate import estimate
    from hybrid_triton.planner.setup import setup_preset
    from hybrid_triton.planner.specs import gpt2_spec

    spec = gpt2_spec("gpt2", model_cfg.n_layer, model_cfg.n_embd, model_cfg.n_head,
                     model_cfg.vocab_size, model_cfg.block_size, bias=model_cfg.bias)  # fmt: skip
    setup = setup_preset(
        "hybrid",
        micro_batch=-(-size.micro_batch // pieces),
        seq_len=size.seq_len,
        accum_steps=pieces,
        state_bits=state_bits,
        checkpointing=blocks > 0,
        checkpoint_blocks=blocks,
        fused_loss=True,
        loss_chunk_tokens=model_cfg.loss_chunk_tokens,
        grad_mode="flat" if tcfg.resolved_grad_path() == "flat" else "hook",
        predict_moments=PREDICT_MOMENTS_FOR_OFFLOAD[tcfg.offload],
        phases=("warmup", "full", "predict", "correct") if tcfg.predict else ("warmup", "full"),
    )
    return estimate(spec, setup)


def _eval_times(result) -> list[tuple[int, float, float]]:
    """``(step, val_loss, training seconds up to that step)`` of a recipe run: the wall-clock
    training time (evaluation left out) split over the steps in proportion to their measured
    step times."""
    times = result.step_time_s
    total = sum(times)
    scale = result.train_time_s / total if total > 0 else 0.0
    out = []
    for e in result.evals:
        out.append((e["step"], e["val_loss"], scale * sum(times[: e["step"]])))
    return out


def run_trainer(ctx: SuiteContext, size: TrainingSize, corpus) -> None:
    """``HybridTrainer`` on GPT-2 in one or more configurations, then the baseline recipe once
    on the same steps and data, then a trade-off summary.

    Each configuration (``trainer_presets``, default ``trainer_preset`` or ``balanced``; "off"
    is the balanced preset with Predict off) is its own case (:func:`run_trainer_config`);
    ``trainer_overrides=field:value;...`` applies to every one. After the baseline
    (``trainer_baseline``, e.g. ``baseline_bf16``; default none), the case
    ``<model> hybrid_trainer trade-off <shape>`` has one provider per configuration: steps
    without backward (%), final validation loss and its gap to the baseline (%), tokens/s and
    the speedup over the baseline, rollbacks, and the training time to first reach the
    baseline's final validation loss (at the evaluation points, every ``eval_every`` steps)
    with the speedup over the baseline's own time to it.

    Options: ``steps``, ``eval_every`` (every run of the suite), ``trainer_presets``,
    ``trainer_preset`` (one), ``trainer_overrides``, ``trainer_warmup`` (the warm-up steps),
    ``trainer_state_bits`` (8), ``trainer_checkpointing`` (auto / all / none / K),
    ``trainer_decay`` (``matrices``: the recipes' weight decay, matrices and embeddings only,
    default; ``all``: every parameter), ``trainer_baseline``, ``trainer_seeds`` (``0,1``:
    each seed its own initialisation and data order, for every configuration and the
    baseline, with its own trade-off case; default 0).
    """
    presets = parse_trainer_presets(
        ctx.options.get("trainer_presets", ctx.options.get("trainer_preset", "balanced"))
    )
    overrides = parse_trainer_overrides(ctx.options.get("trainer_overrides", ""))
    baseline = ctx.option("trainer_baseline", "none")
    if baseline != "none":
        from hybrid_triton.recipes import RECIPES

        if baseline not in RECIPES:
            raise ValueError(
                f"--option trainer_baseline={baseline!r}: expected none or one of {sorted(RECIPES)}"
            )
    state_bits = ctx.option("trainer_state_bits", 8)
    # The trainer's gradient path (its config's; "auto": flat bf16 for one micro-batch) in the
    # recipe's terms, for the checkpoint plan (the first configuration's: presets do not set it).
    path = trainer_config_for(presets[0], dict(overrides)).resolved_grad_path()
    grad_dtype = "bf16" if path == "flat" else "fp32"

    blocks = trainer_checkpoint_blocks(
        ctx, size, model_config(size, ctx.quick), state_bits, grad_dtype
    )
    decay = ctx.options.get("trainer_decay", "matrices")
    if decay not in ("matrices", "all"):
        raise ValueError(f"--option trainer_decay={decay!r}: expected matrices or all")
    seeds = parse_seeds(str(ctx.options.get("trainer_seeds", "0")))
    for seed in seeds:
        runs = {}
        for preset in presets:
            runs[preset] = run_trainer_config(
                ctx, size, corpus, preset, overrides, state_bits, blocks, decay, seed
            )
        if baseline == "none":
            continue
        # Plain training on the same steps, data (train stream of this seed), initialisation
        # (this seed) and validation set.
        results: dict = {}
        run_recipe(ctx, baseline, size, corpus, seed=seed, results=results)
        record_trainer_tradeoff(ctx, size, runs, baseline, results.get((baseline, seed)), seed)


def record_trainer_tradeoff(
    ctx: SuiteContext,
    size: TrainingSize,
    runs: dict,
    baseline: str,
    base: dict | None,
    seed: int = 0,
) -> None:
    """The trade-off case: per trainer configuration against the baseline recipe."""
    rec = ctx.recorder
    case = f"{size.model} hybrid_trainer trade-off {size.micro_batch}x{size.seq_len}x{size.accum}"
    if seed:
        case += f" seed{seed}"
    if base is None:
        rec.status(case, baseline, STATUS_ERROR, message=f"the baseline {baseline} did not finish")
        return
    target = base["val_loss"]
    base_time = next((t for _, v, t in base["curve"] if v <= target), base["train_time_s"])
    config = {"baseline": baseline, "steps": size.steps, "eval_every": size.eval_every,
              "seed": seed}  # fmt: skip
    rec.add(case, baseline, "val_loss", "nats", target, config=config, note="final")
    rec.add(case, baseline, "tokens_per_s", "tok/s", base["tokens_per_s"], config=config)
    rec.add(case, baseline, "time_to_baseline_loss_s", "s", base_time, config=config,
            note="its own first evaluation at or below its final validation loss")  # fmt: skip
    lines = [
        f"trade-off vs {baseline} (val {target:.4f}, {base['tokens_per_s']:.0f} tok/s, "
        f"reaches it at {base_time:.1f} s):",
        f"{'config':<14}{'no-bwd %':>9}{'val':>8}{'gap %':>8}{'tok/s':>10}{'x tok/s':>8}"
        f"{'rollb':>6}{'reach s':>9}{'x reach':>8}",
    ]
    for label, run in runs.items():
        if run is None:
            rec.status(case, label, STATUS_ERROR, config=config, message="the run failed")
            continue
        c = {**config, "preset": label}
        gap = 100.0 * (run["val_loss"] / target - 1.0)
        speed = run["tokens_per_s"] / base["tokens_per_s"]
        reach = next((t for _, v, t in run["curve"] if v <= target), None)
        rec.add(case, label, "steps_without_backward_pct", "%", run["no_backward_pct"], config=c,
                note="Predict steps / all steps (rolled-back ones included)")  # fmt: skip
        rec.add(case, label, "val_loss", "nats", run["val_loss"], config=c, note="final")
        rec.add(case, label, "val_gap_pct", "%", gap, config=c,
                note=f"final validation loss / {baseline}'s - 1 (target <= 1%)")  # fmt: skip
        rec.add(case, label, "tokens_per_s", "tok/s", run["tokens_per_s"], config=c,
                note="evaluation left out")  # fmt: skip
        rec.add(case, label, "tokens_per_s_vs_baseline", "x", speed, config=c)
        rec.add(case, label, "rollbacks", "count", run["rollbacks"], config=c)
        rec.add(case, label, "time_to_baseline_loss_s", "s", reach, config=c,
                note=f"first evaluation (every {size.eval_every} steps) at or below the "
                f"baseline's final validation loss" + ("" if reach is not None
                                                       else ": not reached"))  # fmt: skip
        rec.add(case, label, "speedup_to_baseline_loss", "x",
                None if reach is None or reach <= 0 else base_time / reach, config=c,
                note="baseline's time to its final loss / this one's (target >= 1.2)")  # fmt: skip
        reach_s = "-" if reach is None else f"{reach:.1f}"
        x_reach = "-" if reach is None or reach <= 0 else f"{base_time / reach:.2f}"
        lines.append(
            f"{label:<14}{run['no_backward_pct']:>9.1f}{run['val_loss']:>8.4f}{gap:>8.2f}"
            f"{run['tokens_per_s']:>10.0f}{speed:>8.2f}{run['rollbacks']:>6d}{reach_s:>9}"
            f"{x_reach:>8}"
        )
    rec.status(case, "-", STATUS_OK, config=config)
    ctx.log("\n".join(lines))


def trainer_config_for(preset: str, settings: dict):
    """The TrainerConfig of ``preset`` (or an alias such as "off") with ``settings``; the
    parameters are bf16, which compute in bf16 without autocast (as the toolkit recipe), so
    the precision is "fp32" unless ``settings`` says otherwise."""
    from hybrid_triton.scheduler import TrainerConfig

    settings = {"precision": "fp32", **settings}
    return TrainerConfig.preset(TRAINER_PRESET_ALIASES.get(preset, preset), **settings)


def build_gpt2_trainer(
    model_cfg,
    tcfg,
    device: torch.device,
    optim,
    total_steps: int,
    state_bits: int = 8,
    checkpoint_blocks: int = 0,
    decay: str = "matrices",
    seed: int = 0,
):
    """``(HybridTrainer, GPT2)``: configuration 3 of issue 8 under the trainer: bf16
    parameters with fp32 master weights (from the fp32 initialisation of ``seed``), ``FusedAdamW``
    with ``state_bits`` moments and the recipes' optimizer settings (``optim``: betas, weight
    decay on matrices and embeddings only unless ``decay="all"``, clipping), the fused chunked
    loss, the first ``checkpoint_blocks`` blocks checkpointed."""
    from dataclasses import replace as dc_replace

    from hybrid_triton.models.gpt2 import GPT2
    from hybrid_triton.trainer import HybridTrainer

    torch.manual_seed(seed)
    model_cfg = dc_replace(model_cfg, activation_checkpointing=checkpoint_blocks > 0,
                           checkpoint_blocks=checkpoint_blocks, fused_loss=True)  # fmt: skip
    model = GPT2(model_cfg).to(device)
    fp32_init = {id(p): p.detach().clone() for p in model.parameters()}
    model.to(torch.bfloat16)  # the same Parameter objects, bf16 data
    trainer = HybridTrainer(
        model,
        lambda m, b: m(b[0], b[1])[1],
        config=tcfg,
        lr=optim.lr_at(0, total_steps),
        optimizer_kwargs={
            "betas": optim.betas,
            "weight_decay": optim.weight_decay,
            "max_grad_norm": optim.grad_clip if optim.grad_clip > 0 else None,
            "state_bits": state_bits,
        },
        decay_filter=(lambda n, p: p.dim() >= 2) if decay == "matrices" else None,
    )
    with torch.no_grad():  # the master starts from the fp32 initialisation, not its bf16
        for view, p in zip(trainer.group.views(trainer.master), trainer.group.params):
            view.copy_(fp32_init[id(p)])
    return trainer, model


def run_trainer_config(
    ctx: SuiteContext,
    size: TrainingSize,
    corpus,
    preset: str,
    overrides: dict,
    state_bits: int = 8,
    checkpoint_blocks: int = 0,
    decay: str = "matrices",
    seed: int = 0,
) -> dict | None:
    """One ``HybridTrainer`` run (``preset``, or "off") on GPT-2 with bf16 parameters and
    fp32 master weights (``FusedAdamW``, ``trainer_state_bits`` moments, the fused chunked
    loss and the planned activation checkpointing of the toolkit_memory recipe, the recipes'
    weight decay on matrices and embeddings only): configuration 3 of issue 8, under the
    phases, trained for ``steps`` steps with the validation loss every ``eval_every`` steps
    (evaluation left out of the timing).

    Records: wall clock and tokens/s, the validation curve (``[curve]`` rows with the training
    time at each point) and final validation loss, the fraction of steps without backward
    (Predict), steps and entries per phase, rollbacks, per-phase peak allocated memory from the
    trainer's own counters (CUDA; reset at every phase boundary, each phase's entry work apart
    as ``enter:<phase>``), median step time per phase, the first Correct step after Predict
    against the median Full step (and against the other Correct steps: the exposed cost of the
    restore), and the restore's hidden fraction. Returns the figures the trade-off needs, or
    None when the run failed."""
    rec = ctx.recorder
    blocks = checkpoint_blocks
    on_gpu = ctx.device.type == "cuda"
    case = f"{size.model} hybrid_trainer {preset} {size.micro_batch}x{size.seq_len}x{size.accum}"
    if overrides:
        case += " " + ",".join(f"{k}={v}" for k, v in overrides.items())
    if seed:
        case += f" seed{seed}"
    outlier_every = ctx.option("trainer_outlier_every", 0)
    if outlier_every < 0:
        raise ValueError(f"--option trainer_outlier_every={outlier_every}: expected >= 0")
    if outlier_every:
        case += f" outliers/{outlier_every}"
    config = {"runner": "HybridTrainer", "preset": preset, "model": size.model,
              "micro_batch": size.micro_batch, "seq_len": size.seq_len, "steps": size.steps,
              "state_bits": state_bits, "params": "bf16 + fp32 master", "fused_loss": True,
              "weight_decay_on": decay, "eval_every": size.eval_every,
              "checkpoint_blocks": blocks, "seed": seed}  # fmt: skip
    if overrides:
        config["overrides"] = overrides
    if outlier_every:
        config["outlier_every"] = outlier_every
    try:
        from hybrid_triton.data import TokenStream
        from hybrid_triton.recipes import OptimConfig, evaluate
        from hybrid_triton.trainer import HybridTrainer  # noqa: F401 (is the trainer there?)
    except ImportError as err:
        rec.status(case, "measured", "skipped", config=config, message=f"no trainer yet: {err}")
        return None
    device = ctx.device
    try:
        base_cfg = model_config(size, ctx.quick)
        settings = {}
        if "trainer_warmup" in ctx.options:
            settings["warmup_steps"] = ctx.option("trainer_warmup", 100)
        if ctx.quick:  # a few steps: short phases so that the run is more than a warm-up
            settings.update(warmup_steps=2, full_steps=2, min_predict_steps=1,
                            max_predict_steps=2, correct_steps=1)  # fmt: skip
        settings.update(overrides)
        tcfg = trainer_config_for(preset, settings)
        config["trainer_config"] = {k: v for k, v in tcfg.to_dict().items()
                                    if k not in ("metrics_path", "progress")}  # fmt: skip
        optim = OptimConfig() if size.lr is None else OptimConfig(lr=size.lr)
        trainer, model = build_gpt2_trainer(
            base_cfg, tcfg, device, optim, size.steps, state_bits, blocks, decay, seed
        )
        config["grad_path"] = trainer.grad_path
        trainer.restart_memory_peak()  # the build's fp32 initialisation copy is gone now
        try:
            plan = trainer_planner_estimate(base_cfg, size, tcfg, state_bits, blocks)
            plan_note = "planner estimate of the phase's peak (allocated; entry work apart)"
            if tcfg.lookahead > 0 and tcfg.offload in ("cpu", "pinned"):
                plan_note += (
                    f"; lookahead {tcfg.lookahead}: moments back during the last Predict "
                    "steps, not modelled"
                )
        except ValueError as err:
            plan = None
            ctx.log(f"{case}: no planner estimate ({err})")
        train = TokenStream(
            "train", size.micro_batch, size.seq_len, seed, corpus=corpus, device=device
        )
        val = TokenStream("val", size.micro_batch, size.seq_len, corpus=corpus, shuffle=False,
                          device=device)  # fmt: skip
        val_set = list(
            val.take(min(size.eval_batches, max(1, val.num_windows // size.micro_batch)))
        )
        probe = MemoryProbe(device) if not on_gpu else None
        cpu_peaks: dict[str, int] = {}
        curve: list[tuple[int, float, float]] = []  # (step, val loss, training seconds)
        elapsed = 0.0
        _sync(device)
        start = time.perf_counter()
        for i in range(size.steps):
            # Set before the step: a Predict phase freezes the rate of its entry step.
            trainer.optimizer.param_groups[0]["lr"] = optim.lr_at(i, size.steps)
            batch = train.batch(i)
            if outlier_every and i % outlier_every == outlier_every - 1:
                batch = outlier_batch(batch, base_cfg.vocab_size, seed * 1_000_003 + i)
            if probe is None:  # CUDA: the trainer's own per-phase peak counters
                trainer.step(batch)
            else:
                with probe.phase("step", resident=()):
                    out = trainer.step(batch)
                phase = str(out["phase"])
                cpu_peaks[phase] = max(
                    cpu_peaks.get(phase, 0), probe.results.pop("step").peak_allocated
                )
            done = i + 1
            if done % size.eval_every == 0 or done == size.steps:
                # The current weights are the bf16 ones in every phase (Predict moves them in
                # place); the evaluation and its syncs stay out of the training time.
                _sync(device)
                elapsed += time.perf_counter() - start
                curve.append((done, evaluate(model, val_set), elapsed))
                _sync(device)
                start = time.perf_counter()
        trainer.flush()
        summary = trainer.summary()
        val_loss = curve[-1][1]
        trainer.close()
    except Exception as err:
        status = STATUS_OOM if is_oom(err) else STATUS_ERROR
        if status == STATUS_ERROR:
            ctx.log(traceback.format_exc())
        rec.status(case, "measured", status, config=config, message=f"{type(err).__name__}: {err}")
        free_device_memory()
        return None
    tokens = size.steps * size.tokens_per_step
    counts = summary["phase_steps"]
    timer_note = "wall clock, evaluation left out"
    if not on_gpu:
        timer_note += ", includes the cpu memory probe"
    rec.add(case, "measured", "train_time_s", "s", elapsed, config=config, note=timer_note)
    rec.add(case, "measured", "tokens_per_s", "tok/s", tokens / elapsed, config=config)
    rec.add(case, "measured", "val_loss", "nats", val_loss, config=config,
            note=f"after step {size.steps}")  # fmt: skip
    rec.add(case, "measured", "val_ppl", "", math.exp(min(val_loss, 700.0)), config=config)
    for step, loss, seconds in curve:
        c = {**config, "step": step}
        rec.add(f"{case} [curve]", f"step {step}", "val_loss", "nats", loss, config=c)
        rec.add(f"{case} [curve]", f"step {step}", "train_time_s", "s", seconds, config=c,
                note="training time up to this step, evaluation left out")  # fmt: skip
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
    rec.add(case, "measured", "predict_steps_rolled_back", "count",
            summary["predict_steps_rolled_back"], config=config,
            note="Predict steps whose updates a rollback discarded (counted in the "
            "steps without backward)")  # fmt: skip
    if on_gpu:
        peaks = {k: v["allocated"] for k, v in summary["phase_peaks"].items()}
        note = "torch.cuda.max_memory_allocated, reset at each phase boundary"
    else:
        peaks, note = cpu_peaks, "cpu: tensors allocated during the step only"
    for phase, peak in peaks.items():
        c = {**config, "phase": phase, "phase_steps": counts.get(phase, 0)}
        rec.add(f"{case} [{phase}]", "measured", "peak_allocated", "GiB", peak / GIB, config=c,
                note=note)  # fmt: skip
        planned = plan.phases.get(phase) if plan is not None else None
        if planned is not None and on_gpu:
            rec.add(f"{case} [{phase}]", "planner", "peak_allocated", "GiB",
                    planned.peak_bytes / GIB, config=c, note=plan_note)  # fmt: skip
            rec.add(f"{case} [{phase}]", "measured", "estimate_vs_measured_pct", "%",
                    100.0 * (planned.peak_bytes / peak - 1.0), config=c,
                    note="planner estimate / measured phase peak - 1 (target: 5%)")  # fmt: skip
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
        mean = summary["step_ms_mean"].get(phase)
        if mean is not None:
            rec.add(f"{case} [{phase}]", "measured", "step_time_mean_ms", "ms", mean,
                    config=config, note=f"mean; {timer}; Full: includes the dynamics "
                    "model's training update, one Full step in train_every")  # fmt: skip
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
    return {
        "val_loss": val_loss,
        "tokens_per_s": tokens / elapsed,
        "no_backward_pct": 100.0 * no_backward,
        "rollbacks": int(summary["rollbacks"]),
        "curve": curve,
    }


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


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1"`` -> ``(0, 1)``; a clear error otherwise."""
    try:
        seeds = tuple(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise ValueError(
            f"--option seeds={text!r}: expected integers separated by commas"
        ) from None
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--option seeds={text!r}: expected integers >= 0")
    return seeds


def outlier_batch(batch, vocab_size: int, seed: int):
    """An injected outlier batch (``--option trainer_outlier_every=N``): the same inputs with
    uniformly random targets, so its loss is about ``ln(vocab_size)`` and its gradient large,
    as a corrupted shard of data would be. Seeded: the same batch in every run."""
    x, y = batch
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randint(0, vocab_size, tuple(y.shape), generator=gen).to(y.device, y.dtype)
    return x, noise


def run(ctx: SuiteContext) -> None:
    from hybrid_triton.recipes import RECIPES

    size = size_for(ctx.quick, ctx.option("model", "gpt2-small"))
    if "steps" in ctx.options:  # e.g. the 2,000-step trainer proof
        size = replace(size, steps=ctx.option("steps", size.steps))
    if "lr" in ctx.options:
        size = replace(size, lr=ctx.option("lr", 0.0))
    if "max_train_s" in ctx.options:
        size = replace(size, max_train_s=ctx.option("max_train_s", 0.0))
    if "eval_every" in ctx.options:  # validation points (recipes and trainer alike)
        size = replace(size, eval_every=ctx.option("eval_every", 1))
        if size.eval_every < 1:
            raise ValueError(f"--option eval_every={size.eval_every}: expected an int >= 1")
    seeds = parse_seeds(ctx.options.get("seeds", "0"))
    recipes = list(RECIPES)
    if "recipes" in ctx.options:
        recipes = [r.strip() for r in ctx.options["recipes"].split(",") if r.strip()]
        unknown = sorted(set(recipes) - set(RECIPES))
        if unknown or not recipes:
            raise ValueError(
                f"--option recipes={ctx.options['recipes']!r}: unknown {unknown}; expected "
                f"names from {sorted(RECIPES)}"
            )
    for key in ctx.options:  # a recipe option for a recipe that does not exist
        name, dot, _ = key.partition(".")
        if dot and name not in RECIPES:
            raise ValueError(
                f"--option {key}: no recipe {name!r}; expected one of {sorted(RECIPES)}"
            )
    corpus = _corpus(size)
    results: dict = {}
    jobs = [
        (
            f"recipe {name}" + (f" seed {seed}" if seed else ""),
            lambda n=name, s=seed: _on_reference_path(ctx, run_recipe, n, size, corpus, s, results),
        )
        for seed in seeds
        for name in recipes
    ]
    if len(seeds) > 1:
        jobs.append(
            ("recipe seeds summary", lambda: record_seed_summary(ctx, size, seeds, results))
        )
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
