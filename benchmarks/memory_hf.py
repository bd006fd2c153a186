"""The ``memory_hf`` suite: Hugging Face causal LMs as users train them, measured beside the
planner.

Each configuration is a model built from a config (``AutoModelForCausalLM.from_config``, no
download, random weights) trained the way a plain Hugging Face loop does it: sdpa attention,
``loss = model(input_ids=x, labels=x).loss`` (the output and its logits dropped as the
forward returns, as the ``Trainer``'s ``compute_loss`` does), ``loss.backward()``,
``torch.optim.AdamW`` (fused on CUDA), ``zero_grad(set_to_none=True)``; in one of four
setups: fp32, bf16 autocast, pure bf16 (bf16 parameters and moments) and bf16 autocast
with Hugging Face's gradient checkpointing. The peak is taken over the steps after the first
(the optimizer state exists then), reset once the first step is done, and set beside the
planner's estimate of the same setup (``estimate(spec_from_hf_config(config), setup)``:
the traced module when transformers is installed).

Records (``case = "<model> <setup> <batch>x<seq> [full]"``): ``measured`` /
``peak_allocated``, ``peak_reserved`` (GiB); ``planner`` / ``total`` (allocated),
``reserved`` (GiB) and ``component:<name>``; ``planner`` / ``error_allocated``,
``error_reserved`` (% of the measured). With ``--option caps=boundary`` (the default on a
GPU) each configuration is run again under two caps around the planner's reserved figure
(``set_per_process_memory_fraction``: the planner's reserved peak plus the CUDA context, +5%
and -5%): ``measured`` / ``fits_cap`` (1 ran, 0 out of memory), ``planner`` / ``fits_cap``
and ``fit_agrees``; a "fits" that ran out of memory is a failure, a "does not fit" that ran
is reported.

Options: ``models=NAME,NAME`` (default: every model of the size), ``setups=...``,
``steps=N`` (3), ``caps=boundary|none``. ``--quick``: two-layer versions of every family on
whatever device is there (on a CPU only the planner's figures are recorded: a CPU has no
allocator statistics).
"""

from __future__ import annotations

import math
import sys
import time

import pandas as pd
import torch

from hybrid_triton.bench.probes import free_device_memory, is_oom, memory_cap
from hybrid_triton.bench.results import STATUS_ERROR, STATUS_OOM
from hybrid_triton.bench.runner import SuiteContext

GIB = 2**30

# Shapes of public checkpoints' config.json files (no weights needed): at least five
# families, two sizes each, up to about 1.5B parameters.
_LLAMA_32_1B = dict(
    model_type="llama",
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    rope_theta=500000.0,
)
MODELS: dict[str, dict] = {
    "llama-3.2-1b": _LLAMA_32_1B,
    "llama-0.3b": {
        **_LLAMA_32_1B,
        "num_hidden_layers": 8,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
    },
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
    ),
    "mistral-0.4b": dict(
        model_type="mistral",
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32768,
        max_position_embeddings=32768,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
    "gpt2-large": dict(model_type="gpt2", n_embd=1280, n_layer=36, n_head=20, vocab_size=50257),
    "pythia-410m": dict(
        model_type="gpt_neox",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        vocab_size=50304,
        max_position_embeddings=2048,
        rotary_pct=0.25,
    ),
    "pythia-1b": dict(
        model_type="gpt_neox",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=8,
        vocab_size=50304,
        max_position_embeddings=2048,
        rotary_pct=0.25,
    ),
    "gemma2-0.9b": dict(
        model_type="gemma2",
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=256000,
        max_position_embeddings=8192,
    ),
}
SETUPS: dict[str, dict] = {
    "fp32": dict(),
    "bf16-autocast": dict(autocast="bf16"),
    "bf16": dict(param_dtype="bf16", state_bits=16),
    "bf16-autocast-ckpt": dict(autocast="bf16", checkpointing=True),
}
SHAPES_FULL = ((1, 2048), (4, 1024))
QUICK_MODELS = ("llama-0.3b", "qwen2.5-0.5b", "gpt2", "gemma2-0.9b")  # one per attention kind
SHAPES_QUICK = ((2, 64),)
CAP_MARGIN = 0.05


