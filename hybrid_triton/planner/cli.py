"""``hybrid-triton plan``: estimate per-phase VRAM, or find what fits a GPU.

Examples::

    hybrid-triton plan gpt2-small --setup bf16-autocast --batch 8 --seq-len 1024
    hybrid-triton plan gpt2-medium --fit --gpu rtx-4080
    hybrid-triton plan gpt2-medium --setup bf16-master --batch 16 --allocator expandable --gpu 24
    hybrid-triton plan llama-7b --fit --gpu 16 --json
    hybrid-triton plan path/to/config.json --setup hybrid --batch 4 --chart plan.png
    hybrid-triton plan --module mypkg.models:build_on_meta --traced --batch 2 --seq-len 256
    hybrid-triton plan gpt2-medium --setup bf16-master --batch 8 --gpus 2 --shard fsdp
    hybrid-triton plan gpt2-small --fit --gpu auto
    hybrid-triton plan --list

Exit status: 0 when it fits (or no --gpu was given), 1 when it does not fit --gpu (or --fit
finds nothing that fits), 2 on bad input (an unknown name, a nonsense number, an unreadable
config, an unwritable chart path, no CUDA device for --gpu auto).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from hybrid_triton.planner.build import why_not_buildable
from hybrid_triton.planner.estimate import estimate
from hybrid_triton.planner.fit import GPUS, NO_BF16, fit, gpu_info
from hybrid_triton.planner.report import (
    check_chart_path,
    format_estimate,
    format_fit,
    plot_estimate,
    to_json,
)
from hybrid_triton.planner.setup import (
    ALLOCATORS,
    ATTENTION,
    GRAD_MODES,
    LOGITS_LIFETIME,
    OFFLOAD,
    OPTIMIZERS,
    PHASES,
    PREDICT_MOMENTS,
    SETUP_PRESETS,
    STATE_BITS,
    setup_preset,
)
from hybrid_triton.planner.specs import (
    PRESET_NAMES,
    PlannerError,
    preset,
    spec_from_hf_config,
    spec_from_module,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hybrid-triton plan",
        description="Per-phase, per-component VRAM estimate of a training setup, or the best "
        "setup that fits a GPU (--fit). Sizes in GiB (2^30 bytes).",
        epilog="exit status: 0 fits (or no --gpu), 1 does not fit --gpu (--fit: nothing fits), "
        "2 bad input",
    )
    p.add_argument(
        "model",
        nargs="?",
        help="a preset name (--list) or a Hugging Face config.json (or its folder)",
    )
    p.add_argument(
        "--module",
        help="'package.module:factory': a callable returning an "
        "nn.Module (build it on the meta device)",
    )
    p.add_argument("--list", action="store_true", help="list model, setup and GPU presets")
    p.add_argument("--setup", default="bf16-autocast", help=f"one of {list(SETUP_PRESETS)}")
    p.add_argument("--param-dtype", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"])
    p.add_argument("--master-weights", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--grad-mode", choices=GRAD_MODES)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--state-bits", type=int, choices=STATE_BITS)
    p.add_argument("--batch", type=int, help="micro-batch (sequences)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--offload", choices=OFFLOAD)
    p.add_argument("--predict-moments", choices=PREDICT_MOMENTS)
    p.add_argument("--phases", help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--attention", choices=ATTENTION)
    p.add_argument(
        "--fused-loss",
        choices=["toolkit", "liger"],
        help="the loss without [N, V] logits: the toolkit's chunked linear cross-entropy, or "
        "Liger-Kernel's fused one (Hugging Face configs, traced)",
    )
    p.add_argument("--logits-lifetime", choices=LOGITS_LIFETIME)
    p.add_argument(
        "--loss-chunk-tokens",
        type=int,
        help="positions per chunk of GPT-2's no_grad (Predict) loss; 0: full logits (1024)",
    )
    p.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        help="PyTorch's CUDA caching allocator: native (the default) or expandable "
        "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True); with --fit, only this one is "
        "searched (without it, --fit also considers expandable segments)",
    )
    p.add_argument(
        "--gpu",
        help="a GPU preset (--list), 'auto' (the local CUDA card) or a size in GiB (bf16 "
        "support of a size is assumed)",
    )
    p.add_argument(
        "--trainer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="plan for HybridTrainer (its Warmup/Full/Predict/Correct phases) rather than a "
        "plain training loop (one 'train' phase); with --fit, its bf16 + master setups",
    )
    p.add_argument("--margin", type=float, default=0.1, help="fraction kept free (0.1)")
    p.add_argument("--fit", action="store_true", help="search the setups for --gpu")
    p.add_argument("--max-batch", type=int, default=64, help="largest micro-batch to try")
    p.add_argument(
        "--traced",
        action="store_true",
        help="measure the module under fake tensors instead of the formulas",
    )
    p.add_argument(
        "--gpus",
        type=int,
        help="per-rank estimate for this many GPUs (--batch is then per rank)",
    )
    p.add_argument(
        "--shard",
        choices=["ddp", "fsdp"],
        help="with --gpus: replicated (ddp) or FSDP2 per block (fsdp, the default)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--chart", help="write a PNG chart to this path")
    return p


def _load_spec(args):
    module = None
    if args.module:
        target, _, attr = args.module.partition(":")
        if not attr:
            raise PlannerError(f"--module must be 'package.module:factory', got {args.module!r}")
        try:
            factory = getattr(importlib.import_module(target), attr)
        except (ImportError, AttributeError) as exc:
            raise PlannerError(f"cannot load {args.module!r}: {exc}") from exc
        module = factory()
        return spec_from_module(module, name=attr), module
    if not args.model:
        raise PlannerError("give a model: a preset name, a config.json, or --module")
    if os.path.exists(args.model) or args.model.endswith(".json"):
        return spec_from_hf_config(args.model), None
    spec = preset(args.model)
    if args.traced and spec.family == "gpt2":
        from hybrid_triton.models.gpt2 import build_gpt2

        gpt2_names = {"gpt2-tiny", "gpt2-small", "gpt2-medium", "gpt2-1b"}
        if spec.name in gpt2_names:
            module = build_gpt2(spec.name, device="meta")
    return spec, module


def _setup(args):
    overrides = {}
    for field, value in (
        ("param_dtype", args.param_dtype),
        ("master_weights", args.master_weights),
        ("grad_mode", args.grad_mode),
        ("optimizer", args.optimizer),
        ("state_bits", args.state_bits),
        ("micro_batch", args.batch),
        ("seq_len", args.seq_len),
        ("accum_steps", args.accum),
        ("checkpointing", args.checkpointing),
        ("offload", args.offload),
        ("predict_moments", args.predict_moments),
        ("attention", args.attention),
        ("logits_lifetime", args.logits_lifetime),
        ("loss_chunk_tokens", args.loss_chunk_tokens),
        ("allocator", args.allocator),
        ("trainer", args.trainer),
    ):
        if value is not None:
            overrides[field] = value
    if args.autocast is not None:
        overrides["autocast"] = None if args.autocast == "none" else args.autocast
    if args.fused_loss is not None:
        overrides.update(fused_loss=True, fused_loss_impl=args.fused_loss)
    if args.phases:
        overrides["phases"] = tuple(x.strip() for x in args.phases.split(",") if x.strip())
    return setup_preset(args.setup, **overrides)


def _trace(spec, module, setup):
    """``--traced``: the whole step of the real module under fake tensors."""
    from hybrid_triton.planner import hf
    from hybrid_triton.planner.traced import trace_step

    if module is not None and hf.is_hf_model(module):
        return hf.trace_hf(module, setup)
    if module is not None:
        return trace_step(module, setup)
    if spec.hf_config is not None:
        return hf.trace_hf(dict(spec.hf_config), setup)
    raise PlannerError(
        f"{spec.name}: traced mode needs a module (--module, a Hugging Face config.json, or "
        "a GPT-2 preset of hybrid_triton.models.gpt2)"
    )


def _list() -> str:
    lines = ["model presets:"]
    lines += [f"  {preset(n).summary()}" for n in PRESET_NAMES]
    lines.append("setup presets:")
    lines += [f"  {name}: {setup_preset(name).describe()}" for name in SETUP_PRESETS]
    lines.append("GPU presets (GiB):")
    lines += [
        f"  {name}: {mib / 1024:.2f}" + (" (no bf16)" if name in NO_BF16 else "")
        for name, mib in GPUS.items()
    ]
    return "\n".join(lines)


def _per_rank(args, spec) -> int:
    """``--gpus N [--shard ddp|fsdp]``: one rank's estimate (planner/distributed.py)."""
    from hybrid_triton.planner.distributed import estimate_per_rank, format_rank_estimate

    if args.gpus is None:
        raise PlannerError("--shard needs --gpus (the number of GPUs)")
    if args.fit or args.traced or args.chart:
        raise PlannerError(
            "--gpus works with the formula estimate's table or JSON only (not --fit, --traced "
            "or --chart)"
        )
    est = estimate_per_rank(spec, _setup(args), args.gpus, args.shard or "fsdp")
    if args.json:
        print(to_json(est))
    else:
        print(format_rank_estimate(est))
    if args.gpu:
        card = gpu_info(args.gpu)
        usable = int(card.capacity_bytes * (1 - args.margin))
        line, fits = _verdict(f"{card.label} per rank", est.device_bytes(), usable, args.margin)
        print(line)
        return 0 if fits else 1
    return 0


