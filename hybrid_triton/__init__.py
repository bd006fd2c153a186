"""hybrid_triton: train models that do not fit your GPU, and know beforehand what will fit.

Importing this package imports torch but touches no device and compiles nothing; the
sub-modules (kernels, arena, optim, planner, trainer, bench) load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "FlatArena": "hybrid_triton.arena",
    "ArenaError": "hybrid_triton.arena",
    "KernelInputError": "hybrid_triton.kernels._checks",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hybrid_triton' has no attribute {name!r}")
