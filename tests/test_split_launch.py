"""The body + tail launch of the elementwise and quantization kernels (kernels/_launch.py).

Every kernel must give the same bits split and unsplit (``HYBRID_TRITON_SPLIT_TAIL=0``),
match its torch reference, and write every element: outputs start NaN-poisoned, so an
element that neither launch covers fails. Sizes sit on each side of the split point
(``n < per_program``, multiples, ``k * per_program + 1``, ``+ 17``, primes, ``2^k +- 1``);
the quantization cases use small tiles so a few blocks fall in the tail, some partial.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import assert_close
from hybrid_triton.kernels import (
    cast_scale,
    cast_scale_ref,
    dequantize_add,
    dequantize_add_ref,
    dequantize_blockwise,
    dequantize_blockwise_ref,
    quantize_blockwise,
    quantize_blockwise_ref,
    unscale,
    unscale_ref,
)
from hybrid_triton.kernels._launch import SPLIT_ENV, split_enabled, split_launch, split_point
from tolerances import TOLERANCES

ELEM_BLOCK = 4096  # cast_scale / unscale elements per program
ELEM_SIZES = [17, 4095, 4096, 4097, 2 * 4096 + 17]  # 8209 is prime
Q_BLOCK, Q_TILE = 32, 64  # two quantization blocks per program
Q_SIZES = [5, 63, 64, 65, 64 * 3 + 17, 509]
F32 = torch.float32
FMTS = ["int8", "int8_dynamic", "int4", "ternary"]


def _calls(n: int, per_program: int) -> list[tuple[int, int, int]]:
    seen: list[tuple[int, int, int]] = []
    split_launch(n, per_program, lambda *a: seen.append(a))
    return seen


def test_split_point_and_calls(monkeypatch):
    monkeypatch.delenv(SPLIT_ENV, raising=False)
    assert _calls(0, 64) == []
    assert _calls(5, 64) == [(0, 5, 1)]
    assert _calls(128, 64) == [(0, 128, 2)]  # a multiple: one launch, as before the split
    assert _calls(129, 64) == [(0, 128, 2), (128, 1, 1)]
    assert _calls(64 * 5 + 17, 64) == [(0, 320, 5), (320, 17, 1)]
    assert split_point(1000, 64) == 960
    monkeypatch.setenv(SPLIT_ENV, "0")
    assert _calls(129, 64) == [(0, 129, 3)]
    assert split_point(1000, 64) == 0
    with pytest.raises(ValueError, match="per_program"):
        split_point(10, 0)


@pytest.fixture(params=["split", "unsplit"])
def split_mode(request, monkeypatch):
    monkeypatch.setenv(SPLIT_ENV, "1" if request.param == "split" else "0")
    return request.param


def _spy(monkeypatch, module) -> list[tuple[int, int]]:
    """Record (n, per_program) of every split_launch call the module makes (the package
    re-exports functions under the modules' names, hence import_module at the call site)."""
    seen: list[tuple[int, int]] = []

    def wrapped(n, per_program, launch):
        seen.append((n, per_program))
        return split_launch(n, per_program, launch)

    monkeypatch.setattr(module, "split_launch", wrapped)
    return seen


@pytest.mark.parametrize("n", ELEM_SIZES)
def test_cast_scale_every_element(device, split_mode, monkeypatch, n):
    seen = _spy(monkeypatch, importlib.import_module("hybrid_triton.kernels.cast_scale"))
    x = torch.randn(n, device=device) * 100
    x[-1] = float("inf") if n % 2 else x[-1]  # a non-finite in the tail must still be flagged
    out = torch.full((n,), float("nan"), device=device, dtype=torch.float16)
    flag = torch.zeros(1, device=device)
    cast_scale(x, 3.0, out=out, found_inf=flag)
    ref_flag = torch.zeros(1, device=device)
    ref = cast_scale_ref(x, 3.0, out_dtype=torch.float16, found_inf=ref_flag)
    assert_close("cast_scale out", out, ref, equal_nan=True)
    assert flag.item() == ref_flag.item()
    assert seen == [(n, ELEM_BLOCK)]


@pytest.mark.parametrize("n", ELEM_SIZES)
def test_unscale_every_element(device, split_mode, monkeypatch, n):
    seen = _spy(monkeypatch, importlib.import_module("hybrid_triton.kernels.unscale"))
    g = torch.randn(n, device=device).to(torch.bfloat16)
    out = torch.full((n,), float("nan"), device=device)
    flag = torch.zeros(1, device=device)
    unscale(g, 0.5, out=out, found_inf=flag)
    assert_close("unscale out", out, unscale_ref(g, 0.5))
    assert flag.item() == 0.0
    assert seen == [(n, ELEM_BLOCK)]


def _poisoned_like(q):
    data = torch.full_like(q.data, 0x5A)
    scales = torch.full_like(q.scales, float("nan"))
    return type(q)(data, scales, q.fmt, q.block, q.shape, q.dtype)


@pytest.mark.parametrize("error_feedback", [False, True], ids=["plain", "ef"])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("n", Q_SIZES)
def test_quantize_every_block(device, split_mode, fmt, error_feedback, n):
    x = torch.randn(n, device=device)
    err = 0.01 * torch.randn(n, device=device) if error_feedback else None
    err_ref = err.clone() if error_feedback else None
    ref = quantize_blockwise_ref(x, fmt, Q_BLOCK, error=err_ref)
    out = _poisoned_like(ref)
    got = quantize_blockwise(x, fmt, Q_BLOCK, error=err, out=out, tile=Q_TILE)
    # Ternary's block sums are reduced in another order than the reference's: its scales and
    # the errors they give may differ by the documented tolerance (tests/tolerances.py).
    atol, rtol, _ = TOLERANCES[("quantize_ternary" if fmt == "ternary" else "quantize", F32)]
    assert torch.equal(got.data.cpu(), ref.data.cpu()), f"{fmt} n={n}: packed codes differ"
    assert_close(f"{fmt} scales", got.scales, ref.scales, atol=atol, rtol=rtol)
    if error_feedback:
        scale = float(ref.scales.abs().max())
        assert_close(f"{fmt} error", err, err_ref, atol=atol + rtol * scale, rtol=rtol)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("n", [65, 64 * 3 + 17, 509])
def test_stochastic_quantize_same_bits_split_or_not(device, monkeypatch, fmt, n):
    x = torch.randn(n, device=device)
    results = []
    for mode in ("1", "0"):
        monkeypatch.setenv(SPLIT_ENV, mode)
        err = torch.zeros(n, device=device)
        q = quantize_blockwise(x, fmt, Q_BLOCK, error=err, stochastic=True, seed=7, tile=Q_TILE)
        results.append((q.data.cpu(), q.scales.cpu(), err.cpu()))
    for a, b in zip(*results):
        assert torch.equal(a, b), f"{fmt} n={n}: the tail drew other random numbers"


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("n", [63, 64 * 3 + 1, 64 * 3 + 33])
def test_dequantize_every_element(device, split_mode, fmt, n):
    q = quantize_blockwise(torch.randn(n, device=device), fmt, Q_BLOCK)
    out = torch.full((n,), float("nan"), device=device)
    dequantize_blockwise(q, out=out, tile=Q_TILE)
    assert_close(f"dequantize {fmt}", out, dequantize_blockwise_ref(q, dtype=torch.float32))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("n", [63, 64 * 3 + 17, 257])
def test_dequantize_add_every_element(device, split_mode, fmt, n):
    q = quantize_blockwise(torch.randn(n, device=device), fmt, Q_BLOCK)
    target = torch.randn(n, device=device)
    expected = dequantize_add_ref(target.clone(), q, 0.25)
    dequantize_add(target, q, 0.25, tile=Q_TILE)
    assert_close(f"dequantize_add {fmt}", target, expected)


@pytest.mark.parametrize("n", [65, 64 * 3 + 17, 509])
def test_stochastic_dequantize_add_same_bits_split_or_not(device, monkeypatch, n):
    q = quantize_blockwise(torch.randn(n, device=device), "int8", Q_BLOCK)
    start = (0.02 * torch.randn(n, device=device)).to(torch.bfloat16)
    results = []
    for mode in ("1", "0"):
        monkeypatch.setenv(SPLIT_ENV, mode)
        t = start.clone()
        dequantize_add(t, q, 2e-4, stochastic_rounding=True, seed=11, tile=Q_TILE)
        results.append(t.cpu())
    assert torch.equal(results[0], results[1]), f"n={n}: the tail drew other random bits"
    assert not torch.equal(results[0], start.cpu()), "nothing was added"


def test_env_switch_is_read_per_call(monkeypatch):
    monkeypatch.setenv(SPLIT_ENV, "off")
    assert not split_enabled()
    monkeypatch.setenv(SPLIT_ENV, "1")
    assert split_enabled()


# Large odd sizes on the GPU: the body runs unmasked over ~2*10^8 elements, the tail masked.
BIG_ODD = 2 * 10**8 + 7


@pytest.mark.gpu
def test_gpu_large_odd_elementwise():
    x = torch.randn(BIG_ODD, device="cuda")
    out = torch.full((BIG_ODD,), float("nan"), device="cuda", dtype=torch.bfloat16)
    cast_scale(x, 2.0, out=out)
    assert torch.equal(out, (x * 2.0).to(torch.bfloat16))
    g = out
    res = torch.full((BIG_ODD,), float("nan"), device="cuda")
    unscale(g, 0.5, out=res)
    assert torch.equal(res, g.float() * 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("error_feedback", [False, True], ids=["plain", "ef"])
@pytest.mark.parametrize("fmt", FMTS)
def test_gpu_large_odd_quantize(monkeypatch, fmt, error_feedback):
    """Split against the single masked launch, bit for bit; and against the reference
    (ternary within its tolerance: its block sums are reduced in another order)."""
    n = BIG_ODD if fmt == "int8" else 2**26 + 17
    x = torch.randn(n, device="cuda")
    err0 = 0.01 * torch.randn(n, device="cuda") if error_feedback else None
    runs = []
    for mode in ("0", "1"):
        monkeypatch.setenv(SPLIT_ENV, mode)
        err = err0.clone() if error_feedback else None
        buffers = _poisoned_like(quantize_blockwise(x, fmt))  # right sizes, poisoned
        runs.append((quantize_blockwise(x, fmt, error=err, out=buffers), err))
    (q0, e0), (q1, e1) = runs
    assert torch.equal(q0.data, q1.data) and torch.equal(q0.scales, q1.scales)
    if error_feedback:
        assert torch.equal(e0, e1)
    err_ref = err0.clone() if error_feedback else None
    ref = quantize_blockwise_ref(x, fmt, error=err_ref)
    atol, rtol, _ = TOLERANCES[("quantize_ternary" if fmt == "ternary" else "quantize", F32)]
    assert_close(f"{fmt} scales", q1.scales, ref.scales, atol=atol, rtol=rtol)
    if fmt != "ternary":
        assert torch.equal(q1.data, ref.data)
    out = torch.full((n,), float("nan"), device="cuda")
    dequantize_blockwise(q1, out=out)
    assert torch.equal(out, dequantize_blockwise_ref(q1, dtype=torch.float32))
    target = torch.randn(n, device="cuda")
    expected = dequantize_add_ref(target.clone(), q1, 0.5)
    dequantize_add(target, q1, 0.5)
    assert torch.equal(target, expected)
