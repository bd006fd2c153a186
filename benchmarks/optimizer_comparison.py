"""Low-bit AdamW on a short real training run (issue 3): loss curves, state bytes, step time.

One small GPT (``hybrid_triton.models.gpt2``) is trained on the standard-library corpus
(``hybrid_triton.data``, BPE tokens) with each optimizer in turn, from the same initialization,
on the same batches, with the same schedule (linear warm-up, cosine decay to a tenth), bf16
autocast, the global gradient norm clipped to 1.0 and weight decay 0.1 on every parameter (one
parameter group, so every provider does exactly the same thing). Providers:

- ``torch_adamw``: ``torch.optim.AdamW`` (fp32 state; ``fused=True`` on CUDA), the reference;
- ``hybrid_32``, ``hybrid_8``, ``hybrid_4``: :class:`hybrid_triton.optim.FusedAdamW` with 32-,
  8- and 4-bit moments over the model's flat arena (fp32 parameters, one fused launch, the
  clip coefficient and the finite check on the device);
- ``bnb_8bit``: ``bitsandbytes.optim.AdamW8bit``, only when bitsandbytes imports (a
  ``skipped`` row otherwise). It keeps tensors under 4096 elements in 32-bit state, as it
  always does.

Recorded per provider (``results.csv``, the bench harness's long format): the loss of every
step (case ``... curve``, ``config.step``), the final train loss (mean of the last 20 steps),
the validation loss on fixed validation batches after the last step, optimizer-state bytes per
parameter (summed over the optimizer's own state tensors, divided by the model's parameter
count), the median time of a whole training step and of the optimizer step alone (CUDA events,
read once at the end), tokens/s and, on CUDA, the peak allocated memory. ``table.md`` adds the
targets: 8-bit final loss within 1% of fp32-state AdamW at equal steps; 8-bit state at most
2.1 bytes per parameter. ``loss_curves.png`` draws the curves.

Run::

    python benchmarks/optimizer_comparison.py --out reports/optim           # the GPU run
    python benchmarks/optimizer_comparison.py --out /tmp/optim --quick      # CPU smoke run

The report goes to ``<out>/<date>_<device>/``, written into a temporary sibling directory and
renamed into place (no half-written report).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hybrid_triton.bench.report import table_markdown
from hybrid_triton.bench.results import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_OOM,
    STATUS_SKIPPED,
    MachineInfo,
    Recorder,
    machine_info,
    write_csv,
)

SUITE = "optim"
PROVIDERS = ("torch_adamw", "hybrid_32", "hybrid_8", "hybrid_4", "bnb_8bit")
FINAL_WINDOW = 20  # the final train loss is the mean of this many last steps
LOSS_TARGET = 0.01  # 8-bit final loss within 1% of fp32-state AdamW
STATE_TARGET = 2.1  # bytes of 8-bit optimizer state per parameter


@dataclasses.dataclass(frozen=True)
class Size:
    """One comparison: model, data and schedule."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    seq_len: int
    batch: int
    steps: int
    warmup: int
    tokenizer: str  # "bpe" or "byte"
    bpe_vocab: int  # BPE vocabulary (ignored for bytes)
    max_files: int | None  # corpus subset (None: the whole standard library)
    val_batches: int
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1


# GPU: 6 layers x 384 wide (about 14M parameters with the 8192-token BPE), 32 x 256 tokens a
# step, 500 steps per provider.
FULL = Size("gpt-6x384", 6, 6, 384, 256, 32, 500, 50, "bpe", 8192, None, 20)
# CPU smoke run: gpt2-tiny's shape (2 x 64), byte tokens on a corpus subset, 20 steps.
QUICK = Size("gpt2-tiny", 2, 2, 64, 32, 4, 20, 4, "byte", 0, 60, 2, lr=3e-3)


