"""VRAM-budget planner: per-phase, per-component estimates and what fits a GPU.

    from hybrid_triton.planner import preset, TrainSetup, estimate, fit

    est = estimate(preset("gpt2-small"), TrainSetup(autocast="bf16", micro_batch=8))
    est.phase_peak_bytes["full"]          # allocated peak of a Full phase, bytes
    fit(preset("gpt2-medium"), "rtx-4080").reasons

See docs/planner.md. Importing this package touches no device.
"""

from hybrid_triton.planner.build import build_steps, is_buildable, why_not_buildable
from hybrid_triton.planner.distributed import (
    ParallelSetup,
    RankEstimate,
    estimate_per_rank,
    format_rank_estimate,
)
from hybrid_triton.planner.estimate import Estimate, PhaseEstimate, estimate
from hybrid_triton.planner.fit import (
    GPUS,
    NO_BF16,
    FitResult,
    GpuInfo,
    fit,
    gpu_capacity_bytes,
    gpu_info,
)
from hybrid_triton.planner.setup import SETUP_PRESETS, TrainSetup, setup_preset
from hybrid_triton.planner.specs import (
    PRESET_NAMES,
    ModelSpec,
    ParamTensor,
    PlannerError,
    preset,
    spec_from_hf_config,
    spec_from_module,
)

__all__ = [
    "GPUS",
    "NO_BF16",
    "PRESET_NAMES",
    "SETUP_PRESETS",
    "Estimate",
    "FitResult",
    "GpuInfo",
    "ModelSpec",
    "ParallelSetup",
    "ParamTensor",
    "PhaseEstimate",
    "PlannerError",
    "RankEstimate",
    "TrainSetup",
    "build_steps",
    "estimate",
    "estimate_per_rank",
    "fit",
    "format_rank_estimate",
    "gpu_capacity_bytes",
    "gpu_info",
    "is_buildable",
    "preset",
    "setup_preset",
    "spec_from_hf_config",
    "spec_from_module",
    "why_not_buildable",
]


def __getattr__(name: str):
    # traced mode imports torch's fake-tensor machinery: load it on first use only
    if name in ("trace_step", "TraceResult"):
        from hybrid_triton.planner import traced

        return getattr(traced, name)
    raise AttributeError(f"module 'hybrid_triton.planner' has no attribute {name!r}")
