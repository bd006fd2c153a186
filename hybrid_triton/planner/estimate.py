"""Per-phase, per-component VRAM estimate of one training step, by replaying its allocations.

How it works: instead of one closed formula, :func:`estimate` replays the step as PyTorch runs
it, as a sequence of allocations and frees (forward op by op, the loss, backward node by node
in reverse, the optimizer step), each rounded as the caching allocator rounds it, and records
the live bytes per component at the highest point. The peak therefore lands where it really
does (for GPT-2 with a 50k vocabulary that is the cross-entropy backward, where the saved
log-probabilities and the first vocabulary-sized gradients are alive at once with every saved
activation), and the breakdown says what is alive there.

What is modelled (per token of a micro-batch, ``N = micro_batch * seq_len``, width ``d``):

- Saved activations per block (flash attention, dropout 0): the block input and the
  post-attention residual (residual dtype: the parameter dtype), the two norm outputs as the
  matmuls' inputs (compute dtype), q/k/v (one fused tensor for GPT-2), the attention output
  (shared with the output projection's input: flash returns it in [B, T, H, D] layout so the
  ``transpose().contiguous()`` is free), the fp32 logsumexp (4 B per head), the fp32 norm
  statistics (mean and rstd, 8 B), and the MLP hidden tensors (GELU: input and output; SwiGLU:
  gate, up, silu(gate), product).
- Autocast (fp32 parameters): a bf16 copy of every linear weight and bias is cached during
  forward; weight copies stay alive (saved by the matmul) until that layer's backward, bias
  copies until autocast exits; the residual stream and norms stay fp32.
- Cross-entropy as ``F.cross_entropy`` runs it: ``log_softmax`` in the logits' dtype (it is
  called with an explicit dtype, which autocast keeps), saved; under autocast ``nll_loss``
  (autocast's fp32 list) saves an fp32 copy of it and its backward makes an fp32 gradient,
  cast back to the compute dtype. Logits held by the caller (``logits_lifetime``) add theirs.
- Activation checkpointing (per block, non-reentrant): only each block's input is kept; in
  backward one block is recomputed at a time (with its weight copies under autocast).
  ``setup.checkpoint_blocks = K`` checkpoints the first K blocks only (the others save their
  activations as without checkpointing).
- Fused chunked loss (``setup.fused_loss``, GPT-2: ``GPT2Config.fused_loss``): no ``[N, V]``
  logits; one chunk's logits in the compute dtype (turned into their gradient in place), the
  fp32 ``[V, d]`` gradient accumulator of the tied weight with one chunk's product beside it,
  and the ``[N, d]`` gradient of the final norm's output, all during forward; both gradients
  are kept (parameter dtype) for backward, which scales them. The output head's weight
  gradient then waits in the tied weight's input buffer until the embedding's joins it.
- Gradients: "full" mode allocates each ``.grad`` as backward produces it (``AccumulateGrad``
  steals the first gradient, adds later ones in place); "hook" mode keeps one flat fp32
  accumulator and at most one parameter's gradient at a time; "flat" mode the same with a flat
  buffer in the parameter dtype (each ``.grad`` a view of it, autograd adds in place). Under
  autocast a weight's bf16 gradient exists briefly beside its fp32 copy.
- Optimizer state: AdamW 2 moments, SGD 1; 32-bit fp32, 16-bit bf16, 8-bit 1 B + one fp32
  scale per 256, 4-bit 0.5 B + one scale per 128 (``STATE_BLOCK``); the step is fused (no
  temporaries). Offloaded state is not on the GPU.
- Predict phase: forward under ``no_grad`` (nothing saved), no gradients, moments per policy,
  the loss over chunks of ``setup.loss_chunk_tokens`` positions for GPT-2 (the project's
  model: one chunk's logits, their fp32 copy and the fp32 log-probabilities, see
  ``_Step.chunked_loss``; other families and ``loss_chunk_tokens=0``: the full logits),
  plus the compact update direction (int8 blockwise: 1 B + fp32 scale per 256). With
  ``setup.trainer`` (HybridTrainer): the Predict entry builds the direction from the moments
  one segment group at a time in arena order (fp32 temporaries, ``PREDICT_ENTRY_TEMP_BYTES``
  per element of the group, beside the int8 directions of the groups before it only: each
  group is quantized into its own tensor), then frees the fp32 master weights of bf16 models
  (``TrainerConfig.predict_master="host"``: the rollback snapshot in host memory is their
  copy); that entry is a transition with its own peak (stage ``predict entry``), not part of
  the Predict phase's peak. The moments and the master come back at Predict exit (the presets'
  ``lookahead=0``; a larger lookahead adds the moments to the last Predict steps); Correct
  keeps the direction and copies the master weights around its step.
- Allocator: every block is rounded up to ``ALLOC_ROUND`` bytes (``allocator_rounding``, in
  the allocated peak). What the caching allocator reserves beyond that (reported apart, as
  ``allocator_slack_bytes``; ``reserved_bytes`` = allocated peak + slack is what a
  ``set_per_process_memory_fraction`` cap or the card limits) depends on
  ``setup.allocator``: "native" (PyTorch's default) adds ``segment_slack_bytes`` (the live
  large blocks rounded to 2 MiB segments) and a fragmentation allowance,
  ``NATIVE_FRAGMENTATION`` times the largest transient block alive at the peak
  (``largest_transient_bytes``: for GPT-2 a ``[N, V]`` logits / loss buffer), fitted on the
  H100's capped runs; "expandable" (expandable segments) rounds the peak up to 20 MiB pages
  and adds one page.
- Not counted in the allocated peak: the CUDA context (``cuda_context_bytes``, reported apart)
  and anything the caller allocates besides the batch.

Calibration constants (few, named, to be checked by the memory suite): ``CUBLAS_WORKSPACE``
and ``CUDA_CONTEXT``. Everything else is counted from shapes.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field, replace

from hybrid_triton.planner.setup import DTYPE_BYTES, TrainSetup
from hybrid_triton.planner.specs import ModelSpec, ParamTensor, PlannerError

GiB = 1024**3
MiB = 1024**2
ALLOC_ROUND = 512  # the caching allocator rounds every block up to a multiple of 512 B
SEGMENT_ROUND = 2 * MiB  # large blocks (> 1 MiB) live in segments rounded to 2 MiB
LARGE_BLOCK = 1 * MiB
# Elements per fp32 scale of blockwise-quantized optimizer state, by bits (the toolkit's
# FusedAdamW defaults, kernels/adamw.py DEFAULT_QBLOCK), and of the Predict update direction
# (TrainerConfig.quant_block).
STATE_BLOCK = {8: 256, 4: 128}
DIRECTION_BLOCK = 256
# Bytes per element of a segment group of temporaries alive at the worst point of
# HybridTrainer's Predict entry (_direction_groups, one group at a time), counted from its code:
# 32-bit state: the group's fp32 direction (4); 16-bit: fp32 copies of both moments and the
# direction (12); 8-bit: inside the torch reference dequantize_moments_ref, the int32 codes,
# their magnitude or shifted bits, a bool mask and the fp32 result (17, the first moment's 4
# included while the second is decoded); 4-bit: the same plus the unpacked nibbles (19). They
# change when that code does; the memory suite's Predict rows check them.
PREDICT_ENTRY_TEMP_BYTES = {32: 4, 16: 12, 8: 17, 4: 19}
# NVIDIA's recommended cuBLAS workspace on Hopper; PyTorch allocates it through the caching
# allocator on the first matmul, so it shows in max_memory_allocated. Calibration constant.
CUBLAS_WORKSPACE = 32 * MiB
# CUDA context + kernels loaded by torch and Triton (lazy loading): outside the caching
# allocator, shown by nvidia-smi / NVML only. Reported apart; the memory suite measures it
# (NVML used minus reserved): 1.20-1.30 GiB, median 1.29, over the 124 measured rows of
# reports/memory/2026-11-24_223017_nvidia-h100-80gb-hbm3 (H100, torch 2.11, CUDA 13).
# Calibration constant; other drivers and GPUs differ by some hundred MiB.
CUDA_CONTEXT = 1300 * MiB
# Expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True) map the large pool's
# segment in pages of kLargeBuffer = 20 MiB (c10/cuda/CUDACachingAllocator.cpp, Note
# [Expandable Segments]: "we use 2MiB pages for our small pool and 20MiB pages for our large
# pool"); under memory pressure every wholly free page is unmapped and can be mapped again
# where the next allocation needs it.
EXPANDABLE_PAGE = 20 * MiB
# Native allocator (one cudaMalloc'd segment per large allocation, split for smaller blocks
# once freed): fragmentation allowance, as a fraction of the largest transient block alive at
# the peak. The block whose request fails at the peak is a fresh vocabulary-sized buffer; the
# free space the allocator holds but cannot give it is what is left of earlier segments of
# that size after smaller tensors took parts of them, so it stays below one such block. Under
# 8/16/24 GiB caps on the H100 (reports/memory/2026-11-24_223017_nvidia-h100-80gb-hbm3) the
# three runs that ran out of memory held 1.21, 1.27 and 2.15 GiB reserved and unusable beside
# requests of 3.07, 1.54 and 3.07 GiB (0.39, 0.83 and 0.70 of the request). FITTED on those
# 84 cap checks (benchmarks/recheck_caps.py): every value in roughly (0.62, 0.91) agrees with
# all of them; 0.85 is near the top, the pessimistic side, so it is not an independent
# validation.
NATIVE_FRAGMENTATION = 0.85

COMPONENTS = (
    "weights",
    "master_weights",
    "gradients",
    "optimizer_state",
    "update_direction",
    "dynamics_model",
    "activations",
    "autocast_cache",
    "logits_and_loss",
    "temporaries",
    "workspace",
    "inputs",
    "allocator_rounding",
)


# Sanity bounds on what is planned, refused before the replay starts. The replay walks every
# layer several times per phase (about 0.2 ms per layer on a laptop core), so depth sets the
# time; 1,024 layers is 8x the deepest published dense LLMs (Llama 3.1 405B: 126) and plans
# in well under a second. 10^13 parameters is 5x the largest dense models reported (about
# 2 x 10^12): 20 TB of bf16 weights alone, beyond any host, let alone a GPU. A config past
# either bound is a typo or a unit error (a width in bytes, a layer count with extra zeros).
MAX_LAYERS = 1024
MAX_PARAMS = 10**13


def check_plannable(spec: ModelSpec) -> None:
    """Refuse absurd specs at once (``MAX_LAYERS``, ``MAX_PARAMS``) instead of replaying them
    for minutes."""
    if spec.n_layer > MAX_LAYERS:
        raise PlannerError(
            f"{spec.name}: {spec.n_layer} layers is more than the planner's bound of "
            f"{MAX_LAYERS} (8x the deepest published LLMs); check the config's layer count"
        )
    if spec.num_params > MAX_PARAMS:
        raise PlannerError(
            f"{spec.name}: {spec.num_params:.3g} parameters is more than the planner's bound "
            f"of {MAX_PARAMS:.0e} (5x the largest models reported); check the config's sizes"
        )


def _round(nbytes: int) -> int:
    return 0 if nbytes <= 0 else -(-nbytes // ALLOC_ROUND) * ALLOC_ROUND


@dataclass
class PhaseEstimate:
    """One phase: the allocated peak, where it happens and what is alive there."""

    phase: str
    peak_bytes: int
    peak_at: str  # e.g. "backward: cross-entropy"
    components: dict[str, int]  # bytes per component at the peak (sums to peak_bytes)
    stage_peaks: dict[str, int]  # "forward", "backward", "optimizer" -> allocated peak
    segment_slack_bytes: int  # native allocator: 2 MiB segment rounding of the live blocks
    # the largest block allocated during the step (not model state) alive at the peak: for
    # GPT-2 one of the [N, V] logits / loss buffers
    largest_transient_bytes: int = 0
    largest_transient_component: str = ""  # its component, e.g. "logits_and_loss"
    allocator: str = "native"  # which allocator allocator_slack_bytes models

    @property
    def allocator_slack_bytes(self) -> int:
        """Reserved minus allocated at the peak under ``allocator`` (see
        :func:`allocator_slack_bytes`)."""
        return allocator_slack_bytes(
            self.allocator, self.peak_bytes, self.segment_slack_bytes, self.largest_transient_bytes
        )

    @property
    def reserved_bytes(self) -> int:
        """What the caching allocator holds at this phase's peak: the allocated peak plus the
        allocator's slack. A ``set_per_process_memory_fraction`` cap limits this figure."""
        return self.peak_bytes + self.allocator_slack_bytes

    def to_dict(self) -> dict:
        return dict(
            phase=self.phase,
            peak_bytes=self.peak_bytes,
            peak_at=self.peak_at,
            components=dict(self.components),
            stage_peaks=dict(self.stage_peaks),
            segment_slack_bytes=self.segment_slack_bytes,
            largest_transient_bytes=self.largest_transient_bytes,
            largest_transient_component=self.largest_transient_component,
            allocator=self.allocator,
            allocator_slack_bytes=self.allocator_slack_bytes,
            reserved_bytes=self.reserved_bytes,
        )