def _verdict(label: str, need: int, usable: int, margin: float) -> tuple[str, bool]:
    fits = need <= usable
    return (
        f"{label}: {'fits' if fits else 'does NOT fit'} ({need / 1024**3:.2f} GiB needed, "
        f"{usable / 1024**3:.2f} GiB usable with margin {margin:.0%})",
        fits,
    )


def _setup_notes(setup, card) -> list[str]:
    """What the user should know before running ``setup`` on ``card``: a setup nobody can
    build today, bf16 on a card without it."""
    notes = []
    reason = why_not_buildable(setup)
    if reason is not None:
        notes.append(f"note: this setup cannot be built today: {reason}")
    uses_bf16 = "bf16" in (setup.param_dtype, setup.compute_dtype)
    if card is not None and uses_bf16 and card.bf16 is False:
        notes.append(
            f"note: {card.label} has no bf16 (compute capability below 8.0): use "
            "--autocast fp16 (with loss scaling) or fp32 (--setup fp32)"
        )
    return notes


def _estimate_answer(args, spec, setup) -> int:
    """The formula estimate's table or JSON, the --gpu verdict and the chart; the exit code."""
    est = estimate(spec, setup)
    card = gpu_info(args.gpu) if args.gpu else None
    capacity = usable = None
    fits = True
    if card is not None:
        capacity = card.capacity_bytes
        usable = int(capacity * (1 - args.margin))
        line, fits = _verdict(card.label, est.device_bytes(), usable, args.margin)
    if args.json:
        print(to_json(est))
    else:
        print(format_estimate(est))
        print("\n".join(_setup_notes(setup, card) + ([line] if card is not None else [])))
    if args.chart:
        plot_estimate(est, args.chart, capacity, usable)
    return 0 if fits else 1


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.list:
            print(_list())
            return 0
        if not 0 <= args.margin < 1:
            raise PlannerError(f"--margin must be a fraction in [0, 1), got {args.margin}")
        if args.chart:
            check_chart_path(args.chart)  # before any work: nothing half-done
        spec, module = _load_spec(args)
        if args.gpus is not None or args.shard is not None:
            return _per_rank(args, spec)
        if args.fit:
            if not args.gpu:
                raise PlannerError("--fit needs --gpu (a preset name or a size in GiB)")
            result = fit(
                spec,
                args.gpu,
                margin=args.margin,
                seq_len=args.seq_len,
                max_micro_batch=args.max_batch,
                accum_steps=args.accum or 1,
                allocator=args.allocator,
                trainer=bool(args.trainer),
            )
            print(to_json(result) if args.json else format_fit(result))
            if args.chart:
                plot_estimate(
                    result.best.estimate, args.chart, result.capacity_bytes, result.usable_bytes
                )
            return 0 if result.fits else 1
        setup = _setup(args)
        if args.traced or not (spec.has_activation_model or spec.hf_config):
            traced = _trace(spec, module, setup)
            if args.json:
                import json

                print(
                    json.dumps(
                        dict(model=spec.name, setup=setup.to_dict(), traced=traced.to_dict()),
                        indent=2,
                    )
                )
            else:
                gib = 1024**3
                print(
                    f"model: {spec.summary()}\nsetup: {setup.describe()}\ntraced (fake "
                    f"tensors, CUDA's attention kernels {traced.attention or '-'}): peak "
                    f"{traced.peak_bytes / gib:.3f} GiB; "
                    + ", ".join(f"{k} {v / gib:.3f}" for k, v in traced.stage_peaks.items())
                    + f"; parameters {traced.param_bytes / gib:.3f}, gradients "
                    f"{traced.grad_bytes / gib:.3f}, optimizer state "
                    f"{traced.optimizer_state_bytes / gib:.3f} GiB"
                )
            return 0
        return _estimate_answer(args, spec, setup)
    except PlannerError as exc:
        print(f"hybrid-triton plan: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
