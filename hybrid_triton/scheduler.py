"""The phase scheduler: trainer configuration, per-phase plans and the phase controller.

Phases (DESIGN.md, "The four phases"):

    Warmup -> Full -> Predict <-> Correct -> Full -> ...

- ``Warmup`` runs ``warmup_steps`` optimizer steps; the dynamics model only observes.
- ``Full`` runs ``full_steps`` optimizer steps; then ``Predict`` if the dynamics model's
  confidence is at least ``confidence_threshold`` and fewer than ``max_consecutive_predicts``
  Predict phases ran since the last Full phase, otherwise another ``Full`` phase.
- ``Predict`` runs a horizon of steps chosen from the confidence (below); it is always followed
  by ``Correct`` (or by ``Full`` when the divergence monitor rolls it back).
- ``Correct`` runs ``correct_steps`` optimizer steps; then ``Predict`` or ``Full`` by the same
  rule as after ``Full``.

Horizon rule: ``floor(max_predict_steps * confidence**2 * (1 - min(horizon_penalty *
consecutive, 0.5)))`` clamped to ``[min_predict_steps, max_predict_steps]``, where
``consecutive`` counts the Predict phases already run since the last Full phase. A run of Predict
phases is therefore bounded, and each one gets shorter.

Everything here is plain Python on host values: no tensors, no device.
"""

from __future__ import annotations

import enum
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


class ConfigError(ValueError):
    """A trainer configuration field has a bad value; the message names the field."""


class TransitionError(RuntimeError):
    """A phase transition that the phase rules do not allow."""


class Phase(str, enum.Enum):
    WARMUP = "warmup"
    FULL = "full"
    PREDICT = "predict"
    CORRECT = "correct"

    @property
    def backward(self) -> bool:
        """Whether the phase computes gradients (every phase but Predict)."""
        return self is not Phase.PREDICT


# Allowed transitions. Predict -> Full happens only through a divergence rollback.
ALLOWED_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.WARMUP: frozenset({Phase.FULL}),
    Phase.FULL: frozenset({Phase.FULL, Phase.PREDICT}),
    Phase.PREDICT: frozenset({Phase.CORRECT, Phase.FULL}),
    Phase.CORRECT: frozenset({Phase.FULL, Phase.PREDICT}),
}

PRECISIONS = ("fp32", "bf16", "fp16")
OFFLOAD_STRATEGIES = ("keep", "cpu", "pinned", "compress", "drop")
QUANT_FORMATS = ("int8", "int8_dynamic", "int4", "ternary")
PREDICT_MASTER = ("host", "device")
GRAD_PATHS = ("auto", "hooks", "flat")


