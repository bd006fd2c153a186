"""What the GPT-2 1B run under a 16 GiB cap needs from the recipes, on CPU with a tiny GPT-2:
toolkit_memory's bf16 gradient buffer (``grad_dtype="bf16"``), the ``init_device`` build
argument, ``run_training``'s ``eval_at_start`` / ``max_train_s``, and the planner's view of
every recipe (``planned_peak_bytes``, ``toolkit_peak_bytes``) on the real 1B shapes.

As in test_recipes.py the kernels run on their torch reference (HYBRID_TRITON_IMPL=torch)."""

from __future__ import annotations

import math

import pytest
import torch

from hybrid_triton.data import load_corpus
from hybrid_triton.models.gpt2 import GPT2, GPT2Config
from hybrid_triton.planner.estimate import estimate
from hybrid_triton.planner.setup import setup_preset
from hybrid_triton.planner.specs import gpt2_spec
from hybrid_triton.recipes import (
    PLANNER_MARGIN,
    OptimConfig,
    build_recipe,
    plan_checkpoint_blocks,
    planned_peak_bytes,
    recipe_option_defaults,
    run_training,
    toolkit_peak_bytes,
    toolkit_setup,
)

TINY = GPT2Config.from_name("gpt2-tiny", vocab_size=320, block_size=64)
GIB = 2**30


@pytest.fixture
def torch_kernels(monkeypatch):
    monkeypatch.setenv("HYBRID_TRITON_IMPL", "torch")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cache = tmp_path_factory.mktemp("recipes_1b_cache")
    return load_corpus(tokenizer="byte", max_files=60, val_every=5, cache_dir=cache)


def _spy_steps(parts) -> list:
    """Record (optimizer, grad, grad_sumsq) of every optimizer step."""
    seen = []
    for opt in parts.optimizers:

        def spy(*args, _opt=opt, _step=opt.step, **kwargs):
            seen.append((_opt, kwargs["grad"].clone(), kwargs["grad_sumsq"].clone()))
            return _step(*args, **kwargs)

        opt.step = spy
    return seen


# ---------------------------------------------------------------------------------------------
# toolkit_memory with a bf16 gradient buffer
# ---------------------------------------------------------------------------------------------


def test_bf16_grads_equal_the_fp32_accumulator_for_one_micro_batch(torch_kernels):
    # One micro-batch: the fp32 accumulator holds the bf16 gradients exactly (alpha = 1), so
    # the bf16 buffer must give the optimizer the same numbers. The tied weight is the one
    # exception: its two gradients (output head, embedding) are summed in bf16 by autograd
    # in the buffer, in fp32 by the hooks.
    torch.manual_seed(0)
    x = torch.randint(0, 320, (3, 17))
    y = torch.randint(0, 320, (3, 17))
    runs = {}
    for grad_dtype in ("fp32", "bf16"):
        torch.manual_seed(1)
        parts = build_recipe("toolkit_memory", TINY, grad_dtype=grad_dtype, checkpointing=False,
                             optim=OptimConfig(grad_clip=1e-3))  # fmt: skip
        seen = _spy_steps(parts)
        loss = parts.step([(x, y)], 1e-3)
        runs[grad_dtype] = (parts, seen, loss)
    (p32, seen32, loss32), (p16, seen16, loss16) = runs["fp32"], runs["bf16"]
    assert torch.equal(loss32, loss16)
    assert len(seen16) == 2
    for (_, g32, s32), (opt16, g16, s16) in zip(seen32, seen16):
        assert g16.dtype == torch.bfloat16 and g32.dtype == torch.float32
        for seg in opt16.arena_group.table:
            got = g16[seg.offset : seg.end].float()
            want = g32[seg.offset : seg.end]
            assert got.abs().sum() > 0, seg.name
            if seg.name == "transformer.wte.weight":
                # bf16 sum of two bf16 terms vs their fp32 sum: one bf16 rounding apart.
                torch.testing.assert_close(got, want, rtol=2**-8, atol=1e-8, msg=seg.name)
            else:
                assert torch.equal(got, want), seg.name
        # The clip norm is the global one, in fp32 (same gradient up to the tied rounding).
        assert s16.item() == pytest.approx(s32.item(), rel=1e-3)
    # The updated masters: equal up to the clip coefficient's last bits (the global norm holds
    # the tied rounding), except the tied weight, where Adam's first step (about lr * sign(g))
    # may differ by at most 2 lr where a rounded gradient changed sign.
    for opt32, opt16 in zip(p32.optimizers, p16.optimizers):
        group = opt16.arena_group
        for seg, m16, m32 in zip(group.table, group.views(opt16.master),
                                 opt32.arena_group.views(opt32.master)):  # fmt: skip
            tied = seg.name == "transformer.wte.weight"
            atol = 2e-3 + 1e-7 if tied else 1e-7
            torch.testing.assert_close(m16, m32, rtol=0, atol=atol, msg=seg.name)
        assert torch.equal(group.flat, opt16.master.to(torch.bfloat16))


