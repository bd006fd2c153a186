"""StreamingAdamW: host-resident master weights and moments, gradients leaving during backward,
the update streamed through chunks. Its master weights must equal the in-GPU FusedAdamW's
(GradAccumulator + FusedAdamW, the same kernels) bit for bit, with accumulation, clipping and a
skipped non-finite step; on a CPU-only machine both run on the CPU through the interpreter."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from helpers import assert_close
from torch import nn

from hybrid_triton.accumulation import GradAccumulator
from hybrid_triton.arena import FlatArena
from hybrid_triton.models.gpt2 import GPT2, GPT2Config
from hybrid_triton.optim import FusedAdamW
from hybrid_triton.streaming import StreamingAdamW

CFG = GPT2Config(block_size=8, vocab_size=53, n_layer=1, n_head=2, n_embd=16)
HP = {"lr": 3e-2, "weight_decay": 0.1, "betas": (0.9, 0.99)}
MAX_NORM = 0.05


class WithUnused(nn.Module):
    """tiny GPT-2 plus a parameter that never gets a gradient (an unused head)."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt = GPT2(CFG)
        self.unused = nn.Parameter(torch.randn(7))

    def forward(self, idx, tgt):
        return self.gpt(idx, tgt)[1]


def make_pair(device, bits, micro, max_norm, **kw):
    model = WithUnused().to(device=device, dtype=torch.bfloat16)
    ref = copy.deepcopy(model)
    eng = StreamingAdamW(
        model.parameters(), **HP, num_micro_batches=micro, state_bits=bits,
        max_grad_norm=max_norm, **kw,
    )  # fmt: skip
    arena = FlatArena.from_module(ref)
    # The reference clips through grad_scale (run_steps), so it is built without max_grad_norm.
    opt = FusedAdamW(arena, **HP, state_bits=bits)
    acc = GradAccumulator(arena, micro)
    return model, eng, ref, opt, acc


def run_steps(model, eng, ref, opt, acc, device, steps, micro, poison_step=None, clipped=True):
    for step in range(steps):
        for o in (eng, opt):  # a schedule: both read param_groups[0]["lr"] at every step
            o.param_groups[0]["lr"] = HP["lr"] * (1.0 - 0.2 * step)
        for k in range(micro):
            idx = torch.randint(0, CFG.vocab_size, (2, CFG.block_size), device=device)
            tgt = torch.randint(0, CFG.vocab_size, (2, CFG.block_size), device=device)
            scale = float("inf") if (step, k) == (poison_step, micro - 1) else 1.0
            (model(idx, tgt) * scale).backward()
            (ref(idx, tgt) * scale).backward()
        # The reference clips with the engine's norm definition (float32 of the float64 norm
        # of the accumulated gradient; test_norm_definition checks it) and FusedAdamW's
        # formula, and skips on the same flag.
        norm = acc.accumulator.double().norm().float().reshape(1)
        clip = (MAX_NORM / (norm + 1e-6)).clamp_(max=1.0) if clipped else None
        opt.step(grad=acc.accumulator, grad_scale=clip, found_inf=(~norm.isfinite()).float())
        eng.step()
        assert eng.last_step_skipped == (step == poison_step)


@pytest.mark.parametrize(
    "bits,update",
    [(32, "device"), (16, "device"), (8, "device"), (4, "device"), (8, "host")],
    ids=["fp32", "bf16", "8bit", "4bit", "8bit-host"],
)
def test_matches_fused_adamw_bit_for_bit(bits, update):
    micro, steps = 2, 3
    # A chunk smaller than the model: several chunks, the last one partial.
    pair = make_pair("cpu", bits, micro, max_norm=MAX_NORM, update=update, chunk_numel=1024)
    model, eng, _, opt, _ = pair
    assert eng.num_chunks > 2
    eng.overlap_next_forward(model)  # per-module waits (no-ops on the CPU) change no math
    run_steps(*pair, "cpu", steps, micro, poison_step=1)
    eng.synchronize()
    assert eng.step_count == steps - 1 == int(opt.flat_state["step"])
    assert torch.equal(eng.master, opt.master), "master weights differ"
    assert torch.equal(eng.arena_group.flat, opt.arena_group.flat), "bf16 weights differ"
    for k, v in eng.state_dict()["state"].items():
        if k not in ("step", "master"):
            assert torch.equal(v, opt.flat_state[k]), k
    assert all(p.grad is None for p in model.parameters()), "gradients stayed on the params"


@pytest.mark.parametrize("bits", [8, 4])
def test_last_chunk_ends_inside_a_quantization_block(bits):
    # 2112 elements: two full chunks of 1024 and one of 64, less than a 128/256 block.
    p = nn.Parameter(torch.randn(33, 64, dtype=torch.bfloat16))
    q = nn.Parameter(p.detach().clone())
    eng = StreamingAdamW([p], **HP, state_bits=bits, chunk_numel=1024)
    opt = FusedAdamW([q], **HP, state_bits=bits)
    assert eng.num_chunks == 3
    for _ in range(3):
        w = torch.randn(33, 64)
        (p.float() * w).sum().backward()
        (q.float() * w).sum().backward()
        eng.step()
        opt.step()
        opt.zero_grad()
    assert torch.equal(eng.master, opt.master)
    assert torch.equal(p, q)


