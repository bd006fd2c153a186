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

    assert {"folded", "fused_volatile", "folded_inkernel_w8"} <= set(VARIANTS)
    assert [p[0] for p in sweep.POINTS] == ["tiny"]


@pytest.mark.parametrize("variant", ["fused_volatile", "folded", "folded_inkernel_w8"])
def test_sweep_check_passes_a_right_variant(sweep, variant):
    assert sweep._compile_and_check(variant, ["tiny"]) == {"tiny": "ok"}


def test_sweep_grid_points(sweep):
    assert sweep.grid_points([5], [256, 512], [1, 50]) == [
        ("K5-H256-T1", 5, 256, 1),
        ("K5-H256-T50", 5, 256, 50),
        ("K5-H512-T1", 5, 512, 1),
        ("K5-H512-T50", 5, 512, 50),
    ]
    # A dimension left out takes the target's value (the first point; "tiny" here).
    assert sweep.select_points(None, Hs=[8], Ts=[2, 3]) == [
        ("K2-H8-T2", 2, 8, 2),
        ("K2-H8-T3", 2, 8, 3),
    ]
    assert sweep.select_points(None) == sweep.POINTS
    assert sweep.select_points("tiny") == sweep.POINTS
    with pytest.raises(SystemExit, match="unknown points"):
        sweep.select_points("tiny,target")
    with pytest.raises(SystemExit, match="not both"):
        sweep.select_points("tiny", Ks=[5])
    with pytest.raises(Exception, match="positive integers"):
        sweep._int_list("0,5")


def test_sweep_check_runs_the_points_it_is_given(sweep):
    # A spawned worker sees only the module's POINTS: the grid's points travel with the job.
    grid = sweep.grid_points([1], [12], [2])
    verdict = sweep._compile_and_check("folded_inkernel_w8", ["K1-H12-T2"], grid)
    assert verdict == {"K1-H12-T2": "ok"}


def test_sweep_check_fails_a_wrong_variant(sweep, monkeypatch):
    real = rollout_module.rssm_rollout_ref

    def off_by_a_little(x0, h0, z0, weights, feedback, steps):
        result = real(x0, h0, z0, weights, feedback, steps)
        return result._replace(traj=result.traj + 1e-3 * torch.ones_like(result.traj))

    # The worker's reference is rssm_rollout_ref: shifting it stands for a wrong kernel.
    monkeypatch.setattr("hybrid_triton.kernels.rssm.rssm_rollout_ref", off_by_a_little)
    verdict = sweep._compile_and_check("folded", ["tiny"])["tiny"]
    assert verdict.startswith("traj: max abs err"), verdict


KERNELS_RSSM = SWEEP.parent / "kernels_rssm.py"


def test_kernels_suite_times_the_in_kernel_fold_at_the_target(device):
    spec = importlib.util.spec_from_file_location("_test_kernels_rssm", KERNELS_RSSM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.ALSO_AT_TARGET == ("folded_inkernel_w8",)
    target, other = module.cases(quick=True)
    assert other.setup().providers.keys().isdisjoint({"hybrid_triton_folded_inkernel_w8"})
    run = target.setup()
    assert "hybrid_triton_folded_inkernel_w8" in run.providers
    run.check()
    # The check covers the extra provider: a wrong result from it fails the case.
    right = run.providers["hybrid_triton_folded_inkernel_w8"]

    def wrong():
        result = right()
        return result._replace(mean=result.mean + 1e-2)

    run.providers["hybrid_triton_folded_inkernel_w8"] = wrong
    with pytest.raises(AssertionError, match=r"folded_inkernel_w8\.mean"):
        run.check()
