"""Answers a user can act on: one phase for a plain loop, only buildable setups recommended
and how to build them, --gpu auto, bf16-less cards, host memory, exit codes, and clear
one-line errors (no traceback, nothing half-written) for bad files and absurd configs."""

from __future__ import annotations

import json
import os
import random
import sys
import time
import types

import pytest

from hybrid_triton.planner import TrainSetup, estimate, fit, preset, setup_preset
from hybrid_triton.planner.build import NOT_BUILDABLE, build_steps, is_buildable
from hybrid_triton.planner.cli import main
from hybrid_triton.planner.estimate import (
    MAX_LAYERS,
    direction_groups,
    merge_smallest_neighbours,
)
from hybrid_triton.planner.fit import GPUS, NO_BF16, gpu_info
from hybrid_triton.planner.setup import TRAINER_PHASES
from hybrid_triton.planner.specs import PlannerError, gpt2_spec, llama_spec

GiB = 1024**3


# --------------------------------------------------------------------------- phases


def test_a_plain_setup_is_one_train_phase():
    plain = estimate(preset("llama-1b"), setup_preset("bf16-autocast", seq_len=1024))
    assert list(plain.phases) == ["train"]
    trainer = estimate(preset("gpt2-small"), setup_preset("hybrid", seq_len=256))
    assert tuple(trainer.phases) == TRAINER_PHASES
    # the one phase holds what a plain loop's Full phase held
    full = estimate(preset("gpt2-small"), TrainSetup(seq_len=256, phases=("full",)))
    train = estimate(preset("gpt2-small"), TrainSetup(seq_len=256))
    assert train.phases["train"].peak_bytes == full.phases["full"].peak_bytes


def test_phase_plan_follows_trainer_on_replace_and_rejects_mixing():
    plain = TrainSetup(param_dtype="bf16", master_weights=True, grad_mode="flat")
    assert plain.phases == ("train",)
    assert plain.replace(trainer=True).phases == TRAINER_PHASES
    assert plain.replace(trainer=True).replace(trainer=False).phases == ("train",)
    named = TrainSetup(phases=("full", "predict"))
    assert named.replace(micro_batch=2).phases == ("full", "predict")  # named plans stay
    with pytest.raises(PlannerError, match="plain training loop's only phase"):
        TrainSetup(phases=("train", "predict"))
    with pytest.raises(PlannerError, match="plain training loop's only phase"):
        setup_preset("hybrid", phases=("train",))
    with pytest.raises(PlannerError, match="sequence of phase names"):
        TrainSetup(phases="train")


