"""Blockwise quantization (kernels/quantize.py): the kernel against its torch reference,
documented per-block error bounds, SNR floors, error feedback over T steps, stochastic
rounding, bit-exact packing round trips, non-finite input and bad input."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from helpers import SIZE_IDS, SIZES, assert_close, bf16_ulp
from hybrid_triton.kernels import (
    dequantize_blockwise,
    dequantize_blockwise_ref,
    quantize_blockwise,
    quantize_blockwise_ref,
)
from hybrid_triton.kernels._checks import KernelInputError
from hybrid_triton.kernels.quantize import (
    FORMATS,
    QuantizedTensor,
    _pack_ref,
    _unpack_ref,
    num_blocks,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import QUANT_SNR_FLOOR_DB, TOLERANCES

FMTS = list(FORMATS)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def free_gpu_memory():
    """For the tests past 2^31 elements (8+ GiB each): return cached blocks before and after,
    passed or failed, so the next big test finds the memory free."""
    gc.collect()
    torch.cuda.empty_cache()
    yield
    gc.collect()
    torch.cuda.empty_cache()


def codes_of(q: QuantizedTensor) -> torch.Tensor:
    """int32 codes in element order (reference unpacking), padding removed."""
    return _unpack_ref(q)[: q.numel].cpu()


def blocks64(t: torch.Tensor, block: int) -> torch.Tensor:
    """float64 [n_blocks, block] copy of a flat tensor, zero padded."""
    flat = t.detach().reshape(-1).to("cpu", torch.float64)
    pad = num_blocks(flat.numel(), block) * block - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block)


def error_bound(fmt: str, v: torch.Tensor, q: QuantizedTensor, stochastic: bool) -> torch.Tensor:
    """The documented per-element bound on |dequant(q) - v| (float64 [n]); see docs."""
    block, n = q.block, q.numel
    vb = blocks64(v, block)
    mag = vb.abs()
    absmax = mag.amax(dim=1, keepdim=True)
    levels = FORMATS[fmt].levels
    if fmt in ("int8", "int4"):
        step = absmax / levels
        bound = step if stochastic else step / 2
    elif fmt == "int8_dynamic":
        t = 127.0 * (mag / absmax.clamp_min(1e-300)).pow(1.0 / 3.0)
        gap = (3 * t * t + 3 * t + 1) / 127.0**3 * absmax
        bound = gap if stochastic else gap / 2
    elif stochastic:  # ternary, TernGrad
        bound = absmax.expand_as(mag)
    else:  # ternary: nearest of {-s, 0, s} with s >= absmax / 2
        s = q.scales.to("cpu", torch.float64)[:, None]
        assert (s >= absmax / 2 - 2.0**-149).all() and (s <= absmax).all()
        bound = torch.maximum(s / 2, absmax - s)
    # fp32 rounding of the scale arithmetic, and the subnormal floor.
    slack = 4e-7 * absmax + 2.0**-149 * 128
    return (bound + slack).expand_as(mag).reshape(-1)[:n]


def snr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    x64, y64 = x.double(), y.double()
    return 10 * math.log10(float((x64 * x64).sum() / ((y64 - x64) ** 2).sum()))


def assert_same_quantization(name: str, q: QuantizedTensor, qr: QuantizedTensor) -> torch.Tensor:
    """Codes and scales of the kernel against the reference; returns the elementwise code
    agreement mask (all True except rare ternary flips at the threshold)."""
    assert q.fmt == qr.fmt and q.block == qr.block and q.shape == qr.shape
    c, cr = codes_of(q), codes_of(qr)
    same = c == cr
    if q.fmt == "ternary":
        atol, rtol, _ = TOLERANCES[("quantize_ternary", torch.float32)]
        assert_close(f"{name} scales", q.scales, qr.scales, atol=atol, rtol=rtol, equal_nan=True)
        assert (~same).sum() <= 1e-3 * same.numel(), (
            f"{name}: {int((~same).sum())} ternary codes flip"
        )
    else:
        assert_close(f"{name} scales", q.scales, qr.scales, equal_nan=True)
        assert torch.equal(q.data.cpu(), qr.data.cpu()), (
            f"{name}: bytes differ at {(q.data.cpu() != qr.data.cpu()).nonzero()[:5].tolist()}"
        )
    return same


# ---------------------------------------------------------------------------------------------
# Kernel against reference, every format, adversarial sizes, with error feedback and the flag.

CONFIGS = [("fp32", 32), ("fp32", 256), ("bf16", 256), ("fp16", 4096)]


@pytest.mark.parametrize("n", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype_name,block", CONFIGS, ids=[f"{d}-b{b}" for d, b in CONFIGS])
@pytest.mark.parametrize("fmt", FMTS)
def test_matches_reference(device, fmt, dtype_name, block, n):
    dtype = DTYPES[dtype_name]
    x = (torch.randn(n, device=device) * 3).to(dtype)
    error = torch.randn(n, device=device) * 0.05
    error_ref = error.clone()
    flag = torch.zeros(1, device=device)
    flag_ref = torch.zeros(1, device=device)

    q = quantize_blockwise(x, fmt, block, error=error, found_inf=flag)
    qr = quantize_blockwise_ref(x, fmt, block, error=error_ref, found_inf=flag_ref)

    assert q.data.dtype == FORMATS[fmt].storage and q.shape == (n,) and q.dtype == dtype
    same = assert_same_quantization(fmt, q, qr)
    assert flag.item() == 0.0 and flag_ref.item() == 0.0
    if fmt == "ternary":
        _, rtol, _ = TOLERANCES[("quantize_ternary", torch.float32)]
        scale = q.scales.abs().max().item() if q.scales.numel() else 0.0
        assert_close("error", error[same], error_ref[same], atol=rtol * scale)
    else:
        assert_close("error", error, error_ref, **_exact())

    # Dequantization of the kernel's codes: kernel against reference, bit-exact.
    for out_dtype in (None, torch.float32):
        d = dequantize_blockwise(q, dtype=out_dtype)
        dr = dequantize_blockwise_ref(q, dtype=out_dtype)
        assert d.dtype == (out_dtype or dtype)
        assert_cast_close("dequantized", d, dr)


def assert_cast_close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact, except bf16 on the interpreter (its bf16 rounding differs): one bf16 ulp."""
    if actual.dtype == torch.bfloat16 and actual.device.type == "cpu":
        diff = (actual.double() - expected.double()).abs()
        bad = diff > bf16_ulp(expected)
        assert not bad.any(), f"{name}: {int(bad.sum())} elements off by more than 1 bf16 ulp"
    else:
        assert_close(name, actual, expected, **_exact())


