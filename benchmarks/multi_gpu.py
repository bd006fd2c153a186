"""The multi-GPU proof: GPT-2 under FSDP2 with the toolkit's trainer, against one GPU.

Run (two GPUs of one host)::

    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py [--out reports]
    python benchmarks/multi_gpu.py --quick            # CPU, gloo, 2 processes, gpt2-tiny

What it does, every rank taking part:

1. **One GPU** (rank 0 alone, the others wait): ``HybridTrainer`` on the whole model, the
   global batch of each step as ``world`` micro-batches (the ranks' shares, in rank order),
   so its gradient is the same mean as the sharded run's. Step losses, median step time,
   peak allocated memory, and the planner's single-GPU estimate of that setup.
2. **FSDP2 on every rank**: the same initial weights, ``fully_shard`` per transformer block
   and on the root, :class:`~hybrid_triton.distributed.DistributedHybridTrainer` (flat arena
   over the local shards, fused AdamW), each rank its share of the same global batches.
   Global step losses, median step time, each rank's peak allocated memory, and the planner's
   per-rank estimate (:func:`~hybrid_triton.planner.distributed.estimate_per_rank`).
3. Rows: loss difference per step (max over steps, absolute and relative), per-rank peak vs
   estimate (ratio; the target is within 5%), step times, and scaling efficiency
   ``t_1gpu / (world * t_world)`` at equal global batch. Written by rank 0 through
   ``hybrid_triton.bench`` to ``<out>/multi_gpu/<date>_<device>/`` (results.csv, table.md).

The trainer stays in Warmup for the whole run (ordinary optimizer steps), so the comparison
is of the sharding alone, not of the Predict phases. Quick mode (a CPU, gloo, 2 processes
started here, gpt2-tiny with the byte tokenizer, the kernels' torch reference path as the
training suite uses on CPU) checks that every piece runs end to end in well under a minute;
its times and memory mean nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

GIB = 2**30


@dataclass(frozen=True)
class Size:
    model: str
    micro_batch: int  # sequences per rank per step
    seq_len: int
    steps: int
    warmup: int  # steps left out of the step-time median
    tokenizer: str
    max_files: int | None


def size_for(quick: bool) -> Size:
    if quick:
        return Size("gpt2-tiny", 2, 32, 4, 1, "byte", 60)
    return Size("gpt2-medium", 8, 1024, 30, 5, "auto", None)


def _model_config(size: Size, quick: bool):
    from hybrid_triton.models.gpt2 import GPT2Config

    if quick:  # the byte tokenizer's vocabulary, context = sequence length (as the training suite)
        return GPT2Config.from_name(size.model, vocab_size=320, block_size=size.seq_len)
    return GPT2Config.from_name(size.model)


def _lm_loss(model, batch):
    return model(batch[0], batch[1])[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trainer_config(size: Size, device: torch.device, micro_batches: int):
    from hybrid_triton.scheduler import TrainerConfig

    return TrainerConfig(
        warmup_steps=size.steps + 1,  # Warmup only: plain optimizer steps
        micro_batches=micro_batches,
        precision="bf16" if device.type == "cuda" else "fp32",
        dynamics_model="trend",
        host_lag=1,
    )


def _planner_setup(size: Size, device: torch.device, accum: int):
    from hybrid_triton.planner import TrainSetup

    return TrainSetup(
        param_dtype="fp32",
        autocast="bf16" if device.type == "cuda" else None,
        grad_mode="hook",
        micro_batch=size.micro_batch,
        seq_len=size.seq_len,
        accum_steps=accum,
        phases=("warmup",),
    )


def _global_batches(size: Size, world: int, corpus, device):
    """Per step: the list of the ranks' shares (each ``[micro_batch, seq_len]``)."""
    from hybrid_triton.data import TokenStream

    stream = TokenStream("train", size.micro_batch * world, size.seq_len, 0, corpus=corpus)
    out = []
    for i in range(size.steps):
        x, y = stream.batch(i)
        shares = [
            (x[r * size.micro_batch : (r + 1) * size.micro_batch].to(device),
             y[r * size.micro_batch : (r + 1) * size.micro_batch].to(device))
            for r in range(world)
        ]  # fmt: skip
        out.append(shares)
    return out


