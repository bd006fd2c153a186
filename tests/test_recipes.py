"""Training recipes on CPU with a tiny GPT-2: the step's accumulation, the LR schedule, and a
few steps of run_training (what it records, determinism, learning).

The toolkit_memory tests force the torch reference of the kernels (HYBRID_TRITON_IMPL=torch):
the kernels themselves are tested against those references in their own files, and the
interpreter would make a training run here take minutes."""

from __future__ import annotations

import math

import pytest
import torch

from hybrid_triton.data import load_corpus
from hybrid_triton.models.gpt2 import GPT2, GPT2Config
from hybrid_triton.optim import FusedAdamW
from hybrid_triton.recipes import (
    PLANNER_MARGIN,
    RECIPES,
    OptimConfig,
    build_recipe,
    plan_checkpoint_blocks,
    recipe_option_defaults,
    run_training,
)

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


@pytest.fixture
def torch_kernels(monkeypatch):
    monkeypatch.setenv("HYBRID_TRITON_IMPL", "torch")


RUN_KWARGS = dict(
    model_cfg=TINY,
    tokens=2 * 2 * 32 * 6,
    micro_batch=2,
    accum=2,
    seq_len=32,
    eval_every=3,
    optim=OptimConfig(lr=1e-2, warmup_steps=1),
    eval_batches=2,
)


@pytest.mark.parametrize("recipe", ["baseline_fp32", "baseline_bf16"])
def test_run_training_records_and_learns(corpus, recipe, torch_kernels):
    kwargs = dict(RUN_KWARGS, corpus=corpus)
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
    if torch.cuda.is_available():  # measured by the caching allocator
        assert isinstance(result.peak_memory_allocated, int) and result.peak_memory_allocated > 0
    else:  # CPU: no allocator statistics, so nothing is claimed
        assert result.peak_memory_allocated is None
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


# ---------------------------------------------------------------------------------------------
# toolkit_memory
# ---------------------------------------------------------------------------------------------


def _named(opt: FusedAdamW) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Parameter name -> (bf16 shadow, fp32 master view) of one FusedAdamW's arena group."""
    group = opt.arena_group
    return {s.name: (p, m) for s, p, m in zip(group.table, group.params, group.views(opt.master))}


def test_toolkit_memory_parts(torch_kernels):
    defaults = {
        "state_bits": 8,
        "checkpointing": "auto",
        "memory_budget_gib": 4.0,
        "fused_loss": True,
        "loss_chunk_tokens": 1024,
        "grad_dtype": "auto",
    }
    assert recipe_option_defaults("toolkit_memory") == defaults
    assert recipe_option_defaults("baseline_fp32") == {}
    torch.manual_seed(0)
    parts = build_recipe("toolkit_memory", TINY)
    torch.manual_seed(0)
    ref = GPT2(TINY)  # the same fp32 initialization
    # bf16 parameters compute in bf16 without autocast; the loss is the fused chunked one.
    assert parts.autocast_dtype is None and parts.model.fused_loss
    assert parts.options == defaults  # "auto" is resolved at the first step (its shape)
    assert len(parts.optimizers) == 2 and parts.optimizer is parts.optimizers[0]
    decay, plain = parts.optimizers
    assert (
        decay.param_groups[0]["weight_decay"] == 0.1 and plain.param_groups[0]["weight_decay"] == 0
    )
    seen = set()
    for opt, matrices in ((decay, True), (plain, False)):
        assert isinstance(opt, FusedAdamW) and opt.state_bits == 8 and opt.master_weights
        assert opt.master.dtype == torch.float32
        flat = opt.arena_group.flat
        for name, (shadow, master) in _named(opt).items():
            want = ref.get_parameter(name).detach()
            assert (want.dim() >= 2) == matrices, name
            assert shadow.dtype == torch.bfloat16
            assert shadow.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
            assert torch.equal(master.view(want.shape), want), f"{name}: master is the fp32 init"
            assert torch.equal(shadow, want.to(torch.bfloat16)), f"{name}: shadow is its rounding"
            seen.add(name)
    assert seen == {n for n, _ in ref.named_parameters()}, "every parameter once (tied: once)"