def _exact() -> dict[str, float]:
    atol, rtol, _ = TOLERANCES[("quantize", torch.float32)]
    return {"atol": atol, "rtol": rtol}


@pytest.mark.parametrize("fmt", FMTS)
def test_shape_and_out_buffers(device, fmt):
    x = torch.randn(37, 29, device=device)  # 1073 elements, 2-D, prime sides
    q = quantize_blockwise(x, fmt, 64)
    out = quantize_blockwise(torch.zeros_like(x), fmt, 64)
    q2 = quantize_blockwise(x, fmt, 64, out=out)
    assert (
        q2.data.data_ptr() == out.data.data_ptr() and q2.scales.data_ptr() == out.scales.data_ptr()
    )
    assert torch.equal(q2.data, q.data) and torch.equal(q2.scales, q.scales)
    d = dequantize_blockwise(q)
    assert d.shape == x.shape
    buf = torch.full((x.numel(),), float("nan"), device=device, dtype=torch.bfloat16)
    assert dequantize_blockwise(q, out=buf) is buf
    assert_cast_close("out=", buf, dequantize_blockwise_ref(q).reshape(-1).bfloat16())


# ---------------------------------------------------------------------------------------------
# Documented per-element bounds, fresh random and adversarial inputs.


def make_input(kind: str, n: int, block: int, device: str) -> torch.Tensor:
    if kind == "random":
        # Per-block magnitudes spread over 12 decades.
        spread = 10.0 ** (torch.rand(num_blocks(n, block), device=device) * 12 - 6)
        return torch.randn(n, device=device) * spread.repeat_interleave(block)[:n]
    if kind == "zeros":
        return torch.zeros(n, device=device)
    if kind == "outlier":  # one huge value per block
        x = torch.randn(n, device=device)
        x[::block] = 3e37
        return x
    if kind == "subnormal":  # every value below the smallest normal fp32
        return torch.randn(n, device=device) * 1e-40
    if kind == "near_tiny":  # around the normal/subnormal boundary
        return torch.randn(n, device=device) * torch.finfo(torch.float32).tiny
    if kind == "constant":
        return torch.full((n,), -2.5, device=device)
    raise ValueError(kind)


