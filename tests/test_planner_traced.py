"""Planner traced mode: fake-tensor measurement of a real module agrees with the estimate.

The estimate models CUDA's kernels; the traced step runs fake CPU tensors with attention,
dropout and the cuBLAS workspace as CUDA has them (``kernels="cuda"``). For the project's
GPT-2 the two save the same tensors except the autocast cross-entropy (counted below), and the
allocated peaks agree to within ``TRACE_RTOL``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hybrid_triton.models.gpt2 import build_gpt2
from hybrid_triton.planner import PlannerError, TrainSetup, estimate, spec_from_module
from hybrid_triton.planner.traced import trace_step

TRACE_RTOL = 0.01  # 1%: measured agreement on these cases is within 0.03%
CONFIG = dict(n_layer=2, n_embd=128, n_head=4, vocab_size=2048, block_size=256)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(autocast="bf16", logits_lifetime="next_forward"),
        dict(param_dtype="bf16", state_bits=16, accum_steps=2),
        dict(checkpointing=True, optimizer="sgd", logits_lifetime="step"),
    ],
    ids=["fp32", "autocast-held-logits", "bf16-accum2", "checkpointing-sgd"],
)
def test_traced_gpt2_agrees_with_estimate(kwargs):
    checkpointing = kwargs.get("checkpointing", False)
    module = build_gpt2(
        "gpt2-tiny", device="meta", activation_checkpointing=checkpointing, **CONFIG
    )
    setup = TrainSetup(micro_batch=2, seq_len=96, **{"logits_lifetime": "loss_only", **kwargs})
    traced = trace_step(module, setup)
    full = estimate(spec_from_module(module), setup).phases["train"]  # a plain loop
    # The one place where CPU and CUDA kernels differ here: CPU autocast lists
    # cross_entropy_loss as fp32 (the log-probabilities are fp32, 4 B), CUDA autocast does not
    # (log_softmax keeps the bf16 dtype, 2 B; nll_loss's fp32 copy is there on both).
    cpu_extra = (4 - 2) * setup.tokens_per_micro_batch * module.config.vocab_size
    cpu_extra = cpu_extra if setup.autocast else 0
    formula = full.peak_bytes + cpu_extra
    assert abs(formula - traced.peak_bytes) <= TRACE_RTOL * traced.peak_bytes, (
        formula,
        traced.peak_bytes,
    )
    for stage in ("forward", "backward"):
        measured = traced.stage_peaks[stage]
        expected = full.stage_peaks[stage] + cpu_extra
        assert abs(expected - measured) <= TRACE_RTOL * measured, (stage, expected, measured)
    param_bytes = sum(p.numel() for p in module.parameters()) * (
        2 if setup.param_dtype == "bf16" else 4
    )
    assert traced.param_bytes == param_bytes
    assert traced.grad_bytes == param_bytes  # .grad in the parameter dtype before zero_grad


def test_traced_generic_module_with_custom_loss_leaves_module_unchanged():
    module = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    before = [p.detach().clone() for p in module.parameters()]

    def batch(model, setup):
        return (torch.randn(setup.micro_batch, 32),)

    def loss(model, b):
        return model(*b).square().mean()

    result = trace_step(module, TrainSetup(micro_batch=16, seq_len=1), batch, loss)
    n = sum(p.numel() for p in module.parameters())
    assert result.param_bytes == 4 * n and result.optimizer_state_bytes >= 8 * n
    # the hidden activations (16 x 64 fp32, saved by GELU and the second linear) are counted
    assert result.activation_peak_bytes >= 2 * 16 * 64 * 4
    for p, q in zip(module.parameters(), before):
        assert not isinstance(p, torch._subclasses.fake_tensor.FakeTensor)
        assert torch.equal(p, q)


def test_traced_rejects_bad_input():
    module = build_gpt2("gpt2-tiny", device="meta", **CONFIG)
    with pytest.raises(PlannerError, match="state"):
        trace_step(module, TrainSetup(state_bits=8))
    with pytest.raises(PlannerError, match=r"nn\.Module"):
        trace_step("gpt2", TrainSetup())
    with pytest.raises(PlannerError, match="make_batch"):
        trace_step(nn.Linear(2, 2), TrainSetup())
    with pytest.raises(PlannerError, match="steps"):
        trace_step(module, TrainSetup(), steps=0)


@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_predict_entry_temporaries_match_the_trainer_code(bits):
    """PREDICT_ENTRY_TEMP_BYTES against a measurement of the steps HybridTrainer's
    _direction_groups takes for one segment group of n elements (the moments read as fp32,
    then the direction), under fake tensors."""
    from hybrid_triton.kernels.adamw import dequantize_moments_ref, new_state
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hybrid_triton.planner.estimate import PREDICT_ENTRY_TEMP_BYTES
    from hybrid_triton.planner.traced import _AllocationTracker

    n = 1 << 20
    tracker = _AllocationTracker()
    with FakeTensorMode(), tracker:
        state = new_state(n, bits, "cpu")
        for t in state.values():
            if t is not None:
                tracker.track(t)
        base = tracker.peak = tracker.live
        if bits >= 16:
            m, v = state["exp_avg"].float(), state["exp_avg_sq"].float()
        else:
            m = dequantize_moments_ref(state["exp_avg"], state["exp_avg_scale"], n, bits, "exp_avg")
            v = dequantize_moments_ref(
                state["exp_avg_sq"], state["exp_avg_sq_scale"], n, bits, "exp_avg_sq"
            )
        d = v.sqrt()
        del m, v, d
    measured = (tracker.peak - base) / n
    assert abs(measured - PREDICT_ENTRY_TEMP_BYTES[bits]) < 0.01, measured
