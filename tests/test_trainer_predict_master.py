"""The fp32 master weights in host memory during Predict (``predict_master="host"``, the
default for bf16-shadow models), and the Predict entry measured apart from the phase.

- during Predict the master has no device storage (nor the accumulator, nor the moments) and
  the trainer's live tensors are smaller than with ``predict_master="device"`` by the master;
- the bf16 weights take each predicted step in place, stochastically rounded: they stay within
  a few bf16 ulps of the exact fp32 trajectory (snapshot + sum of steps), unbiased;
- at Predict exit the master is the snapshot plus the exact sum of the steps taken
  (``dequantize_add_ref`` in fp32, the reference);
- a rollback restores the snapshot exactly; ``close()`` mid-Predict gives back the master with
  the steps taken so far; a checkpoint taken mid-Predict resumes bit-identically;
- ``prepare_step`` applies the transition once and the step then runs it; the entry work gets
  its own peak key.
"""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import assert_close, bf16_ulp
from hybrid_triton.kernels import dequantize_add_ref
from test_trainer import CYCLE, CharModel, batches, lm_loss, read_jsonl
from tolerances import tol

from hybrid_triton.bench.probes import live_tensor_bytes
from hybrid_triton.scheduler import Phase, TrainerConfig
from hybrid_triton.trainer import HybridTrainer, TrendDynamics


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from hybrid_triton.data import load_corpus

    return load_corpus(
        tokenizer="byte", max_files=12, val_every=3, cache_dir=tmp_path_factory.mktemp("corpus")
    )


class _AlwaysConfident(TrendDynamics):
    """Enter Predict as soon as Full ends (memory and arithmetic are tested here)."""

    def confidence(self) -> float:
        return 1.0


# Short phases: Warmup 2, Full 2, Predict 4, Correct 2, ...
SHORT = dict(
    CYCLE,
    warmup_steps=2,
    full_steps=2,
    min_predict_steps=4,
    max_predict_steps=4,
    correct_steps=2,
    confidence_threshold=0.5,
    max_consecutive_predicts=1,
    offload="cpu",
    lookahead=0,
    host_lag=0,
)


def make(predict_master: str = "host", seed: int = 0, **cfg) -> HybridTrainer:
    torch.manual_seed(seed)
    model = CharModel(dim=32).to(torch.bfloat16)
    trainer = HybridTrainer(
        model,
        lm_loss,
        config=TrainerConfig(**{**SHORT, "predict_master": predict_master, **cfg}),
        lr=3e-2,
        optimizer_kwargs={"state_bits": 8},
    )
    trainer.dynamics = _AlwaysConfident(trainer.num_groups, "cpu")
    return trainer


def run_to_predict(trainer: HybridTrainer, data, start: int = 0) -> int:
    """Step until the first Predict step has run; returns the index of the next batch."""
    i = start
    while trainer.phase is not Phase.PREDICT:
        trainer.step(data[i])
        i += 1
    return i


def test_predict_holds_no_master_and_less_memory(corpus):
    data = batches(corpus, 12)
    held = {}
    for mode in ("host", "device"):
        trainer = make(mode)
        i = run_to_predict(trainer, data)
        master = trainer.master
        assert trainer.master_to_host is (mode == "host")
        assert (master.untyped_storage().nbytes() == 0) is (mode == "host")
        assert trainer.accum.accumulator.untyped_storage().nbytes() == 0
        moments = trainer.optimizer.state_tensors().values()
        assert all(t.untyped_storage().nbytes() == 0 for t in moments)
        trainer.step(data[i])
        # Unreachable tensors left by earlier tests in this process (reference cycles not yet
        # collected) would count too; collect them so the two modes are compared alone.
        gc.collect()
        held[mode] = live_tensor_bytes("cpu")
        # Predict over: the master is back (the first Correct step waited for it).
        while trainer.phase is Phase.PREDICT:
            i += 1
            trainer.step(data[i])
        assert master.untyped_storage().nbytes() == master.numel() * 4
        trainer.close()
        del trainer, master
    # Same run otherwise: the difference is the master (fp32, 4 B per parameter), give or
    # take small host-side values.
    n = sum(p.numel() for p in CharModel(dim=32).parameters())
    assert abs((held["device"] - held["host"]) - 4 * n) < 0.05 * 4 * n, held


