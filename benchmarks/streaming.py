"""Streamed optimizer state on a Llama-2-7B-shaped model under memory caps (the GPU proof).

A ``LlamaForCausalLM`` built from a config (Llama-2-7B's shape by default: 32 layers, hidden
4096, MLP 11008, 32 heads, vocab 32000; random weights, bf16, gradient checkpointing per
block) trains on random tokens at sequence 2048 under ``set_per_process_memory_fraction`` caps
(16 and 24 GiB), one process per (provider, cap), with:

- ``stream_device``: :class:`hybrid_triton.streaming.StreamingAdamW`, ``update="device"``;
- ``stream_host``: the same with ``update="host"``;
- ``torchao``: torchao's ``CPUOffloadOptimizer`` (``torch.optim.AdamW``, fused), a
  ``skipped`` row when torchao does not import. Its CPU copy of the parameters and its state
  are in the parameters' dtype (bf16 here, no fp32 master weights): a cheaper job than ours.
  Its ``offload_gradients`` is documented as incompatible with gradient accumulation, so with
  several micro-batches it keeps the full bf16 gradients on the GPU; ``--micro-batches 1``
  compares both with gradients offloaded.

Recorded per run (``results.csv``, the bench harness's long format): peak allocated and
reserved device memory, the median step time and tokens/s over the timed steps, the host
peak resident memory (``VmHWM``), and the GPU busy share: the summed time of device kernels
(copies excluded) over the wall-clock of one profiled step. Every number comes from the run;
``table.md`` shows them. DeepSpeed ZeRO-Offload is not included (not installed here).

Run::

    python benchmarks/streaming.py --out reports/streaming                 # the GPU runs
    python benchmarks/streaming.py --out /tmp/streaming --quick            # CPU smoke run

``--quick`` builds a tiny Llama on the CPU, runs the two streaming providers in this process
and writes the same report (no caps, no busy share: those need CUDA).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from hybrid_triton.bench.report import table_markdown
from hybrid_triton.bench.results import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_OOM,
    STATUS_SKIPPED,
    Recorder,
    machine_info,
    write_csv,
)

SUITE = "streaming"
PROVIDERS = ("stream_device", "stream_host", "torchao")
LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}
TINY = {**LLAMA2_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 128}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Setup:
    shape: dict
    seq: int
    micro_batches: int
    steps: int  # timed steps (after one warm-up step)
    state_bits: int = 8
    chunk_numel: int = 1 << 24


FULL = Setup(LLAMA2_7B, seq=2048, micro_batches=8, steps=3)
QUICK = Setup(TINY, seq=32, micro_batches=2, steps=2, chunk_numel=4096)


def build_model(setup: Setup, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**setup.shape)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model


def make_optimizer(provider: str, model: torch.nn.Module, setup: Setup):
    """(step function, the provider's own object); raises ImportError when unavailable."""
    if provider.startswith("stream_"):
        from hybrid_triton.arena import FlatArena
        from hybrid_triton.streaming import StreamingAdamW

        opt = StreamingAdamW(
            FlatArena.from_module(model), lr=1e-5, weight_decay=0.1, max_grad_norm=1.0,
            num_micro_batches=setup.micro_batches, state_bits=setup.state_bits,
            update=provider.removeprefix("stream_"), chunk_numel=setup.chunk_numel,
        )  # fmt: skip
        opt.overlap_next_forward(model)
        return opt.step, opt
    if provider == "torchao":
        from torchao.optim import CPUOffloadOptimizer

        # torchao documents offload_gradients as incompatible with gradient accumulation:
        # with several micro-batches its full bf16 gradients stay on the GPU.
        opt = CPUOffloadOptimizer(
            model.parameters(), torch.optim.AdamW, offload_gradients=setup.micro_batches == 1,
            fused=True, lr=1e-5, weight_decay=0.1,
        )  # fmt: skip

        def step() -> None:
            opt.step()
            opt.zero_grad()

        return step, opt
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def _host_peak_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, step_fn, setup: Setup, device: torch.device) -> None:
    vocab = setup.shape["vocab_size"]
    for _ in range(setup.micro_batches):
        ids = torch.randint(0, vocab, (1, setup.seq), device=device)
        model(input_ids=ids, labels=ids).loss.backward()
    step_fn()


