"""HybridTrainer's two gradient paths: the flat buffer (one micro-batch, no hooks) and the
hook-folded fp32 accumulator. The flat path must train exactly as the hooks do (the same
gradient values reach the optimizer), through every phase, and fail loudly where it cannot
work. Kernels take the Triton interpreter on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_trainer import CYCLE, VOCAB, CharModel, batches, lm_loss
from torch import nn

from hybrid_triton.accumulation import FlatGradBuffer, GradAccumulator
from hybrid_triton.scheduler import ConfigError, TrainerConfig
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


def make(cfg: dict, dtype: torch.dtype = torch.float32, seed: int = 0, **kw) -> HybridTrainer:
    torch.manual_seed(seed)
    model = CharModel().to(dtype)
    return HybridTrainer(model, lm_loss, config=TrainerConfig(**cfg), lr=1e-2, **kw)


def _hooks(p: torch.Tensor) -> int:
    return len(getattr(p, "_post_accumulate_grad_hooks", None) or {})


# ------------------------------------------------------------------------------ config


def test_auto_resolves_by_micro_batches_and_precision():
    assert TrainerConfig().resolved_grad_path() == "flat"
    assert TrainerConfig(micro_batches=2).resolved_grad_path() == "hooks"
    assert TrainerConfig(phase_micro_batches={"correct": 3}).resolved_grad_path() == "hooks"
    assert TrainerConfig(phase_precision={"full": "fp16"}).resolved_grad_path() == "hooks"
    assert TrainerConfig(precision="bf16").resolved_grad_path() == "flat"
    assert TrainerConfig(grad_path="hooks").resolved_grad_path() == "hooks"


@pytest.mark.parametrize(
    "bad",
    [
        dict(grad_path="flat", micro_batches=4),
        dict(grad_path="flat", precision="fp16"),
        dict(grad_path="flat", phase_micro_batches={"full": 2}),
    ],
)
def test_flat_path_refuses_what_it_cannot_do(bad):
    with pytest.raises(ConfigError, match="grad_path='flat'"):
        TrainerConfig(**bad)


def test_unknown_grad_path():
    with pytest.raises(ConfigError, match="grad_path must be one of auto, hooks, flat"):
        TrainerConfig(grad_path="fast")


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_trains_as_the_hooks_do_through_every_phase(corpus, dtype):
    """Same model, data and config, the two paths: the master weights agree after every step
    (no parameter is used twice, so the gradients are the same numbers either way), and the
    phases follow the same course."""
    flat = make({**CYCLE, "grad_path": "flat"}, dtype)
    hooks = make({**CYCLE, "grad_path": "hooks"}, dtype)
    assert isinstance(flat.accum, FlatGradBuffer) and isinstance(hooks.accum, GradAccumulator)
    assert flat.accum.accumulator.dtype == dtype  # half the accumulator's bytes for bf16
    assert all(_hooks(p) == 0 for p in flat.group.params)
    assert all(_hooks(p) == 1 for p in hooks.group.params)
    phases = []
    for batch in batches(corpus, 30):
        a, b = flat.step(batch), hooks.step(batch)
        assert a["phase"] == b["phase"], (a, b)
        phases.append(a["phase"])
        # The weights the model computes with, in every phase; the master outside Predict
        # (bf16 parameters: Predict keeps it in host memory, its device storage freed).
        torch.testing.assert_close(flat.group.flat, hooks.group.flat, atol=1e-6, rtol=1e-5)
        if a["phase"] != "predict":
            torch.testing.assert_close(flat.master, hooks.master, atol=1e-6, rtol=1e-5)
    assert {"warmup", "full", "predict", "correct"} <= set(phases), phases
    flat.flush()
    hooks.flush()
    torch.testing.assert_close(flat.accum.grad_norm(), hooks.accum.grad_norm(), rtol=1e-5, atol=0)
    buffer = flat.accum.accumulator
    flat.close()
    # close() detaches the buffer: no parameter's .grad is a view of it any more
    assert flat.optimizer.flat_grad is None
    base = buffer.untyped_storage().data_ptr()
    assert all(
        p.grad is None or p.grad.untyped_storage().data_ptr() != base for p in flat.group.params
    )


def test_zero_grad_between_steps_is_harmless(corpus):
    """A caller's model.zero_grad() between steps (outside loss_fn) drops the views; the next
    step's reset attaches them again, and training matches an undisturbed run."""
    data = batches(corpus, 6)
    plain, poked = make({**CYCLE, "grad_path": "flat"}), make({**CYCLE, "grad_path": "flat"})
    for batch in data:
        plain.step(batch)
        poked.step(batch)
        poked.model.zero_grad(set_to_none=True)
    torch.testing.assert_close(poked.master, plain.master, atol=0, rtol=0)