def test_norm_definition():
    model = nn.Linear(5, 3).to(torch.bfloat16)
    eng = StreamingAdamW(model.parameters(), lr=0.1, max_grad_norm=1e-3, num_micro_batches=2)
    for _ in range(2):
        model(torch.randn(4, 5, dtype=torch.bfloat16)).float().sum().backward()
    eng.step()
    acc = eng.host_buffers()["acc"].double()
    # The float64 norm of the accumulated gradient, rounded once to float32.
    assert eng.last_grad_norm == float(acc.norm().float())
    assert eng.last_grad_norm > 1e-3  # the clip coefficient was below 1


def test_huge_gradients_do_not_overflow_the_norm():
    p = nn.Parameter(torch.ones(300, dtype=torch.bfloat16))
    eng = StreamingAdamW([p], lr=1e-3, max_grad_norm=1.0)
    (p.float() * 1e30).sum().backward()  # each grad 1e30: its float32 square overflows
    eng.step()
    expected = float(torch.tensor(1e30, dtype=torch.bfloat16).double() * 300**0.5)
    assert not eng.last_step_skipped
    assert torch.isfinite(eng.master).all() and (eng.master < 1).all()  # a clipped step taken
    assert_close("norm", torch.tensor(eng.last_grad_norm), torch.tensor(expected), rtol=1e-6)


def test_state_dict_round_trip_and_fused_state_loads():
    micro = 1
    pair = make_pair("cpu", 8, micro, max_norm=None, chunk_numel=2048)
    model, eng, _, opt, _ = pair
    run_steps(*pair, "cpu", 2, micro, clipped=False)
    saved = copy.deepcopy(eng.state_dict())
    other = StreamingAdamW(copy.deepcopy(model).parameters(), **HP, state_bits=8, chunk_numel=4096)
    other.load_state_dict(saved)
    assert other.step_count == 2 and torch.equal(other.master, eng.master)
    # FusedAdamW's state (same layout and bits) loads as well: in-GPU <-> streamed.
    fresh = StreamingAdamW(FlatArena.from_module(copy.deepcopy(model)), **HP, state_bits=8)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch.equal(fresh.master, opt.master)
    assert torch.equal(fresh.state_dict()["state"]["exp_avg"], opt.flat_state["exp_avg"])


def test_bad_state_dict_changes_nothing():
    model = nn.Linear(4, 4).to(torch.bfloat16)
    eng = StreamingAdamW(model.parameters(), state_bits=8)
    before = eng.master.clone()
    good = copy.deepcopy(eng.state_dict())
    good["state"]["master"].fill_(7.0)
    bad_bits = copy.deepcopy(good)
    bad_bits["layout"]["state_bits"] = 4
    with pytest.raises(ValueError, match="state_bits"):
        eng.load_state_dict(bad_bits)
    bad_shape = copy.deepcopy(good)
    bad_shape["state"]["exp_avg"] = bad_shape["state"]["exp_avg"][:-1]
    with pytest.raises(ValueError, match="exp_avg"):
        eng.load_state_dict(bad_shape)
    with pytest.raises(ValueError, match="layout"):
        eng.load_state_dict({"state": {}})
    assert torch.equal(eng.master, before)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"state_bits": 3}, "state_bits"),
        ({"update": "gpu"}, "update"),
        ({"num_micro_batches": 0}, "num_micro_batches"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"chunk_numel": 0}, "chunk_numel"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"state_bits": 8, "qblock": 100}, "power of two"),
        ({"state_bits": 32, "qblock": 128}, "qblock applies"),
    ],
    ids=["bits", "update", "micro", "clip", "chunk", "betas", "qblock", "qblock-unused"],
)
def test_bad_options(kwargs, match):
    model = nn.Linear(4, 4).to(torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        StreamingAdamW(model.parameters(), **kwargs)


def test_overlap_needs_a_module_with_these_parameters():
    eng = StreamingAdamW(nn.Linear(4, 4).to(torch.bfloat16).parameters())
    with pytest.raises(ValueError, match="owns none"):
        eng.overlap_next_forward(nn.Linear(4, 4))


def test_import_is_free():
    code = (
        "import sys, torch\n"
        "import hybrid_triton.streaming, hybrid_triton.planner.streaming\n"
        "assert 'triton' not in sys.modules, 'triton was imported eagerly'\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stale_gradients_rejected():
    model = nn.Linear(4, 2).to(torch.bfloat16)
    model(torch.randn(3, 4, dtype=torch.bfloat16)).sum().backward()
    with pytest.raises(RuntimeError, match=r"hold a \.grad"):
        StreamingAdamW(model.parameters())


def test_fp32_weights_rejected():
    with pytest.raises(ValueError, match="bf16 or fp16"):
        StreamingAdamW(nn.Linear(4, 4).parameters())


def test_step_and_backward_out_of_order():
    model = nn.Linear(4, 2).to(torch.bfloat16)
    eng = StreamingAdamW(model.parameters(), num_micro_batches=2)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="0 of 2"):
        eng.step()
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="1 of 2"):
        eng.step()
    with pytest.raises(RuntimeError, match="pause"):
        eng.pause()
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="beyond the 2 micro-batches"):
        model(x).sum().backward()


