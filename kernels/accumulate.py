"""Accumulate: fold a gradient into an fp32 accumulator, with unscale, non-finite flag and
gradient norms in the same pass.

Math (elementwise over the covered elements, ``grad`` fp32/bf16/fp16, ``acc`` fp32)::

    v   = float32(grad) * inv_scale          # only when inv_scale is given (one fp32 rounding)
    v   = v * alpha                          # one fp32 rounding (alpha = 1/N for N micro-batches)
    acc = v            if first              # first micro-batch: overwrite (acc is not read)
    acc = acc + v      otherwise             # one fp32 rounding; no fma contraction, so the result
                                             # is bit-exact to the torch reference on the GPU
    found_inf = 1.0    if any grad is inf or NaN
    sumsq[s] = sum of acc**2 over segment s, after the update (block-wise partial sums, in the
               sums' dtype: fp32, or fp64 so that gradients past ~1.8e19 do not overflow)

The sums of squares are of the accumulator **after** the update, not of the value added: after
the last micro-batch they are the squared norms of the accumulated gradient, which is what
clipping and logging need (for the first micro-batch the two coincide).

Modes (one function, chosen by the arguments):

- **flat** (``segments`` given): ``acc`` and ``grad`` are flat arena buffers ``[total]`` with the
  layout ``segments``; one launch over ``segments.block_table`` (no block straddles two
  segments, so each program adds its partial sum of squares to one segment's slot with one
  ``tl.atomic_add``). ``seg_sumsq`` ``[len(segments)]`` and ``total_sumsq`` ``[1]`` are
  **overwritten** (zeroed on the device, then reduced into). Elements outside every segment
  (alignment gaps) are left unchanged.
- **per-tensor** (``segment_index`` given): ``acc`` is one parameter's slice of the arena
  accumulator and ``grad`` that parameter's gradient (same numel, any shapes). The tensor's
  sum of squares is **added** to ``seg_sumsq[segment_index]`` and to ``total_sumsq``: the
  caller zeroes them once per micro-batch (``GradAccumulator`` does). This is the mode a
  post-accumulate-grad hook uses, so no full-size low-precision gradient buffer exists.
- **plain** (neither): elementwise over ``acc``/``grad``; ``total_sumsq`` is added to.

Scalars ``alpha`` and ``inv_scale`` are Python floats or float32 ``[1]`` device tensors, read
inside the kernel. Nothing here waits for the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hybrid_triton.kernels._checks import (
    FLOAT_DTYPES,
    KernelInputError,
    check_flag,
    check_scalar_tensor,
    check_tensor,
    scalar_operand,
)
from hybrid_triton.kernels._dispatch import use_triton
from hybrid_triton.kernels._segments import Segments

BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _fold_block(
    acc_ptr,
    grad_ptr,
    offs,
    end,
    inv,
    alpha,
    FIRST: tl.constexpr,
    HAS_INV: tl.constexpr,
    MASKED: tl.constexpr,
    SUMSQ_FP64: tl.constexpr = False,
):
    if MASKED:
        mask = offs < end
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(grad_ptr + offs).to(tl.float32)
    v = g
    if HAS_INV:
        v = v * inv
    v = v * alpha
    if FIRST:
        new = v
    else:
        if MASKED:
            new = tl.load(acc_ptr + offs, mask=mask, other=0.0) + v
        else:
            new = tl.load(acc_ptr + offs) + v
    if MASKED:
        tl.store(acc_ptr + offs, new, mask=mask)
    else:
        tl.store(acc_ptr + offs, new)
    if SUMSQ_FP64:
        # fp32 squares overflow past |acc| ~ 1.8e19 and would read a finite gradient as inf.
        new64 = new.to(tl.float64)
        sumsq = tl.sum(new64 * new64, axis=0)
    else:
        sumsq = tl.sum(new * new, axis=0)
    bad = tl.max((~(tl.abs(g) <= 3.4028234663852886e38)).to(tl.int32), axis=0) > 0
    return sumsq, bad


@triton.jit
def _accumulate_kernel(
    acc_ptr,
    grad_ptr,
    table_ptr,
    n_elements,
    inv_ptr,
    inv_value,
    alpha_ptr,
    alpha_value,
    flag_ptr,
    seg_sumsq_ptr,
    total_sumsq_ptr,
    BLOCK: tl.constexpr,
    USE_TABLE: tl.constexpr,
    ALIGNED: tl.constexpr,
    FIRST: tl.constexpr,
    HAS_INV: tl.constexpr,
    INV_IS_PTR: tl.constexpr,
    ALPHA_IS_PTR: tl.constexpr,
    CHECK_FINITE: tl.constexpr,
    SEG_SUMSQ: tl.constexpr,
    TOTAL_SUMSQ: tl.constexpr,
    SUMSQ_FP64: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if USE_TABLE:
        # One row per program: (segment id, start, end); no block straddles two segments.
        seg = tl.load(table_ptr + pid * 3)
        start = tl.load(table_ptr + pid * 3 + 1)
        end = tl.load(table_ptr + pid * 3 + 2)
    else:
        seg = 0
        start = pid * BLOCK
        end = n_elements
    if ALIGNED:
        # Arena segments start at multiples of 64 elements: lets full blocks use 16-byte loads.
        start = tl.multiple_of(start, 16)
    offs = start + tl.arange(0, BLOCK)
    if HAS_INV:
        if INV_IS_PTR:
            inv = tl.load(inv_ptr)
        else:
            inv = inv_value
    else:
        inv = 1.0
    if ALPHA_IS_PTR:
        alpha = tl.load(alpha_ptr)
    else:
        alpha = alpha_value
    # Full blocks take the unmasked (vectorized) path; only a segment's tail is masked.
    if end - start >= BLOCK:
        sumsq, bad = _fold_block(
            acc_ptr, grad_ptr, offs, end, inv, alpha, FIRST, HAS_INV, False, SUMSQ_FP64
        )
    else:
        sumsq, bad = _fold_block(
            acc_ptr, grad_ptr, offs, end, inv, alpha, FIRST, HAS_INV, True, SUMSQ_FP64
        )
    if CHECK_FINITE:
        tl.store(flag_ptr, 1.0, mask=bad)
    if SEG_SUMSQ:
        tl.atomic_add(seg_sumsq_ptr + seg, sumsq)
    if TOTAL_SUMSQ:
        tl.atomic_add(total_sumsq_ptr, sumsq)


def _check(
    acc, grad, alpha, inv_scale, found_inf, segments, seg_sumsq, total_sumsq, segment_index
) -> None:
    op = "accumulate_grads"
    check_tensor(op, "acc", acc, dtypes=(torch.float32,))
    check_tensor(op, "grad", grad, dtypes=FLOAT_DTYPES, device=acc.device, numel=acc.numel())
    check_scalar_tensor(op, "alpha", alpha, acc.device)
    if inv_scale is not None:
        check_scalar_tensor(op, "inv_scale", inv_scale, acc.device)
    if found_inf is not None:
        check_flag(op, "found_inf", found_inf, acc.device)
    sumsq_dtypes = (torch.float32, torch.float64)
    if total_sumsq is not None:
        check_tensor(
            op, "total_sumsq", total_sumsq, dtypes=sumsq_dtypes, device=acc.device, numel=1
        )
    if seg_sumsq is not None and total_sumsq is not None and seg_sumsq.dtype != total_sumsq.dtype:
        raise KernelInputError(
            f"{op}: seg_sumsq ({seg_sumsq.dtype}) and total_sumsq ({total_sumsq.dtype}) must "
            "have one dtype"
        )
    if segments is not None and segment_index is not None:
        raise KernelInputError(
            f"{op}: pass either segments (flat mode) or segment_index (per-tensor mode), not both"
        )
    if segments is not None:
        if not isinstance(segments, Segments):
            raise KernelInputError(
                f"{op}: segments must be a Segments table, got {type(segments).__name__}"
            )
        for name, t in (("acc", acc), ("grad", grad)):
            if t.dim() != 1 or t.numel() != segments.total:
                raise KernelInputError(
                    f"{op}: in flat mode {name} must be a flat buffer of {segments.total} elements "
                    f"(the segments' layout: {len(segments)} segments), got shape "
                    f"{tuple(t.shape)}; is it a buffer of another arena?"
                )
        if seg_sumsq is not None:
            check_tensor(
                op, "seg_sumsq", seg_sumsq, dtypes=sumsq_dtypes, device=acc.device,
                numel=len(segments),
            )  # fmt: skip
    elif segment_index is not None:
        if seg_sumsq is None:
            raise KernelInputError(f"{op}: segment_index needs seg_sumsq (the slot it writes)")
        check_tensor(op, "seg_sumsq", seg_sumsq, dtypes=sumsq_dtypes, device=acc.device)
        if isinstance(segment_index, bool) or not isinstance(segment_index, int):
            raise KernelInputError(
                f"{op}: segment_index must be a Python int, got {type(segment_index).__name__}"
            )
        if not 0 <= segment_index < seg_sumsq.numel():
            raise KernelInputError(
                f"{op}: segment_index {segment_index} is out of range for seg_sumsq of "
                f"{seg_sumsq.numel()} slots"
            )
    elif seg_sumsq is not None:
        raise KernelInputError(
            f"{op}: seg_sumsq needs segments (flat mode) or segment_index (per-tensor mode)"
        )


def accumulate_grads(
    acc: torch.Tensor,
    grad: torch.Tensor,
    *,
    alpha: float | torch.Tensor = 1.0,
    first: bool = False,
    inv_scale: float | torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    segments: Segments | None = None,
    seg_sumsq: torch.Tensor | None = None,
    total_sumsq: torch.Tensor | None = None,
    segment_index: int | None = None,
) -> torch.Tensor:
    """``acc = (0 if first else acc) + float32(grad) * inv_scale * alpha`` in one pass.

    Args:
        acc: fp32 accumulator, contiguous. Flat mode: the arena's flat buffer ``[total]``;
            per-tensor mode: one parameter's slice of it; updated in place.
        grad: fp32, bf16 or fp16 gradient with ``acc.numel()`` elements, contiguous, on the
            same device (any shape).
        alpha: multiplier (1/N for N micro-batches); float or float32 ``[1]`` tensor.
        first: True for the first micro-batch: ``acc`` is overwritten and not read.
        inv_scale: optional inverse loss scale (float or float32 ``[1]`` tensor).
        found_inf: optional float32 ``[1]`` flag, set to 1.0 when any ``grad`` is non-finite.
        segments: flat mode: the layout of ``acc``/``grad`` (e.g. ``ArenaGroup.segments``).
        seg_sumsq: float32 or float64 ``[num_segments]``: sums of squares of ``acc`` after the
            update, per segment (overwritten in flat mode, added to in per-tensor mode).
        total_sumsq: float32 or float64 ``[1]``: the same summed over everything covered
            (overwritten in flat mode, added to otherwise). float64 buffers (both of one dtype)
            square and sum in float64: an fp32 sum of squares overflows once ``|acc|`` passes
            about 1.8e19, so a finite gradient would read as non-finite.
        segment_index: per-tensor mode: the slot of ``seg_sumsq`` this tensor adds to.

    Returns:
        ``acc``.
    """
    _check(acc, grad, alpha, inv_scale, found_inf, segments, seg_sumsq, total_sumsq, segment_index)
    if segments is not None:
        # Flat mode overwrites its sums of squares (device-side zeroing: no sync).
        if seg_sumsq is not None:
            seg_sumsq.zero_()
        if total_sumsq is not None:
            total_sumsq.zero_()
    if not use_triton(acc):
        return accumulate_grads_ref(
            acc, grad, alpha=alpha, first=first, inv_scale=inv_scale, found_inf=found_inf,
            segments=segments, seg_sumsq=seg_sumsq, total_sumsq=total_sumsq,
            segment_index=segment_index,
        )  # fmt: skip
    n = acc.numel()
    if n == 0:
        return acc
    if segments is not None:
        table = segments.block_table(BLOCK, acc.device)
        programs = table.shape[0]
        aligned = segments.aligned(16)
    else:
        table = acc
        programs = -(-n // BLOCK)
        aligned = True
    if programs == 0:
        return acc
    seg_slot = seg_sumsq
    if segment_index is not None:
        seg_slot = seg_sumsq[segment_index : segment_index + 1]
    inv_ptr, inv_value = scalar_operand(inv_scale if inv_scale is not None else 1.0)
    alpha_ptr, alpha_value = scalar_operand(alpha)
    _accumulate_kernel[(programs,)](
        acc,
        grad,
        table,
        n,
        inv_ptr if inv_ptr is not None else acc,
        inv_value,
        alpha_ptr if alpha_ptr is not None else acc,
        alpha_value,
        found_inf if found_inf is not None else acc,
        seg_slot if seg_slot is not None else acc,
        total_sumsq if total_sumsq is not None else acc,
        BLOCK=BLOCK,
        USE_TABLE=segments is not None,
        ALIGNED=aligned,
        FIRST=bool(first),
        HAS_INV=inv_scale is not None,
        INV_IS_PTR=inv_ptr is not None,
        ALPHA_IS_PTR=alpha_ptr is not None,
        CHECK_FINITE=found_inf is not None,
        SEG_SUMSQ=seg_slot is not None,
        TOTAL_SUMSQ=total_sumsq is not None,
        SUMSQ_FP64=any(t is not None and t.dtype == torch.float64 for t in (seg_slot, total_sumsq)),
        num_warps=NUM_WARPS,
        # Separate multiply and add roundings, as torch does them: bit-exact to the reference.
        enable_fp_fusion=False,
    )
    return acc


def accumulate_grads_ref(
    acc: torch.Tensor,
    grad: torch.Tensor,
    *,
    alpha: float | torch.Tensor = 1.0,
    first: bool = False,
    inv_scale: float | torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    segments: Segments | None = None,
    seg_sumsq: torch.Tensor | None = None,
    total_sumsq: torch.Tensor | None = None,
    segment_index: int | None = None,
) -> torch.Tensor:
    """Plain-torch reference with the same semantics; sums of squares are reduced in float64."""
    flat_acc = acc.view(-1)
    g = grad.reshape(-1)
    if found_inf is not None:
        found_inf.masked_fill_((~torch.isfinite(g)).any().reshape(1), 1.0)
    v = g.to(torch.float32)
    if inv_scale is not None:
        v = v * torch.as_tensor(inv_scale, dtype=torch.float32, device=acc.device).reshape(())
    v = v * torch.as_tensor(alpha, dtype=torch.float32, device=acc.device).reshape(())
    new = v if first else flat_acc + v
    if segments is None:
        flat_acc.copy_(new)
        sq = flat_acc.to(torch.float64).square().sum()
        if seg_sumsq is not None and segment_index is not None:
            seg_sumsq[segment_index : segment_index + 1].add_(sq.to(seg_sumsq.dtype))
        if total_sumsq is not None:
            total_sumsq.add_(sq.to(total_sumsq.dtype))
        return acc
    for off, numel in zip(segments.offsets, segments.numels):
        flat_acc[off : off + numel].copy_(new[off : off + numel])
    if seg_sumsq is not None or total_sumsq is not None:
        sums = torch.zeros(len(segments), dtype=torch.float64, device=acc.device)
        for i, (off, numel) in enumerate(zip(segments.offsets, segments.numels)):
            sums[i] = flat_acc[off : off + numel].to(torch.float64).square().sum()
        if seg_sumsq is not None:
            seg_sumsq.copy_(sums.to(seg_sumsq.dtype))
        if total_sumsq is not None:
            total_sumsq.copy_(sums.sum().to(total_sumsq.dtype).reshape(1))
    return acc