def _run(trainer, batches, device: torch.device, warmup: int) -> dict:
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for batch in batches:
        _sync(device)
        start = time.perf_counter()
        trainer.step(batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    trainer.flush()
    losses = list(trainer.metrics.losses.get("warmup", []))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    steady = times[warmup:] or times
    return {"losses": losses, "step_s": statistics.median(steady), "peak": peak}


def _cat(shares):
    return (torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares]))


def run_rank(args) -> None:
    """One rank's work (torchrun, or a process started by :func:`_launch`)."""
    from torch.distributed.fsdp import fully_shard

    from hybrid_triton.distributed import DistributedHybridTrainer
    from hybrid_triton.models.gpt2 import GPT2
    from hybrid_triton.trainer import HybridTrainer

    quick = args.quick
    cuda = torch.cuda.is_available() and not quick
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        os.environ["HYBRID_TRITON_IMPL"] = "torch"  # reference path on CPU (see docstring)
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    size = size_for(quick)
    from hybrid_triton.data import load_corpus

    corpus = load_corpus(tokenizer=size.tokenizer, max_files=size.max_files,
                         val_every=10 if quick else 50)  # fmt: skip
    batches = _global_batches(size, world, corpus, device)
    cfg = _model_config(size, quick)
    result: dict = {"world": world, "size": size.__dict__}

    # 1. one GPU, equal global batch: the ranks' shares as micro-batches
    if rank == 0:
        torch.manual_seed(0)
        model = GPT2(cfg).to(device)
        trainer = HybridTrainer(model, _lm_loss, config=_trainer_config(size, device, world),
                                lr=3e-4)  # fmt: skip
        result["single"] = _run(trainer, [_cat(b) for b in batches], device, size.warmup)
        trainer.close()
        del trainer, model
        if cuda:
            torch.cuda.empty_cache()
    dist.barrier()

    # 2. FSDP2 on every rank, same initial weights
    torch.manual_seed(0)
    model = GPT2(cfg)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)  # moves the shards to the mesh's device (the rank's GPU)
    cfg_sharded = _trainer_config(size, device, 1)
    trainer = DistributedHybridTrainer(model, _lm_loss, config=cfg_sharded, lr=3e-4)
    result["sharded"] = _run(trainer, [b[rank] for b in batches], device, size.warmup)
    trainer.close()
    peaks = [None] * world
    dist.all_gather_object(peaks, result["sharded"]["peak"])
    result["sharded"]["peaks"] = peaks
    if rank == 0:
        write_report(result, args, device, cfg)
    dist.barrier()
    dist.destroy_process_group()


