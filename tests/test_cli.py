"""The console script's own flags, and the planner CLI on Hugging Face configs and modules."""

from __future__ import annotations

import json
import sys
import types

import pytest

from hybrid_triton.cli import main as top_main


def test_version_flag(capsys):
    from hybrid_triton import __version__

    assert top_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hybrid-triton {__version__}"


_TINY_GEMMA2 = dict(
    model_type="gemma2",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
    max_position_embeddings=256,
)


def test_plan_traced_config_json(tmp_path, capsys):
    pytest.importorskip("transformers")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_TINY_GEMMA2))
    argv = ["plan", str(path), "--traced", "--batch", "2", "--seq-len", "32", "--json"]
    assert top_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["traced"]["peak_bytes"] > 0
    # bf16 autocast: flash, one call per layer; two steps are traced, as the preset's loop
    # holds the logits through the step (logits_lifetime "step")
    assert out["traced"]["attention"] == {"flash": 4}


def test_plan_traced_hf_module(monkeypatch, capsys):
    pytest.importorskip("transformers")
    from hybrid_triton.planner.hf import hf_config, meta_model

    factory = types.ModuleType("_hf_factory")
    factory.build = lambda: meta_model(hf_config(_TINY_GEMMA2))
    monkeypatch.setitem(sys.modules, "_hf_factory", factory)
    argv = ["plan", "--module", "_hf_factory:build", "--traced", "--batch", "2", "--seq-len", "32"]
    assert top_main(argv) == 0
    assert "flash" in capsys.readouterr().out
