"""FusedAdamW against torch.optim.AdamW, low-bit tracking and convergence, state_dict round
trips, master weights with a bf16 model, state bytes, the skip flag, bad input."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
import torch
from torch import nn

from hybrid_triton.arena import ArenaError, FlatArena
from hybrid_triton.optim import FusedAdamW
from tests.helpers import assert_close, bf16_ulp
from tests.tolerances import tol

# One program covers these small models, which keeps the interpreter fast on CPU.
FAST = {"block": 8192}


def make_mlp(device, seed=1, width=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 1)).to(device)


def regression_data(device, n=128):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g)) + 0.1 * x[:, :1] ** 2
    return x.to(device), y.to(device)


def loss_fn(model, x, y):
    dtype = next(model.parameters()).dtype
    return ((model(x.to(dtype)).float() - y) ** 2).mean()


def train(model, opt, x, y, steps, torch_clip=None):
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        if torch_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), torch_clip)
        opt.step()
    with torch.no_grad():
        return loss_fn(model, x, y).item()


@pytest.mark.parametrize("flat_grads", [True, False], ids=["flat-grads", "gathered-grads"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.05], ids=["noclip", "clip"])
def test_matches_torch_adamw_with_scheduler(flat_grads, max_grad_norm, device):
    ours, theirs = make_mlp(device), make_mlp(device)
    opt = FusedAdamW(
        FlatArena.from_module(ours),
        lr=1e-2,
        betas=(0.9, 0.99),
        weight_decay=0.1,
        max_grad_norm=max_grad_norm,
        **FAST,
    )
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    if flat_grads:
        opt.attach_flat_grads()
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (opt, ref)]
    x, y = regression_data(device)
    for _ in range(25):
        for model, o, clip in ((ours, opt, None), (theirs, ref, max_grad_norm)):
            train(model, o, x, y, 1, torch_clip=clip)
        for s in scheds:
            s.step()
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(name, a, b, **tol("adamw", torch.float32))
    assert opt.flat_state["step"].item() == 25


def test_bf16_state_tracks_fp32_state(device):
    x, y = regression_data(device)
    finals = {}
    for bits in (32, 16):
        model = make_mlp(device)
        opt = FusedAdamW(FlatArena.from_module(model), lr=1e-2, state_bits=bits, **FAST)
        train(model, opt, x, y, 25)
        finals[bits] = opt.master.clone()
    # Each bf16 store is off by < 2^-7 relative (2^-8 with round-to-nearest; the interpreter
    # truncates). Through the EMAs that is < 2^-7 / (1 - beta1) ~ 8% in m and < 25 * 2^-7 ~ 20%
    # in v (10% in sqrt v) after 25 steps, so no update is off by more than ~20% of lr: weights
    # stay within 0.2 * lr * steps of the fp32-state run (a broken state moves them ~lr * steps).
    drift = (finals[16] - finals[32]).abs().max().item()
    assert drift <= 0.2 * 25 * 1e-2, f"bf16-state weights drifted by {drift:.3g}"


# Bounds measured on this task (docs/optimizer.md): 8-bit ends within 1% of fp32-state, 4-bit
# about 1.4x (its e3m0 exp_avg keeps only powers of two); the asserted ratios leave headroom.
@pytest.mark.parametrize(("bits", "loss_ratio"), [(8, 1.10), (4, 1.75)])
def test_low_bit_state_converges_like_fp32(bits, loss_ratio, device):
    x, y = regression_data(device)
    initial = loss_fn(make_mlp(device), x, y).item()
    finals = {}
    for b in (32, bits):
        model = make_mlp(device)
        opt = FusedAdamW(
            FlatArena.from_module(model), lr=3e-2, weight_decay=0.0, state_bits=b, **FAST
        )
        opt.attach_flat_grads()
        finals[b] = train(model, opt, x, y, 40)
    assert finals[32] < 0.25 * initial, "the fp32-state baseline did not learn"
    assert finals[bits] <= loss_ratio * finals[32], (
        f"{bits}-bit state: final loss {finals[bits]:.4g} vs fp32-state {finals[32]:.4g}"
    )


@pytest.mark.parametrize("bits", [32, 16, 8, 4])
@pytest.mark.parametrize("master_weights", [False, True], ids=["fp32-params", "bf16-shadows"])
def test_state_dict_round_trip(bits, master_weights, device):
    dtype = torch.bfloat16 if master_weights else torch.float32
    x, y = regression_data(device)
    a = make_mlp(device).to(dtype)
    opt_a = FusedAdamW(FlatArena.from_module(a), lr=5e-3, state_bits=bits, **FAST)
    train(a, opt_a, x, y, 3)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    b = make_mlp(device, seed=99).to(dtype)  # other values: everything must come from `saved`
    b.load_state_dict(saved["model"])
    opt_b = FusedAdamW(FlatArena.from_module(b), lr=1.0, state_bits=bits, **FAST)
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.param_groups[0]["lr"] == 5e-3
    for k, t in opt_a.state_dict()["state"].items():
        assert torch.equal(t, opt_b.state_dict()["state"][k]), k
    train(a, opt_a, x, y, 3)
    train(b, opt_b, x, y, 3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"{name} differs after the round trip"
    assert torch.equal(opt_a.master, opt_b.master)
    opt_b.sync_shadows()
    if master_weights:
        assert torch.equal(opt_b.arena_group.flat, opt_b.master.to(dtype))


def test_load_state_dict_mismatch_raises_and_changes_nothing(device):
    x, y = regression_data(device)
    model = make_mlp(device)
    opt = FusedAdamW(FlatArena.from_module(model), state_bits=32, **FAST)
    train(model, opt, x, y, 2)
    before = copy.deepcopy(opt.state_dict())

    other_bits = make_mlp(device)
    opt8 = FusedAdamW(FlatArena.from_module(other_bits), state_bits=8, **FAST)
    with pytest.raises(ValueError, match="state_bits"):
        opt.load_state_dict(opt8.state_dict())
    wider = make_mlp(device, width=48)
    with pytest.raises(ValueError, match="numel"):
        opt.load_state_dict(FusedAdamW(FlatArena.from_module(wider)).state_dict())
    torch_sd = torch.optim.AdamW(make_mlp(device).parameters()).state_dict()
    with pytest.raises(ValueError, match="not a FusedAdamW state dict"):
        opt.load_state_dict(torch_sd)
    broken = copy.deepcopy(before)
    broken["state"]["exp_avg_sq"] = broken["state"]["exp_avg_sq"][:-1]
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt.load_state_dict(broken)
    after = opt.state_dict()
    for k, t in before["state"].items():
        assert torch.equal(t, after["state"][k]), f"{k} changed by a refused load"


def test_master_weights_with_bf16_model(device, on_gpu):
    x, y = regression_data(device)
    model = make_mlp(device).to(torch.bfloat16)
    reference = make_mlp(device)  # fp32 params that get the same (bf16) gradients
    with torch.no_grad():
        for p, r in zip(model.parameters(), reference.parameters()):
            r.copy_(p.float())
    opt = FusedAdamW(FlatArena.from_module(model), lr=1e-2, weight_decay=0.1, **FAST)
    assert opt.master_weights and opt.master.dtype == torch.float32
    ref = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    opt.attach_flat_grads()
    for _ in range(20):
        opt.zero_grad()
        loss_fn(model, x.to(torch.bfloat16), y).backward()
        for p, r in zip(model.parameters(), reference.parameters()):
            r.grad = p.grad.float()
        opt.step()
        ref.step()
    masters = opt.arena_group.views(opt.master)
    for (name, p), m, r in zip(model.named_parameters(), masters, reference.parameters()):
        # 20 constant-lr steps: the GPU's rounding of sqrt/div differs from torch's by an ulp
        # per step, and where m is a near-cancellation the update's relative error is larger;
        # the H100 showed 1.4e-6 on 2 of 256 elements. 5e-6 is 5e-4 * lr: a wrong master (a
        # missed, doubled or stale step) is off by ~lr = 1e-2.
        assert_close(name + " (master)", m, r, atol=5e-6, rtol=1e-5)
        if on_gpu:
            assert torch.equal(p, m.to(torch.bfloat16)), name
        else:  # the interpreter's bf16 rounding: one ulp (triton-lang/triton 4972)
            diff = (p.double() - m.double()).abs()
            assert bool((diff <= bf16_ulp(m)).all()), f"{name}: shadow off by more than 1 ulp"


@pytest.mark.parametrize(("bits", "limit"), [(32, 8.0), (16, 4.0), (8, 2.1), (4, 1.1)])
def test_state_bytes_per_parameter(bits, limit, device):
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 256)).to(device)
    arena = FlatArena.from_module(model)
    opt = FusedAdamW(arena, state_bits=bits)
    per_param = opt.state_bytes() / arena.param_numel
    assert per_param <= limit, f"{bits}-bit state: {per_param:.4f} B/param"
    assert set(opt.state_tensors()) >= {"exp_avg", "exp_avg_sq"}


def test_nonfinite_gradient_skips_the_step(device):
    x, y = regression_data(device)
    model = make_mlp(device)
    opt = FusedAdamW(FlatArena.from_module(model), lr=1e-2, state_bits=8, **FAST)
    grad = opt.attach_flat_grads()
    train(model, opt, x, y, 2)
    before = {k: t.clone() for k, t in opt.state_dict()["state"].items()}
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    grad[3] = float("nan")
    opt.step()
    for k, t in opt.state_dict()["state"].items():
        assert torch.equal(t, before[k]), f"{k} changed on a non-finite step"
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    # An external flag is honoured as given.
    grad[3] = 0.0
    opt.step(found_inf=torch.ones(1, device=device))
    assert opt.flat_state["step"].item() == 2
    opt.step(found_inf=torch.zeros(1, device=device))
    assert opt.flat_state["step"].item() == 3


def test_external_flat_gradient_and_grad_scale(device):
    x, y = regression_data(device)
    a, b = make_mlp(device), make_mlp(device)
    opt_a = FusedAdamW(FlatArena.from_module(a), lr=1e-2, max_grad_norm=0.1, **FAST)
    arena_b = FlatArena.from_module(b)
    opt_b = FusedAdamW(arena_b, lr=1e-2, max_grad_norm=0.1, **FAST)
    acc = arena_b.group.new_state(torch.float32)
    for _ in range(3):
        train(a, opt_a, x, y, 1)
        b.zero_grad()
        (loss_fn(b, x, y) * 4.0).backward()  # e.g. a scaled loss, unscaled by grad_scale
        acc.zero_()
        for view, p in zip(arena_b.group.views(acc), b.parameters()):
            view.copy_(p.grad)
        opt_b.step(grad=acc, grad_scale=torch.tensor([0.25], device=device))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert_close("params", pb, pa, **tol("adamw", torch.float32))


def test_buffer_from_another_arena_is_refused(device):
    model = make_mlp(device)
    opt = FusedAdamW(FlatArena.from_module(model), **FAST)
    other = FlatArena.from_module(make_mlp(device, width=48))
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ArenaError, match="does not belong to this arena"):
        opt.step(grad=other.group.new_state(torch.float32))
    with pytest.raises(Exception, match="grad"):
        opt.step(grad=torch.zeros(opt.arena_group.numel, dtype=torch.int32, device=device))
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    assert opt.flat_state["step"].item() == 0


def test_construction_errors(device):
    mixed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16)).to(device)
    with pytest.raises(ValueError, match="mix"):
        FusedAdamW(mixed.parameters())
    with pytest.raises(ValueError, match="master_weights"):
        FusedAdamW(make_mlp(device).to(torch.float16).parameters(), master_weights=False)
    with pytest.raises(ValueError, match="master_weights=True needs"):
        FusedAdamW(make_mlp(device).parameters(), master_weights=True)
    with pytest.raises(ValueError, match="state_bits"):
        FusedAdamW(make_mlp(device).parameters(), state_bits=3)
    model = make_mlp(device)
    before = [p.data_ptr() for p in model.parameters()]
    w, b = (
        [p for p in model.parameters() if p.dim() > 1],
        [p for p in model.parameters() if p.dim() == 1],
    )
    with pytest.raises(ValueError, match="betas"):
        FusedAdamW([{"params": w}, {"params": b, "betas": (0.8, 0.9)}])
    with pytest.raises(ValueError, match="more than one group"):
        FusedAdamW([{"params": w}, {"params": w}])
    with pytest.raises(ValueError, match="lr must be finite"):
        FusedAdamW([{"params": w, "lr": float("nan")}])
    # Refused before packing: the parameters are still where they were.
    assert [p.data_ptr() for p in model.parameters()] == before


def test_plain_params_are_packed(device):
    model = make_mlp(device)
    opt = FusedAdamW(model.parameters(), lr=1e-2, **FAST)
    flat = opt.arena_group.flat
    for p in model.parameters():
        assert flat.data_ptr() <= p.data_ptr() < flat.data_ptr() + flat.numel() * 4
    x, y = regression_data(device)
    assert train(model, opt, x, y, 5) < loss_fn(make_mlp(device), x, y).item()


def test_import_does_not_import_triton():
    code = (
        "import sys, torch\nimport hybrid_triton.optim\n"
        "assert 'triton' not in sys.modules\nassert not torch.cuda.is_initialized()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [32, 8])
def test_step_never_syncs_with_the_host(bits):
    model = make_mlp("cuda").to(torch.bfloat16)
    opt = FusedAdamW(FlatArena.from_module(model), max_grad_norm=1.0, state_bits=bits)
    opt.attach_flat_grads()
    x, y = regression_data("cuda")
    loss_fn(model, x.to(torch.bfloat16), y).backward()
    opt.step()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for lr in (1e-3, 2e-3):
            opt.param_groups[0]["lr"] = lr
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.flat_state["step"].item() == 3


def test_attached_flat_grads_detached_by_zero_grad_none_are_not_reused():
    """A framework's ``model.zero_grad()`` (set_to_none) detaches the flat-grad views; the
    next step must use the fresh gradients, not the stale flat buffer."""
    from hybrid_triton import FlatArena
    from hybrid_triton.optim import FusedAdamW

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    opt = FusedAdamW(FlatArena.from_module(model), lr=1e-2, weight_decay=0.0)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.0)
    opt.attach_flat_grads()
    for step in range(3):
        x = torch.randn(8, 4)
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
        opt.step()
        ref.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), f"step {step}: stale gradient"
