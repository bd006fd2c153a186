"""Global L2 norm of a flat gradient that does not overflow for large finite values.

A plain fp32 sum of squares overflows once ``|g|`` passes about 1.8e19 (``g * g`` > 3.4e38), so
a finite gradient of 1e20 would read as non-finite and its step be skipped. Each program instead
takes its block's absmax ``a`` and the sum of ``(g / a)^2`` (each term <= 1), the LAPACK
``nrm2`` scaling::

    partial[b] = (a_b, s_b),  a_b = max |g| over block b,  s_b = sum (g / a_b)^2
    norm       = A * sqrt(sum_b s_b * (a_b / A)^2),  A = max_b a_b

so the result overflows only when the norm itself exceeds fp32's range. An inf or NaN in ``g``
still gives a non-finite norm (``a_b`` is inf or NaN), so the device-side skip of non-finite
steps keeps working. Shapes: ``g`` ``[n]`` fp32/bf16/fp16, result float32 ``[1]``; one launch
plus a few tiny torch ops on the ``[blocks]`` partials, no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_tensor
from ._dispatch import use_triton

OP = "grad_norm"
BLOCK = 4096


@triton.jit
def _grad_norm_kernel(g_ptr, amax_ptr, ssq_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    a = tl.max(tl.abs(g), axis=0)
    # NaN never wins tl.max: carry it explicitly so the norm of a NaN gradient is NaN.
    has_nan = tl.max((g != g).to(tl.int32), axis=0) > 0
    # inf blocks divide by 1 (no inf/inf): the combine returns inf from the absmax anyway.
    safe = tl.where((a > 0) & (a < float("inf")), a, 1.0)
    y = g / safe
    tl.store(amax_ptr + pid, tl.where(has_nan, float("nan"), a))
    tl.store(ssq_ptr + pid, tl.sum(y * y, axis=0))


def _combine(amax: torch.Tensor, ssq: torch.Tensor) -> torch.Tensor:
    big = amax.max().reshape(1) if amax.numel() else torch.zeros(1, device=amax.device)
    # A == 0 (all-zero gradient) or inf: divide by 1 instead; the product below restores it.
    unit = torch.where((big > 0) & torch.isfinite(big), big, torch.ones_like(big))
    total = (ssq * (amax / unit) ** 2).sum().reshape(1)
    norm = unit * total.sqrt()
    return torch.where(torch.isfinite(big), norm, big).to(torch.float32)


def grad_norm(g: torch.Tensor) -> torch.Tensor:
    """float32 ``[1]`` L2 norm of the flat gradient ``g`` (fp32/bf16/fp16 ``[n]``), overflow-
    safe (see the module docstring). Never synchronizes with the host."""
    check_tensor(OP, "g", g, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    if not use_triton(g):
        return grad_norm_ref(g)
    flat = g.reshape(-1)
    blocks = triton.cdiv(flat.numel(), BLOCK)
    amax = torch.empty(blocks, dtype=torch.float32, device=g.device)
    ssq = torch.empty(blocks, dtype=torch.float32, device=g.device)
    if blocks:
        _grad_norm_kernel[(blocks,)](flat, amax, ssq, flat.numel(), BLOCK=BLOCK, num_warps=8)
    return _combine(amax, ssq)


def grad_norm_ref(g: torch.Tensor) -> torch.Tensor:
    """Plain-torch :func:`grad_norm`: the same scaling over the whole tensor (one temporary
    the size of ``g``)."""
    check_tensor(OP, "g", g, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    x = g.reshape(-1).to(torch.float32)
    big = torch.linalg.vector_norm(x, float("inf")).reshape(1) if x.numel() else x.new_zeros(1)
    big = torch.where(torch.isnan(x).any(), torch.full_like(big, float("nan")), big)
    return _combine(big, torch.linalg.vector_norm(x / torch.where(big > 0, big, 1.0)) ** 2)
