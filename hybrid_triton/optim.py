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

Parameter groups (``[{"params": decay, "weight_decay": 0.1}, {"params": no_decay,
"weight_decay": 0.0}]``, as the Hugging Face ``Trainer`` and Lightning pass them) are packed one
after the other into the arena, each a contiguous range; their ``lr`` and ``weight_decay`` live
in tiny device tables the kernel looks up, so the step stays one launch with no extra bytes per
element. ``betas``, ``eps`` and ``max_grad_norm`` are shared: groups that differ there are
refused.

No step synchronizes with the host: the learning rates live in a device tensor refreshed from
each ``param_groups[i]["lr"]`` (so LR schedulers work per group), the clip coefficient is
computed on the device, and a non-finite gradient skips the step through a device flag.

Before anything changes, ``step`` checks on the host that every parameter is still the view
into the arena it was packed as (``model.to(...)``, ``.half()`` or ``p.data = ...`` after
packing would otherwise leave the optimizer updating a buffer the model no longer reads) and,
when the module is known, that the module still holds the packed parameters; and that the
hyper-parameters are valid (a scheduler or a user may write NaN or a negative lr).
"""

from __future__ import annotations

import math
import weakref
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


def _grad_norm_op():
    from hybrid_triton.kernels.grad_norm import grad_norm

    return grad_norm


_SHARED = ("betas", "eps", "max_grad_norm")


def _param_list(params: Iterable[Any], where: str) -> list[nn.Parameter]:
    if isinstance(params, torch.Tensor):
        params = [params]
    unique: dict[int, nn.Parameter] = {}
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"FusedAdamW: expected parameters in {where}, got {type(p).__name__}")
        if p.requires_grad:
            unique.setdefault(id(p), p)
    return list(unique.values())


def _collect_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Plain parameters or parameter-group dicts as a list of group dicts (trainable parameters
    only, each once), checked to be of one dtype and device. Nothing is packed yet."""
    items = list(params)
    if any(isinstance(p, dict) for p in items):
        if not all(isinstance(p, dict) for p in items):
            raise TypeError("FusedAdamW: pass either parameters or parameter-group dicts, not both")
        groups = []
        for i, d in enumerate(items):
            if "params" not in d:
                raise ValueError(f"FusedAdamW: parameter group {i} has no 'params' entry")
            groups.append({**d, "params": _param_list(d["params"], f"group {i}")})
    else:
        groups = [{"params": _param_list(items, "params")}]
    seen: set[int] = set()
    for g in groups:
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError("FusedAdamW: a parameter appears in more than one group")
            seen.add(id(p))
    plist = [p for g in groups for p in g["params"]]
    if not plist:
        raise ValueError("FusedAdamW: got no trainable parameters")
    kinds = {(p.dtype, p.device) for p in plist}
    if len(kinds) != 1:
        raise ValueError(
            f"FusedAdamW: parameters mix dtypes or devices ({sorted(map(str, kinds))}); "
            "build one optimizer per dtype and device"
        )
    return groups


def _check_hparams(where: str, hp: dict[str, Any]) -> None:
    """ValueError unless one group's hyper-parameters are usable (finite, in range)."""
    lr, eps, wd = hp.get("lr"), hp.get("eps"), hp.get("weight_decay")
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", wd)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: {name} must be a float, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where}: {name} must be finite, got {value}")
    if lr < 0.0 or eps <= 0.0 or wd < 0.0:
        raise ValueError(
            f"{where}: need lr >= 0, eps > 0, weight_decay >= 0 (got {lr}, {eps}, {wd})"
        )
    betas = hp.get("betas")
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"{where}: betas must be two floats in [0, 1), got {betas!r}")
    mgn = hp.get("max_grad_norm")
    if mgn is not None and not (isinstance(mgn, (int, float)) and 0.0 < mgn < math.inf):
        raise ValueError(f"{where}: max_grad_norm must be None or a finite float > 0, got {mgn!r}")


