"""Planner output: the table, JSON for tools, the PNG chart, and the ``hybrid-triton plan`` CLI."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest

from hybrid_triton.cli import main as top_main
from hybrid_triton.planner import TrainSetup, estimate, fit, preset
from hybrid_triton.planner.cli import main
from hybrid_triton.planner.report import format_estimate, plot_estimate, to_json

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_table_lists_components_phases_and_peak():
    est = estimate(preset("gpt2-small"), TrainSetup(autocast="bf16", micro_batch=2, seq_len=512))
    table = format_estimate(est)
    for text in (
        "train",  # a plain loop: one phase
        "weights",
        "optimizer state",
        "activations",
        "logits and loss",
        "peak allocated",
        "CUDA context",
        "peak at backward: cross-entropy",
    ):
        assert text in table, text
    assert f"{est.peak_bytes / 1024**3:.3f}" in table


def test_chart_is_a_valid_png(tmp_path):
    est = estimate(preset("gpt2-small"), TrainSetup(micro_batch=1, seq_len=128))
    path = plot_estimate(
        est, tmp_path / "plan.png", capacity_bytes=8 * 1024**3, usable_bytes=7 * 1024**3
    )
    with open(path, "rb") as fh:
        data = fh.read()
    assert data.startswith(PNG_SIGNATURE)
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_estimate_json_via_cli(capsys):
    rc = main(["gpt2-small", "--setup", "hybrid", "--batch", "2", "--seq-len", "256", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "gpt2-small" and data["setup"]["state_bits"] == 8
    assert data["setup"]["micro_batch"] == 2 and data["setup"]["checkpointing"] is True
    assert set(data["phase_peak_bytes"]) == {"warmup", "full", "predict", "correct"}
    assert data["peak_bytes"] == max(data["phase_peak_bytes"].values())
    direct = estimate(
        preset("gpt2-small"),
        TrainSetup(
            param_dtype="bf16",
            master_weights=True,
            grad_mode="flat",  # the trainer's path for one micro-batch per step
            trainer=True,
            state_bits=8,
            checkpointing=True,
            micro_batch=2,
            seq_len=256,
        ),
    )
    assert data == json.loads(to_json(direct))


def test_fit_via_top_level_cli_with_chart(tmp_path, capsys):
    chart = tmp_path / "fit.png"
    rc = top_main(["plan", "gpt2-medium", "--fit", "--gpu", "rtx-4080", "--chart", str(chart)])
    out = capsys.readouterr().out
    assert rc == 0 and "gpt2-medium: FITS" in out and "- Best throughput proxy" in out
    assert chart.read_bytes().startswith(PNG_SIGNATURE)


def test_fit_json_and_nothing_fits_exit_code(capsys):
    rc = main(["llama-7b", "--fit", "--gpu", "16", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 1 and data["fits"] is False
    assert any("Nothing fits" in r for r in data["reasons"])
    assert data == json.loads(to_json(fit(preset("llama-7b"), 16)))


def test_hf_config_and_gpu_check(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            dict(
                model_type="gpt2", n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=256
            )
        )
    )
    assert main([str(cfg), "--batch", "4", "--seq-len", "128", "--gpu", "8"]) == 0
    out = capsys.readouterr().out
    assert "8 GiB: fits" in out


def test_traced_via_cli(capsys):
    rc = main(["gpt2-tiny", "--traced", "--batch", "1", "--seq-len", "32", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["traced"]["peak_bytes"] > data["traced"]["param_bytes"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["gpt2-smal"], "did you mean 'gpt2-small'"),
        (["gpt2-small", "--batch", "0"], "micro_batch must be a positive integer"),
        (["gpt2-small", "--gpu", "-4"], "positive number of GiB"),
        (["gpt2-small", "--gpu", "h10"], "h100-80gb"),
        (["gpt2-small", "--setup", "hybird"], "hybrid"),
        (["gpt2-small", "--fit"], "--fit needs --gpu"),
        (["gpt2-small", "--margin", "1.5"], "margin"),
        (["gpt2-small", "--phases", "full,predcit"], "predict"),
        ([], "give a model"),
        (["--module", "nowhere"], "package.module:factory"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_cli_errors_are_clear(argv, message, capsys):
    assert main(argv) == 2
    assert message.lower() in capsys.readouterr().err.lower()


def test_list(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "llama-13b" in out and "hybrid" in out and "h200" in out


def test_loss_chunk_tokens_flag_reaches_the_predict_estimate(capsys):
    def predict_peak(*extra: str) -> int:
        assert main(["gpt2-small", "--setup", "hybrid", "--batch", "8", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["phase_peak_bytes"]["predict"]

    chunked, full = predict_peak(), predict_peak("--loss-chunk-tokens", "0")
    assert full > chunked  # the full [N, V] logits instead of one chunk's
    assert main(["gpt2-small", "--loss-chunk-tokens", "-1"]) == 2
    assert "loss_chunk_tokens" in capsys.readouterr().err


def test_allocator_flag_reaches_the_table_and_json(capsys):
    argv = ["gpt2-small", "--setup", "bf16-autocast", "--batch", "2", "--seq-len", "256"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "allocator: native (PyTorch's default caching allocator)" in table
    assert "+ fragmentation allowance" in table and "= reserved peak" in table
    assert main([*argv, "--allocator", "expandable"]) == 0
    table = capsys.readouterr().out
    assert "allocator: expandable (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)" in table
    assert "+ 20 MiB page slack" in table and "fragmentation" not in table
    data = {}
    for allocator in ("native", "expandable"):
        assert main([*argv, "--allocator", allocator, "--json"]) == 0
        data[allocator] = json.loads(capsys.readouterr().out)
        assert data[allocator]["allocator"] == data[allocator]["setup"]["allocator"] == allocator
    assert data["native"]["peak_bytes"] == data["expandable"]["peak_bytes"]
    assert data["native"]["reserved_peak_bytes"] > data["expandable"]["reserved_peak_bytes"]


def test_unknown_allocator_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["gpt2-small", "--allocator", "foo"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--allocator: invalid choice: 'foo'" in err
    assert "native" in err and "expandable" in err


def test_fit_allocator_flag(capsys):
    assert main(["gpt2-small", "--fit", "--gpu", "rtx-4060"]) == 0
    out = capsys.readouterr().out
    assert "- expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True): on" in out
    assert main(["gpt2-small", "--fit", "--gpu", "rtx-4060", "--allocator", "native"]) == 0
    out = capsys.readouterr().out
    assert "- expandable segments" not in out and "allocator: native" in out
    assert main(["gpt2-small", "--fit", "--gpu", "rtx-4060", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["allocator"] == "expandable"
