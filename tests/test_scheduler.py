"""Phase controller rules, plans, configuration presets, files and validation."""

from __future__ import annotations

import json

import pytest

from hybrid_triton.scheduler import (
    ALLOWED_TRANSITIONS,
    ConfigError,
    Phase,
    PhaseController,
    TrainerConfig,
    TransitionError,
    make_plan,
)


def small(**kw) -> TrainerConfig:
    base = dict(
        warmup_steps=3,
        full_steps=4,
        min_predict_steps=2,
        max_predict_steps=6,
        correct_steps=2,
        confidence_threshold=0.8,
        max_consecutive_predicts=2,
    )
    return TrainerConfig(**{**base, **kw})


def run(ctrl: PhaseController, confidences) -> list[str]:
    phases = []
    for c in confidences:
        plan, _ = ctrl.begin_step(c)
        phases.append(plan.phase.value)
        ctrl.end_step()
    return phases


def test_cycle_follows_the_rules():
    cfg = small()
    ctrl = PhaseController(cfg)
    phases = run(ctrl, [1.0] * 40)
    # Warmup 3, Full 4, then Predict (horizon at conf 1: 6) -> Correct 2, twice (the bound),
    # then Full again.
    assert phases[:3] == ["warmup"] * 3
    assert phases[3:7] == ["full"] * 4
    assert phases[7:13] == ["predict"] * 6
    assert phases[13:15] == ["correct"] * 2
    # Second Predict phase is shorter: penalty 1 - 0.1 * 1.
    assert phases[15:20] == ["predict"] * 5
    assert phases[20:22] == ["correct"] * 2
    assert phases[22:26] == ["full"] * 4  # bounded run of Predict phases
    assert phases[26] == "predict"
    for _, src, dst, _ in ctrl.transitions:
        assert Phase(dst) in ALLOWED_TRANSITIONS[Phase(src)]


def test_low_confidence_keeps_full():
    ctrl = PhaseController(small())
    phases = run(ctrl, [0.5] * 20)
    assert set(phases[3:]) == {"full"}
    assert ctrl.phase_counts["predict"] == 0


def test_predict_off_runs_full_phases_only():
    cfg = small(predict=False)
    ctrl = PhaseController(cfg)
    phases = run(ctrl, [1.0] * 30)  # full confidence: Predict would be entered at step 7
    assert phases[:3] == ["warmup"] * 3
    assert set(phases[3:]) == {"full"}
    assert ctrl.phase_counts["predict"] == 0 and ctrl.step_counts["predict"] == 0
    assert all(reason == "predict off" for *_, reason in ctrl.transitions[1:])
    assert not TrainerConfig.preset("full_only").predict
    assert TrainerConfig.preset("balanced").predict
    # full_only is balanced with Predict off, nothing else.
    off = TrainerConfig.preset("full_only").to_dict()
    on = TrainerConfig.preset("balanced").to_dict()
    assert {k for k in off if off[k] != on[k]} == {"predict"}


def test_nan_confidence_never_predicts():
    ctrl = PhaseController(small())
    assert set(run(ctrl, [float("nan")] * 12)[3:]) == {"full"}


@pytest.mark.parametrize("conf,expected", [(1.0, 15), (0.9, 12), (0.5, 3), (0.1, 2)])
def test_horizon_rule(conf, expected):
    ctrl = PhaseController(small(max_predict_steps=15, min_predict_steps=2))
    assert ctrl.horizon(conf) == expected


def test_horizon_penalty_and_bounds():
    ctrl = PhaseController(small(max_predict_steps=10, min_predict_steps=3))
    ctrl.consecutive_predicts = 3
    assert ctrl.horizon(1.0) == 7  # floor(10 * 1 * 0.7)
    ctrl.consecutive_predicts = 10
    assert ctrl.horizon(1.0) == 5  # penalty capped at 0.5
    assert ctrl.horizon(0.0) == 3  # raised to min


def test_force_full_from_predict_and_invalid_transition():
    ctrl = PhaseController(small())
    run(ctrl, [1.0] * 8)
    assert ctrl.phase is Phase.PREDICT
    plan = ctrl.force_full("rollback: test")
    assert plan.phase is Phase.FULL and ctrl.steps_left == 4 and ctrl.consecutive_predicts == 0
    assert ctrl.transitions[-1][3] == "rollback: test"
    with pytest.raises(TransitionError, match="full -> correct"):
        ctrl._enter(Phase.CORRECT, 1, "bad")


