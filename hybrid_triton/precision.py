"""Dynamic loss scaling for fp16 training, with every piece of state on the device.

``DynamicLossScaler`` plays the part of ``torch.amp.GradScaler`` without ever waiting for the
GPU: the scale, its inverse, the growth tracker, the hysteresis tracker and the non-finite
flag ``found_inf`` are ``[1]`` tensors on the device. Kernels that meet a non-finite
gradient set ``found_inf``; the optimizer step reads it on the device and skips; ``update()``
then moves the scale (growth, backoff, hysteresis) and zeroes the flag in one launch.

Typical fp16 loop (see docs/kernels-mixed-precision.md)::

    scaler = DynamicLossScaler(device="cuda")
    loss = model(batch)
    scaler.scale_loss(loss).backward()
    scaler.unscale_(grads)                 # or GradAccumulator(..., scaler=scaler) in the hooks
    optimizer_step(..., found_inf=scaler.found_inf)   # skips on the device when set
    scaler.update()
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from hybrid_triton import kernels
from hybrid_triton.kernels._checks import KernelInputError


class DynamicLossScaler:
    """Device-resident dynamic loss scale with growth, backoff and hysteresis.

    Args:
        init_scale: the first scale (``torch.amp.GradScaler`` uses 2**16).
        growth_factor: multiplier after ``growth_interval`` finite steps in a row.
        backoff_factor: multiplier after ``hysteresis`` overflows in a row.
        growth_interval: finite steps between growths.
        hysteresis: consecutive overflows tolerated before backing off (1: back off at once,
            as torch does).
        device: where the state lives (the gradients' device).
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 1,
        device: torch.device | str = "cuda",
    ) -> None:
        if not init_scale > 0:
            raise ValueError(f"DynamicLossScaler: init_scale must be > 0, got {init_scale}")
        if not growth_factor > 1.0:
            raise ValueError(f"DynamicLossScaler: growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(
                f"DynamicLossScaler: backoff_factor must be in (0, 1), got {backoff_factor}"
            )
        if int(growth_interval) < 1 or int(hysteresis) < 1:
            raise ValueError(
                "DynamicLossScaler: growth_interval and hysteresis must be >= 1, got "
                f"{growth_interval} and {hysteresis}"
            )
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self.device = torch.device(device)
        f32, i32 = torch.float32, torch.int32
        self.scale = torch.full((1,), float(init_scale), dtype=f32, device=self.device)
        self.device = self.scale.device  # "cuda" -> "cuda:0", so device checks compare equal
        self.inv_scale = torch.reciprocal(self.scale)
        self.growth_tracker = torch.zeros(1, dtype=i32, device=self.device)
        self.hysteresis_tracker = torch.full((1,), self.hysteresis, dtype=i32, device=self.device)
        # The non-finite flag this scaler owns: kernels set it to 1.0, update() zeroes it.
        self.found_inf = torch.zeros(1, dtype=f32, device=self.device)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` (a device multiply; backward through it gives scaled gradients).

        The scale stays fp32 (a 0-dim operand), as in ``GradScaler.scale``."""
        return loss * self.scale.reshape(())

    def unscale_(self, grads: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Unscale fp32 gradients in place and set ``found_inf`` if any is non-finite.

        ``grads``: one fp32 tensor (for example a flat arena gradient buffer) or a list of them.
        Low-precision gradients cannot be unscaled in place: unscale them into fp32 with
        ``kernels.unscale(g, scaler.inv_scale, found_inf=scaler.found_inf)``, or fold them
        with ``GradAccumulator(..., scaler=scaler)``.
        """
        tensors = [grads] if isinstance(grads, torch.Tensor) else list(grads)
        # Check every tensor before touching any, so a bad list changes nothing.
        for i, g in enumerate(tensors):
            if not isinstance(g, torch.Tensor) or g.device != self.device or not g.is_contiguous():
                raise KernelInputError(
                    f"DynamicLossScaler.unscale_: grads[{i}] must be a contiguous tensor on "
                    f"{self.device} (the scaler's device)"
                )
            if g.dtype != torch.float32:
                raise KernelInputError(
                    f"DynamicLossScaler.unscale_: grads[{i}] is {g.dtype}; in-place unscaling "
                    "needs fp32 (use kernels.unscale(g, scaler.inv_scale, ...) into an fp32 buffer)"
                )
        for g in tensors:
            kernels.unscale(g, self.inv_scale, out=g, found_inf=self.found_inf)

    def update(self) -> None:
        """Move the scale from ``found_inf`` (one launch), refresh ``inv_scale``, zero the flag."""
        kernels.update_loss_scale(
            self.scale,
            self.growth_tracker,
            self.found_inf,
            hysteresis_tracker=self.hysteresis_tracker,
            inv_scale=self.inv_scale,
            growth_factor=self.growth_factor,
            backoff_factor=self.backoff_factor,
            growth_interval=self.growth_interval,
            hysteresis=self.hysteresis,
            zero_found_inf=True,
        )

    def metrics(self) -> dict[str, torch.Tensor]:
        """Device tensors for logging (read them when a sync is acceptable)."""
        return {
            "loss_scale": self.scale,
            "found_inf": self.found_inf,
            "growth_tracker": self.growth_tracker,
            "hysteresis_tracker": self.hysteresis_tracker,
        }

    def state_dict(self) -> dict:
        """The state as device tensors (clones) and hyper-parameters; no sync.

        ``torch.save`` of it moves the tensors to the host when the checkpoint is written.
        """
        return {
            "scale": self.scale.clone(),
            "growth_tracker": self.growth_tracker.clone(),
            "hysteresis_tracker": self.hysteresis_tracker.clone(),
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "hysteresis": self.hysteresis,
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a state from :meth:`state_dict`, or from ``torch.amp.GradScaler.state_dict()``
        (keys ``scale``, ``_growth_tracker``, ``growth_factor``, ...)."""
        if "scale" not in state:
            raise ValueError(
                "DynamicLossScaler.load_state_dict: the state has no 'scale' entry; expected a "
                "dict from DynamicLossScaler.state_dict() or GradScaler.state_dict()"
            )
        self.growth_factor = float(state.get("growth_factor", self.growth_factor))
        self.backoff_factor = float(state.get("backoff_factor", self.backoff_factor))
        self.growth_interval = int(state.get("growth_interval", self.growth_interval))
        self.hysteresis = int(state.get("hysteresis", self.hysteresis))
        growth = state.get("growth_tracker", state.get("_growth_tracker", 0))
        hyst = state.get("hysteresis_tracker", self.hysteresis)
        with torch.no_grad():
            self.scale.copy_(torch.as_tensor(state["scale"], dtype=torch.float32).reshape(1))
            self.growth_tracker.copy_(torch.as_tensor(growth, dtype=torch.int32).reshape(1))
            self.hysteresis_tracker.copy_(torch.as_tensor(hyst, dtype=torch.int32).reshape(1))
            torch.reciprocal(self.scale, out=self.inv_scale)
            self.found_inf.zero_()
