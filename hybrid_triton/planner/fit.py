"""What fits a GPU: search the buildable setups, pick the best throughput proxy, explain the
choice and say how to build it.

The search (for one model, GPU and sequence length):

1. Candidate setups, in tiers tried in order; a later tier is searched only when nothing in
   the earlier ones fits even at micro-batch 1. Only setups that can be built today are tried
   (``hybrid_triton.planner.build.NOT_BUILDABLE`` is the one place that says which):
   - tier 1: mixed precision (bf16 autocast over fp32 parameters; on cards without bf16,
     ``NO_BF16``, fp16 autocast with loss scaling, or plain fp32), or bf16 parameters with
     fp32 master weights in FusedAdamW (a flat bf16 gradient buffer for one micro-batch per
     step, hook-folded into fp32 for several); AdamW state 32, 8 or 4 bits (below 32 over fp32
     parameters: FusedAdamW with flat gradients); checkpointing off or on;
   - tier 2: the same with the optimizer moments in host memory (not buildable today);
   - tier 3: pure bf16 (bf16 parameters, gradients and moments, torch.optim.AdamW, no master
     copy: updates smaller than bf16's resolution are lost); tier 4: the same offloaded.
   The setups are plain training loops (one phase) unless ``trainer=True`` plans the bf16 +
   master ones for HybridTrainer (its four phases). Each candidate is tried under PyTorch's
   default ("native") caching allocator and, unless ``allocator`` names one, with expandable
   segments (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: no throughput cost, it only
   avoids the native allocator's fragmentation around the vocabulary-sized buffers).
2. For each candidate the largest micro-batch (powers of two up to ``max_micro_batch``) whose
   device need (reserved peak over the phases: allocated + the allocator's slack, + the CUDA
   context) stays within the usable memory, ``capacity * (1 - margin)``.
3. The throughput proxy of a candidate is tokens per micro-batch times
   ``RECOMPUTE_FACTOR`` when checkpointing (backward is about twice the forward's FLOPs, so a
   recomputed forward turns 3 units of work into 4). Highest proxy wins; ties go to the setup
   with fewer memory options turned on (expandable segments count as the cheapest option,
   so the native allocator wins a tie: it is what plain PyTorch runs).
4. Each option that is on gets a reason: what the peak would be without it, or which
   micro-batch it buys. When nothing fits, the result says by how much and what would. The
   answer ends with how to build the chosen setup (``build_steps``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybrid_triton.planner.build import build_steps, is_buildable, uses_fused_adamw
from hybrid_triton.planner.estimate import Estimate, GiB, MiB, estimate
from hybrid_triton.planner.setup import ALLOCATORS, TrainSetup
from hybrid_triton.planner.specs import ModelSpec, PlannerError, unknown_name_error

RECOMPUTE_FACTOR = 3 / 4  # forward + backward = 3 forward-units; recompute adds one

# Total memory of each card in MiB: as nvidia-smi reports it for the data-centre cards, the
# nominal size for consumer cards (which report a few MiB less). Pass a size for any other.
GPUS: dict[str, int] = {
    "rtx-3060": 12 * 1024,
    "rtx-3070": 8 * 1024,
    "rtx-3080": 10 * 1024,
    "rtx-3090": 24 * 1024,
    "rtx-4060": 8 * 1024,
    "rtx-4060-ti-16gb": 16 * 1024,
    "rtx-4070": 12 * 1024,
    "rtx-4080": 16 * 1024,
    "rtx-4090": 24 * 1024,
    "rtx-5090": 32 * 1024,
    "t4": 15360,
    "l4": 23034,
    "a10": 23028,
    "a100-40gb": 40960,
    "a100-80gb": 81920,
    "h100-80gb": 81559,
    "h200": 143771,
    # Volta, Turing and Pascal cards (no bf16): nominal sizes
    "gtx-1080-ti": 11 * 1024,
    "p100-16gb": 16 * 1024,
    "v100-16gb": 16 * 1024,
    "v100-32gb": 32 * 1024,
    "rtx-2060": 6 * 1024,
    "rtx-2070": 8 * 1024,
    "rtx-2080": 8 * 1024,
    "rtx-2080-ti": 11 * 1024,
    "titan-rtx": 24 * 1024,
}
# Cards without bf16 arithmetic (compute capability below 8.0: Volta, Turing and older). bf16
# runs there only emulated, slower than fp32, so the planner recommends fp16 autocast with
# loss scaling, or fp32, for them.
NO_BF16 = frozenset(
    {
        "gtx-1080-ti",
        "p100-16gb",
        "v100-16gb",
        "v100-32gb",
        "t4",
        "rtx-2060",
        "rtx-2070",
        "rtx-2080",
        "rtx-2080-ti",
        "titan-rtx",
    }
)
_GPU_ALIASES = {
    "a100": "a100-80gb",
    "h100": "h100-80gb",
    "a100-40": "a100-40gb",
    "a100-80": "a100-80gb",
    "h100-80": "h100-80gb",
    "h200-141gb": "h200",
}


@dataclass(frozen=True)
class GpuInfo:
    """A card to plan for: its label, total memory and whether it has bf16 (None: unknown,
    for a card given by its size)."""

    label: str
    capacity_bytes: int
    bf16: bool | None


def local_gpu() -> GpuInfo:
    """The local CUDA device (``--gpu auto``): its name and total memory from torch, bf16 from
    its compute capability (8.0 and newer). A PlannerError when there is none."""
    import torch

    if not torch.cuda.is_available():
        raise PlannerError(
            "--gpu auto: no CUDA device here (torch.cuda.is_available() is False); name a "
            "card (hybrid-triton plan --list) or give its memory in GiB"
        )
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return GpuInfo(f"{props.name} (local)", int(props.total_memory), props.major >= 8)


def gpu_info(gpu: str | int | float) -> GpuInfo:
    """A GPU preset name, ``"auto"`` (the local card), or a size in GiB (a number or
    "24GiB", bf16 support then unknown)."""
    if isinstance(gpu, str) and gpu.strip().lower() == "auto":
        return local_gpu()
    label, capacity = gpu_capacity_bytes(gpu)
    return GpuInfo(label, capacity, (label not in NO_BF16) if label in GPUS else None)


def gpu_capacity_bytes(gpu: str | int | float) -> tuple[str, int]:
    """``(label, bytes)`` for a GPU preset name, or a size in GiB (a number or "24GiB")."""
    if isinstance(gpu, str) and gpu.strip().lower() == "auto":
        info = local_gpu()
        return info.label, info.capacity_bytes
    if isinstance(gpu, bool):
        raise PlannerError(f"GPU must be a preset name or a size in GiB, got {gpu!r}")
    if isinstance(gpu, (int, float)):
        gib = float(gpu)
    else:
        text = str(gpu).strip().lower()
        key = _GPU_ALIASES.get(text, text)
        if key in GPUS:
            return key, GPUS[key] * MiB
        number = text.removesuffix("gib").removesuffix("gb").strip()
        try:
            gib = float(number)
        except ValueError:
            raise unknown_name_error("GPU", gpu, GPUS) from None
    if not gib > 0 or gib != gib or gib == float("inf"):
        raise PlannerError(f"GPU memory must be a positive number of GiB, got {gpu!r}")
    return f"{gib:g} GiB", int(gib * GiB)


@dataclass
class Candidate:
    setup: TrainSetup
    estimate: Estimate
    device_bytes: int
    proxy: float
    tier: int


@dataclass
class FitResult:
    """The answer. ``fits`` False means nothing in the search space fits; ``best`` is then the
    leanest setup tried (micro-batch 1) and ``reasons`` says what would fit instead.
    ``build`` says how to build ``best`` (:func:`~hybrid_triton.planner.build.build_steps`);
    ``bf16``: whether the card has bf16 (None: unknown, a card given by its size)."""

    spec: ModelSpec
    gpu: str
    capacity_bytes: int
    usable_bytes: int
    margin: float
    fits: bool
    best: Candidate
    reasons: list[str]
    alternatives: list[Candidate] = field(default_factory=list)
    build: list[str] = field(default_factory=list)
    bf16: bool | None = True

    def to_dict(self) -> dict:
        return dict(
            model=self.spec.name,
            gpu=self.gpu,
            capacity_bytes=self.capacity_bytes,
            usable_bytes=self.usable_bytes,
            margin=self.margin,
            bf16=self.bf16,
            fits=self.fits,
            setup=self.best.setup.to_dict(),
            device_bytes=self.best.device_bytes,
            host_bytes=self.best.estimate.host_bytes,
            throughput_proxy=self.best.proxy,
            reasons=list(self.reasons),
            build=list(self.build),
            estimate=self.best.estimate.to_dict(),
            alternatives=[
                dict(setup=c.setup.describe(), device_bytes=c.device_bytes, proxy=c.proxy)
                for c in self.alternatives
            ],
        )


# Precisions searched: "mixed" is autocast over fp32 parameters (bf16, or fp16 with loss
# scaling on cards without bf16), "fp32" plain fp32 (cards without bf16 only), "master" bf16
# parameters + fp32 master weights (FusedAdamW), "pure" bf16 parameters and bf16 moments
# (torch.optim.AdamW, no master copy). State bits tried per precision: plain PyTorch keeps
# pure bf16's moments in bf16 (16 bits).
_STATE_BITS = {"mixed": (32, 8, 4), "fp32": (32, 8, 4), "master": (32, 8, 4), "pure": (16,)}
_TIERS = (
    [("mixed", "none"), ("fp32", "none"), ("master", "none")],
    [("mixed", "cpu"), ("fp32", "cpu"), ("master", "cpu")],
    [("pure", "none")],
    [("pure", "cpu")],
)


def _precision(name: str, bf16: bool, bits: int, accum_steps: int, trainer: bool) -> dict | None:
    """The TrainSetup fields of one precision, or None where the card rules it out."""
    if name in ("master", "pure") and not bf16:
        return None  # bf16 parameters on a card without bf16
    if name == "fp32" and bf16:
        return None  # bf16 autocast is as lean and faster
    fields = {
        "mixed": dict(param_dtype="fp32", autocast="bf16" if bf16 else "fp16"),
        "fp32": dict(param_dtype="fp32"),
        "master": dict(param_dtype="bf16", master_weights=True, trainer=trainer),
        "pure": dict(param_dtype="bf16", trainer=False),
    }[name]
    return dict(fields, state_bits=bits, grad_mode=_grad_mode(fields, bits, accum_steps))


def _grad_mode(fields: dict, bits: int, accum_steps: int) -> str:
    """FusedAdamW (master weights, low-bit state beside fp32 parameters) reads flat gradients:
    a flat buffer for one micro-batch per step, the hook-folded fp32 accumulator for several
    (HybridTrainer's grad_path "auto"); torch's optimizers read ``.grad``."""
    fused = fields.get("master_weights") or (fields["param_dtype"] == "fp32" and bits != 32)
    if not fused:
        return "full"
    return "flat" if accum_steps == 1 else "hook"


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB"


def _features(setup: TrainSetup) -> tuple[int, ...]:
    """Memory options turned on, the costliest first: fewer (lexicographically) is better."""
    return (
        int(setup.offload != "none"),
        int(setup.param_dtype != "fp32" and not setup.master_weights),
        int(setup.checkpointing),
        int(setup.state_bits < 32) + int(setup.state_bits < 8),
        int(setup.param_dtype != "fp32"),
        int(setup.allocator != "native"),
        int(setup.compute_dtype == "fp32"),  # without bf16: fp16 autocast is the faster
    )


def _check_fit_args(margin, max_micro_batch, allocator, trainer) -> None:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise PlannerError(f"margin must be a fraction in [0, 1), got {margin!r}")
    if (
        isinstance(max_micro_batch, bool)
        or not isinstance(max_micro_batch, int)
        or (max_micro_batch < 1)
    ):
        raise PlannerError(f"max_micro_batch must be a positive integer, got {max_micro_batch!r}")
    if allocator is not None and allocator not in ALLOCATORS:
        raise unknown_name_error("allocator", allocator, ALLOCATORS)
    if not isinstance(trainer, bool):
        raise PlannerError(f"trainer must be True or False, got {trainer!r}")


def fit(
    spec: ModelSpec,
    gpu: str | int | float,
    margin: float = 0.1,
    seq_len: int | None = None,
    max_micro_batch: int = 64,
    accum_steps: int = 1,
    phases: tuple[str, ...] | None = None,
    allocator: str | None = None,
    trainer: bool = False,
) -> FitResult:
    """Find the setup with the best throughput proxy that fits ``gpu`` (a preset name from
    ``GPUS``, "auto" for the local card, or a size in GiB) with ``margin`` (a fraction of the
    capacity kept free), among the setups that can be built today
    (:func:`~hybrid_triton.planner.build.why_not_buildable`).
    ``allocator``: None searches PyTorch's native allocator and expandable segments (the
    answer says why when expandable segments change it); "native" or "expandable": only
    that one (``TrainSetup.allocator``). ``trainer``: plan the bf16 + master setups for
    HybridTrainer (its four phases) instead of a plain training loop (one phase).
    ``phases``: None: each setup's own phase plan."""
    if not isinstance(spec, ModelSpec):
        raise PlannerError(f"fit expects a ModelSpec, got {type(spec).__name__}")
    _check_fit_args(margin, max_micro_batch, allocator, trainer)
    card = gpu_info(gpu)
    bf16 = card.bf16 is not False  # unknown (a size in GiB): assumed, and said so
    allocators = ALLOCATORS if allocator is None else (allocator,)
    seq = seq_len if seq_len is not None else min(1024, spec.max_seq_len)
    usable = int(card.capacity_bytes * (1 - margin))
    base = dict(seq_len=seq, accum_steps=accum_steps, phases=phases)
    cache: dict[TrainSetup, Candidate] = {}
    leanest: list[Candidate] = []  # the lowest need at micro-batch 1 over every candidate

    # The search runs the formulas where they know the family (milliseconds an estimate);
    # a Hugging Face config's winner is then confirmed by tracing the module (_confirm_traced).
    method = "formula" if spec.has_activation_model else "auto"

    def evaluate(setup: TrainSetup, tier: int) -> Candidate:
        if setup not in cache:
            if setup.allocator == "native":
                est = estimate(spec, setup, method=method)
            else:  # the replay is the native one's: only the reserved figures differ
                est = evaluate(setup.replace(allocator="native"), tier).estimate
                est = est.with_allocator(setup.allocator)
            proxy = setup.tokens_per_micro_batch * (
                RECOMPUTE_FACTOR if setup.checkpointing else 1.0
            )
            cache[setup] = Candidate(setup, est, est.device_bytes(), proxy, tier)
        return cache[setup]

    def largest(setup: TrainSetup, tier: int) -> Candidate | None:
        best = None
        micro = 1
        while micro <= max_micro_batch:
            cand = evaluate(setup.replace(micro_batch=micro), tier)
            if micro == 1 and (not leanest or cand.device_bytes < leanest[0].device_bytes):
                leanest[:] = [cand]
            if cand.device_bytes > usable:
                break
            best = cand
            micro *= 2
        return best

    fitting = _first_tier_that_fits(largest, bf16, base, allocators, trainer)
    notes = _card_notes(card)
    if not fitting:
        lean = leanest[0]
        reasons = _nothing_fits(spec, lean, usable, card.label, base, margin) + notes
        return FitResult(
            spec, card.label, card.capacity_bytes, usable, margin, False, lean, reasons,
            bf16=card.bf16,
        )  # fmt: skip
    fitting.sort(key=lambda c: (-c.proxy, _features(c.setup), c.device_bytes))
    if spec.hf_config is not None and method == "formula":
        fitting, confirmed = _confirm_traced(spec, fitting, usable)
        notes = confirmed + notes
        if not fitting:
            lean = leanest[0]
            reasons = _nothing_fits(spec, lean, usable, card.label, base, margin) + notes
            return FitResult(
                spec, card.label, card.capacity_bytes, usable, margin, False, lean, reasons,
                bf16=card.bf16,
            )  # fmt: skip
    best = fitting[0]
    native_best = next((c for c in fitting if c.setup.allocator == "native"), None)
    reasons = _explain(best, usable, evaluate, largest, allocators, native_best) + notes
    return FitResult(
        spec, card.label, card.capacity_bytes, usable, margin, True, best, reasons,
        fitting[1:6], build_steps(spec, best.setup), card.bf16,
    )  # fmt: skip


