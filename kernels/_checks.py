"""Contract checks shared by the launchers: every bad input fails here, before any launch,
with a message that says what was expected (STYLE.md, 3)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)


class KernelInputError(ValueError):
    """A tensor passed to a hybrid_triton kernel breaks the op's contract."""


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def same_device(a: torch.device, b: torch.device) -> bool:
    """Devices equal, where an index-less ``cuda`` means the current device (``cuda:0`` and
    ``cuda`` agree on a one-GPU machine); no device query is made unless an index is missing."""
    if a.type != b.type:
        return False
    if a.index == b.index or a.type == "cpu":
        return True
    if a.type == "cuda":
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (
            b.index if b.index is not None else current
        )
    return False


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    numel: int | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Raise :class:`KernelInputError` unless ``t`` is a tensor meeting every given condition."""
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise KernelInputError(
                f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}; "
                f"expected one of: {_names(dtypes)}"
            )
    if device is not None and not same_device(t.device, torch.device(device)):
        raise KernelInputError(
            f"{op}: {name} is on {t.device}, but the other operands are on {device}; "
            "move them to one device first"
        )
    if numel is not None and t.numel() != numel:
        raise KernelInputError(
            f"{op}: {name} has {t.numel()} elements (shape {tuple(t.shape)}); expected {numel}"
        )
    if contiguous and not t.is_contiguous():
        raise KernelInputError(
            f"{op}: {name} must be contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
            "call .contiguous() or pass a flat arena buffer"
        )
    return t


def check_flag(op: str, name: str, flag: object, device: torch.device) -> torch.Tensor:
    """A device-side flag: one float32 element on the same device as the data."""
    return check_tensor(op, name, flag, dtypes=(torch.float32,), device=device, numel=1)


def check_scalar_tensor(op: str, name: str, value: object, device: torch.device) -> None:
    """A scalar operand may be a Python number or a one-element float32 tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        check_tensor(op, name, value, dtypes=(torch.float32,), device=device, numel=1)
    elif not isinstance(value, (int, float)):
        raise KernelInputError(
            f"{op}: {name} must be a float or a one-element float32 tensor, got "
            f"{type(value).__name__}"
        )


def scalar_operand(value: float | torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """How a launcher passes a scalar that may live on the device: ``(tensor, 1.0)`` for a
    one-element device tensor (the kernel loads it: no sync), ``(None, value)`` for a Python
    number (passed as a kernel argument)."""
    if isinstance(value, torch.Tensor):
        return value, 1.0
    return None, float(value)
