"""DynamicLossScaler: device-resident scale, unscale with the flag, update, state_dict."""

from __future__ import annotations

import pytest
import torch
from hybrid_triton.kernels._checks import KernelInputError

from hybrid_triton.precision import DynamicLossScaler


def test_scale_loss_and_unscale_round_trip(device):
    scaler = DynamicLossScaler(init_scale=1024.0, device=device)
    w = torch.randn(300, device=device, requires_grad=True)
    loss = (w * w).sum()
    scaled = scaler.scale_loss(loss)
    assert scaled.dtype == torch.float32 and scaled.shape == loss.shape
    scaled.backward()
    scaler.unscale_(w.grad)
    assert torch.allclose(w.grad, 2 * w.detach(), rtol=0, atol=0)  # power-of-2 scale: exact
    assert scaler.found_inf.item() == 0.0


def test_overflow_sets_flag_backs_off_and_update_zeroes_flag(device):
    scaler = DynamicLossScaler(init_scale=2.0**16, growth_interval=2, device=device)
    grads = [torch.randn(10, device=device), torch.randn(5000, device=device)]
    grads[1][77] = float("inf")
    scaler.unscale_(grads)
    assert scaler.found_inf.item() == 1.0
    scaler.update()
    assert scaler.scale.item() == 2.0**15 and scaler.found_inf.item() == 0.0
    assert scaler.inv_scale.item() == 2.0**-15
    scaler.update()
    scaler.update()  # two finite steps: growth
    assert scaler.scale.item() == 2.0**16 and scaler.growth_tracker.item() == 0


def test_hysteresis(device):
    scaler = DynamicLossScaler(init_scale=8.0, hysteresis=2, device=device)
    scaler.found_inf.fill_(1.0)
    scaler.update()
    assert scaler.scale.item() == 8.0, "the first overflow is tolerated"
    scaler.found_inf.fill_(1.0)
    scaler.update()
    assert scaler.scale.item() == 4.0


def test_state_dict_round_trip_and_gradscaler_format(device):
    a = DynamicLossScaler(init_scale=512.0, growth_interval=7, hysteresis=3, device=device)
    a.found_inf.fill_(1.0)
    a.update()
    a.update()
    state = a.state_dict()
    assert isinstance(state["scale"], torch.Tensor) and state["scale"].device.type == device
    b = DynamicLossScaler(device=device)
    b.load_state_dict(state)
    for name in ("scale", "growth_tracker", "hysteresis_tracker", "inv_scale"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (b.growth_interval, b.hysteresis) == (7, 3)
    # torch.amp.GradScaler's format (Python numbers, a leading underscore on the tracker).
    gs = {
        "scale": 256.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 9,
        "_growth_tracker": 4,
    }
    b.load_state_dict(gs)
    assert (
        b.scale.item() == 256.0 and b.growth_tracker.item() == 4 and b.inv_scale.item() == 1 / 256
    )
    with pytest.raises(ValueError, match="no 'scale' entry"):
        b.load_state_dict({"growth": 1})


def test_unscale_rejects_bad_lists_before_touching_any(device):
    scaler = DynamicLossScaler(init_scale=4.0, device=device)
    good = torch.ones(10, device=device)
    with pytest.raises(KernelInputError, match="needs fp32"):
        scaler.unscale_([good, torch.ones(3, device=device).half()])
    assert (good == 1.0).all().item(), "the valid tensor before the bad one was left alone"
    with pytest.raises(KernelInputError, match="contiguous tensor"):
        scaler.unscale_([good, torch.ones(4, 4, device=device).t()])
    assert (good == 1.0).all().item()


@pytest.mark.parametrize(
    "kwargs",
    [{"init_scale": 0.0}, {"growth_factor": 1.0}, {"backoff_factor": 1.0}, {"hysteresis": 0}],
)
def test_bad_hyperparameters(device, kwargs):
    with pytest.raises(ValueError):
        DynamicLossScaler(device=device, **kwargs)


@pytest.mark.gpu
def test_gpu_scaler_step_never_syncs():
    scaler = DynamicLossScaler(device="cuda")
    g = torch.randn(1 << 20, device="cuda")
    scaler.unscale_(g)
    scaler.update()  # compile outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scaled = scaler.scale_loss(g.sum())
        scaler.unscale_(g)
        scaler.update()
        _ = scaler.state_dict()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(scaled).item()
