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
With ``--memory-cap 8,16,24``, each configuration is then checked under each cap
(``torch.cuda.set_per_process_memory_fraction``), case ``"<config> [cap <GiB> GiB]"``:
``measured`` / ``fits_cap`` (1: ran, 0: out of memory; ``config.how`` says whether a capped
run decided it or the uncapped run already did, see ``derived_cap_verdict``), ``planner`` /
``fits_cap`` (estimated reserved peak <= cap) and ``fit_agrees``; one ``"cap checks"`` row
``fit_agreement_pct`` sums them up. An OOM under a cap is caught, the cap lifted, memory
freed, and the next check runs.

The planner is asked with the allocator this process runs under (``process_allocator``:
``PYTORCH_CUDA_ALLOC_CONF`` with ``expandable_segments:True`` is "expandable", anything else
"native"), recorded in every row's config (``allocator``, ``alloc_conf``) and in the notes of
the cap rows, so a run under expandable segments checks that model against real capped runs
(``benchmarks/run_gpu.sh``: ``MEMORY_ALLOC_CONF``). ``benchmarks/recheck_caps.py REPORT_DIR``
recomputes the planner's verdicts against a report's recorded outcomes offline.

Options (``--option KEY=VALUE``): ``traced=auto|all|none`` (auto: the traced mode for the
quick model and GPT-2 small, not medium), ``config_timeout=SECONDS`` (each configuration's
real run and each capped run under its own limit; full default 150, 0 = none),
``steps=N`` (measured steps per phase), ``cap_runs=needed|all``, ``grad_path=flat|hooks``
(the trainer setups' gradient path, ``TrainerConfig.grad_path``; default flat). With
``$HYBRID_TRITON_PARTIAL_CSV`` set, the rows so far are written there after each
configuration, so an outer time limit loses only the configuration it interrupts.
The CUDA step itself is not timed here (the training suite does that).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, replace

import pandas as pd
import torch

from hybrid_triton.bench.probes import (
    MemoryProbe,
    PhaseMemory,
    free_device_memory,
    is_oom,
    memory_cap,
)
from hybrid_triton.bench.results import STATUS_ERROR, STATUS_OK, STATUS_OOM
from hybrid_triton.bench.runner import (
    CaseTimeout,
    SuiteContext,
    reference_path_on_cpu,
    time_limit,
)

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
    # HybridTrainer's gradient path (trainer setups; TrainerConfig.grad_path): "flat", its
    # default for one micro-batch, or "hooks". Reports made before this field ran "hooks".
    grad_path: str = "flat"

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
            "grad_path": self.grad_path,
        }


def _model_args(name: str, **overrides: int) -> tuple[tuple[str, int], ...]:
    from hybrid_triton.models.gpt2 import PRESETS

    base = PRESETS[name]
    fields = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
    args = {f: getattr(base, f) for f in fields}
    args.update(overrides)
    return tuple(args.items())


def configurations(quick: bool, grad_path: str = "flat") -> list[MemoryConfig]:
    """The matrix. Quick: a micro GPT-2 (small vocabulary, short context) on any machine.
    Full (a GPU): GPT-2 small and medium at the sizes of the planner issue. ``grad_path``:
    the trainer setups' gradient path ("flat" or "hooks")."""
    if grad_path not in ("flat", "hooks"):
        raise ValueError(f"--option grad_path={grad_path!r}: expected flat or hooks")
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
        MemoryConfig(model, args, setup, bits, ckpt, b, t, grad_path)
        for model, args in models
        for b, t in shapes
        for setup, bits, ckpt in setups
    ]


# ----------------------------------------------------------------------------- planner


def alloc_conf() -> str:
    """The caching allocator's settings this process runs under, as given to PyTorch
    (``PYTORCH_CUDA_ALLOC_CONF``, or its newer name ``PYTORCH_ALLOC_CONF``); "" when unset."""
    return os.environ.get("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_ALLOC_CONF", ""))


def process_allocator(conf: str | None = None) -> str:
    """The planner's ``TrainSetup.allocator`` for an allocator configuration string
    (default: this process's, :func:`alloc_conf`): "expandable" when it turns
    ``expandable_segments`` on, else "native". Comma-separated ``key:value`` pairs, as PyTorch
    reads them; the last setting of a key wins."""
    conf = alloc_conf() if conf is None else conf
    expandable = False
    for item in conf.split(","):
        key, _, value = item.partition(":")
        if key.strip() == "expandable_segments":
            expandable = value.strip().lower() in ("true", "1")
    return "expandable" if expandable else "native"


