"""Importing touches no device; the dispatch rule of DESIGN.md picks each path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hybrid_triton.kernels import _dispatch
from hybrid_triton.kernels._dispatch import impl_for_device, use_triton


def test_import_touches_no_device_and_compiles_nothing():
    code = (
        "import sys, torch\n"
        "import hybrid_triton, hybrid_triton.kernels, hybrid_triton.arena, hybrid_triton.cli\n"
        "assert not torch.cuda.is_initialized(), 'CUDA was initialized by import'\n"
        "assert 'triton' not in sys.modules, 'triton was imported eagerly'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_top_level_names_are_lazy():
    code = (
        "import sys, torch\n"
        "import hybrid_triton\n"
        "from hybrid_triton import FusedAdamW, FlatArena, TrainerConfig, DynamicLossScaler\n"
        "assert 'triton' not in sys.modules, 'triton was imported by a top-level name'\n"
        "assert 'hybrid_triton.trainer' not in sys.modules, 'the trainer was imported eagerly'\n"
        "from hybrid_triton import GradAccumulator, HybridTrainer, StateOffloader\n"
        "assert all(getattr(hybrid_triton, n) is not None for n in hybrid_triton.__all__)\n"
        "assert not torch.cuda.is_initialized(), 'CUDA was initialized by import'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize(
    ("forced", "interp", "device_type", "expected"),
    [
        ("", "", "cuda", "triton"),
        ("", "1", "cpu", "triton-interpreter"),
        ("", "", "cpu", "torch"),
        ("torch", "", "cuda", "torch"),
        ("torch", "1", "cpu", "torch"),
        ("triton", "1", "cpu", "triton-interpreter"),
        ("triton", "", "cuda", "triton"),
    ],
    ids=lambda v: v or "unset",
)
def test_dispatch_rule(monkeypatch, forced, interp, device_type, expected):
    monkeypatch.setenv("HYBRID_TRITON_IMPL", forced)
    monkeypatch.setenv("TRITON_INTERPRET", interp)
    assert impl_for_device(device_type) == expected


def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HYBRID_TRITON_IMPL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton(torch.zeros(1))


def test_unknown_impl_value_is_rejected(monkeypatch):
    monkeypatch.setenv("HYBRID_TRITON_IMPL", "cuda")
    with pytest.raises(ValueError, match="HYBRID_TRITON_IMPL"):
        _dispatch.requested_impl()


def test_env_module_prints_versions_and_paths():
    out = subprocess.run(
        [sys.executable, "-m", "hybrid_triton.env"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "cast_scale" in out.stdout


def test_cli_unknown_command_suggests(capsys):
    from hybrid_triton.cli import main

    assert main(["pln"]) == 2
    assert "did you mean 'plan'" in capsys.readouterr().err