def check_param_groups(where: str, groups: list[dict[str, Any]]) -> None:
    """Validate every group, and that the shared hyper-parameters agree across groups."""
    for i, hp in enumerate(groups):
        _check_hparams(f"{where} (param group {i})", hp)
        for key in _SHARED:
            a, b = hp.get(key), groups[0].get(key)
            if (tuple(a) if key == "betas" else a) != (tuple(b) if key == "betas" else b):
                raise ValueError(
                    f"{where}: param group {i} has {key}={a!r} but group 0 has {b!r}; FusedAdamW "
                    f"takes per-group lr and weight_decay only ({', '.join(_SHARED)} are shared)"
                )


def _check_master_weights(dtype: torch.dtype, master_weights: bool | None) -> bool:
    if master_weights is None:
        return dtype in _LOW_PRECISION
    if master_weights and dtype not in _LOW_PRECISION:
        raise ValueError(
            f"FusedAdamW: master_weights=True needs bf16/fp16 parameters (the shadows), got {dtype}"
        )
    if not master_weights and dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(
            f"FusedAdamW: {dtype} parameters need master_weights=True (fp32 master weights kept "
            "by the optimizer); without a master copy only fp32 and bf16 (stochastic rounding) "
            "parameters are supported"
        )
    return bool(master_weights)


def _data_ptr(p: torch.Tensor) -> int:
    # A sharded (DTensor) parameter's storage is its local shard, which the arena holds.
    return p.to_local().data_ptr() if hasattr(p, "to_local") else p.data_ptr()


def _check_sr_seed(sr_seed: int | None, stochastic: bool) -> int | None:
    if not stochastic:
        if sr_seed is not None:
            raise ValueError(
                "FusedAdamW: sr_seed seeds the stochastic rounding of bf16 parameters without "
                "master weights (master_weights=False); these parameters are rounded otherwise"
            )
        return None
    sr_seed = 0 if sr_seed is None else sr_seed
    if isinstance(sr_seed, bool) or not isinstance(sr_seed, int) or not 0 <= sr_seed < 2**62:
        raise ValueError(f"FusedAdamW: sr_seed must be an int in [0, 2**62), got {sr_seed!r}")
    return sr_seed


