"""Checkpoint files (atomic, checksummed, versioned) and trainer resume.

Resuming mid-Predict or mid-Correct continues exactly as an uninterrupted run (bit-identical
losses on CPU); a corrupted, truncated, wrong-version or mismatched file raises a clear error
and leaves the running trainer untouched.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_trainer import CYCLE, CharModel, batches, lm_loss, make_trainer, read_jsonl

from hybrid_triton.checkpoint import (
    MAGIC,
    CheckpointError,
    load_checkpoint,
    read_header,
    save_checkpoint,
)
from hybrid_triton.scheduler import Phase, TrainerConfig
from hybrid_triton.trainer import HybridTrainer


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


# ------------------------------------------------------------------------------ the file
def test_roundtrip_and_atomic(tmp_path):
    path = tmp_path / "a.ckpt"
    state = {"x": torch.arange(10.0), "n": 3, "nested": {"s": "text", "l": [1, 2.5]}}
    digest = save_checkpoint(path, state)
    assert read_header(path)["sha256"] == digest
    out = load_checkpoint(path)
    assert torch.equal(out["x"], state["x"]) and out["nested"] == state["nested"]
    save_checkpoint(path, {"x": torch.zeros(2)})  # overwrite in place
    assert torch.equal(load_checkpoint(path)["x"], torch.zeros(2))
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]  # no temporary left behind


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.ckpt"
    save_checkpoint(path, {"v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"v": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["v"] == 1
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]


def _corrupt(path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "flip":
        raw[-10] ^= 0xFF
    elif how == "truncate":
        raw = raw[: len(raw) - 100]
    elif how == "magic":
        raw[:4] = b"NOPE"
    elif how == "version":
        head_end = raw.index(b"\n", len(MAGIC))
        header = json.loads(raw[len(MAGIC) : head_end])
        header["version"] = 99
        raw = raw[: len(MAGIC)] + json.dumps(header).encode() + raw[head_end:]
    elif how == "header":
        raw[len(MAGIC) : len(MAGIC) + 3] = b"{{{"
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "how,match",
    [
        ("flip", "checksum mismatch"),
        ("truncate", "truncated"),
        ("magic", "not a hybrid_triton checkpoint"),
        ("version", "version 99 is not supported"),
        ("header", "header is corrupted"),
    ],
)
def test_bad_files(tmp_path, how, match):
    path = tmp_path / "a.ckpt"
    save_checkpoint(path, {"x": torch.randn(100)})
    _corrupt(path, how)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.ckpt")


# ------------------------------------------------------------------------------ resume
def _losses(path) -> list[tuple[int, str, float]]:
    return [(r["step"], r["phase"], r["loss"]) for r in read_jsonl(path)]


@pytest.mark.parametrize(
    "offload,phase",
    [("compress", Phase.PREDICT), ("pinned", Phase.PREDICT), ("drop", Phase.CORRECT)],
    ids=["compress-mid-predict", "pinned-mid-predict", "drop-mid-correct"],
)
@pytest.mark.parametrize("grad_path", ["flat", "hooks"])  # both gradient paths resume exactly
def test_resume_is_bit_identical(corpus, tmp_path, offload, phase, grad_path):
    cfg = {**CYCLE, "offload": offload, "residual_capacity": 2, "grad_path": grad_path}
    data = batches(corpus, 34)
    straight = make_trainer({**cfg, "metrics_path": str(tmp_path / "a.jsonl")})
    for batch in data:
        straight.step(batch)
    straight.close()
    expected = _losses(tmp_path / "a.jsonl")
    # Resume after step k - 1, with steps k - 1 and k in the same phase: mid-phase.
    k = next(
        i + 1
        for i in range(len(expected) - 1)
        if expected[i][1] == expected[i + 1][1] == phase.value
    )

    first = make_trainer({**cfg, "metrics_path": str(tmp_path / "b.jsonl")})
    for batch in data[:k]:
        first.step(batch)
    assert first.phase is phase and first.controller.steps_left >= 1
    ckpt = tmp_path / "mid.ckpt"
    first.save(ckpt)
    first.metrics.close()
    # A fresh process would build the same trainer from scratch (other init) and load.
    resumed = make_trainer({**cfg, "metrics_path": str(tmp_path / "b.jsonl")}, seed=123)
    resumed.load(ckpt)
    assert resumed.step_count == k and resumed.phase is phase
    for batch in data[k:]:
        resumed.step(batch)
    resumed.close()
    assert _losses(tmp_path / "b.jsonl") == expected
    assert torch.equal(resumed.master, straight.master)
    for name, t in straight.optimizer.state_tensors().items():
        assert torch.equal(resumed.optimizer.state_tensors()[name], t), name
    assert torch.equal(resumed.corrector.log_correction, straight.corrector.log_correction)


def test_bad_checkpoint_leaves_trainer_untouched(corpus, tmp_path):
    tr = make_trainer(CYCLE)
    data = batches(corpus, 12)
    for batch in data[:6]:
        tr.step(batch)
    good = tmp_path / "good.ckpt"
    tr.save(good)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    ctrl = json.dumps(tr.controller.state_dict())
    moments = {k: v.clone() for k, v in tr.optimizer.state_tensors().items()}

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes())
    _corrupt(bad, "flip")
    with pytest.raises(CheckpointError, match="checksum"):
        tr.load(bad)
    # Another model's checkpoint: checked in full before anything is applied.
    torch.manual_seed(0)
    other = HybridTrainer(CharModel(dim=8), lm_loss, config=TrainerConfig(**CYCLE))
    other_path = tmp_path / "other.ckpt"
    other.save(other_path)
    with pytest.raises(CheckpointError, match="model entry"):
        tr.load(other_path)
    # A checkpoint written with another offload strategy.
    diff = HybridTrainer(CharModel(), lm_loss, config=TrainerConfig(**{**CYCLE, "offload": "cpu"}))
    diff_path = tmp_path / "diff.ckpt"
    diff.save(diff_path)
    with pytest.raises(CheckpointError, match="offload"):
        tr.load(diff_path)

    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in tr.optimizer.state_tensors().items():
        assert torch.equal(v, moments[k]), k
    assert json.dumps(tr.controller.state_dict()) == ctrl
    for batch in data[6:]:  # and it keeps training
        tr.step(batch)
    assert tr.step_count == 12
