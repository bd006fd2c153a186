"""Tolerances are data (STYLE.md, 4): one row per (op, dtype) with its reason.

Values are (atol, rtol) against a float64 computation of the torch reference on the same
inputs. "exact" rows are 0/0. The interpreter rounds bf16 differently from the GPU
(triton-lang/triton 4972, 11584): bf16 outputs are checked to one bf16 ulp on CPU, bit-exact
on the GPU; those rows use the ulp helpers in tests/helpers.py instead of this table.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[tuple[str, torch.dtype], tuple[float, float, str]] = {
    # cast-and-scale: one multiply in fp32 then a rounding cast; the reference does the same.
    ("cast_scale", torch.float16): (0.0, 0.0, "x*s in fp32 then round-to-nearest cast: exact"),
    ("cast_scale", torch.float32): (0.0, 0.0, "x*s in fp32: exact"),
    # unscale: one multiply in fp32 of an upcast value: exact.
    ("unscale", torch.float32): (0.0, 0.0, "g*inv in fp32: exact"),
    ("unscale", torch.float16): (0.0, 0.0, "upcast then g*inv in fp32: exact"),
    ("unscale", torch.bfloat16): (0.0, 0.0, "upcast then g*inv in fp32: exact"),
    # accumulate: acc + g*alpha in fp32 (fma vs mul+add may differ by one fp32 rounding).
    ("accumulate", torch.float32): (1e-6, 1e-6, "fma contraction may differ by 1 fp32 ulp"),
    ("accumulate", torch.float16): (1e-6, 1e-6, "fma contraction may differ by 1 fp32 ulp"),
    ("accumulate", torch.bfloat16): (1e-6, 1e-6, "fma contraction may differ by 1 fp32 ulp"),
    # sums of squares: reductions in a different order; 2x-rule against fp64.
    ("sumsq", torch.float32): (1e-6, 2e-5, "block-wise reduction order differs from torch's"),
    # AdamW over many steps against torch.optim.AdamW (fp32 state).
    ("adamw", torch.float32): (1e-6, 1e-5, "sqrt/div rounding and fma differ; grows slowly"),
}


def tol(op: str, dtype: torch.dtype) -> dict[str, float]:
    atol, rtol, _ = TOLERANCES[(op, dtype)]
    return {"atol": atol, "rtol": rtol}
