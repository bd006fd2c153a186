"""``HybridTrainer``: the phase-aware training loop (Warmup -> Full -> Predict <-> Correct).

It wraps any ``nn.Module``, a loss function ``loss_fn(model, micro_batch) -> scalar loss`` and
the toolkit's :class:`~hybrid_triton.optim.FusedAdamW` (built for you when not given), and runs
every step under the :class:`~hybrid_triton.scheduler.PhasePlan` of its phase.

Backward phases (Warmup, Full, Correct): the batch is split into ``micro_batches`` pieces along
dim 0; each piece's backward folds its gradients into the fp32 accumulator from
post-accumulate-grad hooks (:class:`~hybrid_triton.accumulation.GradAccumulator`, kernel
``accumulate_grads``) with weight ``n_i / B``, so the accumulator holds the gradient of the whole
batch's mean loss whatever the split (no full-size low-precision gradient ever exists). The
optimizer then takes one step from it. With one micro-batch per step in every phase and no fp16
(``TrainerConfig.grad_path`` "auto", the default, or "flat") there is nothing to accumulate:
autograd writes into one flat buffer in the parameters' dtype instead
(:class:`~hybrid_triton.accumulation.FlatGradBuffer`), with no per-parameter hook launches.
Learning rate: ``optimizer.param_groups[0]["lr"]`` is the rate per optimizer step (per
effective batch); it is not divided by the micro-batch count, because the accumulated gradient
is already a mean. LR schedulers that set that value work.

Precision per phase: ``fp32`` (no autocast), ``bf16`` or ``fp16`` (``torch.autocast``); in fp16
backward phases the loss is scaled by a device-side :class:`~hybrid_triton.precision.
DynamicLossScaler`, the accumulate kernel unscales and flags non-finite gradients in the same
pass, the optimizer skips on that flag on the device, and the scaler updates on the device.

Predict (no backward): at entry the trainer snapshots the master weights to host memory (for
rollback), frees the gradient accumulator, builds the optimizer's own AdamW direction
``m_hat / (sqrt(v_hat) + eps) + weight_decay * w`` and keeps it quantized on the device (one
``quantize_blockwise`` payload per segment group), and moves the optimizer moments by the
chosen strategy (:mod:`hybrid_triton.offload`). Each Predict step runs the forward under
``no_grad`` and applies exactly one step's update, ``master += -lr * scale_g * correction_g *
dequant(dir_g)`` (``dequantize_add``), then refreshes low-precision shadow weights
(``cast_scale``). The restore of the moments starts ``lookahead`` steps before the phase is
planned to end.

Correct: real steps; each one's residual (actual minus predicted update, per element) is
stored quantized with error feedback (:class:`~hybrid_triton.residuals.ResidualStore`) and the
per-group least-squares fit of the prediction updates the corrector.

Divergence: every Predict step's real loss is checked against its predicted loss and the recent
history (:class:`~hybrid_triton.divergence.DivergenceMonitor`); a critical verdict rolls the
weights back to the Predict entry snapshot, brings the optimizer state back and forces Full.

Host reads: device values (loss, gradient norm, loss scale) are copied to the host without
blocking; the values of step ``t`` are read at the start of step ``t + 1 + host_lag``, when
``host_lag`` newer steps are already queued, so the GPU never idles waiting for the host
(``host_lag = 0`` reads them one step later, which waits for the previous step). Decisions that
need them (divergence, confidence) act that late; Correct steps are guarded on the device (a
loss past the monitor's critical limit skips the optimizer step), so a late rollback finds
clean optimizer state.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hybrid_triton.accumulation import FlatGradBuffer, GradAccumulator
from hybrid_triton.arena import ArenaGroup, FlatArena, trainable_parameters
from hybrid_triton.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hybrid_triton.divergence import DivergenceMonitor, Level, OutlierFilter
from hybrid_triton.metrics import MetricsCollector
from hybrid_triton.offload import OffloadError, StateOffloader
from hybrid_triton.optim import FusedAdamW
from hybrid_triton.residuals import Corrector, ResidualStore
from hybrid_triton.scheduler import PRESETS, Phase, PhaseController, PhasePlan, TrainerConfig

TRAINER_FORMAT = "hybrid_triton.HybridTrainer/1"
# What every trainer checkpoint holds (later additions such as "outliers" are optional).
_STATE_KEYS = (
    "format", "config", "model", "optimizer", "accum_freed", "offloader", "scaler",
    "controller", "dynamics", "residuals", "corrector", "divergence", "metrics", "confidence",
    "episode", "rolled_back_episode", "drop_reset", "snapshot", "prediction", "predict",
    "pending", "rng",
)  # fmt: skip


def _structure_problem(saved: Any, mine: Any, shapes: bool, where: str = "") -> str | None:
    """How ``saved`` differs in structure from ``mine`` (dict keys, tensor dtypes, and with
    ``shapes`` tensor shapes), or None; values are not compared."""
    if isinstance(mine, dict):
        if not isinstance(saved, dict):
            return f"{where or 'it'} is {type(saved).__name__}, expected a dict"
        if not mine or not all(isinstance(k, str) for k in (*mine, *saved)):
            return None  # open-ended, e.g. a torch optimizer's per-parameter state
        if set(saved) != set(mine):
            missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
            return f"{where or 'top level'}: missing {missing[:5]}, unexpected {extra[:5]}"
        for k in mine:
            problem = _structure_problem(saved[k], mine[k], shapes, f"{where}.{k}".lstrip("."))
            if problem:
                return problem
        return None
    if isinstance(mine, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            return f"{where} is {type(saved).__name__}, expected a tensor"
        if saved.dtype != mine.dtype or (shapes and saved.shape != mine.shape):
            return (
                f"{where} is {tuple(saved.shape)} {saved.dtype}, expected "
                f"{tuple(mine.shape)} {mine.dtype}"
            )
    return None


SCALE_LIMIT = 4.0  # bound on the dynamics model's per-group step multipliers
# The RSSM trains on one Full step in this many. An update (a 16-step BPTT unroll of small
# batched ops, its backward and Adam) is launch-bound: about 70 ms on an H100, which doubled
# GPT-2 small's Full step (140 vs 66 ms for Warmup). On the recorded char-MLP replay
# (benchmarks/data/rssm_run_charmlp.csv, CPU) every 4th step kept the held-out forecast errors
# (lead 1/4/8: 0.096/0.100/0.108 vs 0.097/0.105/0.113 training every step) at a lower mean
# confidence (0.17 vs 0.30); docs/trainer.md has the figures.
RSSM_TRAIN_EVERY = 4
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}

LossFn = Callable[[nn.Module, Any], torch.Tensor]


# --------------------------------------------------------------------------------- dynamics
class EpisodePrediction:
    """The predicted losses of one Predict episode on their way to the host.

    ``raw``: predicted loss before each step of the horizon, plus one for the first Correct
    step (device tensor copied without blocking, or host floats); ``bias``: the corrector's
    relative loss bias at Predict entry, applied to every value.
    """

    def __init__(self, raw: torch.Tensor | list[float], bias: float) -> None:
        self.bias = float(bias)
        self.event = None
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().reshape(-1).to(torch.float64)
            if raw.device.type == "cuda":
                host = torch.empty(raw.shape, dtype=torch.float64, pin_memory=True)
                host.copy_(raw, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record()
                raw = host
            else:
                raw = raw.clone()
        self.raw = raw

    @property
    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def raw_values(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        raw = self.raw.tolist() if isinstance(self.raw, torch.Tensor) else list(self.raw)
        return [float(x) for x in raw]

    def values(self) -> list[float]:
        return [x * (1.0 + self.bias) for x in self.raw_values()]

    def at(self, t: int) -> float | None:
        vals = self.values()
        return vals[t] if 0 <= t < len(vals) else None


class RSSMDynamics:
    """The RSSM ensemble (:class:`hybrid_triton.dynamics.DynamicsModel`) behind the trainer's
    dynamics interface. Everything stays on the device: ``observe_device`` takes device
    tensors at step time (Full steps only: they train it), ``confidence`` is a 0-d tensor the
    trainer reads ``host_lag`` steps late, ``predict`` returns device tensors.

    ``loss_smoothing`` (beta in [0, 1)): the model observes, forecasts and is calibrated on a
    bias-corrected exponential moving average of the step losses, not the raw loss of each
    batch. Why: each step sees a different batch, and the loss of one batch scatters around the
    expected loss by an amount no model of the run can forecast (on GPT-2 tiny at 4 x 64 tokens
    the held-out relative error of the raw loss stayed near 8% however well the trend was
    learnt, so a confidence that asks for 85% of forecasts within 5% was never reached and the
    trainer never entered Predict). The smoothed loss is the trajectory Predict has to follow;
    its forecast error is what confidence should measure. The divergence monitor still judges
    every Predict step's raw loss. ``0`` observes raw losses.
    """

    device_side = True

    def __init__(
        self,
        num_groups: int,
        device: torch.device | str,
        loss_smoothing: float = 0.9,
        **config: Any,
    ) -> None:
        from hybrid_triton.dynamics import DynamicsConfig, DynamicsModel

        # One training update of the ensemble per RSSM_TRAIN_EVERY Full steps (the others
        # filter and calibrate); ``dynamics={"train_every": 1}`` trains on every Full step.
        config.setdefault("train_every", RSSM_TRAIN_EVERY)

        if isinstance(loss_smoothing, bool) or not 0.0 <= float(loss_smoothing) < 1.0:
            raise ValueError(
                f"RSSMDynamics: loss_smoothing must be in [0, 1), got {loss_smoothing!r}"
            )
        self.loss_smoothing = float(loss_smoothing)
        self.model = DynamicsModel(num_groups, DynamicsConfig(device=device, **config))
        self._loss_avg = torch.zeros((), dtype=torch.float32, device=device)
        self._loss_count = 0  # host count: the bias correction 1 - beta^n needs no device read

    def _smoothed(self, loss: torch.Tensor) -> torch.Tensor:
        beta = self.loss_smoothing
        if beta == 0.0:
            return loss
        loss = loss.detach().float().reshape(())
        # A non-finite loss must not poison the average: such a step is skipped on the device.
        finite = torch.isfinite(loss)
        new = torch.where(finite, self._loss_avg * beta + loss * (1.0 - beta), self._loss_avg)
        self._loss_avg.copy_(new)
        self._loss_count += 1
        return torch.where(finite, self._loss_avg / (1.0 - beta**self._loss_count), loss)

    def observe_device(self, stats: dict[str, Any]) -> None:
        stats = dict(stats)
        stats["loss"] = self._smoothed(stats["loss"])
        self.model.observe(stats)

    def observe(self, loss: float, phase: str) -> None:
        """Host-side observation: nothing to do (the device path already observed)."""

    def confidence(self) -> torch.Tensor:
        return self.model.confidence()

    def predict(self, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_mean [T], scales [T, G])``."""
        p = self.model.predict(horizon)
        return p.loss_mean, p.scales_mean

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.model.state_dict())
        state["_trainer.loss_avg"] = self._loss_avg.detach().clone()
        state["_trainer.loss_count"] = self._loss_count
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        avg = state.pop("_trainer.loss_avg", None)
        count = state.pop("_trainer.loss_count", 0)
        self.model.load_state_dict(state)
        if avg is not None:
            self._loss_avg.copy_(avg)
        self._loss_count = int(count)


