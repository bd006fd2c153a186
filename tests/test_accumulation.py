"""GradAccumulator: post-accumulate-grad hooks fold each gradient into the fp32 arena
accumulator as backward produces it; N micro-batches equal one batch N times as large."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close
from hybrid_triton.kernels import accumulate_grads_ref
from tolerances import tol

from hybrid_triton.accumulation import GradAccumulator
from hybrid_triton.arena import ArenaError, FlatArena
from hybrid_triton.models.gpt2 import GPT2, GPT2Config
from hybrid_triton.precision import DynamicLossScaler

CFG = GPT2Config(block_size=16, vocab_size=67, n_layer=1, n_head=2, n_embd=16)


def tiny_gpt2(device, dtype=torch.float32) -> GPT2:
    return GPT2(CFG).to(device=device, dtype=dtype)


def batch(n, device, seq=16):
    idx = torch.randint(0, CFG.vocab_size, (n, seq), device=device)
    return idx, torch.randint(0, CFG.vocab_size, (n, seq), device=device)


def big_batch_grads(model, idx, tgt) -> list[torch.Tensor]:
    ref = copy.deepcopy(model)
    _, loss = ref(idx, tgt)
    loss.backward()
    return [p.grad for p in ref.parameters()]  # named_parameters order = arena order


@pytest.mark.parametrize("micro", [1, 3])
def test_n_micro_batches_equal_one_big_batch(device, micro):
    model = tiny_gpt2(device)
    idx, tgt = batch(4 * micro, device)
    expected = big_batch_grads(model, idx, tgt)
    arena = FlatArena.from_module(model)
    accum = GradAccumulator(arena, micro, module=model, batch_size=4)
    for i in range(micro):
        _, loss = model(idx[4 * i : 4 * i + 4], tgt[4 * i : 4 * i + 4])
        loss.backward()
        assert all(p.grad is None for p in model.parameters()), "hooks must drop every .grad"
        assert accum.micro_batch == i + 1
    assert accum.ready
    for (name, _), got, want in zip(model.named_parameters(), accum.grads(), expected):
        assert_close(name, got, want, atol=1e-6, rtol=1e-5)
    norm64 = torch.sqrt(sum(g.double().square().sum() for g in expected)).reshape(1)
    assert_close("grad_norm", accum.grad_norm(), norm64, atol=1e-6, rtol=1e-5)
    seg64 = torch.stack([g.double().square().sum().sqrt() for g in expected])
    assert_close("segment_norms", accum.segment_norms(), seg64, atol=1e-6, rtol=1e-5)
    m = accum.metrics()
    assert (m["micro_batch"], m["progress"], m["effective_batch"]) == (micro, 1.0, 4 * micro)


def test_a_new_window_overwrites_the_last(device):
    model = tiny_gpt2(device)
    arena = FlatArena.from_module(model)
    accum = GradAccumulator(arena, 2)
    for _ in range(2):  # first window
        model(*batch(2, device))[1].backward()
    idx, tgt = batch(4, device)
    expected = big_batch_grads(model, idx, tgt)
    for i in range(2):  # second window: must not include the first
        model(idx[2 * i : 2 * i + 2], tgt[2 * i : 2 * i + 2])[1].backward()
        assert accum.micro_batch == i + 1
    assert accum.metrics()["windows"] == 2
    for got, want in zip(accum.grads(), expected):
        assert_close("acc", got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_grads_fold_into_fp32(device, dtype):
    if dtype == torch.float16 and device == "cpu":
        pytest.skip("fp16 GPT-2 forward is a GPU configuration")
    model = tiny_gpt2(device, dtype)
    ref_model = copy.deepcopy(model)
    arena = FlatArena.from_module(model)
    accum = GradAccumulator(arena, 3)
    ref_acc = [torch.zeros(p.shape, device=device) for p in ref_model.parameters()]
    for i in range(3):
        idx, tgt = batch(2, device)
        model(idx, tgt)[1].backward()
        ref_model(idx, tgt)[1].backward()
        for a, p in zip(ref_acc, ref_model.parameters()):
            accumulate_grads_ref(a, p.grad, alpha=1 / 3, first=i == 0)
            p.grad = None
    for got, want in zip(accum.grads(), ref_acc):
        assert_close("acc", got, want, **tol("accumulate", dtype))


def test_scaler_unscales_and_flags_in_the_hooks(device):
    model = tiny_gpt2(device)
    idx, tgt = batch(4, device)
    expected = big_batch_grads(model, idx, tgt)
    scaler = DynamicLossScaler(init_scale=2.0**10, device=device)
    accum = GradAccumulator(FlatArena.from_module(model), 2, scaler=scaler)
    for i in range(2):
        _, loss = model(idx[2 * i : 2 * i + 2], tgt[2 * i : 2 * i + 2])
        scaler.scale_loss(loss).backward()
    for got, want in zip(accum.grads(), expected):
        assert_close("unscaled acc", got, want, atol=1e-6, rtol=1e-5)
    assert scaler.found_inf.item() == 0.0
    _, loss = model(idx[:2], tgt[:2])
    (loss * float("inf")).backward()
    assert scaler.found_inf.item() == 1.0


def test_unused_parameter_gets_a_zero_gradient(device):
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 3), "unused": torch.nn.Linear(4, 3)})
    model = model.to(device)
    arena = FlatArena.from_module(model)
    accum = GradAccumulator(arena, 2)
    accum.accumulator.fill_(5.0)  # stale values from an earlier window
    x = torch.randn(6, 4, device=device)
    for i in range(2):
        model["used"](x[3 * i : 3 * i + 3]).square().sum().backward()
    names = [s.name for s in arena.group.table]
    grads = dict(zip(names, accum.grads()))
    assert (grads["unused.weight"] == 0).all().item() and (grads["unused.bias"] == 0).all().item()
    ref = copy.deepcopy(model["used"])
    ref(x).square().sum().backward()
    assert_close("used.weight", grads["used.weight"], ref.weight.grad / 2, atol=1e-6, rtol=1e-5)
    norms = accum.segment_norms()
    assert norms[names.index("unused.weight")].item() == 0.0


def test_dispatch_torch_and_triton_paths_agree(device, monkeypatch):
    results = {}
    idx, tgt = batch(4, device)
    for impl in ("torch", "triton"):
        monkeypatch.setenv("HYBRID_TRITON_IMPL", impl)
        torch.manual_seed(0)
        model = tiny_gpt2(device)
        accum = GradAccumulator(FlatArena.from_module(model), 2)
        for i in range(2):
            model(idx[2 * i : 2 * i + 2], tgt[2 * i : 2 * i + 2])[1].backward()
        results[impl] = (accum.accumulator.clone(), accum.seg_sumsq[0].clone())
    assert_close(
        "acc", results["triton"][0], results["torch"][0], **tol("accumulate", torch.float32)
    )
    assert_close(
        "seg_sumsq", results["triton"][1], results["torch"][1], **tol("sumsq", torch.float32)
    )


def test_bad_construction(device):
    model, other = tiny_gpt2(device), tiny_gpt2(device)
    arena = FlatArena.from_module(model)
    with pytest.raises(ArenaError, match="another module"):
        GradAccumulator(arena, 2, module=other)
    with pytest.raises(ValueError, match="num_micro_batches"):
        GradAccumulator(arena, 0)
    other_arena = FlatArena.from_module(other)
    wrong = torch.zeros(arena.group.numel + 64, device=device)
    with pytest.raises(ArenaError, match="does not belong to this arena"):
        GradAccumulator(arena, 2, accumulators=[wrong])
    with pytest.raises(ArenaError, match="FlatArena or ArenaGroup"):
        GradAccumulator(model, 2)
    assert other_arena.group.numel == arena.group.numel
    # Nothing was hooked by the failed constructions: plain backward still fills .grad.
    model(*batch(1, device))[1].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_remove_restores_plain_grads(device):
    model = tiny_gpt2(device)
    accum = GradAccumulator(FlatArena.from_module(model), 2)
    accum.remove()
    model(*batch(1, device))[1].backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.gpu
def test_gpu_hook_path_never_syncs():
    model = tiny_gpt2("cuda")
    scaler = DynamicLossScaler(device="cuda")
    accum = GradAccumulator(FlatArena.from_module(model), 2, scaler=scaler)
    idx, tgt = batch(2, "cuda")
    scaler.scale_loss(model(idx, tgt)[1]).backward()  # compile the kernels first
    accum.reset()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            scaler.scale_loss(model(idx, tgt)[1]).backward()
        scaler.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert accum.ready and torch.isfinite(accum.grad_norm()).item()


def test_a_dropped_model_and_accumulator_are_collected():
    """Hooks live in the parameters' C++ autograd data, invisible to Python's collector: a
    hook holding the accumulator strongly made an uncollectable cycle (parameter -> hook ->
    accumulator -> arena -> parameter) that kept a dropped setup's tensors alive."""
    import gc
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    accum = GradAccumulator(FlatArena.from_module(model), 1)
    model(torch.randn(3, 8)).sum().backward()
    refs = [weakref.ref(p) for p in model.parameters()] + [weakref.ref(accum.accumulators[0])]
    del model, accum
    gc.collect()
    assert all(r() is None for r in refs), "a dropped model/accumulator is still alive"


