"""Output allocation for launchers.

Every launcher allocates its outputs here. Under ``HYBRID_TRITON_POISON=1`` (the test suite
sets it) new floating-point buffers are filled with NaN and integer buffers with a sentinel,
so an element a kernel forgot to write fails the comparison instead of passing on zeros
(the fixture idea of flash-linear-attention, STYLE.md).
"""

from __future__ import annotations

import os

import torch

POISON_ENV = "HYBRID_TRITON_POISON"


def poisoning() -> bool:
    return os.environ.get(POISON_ENV, "0") not in ("", "0")


def poison_(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).min if t.dtype != torch.uint8 else 0xA5)
    return t


def empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    return poison_(t) if poisoning() else t


def empty_like(ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.empty_like(ref, dtype=dtype or ref.dtype, memory_format=torch.contiguous_format)
    return poison_(t) if poisoning() else t