class TrendDynamics:
    """A small host-side stand-in for the RSSM dynamics model (``dynamics_model = "trend"``).

    An ensemble of K linear loss trends fitted on windows of different lengths over the recent
    real losses. Prediction = ensemble mean; disagreement = ensemble spread relative to the
    loss. Confidence is calibrated on Full steps: the share of recent Full-step losses that fell
    inside the band the model predicted for them one step ahead (mean +- 2 sigma of its recent
    relative errors), times ``exp(-disagreement / rel_tol)``. Per-group scales are 1 (the frozen
    Adam direction at its own step size); the corrector adjusts them.
    """

    device_side = False

    def __init__(
        self,
        num_groups: int,
        device: torch.device | str,
        windows: tuple[int, ...] = (8, 16, 32),
        calibration: int = 20,
        min_observations: int = 8,
        rel_tol: float = 0.05,
    ) -> None:
        self.num_groups = num_groups
        self.device = torch.device(device)
        self.windows = tuple(windows)
        self.calibration = int(calibration)
        self.min_observations = int(min_observations)
        self.rel_tol = float(rel_tol)
        self.losses: deque[float] = deque(maxlen=max(self.windows))
        self.rel_errors: deque[float] = deque(maxlen=self.calibration)
        self.hits: deque[float] = deque(maxlen=self.calibration)
        self.observations = 0

    def _members(self, horizon: int) -> list[list[float]]:
        out = []
        hist = list(self.losses)
        for w in self.windows:
            xs = hist[-w:]
            n = len(xs)
            if n < 2:
                out.append([xs[-1] if xs else math.nan] * horizon)
                continue
            mx, my = (n - 1) / 2, sum(xs) / n
            sxx = sum((i - mx) ** 2 for i in range(n))
            slope = sum((i - mx) * (y - my) for i, y in enumerate(xs)) / sxx
            out.append([my + slope * (n - 1 - mx + t + 1) for t in range(horizon)])
        return out

    def _band(self) -> float:
        if len(self.rel_errors) < 2:
            return math.inf
        m = sum(self.rel_errors) / len(self.rel_errors)
        return m + 2 * math.sqrt(sum((e - m) ** 2 for e in self.rel_errors) / len(self.rel_errors))

    def observe(self, loss: float, phase: str) -> None:
        """A real loss (host float) of a step whose weights came from the optimizer."""
        if not math.isfinite(loss):
            return
        if phase == Phase.FULL.value and len(self.losses) >= 2:
            expected = sum(m[0] for m in self._members(1)) / len(self.windows)
            rel = abs(loss - expected) / max(abs(expected), 1e-12)
            band = self._band()
            self.hits.append(1.0 if rel <= band else 0.0)
            self.rel_errors.append(rel)
        self.losses.append(float(loss))
        self.observations += 1

    def confidence(self) -> float:
        if self.observations < self.min_observations or len(self.hits) < self.min_observations:
            return 0.0
        members = self._members(1)
        preds = [m[0] for m in members]
        mean = sum(preds) / len(preds)
        spread = math.sqrt(sum((p - mean) ** 2 for p in preds) / len(preds))
        disagreement = spread / max(abs(mean), 1e-12)
        coverage = sum(self.hits) / len(self.hits)
        return float(coverage * math.exp(-disagreement / self.rel_tol))

    def predict(self, horizon: int) -> tuple[list[float], torch.Tensor]:
        """``(loss_mean [T], scales [T, G])``: the ensemble mean, and unit scales."""
        members = self._members(horizon)
        k = len(members)
        mean = [sum(m[t] for m in members) / k for t in range(horizon)]
        scales = torch.ones(horizon, self.num_groups, dtype=torch.float32, device=self.device)
        return mean, scales

    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self.losses),
            "rel_errors": list(self.rel_errors),
            "hits": list(self.hits),
            "observations": self.observations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.clear()
        self.losses.extend(state["losses"])
        self.rel_errors.clear()
        self.rel_errors.extend(state["rel_errors"])
        self.hits.clear()
        self.hits.extend(state["hits"])
        self.observations = int(state["observations"])


# --------------------------------------------------------------------------------- helpers
def segment_groups(table, max_groups: int = 16) -> list[tuple[int, int, list[int]]]:
    """Contiguous groups of arena segments, by module prefix (``transformer.h.3.`` and the
    like), merged down to at most ``max_groups``: ``(start, end, segment ids)`` in elements."""

    def key(name: str) -> str:
        parts = name.split(".")
        for i, p in enumerate(parts):
            if p.isdigit():
                return ".".join(parts[: i + 1])
        return parts[0] if len(parts) > 1 else name

    groups: list[list[int]] = []
    last = None
    for i, seg in enumerate(table):
        k = key(seg.name)
        if k != last:
            groups.append([])
            last = k
        groups[-1].append(i)
    while len(groups) > max_groups:  # merge the two smallest neighbours
        sizes = [sum(table[i].numel for i in g) for g in groups]
        j = min(range(len(groups) - 1), key=lambda i: sizes[i] + sizes[i + 1])
        groups[j : j + 2] = [groups[j] + groups[j + 1]]
    out = []
    for gi, g in enumerate(groups):
        start = table[g[0]].offset if gi else 0
        out.append((start, -1, g))
    for gi in range(len(out)):
        end = out[gi + 1][0] if gi + 1 < len(out) else None
        out[gi] = (out[gi][0], end, out[gi][2])
    return out