def busy_share(model, step_fn, setup: Setup, device: torch.device) -> float | None:
    """Summed device-kernel time (copies excluded) over the wall-clock of one step."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        train_step(model, step_fn, setup, device)
        _sync(device)
        wall = time.perf_counter() - t0
    kernel_us = sum(
        e.self_device_time_total
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower()
    )
    return kernel_us / 1e6 / wall


def run_one(provider: str, cap_gib: float | None, setup: Setup) -> dict:
    """One provider under one cap, in this process; returns the measured values."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cap_gib is not None:
        from hybrid_triton.bench.probes import set_memory_cap

        set_memory_cap(cap_gib)
    model = build_model(setup, device)
    step_fn, _ = make_optimizer(provider, model, setup)
    train_step(model, step_fn, setup, device)  # warm-up: allocations, compilation
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(setup.steps):
        t0 = time.perf_counter()
        train_step(model, step_fn, setup, device)
        _sync(device)
        times.append(time.perf_counter() - t0)
    out = {
        "step_s": statistics.median(times),
        "tokens_per_s": setup.micro_batches * setup.seq / statistics.median(times),
        "host_peak_bytes": _host_peak_bytes(),
        "busy_share": busy_share(model, step_fn, setup, device),
    }
    if device.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out


UNITS = {
    "step_s": "s",
    "tokens_per_s": "tokens/s",
    "host_peak_bytes": "bytes",
    "busy_share": "fraction",
    "peak_allocated_bytes": "bytes",
    "peak_reserved_bytes": "bytes",
}


def _record(rec: Recorder, case: str, provider: str, values: dict, config: dict) -> None:
    for metric, value in values.items():
        if value is not None:
            rec.add(case, provider, metric, UNITS[metric], value, config=config)
    rec.status(case, provider, STATUS_OK, config=config)


def make_setup(quick: bool, micro_batches: int | None = None) -> Setup:
    setup = QUICK if quick else FULL
    if micro_batches is not None:
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        setup = dataclasses.replace(setup, micro_batches=micro_batches)
    return setup


def _in_subprocess(provider: str, cap: float, quick: bool, micro: int) -> tuple[str, dict | str]:
    cmd = [sys.executable, __file__, "--one", provider, "--cap", str(cap)]
    cmd += ["--micro-batches", str(micro)] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode == 0 and lines:
        return STATUS_OK, json.loads(lines[-1][len("RESULT ") :])
    text = out.stderr[-2000:]
    kind = STATUS_OOM if "OutOfMemoryError" in text or "out of memory" in text else STATUS_ERROR
    kind = STATUS_SKIPPED if "ModuleNotFoundError" in text else kind
    return kind, text


def run(
    out: str | os.PathLike,
    quick: bool,
    caps: list[float],
    providers: list[str],
    micro_batches: int | None = None,
) -> Path:
    setup = make_setup(quick, micro_batches)
    machine = machine_info()
    rec = Recorder(SUITE, machine)
    on_gpu = torch.cuda.is_available()
    runs = [(p, c) for p in providers for c in (caps if on_gpu else [None])]
    for provider, cap in runs:
        case = f"seq {setup.seq} x {setup.micro_batches}" + (f", cap {cap} GiB" if cap else "")
        config = {**dataclasses.asdict(setup), "cap_gib": cap}
        if not on_gpu:
            if provider == "torchao":
                rec.status(case, provider, STATUS_SKIPPED, config=config, message="needs CUDA")
                continue
            _record(rec, case, provider, run_one(provider, None, setup), config)
            continue
        # One process per comparison: caps, allocator state and host memory start fresh.
        status, result = _in_subprocess(provider, cap, quick, setup.micro_batches)
        if status == STATUS_OK:
            _record(rec, case, provider, result, config)
        else:
            rec.status(case, provider, status, config=config, message=str(result))
    stamp = _dt.datetime.fromisoformat(machine.date).strftime("%Y-%m-%d_%H%M%S")
    target = Path(out) / f"{stamp}_{machine.slug}"
    target.mkdir(parents=True, exist_ok=False)
    df = rec.frame()
    write_csv(df, target / "results.csv")
    (target / "table.md").write_text(table_markdown(df, "Streamed optimizer state"))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/streaming")
    parser.add_argument("--quick", action="store_true", help="tiny model, CPU-friendly")
    parser.add_argument("--caps", default="16,24", help="GiB caps, comma-separated")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--micro-batches", type=int, help="default 8 (2 with --quick)")
    parser.add_argument("--one", choices=PROVIDERS, help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child process: one provider under one cap
        result = run_one(args.one, args.cap, make_setup(args.quick, args.micro_batches))
        print("RESULT " + json.dumps(result))
        return 0
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        parser.error(f"unknown provider(s) {unknown}; expected some of {list(PROVIDERS)}")
    caps = [float(c) for c in args.caps.split(",") if c]
    print(run(args.out, args.quick, caps, providers, args.micro_batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
