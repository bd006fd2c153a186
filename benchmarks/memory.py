"""The ``memory`` suite: measured peak memory per phase beside the planner's estimate.

For each configuration (model × precision setup × optimizer-state bits × checkpointing ×
micro-batch × sequence length) it builds the model, runs a few real training steps per phase
with :class:`~hybrid_triton.bench.probes.MemoryProbe` (peak statistics reset at each phase
boundary), and records beside the measurement the planner's estimate for the same setup
(``hybrid_triton.planner.estimate``), per phase and per component. Then the savings of every
configuration against the plain fp32 and the bf16-autocast baselines of the same model and
batch, measured and estimated side by side. A configuration that runs out of memory is
recorded as ``oom`` with its estimate beside it, and the suite goes on.

How each setup is run (the planner's ``SETUP_PRESETS``):

- ``fp32``, ``bf16-autocast``: the baseline recipes of ``hybrid_triton.recipes``
  (``torch.optim.AdamW``, fused on CUDA); one phase, Full.
- ``bf16-master``, ``hybrid``: ``HybridTrainer`` (bf16 parameters, fp32 master weights in
  the arena, hook-folded fp32 gradient accumulator, the toolkit's ``FusedAdamW`` with the
  configuration's state bits), with short phases so that one run goes Warmup → Full →
  Predict → Correct; every step is measured and the peak of each phase kept.

Records (``provider`` / ``metric``): ``measured`` / ``peak_allocated``, ``peak_reserved``,
``inactive_split_peak``, ``device_used`` ... per ``case = "<config> [<phase>]"``;
``planner`` / ``total`` and ``component:<name>`` (GiB); ``traced`` / ``total`` (the planner's
fake-tensor trace of the real module, baseline setups); ``measured``/``planner`` /
``saving_vs_fp32``, ``saving_vs_bf16-autocast`` (%) per ``"<config> [peak]"``.
With ``--memory-cap GiB``: ``fits_cap`` (1 or 0), measured and planned.
The CUDA step itself is not timed here (the training suite does that).
"""

from __future__ import annotations

import math
import sys
import traceback
from dataclasses import dataclass, replace

import pandas as pd
import torch

from hybrid_triton.bench.probes import MemoryProbe, PhaseMemory, free_device_memory, is_oom
from hybrid_triton.bench.results import STATUS_ERROR, STATUS_OK, STATUS_OOM
from hybrid_triton.bench.runner import SuiteContext, reference_path_on_cpu

GIB = 2**30
BASELINES = ("fp32", "bf16-autocast")
RECIPE_FOR_SETUP = {"fp32": "baseline_fp32", "bf16-autocast": "baseline_bf16"}
TRAINER_PHASES = ("warmup", "full", "predict", "correct")


@dataclass(frozen=True)
class MemoryConfig:
    model: str  # a label; ``model_args`` builds it
    model_args: tuple[tuple[str, int], ...]  # GPT2Config fields (n_layer, n_head, ...)
    setup: str  # a planner setup preset
    state_bits: int
    checkpointing: bool
    micro_batch: int
    seq_len: int

    @property
    def label(self) -> str:
        ckpt = " ckpt" if self.checkpointing else ""
        return (
            f"{self.model} {self.setup} {self.state_bits}b{ckpt} {self.micro_batch}x{self.seq_len}"
        )

    @property
    def baseline_key(self) -> tuple:
        return (self.model, self.micro_batch, self.seq_len)

    def as_config(self) -> dict:
        return {
            "model": self.model,
            **dict(self.model_args),
            "setup": self.setup,
            "state_bits": self.state_bits,
            "checkpointing": self.checkpointing,
            "micro_batch": self.micro_batch,
            "seq_len": self.seq_len,
        }


def _model_args(name: str, **overrides: int) -> tuple[tuple[str, int], ...]:
    from hybrid_triton.models.gpt2 import PRESETS

    base = PRESETS[name]
    fields = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
    args = {f: getattr(base, f) for f in fields}
    args.update(overrides)
    return tuple(args.items())


def configurations(quick: bool) -> list[MemoryConfig]:
    """The matrix. Quick: a micro GPT-2 (small vocabulary, short context) on any machine.
    Full (a GPU): GPT-2 small and medium at the sizes of the planner issue."""
    if quick:
        models = [("gpt2-micro", _model_args("gpt2-tiny", vocab_size=512, block_size=64))]
        shapes = [(2, 64)]
        setups = [
            ("fp32", 32, False),
            ("bf16-autocast", 32, False),
            ("fp32", 32, True),
            ("hybrid", 8, True),
        ]
    else:
        models = [(name, _model_args(name)) for name in ("gpt2-small", "gpt2-medium")]
        shapes = [(8, 1024), (16, 1024)]
        setups = [
            ("fp32", 32, False),
            ("bf16-autocast", 32, False),
            ("bf16-autocast", 32, True),
            ("bf16-master", 32, False),
            ("bf16-master", 8, True),
            ("hybrid", 8, True),
            ("hybrid", 4, True),
        ]
    return [
        MemoryConfig(model, args, setup, bits, ckpt, b, t)
        for model, args in models
        for b, t in shapes
        for setup, bits, ckpt in setups
    ]