def test_bf16_grads_sumsq_is_the_global_fp32_sum(torch_kernels):
    torch.manual_seed(2)
    parts = build_recipe("toolkit_memory", TINY, grad_dtype="bf16", checkpointing=False)
    seen = _spy_steps(parts)
    x = torch.randint(0, 320, (2, 9))
    parts.step([(x, x)], 1e-3)
    total = sum(g.double().square().sum() for _, g, _ in seen)  # both groups: the global sum
    for _, _, sumsq in seen:
        assert sumsq.dtype == torch.float32 and sumsq.shape == (1,)
        assert sumsq.item() == pytest.approx(total.item(), rel=1e-5)


def test_bf16_grads_buffer_is_zeroed_between_steps(torch_kernels):
    # A second step must see only its own gradient (autograd adds into the buffer in place).
    torch.manual_seed(3)
    parts = build_recipe("toolkit_memory", TINY, grad_dtype="bf16", checkpointing=False)
    seen = _spy_steps(parts)
    x = torch.randint(0, 320, (2, 9))
    parts.step([(x, x)], 0.0)  # lr 0: the weights do not move (no weight decay at lr 0)
    parts.step([(x, x)], 0.0)
    (_, first, _), (_, _, _), (_, second, _), _ = seen
    assert torch.equal(first, second)
    # The parameters' .grad stay views of the flat buffer, in bf16.
    for opt in parts.optimizers:
        flat = opt.flat_grad
        assert flat is not None and flat.dtype == torch.bfloat16
        for p, seg in zip(opt.arena_group.params, opt.arena_group.table):
            assert p.grad.data_ptr() == flat[seg.offset :].data_ptr()


def test_bf16_grads_reject_several_micro_batches_and_stale_views(torch_kernels):
    parts = build_recipe("toolkit_memory", TINY, grad_dtype="bf16", checkpointing=False)
    x = torch.randint(0, 320, (2, 9))
    with pytest.raises(ValueError, match="exactly one micro-batch"):
        parts.step([(x, x), (x, x)], 1e-3)
    with pytest.raises(ValueError, match="no micro-batches"):
        parts.step([], 1e-3)
    # A hook that replaces a .grad (as a framework calling zero_grad(set_to_none) mid-backward
    # would) leaves the flat buffer stale: the step must say so, not train on zeros.
    victim = parts.optimizers[0].arena_group.params[0]

    def replace_grad(p):
        p.grad = p.grad.clone()

    victim.register_post_accumulate_grad_hook(replace_grad)
    with pytest.raises(RuntimeError, match="no longer a view"):
        parts.step([(x, x)], 1e-3)
    with pytest.raises(ValueError, match="grad_dtype"):
        build_recipe("toolkit_memory", TINY, grad_dtype="fp16")
    assert recipe_option_defaults("toolkit_memory")["grad_dtype"] == "auto"


