"""``prepare`` on Hugging Face models built from tiny configs: what it applies, that the model
still trains to transformers' own loss, and that a refusal leaves the model untouched."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hybrid_triton.optim import FusedAdamW  # noqa: E402
from hybrid_triton.preparation import PrepareError, prepare  # noqa: E402

VOCAB = 101


def _tiny(model_type: str = "llama", seed: int = 0, **extra):
    cfg = transformers.AutoConfig.for_model(
        model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=None,
        **extra,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def _prepare(model, **kwargs):
    args = dict(gpu=16, batch_size=2, seq_len=16, device="cpu", lr=1e-2)
    return prepare(model, **{**args, **kwargs})


def test_applies_the_plan_and_keeps_the_fp32_values_as_master():
    model = _tiny()
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    prepared = _prepare(model)
    assert prepared.model is model
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    opt = prepared.optimizer
    assert isinstance(opt, FusedAdamW) and opt.state_bits == 8
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    for param, master in opt.master_views():
        assert torch.equal(master, fp32[names[id(param)]])  # not the bf16 rounding
    assert opt.flat_grad is not None  # one micro-batch: the flat bf16 gradient buffer
    text = str(prepared)
    assert "applied:" in text and "FusedAdamW" in text and "chunked linear" in text
    assert prepared.plan.peak_bytes > 0 and prepared.setup.fused_loss


def test_prepared_model_trains_on_transformers_loss():
    model = _tiny()
    reference = _tiny()  # same seed: the same weights
    ids = torch.randint(0, VOCAB, (2, 16))
    prepared = _prepare(model)
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None  # the chunked loss makes none
    with torch.no_grad():
        ref = reference(input_ids=ids, labels=ids).loss
    assert abs(out.loss.item() - ref.item()) < 0.05  # bf16 weights against fp32
    losses = [out.loss.item()]
    out.loss.backward()
    prepared.optimizer.step()
    prepared.optimizer.zero_grad()
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        prepared.optimizer.step()
        prepared.optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1  # memorizes one batch
    generated = model(input_ids=ids[:, :4])  # without labels: the model's own forward
    assert generated.logits.shape == (2, 4, VOCAB)


def test_nothing_fits_leaves_the_model_untouched():
    model = _tiny()
    before = {n: (p.dtype, p.detach().clone()) for n, p in model.named_parameters()}
    forward = model.forward
    with pytest.raises(PrepareError, match="nothing fits"):
        _prepare(model, gpu=0.05)
    assert model.forward == forward
    for n, p in model.named_parameters():
        assert p.dtype == before[n][0] and torch.equal(p, before[n][1])


def test_checkpointing_and_accumulation_when_asked():
    model = _tiny()
    prepared = _prepare(model, checkpointing=True, accum_steps=2)
    assert model.is_gradient_checkpointing
    assert prepared.setup.grad_mode == "hook"
    ids = torch.randint(0, VOCAB, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="1 of 2 micro-batches"):
        prepared.optimizer.step()
    model(input_ids=ids, labels=ids).loss.backward()
    prepared.optimizer.step()  # the second micro-batch completes the window


def test_refusals_name_what_was_expected():
    with pytest.raises(PrepareError, match="batch_size"):
        _prepare(_tiny(), batch_size=0)
    with pytest.raises(PrepareError, match="state_bits"):
        _prepare(_tiny(), state_bits=5)
    gemma2 = _tiny("gemma2", head_dim=8, final_logit_softcapping=30.0)
    with pytest.raises(PrepareError, match="softcapping"):
        _prepare(gemma2, chunked_loss=True)
    assert all(p.dtype == torch.float32 for p in gemma2.parameters())
    with pytest.raises(PrepareError, match=r"nn\.Module"):
        prepare("model", batch_size=1, seq_len=1)


def test_leanest_setup_has_no_master_copy_and_still_trains():
    model = _tiny()
    prepared = _prepare(model, master_weights=False, state_bits=4)
    opt = prepared.optimizer
    assert not opt.master_weights and opt.state_bits == 4
    assert prepared.plan.components["master_weights"] == 0
    ids = torch.randint(0, VOCAB, (2, 16))
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


class _Blocks(torch.nn.Module):
    """A module that is neither a Hugging Face model nor the project's GPT-2."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU()) for _ in range(3)
        )
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_any_module_without_a_plan_and_with_wrapped_blocks():
    with pytest.raises(PrepareError, match="plan=False"):
        _prepare(_Blocks())
    torch.manual_seed(1)
    plain = _Blocks()
    torch.manual_seed(1)
    wrapped = _Blocks()
    a = _prepare(plain, plan=False, checkpointing=False)
    b = _prepare(wrapped, plan=False, checkpointing=True)
    assert a.plan is None and "not planned" in str(a)
    assert any("3 Sequential blocks" in line for line in b.applied)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    for model in (plain, wrapped):
        model(x).float().square().mean().backward()
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        assert torch.equal(p.grad, q.grad)  # recomputation gives the same gradients