@dataclass
class TrainerConfig:
    """Everything the scheduler and the trainer read. Validated on construction.

    Phase lengths are counted in optimizer steps (one step = one effective batch, split into
    ``micro_batches`` micro-batches for the backward pass).
    """

    # Phase lengths and transitions.
    warmup_steps: int = 100
    full_steps: int = 20
    min_predict_steps: int = 2
    max_predict_steps: int = 15
    correct_steps: int = 5
    confidence_threshold: float = 0.85
    max_consecutive_predicts: int = 5
    horizon_penalty: float = 0.1
    # False: no Predict phase ever (Warmup, then Full phases only), and the dynamics model
    # neither observes nor trains; the trainer is then plain training with its own setup
    # (arena, 8-bit state, its gradient path), which separates the loss gap that Predict
    # causes from the rest.
    predict: bool = True
    # Precision: the default for every phase, overridden per phase ({"predict": "bf16"}).
    precision: str = "fp32"
    phase_precision: dict[str, str] = field(default_factory=dict)
    # Gradient accumulation: micro-batches per optimizer step, overridable per phase.
    micro_batches: int = 1
    phase_micro_batches: dict[str, int] = field(default_factory=dict)
    # Where backward's gradients go: "hooks" (post-accumulate-grad hooks fold each one into
    # an fp32 accumulator: exact sums over micro-batches, loss-scale unscaling), "flat" (a
    # flat buffer in the parameters' dtype that autograd writes into: no per-parameter
    # launches, half the bytes for bf16 parameters; one micro-batch per step and no fp16),
    # or "auto": "flat" when every phase takes one micro-batch and none runs in fp16.
    grad_path: str = "auto"
    # Predict-aware memory. ``offload``: where the optimizer moments go during Predict.
    # ``predict_master``: where the fp32 master weights are during Predict when the model's
    # parameters are bf16 shadows: "host" (the rollback snapshot in host memory; the bf16
    # weights take each predicted step in place with stochastic rounding, and the master gets
    # the exact sum of the steps when it comes back at Predict exit) or "device" (kept on the
    # GPU and updated in fp32). Other parameter setups keep it on the device.
    offload: str = "keep"
    predict_master: str = "host"
    async_restore: bool = True
    lookahead: int = 2
    direction_format: str = "int8"
    quant_block: int = 256
    # Residuals and the corrector.
    residual_capacity: int = 8
    residual_format: str = "int8"
    residual_error_feedback: bool = True
    corrector_decay: float = 0.7
    corrector_max_adjust: float = 0.5
    # Divergence monitor (relative measures).
    divergence_rel_warning: float = 0.15
    divergence_rel_critical: float = 0.5
    divergence_sigma: float = 4.0
    divergence_history: int = 50
    divergence_escalate_after: int = 3
    # Dynamics model: "rssm" (hybrid_triton.dynamics.DynamicsModel, trained on Full steps) or
    # "trend" (a host-side linear-trend ensemble); ``dynamics`` holds keyword arguments for
    # its configuration (DynamicsConfig fields for "rssm").
    dynamics_model: str = "rssm"
    dynamics: dict[str, Any] = field(default_factory=dict)
    # Host side: a step's device values (loss, norms) are read once this many newer steps
    # are queued, so the host never waits on the GPU (0: read at the next step, which waits).
    host_lag: int = 1
    # Output.
    metrics_path: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(
                    f"TrainerConfig.{name} must be an int >= {minimum}, got {value!r}"
                )

        def number(name: str, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"TrainerConfig.{name} must be a number, got {value!r}")
            too_low = value <= lo if lo_open else value < lo
            too_high = value >= hi if hi_open else value > hi
            if too_low or too_high or math.isnan(value):
                interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
                raise ConfigError(f"TrainerConfig.{name} must be in {interval}, got {value!r}")

        def choice(name: str, allowed: tuple[str, ...], value: object = None) -> None:
            value = getattr(self, name) if value is None else value
            if value not in allowed:
                raise ConfigError(
                    f"TrainerConfig.{name} must be one of {', '.join(allowed)}, got {value!r}"
                )

        positive_int("warmup_steps", 0)
        positive_int("full_steps")
        positive_int("min_predict_steps")
        positive_int("max_predict_steps")
        positive_int("correct_steps")
        positive_int("max_consecutive_predicts", 0)
        positive_int("micro_batches")
        positive_int("lookahead", 0)
        positive_int("quant_block", 2)
        positive_int("residual_capacity", 0)
        positive_int("divergence_history", 2)
        positive_int("divergence_escalate_after")
        positive_int("host_lag", 0)
        if self.min_predict_steps > self.max_predict_steps:
            raise ConfigError(
                f"TrainerConfig.min_predict_steps ({self.min_predict_steps}) must not exceed "
                f"max_predict_steps ({self.max_predict_steps})"
            )
        number("confidence_threshold", 0.0, 1.0, True, True)
        number("horizon_penalty", 0.0, 1.0, False, False)
        number("corrector_decay", 0.0, 1.0, False, True)
        number("corrector_max_adjust", 0.0, 10.0, False, False)
        number("divergence_rel_warning", 0.0, math.inf, True, True)
        number("divergence_rel_critical", 0.0, math.inf, True, True)
        number("divergence_sigma", 0.0, math.inf, True, True)
        if self.divergence_rel_critical <= self.divergence_rel_warning:
            raise ConfigError(
                f"TrainerConfig.divergence_rel_critical ({self.divergence_rel_critical}) must be "
                f"larger than divergence_rel_warning ({self.divergence_rel_warning})"
            )
        choice("precision", PRECISIONS)
        choice("offload", OFFLOAD_STRATEGIES)
        choice("predict_master", PREDICT_MASTER)
        choice("grad_path", GRAD_PATHS)
        choice("direction_format", QUANT_FORMATS)
        choice("residual_format", QUANT_FORMATS)
        choice("dynamics_model", ("rssm", "trend"))
        for flag in ("predict", "async_restore", "residual_error_feedback", "progress"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(
                    f"TrainerConfig.{flag} must be true or false, got {getattr(self, flag)!r}"
                )
        if self.quant_block & (self.quant_block - 1):
            raise ConfigError(
                f"TrainerConfig.quant_block must be a power of two, got {self.quant_block}"
            )
        phases = tuple(p.value for p in Phase)
        if not isinstance(self.phase_precision, dict):
            raise ConfigError("TrainerConfig.phase_precision must be a table {phase: precision}")
        for key, value in self.phase_precision.items():
            choice(f"phase_precision key {key!r}", phases, key)
            choice(f"phase_precision.{key}", PRECISIONS, value)
        if not isinstance(self.phase_micro_batches, dict):
            raise ConfigError("TrainerConfig.phase_micro_batches must be a table {phase: int}")
        for key, value in self.phase_micro_batches.items():
            choice(f"phase_micro_batches key {key!r}", phases, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"TrainerConfig.phase_micro_batches.{key} must be an int >= 1, got {value!r}"
                )
        if not isinstance(self.dynamics, dict):
            raise ConfigError("TrainerConfig.dynamics must be a table of keyword arguments")
        if self.grad_path == "flat" and not self._flat_grads_apply():
            raise ConfigError(
                "TrainerConfig.grad_path='flat' takes one micro-batch per step in every phase "
                "and no fp16 phase (a flat buffer in the parameters' dtype would round every "
                "sum over micro-batches and has no unscale pass); got micro_batches="
                f"{self.micro_batches}, phase_micro_batches={self.phase_micro_batches}, "
                f"precision={self.precision!r}, phase_precision={self.phase_precision}; use "
                "'hooks' or 'auto'"
            )
        if self.metrics_path is not None and not isinstance(self.metrics_path, str):
            raise ConfigError(
                f"TrainerConfig.metrics_path must be a path string, got {self.metrics_path!r}"
            )

    # ----------------------------------------------------------------- presets and files
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainerConfig:
        """A named preset (``conservative``, ``balanced``, ``aggressive``, ``full_only``:
        balanced with Predict off) with overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerConfig:
        """Build from a mapping; a ``preset`` key starts from that preset. Unknown keys fail."""
        if not isinstance(data, dict):
            raise ConfigError(f"a trainer configuration must be a table, got {type(data).__name__}")
        data = dict(data)
        base: dict[str, Any] = {}
        preset = data.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(
                    f"TrainerConfig.preset: unknown preset {preset!r}; expected one of "
                    f"{', '.join(PRESETS)}"
                )
            base = dict(PRESETS[preset])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"TrainerConfig: unknown field(s) {', '.join(unknown)}; known fields are "
                f"{', '.join(sorted(known))}"
            )
        return cls(**{**base, **data})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainerConfig:
        """Load a ``.toml``, ``.json`` or ``.yaml``/``.yml`` file (YAML needs PyYAML).

        The keys are the field names; TOML files may put them under a ``[trainer]`` table.
        """
        path = os.fspath(path)
        suffix = os.path.splitext(path)[1].lower()
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            if suffix == ".toml":
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python 3.10
                    import tomli as tomllib  # type: ignore[no-redef]
                data = tomllib.loads(raw.decode())
            elif suffix == ".json":
                data = json.loads(raw.decode())
            elif suffix in (".yaml", ".yml"):
                try:
                    import yaml
                except ModuleNotFoundError as exc:
                    raise ConfigError(
                        f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use a "
                        ".toml or .json file"
                    ) from exc
                data = yaml.safe_load(raw.decode())
            else:
                raise ConfigError(
                    f"{path}: unknown config format {suffix!r}; use .toml/.json/.yaml"
                )
        except ConfigError:
            raise
        except Exception as exc:  # parse errors of any of the three formats
            raise ConfigError(f"{path}: cannot parse the file: {exc}") from exc
        if isinstance(data, dict) and set(data) == {"trainer"}:
            data = data["trainer"]
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> TrainerConfig:
        return replace(self, **changes)

    # ----------------------------------------------------------------- per-phase values
    def precision_for(self, phase: Phase) -> str:
        return self.phase_precision.get(Phase(phase).value, self.precision)

    def micro_batches_for(self, phase: Phase) -> int:
        return self.phase_micro_batches.get(Phase(phase).value, self.micro_batches)

    def _flat_grads_apply(self) -> bool:
        # Predict runs no backward pass: its micro-batches and precision do not matter here.
        return all(
            self.micro_batches_for(p) == 1 and self.precision_for(p) != "fp16"
            for p in Phase
            if p is not Phase.PREDICT
        )

    def resolved_grad_path(self) -> str:
        """``grad_path`` with "auto" decided: "flat" or "hooks"."""
        if self.grad_path != "auto":
            return self.grad_path
        return "flat" if self._flat_grads_apply() else "hooks"


PRESETS: dict[str, dict[str, Any]] = {
    # Long warm-up and Full phases, short Predict phases, nothing leaves the GPU.
    "conservative": dict(
        warmup_steps=200,
        full_steps=30,
        min_predict_steps=2,
        max_predict_steps=8,
        correct_steps=5,
        confidence_threshold=0.9,
        max_consecutive_predicts=3,
        precision="fp32",
        offload="keep",
        divergence_rel_warning=0.1,
        divergence_rel_critical=0.3,
    ),
    # bf16 compute; during Predict the optimizer moments go to pinned host memory and the
    # fp32 master stays in its host snapshot; both come back at Predict exit (lookahead 0),
    # behind the first Correct step's forward and backward, which need neither.
    "balanced": dict(
        warmup_steps=100,
        full_steps=20,
        min_predict_steps=2,
        max_predict_steps=15,
        correct_steps=5,
        confidence_threshold=0.85,
        max_consecutive_predicts=5,
        precision="bf16",
        offload="pinned",
        lookahead=0,
    ),
    # Short Full phases, long Predict phases, moments compressed in place.
    "aggressive": dict(
        warmup_steps=50,
        full_steps=15,
        min_predict_steps=4,
        max_predict_steps=25,
        correct_steps=4,
        confidence_threshold=0.75,
        max_consecutive_predicts=8,
        precision="bf16",
        offload="compress",
        lookahead=3,
        divergence_rel_warning=0.2,
        divergence_rel_critical=0.6,
    ),
}
# "full_only": the balanced preset with Predict off (Warmup, then Full phases only): the
# trainer's own setup without Predict, to measure what Predict costs in loss and time.
PRESETS["full_only"] = dict(PRESETS["balanced"], predict=False)


# --------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class MemoryPolicy:
    """What a phase keeps on the device.

    ``optimizer_state``: one of ``OFFLOAD_STRATEGIES`` (only Predict moves it).
    ``free_grads``: gradients and the gradient accumulator are released.
    ``no_grad_forward``: the forward pass runs under ``torch.no_grad``.
    ``compact_direction``: the frozen update direction is kept quantized on the device.
    ``master_weights``: where the fp32 master weights are (``device`` or ``host``; ``host``
    applies to bf16-shadow models only, see ``TrainerConfig.predict_master``).
    """

    optimizer_state: str = "keep"
    free_grads: bool = False
    no_grad_forward: bool = False
    compact_direction: bool = False
    master_weights: str = "device"


@dataclass(frozen=True)
class PhasePlan:
    """What the trainer does in one phase (the scheduler applies it at each transition)."""

    phase: Phase
    steps: int
    precision: str
    micro_batches: int
    backward: bool
    kernels: tuple[str, ...]
    memory: MemoryPolicy

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["phase"] = self.phase.value
        return d


def make_plan(cfg: TrainerConfig, phase: Phase, steps: int) -> PhasePlan:
    """The plan of ``phase`` under ``cfg``: precision, micro-batches, kernels, memory policy."""
    phase = Phase(phase)
    precision = cfg.precision_for(phase)
    if phase is Phase.PREDICT:
        kernels = ("dequantize_add", "cast_scale")
        memory = MemoryPolicy(cfg.offload, True, True, True, cfg.predict_master)
        micro = cfg.phase_micro_batches.get(phase.value, cfg.micro_batches)
    else:
        # The flat gradient path has no fold pass: autograd writes the gradients in place.
        fold = [] if cfg.resolved_grad_path() == "flat" else ["accumulate_grads"]
        kernels = [*fold, "adamw_step"]
        if precision == "fp16":
            kernels = ["unscale", "update_loss_scale", *kernels]
        if phase is Phase.CORRECT:
            kernels.append("quantize_blockwise")  # residuals into the residual store
        kernels = tuple(kernels)
        memory = MemoryPolicy("keep", False, False, False)
        micro = cfg.micro_batches_for(phase)
    return PhasePlan(phase, steps, precision, micro, phase.backward, kernels, memory)


# --------------------------------------------------------------------------------- controller
class PhaseController:
    """The phase state machine. Call :meth:`begin_step` before and :meth:`end_step` after
    every trainer step; :meth:`force_full` after a rollback."""

    def __init__(self, cfg: TrainerConfig) -> None:
        self.cfg = cfg
        self.step = 0  # steps completed
        self.phase = Phase.WARMUP if cfg.warmup_steps > 0 else Phase.FULL
        self.steps_left = cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.full_steps
        self.phase_len = self.steps_left
        self.phase_step = 0  # steps completed in the current phase
        self.consecutive_predicts = 0
        self.phase_counts = {p.value: 0 for p in Phase}
        self.phase_counts[self.phase.value] = 1
        self.step_counts = {p.value: 0 for p in Phase}
        self.transitions: list[tuple[int, str, str, str]] = []  # (step, from, to, reason)
        self.plan = make_plan(cfg, self.phase, self.steps_left)

    # -- rules
    def horizon(self, confidence: float) -> int:
        cfg = self.cfg
        penalty = 1.0 - min(cfg.horizon_penalty * self.consecutive_predicts, 0.5)
        raw = math.floor(cfg.max_predict_steps * max(0.0, min(1.0, confidence)) ** 2 * penalty)
        return int(min(cfg.max_predict_steps, max(cfg.min_predict_steps, raw)))

    def may_predict(self, confidence: float) -> bool:
        return (
            self.cfg.predict
            and math.isfinite(confidence)
            and confidence >= self.cfg.confidence_threshold
            and self.consecutive_predicts < self.cfg.max_consecutive_predicts
        )

    def _decide(self, confidence: float) -> tuple[Phase, int, str]:
        cfg = self.cfg
        if self.phase is Phase.WARMUP:
            return Phase.FULL, cfg.full_steps, "warmup done"
        if self.phase is Phase.PREDICT:
            return Phase.CORRECT, cfg.correct_steps, "predict horizon done"
        if self.may_predict(confidence):
            return Phase.PREDICT, self.horizon(confidence), f"confidence {confidence:.3f}"
        if not cfg.predict:
            why = "predict off"
        elif self.consecutive_predicts >= cfg.max_consecutive_predicts:
            why = f"{self.consecutive_predicts} predict phases in a row"
        else:
            why = f"confidence {confidence:.3f} < {cfg.confidence_threshold}"
        return Phase.FULL, cfg.full_steps, why

    def _enter(self, phase: Phase, steps: int, reason: str) -> None:
        if phase not in ALLOWED_TRANSITIONS[self.phase]:
            raise TransitionError(
                f"transition {self.phase.value} -> {phase.value} is not allowed; allowed: "
                f"{sorted(p.value for p in ALLOWED_TRANSITIONS[self.phase])}"
            )
        if phase is Phase.PREDICT:
            self.consecutive_predicts += 1
        elif phase is Phase.FULL:
            self.consecutive_predicts = 0
        self.transitions.append((self.step, self.phase.value, phase.value, reason))
        self.phase = phase
        self.steps_left = self.phase_len = steps
        self.phase_step = 0
        self.phase_counts[phase.value] += 1
        self.plan = make_plan(self.cfg, phase, steps)

    # -- per step
    def begin_step(self, confidence: float) -> tuple[PhasePlan, bool]:
        """The plan for the coming step and whether it starts a new phase."""
        if self.steps_left > 0:
            return self.plan, False
        phase, steps, reason = self._decide(confidence)
        self._enter(phase, steps, reason)
        return self.plan, True

    def end_step(self) -> None:
        self.step += 1
        self.phase_step += 1
        self.steps_left -= 1
        self.step_counts[self.phase.value] += 1

    def force_full(self, reason: str) -> PhasePlan:
        """Leave the current phase at once for a Full phase (after a rollback)."""
        self._enter(Phase.FULL, self.cfg.full_steps, reason)
        return self.plan

    @property
    def steps_until_phase_end(self) -> int:
        return self.steps_left

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "phase": self.phase.value,
            "steps_left": self.steps_left,
            "phase_len": self.phase_len,
            "phase_step": self.phase_step,
            "consecutive_predicts": self.consecutive_predicts,
            "phase_counts": dict(self.phase_counts),
            "step_counts": dict(self.step_counts),
            "transitions": [list(t) for t in self.transitions],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.phase = Phase(state["phase"])
        self.steps_left = int(state["steps_left"])
        self.phase_len = int(state["phase_len"])
        self.phase_step = int(state["phase_step"])
        self.consecutive_predicts = int(state["consecutive_predicts"])
        self.phase_counts = dict(state["phase_counts"])
        self.step_counts = dict(state["step_counts"])
        self.transitions = [tuple(t) for t in state["transitions"]]
        self.plan = make_plan(self.cfg, self.phase, self.phase_len)
