"""Blockwise quantization with error feedback: ``quantize_blockwise`` / ``dequantize_blockwise``.

The input is read as one flat buffer (a flat arena, or any contiguous tensor) of ``n``
elements and cut into blocks of ``block`` consecutive elements (a power of two, 32..4096; the
last block may be short). Each block gets one fp32 scale and each element a small code:

======================  =======================================  ==================  ==========
format                  value of code ``q`` in a block of scale s  codes               per byte
======================  =======================================  ==================  ==========
``int8``                ``q * (s / 127)``, s = absmax               -127..127 (int8)    1
``int8_dynamic``        ``q**3 * (s / 127**3)``, s = absmax         -127..127 (int8)    1
``int4``                ``q * (s / 7)``, s = absmax                 -7..7 (two's compl.) 2
``ternary``             ``q * s``, s = alpha (see below)            -1, 0, +1           4
======================  =======================================  ==================  ==========

Rounding (deterministic): to the nearest code value, ties away from zero (``floor(|y| + 1/2)``
for the linear formats; for ``int8_dynamic`` the nearer of the two code values around ``|x|``,
compared in the linear domain, so the error is half the local gap).

``int8_dynamic`` is a cubic (companding) code: its smallest non-zero magnitude is
``s / 127**3`` (about 5e-7 of the block's absmax, against 8e-3 for ``int8``), so small values
such as Adam's second moments are kept, with a relative step of about ``3 / (127 |y|^(1/3))``.

``ternary`` takes its scale from ternary weight networks (Li & Liu, 2016): with
``delta = 0.7 * mean(|v|)`` over the block, ``alpha_twn = mean(|v| : |v| > delta)``; the
scale is ``s = max(alpha_twn, absmax / 2)`` and every element rounds to the nearest of
``{-s, 0, +s}`` (code ``sign(v)`` where ``|v| >= s / 2``). Raising the scale to ``absmax / 2``
keeps every element within one step (``|error| <= max(s / 2, absmax - s) <= s``), which is
what lets error feedback converge: with the plain TWN rule the elements above ``2 s`` saturate
and the carried error grows without bound.

Stochastic rounding (``stochastic=True``, seeded, reproducible for a given seed and size):
each magnitude rounds up with probability equal to its distance from the code below, so the
dequantized value is unbiased; the error is below one local step. Stochastic ``ternary`` uses
scale ``s = absmax`` and code ``sign(v)`` with probability ``|v| / s`` (TernGrad, Wen et al.
2017), which is unbiased for every element. The random stream is Philox (``tl.rand``) keyed by
``seed`` and the element index; the torch reference draws from ``torch.Generator`` seeded with
the same ``seed``, so the two are each reproducible but do not match each other element-wise.

Error feedback (``error`` given, fp32, same number of elements): the kernel quantizes
``v = x + error`` and writes ``error <- v - dequant(q)`` in the same pass, so what one step
loses is carried into the next: over T steps ``sum_t dequant(q_t) = sum_t x_t + e_0 - e_T``.

Non-finite input (inf or NaN anywhere in ``v`` of a block) is reported, never packed: the
``found_inf`` flag (float32 [1]) is set to 1, the block's codes are 0, its scale is NaN (so a
dequantization of that block gives NaN, loudly), and its part of ``error`` is left unchanged.

Byte layout: codes are stored in element order; with several codes per byte, element
``k * per_byte + j`` sits in bits ``[bits * j, bits * (j + 1))`` of byte ``k`` (lowest bits
first) as a ``bits``-bit two's complement number; padding codes past ``n`` are 0.
``data`` is int8 [n] for the 8-bit formats and uint8 [ceil(n / per_byte)] otherwise;
``scales`` is float32 [ceil(n / block)].

References: bitsandbytes blockwise quantization (Dettmers et al., 8-bit optimizers via
block-wise quantization, 2022); error feedback (Seide et al. 2014, 1-bit SGD; Karimireddy et
al. 2019, EF-SGD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._alloc import empty
from ._checks import FLOAT_DTYPES, KernelInputError, check_flag, check_tensor
from ._dispatch import use_triton
from ._launch import split_launch


@dataclass(frozen=True)
class Format:
    """A quantization format: its id in the kernels, code width and number of code levels."""

    name: str
    kernel_id: int
    bits: int
    per_byte: int
    levels: int  # largest code magnitude
    storage: torch.dtype


FORMATS: dict[str, Format] = {
    "int8": Format("int8", 0, 8, 1, 127, torch.int8),
    "int8_dynamic": Format("int8_dynamic", 1, 8, 1, 127, torch.int8),
    "int4": Format("int4", 2, 4, 2, 7, torch.uint8),
    "ternary": Format("ternary", 3, 2, 4, 1, torch.uint8),
}
MIN_BLOCK, MAX_BLOCK, DEFAULT_BLOCK = 32, 4096, 256
TWN_THRESHOLD = 0.7  # ternary threshold, as a multiple of the block's mean |v| (TWN)
DYNAMIC_CUBE = 127.0**3  # 2048383: largest cubed code, exact in fp32

# Launch defaults: elements per program (several blocks per program amortize the per-block
# work) and warps per program. Dequantization uses DEFAULT_TILE / DEFAULT_WARPS; quantization
# uses QUANTIZE_LAUNCH[(fmt, error_feedback)] = (tile, warps, packed_3d), set from the H100
# sweep of benchmarks/sweep_quantize.py (packed_3d: a [blocks, bytes, codes-per-byte] tile).
# Without error feedback the formats are arithmetic-bound and want ~8-32 elements per thread;
# with it they are memory-bound and most configurations reach the copy rate.
DEFAULT_TILE = 4096
DEFAULT_WARPS = 8
QUANTIZE_LAUNCH: dict[tuple[str, bool], tuple[int, int, bool]] = {
    ("int8", False): (4096, 8, False),
    ("int8", True): (4096, 8, False),
    ("int8_dynamic", False): (2048, 4, False),
    ("int8_dynamic", True): (2048, 4, False),
    ("int4", False): (1024, 4, True),
    ("int4", True): (1024, 4, True),
    ("ternary", False): (4096, 4, True),
    ("ternary", True): (2048, 8, False),
}


@dataclass(frozen=True)
class QuantizedTensor:
    """A blockwise-quantized tensor.

    data:   int8 [n] (``int8``, ``int8_dynamic``) or uint8 [ceil(n / per_byte)] (packed)
    scales: float32 [ceil(n / block)], one per block (NaN for a block that held inf/NaN)
    fmt, block: the format name and the block size
    shape, dtype: the shape and dtype of the quantized input (dequantization restores them)
    """

    data: torch.Tensor
    scales: torch.Tensor
    fmt: str
    block: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of codes plus scales."""
        return self.data.numel() * self.data.element_size() + self.scales.numel() * 4

    def validate(self, op: str) -> Format:
        """Raise :class:`KernelInputError` unless data and scales agree with fmt/block/shape."""
        fmt = _format(op, self.fmt)
        _check_block(op, self.block)
        n = self.numel
        check_tensor(
            op,
            "q.data",
            self.data,
            dtypes=(fmt.storage,),
            numel=packed_numel(n, self.fmt),
        )
        check_tensor(
            op,
            "q.scales",
            self.scales,
            dtypes=(torch.float32,),
            device=self.data.device,
            numel=num_blocks(n, self.block),
        )
        if self.dtype not in FLOAT_DTYPES:
            raise KernelInputError(f"{op}: q.dtype is {self.dtype}; expected a float dtype")
        return fmt


