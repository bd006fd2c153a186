"""Chunked fused linear + cross-entropy (hybrid_triton.models.fused_loss): loss and both
gradients against ``F.cross_entropy(hidden @ weight.T)`` in float64, on the Triton path (the
interpreter on CPU) and the torch path, odd sizes, ignored targets, both gradient modes, the
tied-weight path in GPT2, memory (no logits-sized tensor), bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from hybrid_triton.kernels._checks import KernelInputError

from hybrid_triton.models.fused_loss import linear_cross_entropy
from hybrid_triton.models.gpt2 import build_gpt2

# (N rows, d, V, chunk): 0 and 1 rows, primes, a chunk that does not divide N, one row per
# chunk (many tiny chunks), one chunk holding everything, V past one row block of the kernel.
CASES = [
    (0, 8, 11, 4),
    (1, 8, 11, 4),
    (7, 5, 13, 3),
    (31, 16, 97, 8),
    (29, 12, 61, 1),
    (40, 8, 37, 1024),
    (9, 4, 4100, 4),
]
IDS = ["n0", "n1", "primes", "n31_c8", "chunk1", "one_chunk", "v4100_two_blocks"]


def _inputs(n, d, v, dtype=torch.float64, ignore=-100):
    hidden = torch.randn(n, d, dtype=dtype) * 2.0
    weight = torch.randn(v, d, dtype=dtype)
    targets = torch.randint(0, v, (n,))
    if n > 2:
        targets[1::3] = ignore  # ignored positions, in most chunks
    return hidden, weight, targets


def _reference(hidden, weight, targets, ignore=-100):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), targets, ignore_index=ignore)
    if targets.numel() and (targets != ignore).any():
        loss.backward()
    return loss.detach(), h.grad, w.grad


def _run(hidden, weight, targets, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.fixture(params=["triton", "torch"])
def impl(request, monkeypatch):
    # "triton": the kernel (through the interpreter on CPU); "torch": the fallback path.
    monkeypatch.setenv("HYBRID_TRITON_IMPL", request.param if request.param == "torch" else "auto")
    return request.param


@pytest.mark.parametrize("grads_in_forward", [True, False], ids=["grads_fwd", "recompute"])
@pytest.mark.parametrize("n, d, v, chunk", CASES, ids=IDS)
def test_matches_cross_entropy_float64(impl, n, d, v, chunk, grads_in_forward):
    hidden, weight, targets = _inputs(n, d, v)
    loss, gh, gw = _run(
        hidden, weight, targets, chunk_tokens=chunk, grads_in_forward=grads_in_forward
    )
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, targets)
    assert loss.dtype == torch.float64
    if n == 0:
        assert torch.isnan(loss) and torch.isnan(ref_loss)
        assert gh.shape == (0, d) and (gw == 0).all()
        return
    assert_close("loss", loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert_close("grad hidden", gh, ref_gh, rtol=1e-10, atol=1e-13)
    assert_close("grad weight", gw, ref_gw, rtol=1e-10, atol=1e-13)


def test_scaled_upstream_gradient_and_custom_ignore_index(impl):
    hidden, weight, targets = _inputs(23, 8, 29, ignore=5)
    targets[targets == 5] = 6  # 5 marks ignored rows only
    targets[::4] = 5
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    (linear_cross_entropy(h, w, targets, ignore_index=5, chunk_tokens=6) * 0.37).backward()
    h2 = hidden.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    (F.cross_entropy(h2 @ w2.t(), targets, ignore_index=5) * 0.37).backward()
    assert_close("grad hidden", h.grad, h2.grad, rtol=1e-10, atol=1e-14)
    assert_close("grad weight", w.grad, w2.grad, rtol=1e-10, atol=1e-14)


def test_every_target_ignored_is_nan_like_cross_entropy(impl):
    hidden, weight, _ = _inputs(6, 4, 9)
    targets = torch.full((6,), -100)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens=4)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(hidden @ weight.t(), targets))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_low_precision_inputs(impl, dtype):
    """fp32 / bf16 inputs: the loss is fp32 and the gradients come back in the input dtype;
    against the float64 reference on the same (rounded) inputs, the error is at most about
    what F.cross_entropy itself makes in that dtype (twice its own error, plus a bf16 ulp of
    slack for the gradient rounding)."""
    hidden, weight, targets = _inputs(37, 16, 101, dtype=dtype)
    loss, gh, gw = _run(hidden, weight, targets, chunk_tokens=8)
    assert loss.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, targets)
    own_loss, own_gh, own_gw = _run_plain(hidden, weight, targets)
    for name, got, own, ref in (
        ("loss", loss, own_loss, ref_loss),
        ("grad hidden", gh, own_gh, ref_gh),
        ("grad weight", gw, own_gw, ref_gw),
    ):
        own_err = (own.double() - ref).abs().max().item()
        slack = torch.finfo(dtype).eps * ref.abs().max().item()
        assert_close(name, got, ref, atol=2 * own_err + slack)


def _run_plain(hidden, weight, targets):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = F.cross_entropy((h @ w.t()).float(), targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def test_autocast_runs_the_matmuls_in_bf16():
    hidden, weight, targets = _inputs(19, 8, 23, dtype=torch.float32)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, targets, chunk_tokens=5)
        ref = F.cross_entropy(h.detach().bfloat16() @ w.detach().bfloat16().t(), targets)
    loss.backward()
    assert loss.dtype == torch.float32
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    # Equal to the cross entropy of the bf16 logits, not of the fp32 ones.
    assert_close("loss", loss, ref.float(), rtol=1e-5)
    fp32_loss = F.cross_entropy(hidden @ weight.t(), targets)
    assert (loss - fp32_loss).abs() > 1e-6, "the matmul must really run in bf16"


def test_no_logits_sized_tensor_is_allocated(impl):
    """Neither forward nor backward allocates anything as large as the [N, V] logits (in
    bytes: the interpreter's host copies are byte tensors); plain cross entropy does (so the
    check can fail)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestAllocation(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel() * t.element_size())
            return out

    n, d, v, chunk = 64, 8, 509, 8  # fp32 logits 130 kB; a chunk, the weight: 16 kB
    hidden, weight, targets = _inputs(n, d, v, dtype=torch.float32)
    largest = {}
    for name in ("fused", "fused_recompute", "plain"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        with LargestAllocation() as mode:
            if name == "plain":
                loss = F.cross_entropy(h @ w.t(), targets)
            else:
                loss = linear_cross_entropy(
                    h, w, targets, chunk_tokens=chunk, grads_in_forward=name == "fused"
                )
            loss.backward()
        largest[name] = mode.largest
    assert largest["fused"] <= 4 * v * d and largest["fused_recompute"] <= 4 * v * d, largest
    assert largest["plain"] >= 4 * n * v, largest


def test_grads_in_forward_skips_the_recompute():
    """Default mode: backward does no matmul (the gradients were made in forward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (
                torch.ops.aten.mm,
                torch.ops.aten.addmm,
                torch.ops.aten.addmm_,
            ):
                self.count += 1
            return func(*args, **(kwargs or {}))

    hidden, weight, targets = _inputs(20, 8, 31, dtype=torch.float32)
    counts = {}
    for mode_name, in_forward in (("forward", True), ("recompute", False)):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        loss = linear_cross_entropy(h, w, targets, chunk_tokens=8, grads_in_forward=in_forward)
        with CountMatmuls() as mode:
            loss.backward()
        counts[mode_name] = mode.count
    assert counts["forward"] == 0, counts
    assert counts["recompute"] == 3 * 3, counts  # 3 chunks: logits, grad hidden, grad weight


def test_only_the_needed_gradients():
    hidden, weight, targets = _inputs(10, 4, 7)
    w = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w, targets, chunk_tokens=3).backward()
    _, _, ref_gw = _reference(hidden, weight, targets)
    assert_close("grad weight (hidden frozen)", w.grad, ref_gw, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.zeros(4, 3), torch.zeros(5, 2), torch.zeros(4, dtype=torch.int64)), "same d"),
        ((torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(3, dtype=torch.int64)), "N = 4"),
        ((torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4, dtype=torch.int32)), "int64"),
        ((torch.zeros(4, 3, dtype=torch.int64), torch.zeros(5, 3), torch.zeros(4)), "dtype"),
        ((torch.zeros(2, 2, 3), torch.zeros(5, 3), torch.zeros(4, dtype=torch.int64)), r"\[N, d\]"),
    ],
    ids=["d_mismatch", "n_mismatch", "targets_int32", "int_hidden", "3d_hidden"],
)
def test_bad_input(args, message):
    with pytest.raises(KernelInputError, match=message):
        linear_cross_entropy(*args)


def test_bad_chunk():
    hidden, weight, targets = _inputs(4, 3, 5)
    with pytest.raises(KernelInputError, match="chunk_tokens must be an int >= 1"):
        linear_cross_entropy(hidden, weight, targets, chunk_tokens=0)


# ----------------------------------------------------------------------------- in GPT2

SMALL = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=61)


@pytest.mark.parametrize("chunk", [1, 5, 1024], ids=["c1", "c5_prime", "one_chunk"])
def test_gpt2_fused_loss_equals_plain_loss_and_grads(chunk):
    """GPT2 with ``fused_loss``: the loss and every parameter gradient, the tied embedding's
    included (embedding lookup + output projection parts summed), equal the plain path's."""
    torch.manual_seed(3)
    model = build_gpt2("gpt2-tiny", **SMALL, loss_chunk_tokens=chunk).double()
    idx = torch.randint(0, 61, (3, 11))
    targets = torch.randint(0, 61, (3, 11))
    targets[0, :4] = -1
    results = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        model.fused_loss = fused
        logits, loss = model(idx, targets)
        assert (logits is None) == fused, "the fused path returns no logits"
        loss.backward()
        results[fused] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert_close("loss", results[True][0], results[False][0], rtol=1e-12)
    for name, g in results[False][1].items():
        assert_close(f"grad {name}", results[True][1][name], g, rtol=1e-9, atol=1e-13)
    wte = results[True][1]["transformer.wte.weight"]
    assert (wte.abs().sum(dim=1) > 0).all(), "every row of the tied weight gets a gradient"


@pytest.mark.gpu
def test_gpt2_small_fused_loss_on_gpu_bf16():
    """bf16 GPT-2 small, 8 x 1024 on the GPU: the fused loss equals the plain one (both from
    bf16 logits) and the step's peak is lower by at least twice the bf16 logits."""
    torch.manual_seed(0)
    model = build_gpt2("gpt2-small", device="cuda").to(torch.bfloat16)
    b, t, vocab = 8, 1024, model.config.vocab_size
    idx = torch.randint(0, 50257, (b, t), device="cuda")
    targets = torch.randint(0, 50257, (b, t), device="cuda")
    peaks, losses, grads = {}, {}, {}
    for fused in (False, True):
        model.fused_loss = fused
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        logits, loss = model(idx, targets)
        loss.backward()
        torch.cuda.synchronize()
        peaks[fused] = torch.cuda.max_memory_allocated() - start
        if fused:
            losses[fused] = loss.detach().double()
        else:  # the plain bf16 loss is rounded to bf16: score its logits in fp32 instead
            with torch.no_grad():
                flat = logits.float().view(-1, vocab)
                losses[fused] = F.cross_entropy(flat, targets.view(-1)).double()
            del flat
        del logits
        grads[fused] = model.transformer.wte.weight.grad.double()
    # cuBLAS may round a chunk's bf16 logits differently from the whole product's (another
    # kernel): one ulp moves a token's loss by at most about 4e-3, the mean far less.
    assert_close("fused loss", losses[True], losses[False], rtol=1e-4)
    rel = (grads[True] - grads[False]).norm() / grads[False].norm()
    assert rel < 2e-2, f"tied-weight gradient relative error {rel:.3e}"
    assert peaks[False] - peaks[True] >= 2 * b * t * vocab * 2, peaks


# ----------------------------------------------------------------------------- the planner


def _toolkit_setup(**changes):
    from hybrid_triton.planner.setup import setup_preset

    base = dict(micro_batch=8, seq_len=1024, trainer=False, phases=("full",))
    return setup_preset("hybrid", **{**base, **changes})


def test_planner_fused_loss_removes_the_logits():
    """The fused loss removes the vocabulary-sized tensors: at least 2x the bf16 [N, V]
    logits, and what remains of logits_and_loss is about one chunk plus the [V, d] buffers."""
    from hybrid_triton.planner.estimate import estimate
    from hybrid_triton.planner.specs import gpt2_spec

    spec = gpt2_spec("gpt2-small", 12, 768, 12)
    plain = estimate(spec, _toolkit_setup()).phases["full"]
    fused = estimate(spec, _toolkit_setup(fused_loss=True)).phases["full"]
    n, v, d = 8 * 1024, spec.vocab_size, spec.d_model
    assert plain.peak_bytes - fused.peak_bytes >= 2 * n * v * 2
    assert fused.peak_at == "forward: fused cross-entropy", fused.peak_at
    chunk_and_buffers = 1024 * v * 2 + v * d * (4 + 2) + n * d * 2
    assert fused.components["logits_and_loss"] <= 1.05 * chunk_and_buffers
    bigger = estimate(spec, _toolkit_setup(fused_loss=True, loss_chunk_tokens=4096))
    extra = bigger.phases["full"].peak_bytes - fused.peak_bytes
    assert extra == pytest.approx(3 * 1024 * v * 2, rel=0.01), "a 4x chunk adds 3 chunks"


def test_planner_checkpoint_blocks():
    """K checkpointed blocks: K = n_layer is every block (as None), K = 0 as none; each block
    checkpointed lowers the peak by about one block's saved activations."""
    from hybrid_triton.planner.estimate import estimate
    from hybrid_triton.planner.specs import gpt2_spec

    spec = gpt2_spec("gpt2-small", 12, 768, 12)

    def peak(**kw):
        return estimate(spec, _toolkit_setup(fused_loss=True, **kw)).peak_bytes

    every = peak(checkpointing=True)
    assert peak(checkpointing=True, checkpoint_blocks=12) == every
    assert peak(checkpointing=True, checkpoint_blocks=0) == peak(checkpointing=False)
    peaks = [peak(checkpointing=True, checkpoint_blocks=k) for k in range(13)]
    assert all(a > b for a, b in itertools.pairwise(peaks[:-1])), peaks
    steps = [a - b for a, b in itertools.pairwise(peaks[:-1])]
    assert max(steps) - min(steps) <= 0.02 * max(steps), steps


def test_planner_setup_rejects_bad_fields():
    from hybrid_triton.planner.specs import PlannerError

    with pytest.raises(PlannerError, match="checkpoint_blocks must be None or an int >= 0"):
        _toolkit_setup(checkpoint_blocks=-2)
    with pytest.raises(PlannerError, match="fused_loss needs loss_chunk_tokens > 0"):
        _toolkit_setup(fused_loss=True, loss_chunk_tokens=0)
