"""unscale: fp16/bf16/fp32 gradients times the inverse scale into fp32, with the flag."""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import SIZE_IDS, SIZES, assert_close
from hybrid_triton.kernels import unscale, unscale_ref
from hybrid_triton.kernels._checks import KernelInputError
from tolerances import tol

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["fp16", "bf16", "fp32"]


@pytest.fixture
def free_gpu_memory():
    """For the tests past 2^31 elements (8+ GiB each): return cached blocks before and after,
    passed or failed, so the next big test finds the memory free."""
    gc.collect()
    torch.cuda.empty_cache()
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("n", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("inv_kind", ["float", "tensor"])
def test_unscale_matches_reference(device, n, dtype, inv_kind):
    grad = (torch.randn(n, device=device) * 1024).to(dtype)
    inv = 1.0 / 1024 if inv_kind == "float" else torch.tensor([0.3], device=device)
    flag = torch.zeros(1, device=device)
    out = unscale(grad, inv, found_inf=flag)
    assert out.dtype == torch.float32 and out.shape == grad.shape
    # Exact: the upcast is exact and one fp32 multiply rounds the same way (float64 check).
    expected = unscale_ref(grad, inv)
    assert_close("out", out, expected, **tol("unscale", dtype))
    exact64 = grad.double() * torch.as_tensor(inv, dtype=torch.float32).double().cpu().item()
    assert_close("out vs float64", out, exact64.float(), **tol("unscale", dtype))
    assert flag.item() == 0.0


def test_unscale_in_place_fp32(device):
    grad = torch.randn(3, 4099, device=device)
    expected = unscale_ref(grad.clone(), 0.125)
    res = unscale(grad, 0.125, out=grad)
    assert res is grad
    assert_close("grad", grad, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [0, 4097, 6999])
def test_non_finite_grad_sets_flag(device, dtype, bad, where):
    grad = torch.randn(7000, device=device).to(dtype)
    grad[where] = float(bad)
    flag, ref_flag = torch.zeros(1, device=device), torch.zeros(1, device=device)
    out = unscale(grad, 0.5, found_inf=flag)
    unscale_ref(grad, 0.5, found_inf=ref_flag)
    assert flag.item() == 1.0 and ref_flag.item() == 1.0
    # The other elements are still unscaled (the flag does not stop the pass).
    keep = torch.ones(7000, dtype=torch.bool, device=device)
    keep[where] = False
    assert torch.equal(out[keep], grad[keep].float() * 0.5)


def test_flag_is_only_ever_set(device):
    flag = torch.ones(1, device=device)
    unscale(torch.randn(10, device=device), 1.0, found_inf=flag)
    assert flag.item() == 1.0


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("grad_dtype", "grad has dtype int32"),
        ("noncontig", "contiguous"),
        ("out_dtype", "out has dtype bfloat16"),
        ("out_numel", "expected 512"),
        ("out_shape", "out has shape"),
        ("flag_numel", "found_inf has 2 elements"),
        ("inv_device", "inv_scale is on meta"),
        ("inv_dtype", "inv_scale has dtype float64"),
    ],
)
def test_bad_input_raises_before_launch(device, case, match):
    grad = torch.randn(64, 8, device=device).half()
    out = torch.zeros(64, 8, device=device)
    flag = torch.zeros(1, device=device)
    inv = 0.5
    kwargs = {"out": out, "found_inf": flag}
    if case == "grad_dtype":
        grad = torch.ones(64, 8, dtype=torch.int32, device=device)
    elif case == "noncontig":
        grad = grad.t()
        kwargs["out"] = None
    elif case == "out_dtype":
        kwargs["out"] = torch.zeros(64, 8, dtype=torch.bfloat16, device=device)
    elif case == "out_numel":
        kwargs["out"] = torch.zeros(100, device=device)
    elif case == "out_shape":
        kwargs["out"] = torch.zeros(8, 64, device=device)
    elif case == "flag_numel":
        kwargs["found_inf"] = torch.zeros(2, device=device)
    elif case == "inv_device":
        inv = torch.ones(1, device="meta")
    elif case == "inv_dtype":
        inv = torch.ones(1, dtype=torch.float64, device=device)
    if grad.is_floating_point():
        grad[0, 0] = float("inf")  # would set the flag if the call got as far as the kernel
    with pytest.raises(KernelInputError, match=match):
        unscale(grad, inv, **kwargs)
    assert (out == 0).all().item() and flag.item() == 0.0, "a rejected call must change nothing"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_bit_exact(dtype):
    grad = (torch.randn(2**22 + 5, device="cuda") * 4096).to(dtype)
    inv = torch.tensor([1 / 3], device="cuda")
    assert torch.equal(unscale(grad, inv), unscale_ref(grad, inv))


@pytest.mark.usefixtures("free_gpu_memory")
@pytest.mark.gpu
def test_gpu_past_2_pow_31_elements():
    n = 2**31 + 77
    grad = torch.ones(n, dtype=torch.float16, device="cuda")
    grad[-1] = float("nan")
    flag = torch.zeros(1, device="cuda")
    out = unscale(grad, 0.25, found_inf=flag)
    assert flag.item() == 1.0
    assert out[-1].isnan().item() and out[-2].item() == 0.25 and out[0].item() == 0.25
    assert bool((out[: n - 1] == 0.25).all())
    del grad, out
    torch.cuda.empty_cache()