def test_huge_finite_gradients_keep_a_finite_norm_and_are_clipped_not_skipped():
    """Gradients of 1e20 square to 1e40, past fp32's range: the sums are float64, so the
    step clips them instead of reading an infinite norm."""
    from hybrid_triton.optim import FusedAdamW

    model = torch.nn.Linear(7, 5)
    ref = torch.nn.Linear(7, 5)
    ref.load_state_dict(model.state_dict())
    arena = FlatArena.from_module(model)
    accum = GradAccumulator(arena, num_micro_batches=1, module=model)
    opt = FusedAdamW(arena, lr=1e-2, weight_decay=0.0, max_grad_norm=1.0)
    x = torch.randn(3, 7)
    (model(x).sum() * 1e20).backward()
    (ref(x).sum() * 1e20).backward()
    grads = torch.cat([p.grad.reshape(-1).double() for p in ref.parameters()])
    assert torch.isfinite(accum.total_sumsq).all()
    torch.testing.assert_close(
        accum.total_sumsq.double(), grads.square().sum().reshape(1), rtol=1e-5, atol=0
    )
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(grad=accum.accumulator, grad_sumsq=accum.total_sumsq)
    moved = [(p - b).abs().max().item() for p, b in zip(model.parameters(), before)]
    assert all(m > 0 for m in moved)  # the step was taken, not skipped