def test_auto_grad_dtype_picks_the_path_per_step_and_switches(torch_kernels):
    # "auto": one micro-batch -> the flat bf16 buffer (no hooks), several -> the hook-folded
    # fp32 accumulator; a step with another count switches, releasing the old path's buffers,
    # and each path gives the numbers of the explicit option from the same state.
    x = torch.randint(0, 320, (2, 17))
    y = torch.randint(0, 320, (2, 17))
    runs = {}
    for grad_dtype in ("auto", "bf16", "fp32"):
        torch.manual_seed(1)
        parts = build_recipe("toolkit_memory", TINY, grad_dtype=grad_dtype, checkpointing=False)
        runs[grad_dtype] = parts
        loss1 = parts.step([(x, y)], 1e-3)
        if grad_dtype != "fp32":
            assert parts.options["grad_path"] == "bf16"
            assert all(opt.flat_grad is not None for opt in parts.optimizers)
        runs[grad_dtype] = (parts, loss1)
    auto, loss_auto = runs["auto"]
    bf16, loss_bf16 = runs["bf16"]
    assert torch.equal(loss_auto, loss_bf16)
    for a, b in zip(auto.optimizers, bf16.optimizers):
        assert torch.equal(a.master, b.master)
    # Two micro-batches: auto switches to the fp32 hooks (bf16 would refuse).
    loss2 = auto.step([(x, y), (y, x)], 1e-3)
    assert auto.options["grad_path"] == "fp32"
    assert all(opt.flat_grad is None for opt in auto.optimizers)
    assert torch.isfinite(loss2)
    with pytest.raises(ValueError, match="exactly one micro-batch"):
        bf16.step([(x, y), (y, x)], 1e-3)
    # And back to one micro-batch: the flat buffers again, the hooks gone.
    auto.step([(x, y)], 1e-3)
    assert auto.options["grad_path"] == "bf16"
    assert all(p.grad is not None for opt in auto.optimizers for p in opt.arena_group.params)


def test_bf16_grads_run_training_learns_like_fp32(corpus, torch_kernels):
    kwargs = dict(model_cfg=TINY, tokens=4 * 32 * 8, micro_batch=4, accum=1, seq_len=32,
                  eval_every=8, corpus=corpus, device="cpu", eval_batches=2,
                  optim=OptimConfig(lr=3e-3, warmup_steps=2))  # fmt: skip
    runs = {
        g: run_training("toolkit_memory", recipe_options={"grad_dtype": g}, **kwargs)
        for g in ("fp32", "bf16")
    }
    for result in runs.values():
        assert result.step_loss[-1] < result.step_loss[0] - 0.3, result.step_loss
    assert runs["bf16"].config["recipe_options"]["grad_dtype"] == "bf16"
    assert runs["bf16"].evals[-1]["val_loss"] == pytest.approx(
        runs["fp32"].evals[-1]["val_loss"], rel=5e-3
    )


@pytest.mark.gpu
def test_bf16_grads_step_is_sync_free():
    parts = build_recipe("toolkit_memory", TINY, device="cuda", grad_dtype="bf16")
    x = torch.randint(0, 320, (2, 32), device="cuda")
    parts.step([(x, x)], 1e-3)  # compiles the kernels, plans the checkpointing
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = parts.step([(x, x)], 2e-3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


# ---------------------------------------------------------------------------------------------
# init_device
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["baseline_fp32", "baseline_bf16", "toolkit_memory"])
def test_init_device_cpu_is_the_default_model(recipe, torch_kernels):
    torch.manual_seed(4)
    default = build_recipe(recipe, TINY)
    torch.manual_seed(4)
    explicit = build_recipe(recipe, TINY, init_device="cpu")
    for a, b in zip(default.model.parameters(), explicit.model.parameters()):
        assert torch.equal(a, b)
    if recipe == "toolkit_memory":
        torch.manual_seed(4)
        ref = GPT2(TINY)
        names = dict(ref.named_parameters())
        for opt in explicit.optimizers:
            group = opt.arena_group
            for seg, master in zip(group.table, group.views(opt.master)):
                assert torch.equal(master, names[seg.name].detach()), seg.name