def test_toolkit_memory_step_folds_micro_batches(torch_kernels):
    # The accumulator the optimizers read must be the mean of the micro-batches' bf16 gradients
    # (what plain autograd gives on the same bf16 model), the clip norm the global one.
    torch.manual_seed(0)
    x = torch.randint(0, 320, (4, 16))
    y = torch.randint(0, 320, (4, 16))
    micro = [(x[:2], y[:2]), (x[2:], y[2:])]
    # The plain loss here (fused_loss=False): this test is about the accumulation, and plain
    # autograd on the same bf16 model (no autocast, as the recipe) gives the same numbers.
    torch.manual_seed(1)
    parts = build_recipe(
        "toolkit_memory",
        TINY,
        optim=OptimConfig(grad_clip=1e-3),
        fused_loss=False,
        checkpointing=False,
        grad_dtype="fp32",  # the hook-folded accumulator, also for a one-micro-batch window
    )
    torch.manual_seed(1)
    ref = GPT2(TINY).to(torch.bfloat16)
    names = [n for n, _ in ref.named_parameters()]
    expected = {n: torch.zeros(p.shape) for n, p in ref.named_parameters()}
    ref_losses = []
    for xb, yb in micro:
        _, loss = ref(xb, yb)
        ref_losses.append(loss.float())
        for n, g in zip(names, torch.autograd.grad(loss, list(ref.parameters()))):
            expected[n] += g.float() * 0.5
    seen = []
    for opt in parts.optimizers:

        def spy(*args, _opt=opt, _step=opt.step, **kwargs):
            seen.append((_opt, kwargs["grad"].clone(), kwargs["grad_sumsq"].clone()))
            return _step(*args, **kwargs)

        opt.step = spy
    loss = parts.step(micro, 1e-3)
    torch.testing.assert_close(loss, torch.stack(ref_losses).mean(), rtol=1e-6, atol=0)
    assert len(seen) == 2, "one step per optimizer"
    total = sum(g.double().square().sum() for g in expected.values())
    for opt, grad, sumsq in seen:
        for seg in opt.arena_group.table:
            got = grad[seg.offset : seg.end].view(seg.shape)
            torch.testing.assert_close(got, expected[seg.name], rtol=1e-5, atol=1e-7, msg=seg.name)
        assert sumsq.item() == pytest.approx(total.item(), rel=1e-5)
        assert opt.last_grad_norm.item() == pytest.approx(total.sqrt().item(), rel=1e-5)
        for name, (shadow, master) in _named(opt).items():
            assert torch.equal(shadow.detach(), master.to(torch.bfloat16)), name
    assert all(p.grad is None for p in parts.model.parameters()), "no gradient buffer is kept"
    # A second window overwrites the accumulator (it is not added to the first one).
    seen.clear()
    parts.step(micro[:1], 1e-3)
    first = {n: g for n, g in zip(names, _micro_grads(ref, *micro[0]))}
    for opt, grad, _ in seen:
        for seg in opt.arena_group.table[:3]:
            got = grad[seg.offset : seg.end].view(seg.shape)
            assert got.abs().sum() > 0
            assert not torch.allclose(got, expected[seg.name] + first[seg.name]), seg.name


def _micro_grads(model, x, y) -> list[torch.Tensor]:
    _, loss = model(x, y)
    return [g.float() for g in torch.autograd.grad(loss, list(model.parameters()))]


