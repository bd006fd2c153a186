"""DynamicsModel: features, online training, prediction through the kernel, calibration, state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hybrid_triton.kernels import rssm_rollout_ref

from hybrid_triton.dynamics import DynamicsConfig, DynamicsModel, FeatureEncoder, RunningNorm

SMALL = dict(
    ensemble=3, hidden=16, latent=4, bptt_window=4, calibration_horizon=3, min_calibration=4
)


def run_stats(step: int, groups: int = 2, scale: float = 1.0, device: str = "cpu") -> dict:
    """A smooth decaying loss with a little deterministic wiggle; update norms shrink."""
    loss = scale * (2.0 * math.exp(-step / 40) + 0.5 + 0.02 * math.sin(1.7 * step))
    return dict(
        loss=torch.tensor(loss, device=device),
        grad_norm=torch.tensor(1.0 + 0.1 * math.cos(step), device=device),
        update_norms=torch.tensor(
            [0.1 * (g + 1) * math.exp(-step / 200) for g in range(groups)], device=device
        ),
        lr=torch.tensor(1e-3, device=device),
        step=torch.tensor(float(step), device=device),
        phase="full",
    )


@pytest.fixture
def torch_path(monkeypatch):
    # Long online runs use the torch reference on CPU (the interpreter would take minutes);
    # test_predict_uses_kernel_and_matches_reference covers the kernel path.
    if not torch.cuda.is_available():
        monkeypatch.setenv("HYBRID_TRITON_IMPL", "torch")


def test_prediction_shapes_and_ranges(device, torch_path):
    model = DynamicsModel(2, DynamicsConfig(device=device, **SMALL))
    for step in range(8):
        model.observe(run_stats(step, device=device))
    pred = model.predict(5)
    assert pred.loss_mean.shape == (5,) and pred.loss_var.shape == (5,)
    assert pred.scales_mean.shape == (5, 2) and pred.loss_members.shape == (3, 5)
    assert torch.isfinite(pred.loss_mean).all() and (pred.loss_mean > 0).all()
    assert (pred.loss_var >= 0).all() and (pred.scales_mean > 0).all()
    assert 0.0 <= float(pred.confidence) <= 1.0


def test_predict_uses_kernel_and_matches_reference(device):
    """predict() goes through rssm_rollout (interpreter on CPU) with the live parameters."""
    model = DynamicsModel(2, DynamicsConfig(device=device, **SMALL))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYBRID_TRITON_IMPL", "torch")
        for step in range(5):
            model.observe(run_stats(step, device=device))
    weights = model.rollout_weights()
    assert weights.w_hh.data_ptr() == model.w_hh.data_ptr(), (
        "the kernel must read the parameters in place"
    )
    x0 = model.norm.normalize(model.last_raw).unsqueeze(0)
    expected = rssm_rollout_ref(
        x0.double(), model.h.double(), model.z.double(), weights, model.feedback(), 4
    )
    got = model._rollout(4)
    torch.testing.assert_close(got.traj.double(), expected.traj, atol=2e-5, rtol=1e-4)
    pred = model.predict(4)
    want_mean = torch.exp(model.norm.center()[0] + model.norm.std()[0] * expected.mean[:, 0, 0])
    # log-normal mean >= the exp of the mean log; equal when members agree
    assert (pred.loss_mean.double() >= want_mean * (1 - 1e-5)).all()


def test_learns_a_smooth_run_better_than_persistence(torch_path):
    model = DynamicsModel(2, DynamicsConfig(**{**SMALL, "hidden": 32, "ensemble": 3, "lr": 3e-3}))
    for step in range(150):
        model.observe(run_stats(step))
    errors = model.relative_errors()
    # Persistence (next loss = this loss) on the same run, same leads.
    losses = [float(run_stats(s)["loss"]) for s in range(150)]
    for lead, err in errors.items():
        persistence = sum(
            abs(losses[i + lead] - losses[i]) / losses[i + lead] for i in range(100, 150 - lead)
        )
        persistence /= 150 - lead - 100
        assert float(err) < 0.1, f"lead {lead}: mean relative error {float(err):.3f}"
        assert float(err) < 2.5 * persistence + 0.01, (
            f"lead {lead}: {float(err):.4f} vs {persistence:.4f}"
        )


def test_confidence_is_zero_until_calibrated_then_in_range(torch_path):
    model = DynamicsModel(2, DynamicsConfig(**SMALL))
    model.observe(run_stats(0))
    model.observe(run_stats(1))
    assert float(model.confidence()) == 0.0, "no held-out errors yet: no confidence"
    for step in range(2, 40):
        model.observe(run_stats(step))
    conf = float(model.confidence())
    assert 0.0 <= conf <= 1.0
    # A tighter tolerance can only lower the confidence of the same forecast.
    model.config.rel_tolerance = 1e-6
    assert float(model.confidence()) <= conf


def test_features_are_scale_free():
    """Multiplying the loss by 1000 changes the raw log loss by a constant that the running
    normalization removes: the normalized features are unchanged."""
    norms, encoders = (
        [RunningNorm(FeatureEncoder(2).size, 0.01) for _ in range(2)],
        [FeatureEncoder(2) for _ in range(2)],
    )
    for step in range(20):
        outs = []
        for norm, enc, scale in zip(norms, encoders, (1.0, 1000.0), strict=True):
            raw = enc.encode(run_stats(step, scale=scale))
            norm.update(raw)
            outs.append(norm.normalize(raw))
        if step >= 1:
            torch.testing.assert_close(outs[0], outs[1], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("train_every", [1, 3], ids=["train_every_1", "train_every_3"])
def test_state_dict_round_trip_continues_identically(torch_path, train_every):
    cfg = DynamicsConfig(**SMALL, train_every=train_every)
    model = DynamicsModel(2, cfg)
    for step in range(10):
        model.observe(run_stats(step))
    state = copy.deepcopy(model.state_dict())
    other = {**SMALL, "seed": 123, "train_every": train_every}
    clone = DynamicsModel(2, DynamicsConfig(**other))  # different init
    clone.load_state_dict(state)
    for step in range(10, 14):  # same observations: same training, same optimizer moments
        model.observe(run_stats(step))
        clone.observe(run_stats(step))
    a, b = model.predict(4), clone.predict(4)
    for name in ("loss_mean", "loss_var", "scales_mean", "confidence"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=0, rtol=0)
    torch.testing.assert_close(model.norm.var, clone.norm.var, atol=0, rtol=0)


def test_train_every_trains_on_every_nth_observe_and_filters_between(torch_path):
    n = 3
    model = DynamicsModel(2, DynamicsConfig(**SMALL, train_every=n))
    trained = []
    for step in range(14):
        before = model.w_hh.detach().clone()
        h_before = model.h.clone()
        loss = model.observe(run_stats(step))
        changed = not torch.equal(before, model.w_hh)
        trained.append(changed)
        assert changed == (float(loss) != 0.0), step
        if step >= 1:  # the filtered state consumes every observation, trained or not
            assert not torch.equal(h_before, model.h), step
        # The window slides on every observe: an update still unrolls bptt_window steps.
        assert len(model._window) <= SMALL["bptt_window"] + 1
    assert trained == [(i + 1) % n == 0 for i in range(14)], trained
    assert torch.isfinite(model.predict(4).loss_mean).all()
    # Filtering keeps forecasting: calibration goes on between updates.
    assert model._calib_written > 0 and 0.0 <= float(model.confidence()) <= 1.0


def test_train_every_filtering_matches_the_trained_state_at_the_window_end(torch_path):
    # _filter advances (h, z) by one GRU step with the posterior mean; _train re-derives the
    # same state from the window start with sampled latents. Both must describe the newest
    # observation: after a filter step, predictions stay close to the trained model's.
    trained = DynamicsModel(2, DynamicsConfig(**SMALL))
    filtered = DynamicsModel(2, DynamicsConfig(**SMALL, train_every=1000))
    for step in range(12):
        trained.observe(run_stats(step))
    filtered.load_state_dict(copy.deepcopy(trained.state_dict()))  # trained up to step 11 ...
    filtered.observe(run_stats(12))  # ... then one filter step
    trained.observe(run_stats(12))  # ... against one more update
    a, b = trained.predict(3).loss_mean, filtered.predict(3).loss_mean
    torch.testing.assert_close(a, b, rtol=0.05, atol=0)


def test_bf16_rollout_weights_are_a_shadow_refreshed_per_update(device, torch_path):
    model = DynamicsModel(2, DynamicsConfig(device=device, weight_dtype=torch.bfloat16, **SMALL))
    for step in range(3):
        model.observe(run_stats(step, device=device))
    first = model.rollout_weights()
    assert first.w_hh.dtype == torch.bfloat16
    assert model.rollout_weights() is first, "no copy per call"
    model.observe(run_stats(3, device=device))
    assert model.rollout_weights() is not first, "refreshed after a training update"
    assert torch.isfinite(model.predict(3).loss_mean).all()


def test_bad_input():
    with pytest.raises(ValueError, match="num_segment_groups"):
        DynamicsModel(0)
    model = DynamicsModel(2, DynamicsConfig(**SMALL))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="train_every must be an int >= 1"):
            DynamicsModel(2, DynamicsConfig(**SMALL, train_every=bad))
    with pytest.raises(ValueError, match="update_norms has 3 values; expected 2"):
        model.observe({**run_stats(0), "update_norms": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="horizon must be an int >= 1"):
        model.predict(0)


@pytest.mark.gpu
def test_gpu_observe_and_predict_do_not_sync():
    model = DynamicsModel(4, DynamicsConfig(device="cuda"))  # default K=5, H=256
    for step in range(20):
        model.observe(run_stats(step, groups=4, device="cuda"))
    stats = run_stats(20, groups=4, device="cuda")  # made before: torch.tensor(float) copies
    later = run_stats(21, groups=4, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.observe(stats)
        pred = model.predict(50)
        model.confidence()
        # The trainer passes its step counter (and may pass other values) as host numbers:
        # they become kernel arguments, never a synchronizing host-to-device copy.
        model.observe({**later, "step": 21, "optimizer": 0.5})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(pred.loss_mean).all()


@pytest.mark.gpu
def test_gpu_filter_observe_does_not_sync():
    model = DynamicsModel(4, DynamicsConfig(device="cuda", train_every=4))
    all_stats = [run_stats(s, groups=4, device="cuda") for s in range(24)]
    for stats in all_stats[:20]:
        model.observe(stats)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for stats in all_stats[20:]:  # three filter steps and one update
            model.observe(stats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(model.predict(8).loss_mean).all()