def _confirm_traced(
    spec: ModelSpec, fitting: list[Candidate], usable: int
) -> tuple[list[Candidate], list[str]]:
    """Re-estimate the formulas' candidates (sorted best first) of a Hugging Face config by
    tracing the module as it runs (the formulas miss what its modules save), halving a
    candidate's micro-batch until the trace fits, until no unconfirmed candidate can beat
    the best confirmed one. Returns the candidates (confirmed ones first) and a note."""
    from hybrid_triton.planner.hf import composable, transformers_available

    if not transformers_available():
        return fitting, [
            "Hugging Face model planned by the formulas, which miss what its modules save "
            "(install transformers to trace them): keep a margin."
        ]
    pending, confirmed = list(fitting), []
    traces: dict[TrainSetup, Estimate] = {}  # by setup under the native allocator
    while pending and not (confirmed and confirmed[0].proxy >= pending[0].proxy):
        cand = pending.pop(0)
        if composable(cand.setup) is not None:  # the trainer's setups: the formulas model it
            confirmed.append(cand)
        else:
            traced = _largest_traced(spec, cand, usable, traces)
            if traced is not None:
                confirmed.append(traced)
        confirmed.sort(key=lambda c: -c.proxy)
    if not confirmed:
        return [], ["Tracing the Hugging Face module: none of the formulas' candidates fits."]
    best = confirmed[0]
    formula = next(c for c in fitting if c.setup.replace(micro_batch=1) ==
                   best.setup.replace(micro_batch=1))  # fmt: skip
    note = (
        f"Confirmed by tracing the Hugging Face module: {_gib(best.device_bytes)} at "
        f"micro-batch {best.setup.micro_batch} (the formulas said {_gib(formula.device_bytes)}"
        f" at micro-batch {formula.setup.micro_batch})."
    )
    return [*confirmed, *pending], [note]