# ----------------------------------------------------------------------------- planner


def planner_setup(cfg: MemoryConfig, device: torch.device):
    from hybrid_triton.planner.setup import setup_preset

    trainer = cfg.setup not in RECIPE_FOR_SETUP
    return setup_preset(
        cfg.setup,
        micro_batch=cfg.micro_batch,
        seq_len=cfg.seq_len,
        checkpointing=cfg.checkpointing,
        state_bits=cfg.state_bits,
        phases=TRAINER_PHASES if trainer else ("full",),
        # On CUDA the trainer's Predict moves the moments to pinned host memory.
        predict_moments="offload" if device.type == "cuda" else "keep",
    )


def planner_estimate(cfg: MemoryConfig, device: torch.device):
    from hybrid_triton.planner.estimate import estimate
    from hybrid_triton.planner.specs import gpt2_spec

    args = dict(cfg.model_args)
    spec = gpt2_spec(cfg.model, args["n_layer"], args["n_embd"], args["n_head"],
                     vocab_size=args["vocab_size"], block_size=args["block_size"])  # fmt: skip
    return estimate(spec, planner_setup(cfg, device))


def traced_peak(cfg: MemoryConfig, device: torch.device) -> int:
    """The planner's traced mode: the real module's step under fake tensors (no memory, no
    GPU), built on the meta device; baseline setups only (torch's own optimizer)."""
    from hybrid_triton.models.gpt2 import GPT2
    from hybrid_triton.planner.traced import trace_step

    with torch.device("meta"):
        module = GPT2(_gpt2_config(cfg))
    return trace_step(module, planner_setup(cfg, device)).peak_bytes


# ----------------------------------------------------------------------------- measuring


def _gpt2_config(cfg: MemoryConfig):
    from hybrid_triton.models.gpt2 import GPT2Config

    return GPT2Config(**dict(cfg.model_args), activation_checkpointing=cfg.checkpointing)


def _batch(cfg: MemoryConfig, device: torch.device, vocab: int):
    x = torch.randint(0, vocab, (cfg.micro_batch, cfg.seq_len), device=device)
    y = torch.randint(0, vocab, (cfg.micro_batch, cfg.seq_len), device=device)
    return x, y


def measure_recipe(
    cfg: MemoryConfig, device: torch.device, steps: int, probe: MemoryProbe
) -> dict[str, PhaseMemory]:
    """Full-phase peak of a baseline recipe: one warm-up step (the optimizer allocates its
    state lazily), then ``steps`` measured steps; the highest is kept."""
    from hybrid_triton.recipes import build_recipe

    probe.exclude_current_tensors()
    model_cfg = _gpt2_config(cfg)
    parts = build_recipe(RECIPE_FOR_SETUP[cfg.setup], model_cfg, device)
    x, y = _batch(cfg, device, model_cfg.vocab_size)
    parts.step([(x, y)], 1e-4)
    peaks: dict[str, PhaseMemory] = {}
    for _ in range(steps):
        with probe.phase("full"):
            parts.step([(x, y)], 1e-4)
        _keep_max(peaks, probe.results["full"])
    return peaks