def test_bf16_steps_follow_the_fp32_trajectory_and_master_gets_the_exact_sum(corpus):
    data = batches(corpus, 12)
    trainer = make("host")
    i = run_to_predict(trainer, data)  # entry done, first Predict step taken
    snapshot = trainer._snapshot.clone()
    direction, alphas = trainer._direction, trainer._alphas.clone()
    steps = trainer.controller.phase_len
    taken = 1
    while trainer.controller.steps_left > 0:
        trainer.step(data[i])
        i += 1
        taken += 1
    assert taken == steps
    # The exact fp32 trajectory: snapshot + (sum of the steps' alphas) * dequant(direction).
    alpha_sum = alphas[:steps].sum(0)
    assert_close("alpha_sum", trainer._alpha_sum, alpha_sum, rtol=1e-6)
    expected = snapshot.clone()
    for gi, (start, end, _) in enumerate(trainer.groups):
        dequantize_add_ref(expected[start:end], direction[gi], alpha_sum[gi : gi + 1])
    weights = trainer.group.flat.double()
    # Each element moves on a straight line from the snapshot to the expected value (one
    # direction, same-sign step sizes), so its largest bf16 ulp on the way is at an end.
    ulp = bf16_ulp(torch.maximum(snapshot.abs(), expected.abs()))
    err_ulps = (weights - expected.double()).abs() / ulp
    # Each step rounds to a neighbour: the error is at most one ulp per step plus the
    # snapshot's own rounding, and stochastic rounding keeps it unbiased on average.
    assert (alphas[:steps] <= 0).all() or (alphas[:steps] >= 0).all()
    assert err_ulps.max() <= steps + 1, err_ulps.max()
    signed = ((weights - expected.double()) / ulp).mean().abs()
    assert signed < 0.1, signed
    moved = (expected.bfloat16() != snapshot.bfloat16()).float().mean()
    assert moved > 0.05, "the predicted steps should move a good share of the bf16 weights"
    # Predict exit: the master comes back as snapshot + the exact sum (before Correct's step).
    plan, new_phase = trainer.prepare_step()
    assert new_phase and plan.phase is Phase.CORRECT
    assert trainer.prepare_step() == (plan, new_phase)  # idempotent until the step runs
    trainer.master_offloader.wait()
    assert_close("master", trainer.master, expected, **tol("dequantize_add", torch.float32))
    out = trainer.step(data[i])
    assert out["phase"] == "correct" and out["new_phase"]
    trainer.close()


def test_rollback_restores_the_snapshot_exactly(corpus):
    data = batches(corpus, 12)
    trainer = make("host")
    i = run_to_predict(trainer, data)
    trainer.step(data[i])
    snapshot = trainer._snapshot.clone()
    assert not torch.equal(trainer.group.flat, snapshot.bfloat16())
    trainer.rollback("test")
    assert trainer.phase is Phase.FULL
    assert torch.equal(trainer.master, snapshot)
    assert torch.equal(trainer.group.flat, snapshot.bfloat16())
    assert not trainer.master_offloader.offloaded
    trainer.step(data[i + 1])  # a Full step on the restored state works
    trainer.close()


def test_close_mid_predict_gives_back_the_master_with_the_steps_taken(corpus):
    data = batches(corpus, 12)
    trainer = make("host")
    i = run_to_predict(trainer, data)
    trainer.step(data[i])
    snapshot, direction = trainer._snapshot.clone(), trainer._direction
    alpha_sum = trainer._alpha_sum.clone()
    trainer.close()
    expected = snapshot.clone()
    for gi, (start, end, _) in enumerate(trainer.groups):
        dequantize_add_ref(expected[start:end], direction[gi], alpha_sum[gi : gi + 1])
    assert_close("master", trainer.master, expected, **tol("dequantize_add", torch.float32))
    assert torch.equal(trainer.group.flat, trainer.master.bfloat16())


def test_resume_mid_predict_is_bit_identical(corpus, tmp_path):
    data = batches(corpus, 16)
    straight = make("host", metrics_path=str(tmp_path / "a.jsonl"))
    for batch in data:
        straight.step(batch)
    straight.close()
    expected = [(r["step"], r["phase"], r["loss"]) for r in read_jsonl(tmp_path / "a.jsonl")]
    assert sum(1 for _, p, _ in expected if p == "predict") >= 4

    first = make("host", metrics_path=str(tmp_path / "b.jsonl"))
    k = run_to_predict(first, data)
    first.step(data[k])  # mid-Predict: two steps taken, two to go
    k += 1
    assert first.phase is Phase.PREDICT and first.controller.steps_left >= 1
    first.save(tmp_path / "mid.ckpt")
    first.metrics.close()
    resumed = make("host", seed=123, metrics_path=str(tmp_path / "b.jsonl"))
    resumed.load(tmp_path / "mid.ckpt")
    assert resumed.master.untyped_storage().nbytes() == 0  # offloaded again, as saved
    for batch in data[k:]:
        resumed.step(batch)
    resumed.close()
    got = [(r["step"], r["phase"], r["loss"]) for r in read_jsonl(tmp_path / "b.jsonl")]
    assert got == expected
    assert torch.equal(resumed.master, straight.master)
    assert torch.equal(resumed.group.flat, straight.group.flat)


def test_fp32_models_keep_the_master_on_the_device(corpus):
    """fp32 parameters are the master themselves: nothing to move, whatever the setting."""
    torch.manual_seed(0)
    trainer = HybridTrainer(CharModel(), lm_loss, config=TrainerConfig(**SHORT), lr=1e-2)
    trainer.dynamics = _AlwaysConfident(trainer.num_groups, "cpu")
    assert not trainer.master_to_host
    data = batches(corpus, 8)
    run_to_predict(trainer, data)
    assert trainer.master.untyped_storage().nbytes() > 0
    trainer.close()
