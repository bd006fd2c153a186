"""The planner on Hugging Face models: the real modules traced as CUDA runs them.

Each family's tiny config is built by transformers on the meta device and traced under fake
tensors (no GPU, no weights). The checks: the attention backend is the one CUDA picks, the
depth-extrapolated estimate equals the whole-model trace, the spec's parameters are the
module's, and what cannot be traced says so.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

pytest.importorskip("transformers")

from hybrid_triton.planner import PlannerError, TrainSetup, estimate, spec_from_hf_config
from hybrid_triton.planner.hf import (
    _with_depth,
    hf_config,
    meta_model,
    trace_hf,
    trace_hf_fast,
    traceable,
)
from hybrid_triton.planner.traced import sdpa_backend, trace_step

_LLAMA_LIKE = dict(
    hidden_size=64,
    intermediate_size=160,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    pad_token_id=None,
)
FAMILIES = {
    "llama": dict(model_type="llama", **_LLAMA_LIKE),
    "mistral": dict(model_type="mistral", **_LLAMA_LIKE),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, **_LLAMA_LIKE),
    "qwen3": dict(model_type="qwen3", head_dim=16, **_LLAMA_LIKE),
    "gemma": dict(model_type="gemma", head_dim=16, **_LLAMA_LIKE),
    "gemma2": dict(model_type="gemma2", head_dim=16, **_LLAMA_LIKE),
    "phi3": dict(model_type="phi3", **_LLAMA_LIKE),
    "gpt_neox": dict(
        model_type="gpt_neox",
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=4,
        vocab_size=512,
        max_position_embeddings=256,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_head=4, vocab_size=512, n_positions=256),
    "mixtral": dict(
        model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **_LLAMA_LIKE
    ),
}
# Mixtral's experts run torch._grouped_mm, which takes bf16 only (on the GPU too).
BF16_ONLY = {"mixtral"}
SETUPS = {
    "fp32": dict(),
    "autocast": dict(autocast="bf16"),
    "bf16": dict(param_dtype="bf16", state_bits=16),
    "autocast-ckpt": dict(autocast="bf16", checkpointing=True),
}


def _config(family: str, layers: int) -> dict:
    cfg = dict(FAMILIES[family])
    cfg["n_layer" if family == "gpt2" else "num_hidden_layers"] = layers
    return cfg


def _setup(name: str) -> TrainSetup:
    return TrainSetup(micro_batch=2, seq_len=32, phases=("full",), **SETUPS[name])


@pytest.mark.parametrize(
    ("dtype", "n_head", "n_kv", "mask", "gqa", "expected"),
    [
        (torch.bfloat16, 8, 2, False, True, "flash"),
        (torch.float16, 8, 8, False, False, "flash"),
        (torch.float32, 8, 8, False, False, "efficient"),
        (torch.float32, 8, 2, False, True, "math"),  # fp32 with grouped kv heads
        (torch.bfloat16, 8, 8, True, False, "efficient"),  # a mask keeps flash out
        (torch.bfloat16, 8, 2, True, True, "math"),  # mask + grouped kv heads
    ],
)
def test_sdpa_backend_follows_cuda(dtype, n_head, n_kv, mask, gqa, expected):
    assert sdpa_backend(dtype, 64, n_head, n_kv, mask, gqa) == expected


def test_sdpa_backend_large_head_and_bad_heads():
    assert sdpa_backend(torch.bfloat16, 320, 4, 4, False) == "efficient"  # flash stops at 256
    assert sdpa_backend(torch.float32, 30, 4, 4, False) == "math"  # not 16-byte aligned
    with pytest.raises(PlannerError, match="enable_gqa"):
        sdpa_backend(torch.bfloat16, 64, 8, 2, False, enable_gqa=False)


def test_cuda_dropout_keeps_a_byte_mask_not_a_noise_tensor():
    module = nn.Sequential(nn.Linear(64, 256), nn.Dropout(0.1), nn.Linear(256, 8))

    def batch(model, setup):
        return (torch.randn(setup.micro_batch, 64),)

    def loss(model, b):
        return model(*b).square().mean()

    setup = TrainSetup(micro_batch=512, seq_len=1, optimizer="none")
    cuda = trace_step(module, setup, batch, loss, kernels="cuda")
    cpu = trace_step(module, setup, batch, loss, kernels="cpu")
    # CPU keeps an fp32 noise tensor (4 B per element), CUDA a bool mask (1 B): 3 B less
    saved = 512 * 256 * 3
    diff = (cpu.end_of_forward_bytes + cuda_workspace()) - cuda.end_of_forward_bytes
    assert diff == saved


def cuda_workspace() -> int:
    from hybrid_triton.planner.estimate import CUBLAS_WORKSPACE

    return CUBLAS_WORKSPACE


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_is_planned_from_its_config(family):
    cfg = _config(family, 2)
    spec = spec_from_hf_config(cfg)
    model = meta_model(hf_config(cfg))
    assert spec.num_params == sum(p.numel() for p in model.parameters())
    assert spec.hf_config["model_type"] == family
    setup = _setup("bf16" if family in BF16_ONLY else "autocast")
    est = estimate(spec, setup)
    assert est.notes[0].startswith("traced")
    traced = trace_hf(cfg, setup)
    assert est.peak_bytes == traced.peak_bytes
    assert est.components["weights"] == traced.param_bytes
    assert sum(est.components.values()) == est.peak_bytes
    assert sum(traced.attention.values()) > 0  # attention ran through the CUDA backends


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("setup_name", sorted(SETUPS))
def test_depth_extrapolation_equals_the_whole_trace(family, setup_name):
    cfg = _config(family, 8)
    setup = _setup(setup_name)
    fast = trace_hf_fast(cfg, setup)
    whole = trace_hf(cfg, setup)
    assert fast.peak_bytes == whole.peak_bytes
    assert fast.stage_peaks == whole.stage_peaks
    assert fast.param_bytes == whole.param_bytes
    assert fast.optimizer_state_bytes == whole.optimizer_state_bytes


def test_with_depth_keeps_the_layer_pattern():
    cfg = hf_config(_config("gemma2", 6))
    short = _with_depth(cfg, 4)
    assert short.num_hidden_layers == 4 and len(short.layer_types) == 4
    assert short.layer_types == cfg.layer_types[:4]
    assert cfg.num_hidden_layers == 6  # the original is not changed


def test_traced_hf_attention_backend_per_dtype():
    cfg = _config("llama", 2)  # grouped kv heads
    assert set(trace_hf(cfg, _setup("fp32")).attention) == {"math"}
    assert set(trace_hf(cfg, _setup("bf16")).attention) == {"flash"}
    # checkpointing makes transformers run without a cache; still no explicit mask
    assert set(trace_hf(cfg, _setup("autocast-ckpt")).attention) == {"flash"}


def test_live_hf_module_is_traced_and_left_unchanged():
    model = meta_model(hf_config(_config("qwen2", 2)))
    before = copy.deepcopy(model.state_dict())
    result = trace_hf(model, _setup("autocast"))
    assert result.peak_bytes > 0
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(after[k].device.type == "meta" for k in after)


def test_toolkit_setups_add_their_flat_buffers_to_the_module_step():
    cfg = _config("llama", 2)
    spec = spec_from_hf_config(cfg)
    lean = TrainSetup(
        param_dtype="bf16",
        master_weights=True,
        grad_mode="flat",
        state_bits=8,
        seq_len=32,
        phases=("full",),
        trainer=False,
    )
    assert traceable(lean) is not None  # not a plain PyTorch step ...
    est = estimate(spec, lean)  # ... but the module's step plus flat buffers
    assert "flat buffers" in est.notes[0]
    module = trace_hf(cfg, lean.replace(optimizer="none", grad_mode="full", master_weights=False),
                      drop_grads=True)  # fmt: skip
    n = spec.num_params
    assert est.components["master_weights"] >= 4 * n
    assert est.components["gradients"] >= 2 * n  # the flat bf16 buffer
    assert est.components["optimizer_state"] >= 2 * n  # two 8-bit moments and their scales
    extra = sum(est.components[c] for c in ("master_weights", "gradients", "optimizer_state"))
    assert est.peak_bytes == module.peak_bytes + extra


def test_module_step_plus_state_is_the_whole_step():
    """The decomposition the toolkit setups rely on, checked where torch can run both: the
    whole plain step equals the module's step (no optimizer) plus the optimizer's state."""
    cfg = _config("qwen2", 2)
    plain = _setup("bf16")
    whole = trace_hf(cfg, plain)
    module = trace_hf(cfg, plain.replace(optimizer="none"))
    state = whole.optimizer_state_bytes  # unrounded; the tracker rounds each block to 512 B
    n_tensors = 3 * sum(1 for _ in meta_model(hf_config(cfg)).parameters())
    assert abs(module.peak_bytes + state - whole.peak_bytes) <= 512 * n_tensors


def test_trainer_setups_use_the_formulas_or_say_why():
    spec = spec_from_hf_config(_config("llama", 2))
    trainer = TrainSetup(param_dtype="bf16", master_weights=True, grad_mode="hook",
                         seq_len=32, phases=("full",))  # fmt: skip
    assert trainer.trainer  # hook-folded gradients: HybridTrainer's setup
    est = estimate(spec, trainer)  # llama: the formulas
    assert not est.notes[-1].startswith("traced")
    with pytest.raises(PlannerError, match="HybridTrainer"):
        estimate(spec, trainer, method="traced")
    gemma = spec_from_hf_config(_config("gemma", 2))
    with pytest.raises(PlannerError, match="tracing"):
        estimate(gemma, trainer)


def test_unknown_model_type_names_the_traced_mode():
    with pytest.raises(PlannerError, match="tracing"):
        spec_from_hf_config({"model_type": "no-such-family", "hidden_size": 8})


def test_hf_checkpoint_blocks_refused():
    setup = TrainSetup(checkpointing=True, checkpoint_blocks=1, phases=("full",))
    with pytest.raises(PlannerError, match="every layer"):
        trace_hf(_config("llama", 2), setup)


def test_non_utf8_config_is_a_clear_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"model_type": "llama\xff"}')
    with pytest.raises(PlannerError, match="UTF-8"):
        spec_from_hf_config(path)


def test_traced_estimate_checks_the_sequence_length():
    spec = spec_from_hf_config(_config("llama", 2))
    with pytest.raises(PlannerError, match="exceeds"):
        estimate(spec, TrainSetup(seq_len=512, phases=("full",)))


@pytest.mark.parametrize("setup_name", ["fp32", "autocast-ckpt", "bf16"])
def test_first_step_plus_state_is_the_second_step(setup_name):
    """trace_hf traces one step and adds the optimizer state the first step creates: the
    same figures as tracing two steps."""
    cfg = _config("qwen2", 3)
    setup = _setup(setup_name)
    model = meta_model(hf_config(cfg))
    fast = trace_hf(cfg, setup)

    def prepare(copy):
        if setup.checkpointing:
            copy.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )

    from hybrid_triton.planner.hf import _unpacked_batches, hf_batch, hf_loss

    with _unpacked_batches():
        two = trace_step(model, setup, hf_batch, hf_loss, steps=2, prepare=prepare)
    assert fast.peak_bytes == two.peak_bytes
    assert fast.stage_peaks == two.stage_peaks
    assert fast.segment_slack_bytes == two.segment_slack_bytes
    assert fast.largest_transient_bytes == two.largest_transient_bytes


def test_fit_confirms_the_formulas_choice_by_tracing():
    from hybrid_triton.planner import fit

    spec = spec_from_hf_config(_config("llama", 2))
    result = fit(spec, 2, seq_len=64, max_micro_batch=8)  # 2 GiB: the CUDA context and more
    assert result.fits
    assert result.best.estimate.notes[0].startswith("traced")  # the module as it runs
    assert result.best.device_bytes <= result.usable_bytes
    assert any(r.startswith("Confirmed by tracing") for r in result.reasons)


def test_fit_on_a_family_the_formulas_do_not_know_traces_everything():
    from hybrid_triton.planner import fit

    spec = spec_from_hf_config(_config("gemma", 2))
    result = fit(spec, 2, seq_len=64, max_micro_batch=4)
    assert result.fits and result.best.estimate.notes[0].startswith("traced")


def test_the_formulas_attention_switch_is_said_not_silently_ignored():
    spec = spec_from_hf_config(_config("llama", 2))
    est = estimate(spec, _setup("bf16").replace(attention="math"))
    assert any("formulas' switch" in note for note in est.notes)
    assert "flash" in est.notes[0]  # what ran