def test_predict_phase_settings_do_not_block_the_flat_path():
    # Predict runs no backward pass: its micro-batches and precision are not the gradients'.
    cfg = TrainerConfig(phase_micro_batches={"predict": 4}, phase_precision={"predict": "fp16"})
    assert cfg.resolved_grad_path() == "flat"


def test_predict_frees_the_flat_buffer_and_correct_gets_it_back(corpus):
    tr = make({**CYCLE, "grad_path": "flat", "offload": "keep"})
    buf = tr.accum.accumulator
    full_bytes = buf.numel() * buf.element_size()
    seen = set()
    for batch in batches(corpus, 30):
        info = tr.step(batch)
        seen.add(info["phase"])
        nbytes = buf.untyped_storage().nbytes()
        if info["phase"] == "predict":
            assert nbytes == 0 and all(p.grad is None for p in tr.group.params)
        else:
            assert nbytes == full_bytes
    assert "predict" in seen and "correct" in seen


def test_non_finite_gradient_skips_the_step_on_the_device(corpus):
    data = batches(corpus, 3)
    poison = {"on": False}

    def loss_fn(model, batch):
        loss = lm_loss(model, batch)
        return loss * float("inf") if poison["on"] else loss

    torch.manual_seed(0)
    tr = HybridTrainer(CharModel(), loss_fn, config=TrainerConfig(**CYCLE), lr=1e-2)
    assert tr.grad_path == "flat"
    tr.step(data[0])
    before = tr.master.clone()
    poison["on"] = True
    tr.step(data[1])
    assert torch.equal(tr.master, before)  # skipped on the device
    assert float(tr.found_inf) == 0.0  # the flag is cleared for the next step
    poison["on"] = False
    tr.step(data[2])
    assert not torch.equal(tr.master, before)


def test_replaced_grad_views_fail_before_anything_changes(corpus):
    """A loss_fn that drops the .grad views (model.zero_grad()) would make the step read a
    stale buffer: the trainer stops with a clear error, master unchanged."""

    def loss_fn(model: nn.Module, batch):
        model.zero_grad(set_to_none=True)
        return lm_loss(model, batch)

    torch.manual_seed(0)
    tr = HybridTrainer(CharModel(), loss_fn, config=TrainerConfig(**CYCLE), lr=1e-2)
    before = tr.master.clone()
    with pytest.raises(RuntimeError, match="no longer a view of the flat gradient buffer"):
        tr.step(batches(corpus, 1)[0])
    assert torch.equal(tr.master, before)


def test_unused_parameter_gets_a_zero_gradient(corpus):
    """A parameter without a gradient this step: its slice of the buffer is zero (reset), so
    the optimizer sees the same as with the hooks, whose accumulator zeroes it too."""

    class WithSpare(CharModel):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.Linear(3, 3)

    results = []
    for path in ("flat", "hooks"):
        torch.manual_seed(0)
        tr = HybridTrainer(WithSpare(), lm_loss, config=TrainerConfig(**CYCLE, grad_path=path))
        for batch in batches(corpus, 6):
            tr.step(batch)
        tr.flush()
        results.append(tr.master.clone())
        assert torch.isfinite(tr.master).all()
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


def test_flat_buffer_rejects_accumulation():
    torch.manual_seed(0)
    tr = make({**CYCLE, "grad_path": "flat"})
    tr.accum.num_micro_batches = 2
    with pytest.raises(ValueError, match="one micro-batch"):
        tr.accum.reset()


def test_tied_weights_sum_both_terms(corpus):
    """A weight used twice (tied embedding): autograd adds both terms into the buffer view,
    so the step sees their sum, as the hooks' accumulator does (here in fp32: equal)."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 16)

        def forward(self, x):
            return torch.tanh(self.emb(x)) @ self.emb.weight.T

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    masters = []
    for path in ("flat", "hooks"):
        torch.manual_seed(0)
        tr = HybridTrainer(Tied(), loss_fn, config=TrainerConfig(**CYCLE, grad_path=path))
        for batch in batches(corpus, 4):
            tr.step(batch)
        masters.append(tr.master.clone())
    torch.testing.assert_close(masters[0], masters[1], atol=1e-6, rtol=1e-5)
