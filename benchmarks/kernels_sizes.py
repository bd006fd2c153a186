"""The size sweep: every elementwise and quantization kernel at the sizes users meet.

Powers of two from 2^10 to 2^28, their neighbours 2^k +- 1 and 2^k +- 17, primes, and the
odd size ``2*10^8 + 7``: a size that is not a multiple of 16 is where a masked, unvectorized
launch would show (kernels/_launch.py). The suite measures the copy ceiling at each size in
the same run, so ``pct_of_copy`` of every row is against its own size's copy. Each kernel has
``torch.compile`` of the same math beside it (compiled per size, ``dynamic=False``, as a
user's first call compiles), and the ``launch floor`` case times an empty Triton kernel:
below about 2^20 elements a kernel is launch-bound, and its time over the floor's is the
figure to read there (the report's size-sweep chart does so).

``--quick`` (CPU, seconds): three sizes around one block, two kernels, no compile.
Run one kernel's sweep with ``--cases "sizes/cast_scale*"``; the whole GPU sweep with
``bash benchmarks/run_gpu.sh sizes``.
"""

from __future__ import annotations

import torch
import triton
from hybrid_triton.kernels import (
    cast_scale,
    dequantize_add,
    dequantize_add_ref,
    dequantize_blockwise,
    dequantize_blockwise_ref,
    quantize_blockwise,
    quantize_blockwise_ref,
    unscale,
)
from hybrid_triton.kernels._dispatch import use_triton

from hybrid_triton.bench.kernel_case import CaseRun, KernelCase

FAMILY = "sizes"
PRIMES = [1009, 65521, 1048573, 16777213, 268435399]  # largest primes below 2^10..2^28
ODD_LARGE = 2 * 10**8 + 7


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sweep_sizes(quick: bool) -> list[tuple[int, str]]:
    """(numel, label) of every size, ascending."""
    if quick:
        return [(4095, "2^12-1"), (4096, "2^12"), (4097 + 16, "2^12+17")]
    sizes: dict[int, str] = {}
    for k in range(10, 29, 2):
        for d in (-17, -1, 0, 1, 17):
            sizes[(1 << k) + d] = f"2^{k}" + (f"{d:+d}" if d else "")
    for p in PRIMES:
        sizes.setdefault(p, f"prime {p}")
    sizes[ODD_LARGE] = "2e8+7"
    return sorted(sizes.items())


@triton.jit
def _empty_kernel(x_ptr):
    pass


def _floor_case() -> KernelCase:
    def setup() -> CaseRun:
        x = torch.empty(1, device=_device())
        return CaseRun(providers={"hybrid_triton": lambda: _empty_kernel[(1,)](x)})

    return KernelCase(FAMILY, "launch floor (empty kernel)", "1", 1, 0, setup, metric="latency")


def _case(name, numel, label, nbytes, make, with_compile, config) -> KernelCase:
    """``make(dev) -> (ours, math, check)``: ours and the same math for torch.compile."""

    def setup() -> CaseRun:
        ours, math, check = make(_device())
        providers = {"hybrid_triton": ours}
        if with_compile and math is not None:
            providers["torch_compile"] = torch.compile(math, dynamic=False)
        return CaseRun(providers=providers, check=check)

    cfg = {**config, "sweep": True}
    return KernelCase(FAMILY, name, label, numel, nbytes, setup, config=cfg)


def _cast(n: int):
    def make(dev):
        x = torch.randn(n, device=dev)
        y = torch.empty(n, dtype=torch.bfloat16, device=dev)

        def check():
            cast_scale(x, 0.5, out=y)
            tol = 0 if dev == "cuda" else 2.0**-7  # the interpreter's bf16 rounding
            torch.testing.assert_close(y.float(), (x * 0.5).bfloat16().float(), rtol=tol, atol=0)

        return (lambda: cast_scale(x, 0.5, out=y)), (lambda: (x * 0.5).to(torch.bfloat16)), check

    return make


def _unscale(n: int):
    def make(dev):
        g = torch.randn(n, device=dev).half()
        y = torch.empty(n, device=dev)

        def check():
            unscale(g, 0.25, out=y)
            torch.testing.assert_close(y, g.float() * 0.25, rtol=0, atol=0)

        return (lambda: unscale(g, 0.25, out=y)), (lambda: g.float() * 0.25), check

    return make