def test_controller_state_roundtrip():
    ctrl = PhaseController(small())
    run(ctrl, [1.0] * 9)
    other = PhaseController(small())
    other.load_state_dict(json.loads(json.dumps(ctrl.state_dict())))
    assert run(other, [1.0] * 20) == run(ctrl, [1.0] * 20)


def test_plans():
    cfg = small(
        precision="bf16",
        phase_precision={"predict": "fp16"},
        offload="compress",
        micro_batches=4,
        phase_micro_batches={"predict": 1},
    )
    p = make_plan(cfg, Phase.PREDICT, 5)
    assert not p.backward and p.precision == "fp16" and p.micro_batches == 1
    assert p.memory.optimizer_state == "compress" and p.memory.free_grads
    assert p.memory.no_grad_forward and "dequantize_add" in p.kernels
    f = make_plan(cfg, Phase.FULL, 5)
    assert f.backward and f.precision == "bf16" and f.micro_batches == 4
    assert f.memory.optimizer_state == "keep" and "accumulate_grads" in f.kernels  # 4 pieces
    flat = make_plan(small(), Phase.FULL, 5)  # one micro-batch: the flat gradient path
    assert "accumulate_grads" not in flat.kernels and "adamw_step" in flat.kernels
    h = make_plan(small(precision="fp16"), Phase.CORRECT, 2)
    assert "unscale" in h.kernels and "quantize_blockwise" in h.kernels


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("confidence_threshold", 1.0, "confidence_threshold"),
        ("confidence_threshold", 0.0, "confidence_threshold"),
        ("full_steps", 0, "full_steps"),
        ("warmup_steps", -1, "warmup_steps"),
        ("micro_batches", 2.5, "micro_batches"),
        ("precision", "fp8", "precision"),
        ("offload", "disk", "offload"),
        ("direction_format", "int2", "direction_format"),
        ("quant_block", 100, "quant_block"),
        ("async_restore", "yes", "async_restore"),
        ("predict", "no", "predict"),
        ("predict", 0, "predict"),
        ("phase_precision", {"predict": "int8"}, "phase_precision.predict"),
        ("phase_precision", {"sleep": "bf16"}, "sleep"),
        ("phase_micro_batches", {"full": 0}, "phase_micro_batches.full"),
        ("divergence_rel_critical", 0.1, "divergence_rel_critical"),
    ],
    ids=lambda x: str(x)[:24],
)
def test_validation_names_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainerConfig(**{field: value})


def test_min_above_max_predict():
    with pytest.raises(ConfigError, match="min_predict_steps"):
        TrainerConfig(min_predict_steps=9, max_predict_steps=3)


@pytest.mark.parametrize("name", ["conservative", "balanced", "aggressive", "full_only"])
def test_presets(name):
    cfg = TrainerConfig.preset(name, warmup_steps=7)
    assert cfg.warmup_steps == 7
    with pytest.raises(ConfigError, match="unknown preset"):
        TrainerConfig.preset("reckless")


def test_unknown_key():
    with pytest.raises(ConfigError, match="warmup_step"):
        TrainerConfig.from_dict({"warmup_step": 3})


def test_files(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "aggressive"\nfull_steps = 9\n[phase_precision]\npredict = "bf16"\n')
    cfg = TrainerConfig.from_file(toml)
    assert cfg.full_steps == 9 and cfg.offload == "compress"
    assert cfg.precision_for(Phase.PREDICT) == "bf16"
    wrapped = tmp_path / "w.toml"
    wrapped.write_text("[trainer]\nwarmup_steps = 4\n")
    assert TrainerConfig.from_file(wrapped).warmup_steps == 4
    js = tmp_path / "c.json"
    js.write_text(json.dumps(small().to_dict()))
    assert TrainerConfig.from_file(js) == small()
    bad = tmp_path / "bad.json"
    bad.write_text('{"confidence_threshold": 2}')
    with pytest.raises(ConfigError, match=r"bad.json: TrainerConfig.confidence_threshold"):
        TrainerConfig.from_file(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("warmup_steps = = 3")
    with pytest.raises(ConfigError, match="cannot parse"):
        TrainerConfig.from_file(broken)
    ini = tmp_path / "c.ini"
    ini.write_text("")
    with pytest.raises(ConfigError, match="unknown config format"):
        TrainerConfig.from_file(ini)
    yml = tmp_path / "c.yaml"
    yml.write_text("warmup_steps: 5\n")
    try:
        import yaml  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ConfigError, match="PyYAML"):
            TrainerConfig.from_file(yml)
    else:
        assert TrainerConfig.from_file(yml).warmup_steps == 5