def measure_trainer(
    cfg: MemoryConfig, device: torch.device, steps_per_phase: int, probe: MemoryProbe
) -> dict[str, PhaseMemory]:
    """Per-phase peaks of ``HybridTrainer`` over one Warmup → Full → Predict → Correct run;
    each step is measured and the highest step of each phase kept."""
    from hybrid_triton.models.gpt2 import GPT2
    from hybrid_triton.scheduler import TrainerConfig
    from hybrid_triton.trainer import HybridTrainer, TrendDynamics

    class _AlwaysConfident(TrendDynamics):
        # Memory is what is measured here, not the quality of predictions: enter Predict as
        # soon as Full ends, so that one short run visits every phase.
        def confidence(self) -> float:
            return 1.0

    probe.exclude_current_tensors()  # CPU: what earlier suites left alive is not this run's
    model_cfg = _gpt2_config(cfg)
    model = GPT2(model_cfg).to(device=device, dtype=torch.bfloat16)
    n = max(2, steps_per_phase)
    config = TrainerConfig(
        warmup_steps=n,
        full_steps=n,
        min_predict_steps=n,
        max_predict_steps=n,
        correct_steps=n,
        confidence_threshold=0.5,
        max_consecutive_predicts=1,
        precision="fp32",  # bf16 parameters compute in bf16 without autocast
        offload="pinned" if device.type == "cuda" else "keep",
        host_lag=1,
    )
    trainer = HybridTrainer(
        model,
        lambda m, batch: m(batch[0], batch[1])[1],
        config=config,
        optimizer_kwargs={"state_bits": cfg.state_bits},
    )
    trainer.dynamics = _AlwaysConfident(trainer.num_groups, device)
    batch = _batch(cfg, device, model_cfg.vocab_size)
    peaks: dict[str, PhaseMemory] = {}
    try:
        for _ in range(4 * n + 2):
            with probe.phase("step"):
                out = trainer.step(batch)
            _keep_max(peaks, replace(probe.results.pop("step"), phase=str(out["phase"])))
            if all(p in peaks for p in TRAINER_PHASES):
                break
    finally:
        trainer.close()
    return peaks


def _keep_max(peaks: dict[str, PhaseMemory], result: PhaseMemory) -> None:
    best = peaks.get(result.phase)
    if best is None or result.peak_allocated > best.peak_allocated:
        peaks[result.phase] = result


# ----------------------------------------------------------------------------- the suite


def _record_estimate(ctx: SuiteContext, cfg: MemoryConfig, est, config: dict) -> None:
    rec = ctx.recorder
    for phase, p in est.phases.items():
        case = f"{cfg.label} [{phase}]"
        c = {**config, "phase": phase}
        rec.add(case, "planner", "total", "GiB", p.peak_bytes / GIB, config=c,
                note=f"peak at {p.peak_at}")  # fmt: skip
        for name, nbytes in p.components.items():
            if nbytes:
                rec.add(case, "planner", f"component:{name}", "GiB", nbytes / GIB, config=c)
        rec.add(case, "planner", "segment_slack", "GiB", p.segment_slack_bytes / GIB, config=c)


def _record_measured(ctx: SuiteContext, cfg: MemoryConfig, peaks, config: dict) -> None:
    for phase, result in peaks.items():
        case = f"{cfg.label} [{phase}]"
        for metric, unit, value, note in result.as_metrics():
            ctx.recorder.add(case, "measured", metric, unit, value,
                             config={**config, "phase": phase}, note=note)  # fmt: skip


def run_config(ctx: SuiteContext, cfg: MemoryConfig) -> tuple[float | None, float | None]:
    """Measure one configuration; returns (measured peak, estimated peak) in GiB."""
    rec = ctx.recorder
    config = cfg.as_config()
    if ctx.memory_cap_gib is not None:
        config["memory_cap_gib"] = ctx.memory_cap_gib
    est_peak = None
    est = None
    try:
        est = planner_estimate(cfg, ctx.device)
        est_peak = est.peak_bytes / GIB
        _record_estimate(ctx, cfg, est, config)
    except Exception as err:
        rec.status(cfg.label, "planner", STATUS_ERROR, config=config,
                   message=f"{type(err).__name__}: {err}")  # fmt: skip
    if cfg.setup in RECIPE_FOR_SETUP and not cfg.checkpointing:
        try:
            traced = traced_peak(cfg, ctx.device)
            rec.add(f"{cfg.label} [full]", "traced", "total", "GiB", traced / GIB,
                    config={**config, "phase": "full"},
                    note="planner traced mode: fake tensors, CPU kernels' allocations")  # fmt: skip
        except Exception as err:
            rec.status(cfg.label, "traced", STATUS_ERROR, config=config,
                       message=f"{type(err).__name__}: {err}")  # fmt: skip
    probe = MemoryProbe(ctx.device, snapshot_dir=ctx.snapshot_dir)
    steps = 1 if ctx.quick else 3
    measured_peak = None
    try:
        if cfg.setup in RECIPE_FOR_SETUP:
            peaks = measure_recipe(cfg, ctx.device, steps, probe)
        else:
            with reference_path_on_cpu(ctx.device) as impl:
                config["impl"] = impl
                peaks = measure_trainer(cfg, ctx.device, steps, probe)
        _record_measured(ctx, cfg, peaks, config)
        measured_peak = max(p.peak_allocated for p in peaks.values()) / GIB
        missing = [p for p in (est.phases if est else ()) if p not in peaks]
        note = f"phases not reached: {', '.join(missing)}" if missing else ""
        rec.status(cfg.label, "measured", STATUS_OK, config=config, message=note)
    except Exception as err:
        status = STATUS_OOM if is_oom(err) else STATUS_ERROR
        if status == STATUS_ERROR:
            ctx.log(f"{cfg.label}: {traceback.format_exc()}")
        message = f"{type(err).__name__}: {err}"
        if est_peak is not None:
            message += f" (planner estimate: {est_peak:.2f} GiB allocated peak)"
        rec.status(cfg.label, "measured", status, config=config, message=message)
    finally:
        free_device_memory()
    if ctx.memory_cap_gib is not None:
        fits = (
            None
            if measured_peak is None and status_is_error(rec, cfg.label)
            else (1.0 if measured_peak is not None else 0.0)
        )
        rec.add(f"{cfg.label} [peak]", "measured", "fits_cap", "bool", fits, config=config)
        if est is not None:
            planned = 1.0 if est.device_bytes() <= ctx.memory_cap_gib * GIB else 0.0
            note = "allocated peak + segment slack + CUDA context"
            rec.add(f"{cfg.label} [peak]", "planner", "fits_cap", "bool", planned,
                    config=config, note=note)  # fmt: skip
    return measured_peak, est_peak