def test_init_device_bad_values():
    with pytest.raises(ValueError, match="init_device"):
        build_recipe("baseline_fp32", TINY, init_device="meta")
    with pytest.raises(ValueError, match="init_device"):
        build_recipe("toolkit_memory", TINY, init_device="meta")
    # A build argument, not a recipe option: not listed, not accepted as one by run_training.
    assert "init_device" not in recipe_option_defaults("toolkit_memory")
    assert recipe_option_defaults("baseline_bf16") == {}


@pytest.mark.gpu
def test_init_device_on_the_gpu_builds_there():
    # The fp32 model is initialized on the GPU; the toolkit's master weights are that model.
    torch.manual_seed(5)
    parts = build_recipe("toolkit_memory", TINY, device="cuda", init_device="cuda")
    torch.manual_seed(5)
    with torch.device("cuda"):
        ref = GPT2(TINY)
    names = dict(ref.named_parameters())
    for opt in parts.optimizers:
        group = opt.arena_group
        for seg, master in zip(group.table, group.views(opt.master)):
            assert torch.equal(master, names[seg.name].detach()), seg.name


# ---------------------------------------------------------------------------------------------
# run_training: eval_at_start, max_train_s
# ---------------------------------------------------------------------------------------------


RUN = dict(model_cfg=TINY, tokens=2 * 32 * 6, micro_batch=2, accum=1, seq_len=32, eval_every=3,
           eval_batches=2)  # fmt: skip


def test_eval_at_start_records_step_zero(corpus):
    result = run_training("baseline_fp32", corpus=corpus, eval_at_start=True, **RUN)
    assert [e["step"] for e in result.evals] == [0, 3, 6]
    assert result.evals[0]["tokens"] == 0
    # An untrained tiny model scores near the uniform loss over its vocabulary.
    assert result.evals[0]["val_loss"] == pytest.approx(math.log(TINY.vocab_size), rel=0.05)
    plain = run_training("baseline_fp32", corpus=corpus, **RUN)
    assert [e["step"] for e in plain.evals] == [3, 6]
    assert plain.step_loss == result.step_loss  # the evaluation changes nothing


def test_max_train_s_stops_early_and_evaluates(corpus):
    result = run_training("baseline_fp32", corpus=corpus, max_train_s=1e-9, **RUN)
    assert result.stopped_early
    assert len(result.step_loss) == 1 and len(result.step_time_s) == 1
    assert result.config["steps_done"] == 1 and result.config["steps"] == 6
    assert result.tokens_trained == 2 * 32
    assert [e["step"] for e in result.evals] == [1]
    full = run_training("baseline_fp32", corpus=corpus, max_train_s=3600.0, **RUN)
    assert not full.stopped_early and len(full.step_loss) == 6
    assert full.step_loss[0] == result.step_loss[0]
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="max_train_s"):
            run_training("baseline_fp32", corpus=corpus, max_train_s=bad, **RUN)


def test_cpu_runs_have_no_cuda_peaks(corpus):
    result = run_training("baseline_fp32", corpus=corpus, **RUN)
    assert result.peak_memory_allocated is None and result.peak_memory_train is None
    assert result.peak_memory_build is None and result.peak_memory_reserved is None


# ---------------------------------------------------------------------------------------------
# The planner's view of the recipes, on the 1B shapes (host-side, no memory used)
# ---------------------------------------------------------------------------------------------


GPT2_1B = GPT2Config.from_name("gpt2-1b")


def test_toolkit_peak_bf16_is_the_fp32_estimate_less_two_bytes_per_parameter():
    for blocks in (0, 12, 24):
        spec, setup = toolkit_setup(GPT2_1B, 8, 1024, checkpoint_blocks=blocks)
        fp32 = estimate(spec, setup).peak_bytes
        assert toolkit_peak_bytes(GPT2_1B, 8, 1024, checkpoint_blocks=blocks,
                                  grad_dtype="fp32") == fp32  # fmt: skip
        # "auto" is the bf16 buffer for one micro-batch per step, the fp32 fold for several.
        assert toolkit_peak_bytes(GPT2_1B, 8, 1024, checkpoint_blocks=blocks) == (
            fp32 - 2 * GPT2_1B.num_params()
        )
        assert toolkit_peak_bytes(GPT2_1B, 4, 1024, 2, checkpoint_blocks=blocks) == (
            toolkit_peak_bytes(GPT2_1B, 4, 1024, 2, checkpoint_blocks=blocks, grad_dtype="fp32")
        )
        bf16 = toolkit_peak_bytes(GPT2_1B, 8, 1024, checkpoint_blocks=blocks, grad_dtype="bf16")
        assert bf16 == fp32 - 2 * GPT2_1B.num_params()
    with pytest.raises(ValueError, match="grad_dtype"):
        toolkit_peak_bytes(GPT2_1B, 8, 1024, grad_dtype="fp8")


