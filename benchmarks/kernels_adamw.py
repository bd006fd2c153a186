"""Fused AdamW step (+ bf16 shadow write) against the copy ceiling and PyTorch's optimizers.

Cases (``cases(quick)``), each for ``state_bits`` 32 and 8:

- one big tensor (2^28 elements);
- GPT-2 small's 148 parameter tensors (124M elements), with one parameter group and with the
  Hugging Face decay / no-decay split (two groups: ours looks the group's lr and weight decay
  up in a device table, still one launch). Ours is one launch over a flat arena
  (segments 64-aligned); ``torch_fused`` is ``torch.optim.AdamW(fused=True)`` over the 148
  tensors followed by ``torch._foreach_copy_`` of the weights into bf16 copies (what a
  mixed-precision loop with fp32 master weights does), ``torch_foreach`` the same with
  ``foreach=True``. Both keep fp32 moments (28 + 2 B per parameter), whatever our state_bits.

Bytes per element of one pass (the ``bytes_moved`` of a case): fp32 state reads p, g, m, v
(16 B) and writes p, m, v (12 B) plus the bf16 shadow (2 B) = 30 B; 8-bit state reads p, g
(8 B) and 2 code bytes, writes p (4 B), 2 code bytes and the shadow (2 B) = 18 B, plus
2 x 4 B of scales per 256 elements read and written (0.0625 B).

Run as a script on a GPU for a standalone timing table (do_bench median) with a few
BLOCK / num_warps settings and a small real-text GPT comparison of state_bits:
``python benchmarks/kernels_adamw.py --timing OUT.csv`` and ``--gpt OUT.csv``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys

import torch
from hybrid_triton.kernels.adamw import adamw_step, adamw_step_ref, new_state

from hybrid_triton.bench.kernel_case import CaseRun, KernelCase

ALIGN = 64  # hybrid_triton.arena.ARENA_ALIGN
HP = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def gpt2_small_shapes(d: int = 768, vocab: int = 50257, ctx: int = 1024, layers: int = 12):
    """GPT-2 small's trainable parameter shapes (lm_head tied to wte: 148 tensors)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [
            (d,),
            (d,),  # ln_1 weight, bias
            (d, 3 * d),
            (3 * d,),  # attn c_attn
            (d, d),
            (d,),  # attn c_proj
            (d,),
            (d,),  # ln_2
            (d, 4 * d),
            (4 * d,),  # mlp c_fc
            (4 * d, d),
            (d,),  # mlp c_proj
        ]
    return [*shapes, (d,), (d,)]  # ln_f


def bytes_per_element(state_bits: int, shadow: bool = True) -> float:
    base = {32: 28.0, 16: 16.0, 8: 8.0 + 4.0 + 4.0 + 2 * 2 * 4 / 256, 4: 12.0 + 2 + 2 * 2 * 4 / 128}
    return base[state_bits] + (2.0 if shadow else 0.0)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _numel(shape) -> int:
    return math.prod(shape)


