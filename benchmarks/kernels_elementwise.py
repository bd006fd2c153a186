"""A self-contained kernel family for the harness itself: ``copy`` and ``scale`` via torch.

It exercises the ``kernels`` suite before (and independently of) the Triton families:
``copy`` is ``y.copy_(x)`` and ``scale`` is ``y = x * s`` in fp32, both plain torch. The
``hybrid_triton`` provider here is the torch op written out-of-place into a preallocated
buffer (``torch.mul(x, s, out=y)``), the ``torch_eager`` one allocates its result, and
``torch_compile`` (GPU, full size) is the compiled ``x * s``. Useful as a floor: a Triton
family should sit near the ``copy`` row of the same run.
"""

from __future__ import annotations

import torch

from hybrid_triton.bench.kernel_case import CaseRun, KernelCase


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _copy_case(numel: int, label: str) -> KernelCase:
    def setup() -> CaseRun:
        x = torch.randn(numel, device=_device())
        y = torch.empty_like(x)

        def check() -> None:
            y.copy_(x)
            torch.testing.assert_close(y, x, rtol=0, atol=0)

        return CaseRun(
            providers={"hybrid_triton": lambda: y.copy_(x), "torch_eager": lambda: x.clone()},
            check=check,
        )

    return KernelCase(
        family="elementwise",
        name="copy fp32",
        size_label=label,
        numel=numel,
        bytes_moved=2 * 4 * numel,
        setup=setup,
        config={"dtype": "float32"},
    )


def _scale_case(numel: int, label: str, with_compile: bool) -> KernelCase:
    scale = 0.5

    def setup() -> CaseRun:
        x = torch.randn(numel, device=_device())
        y = torch.empty_like(x)
        providers = {
            "hybrid_triton": lambda: torch.mul(x, scale, out=y),
            "torch_eager": lambda: x * scale,
        }
        if with_compile:
            compiled = torch.compile(lambda t: t * scale)
            providers["torch_compile"] = lambda: compiled(x)

        def check() -> None:
            torch.mul(x, scale, out=y)
            expected = x.double() * scale
            torch.testing.assert_close(y.double(), expected, rtol=0, atol=0)

        return CaseRun(providers=providers, check=check)

    return KernelCase(
        family="elementwise",
        name="scale fp32",
        size_label=label,
        numel=numel,
        bytes_moved=2 * 4 * numel,
        setup=setup,
        config={"dtype": "float32", "scale": scale},
    )


def cases(quick: bool) -> list[KernelCase]:
    if quick:
        sizes = [(4099, "4099"), (1 << 16, "2^16")]
        with_compile = False  # compiling on a 2-core CPU takes longer than the whole suite
    else:
        sizes = [(1 << 20, "2^20"), (1 << 24, "2^24"), (1 << 28, "2^28")]
        with_compile = torch.cuda.is_available()
    out = []
    for numel, label in sizes:
        out.append(_copy_case(numel, label))
        out.append(_scale_case(numel, label, with_compile))
    return out
