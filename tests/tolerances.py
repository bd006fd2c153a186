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
    ("cast_scale", torch.bfloat16): (0.0, 0.0, "GPU: bit-exact; CPU interpreter: one bf16 ulp"),
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
    # AdamW with quantized moments, kernel vs adamw_step_ref, decoded moments: one code step
    # (rtol 2^-mantissa bits); at most 1% of codes may differ (fp32 rounding near a boundary).
    ("adamw_state8", torch.int8): (1e-30, 2.0**-3, "e4m3 / e5m3 codes: one mantissa step"),
    ("adamw_state4", torch.uint8): (1e-30, 1.0, "e3m0 exp_avg / e3m1 exp_avg_sq: one step"),
    # RSSM rollout: T sequential GRU steps of fp32 dot products summed in another order; the
    # test also allows 2x the fp32 reference's own error (flash-attention rule). bf16 rows:
    # the kernel upcasts the same bf16 weights as the reference, so fp32-level agreement.
    ("rssm_rollout", torch.float32): (2e-5, 1e-4, "fp32 dot products in another order, T steps"),
    ("rssm_rollout", torch.bfloat16): (2e-5, 1e-4, "bf16 weights upcast exactly; fp32 math"),
    # blockwise quantization (kernels/quantize.py, kernels/dequantize_add.py).
    ("quantize", torch.float32): (0.0, 0.0, "same fp32 formulas, no fma: codes/scales/error exact"),
    ("quantize_ternary", torch.float32): (
        0.0,
        2e-6,
        "TWN delta/alpha are block sums in another order: scales and error to a few fp32 ulps "
        "(atol is this rtol times the block scale); a code may flip only where |v| ~ delta",
    ),
    ("dequantize_add", torch.float32): (0.0, 0.0, "t + alpha*v in fp32 without fma: exact"),
    ("dequantize_add", torch.float16): (0.0, 0.0, "fp32 sum then one round-to-nearest cast"),
    ("dequantize_add", torch.bfloat16): (0.0, 0.0, "exact on the GPU; 1 bf16 ulp on CPU"),
}

# Signal-to-noise floors (dB) of dequantize(quantize(x)) against x, blocks of 256, 2^16
# elements: (format, input, stochastic) -> (floor, reason). "normal": N(0, 1); "adam_v":
# exp(2 N(0, 1)), heavy-tailed and positive like Adam's second moment (its SNR is set by a few
# large values and moves by ~3 dB between draws). Floors sit ~0.7 dB under values measured with
# the torch reference (CPU, 2026-11-24), ~1 dB under the lowest of three draws for adam_v.
QUANT_SNR_FLOOR_DB: dict[tuple[str, str, bool], tuple[float, str]] = {
    ("int8", "normal", False): (42.4, "uniform step absmax/127; measured 43.2"),
    ("int8", "normal", True): (39.4, "stochastic: error variance x2 (about -3 dB); measured 40.2"),
    ("int8_dynamic", "normal", False): (40.3, "cubic code, coarser near absmax; measured 41.0"),
    ("int8_dynamic", "normal", True): (37.4, "measured 38.1"),
    ("int8_dynamic", "adam_v", False): (43.5, "keeps small values; measured 44.5-47.7"),
    ("int8", "adam_v", False): (32.0, "small values lost to the uniform step; 32.8-35.1"),
    ("int4", "normal", False): (17.3, "step absmax/7; measured 18.0"),
    ("int4", "normal", True): (14.4, "measured 15.1"),
    ("ternary", "normal", False): (5.9, "TWN scale >= absmax/2 (plain TWN: 7.2); measured 6.5"),
    ("ternary", "normal", True): (-3.2, "TernGrad: unbiased but high variance; measured -2.5"),
}


def tol(op: str, dtype: torch.dtype) -> dict[str, float]:
    atol, rtol, _ = TOLERANCES[(op, dtype)]
    return {"atol": atol, "rtol": rtol}
