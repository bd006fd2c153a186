"""The training suite's recipe-run configurations on CPU (quick mode, gpt2-tiny): the 1B run's
configuration path (``--option model=gpt2-1b``), seeds, recipe selection and options, the
planner rows, the loss curve, out-of-memory rows, and bad options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hybrid_triton.bench.report import problems
from hybrid_triton.bench.results import Recorder, machine_info
from hybrid_triton.bench.runner import SuiteContext, load_module

SUITES = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def machine():
    return machine_info()


@pytest.fixture(scope="module")
def training():
    return load_module(SUITES / "training.py", "_test_training_suite")


def _run(training, machine, options: dict, pattern: str = "recipe") -> SuiteContext:
    ctx = SuiteContext(suite="training", recorder=Recorder("training", machine), quick=True,
                       pattern=pattern, suites_dir=SUITES, progress=False,
                       options=options)  # fmt: skip
    training.run(ctx)
    return ctx


def _config(row) -> dict:
    return json.loads(row["config"])


def test_size_for_models(training):
    small = training.size_for(False)
    assert (small.model, small.micro_batch, small.seq_len, small.steps) == (
        "gpt2-small",
        8,
        1024,
        200,
    )
    assert small.lr is None and not small.eval_at_start and small.recipe_options == {}
    big = training.size_for(False, "gpt2-1b")
    assert (big.model, big.micro_batch, big.seq_len, big.accum) == ("gpt2-1b", 8, 1024, 1)
    assert big.eval_at_start and big.init_on_device and big.max_train_s > 0
    assert big.recipe_options["toolkit_memory"]["grad_dtype"] == "bf16"
    # Quick mode keeps the tiny shapes and applies the rest of the configuration.
    quick = training.size_for(True, "gpt2-1b")
    tiny = training.size_for(True)
    assert (quick.model, quick.micro_batch, quick.seq_len, quick.steps) == (
        tiny.model, tiny.micro_batch, tiny.seq_len, tiny.steps
    )  # fmt: skip
    assert quick.lr == big.lr and quick.recipe_options == big.recipe_options
    with pytest.raises(ValueError, match="model"):
        training.size_for(False, "gpt2-xxl")


def test_the_1b_configuration_path_with_two_seeds(training, machine):
    options = {"model": "gpt2-1b", "seeds": "0,1", "recipes": "baseline_bf16,toolkit_memory"}
    df = _run(training, machine, options).recorder.frame()
    assert problems(df).empty, problems(df)["note"].tolist()
    cases = {
        ("baseline_bf16", 0): "gpt2-tiny baseline_bf16 4x64x1",
        ("toolkit_memory", 0): "gpt2-tiny toolkit_memory 4x64x1",
        ("baseline_bf16", 1): "gpt2-tiny baseline_bf16 4x64x1 seed1",
        ("toolkit_memory", 1): "gpt2-tiny toolkit_memory 4x64x1 seed1",
    }
    status = df[df["metric"] == "status"]
    assert set(status["case"]) == set(cases.values())  # baseline_fp32 not selected
    for (recipe, seed), case in cases.items():
        rows = df[df["case"] == case]
        measured = rows[rows["provider"] == "measured"]
        config = _config(measured.iloc[0])
        assert config["seed"] == seed and config["lr"] == pytest.approx(2e-4)
        assert config["steps_done"] == config["steps"] == 6
        # The planner's estimate of the step is recorded beside the measurement.
        planner = rows[(rows["provider"] == "planner") & (rows["metric"] == "peak_allocated")]
        assert len(planner) == 1 and planner["value"].iloc[0] > 0
        if recipe == "toolkit_memory":
            resolved = config["recipe_options"]
            assert resolved["grad_dtype"] == "bf16" and resolved["memory_budget_gib"] == 14.0
            assert "checkpoint_blocks" in resolved  # the planner's choice at the first step
        for metric in ("tokens_per_s", "tokens_per_s_steady", "val_loss", "final_train_loss"):
            (value,) = measured[measured["metric"] == metric]["value"]
            assert value > 0, (case, metric)
        # The loss curve: validation at step 0 (eval_at_start) and at the end, train losses.
        curve = df[df["case"] == f"{case} [curve]"]
        val = curve[curve["metric"] == "val_loss"]
        assert list(val["provider"]) == ["step 0", "step 3", "step 6"]
        train = curve[curve["metric"] == "train_loss"]
        assert list(train["provider"]) == [f"step {s}" for s in range(1, 7)]
        (final_val,) = measured[measured["metric"] == "val_loss"]["value"]
        assert val["value"].iloc[-1] == final_val

    # Different seeds: different models and data, so different losses.
    def val_loss(case):
        rows = df[(df["case"] == case) & (df["metric"] == "val_loss")]
        return rows[rows["provider"] == "measured"]["value"].iloc[0]

    assert val_loss(cases[("baseline_bf16", 0)]) != val_loss(cases[("baseline_bf16", 1)])
    # The cross-seed summary: mean and range per recipe, gap and speed ratio per seed.
    summary = df[df["case"] == "gpt2-tiny 4x64x1 [seeds 0,1]"]
    for recipe in ("baseline_bf16", "toolkit_memory"):
        losses = [val_loss(cases[(recipe, s)]) for s in (0, 1)]
        (mean,) = summary[(summary["provider"] == recipe)
                          & (summary["metric"] == "val_loss_mean")]["value"]  # fmt: skip
        assert mean == pytest.approx(sum(losses) / 2)
        (spread,) = summary[(summary["provider"] == recipe)
                            & (summary["metric"] == "val_loss_range")]["value"]  # fmt: skip
        assert spread == pytest.approx(abs(losses[0] - losses[1]))
    for seed in (0, 1):
        (gap,) = summary[(summary["provider"] == f"seed {seed}")
                         & (summary["metric"] == "val_gap_vs_bf16_pct")]["value"]  # fmt: skip
        ours, ref = (
            val_loss(cases[("toolkit_memory", seed)]),
            val_loss(cases[("baseline_bf16", seed)]),
        )
        assert gap == pytest.approx(100 * (ours / ref - 1))


def test_recipe_options_from_the_command_line(training, machine):
    options = {"recipes": "toolkit_memory", "toolkit_memory.state_bits": "4",
               "toolkit_memory.checkpointing": "false", "steps": "2", "lr": "1e-3"}  # fmt: skip
    df = _run(training, machine, options).recorder.frame()
    assert problems(df).empty, problems(df)["note"].tolist()
    measured = df[(df["provider"] == "measured") & (df["metric"] == "tokens_per_s")]
    config = _config(measured.iloc[0])
    assert config["recipe_options"]["state_bits"] == 4
    assert config["recipe_options"]["checkpointing"] is False
    assert config["recipe_options"]["checkpoint_blocks"] == 0
    assert config["steps"] == 2 and config["lr"] == pytest.approx(1e-3)
    assert training.parse_value("4") == 4 and training.parse_value("0.5") == 0.5
    assert training.parse_value("True") is True and training.parse_value("auto") == "auto"


def test_out_of_memory_is_recorded_and_the_next_recipe_runs(training, machine, monkeypatch):
    # On the GPU the 1B baselines run out of memory under the 16 GiB cap: their rows must say
    # so (with the planner's estimate) and the toolkit run must still happen.
    import hybrid_triton.recipes as recipes

    def out_of_memory(cfg, device, optim, init_device=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (simulated)")

    monkeypatch.setitem(recipes.RECIPES, "baseline_fp32", out_of_memory)
    options = {"model": "gpt2-1b", "recipes": "baseline_fp32,toolkit_memory", "steps": "2"}
    df = _run(training, machine, options).recorder.frame()
    status = df[df["metric"] == "status"].set_index("case")["note"]
    assert status["gpt2-tiny baseline_fp32 4x64x1"].startswith("oom: OutOfMemoryError")
    assert status["gpt2-tiny toolkit_memory 4x64x1"].startswith("ok")
    planner = df[(df["case"] == "gpt2-tiny baseline_fp32 4x64x1") & (df["provider"] == "planner")]
    assert len(planner) == 1  # the estimate is there although the run is not


@pytest.mark.parametrize(
    "options, message",
    [
        ({"seeds": "0,x"}, "seeds"),
        ({"seeds": "-1"}, "seeds"),
        ({"recipes": "baseline_bf16,toolkit_magic"}, "toolkit_magic"),
        ({"model": "gpt2-xxl"}, "model"),
        ({"toolkit_magic.state_bits": "4"}, "toolkit_magic"),
        ({"toolkit_memory.bits": "4", "recipes": "toolkit_memory", "steps": "1"}, "bits"),
    ],
    ids=[
        "seed-not-int",
        "seed-negative",
        "unknown-recipe",
        "unknown-model",
        "option-for-unknown-recipe",
        "unknown-recipe-option",
    ],
)
def test_bad_options_are_clear_errors(training, machine, options, message):
    if "toolkit_memory.bits" in options:  # rejected by the recipe: an error row, nothing run
        df = _run(training, machine, options).recorder.frame()
        bad = problems(df)
        assert len(bad) == 1 and message in bad["note"].iloc[0]
        assert (df["metric"] == "tokens_per_s").sum() == 0
        return
    with pytest.raises(ValueError, match=message):
        _run(training, machine, options)


def test_curve_points(training):
    evals = [{"step": 0}, {"step": 100}, {"step": 200}]
    assert training.curve_points(200, evals) == [0, *range(20, 201, 20)]
    assert training.curve_points(3, []) == [1, 2, 3]
    assert training.curve_points(0, []) == []


def test_trainer_presets_and_tradeoff(training, machine, monkeypatch):
    # Quick mode: gpt2-tiny, 6 steps; two trainer configurations ("off" = Predict off) on the
    # torch references (the kernels have their own tests), then the baseline and the
    # trade-off case.
    monkeypatch.setenv("HYBRID_TRITON_IMPL", "torch")
    options = {
        "trainer_presets": "off,aggressive",
        "trainer_overrides": "dynamics_model:trend;confidence_threshold:0.01",
        "trainer_baseline": "baseline_bf16",
        "trainer_checkpointing": "auto",
        "eval_every": "2",
    }
    df = _run(training, machine, options, pattern="hybrid_trainer").recorder.frame()
    assert problems(df).empty, problems(df)["note"].tolist()
    status = df[df["metric"] == "status"]
    suffix = "dynamics_model=trend,confidence_threshold=0.01"
    for preset in ("off", "aggressive"):
        case = f"gpt2-tiny hybrid_trainer {preset} 4x64x1 {suffix}"
        assert (status["case"] == case).any(), sorted(status["case"])
        rows = df[df["case"] == case]
        config = _config(rows.iloc[0])
        assert config["trainer_config"]["predict"] is (preset != "off")
        assert config["trainer_config"]["dynamics_model"] == "trend"
        # auto: the recipe's planned blocks (the tiny model fits the 4 GiB budget: none).
        assert config["checkpoint_blocks"] == 0
        curve = df[df["case"] == f"{case} [curve]"]
        steps = sorted({_config(r)["step"] for _, r in curve.iterrows()})
        assert steps == [2, 4, 6]
        times = curve[curve["metric"] == "train_time_s"]["value"].tolist()
        assert times == sorted(times) and times[0] > 0
        no_bwd = rows[rows["metric"] == "steps_without_backward_pct"]["value"].item()
        # 6 steps are too few for the trend model's confidence: the Predict path has its own
        # tests (test_trainer*.py); here "off" must show none and its config say so.
        assert no_bwd == 0 if preset == "off" else 0 <= no_bwd <= 100
    trade = df[df["case"] == "gpt2-tiny hybrid_trainer trade-off 4x64x1"]
    assert set(trade["provider"]) == {"baseline_bf16", "off", "aggressive", "-"}
    base_val = df[(df["case"] == "gpt2-tiny baseline_bf16 4x64x1") & (df["metric"] == "val_loss")]
    for preset in ("off", "aggressive"):
        mine = trade[trade["provider"] == preset].set_index("metric")["value"]
        case = f"gpt2-tiny hybrid_trainer {preset} 4x64x1 {suffix}"
        val = df[(df["case"] == case) & (df["metric"] == "val_loss")]["value"].item()
        expected_gap = 100.0 * (val / base_val["value"].item() - 1.0)
        assert abs(mine["val_gap_pct"] - expected_gap) < 1e-9
        assert mine["tokens_per_s_vs_baseline"] > 0


@pytest.mark.parametrize(
    "options,match",
    [
        ({"trainer_presets": "balanced,reckless"}, "trainer_presets"),
        ({"trainer_overrides": "full_step:3"}, "full_step"),
        ({"trainer_overrides": "full_steps=3"}, "field:value"),
        ({"trainer_overrides": "full_steps:0"}, "full_steps"),
        ({"trainer_checkpointing": "some"}, "trainer_checkpointing"),
        ({"trainer_baseline": "baseline_fp8"}, "trainer_baseline"),
    ],
    ids=["preset", "field", "syntax", "value", "checkpointing", "baseline"],
)
def test_trainer_bad_options(training, machine, options, match):
    with pytest.raises(ValueError, match=match):
        _run(training, machine, options, pattern="hybrid_trainer")


def test_profile_training_runs_on_cpu(tmp_path, monkeypatch):
    # benchmarks/profile_training.py on a tiny model, torch references: every configuration
    # and every trainer phase gets its rows, the files are written.
    import csv

    from benchmarks.profile_training import main

    monkeypatch.setenv("HYBRID_TRITON_IMPL", "torch")
    out = tmp_path / "profile"
    args = ["--model", "gpt2-tiny", "--batch", "2", "--seq", "32", "--steps", "1"]
    assert main([*args, "--warmup", "1", "--out", str(out), "--device", "cpu"]) == 0
    steps = list(csv.DictReader((out / "steps.csv").read_text().splitlines()))
    phases = {(r["config"], r["phase"]) for r in steps}
    assert {("baseline_bf16", "full"), ("toolkit_memory", "full")} <= phases
    trainer = {p for c, p in phases if c == "trainer balanced"}
    assert {"warmup", "full", "predict:first", "correct:first"} <= trainer, trainer
    assert all(float(r["wall_ms_median"]) > 0 for r in steps)
    ops = list(csv.DictReader((out / "ops.csv").read_text().splitlines()))
    for config, phase in phases:
        mine = [r for r in ops if (r["config"], r["phase"]) == (config, phase)]
        assert 0 < len(mine) <= 25
        times = [float(r["self_us_per_step"]) for r in mine]
        assert times == sorted(times, reverse=True)
    assert "wall ms" in (out / "summary.md").read_text()


def test_recheck_trainer_peaks_on_the_h100_report():
    """The current planner against a committed H100 trainer run (offline, no GPU): every
    Full, Predict and Correct phase within 5% of its measured peak (Warmup rows of that run
    include allocations made before the trainer existed, see docs/trainer.md)."""
    from benchmarks.recheck_trainer_peaks import recheck

    table = recheck(SUITES.parent / "reports/training/2026-11-25_022911_nvidia-h100-80gb-hbm3")
    assert len(table) == 8
    checked = table[~table["case"].str.contains(r"\[warmup\]")]
    assert len(checked) == 6
    assert (checked["error_pct"].abs() <= 5.0).all(), checked


def test_trainer_with_injected_outlier_batches(training, machine, monkeypatch):
    monkeypatch.setenv("HYBRID_TRITON_IMPL", "torch")
    options = {
        "trainer_presets": "aggressive",
        "trainer_overrides": "dynamics_model:trend",
        "trainer_outlier_every": "3",
    }
    df = _run(training, machine, options, pattern="hybrid_trainer").recorder.frame()
    assert problems(df).empty, problems(df)["note"].tolist()
    case = "gpt2-tiny hybrid_trainer aggressive 4x64x1 dynamics_model=trend outliers/3"
    rows = df[df["case"] == case]
    assert not rows.empty, sorted(set(df["case"]))
    assert _config(rows.iloc[0])["outlier_every"] == 3
    x = torch.zeros(2, 5, dtype=torch.long)
    a = training.outlier_batch((x, x), 320, seed=7)
    b = training.outlier_batch((x, x), 320, seed=7)
    assert torch.equal(a[0], x) and torch.equal(a[1], b[1]) and a[1].max() > 0
    with pytest.raises(ValueError, match="trainer_outlier_every"):
        _run(training, machine, {**options, "trainer_outlier_every": "-1"}, "hybrid_trainer")
