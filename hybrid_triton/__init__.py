"""hybrid_triton: train models that do not fit your GPU, and know beforehand what will fit.

Importing this package imports torch but touches no device and compiles nothing; the
sub-modules (kernels, arena, optim, planner, trainer, bench) load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it. Resolved on first access (PEP 562), so
# ``from hybrid_triton import FusedAdamW`` loads only what that name needs.
_LAZY = {
    "FlatArena": "hybrid_triton.arena",
    "ArenaGroup": "hybrid_triton.arena",
    "ArenaError": "hybrid_triton.arena",
    "FusedAdamW": "hybrid_triton.optim",
    "GradAccumulator": "hybrid_triton.accumulation",
    "DynamicLossScaler": "hybrid_triton.precision",
    "HybridTrainer": "hybrid_triton.trainer",
    "TrainerConfig": "hybrid_triton.scheduler",
    "Phase": "hybrid_triton.scheduler",
    "StateOffloader": "hybrid_triton.offload",
    "CheckpointError": "hybrid_triton.checkpoint",
    "DistributedFusedAdamW": "hybrid_triton.distributed",
    "DistributedHybridTrainer": "hybrid_triton.distributed",
    "KernelInputError": "hybrid_triton.kernels._checks",
    "prepare": "hybrid_triton.preparation",
    "PreparedModel": "hybrid_triton.preparation",
    "PrepareError": "hybrid_triton.preparation",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hybrid_triton' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