def test_trainer_flag_on_the_command_line(capsys):
    assert main(["gpt2-small", "--setup", "bf16-master", "--no-trainer", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["phase_peak_bytes"]) == {"train"}
    assert main(["gpt2-small", "--trainer", "--grad-mode", "flat", "--json"]) == 0
    assert tuple(json.loads(capsys.readouterr().out)["phase_peak_bytes"]) == TRAINER_PHASES
    assert main(["gpt2-small", "--fit", "--gpu", "rtx-4060", "--trainer", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["estimate"]["phase_peak_bytes"]) == set(
        TRAINER_PHASES
    )
    assert main(["gpt2-small", "--phases", "train,predict"]) == 2
    assert "only phase" in capsys.readouterr().err


# --------------------------------------------------------------------------- buildable


def test_not_buildable_today():
    pure8 = TrainSetup(param_dtype="bf16", state_bits=8)
    offload = TrainSetup(autocast="bf16", offload="cpu")
    gathered = TrainSetup(autocast="bf16", state_bits=8)  # FusedAdamW over .grad
    for setup in (pure8, offload, gathered):
        assert not is_buildable(setup)
        with pytest.raises(PlannerError, match="cannot be built today"):
            build_steps(preset("gpt2-small"), setup)
    for setup in (
        TrainSetup(autocast="bf16"),
        TrainSetup(param_dtype="bf16", state_bits=16),  # torch AdamW: bf16 moments
        TrainSetup(autocast="bf16", state_bits=8, grad_mode="flat"),
        setup_preset("hybrid"),
    ):
        assert is_buildable(setup), setup.describe()
    assert all(rule.reason for rule in NOT_BUILDABLE)


@pytest.mark.parametrize(
    "model, gpu", [("gpt2-small", "rtx-4060"), ("llama-1b", "rtx-4090"), ("gpt2-medium", "t4")]
)
def test_fit_recommends_only_buildable_setups(model, gpu):
    result = fit(preset(model), gpu)
    assert result.fits
    for cand in [result.best, *result.alternatives]:
        assert is_buildable(cand.setup), cand.setup.describe()
    assert result.build and result.build == build_steps(result.spec, result.best.setup)


def test_fit_plans_a_plain_loop_unless_asked_for_the_trainer():
    plain = fit(preset("gpt2-small"), "rtx-4060")
    assert not plain.best.setup.trainer and list(plain.best.estimate.phases) == ["train"]
    trainer = fit(preset("gpt2-small"), "rtx-4060", trainer=True)
    masters = [c for c in [trainer.best, *trainer.alternatives] if c.setup.master_weights]
    assert masters and all(tuple(c.estimate.phases) == TRAINER_PHASES for c in masters)


def test_build_steps_name_the_calls():
    spec = preset("gpt2-small")
    master = setup_preset("hybrid", trainer=False, grad_mode="flat", allocator="expandable")
    text = "\n".join(build_steps(spec, master))
    for call in (
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
        "FlatArena.from_module(model)",
        "FusedAdamW(arena, lr=..., state_bits=8",
        "opt.attach_flat_grads()",
        "model.gradient_checkpointing_enable()",
        "model.to(torch.bfloat16)",
    ):
        assert call in text, call
    hook = "\n".join(build_steps(spec, master.replace(grad_mode="hook", accum_steps=4)))
    assert "GradAccumulator(arena, num_micro_batches=4" in hook
    plain = "\n".join(build_steps(spec, TrainSetup(autocast="bf16")))
    assert "torch.optim.AdamW(model.parameters(), lr=..., fused=True)" in plain
    assert "PYTORCH_CUDA_ALLOC_CONF" not in plain and "checkpoint" not in plain
    trainer = "\n".join(build_steps(spec, setup_preset("hybrid")))
    assert "HybridTrainer(model" in trainer and "attach_flat_grads()`" not in trainer


def test_fit_answer_prints_how_to_build(capsys):
    rc = main(["gpt2-small", "--fit", "--gpu", "rtx-4060"])
    out = capsys.readouterr().out
    assert rc == 0 and "How to build it:" in out
    assert "1. `export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`" in out


# --------------------------------------------------------------------------- GPUs, bf16


def test_gpu_auto_without_cuda_is_a_clear_error(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["gpt2-small", "--fit", "--gpu", "auto"])
    err = capsys.readouterr().err
    assert rc == 2 and "no CUDA device" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_gpu_auto_reads_the_local_card(monkeypatch):
    import torch

    props = types.SimpleNamespace(name="NVIDIA Tesla T4", total_memory=15 * GiB, major=7)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    card = gpu_info("auto")
    assert card.label.startswith("NVIDIA Tesla T4") and card.capacity_bytes == 15 * GiB
    assert card.bf16 is False
    result = fit(preset("gpt2-small"), "auto")
    assert result.capacity_bytes == 15 * GiB and result.best.setup.compute_dtype != "bf16"


def test_cards_without_bf16_get_fp16_or_fp32():
    assert {"t4", "v100-16gb", "v100-32gb", "rtx-2080-ti"} <= NO_BF16 <= set(GPUS)
    assert "a100-80gb" not in NO_BF16 and "rtx-3090" not in NO_BF16
    for gpu in ("t4", "v100-16gb"):
        result = fit(preset("gpt2-small"), gpu)
        assert result.bf16 is False and result.fits
        for cand in [result.best, *result.alternatives]:
            s = cand.setup
            assert "bf16" not in (s.param_dtype, s.compute_dtype), s.describe()
        assert any("no bf16" in r for r in result.reasons)
    fp16 = fit(preset("gpt2-small"), "t4").best.setup
    if fp16.autocast == "fp16":
        assert any("GradScaler" in step for step in build_steps(preset("gpt2-small"), fp16))


def test_list_marks_the_cards_without_bf16(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "  t4: 15.00 (no bf16)" in out and "  rtx-4090: 24.00\n" in out


def test_a_size_in_gib_says_what_it_assumes_about_bf16():
    result = fit(preset("gpt2-small"), 16)
    assert result.bf16 is None
    assert any(r.startswith("bf16: assumed supported") for r in result.reasons)
    named = fit(preset("gpt2-small"), "rtx-4080")
    assert named.bf16 is True and not any("assumed" in r for r in named.reasons)


def test_estimate_warns_about_bf16_on_a_card_without_it(capsys):
    rc = main(["gpt2-small", "--batch", "1", "--seq-len", "128", "--gpu", "t4"])
    out = capsys.readouterr().out
    assert rc == 0 and "t4 has no bf16" in out


# --------------------------------------------------------------------------- host memory


def test_host_memory_of_offloaded_state(capsys):
    spec = preset("gpt2-small")
    on_gpu = estimate(spec, TrainSetup(autocast="bf16", seq_len=128))
    off = estimate(spec, TrainSetup(autocast="bf16", seq_len=128, offload="cpu"))
    assert on_gpu.host_bytes == 0
    # two fp32 moments per parameter, now in host memory instead of on the device
    assert off.host_bytes == 8 * spec.num_params
    assert on_gpu.components["optimizer_state"] - off.components["optimizer_state"] >= (
        8 * spec.num_params
    )
    flat8 = TrainSetup(
        param_dtype="bf16", master_weights=True, grad_mode="flat", state_bits=8, offload="cpu"
    )
    P = spec.num_params
    assert estimate(spec, flat8.replace(seq_len=128)).host_bytes == 2 * (P + 4 * -(-P // 256))
    assert json.loads(json.dumps(off.to_dict()))["host_bytes"] == off.host_bytes
    rc = main(["gpt2-small", "--offload", "cpu", "--batch", "1", "--seq-len", "128"])
    out = capsys.readouterr().out
    assert rc == 0 and f"host memory: {off.host_bytes / GiB:.3f} GiB" in out
    assert "cannot be built today" in out


# --------------------------------------------------------------------------- exit codes


def test_plan_with_gpu_exits_one_when_it_does_not_fit(capsys):
    fits = main(["gpt2-small", "--batch", "1", "--seq-len", "128", "--gpu", "24"])
    assert fits == 0 and "24 GiB: fits" in capsys.readouterr().out
    too_small = main(["gpt2-small", "--batch", "8", "--seq-len", "1024", "--gpu", "2"])
    assert too_small == 1 and "does NOT fit" in capsys.readouterr().out
    json_too_small = main(
        ["gpt2-small", "--batch", "8", "--seq-len", "1024", "--gpu", "2", "--json"]
    )
    assert json_too_small == 1
    json.loads(capsys.readouterr().out)  # the JSON alone on stdout
    ranks = main(
        ["gpt2-medium", "--setup", "bf16-master", "--batch", "8", "--gpus", "2", "--gpu", "4"]
    )
    assert ranks == 1 and "per rank: does NOT fit" in capsys.readouterr().out
    assert main(["gpt2-small", "--gpu", "nope"]) == 2


# --------------------------------------------------------------------------- bad input


def _one_line_error(capsys, rc: int, needle: str) -> None:
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert needle in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err


def test_non_utf8_config_is_a_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_bytes(b'\xff\xfe{"model_type": "llama"}')
    _one_line_error(capsys, main([str(cfg)]), "not a UTF-8 text file")


def test_unwritable_chart_path_fails_before_anything(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "plan.png"
    _one_line_error(capsys, main(["gpt2-tiny", "--chart", str(missing)]), "does not exist")
    _one_line_error(capsys, main(["gpt2-tiny", "--chart", str(tmp_path)]), "is a folder")
    if os.name == "posix" and os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            rc = main(
                ["gpt2-tiny", "--batch", "1", "--seq-len", "64", "--chart", str(locked / "x.png")]
            )
            _one_line_error(capsys, rc, "not writable")
            assert list(locked.iterdir()) == []
        finally:
            locked.chmod(0o700)


def test_chart_is_written_whole(tmp_path, capsys):
    chart = tmp_path / "plan.png"
    assert main(["gpt2-tiny", "--batch", "1", "--seq-len", "64", "--chart", str(chart)]) == 0
    assert chart.read_bytes().startswith(b"\x89PNG") and os.listdir(tmp_path) == ["plan.png"]


def test_report_of_a_csv_without_the_columns_is_a_one_line_error(tmp_path, capsys):
    from hybrid_triton.bench.report import main as report_main

    wrong = tmp_path / "results.csv"
    wrong.write_text("a,b\n1,2\n")
    _one_line_error(capsys, report_main([str(wrong)]), "missing columns")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00,a\n")
    _one_line_error(capsys, report_main([str(binary)]), "not a UTF-8 text file")
    out = tmp_path / "compare.md"
    _one_line_error(
        capsys, report_main(["--compare", str(wrong), str(wrong), "--out", str(out)]), "missing"
    )
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["binary.csv", "results.csv"]


def test_absurd_configs_are_refused_fast(capsys):
    start = time.perf_counter()
    with pytest.raises(PlannerError, match="layers is more than the planner's bound"):
        estimate(
            llama_spec("huge", 10_000, 400_000, 8, 8, 1_000_000, 32000), TrainSetup(seq_len=64)
        )
    with pytest.raises(PlannerError, match="parameters is more than the planner's bound"):
        estimate(gpt2_spec("wide", 48, 400_000, 50), TrainSetup(seq_len=64))
    assert time.perf_counter() - start < 2.0
    cfg = dict(
        model_type="llama", num_hidden_layers=10_000, hidden_size=400_000,
        num_attention_heads=8, intermediate_size=1_000_000, vocab_size=32000,
        max_position_embeddings=4096,
    )  # fmt: skip
    from hybrid_triton.planner.specs import spec_from_hf_config

    spec = spec_from_hf_config(cfg)
    with pytest.raises(PlannerError, match="bound"):
        fit(spec, 80)


def test_the_deepest_allowed_model_is_planned_not_stuck():
    """A guard against quadratic work in depth (minutes at 1,024 layers before the segment
    merge was fixed), not a timing: the bound is ten times what a loaded 2-core CI machine
    takes; the planner's speed is reported in docs/planner.md."""
    spec = llama_spec("deep", MAX_LAYERS, 256, 4, 4, 1024, 2048)
    for setup in (
        TrainSetup(seq_len=64, autocast="bf16", checkpointing=True),
        setup_preset("hybrid", seq_len=64),  # the trainer: four phases, segment groups
    ):
        start = time.perf_counter()
        estimate(spec, setup)
        assert time.perf_counter() - start < 30.0, setup.describe()


# --------------------------------------------------------------------------- segment groups


def _merge_by_rescan(sizes: list[int], max_groups: int) -> list[int]:
    """The trainer's merge as written (segment_groups): rescan after every merge."""
    sizes = list(sizes)
    while len(sizes) > max_groups:
        j = min(range(len(sizes) - 1), key=lambda i: sizes[i] + sizes[i + 1])
        sizes[j : j + 2] = [sizes[j] + sizes[j + 1]]
    return sizes


def test_merge_matches_the_rescan_on_random_and_tied_sizes():
    rng = random.Random(0)
    for trial in range(600):
        n, m = rng.randint(0, 60), rng.randint(1, 20)
        pool = [0, 1, 2, 3, 5, 8] if trial % 2 else range(1, 10_000)
        sizes = [rng.choice(pool) for _ in range(n)]
        assert merge_smallest_neighbours(sizes, m) == _merge_by_rescan(sizes, m), (sizes, m)


@pytest.mark.parametrize(
    "spec",
    [
        preset("gpt2-small"),
        preset("llama-1b"),
        gpt2_spec("gpt2-odd", 37, 96, 4, 1001, 128),
        llama_spec("llama-odd", 53, 128, 4, 2, 352, 999, 128, tied_embeddings=True),
    ],
    ids=lambda s: s.name,
)
@pytest.mark.parametrize("max_groups", [1, 5, 16])
def test_direction_groups_equal_the_rescan(spec, max_groups, monkeypatch):
    est_mod = sys.modules["hybrid_triton.planner.estimate"]  # the package exports estimate()
    fast = direction_groups(spec, max_groups)
    monkeypatch.setattr(est_mod, "merge_smallest_neighbours", _merge_by_rescan)
    assert fast == direction_groups(spec, max_groups)
    assert sum(fast) == spec.num_params and len(fast) <= max_groups


def test_direction_groups_scale_to_deep_models():
    spec = llama_spec("deep", MAX_LAYERS, 64, 2, 2, 128, 256, 64)
    start = time.perf_counter()
    groups = direction_groups(spec)
    assert time.perf_counter() - start < 0.5 and len(groups) == 16


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