def allocator_slack_bytes(
    allocator: str, peak_bytes: int, segment_slack: int, largest_transient: int
) -> int:
    """What the caching allocator reserves beyond the allocated peak, by allocator.

    - "native": the 2 MiB segment rounding of the live blocks (``segment_slack``) plus a
      fragmentation allowance of ``NATIVE_FRAGMENTATION`` times the largest transient block
      alive at the peak (``largest_transient``): see ``NATIVE_FRAGMENTATION``.
    - "expandable": the peak rounded up to whole ``EXPANDABLE_PAGE`` pages, plus one page
      for the partly used pages at the edges of free gaps (only whole free pages are
      unmapped under pressure): 20-40 MiB.
    """
    if allocator == "expandable":
        pages = -(-peak_bytes // EXPANDABLE_PAGE) + 1
        return pages * EXPANDABLE_PAGE - peak_bytes
    return segment_slack + int(NATIVE_FRAGMENTATION * largest_transient)


class PhasePeaks:
    """The run-level view of per-phase estimates (``self.phases``: name -> PhaseEstimate),
    shared by the single-GPU :class:`Estimate` and the per-rank estimate."""

    phases: dict[str, PhaseEstimate]

    @property
    def phase_peak_bytes(self) -> dict[str, int]:
        return {name: p.peak_bytes for name, p in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        # ties go to "full": the phase a reader looks for (Warmup and Correct hold the same)
        order = sorted(self.phases, key=lambda name: name != "full")
        return max(order, key=lambda name: self.phases[name].peak_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.phases[self.peak_phase].peak_bytes

    @property
    def components(self) -> dict[str, int]:
        """The breakdown at the run's peak."""
        return self.phases[self.peak_phase].components

    @property
    def reserved_peak_phase(self) -> str:
        order = sorted(self.phases, key=lambda name: name != "full")
        return max(order, key=lambda name: self.phases[name].reserved_bytes)

    @property
    def reserved_peak_bytes(self) -> int:
        """The highest reserved figure over the phases (allocated peak + the allocator's
        slack): what a ``set_per_process_memory_fraction`` cap must hold."""
        return self.phases[self.reserved_peak_phase].reserved_bytes

    @property
    def allocator(self) -> str:
        return self.phases[self.peak_phase].allocator


@dataclass
class Estimate(PhasePeaks):
    """The estimate for one model and setup. ``phase_peak_bytes["full"]`` etc. are the
    allocated peaks (``torch.cuda.max_memory_allocated`` reset at phase boundaries);
    ``peak_bytes`` is the maximum over the phase plan; ``cuda_context_bytes`` is apart;
    ``host_bytes``: what the setup keeps in host memory (the offloaded optimizer state,
    ``host_state_bytes``)."""

    spec: ModelSpec
    setup: TrainSetup
    phases: dict[str, PhaseEstimate]
    cuda_context_bytes: int = CUDA_CONTEXT
    notes: list[str] = field(default_factory=list)
    host_bytes: int = 0

    def device_bytes(self) -> int:
        """What the GPU must hold: the reserved peak (allocated + the allocator's slack, the
        highest over the phases) plus the CUDA context."""
        return self.reserved_peak_bytes + self.cuda_context_bytes

    def with_allocator(self, allocator: str) -> Estimate:
        """The same estimate under another allocator: the allocated figures do not change,
        only the reserved ones (no second replay)."""
        setup = self.setup.replace(allocator=allocator)
        phases = {n: replace(p, allocator=setup.allocator) for n, p in self.phases.items()}
        return Estimate(
            self.spec, setup, phases, self.cuda_context_bytes, list(self.notes), self.host_bytes
        )

    def to_dict(self) -> dict:
        return dict(
            model=self.spec.name,
            family=self.spec.family,
            num_params=self.spec.num_params,
            setup=self.setup.to_dict(),
            phase_peak_bytes=self.phase_peak_bytes,
            peak_phase=self.peak_phase,
            peak_bytes=self.peak_bytes,
            allocator=self.setup.allocator,
            reserved_peak_bytes=self.reserved_peak_bytes,
            cuda_context_bytes=self.cuda_context_bytes,
            device_bytes=self.device_bytes(),
            host_bytes=self.host_bytes,
            phases={name: p.to_dict() for name, p in self.phases.items()},
            notes=list(self.notes),
        )


# --------------------------------------------------------------------------- the replay


class _Timeline:
    """Live allocations by component; records the peak, its place and its breakdown."""

    def __init__(self) -> None:
        # handle -> (component, bytes, rounded bytes, allocated during the step)
        self._live: dict[int, tuple[str, int, int, bool]] = {}
        self._next = 0
        self.exact: dict[str, int] = defaultdict(int)
        self.rounding = 0
        self.slack = 0
        self.total = 0
        self.stage = "setup"
        self.where = ""
        self.peak = -1
        self.peak_at: tuple[str, str] = ("setup", "")
        self._pending = False
        self.peak_components: dict[str, int] = {}
        self.peak_slack = 0
        self.stage_peaks: dict[str, int] = {}
        # Rounded sizes of the live blocks allocated during the step (not the model state),
        # size -> count: the largest one alive at the peak sizes the native allocator's
        # fragmentation allowance (see allocator_slack_bytes).
        self._transient: dict[int, int] = defaultdict(int)
        self._transient_component: dict[int, str] = {}
        self.peak_transient = 0
        self.peak_transient_component = ""

    def alloc(self, component: str, nbytes: int | float, fragments: bool = True) -> int:
        """A block; ``fragments=False`` keeps a transient block out of the native allocator's
        fragmentation allowance (see _Step.optimizer_step)."""
        nbytes = int(nbytes)
        rounded = _round(nbytes)
        handle = self._next
        self._next += 1
        transient = self.stage != "setup" and fragments
        self._live[handle] = (component, nbytes, rounded, transient)
        if transient and rounded:
            self._transient[rounded] += 1
            self._transient_component[rounded] = component
        self.exact[component] += nbytes
        self.rounding += rounded - nbytes
        if rounded > LARGE_BLOCK:
            self.slack += -(-rounded // SEGMENT_ROUND) * SEGMENT_ROUND - rounded
        self.total += rounded
        self._observe()
        return handle

    def free(self, *handles: int | None) -> None:
        self._snapshot()
        for handle in handles:
            if handle is None:
                continue
            component, nbytes, rounded, transient = self._live.pop(handle)
            if transient and rounded:
                self._transient[rounded] -= 1
                if not self._transient[rounded]:
                    del self._transient[rounded]
            self.exact[component] -= nbytes
            self.rounding -= rounded - nbytes
            if rounded > LARGE_BLOCK:
                self.slack -= -(-rounded // SEGMENT_ROUND) * SEGMENT_ROUND - rounded
            self.total -= rounded

    def at(self, stage: str, where: str) -> None:
        self.stage, self.where = stage, where

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (``torch.cuda.reset_peak_memory_stats``);
        the stage peaks already recorded stay."""
        self._snapshot()
        self.peak = -1
        self._observe()

    def _observe(self) -> None:
        if self.stage != "setup" and self.total > self.stage_peaks.get(self.stage, 0):
            self.stage_peaks[self.stage] = self.total
        if self.total > self.peak:
            self.peak = self.total
            self.peak_at = (self.stage, self.where)
            self._pending = True  # the breakdown is taken before the next free lowers it

    def _snapshot(self) -> None:
        if self._pending:
            self._pending = False
            self.peak_components = {c: v for c, v in self.exact.items() if v}
            self.peak_components["allocator_rounding"] = self.rounding
            self.peak_slack = self.slack
            self.peak_transient = max(self._transient, default=0)
            self.peak_transient_component = self._transient_component.get(self.peak_transient, "")

    def result(self, phase: str) -> PhaseEstimate:
        self._snapshot()
        stage, where = self.peak_at
        peak_at = f"{stage}: {where}" if where else stage
        components = {c: self.peak_components.get(c, 0) for c in COMPONENTS}
        return PhaseEstimate(
            phase,
            self.peak,
            peak_at,
            components,
            dict(self.stage_peaks),
            self.peak_slack,
            largest_transient_bytes=self.peak_transient,
            largest_transient_component=self.peak_transient_component,
        )


@functools.lru_cache(maxsize=32)
def dynamics_model_params(num_groups: int) -> int:
    """Parameters of HybridTrainer's default dynamics model (the RSSM ensemble with
    ``DynamicsConfig``'s defaults) for ``num_groups`` segment groups, from the model's own
    shape count (``DynamicsModel.parameter_count``, tested against a built model)."""
    from hybrid_triton.dynamics import DynamicsModel

    return DynamicsModel.parameter_count(num_groups)


def direction_groups(spec: ModelSpec, max_groups: int = 16) -> list[int]:
    """Element counts of HybridTrainer's segment groups (``trainer.segment_groups``): runs of
    parameters with the same module prefix up to the layer index, the two smallest neighbours
    merged until at most ``max_groups`` remain."""

    def module_name(name: str) -> str:
        if spec.family == "gpt2":
            return f"transformer.{name}"
        return name if name.startswith("lm_head") else f"model.{name}"

    def key(name: str) -> str:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                return ".".join(parts[: i + 1])
        return parts[0] if len(parts) > 1 else name

    sizes: list[int] = []
    last = None
    for p in spec.params:
        k = key(module_name(p.name))
        if k != last:
            sizes.append(0)
            last = k
        sizes[-1] += p.numel
    return merge_smallest_neighbours(sizes, max_groups)


def merge_smallest_neighbours(sizes: list[int], max_groups: int) -> list[int]:
    """Merge the adjacent pair with the smallest sum (the leftmost on ties) until at most
    ``max_groups`` remain, as the trainer's ``segment_groups`` does by rescanning the list
    after each merge. Here a heap of pair sums over a linked list finds each pair, so a model
    of ``n`` groups takes O(n log n) instead of O(n^2) (10,000 layers: milliseconds, not
    seconds). Each pair is keyed by (sum, original index of its left group): original
    indices keep the list's order, so the tie-break is the rescan's leftmost pair."""
    n = len(sizes)
    if n <= max_groups:
        return list(sizes)
    size = list(sizes)
    nxt = list(range(1, n + 1))  # n: no right neighbour
    prv = list(range(-1, n - 1))
    alive = [True] * n
    version = [0] * n  # bumped when a group grows: pairs pushed before are stale
    heap = [(size[i] + size[i + 1], i, 0, 0) for i in range(n - 1)]
    heapq.heapify(heap)
    remaining = n
    while remaining > max_groups:
        total, i, ver_left, ver_right = heapq.heappop(heap)
        j = nxt[i]
        if not alive[i] or j >= n or version[i] != ver_left or version[j] != ver_right:
            continue
        size[i] = total
        version[i] += 1
        alive[j] = False
        nxt[i] = k = nxt[j]
        if k < n:
            prv[k] = i
            heapq.heappush(heap, (total + size[k], i, version[i], version[k]))
        if prv[i] >= 0:
            h = prv[i]
            heapq.heappush(heap, (size[h] + total, h, version[h], version[i]))
        remaining -= 1
    return [size[i] for i in range(n) if alive[i]]


def host_state_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """Host memory the setup keeps: with ``offload="cpu"`` the optimizer state (its moments
    at ``state_bits``, laid out as on the GPU: flat over the model for the toolkit's arena,
    per parameter otherwise). Copies the trainer makes for its Predict phases are not
    counted."""
    if setup.offload != "cpu":
        return 0
    moments = {"adamw": 2, "sgd": 1, "none": 0}[setup.optimizer]
    arena = setup.grad_mode != "full" or setup.master_weights
    sizes = [spec.num_params] if arena else [p.numel for p in spec.params]
    return moments * sum(sum(_state_tensor_bytes(n, setup.state_bits)) for n in sizes)


def _state_tensor_bytes(numel: int, bits: int) -> list[int]:
    """Bytes of one moment tensor (and its scales) at ``bits`` bits."""
    if bits == 32:
        return [4 * numel]
    if bits == 16:
        return [2 * numel]
    block = STATE_BLOCK[bits]
    blocks = math.ceil(numel / block)
    codes = numel if bits == 8 else blocks * block // 2  # 4-bit: padded to whole blocks
    return [codes, 4 * blocks]


class _Step:
    """Replays one phase's steps for a transformer family on a _Timeline."""

    def __init__(self, spec: ModelSpec, setup: TrainSetup, phase: str) -> None:
        self.spec, self.setup, self.phase = spec, setup, phase
        self.tl = _Timeline()
        self.r = DTYPE_BYTES[setup.param_dtype]  # parameters, residual stream, .grad
        self.c = DTYPE_BYTES[setup.compute_dtype]  # matmul inputs/outputs, attention
        self.autocast = setup.autocast is not None
        self.N = setup.tokens_per_micro_batch
        self.train = phase != "predict"
        self.arena = setup.grad_mode != "full" or setup.master_weights  # flat buffers
        self.trainer = setup.trainer
        self.grads: dict[str, int] = {}  # param name -> handle of its .grad (full mode)
        self.cache: dict[str, int] = {}  # param name -> handle of its autocast copy
        self.logits: int | None = None
        self.held_head_grad: int | None = None  # fused loss: the head's part of the tied grad
        by_block: dict[int, list[ParamTensor]] = defaultdict(list)
        self.outside: list[ParamTensor] = []
        for p in spec.params:
            parts = p.name.split(".")
            if parts[0] in ("h", "layers") and parts[1].isdigit():
                by_block[int(parts[1])].append(p)
            else:
                self.outside.append(p)
        self.block_params = [by_block[i] for i in range(spec.n_layer)]
        self.lm_head = (
            next(p for p in spec.params if p.name in ("wte", "lm_head.weight"))
            if spec.family == "gpt2"
            else next(
                p
                for p in spec.params
                if p.name == ("embed_tokens" if spec.tied_embeddings else "lm_head.weight")
            )
        )

    # ---- model state -------------------------------------------------------------------

    def model_state(self) -> None:
        tl, s, P = self.tl, self.setup, self.spec.num_params
        tl.at("setup", "model state")
        for p in self.spec.params:
            tl.alloc("weights", p.numel * self.r)
        self.master = tl.alloc("master_weights", 4 * P) if s.master_weights else None
        self.moments: list[int] = []
        if s.offload == "none":
            bits = s.state_bits
            if not self.train and s.predict_moments == "compress" and not self.trainer:
                bits = min(bits, 8)
            keep = self.train or self.trainer or s.predict_moments in ("keep", "compress")
            if keep:  # the trainer still holds them when Predict begins
                self.moments = self.alloc_moments(bits)
        self.direction: list[int] = []
        if not self.train and not self.trainer:
            self.direction = self.alloc_direction()
        if self.train and self.trainer and self.phase == "correct":
            self.direction = self.alloc_direction()  # kept through Correct for the residuals
        if self.trainer:
            # The trainer's device-side dynamics model (RSSM, fp32): its weights always; with a
            # Predict phase in the run it trains on Full steps, so also its gradients and two
            # Adam moments (16 bytes per parameter in all).
            per_param = 16 if "predict" in s.phases else 4
            groups = len(direction_groups(self.spec))
            tl.alloc("dynamics_model", per_param * dynamics_model_params(groups))
        self.accumulator = None
        if s.grad_mode != "full" and (self.train or self.trainer):
            # The fp32 accumulator (hook) or the flat buffer in the parameter dtype (flat):
            # both allocated once and alive through every backward step.
            width = 4 if s.grad_mode == "hook" else self.r
            self.accumulator = tl.alloc("gradients", width * P)
        tl.alloc("workspace", CUBLAS_WORKSPACE)
        tl.alloc("inputs", 8 * self.N)  # idx
        tl.alloc("inputs", 8 * self.N)  # targets: the Predict forward still computes the loss
        if s.logits_lifetime == "next_forward" and self.train:
            # the previous step's logits, held by the caller until this forward returns
            self.logits = tl.alloc("logits_and_loss", self.c * self.N * self.spec.vocab_size)

    def alloc_moments(self, bits: int) -> list[int]:
        tl, s, P = self.tl, self.setup, self.spec.num_params
        moments = {"adamw": 2, "sgd": 1, "none": 0}[s.optimizer]
        out = []
        if self.arena:  # flat buffers over the whole model
            for _ in range(moments):
                for nbytes in _state_tensor_bytes(P, bits):
                    out.append(tl.alloc("optimizer_state", nbytes))
        else:  # torch optimizer: per-parameter state and a device step counter
            for p in self.spec.params:
                for _ in range(moments):
                    for nbytes in _state_tensor_bytes(p.numel, bits):
                        out.append(tl.alloc("optimizer_state", nbytes))
                if s.optimizer == "adamw":
                    out.append(tl.alloc("optimizer_state", 4))
        return out

    def alloc_direction_group(self, numel: int) -> list[int]:
        """One segment group's frozen update direction (``quantize_blockwise`` per group,
        int8): 1 B per element + an fp32 scale per block of the group."""
        return [
            self.tl.alloc("update_direction", numel),
            self.tl.alloc("update_direction", 4 * math.ceil(numel / DIRECTION_BLOCK)),
        ]

    def alloc_direction(self) -> list[int]:
        """The whole frozen update direction: a list of per-group int8 tensors."""
        return [h for n in direction_groups(self.spec) for h in self.alloc_direction_group(n)]

    def enter_predict(self) -> None:
        """HybridTrainer's Predict entry: free the accumulator, build the Adam direction from
        the moments (fp32 temporaries), quantize it, then offload the moments per policy."""
        tl, s = self.tl, self.setup
        tl.at("predict entry", "Adam direction")
        tl.free(self.accumulator)
        self.accumulator = None
        # The direction is built and quantized one segment group at a time, in arena order
        # (HybridTrainer._enter_predict over _direction_groups): the moments of one group are
        # read (8/4-bit: only the quantization blocks covering it are decoded), the group's
        # fp32 direction is made and quantized into its own int8 tensor. So while group i is
        # built only groups 0..i-1's compact directions exist (GPT-2's largest group, the
        # embeddings, comes first, beside no direction at all).
        self.direction = []
        build = s.optimizer == "adamw" and self.moments
        for numel in direction_groups(self.spec):
            if build:  # the decode / direction temporaries at their worst point
                tl.free(tl.alloc("temporaries", PREDICT_ENTRY_TEMP_BYTES[s.state_bits] * numel))
                fp32_direction = tl.alloc("temporaries", 4 * numel)  # alive while quantized
            else:
                fp32_direction = None
            self.direction += self.alloc_direction_group(numel)
            tl.free(fp32_direction)
        if s.predict_moments in ("offload", "drop", "compress"):
            tl.free(*self.moments)
            self.moments = []
            if s.predict_moments == "compress":
                self.moments = self.alloc_moments(min(s.state_bits, 8))
        if self.master is not None and s.param_dtype == "bf16":
            # TrainerConfig.predict_master="host" (the default): the rollback snapshot in host
            # memory is the master's copy; the bf16 weights take the predicted steps in place
            # (stochastic rounding) and the master comes back at Predict exit.
            tl.free(self.master)
            self.master = None

    # ---- helpers -----------------------------------------------------------------------

    def act(self, width: int | float, nbytes: int, component: str = "activations") -> int:
        return self.tl.alloc(component, nbytes * width * self.N)

    def weight_copy(self, p: ParamTensor) -> None:
        """Autocast casts a linear weight/bias to the compute dtype once per forward."""
        if self.autocast and p.kind == "linear" and p.name not in self.cache:
            self.cache[p.name] = self.tl.alloc("autocast_cache", self.c * p.numel)

    def param_grad(self, p: ParamTensor, from_matmul: bool = True) -> None:
        """Backward produced ``p``'s gradient: store, accumulate or fold it."""
        tl, r = self.tl, self.r
        low = None
        if self.autocast and from_matmul and p.kind == "linear":
            low = tl.alloc("temporaries", self.c * p.numel)  # the matmul's bf16 gradient
        incoming = tl.alloc("temporaries", r * p.numel)  # cast back to the parameter dtype
        tl.free(low)
        if self.setup.grad_mode != "full":
            # hook: folded into the fp32 accumulator by the hook, then dropped; flat: added
            # in place into the parameter's .grad view of the flat buffer, then dropped
            tl.free(incoming)
        elif p.name in self.grads:
            tl.free(incoming)  # added in place to the existing .grad
        else:
            tl.free(incoming)  # AccumulateGrad steals it: it becomes the .grad
            self.grads[p.name] = tl.alloc("gradients", r * p.numel)
        if p.name in self.cache and from_matmul:
            tl.free(self.cache.pop(p.name))  # the saved weight copy dies with its node

    # ---- one transformer block ---------------------------------------------------------

    def _dims(self) -> tuple[int, int, int, int]:
        sp = self.spec
        q = sp.n_head * (sp.head_dim if sp.family == "gpt2" else self._llama_head_dim())
        kv = sp.n_kv_head * (q // sp.n_head)
        return sp.d_model, q, kv, sp.d_ff

    def _llama_head_dim(self) -> int:
        for p in self.spec.params:
            if p.name.endswith("attn.q_proj.weight"):
                return p.numel // self.spec.d_model // self.spec.n_head
        return self.spec.head_dim

    def block_forward(self, i: int, x: int, save: bool) -> tuple[int, dict[str, int]]:
        """Forward of block ``i`` on the residual ``x`` (a handle). Returns the output handle
        and the handles it saved (empty when ``save`` is false: no_grad or checkpointed)."""
        tl, r, c, sp = self.tl, self.r, self.c, self.spec
        d, q, kv, f = self._dims()
        H = sp.n_head
        gelu = sp.family == "gpt2"
        saved: dict[str, int] = {}
        tl.at(tl.stage, f"block {i} attention")
        for p in self.block_params[i]:
            self.weight_copy(p)
        norm_out = self.act(d, r)  # norm output in the parameter dtype
        stats = self.act(1, 8) if save else None  # fp32 mean + rstd (RMSNorm: rstd only)
        if self.autocast:
            a_in = self.act(d, c)
            tl.free(norm_out)
        else:
            a_in = norm_out
        qkv = self.act(q + 2 * kv, c)
        if not gelu:  # RoPE writes rotated q, k; the unrotated ones are not saved
            rot = self.act(q + kv, c)
            tl.free(qkv)
            qkv = rot
            v = self.act(kv, c)
        else:
            v = None
        if not save:
            tl.free(a_in)
        math_probs = None
        if self.setup.attention == "math":
            scores = self.act(H * self.setup.seq_len, c, "temporaries")
            math_probs = self.act(H * self.setup.seq_len, c)
            tl.free(scores)
        out = self.act(q, c)
        lse = self.act(H, 4) if self.setup.attention == "flash" else None
        if self.setup.attention == "math":
            proj_in = self.act(q, c)  # transpose().contiguous() copies [B, H, T, D]
            tl.free(out)
            out = None
        else:
            proj_in = None  # flash's output already has the [B, T, H, D] layout
        if not save:
            tl.free(qkv, v, lse, math_probs)
        y = self.act(d, c, "temporaries")
        tl.free(out if not save else None, proj_in if not save else None)
        x1 = self.act(d, r)
        tl.free(y)
        if not save:
            tl.free(x)  # the block input is only kept when saved (or by the checkpoint)
        tl.at(tl.stage, f"block {i} MLP")
        norm2 = self.act(d, r)
        stats2 = self.act(1, 8) if save else None
        if self.autocast:
            m_in = self.act(d, c)
            tl.free(norm2)
        else:
            m_in = norm2
        hidden = [self.act(f, c)]  # c_fc out (GELU) / gate (SwiGLU)
        if not gelu:
            hidden.append(self.act(f, c))  # up
        hidden.append(self.act(f, c))  # gelu(h) / silu(gate)
        if not gelu:
            hidden.append(self.act(f, c))  # silu(gate) * up
        if not save:
            tl.free(m_in, *hidden[:-1])
        z = self.act(d, c, "temporaries")
        if not save:
            tl.free(hidden[-1])
        x2 = self.act(d, r)
        tl.free(z)
        if save:
            saved = dict(
                x=x,
                stats=stats,
                a_in=a_in,
                qkv=qkv,
                v=v,
                probs=math_probs,
                out=out,
                lse=lse,
                proj_in=proj_in,
                x1=x1,
                stats2=stats2,
                m_in=m_in,
            )
            saved.update({f"hidden{k}": h for k, h in enumerate(hidden)})
        else:
            tl.free(x1)
        return x2, saved

    def block_backward(self, i: int, g: int, saved: dict[str, int]) -> int:
        """Backward of block ``i``: ``g`` is the gradient of its output; returns the gradient
        of its input. Frees each saved tensor once its node has run."""
        tl, r, c, sp = self.tl, self.r, self.c, self.spec
        d, q, kv, f = self._dims()
        H = sp.n_head
        gelu = sp.family == "gpt2"
        params = {p.name.split(".", 2)[2]: p for p in self.block_params[i]}
        mlp_p = [p for k, p in params.items() if k.startswith("mlp.")]
        norm2_p = [p for k, p in params.items() if k.startswith(("ln_2", "post_attention"))]
        attn_p = [p for k, p in params.items() if k.startswith("attn.")]
        norm1_p = [p for k, p in params.items() if k.startswith(("ln_1", "input_layernorm"))]
        tl.at("backward", f"block {i} MLP")
        gm = self.act(d, c, "temporaries") if self.autocast else None  # grad cast to bf16
        hidden = [saved.pop(f"hidden{k}") for k in range(2 if gelu else 4)]
        gh = self.act(f, c, "temporaries")  # grad of the down projection's input
        for p in mlp_p:
            if p.name.endswith(("c_proj.weight", "c_proj.bias", "down_proj.weight")):
                self.param_grad(p)
        tl.free(gm, hidden[-1])
        if gelu:
            gh2 = self.act(f, c, "temporaries")  # GELU backward
            tl.free(gh, hidden[0])
        else:
            g_up = self.act(f, c, "temporaries")  # grad of up: gh * silu(gate)
            g_silu = self.act(f, c, "temporaries")  # grad of silu(gate): gh * up
            tl.free(gh, hidden[2], hidden[1])
            gh2 = self.act(f, c, "temporaries")  # silu backward -> grad of gate
            tl.free(g_silu, hidden[0])
            gh2b = g_up
        g_min = self.act(d, c, "temporaries")  # grad of the MLP input
        for p in mlp_p:
            if not p.name.endswith(("c_proj.weight", "c_proj.bias", "down_proj.weight")):
                self.param_grad(p)
        tl.free(gh2, None if gelu else gh2b, saved.pop("m_in"))
        if self.autocast:
            g_norm = self.act(d, r, "temporaries")
            tl.free(g_min)
        else:
            g_norm = g_min
        g_x1 = self.act(d, r, "temporaries")  # norm backward
        for p in norm2_p:
            self.param_grad(p, from_matmul=False)
        tl.free(g_norm, saved.pop("stats2"), saved.pop("x1"))
        # the residual's gradient and the MLP branch's are summed in place into one buffer
        tl.free(g)
        tl.at("backward", f"block {i} attention")
        ga = self.act(d, c, "temporaries") if self.autocast else None
        g_out = self.act(q, c, "temporaries")  # grad of the attention output
        for p in attn_p:
            if p.name.endswith(("c_proj.weight", "c_proj.bias", "o_proj.weight")):
                self.param_grad(p)
        tl.free(ga, saved.pop("proj_in"))
        if self.setup.attention == "flash":
            g_qkv = self.act(q + 2 * kv, c, "temporaries")  # dq, dk, dv
            # flash attention 2 accumulates dq in fp32, plus a [B, H, T] fp32 softmax term
            accum = self.act(q, 4, "temporaries") if c < 4 else None
            delta = self.act(H, 4, "temporaries")
            tl.free(accum, delta)
        else:
            gp = self.act(H * self.setup.seq_len, c, "temporaries")
            gs = self.act(H * self.setup.seq_len, c, "temporaries")
            g_qkv = self.act(q + 2 * kv, c, "temporaries")
            tl.free(gp, gs)
        tl.free(
            g_out,
            saved.pop("qkv"),
            saved.pop("v"),
            saved.pop("out"),
            saved.pop("lse"),
            saved.pop("probs"),
        )
        if gelu:  # split's backward concatenates dq, dk, dv into the fused grad
            cat = self.act(q + 2 * kv, c, "temporaries")
            tl.free(g_qkv)
            g_qkv = cat
        else:  # RoPE backward on dq, dk
            rot = self.act(q + kv, c, "temporaries")
            tl.free(rot)
        g_ain = self.act(d, c, "temporaries")
        for p in attn_p:
            if not p.name.endswith(("c_proj.weight", "c_proj.bias", "o_proj.weight")):
                self.param_grad(p)
        tl.free(g_qkv, saved.pop("a_in"))
        if self.autocast:
            g_norm = self.act(d, r, "temporaries")
            tl.free(g_ain)
        else:
            g_norm = g_ain
        g_x = self.act(d, r, "temporaries")
        for p in norm1_p:
            self.param_grad(p, from_matmul=False)
        tl.free(g_norm, saved.pop("stats"), saved.pop("x"))
        tl.free(g_x1)  # summed in place into g_x
        return g_x

    # ---- one micro-batch ---------------------------------------------------------------

    def micro_batch(self) -> None:
        tl, s, sp, r, c = self.tl, self.setup, self.spec, self.r, self.c
        V, d = sp.vocab_size, sp.d_model
        train = self.train
        ckpt = s.checkpointing and train
        checkpointed = set(
            range(sp.n_layer if s.checkpoint_blocks is None else s.checkpoint_blocks)
        )
        tl.at("forward", "embedding")
        for p in self.outside:
            if p is self.lm_head:
                continue
            self.weight_copy(p)
        emb = self.act(d, r)
        x = self.act(d, r)  # token + position embedding (Llama: the lookup itself)
        tl.free(emb)
        saved_blocks: dict[int, dict[str, int]] = {}
        kept_inputs: dict[int, int] = {}
        for i in range(sp.n_layer):
            if ckpt and i in checkpointed:
                kept_inputs[i] = x  # the checkpoint keeps the block input alive
                x_next, _ = self.block_forward(i, self._alias(x), save=False)
            else:
                x_next, saved = self.block_forward(i, x, save=train)
                saved_blocks[i] = saved
            x = x_next
        tl.at("forward", "final norm and logits")
        fused = train and sp.family == "gpt2" and s.fused_loss
        if not fused:  # the fused loss casts the weight itself, outside autocast's cache
            self.weight_copy(self.lm_head)
        norm_out = self.act(d, r)
        if not train and sp.family == "gpt2" and s.loss_chunk_tokens > 0:
            self.chunked_loss(x, norm_out)
            return
        if fused:
            g = self.fused_loss(x, norm_out, kept_inputs if ckpt else {})
            self.blocks_backward(g, saved_blocks, kept_inputs)
            return
        stats = self.act(1, 8) if train else None
        if self.autocast:
            head_in = self.act(d, c)
            tl.free(norm_out)
        else:
            head_in = norm_out
        if not train:
            tl.free(x)
        logits = self.act(V, c, "logits_and_loss")
        if not train:
            tl.free(head_in)
        tl.at("forward", "cross-entropy")
        # F.cross_entropy calls log_softmax(logits, dtype=logits.dtype): autocast leaves an
        # explicit dtype alone, so the log-probabilities (saved by LogSoftmaxBackward) are in
        # the compute dtype. nll_loss is on autocast's fp32 list: it casts them to fp32 and
        # saves that copy (NllLossBackward needs its input) until its backward has run.
        log_probs = self.act(V, c, "logits_and_loss")
        nll_in = self.act(V, 4, "logits_and_loss") if self.autocast else None
        if self.logits is not None:  # the previous step's logits die when forward returns
            tl.free(self.logits)
            self.logits = None
        tl.free(*(h for name, h in self.cache.items() if name.endswith(".bias")))
        self.cache = {k: h for k, h in self.cache.items() if not k.endswith(".bias")}
        if ckpt:  # autocast's cache is cleared on exit; checkpointed blocks saved no copies
            self._drop_checkpointed_copies(kept_inputs)
        if not train:
            tl.free(nll_in, log_probs, logits)
            for h in self.cache.values():
                tl.free(h)
            self.cache = {}
            return
        if s.logits_lifetime == "loss_only":
            tl.free(logits)
            logits = None
        # ---- backward
        tl.at("backward", "cross-entropy")
        # nll_loss_backward: a zero-filled gradient of its input (fp32 under autocast)
        g_nll = self.act(V, 4 if self.autocast else c, "logits_and_loss")
        if self.autocast:
            tl.free(nll_in)  # released once NllLossBackward has run
            g_lp = self.act(V, c, "logits_and_loss")  # the cast's backward: back to bf16
            tl.free(g_nll)
        else:
            g_lp = g_nll
        # _log_softmax_backward_data writes the logits' gradient in the compute dtype
        g_logits = self.act(V, c, "logits_and_loss")
        tl.free(g_lp, log_probs)
        tl.at("backward", "output head")
        g_head = self.act(d, c, "temporaries")
        self.param_grad(self.lm_head)
        tl.free(g_logits, head_in)
        if self.autocast:
            g_norm = self.act(d, r, "temporaries")
            tl.free(g_head)
        else:
            g_norm = g_head
        g = self.act(d, r, "temporaries")
        for p in self.outside:
            if p.kind == "norm":
                self.param_grad(p, from_matmul=False)
        tl.free(g_norm, stats, x)
        self.blocks_backward(g, saved_blocks, kept_inputs)
        self.logits = logits  # None for "loss_only"; freed by the next forward or the step

    def _drop_checkpointed_copies(self, kept_inputs: dict[int, int]) -> None:
        for i in kept_inputs:
            for p in self.block_params[i]:
                if p.name in self.cache:
                    self.tl.free(self.cache.pop(p.name))

    def blocks_backward(
        self, g: int, saved_blocks: dict[int, dict[str, int]], kept_inputs: dict[int, int]
    ) -> None:
        """Backward through the blocks (recomputing the checkpointed ones) and the
        embeddings, from ``g``, the gradient of the last block's output."""
        tl = self.tl
        for i in reversed(range(self.spec.n_layer)):
            if i in kept_inputs:
                tl.at("backward", f"block {i} recompute")
                for p in self.block_params[i]:
                    self.weight_copy(p)
                _, saved = self._recompute(i, kept_inputs.pop(i))
            else:
                saved = saved_blocks.pop(i)
            g = self.block_backward(i, g, saved)
        tl.at("backward", "embeddings")
        for p in self.outside:
            if p.kind == "norm" or p.name == "lm_head.weight":
                continue
            self.param_grad(p, from_matmul=False)  # dense embedding gradient, then stored
        tl.free(g, self.held_head_grad)  # the output head's part joined it (tied weight)
        self.held_head_grad = None

    def fused_loss(self, x: int, norm_out: int, kept_inputs: dict[int, int]) -> int:
        """GPT2 with ``fused_loss`` (hybrid_triton.models.fused_loss.linear_cross_entropy,
        gradients made during forward), then backward as far as the last block's output
        gradient, which it returns. Forward: under autocast the final norm's output and the
        weight are cast to the compute dtype; ``[N, d]`` gradient buffer (compute dtype), fp32
        ``[V, d]`` accumulator; per chunk of ``C = min(loss_chunk_tokens, N)`` positions the
        logits (compute dtype, overwritten in place with their gradient by the row kernel) and,
        below fp32, the chunk's ``[V, d]`` product beside the accumulator; then both gradients
        in the parameter dtype (a copy when it differs), kept for backward. Chunks reuse the
        same sizes, so one chunk is the peak."""
        tl, s, sp, r, c = self.tl, self.setup, self.spec, self.r, self.c
        V, d = sp.vocab_size, sp.d_model
        C = min(s.loss_chunk_tokens, self.N)
        stats = self.act(1, 8)  # the final norm's mean and rstd, saved
        tl.at("forward", "fused cross-entropy")
        head_in = self.act(d, c, "temporaries") if self.autocast else None
        weight_in = tl.alloc("temporaries", c * V * d) if self.autocast else None
        g_hidden = self.act(d, c, "logits_and_loss")
        g_weight = tl.alloc("logits_and_loss", max(c, 4) * V * d)
        logits = tl.alloc("logits_and_loss", c * C * V)
        row_loss = tl.alloc("logits_and_loss", 4 * C)
        if c < 4:  # the chunk's weight-gradient product, then added to the fp32 accumulator
            tl.free(tl.alloc("logits_and_loss", c * V * d))
        tl.free(logits, row_loss)
        if r != c:
            kept_hidden = self.act(d, r, "logits_and_loss")
            tl.free(g_hidden)
        else:
            kept_hidden = g_hidden
        if r < max(c, 4):
            kept_weight = tl.alloc("logits_and_loss", r * V * d)
            tl.free(g_weight)
        else:
            kept_weight = g_weight
        tl.free(head_in, weight_in, norm_out)  # nothing saves the norm's output
        if self.logits is not None:  # the previous step's logits die when forward returns
            tl.free(self.logits)
            self.logits = None
        tl.free(*(h for name, h in self.cache.items() if name.endswith(".bias")))
        self.cache = {k: h for k, h in self.cache.items() if not k.endswith(".bias")}
        self._drop_checkpointed_copies(kept_inputs)
        # ---- backward: the Function scales both kept gradients by the incoming one
        tl.at("backward", "output head")
        g_norm = self.act(d, r, "temporaries")
        self.held_head_grad = tl.alloc("gradients", r * V * d)
        tl.free(kept_hidden, kept_weight)
        if self.setup.grad_mode == "full":
            # AccumulateGrad steals the summed buffer at the embeddings: it becomes the .grad
            self.grads[self.lm_head.name] = self.held_head_grad
            self.held_head_grad = None
        g = self.act(d, r, "temporaries")  # the final norm's backward
        for p in self.outside:
            if p.kind == "norm":
                self.param_grad(p, from_matmul=False)
        tl.free(g_norm, stats, x)
        return g

    def chunked_loss(self, x: int, norm_out: int) -> None:
        """GPT2._chunked_loss (no_grad with targets): the final norm's output stays whole, the
        logits exist for one chunk of ``C = min(loss_chunk_tokens, N)`` positions at a time.
        Per chunk: ``lm_head`` on the chunk (compute dtype; under autocast the chunk's input is
        cast first), ``.to(fp32)`` (a copy unless already fp32: both alive while it is made),
        then ``F.cross_entropy``'s fp32 log-probabilities beside the fp32 logits; the loss is a
        scalar. Chunks reuse the same sizes, so one chunk is the peak."""
        tl, c, V, d = self.tl, self.c, self.spec.vocab_size, self.spec.d_model
        C = min(self.setup.loss_chunk_tokens, self.N)
        tl.free(x)  # the last block's output dies once the final norm has run
        tl.at("forward", "chunked cross-entropy")
        head_in = tl.alloc("temporaries", c * C * d) if self.autocast else None
        logits = tl.alloc("logits_and_loss", c * C * V)
        tl.free(head_in)
        if c < 4:
            logits32 = tl.alloc("logits_and_loss", 4 * C * V)
            tl.free(logits)
            logits = logits32
        log_probs = tl.alloc("logits_and_loss", 4 * C * V)
        tl.free(log_probs, logits, norm_out)
        if self.logits is not None:
            tl.free(self.logits)
            self.logits = None
        for h in self.cache.values():  # autocast's cache is cleared on exit
            tl.free(h)
        self.cache = {}

    def _alias(self, handle: int) -> int:
        """A second reference to a live tensor (the checkpoint keeps the original)."""
        return self.tl.alloc(self.tl._live[handle][0], 0)

    def _recompute(self, i: int, x_in: int) -> tuple[int, dict[str, int]]:
        x_out, saved = self.block_forward(i, x_in, save=True)
        self.tl.free(x_out)  # the recomputed output is not needed
        return x_out, saved

    def optimizer_step(self) -> None:
        tl = self.tl
        tl.at("optimizer", "step")
        before = None
        # Correct keeps the master weights as they were before the step (the residual); with
        # a Predict phase in the run, Full steps do too (the update norms that feed the
        # trainer's device-side dynamics model, HybridTrainer._update_norms).
        observes = self.phase == "full" and "predict" in self.setup.phases
        # The trainer's master-size fp32 blocks here are kept out of the fragmentation
        # allowance: it was fitted on vocabulary-sized buffers (NATIVE_FRAGMENTATION), and no
        # capped run has checked it on these.
        if self.trainer and (self.phase == "correct" or observes):
            before = tl.alloc("temporaries", 4 * self.spec.num_params, fragments=False)
        tl.alloc("temporaries", 0)  # a point on the timeline: the fused step has no temporaries
        if before is not None and self.phase == "correct":
            # then dequantizes the predicted update one segment group at a time (fp32)
            tl.free(tl.alloc("temporaries", 4 * max(direction_groups(self.spec))))
            # and stores the residual (ResidualStore.add, the trainer's defaults: int8 with
            # error feedback): the fp32 error buffer comes from host memory to the device and
            # the residual is quantized there (int8 codes + an fp32 scale per block) before
            # both go back to the host.
            P = self.spec.num_params
            error = tl.alloc("temporaries", 4 * P, fragments=False)
            codes = tl.alloc("temporaries", P + 4 * math.ceil(P / DIRECTION_BLOCK), False)
            tl.free(error, codes)
        tl.free(before)
        for h in self.grads.values():  # zero_grad(set_to_none=True)
            tl.free(h)
        self.grads = {}
        if self.logits is not None and self.setup.logits_lifetime == "step":
            tl.free(self.logits)
            self.logits = None

    def run(self) -> PhaseEstimate:
        self.model_state()
        if not self.train:
            if self.trainer:
                self.enter_predict()
                # The trainer's metrics and the memory suite give the entry its own peak
                # ("enter:predict", stage "predict entry" here): the phase's peak starts after it.
                self.tl.reset_peak()
            self.micro_batch()
            # The moments and the master come back at Predict exit (TrainerConfig.lookahead=0,
            # the presets' default), behind the first Correct step's forward and backward; a
            # lookahead of k > 0 brings the moments back during the last k Predict steps,
            # which adds them (optimizer_state) to those steps.
            return self.tl.result(self.phase)
        # One step is the steady state: the model state is allocated up front and the previous
        # step's logits (when the caller holds them) too. With accumulation, the second
        # micro-batch is the one that sees the first one's gradients.
        for _ in range(min(self.setup.accum_steps, 2)):
            self.micro_batch()
        self.optimizer_step()
        return self.tl.result(self.phase)


ESTIMATE_METHODS = ("auto", "formula", "traced")


def estimate(spec: ModelSpec, setup: TrainSetup, method: str = "auto") -> Estimate:
    """Per-phase, per-component allocated peak of training ``spec`` with ``setup``.

    ``estimate(spec, setup).phase_peak_bytes["full"]`` is what
    ``torch.cuda.max_memory_allocated()`` should read over a Full phase (reset at its start).

    ``method``: "formula" replays the step from the architecture (this module); "traced" runs
    the real Hugging Face module under fake tensors (``spec.hf_config`` needed, plain PyTorch
    setups only, transformers installed; :func:`hybrid_triton.planner.hf.estimate_hf`);
    "auto" traces where it can (a spec read from a config.json, a plain setup, transformers
    importable) and uses the formulas otherwise.
    """
    if not isinstance(spec, ModelSpec):
        raise PlannerError(f"estimate expects a ModelSpec, got {type(spec).__name__}")
    if not isinstance(setup, TrainSetup):
        raise PlannerError(f"estimate expects a TrainSetup, got {type(setup).__name__}")
    if method not in ESTIMATE_METHODS:
        raise PlannerError(f"method must be one of {ESTIMATE_METHODS}, got {method!r}")
    check_plannable(spec)
    if spec.max_seq_len and setup.seq_len > spec.max_seq_len:
        raise PlannerError(
            f"seq_len {setup.seq_len} exceeds {spec.name}'s maximum {spec.max_seq_len}"
        )
    if method == "traced" or (method == "auto" and _traces(spec, setup)):
        from hybrid_triton.planner.hf import estimate_hf

        return estimate_hf(spec, setup)
    if setup.fused_loss and setup.fused_loss_impl != "toolkit":
        raise PlannerError(
            f"the {setup.fused_loss_impl} fused loss is modelled by tracing a Hugging Face "
            "model (a config.json, transformers installed); the formulas know the toolkit's"
        )
    if not spec.has_activation_model:
        raise PlannerError(
            f"{spec.name}: the formulas know GPT-2 and Llama-style models only; "
            + (
                "a Hugging Face family is planned by tracing the real module, which runs "
                "plain PyTorch setups only (fp32, autocast or pure bf16 with torch's AdamW, "
                "checkpointing) and needs transformers installed"
                if spec.family == "hf"
                else "measure this module with hybrid_triton.planner.traced.trace_step "
                "(fake tensors, no GPU)"
            )
        )
    phases: dict[str, PhaseEstimate] = {}
    train_phase: PhaseEstimate | None = None
    # The trainer's Full steps differ from Warmup when the run has a Predict phase (they copy
    # the master for the dynamics model's update norms: _Step.optimizer_step).
    trainer_full = setup.trainer and "predict" in setup.phases
    for phase in dict.fromkeys(setup.phases):
        own = phase == "predict" or (
            setup.trainer and (phase == "correct" or (phase == "full" and trainer_full))
        )
        if own:
            phases[phase] = _Step(spec, setup, phase).run()
        else:  # a plain loop's Train, Warmup and Full (Correct outside the trainer) alike
            train_phase = train_phase or _Step(spec, setup, phase).run()
            phases[phase] = replace(train_phase, phase=phase)
    phases = {name: replace(p, allocator=setup.allocator) for name, p in phases.items()}
    notes = []
    if spec.family == "llama":
        notes.append(
            "Llama activations assume fused RMSNorm/RoPE and SDPA with grouped kv "
            "heads (no repeat_kv copies); Hugging Face's eager modules save more."
        )
    if spec.hf_config is not None:
        notes.append(
            "formula estimate of a Hugging Face model: its modules save more than the "
            "formulas count (RMSNorm's fp32 copy, per-projection casts, the loss's fp32 "
            "logits); plain setups are traced as they run when transformers is installed"
        )
    return Estimate(spec, setup, phases, CUDA_CONTEXT, notes, host_state_bytes(spec, setup))


def _traces(spec: ModelSpec, setup: TrainSetup) -> bool:
    """Whether "auto" traces: a spec from a Hugging Face config, a setup traced mode models
    (plain PyTorch, or the toolkit's flat buffers around the module's step), and
    transformers importable."""
    if spec.hf_config is None:
        return False
    from hybrid_triton.planner.hf import composable, transformers_available

    return composable(setup) is None and transformers_available()
