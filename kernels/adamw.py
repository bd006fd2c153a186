"""Fused AdamW step over a flat arena, with fp32, bf16, 8-bit or 4-bit moments.

One 1-D launch updates every element of the arena (Loshchilov & Hutter, decoupled weight decay;
the same math as ``torch.optim.AdamW``). With ``t`` the step count after this step::

    g  = grad * grad_scale * clip_coef                      (grad fp32, bf16 or fp16)
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g * g
    p  = p * (1 - lr * weight_decay) - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    shadow = p.to(shadow.dtype)                             (optional bf16/fp16 model weights)

Parameter groups (``group_starts``, int64 ``[G]``): each group is a contiguous range of the flat
buffers with its own ``lr`` and ``weight_decay`` (float32 ``[G]`` device tables); every program
looks its elements' values up in the tables, so the step is still one launch with no extra
bytes per element.

bf16 weights without a master copy (``master`` bfloat16, ``sr_seed`` given): the update is
computed in fp32 and stored with stochastic rounding (16 Philox bits added below bf16's
mantissa, then truncated: unbiased), the bits drawn from ``(sr_seed + t * SR_STEP_STRIDE,
element index)`` with ``t`` read from the device step count: reproducible given the seed.

Sync-free: ``lr``, ``clip_coef`` and ``grad_scale`` may be one-element float32 device tensors
(read by the kernel), ``step`` is a float32 [1] device tensor holding the number of steps
taken so far, and ``found_inf`` a float32 [1] flag: when it is nonzero the kernel writes
nothing (parameters, moments, scales and shadow stay as they were) and ``step`` is not
incremented. The increment is a tiny device op queued after the launch, so every program reads
the same ``step``.

Moment storage, ``state_bits``:

- 32: ``exp_avg`` / ``exp_avg_sq`` are float32 ``[n]``.
- 16: they are bfloat16 ``[n]`` (updated in fp32, rounded to nearest on store).
- 8 and 4: blockwise quantized. Each block of ``qblock`` consecutive elements (256 for 8 bits,
  128 for 4 bits by default) has one float32 absmax per moment (``exp_avg_scale``,
  ``exp_avg_sq_scale``, ``[ceil(n / qblock)]``). Codes are small floating-point numbers
  relative to the block absmax, computed in closed form (no lookup table), so relative
  precision is kept across many orders of magnitude, as bitsandbytes' dynamic tree code and
  torchao's dynamic-exponent map do:

  ========  ==========================  ==========================================
  moment    8 bits (int8 / uint8 [n])   4 bits (uint8, two codes a byte)
  ========  ==========================  ==========================================
  exp_avg   sign + e4m3 magnitude,      sign + e3m0 magnitude (powers of two from
            down to 2^-15 of absmax     2^-6 to 1 of absmax)
  exp_avg   e5m3, down to 2^-31 of      e3m1, down to 2^-7 of absmax
  _sq       absmax; never rounded to 0  never rounded to 0
  ========  ==========================  ==========================================

  A nonzero ``exp_avg_sq`` below the smallest code is rounded *up* to it (a larger
  denominator, a smaller step), never to zero, which would turn ``m / sqrt(v)`` into
  ``m / eps``. In the 4-bit layout byte ``j`` of block ``b`` holds element ``b*qblock + j``
  in its low nibble and element ``b*qblock + qblock/2 + j`` in its high nibble, so a program
  unpacks two half-blocks without shuffling registers. ``state_shapes`` gives the buffer sizes.

  The step dequantizes the moments in registers, updates them in fp32, uses the fp32 values for
  the parameter update, takes each block's new absmax and re-quantizes them (as bitsandbytes'
  blockwise 8-bit optimizers do).

References: ``torch.optim.AdamW``; bitsandbytes ``optim.AdamW8bit`` (Dettmers et al., 8-bit
optimizers via block-wise quantization); torchao ``AdamW8bit`` / ``AdamW4bit`` (Li et al.,
memory efficient optimizers with 4-bit states).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import KernelInputError, check_flag, check_scalar_tensor, check_tensor
from ._dispatch import use_triton

OP = "adamw_step"
STATE_BITS = (32, 16, 8, 4)
# Seeds of successive steps: seed + step * SR_STEP_STRIDE (a prime, so nearby seeds and steps
# do not reuse a Philox stream within any realistic run).
SR_STEP_STRIDE = 1_000_003
DEFAULT_QBLOCK = {8: 256, 4: 128}

# (exponent bits, mantissa bits) of the magnitude codes, per state_bits: (exp_avg, exp_avg_sq).
CODE_FORMATS = {8: ((4, 3), (5, 3)), 4: ((3, 0), (3, 1))}


# ----------------------------------------------------------------------------------------------
# Closed-form minifloat codes (shared by the kernel and the reference).
#
# A magnitude code c with E exponent and M mantissa bits: c == 0 is zero; otherwise its exponent
# field is c >> M and its mantissa c & (2^M - 1), value 2^((c >> M) - (2^E - 1)) * (1 + mant/2^M).
# The largest code is 2 - 2^-M (VMAX). Encoding rounds fp32 mantissas to M bits by integer
# arithmetic on the fp32 bit pattern, which is exact and identical in Triton and torch.
# ----------------------------------------------------------------------------------------------


def code_vmax(man_bits: int) -> float:
    return 2.0 - 2.0**-man_bits


@triton.jit
def _encode_magnitude(
    y, EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, KEEP_NONZERO: tl.constexpr
):
    # y >= 0 in units where the block absmax is VMAX.
    BIAS: tl.constexpr = (1 << EXP_BITS) - 1
    MAX_CODE: tl.constexpr = (1 << (EXP_BITS + MAN_BITS)) - 1
    bits = y.to(tl.int32, bitcast=True)
    rounded = (bits + (1 << (22 - MAN_BITS))) >> (23 - MAN_BITS)
    code = rounded - ((127 - BIAS) << MAN_BITS)
    code = tl.minimum(tl.maximum(code, 0), MAX_CODE)
    if KEEP_NONZERO:
        code = tl.where(y > 0, tl.maximum(code, 1), code)
    return code


@triton.jit
def _decode_magnitude(code, EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr):
    BIAS: tl.constexpr = (1 << EXP_BITS) - 1
    bits = (code + ((127 - BIAS) << MAN_BITS)) << (23 - MAN_BITS)
    return tl.where(code == 0, 0.0, bits.to(tl.float32, bitcast=True))


def encode_magnitude_ref(
    y: torch.Tensor, exp_bits: int, man_bits: int, keep_nonzero: bool
) -> torch.Tensor:
    """Torch twin of ``_encode_magnitude``: float32 ``y >= 0`` -> int32 codes."""
    bias = (1 << exp_bits) - 1
    bits = y.to(torch.float32).contiguous().view(torch.int32)
    rounded = (bits + (1 << (22 - man_bits))) >> (23 - man_bits)
    code = (rounded - ((127 - bias) << man_bits)).clamp(0, (1 << (exp_bits + man_bits)) - 1)
    if keep_nonzero:
        code = torch.where(y > 0, code.clamp_min(1), code)
    return code


def decode_magnitude_ref(code: torch.Tensor, exp_bits: int, man_bits: int) -> torch.Tensor:
    """Torch twin of ``_decode_magnitude``: int codes -> float32 values in [0, VMAX]."""
    bias = (1 << exp_bits) - 1
    bits = ((code.to(torch.int32) + ((127 - bias) << man_bits)) << (23 - man_bits)).contiguous()
    return torch.where(code == 0, torch.zeros((), dtype=torch.float32), bits.view(torch.float32))


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_scalar(ptr, value, FROM_PTR: tl.constexpr):
    if FROM_PTR:
        return tl.load(ptr).to(tl.float32)
    return value


@triton.jit
def _adamw_math(p, g, m, v, beta1, beta2, lr, weight_decay, step_size, inv_sqrt_bc2, eps):
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp form
    v = beta2 * v + (1.0 - beta2) * g * g
    # IEEE sqrt and division (not the approximate defaults) keep the GPU within an ulp of torch.
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    p = p * (1.0 - lr * weight_decay) - step_size * tl.div_rn(m, denom)
    return p, m, v


@triton.jit
def _step_constants(step_ptr, lr, log2_beta1, log2_beta2):
    # t counts this step; beta^t = exp2(t * log2(beta)) with log2(beta) taken in fp64 on the host.
    # In fp64, as torch does on the host: 1 - beta2^t cancels (0.001 at t=1), so an fp32 beta^t
    # (and the GPU's approximate fp32 exp2/sqrt) would put ~1e-5 relative error into every early
    # step; fp64 keeps the constants within an fp32 rounding of torch's. Two scalars a program.
    t = tl.load(step_ptr).to(tl.float64) + 1.0
    bc1 = 1.0 - tl.exp2(t * log2_beta1)
    bc2 = 1.0 - tl.exp2(t * log2_beta2)
    step_size = lr / bc1  # fp32 lr, promoted to fp64
    inv_sqrt_bc2 = 1.0 / tl.sqrt(bc2)
    return step_size.to(tl.float32), inv_sqrt_bc2.to(tl.float32)


@triton.jit
def _group_hparams(
    offs, step_ptr, lr_ptr, lr_value, wd_ptr, wd_value, starts_ptr, log2_beta1, log2_beta2,
    LR_PTR: tl.constexpr, WD_PTR: tl.constexpr, NUM_GROUPS: tl.constexpr,
):  # fmt: skip
    """(lr, weight_decay, step_size, inv_sqrt_bc2) for the elements ``offs``: scalars with one
    group; with several, each element takes the values of the last group starting at or before
    it (a few scalar loads and compares a program: no bytes per element)."""
    lr = _load_scalar(lr_ptr, lr_value, LR_PTR)
    wd = _load_scalar(wd_ptr, wd_value, WD_PTR)
    step_size, inv_sqrt_bc2 = _step_constants(step_ptr, lr, log2_beta1, log2_beta2)
    for gi in tl.static_range(1, NUM_GROUPS):
        in_group = offs >= tl.load(starts_ptr + gi)
        lr_g = tl.load(lr_ptr + gi).to(tl.float32)
        step_size_g, _ = _step_constants(step_ptr, lr_g, log2_beta1, log2_beta2)
        lr = tl.where(in_group, lr_g, lr)
        step_size = tl.where(in_group, step_size_g, step_size)
        if WD_PTR:
            wd = tl.where(in_group, tl.load(wd_ptr + gi).to(tl.float32), wd)
    return lr, wd, step_size, inv_sqrt_bc2


@triton.jit
def _sr_seed(step_ptr, seed_value, STOCHASTIC: tl.constexpr):
    # A new Philox stream per step: deterministic given (seed, step count), read on the device.
    if STOCHASTIC:
        return seed_value + tl.load(step_ptr).to(tl.int64) * SR_STEP_STRIDE
    return seed_value


@triton.jit
def _store_param(ptr, offs, p, mask, seed, STOCHASTIC: tl.constexpr):
    """Store fp32 ``p`` in ``ptr``'s dtype; bf16 stochastically rounded when STOCHASTIC: add 16
    random bits below bf16's mantissa, then truncate, so the value rounds up with probability
    equal to its distance from the lower neighbour (unbiased; sign-magnitude bits make it
    symmetric for negative values)."""
    if STOCHASTIC:
        r = (tl.randint(seed, offs.to(tl.uint32)) & 0xFFFF).to(tl.int32)
        bits = (p.to(tl.int32, bitcast=True) + r) & -65536
        p = bits.to(tl.float32, bitcast=True)
    tl.store(ptr + offs, p.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_kernel(
    master_ptr,
    grad_ptr,
    m_ptr,
    v_ptr,
    shadow_ptr,
    step_ptr,
    found_inf_ptr,
    lr_ptr,
    clip_ptr,
    gscale_ptr,
    wd_ptr,
    starts_ptr,
    n,
    lr_value,
    clip_value,
    gscale_value,
    beta1,
    beta2,
    log2_beta1,
    log2_beta2,
    eps,
    weight_decay,
    seed_value,
    LR_PTR: tl.constexpr,
    CLIP_PTR: tl.constexpr,
    GSCALE_PTR: tl.constexpr,
    WD_PTR: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_SHADOW: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """fp32 or bf16 moments: one program updates BLOCK consecutive elements."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if HAS_FOUND_INF:
        # A set flag masks every load and store: the step is a no-op that moves no data.
        n = tl.where(tl.load(found_inf_ptr) == 0, n, 0)
    mask = offs < n
    gmul = _load_scalar(clip_ptr, clip_value, CLIP_PTR) * _load_scalar(
        gscale_ptr, gscale_value, GSCALE_PTR
    )
    lr, wd, step_size, inv_sqrt_bc2 = _group_hparams(
        offs, step_ptr, lr_ptr, lr_value, wd_ptr, weight_decay, starts_ptr, log2_beta1,
        log2_beta2, LR_PTR, WD_PTR, NUM_GROUPS,
    )  # fmt: skip

    p = tl.load(master_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * gmul
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p, m, v = _adamw_math(p, g, m, v, beta1, beta2, lr, wd, step_size, inv_sqrt_bc2, eps)
    seed = _sr_seed(step_ptr, seed_value, STOCHASTIC)
    _store_param(master_ptr, offs, p, mask, seed, STOCHASTIC)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    if HAS_SHADOW:
        tl.store(shadow_ptr + offs, p.to(shadow_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _half_block_step(
    master_ptr,
    grad_ptr,
    shadow_ptr,
    offs,
    mask,
    m,
    v,
    gmul,
    beta1,
    beta2,
    lr,
    weight_decay,
    step_size,
    inv_sqrt_bc2,
    eps,
    seed,
    HAS_SHADOW: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    p = tl.load(master_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * gmul
    p, m, v = _adamw_math(p, g, m, v, beta1, beta2, lr, weight_decay, step_size, inv_sqrt_bc2, eps)
    _store_param(master_ptr, offs, p, mask, seed, STOCHASTIC)
    if HAS_SHADOW:
        tl.store(shadow_ptr + offs, p.to(shadow_ptr.dtype.element_ty), mask=mask)
    # Elements past n read zeros and stay zero, so they never raise a block's absmax.
    return tl.where(mask, m, 0.0), tl.where(mask, v, 0.0)


@triton.jit
def _adamw_quantized_kernel(
    master_ptr,
    grad_ptr,
    m_code_ptr,
    v_code_ptr,
    m_absmax_ptr,
    v_absmax_ptr,
    shadow_ptr,
    step_ptr,
    found_inf_ptr,
    lr_ptr,
    clip_ptr,
    gscale_ptr,
    wd_ptr,
    starts_ptr,
    n,
    lr_value,
    clip_value,
    gscale_value,
    beta1,
    beta2,
    log2_beta1,
    log2_beta2,
    eps,
    weight_decay,
    seed_value,
    LR_PTR: tl.constexpr,
    CLIP_PTR: tl.constexpr,
    GSCALE_PTR: tl.constexpr,
    WD_PTR: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_SHADOW: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BITS: tl.constexpr,
    QBLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    M_EXP: tl.constexpr,
    M_MAN: tl.constexpr,
    V_EXP: tl.constexpr,
    V_MAN: tl.constexpr,
):
    """8/4-bit moments: one program updates ROWS quantization blocks of QBLOCK elements, each
    handled as a [ROWS, QBLOCK/2] low half and high half (the 4-bit byte layout)."""
    HALF: tl.constexpr = QBLOCK // 2
    M_VMAX: tl.constexpr = 2.0 - 1.0 / (1 << M_MAN)
    V_VMAX: tl.constexpr = 2.0 - 1.0 / (1 << V_MAN)
    M_SIGN: tl.constexpr = 1 << (M_EXP + M_MAN)  # sign bit of a 4-bit exp_avg nibble

    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, HALF)
    lo = rows[:, None] * QBLOCK + cols[None, :]
    hi = lo + HALF
    if HAS_FOUND_INF:
        # A set flag masks every load and store: the step is a no-op that moves no data.
        n = tl.where(tl.load(found_inf_ptr) == 0, n, 0)
    row_ok = rows * QBLOCK < n
    lo_ok = lo < n
    hi_ok = hi < n

    gmul = _load_scalar(clip_ptr, clip_value, CLIP_PTR) * _load_scalar(
        gscale_ptr, gscale_value, GSCALE_PTR
    )
    lr_lo, wd_lo, ss_lo, inv_sqrt_bc2 = _group_hparams(
        lo, step_ptr, lr_ptr, lr_value, wd_ptr, weight_decay, starts_ptr, log2_beta1,
        log2_beta2, LR_PTR, WD_PTR, NUM_GROUPS,
    )  # fmt: skip
    lr_hi, wd_hi, ss_hi, _ = _group_hparams(
        hi, step_ptr, lr_ptr, lr_value, wd_ptr, weight_decay, starts_ptr, log2_beta1,
        log2_beta2, LR_PTR, WD_PTR, NUM_GROUPS,
    )  # fmt: skip

    m_unit = (tl.load(m_absmax_ptr + rows, mask=row_ok, other=0.0) / M_VMAX)[:, None]
    v_unit = (tl.load(v_absmax_ptr + rows, mask=row_ok, other=0.0) / V_VMAX)[:, None]
    if BITS == 8:
        mc_lo = tl.load(m_code_ptr + lo, mask=lo_ok, other=0).to(tl.int32)
        mc_hi = tl.load(m_code_ptr + hi, mask=hi_ok, other=0).to(tl.int32)
        vc_lo = tl.load(v_code_ptr + lo, mask=lo_ok, other=0).to(tl.int32)
        vc_hi = tl.load(v_code_ptr + hi, mask=hi_ok, other=0).to(tl.int32)
        m_lo = _decode_magnitude(tl.abs(mc_lo), M_EXP, M_MAN) * m_unit
        m_hi = _decode_magnitude(tl.abs(mc_hi), M_EXP, M_MAN) * m_unit
        m_lo = tl.where(mc_lo < 0, -m_lo, m_lo)
        m_hi = tl.where(mc_hi < 0, -m_hi, m_hi)
    else:
        byte_idx = rows[:, None] * HALF + cols[None, :]
        byte_ok = row_ok[:, None] & (cols[None, :] >= 0)
        mb = tl.load(m_code_ptr + byte_idx, mask=byte_ok, other=0).to(tl.int32)
        vb = tl.load(v_code_ptr + byte_idx, mask=byte_ok, other=0).to(tl.int32)
        mc_lo = mb & 15
        mc_hi = mb >> 4
        vc_lo = vb & 15
        vc_hi = vb >> 4
        m_lo = _decode_magnitude(mc_lo & (M_SIGN - 1), M_EXP, M_MAN) * m_unit
        m_hi = _decode_magnitude(mc_hi & (M_SIGN - 1), M_EXP, M_MAN) * m_unit
        m_lo = tl.where((mc_lo & M_SIGN) != 0, -m_lo, m_lo)
        m_hi = tl.where((mc_hi & M_SIGN) != 0, -m_hi, m_hi)
    v_lo = _decode_magnitude(vc_lo, V_EXP, V_MAN) * v_unit
    v_hi = _decode_magnitude(vc_hi, V_EXP, V_MAN) * v_unit

    seed = _sr_seed(step_ptr, seed_value, STOCHASTIC)
    m_lo, v_lo = _half_block_step(
        master_ptr, grad_ptr, shadow_ptr, lo, lo_ok, m_lo, v_lo, gmul, beta1, beta2, lr_lo,
        wd_lo, ss_lo, inv_sqrt_bc2, eps, seed, HAS_SHADOW, STOCHASTIC,
    )  # fmt: skip
    m_hi, v_hi = _half_block_step(
        master_ptr, grad_ptr, shadow_ptr, hi, hi_ok, m_hi, v_hi, gmul, beta1, beta2, lr_hi,
        wd_hi, ss_hi, inv_sqrt_bc2, eps, seed, HAS_SHADOW, STOCHASTIC,
    )  # fmt: skip

    m_absmax = tl.maximum(tl.max(tl.abs(m_lo), axis=1), tl.max(tl.abs(m_hi), axis=1))
    v_absmax = tl.maximum(tl.max(v_lo, axis=1), tl.max(v_hi, axis=1))
    tl.store(m_absmax_ptr + rows, m_absmax, mask=row_ok)
    tl.store(v_absmax_ptr + rows, v_absmax, mask=row_ok)
    # An all-zero block has absmax 0: encode it with a zero multiplier (codes 0), no 0/0.
    m_inv = tl.where(m_absmax > 0, M_VMAX / tl.where(m_absmax > 0, m_absmax, 1.0), 0.0)[:, None]
    v_inv = tl.where(v_absmax > 0, V_VMAX / tl.where(v_absmax > 0, v_absmax, 1.0), 0.0)[:, None]
    mq_lo = _encode_magnitude(tl.abs(m_lo) * m_inv, M_EXP, M_MAN, False)
    mq_hi = _encode_magnitude(tl.abs(m_hi) * m_inv, M_EXP, M_MAN, False)
    vq_lo = _encode_magnitude(v_lo * v_inv, V_EXP, V_MAN, True)
    vq_hi = _encode_magnitude(v_hi * v_inv, V_EXP, V_MAN, True)
    if BITS == 8:
        mq_lo = tl.where(m_lo < 0, -mq_lo, mq_lo)
        mq_hi = tl.where(m_hi < 0, -mq_hi, mq_hi)
        tl.store(m_code_ptr + lo, mq_lo.to(tl.int8), mask=lo_ok)
        tl.store(m_code_ptr + hi, mq_hi.to(tl.int8), mask=hi_ok)
        tl.store(v_code_ptr + lo, vq_lo.to(tl.uint8), mask=lo_ok)
        tl.store(v_code_ptr + hi, vq_hi.to(tl.uint8), mask=hi_ok)
    else:
        mq_lo = tl.where((m_lo < 0) & (mq_lo != 0), mq_lo | M_SIGN, mq_lo)
        mq_hi = tl.where((m_hi < 0) & (mq_hi != 0), mq_hi | M_SIGN, mq_hi)
        tl.store(m_code_ptr + byte_idx, (mq_lo | (mq_hi << 4)).to(tl.uint8), mask=byte_ok)
        tl.store(v_code_ptr + byte_idx, (vq_lo | (vq_hi << 4)).to(tl.uint8), mask=byte_ok)


# ----------------------------------------------------------------------------------------------
# Contract
# ----------------------------------------------------------------------------------------------


def state_shapes(
    n: int, state_bits: int, qblock: int | None = None
) -> tuple[int, torch.dtype, torch.dtype, int]:
    """(code elements, exp_avg dtype, exp_avg_sq dtype, scale elements) for ``n`` parameters.

    32 and 16 bits have no scales (0). 8 bits: int8 / uint8 codes, one per element. 4 bits:
    uint8 bytes, two codes each, the last block padded to ``qblock``.
    """
    if state_bits not in STATE_BITS:
        raise KernelInputError(f"{OP}: state_bits must be one of {STATE_BITS}, got {state_bits!r}")
    if state_bits == 32:
        return n, torch.float32, torch.float32, 0
    if state_bits == 16:
        return n, torch.bfloat16, torch.bfloat16, 0
    qblock = qblock or DEFAULT_QBLOCK[state_bits]
    blocks = -(-n // qblock)
    if state_bits == 8:
        return n, torch.int8, torch.uint8, blocks
    return blocks * (qblock // 2), torch.uint8, torch.uint8, blocks


def new_state(
    n: int, state_bits: int, device: torch.device | str, qblock: int | None = None
) -> dict[str, torch.Tensor | None]:
    """Zero-initialized moment buffers (and scales) for ``n`` parameters."""
    codes, m_dtype, v_dtype, scales = state_shapes(n, state_bits, qblock)
    out: dict[str, torch.Tensor | None] = {
        "exp_avg": torch.zeros(codes, dtype=m_dtype, device=device),
        "exp_avg_sq": torch.zeros(codes, dtype=v_dtype, device=device),
        "exp_avg_scale": None,
        "exp_avg_sq_scale": None,
    }
    if scales:
        out["exp_avg_scale"] = torch.zeros(scales, dtype=torch.float32, device=device)
        out["exp_avg_sq_scale"] = torch.zeros(scales, dtype=torch.float32, device=device)
    return out


def _check(
    master, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step, clip_coef,
    grad_scale, found_inf, shadow, state_bits, exp_avg_scale, exp_avg_sq_scale, qblock, block,
    master_dtypes=(torch.float32,), group_starts=None, sr_seed=None,
) -> int:  # fmt: skip
    check_tensor(OP, "master", master, dtypes=(*master_dtypes, torch.bfloat16))
    _check_stochastic(master, shadow, sr_seed)
    if master.dim() != 1:
        raise KernelInputError(
            f"{OP}: master must be a flat 1-D buffer (an arena's), got shape {tuple(master.shape)}"
        )
    n, dev = master.numel(), master.device
    check_tensor(
        OP, "grad", grad, dtypes=(torch.float32, torch.bfloat16, torch.float16), device=dev, numel=n
    )
    codes, m_dtype, v_dtype, scales = state_shapes(n, state_bits, qblock)
    if state_bits == 32 and master.dtype == torch.float64:
        m_dtype = v_dtype = torch.float64  # the float64 reference
    check_tensor(OP, "exp_avg", exp_avg, dtypes=(m_dtype,), device=dev, numel=codes)
    check_tensor(OP, "exp_avg_sq", exp_avg_sq, dtypes=(v_dtype,), device=dev, numel=codes)
    if scales:
        for name, s in (("exp_avg_scale", exp_avg_scale), ("exp_avg_sq_scale", exp_avg_sq_scale)):
            if s is None:
                raise KernelInputError(f"{OP}: state_bits={state_bits} needs {name} (float32)")
            check_tensor(OP, name, s, dtypes=(torch.float32,), device=dev, numel=scales)
        q = qblock or DEFAULT_QBLOCK[state_bits]
        if q < 16 or q & (q - 1):
            raise KernelInputError(f"{OP}: qblock must be a power of two >= 16, got {q}")
    elif exp_avg_scale is not None or exp_avg_sq_scale is not None:
        raise KernelInputError(f"{OP}: state_bits={state_bits} takes no exp_avg scales")
    if shadow is not None:
        check_tensor(
            OP, "shadow", shadow, dtypes=(torch.bfloat16, torch.float16), device=dev, numel=n
        )
    check_flag(OP, "step", step, dev)
    if found_inf is not None:
        check_flag(OP, "found_inf", found_inf, dev)
    _check_groups(lr, weight_decay, group_starts, dev)
    for name, value in (("clip_coef", clip_coef), ("grad_scale", grad_scale)):
        if value is not None:
            check_scalar_tensor(OP, name, value, dev)
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= float(beta) < 1.0:
            raise KernelInputError(f"{OP}: {name} must be in [0, 1), got {beta}")
    if not float(eps) > 0.0:
        raise KernelInputError(f"{OP}: eps must be > 0, got {eps}")
    if not isinstance(weight_decay, torch.Tensor) and not float(weight_decay) >= 0.0:
        raise KernelInputError(f"{OP}: weight_decay must be >= 0, got {weight_decay}")
    if block is not None and (block < 16 or block & (block - 1)):
        raise KernelInputError(f"{OP}: block must be a power of two >= 16, got {block}")
    return n


def _check_stochastic(master, shadow, sr_seed) -> None:
    if master.dtype == torch.bfloat16:
        if isinstance(sr_seed, bool) or not isinstance(sr_seed, int) or sr_seed < 0:
            raise KernelInputError(
                f"{OP}: bf16 master weights are updated with stochastic rounding and need "
                f"sr_seed, an int >= 0 (got {sr_seed!r})"
            )
        if sr_seed >= 2**62:
            raise KernelInputError(f"{OP}: sr_seed must be < 2**62, got {sr_seed}")
        if shadow is not None:
            raise KernelInputError(f"{OP}: bf16 master weights take no shadow")
    elif sr_seed is not None:
        raise KernelInputError(
            f"{OP}: sr_seed is for bf16 master weights (stochastic rounding); master is "
            f"{master.dtype}"
        )


def _check_groups(lr, weight_decay, group_starts, dev) -> None:
    # Per-group values live on the device (read by the kernel, never synced); their ranges are
    # the caller's to keep (FusedAdamW checks them on the host before filling the tensors).
    if group_starts is None:
        check_scalar_tensor(OP, "lr", lr, dev)
        if isinstance(weight_decay, torch.Tensor):
            check_tensor(OP, "weight_decay", weight_decay, dtypes=(torch.float32,), device=dev,
                         numel=1)  # fmt: skip
        return
    check_tensor(OP, "group_starts", group_starts, dtypes=(torch.int64,), device=dev)
    if group_starts.dim() != 1 or group_starts.numel() < 1:
        raise KernelInputError(
            f"{OP}: group_starts must be int64 [groups] (first element 0), got shape "
            f"{tuple(group_starts.shape)}"
        )
    groups = group_starts.numel()
    if not isinstance(lr, torch.Tensor):
        raise KernelInputError(f"{OP}: with group_starts, lr must be a float32 [{groups}] tensor")
    check_tensor(OP, "lr", lr, dtypes=(torch.float32,), device=dev, numel=groups)
    if isinstance(weight_decay, torch.Tensor):
        check_tensor(OP, "weight_decay", weight_decay, dtypes=(torch.float32,), device=dev,
                     numel=groups)  # fmt: skip


def _scalar_arg(value, default: float, dummy: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    if value is None:
        return dummy, float(default), False
    if isinstance(value, torch.Tensor):
        return value, 0.0, True
    return dummy, float(value), False


# ----------------------------------------------------------------------------------------------
# Launcher and reference
# ----------------------------------------------------------------------------------------------


def adamw_step(
    master: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | torch.Tensor = 0.0,
    step: torch.Tensor,
    clip_coef: float | torch.Tensor | None = None,
    grad_scale: float | torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    shadow: torch.Tensor | None = None,
    state_bits: int = 32,
    exp_avg_scale: torch.Tensor | None = None,
    exp_avg_sq_scale: torch.Tensor | None = None,
    qblock: int | None = None,
    block: int | None = None,
    num_warps: int | None = None,
    group_starts: torch.Tensor | None = None,
    sr_seed: int | None = None,
) -> None:
    """One AdamW step over flat buffers, in place (see the module docstring for the math).

    Args:
        master: float32 ``[n]`` master weights (or bfloat16 with ``sr_seed``), in place.
        grad: float32/bfloat16/float16 ``[n]`` gradient (read only).
        exp_avg, exp_avg_sq: moment buffers laid out as ``state_shapes(n, state_bits, qblock)``
            (``new_state`` allocates them).
        lr, clip_coef, grad_scale: floats or float32 ``[1]`` device tensors. The gradient is
            multiplied by ``grad_scale * clip_coef`` (each 1 when None).
        step: float32 ``[1]`` count of steps already taken; incremented on the device unless
            the step is skipped.
        found_inf: optional float32 ``[1]`` flag; nonzero skips the whole step.
        shadow: optional bf16/fp16 ``[n]`` written with the new weights in the same pass.
        exp_avg_scale, exp_avg_sq_scale: float32 per-block absmax, for state_bits 8 and 4.
        qblock: quantization block (default 256 for 8 bits, 128 for 4 bits).
        block, num_warps: elements per program and warps (tuning; defaults chosen per mode).
        group_starts: optional int64 ``[G]`` device tensor, the first element of each parameter
            group (ascending, ``group_starts[0] == 0``, each group a contiguous range). Then
            ``lr`` is a float32 ``[G]`` tensor and ``weight_decay`` a float or a float32 ``[G]``
            tensor: element ``i`` uses the values of the last group starting at or before ``i``.
            Still one launch. ``weight_decay`` may also be a float32 ``[1]`` tensor without groups.
        sr_seed: with a bfloat16 ``master`` (bf16 weights, no fp32 copy), required: the update is
            computed in fp32 and rounded to bf16 stochastically with Philox bits drawn from
            ``(sr_seed + step * SR_STEP_STRIDE, element index)``, so a run is reproducible
            given the seed and each step draws new bits. Not allowed otherwise.

    Raises :class:`KernelInputError` before anything is launched when an operand breaks this
    contract. Never synchronizes with the host.
    """
    n = _check(
        master, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, step=step, clip_coef=clip_coef, grad_scale=grad_scale,
        found_inf=found_inf, shadow=shadow, state_bits=state_bits, exp_avg_scale=exp_avg_scale,
        exp_avg_sq_scale=exp_avg_sq_scale, qblock=qblock, block=block,
        group_starts=group_starts, sr_seed=sr_seed,
    )  # fmt: skip
    if not use_triton(master):
        adamw_step_ref(
            master, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, step=step, clip_coef=clip_coef, grad_scale=grad_scale,
            found_inf=found_inf, shadow=shadow, state_bits=state_bits,
            exp_avg_scale=exp_avg_scale, exp_avg_sq_scale=exp_avg_sq_scale, qblock=qblock,
            group_starts=group_starts, sr_seed=sr_seed,
        )  # fmt: skip
        return
    if n > 0:
        lr_ptr, lr_value, lr_from_ptr = _scalar_arg(lr, 0.0, step)
        clip_ptr, clip_value, clip_from_ptr = _scalar_arg(clip_coef, 1.0, step)
        gscale_ptr, gscale_value, gscale_from_ptr = _scalar_arg(grad_scale, 1.0, step)
        wd_ptr, wd_value, wd_from_ptr = _scalar_arg(weight_decay, 0.0, step)
        common = (
            step,
            found_inf if found_inf is not None else step,
            lr_ptr,
            clip_ptr,
            gscale_ptr,
            wd_ptr,
            group_starts if group_starts is not None else step,
            n,
            lr_value,
            clip_value,
            gscale_value,
            float(beta1),
            float(beta2),
            math.log2(beta1) if beta1 > 0 else -math.inf,
            math.log2(beta2) if beta2 > 0 else -math.inf,
            float(eps),
            wd_value,
            sr_seed or 0,
        )
        flags = {
            "LR_PTR": lr_from_ptr,
            "CLIP_PTR": clip_from_ptr,
            "GSCALE_PTR": gscale_from_ptr,
            "WD_PTR": wd_from_ptr,
            "NUM_GROUPS": 1 if group_starts is None else group_starts.numel(),
            "HAS_FOUND_INF": found_inf is not None,
            "HAS_SHADOW": shadow is not None,
            "STOCHASTIC": master.dtype == torch.bfloat16,
        }
        shadow_arg = shadow if shadow is not None else master
        if state_bits in (32, 16):
            block = block or 1024
            grid = (triton.cdiv(n, block),)
            _adamw_kernel[grid](
                master, grad, exp_avg, exp_avg_sq, shadow_arg, *common, **flags, BLOCK=block,
                num_warps=num_warps or 4,
            )  # fmt: skip
        else:
            q = qblock or DEFAULT_QBLOCK[state_bits]
            rows = max(1, (block or 1024) // q)
            (m_exp, m_man), (v_exp, v_man) = CODE_FORMATS[state_bits]
            grid = (triton.cdiv(triton.cdiv(n, q), rows),)
            _adamw_quantized_kernel[grid](
                master, grad, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale, shadow_arg,
                *common, **flags, BITS=state_bits, QBLOCK=q, ROWS=rows, M_EXP=m_exp,
                M_MAN=m_man, V_EXP=v_exp, V_MAN=v_man, num_warps=num_warps or 4,
            )  # fmt: skip
    _advance_step(step, found_inf)


def _advance_step(step: torch.Tensor, found_inf: torch.Tensor | None) -> None:
    # Queued after the launch on the same stream: every program saw the old count.
    if found_inf is None:
        step.add_(1.0)
    else:
        step.add_((found_inf == 0).to(step.dtype))


def dequantize_moments_ref(
    codes: torch.Tensor,
    scale: torch.Tensor,
    n: int,
    state_bits: int,
    which: str,
    qblock: int | None = None,
) -> torch.Tensor:
    """float32 ``[n]`` values of a quantized moment (``which`` is "exp_avg" or "exp_avg_sq")."""
    q = qblock or DEFAULT_QBLOCK[state_bits]
    fmt = CODE_FORMATS[state_bits][0 if which == "exp_avg" else 1]
    blocks = scale.numel()
    if state_bits == 8:
        c = torch.nn.functional.pad(codes.to(torch.int32), (0, blocks * q - n)).view(blocks, q)
        if which == "exp_avg":
            mag = decode_magnitude_ref(c.abs(), *fmt)
            vals = torch.where(c < 0, -mag, mag)
        else:
            vals = decode_magnitude_ref(c, *fmt)
    else:
        b = codes.to(torch.int32).view(blocks, q // 2)
        c = torch.cat([b & 15, b >> 4], dim=1)
        if which == "exp_avg":
            sign_bit = 1 << (fmt[0] + fmt[1])
            mag = decode_magnitude_ref(c & (sign_bit - 1), *fmt)
            vals = torch.where((c & sign_bit) != 0, -mag, mag)
        else:
            vals = decode_magnitude_ref(c, *fmt)
    vals = vals * (scale.to(torch.float32) / code_vmax(fmt[1]))[:, None]
    return vals.reshape(-1)[:n]


def quantize_moments_ref(
    values: torch.Tensor, state_bits: int, which: str, qblock: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, per-block absmax) of float32 ``[n]`` moment values: the inverse of
    :func:`dequantize_moments_ref` up to rounding."""
    q = qblock or DEFAULT_QBLOCK[state_bits]
    fmt = CODE_FORMATS[state_bits][0 if which == "exp_avg" else 1]
    n = values.numel()
    blocks = -(-n // q)
    x = torch.nn.functional.pad(values.to(torch.float32), (0, blocks * q - n)).view(blocks, q)
    absmax = x.abs().amax(dim=1) if n else torch.zeros(0, device=values.device)
    inv = torch.where(absmax > 0, code_vmax(fmt[1]) / absmax, torch.zeros_like(absmax))[:, None]
    keep_nonzero = which == "exp_avg_sq"
    code = encode_magnitude_ref(x.abs() * inv, *fmt, keep_nonzero)
    if state_bits == 8:
        if which == "exp_avg":
            return torch.where(x < 0, -code, code).to(torch.int8).reshape(-1)[:n], absmax
        return code.to(torch.uint8).reshape(-1)[:n], absmax
    if which == "exp_avg":
        sign_bit = 1 << (fmt[0] + fmt[1])
        code = torch.where((x < 0) & (code != 0), code | sign_bit, code)
    packed = code[:, : q // 2] | (code[:, q // 2 :] << 4)
    return packed.to(torch.uint8).reshape(-1), absmax


def adamw_step_ref(
    master: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | torch.Tensor = 0.0,
    step: torch.Tensor,
    clip_coef: float | torch.Tensor | None = None,
    grad_scale: float | torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    shadow: torch.Tensor | None = None,
    state_bits: int = 32,
    exp_avg_scale: torch.Tensor | None = None,
    exp_avg_sq_scale: torch.Tensor | None = None,
    qblock: int | None = None,
    block: int | None = None,
    num_warps: int | None = None,
    group_starts: torch.Tensor | None = None,
    sr_seed: int | None = None,
) -> None:
    """Plain-torch :func:`adamw_step` (same arguments, same in-place effect, no host sync).

    With state_bits 32 it computes in ``master``'s dtype, so tests can pass float64 buffers for a
    float64 reference. ``block`` and ``num_warps`` are accepted and ignored.
    """
    _check(
        master, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, step=step, clip_coef=clip_coef, grad_scale=grad_scale,
        found_inf=found_inf, shadow=shadow, state_bits=state_bits, exp_avg_scale=exp_avg_scale,
        exp_avg_sq_scale=exp_avg_sq_scale, qblock=qblock, block=None,
        master_dtypes=(torch.float32, torch.float64), group_starts=group_starts, sr_seed=sr_seed,
    )  # fmt: skip
    n = master.numel()
    compute = torch.float32 if master.dtype == torch.bfloat16 else master.dtype

    def as_tensor(value, default: float) -> torch.Tensor:
        if value is None:
            value = default
        if isinstance(value, torch.Tensor):
            return value.to(compute)
        return torch.tensor(value, dtype=compute, device=master.device)

    g = grad.to(compute) * (as_tensor(grad_scale, 1.0) * as_tensor(clip_coef, 1.0))
    if state_bits in (32, 16):
        m, v = exp_avg.to(compute), exp_avg_sq.to(compute)
    else:
        m = dequantize_moments_ref(exp_avg, exp_avg_scale, n, state_bits, "exp_avg", qblock)
        v = dequantize_moments_ref(
            exp_avg_sq, exp_avg_sq_scale, n, state_bits, "exp_avg_sq", qblock
        )

    t = step.to(torch.float64) + 1.0
    bc1 = (1.0 - torch.pow(torch.tensor(float(beta1), dtype=torch.float64), t)).to(compute)
    bc2 = (1.0 - torch.pow(torch.tensor(float(beta2), dtype=torch.float64), t)).to(compute)
    lr_t, wd_t = as_tensor(lr, 0.0), as_tensor(weight_decay, 0.0)
    if group_starts is not None:
        # Each element's group: the last start at or before it (bucketize: no host sync).
        idx = torch.arange(n, device=master.device)
        which = torch.bucketize(idx, group_starts, right=True) - 1
        lr_t = lr_t.reshape(-1)[which]
        wd_t = wd_t.reshape(-1)[which] if wd_t.numel() > 1 else wd_t
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = v.sqrt() / bc2.sqrt() + eps
    p = master.to(compute) * (1.0 - lr_t * wd_t) - (lr_t / bc1) * (m / denom)

    keep = None if found_inf is None else found_inf != 0

    def write(dst: torch.Tensor, new: torch.Tensor) -> None:
        new = new.to(dst.dtype)
        dst.copy_(new if keep is None else torch.where(keep, dst, new))

    if master.dtype == torch.bfloat16:
        # Other random bits than the kernel's Philox stream (same law): a torch generator seeded
        # from (sr_seed, step). Reading the step count syncs: the reference is for tests.
        gen = torch.Generator(device=master.device)
        gen.manual_seed(sr_seed + int(step.item()) * SR_STEP_STRIDE)
        bits = torch.randint(0, 1 << 16, (n,), generator=gen, device=master.device)
        p = stochastic_round_bf16_ref(p, bits.to(torch.int32))
    write(master, p)
    if shadow is not None:
        write(shadow, p)
    if state_bits in (32, 16):
        write(exp_avg, m)
        write(exp_avg_sq, v)
    else:
        m_codes, m_absmax = quantize_moments_ref(m, state_bits, "exp_avg", qblock)
        v_codes, v_absmax = quantize_moments_ref(v, state_bits, "exp_avg_sq", qblock)
        write(exp_avg, m_codes)
        write(exp_avg_sq, v_codes)
        write(exp_avg_scale, m_absmax)
        write(exp_avg_sq_scale, v_absmax)
    _advance_step(step, found_inf)


def stochastic_round_bf16_ref(x: torch.Tensor, random16: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to bfloat16 with the kernel's rule, given int32 ``random16`` in
    ``[0, 2^16)`` per element: add the random bits below bf16's mantissa, then truncate."""
    bits = (x.to(torch.float32).contiguous().view(torch.int32) + random16) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)
