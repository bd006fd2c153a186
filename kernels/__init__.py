"""hybrid_triton.kernels: stateless ops over tensors, each a Triton kernel with a torch
reference beside it (``op`` and ``op_ref``); see DESIGN.md (Layers) for the dispatch rule.

Submodules are imported on first use, so ``import hybrid_triton.kernels`` neither imports
Triton nor touches a device, and ``TRITON_INTERPRET`` can still be set before first use.
"""

from __future__ import annotations

import importlib

# op name -> module (in this folder) that defines ``op`` and ``op_ref``.
OPS: dict[str, str] = {
    "cast_scale": "cast_scale",
    "unscale": "unscale",
    "accumulate_grads": "accumulate",
    "adamw_step": "adamw",
    "grad_norm": "grad_norm",
    "update_loss_scale": "loss_scale",
    "quantize_blockwise": "quantize",
    "dequantize_blockwise": "quantize",
    "dequantize_add": "dequantize_add",
    "rssm_rollout": "rssm",
}

__all__ = sorted([*OPS, *(f"{op}_ref" for op in OPS)])


def __getattr__(name: str):
    op = name[: -len("_ref")] if name.endswith("_ref") else name
    if op in OPS:
        module = importlib.import_module(f"{__name__}.{OPS[op]}")
        value = getattr(module, name)
        # Where an op is named like its module (cast_scale, unscale), importing the submodule
        # binds the module under that name; bind the function instead, so that
        # ``from hybrid_triton.kernels import cast_scale`` gives the op, not the module.
        globals()[name] = value
        # ``op_ref`` imported first must not leave the module bound under ``op``.
        globals()[op] = getattr(module, op)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
