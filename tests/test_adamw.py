"""adamw_step: kernel against adamw_step_ref (float64 for fp32 state), odd sizes, the skip flag,
scalars from device tensors, the shadow write, low-bit codes, bad input."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from hybrid_triton.kernels._alloc import poison_
from hybrid_triton.kernels._checks import KernelInputError
from hybrid_triton.kernels.adamw import (
    CODE_FORMATS,
    adamw_step,
    adamw_step_ref,
    dequantize_moments_ref,
    new_state,
    quantize_moments_ref,
    state_shapes,
)

from tests.helpers import SIZE_IDS, SIZES, assert_close, bf16_ulp, fp16_ulp
from tests.tolerances import tol

HP = {"lr": 3e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.05}


@pytest.fixture
def free_gpu_memory():
    """For the tests past 2^31 elements (8+ GiB each): return cached blocks before and after,
    passed or failed, so the next big test finds the memory free."""
    gc.collect()
    torch.cuda.empty_cache()
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _ulp(dtype: torch.dtype):
    return bf16_ulp if dtype == torch.bfloat16 else fp16_ulp


def _shadow_check(name, shadow, master, on_gpu):
    """The shadow is master rounded to its dtype: bit-exact on the GPU, one ulp in the
    interpreter (its bf16/fp16 rounding differs, triton-lang/triton 4972)."""
    expected = master.to(shadow.dtype)
    if on_gpu:
        assert_close(name, shadow, expected)
    else:
        diff = (shadow.double() - master.double()).abs()
        assert bool((diff <= _ulp(shadow.dtype)(master)).all()), f"{name}: more than one ulp off"
        assert not shadow.isnan().any(), f"{name}: unwritten (NaN) elements"


def _random_moments(n, device):
    # Moments of a run in progress: m signed, v >= m^2-ish, spanning several decades.
    scale = torch.logspace(-4, 0, n, device=device)[torch.randperm(n, device=device)]
    m = torch.randn(n, device=device) * scale * 1e-2
    v = (torch.randn(n, device=device) * scale * 1e-2) ** 2 + m**2
    return m, v


@pytest.mark.parametrize("n", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize(
    ("grad_dtype", "shadow_dtype"),
    [(torch.float32, None), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)],
    ids=["g32", "g16bf-shadowbf16", "g16-shadow16"],
)
def test_fp32_state_matches_float64_reference(n, grad_dtype, shadow_dtype, device, on_gpu):
    master = torch.randn(n, device=device)
    m, v = _random_moments(n, device)
    step = torch.tensor([float(torch.randint(0, 50, ()))], device=device)
    ref = {"master": master.double(), "m": m.double(), "v": v.double(), "step": step.clone()}
    shadow = (
        None if shadow_dtype is None else poison_(torch.empty(n, dtype=shadow_dtype, device=device))
    )
    for _ in range(3):
        grad = torch.randn(n, device=device).to(grad_dtype)
        adamw_step(master, grad, m, v, step=step, shadow=shadow, **HP)
        adamw_step_ref(ref["master"], grad, ref["m"], ref["v"], step=ref["step"], **HP)
    t = tol("adamw", torch.float32)
    assert_close("master", master, ref["master"], **t)
    assert_close("exp_avg", m, ref["m"], **t)
    assert_close("exp_avg_sq", v, ref["v"], **t)
    assert_close("step", step, ref["step"])
    if shadow is not None:
        _shadow_check("shadow", shadow, master, on_gpu)


@pytest.mark.parametrize("n", [1, 127, 4099], ids=["n1", "n127", "n4099"])
def test_bf16_state_matches_reference(n, device):
    master = torch.randn(n, device=device)
    m32, v32 = _random_moments(n, device)
    m, v = m32.to(torch.bfloat16), v32.to(torch.bfloat16)
    step = torch.tensor([3.0], device=device)
    r_master, r_m, r_v, r_step = master.clone(), m.clone(), v.clone(), step.clone()
    grad = torch.randn(n, device=device)
    adamw_step(master, grad, m, v, step=step, state_bits=16, **HP)
    adamw_step_ref(r_master, grad, r_m, r_v, step=r_step, state_bits=16, **HP)
    assert_close("master", master, r_master, **tol("adamw", torch.float32))
    # The moments are rounded to bf16 on store: one bf16 ulp (interpreter rounding, fma).
    for name, a, e in (("exp_avg", m, r_m), ("exp_avg_sq", v, r_v)):
        diff = (a.double() - e.double()).abs()
        assert bool((diff <= bf16_ulp(e)).all()), f"{name}: more than one bf16 ulp off"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [1, 127, 1000, 4099], ids=["n1", "n127", "n1000", "n4099"])
def test_quantized_state_matches_reference(bits, n, device, on_gpu):
    master = torch.randn(n, device=device)
    m0, v0 = _random_moments(n, device)
    m_codes, m_scale = quantize_moments_ref(m0, bits, "exp_avg")
    v_codes, v_scale = quantize_moments_ref(v0, bits, "exp_avg_sq")
    step = torch.tensor([10.0], device=device)
    ours = [master.clone(), m_codes.clone(), v_codes.clone(), m_scale.clone(), v_scale.clone()]
    refs = [master.clone(), m_codes.clone(), v_codes.clone(), m_scale.clone(), v_scale.clone()]
    shadow = poison_(torch.empty(n, dtype=torch.bfloat16, device=device))
    grad = torch.randn(n, device=device) * 1e-2
    r_step = step.clone()
    kw = {"state_bits": bits, **HP}
    adamw_step(
        ours[0],
        grad,
        ours[1],
        ours[2],
        exp_avg_scale=ours[3],
        exp_avg_sq_scale=ours[4],
        step=step,
        shadow=shadow,
        **kw,
    )
    adamw_step_ref(
        refs[0],
        grad,
        refs[1],
        refs[2],
        exp_avg_scale=refs[3],
        exp_avg_sq_scale=refs[4],
        step=r_step,
        **kw,
    )
    assert_close("master", ours[0], refs[0], **tol("adamw", torch.float32))
    assert_close("exp_avg_scale", ours[3], refs[3], **tol("adamw", torch.float32))
    assert_close("exp_avg_sq_scale", ours[4], refs[4], **tol("adamw", torch.float32))
    # Codes are equal except where an fp32 rounding difference (fma) crosses a code boundary.
    for name, a, e in (("exp_avg", ours[1], refs[1]), ("exp_avg_sq", ours[2], refs[2])):
        mismatched = (a != e).sum().item()
        assert mismatched <= max(1, a.numel() // 100), f"{name}: {mismatched} codes differ"
        da = dequantize_moments_ref(a, ours[3 if name == "exp_avg" else 4], n, bits, name)
        de = dequantize_moments_ref(e, refs[3 if name == "exp_avg" else 4], n, bits, name)
        assert_close(name + " (decoded)", da, de, **tol(f"adamw_state{bits}", ours[1].dtype))
    assert_close("step", step, r_step)
    _shadow_check("shadow", shadow, ours[0], on_gpu)


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_keep_relative_precision_and_never_zero_v(bits, device):
    n = 4 * 256
    (m_exp, m_man), (v_exp, v_man) = CODE_FORMATS[bits]
    m = torch.randn(n, device=device) * torch.logspace(-1.5, 0, n, device=device)
    v = torch.logspace(-12, 0, n, device=device)
    mq, ms = quantize_moments_ref(m, bits, "exp_avg")
    vq, vs = quantize_moments_ref(v, bits, "exp_avg_sq")
    m_back = dequantize_moments_ref(mq, ms, n, bits, "exp_avg")
    v_back = dequantize_moments_ref(vq, vs, n, bits, "exp_avg_sq")
    # Within range, rounding to M mantissa bits is off by at most half a step.
    absmax = m.view(-1, 256 if bits == 8 else 128).abs().amax(1, keepdim=True)
    in_range = (m.view(absmax.shape[0], -1).abs() >= absmax * 2.0 ** -(2**m_exp - 2)).view(-1)
    rel = ((m_back - m).abs() / m.abs())[in_range]
    assert rel.max().item() <= 2.0 ** -(m_man + 1) + 1e-6
    assert torch.equal(m_back.sign()[m_back != 0], m.sign()[m_back != 0])
    # v is never rounded to zero (it would turn m / sqrt(v) into m / eps) nor down past range.
    assert bool((v_back > 0).all())
    v_in_range = v >= v.view(-1, 256 if bits == 8 else 128).amax(1).repeat_interleave(
        256 if bits == 8 else 128
    ) * 2.0 ** -(2**v_exp - 2)
    rel_v = ((v_back - v).abs() / v)[v_in_range]
    assert rel_v.max().item() <= 2.0 ** -(v_man + 1) + 1e-6


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_never_rounds_v_to_zero(bits, device):
    # Gradients spanning 12 decades inside each block: g^2 spans 24, past every code's range.
    n = 1024
    grad = torch.randn(n, device=device) * torch.logspace(-12, 0, n, device=device)
    master = torch.zeros(n, device=device)
    st = new_state(n, bits, device)
    adamw_step(
        master,
        grad,
        st["exp_avg"],
        st["exp_avg_sq"],
        step=torch.zeros(1, device=device),
        state_bits=bits,
        exp_avg_scale=st["exp_avg_scale"],
        exp_avg_sq_scale=st["exp_avg_sq_scale"],
        **HP,
    )
    v = dequantize_moments_ref(st["exp_avg_sq"], st["exp_avg_sq_scale"], n, bits, "exp_avg_sq")
    assert bool((v > 0).all()), f"{int((v == 0).sum())} nonzero exp_avg_sq rounded to zero"


@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_found_inf_skips_the_whole_step(bits, device):
    n = 1000
    master = torch.randn(n, device=device)
    st = new_state(n, bits, device)
    # Give the state nonzero contents first, then try a step that must be skipped.
    step = torch.zeros(1, device=device)
    kw = {
        "state_bits": bits,
        "exp_avg_scale": st["exp_avg_scale"],
        "exp_avg_sq_scale": st["exp_avg_sq_scale"],
        **HP,
    }
    adamw_step(
        master, torch.randn(n, device=device), st["exp_avg"], st["exp_avg_sq"], step=step, **kw
    )
    shadow = torch.randn(n, device=device).to(torch.bfloat16)
    before = {k: t.clone() for k, t in st.items() if t is not None}
    before.update(master=master.clone(), shadow=shadow.clone(), step=step.clone())
    grad = torch.randn(n, device=device)
    grad[17] = float("inf")
    flag = torch.ones(1, device=device)
    adamw_step(
        master,
        grad,
        st["exp_avg"],
        st["exp_avg_sq"],
        step=step,
        found_inf=flag,
        shadow=shadow,
        **kw,
    )
    after = {k: t for k, t in st.items() if t is not None}
    after.update(master=master, shadow=shadow, step=step)
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed although found_inf was set"
    flag.zero_()
    grad[17] = 0.0
    adamw_step(
        master,
        grad,
        st["exp_avg"],
        st["exp_avg_sq"],
        step=step,
        found_inf=flag,
        shadow=shadow,
        **kw,
    )
    assert step.item() == 2.0
    assert not torch.equal(master, before["master"])


def test_scalars_from_device_tensors_match_floats(device):
    n = 4099
    grad = torch.randn(n, device=device)
    runs = []
    for as_tensor in (False, True):
        torch.manual_seed(0)
        master = torch.randn(n, device=device)
        m, v = _random_moments(n, device)
        step = torch.tensor([4.0], device=device)

        def s(x, as_tensor=as_tensor):
            return torch.tensor([x], device=device) if as_tensor else x

        adamw_step(
            master,
            grad,
            m,
            v,
            step=step,
            lr=s(2e-3),
            clip_coef=s(0.25),
            grad_scale=s(0.5),
            beta1=0.8,
            beta2=0.95,
            eps=1e-6,
            weight_decay=0.1,
        )
        runs.append((master, m, v))
    for name, a, b in zip(("master", "exp_avg", "exp_avg_sq"), runs[0], runs[1]):
        assert torch.equal(a, b), f"{name}: tensor scalars give other values than floats"
    # and the reference agrees: grad * 0.5 * 0.25 == grad / 8
    torch.manual_seed(0)
    master = torch.randn(n, device=device).double()
    m, v = (t.double() for t in _random_moments(n, device))
    adamw_step_ref(
        master,
        grad / 8,
        m,
        v,
        step=torch.tensor([4.0], device=device),
        lr=2e-3,
        beta1=0.8,
        beta2=0.95,
        eps=1e-6,
        weight_decay=0.1,
    )
    assert_close("master (clip, scale)", runs[0][0], master, **tol("adamw", torch.float32))


def test_zero_size_and_step_counter(device):
    master = torch.empty(0, device=device)
    step = torch.tensor([5.0], device=device)
    adamw_step(master, master.clone(), master.clone(), master.clone(), step=step, lr=1e-3)
    assert step.item() == 6.0


def test_state_shapes_and_bytes():
    n = 1000
    assert state_shapes(n, 32)[:3] == (n, torch.float32, torch.float32)
    assert state_shapes(n, 16)[:3] == (n, torch.bfloat16, torch.bfloat16)
    assert state_shapes(n, 8) == (n, torch.int8, torch.uint8, 4)
    assert state_shapes(n, 4) == (8 * 64, torch.uint8, torch.uint8, 8)
    big = 1 << 20
    for bits, limit in ((8, 2.1), (4, 1.1)):
        st = new_state(big, bits, "meta")
        nbytes = sum(t.numel() * t.element_size() for t in st.values())
        assert nbytes / big <= limit


def _bad_cases():
    # (id, mutation of the keyword arguments). Each must raise before anything changes.
    def f(**over):
        return over

    n = 300
    return [
        ("master-fp16", f(master=torch.zeros(n, dtype=torch.float16))),
        ("master-2d", f(master=torch.zeros(10, 30))),
        ("master-noncontig", f(master=torch.zeros(2 * n)[::2])),
        ("grad-size", f(grad=torch.zeros(n + 1))),
        ("grad-int", f(grad=torch.zeros(n, dtype=torch.int32))),
        ("grad-device", f(grad=torch.zeros(n, device="meta"))),
        ("grad-noncontig", f(grad=torch.zeros(n, 2)[:, 0])),
        ("exp_avg-dtype", f(exp_avg=torch.zeros(n, dtype=torch.bfloat16))),
        ("exp_avg_sq-size", f(exp_avg_sq=torch.zeros(n - 1))),
        ("shadow-fp32", f(shadow=torch.zeros(n))),
        ("shadow-size", f(shadow=torch.zeros(n + 64, dtype=torch.bfloat16))),
        ("step-int", f(step=torch.zeros(1, dtype=torch.int64))),
        ("step-2", f(step=torch.zeros(2))),
        ("found_inf-size", f(found_inf=torch.zeros(3))),
        ("lr-str", f(lr="0.1")),
        ("lr-fp64-tensor", f(lr=torch.zeros(1, dtype=torch.float64))),
        ("clip-device", f(clip_coef=torch.ones(1, device="meta"))),
        ("beta1-one", f(beta1=1.0)),
        ("eps-zero", f(eps=0.0)),
        ("state_bits-3", f(state_bits=3)),
        ("8bit-fp32-moments", f(state_bits=8)),
        (
            "8bit-no-scales",
            f(
                state_bits=8,
                exp_avg=torch.zeros(n, dtype=torch.int8),
                exp_avg_sq=torch.zeros(n, dtype=torch.uint8),
            ),
        ),
        (
            "8bit-scale-size",
            f(
                state_bits=8,
                exp_avg=torch.zeros(n, dtype=torch.int8),
                exp_avg_sq=torch.zeros(n, dtype=torch.uint8),
                exp_avg_scale=torch.zeros(1),
                exp_avg_sq_scale=torch.zeros(2),
            ),
        ),
        ("32bit-with-scales", f(exp_avg_scale=torch.zeros(2), exp_avg_sq_scale=torch.zeros(2))),
        ("block-not-pow2", f(block=1000)),
    ]


@pytest.mark.parametrize(("case", "over"), _bad_cases(), ids=[c for c, _ in _bad_cases()])
def test_bad_input_raises_before_anything_changes(case, over):
    n = 300
    master = torch.randn(n)
    kwargs = {
        "master": master,
        "grad": torch.randn(n),
        "exp_avg": torch.zeros(n),
        "exp_avg_sq": torch.zeros(n),
        "step": torch.zeros(1),
        "lr": 1e-3,
    }
    kwargs.update(over)
    snapshot = {
        k: v.clone()
        for k, v in kwargs.items()
        if isinstance(v, torch.Tensor) and v.device.type != "meta"
    }
    args = [kwargs.pop(k) for k in ("master", "grad", "exp_avg", "exp_avg_sq")]
    with pytest.raises(KernelInputError) as err:
        adamw_step(*args, **kwargs)
    assert "adamw_step" in str(err.value)
    kwargs.update(zip(("master", "grad", "exp_avg", "exp_avg_sq"), args))
    for k, before in snapshot.items():
        assert torch.equal(kwargs[k], before), f"{k} changed although the call was refused"


# ---------------------------------------------------------------------------------------------
# GPU only: past 2^31 elements (int64 indexing) and bit-exact shadows.
# ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("free_gpu_memory")
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [32, 8])
def test_past_2_pow_31_elements(bits):
    n = 2**31 + 4099
    dev = "cuda"
    master = torch.randn(n, device=dev)
    grad = torch.randn(n, device=dev, dtype=torch.bfloat16)
    st = new_state(n, bits, dev)
    shadow = poison_(torch.empty(n, dtype=torch.bfloat16, device=dev))
    step = torch.zeros(1, device=dev)
    # The last elements are checked against the reference run on the same slice (the op is
    # elementwise within a quantization block, and 2^31 is a multiple of the block).
    tail = slice(2**31 - 256, n)
    ref_master = master[tail].clone()
    ref_state = new_state(n - (2**31 - 256), bits, dev)
    adamw_step(
        master,
        grad,
        st["exp_avg"],
        st["exp_avg_sq"],
        step=step,
        shadow=shadow,
        state_bits=bits,
        exp_avg_scale=st["exp_avg_scale"],
        exp_avg_sq_scale=st["exp_avg_sq_scale"],
        **HP,
    )
    adamw_step_ref(
        ref_master,
        grad[tail],
        ref_state["exp_avg"],
        ref_state["exp_avg_sq"],
        step=torch.zeros(1, device=dev),
        state_bits=bits,
        exp_avg_scale=ref_state["exp_avg_scale"],
        exp_avg_sq_scale=ref_state["exp_avg_sq_scale"],
        **HP,
    )
    assert_close("master tail", master[tail], ref_master, **tol("adamw", torch.float32))
    assert_close("shadow tail", shadow[tail], master[tail].to(torch.bfloat16))
    assert not shadow[:: 1 << 20].isnan().any()
    if bits == 32:
        assert_close(
            "exp_avg tail", st["exp_avg"][tail], ref_state["exp_avg"], **tol("adamw", torch.float32)
        )
    assert math.isclose(step.item(), 1.0)
