"""Comparison helpers whose failures locate the error (STYLE.md, 6)."""

from __future__ import annotations

import torch


def _first_bad(mask: torch.Tensor, k: int = 5) -> list[tuple[int, ...]]:
    idx = mask.nonzero()[:k]
    return [tuple(int(i) for i in row) for row in idx]


def assert_close(
    name: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    equal_nan: bool = False,
) -> None:
    """Like ``torch.testing.assert_close`` (in float64), with a message that names the tensor
    and prints max abs/rel error and the first mismatching indices."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_a, nan_e = a.isnan(), e.isnan()
    if equal_nan:
        bad_nan = nan_a != nan_e
    else:
        bad_nan = nan_a | nan_e
    same_inf = torch.isinf(a) & (a == e)
    diff = (a - e).abs()
    diff = torch.where(same_inf | (nan_a & nan_e), torch.zeros_like(diff), diff)
    bad = (diff > atol + rtol * e.abs()) | bad_nan
    if equal_nan:
        bad &= ~(nan_a & nan_e)
    if bad.any():
        finite = ~bad_nan
        max_abs = diff[finite].max().item() if finite.any() else float("nan")
        rel = (diff / e.abs().clamp_min(1e-30))[finite]
        max_rel = rel.max().item() if rel.numel() else float("nan")
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ "
            f"(atol={atol}, rtol={rtol}); max abs err {max_abs:.3e}, max rel err {max_rel:.3e}; "
            f"NaN in actual {int(nan_a.sum())}, expected {int(nan_e.sum())}; first bad indices "
            f"{_first_bad(bad)}: actual {[a[i].item() for i in _first_bad(bad)]}, "
            f"expected {[e[i].item() for i in _first_bad(bad)]}"
        )


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at each value of ``x`` (float64)."""
    x = x.detach().to(torch.float64).abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.pow(2.0, torch.floor(torch.log2(x)) - 7)


def fp16_ulp(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().to(torch.float64).abs().clamp_min(2.0**-14)
    return torch.pow(2.0, torch.floor(torch.log2(x)) - 10)


# Adversarial sizes shared by the kernel tests (STYLE.md, 5), with ids.
SIZES = [0, 1, 2, 7, 127, 1000, 4099, 65537]
SIZE_IDS = [f"n{n}" for n in SIZES]