def _quant_math(fmt: str, ef: bool):
    """Torch math of int8 blockwise absmax quantization (what torch.compile is given). The
    other codes have no compile baseline in this sweep (kernels_quantize.py has them at 2^28)."""

    def math(x, err):
        v = x + err if ef else x
        b = v.view(-1, 256) if v.numel() % 256 == 0 else v[: v.numel() // 256 * 256].view(-1, 256)
        s = b.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        return torch.round(b * (127.0 / s)).to(torch.int8), s

    return math


def _quantize(n: int, fmt: str, ef: bool):
    def make(dev):
        x = torch.randn(n, device=dev)
        err = torch.zeros(n, device=dev) if ef else None
        out = quantize_blockwise(x, fmt, error=err.clone() if ef else None)

        def ours():
            quantize_blockwise(x, fmt, error=err, out=out)

        def check():
            e1 = torch.zeros(n, device=dev) if ef else None
            e2 = torch.zeros(n, device=dev) if ef else None
            q = quantize_blockwise(x, fmt, error=e1)
            r = quantize_blockwise_ref(x, fmt, error=e2)
            if fmt != "ternary":  # ternary's sums differ in order: see tests/tolerances.py
                assert torch.equal(q.data, r.data), f"quantize {fmt}: codes differ"
            torch.testing.assert_close(q.scales, r.scales, rtol=1e-6, atol=0)

        if fmt != "int8":  # no compile baseline written for the other codes here
            return ours, None, check
        e0 = torch.zeros(n, device=dev)
        return ours, (lambda: _quant_math(fmt, ef)(x, e0)), check

    return make


def _dequantize(n: int, add: bool):
    def make(dev):
        q = quantize_blockwise(torch.randn(n, device=dev), "int8")
        t = torch.randn(n, device=dev)
        scales = q.scales

        def ours():
            if add:
                dequantize_add(t, q, 1e-3)
            else:
                dequantize_blockwise(q, out=t)

        def math():
            m = n // 256 * 256
            codes = q.data[:m].view(-1, 256).float()
            v = codes * (scales[: m // 256, None] / 127.0)
            return t[:m].view(-1, 256) + 1e-3 * v if add else v

        def check():
            if add:
                start = t.clone()
                dequantize_add(t, q, 1e-3)
                torch.testing.assert_close(t, dequantize_add_ref(start, q, 1e-3), rtol=0, atol=0)
            else:
                dequantize_blockwise(q, out=t)
                torch.testing.assert_close(t, dequantize_blockwise_ref(q), rtol=0, atol=0)

        return ours, math, check

    return make


KERNELS = [
    # (name, bytes per element moved, maker, in the quick run)
    ("cast_scale fp32->bf16", 6, _cast, True),
    ("unscale fp16->fp32", 6, _unscale, False),
    ("quantize int8", 5 + 4 / 256, lambda n: _quantize(n, "int8", False), True),
    ("quantize int8 +ef", 13 + 4 / 256, lambda n: _quantize(n, "int8", True), False),
    ("quantize ternary", 4.25 + 4 / 256, lambda n: _quantize(n, "ternary", False), False),
    ("quantize ternary +ef", 12.25 + 4 / 256, lambda n: _quantize(n, "ternary", True), False),
    ("quantize int4", 4.5 + 4 / 256, lambda n: _quantize(n, "int4", False), False),
    ("dequantize int8", 5 + 4 / 256, lambda n: _dequantize(n, False), False),
    ("dequantize_add int8", 9 + 4 / 256, lambda n: _dequantize(n, True), False),
]


def cases(quick: bool) -> list[KernelCase]:
    with_compile = torch.cuda.is_available() and not quick
    out = []
    if torch.cuda.is_available() or use_triton(torch.empty(0)):
        out.append(_floor_case())
    for name, per_elem, maker, in_quick in KERNELS:
        if quick and not in_quick:
            continue
        for numel, label in sweep_sizes(quick):
            cfg = {"kernel": name}
            out.append(
                _case(name, numel, label, int(per_elem * numel), maker(numel), with_compile, cfg)
            )
    return out