def row_config(cfg: MemoryConfig) -> dict:
    """A row's config: the configuration and the allocator this process runs under."""
    return {**cfg.as_config(), "allocator": process_allocator(), "alloc_conf": alloc_conf()}


def planner_setup(cfg: MemoryConfig, device: torch.device, allocator: str | None = None):
    """The planner's setup for ``cfg``; ``allocator``: None = this process's
    (:func:`process_allocator`)."""
    from hybrid_triton.planner.setup import setup_preset

    trainer = cfg.setup not in RECIPE_FOR_SETUP
    extra = {"grad_mode": "flat" if cfg.grad_path == "flat" else "hook"} if trainer else {}
    return setup_preset(
        cfg.setup,
        **extra,
        micro_batch=cfg.micro_batch,
        seq_len=cfg.seq_len,
        checkpointing=cfg.checkpointing,
        state_bits=cfg.state_bits,
        phases=TRAINER_PHASES if trainer else ("full",),
        # On CUDA the trainer's Predict moves the moments to pinned host memory.
        predict_moments="offload" if device.type == "cuda" else "keep",
        allocator=allocator or process_allocator(),
    )


def planner_estimate(cfg: MemoryConfig, device: torch.device, allocator: str | None = None):
    from hybrid_triton.planner.estimate import estimate
    from hybrid_triton.planner.specs import gpt2_spec

    args = dict(cfg.model_args)
    spec = gpt2_spec(cfg.model, args["n_layer"], args["n_embd"], args["n_head"],
                     vocab_size=args["vocab_size"], block_size=args["block_size"])  # fmt: skip
    return estimate(spec, planner_setup(cfg, device, allocator))


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
    # Built on the device: initialising GPT-2 medium's 355M parameters on the host and
    # copying them over took seconds per configuration.
    with torch.device(device):
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
    each step is measured and the highest step of each phase kept; each phase's entry work
    (``HybridTrainer.prepare_step``) is measured apart as ``enter:<phase>``."""
    from hybrid_triton.models.gpt2 import GPT2
    from hybrid_triton.scheduler import TrainerConfig
    from hybrid_triton.trainer import HybridTrainer, RSSMDynamics

    class _AlwaysConfident(RSSMDynamics):
        # Memory is what is measured here, not the quality of predictions: enter Predict as
        # soon as Full ends, so that one short run visits every phase. The trainer's default
        # dynamics model (device-side RSSM), so Full steps do what they do by default (the
        # update norms it observes need a copy of the master around the optimizer step).
        def confidence(self) -> torch.Tensor:
            return torch.ones((), device=self._loss_avg.device)

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
        lookahead=0,  # the presets' default: moments and master come back at Predict exit
        host_lag=1,
        grad_path=cfg.grad_path,
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
            # A phase's entry work (Predict: rollback snapshot, direction, offload) starts
            # from the previous phase's resident state: measured apart, as "enter:<phase>"
            # (the trainer's own per-phase peaks split it the same way).
            with probe.phase("step"):
                plan, new_phase = trainer.prepare_step()
            entry = probe.results.pop("step")
            if new_phase:
                _keep_max(peaks, replace(entry, phase=f"enter:{plan.phase.value}"))
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

# Suite options (``--option KEY=VALUE``): see ``docs/benchmarks.md``.
TRACED_AUTO_MODELS = ("gpt2-micro", "gpt2-small")  # traced=auto: the fake-tensor trace of
# GPT-2 medium's step costs 5-10 s of host time per configuration for the same check
CONFIG_TIMEOUT_S = {True: 0.0, False: 150.0}  # per configuration and per capped run; 0: none
CAP_RUNS = ("needed", "all")


@dataclass
class Measurement:
    """One configuration's real run: per-phase peaks, or why there are none."""

    status: str  # ok, oom, error
    peaks: dict[str, PhaseMemory]
    run_allocated: int | None = None  # bytes: the run's peaks, build and warm-up included
    run_reserved: int | None = None  # None on CPU
    message: str = ""
    impl: str | None = None


