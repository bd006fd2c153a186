"""Mixed-precision kernels against the copy ceiling and PyTorch's own paths.

- ``cast_scale`` fp32 -> bf16 / fp16 with the non-finite flag (fp32 master weights to
  low-precision shadow weights): reads 4 B and writes 2 B per element. Baselines: eager
  ``(x * s).to(dtype)`` and its ``torch.compile``.
- ``unscale`` fp16 -> fp32 with the flag: reads 2 B and writes 4 B per element. Baselines:
  eager (the reference), ``torch.compile`` of it, and ``torch_foreach``: the fp32 copy then
  ``torch._amp_foreach_non_finite_check_and_unscale_`` (what GradScaler does).
- ``update_loss_scale`` (latency): one program against the reference's small ops and
  ``torch._amp_update_scale_`` (``torch_fused``).
"""

from __future__ import annotations

import torch
from hybrid_triton.kernels import (
    cast_scale,
    cast_scale_ref,
    unscale,
    unscale_ref,
    update_loss_scale,
    update_loss_scale_ref,
)

from hybrid_triton.bench.kernel_case import CaseRun, KernelCase


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cast_case(numel: int, label: str, dtype: torch.dtype, with_compile: bool) -> KernelCase:
    def setup() -> CaseRun:
        dev = _device()
        x = torch.randn(numel, device=dev)
        y = torch.empty(numel, dtype=dtype, device=dev)
        scale = torch.tensor([0.75], device=dev)
        flag = torch.zeros(1, device=dev)

        def eager() -> torch.Tensor:
            return (x * scale).to(dtype)

        providers = {
            "hybrid_triton": lambda: cast_scale(x, scale, out=y, found_inf=flag),
            "torch_eager": eager,
        }
        if with_compile:
            providers["torch_compile"] = torch.compile(eager)

        def check() -> None:
            cast_scale(x, scale, out=y, found_inf=flag)
            expected = cast_scale_ref(x, scale, out_dtype=dtype)
            if dev == "cuda" or dtype != torch.bfloat16:
                torch.testing.assert_close(y, expected, rtol=0, atol=0)
            else:  # the interpreter rounds bf16 differently: one ulp
                torch.testing.assert_close(y.float(), expected.float(), rtol=2.0**-7, atol=0)
            assert flag.item() == 0.0, "finite data set found_inf"

        return CaseRun(providers=providers, check=check)

    name = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16")
    return KernelCase(
        family="mixed_precision",
        name=f"cast_scale fp32->{name} +flag",
        size_label=label,
        numel=numel,
        bytes_moved=numel * (4 + dtype.itemsize),
        setup=setup,
        config={"in": "float32", "out": str(dtype), "scale": "device tensor"},
    )


def _unscale_case(numel: int, label: str, with_compile: bool) -> KernelCase:
    def setup() -> CaseRun:
        dev = _device()
        g = (torch.randn(numel, device=dev) * 1024).half()
        out = torch.empty(numel, device=dev)
        inv = torch.tensor([1.0 / 1024], device=dev)
        flag = torch.zeros(1, device=dev)

        def amp_foreach() -> None:
            out.copy_(g)
            torch._amp_foreach_non_finite_check_and_unscale_([out], flag, inv)

        def eager() -> torch.Tensor:
            return unscale_ref(g, inv, out=out, found_inf=flag)

        providers = {
            "hybrid_triton": lambda: unscale(g, inv, out=out, found_inf=flag),
            "torch_eager": eager,
        }
        if dev == "cuda":
            providers["torch_foreach"] = amp_foreach
        if with_compile:
            providers["torch_compile"] = torch.compile(eager)

        def check() -> None:
            unscale(g, inv, out=out, found_inf=flag)
            torch.testing.assert_close(out, unscale_ref(g, inv), rtol=0, atol=0)
            assert flag.item() == 0.0

        return CaseRun(providers=providers, check=check)

    return KernelCase(
        family="mixed_precision",
        name="unscale fp16->fp32 +flag",
        size_label=label,
        numel=numel,
        bytes_moved=numel * (2 + 4),
        setup=setup,
        config={"in": "float16", "out": "float32", "inv_scale": "device tensor"},
    )


def _loss_scale_case() -> KernelCase:
    def setup() -> CaseRun:
        dev = _device()
        scale = torch.tensor([65536.0], device=dev)
        growth = torch.zeros(1, dtype=torch.int32, device=dev)
        hyst = torch.ones(1, dtype=torch.int32, device=dev)
        inv = torch.empty(1, device=dev)
        flag = torch.zeros(1, device=dev)
        kw = {"hysteresis_tracker": hyst, "inv_scale": inv, "growth_interval": 2000}
        providers = {
            "hybrid_triton": lambda: update_loss_scale(scale, growth, flag, **kw),
            "torch_eager": lambda: update_loss_scale_ref(scale, growth, flag, **kw),
        }
        if dev == "cuda":
            providers["torch_fused"] = lambda: torch._amp_update_scale_(
                scale, growth, flag, 2.0, 0.5, 2000
            )

        def check() -> None:
            s2, g2, h2, i2 = scale.clone(), growth.clone(), hyst.clone(), inv.clone()
            f = torch.ones(1, device=dev)
            update_loss_scale(scale, growth, f, hysteresis_tracker=hyst, inv_scale=inv)
            update_loss_scale_ref(s2, g2, f.clone().fill_(1), hysteresis_tracker=h2, inv_scale=i2)
            for a, b in ((scale, s2), (growth, g2), (hyst, h2), (inv, i2)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            scale.fill_(65536.0)
            growth.zero_()
            hyst.fill_(1)

        return CaseRun(providers=providers, check=check)

    return KernelCase(
        family="mixed_precision",
        name="update_loss_scale",
        size_label="1",
        numel=1,
        bytes_moved=0,
        setup=setup,
        metric="latency",
    )


def cases(quick: bool) -> list[KernelCase]:
    if quick:
        sizes, with_compile = [(4099, "4099"), (65537, "65537")], False
    else:
        sizes, with_compile = [(1 << 28, "2^28")], torch.cuda.is_available()
    out = []
    for numel, label in sizes:
        out.append(_cast_case(numel, label, torch.bfloat16, with_compile))
        out.append(_cast_case(numel, label, torch.float16, with_compile))
        out.append(_unscale_case(numel, label, with_compile))
    out.append(_loss_scale_case())
    return out