def _decay_first_group(
    model: nn.Module, decay_filter: Callable[[str, nn.Parameter], bool]
) -> tuple[ArenaGroup, int]:
    """One arena group of the model's trainable parameters with those that ``decay_filter``
    accepts first (tied parameters once, their other names as aliases), and their count."""
    entries = trainable_parameters(model)
    if not entries:
        raise ValueError(f"HybridTrainer: {type(model).__name__} has no trainable parameters")
    decays = [bool(decay_filter(names[0], p)) for p, names in entries]
    decayed = [e for e, d in zip(entries, decays) if d]
    ordered = decayed + [e for e, d in zip(entries, decays) if not d]
    group = ArenaGroup.from_params([p for p, _ in ordered], [names for _, names in ordered])
    return group, len(decayed)


def _split(batch: Any, n: int) -> list[tuple[Any, int]]:
    """``batch`` (a tensor, or a tuple/list/dict of tensors with one leading dim) in ``n``
    near-equal pieces along dim 0, with their sizes."""
    if isinstance(batch, torch.Tensor):
        pieces = torch.tensor_split(batch, n) if n > 1 else (batch,)
        return [(p, p.shape[0]) for p in pieces]
    if isinstance(batch, dict):
        keys = list(batch)
        split = {k: _split(batch[k], n) for k in keys}
        return [({k: split[k][i][0] for k in keys}, split[keys[0]][i][1]) for i in range(n)]
    if isinstance(batch, (tuple, list)):
        parts = [_split(t, n) for t in batch]
        first = parts[0]
        return [(type(batch)(p[i][0] for p in parts), first[i][1]) for i in range(len(first))]
    raise TypeError(
        f"HybridTrainer: a batch must be a tensor or a tuple/list/dict of tensors, got "
        f"{type(batch).__name__}"
    )


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)) and batch:
        sizes = {_batch_size(t) for t in batch}
        if len(sizes) != 1:
            raise ValueError(f"HybridTrainer: batch parts have different sizes {sorted(sizes)}")
        return sizes.pop()
    raise TypeError(
        f"HybridTrainer: a batch must be a tensor or a tuple/list/dict of tensors, got "
        f"{type(batch).__name__}"
    )