def num_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def packed_numel(numel: int, fmt: str) -> int:
    """Number of stored code elements (bytes) for ``numel`` values in format ``fmt``."""
    return -(-numel // FORMATS[fmt].per_byte)


def _format(op: str, fmt: object) -> Format:
    if fmt not in FORMATS:
        raise KernelInputError(f"{op}: fmt={fmt!r}; expected one of: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _check_block(op: str, block: object) -> None:
    if (
        not isinstance(block, int)
        or isinstance(block, bool)
        or block < MIN_BLOCK
        or block > MAX_BLOCK
        or block & (block - 1)
    ):
        raise KernelInputError(
            f"{op}: block={block!r}; expected a power of two from {MIN_BLOCK} to {MAX_BLOCK}"
        )


@triton.jit
def _max_propagating_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _block_max(x, THREE_D: tl.constexpr):
    """Per-block max of a [G, BLOCK] or [G, BYTES, PER_BYTE] tile, NaN-propagating, with the
    reduced axes kept (so the result broadcasts against the tile)."""
    if THREE_D:
        x = tl.reduce(x, 2, _max_propagating_nan, keep_dims=True)
    return tl.reduce(x, 1, _max_propagating_nan, keep_dims=True)


@triton.jit
def _max_nan_and_sum(a_max, a_sum, b_max, b_sum):
    return tl.maximum(a_max, b_max, propagate_nan=tl.PropagateNan.ALL), a_sum + b_sum


@triton.jit
def _two_sums(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _block_max_and_sum(x, THREE_D: tl.constexpr):
    """(NaN-propagating max, sum) of each block in one reduction (one chain of shuffles)."""
    m = x
    s = x
    if THREE_D:
        m, s = tl.reduce((m, s), 2, _max_nan_and_sum, keep_dims=True)
    return tl.reduce((m, s), 1, _max_nan_and_sum, keep_dims=True)


@triton.jit
def _block_two_sums(x0, x1, THREE_D: tl.constexpr):
    if THREE_D:
        x0, x1 = tl.reduce((x0, x1), 2, _two_sums, keep_dims=True)
    return tl.reduce((x0, x1), 1, _two_sums, keep_dims=True)


@triton.jit
def _quantize_blockwise_kernel(
    x_ptr,
    err_ptr,
    data_ptr,
    scale_ptr,
    flag_ptr,
    numel,
    seed,
    index_base,
    FMT: tl.constexpr,
    BLOCK: tl.constexpr,
    GROUPS: tl.constexpr,
    PER_BYTE: tl.constexpr,
    BITS: tl.constexpr,
    LEVELS: tl.constexpr,
    HAS_ERROR: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    HAS_FLAG: tl.constexpr,
    THREE_D: tl.constexpr,
):
    # One program quantizes GROUPS consecutive blocks. Packed formats (several codes per byte)
    # hold them as a [GROUPS, BYTES, PER_BYTE] tile, so the codes of one byte sit in one thread
    # and packing is an in-register sum; the 8-bit formats use a [GROUPS, BLOCK] tile. Per-block
    # values keep their reduced axes (shape [GROUPS, 1(, 1)]) and broadcast against the tile.
    pid = tl.program_id(0).to(tl.int64)
    BYTES: tl.constexpr = BLOCK // PER_BYTE
    TILE: tl.constexpr = GROUPS * BLOCK
    # 64-bit arithmetic once per program (pointers moved to its first element), 32-bit offsets
    # inside the tile: per-element int64 index math is a large share of the instructions of
    # this arithmetic-bound kernel.
    start = pid * TILE
    x_ptr += start
    err_ptr += start
    data_ptr += start // PER_BYTE
    scale_ptr += pid * GROUPS
    left = tl.minimum(numel - start, TILE).to(tl.int32)  # elements of this tile in range
    if THREE_D:
        g = tl.arange(0, GROUPS)[:, None, None]
        byte_in_block = tl.arange(0, BYTES)[None, :, None]
        offs = g * BLOCK + byte_in_block * PER_BYTE + tl.arange(0, PER_BYTE)[None, None, :]
    else:
        g = tl.arange(0, GROUPS)[:, None]
        offs = g * BLOCK + tl.arange(0, BLOCK)[None, :]
    in_range = offs < left
    v = tl.load(x_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    if HAS_ERROR:
        v += tl.load(err_ptr + offs, mask=in_range, other=0.0)
    mag = tl.abs(v)
    # One NaN-propagating max gives both the scale and the verdict: a block holding inf or NaN
    # has a non-finite max. Such a block's codes and error are discarded below, so the values
    # computed from it in between do not matter. Ternary also needs the block's sum of |v|,
    # reduced in the same pass.
    if FMT == 3 and not STOCHASTIC:
        absmax, mag_sum = _block_max_and_sum(mag, THREE_D)
    else:
        absmax = _block_max(mag, THREE_D)
    block_ok = absmax < float("inf")  # False for inf and NaN
    absmax = tl.where(block_ok, absmax, 0.0)
    # Per element only multiplies: y = |v| * (levels / absmax), with one IEEE division per
    # block (Triton's fp32 `/` is div.full.f32, up to 2 ulp off, hence div_rn). Blocks under
    # 2^-100 are first scaled by 2^64 (exact) so that levels / absmax cannot overflow.
    pre = tl.where(absmax < 7.888609052210118e-31, 18446744073709551616.0, 1.0)
    mag_s = mag * pre
    denom = tl.where(absmax > 0.0, absmax * pre, 1.0)
    if STOCHASTIC:
        # uniform [0, 1), Philox keyed by (seed, index in the whole tensor): index_base is
        # where this launch's views begin, so a split launch draws the same numbers.
        u = tl.rand(seed, index_base + start + offs)

    if FMT == 3:  # ternary
        if STOCHASTIC:
            # TernGrad: scale absmax, P(code = sign) = |v| / absmax, unbiased.
            inv = tl.math.div_rn(tl.full(denom.shape, 1.0, tl.float32), denom)
            code = tl.where(u < mag_s * inv, 1.0, 0.0)
            scale = absmax
        else:
            # TWN scale (mean magnitude above 0.7 * mean|v|), raised to absmax / 2 so no
            # element is more than one step away; then round to the nearest of {-s, 0, s}.
            count = tl.minimum(tl.maximum(left - g * BLOCK, 0), BLOCK).to(tl.float32)
            delta = 0.7 * tl.math.div_rn(mag_sum, tl.maximum(count, 1.0))
            above = mag > delta
            n_above, sum_above = _block_two_sums(
                above.to(tl.float32), tl.where(above, mag, 0.0), THREE_D
            )
            twn = tl.math.div_rn(sum_above, tl.maximum(n_above, 1.0))
            scale = tl.maximum(twn, 0.5 * absmax)
            step = tl.where(scale > 0.0, scale * pre, 1.0)
            inv = tl.math.div_rn(tl.full(step.shape, 1.0, tl.float32), step)
            code = tl.minimum(tl.floor(mag_s * inv + 0.5), 1.0)
        deq_mag = code * scale
    elif FMT == 1:  # int8_dynamic: cubic code
        inv = tl.math.div_rn(tl.full(denom.shape, 2048383.0, tl.float32), denom)
        y3 = mag_s * inv
        c = tl.floor(tl.exp2(tl.log2(tl.maximum(y3, 1e-30)) * (1.0 / 3.0)))
        if STOCHASTIC:
            # The cube root above is approximate; the rounding probability needs the exact
            # floor (c**3 <= y3 < (c+1)**3).
            c = tl.where((c + 1.0) * (c + 1.0) * (c + 1.0) <= y3, c + 1.0, c)
            c = tl.where(c * c * c > y3, c - 1.0, c)
        # Nearest rounding needs no correction: the approximate c is off by at most one only
        # where y3 is within ~1e-6 (relative) of an integer cube, and there both candidate
        # pairs {c-1, c} and {c, c+1} choose that cube's code.
        lo = c * c * c
        c1 = c + 1.0
        hi = c1 * c1 * c1
        if STOCHASTIC:
            up = u * (hi - lo) < y3 - lo
        else:
            up = y3 - lo >= hi - y3
        code = tl.minimum(tl.where(up, c1, c), 127.0)
        scale = absmax
        deq_mag = ((code * code * code) * (1.0 / 2048383.0)) * scale
    else:  # int8, int4: linear code
        inv = tl.math.div_rn(tl.full(denom.shape, LEVELS, tl.float32), denom)
        y = mag_s * inv
        if STOCHASTIC:
            code = tl.floor(y + u)
        else:
            code = tl.floor(y + 0.5)
        code = tl.minimum(code, LEVELS)
        scale = absmax
        deq_mag = (code * (1.0 / LEVELS)) * scale

    negative = v < 0.0
    code = tl.where(block_ok, tl.where(negative, -code, code), 0.0)
    scale = tl.where(block_ok, scale, float("nan"))

    if HAS_ERROR:
        deq = tl.where(negative, -deq_mag, deq_mag)
        tl.store(err_ptr + offs, v - deq, mask=in_range & block_ok)

    blk_mask = g * BLOCK < left
    tl.store(scale_ptr + g, scale, mask=blk_mask)
    if HAS_FLAG:
        any_bad = tl.max((blk_mask & (block_ok == 0)).to(tl.int32))
        tl.store(flag_ptr, 1.0, mask=any_bad > 0)

    qi = code.to(tl.int32)
    n_bytes = (left + PER_BYTE - 1) // PER_BYTE  # bytes of this tile in range
    if PER_BYTE == 1:
        tl.store(data_ptr + offs, qi.to(tl.int8), mask=in_range)
    elif THREE_D:
        shift = tl.arange(0, PER_BYTE)[None, None, :] * BITS
        # Bit fields do not overlap, so the sum is an OR; the axis is inside one thread.
        packed = tl.sum((qi & ((1 << BITS) - 1)) << shift, axis=2, keep_dims=True)
        boffs = g * BYTES + byte_in_block  # [G, BYTES, 1]
        tl.store(data_ptr + boffs, packed.to(tl.uint8), mask=boffs < n_bytes)
    else:
        nib = tl.reshape(qi & ((1 << BITS) - 1), [GROUPS, BYTES, PER_BYTE])
        shift = tl.arange(0, PER_BYTE) * BITS
        packed = tl.sum(nib << shift[None, None, :], axis=2)
        boffs = g * BYTES + tl.arange(0, BYTES)[None, :]
        tl.store(data_ptr + boffs, packed.to(tl.uint8), mask=boffs < n_bytes)


def _launch_shape(block: int, tile: int | None) -> tuple[int, int]:
    groups = max(1, (tile or DEFAULT_TILE) // block)
    return groups, groups * block


def quantize_blockwise(
    x: torch.Tensor,
    fmt: str = "int8",
    block: int = DEFAULT_BLOCK,
    *,
    error: torch.Tensor | None = None,
    stochastic: bool = False,
    seed: int = 0,
    found_inf: torch.Tensor | None = None,
    out: QuantizedTensor | None = None,
    tile: int | None = None,
    num_warps: int | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` (any contiguous fp32/bf16/fp16 tensor, read flat) blockwise.

    error: optional fp32 buffer with ``x.numel()`` elements; ``x + error`` is quantized and
        ``error`` is overwritten with what quantization lost (error feedback).
    stochastic, seed: stochastic rounding, reproducible for a given seed (an int < 2**31).
    found_inf: optional float32 [1] device flag, set to 1 when a block holds inf or NaN.
    out: an existing QuantizedTensor of the same format, block and size to write into.
    tile, num_warps: launch tuning (elements per program, warps); defaults are measured.
    """
    op = "quantize_blockwise"
    f = _format(op, fmt)
    _check_block(op, block)
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    n = x.numel()
    if error is not None:
        check_tensor(op, "error", error, dtypes=(torch.float32,), device=x.device, numel=n)
    if found_inf is not None:
        check_flag(op, "found_inf", found_inf, x.device)
    if not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise KernelInputError(f"{op}: seed={seed!r}; expected an int in [0, 2**31)")
    if out is not None:
        if not isinstance(out, QuantizedTensor):
            raise KernelInputError(f"{op}: out must be a QuantizedTensor, got {type(out)}")
        if out.fmt != fmt or out.block != block or out.numel != n:
            raise KernelInputError(
                f"{op}: out is fmt={out.fmt!r}, block={out.block}, numel={out.numel}; expected "
                f"fmt={fmt!r}, block={block}, numel={n}"
            )
        out.validate(op)
        check_tensor(op, "out.data", out.data, device=x.device)
    if not use_triton(x):
        return quantize_blockwise_ref(
            x,
            fmt,
            block,
            error=error,
            stochastic=stochastic,
            seed=seed,
            found_inf=found_inf,
            out=out,
        )

    if out is None:
        data = empty(packed_numel(n, fmt), dtype=f.storage, device=x.device)
        scales = empty(num_blocks(n, block), dtype=torch.float32, device=x.device)
        out = QuantizedTensor(data, scales, fmt, block, tuple(x.shape), x.dtype)
    elif out.shape != tuple(x.shape) or out.dtype != x.dtype:
        out = QuantizedTensor(out.data, out.scales, fmt, block, tuple(x.shape), x.dtype)
    if n == 0:
        return out
    tuned_tile, tuned_warps, packed_3d = QUANTIZE_LAUNCH[(fmt, error is not None)]
    groups, per_program = _launch_shape(block, tile or tuned_tile)
    x_flat = x.view(-1)
    err_flat = error.view(-1) if error is not None else x_flat

    def launch(start: int, count: int, programs: int) -> None:
        _quantize_blockwise_kernel[(programs,)](
            x_flat[start:],
            err_flat[start:],
            out.data.view(-1)[start // f.per_byte :],
            out.scales.view(-1)[start // block :],
            found_inf if found_inf is not None else out.scales,
            count,
            seed,
            start,
            FMT=f.kernel_id,
            BLOCK=block,
            GROUPS=groups,
            PER_BYTE=f.per_byte,
            BITS=f.bits,
            LEVELS=f.levels,
            HAS_ERROR=error is not None,
            STOCHASTIC=bool(stochastic),
            HAS_FLAG=found_inf is not None,
            THREE_D=f.per_byte > 1 and packed_3d,
            num_warps=num_warps or tuned_warps,
            # No fma contraction: error = v - dequant(q) must equal what dequantize gives.
            enable_fp_fusion=False,
        )

    # Every split point is a multiple of per_program, hence of the quantization block and
    # of the codes per byte: no block or byte straddles the body and the tail.
    split_launch(n, per_program, launch)
    return out


@triton.jit
def _unpack_codes(
    data_ptr,
    blk,
    numel,
    BLOCK: tl.constexpr,
    GROUPS: tl.constexpr,
    PER_BYTE: tl.constexpr,
    BITS: tl.constexpr,
):
    """Load the codes of GROUPS blocks as an int32 [GROUPS, BLOCK] tile in element order."""
    BYTES: tl.constexpr = BLOCK // PER_BYTE
    boffs = blk[:, None] * BYTES + tl.arange(0, BYTES)[None, :]
    n_bytes = (numel + PER_BYTE - 1) // PER_BYTE
    raw = tl.load(data_ptr + boffs, mask=boffs < n_bytes, other=0).to(tl.int32)
    if PER_BYTE == 1:
        codes = raw
    elif PER_BYTE == 2:
        lo = raw & 15
        hi = (raw >> 4) & 15
        # Sign-extend the 4-bit two's complement fields.
        codes = tl.interleave(lo - ((lo & 8) << 1), hi - ((hi & 8) << 1))
    else:
        c0 = raw & 3
        c1 = (raw >> 2) & 3
        c2 = (raw >> 4) & 3
        c3 = (raw >> 6) & 3
        c0 = c0 - ((c0 & 2) << 1)
        c1 = c1 - ((c1 & 2) << 1)
        c2 = c2 - ((c2 & 2) << 1)
        c3 = c3 - ((c3 & 2) << 1)
        # interleave(interleave(c0, c2), interleave(c1, c3)) = c0, c1, c2, c3 per byte.
        codes = tl.interleave(tl.interleave(c0, c2), tl.interleave(c1, c3))
    return codes


@triton.jit
def _dequantize_values(codes, scale, FMT: tl.constexpr, LEVELS: tl.constexpr):
    """fp32 values of an int32 [G, BLOCK] code tile with per-block scales [G]."""
    q = codes.to(tl.float32)
    if FMT == 1:
        return ((q * q * q) * (1.0 / 2048383.0)) * scale[:, None]
    else:
        return (q * (1.0 / LEVELS)) * scale[:, None]


@triton.jit
def _dequantize_blockwise_kernel(
    data_ptr,
    scale_ptr,
    out_ptr,
    numel,
    FMT: tl.constexpr,
    BLOCK: tl.constexpr,
    GROUPS: tl.constexpr,
    PER_BYTE: tl.constexpr,
    BITS: tl.constexpr,
    LEVELS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    codes = _unpack_codes(data_ptr, blk, numel, BLOCK, GROUPS, PER_BYTE, BITS)
    scale = tl.load(scale_ptr + blk, mask=blk * BLOCK < numel, other=0.0)
    val = _dequantize_values(codes, scale, FMT, LEVELS)
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=offs < numel)


def dequantize_blockwise(
    q: QuantizedTensor,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    *,
    tile: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Values of ``q`` as a tensor of ``q.shape`` and ``dtype`` (default: ``q.dtype``).

    out: optional contiguous float tensor with ``q.numel`` elements to write into (its dtype
    wins over ``dtype``). Values are computed in fp32 and rounded once to the output dtype.
    """
    op = "dequantize_blockwise"
    if not isinstance(q, QuantizedTensor):
        raise KernelInputError(f"{op}: q must be a QuantizedTensor, got {type(q).__name__}")
    f = q.validate(op)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"{op}: dtype={dtype}; expected one of fp32, bf16, fp16")
    if out is not None:
        check_tensor(op, "out", out, dtypes=FLOAT_DTYPES, device=q.device, numel=q.numel)
    if not use_triton(q.data):
        return dequantize_blockwise_ref(q, out=out, dtype=dtype)
    if out is None:
        out = empty(*q.shape, dtype=dtype or q.dtype, device=q.device)
    n = q.numel
    if n == 0:
        return out
    groups, per_program = _launch_shape(q.block, tile)
    out_flat = out.view(-1)

    def launch(start: int, count: int, programs: int) -> None:
        _dequantize_blockwise_kernel[(programs,)](
            q.data.view(-1)[start // f.per_byte :],
            q.scales.view(-1)[start // q.block :],
            out_flat[start:],
            count,
            FMT=f.kernel_id,
            BLOCK=q.block,
            GROUPS=groups,
            PER_BYTE=f.per_byte,
            BITS=f.bits,
            LEVELS=f.levels,
            num_warps=num_warps or DEFAULT_WARPS,
        )

    split_launch(n, per_program, launch)
    return out


# ----------------------------------------------------------------------------------------------
# Torch references (plain torch, same formulas; used by the tests and as the CPU fallback).


def _blocks_ref(t: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 [n_blocks, block] view of a flat tensor, zero padded."""
    flat = t.reshape(-1).float()
    pad = num_blocks(flat.numel(), block) * block - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block)


def _unpack_ref(q: QuantizedTensor) -> torch.Tensor:
    """int32 [n_blocks * block] codes of ``q`` in element order (padding codes included)."""
    f = FORMATS[q.fmt]
    raw = q.data.to(torch.int32)
    if f.per_byte > 1:
        shifts = torch.arange(f.per_byte, device=raw.device, dtype=torch.int32) * f.bits
        fields = (raw[:, None] >> shifts) & ((1 << f.bits) - 1)
        sign_bit = 1 << (f.bits - 1)
        raw = (fields - ((fields & sign_bit) << 1)).reshape(-1)
    total = num_blocks(q.numel, q.block) * q.block
    return torch.nn.functional.pad(raw, (0, total - raw.numel()))


def _pack_ref(codes: torch.Tensor, f: Format, n: int) -> torch.Tensor:
    total = packed_numel(n, f.name) * f.per_byte
    codes = codes.reshape(-1)[:total]
    codes = torch.nn.functional.pad(codes, (0, total - codes.numel()))
    if f.per_byte == 1:
        return codes.to(torch.int8)
    fields = (codes.to(torch.int32) & ((1 << f.bits) - 1)).view(-1, f.per_byte)
    shifts = torch.arange(f.per_byte, device=codes.device, dtype=torch.int32) * f.bits
    return (fields << shifts).sum(dim=1).to(torch.uint8)


def _dequant_ref(codes: torch.Tensor, scales: torch.Tensor, f: Format) -> torch.Tensor:
    """fp32 values of int codes [n_blocks, block] with scales [n_blocks]."""
    q = codes.float()
    if f.name == "int8_dynamic":
        return ((q * q * q) * (1.0 / DYNAMIC_CUBE)) * scales[:, None]
    return (q * (1.0 / f.levels)) * scales[:, None]


def _over(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """numerator / t in one IEEE division (``float / tensor`` in torch is reciprocal * float)."""
    return torch.full_like(t, numerator) / t


def quantize_blockwise_ref(
    x: torch.Tensor,
    fmt: str = "int8",
    block: int = DEFAULT_BLOCK,
    *,
    error: torch.Tensor | None = None,
    stochastic: bool = False,
    seed: int = 0,
    found_inf: torch.Tensor | None = None,
    out: QuantizedTensor | None = None,
) -> QuantizedTensor:
    """Plain-torch reference of :func:`quantize_blockwise` (same contract and formulas; the
    stochastic stream comes from ``torch.Generator(seed)`` instead of Philox)."""
    f = FORMATS[fmt]
    n = x.numel()
    nb = num_blocks(n, block)
    v = _blocks_ref(x, block)
    if error is not None:
        v = v + _blocks_ref(error, block)
    valid = (torch.arange(nb * block, device=x.device) < n).view(nb, block)
    mag_raw = v.abs()
    finite = mag_raw < float("inf")
    block_ok = finite.all(dim=1)
    mag = torch.where(finite, mag_raw, torch.zeros_like(mag_raw))
    absmax = mag.amax(dim=1) if nb else mag.new_zeros(0)
    pre = torch.where(absmax < 2.0**-100, 2.0**64, 1.0)
    mag_s = mag * pre[:, None]
    denom = torch.where(absmax > 0, absmax * pre, torch.ones_like(absmax))
    if stochastic:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        u = torch.rand(v.shape, generator=gen, device=x.device)

    if fmt == "ternary":
        if stochastic:
            code = (u < mag_s * _over(1.0, denom)[:, None]).float()
            scale = absmax
        else:
            count = valid.sum(dim=1).float()
            delta = TWN_THRESHOLD * (mag.sum(dim=1) / count.clamp_min(1.0))
            above = mag > delta[:, None]
            n_above = above.sum(dim=1).float()
            twn = torch.where(above, mag, 0.0).sum(dim=1) / n_above.clamp_min(1.0)
            scale = torch.maximum(twn, 0.5 * absmax)
            step = torch.where(scale > 0, scale * pre, torch.ones_like(scale))
            code = torch.floor(mag_s * _over(1.0, step)[:, None] + 0.5).clamp_max(1.0)
        deq_mag = code * scale[:, None]
    elif fmt == "int8_dynamic":
        y3 = mag_s * _over(DYNAMIC_CUBE, denom)[:, None]
        c = torch.floor(torch.exp2(torch.log2(y3.clamp_min(1e-30)) * (1.0 / 3.0)))
        c = torch.where((c + 1) * (c + 1) * (c + 1) <= y3, c + 1, c)
        c = torch.where(c * c * c > y3, c - 1, c)
        lo, hi = c * c * c, (c + 1) * (c + 1) * (c + 1)
        up = u * (hi - lo) < y3 - lo if stochastic else y3 - lo >= hi - y3
        code = torch.where(up, c + 1, c).clamp_max(127.0)
        scale = absmax
        deq_mag = ((code * code * code) * (1.0 / DYNAMIC_CUBE)) * scale[:, None]
    else:
        y = mag_s * _over(float(f.levels), denom)[:, None]
        code = torch.floor(y + (u if stochastic else 0.5)).clamp_max(float(f.levels))
        scale = absmax
        deq_mag = (code * (1.0 / f.levels)) * scale[:, None]

    ok = block_ok[:, None]
    negative = v < 0
    code = torch.where(ok, torch.where(negative, -code, code), torch.zeros_like(code))
    scale = torch.where(block_ok, scale, torch.full_like(scale, float("nan")))
    if error is not None:
        new_error = v - torch.where(negative, -deq_mag, deq_mag)
        keep = ok & valid
        flat_err = error.view(-1)
        flat_err.copy_(torch.where(keep, new_error, _blocks_ref(error, block)).view(-1)[:n])
    if found_inf is not None:
        found_inf.copy_(torch.where((~block_ok).any(), torch.ones_like(found_inf), found_inf))

    data = _pack_ref(code.to(torch.int32), f, n)
    if out is None:
        return QuantizedTensor(data, scale.contiguous(), fmt, block, tuple(x.shape), x.dtype)
    out.data.copy_(data)
    out.scales.copy_(scale)
    return QuantizedTensor(out.data, out.scales, fmt, block, tuple(x.shape), x.dtype)


def dequantize_blockwise_ref(
    q: QuantizedTensor, out: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Plain-torch reference of :func:`dequantize_blockwise`."""
    f = FORMATS[q.fmt]
    codes = _unpack_ref(q).view(-1, q.block)
    values = _dequant_ref(codes, q.scales, f).reshape(-1)[: q.numel]
    if out is None:
        return values.to(dtype or q.dtype).view(q.shape)
    out.view(-1).copy_(values)
    return out
