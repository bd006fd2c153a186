"""update_loss_scale: torch._amp_update_scale_ semantics plus hysteresis, on the device."""

from __future__ import annotations

import pytest
import torch
from hybrid_triton.kernels import update_loss_scale, update_loss_scale_ref
from hybrid_triton.kernels._checks import KernelInputError


def state(device, scale=65536.0, growth=0, hyst=None):
    s = torch.tensor([scale], device=device)
    g = torch.tensor([growth], dtype=torch.int32, device=device)
    h = None if hyst is None else torch.tensor([hyst], dtype=torch.int32, device=device)
    return s, g, h


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torch_amp_update_scale(device, seed):
    gen = torch.Generator().manual_seed(seed)
    overflows = (torch.rand(60, generator=gen) < 0.3).tolist()
    s, g, _ = state(device)
    ts, tg, _ = state(device)
    inv = torch.empty(1, device=device)
    for step, overflow in enumerate(overflows):
        flag = torch.tensor([1.0 if overflow else 0.0], device=device)
        update_loss_scale(s, g, flag.clone(), inv_scale=inv, growth_interval=3)
        torch._amp_update_scale_(ts, tg, flag, 2.0, 0.5, 3)
        assert s.item() == ts.item() and g.item() == tg.item(), f"step {step}"
        assert inv.item() == 1.0 / ts.item()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_growth_that_would_overflow_keeps_the_scale(device):
    s, g, _ = state(device, scale=3.0e38, growth=1)
    update_loss_scale(s, g, torch.zeros(1, device=device), growth_interval=2)
    assert s.item() == pytest.approx(3.0e38) and g.item() == 0


def test_nan_flag_counts_as_overflow(device):
    s, g, _ = state(device, growth=5)
    update_loss_scale(s, g, torch.tensor([float("nan")], device=device))
    assert s.item() == 32768.0 and g.item() == 0


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
def test_hysteresis_backs_off_after_n_consecutive_overflows(device, hysteresis):
    s, g, h = state(device, hyst=hysteresis)
    one, zero = torch.ones(1, device=device), torch.zeros(1, device=device)
    for k in range(1, hysteresis):
        update_loss_scale(s, g, one, hysteresis_tracker=h, hysteresis=hysteresis)
        assert s.item() == 65536.0, f"overflow {k} of {hysteresis} must not back off"
    update_loss_scale(s, g, one, hysteresis_tracker=h, hysteresis=hysteresis)
    assert s.item() == 32768.0
    update_loss_scale(s, g, one, hysteresis_tracker=h, hysteresis=hysteresis)
    assert s.item() == 16384.0, "each further consecutive overflow backs off"
    # A finite step re-arms the hysteresis: the next lone overflow is tolerated again.
    update_loss_scale(s, g, zero, hysteresis_tracker=h, hysteresis=hysteresis)
    assert h.item() == hysteresis and g.item() == 1
    update_loss_scale(s, g, one, hysteresis_tracker=h, hysteresis=hysteresis)
    assert s.item() == (16384.0 if hysteresis > 1 else 8192.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_matches_reference_with_hysteresis(device, seed):
    gen = torch.Generator().manual_seed(seed)
    pattern = (torch.rand(80, generator=gen) < 0.4).tolist()
    a, b = state(device, hyst=3), state(device, hyst=3)
    inv_a, inv_b = torch.empty(1, device=device), torch.empty(1, device=device)
    for step, overflow in enumerate(pattern):
        fa = torch.tensor([float(overflow)], device=device)
        fb = fa.clone()
        kw = {"growth_interval": 4, "hysteresis": 3, "zero_found_inf": True}
        update_loss_scale(a[0], a[1], fa, hysteresis_tracker=a[2], inv_scale=inv_a, **kw)
        update_loss_scale_ref(b[0], b[1], fb, hysteresis_tracker=b[2], inv_scale=inv_b, **kw)
        for name, x, y in zip(
            ("scale", "growth", "hyst", "inv", "flag"), (*a, inv_a, fa), (*b, inv_b, fb)
        ):
            assert torch.equal(x, y), f"step {step}: {name} {x.item()} != {y.item()}"
        assert fa.item() == 0.0


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("scale_dtype", "scale has dtype float64"),
        ("growth_dtype", "growth_tracker has dtype int64"),
        ("flag_numel", "found_inf has 2 elements"),
        ("hyst_missing", "needs a hysteresis_tracker"),
        ("interval", "growth_interval must be >= 1"),
        ("backoff", "backoff_factor must be in"),
        ("device", "growth_tracker is on meta"),
    ],
)
def test_bad_input_changes_nothing(device, case, match):
    s, g, h = state(device, hyst=2)
    flag = torch.ones(1, device=device)
    kwargs = {"hysteresis_tracker": h, "hysteresis": 2}
    if case == "scale_dtype":
        s = s.double()
    elif case == "growth_dtype":
        g = g.long()
    elif case == "flag_numel":
        flag = torch.ones(2, device=device)
    elif case == "hyst_missing":
        kwargs["hysteresis_tracker"] = None
    elif case == "interval":
        kwargs["growth_interval"] = 0
    elif case == "backoff":
        kwargs["backoff_factor"] = 1.5
    elif case == "device":
        g = torch.zeros(1, dtype=torch.int32, device="meta")
    before = (s.clone(), h.clone(), flag.clone())
    with pytest.raises(KernelInputError, match=match):
        update_loss_scale(s, g, flag, zero_found_inf=True, **kwargs)
    for x, y in zip((s, h, flag), before):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_gpu_update_never_syncs():
    s, g, h = state("cuda", hyst=2)
    flag, inv = torch.ones(1, device="cuda"), torch.empty(1, device="cuda")
    update_loss_scale(s, g, flag, hysteresis_tracker=h, inv_scale=inv, hysteresis=2)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            update_loss_scale(s, g, flag, hysteresis_tracker=h, inv_scale=inv, hysteresis=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Overflows 1 (tolerated), then 2, 3, 4 each back off: 65536 / 2**3.
    assert s.item() == 8192.0
