"""Per-rank VRAM estimates for N GPUs with DDP or FSDP2, built on the single-GPU estimate.

    from hybrid_triton.planner import preset, setup_preset
    from hybrid_triton.planner.distributed import estimate_per_rank

    est = estimate_per_rank(preset("gpt2-medium"), setup_preset("bf16-master", micro_batch=8),
                            gpus=2, shard="fsdp")
    est.peak_bytes                        # one rank's allocated peak, bytes
    est.phases["full"].components         # what is alive at that peak, per component

``setup.micro_batch`` is the micro-batch of one rank (the global batch is ``gpus`` times it).
The single-GPU replay (:func:`~hybrid_triton.planner.estimate.estimate`) gives every phase's
peak and what is alive there at that per-rank batch; this module then changes what sharding
changes, component by component:

What sharding divides (FSDP, ``shard="fsdp"``): the parameters each rank keeps between uses
(each tensor's dim-0 shard; FSDP pads it to whole rows, which this count ignores: at most
``gpus - 1`` rows per tensor), the fp32 master weights, the gradient accumulator or the
sharded ``.grad``, the optimizer state and the Predict update direction: each is multiplied by
``sharded / total`` elements.

What it does not divide: activations, logits and loss, autocast weight copies, temporaries,
the cuBLAS workspace, the input batch (per rank already). And what it adds:

- ``allgather_buffers``: the unsharded parameters in flight, in the parameter dtype (the
  ``fully_shard`` default; a ``MixedPrecisionPolicy`` would gather in its own dtype): the root
  unit (everything outside the transformer blocks: embeddings, final norm, head; FSDP2 does
  not reshard the root after forward) plus ``1 + prefetch`` of the largest block (the block
  being computed and the one prefetched). Units are one ``fully_shard`` per transformer block
  plus the root, the standard recipe (and what ``benchmarks/multi_gpu.py`` does).
- ``reduce_scatter_buffers`` (backward phases): the root unit's unsharded gradient (its
  embedding gradient is produced by the head early in backward and completed by the
  embedding at the end, so it is alive through the whole backward) plus, for the largest
  block, its unsharded gradient and the reduce-scatter input FSDP copies it into.

DDP (``shard="ddp"``): every rank holds everything of the single-GPU estimate. With
``grad_mode="full"`` DDP adds its gradient buckets: storage for every gradient, in buckets of
at most ``bucket_cap_mb`` (25 MiB by default), allocated when the model is wrapped; with
``gradient_as_bucket_view=True`` the ``.grad`` tensors are views into the buckets, so the
buckets replace the gradients instead of adding to them (PyTorch's DDP documentation:
"the saved memory size will be equal to the total gradients size"). With ``grad_mode="hook"``
(the toolkit's replicated recipe: a plain module, the flat fp32 accumulator all-reduced in
place) nothing is added; a DDP-wrapped module would still allocate its buckets.

Not counted: NCCL's own buffers and streams (outside PyTorch's caching allocator, like the
CUDA context). The reserved figure adds the same allocator slack as the single-GPU estimate
(``setup.allocator``: native segment rounding + fragmentation allowance, or expandable-segment
pages), with the all-gathered units counted among the transient blocks that size the native
allowance; fragmentation the collectives cause beyond that is not modelled. These per-rank
figures are a model; ``benchmarks/multi_gpu.py`` measures each rank's peak against them on
two GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hybrid_triton.planner.estimate import (
    COMPONENTS,
    CUDA_CONTEXT,
    Estimate,
    GiB,
    MiB,
    PhaseEstimate,
    PhasePeaks,
    _round,
    estimate,
)
from hybrid_triton.planner.report import COMPONENT_LABELS
from hybrid_triton.planner.setup import DTYPE_BYTES, TrainSetup
from hybrid_triton.planner.specs import ModelSpec, PlannerError

SHARD_MODES = ("ddp", "fsdp")
DDP_BUCKET_CAP_MB = 25
# Components whose bytes each rank holds only its shard of under FSDP.
SHARDED_COMPONENTS = (
    "weights",
    "master_weights",
    "gradients",
    "optimizer_state",
    "update_direction",
)
COMM_COMPONENTS = ("allgather_buffers", "reduce_scatter_buffers", "ddp_buckets")
RANK_COMPONENTS = COMPONENTS + COMM_COMPONENTS


@dataclass(frozen=True)
class ParallelSetup:
    """How the model is spread over GPUs.

    - ``gpus``: ranks (one GPU each).
    - ``shard``: "ddp" (replicated) or "fsdp" (FSDP2 ``fully_shard`` per block and the root).
    - ``prefetch``: FSDP units all-gathered ahead of the one computing (FSDP2's backward
      prefetches one by default).
    - ``bucket_cap_mb``, ``gradient_as_bucket_view``: DDP's options of the same names.
    """

    gpus: int
    shard: str = "fsdp"
    prefetch: int = 1
    bucket_cap_mb: float = DDP_BUCKET_CAP_MB
    gradient_as_bucket_view: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 1:
            raise PlannerError(f"gpus must be a positive integer, got {self.gpus!r}")
        if self.shard not in SHARD_MODES:
            raise PlannerError(f"shard must be one of {SHARD_MODES}, got {self.shard!r}")
        if (
            isinstance(self.prefetch, bool)
            or not isinstance(self.prefetch, int)
            or (self.prefetch < 0)
        ):
            raise PlannerError(f"prefetch must be an int >= 0, got {self.prefetch!r}")
        if not self.bucket_cap_mb > 0:
            raise PlannerError(f"bucket_cap_mb must be > 0, got {self.bucket_cap_mb!r}")

    def to_dict(self) -> dict:
        return dict(
            gpus=self.gpus,
            shard=self.shard,
            prefetch=self.prefetch,
            bucket_cap_mb=self.bucket_cap_mb,
            gradient_as_bucket_view=self.gradient_as_bucket_view,
        )


@dataclass
class RankEstimate(PhasePeaks):
    """One rank's estimate. ``phases[name]`` is a :class:`PhaseEstimate` whose components
    may include ``allgather_buffers``, ``reduce_scatter_buffers`` and ``ddp_buckets``;
    ``single`` is the single-GPU estimate it was derived from (same per-rank batch)."""

    single: Estimate
    parallel: ParallelSetup
    phases: dict[str, PhaseEstimate]
    units: dict[str, int]  # FSDP unit sizes in elements: root, largest block, sharded total
    notes: list[str] = field(default_factory=list)

    @property
    def spec(self) -> ModelSpec:
        return self.single.spec

    @property
    def setup(self) -> TrainSetup:
        return self.single.setup

    @property
    def global_batch(self) -> int:
        return self.setup.micro_batch * self.setup.accum_steps * self.parallel.gpus

    def device_bytes(self) -> int:
        """One GPU's need: the reserved peak (allocated + the allocator's slack, as the
        single-GPU estimate models it for ``setup.allocator``) + CUDA context (NCCL not
        counted)."""
        return self.reserved_peak_bytes + CUDA_CONTEXT

    def to_dict(self) -> dict:
        return dict(
            model=self.spec.name,
            setup=self.setup.to_dict(),
            parallel=self.parallel.to_dict(),
            global_batch=self.global_batch,
            phase_peak_bytes=self.phase_peak_bytes,
            peak_phase=self.peak_phase,
            peak_bytes=self.peak_bytes,
            allocator=self.setup.allocator,
            reserved_peak_bytes=self.reserved_peak_bytes,
            cuda_context_bytes=CUDA_CONTEXT,
            device_bytes=self.device_bytes(),
            units=dict(self.units),
            single_gpu_phase_peak_bytes=self.single.phase_peak_bytes,
            phases={name: p.to_dict() for name, p in self.phases.items()},
            notes=list(self.notes),
        )


def _is_block(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[0] in ("h", "layers") and parts[1].isdigit()


def fsdp_units(spec: ModelSpec) -> tuple[int, list[int]]:
    """(root unit elements, elements of each transformer block) for ``fully_shard`` per block
    plus the root."""
    blocks: dict[int, int] = {}
    root = 0
    for p in spec.params:
        if _is_block(p.name):
            i = int(p.name.split(".")[1])
            blocks[i] = blocks.get(i, 0) + p.numel
        else:
            root += p.numel
    return root, [blocks[i] for i in sorted(blocks)]


def sharded_numel(spec: ModelSpec, gpus: int) -> int:
    """Elements one rank keeps: each tensor's shard, rounded up (FSDP's padding to whole rows
    is at most ``gpus - 1`` rows per tensor more)."""
    return sum(math.ceil(p.numel / gpus) for p in spec.params)


def _ddp_bucket_bytes(spec: ModelSpec, r: int, cap_mb: float) -> int:
    """DDP's bucket storage: every gradient, packed into buckets of at most ``cap_mb``
    (a tensor larger than the cap gets a bucket of its own), each one allocation."""
    cap = cap_mb * MiB
    total, current = 0, 0
    for p in reversed(spec.params):  # DDP buckets in reverse registration order
        nbytes = p.numel * r
        if current and current + nbytes > cap:
            total += _round(current)
            current = 0
        current += nbytes
    return total + _round(current)


def _rank_phase(
    phase: PhaseEstimate,
    spec: ModelSpec,
    setup: TrainSetup,
    par: ParallelSetup,
    backward: bool,
) -> PhaseEstimate:
    comps = {c: int(v) for c, v in phase.components.items()}
    r = DTYPE_BYTES[setup.param_dtype]
    P = spec.num_params
    extra: dict[str, int] = dict.fromkeys(COMM_COMPONENTS, 0)
    largest_transient = phase.largest_transient_bytes
    transient_component = phase.largest_transient_component
    if par.shard == "fsdp" and par.gpus > 1:
        frac = sharded_numel(spec, par.gpus) / P
        for c in SHARDED_COMPONENTS:
            comps[c] = round(comps.get(c, 0) * frac)
        root, blocks = fsdp_units(spec)
        largest = max(blocks, default=0)
        in_flight = min(len(blocks), 1 + par.prefetch)
        extra["allgather_buffers"] = _round(root * r) + in_flight * _round(largest * r)
        if backward:
            extra["reduce_scatter_buffers"] = _round(root * r) + 2 * _round(largest * r)
        # the unsharded units are allocated and freed every step: transient blocks too
        unit = max(_round(root * r), _round(largest * r))
        if unit > largest_transient:
            largest_transient, transient_component = unit, "allgather_buffers"
    elif par.shard == "ddp" and par.gpus > 1 and backward and setup.grad_mode == "full":
        buckets = _ddp_bucket_bytes(spec, r, par.bucket_cap_mb)
        if par.gradient_as_bucket_view:
            # The .grad tensors are the buckets: all of them exist from the wrap on.
            comps["gradients"] = 0
        extra["ddp_buckets"] = buckets
    comps.update(extra)
    components = {c: comps.get(c, 0) for c in RANK_COMPONENTS}
    return PhaseEstimate(
        phase.phase,
        sum(components.values()),
        phase.peak_at,
        components,
        dict(phase.stage_peaks),
        phase.segment_slack_bytes,
        largest_transient_bytes=largest_transient,
        largest_transient_component=transient_component,
        allocator=phase.allocator,
    )


def estimate_per_rank(
    spec: ModelSpec,
    setup: TrainSetup,
    gpus: int,
    shard: str = "fsdp",
    **options,
) -> RankEstimate:
    """One rank's per-phase, per-component allocated peak when training ``spec`` with
    ``setup`` (``setup.micro_batch`` per rank) on ``gpus`` GPUs with ``shard`` ("ddp" or
    "fsdp"). ``options``: the other :class:`ParallelSetup` fields."""
    par = ParallelSetup(gpus, shard, **options)
    if setup.grad_mode == "flat" and par.gpus > 1:
        # DistributedHybridTrainer always folds gradients into the fp32 accumulator (its
        # gradient sync reads it): the flat buffer is a single-process path.
        setup = setup.replace(grad_mode="hook")
    single = estimate(spec, setup)
    phases = {
        name: _rank_phase(p, spec, setup, par, backward=name != "predict")
        for name, p in single.phases.items()
    }
    root, blocks = fsdp_units(spec)
    units = {
        "root": root,
        "largest_block": max(blocks, default=0),
        "blocks": len(blocks),
        "sharded_per_rank": sharded_numel(spec, gpus),
    }
    notes = list(single.notes)
    notes.append(
        f"{gpus} GPU(s), {shard}: micro-batch {setup.micro_batch} per rank, global batch "
        f"{setup.micro_batch * setup.accum_steps * gpus} sequences per optimizer step"
    )
    if shard == "fsdp":
        notes.append(
            "FSDP: peaks are the single-GPU peaks with the model state divided and the "
            "all-gather / reduce-scatter buffers added at the same point (an upper bound when "
            "those buffers are not all alive there); NCCL buffers not counted"
        )
    elif setup.grad_mode == "hook":
        notes.append(
            "DDP with hook-folded gradients: the fp32 accumulator is all-reduced in place "
            "(plain module); a DDP-wrapped module adds its gradient buckets"
        )
    return RankEstimate(single, par, phases, units, notes)


_LABELS = {
    **COMPONENT_LABELS,
    "weights": "weights (this rank)",
    "allgather_buffers": "FSDP all-gather buffers",
    "reduce_scatter_buffers": "FSDP reduce-scatter buffers",
    "ddp_buckets": "DDP gradient buckets",
}


def format_rank_estimate(est: RankEstimate) -> str:
    """A plain-text table like ``format_estimate``'s, per rank, with the single-GPU peak
    (same per-rank batch) for comparison."""
    phases = list(est.phases)
    width = max(len(v) for v in _LABELS.values()) + 2
    col = max(10, *(len(p) + 2 for p in phases))
    par = est.parallel
    lines = [
        f"model: {est.spec.summary()}",
        f"setup: {est.setup.describe()}",
        f"parallel: {par.gpus} GPUs, {par.shard}; per-rank micro-batch {est.setup.micro_batch}, "
        f"global batch {est.global_batch}",
        "",
        "GiB per rank at each phase's peak".ljust(width) + "".join(p.rjust(col) for p in phases),
    ]
    for comp in RANK_COMPONENTS:
        values = [est.phases[p].components.get(comp, 0) for p in phases]
        if any(values):
            lines.append(
                _LABELS[comp].ljust(width) + "".join(f"{v / GiB:.3f}".rjust(col) for v in values)
            )
    lines.append("-" * (width + col * len(phases)))
    lines.append(
        "peak allocated per rank".ljust(width)
        + "".join(f"{est.phases[p].peak_bytes / GiB:.3f}".rjust(col) for p in phases)
    )
    lines.append(
        "single GPU, same batch".ljust(width)
        + "".join(f"{est.single.phases[p].peak_bytes / GiB:.3f}".rjust(col) for p in phases)
    )
    lines.append("")
    lines.append(
        f"run peak per rank: {est.peak_bytes / GiB:.3f} GiB allocated ({est.peak_phase}), "
        f"{est.reserved_peak_bytes / GiB:.3f} GiB reserved ({est.setup.allocator} allocator); "
        f"CUDA context {CUDA_CONTEXT / GiB:.3f} GiB apart; device need per GPU "
        f"{est.device_bytes() / GiB:.2f} GiB"
    )
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


__all__ = [
    "DDP_BUCKET_CAP_MB",
    "RANK_COMPONENTS",
    "SHARD_MODES",
    "ParallelSetup",
    "RankEstimate",
    "estimate_per_rank",
    "format_rank_estimate",
    "fsdp_units",
    "sharded_numel",
]