def quick_config(cfg: dict) -> dict:
    """A two-layer, narrow version of a family's config (the --quick size)."""
    small = dict(cfg)
    for key in ("num_hidden_layers", "n_layer"):
        if key in small:
            small[key] = 2
    for key, value in (
        ("hidden_size", 64),
        ("n_embd", 64),
        ("intermediate_size", 128),
        ("num_attention_heads", 4),
        ("n_head", 4),
        ("head_dim", 16),
        ("vocab_size", 512),
    ):
        if key in small:
            small[key] = value
    if "num_key_value_heads" in small:
        small["num_key_value_heads"] = 2 if cfg.get("num_key_value_heads", 1) > 1 else 1
    return small


def configurations(ctx: SuiteContext) -> list[tuple[str, dict, str, int, int]]:
    default = QUICK_MODELS if ctx.quick else tuple(MODELS)
    names = ctx.option("models", ",".join(default)).split(",")
    setups = ctx.option("setups", ",".join(SETUPS)).split(",")
    for name in [*names, *setups]:
        if name not in MODELS and name not in SETUPS:
            raise ValueError(f"memory_hf: unknown model or setup {name!r}")
    shapes = SHAPES_QUICK if ctx.quick else SHAPES_FULL
    out = []
    for name in names:
        cfg = quick_config(MODELS[name]) if ctx.quick else MODELS[name]
        for setup in setups:
            for batch, seq in shapes:
                label = f"{name} {setup} {batch}x{seq}"
                if ctx.selected(label):
                    out.append((label, cfg, setup, batch, seq))
    return out


def planner_setup(setup: str, batch: int, seq: int):
    from benchmarks.memory import process_allocator
    from hybrid_triton.planner import TrainSetup

    fields = dict(SETUPS[setup], micro_batch=batch, seq_len=seq, phases=("full",))
    return TrainSetup(**fields, allocator=process_allocator())


def train_steps(cfg: dict, setup: str, batch: int, seq: int, steps: int, device) -> tuple:
    """A plain Hugging Face loop; returns (peak allocated, peak reserved) over the steps
    after the first, in bytes."""
    from hybrid_triton.planner.hf import hf_config

    config = hf_config(cfg)
    s = SETUPS[setup]
    dtype = torch.bfloat16 if s.get("param_dtype") == "bf16" else torch.float32
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.train()
    if s.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled="autocast" in s)
    try:
        for step in range(steps):
            if step == 1 and device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with autocast:  # the loss only, as the Trainer's compute_loss hands it back
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type != "cuda":
            return None, None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    finally:
        del model, opt, ids
        free_device_memory()


def _record_estimate(ctx, case: str, est, config: dict) -> None:
    rec = ctx.recorder
    note = est.notes[0] if est.notes else ""
    rec.add(case, "planner", "total", "GiB", est.peak_bytes / GIB, config=config, note=note)
    rec.add(case, "planner", "reserved", "GiB", est.reserved_peak_bytes / GIB, config=config)
    for name, value in est.components.items():
        if value:
            rec.add(case, "planner", f"component:{name}", "GiB", value / GIB, config=config)


def run_config(ctx: SuiteContext, label, cfg, setup, batch, seq) -> None:
    from hybrid_triton.planner import estimate, spec_from_hf_config

    rec = ctx.recorder
    case = f"{label} [full]"
    config = {"model": label.split()[0], "setup": setup, "micro_batch": batch, "seq_len": seq}
    try:
        est = estimate(
            spec_from_hf_config(cfg, name=config["model"]), planner_setup(setup, batch, seq)
        )
        _record_estimate(ctx, case, est, config)
    except Exception as err:
        rec.status(case, "planner", STATUS_ERROR, config=config, message=f"{err}")
        est = None
    steps = ctx.option("steps", 3, int)
    try:
        alloc, reserved = train_steps(cfg, setup, batch, seq, steps, ctx.device)
    except Exception as err:
        free_device_memory()
        status = STATUS_OOM if is_oom(err) else STATUS_ERROR
        rec.status(case, "measured", status, config=config, message=f"{type(err).__name__}")
        return
    if alloc is None:
        return  # a CPU: no allocator statistics
    rec.add(case, "measured", "peak_allocated", "GiB", alloc / GIB, config=config)
    rec.add(case, "measured", "peak_reserved", "GiB", reserved / GIB, config=config)
    if est is not None:
        err_a = 100.0 * (est.peak_bytes - alloc) / alloc
        err_r = 100.0 * (est.reserved_peak_bytes - reserved) / reserved
        rec.add(case, "planner", "error_allocated", "%", err_a, config=config)
        rec.add(case, "planner", "error_reserved", "%", err_r, config=config)
        if ctx.option("caps", "boundary") == "boundary":
            cap_checks(ctx, label, cfg, setup, batch, seq, est, config)


