"""Multi-process tests of ``hybrid_triton.distributed`` on the gloo backend (CPU).

Each test starts 2 processes (``torch.multiprocessing``, a fresh TCP port) that run a worker
function below and save what they observed; the test compares it with a single-process run
in this process. Kernels take the Triton interpreter (conftest sets TRITON_INTERPRET=1 and the
children inherit it), so shapes are tiny. The planner's per-rank numbers are pure functions
and are tested without processes at the end.

Models have odd sizes on purpose: FSDP shards them unevenly (padded local shards), and the
last layer has one output row, so rank 1 holds an empty shard of its weight.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hybrid_triton.accumulation import GradAccumulator
from hybrid_triton.arena import FlatArena
from hybrid_triton.optim import FusedAdamW

WORLD = 2
STEPS = 2
LR = 1e-2


# ------------------------------------------------------------------------- process harness


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, worker, world: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)  # two shared cores: intra-op threads only contend
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=local_rank, world_size=world
    )
    try:
        result = worker(local_rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{local_rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(worker, tmp_path: Path, *args, world: int = WORLD) -> list:
    """Run ``worker(rank, world, *args)`` on ``world`` gloo processes; their return values."""
    # A fork server that has imported torch, the toolkit and this module once per test
    # process: each rank then starts in well under a second instead of re-importing them.
    mp.set_forkserver_preload(["torch", "torch.distributed.fsdp", "hybrid_triton.distributed",
                               __name__])  # fmt: skip
    out = tmp_path / f"out_{worker.__name__}_{world}_{_free_port()}"
    out.mkdir()
    mp.start_processes(
        _entry,
        args=(worker, world, _free_port(), str(out), args),
        nprocs=world,
        join=True,
        start_method="forkserver",
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ------------------------------------------------------------------------- models and data


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.GELU(), nn.Linear(9, 5), nn.GELU(), nn.Linear(5, 1))


def make_data(steps: int = STEPS, batch: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=g), torch.randn(batch, 1, generator=g))
            for _ in range(steps)]  # fmt: skip


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def shard_model(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters as full tensors (DTensors gathered)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = v.detach().clone()
    return out


def reference_run(state_bits: int, micro: int, data, **opt_kw) -> dict[str, torch.Tensor]:
    """One process, the whole batch: FusedAdamW stepping from a hook-fed accumulator."""
    model = make_mlp()
    arena = FlatArena.from_module(model)
    opt = FusedAdamW(arena, lr=LR, state_bits=state_bits, **opt_kw)
    acc = GradAccumulator(arena, micro)
    for x, y in data:
        acc.reset()
        for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
            mse(model, (xm, ym)).backward()
        opt.step(grad=acc.accumulator, grad_sumsq=acc.total_sumsq)
    return full_state(model)


# ------------------------------------------------------------------------- workers


def _worker_flag(rank: int, world: int):
    """Flags, sums of squares, a skipped step on every rank, and rank-0 dynamics."""
    from hybrid_triton.distributed import (
        DistributedFusedAdamW,
        _RankZeroDynamics,
        all_reduce_flag,
        all_reduce_sumsq,
    )

    out = {}
    flag = torch.tensor([1.0 if rank == 1 else 0.0])
    out["flag"] = all_reduce_flag(flag).clone()
    sumsq = torch.tensor([float(rank + 1) ** 2])
    out["sumsq"] = all_reduce_sumsq(sumsq).clone()

    # Replicated model: only rank 1 asks to skip (a guard), with finite gradients.
    model = make_mlp()
    arena = FlatArena.from_module(model)
    opt = DistributedFusedAdamW(arena, lr=LR)
    acc = GradAccumulator(arena, 1)
    x, y = make_data(1, seed=10 + rank)[0]
    before = arena.group.flat.clone()
    mse(model, (x, y)).backward()
    skip = torch.tensor([1.0 if rank == 1 else 0.0])
    opt.step(grad=acc.accumulator, found_inf=skip, grad_sumsq=acc.total_sumsq)
    out["moved_when_skipped"] = (arena.group.flat - before).abs().max()
    out["skip_flag_after"] = skip.clone()
    out["step_after_skip"] = opt.flat_state["step"].clone()
    acc.reset()
    mse(model, (x, y)).backward()
    go = torch.zeros(1)
    opt.step(grad=acc.accumulator, found_inf=go, grad_sumsq=acc.total_sumsq)
    out["moved_when_finite"] = (arena.group.flat - before).abs().max()
    out["params"] = arena.group.flat.clone()

    class RankDependent:  # a device-side dynamics model whose outputs differ per rank
        device_side = True

        def confidence(self):
            return torch.tensor(0.1 * (rank + 1))

        def predict(self, horizon):
            return torch.full((horizon,), float(rank)), torch.full((horizon, 3), rank + 1.0)

    dyn = _RankZeroDynamics(RankDependent(), None, sharded=False)
    out["confidence"] = dyn.confidence()
    out["predict"] = dyn.predict(4)
    return out


def _worker_replicated(rank: int, world: int):
    """DDP-wrapped and plain replicated models with hook accumulation, 2 micro-batches each."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hybrid_triton.distributed import (
        DistributedFusedAdamW,
        broadcast_parameters,
        no_sync,
        sync_accumulator,
    )

    data = make_data()
    out = {}
    # DDP: rank 1 starts from other weights; DDP's constructor broadcasts rank 0's.
    ddp = DDP(make_mlp(seed=rank))
    arena = FlatArena.from_module(ddp.module)
    opt = DistributedFusedAdamW(arena, lr=LR)
    acc = GradAccumulator(arena, 2)
    for x, y in data:
        acc.reset()
        for xm, ym in zip(x.chunk(world)[rank].chunk(2), y.chunk(world)[rank].chunk(2)):
            with no_sync(ddp):
                mse(ddp, (xm, ym)).backward()
        opt.step(grad=acc.accumulator, grad_sumsq=acc.total_sumsq)
    out["ddp"] = full_state(ddp.module)
    out["ddp_grad_norm"] = acc.grad_norm().clone()
    # Plain module: broadcast once, sync the accumulator by hand, optimizer does no comms.
    model = make_mlp(seed=rank)
    arena = FlatArena.from_module(model)
    broadcast_parameters(arena)
    opt = DistributedFusedAdamW(arena, lr=LR, grad_sync="none")
    acc = GradAccumulator(arena, 2, found_inf=torch.zeros(1))
    for x, y in data:
        acc.reset()
        for xm, ym in zip(x.chunk(world)[rank].chunk(2), y.chunk(world)[rank].chunk(2)):
            mse(model, (xm, ym)).backward()
        sync_accumulator(acc)
        opt.step(grad=acc.accumulator, found_inf=acc.found_inf, grad_sumsq=acc.total_sumsq)
    out["plain"] = full_state(model)
    return out


