"""Planner: model specs (presets, HF config.json, live modules), setups, and the estimate's
components against sizes computed by hand from the shapes."""

from __future__ import annotations

import json
import math

import pytest
import torch.nn as nn

from hybrid_triton.models.gpt2 import GPT2Config, build_gpt2
from hybrid_triton.planner import (
    PRESET_NAMES,
    PlannerError,
    TrainSetup,
    estimate,
    preset,
    setup_preset,
    spec_from_hf_config,
    spec_from_module,
)
from hybrid_triton.planner.estimate import (
    ALLOC_ROUND,
    CUBLAS_WORKSPACE,
    DIRECTION_BLOCK,
    PREDICT_ENTRY_TEMP_BYTES,
    STATE_BLOCK,
)

# ---------------------------------------------------------------------------------- specs


@pytest.mark.parametrize("name", ["gpt2-tiny", "gpt2-small", "gpt2-medium", "gpt2-1b"])
def test_gpt2_presets_count_what_the_model_builds(name):
    module = build_gpt2(name, device="meta")
    spec = preset(name)
    assert spec.num_params == module.num_params() == GPT2Config.from_name(name).num_params()
    assert len(spec.params) == len(list(module.parameters()))
    assert spec.vocab_size == module.config.vocab_size == 50304


# Published parameter counts of the models the Llama-style presets copy the shapes of.
@pytest.mark.parametrize(
    "name, count",
    [
        ("llama-1b", 1_235_814_400),  # Llama 3.2 1B
        ("llama-3b", 3_212_749_824),  # Llama 3.2 3B
        ("llama-7b", 6_738_415_616),  # Llama 2 7B
        ("llama-13b", 13_015_864_320),  # Llama 2 13B
    ],
)
def test_llama_presets_match_published_counts(name, count):
    assert preset(name).num_params == count


def test_gpt2_large_xl_counts():
    # GPT-2 large / XL: 36 x 1280 and 48 x 1600, vocabulary padded to 50304.
    for name, (n_layer, d) in {"gpt2-large": (36, 1280), "gpt2-xl": (48, 1600)}.items():
        expected = GPT2Config(n_layer=n_layer, n_head=16 if d == 1280 else 25, n_embd=d)
        assert preset(name).num_params == expected.num_params()


def test_every_preset_builds_and_summarizes():
    for name in PRESET_NAMES:
        spec = preset(name)
        assert spec.num_params > 0 and name in spec.summary()


def test_unknown_preset_suggests():
    with pytest.raises(PlannerError, match="gpt2-small"):
        preset("gpt2-smal")
    with pytest.raises(PlannerError, match="llama-7b"):
        preset("lama-7b")


def _write(tmp_path, cfg: dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_hf_gpt2_config(tmp_path):
    cfg = dict(
        model_type="gpt2",
        n_layer=3,
        n_embd=48,
        n_head=4,
        vocab_size=1000,
        n_positions=128,
        n_inner=None,
    )
    spec = spec_from_hf_config(_write(tmp_path, cfg))
    module = build_gpt2(
        "gpt2-tiny", device="meta", n_layer=3, n_embd=48, n_head=4, vocab_size=1000, block_size=128
    )
    assert spec.family == "gpt2" and spec.num_params == module.num_params()
    assert spec_from_hf_config(tmp_path).num_params == spec.num_params  # the folder works too


def test_hf_llama_mistral_qwen_configs(tmp_path):
    base = dict(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=160,
        vocab_size=500,
        max_position_embeddings=256,
    )
    d, kv, f, V, L = 64, 2 * 8, 160, 500, 2  # kv width = kv heads x head dim (8)
    per_layer = 2 * d + d * d + 2 * d * kv + d * d + 3 * d * f
    untied = V * d * 2 + L * per_layer + d
    llama = spec_from_hf_config(_write(tmp_path, dict(base, model_type="llama")))
    assert llama.family == "llama" and llama.n_kv_head == 2 and llama.num_params == untied
    mistral = spec_from_hf_config(_write(tmp_path, dict(base, model_type="mistral")))
    assert mistral.num_params == untied
    qwen = spec_from_hf_config(
        _write(tmp_path, dict(base, model_type="qwen2", tie_word_embeddings=True))
    )
    assert qwen.num_params == untied - V * d + L * (d + 2 * kv)  # tied; q/k/v biases


def test_hf_config_errors(tmp_path):
    with pytest.raises(PlannerError, match=r"no Hugging Face config\.json"):
        spec_from_hf_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlannerError, match="not valid JSON"):
        spec_from_hf_config(bad)
    with pytest.raises(PlannerError, match="llama"):
        spec_from_hf_config(_write(tmp_path, dict(model_type="lama", hidden_size=8)))
    with pytest.raises(PlannerError, match="lacks num_attention_heads"):
        spec_from_hf_config(_write(tmp_path, dict(model_type="llama", hidden_size=8)))
    with pytest.raises(PlannerError, match="positive integer"):
        spec_from_hf_config(
            _write(
                tmp_path,
                dict(
                    model_type="gpt2", n_layer=0, n_embd=8, n_head=2, vocab_size=10, n_positions=8
                ),
            )
        )


