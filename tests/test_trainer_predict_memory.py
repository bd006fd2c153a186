"""What the trainer's Predict phase holds and frees (CPU: seen through tensor storages and a
dispatch mode that records every allocation of a Predict step).

- the update direction of 8/4-bit moments is built group by group and equals the one built
  from the whole dequantized moments (``dequantize_moments_ref``, the reference);
- during Predict the gradient accumulator has no storage and no ``.grad`` exists;
- with ``offload="cpu"`` the moment buffers have no storage during Predict and are back after;
- a Predict step of a GPT-2 never allocates the [B, T, V] logits (chunked loss under no_grad),
  nor a temporary of the arena's size.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from hybrid_triton.kernels.adamw import dequantize_moments_ref
from torch.utils._python_dispatch import TorchDispatchMode

from hybrid_triton.models.gpt2 import build_gpt2
from hybrid_triton.scheduler import Phase, TrainerConfig
from hybrid_triton.trainer import HybridTrainer, TrendDynamics

VOCAB = 509
SMALL = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=VOCAB)
B, T = 2, 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _AlwaysConfident(TrendDynamics):
    """Enter Predict as soon as Full ends (memory is tested here, not predictions)."""

    def confidence(self) -> float:
        return 1.0


class Allocations(TorchDispatchMode):
    """(numel, dtype, shape) of every new tensor an op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # In-place and out= ops return a tensor they were given: not an allocation.
            if isinstance(t, torch.Tensor) and not any(t is a for a in inputs):
                self.seen.append((t.numel(), t.dtype, tuple(t.shape)))
        return out

    def largest_logits(self) -> int:
        return max((n for n, _, shape in self.seen if shape and shape[-1] == VOCAB), default=0)

    def arena_sized_fp32(self, n: int) -> int:
        return sum(1 for numel, dtype, _ in self.seen if numel >= n and dtype == torch.float32)


def make(state_bits: int, offload: str = "cpu", qblock: int | None = None) -> HybridTrainer:
    torch.manual_seed(0)
    model = build_gpt2("gpt2-tiny", **SMALL, loss_chunk_tokens=8)
    cfg = TrainerConfig(
        warmup_steps=1,
        full_steps=2,
        min_predict_steps=2,
        max_predict_steps=2,
        correct_steps=1,
        confidence_threshold=0.5,
        max_consecutive_predicts=1,
        offload=offload,
        lookahead=0,  # the restore starts when Predict ends: every Predict step is offloaded
        host_lag=0,
    )
    trainer = HybridTrainer(
        model,
        lambda m, b: m(b[0], b[1])[1],
        config=cfg,
        lr=1e-3,
        optimizer_kwargs={"state_bits": state_bits, "qblock": qblock},
        dynamics=None,
    )
    trainer.dynamics = _AlwaysConfident(trainer.num_groups, "cpu")
    return trainer


def batch(i: int):
    g = torch.Generator().manual_seed(i)
    return (
        torch.randint(0, VOCAB, (B, T), generator=g),
        torch.randint(0, VOCAB, (B, T), generator=g),
    )


@pytest.mark.parametrize("state_bits", [8, 4], ids=["8bit", "4bit"])
def test_direction_by_group_equals_whole_arena_reference(state_bits):
    # A large quantization block, so segment groups start inside blocks.
    trainer = make(state_bits, offload="keep", qblock=2048)
    for i in range(3):  # Warmup + Full: the moments are non-zero
        trainer.step(batch(i))
    opt = trainer.optimizer
    st, n, q = opt.flat_state, trainer.group.numel, opt.qblock
    m = dequantize_moments_ref(st["exp_avg"], st["exp_avg_scale"], n, state_bits, "exp_avg", q)
    v = dequantize_moments_ref(
        st["exp_avg_sq"], st["exp_avg_sq_scale"], n, state_bits, "exp_avg_sq", q
    )
    hp = opt.param_groups[0]
    beta1, beta2 = hp["betas"]
    t = float(st["step"])
    expected = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + hp["eps"])
    expected = expected + hp["weight_decay"] * trainer.master
    got = torch.cat(list(trainer._direction_groups()))
    assert got.shape == (n,)
    # Group boundaries fall inside quantization blocks: each group decodes its covering blocks.
    assert any(start % q for start, _, _ in trainer.groups), "no group starts mid-block"
    assert_close("direction", got, expected, rtol=1e-5, atol=1e-7)
    trainer.close()


@pytest.mark.parametrize("state_bits", [32, 8], ids=["32bit", "8bit"])
def test_predict_frees_gradients_moments_and_logits(state_bits):
    trainer = make(state_bits, offload="cpu")
    acc = trainer.accum.accumulator
    moments = trainer.optimizer.state_tensors()
    n = trainer.group.numel
    for i in range(3):
        trainer.step(batch(i))
    assert trainer.phase is not Phase.PREDICT
    assert acc.untyped_storage().nbytes() > 0
    predict_steps = 0
    for i in range(3, 8):
        with Allocations() as mode:
            out = trainer.step(batch(i))
        if out["phase"] != "predict":
            if predict_steps:
                break  # the first Predict phase is over
            continue
        predict_steps += 1
        # Gradients: no accumulator storage, no .grad.
        assert acc.untyped_storage().nbytes() == 0
        assert all(p.grad is None for p in trainer.group.params)
        # Moments (and 8-bit scales) are off the device: no storage.
        for name, t in moments.items():
            assert t.untyped_storage().nbytes() == 0, name
        # The forward's loss is chunked: no [B, T, V] logits, one chunk's at most (the
        # lm_head weight's transposed view, [C, V], is the largest tensor ending in V).
        chunk_or_weight = max(8, SMALL["n_embd"]) * VOCAB
        assert 0 < mode.largest_logits() <= chunk_or_weight < B * T * VOCAB
        # Arena-sized fp32 tensors: at entry only the rollback snapshot and, with fp32
        # moments, their offload copies (host memory on CUDA); the direction is built group by
        # group (the whole dequantized 8-bit moments would add two). None in later steps.
        entry = predict_steps == 1
        allowed = (1 + (2 if state_bits == 32 else 0)) if entry else 0
        assert mode.arena_sized_fp32(n) == allowed, (predict_steps, mode.arena_sized_fp32(n))
    assert predict_steps == 2
    # After Predict everything is back.
    assert trainer.phase is not Phase.PREDICT
    assert acc.untyped_storage().nbytes() > 0
    for name, t in moments.items():
        assert t.untyped_storage().nbytes() > 0, name
    trainer.close()


def test_close_during_predict_gives_the_model_back():
    trainer = make(8, offload="cpu")
    for i in range(4):
        out = trainer.step(batch(i))
    assert out["phase"] == "predict"
    moments = trainer.optimizer.state_tensors()
    assert all(t.untyped_storage().nbytes() == 0 for t in moments.values())
    trainer.close()
    # The moments are back, the Predict buffers dropped, and backward fills ordinary .grad.
    assert all(t.untyped_storage().nbytes() > 0 for t in moments.values())
    assert trainer._direction is None and trainer._snapshot is None
    _, loss = trainer.model(*batch(9))
    loss.backward()
    assert all(p.grad is not None for p in trainer.group.params)
