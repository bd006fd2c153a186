"""Dequantize fused into an update: ``target <- target + alpha * dequant(q)``.

Applies a stored residual or a compact update direction (a :class:`QuantizedTensor` from
``quantize_blockwise``) to a flat buffer in one pass, with no full-size temporary: each
program unpacks the codes of its blocks, scales them, and adds them into ``target``.

Shapes: ``target`` is any contiguous fp32/bf16/fp16 tensor with ``q.numel`` elements (read
flat, e.g. a flat arena); ``alpha`` is a Python float or a float32 [1] device tensor (read on
the device, so a step scale computed on the GPU costs no host sync). The sum is computed in
fp32 (``t + alpha * v``, no fma contraction) and rounded once to ``target.dtype``. A block whose
scale is NaN (it held inf/NaN when quantized) adds NaN, so a skipped step stays visible.

Stochastic rounding (``stochastic_rounding=True``, bf16 targets only): the fp32 sum ``s`` is
rounded to one of its two bf16 neighbours, up with probability equal to the distance from the
lower one in ulps, so ``E[result] = s``. Why: a bf16 weight updated in place by steps much
smaller than its ulp (``lr * direction`` is about 1e-4 of the weight) stays where it is under
round-to-nearest; stochastic rounding keeps the expected trajectory of an fp32 master (the
trainer's Predict phase updates its bf16 weights this way while the fp32 master waits in host
memory). Bits: 16 uniform random bits ``r`` from Philox (``tl.randint(seed, element index)``)
are added to the low half of ``s``'s fp32 bit pattern, which is then truncated to its high
half (sign-magnitude, so negative values round symmetrically); NaN stays NaN. The reference
draws its bits from a ``torch.Generator`` seeded with ``seed``: kernel and reference agree in
distribution (each result is one of the two neighbours of the same fp32 sum), not bit for bit.
References: Gupta et al., "Deep Learning with Limited Numerical Precision" (2015); Zamirai et
al., "Revisiting BFloat16 Training" (2020).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, KernelInputError, check_scalar_tensor, check_tensor
from ._dispatch import use_triton
from ._launch import split_launch
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


@triton.jit(do_not_specialize=["seed"])
def _dequantize_add_kernel(
    target_ptr,
    data_ptr,
    scale_ptr,
    alpha_ptr,
    alpha_value,
    numel,
    seed,
    index_base,
    FMT: tl.constexpr,
    BLOCK: tl.constexpr,
    GROUPS: tl.constexpr,
    PER_BYTE: tl.constexpr,
    BITS: tl.constexpr,
    LEVELS: tl.constexpr,
    ALPHA_IS_TENSOR: tl.constexpr,
    STOCHASTIC: tl.constexpr,
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
    total = t + alpha * val
    if STOCHASTIC:
        # Add 16 random bits below bf16's last mantissa bit, then truncate: rounds the
        # magnitude up with probability (distance to the lower neighbour) / ulp.
        bits = total.to(tl.uint32, bitcast=True)
        # Keyed by the index in the whole tensor (index_base: where this launch's views
        # begin), so a split launch draws the same bits.
        noise = tl.randint(seed, index_base + offs) & 0xFFFF
        rounded = ((bits + noise) & 0xFFFF0000).to(tl.float32, bitcast=True)
        total = tl.where(total != total, total, rounded)  # NaN payloads may sit in low bits
    tl.store(target_ptr + offs, total.to(target_ptr.dtype.element_ty), mask=mask)


def dequantize_add(
    target: torch.Tensor,
    q: QuantizedTensor,
    alpha: float | torch.Tensor = 1.0,
    *,
    stochastic_rounding: bool = False,
    seed: int = 0,
    tile: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """``target += alpha * dequantize_blockwise(q)`` in place, in one pass; returns ``target``.

    ``stochastic_rounding``: round the fp32 sum to bf16 stochastically (bf16 ``target`` only),
    with random bits from ``seed`` (an int in [0, 2**63)) and each element's index: the same
    seed gives the same result, so pass a new seed per call."""
    op = "dequantize_add"
    if not isinstance(q, QuantizedTensor):
        raise KernelInputError(f"{op}: q must be a QuantizedTensor, got {type(q).__name__}")
    f = q.validate(op)
    check_tensor(op, "target", target, dtypes=FLOAT_DTYPES, device=q.device, numel=q.numel)
    check_scalar_tensor(op, "alpha", alpha, q.device)
    _check_rounding(op, target, stochastic_rounding, seed)
    if not use_triton(target):
        return dequantize_add_ref(target, q, alpha, stochastic_rounding=stochastic_rounding,
                                  seed=seed)  # fmt: skip
    n = q.numel
    if n == 0:
        return target
    alpha_is_tensor = isinstance(alpha, torch.Tensor)
    groups, per_program = _launch_shape(q.block, tile)
    target_flat = target.view(-1)

    def launch(start: int, count: int, programs: int) -> None:
        _dequantize_add_kernel[(programs,)](
            target_flat[start:],
            q.data.view(-1)[start // f.per_byte :],
            q.scales.view(-1)[start // q.block :],
            alpha if alpha_is_tensor else q.scales,
            0.0 if alpha_is_tensor else float(alpha),
            count,
            int(seed),
            start,
            FMT=f.kernel_id,
            BLOCK=q.block,
            GROUPS=groups,
            PER_BYTE=f.per_byte,
            BITS=f.bits,
            LEVELS=f.levels,
            ALPHA_IS_TENSOR=alpha_is_tensor,
            STOCHASTIC=bool(stochastic_rounding),
            num_warps=num_warps or DEFAULT_WARPS,
            enable_fp_fusion=False,  # t + alpha * v rounded twice, as the reference does
        )

    split_launch(n, per_program, launch)
    return target


def _check_rounding(op: str, target: torch.Tensor, stochastic: bool, seed: int) -> None:
    if not isinstance(stochastic, bool):
        raise KernelInputError(
            f"{op}: stochastic_rounding must be True or False, got {stochastic!r}"
        )
    if not stochastic:
        return
    if target.dtype != torch.bfloat16:
        raise KernelInputError(
            f"{op}: stochastic_rounding needs a bfloat16 target, got {target.dtype} (fp32 needs "
            "no rounding; fp16 is not supported)"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise KernelInputError(f"{op}: seed must be an int in [0, 2**63), got {seed!r}")


def stochastic_round_bf16_ref(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 ``x`` rounded stochastically to bf16 (16 random bits added below the bf16 mantissa,
    then truncation; NaN stays NaN)."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, device="cpu")
    rounded = (bits + noise.to(bits.device)) & 0xFFFF0000
    rounded = torch.where(rounded >= 1 << 31, rounded - (1 << 32), rounded)  # as signed int32
    out = rounded.to(torch.int32).view(torch.float32)
    return torch.where(torch.isnan(x), x.float(), out).to(torch.bfloat16)


def dequantize_add_ref(
    target: torch.Tensor,
    q: QuantizedTensor,
    alpha: float | torch.Tensor = 1.0,
    *,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """Plain-torch reference of :func:`dequantize_add` (in place; returns ``target``)."""
    _check_rounding("dequantize_add_ref", target, stochastic_rounding, seed)
    codes = _unpack_ref(q).view(-1, q.block)
    values = _dequant_ref(codes, q.scales, FORMATS[q.fmt]).reshape(-1)[: q.numel]
    flat = target.view(-1)
    total = flat.float() + alpha * values
    if stochastic_rounding:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        flat.copy_(stochastic_round_bf16_ref(total, gen))
    else:
        flat.copy_(total)
    return target
