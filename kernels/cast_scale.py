"""Cast-and-scale: fp32 master weights -> low-precision shadow weights, in one pass.

Math (elementwise, ``x`` fp32 of any shape, contiguous)::

    y = round_to_nearest_even(float32(x * scale)).to(out_dtype)      # out_dtype: bf16, fp16, fp32
    found_inf = 1.0   if any y is non-finite (a non-finite x, or x * scale overflowing out_dtype)

``scale`` is a Python float or a float32 ``[1]`` tensor on the data's device (read inside the
kernel, so a device-resident scale costs no host sync). The product is formed in fp32 and
rounded once to ``out_dtype``, exactly as ``(x * scale).to(out_dtype)`` does in torch, so the
result is bit-exact on the GPU (the Triton interpreter rounds bf16 differently: within one
bf16 ulp on CPU, triton-lang/triton#4972).

``found_inf`` (float32 ``[1]``) is only ever set to 1.0 by programs that met a non-finite
value, with a masked plain store (no atomics); its owner zeroes it.

References: torch.amp (GradScaler's found_inf convention), Apex ``amp_C.multi_tensor_scale``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hybrid_triton.kernels._alloc import empty_like
from hybrid_triton.kernels._checks import (
    KernelInputError,
    check_flag,
    check_scalar_tensor,
    check_tensor,
    scalar_operand,
)
from hybrid_triton.kernels._dispatch import use_triton
from hybrid_triton.kernels._launch import split_launch

# Elements per program and warps per program for the elementwise kernels of this family
# (a large block keeps enough bytes in flight per SM to reach the copy rate on an H100).
BLOCK = 4096
NUM_WARPS = 8


OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _cast_scale_kernel(
    x_ptr,
    y_ptr,
    scale_ptr,
    scale_value,
    flag_ptr,
    n_elements,
    BLOCK: tl.constexpr,
    SCALE_IS_PTR: tl.constexpr,
    CHECK_FINITE: tl.constexpr,
):
    # int64 offsets: tensors past 2^31 elements must not wrap.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if SCALE_IS_PTR:
        scale = tl.load(scale_ptr)
    else:
        scale = scale_value
    y = (x * scale).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, y, mask=mask)
    if CHECK_FINITE:
        y32 = y.to(tl.float32)
        bad = tl.max((~(tl.abs(y32) <= 3.4028234663852886e38)).to(tl.int32), axis=0) > 0
        tl.store(flag_ptr, 1.0, mask=bad)


def _check(x, scale, out_dtype, out, found_inf) -> None:
    op = "cast_scale"
    check_tensor(op, "x", x, dtypes=(torch.float32,))
    if out_dtype not in OUT_DTYPES:
        raise KernelInputError(
            f"{op}: out_dtype must be one of bfloat16, float16, float32, got {out_dtype}"
        )
    check_scalar_tensor(op, "scale", scale, x.device)
    if out is not None:
        check_tensor(op, "out", out, dtypes=OUT_DTYPES, device=x.device, numel=x.numel())
        if out.shape != x.shape:
            raise KernelInputError(
                f"{op}: out has shape {tuple(out.shape)}; expected {tuple(x.shape)}"
            )
    if found_inf is not None:
        check_flag(op, "found_inf", found_inf, x.device)


def cast_scale(
    x: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x * scale).to(out_dtype)`` in one pass, flagging non-finite results in ``found_inf``.

    Args:
        x: fp32 tensor ``[*]``, contiguous (e.g. an arena's fp32 master weights).
        scale: Python float or float32 ``[1]`` tensor on ``x.device``.
        out_dtype: bf16, fp16 or fp32; when ``out`` is given, its dtype is used.
        out: optional destination ``[*]`` of ``out_dtype`` (e.g. the model's bf16 arena buffer).
        found_inf: optional float32 ``[1]`` flag; set to 1.0 when any output is non-finite.

    Returns:
        ``out`` (or a new tensor shaped like ``x``).
    """
    if isinstance(out, torch.Tensor):
        out_dtype = out.dtype
    _check(x, scale, out_dtype, out, found_inf)
    if out is None:
        out = empty_like(x, dtype=out_dtype)
    if not use_triton(x):
        return cast_scale_ref(x, scale, out_dtype=out_dtype, out=out, found_inf=found_inf)
    n = x.numel()
    if n == 0:
        return out
    scale_ptr, scale_value = scalar_operand(scale)
    x_flat, out_flat = x.view(-1), out.view(-1)

    def launch(start: int, count: int, programs: int) -> None:
        _cast_scale_kernel[(programs,)](
            x_flat[start:],
            out_flat[start:],
            scale_ptr if scale_ptr is not None else x,
            scale_value,
            found_inf if found_inf is not None else x,
            count,
            BLOCK=BLOCK,
            SCALE_IS_PTR=scale_ptr is not None,
            CHECK_FINITE=found_inf is not None,
            num_warps=NUM_WARPS,
        )

    split_launch(n, BLOCK, launch)
    return out


def cast_scale_ref(
    x: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch reference: the product in fp32, one rounding cast, the flag on device."""
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(())
    y = (x.to(torch.float32) * scale_t).to(out.dtype if out is not None else out_dtype)
    if out is None:
        out = y
    else:
        out.copy_(y)
    if found_inf is not None:
        # Set-only and sync-free: the mask stays on the device.
        found_inf.masked_fill_((~torch.isfinite(y)).any().reshape(1), 1.0)
    return out