def lr_at(size: Size, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < size.warmup:
        return size.lr * (step + 1) / size.warmup
    progress = min(1.0, (step - size.warmup) / max(1, size.steps - size.warmup))
    low = size.min_lr_ratio * size.lr
    return low + 0.5 * (size.lr - low) * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- providers


@dataclasses.dataclass
class Provider:
    """An optimizer under test: ``step(lr)`` clips and updates from the parameters' grads."""

    optimizer: object
    step: Callable[[float], None]
    zero_grad: Callable[[], None]
    state_tensors: Callable[[], list[torch.Tensor]]


def _torch_clip(params: list[torch.nn.Parameter], max_norm: float) -> None:
    torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def make_torch_adamw(model: torch.nn.Module, size: Size) -> Provider:
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = params[0].is_cuda
    opt = torch.optim.AdamW(
        params, lr=size.lr, betas=size.betas, weight_decay=size.weight_decay, fused=cuda
    )

    def step(lr: float) -> None:
        _torch_clip(params, size.grad_clip)
        opt.param_groups[0]["lr"] = lr
        opt.step()

    return Provider(opt, step, lambda: opt.zero_grad(set_to_none=True), lambda: _torch_state(opt))


def _torch_state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = []
    for state in opt.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def make_hybrid(bits: int) -> Callable[[torch.nn.Module, Size], Provider]:
    def make(model: torch.nn.Module, size: Size) -> Provider:
        from hybrid_triton.arena import FlatArena
        from hybrid_triton.optim import FusedAdamW

        arena = FlatArena.from_module(model)
        opt = FusedAdamW(
            arena,
            lr=size.lr,
            betas=size.betas,
            weight_decay=size.weight_decay,
            state_bits=bits,
            max_grad_norm=size.grad_clip,
        )
        opt.attach_flat_grads()  # autograd accumulates straight into one flat buffer

        def step(lr: float) -> None:
            opt.param_groups[0]["lr"] = lr  # a device fill inside step(), no sync
            opt.step()

        def state() -> list[torch.Tensor]:
            return [t for t in opt.flat_state.values() if t is not None]

        return Provider(opt, step, opt.zero_grad, state)

    return make


def bnb_available() -> str | None:
    """None when bitsandbytes' optimizers import, else why not."""
    try:
        import bitsandbytes.optim  # noqa: F401
    except Exception as err:  # ImportError, or a CUDA setup error inside bitsandbytes
        return f"bitsandbytes does not import: {type(err).__name__}: {err}"
    return None


def make_bnb_8bit(model: torch.nn.Module, size: Size) -> Provider:
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(params, lr=size.lr, betas=size.betas, weight_decay=size.weight_decay)

    def step(lr: float) -> None:
        _torch_clip(params, size.grad_clip)
        opt.param_groups[0]["lr"] = lr
        opt.step()

    return Provider(opt, step, lambda: opt.zero_grad(set_to_none=True), lambda: _torch_state(opt))


FACTORIES: dict[str, Callable[[torch.nn.Module, Size], Provider]] = {
    "torch_adamw": make_torch_adamw,
    "hybrid_32": make_hybrid(32),
    "hybrid_8": make_hybrid(8),
    "hybrid_4": make_hybrid(4),
    "bnb_8bit": make_bnb_8bit,
}


def state_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of distinct tensors (a buffer shared by several entries counted once)."""
    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


# --------------------------------------------------------------------------- one run


@dataclasses.dataclass
class RunResult:
    step_loss: list[float]
    step_time_s: list[float]
    optimizer_time_s: list[float]
    val_loss: float
    state_bytes: int
    num_params: int
    peak_allocated: int | None

    @property
    def final_train_loss(self) -> float:
        tail = self.step_loss[-FINAL_WINDOW:]
        return sum(tail) / len(tail)


def build_model(size: Size, vocab: int, device: torch.device, seed: int) -> torch.nn.Module:
    from hybrid_triton.models.gpt2 import GPT2, GPT2Config

    # The model's vocabulary: the tokenizer's, rounded up to a multiple of 128 (as GPT-2's 50257
    # becomes 50304) for tensor-core friendly logits.
    cfg = GPT2Config(
        block_size=size.seq_len,
        vocab_size=128 * math.ceil(vocab / 128),
        n_layer=size.n_layer,
        n_head=size.n_head,
        n_embd=size.n_embd,
    )
    torch.manual_seed(seed)
    return GPT2(cfg).to(device)


def train_one(provider: str, size: Size, corpus, device: torch.device, seed: int = 0) -> RunResult:
    """Train ``size`` with ``provider`` and measure it. No host sync inside the loop: losses
    stay on the device and CUDA events are read once at the end."""
    from hybrid_triton.data import TokenStream

    cuda = device.type == "cuda"
    model = build_model(size, corpus.tokenizer.vocab_size, device, seed)
    num_params = sum(p.numel() for p in model.parameters())
    train = TokenStream("train", size.batch, size.seq_len, seed, corpus=corpus, device=device)
    val = TokenStream("val", size.batch, size.seq_len, corpus=corpus, shuffle=False, device=device)
    val_set = list(val.take(min(size.val_batches, max(1, val.num_windows // size.batch))))
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    opt = FACTORIES[provider](model, size)
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def mark():
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed(a, b) -> float:
        return a.elapsed_time(b) / 1e3 if cuda else b - a

    losses, marks = [], []
    model.train()
    for step in range(size.steps):
        x, y = train.batch(step)
        start = mark()
        with amp:
            _, loss = model(x, y)
        loss.backward()
        before_opt = mark()
        opt.step(lr_at(size, step))
        opt.zero_grad()
        marks.append((start, before_opt, mark()))
        losses.append(loss.detach().float())
    if cuda:
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    step_time = [elapsed(a, c) for a, _, c in marks]
    opt_time = [elapsed(b, c) for _, b, c in marks]
    model.eval()
    with torch.no_grad(), amp:
        val_total = torch.zeros((), device=device, dtype=torch.float64)
        for x, y in val_set:
            val_total += model(x, y)[1].double()
    return RunResult(
        step_loss=torch.stack(losses).tolist(),
        step_time_s=step_time,
        optimizer_time_s=opt_time,
        val_loss=(val_total / len(val_set)).item(),
        state_bytes=state_bytes(opt.state_tensors()),
        num_params=num_params,
        peak_allocated=peak,
    )


# --------------------------------------------------------------------------- the suite


def _median_after_warmup(times: Sequence[float]) -> float:
    # The first steps compile kernels and warm the allocator: leave out the first tenth.
    skip = min(len(times) - 1, max(1, len(times) // 10))
    return statistics.median(times[skip:])


def record(rec: Recorder, size: Size, provider: str, result: RunResult, config: dict) -> None:
    case = f"{size.name} {size.steps} steps"
    tokens = size.batch * size.seq_len
    step_s = _median_after_warmup(result.step_time_s)
    clock = "CUDA events" if result.peak_allocated is not None else "wall clock"
    timing = f"median over the steps after the first tenth ({clock})"
    rec.add(case, provider, "final_train_loss", "nats", result.final_train_loss, config=config,
            note=f"mean of the last {FINAL_WINDOW} steps")  # fmt: skip
    rec.add(case, provider, "val_loss", "nats", result.val_loss, config=config)
    rec.add(case, provider, "state_bytes_per_param", "B", result.state_bytes / result.num_params,
            config=config, note="optimizer state tensors / model parameters")  # fmt: skip
    rec.add(case, provider, "state_bytes", "B", result.state_bytes, config=config)
    rec.add(case, provider, "step_time_ms", "ms", 1e3 * step_s, config=config, note=timing)
    rec.add(case, provider, "optimizer_step_ms", "ms",
            1e3 * _median_after_warmup(result.optimizer_time_s), config=config,
            note=timing)  # fmt: skip
    rec.add(case, provider, "tokens_per_s", "tok/s", tokens / step_s, config=config)
    if result.peak_allocated is not None:
        rec.add(case, provider, "peak_allocated", "GiB", result.peak_allocated / 2**30,
                config=config)  # fmt: skip
    for step, loss in enumerate(result.step_loss):
        rec.add(f"{case} curve", provider, "train_loss", "nats", loss,
                config={"step": step, "lr": lr_at(size, step)})  # fmt: skip
    rec.status(case, provider, STATUS_OK, config=config)


def targets_markdown(results: dict[str, RunResult]) -> str:
    """The issue's targets, checked against this run's numbers."""
    lines = ["## Targets", ""]
    for ref in ("torch_adamw", "hybrid_32"):
        if ref not in results:
            continue
        base = results[ref].final_train_loss
        for name in ("hybrid_8", "hybrid_4", "bnb_8bit"):
            if name not in results:
                continue
            gap = results[name].final_train_loss / base - 1.0
            verdict = ""
            if name == "hybrid_8":
                verdict = " (target ≤ 1%: " + ("met" if abs(gap) <= LOSS_TARGET else "missed") + ")"
            lines.append(f"- final train loss, {name} vs {ref}: {gap:+.2%}{verdict}")
    if "hybrid_8" in results:
        r = results["hybrid_8"]
        per = r.state_bytes / r.num_params
        met = "met" if per <= STATE_TARGET else "missed"
        lines.append(
            f"- hybrid_8 optimizer state: {per:.3f} B/param (target ≤ {STATE_TARGET}: {met})"
        )
    return "\n".join(lines) + "\n"


def loss_curves_png(results: dict[str, RunResult], size: Size, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_all, ax_tail) = plt.subplots(1, 2, figsize=(12.0, 4.6))
    window = max(1, size.steps // 40)  # moving mean: the raw per-batch loss is noisy
    for name, r in results.items():
        raw = torch.tensor(r.step_loss, dtype=torch.float64)
        smooth = raw.unfold(0, window, 1).mean(1) if len(raw) >= window else raw
        steps = range(window - 1, window - 1 + len(smooth))
        ax_all.plot(steps, smooth.tolist(), label=name, lw=1.2)
        half = len(smooth) // 2
        ax_tail.plot(list(steps)[half:], smooth[half:].tolist(), label=name, lw=1.2)
    for ax in (ax_all, ax_tail):
        ax.set_xlabel("step")
        ax.set_ylabel(f"train loss (moving mean of {window})")
        ax.grid(alpha=0.3)
    ax_all.set_title("whole run", fontsize=9)
    ax_tail.set_title("second half", fontsize=9)
    ax_all.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write_optim_report(
    rec: Recorder, results: dict[str, RunResult], size: Size, out: Path, machine: MachineInfo
) -> Path:
    """``<out>/<date>_<device>/`` with results.csv, table.md and loss_curves.png, atomically."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.fromisoformat(machine.date).strftime("%Y-%m-%d_%H%M%S")
    final = out / f"{stamp}_{machine.slug}"
    n = 1
    while final.exists():
        n += 1
        final = out / f"{stamp}_{machine.slug}_{n}"
    df = rec.frame()
    summary = df[~df["case"].str.endswith(" curve")]
    title = f"optimizer comparison: {size.name}, {size.steps} steps, {size.batch}x{size.seq_len}"
    tmp = Path(tempfile.mkdtemp(prefix="_tmp_", dir=out))
    try:
        write_csv(df, tmp / "results.csv")
        setup = (
            f"Setup: {size.n_layer} layers x {size.n_embd} wide, {size.n_head} heads, "
            f"{size.tokenizer} tokens, batch {size.batch} x {size.seq_len}, {size.steps} steps, "
            f"lr {size.lr} (warm-up {size.warmup}, cosine to {size.min_lr_ratio}x), betas "
            f"{size.betas}, weight decay {size.weight_decay}, clip {size.grad_clip}, bf16 "
            "autocast, same seed and batches for every provider."
        )
        table = table_markdown(summary, title)
        head, _, rest = table.partition("\n\n")  # after the title line
        machine_part, _, body = rest.partition("\n\n")
        text = "\n\n".join([head, machine_part, setup, targets_markdown(results), body])
        (tmp / "table.md").write_text(text)
        if results:
            loss_curves_png(results, size, tmp / "loss_curves.png", title)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def run(
    out: str | os.PathLike,
    quick: bool = False,
    providers: Sequence[str] = PROVIDERS,
    steps: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the comparison and write the report; returns the report directory."""
    from hybrid_triton.data import bpe_available, load_corpus

    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; expected some of {list(PROVIDERS)}")
    size = QUICK if quick else FULL
    if steps is not None:
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        size = dataclasses.replace(size, steps=steps, warmup=min(size.warmup, steps // 2))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = machine_info()
    log(machine.line())
    if size.tokenizer == "bpe" and not bpe_available():
        log("the tokenizers package is not installed: byte tokens instead of the BPE")
        size = dataclasses.replace(size, tokenizer="byte")
    started = time.perf_counter()
    corpus = load_corpus(
        tokenizer=size.tokenizer,
        vocab_size=size.bpe_vocab if size.tokenizer == "bpe" else 32768,
        max_files=size.max_files,
    )
    log(f"corpus ready in {time.perf_counter() - started:.1f} s: {corpus.meta['tokens']} tokens")
    rec = Recorder(SUITE, machine)
    results: dict[str, RunResult] = {}
    config = {k: v for k, v in dataclasses.asdict(size).items() if k != "name"}
    config["device"] = str(device)
    for name in providers:
        case = f"{size.name} {size.steps} steps"
        if name == "bnb_8bit" and (why := bnb_available()) is not None:
            rec.status(case, name, STATUS_SKIPPED, config=config, message=why)
            log(f"[{name}] skipped: {why}")
            continue
        t0 = time.perf_counter()
        try:
            result = train_one(name, size, corpus, device)
        except torch.OutOfMemoryError as err:
            rec.status(case, name, STATUS_OOM, config=config, message=str(err))
            log(f"[{name}] out of memory")
            continue
        except Exception as err:  # record the failure and go on with the other providers
            rec.status(
                case, name, STATUS_ERROR, config=config, message=f"{type(err).__name__}: {err}"
            )
            log(f"[{name}] error: {type(err).__name__}: {err}")
            continue
        results[name] = result
        record(rec, size, name, result, config)
        log(
            f"[{name}] {time.perf_counter() - t0:.1f} s: final train loss "
            f"{result.final_train_loss:.4f}, val {result.val_loss:.4f}, "
            f"{result.state_bytes / result.num_params:.3f} B/param state, step "
            f"{1e3 * _median_after_warmup(result.step_time_s):.2f} ms"
        )
    path = write_optim_report(rec, results, size, Path(out), machine)
    log(f"report: {path} ({time.perf_counter() - started:.1f} s in all)")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/optim", help="report root (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="gpt2-tiny, 20 steps (CPU smoke)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument(
        "--providers", default=",".join(PROVIDERS), help="comma-separated subset of providers"
    )
    args = parser.parse_args(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    run(args.out, quick=args.quick, providers=providers, steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
