"""benchmarks/sweep_rssm.py on CPU: the script imports, and its compile-and-check path (the
worker that decides which variants get timed) runs through the interpreter at a tiny point
and tells a right kernel from a wrong one. The timing itself needs a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hybrid_triton.kernels.rssm import rollout as rollout_module

SWEEP = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep_rssm.py"


@pytest.fixture
def sweep(monkeypatch, device):
    spec = importlib.util.spec_from_file_location("_test_sweep_rssm", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # A tiny point (K, H, T); I, S, O, B stay the sweep's (64, 32, 5, 1).
    monkeypatch.setattr(module, "POINTS", [("tiny", 2, 16, 3)])
    monkeypatch.setattr(module, "DEVICE", device)
    return module


def test_sweep_times_the_folded_variants(sweep):
    from hybrid_triton.kernels.rssm.rollout import VARIANTS

    assert {"folded", "fused_volatile"} <= set(VARIANTS)
    assert [p[0] for p in sweep.POINTS] == ["tiny"]


@pytest.mark.parametrize("variant", ["fused_volatile", "folded"])
def test_sweep_check_passes_a_right_variant(sweep, variant):
    assert sweep._compile_and_check(variant, ["tiny"]) == {"tiny": "ok"}


def test_sweep_check_fails_a_wrong_variant(sweep, monkeypatch):
    real = rollout_module.rssm_rollout_ref

    def off_by_a_little(x0, h0, z0, weights, feedback, steps):
        result = real(x0, h0, z0, weights, feedback, steps)
        return result._replace(traj=result.traj + 1e-3 * torch.ones_like(result.traj))

    # The worker's reference is rssm_rollout_ref: shifting it stands for a wrong kernel.
    monkeypatch.setattr("hybrid_triton.kernels.rssm.rssm_rollout_ref", off_by_a_little)
    verdict = sweep._compile_and_check("folded", ["tiny"])["tiny"]
    assert verdict.startswith("traj: max abs err"), verdict
