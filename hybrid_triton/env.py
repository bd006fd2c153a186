"""``python -m hybrid_triton.env``: versions, the device, and the path each op will take."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

import torch

from hybrid_triton.kernels import OPS
from hybrid_triton.kernels._dispatch import IMPL_ENV, impl_for_device, interpreter_enabled


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe() -> dict:
    """Everything this module prints, as a dict (the benchmark machine line reuses it)."""
    info: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "hybrid_triton": _version("hybrid-triton"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        IMPL_ENV: os.environ.get(IMPL_ENV, ""),
        "cuda_available": torch.cuda.is_available(),
    }
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info["device"] = torch.cuda.get_device_name(0)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 2)
        info["cuda"] = torch.version.cuda
        info["sm_count"] = props.multi_processor_count
    else:
        info["device"] = "cpu"
    device = "cuda" if info["cuda_available"] else "cpu"
    try:
        path = impl_for_device(device)
    except RuntimeError as err:
        path = f"error: {err}"
    info["op_paths"] = {op: path for op in OPS}
    info["interpreter"] = interpreter_enabled()
    return info


def main(argv: list[str] | None = None) -> int:
    info = describe()
    paths = info.pop("op_paths")
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    print("\nop paths on this device:")
    for op, path in paths.items():
        print(f"  {op:<22} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