def test_toolkit_memory_options(torch_kernels):
    x = torch.randint(0, 320, (2, 16))
    sizes = {}
    for bits in (32, 8, 4):
        parts = build_recipe("toolkit_memory", TINY, state_bits=bits, checkpointing=False)
        assert not parts.model.activation_checkpointing
        assert all(o.state_bits == bits for o in parts.optimizers)
        loss = parts.step([(x, x)], 1e-3)
        assert torch.isfinite(loss)
        sizes[bits] = sum(o.state_bytes() for o in parts.optimizers)
    assert sizes[4] < sizes[8] < sizes[32] / 3
    with pytest.raises(ValueError, match="state_bits"):
        build_recipe("toolkit_memory", TINY, state_bits=5)
    with pytest.raises(ValueError, match="checkpointing"):
        build_recipe("toolkit_memory", TINY, checkpointing="yes")
    with pytest.raises(ValueError, match=r"block count in \[0, 2\]"):
        build_recipe("toolkit_memory", TINY, checkpointing=3)
    with pytest.raises(ValueError, match="memory_budget_gib"):
        build_recipe("toolkit_memory", TINY, memory_budget_gib=0)
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        build_recipe("toolkit_memory", TINY, loss_chunk_tokens=0)
    with pytest.raises(ValueError, match="fused_loss"):
        build_recipe("toolkit_memory", TINY, fused_loss="yes")
    for value, blocks in ((True, 2), (False, 0), (1, 1), (0, 0)):
        parts = build_recipe("toolkit_memory", TINY, checkpointing=value)
        assert parts.model.checkpoint_blocks == blocks == parts.options["checkpoint_blocks"]
        assert parts.model.activation_checkpointing == (blocks > 0)
    with pytest.raises(ValueError, match="no option"):
        build_recipe("baseline_fp32", TINY, state_bits=8)
    with pytest.raises(ValueError, match="no option"):
        run_training("toolkit_memory", TINY, 100, 1, 1, 8, 1, recipe_options={"bits": 8})


def test_toolkit_memory_learns_like_the_baseline(corpus, torch_kernels):
    # Same seed, same batches, a stable learning rate: the toolkit recipe follows the bf16
    # baseline step by step. What differs: bf16 weights (so a bf16 residual stream; the
    # baseline keeps fp32 weights under autocast) and 8-bit moments. (At RUN_KWARGS' lr 1e-2
    # the tiny run is chaotic, and any rounding difference moves its last steps.)
    kwargs = dict(
        RUN_KWARGS,
        tokens=2 * 2 * 32 * 8,
        eval_every=4,
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        corpus=corpus,
    )
    base = run_training("baseline_bf16", seed=1, **kwargs)
    ours = run_training("toolkit_memory", seed=1, **kwargs)
    options = ours.config["recipe_options"]
    # The planner's choice for 2 x 32 tokens of the tiny model: nothing to checkpoint.
    assert options["checkpoint_blocks"] == 0 and options["planned_for"] == "2x32x2"
    assert 0 < options["planned_peak_gib"] < 0.1
    assert len(ours.step_loss) == 8 and [e["step"] for e in ours.evals] == [4, 8]
    assert ours.step_loss[-1] < ours.step_loss[0] - 0.8, ours.step_loss
    assert ours.evals[-1]["val_loss"] < ours.evals[0]["val_loss"]
    assert ours.step_loss[0] == pytest.approx(base.step_loss[0], abs=2e-3)
    assert max(abs(a - b) for a, b in zip(ours.step_loss, base.step_loss)) < 0.02
    assert ours.evals[-1]["val_loss"] == pytest.approx(base.evals[-1]["val_loss"], rel=5e-3)
    again = run_training("toolkit_memory", seed=1, **kwargs)
    assert again.step_loss == ours.step_loss, "same seed, same run"


@pytest.mark.gpu
def test_toolkit_memory_step_is_sync_free():
    parts = build_recipe("toolkit_memory", TINY, device="cuda")
    x = torch.randint(0, 320, (2, 32), device="cuda")
    parts.step([(x, x), (x, x)], 1e-3)  # compiles the kernels, allocates the state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = parts.step([(x, x), (x, x)], 2e-3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


