"""Dequantize fused into an update: ``target <- target + alpha * dequant(q)``.

Applies a stored residual or a compact update direction (a :class:`QuantizedTensor` from
``quantize_blockwise``) to a flat buffer in one pass, with no full-size temporary: each
program unpacks the codes of its blocks, scales them, and adds them into ``target``.

Shapes: ``target`` is any contiguous fp32/bf16/fp16 tensor with ``q.numel`` elements (read
flat, e.g. a flat arena); ``alpha`` is a Python float or a float32 [1] device tensor (read on
the device, so a step scale computed on the GPU costs no host sync). The sum is computed in
fp32 (``t + alpha * v``, no fma contraction) and rounded once to ``target.dtype``. A block whose
scale is NaN (it held inf/NaN when quantized) adds NaN, so a skipped step stays visible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, KernelInputError, check_scalar_tensor, check_tensor
from ._dispatch import use_triton
from .quantize import (
    DEFAULT_WARPS,
    FORMATS,
    QuantizedTensor,
    _dequant_ref,
    _dequantize_values,
    _launch_shape,
    _unpack_codes,
    _unpack_ref,
)


@triton.jit
def _dequantize_add_kernel(
    target_ptr,
    data_ptr,
    scale_ptr,
    alpha_ptr,
    alpha_value,
    numel,
    FMT: tl.constexpr,
    BLOCK: tl.constexpr,
    GROUPS: tl.constexpr,
    PER_BYTE: tl.constexpr,
    BITS: tl.constexpr,
    LEVELS: tl.constexpr,
    ALPHA_IS_TENSOR: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    codes = _unpack_codes(data_ptr, blk, numel, BLOCK, GROUPS, PER_BYTE, BITS)
    scale = tl.load(scale_ptr + blk, mask=blk * BLOCK < numel, other=0.0)
    val = _dequantize_values(codes, scale, FMT, LEVELS)
    if ALPHA_IS_TENSOR:
        alpha = tl.load(alpha_ptr)
    else:
        alpha = alpha_value
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < numel
    t = tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(target_ptr + offs, (t + alpha * val).to(target_ptr.dtype.element_ty), mask=mask)


def dequantize_add(
    target: torch.Tensor,
    q: QuantizedTensor,
    alpha: float | torch.Tensor = 1.0,
    *,
    tile: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """``target += alpha * dequantize_blockwise(q)`` in place, in one pass; returns ``target``."""
    op = "dequantize_add"
    if not isinstance(q, QuantizedTensor):
        raise KernelInputError(f"{op}: q must be a QuantizedTensor, got {type(q).__name__}")
    f = q.validate(op)
    check_tensor(op, "target", target, dtypes=FLOAT_DTYPES, device=q.device, numel=q.numel)
    check_scalar_tensor(op, "alpha", alpha, q.device)
    if not use_triton(target):
        return dequantize_add_ref(target, q, alpha)
    n = q.numel
    if n == 0:
        return target
    alpha_is_tensor = isinstance(alpha, torch.Tensor)
    groups, per_program = _launch_shape(q.block, tile)
    _dequantize_add_kernel[(triton.cdiv(n, per_program),)](
        target,
        q.data,
        q.scales,
        alpha if alpha_is_tensor else q.scales,
        0.0 if alpha_is_tensor else float(alpha),
        n,
        FMT=f.kernel_id,
        BLOCK=q.block,
        GROUPS=groups,
        PER_BYTE=f.per_byte,
        BITS=f.bits,
        LEVELS=f.levels,
        ALPHA_IS_TENSOR=alpha_is_tensor,
        num_warps=num_warps or DEFAULT_WARPS,
        enable_fp_fusion=False,  # t + alpha * v rounded twice, as the reference does
    )
    return target


def dequantize_add_ref(
    target: torch.Tensor, q: QuantizedTensor, alpha: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Plain-torch reference of :func:`dequantize_add` (in place; returns ``target``)."""
    codes = _unpack_ref(q).view(-1, q.block)
    values = _dequant_ref(codes, q.scales, FORMATS[q.fmt]).reshape(-1)[: q.numel]
    flat = target.view(-1)
    flat.copy_(flat.float() + alpha * values)
    return target
