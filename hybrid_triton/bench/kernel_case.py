"""The contract between kernel families and the ``kernels`` benchmark suite.

Each kernel family has a module ``benchmarks/kernels_<family>.py`` with a function
``cases(quick: bool) -> list[KernelCase]``. The suite measures the copy bandwidth at the same
size in the same run, then for every case calls ``setup()`` (which allocates the inputs, so
only one case's tensors are alive at a time), runs ``check`` (accuracy first: it raises on a
mismatch), and times every provider (median of repeats), reporting GB/s from
``bytes_moved`` and the percentage of the measured copy rate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class CaseRun:
    """What ``KernelCase.setup()`` returns: zero-argument callables that each do the whole job.

    ``providers`` maps a provider name to its callable. Use these names where they apply:
    ``hybrid_triton`` (ours, required), ``torch_eager``, ``torch_compile``, ``torch_foreach``,
    ``torch_fused``, ``torch_cuda_graph``, ``bitsandbytes``, ``torchao``.
    ``check`` compares ours against the reference and raises AssertionError on a mismatch.
    """

    providers: dict[str, Callable[[], object]]
    check: Callable[[], None] | None = None


@dataclass
class KernelCase:
    family: str  # "mixed_precision", "accumulate", "adamw", "quantize", "rssm", ...
    name: str  # e.g. "cast_scale fp32->bf16"
    size_label: str  # e.g. "2^28" or "gpt2-small (148 tensors)"
    numel: int  # elements of the main operand (the copy ceiling is measured at this size)
    bytes_moved: int  # fewest bytes one pass must read + write (0 for latency-bound cases)
    setup: Callable[[], CaseRun]
    config: dict = field(default_factory=dict)  # free-form, recorded in results.csv
    metric: str = "bandwidth"  # "bandwidth" (GB/s against the copy ceiling) or "latency"