def test_plan_checkpoint_blocks_is_the_fewest_that_fit():
    """GPT-2 small at 8 x 1024 under 4 GiB: the chosen K fits with the margin, K - 1 does not;
    the estimates fall as K grows, and a budget nothing meets gives every block."""
    cfg = GPT2Config.from_name("gpt2-small")
    k, peaks = plan_checkpoint_blocks(cfg, 8, 1024, memory_budget_gib=4.0, grad_dtype="fp32")
    limit = 4.0 * (1 - PLANNER_MARGIN) * 2**30
    assert 0 < k < cfg.n_layer, (k, peaks)
    assert peaks[k] <= limit < peaks[k - 1]
    assert list(peaks) == list(range(k + 1))
    assert all(a > b for a, b in zip(list(peaks.values()), list(peaks.values())[1:]))
    none_fit, all_peaks = plan_checkpoint_blocks(cfg, 8, 1024, memory_budget_gib=0.5,
                                                 grad_dtype="fp32")  # fmt: skip
    assert none_fit == cfg.n_layer and len(all_peaks) == cfg.n_layer + 1
    # Without the fused loss the logits alone break the budget with every block checkpointed.
    plain_k, plain_peaks = plan_checkpoint_blocks(cfg, 8, 1024, fused_loss=False,
                                                  grad_dtype="fp32")  # fmt: skip
    # One micro-batch per step ("auto": the flat bf16 gradient buffer, 2 bytes per parameter
    # less than the fp32 accumulator) needs no checkpointed block at all.
    assert plan_checkpoint_blocks(cfg, 8, 1024, memory_budget_gib=4.0)[0] == 0
    assert plain_k == cfg.n_layer and min(plain_peaks.values()) > limit


def test_toolkit_memory_auto_checkpointing_follows_the_planner(torch_kernels):
    """ "auto": at the first step the recipe takes the planner's K for the step's shape (here a
    budget between the estimates of K = 1 and K = 0 of the tiny model, so K = 1), and plans
    again when the shape changes."""
    _, peaks = plan_checkpoint_blocks(TINY, 2, 16, 1, memory_budget_gib=1e-6)
    budget = (peaks[0] + peaks[1]) / 2 / (1 - PLANNER_MARGIN) / 2**30
    parts = build_recipe("toolkit_memory", TINY, memory_budget_gib=budget)
    calls = []
    for block in parts.model.transformer.h:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randint(0, 320, (2, 16))
    parts.step([(x, x)], 1e-3)
    assert parts.model.checkpoint_blocks == 1 and parts.model.activation_checkpointing
    assert len(calls) == TINY.n_layer + 1, "block 0 recomputed in backward, block 1 not"
    assert parts.options["checkpoint_blocks"] == 1 and parts.options["planned_for"] == "2x16x1"
    assert parts.options["planned_peak_gib"] == pytest.approx(peaks[1] / 2**30, abs=1e-4)
    small = torch.randint(0, 320, (1, 8))
    parts.step([(small, small)], 1e-3)  # a smaller shape fits without checkpointing
    assert parts.model.checkpoint_blocks == 0 and parts.options["planned_for"] == "1x8x1"


def test_toolkit_memory_fused_loss_step_matches_the_plain_loss(torch_kernels):
    """One step with the fused chunked loss gives the accumulator (what the optimizers read)
    and the loss of the plain-loss step, within bf16 rounding of the logits' gradient."""
    x = torch.randint(0, 320, (2, 24))
    y = torch.randint(0, 320, (2, 24))
    seen = {}
    for fused in (False, True):
        torch.manual_seed(5)
        parts = build_recipe(
            "toolkit_memory", TINY, fused_loss=fused, checkpointing=False, loss_chunk_tokens=7
        )
        grads = []
        for opt in parts.optimizers:

            def spy(*args, _step=opt.step, _grads=grads, **kwargs):
                _grads.append(kwargs["grad"].clone())
                return _step(*args, **kwargs)

            opt.step = spy
        loss = parts.step([(x, y)], 1e-3)
        seen[fused] = (loss, grads)
    (plain_loss, plain), (fused_loss, fused_grads) = seen[False], seen[True]
    assert fused_loss.dtype == torch.float32
    # The plain bf16 loss is itself rounded to bf16 (8 bits): compare within that.
    assert fused_loss.item() == pytest.approx(plain_loss.item(), rel=2**-7)
    for a, b in zip(fused_grads, plain):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 3e-2, f"accumulated gradient differs by {rel:.3e} (relative norm)"
