"""HybridTrainer on a small character model and real text (the stdlib corpus, byte tokens).

Every phase occurs, transitions follow the rules, a Predict step applies exactly one step's
predicted update, accumulation equals the large batch, injected divergence rolls back, and the
per-phase precision and memory policies run. Kernels take the Triton interpreter on CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from hybrid_triton.kernels import dequantize_blockwise_ref
from torch import nn

from hybrid_triton.data import TokenStream, load_corpus
from hybrid_triton.scheduler import ALLOWED_TRANSITIONS, Phase, TrainerConfig
from hybrid_triton.trainer import HybridTrainer

VOCAB = 257  # byte tokenizer: 256 bytes + <|endoftext|>

# Short phases so a few dozen steps see every phase; a low threshold so Predict happens.
CYCLE = dict(
    warmup_steps=4,
    full_steps=8,
    min_predict_steps=2,
    max_predict_steps=4,
    correct_steps=2,
    confidence_threshold=0.3,
    max_consecutive_predicts=2,
    offload="pinned",
    dynamics_model="trend",  # host-side and fast; the RSSM has its own test below
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two shared CPU cores: intra-op threads only contend here (10x slower backward).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_corpus(
        tokenizer="byte", max_files=12, val_every=3, cache_dir=tmp_path_factory.mktemp("corpus")
    )


class CharModel(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.out = nn.Linear(dim, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x)))


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def make_trainer(cfg: dict, seed: int = 0, lr: float = 1e-2, **kw) -> HybridTrainer:
    torch.manual_seed(seed)
    return HybridTrainer(CharModel(), lm_loss, config=TrainerConfig(**cfg), lr=lr, **kw)


def batches(corpus, n: int, start: int = 0, batch: int = 8, seq: int = 16):
    stream = TokenStream("train", batch, seq, seed=0, corpus=corpus)
    return [stream.batch(i) for i in range(start, start + n)]


def read_jsonl(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_every_phase_occurs_and_training_learns(corpus, tmp_path):
    path = tmp_path / "m.jsonl"
    tr = make_trainer({**CYCLE, "metrics_path": str(path), "lookahead": 1})
    acc = tr.accum.accumulator
    seen_predict_memory = []
    for batch in batches(corpus, 36):
        info = tr.step(batch)
        if info["phase"] == "predict":
            seen_predict_memory.append(
                (
                    acc.untyped_storage().nbytes(),
                    tr.optimizer.flat_state["exp_avg_sq"].untyped_storage().nbytes(),
                    all(p.grad is None for p in tr.group.params),
                    tr.controller.steps_left,
                )
            )
    summary = tr.summary()
    tr.close()
    assert all(summary["phase_steps"][p.value] > 0 for p in Phase), summary["phase_steps"]
    for step, src, dst, reason in tr.controller.transitions:
        assert Phase(dst) in ALLOWED_TRANSITIONS[Phase(src)], (step, src, dst, reason)
        if src == "predict":
            assert dst == "correct" or reason.startswith("rollback"), reason
    # Predict: gradient accumulator freed, grads gone; the moments are off the device until
    # the restore starts at the beginning of the last lookahead (1) Predict step(s).
    assert seen_predict_memory and all(a == 0 and g for a, _, g, _ in seen_predict_memory)
    for _, moments, _, steps_left_after in seen_predict_memory:
        assert (moments == 0) == (steps_left_after + 1 > 1), seen_predict_memory
    records = read_jsonl(path)
    assert [r["step"] for r in records] == list(range(36))
    for key in (
        "phase",
        "loss",
        "confidence",
        "precision",
        "loss_scale",
        "effective_batch",
        "micro_batch",
        "mem_allocated",
        "optimizer_state_offloaded",
    ):
        assert key in records[0], key
    predict = [r for r in records if r["phase"] == "predict"]
    assert all(r["predicted_loss"] is not None for r in predict)
    assert all(r["step_ms"] > 0 for r in records)
    assert set(summary["step_ms_median"]) == {p.value for p in Phase}
    assert summary["first_step_ms_median"]["correct"] > 0
    losses = [r["loss"] for r in records]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses


def _run_into_predict(tr: HybridTrainer, data) -> int:
    for i, batch in enumerate(data):
        tr.step(batch)
        if tr.phase is Phase.PREDICT and tr.controller.steps_left >= 1:
            return i + 1
    raise AssertionError("never reached a Predict phase")


def test_predict_step_applies_one_step_update(corpus):
    tr = make_trainer({**CYCLE, "offload": "keep"})
    data = batches(corpus, 40)
    used = _run_into_predict(tr, data)
    before = tr.master.clone()
    t = tr.controller.phase_step  # index of the coming step in the horizon
    tr.step(data[used])
    assert tr.phase is Phase.PREDICT
    expected = before.clone()
    for gi, (start, end, _) in enumerate(tr.groups):
        expected[start:end] += tr._alphas[t, gi] * dequantize_blockwise_ref(tr._direction[gi])
    torch.testing.assert_close(tr.master, expected, atol=1e-7, rtol=1e-6)
    assert not torch.equal(tr.master, before)
    # The frozen direction is the optimizer's own AdamW step direction: one predicted step at
    # scale 1 is about what the optimizer itself would have done (int8 direction).
    assert (tr._alphas < 0).all()


def test_accumulation_equals_large_batch(corpus):
    cfg = {**CYCLE, "warmup_steps": 3}
    one = make_trainer(cfg)
    three = make_trainer({**cfg, "micro_batches": 3})  # 8 samples -> 3, 3, 2
    for batch in batches(corpus, 3):
        one.step(batch)
        info = three.step(batch)
        assert info["micro_batches"] == 3
    torch.testing.assert_close(three.master, one.master, atol=2e-6, rtol=1e-5)
    three.flush()
    assert three.accum.micro_batch == 3 and three.accum.progress == 1.0


def test_injected_divergence_rolls_back(corpus):
    tr = make_trainer({**CYCLE, "offload": "cpu"})
    data = batches(corpus, 60)
    used = _run_into_predict(tr, data)
    episode = tr.episode
    predict_len = tr.controller.phase_len
    steps_taken = tr.optimizer.flat_state["step"].clone()
    # Inject: the last predicted step becomes absurdly large; the real loss diverges. The first
    # Correct step measures it; with host_lag 1 the verdict is read two steps later.
    tr._alphas.mul_(1e4)
    phases = [tr.step(batch)["phase"] for batch in data[used : used + 4]]
    assert phases == ["predict", "correct", "correct", "full"], phases
    assert tr.metrics.counters["rollbacks"] == 1
    _, src, dst, reason = tr.controller.transitions[-1]
    assert (src, dst) == ("correct", "full") and reason.startswith("rollback"), reason
    # The device guard skipped both Correct steps (no optimizer step on diverged weights);
    # the Full step after the rollback is the only one taken since.
    assert float(tr.optimizer.flat_state["step"]) == float(steps_taken) + 1
    assert tr.episode == episode and not tr.offloader.offloaded
    tr.flush()
    records = tr.metrics.summary()
    assert records["rollbacks"] == 1
    # Every Predict step of the rolled-back episode is counted as bought back.
    assert records["predict_steps_rolled_back"] == predict_len >= 2
    # Training goes on from the snapshot: the next losses are back to normal.
    for batch in data[used + 4 : used + 6]:
        tr.step(batch)
    tr.flush()
    assert torch.isfinite(tr.master).all()
    assert tr.metrics.losses["full"][-1] < 10


def test_rollback_restores_snapshot_exactly(corpus):
    tr = make_trainer({**CYCLE, "offload": "compress"})
    data = batches(corpus, 40)
    used = _run_into_predict(tr, data)
    tr.step(data[used])
    moments = {k: v for k, v in tr.optimizer.state_tensors().items()}
    tr.rollback("test")
    assert torch.equal(tr.master, tr._snapshot)
    assert tr.phase is Phase.FULL and tr.controller.steps_left == CYCLE["full_steps"]
    for name, t in moments.items():
        assert t.untyped_storage().nbytes() > 0, name
        assert torch.isfinite(t).all(), name


def test_rollback_restore_is_not_counted_in_the_predict_peak(corpus):
    # The per-phase peaks are closed by metrics.phase_boundary: the Predict phase's must be
    # closed while its memory policy still holds (moments off the device, accumulator freed),
    # and what the rollback brings back gets its own label. On CPU the allocator has no peak
    # counters, so the test records what was resident at each boundary.
    tr = make_trainer({**CYCLE, "offload": "cpu"})
    data = batches(corpus, 40)
    _run_into_predict(tr, data)
    seen = []
    boundary = tr.metrics.phase_boundary

    def spy(label):
        acc_bytes = tr.accum.accumulator.untyped_storage().nbytes()
        seen.append((label, tr.offloader.offloaded, acc_bytes))
        return boundary(label)

    tr.metrics.phase_boundary = spy
    tr.rollback("test")
    assert [s[0] for s in seen] == ["predict", "rollback"], seen
    assert seen[0][1:] == (True, 0), seen  # Predict closed with its state still off the device
    assert seen[1][1] is False and seen[1][2] > 0, seen  # the restore is the rollback's


@pytest.mark.parametrize("strategy", ["compress", "drop"])
def test_offload_strategies_train_on(corpus, strategy):
    tr = make_trainer({**CYCLE, "offload": strategy})
    for batch in batches(corpus, 24):
        tr.step(batch)
    s = tr.summary()
    assert s["phase_steps"]["predict"] > 0 and s["phase_steps"]["correct"] > 0
    assert s["offload"]["offloads"] >= 1 and s["offload"]["bytes_freed"] > 0
    assert torch.isfinite(tr.master).all()
    if strategy == "compress":
        assert s["offload"]["compressed_bytes"] > 0


def test_precision_per_phase(corpus):
    cfg = {**CYCLE, "precision": "fp16", "phase_precision": {"predict": "bf16", "warmup": "fp32"}}
    tr = make_trainer(cfg)
    for batch in batches(corpus, 24):
        tr.step(batch)
    tr.flush()
    assert tr.scaler is not None
    s = tr.summary()
    assert s["precision_switches"] >= 3  # fp32 -> fp16 -> bf16 -> fp16 ...
    assert torch.isfinite(tr.master).all()
    assert float(tr.scaler.scale) > 0


def test_bad_inputs():
    model = CharModel()
    with pytest.raises(TypeError, match=r"nn\.Module"):
        HybridTrainer(object(), lm_loss)
    with pytest.raises(TypeError, match="FusedAdamW"):
        HybridTrainer(model, lm_loss, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="confidence_threshold"):
        HybridTrainer(model, lm_loss, config={"confidence_threshold": 3})
    tr = make_trainer(CYCLE)
    before = tr.master.clone()
    x = torch.zeros(4, 16, dtype=torch.int64)
    with pytest.raises(ValueError, match="different sizes"):
        tr.step((x, x[:3]))
    with pytest.raises(TypeError, match="a batch must be"):
        tr.step("text")
    assert tr.step_count == 0 and torch.equal(tr.master, before)


def test_phase_peaks_and_summary(corpus):
    tr = make_trainer(CYCLE)
    for batch in batches(corpus, 5):
        tr.step(batch)
    peaks = tr.phase_peaks()
    # Peaks come from the CUDA allocator of the trainer's device: this model is on the CPU even
    # on a machine with a GPU, so what counts is the trainer's device, not torch.cuda.
    if tr.device.type == "cuda":
        assert set(peaks) >= {"warmup", "full"}
        assert all(p["reserved"] >= p["allocated"] > 0 for p in peaks.values())
    else:
        assert peaks == {}
    s = tr.summary()
    assert s["records"] == 5 and s["phase_steps"]["warmup"] == 4


RSSM_SMALL = dict(
    ensemble=3, hidden=16, latent=4, bptt_window=4, min_calibration=4, calibration_horizon=4
)


def test_rssm_dynamics_drives_predict(corpus, tmp_path, monkeypatch):
    # The RSSM rollout runs at every observe; through the interpreter that is seconds per
    # step, so this run takes the torch references of every op (the kernels have their own
    # tests); the trainer logic is the same.
    monkeypatch.setenv("HYBRID_TRITON_IMPL", "torch")
    cfg = {
        **CYCLE,
        "dynamics_model": "rssm",
        "dynamics": RSSM_SMALL,
        "confidence_threshold": 0.05,
        "full_steps": 10,
        "metrics_path": str(tmp_path / "m.jsonl"),
    }
    tr = make_trainer(cfg)
    for batch in batches(corpus, 30):
        tr.step(batch)
    s = tr.summary()
    tr.close()
    model = tr.dynamics.model
    assert model._observed == s["phase_steps"]["full"]  # Full steps train it, only they
    assert s["phase_steps"]["predict"] > 0, s["transitions"]
    records = read_jsonl(tmp_path / "m.jsonl")
    predict = [r for r in records if r["phase"] == "predict"]
    assert all(r["predicted_loss"] is not None and r["predicted_loss"] > 0 for r in predict)
    assert any(r["confidence"] > 0 for r in records)
    # Its state goes into the checkpoint and comes back.
    path = tmp_path / "r.ckpt"
    tr.save(path)
    other = make_trainer({**cfg, "metrics_path": None}, seed=7)
    other.load(path)
    for (k, a), b in zip(model.state_dict().items(), other.dynamics.model.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k


def test_predict_off_trains_without_the_dynamics_model(corpus, monkeypatch):
    # The RSSM would enter Predict at this threshold (test above); with Predict off it must
    # not even observe (no update norms, no training): plain Full steps after the warm-up.
    monkeypatch.setenv("HYBRID_TRITON_IMPL", "torch")
    cfg = {
        **CYCLE,
        "dynamics_model": "rssm",
        "dynamics": RSSM_SMALL,
        "confidence_threshold": 0.05,
        "full_steps": 10,
        "predict": False,
    }
    tr = make_trainer(cfg)
    data = batches(corpus, 30)
    for batch in data:
        tr.step(batch)
    s = tr.summary()
    tr.close()
    assert s["phase_steps"] == {"warmup": 4, "full": 26, "predict": 0, "correct": 0}
    assert tr.dynamics.model._observed == 0
    assert s["rollbacks"] == 0
    # The same steps as the trainer with Predict on until its first Predict phase.
    on = make_trainer({**cfg, "predict": True})
    for batch in data[:14]:
        on.step(batch)
    on.flush()
    off = make_trainer(cfg)
    for batch in data[:14]:
        off.step(batch)
    off.flush()
    assert on.controller.step_counts["predict"] == 0  # its first Predict is step 15
    assert torch.equal(on.master, off.master)
    on.close()
    off.close()


def test_decay_filter_matches_torch_adamw_param_groups(corpus):
    # Matrices and embeddings decay, the bias does not: torch's AdamW with two param groups
    # (imported, not re-implemented) on the same fp32 model and batches.
    import copy

    torch.manual_seed(3)
    model = CharModel()
    reference = copy.deepcopy(model)
    wd, lr = 0.5, 3e-2  # large, so a decayed bias would be far off
    tr = HybridTrainer(
        model,
        lm_loss,
        config=TrainerConfig(**{**CYCLE, "warmup_steps": 50, "predict": False}),
        lr=lr,
        optimizer_kwargs={"weight_decay": wd, "state_bits": 32},
        decay_filter=lambda name, p: p.dim() >= 2,
    )
    assert tr.optimizer.param_groups[0]["weight_decay"] == 0.0 and tr.weight_decay == wd
    names = [seg.name for seg in tr.group.table]
    assert names[-1] == "out.bias" and tr.decay_end == tr.group.table[-1].offset
    params = dict(reference.named_parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [params["emb.weight"], params["out.weight"]], "weight_decay": wd},
            {"params": [params["out.bias"]], "weight_decay": 0.0},
        ],
        lr=lr,
    )
    for batch in batches(corpus, 5):
        tr.step(batch)
        opt.zero_grad()
        lm_loss(reference, batch).backward()
        opt.step()
    tr.flush()
    for name, p in model.named_parameters():
        assert_close(name, p, params[name], atol=1e-6, rtol=1e-5)
    # Without the filter every parameter decays: the bias then differs.
    torch.manual_seed(3)
    plain = HybridTrainer(
        CharModel(),
        lm_loss,
        config=TrainerConfig(**{**CYCLE, "warmup_steps": 50, "predict": False}),
        lr=lr,
        optimizer_kwargs={"weight_decay": wd, "state_bits": 32},
    )
    for batch in batches(corpus, 5):
        plain.step(batch)
    plain.flush()
    assert not torch.allclose(plain.model.out.bias, params["out.bias"], atol=1e-4)
    with pytest.raises(ValueError, match="decay_filter"):
        HybridTrainer(CharModel(), lm_loss, optimizer=tr.optimizer, decay_filter=lambda n, p: True)
    tr.close()
    plain.close()


def test_full_step_update_norms_are_the_adamw_direction_norms(corpus, monkeypatch):
    # The dynamics model's update-norm features come from the master's change over the step;
    # they must equal lr * ||AdamW direction|| per group, rebuilt from the moments right after
    # the step (the formula Predict uses for its direction).
    monkeypatch.setenv("HYBRID_TRITON_IMPL", "torch")
    cfg = {**CYCLE, "dynamics_model": "rssm", "dynamics": RSSM_SMALL, "warmup_steps": 2}
    tr = make_trainer(cfg, lr=3e-2, optimizer_kwargs={"weight_decay": 0.0})
    seen = []
    observe = tr.dynamics.observe_device

    def spy(stats):
        expected = torch.stack([torch.linalg.vector_norm(d) for d in tr._direction_groups()])
        seen.append((stats["update_norms"].clone(), expected * tr.optimizer._lr))
        observe(stats)

    monkeypatch.setattr(tr.dynamics, "observe_device", spy)
    for batch in batches(corpus, 6):
        tr.step(batch)
    tr.close()
    assert len(seen) == 4  # the Full steps after two Warmup steps
    for i, (got, expected) in enumerate(seen):
        assert got.shape == (tr.num_groups,) and bool((got > 0).all())
        assert_close(f"update_norms[{i}]", got, expected, rtol=1e-4, atol=1e-9)
