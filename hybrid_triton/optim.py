"""``FusedAdamW``: a ``torch.optim.Optimizer`` whose whole step is one fused, sync-free launch.

The optimizer keeps every parameter in one flat arena buffer (``hybrid_triton.arena``) and its
state as flat buffers with the same layout, so the step over hundreds of tensors is the single
1-D launch of :func:`hybrid_triton.kernels.adamw.adamw_step`. Moments may be stored in 32, 16,
8 or 4 bits (``state_bits``).

- ``master_weights=True`` (the default when the parameters are bf16/fp16): the module's
  parameters are low-precision shadows and the optimizer keeps fp32 master weights; the kernel
  writes the shadows in the same pass.
- ``master_weights=False`` (the default for fp32 parameters): the parameters themselves are the
  fp32 master weights, updated in place.

Gradients come from the parameters' ``.grad`` (call :meth:`FusedAdamW.attach_flat_grads` once so
autograd accumulates straight into one flat buffer; otherwise they are gathered each step) or
from any flat buffer with the arena layout, e.g. a gradient accumulator:
``opt.step(grad=acc, found_inf=flag)``.

No step synchronizes with the host: the learning rate lives in a device tensor refreshed from
``param_groups[0]["lr"]`` (so LR schedulers work), the clip coefficient is computed on the
device, and a non-finite gradient skips the step through a device flag.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from hybrid_triton.arena import ArenaError, ArenaGroup, FlatArena
from hybrid_triton.kernels._checks import FLOAT_DTYPES, check_tensor

STATE_FORMAT = "hybrid_triton.FusedAdamW/1"
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _kernels():
    # Imported on first use: importing hybrid_triton.optim must not import Triton (STYLE.md, 7).
    from hybrid_triton.kernels import adamw

    return adamw


def _group_from_params(params: Iterable[Any]) -> ArenaGroup:
    unique: dict[int, nn.Parameter] = {}
    for p in params:
        if isinstance(p, dict):
            raise ValueError(
                "FusedAdamW takes one parameter group (the whole arena); per-group options "
                "are not supported"
            )
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"FusedAdamW: expected parameters, got {type(p).__name__}")
        if p.requires_grad:
            unique.setdefault(id(p), p)
    plist = list(unique.values())
    if not plist:
        raise ValueError("FusedAdamW: got no trainable parameters")
    kinds = {(p.dtype, p.device) for p in plist}
    if len(kinds) != 1:
        raise ValueError(
            f"FusedAdamW: parameters mix dtypes or devices ({sorted(map(str, kinds))}); "
            "build one optimizer per dtype and device"
        )
    return ArenaGroup.from_params(plist)


class FusedAdamW(torch.optim.Optimizer):
    """AdamW over a flat arena with fp32 master weights and 32/16/8/4-bit moments.

    Args:
        params: a :class:`FlatArena` (built with ``FlatArena.from_module(model)``), one of its
            :class:`ArenaGroup` s, or an iterable of parameters (they are then packed into a new
            flat buffer and become views into it).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        state_bits: 32 (fp32 moments), 16 (bf16), 8 or 4 (blockwise quantized, see
            ``hybrid_triton.kernels.adamw``).
        master_weights: keep fp32 master weights and treat the parameters as bf16/fp16
            shadows. Default: True for bf16/fp16 parameters, False for fp32 ones.
        max_grad_norm: clip the global gradient norm to this value (computed on the device).
        check_finite: when ``step`` is given no ``found_inf``, compute the gradient norm and skip
            the step on the device if it is not finite (one extra read of the gradient).
        qblock: quantization block for 8/4 bits (default 256 / 128).
        block, num_warps: kernel tuning.
    """

    def __init__(
        self,
        params: FlatArena | ArenaGroup | Iterable[nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_bits: int = 32,
        master_weights: bool | None = None,
        max_grad_norm: float | None = None,
        check_finite: bool = True,
        qblock: int | None = None,
        block: int | None = None,
        num_warps: int | None = None,
    ) -> None:
        adamw = _kernels()
        if state_bits not in adamw.STATE_BITS:
            raise ValueError(f"FusedAdamW: state_bits must be one of {adamw.STATE_BITS}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"FusedAdamW: betas must be in [0, 1), got {betas}")
        if not lr >= 0.0 or not eps > 0.0 or not weight_decay >= 0.0:
            raise ValueError(
                f"FusedAdamW: need lr >= 0, eps > 0, weight_decay >= 0 (got {lr}, {eps}, "
                f"{weight_decay})"
            )
        if max_grad_norm is not None and not max_grad_norm > 0.0:
            raise ValueError(f"FusedAdamW: max_grad_norm must be > 0, got {max_grad_norm}")
        if isinstance(params, FlatArena):
            self.arena: FlatArena | None = params
            group = params.group
        elif isinstance(params, ArenaGroup):
            self.arena, group = None, params
        else:
            self.arena, group = None, _group_from_params(params)
        if master_weights is None:
            master_weights = group.dtype in _LOW_PRECISION
        if master_weights and group.dtype not in _LOW_PRECISION:
            raise ValueError(
                f"FusedAdamW: master_weights=True needs bf16/fp16 parameters (the shadows), "
                f"got {group.dtype}"
            )
        if not master_weights and group.dtype != torch.float32:
            raise ValueError(
                f"FusedAdamW: {group.dtype} parameters need master_weights=True (fp32 master "
                "weights kept by the optimizer)"
            )
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm,
        }
        super().__init__(group.params, defaults)
        self.arena_group = group
        self.state_bits = state_bits
        self.master_weights = bool(master_weights)
        self.check_finite = check_finite
        self.qblock = (qblock or adamw.DEFAULT_QBLOCK[state_bits]) if state_bits <= 8 else None
        self._tuning = {"block": block, "num_warps": num_warps}
        n, device = group.numel, group.device
        self.master = group.master_copy() if self.master_weights else group.flat
        self.flat_state: dict[str, torch.Tensor | None] = {
            "step": torch.zeros(1, dtype=torch.float32, device=device),
            **adamw.new_state(n, state_bits, device, self.qblock),
        }
        self._lr = torch.full((1,), float(lr), dtype=torch.float32, device=device)
        self._lr_value = float(lr)
        self._flat_grad: torch.Tensor | None = None
        self.last_grad_norm: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------
    # gradients
    # ------------------------------------------------------------------------------------------

    def attach_flat_grads(self) -> torch.Tensor:
        """Make every ``p.grad`` a view into one zeroed flat buffer (the arena layout, the
        parameters' dtype), so autograd accumulates there. Returns the buffer."""
        g = self.arena_group
        if self._flat_grad is None:
            self._flat_grad = g.new_state(g.dtype, fill=0.0)
        for p, view in zip(g.params, g.views(self._flat_grad)):
            p.grad = view
        return self._flat_grad

    def detach_flat_grads(self) -> None:
        """Undo :meth:`attach_flat_grads`: the parameters' ``.grad`` views are dropped and the
        flat buffer is released (the next backward writes ordinary gradients)."""
        if self._flat_grad is None:
            return
        base, size = self._flat_grad.data_ptr(), self._flat_grad.element_size()
        g = self.arena_group
        for p, seg in zip(g.params, g.table):
            if p.grad is not None and p.grad.data_ptr() == base + seg.offset * size:
                p.grad = None
        self._flat_grad = None

    @property
    def flat_grad(self) -> torch.Tensor | None:
        return self._flat_grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        """With attached flat grads, zero the buffer in place (the views stay attached)."""
        if self._flat_grad is not None:
            self._flat_grad.zero_()
            for p, view in zip(self.arena_group.params, self.arena_group.views(self._flat_grad)):
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    p.grad = view
            return
        super().zero_grad(set_to_none=set_to_none)

    def _gather_grads(self) -> torch.Tensor:
        g = self.arena_group
        if self._flat_grad is not None:
            # Frameworks that call ``model.zero_grad()`` (set_to_none) detach the views: the
            # next backward then writes fresh tensors and the flat buffer is stale. Detect it
            # by storage pointer (host-side, no sync) and fall back to gathering.
            base, size = self._flat_grad.data_ptr(), self._flat_grad.element_size()
            if all(
                p.grad is not None and p.grad.data_ptr() == base + seg.offset * size
                for p, seg in zip(g.params, g.table)
            ):
                return self._flat_grad
        flat = torch.zeros(g.numel, dtype=g.dtype, device=g.device)
        # Slow path (one copy per tensor): call attach_flat_grads() to avoid it. A parameter
        # without a gradient counts as a zero gradient (weight decay and momentum still apply).
        for p, seg in zip(g.params, g.table):
            if p.grad is not None:
                flat[seg.offset : seg.end].copy_(p.grad.reshape(-1))
        return flat

    # ------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(
        self,
        closure=None,
        *,
        grad: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
        grad_sumsq: torch.Tensor | None = None,
        grad_scale: float | torch.Tensor | None = None,
    ):
        """One AdamW step, queued without a host sync.

        Args:
            grad: a flat gradient with the arena layout (fp32/bf16/fp16), e.g. a gradient
                accumulator; default: the parameters' ``.grad``.
            found_inf: float32 [1] device flag (nonzero skips the step). Default: computed from
                the gradient norm when ``check_finite`` is on.
            grad_sumsq: float32 [1] sum of squares of ``grad`` if already computed (e.g. by the
                accumulation pass); saves the norm pass used for clipping and the finite check.
            grad_scale: multiply the gradient by this (float or float32 [1] tensor), e.g. 1/N
                or an unscale factor; the clipping norm is of the scaled gradient.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        adamw = _kernels()
        group = self.arena_group
        g = self._gather_grads() if grad is None else grad
        group.check_buffer(g, "grad")
        check_tensor("FusedAdamW.step", "grad", g, dtypes=FLOAT_DTYPES, device=group.device)
        hp = self.param_groups[0]
        lr_value = float(hp["lr"])
        if lr_value != self._lr_value:
            self._lr.fill_(lr_value)  # a device fill: no sync
            self._lr_value = lr_value
        max_norm = hp.get("max_grad_norm")
        clip = None
        if max_norm is not None or (found_inf is None and self.check_finite):
            if grad_sumsq is not None:
                norm = grad_sumsq.to(torch.float32).reshape(1).sqrt()
            else:
                norm = torch.linalg.vector_norm(g, 2, dtype=torch.float32).reshape(1)
            if grad_scale is not None:
                norm = norm * (grad_scale.abs() if torch.is_tensor(grad_scale) else abs(grad_scale))
            self.last_grad_norm = norm
            if max_norm is not None:
                clip = (float(max_norm) / (norm + 1e-6)).clamp_(max=1.0)
            if found_inf is None and self.check_finite:
                found_inf = (~torch.isfinite(norm)).to(torch.float32)
        st = self.flat_state
        beta1, beta2 = hp["betas"]
        adamw.adamw_step(
            self.master,
            g,
            st["exp_avg"],
            st["exp_avg_sq"],
            lr=self._lr,
            beta1=beta1,
            beta2=beta2,
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
            step=st["step"],
            clip_coef=clip,
            grad_scale=grad_scale,
            found_inf=found_inf,
            shadow=group.flat if self.master_weights else None,
            state_bits=self.state_bits,
            exp_avg_scale=st["exp_avg_scale"],
            exp_avg_sq_scale=st["exp_avg_sq_scale"],
            qblock=self.qblock,
            **self._tuning,
        )
        return loss

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The moment and scale buffers (what offload or compression would move)."""
        return {
            k: v for k, v in self.flat_state.items() if v is not None and k.startswith("exp_avg")
        }

    def state_bytes(self, include_master: bool = False) -> int:
        """Bytes of optimizer state on the device: moments and scales (and the fp32 master
        weights when ``include_master`` and the optimizer owns them)."""
        total = sum(t.numel() * t.element_size() for t in self.state_tensors().values())
        if include_master and self.master_weights:
            total += self.master.numel() * self.master.element_size()
        return total

    def _layout(self) -> dict[str, Any]:
        g = self.arena_group
        return {
            "format": STATE_FORMAT,
            "state_bits": self.state_bits,
            "qblock": self.qblock,
            "numel": g.numel,
            "master_weights": self.master_weights,
            "segments": [(s.name, s.offset, s.numel) for s in g.table],
        }

    def state_dict(self) -> dict[str, Any]:
        """``{"state", "param_groups", "layout"}``; state holds the flat buffers (references,
        as torch's optimizers do: ``torch.save`` or deep-copy to snapshot)."""
        state = {k: v for k, v in self.flat_state.items() if v is not None}
        if self.master_weights:
            state["master"] = self.master
        groups = []
        for hp in self.param_groups:
            entry = {k: v for k, v in hp.items() if k != "params"}
            entry["params"] = list(range(len(hp["params"])))
            groups.append(entry)
        return {"state": state, "param_groups": groups, "layout": self._layout()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by a FusedAdamW with the same layout and ``state_bits``.

        Restores moments, step count, hyper-parameters and (with ``master_weights``) the fp32
        master weights; the parameters themselves come from the module's state dict (see
        :meth:`sync_shadows`). Raises ValueError, before changing anything, when the state dict
        does not match."""
        if not isinstance(state_dict, dict) or "layout" not in state_dict:
            raise ValueError(
                "FusedAdamW.load_state_dict: not a FusedAdamW state dict (no 'layout' entry); "
                "states of other optimizers cannot be loaded"
            )
        saved, mine = state_dict["layout"], self._layout()
        for key in ("format", "state_bits", "qblock", "numel", "master_weights", "segments"):
            if key == "segments":
                same = [tuple(s) for s in saved.get(key, [])] == [tuple(s) for s in mine[key]]
            else:
                same = saved.get(key) == mine[key]
            if not same:
                shown = "differ" if key == "segments" else f"{saved.get(key)!r} != {mine[key]!r}"
                raise ValueError(
                    f"FusedAdamW.load_state_dict: {key} of the saved state ({shown}) does not "
                    "match this optimizer; build it with the same model and options"
                )
        state = state_dict["state"]
        targets = dict(self.flat_state)
        if self.master_weights:
            targets["master"] = self.master
        for name, dst in targets.items():
            if dst is None:
                continue
            src = state.get(name)
            if (
                not isinstance(src, torch.Tensor)
                or src.shape != dst.shape
                or src.dtype != dst.dtype
            ):
                got = f"{tuple(src.shape)} {src.dtype}" if isinstance(src, torch.Tensor) else src
                raise ValueError(
                    f"FusedAdamW.load_state_dict: state {name!r} is {got}; expected "
                    f"{tuple(dst.shape)} {dst.dtype}"
                )
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError("FusedAdamW.load_state_dict: number of param groups differs")
        for name, dst in targets.items():
            if dst is not None:
                dst.copy_(state[name])
        for hp, saved_hp in zip(self.param_groups, groups):
            for k, v in saved_hp.items():
                if k != "params":
                    hp[k] = tuple(v) if k == "betas" else v
        self._lr.fill_(float(self.param_groups[0]["lr"]))
        self._lr_value = float(self.param_groups[0]["lr"])

    @torch.no_grad()
    def sync_shadows(self) -> None:
        """Write the fp32 master weights, rounded, into the bf16/fp16 parameters.

        ``load_state_dict`` restores the master weights but leaves the parameters to the
        module's own ``load_state_dict`` (the shadows it saved are the step's rounded master
        weights); call this after loading an optimizer state without the matching model state.
        """
        if self.master_weights:
            self.arena_group.flat.copy_(self.master)


__all__ = ["ArenaError", "FusedAdamW"]
