"""Residuals of the predicted update, a bounded store for them, and the corrector.

In a Correct step the optimizer computes a real update ``actual = master_after -
master_before``. The Predict phase before it applied ``predicted_g = alpha_g * dir_g`` per
segment group ``g`` (``alpha_g = -lr * scale_g * correction_g``, ``dir`` the frozen Adam
direction dequantized). The residual is ``actual - predicted`` (weight space, per element).

- :class:`ResidualStore` keeps the last ``capacity`` residuals blockwise-quantized
  (``quantize_blockwise``, int8 by default) with error feedback: the quantization error of one
  residual is added to the next before it is quantized, so over a run the stored residuals sum
  to the true ones up to the last error buffer. Codes and the error buffer live on ``device``
  (host memory by default: the store must not grow the device footprint), but the
  quantization runs where the residual is: for a CUDA residual and a host store, the error
  buffer (pinned) is copied in, the residual is quantized on the GPU, and codes, scales, norms
  and the new error go back with ``non_blocking`` copies into pinned memory; an event per entry
  says when they have landed (:meth:`ResidualStore.get` and :meth:`state_dict` wait on it).
  Why: quantizing a GPT-2 small residual (124M fp32) on the host after a blocking copy cost
  about 2.2 s per Correct step on an H100 machine (the torch reference on 124M elements on the
  CPU); on the GPU it is one memory-bound pass, and the step never waits for the host.
- :class:`Corrector` turns each residual into a per-group correction of the predicted step
  size: the least-squares multiplier ``k_g = <actual_g, predicted_g> / <predicted_g,
  predicted_g>`` (the best scale of the frozen direction for the real update), folded into
  ``correction_g`` as an exponential moving average in log space, clamped to ``1 +-
  max_adjust``. It also tracks the relative bias of the dynamics model's loss predictions on
  Predict steps, which the trainer applies to the next Predict phase's predicted losses.

Everything stays on the device except the loss bias (host floats the trainer has already read).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class StoredResidual:
    step: int
    q: Any  # QuantizedTensor
    group_norms: torch.Tensor  # float32 [G]: ||residual_g||
    ready: Any = None  # CUDA event: the non_blocking copies into host memory have landed

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None


def _to_host_async(t: torch.Tensor, home: torch.device) -> torch.Tensor:
    """``t`` copied to ``home``: into pinned memory without blocking when ``t`` is on CUDA and
    ``home`` is the host (the caller records an event), otherwise an ordinary copy."""
    if t.device.type == "cuda" and home.type == "cpu":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host
    return t.to(home)


class ResidualStore:
    def __init__(
        self,
        capacity: int = 8,
        fmt: str = "int8",
        block: int = 256,
        error_feedback: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        if capacity < 0:
            raise ValueError(f"ResidualStore: capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.fmt = fmt
        self.block = int(block)
        self.error_feedback = bool(error_feedback)
        self.device = torch.device(device)
        self.items: deque[StoredResidual] = deque(maxlen=max(self.capacity, 1))
        self._error: torch.Tensor | None = None
        self._error_ready: Any = None  # CUDA event of the last copy into the host error buffer
        self.added = 0

    def __len__(self) -> int:
        return len(self.items) if self.capacity else 0

    @property
    def error(self) -> torch.Tensor | None:
        """The error-feedback buffer (float32, on ``device``), once its last update landed."""
        if self._error_ready is not None:
            self._error_ready.synchronize()
            self._error_ready = None
        return self._error

    @error.setter
    def error(self, value: torch.Tensor | None) -> None:
        self._error, self._error_ready = value, None

    @property
    def nbytes(self) -> int:
        """Bytes held: codes and scales of every stored residual, plus the error buffer."""
        total = sum(r.q.nbytes for r in self.items) if self.capacity else 0
        if self._error is not None:
            total += self._error.numel() * self._error.element_size()
        return total

    def add(self, step: int, residual: torch.Tensor, group_norms: torch.Tensor) -> None:
        """Quantize ``residual`` (flat float32) with error feedback where it lives and store
        it, evicting the oldest entry past ``capacity``. Never waits for the device."""
        if self.capacity == 0:
            return
        from hybrid_triton.kernels import quantize_blockwise
        from hybrid_triton.kernels.quantize import QuantizedTensor

        x = residual.detach().reshape(-1)
        if x.dtype != torch.float32:
            x = x.float()
        home = self.device
        to_host = x.device.type == "cuda" and home.type == "cpu"
        if not to_host and x.device != home:
            x = x.to(home)  # a store on another device computes there (no async path)
        error = None
        if self.error_feedback:
            if self._error is None or self._error.numel() != x.numel():
                self._error = torch.zeros(x.numel(), dtype=torch.float32, device=home,
                                          pin_memory=to_host)  # fmt: skip
                self._error_ready = None
                # A fresh buffer is zeros: no copy in for the first residual.
                error = torch.zeros_like(x) if to_host else self._error
            elif to_host:
                if not self._error.is_pinned():  # loaded from a checkpoint: pin it once
                    self._error = self._error.pin_memory()
                error = self._error.to(x.device, non_blocking=True)
            else:
                error = self._error
        q = quantize_blockwise(x, self.fmt, self.block, error=error)
        ready = None
        if to_host:
            q = QuantizedTensor(
                _to_host_async(q.data, home),
                _to_host_async(q.scales, home),
                q.fmt,
                q.block,
                q.shape,
                q.dtype,
            )
            norms = _to_host_async(group_norms.detach(), home)
            if error is not None:
                self._error.copy_(error, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            self._error_ready = ready if error is not None else None
        else:
            norms = group_norms.detach().to(home)
        self.items.append(StoredResidual(int(step), q, norms, ready))
        self.added += 1

    def get(self, i: int = -1) -> torch.Tensor:
        """The ``i``-th stored residual (default the newest), dequantized to float32."""
        from hybrid_triton.kernels import dequantize_blockwise

        item = self.items[i]
        item.wait()
        return dequantize_blockwise(item.q, dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        for r in self.items:
            r.wait()
        return {
            "added": self.added,
            "error": None if self.error is None else self.error.cpu().clone(),
            "items": [
                {
                    "step": r.step,
                    "data": r.q.data.cpu().clone(),
                    "scales": r.q.scales.cpu().clone(),
                    "shape": list(r.q.shape),
                    "group_norms": r.group_norms.cpu().clone(),
                }
                for r in self.items
            ]
            if self.capacity
            else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from hybrid_triton.kernels.quantize import QuantizedTensor

        self.added = int(state["added"])
        err = state["error"]
        self.error = None if err is None else err.to(self.device).clone()
        self.items.clear()
        for r in state["items"]:
            q = QuantizedTensor(
                r["data"].to(self.device),
                r["scales"].to(self.device),
                self.fmt,
                self.block,
                tuple(r["shape"]),
                torch.float32,
            )
            self.items.append(StoredResidual(int(r["step"]), q, r["group_norms"].to(self.device)))


class Corrector:
    """Per-group step-size corrections and the loss-prediction bias, learned from residuals."""

    def __init__(
        self,
        num_groups: int,
        device: torch.device | str,
        decay: float = 0.7,
        max_adjust: float = 0.5,
    ) -> None:
        if num_groups < 1:
            raise ValueError(f"Corrector: num_groups must be >= 1, got {num_groups}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"Corrector: decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.max_adjust = float(max_adjust)
        self.log_correction = torch.zeros(num_groups, dtype=torch.float32, device=device)
        self.last_fit = torch.ones(num_groups, dtype=torch.float32, device=device)
        self.updates = 0
        self.loss_bias = 0.0  # mean of (real - predicted) / predicted on Predict steps
        self.loss_bias_count = 0

    @property
    def correction(self) -> torch.Tensor:
        """float32 [G]: multipliers of the predicted per-group step sizes."""
        return self.log_correction.exp()

    def update(
        self, dots: torch.Tensor, pred_sq: torch.Tensor, skip: torch.Tensor | None = None
    ) -> None:
        """Fold one residual in: ``dots[g] = <actual_g, predicted_g>``, ``pred_sq[g] =
        <predicted_g, predicted_g>`` (float32 [G] device tensors; no host sync). ``skip``: a
        float32 [1] device flag; nonzero leaves the corrections unchanged."""
        lo, hi = math.log(max(1.0 - self.max_adjust, 1e-3)), math.log(1.0 + self.max_adjust)
        valid = (pred_sq > 0) & torch.isfinite(dots) & torch.isfinite(pred_sq)
        if skip is not None:
            valid = valid & (skip.reshape(()) == 0)
        fit = torch.where(valid, dots / pred_sq.clamp_min(1e-30), torch.ones_like(dots))
        # A negative fit (the real update points away from the frozen direction) asks for the
        # smallest allowed step, not a reversed one.
        log_fit = fit.clamp(min=math.exp(lo), max=math.exp(hi)).log()
        target = (self.log_correction + log_fit).clamp(lo, hi)
        target = torch.where(valid, target, self.log_correction)
        self.log_correction.mul_(self.decay).add_((1.0 - self.decay) * target)
        self.last_fit.copy_(fit)
        self.updates += 1

    def observe_loss(self, real: float, predicted: float) -> None:
        if math.isfinite(real) and math.isfinite(predicted) and abs(predicted) > 0:
            rel = (real - predicted) / abs(predicted)
            self.loss_bias_count += 1
            self.loss_bias += (rel - self.loss_bias) / min(self.loss_bias_count, 20)

    def adjust_loss(self, predicted: float) -> float:
        return predicted * (1.0 + self.loss_bias)

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_correction": self.log_correction.cpu().clone(),
            "last_fit": self.last_fit.cpu().clone(),
            "updates": self.updates,
            "loss_bias": self.loss_bias,
            "loss_bias_count": self.loss_bias_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Everything is checked before anything changes (a bad state raises ValueError)."""
        try:
            tensors = [state[k] for k in ("log_correction", "last_fit")]
            updates, count = state["updates"], state["loss_bias_count"]
            bias = float(state["loss_bias"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                "Corrector state: expected log_correction, last_fit (tensors), updates, "
                f"loss_bias and loss_bias_count ({type(exc).__name__}: {exc})"
            ) from None
        for name, t, mine in zip(("log_correction", "last_fit"), tensors, (
            self.log_correction, self.last_fit
        )):  # fmt: skip
            if not isinstance(t, torch.Tensor) or t.numel() != mine.numel():
                got = t.numel() if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"Corrector: checkpoint {name} has {got} groups, this corrector {mine.numel()}"
                )
            if not torch.isfinite(t).all():
                raise ValueError(f"Corrector: checkpoint {name} holds non-finite values")
        for name, v in (("updates", updates), ("loss_bias_count", count)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Corrector: {name} must be an int >= 0, got {v!r}")
        if not math.isfinite(bias):
            raise ValueError(f"Corrector: loss_bias must be finite, got {bias!r}")
        self.log_correction.copy_(tensors[0].reshape(self.log_correction.shape))
        self.last_fit.copy_(tensors[1].reshape(self.last_fit.shape))
        self.updates, self.loss_bias, self.loss_bias_count = updates, bias, count