def _worker_fsdp(rank: int, world: int, bits: tuple[int, ...]):
    """FSDP2 + the shard arena + sharded accumulation + fused AdamW, per state width."""
    from hybrid_triton.distributed import (
        DistributedFusedAdamW,
        ShardedGradAccumulator,
        shard_arena,
    )

    data = make_data()
    out = {}
    for state_bits in bits:
        model = shard_model(make_mlp())
        arena = shard_arena(model)
        opt = DistributedFusedAdamW(arena, lr=LR, state_bits=state_bits, max_grad_norm=0.5)
        acc = ShardedGradAccumulator(arena, 2)
        for x, y in data:
            acc.reset()
            for xm, ym in zip(x.chunk(world)[rank].chunk(2), y.chunk(world)[rank].chunk(2)):
                mse(model, (xm, ym)).backward()
            opt.step(grad=acc.accumulator, grad_sumsq=acc.total_sumsq)
        out[state_bits] = full_state(model)
        out[f"{state_bits}_norm"] = opt.last_grad_norm.clone()
        out[f"{state_bits}_padding"] = torch.stack(
            [
                acc.accumulator[s.offset + sh.local_numel : s.end].abs().sum()
                for s, sh in zip(arena.group.table, arena.shards)
            ]
        )
        out[f"{state_bits}_local_rows"] = [sh.local_rows for sh in arena.shards]
    return out


