"""Stochastic rounding in ``dequantize_add`` (bf16 targets; the trainer's Predict phase updates
its bf16 weights this way while the fp32 master waits in host memory).

Kernel and reference draw different random bits, so they are compared in distribution: every
result is one of the two bf16 neighbours of the fp32 sum that the round-to-nearest reference
computes, exact sums stay exact, the mean over seeds converges to the fp32 sum (unbiased), a
seed reproduces its result, and bad input fails before anything changes.
"""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import SIZE_IDS, SIZES
from hybrid_triton.kernels import dequantize_add, dequantize_add_ref, quantize_blockwise
from hybrid_triton.kernels._checks import KernelInputError
from hybrid_triton.kernels.quantize import QuantizedTensor


def fp32_sum(target: torch.Tensor, q: QuantizedTensor, alpha) -> torch.Tensor:
    """The exact fp32 value each element is rounded from (the reference into an fp32 copy)."""
    return dequantize_add_ref(target.float().clone(), q, alpha)


def neighbours(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above ``s`` in magnitude (fp32 bit patterns:
    truncation of the low 16 bits, and one bf16 ulp further from zero)."""
    bits = s.contiguous().view(torch.int32)
    low = (bits & ~0xFFFF).view(torch.float32)
    high = ((bits & ~0xFFFF) + 0x10000).view(torch.float32)
    return low, high


def assert_one_of_neighbours(name: str, got: torch.Tensor, s: torch.Tensor) -> None:
    low, high = neighbours(s.cpu())
    g = got.cpu().float()
    ok = (g == low) | (g == high) | (torch.isnan(g) & torch.isnan(s.cpu()))
    exact = s.cpu() == low  # representable in bf16: nothing to round
    ok &= ~exact | (g == s.cpu())
    bad = (~ok).nonzero()[:5].flatten().tolist()
    assert ok.all(), (
        f"{name}: {int((~ok).sum())} of {ok.numel()} elements are not a bf16 neighbour of the "
        f"fp32 sum; first {bad}: got {g[bad].tolist()}, sum {s.cpu()[bad].tolist()}"
    )


def small_update_case(n: int, device: str, seed: int = 0):
    """Weights ~0.02 and steps ~1e-4 of them: under round-to-nearest most steps vanish."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    weights = (0.02 * torch.randn(n, generator=g)).to(device, torch.bfloat16)
    q = quantize_blockwise(torch.randn(n, generator=g).to(device), "int8", 64)
    return weights, q, 2e-4


@pytest.mark.parametrize("n", SIZES, ids=SIZE_IDS)
def test_result_is_a_neighbour_of_the_fp32_sum(device, n):
    target, q, alpha = small_update_case(n, device)
    s = fp32_sum(target, q, alpha)
    got = target.clone()
    assert dequantize_add(got, q, alpha, stochastic_rounding=True, seed=11) is got
    assert_one_of_neighbours("kernel", got, s)
    ref = dequantize_add_ref(target.clone(), q, alpha, stochastic_rounding=True, seed=11)
    assert_one_of_neighbours("reference", ref, s)


def test_unbiased_where_round_to_nearest_is_not(device):
    n, trials = 4099, 64
    target, q, alpha = small_update_case(n, device, seed=1)
    s = fp32_sum(target, q, alpha).double().cpu()
    mean = torch.zeros(n, dtype=torch.float64)
    for seed in range(trials):
        got = dequantize_add(target.clone(), q, alpha, stochastic_rounding=True, seed=seed)
        mean += got.double().cpu() / trials
    ulp = (neighbours(s.float())[1] - neighbours(s.float())[0]).double().abs()
    # Per element the rounding error is at most one ulp with variance <= ulp^2 / 4; the
    # average over n elements of (mean - s) / ulp has std <= 1 / (2 sqrt(trials * n)).
    bias = ((mean - s) / ulp).mean().item()
    assert abs(bias) < 6 / (2 * (trials * n) ** 0.5), bias
    nearest = dequantize_add(target.clone(), q, alpha).double().cpu()
    # Round-to-nearest loses most of these steps: its mean error is a good part of an ulp.
    assert ((nearest - s).abs() / ulp).mean() > 10 * ((mean - s).abs() / ulp).mean()


def test_seed_reproduces_and_changes_the_result(device):
    target, q, alpha = small_update_case(1000, device)
    a = dequantize_add(target.clone(), q, alpha, stochastic_rounding=True, seed=5)
    b = dequantize_add(target.clone(), q, alpha, stochastic_rounding=True, seed=5)
    c = dequantize_add(target.clone(), q, alpha, stochastic_rounding=True, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_alpha_tensor_nan_block_and_negative_values(device):
    n, block = 300, 64
    x = torch.randn(n, device=device)
    x[70] = float("inf")  # block 1 scale becomes NaN: its elements must come out NaN
    q = quantize_blockwise(x, "int8", block)
    target = -torch.rand(n, device=device).bfloat16()  # negative values round symmetrically
    alpha = torch.tensor([0.01], device=device)
    s = fp32_sum(target, q, alpha)
    got = dequantize_add(target.clone(), q, alpha, stochastic_rounding=True, seed=2**62 + 3)
    assert got[block : 2 * block].isnan().all()
    assert_one_of_neighbours("kernel", got, s)


def test_bad_input_raises_before_anything_changes(device):
    q = quantize_blockwise(torch.randn(100, device=device), "int8", 64)
    bf16 = torch.zeros(100, device=device, dtype=torch.bfloat16)
    cases = [
        (torch.zeros(100, device=device), {}, "needs a bfloat16 target, got torch.float32"),
        (torch.zeros(100, device=device).half(), {}, "needs a bfloat16 target"),
        (bf16, {"seed": -1}, "seed must be an int"),
        (bf16, {"seed": 2**63}, "seed must be an int"),
        (bf16, {"seed": 1.5}, "seed must be an int"),
    ]
    for target, kwargs, message in cases:
        with pytest.raises(KernelInputError, match=message):
            dequantize_add(target, q, 1.0, stochastic_rounding=True, **kwargs)
        assert not target.any(), f"{message}: target changed"
    with pytest.raises(KernelInputError, match="stochastic_rounding must be True or False"):
        dequantize_add(bf16, q, 1.0, stochastic_rounding=1)


@pytest.mark.gpu
def test_past_int32_indexing_stochastic():
    gc.collect()
    torch.cuda.empty_cache()
    try:
        n, block = 2**31 + 4099, 256
        q = quantize_blockwise(torch.ones(n, device="cuda", dtype=torch.bfloat16), "int8", block)
        target = torch.ones(n, device="cuda", dtype=torch.bfloat16)
        # 1 + 2^-9 lies halfway between bf16 neighbours 1 and 1 + 2^-7 ... a quarter ulp up.
        dequantize_add(target, q, 2.0**-9, stochastic_rounding=True, seed=1)
        tail = target[-100_000:].float()
        assert ((tail == 1.0) | (tail == 1.0 + 2.0**-7)).all()
        frac_up = (tail > 1.0).float().mean().item()
        assert 0.2 < frac_up < 0.3, frac_up  # rounds up with probability 1/4
    finally:
        gc.collect()
        torch.cuda.empty_cache()