def _arena_numel(shapes) -> int:
    pos = 0
    for s in shapes:
        pos = -(-pos // ALIGN) * ALIGN + _numel(s)
    return pos


class _Flat:
    """Flat master/grad/state/shadow buffers for ``n`` elements (what FusedAdamW holds)."""

    def __init__(
        self, n: int, state_bits: int, device: str, group_starts: list[int] | None = None, **tuning
    ) -> None:
        self.state_bits, self.tuning = state_bits, tuning
        self.master = torch.randn(n, device=device) * 0.02
        self.grad = torch.randn(n, device=device) * 1e-3
        self.shadow = self.master.to(torch.bfloat16)
        self.step = torch.zeros(1, device=device)
        self.state = new_state(n, state_bits, device)
        # Parameter groups (FusedAdamW's decay / no-decay split): a device table of group
        # starts, learning rates and weight decays that the one launch looks up.
        groups = len(group_starts) if group_starts else 1
        self.lr = torch.full((groups,), HP["lr"], device=device)
        self.group_kw = {}
        if group_starts:
            wd = torch.full((groups,), HP["weight_decay"], device=device)
            wd[1:] = 0.0
            starts = torch.tensor(group_starts, dtype=torch.int64, device=device)
            self.group_kw = {"group_starts": starts, "weight_decay": wd}

    def kwargs(self, **over):
        st = self.state
        kw = {
            "lr": self.lr,
            "beta1": HP["beta1"],
            "beta2": HP["beta2"],
            "eps": HP["eps"],
            "weight_decay": HP["weight_decay"],
            "step": self.step,
            "shadow": self.shadow,
            "state_bits": self.state_bits,
            "exp_avg_scale": st["exp_avg_scale"],
            "exp_avg_sq_scale": st["exp_avg_sq_scale"],
            **self.group_kw,
        }
        kw.update(over)
        return kw

    def run(self) -> None:
        st = self.state
        adamw_step(
            self.master, self.grad, st["exp_avg"], st["exp_avg_sq"], **self.kwargs(), **self.tuning
        )

    def check(self) -> None:
        """One step of ours against adamw_step_ref on copies (accuracy before timing), from a
        state that one step already filled."""
        self.run()
        st = {k: (None if v is None else v.clone()) for k, v in self.state.items()}
        master, shadow, step = self.master.clone(), self.shadow.clone(), self.step.clone()
        adamw_step_ref(
            master,
            self.grad,
            st["exp_avg"],
            st["exp_avg_sq"],
            **self.kwargs(
                step=step,
                shadow=shadow,
                exp_avg_scale=st["exp_avg_scale"],
                exp_avg_sq_scale=st["exp_avg_sq_scale"],
            ),
        )
        self.run()
        torch.testing.assert_close(self.master, master, rtol=1e-5, atol=1e-6)
        # The shadow is this run's own master rounded (bit-exact on a GPU, 1 ulp in the
        # interpreter); comparing it with the reference's master would mix in their 1e-6
        # difference, which is large relative to values near zero.
        torch.testing.assert_close(
            self.shadow.float(), self.master.to(torch.bfloat16).float(), rtol=2.0**-7, atol=0.0
        )
        if self.state_bits == 32:
            torch.testing.assert_close(self.state["exp_avg"], st["exp_avg"], rtol=1e-5, atol=1e-9)
        else:
            for k in ("exp_avg_scale", "exp_avg_sq_scale"):
                torch.testing.assert_close(self.state[k], st[k], rtol=1e-5, atol=1e-12)
            for k in ("exp_avg", "exp_avg_sq"):
                differ = (self.state[k] != st[k]).float().mean().item()
                assert differ <= 0.01, f"{k}: {differ:.2%} of the codes differ from the reference"


def _torch_optimizer_with_copy(params, kind: str):
    """AdamW(fused or foreach) over ``params`` plus a bf16 copy of the weights: the step and
    shadow write of a mixed-precision loop in plain PyTorch."""
    opt = torch.optim.AdamW(
        params,
        lr=HP["lr"],
        betas=(HP["beta1"], HP["beta2"]),
        eps=HP["eps"],
        weight_decay=HP["weight_decay"],
        **{kind: True},
    )
    shadows = [p.detach().to(torch.bfloat16) for p in params]
    plist = [p.detach() for p in params]

    def run():
        opt.step()
        torch._foreach_copy_(shadows, plist)

    return run


def _decay_split(shapes) -> list[int]:
    """Group starts of the Hugging Face decay / no-decay split of an arena packed group by
    group: the >= 2-D tensors first (decay), then biases and norms."""
    decay = [s for s in shapes if len(s) >= 2]
    return [0, _arena_numel(decay)] if decay and len(decay) < len(shapes) else [0]


def _case(label: str, shapes, state_bits: int, quick: bool, groups: int = 1) -> KernelCase:
    flat_n = _arena_numel(shapes)
    param_n = sum(_numel(s) for s in shapes)
    starts = _decay_split(shapes) if groups == 2 else None

    def setup() -> CaseRun:  # `quick` only sizes the shapes, chosen by cases()
        dev = _device()
        ours = _Flat(flat_n, state_bits, dev, group_starts=starts)
        providers = {"hybrid_triton": ours.run}
        params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        providers["torch_fused"] = _torch_optimizer_with_copy(params, "fused")
        if len(shapes) > 1:
            providers["torch_foreach"] = _torch_optimizer_with_copy(params, "foreach")
        return CaseRun(providers=providers, check=ours.check)

    name = f"adamw_step state_bits={state_bits} + bf16 shadow"
    return KernelCase(
        family="adamw",
        name=name if groups == 1 else f"{name}, 2 param groups (decay / no-decay)",
        size_label=label,
        numel=param_n,
        bytes_moved=int(param_n * bytes_per_element(state_bits)),
        setup=setup,
        config={
            "state_bits": state_bits,
            "shadow": "bf16",
            "grad": "fp32",
            "arena_numel": flat_n,
            "param_groups": len(starts) if starts else 1,
        },
    )


def cases(quick: bool) -> list[KernelCase]:
    if quick:
        big, small = [(1 << 14,)], gpt2_small_shapes(d=8, vocab=128, ctx=32)
        small_label = "gpt2-small structure, d=8 (148 tensors)"
    else:
        big, small = [(1 << 28,)], gpt2_small_shapes()
        small_label = "gpt2-small (148 tensors)"
    out = []
    for bits in (32, 8):
        out.append(_case("2^14" if quick else "2^28", big, bits, quick))
        out.append(_case(small_label, small, bits, quick))
        # Same arena, two parameter groups: the cost of the per-group table lookup.
        out.append(_case(small_label, small, bits, quick, groups=2))
    return out


# ----------------------------------------------------------------------------------------------
# Standalone GPU scripts (the device run): timing table and the real-text GPT comparison.
# ----------------------------------------------------------------------------------------------


def _bench(fn) -> float:
    if not torch.cuda.is_available():  # smoke runs of the scripts on CPU: one timed call
        import time

        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def timing_main(out_csv: str, smoke: bool = False) -> None:
    """do_bench medians of ours (a few BLOCK / num_warps settings, state_bits 32/8/4) against
    AdamW fused/foreach + bf16 copy, with the fp32 copy rate of the same size, to ``out_csv``.
    ``smoke``: tiny shapes on whatever device is present (a check that the script runs)."""
    dev = _device()
    rows = []
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)"

    def record(case, provider, config, ms, nbytes, copy_gbps):
        gbps = nbytes / ms / 1e6
        rows.append(
            {
                "gpu": gpu,
                "case": case,
                "provider": provider,
                "config": config,
                "ms": round(ms, 4),
                "GB/s": round(gbps, 1),
                "pct_copy": round(100 * gbps / copy_gbps, 1) if copy_gbps else "",
            }
        )
        print(rows[-1], flush=True)

    configs = [(1024, 4), (2048, 8), (4096, 8), (512, 4)]
    sizes = [("2^28", [(1 << 28,)]), ("gpt2-small", gpt2_small_shapes())]
    if smoke:
        sizes = [("2^12", [(1 << 12,)]), ("gpt2-small d=8", gpt2_small_shapes(8, 128, 32))]
        configs = configs[:2]
    for label, shapes in sizes:
        param_n = sum(_numel(s) for s in shapes)
        flat_n = _arena_numel(shapes)
        x = torch.empty(param_n, device=dev)
        y = torch.empty_like(x)
        copy_ms = _bench(lambda x=x, y=y: y.copy_(x))
        copy_gbps = 8 * param_n / copy_ms / 1e6
        record(label, "torch_copy fp32", "", copy_ms, 8 * param_n, copy_gbps)
        del x, y
        for bits in (32, 8, 4):
            nbytes = int(param_n * bytes_per_element(bits))
            for block, warps in configs if bits != 4 else configs[:1]:
                flat = _Flat(flat_n, bits, dev, block=block, num_warps=warps)
                if block == configs[0][0]:
                    flat.check()
                ms = _bench(flat.run)
                record(
                    label,
                    f"hybrid_triton state_bits={bits}",
                    f"block={block} warps={warps}",
                    ms,
                    nbytes,
                    copy_gbps,
                )
                del flat
        params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        for kind in ("fused", "foreach"):
            ms = _bench(_torch_optimizer_with_copy(params, kind))
            record(
                label,
                f"torch_{kind} AdamW + bf16 copy",
                "",
                ms,
                int(param_n * bytes_per_element(32)),
                copy_gbps,
            )
            torch.cuda.empty_cache()
        del params
        torch.cuda.empty_cache()
    with open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def gpt_main(out_csv: str, steps: int = 600, smoke: bool = False) -> None:
    """Final validation loss of a small GPT on real text (the stdlib corpus, byte tokens) with
    FusedAdamW at state_bits 32 / 16 / 8 / 4, same seed, same batches, same schedule.
    ``smoke``: a tiny model and corpus subset on whatever device is present."""
    from hybrid_triton.arena import FlatArena
    from hybrid_triton.data import TokenStream, load_corpus
    from hybrid_triton.models.gpt2 import build_gpt2
    from hybrid_triton.optim import FusedAdamW

    dev = _device()
    batch, seq, width, layers = (2, 32, 16, 1) if smoke else (32, 256, 128, 4)
    corpus = load_corpus(tokenizer="byte", max_files=60 if smoke else None)
    train = TokenStream("train", batch, seq, seed=0, corpus=corpus, device=dev)
    val = TokenStream("val", batch, seq, seed=1, corpus=corpus, device=dev)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")
    rows = []
    for bits in (32, 16, 8, 4):
        torch.manual_seed(0)
        model = build_gpt2(
            "gpt2-tiny",
            device=dev,
            n_layer=layers,
            n_head=4,
            n_embd=width,
            vocab_size=384,
            block_size=seq,
        )
        arena = FlatArena.from_module(model)
        opt = FusedAdamW(
            arena, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, state_bits=bits, max_grad_norm=1.0
        )
        opt.attach_flat_grads()
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps))
        )
        for i in range(steps):
            x, y = train.batch(i)
            with amp:
                _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        with torch.no_grad(), amp:
            val_loss = sum(model(*val.batch(i))[1].float().item() for i in range(20)) / 20
        rows.append(
            {
                "state_bits": bits,
                "steps": steps,
                "train_loss_last": round(loss.item(), 4),
                "val_loss": round(val_loss, 4),
                "state_bytes_per_param": round(opt.state_bytes() / arena.param_numel, 4),
                "params": arena.param_numel,
            }
        )
        print(rows[-1], flush=True)
    base = rows[0]["val_loss"]
    for r in rows:
        r["val_vs_fp32_state"] = round(r["val_loss"] / base - 1, 4)
    with open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timing", metavar="CSV")
    ap.add_argument("--gpt", metavar="CSV")
    ap.add_argument("--gpt-steps", type=int, default=600)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any device")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("these scripts time the GPU; on CPU pass --smoke (or run the kernels suite)")
    if args.timing:
        timing_main(args.timing, args.smoke)
    if args.gpt:
        gpt_main(args.gpt, args.gpt_steps, args.smoke)