@dataclass
class _Pending:
    """Device values of one step on their way to the host (read ``host_lag`` steps later)."""

    step: int
    phase: str
    episode: int
    values: torch.Tensor  # host float64 [4] (loss, grad_norm, loss_scale, confidence)
    event: Any
    info: dict[str, Any] = field(default_factory=dict)
    prediction: EpisodePrediction | None = None
    timing: tuple[Any, Any] | None = None  # CUDA events around the step's work

    def predicted_loss(self) -> float | None:
        if self.prediction is None or "predicted_index" not in self.info:
            return self.info.get("predicted_loss")
        vals = self.prediction.values()
        i = self.info["predicted_index"]
        return vals[i] if -len(vals) <= i < len(vals) else None

    def floats(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        if self.timing is not None:
            started, ended = self.timing
            ended.synchronize()
            self.info["step_ms"] = started.elapsed_time(ended)
            self.timing = None
        return [float(v) for v in self.values.tolist()]


# --------------------------------------------------------------------------------- trainer
class HybridTrainer:
    """Phase-aware trainer. See the module docstring and ``docs/trainer.md``.

    Args:
        model: any ``nn.Module`` whose trainable parameters share one dtype and device.
        loss_fn: ``loss_fn(model, micro_batch) -> scalar loss`` (the mean over the micro-batch).
        optimizer: a :class:`FusedAdamW` over the model's arena; default: one built with
            ``lr`` (and ``optimizer_kwargs``).
        config: a :class:`TrainerConfig`, a preset name, a mapping, or a path to a
            ``.toml``/``.json``/``.yaml`` file. Default (None): ``TrainerConfig(predict=False)``,
            no Predict phase (the measured loss cost of every Predict preset is above 1%; pass
            a preset such as ``"balanced"`` to trade loss for skipped backward passes).
        dynamics: a dynamics model (``observe``/``predict``/``confidence``); default
            :class:`TrendDynamics`.
        max_groups: segment groups for per-group scales and corrections.
        decay_filter: ``decay_filter(name, param) -> bool``: which parameters weight decay
            applies to (e.g. ``lambda n, p: p.dim() >= 2``: matrices and embeddings, not
            biases and norm gains, as the GPT-2 recipes do). Only when the trainer builds the
            optimizer: the arena then holds the decayed parameters first, the optimizer runs
            with ``weight_decay=0`` and the trainer applies ``optimizer_kwargs["weight_decay"]``
            to that prefix of the master weights before each step (AdamW's decoupled
            ``w *= 1 - lr * wd``, skipped with the step on a non-finite gradient). Default:
            every parameter decays.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: FusedAdamW | None = None,
        config: TrainerConfig | str | dict | None = None,
        *,
        lr: float = 1e-3,
        optimizer_kwargs: dict[str, Any] | None = None,
        dynamics: Any | None = None,
        max_groups: int = 16,
        decay_filter: Callable[[str, nn.Parameter], bool] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"HybridTrainer: model must be an nn.Module, got {type(model).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError("HybridTrainer: loss_fn must be callable as loss_fn(model, batch)")
        self.cfg = self._resolve_config(config)
        self.model = model
        self.loss_fn = loss_fn
        # Weight decay the trainer applies itself (decay_filter): the rate and the end of the
        # decayed prefix of the arena, in elements.
        self.weight_decay = 0.0
        self.decay_end = 0
        if decay_filter is not None and optimizer is not None:
            raise ValueError(
                "HybridTrainer: decay_filter needs the trainer to build the optimizer (it orders "
                "the arena); pass optimizer=None and the optimizer's options in optimizer_kwargs"
            )
        if decay_filter is not None and not callable(decay_filter):
            raise TypeError("HybridTrainer: decay_filter must be callable as f(name, param)")
        if optimizer is None and decay_filter is not None:
            kwargs = dict(optimizer_kwargs or {})
            self.weight_decay = float(kwargs.pop("weight_decay", 1e-2))  # FusedAdamW's default
            group, decayed = _decay_first_group(model, decay_filter)
            self.decay_end = (
                group.table[decayed].offset if decayed < len(group.table) else (group.numel)
            )
            if not self.weight_decay >= 0.0:
                raise ValueError(
                    f"HybridTrainer: weight_decay must be >= 0, got {self.weight_decay}"
                )
            optimizer = FusedAdamW(group, lr=lr, weight_decay=0.0, **kwargs)
        elif optimizer is None:
            arena = FlatArena.from_module(model)
            optimizer = FusedAdamW(arena, lr=lr, **(optimizer_kwargs or {}))
        elif not isinstance(optimizer, FusedAdamW):
            raise TypeError(
                f"HybridTrainer: optimizer must be a hybrid_triton FusedAdamW, got "
                f"{type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.group = optimizer.arena_group
        self.device = self.group.device
        self.master = optimizer.master
        cfg = self.cfg
        self.controller = PhaseController(cfg)
        self.groups = segment_groups(self.group.table, max_groups)
        self.num_groups = len(self.groups)
        self.found_inf = torch.zeros(1, dtype=torch.float32, device=self.device)
        self.scaler = None
        if any(cfg.precision_for(p) == "fp16" for p in Phase):
            from hybrid_triton.precision import DynamicLossScaler

            self.scaler = DynamicLossScaler(device=self.device)
        # The gradient path: "flat" (autograd writes into one flat buffer; one micro-batch,
        # no fp16) or "hooks" (the fp32 accumulator); TrainerConfig.grad_path "auto" picks.
        self.grad_path = cfg.resolved_grad_path()
        if self.grad_path == "flat":
            self.accum: GradAccumulator | FlatGradBuffer = FlatGradBuffer(
                optimizer, found_inf=self.found_inf
            )
        else:
            self.accum = GradAccumulator(self.group, cfg.micro_batches, found_inf=self.found_inf)
        self.offloader = StateOffloader(
            cfg.offload, async_restore=cfg.async_restore, quant_block=cfg.quant_block
        )
        # The fp32 master weights during Predict (predict_master="host", bf16 shadows only):
        # freed on the device, the rollback snapshot is their host copy; restored at Predict
        # exit with the exact sum of the predicted steps added (_fix_master).
        self.master_offloader = StateOffloader("pinned", async_restore=cfg.async_restore)
        self.master_to_host = (
            cfg.predict_master == "host"
            and optimizer.master_weights
            and self.group.dtype == torch.bfloat16  # stochastic rounding targets bf16
        )
        self.residuals = ResidualStore(
            cfg.residual_capacity,
            cfg.residual_format,
            cfg.quant_block,
            cfg.residual_error_feedback,
            device="cpu" if self.device.type == "cuda" else self.device,
        )
        self.corrector = Corrector(
            self.num_groups, self.device, cfg.corrector_decay, cfg.corrector_max_adjust
        )
        self.divergence = DivergenceMonitor(
            cfg.divergence_rel_warning,
            cfg.divergence_rel_critical,
            cfg.divergence_sigma,
            cfg.divergence_history,
            cfg.divergence_escalate_after,
        )
        self.outliers = OutlierFilter(window=max(8, cfg.divergence_history))
        self._own_dynamics = dynamics is None  # built from cfg.dynamics_model
        if dynamics is not None:
            self.dynamics = dynamics
        elif cfg.dynamics_model == "rssm":
            self.dynamics = RSSMDynamics(self.num_groups, self.device, **cfg.dynamics)
        else:
            self.dynamics = TrendDynamics(self.num_groups, self.device, **cfg.dynamics)
        self.metrics = MetricsCollector(cfg.metrics_path, cfg.progress, device=self.device)
        self.metrics.note_precision(self.controller.plan.precision)
        self.confidence = 0.0
        self._pending: deque[_Pending] = deque()
        # Predict episode state.
        self.episode = 0
        self._snapshot: torch.Tensor | None = None
        self._direction: list[Any] | None = None  # one QuantizedTensor per group
        self._alphas: torch.Tensor | None = None  # float32 [G]: -lr * scale_g * correction_g
        # float32 [G]: sum of the alphas applied in this episode (the master's fix-up).
        self._alpha_sum: torch.Tensor | None = None
        self._prepared: tuple[PhasePlan, bool, Any] | None = None
        self._prediction: EpisodePrediction | None = None
        self._rolled_back_episode = -1
        self._episode_predict_steps = 0  # Predict steps of the current episode (for rollbacks)
        self._accum_freed = False
        self._last_flags: dict[str, Any] = {}
        self._bind_precision(self.controller.plan)
        self.restart_memory_peak()

    def restart_memory_peak(self) -> None:
        """Count the current phase's peak memory (CUDA) from now: the first phase's peak then
        holds the trainer's own state and steps, not what ran in the process before (or a
        caller's setup tensors freed since the trainer was built, when called again)."""
        self.metrics.phase_boundary(None)

    # ------------------------------------------------------------------ config
    @staticmethod
    def _resolve_config(config: Any) -> TrainerConfig:
        if config is None:
            # No Predict phase unless asked for: on the H100 (GPT-2 small, 8 x 1024, 1,000
            # steps; reports/training/2026-11-25_005655 and _010018) every Predict preset
            # ended with a validation loss 2.4-10% above plain bf16 training, Predict off
            # 1.4% (the seed-to-seed spread at that length); docs/trainer.md has the table.
            return TrainerConfig(predict=False)
        if isinstance(config, TrainerConfig):
            config.validate()
            return config
        if isinstance(config, dict):
            return TrainerConfig.from_dict(config)
        if isinstance(config, str) and config in PRESETS:
            return TrainerConfig.preset(config)
        return TrainerConfig.from_file(config)

    @property
    def step_count(self) -> int:
        """Steps completed (the index of the next batch)."""
        return self.controller.step

    @property
    def phase(self) -> Phase:
        return self.controller.phase

    @property
    def plan(self) -> PhasePlan:
        return self.controller.plan

    # ------------------------------------------------------------------ precision
    def _bind_precision(self, plan: PhasePlan) -> None:
        acc = self.accum
        if plan.precision == "fp16" and self.scaler is not None:
            acc.inv_scale, acc.found_inf = self.scaler.inv_scale, self.scaler.found_inf
        else:
            acc.inv_scale, acc.found_inf = None, self.found_inf

    def _autocast(self, precision: str):
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST[precision])

    # ------------------------------------------------------------------ the step
    def prepare_step(self) -> tuple[PhasePlan, bool]:
        """Read the host values that are due and apply the phase transition due before the
        next step, if any: ``(plan of the next step, whether it starts a new phase)``.

        :meth:`step` calls it itself; calling it first (once) lets a caller measure a phase's
        entry work (Predict: rollback snapshot, direction, offload) apart from the phase's own
        steps. The step time still counts from here."""
        if self._prepared is not None:
            return self._prepared[0], self._prepared[1]
        self._drain(self.cfg.host_lag)
        # Step time: from here (phase entry work included) to the end of the step's work;
        # CUDA events on the device (read late, with the loss), the wall clock on CPU.
        if self.device.type == "cuda":
            started = torch.cuda.Event(enable_timing=True)
            started.record()
        else:
            started = time.perf_counter()
        plan, new_phase = self.controller.begin_step(self.confidence)
        if new_phase:
            self._transition(plan)
        self._prepared = (plan, new_phase, started)
        return plan, new_phase

    def step(self, batch: Any) -> dict[str, Any]:
        """One trainer step on ``batch`` (one effective batch). Returns host-side facts of this
        step (phase, precision, micro-batches); losses arrive in the metrics ``host_lag``
        steps later."""
        size = _batch_size(batch)
        self.prepare_step()
        plan, new_phase, started = self._prepared
        self._prepared = None
        if plan.phase is Phase.PREDICT:
            loss = self._predict_step(batch, plan)
            gnorm = torch.zeros_like(loss)
        else:
            loss, gnorm = self._backward_step(batch, size, plan)
        scale = (
            self.scaler.scale if (self.scaler is not None and plan.precision == "fp16") else None
        )
        self._push(loss, gnorm, scale, plan, size, started)
        self.controller.end_step()
        return {
            "step": self.controller.step - 1,
            "phase": plan.phase.value,
            "precision": plan.precision,
            "micro_batches": plan.micro_batches,
            "new_phase": new_phase,
        }

    def _backward_step(self, batch: Any, size: int, plan: PhasePlan):
        acc = self.accum
        n_micro = min(plan.micro_batches, size) if size > 0 else 1
        acc.num_micro_batches = n_micro
        acc.reset()
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self.model.train()
        for piece, n in _split(batch, n_micro):
            weight = n / size
            acc.alpha = weight
            with self._autocast(plan.precision):
                loss = self.loss_fn(self.model, piece)
            if loss.dim() != 0:
                raise ValueError(
                    f"HybridTrainer: loss_fn must return a scalar loss, got shape "
                    f"{tuple(loss.shape)}"
                )
            # The micro-batch weight n_i / B is applied by the accumulator (alpha).
            to_backward = loss
            if plan.precision == "fp16" and self.scaler is not None:
                to_backward = self.scaler.scale_loss(loss)
            to_backward.backward()
            loss_sum = loss_sum + loss.detach().float() * weight
        if self.grad_path == "flat":
            acc.finish()  # the gradient's sum of squares and non-finite flag, on the device
        # The optimizer state and the master weights may be coming back from a Predict phase:
        # the forward and backward above ran meanwhile; wait on the device (no host sync).
        self.offloader.wait()
        self.master_offloader.wait()
        flag = acc.found_inf
        # An outlier batch (a loss far above the recent median, see OutlierFilter) takes no
        # optimizer step: its huge gradient would inflate Adam's second moment for hundreds
        # of steps. Skipped on the device, like a non-finite gradient.
        outlier_limit = self.outliers.limit()
        if math.isfinite(outlier_limit):
            guard = loss_sum > outlier_limit
            flag = torch.maximum(flag, guard.to(torch.float32).reshape(1))
        if plan.phase is Phase.CORRECT:
            # Device-side guard: a Correct step whose loss is already past the divergence
            # monitor's critical limit is skipped on the device (weights and moments stay as
            # they are), so a rollback decided host_lag steps later finds clean optimizer
            # state. The limit is a host float known now; the comparison stays on the device.
            predicted = self._correct_prediction() if self.controller.phase_step == 0 else None
            limit = self.divergence.critical_limit(predicted)
            if math.isfinite(limit):
                guard = (~torch.isfinite(loss_sum)) | (loss_sum > limit)
                flag = torch.maximum(flag, guard.to(torch.float32).reshape(1))
        # Correct steps measure the real update against the predicted one (one fp32
        # temporary of the master's size, freed after the step).
        # Full steps that feed the dynamics model measure the update too (its per-group norms).
        record = plan.phase is Phase.CORRECT and self._direction is not None
        observe = self._observes_on_device(plan)
        before = self.master.clone() if record or observe else None
        self._decay(flag)
        self.optimizer.step(grad=acc.accumulator, found_inf=flag, grad_sumsq=acc.total_sumsq)
        if record:
            self._record_residual(before, flag)
        if observe:
            self.dynamics.observe_device(
                {
                    "loss": loss_sum,
                    "grad_norm": acc.grad_norm().reshape(()),
                    "update_norms": self._update_norms(before),
                    "lr": self.optimizer._lr.reshape(()),
                    "step": self.controller.step,
                    "phase": plan.phase.value,
                }
            )
        if plan.precision == "fp16" and self.scaler is not None:
            self.scaler.update()
        else:
            acc.found_inf.zero_()
        return loss_sum, acc.grad_norm().reshape(())

    def _decay(self, skip: torch.Tensor) -> None:
        """``decay_filter``'s weight decay: ``master[:decay_end] *= 1 - lr * wd`` before the
        optimizer step (as torch's AdamW orders it), unless the step is skipped on the device
        (``skip`` nonzero). The rate is the host value the optimizer is about to use."""
        if not self.weight_decay or not self.decay_end:
            return
        keep = 1.0 - float(self.optimizer.param_groups[0]["lr"]) * self.weight_decay
        factor = torch.where(skip.reshape(1) > 0, 1.0, keep).to(torch.float32)
        self.master[: self.decay_end].mul_(factor)

    def _observes_on_device(self, plan: PhasePlan) -> bool:
        """Full steps feed a device-side dynamics model; with Predict off nothing reads its
        confidence, so its features (update norms) and training are not computed at all."""
        return (
            self.cfg.predict
            and plan.phase is Phase.FULL
            and getattr(self.dynamics, "device_side", False)
        )

    def _predict_step(self, batch: Any, plan: PhasePlan) -> torch.Tensor:
        self._episode_predict_steps += 1
        if self.controller.steps_until_phase_end <= self.cfg.lookahead:
            self.offloader.start_restore()
        size = _batch_size(batch)
        n_micro = min(plan.micro_batches, size) if size > 0 else 1
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for piece, n in _split(batch, n_micro):
                with self._autocast(plan.precision):
                    loss = self.loss_fn(self.model, piece)
                loss_sum = loss_sum + loss.detach().float() * (n / size)
            self._apply_predicted_update(self.controller.phase_step)
        return loss_sum

    def _after_predict(self) -> bool:
        """True in the first step of a Correct phase entered from Predict."""
        last = self.controller.transitions[-1] if self.controller.transitions else None
        return (
            self.phase is Phase.CORRECT
            and self.controller.phase_step == 0
            and last is not None
            and last[1] == Phase.PREDICT.value
            and self._prediction is not None
        )

    def _correct_prediction(self) -> float | None:
        """The predicted loss of the first step after a Predict phase (it measures the last
        predicted update) when it has already reached the host, else None (no waiting)."""
        if not self._after_predict() or not self._prediction.ready:
            return None
        return self._prediction.values()[-1]

    def _apply_predicted_update(self, t: int) -> None:
        """Step ``t`` of the horizon: ``master += alphas[t, g] * dequant(dir_g)`` per group."""
        from hybrid_triton.kernels import cast_scale, dequantize_add

        row = min(t, self._alphas.shape[0] - 1)
        if self.master_offloader.offloaded:
            # The master is in host memory: the bf16 weights take the step in place, rounded
            # stochastically (round-to-nearest would drop steps below half a bf16 ulp); the
            # master gets the exact sum at Predict exit.
            flat = self.group.flat
            for gi, (start, end, _) in enumerate(self.groups):
                dequantize_add(
                    flat[start:end],
                    self._direction[gi],
                    alpha=self._alphas[row, gi : gi + 1],
                    stochastic_rounding=True,
                    seed=self._rounding_seed(t, gi),
                )
            self._alpha_sum.add_(self._alphas[row])
            return
        for gi, (start, end, _) in enumerate(self.groups):
            target = self.master[start:end]
            dequantize_add(target, self._direction[gi], alpha=self._alphas[row, gi : gi + 1])
        if self.optimizer.master_weights:
            cast_scale(self.master, 1.0, out=self.group.flat, out_dtype=self.group.flat.dtype)

    def _rounding_seed(self, t: int, group: int) -> int:
        """A distinct, reproducible seed per (episode, Predict step, segment group): a resumed
        run rounds exactly as the uninterrupted one."""
        return (self.episode * 65536 + t) * 1024 + group

    def _fix_master(self) -> None:
        """``master += alpha_sum_g * dequant(dir_g)`` per group: the restored snapshot gets
        the Predict steps the bf16 weights took (queued on the restore stream)."""
        from hybrid_triton.kernels import dequantize_add

        for gi, (start, end, _) in enumerate(self.groups):
            dequantize_add(
                self.master[start:end], self._direction[gi], alpha=self._alpha_sum[gi : gi + 1]
            )

    # ------------------------------------------------------------------ transitions
    def _transition(self, plan: PhasePlan) -> None:
        old = self.controller.transitions[-1][1] if self.controller.transitions else None
        self.metrics.phase_boundary(old)
        self.metrics.counters["transitions"] += 1
        self.metrics.note_precision(plan.precision)
        self._bind_precision(plan)
        if old == Phase.PREDICT.value:
            self._leave_predict()
        if old == Phase.CORRECT.value or plan.phase is Phase.FULL:
            self._direction = None
            self._alphas = None
        if plan.phase is Phase.PREDICT:
            self._enter_predict(plan)
        # The entry work (snapshot, direction, offload, restores started) gets its own peak,
        # "enter:<phase>": it starts from the previous phase's resident state, so it would
        # otherwise hide what the phase itself holds.
        self.metrics.phase_boundary(f"enter:{plan.phase.value}")

    def _direction_groups(self):
        """Yield, per segment group, ``m_hat / (sqrt(v_hat) + eps) + weight_decay * w`` as an
        fp32 temporary of the group's size (the AdamW step direction). 8/4-bit moments are
        dequantized one group at a time too (the quantization blocks that cover the group), so
        no temporary of the arena's size exists."""
        opt = self.optimizer
        hp = opt.param_groups[0]
        beta1, beta2 = hp["betas"]
        st = opt.flat_state
        t = st["step"].clamp_min(1.0)
        bc1 = 1.0 - torch.pow(torch.full_like(t, beta1), t)
        sqrt_bc2 = (1.0 - torch.pow(torch.full_like(t, beta2), t)).sqrt()
        for start, end, _ in self.groups:
            if opt.state_bits in (32, 16):
                m = st["exp_avg"][start:end].float()
                v = st["exp_avg_sq"][start:end].float()
            else:
                m = self._dequantized_moment("exp_avg", start, end)
                v = self._dequantized_moment("exp_avg_sq", start, end)
            # Out of place first: with 32-bit state, v is the optimizer's own buffer.
            d = v.sqrt().div_(sqrt_bc2).add_(hp["eps"])
            del v
            d.reciprocal_().mul_(m).div_(bc1)
            del m
            if hp["weight_decay"]:
                d.add_(self.master[start:end], alpha=hp["weight_decay"])
            # decay_filter's decay covers the prefix [0, decay_end) of the arena only.
            stop = min(self.group.numel if end is None else end, self.decay_end)
            if self.weight_decay and stop > start:
                d[: stop - start].add_(self.master[start:stop], alpha=self.weight_decay)
            yield d

    def _dequantized_moment(self, which: str, start: int, end: int | None) -> torch.Tensor:
        """float32 ``[end - start]``: elements ``start:end`` of an 8/4-bit moment, decoded from
        the quantization blocks that cover them only."""
        from hybrid_triton.kernels.adamw import dequantize_moments_ref

        opt = self.optimizer
        st, q, bits = opt.flat_state, opt.qblock, opt.state_bits
        end = self.group.numel if end is None else end  # the last group runs to the end
        first, last = start // q, -(-end // q)  # blocks [first, last)
        lo = first * q
        hi = min(last * q, self.group.numel)
        # 8-bit: one code per element; 4-bit: two per byte, each block's q // 2 bytes together.
        codes = st[which][lo:hi] if bits == 8 else st[which][first * q // 2 : last * q // 2]
        scale = st[f"{which}_scale"][first:last]
        vals = dequantize_moments_ref(codes, scale, hi - lo, bits, which, q)
        return vals[start - lo : end - lo]

    def _update_norms(self, before: torch.Tensor) -> torch.Tensor:
        """float32 [G]: per-group norms of the update just taken, ``||master - before||`` (the
        dynamics model's features; ``before`` is overwritten with the update). That is
        ``lr * ||m_hat / (sqrt(v_hat) + eps) + wd * w||`` of the step (the AdamW direction the
        earlier code rebuilt from the moments every Full step: 8-bit moments decoded by the
        torch reference, some 20 elementwise passes over the arena), read off the master in
        three passes; a step skipped on the device moved nothing: 0."""
        update = torch.sub(self.master, before, out=before)
        norms = [torch.linalg.vector_norm(update[start:end]) for start, end, _ in self.groups]
        return torch.stack(norms)

    def _enter_predict(self, plan: PhasePlan) -> None:
        from hybrid_triton.kernels import quantize_blockwise

        self.episode += 1
        self._episode_predict_steps = 0
        # Snapshot for rollback, in host memory (pinned on CUDA: the copy does not block).
        pin = self.device.type == "cuda"
        if self._snapshot is None or self._snapshot.numel() != self.master.numel():
            self._snapshot = torch.empty(
                self.master.shape, dtype=torch.float32, device="cpu", pin_memory=pin
            )
        self._snapshot.copy_(self.master, non_blocking=pin)
        # Gradients are not needed: free the accumulator (its storage; the object stays).
        for p in self.group.params:
            p.grad = None
        self.accum.accumulator.untyped_storage().resize_(0)
        self._accum_freed = True
        # The frozen update direction, compact on the device.
        # Group by group, so the fp32 temporary is one group's size.
        self._direction = [
            quantize_blockwise(d, self.cfg.direction_format, self.cfg.quant_block)
            for d in self._direction_groups()
        ]
        # One step past the horizon: the first Correct step's loss measures the last update.
        loss_mean, scales = self.dynamics.predict(plan.steps + 1)
        self._prediction = EpisodePrediction(loss_mean, self.corrector.loss_bias)
        scales = scales.to(self.device, torch.float32)
        if scales.shape != (plan.steps + 1, self.num_groups):
            raise ValueError(
                f"dynamics model returned scales of shape {tuple(scales.shape)}; expected "
                f"{(plan.steps + 1, self.num_groups)} (steps, segment groups)"
            )
        # Scales are ratios to the last observed update norm: bounded, so one bad forecast
        # cannot make a step more than SCALE_LIMIT times larger or smaller than Adam's own.
        scales = scales.nan_to_num(1.0, 1.0, 1.0).clamp(1.0 / SCALE_LIMIT, SCALE_LIMIT)
        self._alphas = -(self.optimizer._lr * scales * self.corrector.correction[None, :])
        self.offloader.offload(self.optimizer.state_tensors())
        if self.master_to_host:
            # The snapshot copy was queued above on this stream; the freed block is reused
            # only by later work on the same stream, after the copy.
            self._alpha_sum = torch.zeros(self.num_groups, dtype=torch.float32, device=self.device)
            self.master_offloader.offload(
                {"master": self.master}, host_copies={"master": self._snapshot}
            )
        if self.cfg.offload == "drop":
            # Re-initialized moments: restart bias correction too, or the first step after
            # Predict would be about (1 - beta1) / sqrt(1 - beta2) times too large.
            self._drop_reset = True

    def _leave_predict(self, rollback: bool = False) -> None:
        self.offloader.start_restore()
        # The master comes back from the snapshot on the side stream, behind the first Correct
        # step's forward and backward (which need only the bf16 weights); a rollback takes the
        # snapshot as it is.
        self.master_offloader.start_restore(None if rollback else self._fix_master)
        if self._accum_freed:
            acc = self.accum.accumulator
            acc.untyped_storage().resize_(acc.numel() * acc.element_size())
            acc.zero_()
            self._accum_freed = False
        if getattr(self, "_drop_reset", False):
            self.offloader.wait()
            self.optimizer.flat_state["step"].zero_()
            self._drop_reset = False

    def _record_residual(self, before: torch.Tensor, skipped: torch.Tensor) -> None:
        """``before`` becomes the residual: actual update minus the predicted one."""
        from hybrid_triton.kernels import dequantize_blockwise

        actual = torch.sub(self.master, before, out=before)
        dots, pred_sq, norms = [], [], []
        for gi, (start, end, _) in enumerate(self.groups):
            pred = dequantize_blockwise(self._direction[gi], dtype=torch.float32)
            pred.mul_(self._alphas[-1, gi])
            a = actual[start:end]
            dots.append(torch.dot(a, pred))
            pred_sq.append(torch.dot(pred, pred))
            a.sub_(pred)
            norms.append(torch.linalg.vector_norm(a))
        # A step skipped on the device (non-finite gradient, divergence guard) moved nothing:
        # it says nothing about the step size, so the corrector ignores it.
        self.corrector.update(torch.stack(dots), torch.stack(pred_sq), skip=skipped)
        self.residuals.add(self.controller.step, actual, torch.stack(norms))

    # ------------------------------------------------------------------ rollback
    def rollback(self, reason: str) -> None:
        """Put the master weights back to the Predict entry snapshot and force Full."""
        if self._snapshot is None:
            raise RuntimeError("HybridTrainer.rollback: no Predict entry snapshot to return to")
        # Close the rolled-back phase's peak before anything comes back: the optimizer state,
        # the master and the gradient accumulator restored here are the rollback's work (its
        # own peak, "rollback"), not what the Predict phase held. Counted inside "predict",
        # they doubled the Predict peak of the 800-step H100 run (1.602 vs 0.810 GiB).
        self.metrics.phase_boundary(self.phase.value)
        if self.phase is Phase.PREDICT:
            self._leave_predict(rollback=True)
        self.offloader.wait()
        self.master_offloader.wait()
        self.master.copy_(self._snapshot, non_blocking=self._snapshot.is_pinned())
        if self.optimizer.master_weights:
            self.group.flat.copy_(self.master)
        self._direction = None
        self._alphas = None
        self._rolled_back_episode = self.episode
        self.metrics.phase_boundary("rollback")
        self.controller.force_full(f"rollback: {reason}")
        self._bind_precision(self.controller.plan)
        self.metrics.note_precision(self.controller.plan.precision)
        self.metrics.counters["rollbacks"] += 1
        # Their updates are gone: steps without backward that bought no progress.
        self.metrics.counters["predict_steps_rolled_back"] += self._episode_predict_steps
        self._episode_predict_steps = 0
        self.divergence.reset_streak()

    # ------------------------------------------------------------------ host side
    def _push(self, loss, gnorm, scale, plan: PhasePlan, size: int, started) -> None:
        nan = torch.full((), math.nan, device=self.device)
        conf = nan
        if self._observes_on_device(plan):
            conf = self.dynamics.confidence()
        vals = torch.stack(
            [
                loss.float().reshape(()),
                gnorm.float().reshape(()),
                (scale.reshape(()) if scale is not None else torch.ones((), device=self.device)),
                torch.as_tensor(conf, dtype=torch.float32, device=self.device).reshape(()),
            ]
        ).to(torch.float64)
        event = None
        timing = None
        if self.device.type == "cuda":
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            timing = (started, ended)
            host = torch.empty(4, dtype=torch.float64, pin_memory=True)
            host.copy_(vals, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            vals = host
        else:
            vals = vals.clone()
        alloc, reserved = self.metrics.memory_now()
        t = self.controller.phase_step
        info = {
            "phase_step": t,
            "precision": plan.precision,
            "micro_batches": plan.micro_batches,
            "effective_batch": size,
            "micro_batch": self.accum.micro_batch if plan.backward else 0,
            "accumulation_progress": self.accum.progress if plan.backward else 0.0,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "confidence": self.confidence,
            "mem_allocated": alloc,
            "mem_reserved": reserved,
            "optimizer_state_offloaded": self.offloader.offloaded,
            "bytes_freed": self.offloader.stats.bytes_freed if plan.phase is Phase.PREDICT else 0,
        }
        if timing is None:
            info["step_ms"] = (time.perf_counter() - started) * 1e3
        prediction = None
        if plan.phase is Phase.PREDICT:
            prediction, info["predicted_index"] = self._prediction, t
        elif self._after_predict():
            prediction, info["predicted_index"] = self._prediction, -1
            info["after_predict"] = True
        self._pending.append(
            _Pending(
                self.controller.step,
                plan.phase.value,
                self.episode,
                vals,
                event,
                info,
                prediction,
                timing,
            )
        )

    def _drain(self, keep: int) -> None:
        """Process pending host values, leaving the newest ``keep`` (still in flight)."""
        while len(self._pending) > keep:
            self._process(self._pending.popleft())

    def _process(self, rec: _Pending) -> None:
        loss, gnorm, scale, conf = rec.floats()
        out = {"step": rec.step, "phase": rec.phase, "loss": loss, "grad_norm": gnorm}
        out.update(rec.info)
        out.pop("predicted_index", None)
        out["predicted_loss"] = rec.predicted_loss()
        out["loss_scale"] = scale
        checked = rec.phase == Phase.PREDICT.value or rec.info.get("after_predict", False)
        if checked:
            predicted = out["predicted_loss"]
            if rec.phase == Phase.PREDICT.value:
                out["grad_norm"] = None
            if rec.episode != self._rolled_back_episode:
                verdict = self.divergence.check(loss, predicted)
                out["divergence"] = verdict.level.name.lower()
                if verdict.level is Level.CRITICAL:
                    out["rollback"] = verdict.reason
                    self.rollback(verdict.reason)
                    checked = True  # a rolled-back loss is no history, and teaches nothing
                else:
                    if predicted is not None:
                        self.corrector.observe_loss(loss, predicted)
                    if rec.phase != Phase.PREDICT.value:
                        checked = False  # a real step that passed: it is history too
        if not checked:
            self._observe_real_loss(loss, rec.phase, out)
        if not math.isnan(conf):
            self.confidence = conf
        self.metrics.record(out)

    def _observe_real_loss(self, loss: float, phase: str, out: dict[str, Any]) -> None:
        """A real step's loss enters the divergence history and the dynamics model, unless it
        is a single outlier (one bad batch), which would bias every later prediction."""
        if not math.isfinite(loss):
            return  # the step was skipped on the device
        if not self.outliers.accept(loss):
            out["outlier"] = True
            self.metrics.counters["outliers"] += 1
            return
        self.divergence.observe(loss)
        self.dynamics.observe(loss, phase)
        if not getattr(self.dynamics, "device_side", False):
            self.confidence = float(self.dynamics.confidence())

    def flush(self) -> None:
        """Read every pending device value now (a host sync: for the end of a run)."""
        self._drain(0)

    # ------------------------------------------------------------------ runs and reports
    def train(self, batches: Iterable[Any], steps: int | None = None) -> dict[str, Any]:
        """Run ``steps`` steps (or until ``batches`` ends); returns :meth:`summary`."""
        for i, batch in enumerate(batches):
            if steps is not None and i >= steps:
                break
            self.step(batch)
        return self.summary()

    def phase_peaks(self) -> dict[str, dict[str, int]]:
        """Per-phase peak allocated/reserved bytes (CUDA), the current phase included."""
        self.metrics.phase_boundary(self.phase.value)
        return {k: dict(v) for k, v in self.metrics.phase_peaks.items()}

    def summary(self) -> dict[str, Any]:
        self.flush()
        self.phase_peaks()
        out = self.metrics.summary()
        out["phase_steps"] = dict(self.controller.step_counts)
        out["phase_entries"] = dict(self.controller.phase_counts)
        out["transitions"] = [list(t) for t in self.controller.transitions]
        out["offload"] = self.offloader.resolve_stats().to_dict()
        out["master_offload"] = self.master_offloader.resolve_stats().to_dict()
        out["residuals"] = {"stored": len(self.residuals), "bytes": self.residuals.nbytes}
        out["divergence"] = dict(self.divergence.counts)
        return out

    def close(self) -> None:
        """Flush the metrics and let go of the model: the optimizer state comes back if a
        Predict phase had moved it, the accumulation hooks or the flat gradient buffer are
        removed (parameters get ordinary ``.grad`` again) and the Predict buffers (direction,
        snapshot) are dropped, so nothing the trainer made stays reachable from the model's
        parameters."""
        self.flush()
        self.metrics.close()
        if self.offloader.offloaded:
            self.offloader.restore()
        if self.master_offloader.offloaded:
            # Mid-Predict: the master gets the steps taken so far, then the shadows follow it.
            self.master_offloader.restore(self._fix_master)
            self.group.flat.copy_(self.master)
        self.accum.remove()
        self._direction = self._alphas = self._snapshot = self._alpha_sum = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The complete state (tensors copied to the host). Reads pending device values."""

        def cpu(x):
            if isinstance(x, torch.Tensor):
                return x.detach().to("cpu", copy=True)
            if isinstance(x, dict):
                return {k: cpu(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(cpu(v) for v in x)
            return x

        if self.device.type == "cuda":
            # Host buffers (snapshot, offloaded moments) may still be filling from
            # non-blocking copies: a checkpoint is a place where waiting is fine.
            torch.cuda.synchronize(self.device)
        # While Predict keeps the master in host memory, the saved master is the snapshot
        # (its host copy); "alpha_sum" holds the steps taken since, applied at Predict exit.
        with self.offloader.materialized(), self.master_offloader.materialized():
            opt_state = cpu(self.optimizer.state_dict())
        pending = []
        for rec in self._pending:
            values = rec.floats()  # first: it also resolves the step time into info
            info = {k: v for k, v in rec.info.items() if k != "predicted_index"}
            info["predicted_loss"] = rec.predicted_loss()
            pending.append(
                {
                    "step": rec.step,
                    "phase": rec.phase,
                    "episode": rec.episode,
                    "values": values,
                    "info": info,
                }
            )
        predict = None
        if self._direction is not None:
            predict = {
                "direction": [
                    {"data": q.data.cpu(), "scales": q.scales.cpu(), "shape": list(q.shape)}
                    for q in self._direction
                ],
                "alphas": self._alphas.cpu(),
                "alpha_sum": None if self._alpha_sum is None else self._alpha_sum.cpu(),
            }
        rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": TRAINER_FORMAT,
            "config": self.cfg.to_dict(),
            "model": cpu(self.model.state_dict()),
            "optimizer": opt_state,
            "accum_freed": self._accum_freed,
            "offloader": self.offloader.state_dict(),
            "master_offloaded": self.master_offloader.offloaded,
            "master_offload_stats": dict(self.master_offloader.stats.__dict__),
            "scaler": None if self.scaler is None else cpu(self.scaler.state_dict()),
            "controller": self.controller.state_dict(),
            "dynamics": cpu(self.dynamics.state_dict()),
            "residuals": self.residuals.state_dict(),
            "corrector": self.corrector.state_dict(),
            "divergence": self.divergence.state_dict(),
            "outliers": self.outliers.state_dict(),
            "metrics": self.metrics.state_dict(),
            "confidence": self.confidence,
            "episode": self.episode,
            "rolled_back_episode": self._rolled_back_episode,
            "episode_predict_steps": self._episode_predict_steps,
            "drop_reset": bool(getattr(self, "_drop_reset", False)),
            "snapshot": None if self._snapshot is None else self._snapshot.clone(),
            "prediction": None
            if self._prediction is None
            else {
                "raw": self._prediction.raw_values(),
                "bias": self._prediction.bias,
            },
            "predict": predict,
            "pending": pending,
            "rng": rng,
        }

    def save(self, path) -> str:
        """Write a checkpoint atomically; returns its sha256."""
        return save_checkpoint(path, self.state_dict())

    def load(self, path) -> None:
        """Load a checkpoint written by :meth:`save`. Every check runs before anything of this
        trainer changes; a bad file raises :class:`CheckpointError` (a ``ValueError``) and
        leaves it as it was. Should applying still fail (a device error, a full host memory),
        the trainer's own state taken just before is put back before the error propagates."""
        state = load_checkpoint(path)
        self._check_state(state, path)
        backup = self.state_dict()
        try:
            self._apply_state(state)
        except BaseException:
            self._apply_state(backup)
            raise

    def _check_state(self, state: dict[str, Any], path) -> None:
        if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
            raise CheckpointError(
                f"{path}: not a HybridTrainer checkpoint (format "
                f"{state.get('format') if isinstance(state, dict) else None!r}, expected "
                f"{TRAINER_FORMAT!r})"
            )
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise CheckpointError(
                f"{path}: the checkpoint lacks {missing}; a HybridTrainer checkpoint has "
                f"{list(_STATE_KEYS)}"
            )
        try:
            self._check_parts(state, path)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise CheckpointError(
                f"{path}: the checkpoint is malformed ({type(exc).__name__}: {exc})"
            ) from None

    def _check_parts(self, state: dict[str, Any], path) -> None:
        mine = self.model.state_dict()
        saved = state["model"]
        if set(mine) != set(saved):
            missing = sorted(set(mine) - set(saved))[:5]
            extra = sorted(set(saved) - set(mine))[:5]
            raise CheckpointError(
                f"{path}: the model does not match (missing {missing}, unexpected {extra})"
            )
        for k, v in mine.items():
            if tuple(saved[k].shape) != tuple(v.shape) or saved[k].dtype != v.dtype:
                raise CheckpointError(
                    f"{path}: model entry {k} is {tuple(saved[k].shape)} {saved[k].dtype}, this "
                    f"model has {tuple(v.shape)} {v.dtype}"
                )
        layout = state["optimizer"].get("layout", {})
        if layout != self.optimizer._layout() and {
            k: (list(map(list, v)) if k == "segments" else v) for k, v in layout.items()
        } != {
            k: (list(map(list, v)) if k == "segments" else v)
            for k, v in self.optimizer._layout().items()
        }:
            raise CheckpointError(
                f"{path}: the optimizer layout (state bits, segments) differs from this "
                "trainer's optimizer"
            )
        keys = ("offload", "micro_batches", "quant_block", "direction_format")
        if self._own_dynamics:
            keys += ("dynamics_model",)
        for key in keys:
            if state["config"].get(key) != getattr(self.cfg, key):
                raise CheckpointError(
                    f"{path}: config field {key} is {state['config'].get(key)!r} in the "
                    f"checkpoint and {getattr(self.cfg, key)!r} here; build the trainer with "
                    "the checkpoint's config (TrainerConfig.from_dict(state['config']))"
                )
        if (state["scaler"] is None) != (self.scaler is None):
            raise CheckpointError(f"{path}: loss scaler presence differs from this trainer's")
        if state["predict"] is not None and len(state["predict"]["direction"]) != self.num_groups:
            raise CheckpointError(f"{path}: segment groups differ from this trainer's")
        self._check_components(state, path)

    def _check_components(self, state: dict[str, Any], path) -> None:
        """Each component's saved state has this trainer's structure (same keys, tensors of
        the same shapes), so that none of their loads can fail halfway."""
        exact = {"dynamics": self.dynamics, "corrector": self.corrector}
        keyed = {"controller": self.controller, "divergence": self.divergence}
        keyed["metrics"] = self.metrics
        if self.scaler is not None:
            exact["scaler"] = self.scaler
        for name, part in {**exact, **keyed}.items():
            mine = part.state_dict()
            if name in keyed:  # their values are open-ended (counters, histories): keys only
                mine = dict.fromkeys(mine)
                saved = state[name]
                saved = dict.fromkeys(saved) if isinstance(saved, dict) else saved
            else:
                saved = state[name]
            problem = _structure_problem(saved, mine, shapes=True)
            if problem:
                raise CheckpointError(
                    f"{path}: the {name} state does not fit this trainer's ({problem}); build "
                    "the trainer with the checkpoint's config (TrainerConfig.from_dict("
                    "state['config']))"
                )
        try:
            self.offloader.check_state(state["offloader"], self.optimizer.state_tensors())
        except OffloadError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        snap = state["snapshot"]
        if snap is not None and (
            not isinstance(snap, torch.Tensor) or snap.shape != self.master.shape
        ):
            raise CheckpointError(f"{path}: the snapshot does not match the master weights")
        if "outliers" in state:
            OutlierFilter().load_state_dict(state["outliers"])
        for r in state["pending"]:
            r["step"], r["phase"], r["episode"], r["values"], r["info"]

    def _apply_state(self, state: dict[str, Any]) -> None:
        from hybrid_triton.kernels.quantize import QuantizedTensor

        # Bring anything offloaded back first, so every tensor has its storage while loading.
        if self.offloader.offloaded:
            self.offloader.restore()
        if self.master_offloader.offloaded:
            self.master_offloader.restore()  # storage back; the loaded state overwrites it
        if self._accum_freed:
            acc = self.accum.accumulator
            acc.untyped_storage().resize_(acc.numel() * acc.element_size())
            self._accum_freed = False
        with torch.no_grad():
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.controller.load_state_dict(state["controller"])
        self.dynamics.load_state_dict(state["dynamics"])
        self.residuals.load_state_dict(state["residuals"])
        self.corrector.load_state_dict(state["corrector"])
        self.divergence.load_state_dict(state["divergence"])
        if "outliers" in state:  # older checkpoints have no outlier filter
            self.outliers.load_state_dict(state["outliers"])
        self.metrics.load_state_dict(state["metrics"])
        self.confidence = float(state["confidence"])
        self.episode = int(state["episode"])
        self._rolled_back_episode = int(state["rolled_back_episode"])
        self._episode_predict_steps = int(state.get("episode_predict_steps", 0))
        self._drop_reset = bool(state["drop_reset"])
        self._snapshot = None if state["snapshot"] is None else state["snapshot"].clone()
        if self._snapshot is not None and self.device.type == "cuda":
            self._snapshot = self._snapshot.pin_memory()
        p = state["prediction"]
        self._prediction = None if p is None else EpisodePrediction(list(p["raw"]), p["bias"])
        if state["predict"] is not None:
            p = state["predict"]
            self._direction = [
                QuantizedTensor(
                    d["data"].to(self.device),
                    d["scales"].to(self.device),
                    self.cfg.direction_format,
                    self.cfg.quant_block,
                    tuple(d["shape"]),
                    torch.float32,
                )
                for d in p["direction"]
            ]
            self._alphas = p["alphas"].to(self.device)
            alpha_sum = p.get("alpha_sum")
            self._alpha_sum = None if alpha_sum is None else alpha_sum.to(self.device)
        else:
            self._direction = self._alphas = self._alpha_sum = None
        if state["accum_freed"]:
            for p in self.group.params:
                p.grad = None
            self.accum.accumulator.untyped_storage().resize_(0)
            self._accum_freed = True
        self.offloader.load_state_dict(state["offloader"], self.optimizer.state_tensors())
        from hybrid_triton.offload import OffloadStats

        self.master_offloader.stats = OffloadStats(**state.get("master_offload_stats", {}))
        if state.get("master_offloaded", False):
            # The loaded master is the snapshot: free it again, the snapshot is its copy.
            self.master_offloader.offload(
                {"master": self.master}, host_copies={"master": self._snapshot}
            )
        self._prepared = None
        self._bind_precision(self.controller.plan)
        self._pending = deque(
            _Pending(
                r["step"],
                r["phase"],
                r["episode"],
                torch.tensor(r["values"], dtype=torch.float64),
                None,
                dict(r["info"]),
            )
            for r in state["pending"]
        )
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((3, tuple(rng["python"]), None))
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
