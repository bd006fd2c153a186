"""Optimizer-state strategies: identity kept, storage freed, values restored."""

from __future__ import annotations

import pytest
import torch
from hybrid_triton.kernels import dequantize_blockwise_ref, quantize_blockwise_ref

from hybrid_triton import moment_code
from hybrid_triton.offload import OffloadError, StateOffloader


def state(device):
    return {
        "exp_avg": torch.randn(4099, device=device),
        "exp_avg_sq": torch.rand(4099, device=device) ** 4,  # wide dynamic range, like v
        "codes": torch.randint(-127, 127, (1000,), dtype=torch.int8, device=device),
        "codes_scale": torch.rand(4, device=device),  # per-block scales of 8-bit codes
    }


@pytest.mark.parametrize("strategy", ["keep", "cpu", "pinned", "compress", "drop"])
@pytest.mark.parametrize("async_restore", [True, False], ids=["async", "sync"])
def test_roundtrip(strategy, async_restore, device):
    tensors = state(device)
    before = {k: v.clone() for k, v in tensors.items()}
    ids = {k: id(v) for k, v in tensors.items()}
    off = StateOffloader(strategy, async_restore=async_restore)
    off.offload(tensors)
    assert off.offloaded
    for name, t in tensors.items():
        freed = t.untyped_storage().nbytes() == 0
        expect_freed = strategy in ("cpu", "pinned", "drop") or (
            strategy == "compress" and t.is_floating_point() and name != "codes_scale"
        )
        assert freed == expect_freed, name
    if strategy != "keep":
        assert off.stats.bytes_freed > 0
    off.start_restore()
    off.wait()
    assert not off.offloaded
    for name, t in tensors.items():
        assert id(t) == ids[name]
        if strategy == "drop":
            assert torch.count_nonzero(t) == 0, name
        elif strategy in ("keep", "cpu", "pinned") or not StateOffloader.compressible(name, t):
            assert torch.equal(t, before[name]), name
        elif StateOffloader.second_moment(name):  # compress: the log code, exactly
            expected = moment_code.decode(moment_code.encode(before[name], 256), before[name] * 0)
            assert torch.equal(t, expected), name
        else:  # compress: exactly what the reference quantizer gives
            q = quantize_blockwise_ref(before[name], "int8_dynamic", 256)
            assert torch.equal(t, dequantize_blockwise_ref(q)), name
    stats = off.resolve_stats()
    assert stats.offloads == (0 if strategy == "keep" else 1)
    assert 0.0 <= stats.hidden_fraction <= 1.0


def test_repeated_phases_reuse(device):
    tensors = state(device)
    ref = {k: v.clone() for k, v in tensors.items()}
    off = StateOffloader("pinned")
    for _ in range(3):
        off.offload(tensors)
        off.restore()
    for k in tensors:
        assert torch.equal(tensors[k], ref[k])
    assert off.resolve_stats().restores == 3


def test_wait_without_start_restores(device):
    tensors = state(device)
    ref = tensors["exp_avg"].clone()
    off = StateOffloader("cpu")
    off.offload(tensors)
    off.wait()
    assert torch.equal(tensors["exp_avg"], ref)


def test_materialized_and_state_dict(device):
    tensors = state(device)
    ref = {k: v.clone() for k, v in tensors.items()}
    off = StateOffloader("compress")
    off.offload(tensors)
    with off.materialized():
        seen = tensors["exp_avg"].clone()
    assert tensors["exp_avg"].untyped_storage().nbytes() == 0
    saved = off.state_dict()
    # A fresh offloader (a resumed run) restores the same values.
    fresh = {k: v.clone() for k, v in ref.items()}
    other = StateOffloader("compress")
    other.load_state_dict(saved, fresh)
    assert fresh["exp_avg"].untyped_storage().nbytes() == 0
    other.restore()
    off.restore()
    for k in tensors:
        assert torch.equal(fresh[k], tensors[k]), k
    assert torch.equal(seen, tensors["exp_avg"])
    with pytest.raises(OffloadError, match="strategy"):
        StateOffloader("cpu").load_state_dict(saved, fresh)


def test_bad_inputs(device):
    base = torch.zeros(100, device=device)
    off = StateOffloader("cpu")
    with pytest.raises(OffloadError, match="does not own its storage"):
        off.offload({"view": base[10:20]})
    with pytest.raises(OffloadError, match="not a tensor"):
        off.offload({"x": [1, 2]})
    assert base.untyped_storage().nbytes() == 400  # nothing was freed
    off.offload({"x": base})
    with pytest.raises(OffloadError, match="already offloaded"):
        off.offload({"x": base})
    with pytest.raises(ValueError, match="strategy"):
        StateOffloader("disk")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compress_keeps_small_second_moments(dtype, device):
    """Adam's v spans many decades within a block: no nonzero entry may come back as 0, and
    sqrt(v) (what the update divides by) keeps a bounded relative error."""
    gen = torch.Generator().manual_seed(0)
    v = (10.0 ** (-16 * torch.rand(5000, generator=gen))).to(dtype)
    v[::7] = 0.0
    m = torch.randn(5000, generator=gen).to(dtype) * 1e-3
    tensors = {"exp_avg": m.to(device, copy=True), "exp_avg_sq": v.to(device, copy=True)}
    off = StateOffloader("compress")
    off.offload(tensors)
    assert off.stats.compressed_bytes < 2 * 5000 + 2 * 1000  # still about one byte an element
    off.restore()
    back = tensors["exp_avg_sq"].cpu().float()
    v = v.float()
    assert torch.equal(back == 0, v == 0), "zeros are exactly the zero entries"
    nz = v > 0
    rel = (back[nz].sqrt() / v[nz].sqrt() - 1).abs().max().item()
    # Blocks span 16 decades: log2 step 53/254, so sqrt(v) is within 2^(step/4) - 1 = 3.7%;
    # bf16 storage adds its own rounding (2^-9).
    assert rel < 0.037 + (0.004 if dtype == torch.bfloat16 else 0.0), rel
