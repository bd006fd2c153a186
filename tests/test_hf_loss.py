"""The chunked causal-LM loss on real Hugging Face modules: transformers' own loss, no logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hybrid_triton.models.hf_loss import causal_lm_loss, chunked_loss_blocker  # noqa: E402


def _tiny(model_type: str = "llama", **extra):
    cfg = transformers.AutoConfig.for_model(
        model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,  # prime: chunks never line up with the vocabulary
        max_position_embeddings=64,
        pad_token_id=None,
        **extra,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").double()


def _reference(model, ids, labels, num_items=None):
    """transformers' loss semantics in float64 (its own loss upcasts to fp32 only)."""
    logits = model(input_ids=ids).logits
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    reduction = "mean" if num_items is None else "sum"
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shift.reshape(-1), reduction=reduction
    )
    return loss if num_items is None else loss / num_items


@pytest.mark.parametrize("chunk", [1, 7, 1024], ids=["chunk1", "chunk7", "one-chunk"])
def test_equals_transformers_loss_and_gradients(chunk):
    model = _tiny()
    ids = torch.randint(0, 97, (3, 11))
    labels = ids.clone()
    labels[0, :4] = -100  # masked prompt tokens
    hf = model(input_ids=ids, labels=labels).loss  # fp32: transformers upcasts to float
    ref = _reference(model, ids, labels)
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, ids, labels, chunk_tokens=chunk)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.float(), hf, rtol=1e-6, atol=1e-6)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-10)


def test_num_items_in_batch_sums_like_the_trainer():
    model = _tiny()
    ids = torch.randint(0, 97, (2, 9))
    hf = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(40)).loss
    loss = causal_lm_loss(model, ids, ids, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(loss, _reference(model, ids, ids, 40), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.float(), hf, rtol=1e-6, atol=1e-6)


def test_heads_the_chunked_loss_cannot_compute_are_refused():
    gemma2 = _tiny("gemma2", head_dim=8, final_logit_softcapping=30.0)
    assert "final_logit_softcapping" in chunked_loss_blocker(gemma2)
    with pytest.raises(ValueError, match="softcapping"):
        causal_lm_loss(
            gemma2, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
        )
    assert chunked_loss_blocker(torch.nn.Linear(2, 2)) is not None
    with pytest.raises(ValueError, match="shape"):
        causal_lm_loss(
            _tiny(), torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)
        )


def test_planner_traces_the_chunked_loss_without_logits():
    from hybrid_triton.planner import TrainSetup
    from hybrid_triton.planner.hf import trace_hf

    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
               max_position_embeddings=512, pad_token_id=None)  # fmt: skip
    base = TrainSetup(param_dtype="bf16", state_bits=16, micro_batch=2, seq_len=256,
                      phases=("full",), loss_chunk_tokens=128)  # fmt: skip
    hf = trace_hf(cfg, base)
    chunked = trace_hf(cfg, base.replace(fused_loss=True))
    tokens, vocab = 2 * 256, 8192
    # transformers' loss holds bf16 logits and their fp32 copy (6 B per token and entry) at
    # least; the chunked loss one chunk of 128 positions
    assert hf.peak_bytes - chunked.peak_bytes >= 6 * tokens * vocab - 2 * 128 * vocab


def test_planner_traces_liger_fused_loss_like_the_toolkit_one():
    from hybrid_triton.planner import PlannerError, TrainSetup, estimate, preset
    from hybrid_triton.planner.hf import trace_hf

    cfg = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
               max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip
    base = TrainSetup(autocast="bf16", micro_batch=2, seq_len=256, phases=("full",))
    hf = trace_hf(cfg, base)
    liger = trace_hf(cfg, base.replace(fused_loss=True, fused_loss_impl="liger"))
    # no [N, V] logits: at least the fp32 copy of the logits (4 B per token and entry) less
    assert hf.peak_bytes - liger.peak_bytes >= 4 * 2 * 256 * 8192 - 8192 * 64 * 4
    assert "Liger" in base.replace(fused_loss=True, fused_loss_impl="liger").describe()
    with pytest.raises(PlannerError, match="tracing"):  # the formulas do not model it
        estimate(preset("gpt2-tiny"), base.replace(fused_loss=True, fused_loss_impl="liger",
                                                   seq_len=64))  # fmt: skip
