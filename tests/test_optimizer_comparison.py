"""benchmarks/optimizer_comparison.py --quick on CPU: the report it writes, the state bytes it
measures, and the fairness of the comparison (same init and batches: fp32-state runs agree).

The optimizers' kernels are tested in test_adamw.py / test_optim.py; here the torch reference
path is forced (HYBRID_TRITON_IMPL=torch) to keep the run short under the interpreter."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from hybrid_triton.bench.results import read_csv

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def _load_suite():
    spec = importlib.util.spec_from_file_location(
        "optimizer_comparison", ROOT / "benchmarks" / "optimizer_comparison.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite():
    return _load_suite()


@pytest.fixture(scope="module")
def report(suite, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("HYBRID_TRITON_IMPL", "torch")
    try:
        out = tmp_path_factory.mktemp("optim")
        code = suite.main(["--out", str(out), "--quick", "--steps", str(STEPS)])
    finally:
        mp.undo()
    assert code == 0
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1 and not runs[0].name.startswith("_tmp"), runs
    return runs[0]


def test_report_files(report):
    assert {"results.csv", "table.md", "loss_curves.png"} <= {p.name for p in report.iterdir()}
    assert (report / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (report / "table.md").read_text()
    assert table.splitlines()[2].startswith("Machine: ")
    assert "## Targets" in table and "hybrid_8 optimizer state" in table


def test_results_long_format(suite, report):
    df = read_csv(report / "results.csv")
    assert set(df["suite"]) == {"optim"}
    status = df[df["metric"] == "status"].set_index("provider")["note"]
    for name in ("torch_adamw", "hybrid_32", "hybrid_8", "hybrid_4"):
        assert status[name] == "ok", status[name]
    bnb = status["bnb_8bit"]
    assert bnb == "ok" if suite.bnb_available() is None else bnb.startswith("skipped"), bnb

    def value(provider: str, metric: str) -> float:
        rows = df[(df["provider"] == provider) & (df["metric"] == metric)]
        assert len(rows) == 1, (provider, metric, rows)
        return float(rows["value"].iloc[0])

    curve = df[df["case"].str.endswith(" curve")]
    for name in ("torch_adamw", "hybrid_32", "hybrid_8", "hybrid_4"):
        losses = curve[curve["provider"] == name]["value"].tolist()
        assert len(losses) == STEPS
        tail = losses[-suite.FINAL_WINDOW :]
        assert value(name, "final_train_loss") == pytest.approx(sum(tail) / len(tail), rel=1e-5)
        assert value(name, "val_loss") > 0 and value(name, "step_time_ms") > 0
        assert value(name, "optimizer_step_ms") < value(name, "step_time_ms")
    # State bytes per parameter, measured from the optimizers' tensors: fp32 moments are 8 B
    # (plus step counters and the arena's alignment gaps), 8-bit 2 B plus one fp32 scale per
    # 256 per moment, 4-bit 1 B plus one per 128.
    assert value("torch_adamw", "state_bytes_per_param") == pytest.approx(8.0, rel=2e-3)
    assert value("hybrid_32", "state_bytes_per_param") == pytest.approx(8.0, rel=2e-2)
    assert 2.0 < value("hybrid_8", "state_bytes_per_param") <= suite.STATE_TARGET
    assert 1.0 < value("hybrid_4", "state_bytes_per_param") < 1.1
    # Same init, same batches: the two fp32-state optimizers follow the same curve.
    torch_curve = curve[curve["provider"] == "torch_adamw"]["value"].to_numpy()
    ours = curve[curve["provider"] == "hybrid_32"]["value"].to_numpy()
    assert abs(ours - torch_curve).max() < 1e-3, (ours, torch_curve)
    assert ours[-1] < ours[0], "the model learns"


def test_bad_provider(suite, tmp_path):
    with pytest.raises(ValueError, match="unknown provider"):
        suite.run(tmp_path, quick=True, providers=["adam9000"])
    with pytest.raises(ValueError, match="steps"):
        suite.run(tmp_path, quick=True, steps=1)
    assert not any(tmp_path.iterdir()), "nothing written on bad input"