def status_is_error(rec, label: str) -> bool:
    for row in reversed(rec.rows):
        if row["case"] == label and row["metric"] == "status" and row["provider"] == "measured":
            return row["note"].startswith(STATUS_ERROR)
    return False


def record_savings(ctx: SuiteContext, peaks: dict[MemoryConfig, tuple]) -> None:
    """Savings of each configuration's peak against the fp32 and bf16-autocast baselines
    (same model, batch and sequence length, no checkpointing), measured and estimated."""
    base: dict[tuple, dict[str, tuple]] = {}
    for cfg, values in peaks.items():
        if cfg.setup in BASELINES and not cfg.checkpointing:
            base.setdefault(cfg.baseline_key, {})[cfg.setup] = values
    for cfg, (measured, estimated) in peaks.items():
        for name, (b_measured, b_estimated) in base.get(cfg.baseline_key, {}).items():
            case = f"{cfg.label} [peak]"
            config = {**cfg.as_config(), "baseline": name}
            for provider, value, ref in (
                ("measured", measured, b_measured),
                ("planner", estimated, b_estimated),
            ):
                saving = 100.0 * (1.0 - value / ref) if value is not None and ref else None
                ctx.recorder.add(case, provider, f"saving_vs_{name}", "%", saving, config=config)


def run(ctx: SuiteContext) -> None:
    configs = [c for c in configurations(ctx.quick) if ctx.selected(c.label)]
    peaks: dict[MemoryConfig, tuple] = {}
    for cfg in ctx.bar(configs, total=len(configs), desc="memory"):
        peaks[cfg] = run_config(ctx, cfg)
    record_savings(ctx, peaks)


def summary(df: pd.DataFrame) -> str:
    """Measured vs estimated allocated peak per configuration and phase (GiB)."""
    measured = df[(df["provider"] == "measured") & (df["metric"] == "peak_allocated")]
    planned = df[(df["provider"] == "planner") & (df["metric"] == "total")]
    traced = df[(df["provider"] == "traced") & (df["metric"] == "total")]
    tr = traced.groupby("case", sort=False)["value"].first()
    m = measured.groupby("case", sort=False)["value"].first()
    p = planned.groupby("case", sort=False)["value"].first()
    on_cpu = bool(len(df)) and str(df["device"].iloc[0]).startswith("cpu")
    footer = "(GiB allocated; error = planner vs measured)"
    if on_cpu:
        # The planner models CUDA: its workspace (cuBLAS) does not exist on CPU.
        work = df[(df["provider"] == "planner") & (df["metric"] == "component:workspace")]
        p = p.sub(work.groupby("case", sort=False)["value"].first(), fill_value=0.0)
        footer += "; on CPU the planner's CUDA workspace is left out of its figure"
    cases = list(dict.fromkeys([*p.index, *m.index]))
    if not cases:
        return "(no memory measurements)"
    lines = [
        f"{'configuration [phase]':<56} {'measured':>9} {'planner':>9} {'error':>7} {'traced':>9}"
    ]
    for case in cases:
        mv, pv = m.get(case, math.nan), p.get(case, math.nan)
        err = 100.0 * (pv - mv) / mv if mv and not math.isnan(mv) else math.nan
        tv = tr.get(case, math.nan)
        lines.append(f"{case[:56]:<56} {mv:>9.4g} {pv:>9.4g} {err:>6.1f}% {tv:>9.4g}")
    return "\n".join(lines) + "\n" + footer


if __name__ == "__main__":
    from hybrid_triton.bench.cli import main

    sys.exit(main(["memory", *sys.argv[1:]]))
