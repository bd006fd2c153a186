"""Fused dequantize-and-add (kernels/dequantize_add.py): target += alpha * dequant(q), against
its torch reference, on adversarial sizes, every format and target dtype, alpha as a float and
as a device tensor; non-finite blocks stay visible; bad input fails before anything changes."""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import SIZE_IDS, SIZES, assert_close, bf16_ulp
from hybrid_triton.kernels import (
    dequantize_add,
    dequantize_add_ref,
    dequantize_blockwise_ref,
    quantize_blockwise,
)
from hybrid_triton.kernels._checks import KernelInputError
from hybrid_triton.kernels.quantize import FORMATS, QuantizedTensor
from tolerances import tol

FMTS = list(FORMATS)
TARGETS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def free_gpu_memory():
    """For the tests past 2^31 elements (8+ GiB each): return cached blocks before and after,
    passed or failed, so the next big test finds the memory free."""
    gc.collect()
    torch.cuda.empty_cache()
    yield
    gc.collect()
    torch.cuda.empty_cache()


def assert_target_close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The table's tolerance; bf16 on the interpreter (its bf16 rounding differs): 1 ulp."""
    if actual.dtype == torch.bfloat16 and actual.device.type == "cpu":
        diff = (actual.double() - expected.double()).abs()
        bad = diff > bf16_ulp(expected)
        assert not bad.any(), f"{name}: {int(bad.sum())} elements off by more than 1 bf16 ulp"
    else:
        assert_close(name, actual, expected, **tol("dequantize_add", actual.dtype))


@pytest.mark.parametrize("n", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("target_dtype", list(TARGETS), ids=list(TARGETS))
@pytest.mark.parametrize("fmt", FMTS)
def test_matches_reference(device, fmt, target_dtype, n):
    dtype = TARGETS[target_dtype]
    block = 64 if n < 5000 else 256
    q = quantize_blockwise(torch.randn(n, device=device), fmt, block)
    target = torch.randn(n, device=device).to(dtype)
    expected = dequantize_add_ref(target.clone(), q, 0.37)
    assert dequantize_add(target, q, 0.37) is target
    assert_target_close("target", target, expected)


@pytest.mark.parametrize("fmt", FMTS)
def test_alpha_tensor_and_composition(device, fmt):
    """alpha read on the device; the fused op equals target + alpha * dequantize(q)."""
    x = torch.randn(33, 31, device=device)  # 1023 elements, 2-D
    q = quantize_blockwise(x, fmt, 32, stochastic=True, seed=3)
    target = torch.randn(33, 31, device=device)
    alpha = torch.tensor([-0.5], device=device)
    expected = target + alpha * dequantize_blockwise_ref(q)
    dequantize_add(target, q, alpha)
    assert_close("target", target, expected, **tol("dequantize_add", torch.float32))
    alpha.fill_(0.0)  # a later value of the device scalar is what the next call reads
    before = target.clone()
    dequantize_add(target, q, alpha)
    assert torch.equal(target, before)


def test_residual_round_trip(device):
    """A stored residual applied with alpha=1 restores the target to within the int8 bound."""
    n, block = 4099, 128
    base, want = torch.randn(n, device=device), torch.randn(n, device=device)
    residual = want - base
    q = quantize_blockwise(residual, "int8", block)
    dequantize_add(base, q, 1.0)
    absmax = residual.abs()
    absmax = torch.nn.functional.pad(absmax, (0, (-n) % block)).view(-1, block).amax(1)
    bound = (absmax / 127 / 2).repeat_interleave(block)[:n] * (1 + 1e-5) + 1e-6
    assert ((base - want).abs() <= bound).all()


def test_non_finite_block_adds_nan(device):
    n, block = 300, 64
    x = torch.randn(n, device=device)
    x[70] = float("inf")  # block 1
    flag = torch.zeros(1, device=device)
    q = quantize_blockwise(x, "int4", block, found_inf=flag)
    target = torch.zeros(n, device=device)
    dequantize_add(target, q)
    assert flag.item() == 1.0
    assert target[block : 2 * block].isnan().all()
    assert torch.isfinite(target[:block]).all() and torch.isfinite(target[2 * block :]).all()


def test_bad_input_raises_clearly(device):
    q = quantize_blockwise(torch.randn(1000, device=device), "ternary", 64)
    target = torch.zeros(1000, device=device)
    broken = QuantizedTensor(q.data[:-1], q.scales, q.fmt, q.block, q.shape, q.dtype)
    cases = [
        (lambda: dequantize_add(target[:999], q), "target has 999 elements"),
        (lambda: dequantize_add(target.double(), q), "target has dtype float64"),
        (lambda: dequantize_add(target.view(40, 25).t(), q), "contiguous"),
        (lambda: dequantize_add(target, q, alpha="1"), "alpha must be a float"),
        (lambda: dequantize_add(target, q, alpha=torch.ones(2, device=device)), "alpha has 2"),
        (lambda: dequantize_add(target, q, alpha=torch.ones(1, dtype=torch.int32)), "alpha"),
        (lambda: dequantize_add(target, broken), "q.data has 249 elements"),
        (lambda: dequantize_add(target, q.data), "QuantizedTensor"),
    ]
    for call, message in cases:
        with pytest.raises(KernelInputError, match=message):
            call()
        assert not target.any(), f"{message}: target changed"


@pytest.mark.usefixtures("free_gpu_memory")
@pytest.mark.gpu
def test_past_int32_indexing():
    n, block = 2**31 + 4099, 256
    q = quantize_blockwise(torch.randn(n, device="cuda", dtype=torch.bfloat16), "int4", block)
    target = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    dequantize_add(target, q, 2.0)
    tail_start = (n // block - 20) * block
    tail = QuantizedTensor(
        q.data[tail_start // 2 :], q.scales[tail_start // block :], "int4", block,
        (n - tail_start,), torch.bfloat16,
    )  # fmt: skip
    expected = dequantize_add_ref(torch.zeros(n - tail_start, device="cuda").bfloat16(), tail, 2.0)
    assert_target_close("tail", target[tail_start:], expected)
    assert target[:1000].abs().sum() > 0