def _traced_wanted(ctx: SuiteContext, cfg: MemoryConfig) -> bool:
    mode = ctx.option("traced", "auto")
    if mode not in ("auto", "all", "none"):
        raise ValueError(f"--option traced={mode!r}: expected auto, all or none")
    if mode == "auto":
        return cfg.model in TRACED_AUTO_MODELS
    return mode == "all"


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
        rec.add(case, "planner", "reserved", "GiB", p.reserved_bytes / GIB, config=c,
                note=f"{est.allocator} allocator: allocated + "
                f"{p.allocator_slack_bytes / GIB:.3f} GiB slack")  # fmt: skip


def _record_measured(ctx: SuiteContext, cfg: MemoryConfig, peaks, config: dict) -> None:
    for phase, result in peaks.items():
        case = f"{cfg.label} [{phase}]"
        for metric, unit, value, note in result.as_metrics():
            ctx.recorder.add(case, "measured", metric, unit, value,
                             config={**config, "phase": phase}, note=note)  # fmt: skip


def measure(
    ctx: SuiteContext, cfg: MemoryConfig, *, device_level: bool = True, what: str = ""
) -> Measurement:
    """Run ``cfg`` for real under the suite's time limit per configuration; an OOM, an error
    or the time limit is caught, memory is freed either way, and the suite goes on."""
    probe = MemoryProbe(ctx.device, snapshot_dir=ctx.snapshot_dir, device_level=device_level)
    steps = ctx.option("steps", 1 if ctx.quick else 3, int)
    limit = ctx.option("config_timeout", CONFIG_TIMEOUT_S[ctx.quick], float)
    impl = None
    try:
        free_device_memory()
        probe.start_run()
        with time_limit(limit, f"{cfg.label}{what}"):
            if cfg.setup in RECIPE_FOR_SETUP:
                peaks = measure_recipe(cfg, ctx.device, steps, probe)
            else:
                with reference_path_on_cpu(ctx.device) as impl:
                    peaks = measure_trainer(cfg, ctx.device, steps, probe)
        run_allocated, run_reserved = probe.run_peaks()
        return Measurement(STATUS_OK, peaks, run_allocated, run_reserved, impl=impl)
    except Exception as err:  # CaseTimeout included
        status = STATUS_OOM if is_oom(err) else STATUS_ERROR
        if status == STATUS_ERROR and not isinstance(err, CaseTimeout):
            ctx.log(f"{cfg.label}{what}: {traceback.format_exc()}")
        return Measurement(status, {}, message=f"{type(err).__name__}: {err}", impl=impl)
    finally:
        free_device_memory()  # the traceback's frames are gone by now: their tensors too


def run_config(ctx: SuiteContext, cfg: MemoryConfig) -> tuple[float | None, float | None]:
    """Measure one configuration, then check it under each memory cap; returns (measured
    peak, estimated peak) in GiB."""
    rec = ctx.recorder
    config = row_config(cfg)
    est_peak = None
    est = None
    try:
        est = planner_estimate(cfg, ctx.device)
        est_peak = est.peak_bytes / GIB
        _record_estimate(ctx, cfg, est, config)
    except Exception as err:
        rec.status(cfg.label, "planner", STATUS_ERROR, config=config,
                   message=f"{type(err).__name__}: {err}")  # fmt: skip
    if cfg.setup in RECIPE_FOR_SETUP and not cfg.checkpointing and _traced_wanted(ctx, cfg):
        try:
            limit = ctx.option("config_timeout", CONFIG_TIMEOUT_S[ctx.quick], float)
            with time_limit(limit, f"{cfg.label} traced"):
                traced = traced_peak(cfg, ctx.device)
            rec.add(f"{cfg.label} [full]", "traced", "total", "GiB", traced / GIB,
                    config={**config, "phase": "full"},
                    note="planner traced mode: fake tensors, CPU kernels' allocations")  # fmt: skip
        except Exception as err:
            rec.status(cfg.label, "traced", STATUS_ERROR, config=config,
                       message=f"{type(err).__name__}: {err}")  # fmt: skip
    result = measure(ctx, cfg)
    if result.impl is not None:
        config["impl"] = result.impl
    measured_peak = None
    if result.status == STATUS_OK:
        _record_measured(ctx, cfg, result.peaks, config)
        measured_peak = max(p.peak_allocated for p in result.peaks.values()) / GIB
        missing = [p for p in (est.phases if est else ()) if p not in result.peaks]
        note = f"phases not reached: {', '.join(missing)}" if missing else ""
        rec.status(cfg.label, "measured", STATUS_OK, config=config, message=note)
    else:
        message = result.message
        if est_peak is not None:
            message += f" (planner estimate: {est_peak:.2f} GiB allocated peak)"
        rec.status(cfg.label, "measured", result.status, config=config, message=message)
    for cap in ctx.memory_caps:
        check_cap(ctx, cfg, cap, result, est, config)
    return measured_peak, est_peak


