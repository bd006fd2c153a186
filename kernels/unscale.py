"""Unscale: low-precision (or fp32) gradients times the inverse loss scale, into fp32.

Math (elementwise, ``grad`` fp16/bf16/fp32 of any shape, contiguous)::

    out = float32(grad) * inv_scale                  # one fp32 multiply: exact to torch
    found_inf = 1.0   if any grad is non-finite

As in ``torch._amp_foreach_non_finite_check_and_unscale_``, the check is on the incoming
gradient (before the multiply). ``out`` may be ``grad`` itself when ``grad`` is fp32 (in
place). ``inv_scale`` is a Python float or a float32 ``[1]`` device tensor (for example
``DynamicLossScaler.inv_scale``), read inside the kernel. ``found_inf`` (float32 ``[1]``) is
only ever set to 1.0 by a masked store from programs that met a non-finite value; its owner
zeroes it. Nothing here waits for the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hybrid_triton.kernels._alloc import empty_like
from hybrid_triton.kernels._checks import (
    FLOAT_DTYPES,
    KernelInputError,
    check_flag,
    check_scalar_tensor,
    check_tensor,
    scalar_operand,
)
from hybrid_triton.kernels._dispatch import use_triton
from hybrid_triton.kernels._launch import split_launch

BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _unscale_kernel(
    g_ptr,
    out_ptr,
    inv_ptr,
    inv_value,
    flag_ptr,
    n_elements,
    BLOCK: tl.constexpr,
    INV_IS_PTR: tl.constexpr,
    CHECK_FINITE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if INV_IS_PTR:
        inv = tl.load(inv_ptr)
    else:
        inv = inv_value
    tl.store(out_ptr + offs, g * inv, mask=mask)
    if CHECK_FINITE:
        bad = tl.max((~(tl.abs(g) <= 3.4028234663852886e38)).to(tl.int32), axis=0) > 0
        tl.store(flag_ptr, 1.0, mask=bad)


def _check(grad, inv_scale, out, found_inf) -> None:
    op = "unscale"
    check_tensor(op, "grad", grad, dtypes=FLOAT_DTYPES)
    check_scalar_tensor(op, "inv_scale", inv_scale, grad.device)
    if out is not None:
        check_tensor(
            op, "out", out, dtypes=(torch.float32,), device=grad.device, numel=grad.numel()
        )
        if out.shape != grad.shape:
            raise KernelInputError(
                f"{op}: out has shape {tuple(out.shape)}; expected {tuple(grad.shape)}"
            )
    if found_inf is not None:
        check_flag(op, "found_inf", found_inf, grad.device)


def unscale(
    grad: torch.Tensor,
    inv_scale: float | torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> torch.Tensor:
    """``float32(grad) * inv_scale`` in one pass, flagging non-finite gradients.

    Args:
        grad: fp16, bf16 or fp32 tensor ``[*]``, contiguous (one gradient or a flat arena buffer).
        inv_scale: Python float or float32 ``[1]`` tensor on ``grad.device``.
        out: optional fp32 destination ``[*]``; may be ``grad`` itself when ``grad`` is fp32.
        found_inf: optional float32 ``[1]`` flag; set to 1.0 when any ``grad`` is inf or NaN.

    Returns:
        ``out`` (or a new fp32 tensor shaped like ``grad``).
    """
    _check(grad, inv_scale, out, found_inf)
    if out is None:
        out = empty_like(grad, dtype=torch.float32)
    if not use_triton(grad):
        return unscale_ref(grad, inv_scale, out=out, found_inf=found_inf)
    n = grad.numel()
    if n == 0:
        return out
    inv_ptr, inv_value = scalar_operand(inv_scale)
    g_flat, out_flat = grad.view(-1), out.view(-1)

    def launch(start: int, count: int, programs: int) -> None:
        _unscale_kernel[(programs,)](
            g_flat[start:],
            out_flat[start:],
            inv_ptr if inv_ptr is not None else out,
            inv_value,
            found_inf if found_inf is not None else out,
            count,
            BLOCK=BLOCK,
            INV_IS_PTR=inv_ptr is not None,
            CHECK_FINITE=found_inf is not None,
            num_warps=NUM_WARPS,
        )

    split_launch(n, BLOCK, launch)
    return out


def unscale_ref(
    grad: torch.Tensor,
    inv_scale: float | torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch reference: upcast, one fp32 multiply, the flag from the incoming values."""
    inv_t = torch.as_tensor(inv_scale, dtype=torch.float32, device=grad.device).reshape(())
    if found_inf is not None:
        found_inf.masked_fill_((~torch.isfinite(grad)).any().reshape(1), 1.0)
    y = grad.to(torch.float32) * inv_t
    if out is None:
        return y
    out.copy_(y)
    return out