def cap_checks(ctx, label, cfg, setup, batch, seq, est, config) -> None:
    """Run again under caps just above and below the planner's figure for the card."""
    rec = ctx.recorder
    need = (est.reserved_peak_bytes + est.cuda_context_bytes) / GIB
    for factor in (1 + CAP_MARGIN, 1 - CAP_MARGIN):
        cap = need * factor
        case = f"{label} [cap {cap:.2f} GiB]"
        planner_fits = factor > 1
        try:
            with memory_cap(cap):
                train_steps(cfg, setup, batch, seq, 2, ctx.device)
            ran = True
        except Exception as err:
            free_device_memory()
            if not is_oom(err):
                rec.status(case, "measured", STATUS_ERROR, config=config, message=f"{err}")
                continue
            ran = False
        cap_config = {**config, "cap_gib": cap}
        rec.add(case, "measured", "fits_cap", "bool", float(ran), config=cap_config)
        rec.add(case, "planner", "fits_cap", "bool", float(planner_fits), config=cap_config)
        rec.add(case, "planner", "fit_agrees", "bool", float(ran == planner_fits),
                config=cap_config,
                note="FAILURE: planner said fits, ran out of memory"
                if planner_fits and not ran else "")  # fmt: skip


def run(ctx: SuiteContext) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        ctx.log("memory_hf: transformers is not installed (pip install 'hybrid-triton[hf]')")
        return
    configs = configurations(ctx)
    for label, cfg, setup, batch, seq in ctx.bar(configs, total=len(configs), desc="memory_hf"):
        start = time.perf_counter()
        run_config(ctx, label, cfg, setup, batch, seq)
        ctx.log(f"{label}: done in {time.perf_counter() - start:.1f} s")
        ctx.save_partial()


def summary(df: pd.DataFrame) -> str:
    """Measured vs planned allocated and reserved peaks (GiB) per configuration."""

    def col(provider: str, metric: str) -> pd.Series:
        rows = df[(df["provider"] == provider) & (df["metric"] == metric)]
        return rows.groupby("case", sort=False)["value"].first()

    ma, mr = col("measured", "peak_allocated"), col("measured", "peak_reserved")
    pa, pr = col("planner", "total"), col("planner", "reserved")
    cases = [c for c in dict.fromkeys([*pa.index, *ma.index]) if c.endswith("[full]")]
    if not cases:
        return "(no configurations)"
    lines = [
        f"{'configuration':<44} {'alloc':>7} {'plan':>7} {'err':>6} "
        f"{'resv':>7} {'plan':>7} {'err':>6}"
    ]
    for c in cases:
        a, p, r, q = (s.get(c, math.nan) for s in (ma, pa, mr, pr))
        ea = 100 * (p - a) / a if a == a and a else math.nan
        er = 100 * (q - r) / r if r == r and r else math.nan
        lines.append(
            f"{c[:44]:<44} {a:>7.3f} {p:>7.3f} {ea:>5.1f}% {r:>7.3f} {q:>7.3f} {er:>5.1f}%"
        )
    agree = df[df["metric"] == "fit_agrees"]
    if not agree.empty:
        fails = agree[agree["note"].str.startswith("FAILURE")]
        lines.append(f"cap checks: {int(agree['value'].sum())} of {len(agree)} agree; "
                     f"{len(fails)} 'fits' ran out of memory")  # fmt: skip
    return "\n".join(lines) + "\n(GiB; err = planner vs measured)"


if __name__ == "__main__":
    from hybrid_triton.bench.cli import main

    sys.exit(main(["memory_hf", *sys.argv[1:]]))