# ----------------------------------------------------------------------------- memory caps


def planner_reserved_bytes(est) -> int:
    """What the planner says the caching allocator reserves at the run's peak under the
    estimate's allocator: the allocated peak plus the allocator's slack (native: segment
    rounding + fragmentation allowance; expandable: 20 MiB pages), the highest over phases.
    A cap limits exactly that (the CUDA context is outside it)."""
    return est.reserved_peak_bytes


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.3f} GiB"


def derived_cap_verdict(result: Measurement, cap_bytes: int) -> tuple[bool, str] | None:
    """The outcome under a cap that the uncapped run already decides, or ``None``.

    - Peak reserved <= cap: the allocator never asked for more than the cap, so a capped
      run makes the same allocations: it runs.
    - Peak allocated > cap: the tensors alive at the peak alone exceed the cap, and the
      allocator reserves at least what it hands out: it runs out of memory.
    - In between, whether freeing cached blocks saves the run depends on fragmentation:
      only a run under the cap says.

    Both rules hold under either allocator (native or expandable segments): reserved is
    never below allocated, and a run that never reserved more than the cap never meets it.
    They hold only for the allocator the uncapped run used, which is this process's: the
    capped runs happen in the same process, under the same ``PYTORCH_CUDA_ALLOC_CONF``.
    """
    if result.status == STATUS_OOM:
        return False, "derived: the uncapped run already ran out of memory"
    if result.status != STATUS_OK or result.run_allocated is None:
        return None
    if result.run_reserved is not None and result.run_reserved <= cap_bytes:
        return True, f"derived: uncapped peak reserved {_gib(result.run_reserved)} <= cap"
    if result.run_allocated > cap_bytes:
        return False, f"derived: uncapped peak allocated {_gib(result.run_allocated)} > cap"
    return None


def check_cap(ctx: SuiteContext, cfg: MemoryConfig, cap: float, result: Measurement, est,
              config: dict) -> None:  # fmt: skip
    """Does ``cfg`` run under ``cap`` GiB (``set_per_process_memory_fraction``), and does
    the planner say so? ``--option cap_runs=all`` runs every check for real; by default
    (``needed``) only those the uncapped run does not decide (``derived_cap_verdict``)."""
    rec = ctx.recorder
    case = f"{cfg.label} [cap {cap:g} GiB]"
    c = {**config, "cap_gib": cap}
    cap_bytes = int(cap * GIB)
    cap_runs = ctx.option("cap_runs", "needed")
    if cap_runs not in CAP_RUNS:
        raise ValueError(f"--option cap_runs={cap_runs!r}: expected one of {CAP_RUNS}")
    verdict = None if cap_runs == "all" else derived_cap_verdict(result, cap_bytes)
    how = "derived"
    if result.status == STATUS_ERROR:
        # A run that failed or timed out without a cap would do so under one too: spend no
        # time (or a whole time limit per cap) on it.
        how = "not checked"
        rec.add(case, "measured", "fits_cap", "bool", None, config={**c, "how": how},
                note=f"not checked: the uncapped run failed ({result.message[:200]})")  # fmt: skip
    elif verdict is None:
        how = "run"
        with memory_cap(cap):
            capped = measure(ctx, cfg, device_level=False, what=f" under {cap:g} GiB")
        if capped.status == STATUS_OK:
            verdict = (True, f"ran under the cap: peak allocated "
                             f"{capped.run_allocated / GIB:.3f} GiB")  # fmt: skip
        elif capped.status == STATUS_OOM:
            verdict = (False, f"out of memory under the cap: {capped.message}")
        else:
            rec.status(case, "measured", STATUS_ERROR, config=c, message=capped.message)
    measured = None if verdict is None else verdict[0]
    if how != "not checked":
        rec.add(case, "measured", "fits_cap", "bool",
                None if measured is None else float(measured), config={**c, "how": how},
                note=("" if verdict is None else verdict[1] + "; ")
                + f"allocator {c.get('allocator', 'native')}")  # fmt: skip
    if est is None:
        return
    reserved = planner_reserved_bytes(est)
    planned = reserved <= cap_bytes
    phase = est.phases[est.reserved_peak_phase]
    rec.add(case, "planner", "fits_cap", "bool", float(planned), config=c,
            note=f"estimated reserved peak {reserved / GIB:.3f} GiB ({est.reserved_peak_phase}: "
            f"allocated {phase.peak_bytes / GIB:.3f} + {est.allocator} allocator slack "
            f"{phase.allocator_slack_bytes / GIB:.3f}; the CUDA context is outside the cap); "
            f"PYTORCH_CUDA_ALLOC_CONF={c.get('alloc_conf', '')!r}")  # fmt: skip
    agrees = None if measured is None else float(planned == measured)
    rec.add(case, "planner", "fit_agrees", "bool", agrees, config={**c, "how": how},
            note="" if agrees is not None else "not checked: a run failed")  # fmt: skip