def test_the_1b_configuration_fits_16_gib_only_with_bf16_grads():
    # The suite's gpt2-1b run: 8 x 1024, budget 14 GiB (of the 16 GiB cap).
    budget = 14.0
    limit = budget * (1 - PLANNER_MARGIN) * GIB
    k16, peaks16 = plan_checkpoint_blocks(GPT2_1B, 8, 1024, memory_budget_gib=budget,
                                          grad_dtype="bf16")  # fmt: skip
    # Every block checkpointed is the planner's answer, and it is under the 16 GiB cap with
    # at least 10% to spare (what the allocator's fragmentation may take).
    assert k16 == GPT2_1B.n_layer
    assert peaks16[k16] < 0.9 * 16 * GIB
    assert all(peak > limit for k, peak in peaks16.items() if k < k16)
    # The fp32 accumulator does not fit the 16 GiB cap with the planner's 5% margin at any
    # micro-batch, even with every block checkpointed.
    for micro_batch in (1, 8):
        fp32 = toolkit_peak_bytes(GPT2_1B, micro_batch, 1024, checkpoint_blocks=GPT2_1B.n_layer,
                                  grad_dtype="fp32")  # fmt: skip
        assert fp32 > 16 * (1 - PLANNER_MARGIN) * GIB
    # The baselines do not fit 16 GiB at all (recorded as out of memory on the GPU).
    for recipe in ("baseline_fp32", "baseline_bf16"):
        assert planned_peak_bytes(recipe, GPT2_1B, 8, 1024) > 16 * GIB


def test_planned_peak_bytes_follows_the_recipes_setups():
    spec = gpt2_spec("gpt2", 2, 64, 2, 320, 64)
    fp32 = estimate(spec, setup_preset("fp32", micro_batch=2, seq_len=32, phases=("full",)))
    assert planned_peak_bytes("baseline_fp32", TINY, 2, 32) == fp32.peak_bytes
    autocast = setup_preset("bf16-autocast", micro_batch=2, seq_len=32, accum_steps=3,
                            phases=("full",))  # fmt: skip
    assert (
        planned_peak_bytes("baseline_bf16", TINY, 2, 32, 3) == estimate(spec, autocast).peak_bytes
    )
    # toolkit_memory: the resolved checkpoint_blocks wins; "auto" before the first step is the
    # planner's own choice; True / False / K as the recipe reads them.
    opts = {"grad_dtype": "bf16", "state_bits": 4}
    k, peaks = plan_checkpoint_blocks(TINY, 2, 32, memory_budget_gib=4.0, **opts)
    assert planned_peak_bytes("toolkit_memory", TINY, 2, 32, options=opts) == peaks[k]
    for ckpt, blocks in ((True, 2), (False, 0), (1, 1)):
        got = planned_peak_bytes("toolkit_memory", TINY, 2, 32,
                                 options={**opts, "checkpointing": ckpt})  # fmt: skip
        assert got == toolkit_peak_bytes(TINY, 2, 32, checkpoint_blocks=blocks, **opts)
    resolved = {**opts, "checkpoint_blocks": 2}
    assert planned_peak_bytes("toolkit_memory", TINY, 2, 32, options=resolved) == (
        toolkit_peak_bytes(TINY, 2, 32, checkpoint_blocks=2, **opts)
    )
    with pytest.raises(ValueError, match="no planner setup"):
        planned_peak_bytes("toolkit_magic", TINY, 2, 32)