def write_report(result: dict, args, device: torch.device, cfg) -> Path:
    from hybrid_triton.bench.report import write_report as write
    from hybrid_triton.bench.results import STATUS_OK, STATUS_SKIPPED, Recorder, machine_info
    from hybrid_triton.planner import estimate, preset
    from hybrid_triton.planner.distributed import estimate_per_rank

    size = Size(**result["size"])
    world = result["world"]
    rec = Recorder("multi_gpu", machine_info())
    case = f"{size.model} fsdp2 {world} ranks {size.micro_batch}x{size.seq_len} per rank"
    config = {"model": size.model, "world": world, "micro_batch_per_rank": size.micro_batch,
              "seq_len": size.seq_len, "steps": size.steps, "quick": args.quick}  # fmt: skip
    single, sharded = result["single"], result["sharded"]
    n = min(len(single["losses"]), len(sharded["losses"]))
    diffs = [abs(a - b) for a, b in zip(single["losses"][:n], sharded["losses"][:n])]
    rel = [d / max(abs(a), 1e-12) for d, a in zip(diffs, single["losses"][:n])]
    rec.add(case, "measured", "loss_max_abs_diff", "nats", max(diffs) if diffs else None,
            config=config, note=f"vs 1 GPU at equal global batch, over {n} steps")  # fmt: skip
    rec.add(case, "measured", "loss_max_rel_diff", "", max(rel) if rel else None, config=config)
    rec.add(case, "measured", "final_loss", "nats", sharded["losses"][-1] if n else None,
            config=config)  # fmt: skip
    rec.add(case, "1 gpu", "final_loss", "nats", single["losses"][-1] if n else None,
            config=config)  # fmt: skip
    timer = "perf_counter around synchronized steps"
    rec.add(case, "measured", "step_time_ms", "ms", 1e3 * sharded["step_s"], config=config,
            note=f"median after {size.warmup} steps; {timer}")  # fmt: skip
    rec.add(case, "1 gpu", "step_time_ms", "ms", 1e3 * single["step_s"], config=config,
            note=f"the global batch as {world} micro-batches; {timer}")  # fmt: skip
    tokens = size.micro_batch * world * size.seq_len
    rec.add(case, "measured", "tokens_per_s", "tok/s", tokens / sharded["step_s"], config=config)
    rec.add(case, "1 gpu", "tokens_per_s", "tok/s", tokens / single["step_s"], config=config)
    rec.add(case, "measured", "scaling_efficiency", "%",
            100.0 * single["step_s"] / (world * sharded["step_s"]), config=config,
            note="t_1gpu / (world * t_world), equal global batch")  # fmt: skip
    if device.type == "cuda":
        spec = preset(size.model)
        per_rank = estimate_per_rank(spec, _planner_setup(size, device, 1), world, "fsdp")
        single_est = estimate(spec, _planner_setup(size, device, world))
        est = per_rank.phase_peak_bytes["warmup"]
        for r, peak in enumerate(sharded["peaks"]):
            c = {**config, "rank": r}
            rec.add(f"{case} [rank {r}]", "measured", "peak_allocated", "GiB", peak / GIB,
                    config=c)  # fmt: skip
            rec.add(f"{case} [rank {r}]", "planner", "peak_allocated", "GiB", est / GIB,
                    config=c, note="estimate_per_rank, warmup phase")  # fmt: skip
            rec.add(f"{case} [rank {r}]", "planner", "estimate_ratio", "", est / peak, config=c,
                    note="estimate / measured; target 0.95..1.05")  # fmt: skip
        rec.add(f"{case} [1 gpu]", "measured", "peak_allocated", "GiB", single["peak"] / GIB,
                config=config)  # fmt: skip
        rec.add(f"{case} [1 gpu]", "planner", "peak_allocated", "GiB",
                single_est.phase_peak_bytes["warmup"] / GIB, config=config)  # fmt: skip
    else:
        rec.status(f"{case} [memory]", "measured", STATUS_SKIPPED, config=config,
                   message="cpu: no CUDA peak to compare with the planner")  # fmt: skip
    rec.status(case, "measured", STATUS_OK, config=config)
    out = write(rec.frame(), args.out, "multi_gpu")
    print(rec.machine.line())
    for row in rec.rows:
        if row["metric"] != "status":
            print(f"{row['case'][:60]:<60} {row['provider']:<9} {row['metric']:<20} "
                  f"{row['value']:>12.5g} {row['unit']}")  # fmt: skip
    print(f"report: {out}")
    return out


# ----------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(local_rank: int, world: int, port: int, args) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    run_rank(args)


def _launch(args) -> None:
    """Start ``--nproc`` gloo processes here (quick mode without torchrun)."""
    import torch.multiprocessing as mp

    mp.start_processes(_child, args=(args.nproc, _free_port(), args), nprocs=args.nproc,
                       join=True, start_method="spawn")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, gloo, gpt2-tiny, a few steps")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "reports"))
    p.add_argument("--nproc", type=int, default=2, help="processes to start without torchrun")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if "RANK" in os.environ:  # started by torchrun
        run_rank(args)
    elif args.quick:
        _launch(args)
    else:
        print("multi_gpu: start it with torchrun --nproc-per-node N (or pass --quick)",
              file=sys.stderr)  # fmt: skip
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