def record_cap_agreement(ctx: SuiteContext) -> None:
    """One row: the share of (configuration, cap) checks where the planner's answer is what
    happened, and which ones disagree."""
    rows = [r for r in ctx.recorder.rows if r["metric"] == "fit_agrees"]
    checked = [r for r in rows if not math.isnan(r["value"])]
    if not checked:
        return
    wrong = [r["case"] for r in checked if r["value"] == 0.0]
    note = f"{len(checked) - len(wrong)} of {len(checked)} agree"
    if len(checked) < len(rows):
        note += f"; {len(rows) - len(checked)} not checked"
    if wrong:
        note += "; disagree: " + "; ".join(wrong)
    ctx.recorder.add("cap checks", "planner", "fit_agreement_pct", "%",
                     100.0 * (len(checked) - len(wrong)) / len(checked),
                     config={"caps_gib": list(ctx.memory_caps)}, note=note)  # fmt: skip


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
            config = {**row_config(cfg), "baseline": name}
            for provider, value, ref in (
                ("measured", measured, b_measured),
                ("planner", estimated, b_estimated),
            ):
                saving = 100.0 * (1.0 - value / ref) if value is not None and ref else None
                ctx.recorder.add(case, provider, f"saving_vs_{name}", "%", saving, config=config)


def run(ctx: SuiteContext) -> None:
    grad_path = ctx.option("grad_path", "flat")
    configs = [c for c in configurations(ctx.quick, grad_path) if ctx.selected(c.label)]
    peaks: dict[MemoryConfig, tuple] = {}
    for cfg in ctx.bar(configs, total=len(configs), desc="memory"):
        start = time.perf_counter()
        peaks[cfg] = run_config(ctx, cfg)
        ctx.log(f"{cfg.label}: done in {time.perf_counter() - start:.1f} s")
        ctx.save_partial()  # an outer time limit keeps the configurations done so far
    record_savings(ctx, peaks)
    if ctx.memory_caps:
        record_cap_agreement(ctx)
    ctx.save_partial()


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
    return "\n".join(lines) + "\n" + footer + cap_summary(df)


def cap_summary(df: pd.DataFrame) -> str:
    """The cap checks: what happened under each cap, the planner's answer, agreement."""
    fits = df[df["metric"] == "fits_cap"]
    if fits.empty:
        return ""
    measured = fits[fits["provider"] == "measured"].groupby("case", sort=False).first()
    planned = fits[fits["provider"] == "planner"].groupby("case", sort=False)["value"].first()

    def word(v: float, yes: str, no: str) -> str:
        return "?" if math.isnan(v) else (yes if v else no)

    lines = ["", f"{'configuration [cap]':<56} {'measured':>14} {'planner':>9} {'agree':>6}"]
    for case, row in measured.iterrows():
        how = json.loads(row["config"]).get("how", "")
        pv = planned.get(case, math.nan)
        agree = (
            "?"
            if math.isnan(row["value"]) or math.isnan(pv)
            else word(pv == row["value"], "yes", "NO")
        )
        ran = f"{word(row['value'], 'ran', 'oom')} ({how})"
        lines.append(f"{case[:56]:<56} {ran:>14} {word(pv, 'fits', 'no'):>9} {agree:>6}")
    total = df[df["metric"] == "fit_agreement_pct"]
    if not total.empty:
        lines.append(f"planner agreement: {total['value'].iloc[0]:.1f}% ({total['note'].iloc[0]})")
    return "\n".join(lines)


if __name__ == "__main__":
    from hybrid_triton.bench.cli import main

    sys.exit(main(["memory", *sys.argv[1:]]))
