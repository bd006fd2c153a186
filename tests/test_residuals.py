"""Residual store (bounded, quantized, error feedback) and the corrector."""

from __future__ import annotations

import math

import pytest
import torch

from hybrid_triton.residuals import Corrector, ResidualStore


def test_store_is_bounded_and_quantized(device):
    store = ResidualStore(capacity=3, fmt="int8", block=64, device=device)
    xs = [torch.randn(1000, device=device) for _ in range(5)]
    for i, x in enumerate(xs):
        store.add(i, x, torch.ones(2, device=device))
    assert len(store) == 3 and store.added == 5
    assert [r.step for r in store.items] == [2, 3, 4]
    assert store.items[-1].q.data.dtype == torch.int8
    # Bytes: 1 per element + 4 per 64-element block, per item, plus the fp32 error buffer.
    assert store.nbytes == 3 * (1000 + 16 * 4) + 4000


def test_error_feedback_sum(device):
    store = ResidualStore(capacity=10, fmt="int4", block=64, device=device)
    xs = [torch.randn(777, device=device, dtype=torch.float64).float() for _ in range(6)]
    for i, x in enumerate(xs):
        store.add(i, x, torch.ones(1, device=device))
    total_stored = sum(store.get(i).double() for i in range(6))
    total_true = sum(x.double() for x in xs)
    # sum of dequantized = sum of inputs - final error (error feedback), to fp32 rounding.
    torch.testing.assert_close(
        total_stored, total_true - store.error.double(), atol=1e-5, rtol=1e-5
    )
    # Without feedback the sum is off by far more than that.
    plain = ResidualStore(capacity=10, fmt="int4", block=64, error_feedback=False, device=device)
    for i, x in enumerate(xs):
        plain.add(i, x, torch.ones(1, device=device))
    # With feedback the run's error is one quantization error (the last); without, six of
    # them add up (about sqrt(6) times larger in norm).
    err_plain = (sum(plain.get(i).double() for i in range(6)) - total_true).norm()
    err_feedback = (total_stored - total_true).norm()
    assert err_plain > 1.5 * err_feedback


def test_store_state_roundtrip(device):
    store = ResidualStore(capacity=2, block=64, device=device)
    for i in range(3):
        store.add(i, torch.randn(300, device=device), torch.ones(1, device=device))
    other = ResidualStore(capacity=2, block=64, device=device)
    other.load_state_dict(store.state_dict())
    assert torch.equal(other.get(), store.get()) and torch.equal(other.error, store.error)


def test_zero_capacity_stores_nothing(device):
    store = ResidualStore(capacity=0, device=device)
    store.add(0, torch.randn(10, device=device), torch.ones(1, device=device))
    assert len(store) == 0 and store.nbytes == 0


def test_corrector_learns_the_scale(device):
    c = Corrector(2, device, decay=0.5, max_adjust=0.5)
    pred = torch.randn(2, 100, device=device)
    actual = torch.stack([1.3 * pred[0], 0.8 * pred[1]])
    for _ in range(30):
        p = pred * c.correction[:, None]  # the prediction carries the current correction
        c.update((actual * p).sum(1), (p * p).sum(1))
    torch.testing.assert_close(
        c.correction, torch.tensor([1.3, 0.8], device=device), rtol=1e-3, atol=0
    )


def test_corrector_clamps_and_ignores_degenerate(device):
    c = Corrector(3, device, decay=0.0, max_adjust=0.5)
    c.update(
        torch.tensor([-5.0, 100.0, 1.0], device=device),
        torch.tensor([1.0, 1.0, 0.0], device=device),
    )
    torch.testing.assert_close(c.correction, torch.tensor([0.5, 1.5, 1.0], device=device))


def test_loss_bias():
    c = Corrector(1, "cpu")
    for _ in range(10):
        c.observe_loss(1.1, 1.0)
    assert math.isclose(c.adjust_loss(2.0), 2.2, rel_tol=1e-9)
    c.observe_loss(float("nan"), 1.0)
    assert math.isclose(c.loss_bias, 0.1, rel_tol=1e-9)
    with pytest.raises(ValueError):
        Corrector(0, "cpu")


@pytest.mark.gpu
def test_cuda_residuals_go_to_a_host_store_without_a_sync():
    # The trainer keeps the store in host memory; a CUDA residual is quantized on the GPU and
    # its codes, scales, norms and error travel back without blocking (a blocking copy and
    # the host-side quantization cost about 2.2 s per GPT-2 small Correct step). The result
    # must equal a store that keeps everything on the GPU, bit for bit.
    n = 3 * 2**20 + 5  # not a multiple of the block
    xs = [torch.randn(n, device="cuda") * 10.0 ** (-i) for i in range(3)]
    norms = torch.rand(4, device="cuda")
    host = ResidualStore(capacity=2, block=256, device="cpu")
    on_gpu = ResidualStore(capacity=2, block=256, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, x in enumerate(xs):
            host.add(i, x, norms)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for i, x in enumerate(xs):
        on_gpu.add(i, x, norms)
    assert len(host) == 2 and [r.step for r in host.items] == [1, 2]
    for i in range(2):
        item = host.items[i]
        assert item.q.data.device.type == "cpu" and item.q.data.is_pinned()
        assert torch.equal(host.get(i), on_gpu.get(i).cpu())
        assert torch.equal(item.group_norms, norms.cpu())
    assert host.error.is_pinned() and torch.equal(host.error, on_gpu.error.cpu())
    # A checkpointed store (unpinned host tensors) goes on the same way.
    again = ResidualStore(capacity=2, block=256, device="cpu")
    again.load_state_dict(host.state_dict())
    again.add(3, xs[0], norms)
    on_gpu.add(3, xs[0], norms)
    assert torch.equal(again.get(), on_gpu.get().cpu())
    assert torch.equal(again.error, on_gpu.error.cpu())
