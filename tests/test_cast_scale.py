"""cast_scale: fp32 -> bf16/fp16/fp32 times a scale, with the non-finite flag."""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import SIZE_IDS, SIZES, assert_close, bf16_ulp
from hybrid_triton.kernels import cast_scale, cast_scale_ref
from hybrid_triton.kernels._checks import KernelInputError
from tolerances import tol

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


@pytest.fixture
def free_gpu_memory():
    """For the tests past 2^31 elements (8+ GiB each): return cached blocks before and after,
    passed or failed, so the next big test finds the memory free."""
    gc.collect()
    torch.cuda.empty_cache()
    yield
    gc.collect()
    torch.cuda.empty_cache()


def check_cast(name: str, actual: torch.Tensor, expected: torch.Tensor, on_gpu: bool) -> None:
    """Exact, except bf16 through the interpreter: within one bf16 ulp (triton#4972)."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    if expected.dtype == torch.bfloat16 and not on_gpu:
        assert_close(name, actual, expected, atol=0.0, rtol=2.0**-7)
        e = expected.double()
        err = (actual.double() - e).abs()
        finite = torch.isfinite(e)
        assert bool((err[finite] <= bf16_ulp(e[finite])).all()), f"{name}: more than one bf16 ulp"
    else:
        assert_close(name, actual, expected, **tol("cast_scale", expected.dtype))


@pytest.mark.parametrize("n", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_cast_scale_matches_reference(device, on_gpu, n, out_dtype, scale_kind):
    x = torch.randn(n, device=device) * 3.0
    scale = 0.37 if scale_kind == "float" else torch.tensor([1.7], device=device)
    flag = torch.zeros(1, device=device)
    y = cast_scale(x, scale, out_dtype=out_dtype, found_inf=flag)
    expected = cast_scale_ref(x, scale, out_dtype=out_dtype)
    check_cast("y", y, expected, on_gpu)
    assert y.shape == x.shape
    assert flag.item() == 0.0, "finite inputs must leave found_inf at 0"


def test_cast_scale_writes_into_out_and_keeps_shape(device, on_gpu):
    x = torch.randn(3, 5, 7, device=device)
    out = torch.full((3, 5, 7), float("nan"), dtype=torch.float16, device=device)
    res = cast_scale(x, 2.0, out=out)
    assert res is out and res.dtype == torch.float16
    check_cast("out", out, cast_scale_ref(x, 2.0, out_dtype=torch.float16), on_gpu)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [0, 4098, 4999])
def test_non_finite_input_sets_flag(device, out_dtype, bad, where):
    x = torch.randn(5000, device=device)
    x[where] = float(bad)
    flag = torch.zeros(1, device=device)
    cast_scale(x, 1.0, out_dtype=out_dtype, found_inf=flag)
    ref_flag = torch.zeros(1, device=device)
    cast_scale_ref(x, 1.0, out_dtype=out_dtype, found_inf=ref_flag)
    assert flag.item() == 1.0 and ref_flag.item() == 1.0


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_overflow_of_the_output_dtype_sets_flag(device):
    x = torch.tensor([1.0, 70000.0, 2.0], device=device)  # 70000 > fp16 max (65504)
    flag = torch.zeros(1, device=device)
    y = cast_scale(x, 1.0, out_dtype=torch.float16, found_inf=flag)
    assert flag.item() == 1.0 and torch.isinf(y[1]).item()
    flag.zero_()
    cast_scale(x, 1.0, out_dtype=torch.bfloat16, found_inf=flag)
    assert flag.item() == 0.0, "70000 is finite in bf16"


def test_flag_is_only_ever_set(device):
    flag = torch.ones(1, device=device)
    cast_scale(torch.randn(100, device=device), 1.0, found_inf=flag)
    assert flag.item() == 1.0, "a kernel must never clear found_inf (its owner does)"


def test_tensor_scale_is_read_on_device(device):
    x = torch.randn(1000, device=device)
    scale = torch.tensor([2.0], device=device)
    y1 = cast_scale(x, scale, out_dtype=torch.float32)
    scale.fill_(4.0)
    y2 = cast_scale(x, scale, out_dtype=torch.float32)
    assert torch.equal(y2, y1 * 2)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("dtype", "expected one of: float32"),
        ("noncontig", "contiguous"),
        ("out_numel", "elements"),
        ("out_dtype", "out_dtype must be one of"),
        ("flag_dtype", "found_inf"),
        ("flag_device", "found_inf is on meta"),
        ("scale_device", "scale is on meta"),
        ("scale_type", "scale must be a float"),
        ("bad_out_dtype_arg", "out_dtype"),
    ],
)
def test_bad_input_raises_before_launch(device, case, match):
    x = torch.randn(64, 8, device=device)
    out = torch.zeros(64, 8, dtype=torch.bfloat16, device=device)
    flag = torch.zeros(1, device=device)
    kwargs = {"out": out, "found_inf": flag}
    scale = 1.0
    if case == "dtype":
        x = x.half()
    elif case == "noncontig":
        x = x.t()
        kwargs["out"] = None
    elif case == "out_numel":
        kwargs["out"] = torch.zeros(10, dtype=torch.bfloat16, device=device)
    elif case == "out_dtype":
        kwargs["out"] = torch.zeros(64, 8, dtype=torch.int8, device=device)
    elif case == "flag_dtype":
        kwargs["found_inf"] = torch.zeros(1, dtype=torch.float64, device=device)
    elif case == "flag_device":
        kwargs["found_inf"] = torch.zeros(1, device="meta")
    elif case == "scale_device":
        scale = torch.ones(1, device="meta")
    elif case == "scale_type":
        scale = "2"
    elif case == "bad_out_dtype_arg":
        kwargs = {"out_dtype": torch.int32, "found_inf": flag}
    with pytest.raises(KernelInputError, match=match):
        cast_scale(x, scale, **kwargs)
    assert (out == 0).all().item(), "a rejected call must change nothing"
    assert flag.item() == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_bit_exact_big(out_dtype):
    n = 2**24 + 3
    x = torch.randn(n, device="cuda") * 100
    y = cast_scale(x, torch.tensor([0.3], device="cuda"), out_dtype=out_dtype)
    assert torch.equal(
        y, cast_scale_ref(x, torch.tensor([0.3], device="cuda"), out_dtype=out_dtype)
    )


@pytest.mark.usefixtures("free_gpu_memory")
@pytest.mark.gpu
def test_gpu_past_2_pow_31_elements():
    n = 2**31 + 4099
    x = torch.empty(n, device="cuda")
    x.uniform_(-4, 4)
    x[-1] = float("inf")  # only the last program sees it: the flag needs int64 offsets
    flag = torch.zeros(1, device="cuda")
    y = cast_scale(x, 0.5, out_dtype=torch.bfloat16, found_inf=flag)
    assert flag.item() == 1.0
    tail = slice(n - 2**20, n)
    assert torch.equal(y[tail], (x[tail] * 0.5).to(torch.bfloat16))
    head = slice(0, 2**20)
    assert torch.equal(y[head], (x[head] * 0.5).to(torch.bfloat16))
    del x
    torch.cuda.empty_cache()
