"""Which implementation an op takes: Triton, the Triton interpreter, or the torch reference.

Rule (DESIGN.md, Layers):
- ``HYBRID_TRITON_IMPL=torch`` forces the torch reference everywhere.
- ``HYBRID_TRITON_IMPL=triton`` forces Triton; on CPU tensors that needs ``TRITON_INTERPRET=1``
  (set before triton is imported), otherwise a clear error.
- Unset (or ``auto``): Triton on CUDA tensors; the interpreter on CPU when ``TRITON_INTERPRET=1``;
  the torch reference otherwise.

Nothing here queries a device: the decision reads the tensors' ``device.type`` and the
environment only, so importing the package stays free (STYLE.md, 7).
"""

from __future__ import annotations

import os

import torch

IMPL_ENV = "HYBRID_TRITON_IMPL"
_VALID = ("auto", "triton", "torch")


def requested_impl() -> str:
    """The implementation forced by ``HYBRID_TRITON_IMPL``, or ``"auto"``."""
    value = os.environ.get(IMPL_ENV, "auto").strip().lower() or "auto"
    if value not in _VALID:
        raise ValueError(f"{IMPL_ENV}={value!r} is not one of {', '.join(_VALID)}")
    return value


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0", "false", "False")


def impl_for_device(device: torch.device | str) -> str:
    """``"triton"``, ``"triton-interpreter"`` or ``"torch"`` for tensors on ``device``."""
    device_type = torch.device(device).type
    forced = requested_impl()
    if forced == "torch":
        return "torch"
    if device_type == "cuda":
        return "triton"
    if device_type == "cpu" and interpreter_enabled():
        return "triton-interpreter"
    if forced == "triton":
        raise RuntimeError(
            f"{IMPL_ENV}=triton was asked for, but the tensors are on {device_type!r}: Triton runs "
            "on CUDA tensors, or on CPU tensors only under the interpreter (export "
            "TRITON_INTERPRET=1 before Python starts)."
        )
    return "torch"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should launch its Triton kernel for these tensors."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        return False
    return impl_for_device(first.device) != "torch"
