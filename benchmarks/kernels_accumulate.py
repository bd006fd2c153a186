"""Gradient accumulation into fp32 against the copy ceiling and PyTorch's own paths.

- One big tensor (2^28): ``acc += bf16 grad * alpha``: reads 2 + 4 B, writes 4 B per element.
  Baselines: eager ``acc.add_(g, alpha=a)`` and its ``torch.compile``.
- GPT-2 small's 148 parameter tensors (124M elements): ours is one launch over the flat arena
  (``segments``: per-segment and total sums of squares, unscale and the non-finite flag in the
  same pass); ``torch_foreach`` is ``torch._foreach_add_`` over the 148 separate tensors (no
  norms, no flag), ``torch_eager`` a Python loop of ``add_``, ``torch_compile`` that loop
  compiled. The quick size keeps the 148-tensor structure with a narrow model.
"""

from __future__ import annotations

import torch
from hybrid_triton.kernels import accumulate_grads, accumulate_grads_ref
from hybrid_triton.kernels._segments import Segments

from hybrid_triton.bench.kernel_case import CaseRun, KernelCase

ARENA_ALIGN = 64  # as hybrid_triton.arena: segment offsets are multiples of 64 elements


def gpt2_small_shapes(d: int = 768, vocab: int = 50257, ctx: int = 1024, layers: int = 12):
    """GPT-2 small's trainable parameter shapes (lm_head tied to wte: 148 tensors)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [
            (d,), (d,),  # ln_1 weight, bias
            (d, 3 * d), (3 * d,),  # attn c_attn
            (d, d), (d,),  # attn c_proj
            (d,), (d,),  # ln_2
            (d, 4 * d), (4 * d,),  # mlp c_fc
            (4 * d, d), (d,),  # mlp c_proj
        ]  # fmt: skip
    return [*shapes, (d,), (d,)]  # ln_f


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _big_tensor_case(numel: int, label: str, first: bool, with_compile: bool) -> KernelCase:
    alpha = 0.25

    def setup() -> CaseRun:
        dev = _device()
        acc = torch.randn(numel, device=dev)
        g = torch.randn(numel, device=dev).bfloat16()

        if first:

            def eager():
                return acc.copy_(g.float() * alpha)
        else:

            def eager():
                return acc.add_(g, alpha=alpha)

        providers = {
            "hybrid_triton": lambda: accumulate_grads(acc, g, alpha=alpha, first=first),
            "torch_eager": eager,
        }
        if with_compile:
            providers["torch_compile"] = torch.compile(eager)

        def check() -> None:
            acc0 = acc.clone()
            accumulate_grads(acc, g, alpha=alpha, first=first)
            accumulate_grads_ref(acc0, g, alpha=alpha, first=first)
            torch.testing.assert_close(acc, acc0, rtol=1e-6, atol=1e-6)

        return CaseRun(providers=providers, check=check)

    return KernelCase(
        family="accumulate",
        name=f"accumulate bf16->fp32 ({'first' if first else 'add'})",
        size_label=label,
        numel=numel,
        bytes_moved=numel * (2 + 4 if first else 2 + 4 + 4),
        setup=setup,
        config={"grad": "bfloat16", "acc": "float32", "first": first},
    )


def _model_case(shapes, label: str, with_compile: bool) -> KernelCase:
    numels = [_numel(s) for s in shapes]
    segs = Segments.from_numels(numels, align=ARENA_ALIGN)
    param_numel = sum(numels)
    alpha = 0.25

    def setup() -> CaseRun:
        dev = _device()
        acc_flat = torch.zeros(segs.total, device=dev)
        g_flat = torch.zeros(segs.total, dtype=torch.bfloat16, device=dev)
        for off, n in zip(segs.offsets, segs.numels):
            acc_flat[off : off + n].normal_()
            g_flat[off : off + n].normal_()
        # The torch baselines get the same values in 148 separate tensors.
        accs = [
            acc_flat[o : o + n].clone().view(s) for o, n, s in zip(segs.offsets, numels, shapes)
        ]
        grads = [g_flat[o : o + n].clone().view(s) for o, n, s in zip(segs.offsets, numels, shapes)]
        seg_sumsq = torch.zeros(len(segs), device=dev)
        total = torch.zeros(1, device=dev)
        inv = torch.ones(1, device=dev)
        flag = torch.zeros(1, device=dev)
        kw = {
            "alpha": alpha,
            "inv_scale": inv,
            "found_inf": flag,
            "segments": segs,
            "seg_sumsq": seg_sumsq,
            "total_sumsq": total,
        }

        def eager_loop() -> None:
            for a, g in zip(accs, grads):
                a.add_(g, alpha=alpha)

        providers = {
            "hybrid_triton": lambda: accumulate_grads(acc_flat, g_flat, **kw),
            "torch_foreach": lambda: torch._foreach_add_(accs, grads, alpha=alpha),
            "torch_eager": eager_loop,
        }
        if with_compile:
            providers["torch_compile"] = torch.compile(eager_loop)

        def check() -> None:
            acc0 = acc_flat.clone()
            ref_seg, ref_total, ref_flag = seg_sumsq.clone(), total.clone(), flag.clone()
            accumulate_grads(acc_flat, g_flat, **kw)
            accumulate_grads_ref(
                acc0, g_flat, alpha=alpha, inv_scale=inv, found_inf=ref_flag, segments=segs,
                seg_sumsq=ref_seg, total_sumsq=ref_total,
            )  # fmt: skip
            torch.testing.assert_close(acc_flat, acc0, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(seg_sumsq, ref_seg, rtol=2e-5, atol=1e-6)
            torch.testing.assert_close(total, ref_total, rtol=2e-5, atol=1e-6)
            assert flag.item() == 0.0
            # The foreach baseline computes the same sum (so the comparison is like for like).
            for a, g, (o, n) in zip(accs[:3], grads[:3], zip(segs.offsets, numels)):
                expect = a.reshape(-1) + g.reshape(-1).float() * alpha
                torch.testing.assert_close(acc_flat[o : o + n], expect, rtol=1e-6, atol=1e-6)

        return CaseRun(providers=providers, check=check)

    return KernelCase(
        family="accumulate",
        name=f"accumulate bf16->fp32 +norms +flag ({len(shapes)} tensors)",
        size_label=label,
        numel=param_numel,
        bytes_moved=param_numel * (2 + 4 + 4),
        setup=setup,
        config={"tensors": len(shapes), "segments": "per-segment + total sumsq, flag, unscale"},
    )


def cases(quick: bool) -> list[KernelCase]:
    if quick:
        return [
            _big_tensor_case(65537, "65537", first=False, with_compile=False),
            _big_tensor_case(65537, "65537", first=True, with_compile=False),
            _model_case(
                gpt2_small_shapes(d=16, vocab=67, ctx=64), "gpt2-shaped d=16 (148 tensors)", False
            ),
        ]
    with_compile = torch.cuda.is_available()
    return [
        _big_tensor_case(1 << 28, "2^28", first=False, with_compile=with_compile),
        _big_tensor_case(1 << 28, "2^28", first=True, with_compile=with_compile),
        _model_case(gpt2_small_shapes(), "gpt2-small (148 tensors)", with_compile),
    ]