def test_pause_passes_gradients_through_and_resume_restarts():
    model = nn.Linear(4, 2).to(torch.bfloat16)
    eng = StreamingAdamW(model.parameters(), lr=0.1, chunk_numel=16)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    model(x).sum().backward()
    eng.step()
    assert eng.device_bytes() > 0
    eng.pause()
    assert eng.paused and eng.device_bytes() == 0
    before = eng.master.clone()
    model(x).sum().backward()
    assert model.weight.grad is not None  # passed through, untouched
    with pytest.raises(RuntimeError, match="paused"):
        eng.step()
    with pytest.raises(RuntimeError, match=r"hold a \.grad"):
        eng.resume()  # the paused phase's gradient would be added to the next one
    assert eng.paused
    model.zero_grad()
    eng.resume()
    model(x).sum().backward()
    assert model.weight.grad is None
    eng.step()
    assert eng.step_count == 2 and not torch.equal(eng.master, before)


def test_discard_gradients_starts_a_new_window():
    model = nn.Linear(4, 2).to(torch.bfloat16)
    eng = StreamingAdamW(model.parameters(), num_micro_batches=2)
    model(torch.randn(3, 4, dtype=torch.bfloat16)).sum().backward()
    eng.discard_gradients()
    eng.pause()  # allowed now: nothing is half-accumulated
    eng.resume()


def test_host_bytes_report_every_buffer():
    model = nn.Linear(64, 64).to(torch.bfloat16)
    eng = StreamingAdamW(model.parameters(), state_bits=8)
    sizes = eng.host_bytes()
    n = eng.arena_group.numel
    assert sizes["master"] == 4 * n and sizes["acc"] == 4 * n and sizes["staging"] == 2 * n
    assert sizes["exp_avg"] == n and sizes["exp_avg_sq"] == n


# ----------------------------------------------------------------------------------------------
# CUDA: pinned host memory, side streams, events (for the GPU session)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [32, 8, 4])
def test_cuda_stream_matches_fused_adamw(bits):
    micro, steps = 3, 4
    pair = make_pair("cuda", bits, micro, max_norm=MAX_NORM, chunk_numel=1 << 12)
    model, eng, _, opt, _ = pair
    eng.overlap_next_forward(model)  # forwards wait per module on the update stream's events
    assert eng.master.is_pinned() and eng.host_buffers()["acc"].is_pinned()
    run_steps(*pair, "cuda", steps, micro, poison_step=2)
    eng.synchronize()
    eng.wait_for_update()
    assert torch.equal(eng.master, opt.master.cpu())
    assert torch.equal(eng.arena_group.flat, opt.arena_group.flat)
    eng.remove()


@pytest.mark.gpu
def test_cuda_host_update_close_to_device_update():
    # The host path runs adamw_step's torch reference: within an ulp of the kernel, not bitwise.
    pair = make_pair("cuda", 32, 1, max_norm=None, update="host", chunk_numel=1 << 12)
    _, eng, _, opt, _ = pair
    run_steps(*pair, "cuda", 3, 1, clipped=False)
    eng.synchronize()
    assert_close("master", eng.master, opt.master.cpu(), rtol=1e-6, atol=1e-7)
    eng.remove()


@pytest.mark.gpu
def test_cuda_no_gradient_stays_on_the_device():
    model = WithUnused().to(device="cuda", dtype=torch.bfloat16)
    eng = StreamingAdamW(model.parameters(), num_micro_batches=1)
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.block_size), device="cuda")
    model(idx, idx).backward()
    assert all(p.grad is None for p in model.parameters())
    eng.step()
    eng.remove()


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_planner_counts_match_the_engine(bits):
    from hybrid_triton.planner.streaming import streaming_cost

    model = nn.Linear(100, 30).to(torch.bfloat16)
    eng = StreamingAdamW(model.parameters(), state_bits=bits, chunk_numel=1024)
    x = torch.randn(2, 100, dtype=torch.bfloat16)
    model(x).sum().backward()
    eng.step()
    n = eng.arena_group.numel
    cost = streaming_cost(
        n, state_bits=bits, chunk_numel=eng.chunk_numel, compute_seconds_per_micro_batch=1.0,
        h2d_bytes_per_second=1e9, d2h_bytes_per_second=1e9, num_micro_batches=2,
    )  # fmt: skip
    assert cost.host_bytes == sum(eng.host_bytes().values())
    assert cost.device_bytes == 2 * n + eng.device_bytes()
    assert cost.d2h_bytes_per_step == 2 * 2 * n + eng.host_bytes()["master"] + sum(
        v for k, v in eng.host_bytes().items() if k.startswith("exp_avg")
    )
    assert 0 < cost.gpu_busy_share < 1