CYCLE = dict(
    warmup_steps=2,
    full_steps=3,
    min_predict_steps=2,
    max_predict_steps=2,
    correct_steps=1,
    confidence_threshold=0.05,
    max_consecutive_predicts=2,
    micro_batches=2,
    dynamics_model="trend",
    dynamics=dict(min_observations=2, calibration=4),
    host_lag=0,
)


def _train(trainer, rank: int, steps: int) -> dict:
    phases = []
    for i, (x, y) in enumerate(make_data(steps, seed=100 + rank)):  # each rank its own data
        phases.append(trainer.step((x + i * 0.01, y))["phase"])
    trainer.flush()
    return {"phases": phases, "losses": dict(trainer.metrics.losses)}


def _worker_phases(rank: int, world: int, steps: int):
    """The trainer under FSDP2 and under DDP, each rank with its own data."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hybrid_triton.distributed import DistributedHybridTrainer
    from hybrid_triton.scheduler import TrainerConfig

    out = {}
    sharded = DistributedHybridTrainer(shard_model(make_mlp()), mse,
                                       config=TrainerConfig(**CYCLE), lr=LR)  # fmt: skip
    out["fsdp"] = _train(sharded, rank, steps)
    out["fsdp_local_loss"] = float(mse(sharded.model, make_data(1, seed=100 + rank)[0]))
    replicated = DistributedHybridTrainer(
        DDP(make_mlp(seed=rank)), mse, config=TrainerConfig(**CYCLE), lr=LR
    )
    out["ddp"] = _train(replicated, rank, steps)
    out["ddp_params"] = replicated.group.flat.clone()
    return out


def _worker_checkpoint(rank: int, world: int, action: str, path: str, steps: int):
    """Train ``steps`` steps and save (``action="save"``) or load and report (``"load"``)."""
    from hybrid_triton.distributed import DistributedHybridTrainer
    from hybrid_triton.scheduler import TrainerConfig

    cfg = TrainerConfig(**{**CYCLE, "warmup_steps": 50})  # stay in Warmup: checkpoints allowed
    model = make_mlp() if world == 1 else shard_model(make_mlp())
    trainer = DistributedHybridTrainer(model, mse, config=cfg, lr=LR)
    if action == "load":
        trainer.load(path)
    else:
        for i, (x, y) in enumerate(make_data(steps, seed=7)):
            b = x.shape[0] // world
            trainer.step((x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b]))
            del i
        trainer.save(path)
    opt_state = trainer.optimizer.sharded_state_dict()
    full = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v.clone())
        for k, v in opt_state.items()
        if isinstance(v, torch.Tensor)
    }
    return {"model": full_state(trainer.model), "optim": full, "step": trainer.step_count}


# ------------------------------------------------------------------------- tests


def test_flag_reduced_so_every_rank_skips(tmp_path):
    results = run_ranks(_worker_flag, tmp_path)
    for r, out in enumerate(results):
        assert out["flag"].item() == 1.0, f"rank {r}: flag not reduced with MAX"
        assert out["sumsq"].item() == 1.0 + 4.0, f"rank {r}: sums of squares not summed"
        assert out["skip_flag_after"].item() == 1.0, f"rank {r}: skip flag not shared"
        assert out["moved_when_skipped"].item() == 0.0, f"rank {r} stepped while rank 1 skipped"
        assert out["step_after_skip"].item() == 0.0, f"rank {r}: step count advanced on a skip"
        assert out["moved_when_finite"].item() > 0.0, f"rank {r}: the finite step did not move"
        assert out["confidence"].item() == pytest.approx(0.1), "confidence not rank 0's"
        loss_mean, scales = out["predict"]
        assert torch.equal(loss_mean, torch.zeros(4)) and torch.equal(scales, torch.ones(4, 3))
    assert torch.equal(results[0]["params"], results[1]["params"]), "replicas diverged"


def test_replicated_accumulation_equals_large_batch(tmp_path):
    results = run_ranks(_worker_replicated, tmp_path)
    expected = reference_run(32, 1, make_data())
    for r, out in enumerate(results):
        for mode in ("ddp", "plain"):
            for k, v in expected.items():
                torch.testing.assert_close(
                    out[mode][k], v, rtol=1e-5, atol=1e-6, msg=f"rank {r} {mode} {k}"
                )
    assert torch.equal(results[0]["ddp_grad_norm"], results[1]["ddp_grad_norm"])


def test_fsdp2_fused_adamw_matches_single_process(tmp_path):
    """32-bit state: equal to the one-process run up to fp32 summation order. 8-bit state:
    the quantization blocks cover other elements when the arena holds a shard, so the
    moments round differently; the weights must still agree to a small fraction of the
    distance they moved."""
    results = run_ranks(_worker_fsdp, tmp_path, (32, 8))
    start = full_state(make_mlp())
    for bits in (32, 8):
        expected = reference_run(bits, 4, make_data(), max_grad_norm=0.5)
        for r, out in enumerate(results):
            assert out[f"{bits}_padding"].abs().max().item() == 0.0, "padding touched"
            for k, v in expected.items():
                got = out[bits][k]
                if bits == 32:
                    torch.testing.assert_close(got, v, rtol=1e-5, atol=1e-6,
                                               msg=f"rank {r} {k}")  # fmt: skip
                else:
                    moved = (v - start[k]).abs().max().item()
                    err = (got - v).abs().max().item()
                    assert moved > 0 and err <= 0.1 * moved, (
                        f"rank {r} {k}: 8-bit FSDP run differs by {err:.3e}, the weights "
                        f"moved by {moved:.3e}"
                    )
    # rank 1 holds an empty shard of the last weight (1 row over 2 ranks): still fine
    assert 0 in results[1]["32_local_rows"]
    # clipping used the global norm on both ranks
    assert torch.equal(results[0]["32_norm"], results[1]["32_norm"])


def test_phase_decisions_identical_on_every_rank(tmp_path):
    steps = 9
    results = run_ranks(_worker_phases, tmp_path, steps)
    r0, r1 = results
    # the local losses differ (each rank its own data) ...
    assert r0["fsdp_local_loss"] != r1["fsdp_local_loss"]
    for mode in ("fsdp", "ddp"):
        # ... but every decision is the same, and a Predict phase ran
        assert r0[mode]["phases"] == r1[mode]["phases"], f"{mode}: ranks took other phases"
        assert "predict" in r0[mode]["phases"], f"{mode}: no Predict phase in {steps} steps"
        assert r0[mode]["losses"] == r1[mode]["losses"], f"{mode}: host losses differ"
        assert all(math.isfinite(x) for v in r0[mode]["losses"].values() for x in v)
    assert torch.equal(r0["ddp_params"], r1["ddp_params"]), "DDP replicas diverged"


def test_checkpoint_reshards_between_world_sizes(tmp_path):
    """Saved by 2 FSDP ranks, loaded by 1 plain process; saved by that one, loaded by 2."""
    two = str(tmp_path / "ckpt_ws2")
    saved2 = run_ranks(_worker_checkpoint, tmp_path, "save", two, 2)[0]
    loaded1 = run_ranks(_worker_checkpoint, tmp_path, "load", two, 0, world=1)[0]
    one = str(tmp_path / "ckpt_ws1")
    saved1 = run_ranks(_worker_checkpoint, tmp_path, "save", one, 3, world=1)[0]
    loaded2 = run_ranks(_worker_checkpoint, tmp_path, "load", one, 0)
    for what, got, want in [("2 -> 1", loaded1, saved2)] + [
        (f"1 -> 2 (rank {r})", out, saved1) for r, out in enumerate(loaded2)
    ]:
        assert got["step"] == want["step"], f"{what}: step count"
        for k, v in want["model"].items():
            assert torch.equal(got["model"][k], v), f"{what}: parameter {k}"
        assert set(got["optim"]) == set(want["optim"]), f"{what}: optimizer keys"
        for k, v in want["optim"].items():
            assert torch.equal(got["optim"][k], v), f"{what}: optimizer state {k}"
    assert saved2["optim"]["step"].item() == 2 and saved1["optim"]["step"].item() == 3


# ------------------------------------------------------------------------- planner (pure)

from hybrid_triton.planner import PlannerError, estimate, preset, setup_preset  # noqa: E402
from hybrid_triton.planner.cli import main as plan_main  # noqa: E402
from hybrid_triton.planner.distributed import (  # noqa: E402
    SHARDED_COMPONENTS,
    estimate_per_rank,
    fsdp_units,
    sharded_numel,
)
from hybrid_triton.planner.estimate import _round  # noqa: E402

UNSHARDED = ("activations", "logits_and_loss", "autocast_cache", "temporaries", "workspace",
             "inputs")  # fmt: skip


@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
@pytest.mark.parametrize("setup_name", ["bf16-autocast", "bf16-master", "hybrid"])
def test_planner_one_gpu_is_the_single_gpu_estimate(shard, setup_name):
    spec, setup = preset("gpt2-small"), setup_preset(setup_name, micro_batch=2, seq_len=256)
    assert estimate_per_rank(spec, setup, 1, shard).phase_peak_bytes == (
        estimate(spec, setup).phase_peak_bytes
    )


@pytest.mark.parametrize("gpus", [2, 3, 8])
@pytest.mark.parametrize("setup_name", ["bf16-master", "hybrid", "fp32"])
def test_planner_fsdp_divides_model_state_only(gpus, setup_name):
    spec = preset("gpt2-medium")
    setup = setup_preset(setup_name, micro_batch=2, seq_len=512)
    if setup.grad_mode == "flat":  # the distributed trainer folds into fp32 from hooks
        setup = setup.replace(grad_mode="hook")
    single = estimate(spec, setup)
    rank_est = estimate_per_rank(spec, setup, gpus, "fsdp")
    frac = sharded_numel(spec, gpus) / spec.num_params
    assert 1 / gpus <= frac < 1 / gpus + 1e-6 * gpus
    r = 2 if setup.param_dtype == "bf16" else 4
    root, blocks = fsdp_units(spec)
    assert root + sum(blocks) == spec.num_params and len(blocks) == spec.n_layer
    for name, phase in rank_est.phases.items():
        one = single.phases[name].components
        for comp in SHARDED_COMPONENTS:
            assert phase.components[comp] == pytest.approx(one[comp] * frac, abs=1), comp
        for comp in UNSHARDED:
            assert phase.components[comp] == one[comp], f"{name}: {comp} must not be divided"
        gather = _round(root * r) + 2 * _round(max(blocks) * r)
        assert phase.components["allgather_buffers"] == gather
        scatter = phase.components["reduce_scatter_buffers"]
        assert scatter == (
            0 if name == "predict" else _round(root * r) + 2 * _round(max(blocks) * r)
        )
        assert phase.components["ddp_buckets"] == 0
        assert phase.peak_bytes == sum(phase.components.values())
    assert rank_est.peak_bytes < single.peak_bytes  # GPT-2 medium: sharding pays off
    assert rank_est.global_batch == gpus * setup.micro_batch


def test_planner_fsdp_more_gpus_less_per_rank():
    spec, setup = preset("gpt2-medium"), setup_preset("bf16-master", micro_batch=1)
    peaks = [estimate_per_rank(spec, setup, n, "fsdp").peak_bytes for n in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 4


def test_planner_ddp_buckets():
    spec = preset("gpt2-small")
    full = setup_preset("bf16-autocast", micro_batch=2, seq_len=256)
    single = estimate(spec, full)
    ddp = estimate_per_rank(spec, full, 4, "ddp")
    grads_bytes = spec.num_params * 4  # fp32 parameters: fp32 gradients
    for name, phase in ddp.phases.items():
        buckets = phase.components["ddp_buckets"]
        if name == "predict":
            assert buckets == 0
            continue
        # every gradient, in buckets of <= 25 MiB, each rounded by the allocator
        assert grads_bytes <= buckets <= grads_bytes + 512 * (grads_bytes // (25 * 2**20) + 2)
        assert phase.peak_bytes == single.phases[name].peak_bytes + buckets
    view = estimate_per_rank(spec, full, 4, "ddp", gradient_as_bucket_view=True)
    assert view.phases["train"].components["gradients"] == 0  # a plain loop: one phase
    # the .grad tensors are the buckets: never more than without the view
    assert view.peak_bytes <= ddp.peak_bytes
    hook = setup_preset("bf16-master", micro_batch=2, seq_len=256, grad_mode="hook")
    assert estimate_per_rank(spec, hook, 4, "ddp").phase_peak_bytes == (
        estimate(spec, hook).phase_peak_bytes
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(gpus=0),
        dict(gpus=2.0),
        dict(gpus=2, shard="zero3"),
        dict(gpus=2, prefetch=-1),
        dict(gpus=2, bucket_cap_mb=0),
    ],
    ids=["zero-gpus", "float-gpus", "unknown-shard", "negative-prefetch", "zero-bucket"],
)
def test_planner_bad_parallel_setup(kwargs):
    with pytest.raises(PlannerError):
        estimate_per_rank(preset("gpt2-tiny"), setup_preset("fp32", seq_len=64), **kwargs)


def test_plan_cli_gpus_flag(capsys):
    base = ["gpt2-small", "--setup", "bf16-master", "--batch", "2", "--seq-len", "256"]
    assert plan_main(base) == 0
    plain = capsys.readouterr().out
    from hybrid_triton.planner.report import format_estimate

    spec, setup = preset("gpt2-small"), setup_preset("bf16-master", micro_batch=2, seq_len=256)
    assert plain.strip() == format_estimate(estimate(spec, setup)).strip()  # unchanged
    assert plan_main([*base, "--gpus", "2", "--shard", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "per rank" in out and "FSDP all-gather buffers" in out
    assert plan_main([*base, "--gpus", "2", "--shard", "ddp", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["parallel"]["gpus"] == 2 and data["global_batch"] == 4
    assert data["peak_bytes"] == estimate_per_rank(spec, setup, 2, "ddp").peak_bytes
    assert plan_main([*base, "--shard", "ddp"]) == 2
    assert "--shard needs --gpus" in capsys.readouterr().err
    assert plan_main([*base, "--gpus", "2", "--fit", "--gpu", "16"]) == 2
    assert plan_main([*base, "--gpus", "0"]) == 2


# ------------------------------------------------------------------------- the proof script


@pytest.mark.slow
def test_multi_gpu_benchmark_quick_runs_end_to_end(tmp_path):
    """``benchmarks/multi_gpu.py --quick``: 2 gloo processes, gpt2-tiny, one-process run
    beside it; the report says the sharded losses equal the one-process ones."""
    import subprocess
    import sys

    import pandas as pd

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "multi_gpu.py"), "--quick",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (csv,) = (tmp_path / "multi_gpu").glob("*/results.csv")
    df = pd.read_csv(csv)
    value = dict(zip(df["metric"] + "/" + df["provider"], df["value"]))
    assert value["loss_max_rel_diff/measured"] <= 1e-5
    assert value["final_loss/measured"] == pytest.approx(value["final_loss/1 gpu"], rel=1e-5)
    assert value["step_time_ms/measured"] > 0 and value["scaling_efficiency/measured"] > 0
    assert "ok" in set(df.loc[df["metric"] == "status", "note"].str.split(":").str[0])
