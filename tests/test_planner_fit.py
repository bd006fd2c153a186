"""Planner fit: GPU presets and sizes, the choice and its reasons, nothing-fits answers."""

from __future__ import annotations

import pytest

from hybrid_triton.planner import GPUS, PlannerError, estimate, fit, gpu_capacity_bytes, preset
from hybrid_triton.planner.estimate import GiB, MiB


def test_gpu_capacity_presets_sizes_and_errors():
    assert gpu_capacity_bytes("h100") == ("h100-80gb", GPUS["h100-80gb"] * MiB)
    assert gpu_capacity_bytes(16) == ("16 GiB", 16 * GiB)
    assert gpu_capacity_bytes("24GiB")[1] == 24 * GiB
    for bad in (0, -8, "0", float("nan"), True):
        with pytest.raises(PlannerError, match=r"positive|GiB"):
            gpu_capacity_bytes(bad)
    with pytest.raises(PlannerError, match="rtx-4090"):
        gpu_capacity_bytes("rtx-4900")


def test_fit_result_respects_the_usable_memory():
    result = fit(preset("gpt2-small"), "rtx-4080", margin=0.1)
    assert result.fits
    assert result.usable_bytes == int(result.capacity_bytes * 0.9)
    assert result.best.device_bytes <= result.usable_bytes
    # the chosen batch is the largest that fits: doubling it does not
    setup = result.best.setup
    if setup.micro_batch < 64:
        doubled = estimate(result.spec, setup.replace(micro_batch=2 * setup.micro_batch))
        assert doubled.device_bytes() > result.usable_bytes
    assert result.reasons[0].startswith("Best throughput proxy")


def test_big_gpu_needs_no_memory_option():
    result = fit(preset("gpt2-small"), "h100", max_micro_batch=8)
    s = result.best.setup
    assert result.fits and s.micro_batch == 8
    assert s.param_dtype == "fp32" and s.autocast == "bf16"
    assert s.state_bits == 32 and not s.checkpointing and s.offload == "none"


def test_small_gpu_turns_options_on_and_explains_each():
    result = fit(preset("gpt2-medium"), 8)
    s = result.best.setup
    assert result.fits
    options = {
        "checkpointing": s.checkpointing,
        "-bit optimizer state": s.state_bits < 32,
        "master weights": s.master_weights,
        "offloaded": s.offload != "none",
    }
    assert any(options.values())
    text = " ".join(result.reasons)
    for phrase, on in options.items():
        assert (phrase in text) == on, (phrase, on, text)
    for reason in result.reasons[1:]:
        assert (
            "because" in reason
            or "standard mixed precision" in reason
            or reason.startswith("bf16: assumed supported")  # a card given by its size
        ), reason


def test_seven_b_on_sixteen_gib_does_not_fit_and_says_why():
    result = fit(preset("llama-7b"), 16)
    assert not result.fits
    text = " ".join(result.reasons)
    assert "Nothing fits 16 GiB" in text
    assert "bf16 weights alone take 12.55 GiB" in text  # 6.74B x 2 bytes
    assert "What would fit" in text and "FSDP" in text
    assert result.best.device_bytes > result.usable_bytes


def test_nothing_fits_a_tiny_gpu():
    result = fit(preset("gpt2-small"), 0.25)
    assert not result.fits and "Nothing fits" in result.reasons[0]


def test_fit_rejects_bad_arguments():
    spec = preset("gpt2-small")
    with pytest.raises(PlannerError, match="margin"):
        fit(spec, 16, margin=1.0)
    with pytest.raises(PlannerError, match="max_micro_batch"):
        fit(spec, 16, max_micro_batch=0)
    with pytest.raises(PlannerError, match="ModelSpec"):
        fit("gpt2-small", 16)
    with pytest.raises(PlannerError, match="exceeds"):
        fit(spec, 16, seq_len=4096)


def test_fit_turns_expandable_segments_on_and_says_why():
    # GPT-2 small on an 8 GiB card: with the native allocator's fragmentation allowance the
    # best setup needs more than the usable memory; expandable segments avoid it.
    result = fit(preset("gpt2-small"), "rtx-4060")
    assert result.fits and result.best.setup.allocator == "expandable"
    native = estimate(result.spec, result.best.setup.replace(allocator="native"))
    assert native.device_bytes() > result.usable_bytes >= result.best.device_bytes
    (reason,) = [r for r in result.reasons if r.startswith("expandable segments")]
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in reason
    # 8x1024 bf16 [N, V] logits of the bf16-parameter setup
    assert "unusable around the 0.77 GiB logits and loss buffers" in reason
    assert f"this batch needs {native.device_bytes() / GiB:.2f} GiB" in reason
    assert "With the default allocator the best is" in reason
    assert result.to_dict()["setup"]["allocator"] == "expandable"


def test_fit_with_one_allocator_searches_only_that_one():
    native = fit(preset("gpt2-small"), "rtx-4060", allocator="native")
    assert native.best.setup.allocator == "native"
    assert all(c.setup.allocator == "native" for c in native.alternatives)
    assert not any("expandable" in r for r in native.reasons)
    both = fit(preset("gpt2-small"), "rtx-4060")
    assert both.best.proxy >= native.best.proxy
    with pytest.raises(PlannerError, match="unknown allocator 'malloc'"):
        fit(preset("gpt2-small"), "rtx-4060", allocator="malloc")


def test_native_allocator_wins_a_tie():
    # Room for the largest micro-batch either way: the default allocator, nothing to explain.
    result = fit(preset("gpt2-small"), "a100-40gb")
    assert result.best.setup.allocator == "native"
    assert not any("expandable" in r for r in result.reasons)
