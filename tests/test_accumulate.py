"""accumulate_grads: fp32 accumulation of fp32/bf16/fp16 gradients, unscale, flag, norms."""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import SIZE_IDS, SIZES, assert_close
from hybrid_triton.kernels import accumulate_grads, accumulate_grads_ref
from hybrid_triton.kernels._checks import KernelInputError
from hybrid_triton.kernels._segments import Segments
from tolerances import tol

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@pytest.fixture
def free_gpu_memory():
    """For the tests past 2^31 elements (8+ GiB each): return cached blocks before and after,
    passed or failed, so the next big test finds the memory free."""
    gc.collect()
    torch.cuda.empty_cache()
    yield
    gc.collect()
    torch.cuda.empty_cache()


def run_both(acc0, grad, **kwargs):
    """Ours and the reference on separate copies of every mutable operand."""
    outs = []
    for fn in (accumulate_grads, accumulate_grads_ref):
        kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        acc = acc0.clone()
        fn(acc, grad, **kw)
        outs.append((acc, kw))
    return outs


@pytest.mark.parametrize("n", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("first", [False, True], ids=["add", "first"])
def test_plain_mode_matches_reference(device, n, dtype, first):
    acc0 = torch.randn(n, device=device)
    grad = torch.randn(n, device=device).to(dtype)
    kwargs = {"alpha": 0.25, "first": first, "total_sumsq": torch.zeros(1, device=device)}
    (acc, kw), (acc_ref, kw_ref) = run_both(acc0, grad, **kwargs)
    assert_close("acc", acc, acc_ref, **tol("accumulate", dtype))
    assert_close(
        "total_sumsq", kw["total_sumsq"], kw_ref["total_sumsq"], **tol("sumsq", torch.float32)
    )
    # The float64 truth of the sum of squares (the reference reduces in float64).
    truth = acc_ref.double().square().sum().reshape(1)
    assert_close("total_sumsq vs float64", kw["total_sumsq"], truth, **tol("sumsq", torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scalars", ["floats", "tensors"])
def test_unscale_and_alpha_operands(device, dtype, scalars):
    n = 9001
    acc0 = torch.randn(n, device=device)
    grad = (torch.randn(n, device=device) * 512).to(dtype)
    if scalars == "floats":
        alpha, inv = 1.0 / 3.0, 1.0 / 512
    else:
        alpha, inv = (
            torch.tensor([1.0 / 3.0], device=device),
            torch.tensor([1.0 / 512], device=device),
        )
    (acc, _), (acc_ref, _) = run_both(acc0, grad, alpha=alpha, inv_scale=inv)
    assert_close("acc", acc, acc_ref, **tol("accumulate", dtype))
    # And against float64 arithmetic with the same fp32 scalars.
    a = torch.as_tensor(alpha, dtype=torch.float32).double().cpu().item()
    s = torch.as_tensor(inv, dtype=torch.float32).double().cpu().item()
    truth = acc0.double() + grad.double() * s * a
    assert_close("acc vs float64", acc, truth, atol=1e-6, rtol=1e-6)


def test_first_does_not_read_the_accumulator(device):
    acc = torch.full((5000,), float("nan"), device=device)
    grad = torch.randn(5000, device=device)
    accumulate_grads(acc, grad, alpha=0.5, first=True)
    assert_close("acc", acc, grad * 0.5)


LAYOUTS = {
    # Arena-like: 64-aligned offsets, sizes around the block (4096), empty and tiny segments.
    "arena": ([1, 4096, 4097, 0, 127, 8193, 64, 3], 64),
    # Many tiny unaligned segments.
    "many_tiny": ([int(v) for v in torch.arange(300) % 11], 1),
    "one_segment": ([65537], 64),
    "all_empty": ([0, 0, 0], 64),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("first", [False, True], ids=["add", "first"])
def test_flat_mode_matches_reference(device, layout, dtype, first):
    numels, align = LAYOUTS[layout]
    segs = Segments.from_numels(numels, align=align)
    acc0 = torch.randn(segs.total, device=device)
    grad = torch.randn(segs.total, device=device).to(dtype)
    kwargs = {
        "alpha": 0.5,
        "first": first,
        "inv_scale": torch.tensor([0.25], device=device),
        "segments": segs,
        # Stale values: flat mode overwrites its sums of squares.
        "seg_sumsq": torch.full((len(segs),), 7.0, device=device),
        "total_sumsq": torch.full((1,), 7.0, device=device),
    }
    (acc, kw), (acc_ref, kw_ref) = run_both(acc0, grad, **kwargs)
    assert_close("acc", acc, acc_ref, **tol("accumulate", dtype))
    assert_close("seg_sumsq", kw["seg_sumsq"], kw_ref["seg_sumsq"], **tol("sumsq", torch.float32))
    assert_close(
        "total_sumsq", kw["total_sumsq"], kw_ref["total_sumsq"], **tol("sumsq", torch.float32)
    )
    covered = torch.zeros(segs.total, dtype=torch.bool, device=device)
    for off, k in zip(segs.offsets, segs.numels):
        covered[off : off + k] = True
    assert torch.equal(acc[~covered], acc0[~covered]), "alignment gaps must stay unchanged"
    truth = torch.stack(
        [acc_ref[o : o + k].double().square().sum() for o, k in zip(segs.offsets, segs.numels)]
    )
    assert_close("seg_sumsq vs float64", kw["seg_sumsq"], truth, **tol("sumsq", torch.float32))


def test_per_tensor_mode_adds_into_its_slot(device):
    seg_sumsq = torch.tensor([1.0, 2.0, 3.0], device=device)
    total = torch.tensor([10.0], device=device)
    acc = torch.randn(4097, device=device)
    grad = torch.randn(17, 241, device=device).bfloat16()  # any shape with the same numel
    ref_acc = acc.clone()
    ref_seg, ref_total = seg_sumsq.clone(), total.clone()
    accumulate_grads(acc, grad, alpha=0.5, seg_sumsq=seg_sumsq, total_sumsq=total, segment_index=1)
    accumulate_grads_ref(
        ref_acc, grad, alpha=0.5, seg_sumsq=ref_seg, total_sumsq=ref_total, segment_index=1
    )
    assert_close("acc", acc, ref_acc, **tol("accumulate", torch.bfloat16))
    assert_close("seg_sumsq", seg_sumsq, ref_seg, **tol("sumsq", torch.float32))
    assert_close("total", total, ref_total, **tol("sumsq", torch.float32))
    assert seg_sumsq[0].item() == 1.0 and seg_sumsq[2].item() == 3.0, "other slots untouched"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("mode", ["plain", "flat"])
def test_non_finite_grad_sets_flag(device, dtype, bad, mode):
    segs = Segments.from_numels([100, 5000, 3], align=64)
    grad = torch.randn(segs.total, device=device).to(dtype)
    extra = {"segments": segs} if mode == "flat" else {}
    flag = torch.zeros(1, device=device)
    accumulate_grads(torch.zeros(segs.total, device=device), grad, found_inf=flag, **extra)
    assert flag.item() == 0.0
    grad[segs.offsets[2] + 1] = float(bad)
    accumulate_grads(torch.zeros(segs.total, device=device), grad, found_inf=flag, **extra)
    ref_flag = torch.zeros(1, device=device)
    accumulate_grads_ref(torch.zeros(segs.total, device=device), grad, found_inf=ref_flag, **extra)
    assert flag.item() == 1.0 and ref_flag.item() == 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_n_micro_batches_equal_one_big_batch(device, dtype):
    n, micro = 6007, 4
    grads = [torch.randn(n, device=device).to(dtype) for _ in range(micro)]
    acc = torch.full((n,), float("nan"), device=device)
    total = torch.zeros(1, device=device)
    for i, g in enumerate(grads):
        total.zero_()
        accumulate_grads(acc, g, alpha=1.0 / micro, first=i == 0, total_sumsq=total)
    mean = torch.stack([g.double() for g in grads]).mean(0)
    assert_close("acc vs mean of micro-batches", acc, mean, atol=1e-6, rtol=1e-5)
    assert_close("norm^2", total, mean.square().sum().reshape(1), **tol("sumsq", torch.float32))


def test_dispatch_torch_and_triton_agree(device, monkeypatch):
    segs = Segments.from_numels([5, 4096, 333], align=64)
    acc0 = torch.randn(segs.total, device=device)
    grad = torch.randn(segs.total, device=device).half()
    results = {}
    for impl in ("torch", "triton"):
        monkeypatch.setenv("HYBRID_TRITON_IMPL", impl)
        acc, seg, tot, flag = (
            acc0.clone(),
            torch.empty(3, device=device),
            torch.empty(1, device=device),
            torch.zeros(1, device=device),
        )
        accumulate_grads(
            acc,
            grad,
            alpha=0.5,
            inv_scale=0.5,
            found_inf=flag,
            segments=segs,
            seg_sumsq=seg,
            total_sumsq=tot,
        )
        results[impl] = (acc, seg, tot, flag)
    for name, a, b in zip(
        ["acc", "seg_sumsq", "total", "flag"], results["triton"], results["torch"]
    ):
        assert_close(name, a, b, **tol("sumsq", torch.float32))


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("numel", "grad has 999 elements"),
        ("acc_dtype", "acc has dtype bfloat16"),
        ("grad_dtype", "grad has dtype int8"),
        ("noncontig", "contiguous"),
        ("device", "grad is on meta"),
        ("other_arena", "buffer of another arena"),
        ("seg_sumsq_numel", "seg_sumsq has 3 elements"),
        ("index_range", "out of range"),
        ("both_modes", "not both"),
        ("no_mode", "seg_sumsq needs segments"),
        ("alpha_type", "alpha must be a float"),
        ("flag_dtype", "found_inf has dtype"),
    ],
)
def test_bad_input_changes_nothing(device, case, match):
    segs = Segments.from_numels([300, 700], align=64)
    acc = torch.randn(segs.total, device=device)
    grad = torch.full((segs.total,), float("inf"), device=device)
    flag = torch.zeros(1, device=device)
    seg_sumsq = torch.full((2,), 5.0, device=device)
    kwargs = {"found_inf": flag, "segments": segs, "seg_sumsq": seg_sumsq}
    before = acc.clone()
    if case == "numel":
        grad = grad[:999]
        kwargs.pop("segments"), kwargs.pop("seg_sumsq")
    elif case == "acc_dtype":
        acc = acc.bfloat16()
        before = acc.clone()
    elif case == "grad_dtype":
        grad = torch.ones(segs.total, dtype=torch.int8, device=device)
    elif case == "noncontig":
        grad = torch.randn(segs.total, 2, device=device)[:, 0]
    elif case == "device":
        grad = torch.empty(segs.total, device="meta")
    elif case == "other_arena":
        # Buffers laid out by another arena's segment table.
        other = Segments.from_numels([300, 600], align=64)
        acc, grad = torch.randn(other.total, device=device), torch.randn(other.total, device=device)
        before = acc.clone()
    elif case == "seg_sumsq_numel":
        kwargs["seg_sumsq"] = torch.full((3,), 5.0, device=device)
    elif case == "index_range":
        kwargs.pop("segments")
        kwargs["segment_index"] = 2
    elif case == "both_modes":
        kwargs["segment_index"] = 0
    elif case == "no_mode":
        kwargs.pop("segments")
    elif case == "alpha_type":
        kwargs["alpha"] = "0.5"
    elif case == "flag_dtype":
        kwargs["found_inf"] = torch.zeros(1, dtype=torch.float16, device=device)
    with pytest.raises(KernelInputError, match=match):
        accumulate_grads(acc, grad, **kwargs)
    assert torch.equal(acc, before), "a rejected call must not touch the accumulator"
    assert flag.item() == 0.0 and (seg_sumsq == 5.0).all().item()


def _gpt2_small_numels() -> list[int]:
    d, v, ctx = 768, 50257, 1024
    numels = [v * d, ctx * d]
    for _ in range(12):
        numels += [d, d, d * 3 * d, 3 * d, d * d, d, d, d, d * 4 * d, 4 * d, 4 * d * d, d]
    return [*numels, d, d]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_flat_gpt2_small_bit_exact(dtype):
    numels = _gpt2_small_numels()
    assert len(numels) == 148
    segs = Segments.from_numels(numels, align=64)
    acc0 = torch.randn(segs.total, device="cuda")
    grad = torch.randn(segs.total, device="cuda").to(dtype)
    kwargs = {
        "alpha": 0.25,
        "inv_scale": torch.tensor([2.0**-10], device="cuda"),
        "segments": segs,
        "seg_sumsq": torch.empty(148, device="cuda"),
        "total_sumsq": torch.empty(1, device="cuda"),
        "found_inf": torch.zeros(1, device="cuda"),
    }
    (acc, kw), (acc_ref, kw_ref) = run_both(acc0, grad, **kwargs)
    assert torch.equal(acc, acc_ref), "accumulate is bit-exact on the GPU (no fma contraction)"
    assert_close("seg_sumsq", kw["seg_sumsq"], kw_ref["seg_sumsq"], **tol("sumsq", torch.float32))
    assert kw["found_inf"].item() == 0.0


@pytest.mark.usefixtures("free_gpu_memory")
@pytest.mark.gpu
def test_gpu_past_2_pow_31_elements():
    n = 2**31 + 1031
    acc = torch.ones(n, device="cuda")
    grad = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    grad[-1] = 3.0
    total = torch.zeros(1, device="cuda")
    flag = torch.zeros(1, device="cuda")
    accumulate_grads(acc, grad, alpha=0.5, total_sumsq=total, found_inf=flag)
    assert acc[-1].item() == 2.5 and acc[0].item() == 1.5 and acc[2**31].item() == 1.5
    assert bool((acc[: n - 1] == 1.5).all())
    expected = (n - 1) * 2.25 + 6.25
    assert abs(total.item() - expected) <= 1e-4 * expected
    assert flag.item() == 0.0
    del acc, grad
    torch.cuda.empty_cache()