KINDS = ["random", "zeros", "outlier", "subnormal", "near_tiny", "constant"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("fmt", FMTS)
def test_error_within_documented_bound(device, fmt, stochastic, kind):
    n, block = 4099, 64
    x = make_input(kind, n, block, device)
    q = quantize_blockwise(x, fmt, block, stochastic=stochastic, seed=7)
    d = dequantize_blockwise(q).to("cpu", torch.float64)
    err = (d - x.to("cpu", torch.float64)).abs()
    bound = error_bound(fmt, x, q, stochastic)
    bad = err > bound
    assert not bad.any(), (
        f"{fmt} {kind}: {int(bad.sum())} over the bound; first {bad.nonzero()[:3].tolist()}"
        f" err {err[bad][:3].tolist()} bound {bound[bad][:3].tolist()}"
    )
    if kind == "zeros":
        assert not q.data.any() and not q.scales.any() and not d.any()
    assert torch.isfinite(q.scales).all()


@pytest.mark.parametrize(
    "fmt,kind,stochastic",
    list(QUANT_SNR_FLOOR_DB),
    ids=[f"{f}-{k}-{s}" for f, k, s in QUANT_SNR_FLOOR_DB],
)
def test_snr_floor(device, fmt, kind, stochastic):
    n = 1 << 16
    x = torch.randn(n, device=device)
    if kind == "adam_v":
        x = torch.exp(2 * x)
    q = quantize_blockwise(x, fmt, 256, stochastic=stochastic, seed=1)
    snr = snr_db(x.cpu(), dequantize_blockwise(q).cpu())
    floor, reason = QUANT_SNR_FLOOR_DB[(fmt, kind, stochastic)]
    assert snr >= floor, f"{fmt} on {kind}: SNR {snr:.2f} dB < floor {floor} dB ({reason})"


# ---------------------------------------------------------------------------------------------
# Non-finite input is reported, not packed.


@pytest.mark.parametrize("fmt", FMTS)
def test_non_finite_is_flagged_not_packed(device, fmt):
    n, block = 1000, 64  # 16 blocks, the last one short
    x = torch.randn(n, device=device)
    x[2 * block + 5] = float("inf")
    x[5 * block] = float("-inf")
    x[n - 1] = float("nan")  # in the short last block
    error = torch.randn(n, device=device) * 0.01
    error[9 * block + 3] = float("nan")  # a bad error buffer is caught too
    error_before = error.clone()
    bad_blocks = [2, 5, 9, num_blocks(n, block) - 1]
    flag = torch.zeros(1, device=device)

    q = quantize_blockwise(x, fmt, block, error=error, found_inf=flag)
    assert flag.item() == 1.0
    scales = q.scales.cpu()
    good = torch.ones(scales.numel(), dtype=torch.bool)
    good[bad_blocks] = False
    assert scales[~good].isnan().all() and torch.isfinite(scales[good]).all()
    codes = codes_of(q).view(-1)
    padded = torch.nn.functional.pad(codes, (0, num_blocks(n, block) * block - n)).view(-1, block)
    assert not padded[~good].any(), "codes of a non-finite block must be 0"
    eb, eb0 = blocks64(error, block), blocks64(error_before, block)
    assert torch.equal(eb[~good].nan_to_num(7.0), eb0[~good].nan_to_num(7.0)), "error changed"
    d = blocks64(dequantize_blockwise(q), block)
    assert d[~good][:, :1].isnan().all() and torch.isfinite(d[good]).all()

    # Same blocks as the reference, and the flag is only ever set, never cleared.
    flag_ref = torch.zeros(1, device=device)
    qr = quantize_blockwise_ref(x, fmt, block, error=error_before.clone(), found_inf=flag_ref)
    assert flag_ref.item() == 1.0
    assert_same_quantization("non-finite", q, qr)
    quantize_blockwise(torch.randn(n, device=device), fmt, block, found_inf=flag)
    assert flag.item() == 1.0


# ---------------------------------------------------------------------------------------------
# Error feedback: the sum of dequantized outputs tracks the sum of inputs within one quantum.


def one_quantum(fmt: str, q: QuantizedTensor) -> torch.Tensor:
    """One code step of the last quantization at each element (float64 [n]): absmax / levels
    for the linear codes, the top gap for the cubic code, the scale for ternary."""
    s = q.scales.to("cpu", torch.float64)
    if fmt == "int8_dynamic":
        step = s * (127.0**3 - 126.0**3) / 127.0**3
    else:
        step = s / FORMATS[fmt].levels
    return step.repeat_interleave(q.block)[: q.numel]


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("fmt", FMTS)
def test_error_feedback_tracks_sum(device, fmt, stochastic):
    n, block, steps = 1000, 64, 24
    base = torch.randn(n, device=device)
    error = torch.zeros(n, device=device)
    sum_x = torch.zeros(n, dtype=torch.float64)
    sum_ef = torch.zeros(n, dtype=torch.float64)
    sum_plain = torch.zeros(n, dtype=torch.float64)
    for t in range(steps):
        x = base + 0.01 * torch.randn(n, device=device)  # a slowly varying signal
        q = quantize_blockwise(x, fmt, block, error=error, stochastic=stochastic, seed=t)
        qp = quantize_blockwise(x, fmt, block, stochastic=stochastic, seed=t)
        sum_x += x.to("cpu", torch.float64)
        sum_ef += dequantize_blockwise(q).to("cpu", torch.float64)
        sum_plain += dequantize_blockwise(qp).to("cpu", torch.float64)
    drift = (sum_ef - sum_x).abs()
    quantum = one_quantum(fmt, q)
    # The identity sum(dequant) = sum(x) - e_T, checked against the buffer the kernel keeps.
    assert_close("sum identity", sum_ef - sum_x, -error.to("cpu", torch.float64), atol=1e-4)
    assert (drift <= quantum * (1 + 1e-5)).all(), (
        f"{fmt}: EF drift {(drift / quantum).max():.3f} quanta after {steps} steps"
    )
    # Without feedback the same inputs drift by many quanta (so the check above can fail).
    assert ((sum_plain - sum_x).abs() / quantum).max() > 2.0


# ---------------------------------------------------------------------------------------------
# Stochastic rounding: unbiased in the mean, reproducible by seed.


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("fmt", FMTS)
def test_stochastic_rounding_unbiased(device, fmt, impl):
    quantize = quantize_blockwise if impl == "kernel" else quantize_blockwise_ref
    n, block, value = 1 << 14, 256, 0.3
    x = torch.full((n,), value, device=device)
    x[::block] = 1.0  # fixes every block's absmax at 1
    q = quantize(x, fmt, block, stochastic=True, seed=11)
    d = dequantize_blockwise_ref(q).cpu().view(-1, block)[:, 1:].double()
    # Each element's std is at most half its local code gap (at most 1/2 for ternary).
    gap = {"int8": 1 / 127, "int4": 1 / 7, "ternary": 1.0}.get(fmt, 3 * 0.67**2 / 127 + 2e-4)
    tol = 5 * (gap / 2) / math.sqrt(d.numel())
    assert abs(d.mean().item() - value) < tol, f"{fmt}: mean {d.mean().item()} vs {value}"


@pytest.mark.parametrize("fmt", FMTS)
def test_stochastic_rounding_reproducible(device, fmt):
    x = torch.randn(4099, device=device)
    a = quantize_blockwise(x, fmt, 64, stochastic=True, seed=5)
    b = quantize_blockwise(x, fmt, 64, stochastic=True, seed=5)
    c = quantize_blockwise(x, fmt, 64, stochastic=True, seed=6)
    assert torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)
    assert not torch.equal(a.data, c.data)