def _largest_traced(
    spec: ModelSpec, cand: Candidate, usable: int, traces: dict[TrainSetup, Estimate]
) -> Candidate | None:
    """The candidate's setup traced, its micro-batch halved until it fits (None: not even 1).
    ``traces`` caches the traced estimates: allocators share the allocated figures."""
    setup = cand.setup
    while True:
        native = setup.replace(allocator="native")
        if native not in traces:
            traces[native] = estimate(spec, native, method="traced")
        est = traces[native].with_allocator(setup.allocator)
        if est.device_bytes() <= usable:
            proxy = cand.proxy * setup.micro_batch / cand.setup.micro_batch
            return Candidate(setup, est, est.device_bytes(), proxy, cand.tier)
        if setup.micro_batch == 1:
            return None
        setup = setup.replace(micro_batch=setup.micro_batch // 2)


def _first_tier_that_fits(largest, bf16, base, allocators, trainer) -> list[Candidate]:
    """The largest micro-batch of every buildable candidate of the first tier where any
    fits (empty when none does)."""
    fitting: list[Candidate] = []
    for tier, options in enumerate(_TIERS, start=1):
        for name, offload in options:
            for setup in _candidates(name, offload, bf16, base, allocators, trainer):
                cand = largest(setup, tier)
                if cand is not None:
                    fitting.append(cand)
        if fitting:
            break
    return fitting


def _candidates(name, offload, bf16, base, allocators, trainer):
    """The buildable setups of one precision and offload choice, at micro-batch 1."""
    for bits in _STATE_BITS[name]:
        fields = _precision(name, bf16, bits, base["accum_steps"], trainer)
        if fields is None:
            return
        for ckpt in (False, True):
            for alloc in allocators:
                setup = TrainSetup(
                    **fields, **base, checkpointing=ckpt, offload=offload, allocator=alloc
                )
                if is_buildable(setup):
                    yield setup


def _card_notes(card: GpuInfo) -> list[str]:
    if card.bf16 is None:
        return [
            f"bf16: assumed supported on a card given by its size ({card.label}: Ampere or "
            "newer); for a V100, T4, RTX 20xx or older name the card (or check "
            "torch.cuda.is_bf16_supported()), and the plan uses fp16 or fp32 instead."
        ]
    if card.bf16 is False:
        return [
            f"{card.label} has no bf16 (compute capability below 8.0): planned with fp16 "
            "autocast and loss scaling over fp32 parameters, or plain fp32."
        ]
    return []


def _explain(
    best: Candidate,
    usable: int,
    evaluate,
    largest,
    allocators: tuple[str, ...],
    native_best: Candidate | None,
) -> list[str]:
    s = best.setup
    reasons = [
        f"Best throughput proxy that fits: micro-batch {s.micro_batch} x {s.seq_len} tokens "
        f"({s.describe()}), needing {_gib(best.device_bytes)} of {_gib(usable)} usable."
    ]

    def without(label: str, **changes) -> None:
        variant = s.replace(**changes)
        # the same setup built without the option: FusedAdamW reads flat gradients, torch's
        # optimizers read .grad
        fused = uses_fused_adamw(variant)
        mode = ("flat" if s.accum_steps == 1 else "hook") if fused else "full"
        changes["grad_mode"] = mode
        alt = evaluate(s.replace(**changes), best.tier)
        if alt.device_bytes > usable:
            reasons.append(
                f"{label}: on, because without it this batch needs {_gib(alt.device_bytes)} "
                f"(> {_gib(usable)} usable)."
            )
            return
        other = largest(s.replace(micro_batch=1, **changes), best.tier)
        reasons.append(
            f"{label}: on, because without it the best is micro-batch {other.setup.micro_batch}"
            f" (throughput proxy {other.proxy:g} tokens against {best.proxy:g})."
        )

    if s.param_dtype == "bf16" and s.master_weights:
        grads = "flat bf16" if s.grad_mode == "flat" else "hook-folded fp32"
        without(
            f"bf16 parameters + fp32 master weights + {grads} gradients",
            param_dtype="fp32",
            autocast="bf16",
            master_weights=False,
        )
    elif s.param_dtype == "bf16":
        without(
            "pure bf16 parameters and gradients (no master copy: updates below bf16's "
            "resolution are lost)",
            param_dtype="fp32",
            autocast="bf16",
            state_bits=32,
        )
    elif s.autocast == "bf16":
        reasons.append(
            "bf16 autocast over fp32 parameters: the standard mixed precision, kept because "
            "lower-precision parameters would not buy a better proxy."
        )
    elif s.autocast == "fp16":
        reasons.append(
            "fp16 autocast over fp32 parameters, with loss scaling (torch.amp.GradScaler): "
            "the mixed precision of cards without bf16."
        )
    else:
        reasons.append("fp32 parameters and compute: fp16 autocast would not buy a better proxy.")
    if s.state_bits < 32:
        without(f"{s.state_bits}-bit optimizer state", state_bits=32)
    if s.checkpointing:
        without("activation checkpointing (one extra forward per step)", checkpointing=False)
    if s.offload != "none":
        without("optimizer state offloaded to CPU (the step waits on the host)", offload="none")
    if s.allocator == "expandable" and "native" in allocators:
        native = evaluate(s.replace(allocator="native"), best.tier)
        reasons.append(_expandable_reason(best, native, usable, native_best))
    return reasons


def _expandable_reason(
    best: Candidate, native: Candidate, usable: int, native_best: Candidate | None
) -> str:
    """Why expandable segments are on: what the native allocator would leave unusable, and
    the best it allows instead."""
    est = native.estimate
    phase = est.phases[est.reserved_peak_phase]
    unusable = phase.allocator_slack_bytes - phase.segment_slack_bytes
    what = phase.largest_transient_component.replace("_", " ") or "largest transient"
    reason = (
        "expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True): on, because "
        f"with PyTorch's default allocator this batch needs {_gib(native.device_bytes)} "
        f"(> {_gib(usable)} usable): it would leave up to {_gib(unusable)} unusable around "
        f"the {_gib(phase.largest_transient_bytes)} {what} buffers; expandable segments avoid "
        f"it (no throughput cost; {_gib(best.device_bytes)} needed with them)."
    )
    if native_best is None:
        return reason + " With the default allocator nothing in this tier fits."
    return reason + (
        f" With the default allocator the best is {native_best.setup.describe()} "
        f"(throughput proxy {native_best.proxy:g} tokens against {best.proxy:g})."
    )


def _nothing_fits(
    spec: ModelSpec, leanest: Candidate, usable: int, label: str, base: dict, margin: float
) -> list[str]:
    comps = leanest.estimate.components
    state = comps["weights"] + comps["gradients"] + comps["master_weights"]
    reasons = [
        f"Nothing fits {label}: even the leanest setup tried ({leanest.setup.describe()}) "
        f"needs {_gib(leanest.device_bytes)}, more than the {_gib(usable)} usable.",
        f"{spec.name} has {spec.num_params / 1e9:.2f}B parameters: its "
        f"{leanest.setup.param_dtype} weights alone "
        f"take {_gib(comps['weights'])}, and weights plus gradients {_gib(state)}, before "
        "any activation.",
    ]
    needs_bf16 = "bf16" in (leanest.setup.param_dtype, leanest.setup.compute_dtype)
    for name, mib in sorted(GPUS.items(), key=lambda kv: kv[1]):
        if needs_bf16 and name in NO_BF16:
            continue
        if leanest.device_bytes <= mib * MiB * (1 - margin):
            reasons.append(
                f"What would fit: a {name} ({mib / 1024:.0f} GiB) with that setup, "
                "or sharding weights, gradients and state over several GPUs "
                "(FSDP divides them by the number of GPUs)."
            )
            break
    else:
        reasons.append(
            "What would fit: no single GPU preset; shard weights, gradients and "
            "state over several GPUs (FSDP)."
        )
    seq = base["seq_len"]
    if seq > 128:
        shorter = leanest.setup.replace(seq_len=128)
        need = estimate(spec, shorter).device_bytes()
        if need <= usable:
            reasons.append(
                f"A shorter sequence would: {shorter.seq_len} tokens needs {_gib(need)}."
            )
    return reasons
