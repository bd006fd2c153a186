"""Dynamic loss-scale update for fp16 training, on the device, with hysteresis.

State (all ``[1]`` tensors on one device): ``scale`` float32, ``growth_tracker`` int32 (finite
steps since the last change), ``hysteresis_tracker`` int32 (overflows still tolerated before
backing off), ``found_inf`` float32 (nonzero: this step overflowed).

Rule (``torch._amp_update_scale_`` plus hysteresis, as in Megatron-LM / DeepSpeed)::

    if found_inf:                          # an overflow
        growth_tracker = 0
        hysteresis_tracker -= 1
        if hysteresis_tracker <= 0:        # N consecutive overflows: back off
            scale *= backoff_factor
            hysteresis_tracker = 0         # stays exhausted: each further overflow backs off
    else:                                  # a finite step
        hysteresis_tracker = hysteresis    # the overflows must be consecutive
        growth_tracker += 1
        if growth_tracker == growth_interval:
            if isfinite(scale * growth_factor): scale *= growth_factor
            growth_tracker = 0

With ``hysteresis = 1`` (the default) this is exactly ``torch._amp_update_scale_``. Factors are
applied as fp32 multiplies (bit-exact to torch for the usual powers of two). Optionally the
kernel also writes ``inv_scale = 1 / scale`` (correctly rounded) and zeroes ``found_inf``, so a
whole update is one launch of one program and never waits for the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hybrid_triton.kernels._checks import KernelInputError, check_flag, check_tensor
from hybrid_triton.kernels._dispatch import use_triton


@triton.jit
def _update_loss_scale_kernel(
    scale_ptr,
    growth_ptr,
    hyst_ptr,
    flag_ptr,
    inv_ptr,
    growth_factor,
    backoff_factor,
    growth_interval,
    hysteresis,
    HAS_HYST: tl.constexpr,
    WRITE_INV: tl.constexpr,
    ZERO_FLAG: tl.constexpr,
):
    scale = tl.load(scale_ptr)
    growth = tl.load(growth_ptr)
    overflow = tl.load(flag_ptr) != 0.0  # NaN counts as an overflow, as in torch
    if HAS_HYST:
        hyst = tl.load(hyst_ptr)
    else:
        hyst = growth * 0 + 1
    # Overflow branch.
    hyst_left = hyst - 1
    back_off = hyst_left <= 0
    scale_o = tl.where(back_off, scale * backoff_factor, scale)
    hyst_o = tl.maximum(hyst_left, 0)
    # Finite branch.
    successful = growth + 1
    grow = successful >= growth_interval
    grown = scale * growth_factor
    scale_f = tl.where(grow & (tl.abs(grown) <= 3.4028234663852886e38), grown, scale)
    growth_f = tl.where(grow, 0, successful)
    new_scale = tl.where(overflow, scale_o, scale_f)
    tl.store(scale_ptr, new_scale)
    tl.store(growth_ptr, tl.where(overflow, 0, growth_f))
    if HAS_HYST:
        tl.store(hyst_ptr, tl.where(overflow, hyst_o, hysteresis))
    if WRITE_INV:
        tl.store(inv_ptr, tl.math.div_rn(1.0, new_scale))
    if ZERO_FLAG:
        tl.store(flag_ptr, 0.0)


def _check(
    scale,
    growth_tracker,
    found_inf,
    hysteresis_tracker,
    inv_scale,
    growth_interval,
    hysteresis,
    growth_factor,
    backoff_factor,
) -> None:
    op = "update_loss_scale"
    check_tensor(op, "scale", scale, dtypes=(torch.float32,), numel=1)
    dev = scale.device
    check_tensor(op, "growth_tracker", growth_tracker, dtypes=(torch.int32,), device=dev, numel=1)
    check_flag(op, "found_inf", found_inf, dev)
    if hysteresis_tracker is not None:
        check_tensor(
            op, "hysteresis_tracker", hysteresis_tracker, dtypes=(torch.int32,), device=dev, numel=1
        )
    if inv_scale is not None:
        check_tensor(op, "inv_scale", inv_scale, dtypes=(torch.float32,), device=dev, numel=1)
    if int(growth_interval) < 1:
        raise KernelInputError(f"{op}: growth_interval must be >= 1, got {growth_interval}")
    if int(hysteresis) < 1:
        raise KernelInputError(f"{op}: hysteresis must be >= 1, got {hysteresis}")
    if not float(growth_factor) > 1.0:
        raise KernelInputError(f"{op}: growth_factor must be > 1, got {growth_factor}")
    if not 0.0 < float(backoff_factor) < 1.0:
        raise KernelInputError(f"{op}: backoff_factor must be in (0, 1), got {backoff_factor}")


def update_loss_scale(
    scale: torch.Tensor,
    growth_tracker: torch.Tensor,
    found_inf: torch.Tensor,
    *,
    hysteresis_tracker: torch.Tensor | None = None,
    inv_scale: torch.Tensor | None = None,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    hysteresis: int = 1,
    zero_found_inf: bool = False,
) -> torch.Tensor:
    """Update the loss scale in place from ``found_inf``, on the device (one program).

    Args:
        scale: float32 ``[1]``, updated in place.
        growth_tracker: int32 ``[1]``, updated in place.
        found_inf: float32 ``[1]``; nonzero means this step overflowed.
        hysteresis_tracker: int32 ``[1]`` (overflows still tolerated); None means hysteresis 1.
        inv_scale: optional float32 ``[1]`` that receives ``1 / new scale``.
        growth_factor, backoff_factor, growth_interval: as in ``torch.amp.GradScaler``.
        hysteresis: consecutive overflows needed before backing off (needs a hysteresis tracker
            when > 1).
        zero_found_inf: also reset ``found_inf`` to 0 (the flag's owner does this once a step).

    Returns:
        ``scale``.
    """
    _check(
        scale,
        growth_tracker,
        found_inf,
        hysteresis_tracker,
        inv_scale,
        growth_interval,
        hysteresis,
        growth_factor,
        backoff_factor,
    )
    if hysteresis > 1 and hysteresis_tracker is None:
        raise KernelInputError(
            "update_loss_scale: hysteresis > 1 needs a hysteresis_tracker (int32 [1]) to count "
            "consecutive overflows"
        )
    if not use_triton(scale):
        return update_loss_scale_ref(
            scale, growth_tracker, found_inf, hysteresis_tracker=hysteresis_tracker,
            inv_scale=inv_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
            growth_interval=growth_interval, hysteresis=hysteresis, zero_found_inf=zero_found_inf,
        )  # fmt: skip
    _update_loss_scale_kernel[(1,)](
        scale,
        growth_tracker,
        hysteresis_tracker if hysteresis_tracker is not None else growth_tracker,
        found_inf,
        inv_scale if inv_scale is not None else scale,
        float(growth_factor),
        float(backoff_factor),
        int(growth_interval),
        int(hysteresis),
        HAS_HYST=hysteresis_tracker is not None,
        WRITE_INV=inv_scale is not None,
        ZERO_FLAG=bool(zero_found_inf),
        num_warps=1,
    )
    return scale


def update_loss_scale_ref(
    scale: torch.Tensor,
    growth_tracker: torch.Tensor,
    found_inf: torch.Tensor,
    *,
    hysteresis_tracker: torch.Tensor | None = None,
    inv_scale: torch.Tensor | None = None,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    hysteresis: int = 1,
    zero_found_inf: bool = False,
) -> torch.Tensor:
    """Plain-torch reference: the same rule with ``torch.where`` (no host sync)."""
    f32 = torch.float32
    overflow = found_inf != 0
    hyst = hysteresis_tracker if hysteresis_tracker is not None else torch.ones_like(growth_tracker)
    hyst_left = hyst - 1
    scale_o = torch.where(hyst_left <= 0, scale * torch.tensor(backoff_factor, dtype=f32), scale)
    successful = growth_tracker + 1
    grow = successful >= growth_interval
    grown = scale * torch.tensor(growth_factor, dtype=f32)
    scale_f = torch.where(grow & torch.isfinite(grown), grown, scale)
    new_scale = torch.where(overflow, scale_o, scale_f)
    new_growth = torch.where(
        overflow, torch.zeros_like(successful), torch.where(grow, 0, successful)
    )
    if hysteresis_tracker is not None:
        hysteresis_tracker.copy_(
            torch.where(overflow, hyst_left.clamp_min(0), torch.full_like(hyst, hysteresis))
        )
    scale.copy_(new_scale)
    growth_tracker.copy_(new_growth)
    if inv_scale is not None:
        inv_scale.copy_(torch.reciprocal(scale))
    if zero_found_inf:
        found_inf.zero_()
    return scale