# ---------------------------------------------------------------------------------------------
# Packing round trips, bit-exact: codes -> bytes -> kernel dequantize -> kernel quantize -> bytes.


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fmt=st.sampled_from(FMTS),
    n=st.integers(1, 3000),
    block=st.sampled_from([32, 64, 256]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_round_trip_bit_exact(device, fmt, n, block, seed):
    f = FORMATS[fmt]
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-f.levels, f.levels + 1, (n,), generator=gen, dtype=torch.int32)
    codes[::block] = f.levels  # every block holds its top code, so requantizing keeps the scale
    data = _pack_ref(codes, f, n).to(device)
    scale = 1.0 if fmt == "ternary" else float(f.levels)
    scales = torch.full((num_blocks(n, block),), scale, device=device)
    q = QuantizedTensor(data, scales, fmt, block, (n,), torch.float32)
    assert torch.equal(codes_of(q), codes)  # reference unpack inverts reference pack
    values = dequantize_blockwise(q)
    assert_close("values", values, dequantize_blockwise_ref(q), **_exact())
    if fmt != "int8_dynamic":
        assert_close("values", values.cpu(), codes.float() * (scale / f.levels), rtol=1e-6)
    q2 = quantize_blockwise(values, fmt, block)
    assert torch.equal(q2.data.cpu(), data.cpu()), "bytes changed in the round trip"
    assert_close("scales", q2.scales, scales, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input fails before anything is launched or changed.


def test_bad_input_raises_clearly(device):
    x = torch.randn(1000, device=device)
    error = torch.zeros(1000, device=device)
    flag = torch.zeros(1, device=device)
    q = quantize_blockwise(x, "int4", 64)
    cases = [
        (lambda: quantize_blockwise(x.int(), "int8", error=error), "dtype int32"),
        (lambda: quantize_blockwise(x.double(), "int8", error=error), "dtype float64"),
        (lambda: quantize_blockwise(x, "int2", error=error), "fmt='int2'"),
        (lambda: quantize_blockwise(x, "int8", 100, error=error), "power of two"),
        (lambda: quantize_blockwise(x, "int8", 16, error=error), "power of two"),
        (lambda: quantize_blockwise(x, "int8", 8192, error=error), "power of two"),
        (lambda: quantize_blockwise(x, "int8", True, error=error), "power of two"),
        (lambda: quantize_blockwise(x, error=error.half()), "error has dtype"),
        (lambda: quantize_blockwise(x, error=error[:999]), "error has 999 elements"),
        (lambda: quantize_blockwise(x, error=error, found_inf=torch.zeros(2)), "found_inf"),
        (lambda: quantize_blockwise(x.view(10, 100).t(), error=error), "contiguous"),
        (lambda: quantize_blockwise(x, error=error, seed=-1), "seed"),
        (lambda: quantize_blockwise(x, "int8", 64, error=error, out=q), "out is fmt='int4'"),
        (lambda: dequantize_blockwise(q.data), "QuantizedTensor"),
        (lambda: dequantize_blockwise(_replace(q, scales=q.scales[:-1])), "q.scales has 15"),
        (lambda: dequantize_blockwise(_replace(q, data=q.data[:-1])), "q.data has 499"),
        (
            lambda: dequantize_blockwise(_replace(q, data=q.data.view(torch.int8))),
            "q.data has dtype",
        ),
        (lambda: dequantize_blockwise(_replace(q, block=96)), "block=96"),
        (lambda: dequantize_blockwise(_replace(q, shape=(1001,))), "q.data has 500"),
        (lambda: dequantize_blockwise(q, out=torch.empty(999, device=device)), "out has 999"),
        (lambda: dequantize_blockwise(q, dtype=torch.int32), "dtype"),
    ]
    for call, message in cases:
        with pytest.raises(KernelInputError, match=_escape(message)):
            call()
        assert not error.any() and flag.item() == 0.0, f"{message}: an operand changed"


def _replace(q: QuantizedTensor, **changes) -> QuantizedTensor:
    fields = {k: getattr(q, k) for k in ("data", "scales", "fmt", "block", "shape", "dtype")}
    return QuantizedTensor(**{**fields, **changes})


def _escape(message: str) -> str:
    import re

    return re.escape(message)


# ---------------------------------------------------------------------------------------------
# GPU only: past 2^31 elements, where 32-bit indexing would wrap.


@pytest.mark.gpu
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("fmt", FMTS)
def test_matches_reference_large(fmt, stochastic):
    """Rare rounding differences (an approximate division flips about one code in 2^24)
    only show at large sizes: 2^26 + 3 elements, bit-exact against the reference."""
    n = 2**26 + 3
    x = torch.randn(n, device="cuda") * 10.0 ** torch.randint(-3, 4, (n,), device="cuda")
    error = torch.randn(n, device="cuda") * 1e-3
    error_ref = error.clone()
    q = quantize_blockwise(x, fmt, 256, error=error, stochastic=stochastic, seed=3)
    if stochastic:  # the reference draws another stream: check the bound instead
        bound = error_bound(fmt, x + error_ref, q, stochastic=True)
        err = (dequantize_blockwise(q).double() - (x + error_ref).double()).abs().cpu()
        assert (err <= bound).all()
        return
    qr = quantize_blockwise_ref(x, fmt, 256, error=error_ref)
    same = assert_same_quantization("large", q, qr)
    if fmt != "ternary":
        assert same.all()
        assert_close("error", error, error_ref, **_exact())


@pytest.mark.usefixtures("free_gpu_memory")
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4", "ternary"])
def test_past_int32_indexing(fmt):
    block = 256
    n = 2**31 + 4099
    x = torch.randn(n, device="cuda", dtype=torch.float16)
    error = torch.zeros(n, device="cuda")
    error[-10_000:].normal_(0, 0.01)
    tail_start = (n // block - 20) * block
    error_tail = error[tail_start:].clone()
    q = quantize_blockwise(x, fmt, block, error=error)
    qr = quantize_blockwise_ref(x[tail_start:], fmt, block, error=error_tail)
    per_byte = FORMATS[fmt].per_byte
    tail = QuantizedTensor(
        q.data[tail_start // per_byte :], q.scales[tail_start // block :], fmt, block,
        (n - tail_start,), x.dtype,
    )  # fmt: skip
    assert_same_quantization("tail", tail, qr)
    if fmt != "ternary":
        assert_close("error tail", error[tail_start:], error_tail, **_exact())
    d = dequantize_blockwise(q)
    assert_close("dequantized tail", d[tail_start:], dequantize_blockwise_ref(tail), **_exact())