def test_spec_from_module_recognizes_gpt2_and_counts_generic():
    gpt2 = build_gpt2("gpt2-tiny", device="meta")
    assert spec_from_module(gpt2).params == preset("gpt2-tiny").params
    generic = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    spec = spec_from_module(generic)
    assert spec.family == "generic" and not spec.has_activation_model
    assert spec.num_params == sum(p.numel() for p in generic.parameters())
    assert [p.kind for p in spec.params] == ["embedding", "norm", "norm", "linear", "linear"]
    with pytest.raises(PlannerError, match="trace_step"):
        estimate(spec, TrainSetup())
    with pytest.raises(PlannerError, match=r"nn\.Module"):
        spec_from_module("gpt2")


# ---------------------------------------------------------------------------------- setups


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(micro_batch=0), "micro_batch must be a positive integer"),
        (dict(seq_len=-5), "seq_len must be a positive integer"),
        (dict(accum_steps=1.5), "accum_steps must be a positive integer"),
        (dict(state_bits=5), "state bits"),
        (dict(param_dtype="fp8"), "param dtype"),
        (dict(optimizer="adam"), "adamw"),
        (dict(phases=("full", "predcit")), "predict"),
        (dict(phases=()), "at least one phase"),
        (dict(master_weights=True), "low-precision parameters"),
        (dict(param_dtype="bf16", autocast="bf16"), "fp32 parameters"),
        (dict(grad_mode="hooks"), "hook"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_setup_rejects_nonsense(kwargs, message):
    with pytest.raises(PlannerError, match=message):
        TrainSetup(**kwargs)


def test_setup_presets_and_aliases():
    assert setup_preset("fp32").compute_dtype == "fp32"
    assert setup_preset("bf16-autocast").compute_dtype == "bf16"
    hybrid = setup_preset("hybrid", micro_batch=3)
    assert hybrid.grad_mode == "flat" and hybrid.state_bits == 8 and hybrid.micro_batch == 3
    assert hybrid.trainer  # HybridTrainer's own tensors counted
    # The trainer's grad_path "auto": hooks for several micro-batches, unless told.
    assert setup_preset("hybrid", accum_steps=4).grad_mode == "hook"
    assert setup_preset("bf16-master", grad_mode="hook").grad_mode == "hook"
    with pytest.raises(PlannerError, match="one micro-batch per step"):
        setup_preset("hybrid", accum_steps=4, grad_mode="flat")
    assert TrainSetup(param_dtype="bfloat16").param_dtype == "bf16"
    with pytest.raises(PlannerError, match="bf16-master"):
        setup_preset("bf16-mastr")


def test_estimate_rejects_bad_arguments():
    with pytest.raises(PlannerError, match="ModelSpec"):
        estimate("gpt2-small", TrainSetup())
    with pytest.raises(PlannerError, match="TrainSetup"):
        estimate(preset("gpt2-small"), {"micro_batch": 1})
    with pytest.raises(PlannerError, match="exceeds"):
        estimate(preset("gpt2-small"), TrainSetup(seq_len=2048))


# ----------------------------------------------------------------- components by hand

SMALL = preset("gpt2-small")
B, T = 4, 512
N = B * T
d, L, H, V, P = SMALL.d_model, SMALL.n_layer, SMALL.n_head, SMALL.vocab_size, SMALL.num_params


def _full(**kwargs):
    setup = TrainSetup(micro_batch=B, seq_len=T, logits_lifetime="loss_only", **kwargs)
    return estimate(SMALL, setup).phases["train"]  # a plain loop: one phase


def test_fp32_components_by_hand():
    full = _full()
    c = full.components
    assert full.peak_at == "backward: cross-entropy"
    assert c["weights"] == 4 * P
    # AdamW: two fp32 moments per tensor plus a 4-byte device step counter per tensor
    assert c["optimizer_state"] == 8 * P + 4 * len(SMALL.params)
    assert c["gradients"] == 0  # set to None after the step; none yet at this point
    # per block: x, qkv input, q/k/v, out, x1, MLP input (fp32 = 4 B) + GELU in/out (4d
    # each) = 16d elements, fp32 mean/rstd x2, logsumexp per head; then ln_f input+stats and
    # the head's input
    per_block = 4 * (d + d + 3 * d + d + d + d + 4 * d + 4 * d) + 2 * 8 + 4 * H
    assert c["activations"] == N * (L * per_block + 4 * d + 8 + 4 * d)
    # log-softmax output, its gradient from nll_loss, and log_softmax's gradient: fp32 [N, V]
    assert c["logits_and_loss"] == 3 * 4 * N * V
    assert c["workspace"] == CUBLAS_WORKSPACE
    assert c["inputs"] == 2 * 8 * N
    assert full.peak_bytes == sum(c.values())
    assert 0 <= c["allocator_rounding"] < ALLOC_ROUND * (3 * len(SMALL.params) + 40 * L + 20)


def test_autocast_components_by_hand():
    full = _full(autocast="bf16")
    c = full.components
    per_block = 4 * d * 2 + 2 * (d + 3 * d + d + d + 4 * d + 4 * d) + 2 * 8 + 4 * H
    assert c["activations"] == N * (L * per_block + 4 * d + 8 + 2 * d)
    # bf16 copies of every linear weight (the tied wte among them) are saved for backward;
    # bias copies died with autocast's cache at the end of forward
    weights = sum(p.numel for p in SMALL.params if p.kind == "linear" and "bias" not in p.name)
    assert c["autocast_cache"] == 2 * weights
    # F.cross_entropy: log_softmax keeps the logits' dtype (bf16, saved), nll_loss (autocast's
    # fp32 list) saves an fp32 copy, and its backward's fp32 gradient is alive beside both
    assert full.peak_at == "backward: cross-entropy"
    assert c["logits_and_loss"] == (2 + 4 + 4) * N * V


def test_fp32_held_logits_add_one_fp32_buffer():
    # the baseline recipes' ``_, loss = model(x, y)``: the fp32 logits live through backward
    held = estimate(SMALL, setup_preset("fp32", micro_batch=B, seq_len=T)).phases["train"]
    assert held.components["logits_and_loss"] == 4 * 4 * N * V
    assert held.peak_bytes - _full().peak_bytes == 4 * N * V


def test_autocast_forward_only_cross_entropy_by_hand():
    # Predict (no_grad) under autocast: bf16 logits, bf16 log-probabilities and nll_loss's fp32
    # copy of them are alive together at the loss; nothing vocabulary-sized is saved
    # (unchunked: loss_chunk_tokens=0, any model without GPT2's chunked no_grad loss)
    setup = TrainSetup(
        micro_batch=B, seq_len=T, autocast="bf16", phases=("predict",), loss_chunk_tokens=0
    )
    predict = estimate(SMALL, setup).phases["predict"]
    assert predict.peak_at == "forward: cross-entropy"
    assert predict.components["logits_and_loss"] == (2 + 2 + 4) * N * V


@pytest.mark.parametrize("param_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("chunk", [1, 7, 1024, 10**6])
def test_chunked_predict_loss_by_hand(param_dtype, chunk):
    # GPT2._chunked_loss: one chunk of C = min(chunk, N) positions at a time; at its top the
    # fp32 logits (bf16 parameters: a .to(fp32) copy, the bf16 ones freed) and cross-entropy's
    # fp32 log-probabilities are alive together: 8 bytes per position and vocabulary entry
    C = min(chunk, N)
    setup = TrainSetup(
        param_dtype=param_dtype, micro_batch=B, seq_len=T, phases=("predict",),
        loss_chunk_tokens=chunk,
    )  # fmt: skip
    predict = estimate(SMALL, setup).phases["predict"]
    if 4 * N * SMALL.d_model < 8 * C * V:  # else the blocks' activations are the peak
        assert predict.peak_at == "forward: chunked cross-entropy"
        assert predict.components["logits_and_loss"] == 8 * C * V


def test_chunked_predict_peak_does_not_grow_with_the_batch():
    def peak(micro_batch: int, chunk: int) -> int:
        setup = setup_preset("hybrid", micro_batch=micro_batch, loss_chunk_tokens=chunk)
        return estimate(SMALL, setup).phases["predict"].stage_peaks["forward"]

    # the logits part is one chunk's; what grows is the [N, d] activations only
    grow = peak(16, 1024) - peak(8, 1024)
    assert 0 < grow < 8 * 1024 * SMALL.d_model * 4 * 2
    # unchunked, the full [N, V] logits: much more than the chunked peak
    assert peak(8, 0) - peak(8, 1024) > 3 * (8 * 1024 - 2 * 1024) * V


def _round_up_512(nbytes: int) -> int:
    return -(-nbytes // 512) * 512


def test_loss_chunk_tokens_is_validated():
    for bad in (-1, 1.5, True, "1024"):
        with pytest.raises(PlannerError, match="loss_chunk_tokens"):
            TrainSetup(loss_chunk_tokens=bad)


def test_baseline_presets_hold_the_logits_for_the_step():
    # the recipes bind the logits to ``_`` until the step returns; the trainer drops them
    assert setup_preset("fp32").logits_lifetime == "step"
    assert setup_preset("bf16-autocast").logits_lifetime == "step"
    assert setup_preset("hybrid").logits_lifetime == "loss_only"
    assert setup_preset("bf16-master").logits_lifetime == "loss_only"


def test_logits_lifetime_adds_the_held_logits():
    base = _full(autocast="bf16").components["logits_and_loss"]
    for lifetime in ("step", "next_forward"):
        setup = TrainSetup(micro_batch=B, seq_len=T, autocast="bf16", logits_lifetime=lifetime)
        held = estimate(SMALL, setup).phases["train"].components["logits_and_loss"]
        assert held - base == 2 * N * V  # the bf16 logits


def test_checkpointing_keeps_block_inputs_only():
    c = _full(checkpointing=True).components
    assert c["activations"] == N * (L * 4 * d + 4 * d + 8 + 4 * d)
    assert _full(checkpointing=True).peak_bytes < _full().peak_bytes


def test_dynamics_model_params_match_the_trainers_model():
    from hybrid_triton.planner.estimate import dynamics_model_params
    from hybrid_triton.trainer import RSSMDynamics

    for groups in (1, 7, 16):
        built = RSSMDynamics(groups, "cpu").model
        assert dynamics_model_params(groups) == sum(p.numel() for p in built.parameters())


def test_fit_and_multi_gpu_plans_follow_the_trainers_gradient_path():
    from hybrid_triton.planner.distributed import estimate_per_rank
    from hybrid_triton.planner.fit import fit

    one = fit(preset("gpt2-small"), "a100-40gb")
    four = fit(preset("gpt2-small"), "a100-40gb", accum_steps=4)
    masters = [c.setup for c in (one.best, *one.alternatives) if c.setup.master_weights]
    assert masters and all(s.grad_mode == "flat" for s in masters)
    masters = [c.setup for c in (four.best, *four.alternatives) if c.setup.master_weights]
    assert masters and all(s.grad_mode == "hook" for s in masters)
    # DistributedHybridTrainer always uses the hooks: a multi-GPU plan models them.
    setup = setup_preset("hybrid", micro_batch=2, seq_len=128)
    assert setup.grad_mode == "flat"
    ranks = estimate_per_rank(preset("gpt2-small"), setup, 2, "ddp")
    hooks = estimate_per_rank(preset("gpt2-small"), setup.replace(grad_mode="hook"), 2, "ddp")
    assert ranks.phases["full"].peak_bytes == hooks.phases["full"].peak_bytes


@pytest.mark.parametrize("grad_mode, grad_bytes", [("hook", 4), ("flat", 2)])
def test_hybrid_model_state_by_hand(grad_mode, grad_bytes):
    setup = setup_preset("hybrid", micro_batch=B, seq_len=T, grad_mode=grad_mode)
    full = estimate(SMALL, setup).phases["full"]
    c = full.components
    scales = 4 * math.ceil(P / 256)
    assert c["weights"] == 2 * P
    assert c["master_weights"] == 4 * P
    # hook: the fp32 accumulator; flat: the bf16 buffer the .grad views share
    assert c["gradients"] == grad_bytes * P
    assert c["optimizer_state"] == 2 * (P + scales)  # two int8 moments + fp32 scales
    assert c["autocast_cache"] == 0


@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_state_bits(bits):
    setup = setup_preset("bf16-master", micro_batch=1, seq_len=64, state_bits=bits)
    state = estimate(SMALL, setup).phases["full"].components["optimizer_state"]
    if bits >= 16:
        per_moment = P * bits // 8
    elif bits == 8:  # int8 codes + an fp32 scale per 256
        per_moment = P + 4 * math.ceil(P / 256)
    else:  # two codes a byte, padded to whole blocks of 128, + an fp32 scale per 128
        blocks = math.ceil(P / 128)
        per_moment = blocks * 64 + 4 * blocks
    assert state == 2 * per_moment


def test_state_blocks_match_the_optimizer():
    from hybrid_triton.kernels.adamw import DEFAULT_QBLOCK

    assert STATE_BLOCK == DEFAULT_QBLOCK


def test_trainer_predict_entry_and_correct_by_hand():
    setup = setup_preset("hybrid", micro_batch=2, seq_len=128, logits_lifetime="loss_only")
    assert setup.trainer  # hook-folded gradients: HybridTrainer's own tensors are counted
    est = estimate(preset("gpt2-medium"), setup)
    Pm = est.spec.num_params
    predict = est.phases["predict"]
    from hybrid_triton.planner.estimate import direction_groups, dynamics_model_params

    # Predict entry: the accumulator is freed first; the moments are still on the GPU; the
    # compact direction is built and quantized one segment group at a time, in arena order
    # (HybridTrainer._enter_predict): group i's temporaries sit beside groups 0..i-1's int8
    # directions only, and its fp32 direction beside its own int8 one while quantized
    groups = direction_groups(est.spec)
    compact = [n + 4 * math.ceil(n / DIRECTION_BLOCK) for n in groups]
    direction = sum(compact)
    building = max(
        sum(compact[:i]) + max(PREDICT_ENTRY_TEMP_BYTES[8] * n, 4 * n + compact[i])
        for i, n in enumerate(groups)
    )
    moments = 2 * (Pm + 4 * math.ceil(Pm / 256))
    inputs = 2 * 8 * 2 * 128
    # the dynamics model: weights, gradients and two Adam moments, fp32 (a Predict phase)
    dynamics = 16 * dynamics_model_params(len(groups))
    assert predict.components["dynamics_model"] == dynamics
    entry = 2 * Pm + 4 * Pm + moments + building + CUBLAS_WORKSPACE + inputs + dynamics
    assert 0 <= predict.stage_peaks["predict entry"] - entry < 16 * ALLOC_ROUND
    # The entry is a transition with its own peak (the trainer's "enter:predict"); the
    # phase's peak comes after it: bf16 weights and the compact direction, no accumulator, no
    # master (bf16 models: the host snapshot is its copy), moments per policy.
    assert predict.peak_at.startswith("forward")
    assert predict.stage_peaks["predict entry"] > predict.peak_bytes
    c = predict.components
    assert c["weights"] == 2 * Pm and c["master_weights"] == 0 and c["gradients"] == 0
    kept = setup.predict_moments in ("keep", "compress")
    assert (c["optimizer_state"] > 0) is kept and c["temporaries"] == 0
    assert c["update_direction"] == direction
    assert c["workspace"] == CUBLAS_WORKSPACE
    assert predict.peak_bytes == sum(c.values())
    full, correct = est.phases["full"], est.phases["correct"]
    assert correct.components["update_direction"] == direction
    # Correct holds the direction throughout, and the pre-step master copy during its step
    # (stage peaks count allocated blocks: each rounded up to ALLOC_ROUND)
    rounded = sum(
        -(-n // ALLOC_ROUND) * ALLOC_ROUND
        for g in groups
        for n in (g, 4 * math.ceil(g / DIRECTION_BLOCK))
    )
    assert correct.stage_peaks["backward"] - full.stage_peaks["backward"] == rounded

    def up(n: int) -> int:
        return -(-n // ALLOC_ROUND) * ALLOC_ROUND

    # Full steps of a run with Predict copy the master around the step (the dynamics model's
    # update norms); Warmup steps do not.
    warmup = est.phases["warmup"]
    assert full.stage_peaks["optimizer"] - warmup.stage_peaks["optimizer"] == up(4 * Pm)
    # Correct: the same copy, then one segment group of the predicted update dequantized to
    # fp32 at a time, then the residual's fp32 error-feedback buffer and int8 codes (larger,
    # so the stage's peak)
    group = up(4 * max(direction_groups(est.spec)))
    residual = up(4 * Pm) + up(Pm + 4 * math.ceil(Pm / DIRECTION_BLOCK))
    assert residual > group
    assert correct.stage_peaks["optimizer"] - full.stage_peaks["optimizer"] == rounded + residual
    # Without Predict: no copy, and the dynamics model holds only its weights (never trains)
    no_predict = estimate(preset("gpt2-medium"), setup.replace(phases=("warmup", "full")))
    dyn = dynamics_model_params(len(groups))
    untrained = up(16 * dyn) - up(4 * dyn)
    assert no_predict.phases["full"].stage_peaks["optimizer"] == (
        warmup.stage_peaks["optimizer"] - untrained
    )
    loop = setup.replace(trainer=False, phases=setup.phases)  # a plain loop with a Predict
    plain = estimate(preset("gpt2-medium"), loop).phases["predict"]
    # Entry apart, the trainer's Predict holds less than a plain loop's: no fp32 master.
    assert plain.peak_at.startswith("forward") and predict.peak_bytes < plain.peak_bytes
    assert plain.components["master_weights"] == 4 * Pm


def test_accumulation_second_micro_batch_sees_gradients():
    one = _full()
    two = _full(accum_steps=2)
    assert two.components["gradients"] == 4 * P
    assert two.peak_bytes - one.peak_bytes >= 4 * P


def test_predict_phase_policies():
    def predict(**kw):
        setup = TrainSetup(micro_batch=B, seq_len=T, autocast="bf16", phases=("predict",), **kw)
        return estimate(SMALL, setup).phases["predict"]

    from hybrid_triton.planner.estimate import direction_groups

    # one int8 direction per segment group (quantize_blockwise per group)
    direction = sum(n + 4 * math.ceil(n / DIRECTION_BLOCK) for n in direction_groups(SMALL))
    offloaded = predict(predict_moments="offload")
    assert offloaded.components["optimizer_state"] == 0
    assert offloaded.components["gradients"] == 0
    # at the chunked loss only the final norm's [N, d] output is an activation
    assert offloaded.components["activations"] <= _round_up_512(N * SMALL.d_model * 4)
    assert offloaded.components["update_direction"] == direction
    assert offloaded.peak_at.startswith("forward")
    kept = predict(predict_moments="keep")
    assert kept.components["optimizer_state"] == 8 * P + 4 * len(SMALL.params)
    compressed = predict(predict_moments="compress")
    assert compressed.components["optimizer_state"] == sum(
        2 * (p.numel + 4 * math.ceil(p.numel / STATE_BLOCK[8])) + 4 for p in SMALL.params
    )
    assert predict(predict_moments="drop").components["optimizer_state"] == 0
    phases = ("full", "predict")
    full = estimate(SMALL, TrainSetup(micro_batch=B, seq_len=T, autocast="bf16", phases=phases))
    assert full.peak_phase == "full" and full.phase_peak_bytes["predict"] < full.peak_bytes


@pytest.mark.parametrize("name", ["gpt2-medium", "llama-1b"])
def test_peak_grows_with_batch_and_sequence(name):
    spec = preset(name)
    peaks = [
        estimate(spec, TrainSetup(autocast="bf16", micro_batch=b, seq_len=t)).peak_bytes
        for b, t in [(1, 128), (2, 128), (2, 256), (4, 256)]
    ]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4


def test_math_attention_counts_the_scores():
    flash = _full(autocast="bf16").components["activations"]
    math_ = _full(autocast="bf16", attention="math").components["activations"]
    # each block saves the bf16 softmax output [B, H, T, T] and no fp32 logsumexp
    assert math_ - flash == L * N * (2 * H * T - 4 * H)


def test_phase_subset_and_json_schema():
    setup = TrainSetup(micro_batch=1, seq_len=64, phases=("full", "predict"))
    est = estimate(SMALL, setup)
    assert list(est.phase_peak_bytes) == ["full", "predict"]
    data = json.loads(json.dumps(est.to_dict()))
    assert set(data) >= {
        "model",
        "num_params",
        "setup",
        "phase_peak_bytes",
        "peak_phase",
        "peak_bytes",
        "cuda_context_bytes",
        "device_bytes",
        "phases",
        "allocator",
        "reserved_peak_bytes",
    }
    assert data["allocator"] == data["setup"]["allocator"] == "native"
    for phase in data["phases"].values():
        assert set(phase) == {
            "phase",
            "peak_bytes",
            "peak_at",
            "components",
            "stage_peaks",
            "segment_slack_bytes",
            "largest_transient_bytes",
            "largest_transient_component",
            "allocator",
            "allocator_slack_bytes",
            "reserved_bytes",
        }
        assert all(isinstance(v, int) and v >= 0 for v in phase["components"].values())
        assert sum(phase["components"].values()) == phase["peak_bytes"]
        assert phase["reserved_bytes"] == phase["peak_bytes"] + phase["allocator_slack_bytes"]
    assert data["reserved_peak_bytes"] == max(p["reserved_bytes"] for p in data["phases"].values())
    assert data["device_bytes"] == data["reserved_peak_bytes"] + data["cuda_context_bytes"]


@pytest.mark.parametrize("max_groups", [16, 3])
def test_direction_groups_match_the_trainer(max_groups):
    from hybrid_triton.arena import FlatArena
    from hybrid_triton.planner.estimate import direction_groups
    from hybrid_triton.trainer import segment_groups

    module = build_gpt2("gpt2-tiny", n_layer=4, n_embd=32, n_head=2, vocab_size=97, block_size=16)
    table = FlatArena.from_module(module).group.table
    real = [sum(table[i].numel for i in ids) for _, _, ids in segment_groups(table, max_groups)]
    assert direction_groups(spec_from_module(module), max_groups) == real


# ------------------------------------------------------------------------------ allocator

EXPANDABLE_PAGE_BYTES = 20 * 2**20  # PyTorch's kLargeBuffer: the large pool's page


def test_allocator_is_validated_and_described():
    with pytest.raises(PlannerError, match=r"unknown allocator 'cuda-malloc'.*expandable, native"):
        TrainSetup(allocator="cuda-malloc")
    assert TrainSetup().allocator == "native"
    assert "expandable segments" in TrainSetup(allocator="expandable").describe()
    assert "expandable" not in TrainSetup().describe()


@pytest.mark.parametrize(
    "preset_name, vocab_bytes",
    [("bf16-autocast", 4), ("bf16-master", 2), ("fp32", 4)],
    ids=["autocast-fp32-nll", "bf16-logits", "fp32-logits"],
)
def test_allocators_change_the_reserved_peak_only(preset_name, vocab_bytes):
    from hybrid_triton.planner.estimate import NATIVE_FRAGMENTATION

    B, T = 4, 512
    native = estimate(SMALL, setup_preset(preset_name, micro_batch=B, seq_len=T))
    expandable = estimate(
        SMALL, setup_preset(preset_name, micro_batch=B, seq_len=T, allocator="expandable")
    )
    assert native.phase_peak_bytes == expandable.phase_peak_bytes
    full_n, full_e = native.phases[native.peak_phase], expandable.phases[native.peak_phase]
    # The largest transient block at the peak (cross-entropy backward) is one [N, V] buffer:
    # fp32 under autocast (nll_loss's input and gradient), else the compute dtype.
    logits = B * T * SMALL.vocab_size * vocab_bytes
    assert full_n.largest_transient_bytes == -(-logits // ALLOC_ROUND) * ALLOC_ROUND
    assert full_n.largest_transient_component == "logits_and_loss"
    assert full_n.reserved_bytes == (
        full_n.peak_bytes
        + full_n.segment_slack_bytes
        + int(NATIVE_FRAGMENTATION * full_n.largest_transient_bytes)
    )
    pages = math.ceil(full_e.peak_bytes / EXPANDABLE_PAGE_BYTES) + 1
    assert full_e.reserved_bytes == pages * EXPANDABLE_PAGE_BYTES
    assert (
        full_e.peak_bytes < full_e.reserved_bytes <= full_e.peak_bytes + 2 * EXPANDABLE_PAGE_BYTES
    )
    assert full_e.reserved_bytes < full_n.reserved_bytes
    for est in (native, expandable):
        assert est.reserved_peak_bytes == max(p.reserved_bytes for p in est.phases.values())
        assert est.device_bytes() == est.reserved_peak_bytes + est.cuda_context_bytes


def test_with_allocator_is_a_fresh_estimate_under_that_allocator():
    setup = setup_preset("hybrid", micro_batch=2, seq_len=256)
    native = estimate(SMALL, setup)
    swapped = native.with_allocator("expandable")
    fresh = estimate(SMALL, setup.replace(allocator="expandable"))
    assert swapped.to_dict() == fresh.to_dict()
    assert native.setup.allocator == "native"  # the original is untouched


@pytest.mark.parametrize("allocator", ["native", "expandable"])
def test_per_rank_estimate_uses_the_same_allocator_slack(allocator):
    from hybrid_triton.planner import estimate_per_rank
    from hybrid_triton.planner.estimate import CUDA_CONTEXT

    setup = setup_preset("bf16-master", micro_batch=2, seq_len=256, allocator=allocator)
    single = estimate(SMALL, setup)
    one = estimate_per_rank(SMALL, setup, 1, "ddp")  # one replicated rank: the single GPU
    assert one.reserved_peak_bytes == single.reserved_peak_bytes
    assert one.device_bytes() == single.device_bytes()
    sharded = estimate_per_rank(SMALL, setup, 4, "fsdp")
    assert sharded.device_bytes() == sharded.reserved_peak_bytes + CUDA_CONTEXT
    data = json.loads(json.dumps(sharded.to_dict()))
    assert data["allocator"] == allocator
    assert data["reserved_peak_bytes"] == sharded.reserved_peak_bytes
    for phase in sharded.phases.values():
        single_phase = single.phases[phase.phase]
        assert phase.allocator == allocator
        assert phase.largest_transient_bytes >= single_phase.largest_transient_bytes
        assert phase.reserved_bytes == phase.peak_bytes + phase.allocator_slack_bytes
