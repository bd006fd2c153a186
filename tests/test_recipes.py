"""Training recipes on CPU with a tiny GPT-2: the step's accumulation, the LR schedule, and a
few steps of run_training (what it records, determinism, learning)."""

from __future__ import annotations

import math

import pytest
import torch

from hybrid_triton.data import load_corpus
from hybrid_triton.models.gpt2 import GPT2Config
from hybrid_triton.recipes import RECIPES, OptimConfig, build_recipe, run_training

TINY = GPT2Config.from_name("gpt2-tiny", vocab_size=320, block_size=64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cache = tmp_path_factory.mktemp("recipes_cache")
    return load_corpus(tokenizer="byte", max_files=60, val_every=5, cache_dir=cache)


def test_recipes_registered():
    assert {"baseline_fp32", "baseline_bf16"} <= set(RECIPES)
    fp32 = build_recipe("baseline_fp32", TINY)
    bf16 = build_recipe("baseline_bf16", TINY)
    assert fp32.autocast_dtype is None and bf16.autocast_dtype is torch.bfloat16
    for parts in (fp32, bf16):
        assert isinstance(parts.optimizer, torch.optim.AdamW)
        assert all(p.dtype == torch.float32 for p in parts.model.parameters())
        assert not parts.optimizer.defaults["fused"]  # fused only on CUDA
    with pytest.raises(ValueError, match="unknown recipe"):
        build_recipe("toolkit_magic", TINY)


def _capture_grads(parts) -> list[dict]:
    """Record the gradients the optimizer sees at each step (Adam's first step divides each
    gradient by its own size, so compare gradients, not updated weights)."""
    seen: list[dict] = []
    original = parts.optimizer.step

    def step(*args, **kwargs):
        seen.append({n: p.grad.clone() for n, p in parts.model.named_parameters()})
        return original(*args, **kwargs)

    parts.optimizer.step = step
    return seen


def test_accumulated_step_equals_one_big_batch():
    # Two micro-batches of 2 must give the gradient of one batch of 4 (the loss is a mean).
    x = torch.randint(0, 320, (4, 16))
    y = torch.randint(0, 320, (4, 16))
    optim = OptimConfig(grad_clip=0.0)
    torch.manual_seed(0)
    a = build_recipe("baseline_fp32", TINY, optim=optim)
    torch.manual_seed(0)
    b = build_recipe("baseline_fp32", TINY, optim=optim)
    before = [p.detach().clone() for p in a.model.parameters()]
    grads_a, grads_b = _capture_grads(a), _capture_grads(b)
    loss_a = a.step([(x[:2], y[:2]), (x[2:], y[2:])], 1e-3)
    loss_b = b.step([(x, y)], 1e-3)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)
    assert len(grads_a) == len(grads_b) == 1, "one optimizer step per call"
    for name, g in grads_b[0].items():
        torch.testing.assert_close(grads_a[0][name], g, rtol=1e-5, atol=1e-8, msg=name)
    assert all(p.grad is None for p in a.model.parameters()), "grads are freed after the step"
    assert any((p != p0).any() for p, p0 in zip(a.model.parameters(), before)), "weights moved"


def test_grad_clip_applies():
    optim = OptimConfig(grad_clip=1e-3)
    parts = build_recipe("baseline_fp32", TINY, optim=optim)
    grads = _capture_grads(parts)
    x = torch.randint(0, 320, (2, 16))
    parts.step([(x, x)], 1e-3)
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[0].values()]))
    assert total == pytest.approx(1e-3, rel=1e-4)


def test_lr_schedule():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert cfg.lr_at(0, 20) == pytest.approx(0.25)
    assert cfg.lr_at(3, 20) == pytest.approx(1.0)
    assert cfg.lr_at(4, 20) == pytest.approx(1.0)
    assert cfg.lr_at(12, 20) == pytest.approx(0.55)
    assert cfg.lr_at(20, 20) == pytest.approx(0.1)


@pytest.mark.parametrize("recipe", ["baseline_fp32", "baseline_bf16"])
def test_run_training_records_and_learns(corpus, recipe):
    kwargs = dict(
        model_cfg=TINY,
        tokens=2 * 2 * 32 * 6,
        micro_batch=2,
        accum=2,
        seq_len=32,
        eval_every=3,
        corpus=corpus,
        optim=OptimConfig(lr=1e-2, warmup_steps=1),
        eval_batches=2,
    )
    result = run_training(recipe, seed=1, **kwargs)
    assert result.config["steps"] == 6 and result.tokens_trained == 768
    assert len(result.step_loss) == len(result.step_time_s) == len(result.step_lr) == 6
    assert all(t > 0 for t in result.step_time_s) and result.tokens_per_s > 0
    assert [e["step"] for e in result.evals] == [3, 6]
    for e in result.evals:
        assert e["val_ppl"] == pytest.approx(math.exp(e["val_loss"]))
    assert result.step_loss[0] == pytest.approx(math.log(320), abs=0.5)
    assert result.step_loss[-1] < result.step_loss[0] - 1.0, result.step_loss
    assert result.evals[-1]["val_loss"] < result.evals[0]["val_loss"]
    assert result.peak_memory_allocated is None  # CPU
    if recipe == "baseline_fp32":  # determinism, checked once to keep the CPU run short
        again = run_training(recipe, seed=1, **kwargs)
        assert again.step_loss == result.step_loss, "same seed, same run"
        other = run_training(recipe, seed=2, **kwargs)
        assert other.step_loss != result.step_loss


def test_run_training_bad_input(corpus):
    base = dict(
        model_cfg=TINY, tokens=100, micro_batch=1, accum=1, seq_len=8, eval_every=1, corpus=corpus
    )
    with pytest.raises(ValueError, match="block_size"):
        run_training("baseline_fp32", **{**base, "seq_len": 65})
    with pytest.raises(ValueError, match="vocab"):
        run_training("baseline_fp32", **{**base, "model_cfg": TINY.__class__(vocab_size=100)})
    with pytest.raises(ValueError, match="micro_batch"):
        run_training("baseline_fp32", **{**base, "micro_batch": 0})
    with pytest.raises(ValueError, match="unknown recipe"):
        run_training("nope", **base)
    with pytest.raises(ValueError, match="tokens"):
        run_training("baseline_fp32", **{**base, "tokens": 0})


@pytest.mark.gpu
def test_run_training_on_gpu_records_memory(corpus):
    result = run_training(
        "baseline_bf16", TINY, 4096, 4, 2, 64, 4, corpus=corpus, device="cuda", eval_batches=2
    )
    assert result.peak_memory_allocated and result.peak_memory_allocated > 0
    assert len(result.step_time_s) == result.config["steps"]
