"""bf16 parameters without a master copy: the AdamW kernel rounds each update to bf16
stochastically. Checked against the fp32 result of the same math (every element lands on one
of its two bf16 neighbours, unbiased on average), for reproducibility given the seed, the mean
update over many steps smaller than half a bf16 ulp (round-to-nearest would never move), and
FusedAdamW(bf16_params, master_weights=False, state_bits=8) training a model."""

from __future__ import annotations

import pytest
import torch
from hybrid_triton.kernels.adamw import (
    adamw_step,
    adamw_step_ref,
    new_state,
    stochastic_round_bf16_ref,
)
from torch import nn

from hybrid_triton.optim import FusedAdamW


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above fp32 ``x`` (equal when x is a bf16 value)."""
    bits = x.contiguous().view(torch.int32)
    down = (bits & -65536).view(torch.float32)
    up = ((bits & -65536) + 65536).view(torch.float32)
    exact = (bits & 0xFFFF) == 0
    lo = torch.where(x >= 0, down, up)  # sign-magnitude: truncation moves towards zero
    hi = torch.where(x >= 0, up, down)
    return lo, torch.where(exact, lo, hi)


def _run(fn, master0, grad, bits, steps, seed, **kw):
    n, device = master0.numel(), master0.device
    master, st, step = master0.clone(), new_state(n, bits, device), torch.zeros(1, device=device)
    for _ in range(steps):
        fn(master, grad, st["exp_avg"], st["exp_avg_sq"], step=step, state_bits=bits,
           exp_avg_scale=st["exp_avg_scale"], exp_avg_sq_scale=st["exp_avg_sq_scale"],
           sr_seed=seed, **kw)  # fmt: skip
    return master


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("fn", [adamw_step, adamw_step_ref], ids=["kernel", "reference"])
def test_one_step_lands_on_a_bf16_neighbour_unbiased(fn, bits, device):
    n = 4099  # prime, not a multiple of any block
    torch.manual_seed(0)
    master0 = torch.randn(n, device=device).bfloat16()
    grad = torch.randn(n, device=device)
    kw = {"lr": 3e-3, "weight_decay": 0.1}
    got = _run(fn, master0, grad, bits, 1, seed=7, **kw).float()
    want = master0.float()
    st, step = new_state(n, bits, device), torch.zeros(1, device=device)
    adamw_step_ref(want, grad, st["exp_avg"], st["exp_avg_sq"], step=step, state_bits=bits,
                   exp_avg_scale=st["exp_avg_scale"], exp_avg_sq_scale=st["exp_avg_sq_scale"],
                   **kw)  # fmt: skip
    lo, hi = _bf16_neighbours(want)
    on_neighbour = (got == lo) | (got == hi)
    assert on_neighbour.all(), f"{(~on_neighbour).sum()} elements off their bf16 neighbours"
    # Unbiased: E[got - want] = 0; the error of each element is at most one ulp (hi - lo).
    err, ulp = (got - want).double(), (hi - lo).double()
    assert abs(err.mean()) < 4 * ulp.pow(2).mean().sqrt() / n**0.5
    # Not round-to-nearest: a good share of elements is rounded away from the nearest value.
    nearest = want.bfloat16().float()
    assert 0.2 < (got != nearest).float().mean() < 0.5


@pytest.mark.parametrize("fn", [adamw_step, adamw_step_ref], ids=["kernel", "reference"])
def test_reproducible_given_the_seed(fn, device):
    torch.manual_seed(1)
    master0 = torch.randn(1000, device=device).bfloat16()
    grad = torch.randn(1000, device=device)
    a, b, c = (_run(fn, master0, grad, 8, 3, seed=s, lr=1e-2) for s in (5, 5, 6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("fn", [adamw_step, adamw_step_ref], ids=["kernel", "reference"])
def test_updates_below_half_an_ulp_move_the_mean(fn, device):
    n, steps, lr = 4096, 30, 1e-3  # one step moves 1e-3; half a bf16 ulp at 1.0 is 3.9e-3
    master0 = torch.ones(n, device=device, dtype=torch.bfloat16)
    grad = torch.ones(n, device=device)
    got = _run(fn, master0, grad, 32, steps, seed=3, lr=lr).double()
    # float64 reference of the same math (no rounding at all).
    p = torch.ones(1, dtype=torch.float64)
    st, step = new_state(1, 32, "cpu"), torch.zeros(1)
    m, v = st["exp_avg"].double(), st["exp_avg_sq"].double()
    for _ in range(steps):
        adamw_step_ref(p, torch.ones(1, dtype=torch.float32), m, v, lr=lr, step=step)
    assert abs(got.mean().item() - p.item()) < 1e-3, (got.mean().item(), p.item())
    assert p.item() < 0.98  # it moved: round-to-nearest would have left every weight at 1.0


def test_rounding_rule_of_the_reference():
    x = torch.tensor([1.0 + 2**-9, -(1.0 + 2**-9), 3.0])
    r = torch.tensor([0, 0xFFFF, 123], dtype=torch.int32)
    got = stochastic_round_bf16_ref(x, r).float()
    assert got.tolist() == [1.0, -(1.0 + 2**-7), 3.0]


def _train_bf16(device, master_weights, steps=10):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 33), nn.Tanh(), nn.Linear(33, 1)).to(device).bfloat16()
    kw = {"sr_seed": 11} if not master_weights else {}
    opt = FusedAdamW(model.parameters(), lr=2e-2, master_weights=master_weights, state_bits=8,
                     block=8192, **kw)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    x = torch.randn(128, 8, generator=g).to(device)
    y = torch.sin(x.sum(1, keepdim=True))

    def loss():
        return ((model(x.bfloat16()).float() - y) ** 2).mean()

    first = loss().item()
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return opt, first, loss().item()


def test_fused_adamw_bf16_without_master_trains_like_with_master(device):
    opt, first, last = _train_bf16(device, master_weights=False)
    assert opt.stochastic_rounding and opt.master.dtype == torch.bfloat16
    # 1 byte a moment (8-bit) each, plus the bf16 weights themselves: no fp32 copy.
    assert opt.state_bytes(include_master=True) < 2.1 * opt.arena_group.numel
    _, _, last_master = _train_bf16(device, master_weights=True)
    assert last < 0.85 * first
    assert last < 1.15 * last_master, (last, last_master)


def test_bf16_without_master_construction_errors(device):
    def mlp():
        return nn.Sequential(nn.Linear(4, 4)).to(device)

    with pytest.raises(ValueError, match="master_weights=True"):
        FusedAdamW(mlp().half().parameters(), master_weights=False)
    with pytest.raises(ValueError, match="sr_seed"):
        FusedAdamW(mlp().parameters(), sr_seed=3)
    with pytest.raises(ValueError, match="sr_seed"):
        FusedAdamW(mlp().bfloat16().parameters(), master_weights=False, sr_seed=-1)
    with pytest.raises(ValueError, match="sr_seed"):
        adamw_step(*(torch.zeros(8, device=device) for _ in range(4)), lr=1e-3,
                   step=torch.zeros(1, device=device), sr_seed=1)  # fmt: skip