class FusedAdamW(torch.optim.Optimizer):
    """AdamW over a flat arena with fp32 master weights and 32/16/8/4-bit moments.

    Args:
        params: a :class:`FlatArena` (built with ``FlatArena.from_module(model)``), one of its
            :class:`ArenaGroup` s, or an iterable of parameters or of parameter-group dicts (they
            are then packed, group after group, into a new flat buffer and become views into it).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay); a group
            dict may set its own ``lr`` and ``weight_decay``; ``betas``, ``eps`` and
            ``max_grad_norm`` must be the same in every group.
        state_bits: 32 (fp32 moments), 16 (bf16), 8 or 4 (blockwise quantized, see
            ``hybrid_triton.kernels.adamw``).
        master_weights: keep fp32 master weights and treat the parameters as bf16/fp16
            shadows. Default: True for bf16/fp16 parameters, False for fp32 ones. False with
            bf16 parameters: no fp32 copy at all; the kernel computes each update in fp32 and
            rounds it to bf16 stochastically (unbiased, so updates smaller than half a bf16 ulp
            still move the weights on average).
        sr_seed: seed of that stochastic rounding (the bits of step ``t`` come from
            ``(sr_seed, t)``: a run is reproducible given the seed; default 0). Refused for
            other parameters, which are not rounded stochastically.
        max_grad_norm: clip the global gradient norm to this value (computed on the device).
        check_finite: when ``step`` is given no ``found_inf``, compute the gradient norm and skip
            the step on the device if it is not finite (one extra read of the gradient).
        qblock: quantization block for 8/4 bits (default 256 / 128).
        block, num_warps: kernel tuning.
        module: the module the parameters belong to (known already for a :class:`FlatArena`):
            ``step`` then also refuses to run when the module's parameters were replaced by new
            ``nn.Parameter`` objects after packing.
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
        module: nn.Module | None = None,
        sr_seed: int | None = None,
    ) -> None:
        adamw = _kernels()
        if state_bits not in adamw.STATE_BITS:
            raise ValueError(f"FusedAdamW: state_bits must be one of {adamw.STATE_BITS}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm,
        }
        _check_hparams("FusedAdamW", defaults)
        self.module_ref = None
        group: ArenaGroup | None = None
        if isinstance(params, FlatArena):
            self.arena: FlatArena | None = params
            group, groups = params.group, [{"params": params.group.params}]
            self.module_ref = params.module_ref
        elif isinstance(params, ArenaGroup):
            self.arena, group, groups = None, params, [{"params": params.params}]
        else:
            self.arena, groups = None, _collect_groups(params)
        if module is not None:
            self.module_ref = weakref.ref(module)
        # Every check before the parameters are packed (packing makes them arena views).
        check_param_groups("FusedAdamW", [{**defaults, **g} for g in groups])
        first = next(p for g in groups for p in g["params"]) if group is None else None
        dtype = first.dtype if first is not None else group.dtype
        master_weights = _check_master_weights(dtype, master_weights)
        sr_seed = _check_sr_seed(sr_seed, stochastic=not master_weights and dtype == torch.bfloat16)
        if group is None:
            group = ArenaGroup.from_params([p for g in groups for p in g["params"]])
        self._packing = True  # torch's __init__ adds the groups through add_param_group
        super().__init__(groups, defaults)
        self._packing = False
        self.arena_group = group
        self.state_bits = state_bits
        self.master_weights = bool(master_weights)
        # bf16 weights without a master copy: the kernel rounds each update stochastically.
        self.stochastic_rounding = not self.master_weights and group.dtype == torch.bfloat16
        self.sr_seed = sr_seed
        self.check_finite = check_finite
        self.qblock = (qblock or adamw.DEFAULT_QBLOCK[state_bits]) if state_bits <= 8 else None
        self._tuning = {"block": block, "num_warps": num_warps}
        n, device = group.numel, group.device
        self.master = group.master_copy() if self.master_weights else group.flat
        self.flat_state: dict[str, torch.Tensor | None] = {
            "step": torch.zeros(1, dtype=torch.float32, device=device),
            **adamw.new_state(n, state_bits, device, self.qblock),
        }
        self._build_group_tables()
        self._flat_grad: torch.Tensor | None = None
        self.last_grad_norm: torch.Tensor | None = None
        # Where each parameter must live: checked at every step (see check_params).
        self._record_packing()

    def _build_group_tables(self) -> None:
        """Device tables of the groups' first elements, learning rates and weight decays."""
        g, device = self.arena_group, self.arena_group.device
        offset_of = {id(p): seg.offset for p, seg in zip(g.params, g.table)}
        # An empty group starts where the next one does, so it covers no element; group 0
        # starts at 0 (the first group is packed first).
        starts, nxt = [], g.numel
        for hp in reversed(self.param_groups):
            if hp["params"]:
                nxt = offset_of[id(hp["params"][0])]
            starts.append(nxt)
        starts.reverse()
        starts[0] = 0
        self._group_starts = (
            torch.tensor(starts, dtype=torch.int64, device=device)
            if len(self.param_groups) > 1
            else None
        )
        self._lr_values = [float(hp["lr"]) for hp in self.param_groups]
        self._wd_values = [float(hp["weight_decay"]) for hp in self.param_groups]
        self._lr = torch.tensor(self._lr_values, dtype=torch.float32, device=device)
        self._wd = torch.tensor(self._wd_values, dtype=torch.float32, device=device)

    @property
    def lr_tensor(self) -> torch.Tensor:
        """float32 ``[groups]`` device tensor of the learning rates: those of the last step,
        refreshed from ``param_groups`` at the start of each step (read it, do not write it)."""
        return self._lr

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction: the arena is packed once, so a later group would never
        be updated. Build a new FusedAdamW with every group instead."""
        if getattr(self, "_packing", False):
            super().add_param_group(param_group)
            return
        raise ValueError(
            "FusedAdamW.add_param_group: the parameters are packed into one flat arena when the "
            "optimizer is built, so groups cannot be added later; build a new FusedAdamW with "
            "every group (e.g. FusedAdamW([{'params': a}, {'params': b, 'lr': 1e-4}]))"
        )

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

    def master_views(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """Each parameter with its fp32 master weights (a view shaped like it), e.g. to start
        the masters from fp32 values the bf16 parameters only approximate."""
        g = self.arena_group
        return list(zip(g.params, g.views(self.master)))

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
            grad_sumsq: float32 or float64 [1] sum of squares of ``grad`` if already computed
                (float64 when gradients may pass ~1.8e19, whose fp32 squares overflow; e.g. by the
                accumulation pass); saves the norm pass used for clipping and the finite check.
            grad_scale: multiply the gradient by this (float or float32 [1] tensor), e.g. 1/N
                or an unscale factor; the clipping norm is of the scaled gradient.
        """
        check_param_groups("FusedAdamW.step", self.param_groups)
        self.check_params()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        adamw = _kernels()
        group = self.arena_group
        g = self._gather_grads() if grad is None else grad
        group.check_buffer(g, "grad")
        check_tensor("FusedAdamW.step", "grad", g, dtypes=FLOAT_DTYPES, device=group.device)
        self._refresh_group_tables()
        hp = self.param_groups[0]
        max_norm = hp.get("max_grad_norm")
        clip = None
        if max_norm is not None or (found_inf is None and self.check_finite):
            if grad_sumsq is not None:
                # The root in the sums' own dtype: a float64 sum of 1e20-sized squares is finite.
                norm = grad_sumsq.reshape(1).sqrt().to(torch.float32)
            else:
                # Overflow-safe: a plain fp32 sum of squares reads finite gradients above
                # ~1.8e19 as inf and would skip their step.
                norm = _grad_norm_op()(g)
            if grad_scale is not None:
                norm = norm * (grad_scale.abs() if torch.is_tensor(grad_scale) else abs(grad_scale))
            self.last_grad_norm = norm
            if max_norm is not None:
                clip = (float(max_norm) / (norm + 1e-6)).clamp_(max=1.0)
            if found_inf is None and self.check_finite:
                found_inf = (~torch.isfinite(norm)).to(torch.float32)
        st = self.flat_state
        beta1, beta2 = hp["betas"]
        grouped = self._group_starts is not None
        adamw.adamw_step(
            self.master,
            g,
            st["exp_avg"],
            st["exp_avg_sq"],
            lr=self._lr,
            beta1=beta1,
            beta2=beta2,
            eps=hp["eps"],
            weight_decay=self._wd if grouped else self._wd_values[0],
            step=st["step"],
            clip_coef=clip,
            grad_scale=grad_scale,
            found_inf=found_inf,
            shadow=group.flat if self.master_weights else None,
            state_bits=self.state_bits,
            exp_avg_scale=st["exp_avg_scale"],
            exp_avg_sq_scale=st["exp_avg_sq_scale"],
            qblock=self.qblock,
            group_starts=self._group_starts,
            sr_seed=self.sr_seed,
            **self._tuning,
        )
        return loss

    def _refresh_group_tables(self) -> None:
        # One tiny device fill per changed value (no sync); unchanged values cost nothing.
        for i, hp in enumerate(self.param_groups):
            lr, wd = float(hp["lr"]), float(hp["weight_decay"])
            if lr != self._lr_values[i]:
                self._lr[i : i + 1].fill_(lr)
                self._lr_values[i] = lr
            if wd != self._wd_values[i]:
                self._wd[i : i + 1].fill_(wd)
                self._wd_values[i] = wd

    def _record_packing(self) -> None:
        """What check_params compares against: each parameter's storage address, the packed
        parameter objects, and (module known) the (submodule, attribute) slot of each."""
        g = self.arena_group
        self._sharded = any(hasattr(p, "to_local") for p in g.params)
        self._expected_ptrs = [_data_ptr(p) for p in g.params]
        self._packed_ids = [id(p) for p in g.params]
        self._slots: list[tuple[str, nn.Module, str, nn.Parameter]] = []
        module = self.module_ref() if self.module_ref is not None else None
        if module is not None:
            packed = set(self._packed_ids)
            for name, p in module.named_parameters(remove_duplicate=False):
                if id(p) in packed:
                    owner, _, attr = name.rpartition(".")
                    self._slots.append((name, module.get_submodule(owner), attr, p))

    def check_params(self) -> None:
        """Raise :class:`ArenaError` when a parameter no longer is the arena view it was packed
        as (``model.to(...)``, ``.half()``, ``p.data = ...``: each gives the parameter new
        storage), when ``param_groups`` holds other tensors than those packed, or (module known)
        when a packed parameter's slot in the module holds another ``nn.Parameter``. Host-side
        only; ``step`` calls it before changing anything. Cost: see docs/optimizer.md."""
        g = self.arena_group
        ptr_of = _data_ptr if self._sharded else torch.Tensor.data_ptr
        if list(map(ptr_of, g.params)) != self._expected_ptrs:
            i = next(i for i, p in enumerate(g.params) if ptr_of(p) != self._expected_ptrs[i])
            seg, p = g.table[i], g.params[i]
            raise ArenaError(
                f"FusedAdamW: parameter {seg.name} {tuple(seg.shape)} is no longer the view into "
                f"the optimizer's flat arena (now {p.dtype} on {p.device}); it was moved, cast or "
                "reassigned after the optimizer was built (model.to(...), .half(), "
                "p.data = ...). Move or cast the model first, then build the optimizer"
            )
        if [id(p) for hp in self.param_groups for p in hp["params"]] != self._packed_ids:
            raise ArenaError(
                "FusedAdamW: param_groups no longer hold the parameters packed into the arena; "
                "build a new optimizer instead of editing param_groups[i]['params']"
            )
        for name, owner, attr, p in self._slots:
            if getattr(owner, attr) is not p:
                raise ArenaError(
                    f"FusedAdamW: the module's parameter {name} is not the one the optimizer "
                    "packed (a new nn.Parameter was assigned after the optimizer was built); "
                    "build the optimizer after changing the model"
                )

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

    def layout(self) -> dict[str, Any]:
        """What a saved state must match to be loaded: format, state bits, quantization block,
        arena size, master weights, segments ``(name, offset, numel)``, the parameters'
        shapes and (several groups) the number of parameters per group."""
        g = self.arena_group
        out = {
            "format": STATE_FORMAT,
            "state_bits": self.state_bits,
            "qblock": self.qblock,
            "numel": g.numel,
            "master_weights": self.master_weights,
            "segments": [(s.name, s.offset, s.numel) for s in g.table],
            "shapes": [list(s.shape) for s in g.table],
        }
        if len(self.param_groups) > 1:
            out["groups"] = [len(hp["params"]) for hp in self.param_groups]
        return out

    _layout = layout  # the name the trainer used before ``layout`` was public

    def state_dict(self) -> dict[str, Any]:
        """``{"state", "param_groups", "layout"}``; state holds the flat buffers (references,
        as torch's optimizers do: ``torch.save`` or deep-copy to snapshot)."""
        state = {k: v for k, v in self.flat_state.items() if v is not None}
        if self.master_weights:
            state["master"] = self.master
        groups = []
        start = 0
        for hp in self.param_groups:
            entry = {k: v for k, v in hp.items() if k != "params"}
            entry["params"] = list(range(start, start + len(hp["params"])))
            start += len(hp["params"])
            groups.append(entry)
        return {"state": state, "param_groups": groups, "layout": self.layout()}

    def _state_targets(self) -> dict[str, torch.Tensor]:
        targets = {k: v for k, v in self.flat_state.items() if v is not None}
        if self.master_weights:
            targets["master"] = self.master
        return targets

    def _check_layout(self, saved: Any) -> None:
        where = "FusedAdamW.load_state_dict"
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: 'layout' must be a dict, got {type(saved).__name__}")
        mine = self.layout()
        for key, want in mine.items():
            got = saved.get(key)
            if key == "segments" and isinstance(got, (list, tuple)):
                same = [tuple(s) if isinstance(s, (list, tuple)) else s for s in got] == want
            elif key == "shapes" and isinstance(got, (list, tuple)):
                same = [list(s) if isinstance(s, (list, tuple)) else s for s in got] == want
            else:
                same = got == want
            if not same:
                shown = "differ" if key in ("segments", "shapes") else f"{got!r} != {want!r}"
                raise ValueError(
                    f"{where}: {key} of the saved state ({shown}) does not match this optimizer; "
                    "build it with the same model and options"
                )

    def _check_state(self, state: Any) -> None:
        where = "FusedAdamW.load_state_dict"
        if not isinstance(state, dict):
            raise ValueError(f"{where}: 'state' must be a dict, got {type(state).__name__}")
        for name, dst in self._state_targets().items():
            src = state.get(name)
            if (
                not isinstance(src, torch.Tensor)
                or src.shape != dst.shape
                or src.dtype != dst.dtype
            ):
                got = f"{tuple(src.shape)} {src.dtype}" if isinstance(src, torch.Tensor) else src
                raise ValueError(
                    f"{where}: state {name!r} is {got}; expected {tuple(dst.shape)} {dst.dtype}"
                )
        step = state["step"].double()
        if not (torch.isfinite(step).all() and (step >= 0).all() and (step == step.round()).all()):
            raise ValueError(
                f"{where}: state 'step' must be a whole number >= 0, got {state['step'].tolist()}"
            )

    def _check_groups(self, groups: Any) -> list[dict[str, Any]]:
        where = "FusedAdamW.load_state_dict"
        if not isinstance(groups, (list, tuple)) or len(groups) != len(self.param_groups):
            got = len(groups) if isinstance(groups, (list, tuple)) else type(groups).__name__
            raise ValueError(f"{where}: expected {len(self.param_groups)} param groups, got {got}")
        merged = []
        for i, (hp, saved) in enumerate(zip(self.param_groups, groups)):
            if not isinstance(saved, dict):
                raise ValueError(f"{where}: param group {i} must be a dict")
            extra = {
                k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"
            }
            merged.append({**hp, **extra})
        check_param_groups(where, merged)
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by a FusedAdamW with the same layout and ``state_bits``.

        Restores moments, step count, hyper-parameters and (with ``master_weights``) the fp32
        master weights; the parameters themselves come from the module's state dict (see
        :meth:`sync_shadows`). Everything is checked first (layout and parameter shapes, every
        state tensor's shape and dtype, a whole ``step`` >= 0, each group's hyper-parameters);
        a state dict that fails raises ValueError and changes nothing."""
        where = "FusedAdamW.load_state_dict"
        if not isinstance(state_dict, dict) or "layout" not in state_dict:
            raise ValueError(
                f"{where}: not a FusedAdamW state dict (no 'layout' entry); states of other "
                "optimizers cannot be loaded"
            )
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"{where}: the state dict has no {key!r} entry")
        self._check_layout(state_dict["layout"])
        state = state_dict["state"]
        self._check_state(state)
        merged = self._check_groups(state_dict["param_groups"])
        # Everything checked: apply.
        for name, dst in self._state_targets().items():
            dst.copy_(state[name])
        for hp, new in zip(self.param_groups, merged):
            hp.update({k: v for k, v in new.items() if k != "params"})
        for i, hp in enumerate(self.param_groups):
            self._lr[i : i + 1].fill_(float(hp["lr"]))
            self._wd[i : i + 1].fill_(float(hp["weight_decay"]))
        self._lr_values = [float(hp["lr"]) for hp in self.param_groups]
        self._wd_values = [float(hp["weight_decay"]) for hp in self.param_groups]

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
