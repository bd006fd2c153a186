"""Traced mode: run a real module's training step under fake tensors and measure allocations.

For models the formulas do not cover (any ``nn.Module``), :func:`trace_step` copies the
module's structure with fake parameters (``torch._subclasses.FakeTensorMode``: shapes and
dtypes, no data, no memory, no GPU), runs forward, loss, backward and an optimizer step, and
records every storage that ops allocate and when it is freed (a ``TorchDispatchMode`` that
watches op outputs, plus weak references to their storages), rounding each block as the
CUDA caching allocator does (512 B). It reports the allocated peak per stage and the model
state (parameters, gradients, optimizer state) apart from the rest (activations and
temporaries).

The tensors are fake CPU tensors (autograd on fake CUDA tensors needs a CUDA build), so by
default (``kernels="cuda"``) the ops whose CPU kernel keeps other tensors than the CUDA one
are run as CUDA runs them (:class:`CudaKernels`): scaled-dot-product attention takes the
backend CUDA would pick for those shapes and dtypes (:func:`sdpa_backend`: flash, memory-
efficient or math, each with what it saves), dropout is the fused kernel (a 1-byte mask, not
a noise tensor in the input's dtype), and the cuBLAS workspace is counted. What stays CPU:
autocast follows the CPU op lists (CPU lists ``cross_entropy_loss`` as fp32, CUDA does not: a
loss on bf16 logits keeps fp32 log-probabilities here where CUDA keeps bf16 ones; Hugging
Face's loss upcasts the logits first, so it is not affected). The module given is not
changed.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hybrid_triton.planner.estimate import (
    ALLOC_ROUND,
    CUBLAS_WORKSPACE,
    LARGE_BLOCK,
    SEGMENT_ROUND,
)
from hybrid_triton.planner.setup import DTYPE_BYTES, TrainSetup
from hybrid_triton.planner.specs import PlannerError

_TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TraceResult:
    """What a traced step allocated (bytes, rounded to the allocator's 512 B)."""

    peak_bytes: int
    stage_peaks: dict[str, int]  # "forward", "backward", "optimizer"
    param_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    end_of_forward_bytes: int  # live right after the loss, before backward
    # the attention backend of each scaled-dot-product call ("flash", "efficient", "math")
    attention: dict[str, int] = field(default_factory=dict)
    peak_stage: str = ""  # "forward", "backward" or "optimizer"
    segment_slack_bytes: int = 0  # at the peak: 2 MiB segment rounding of the large blocks
    largest_transient_bytes: int = 0  # at the peak: the largest block made during the step
    # the optimizer state's blocks as the allocator rounds them (512 B), bytes
    optimizer_state_blocks: tuple[int, ...] = ()
    # per stage, at its peak: (segment rounding, largest transient block), bytes
    stage_allocator: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def activation_peak_bytes(self) -> int:
        """The peak less the model state alive at the end of the step."""
        return self.peak_bytes - self.param_bytes - self.grad_bytes - self.optimizer_state_bytes

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["activation_peak_bytes"] = self.activation_peak_bytes
        return out


class _AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the storages that ops create, with what the caching allocator
    needs at the peak: the 2 MiB segment rounding of the live large blocks and the largest
    block made during the step (not model state) still alive (see ``allocator_slack_bytes``
    in planner/estimate.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.stage = "setup"
        self.stage_peaks: dict[str, int] = {}
        self._seen: dict[int, tuple[int, bool]] = {}  # id(storage) -> (rounded bytes, transient)
        self.slack = 0  # segment rounding of the live blocks larger than LARGE_BLOCK
        self._transient: Counter[int] = Counter()  # rounded size -> live count
        self.peak_stage = "setup"
        # per stage, at that stage's peak: (segment rounding, largest transient block)
        self.stage_allocator: dict[str, tuple[int, int]] = {}
        self._pending: str | None = None  # a stage whose new peak awaits its snapshot

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        nbytes = storage.nbytes()
        rounded = -(-nbytes // ALLOC_ROUND) * ALLOC_ROUND if nbytes else 0
        transient = self.stage in ("forward", "backward") and rounded > 0
        self._seen[key] = (rounded, transient)
        self.live += rounded
        self.slack += segment_rounding(rounded)
        if transient:
            self._transient[rounded] += 1
        weakref.finalize(storage, self._free, key)
        if self.live > self.peak:
            self.peak, self.peak_stage = self.live, self.stage
        if self.stage != "setup" and self.live > self.stage_peaks.get(self.stage, -1):
            self.stage_peaks[self.stage] = self.live
            self._pending = self.stage

    def _free(self, key: int) -> None:
        if key not in self._seen:
            return
        self._snapshot()
        rounded, transient = self._seen.pop(key)
        self.live -= rounded
        self.slack -= segment_rounding(rounded)
        if transient:
            self._transient[rounded] -= 1
            if not self._transient[rounded]:
                del self._transient[rounded]

    def _snapshot(self) -> None:
        """A stage peak's allocator figures, taken before the first free after it."""
        if self._pending is not None:
            self.stage_allocator[self._pending] = (self.slack, max(self._transient, default=0))
            self._pending = None

    @property
    def peak_slack(self) -> int:
        return self.stage_allocator.get(self.peak_stage, (0, 0))[0]

    @property
    def peak_transient(self) -> int:
        return self.stage_allocator.get(self.peak_stage, (0, 0))[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self.track(leaf)
        return out

    def set_stage(self, stage: str) -> None:
        self._snapshot()
        self.stage = stage
        if self.live > self.stage_peaks.get(stage, -1):
            self.stage_peaks[stage] = self.live
            self._pending = stage


def segment_rounding(rounded: int) -> int:
    """The 2 MiB segment rounding the caching allocator adds to a block of ``rounded`` bytes
    (large blocks only)."""
    if rounded <= LARGE_BLOCK:
        return 0
    return -(-rounded // SEGMENT_ROUND) * SEGMENT_ROUND - rounded


KERNELS = ("cuda", "cpu")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Flash attention's largest head size on sm80/sm90 (PyTorch's check_head_dim_size_flash).
FLASH_MAX_HEAD_DIM = 256


def sdpa_backend(
    dtype: torch.dtype,
    head_dim: int,
    n_head: int,
    n_kv_head: int,
    has_mask: bool,
    enable_gqa: bool = False,
) -> str:
    """The backend CUDA's ``F.scaled_dot_product_attention`` takes on an Ampere/Hopper GPU
    for dense inputs, as PyTorch's ``select_sdp_backend`` orders them (flash, then memory-
    efficient, then math; cuDNN attention is opt-in):

    - flash: fp16/bf16, no explicit mask, head size <= 256, grouped kv heads allowed;
    - memory-efficient: fp32/fp16/bf16, masks allowed, head size a multiple of 16 bytes,
      NO grouped kv heads (q and k/v must have the same number of heads);
    - math otherwise: fp32 with grouped kv heads (Hugging Face passes ``enable_gqa=True``
      when it has no mask), odd head sizes. It materializes ``[B, H, T, T]``.
    """
    if n_kv_head != n_head and not enable_gqa:
        raise PlannerError(
            f"sdpa_backend: {n_head} query heads and {n_kv_head} kv heads need enable_gqa"
        )
    if dtype in _LOW_PRECISION and not has_mask and head_dim <= FLASH_MAX_HEAD_DIM:
        return "flash"
    aligned = head_dim % max(1, 16 // torch.empty((), dtype=dtype).element_size()) == 0
    if n_kv_head == n_head and aligned:
        return "efficient"
    return "math"


class CudaKernels:
    """While entered, runs the ops whose CUDA kernel saves other tensors than the CPU one the
    CUDA way, on fake CPU tensors: attention through :func:`sdpa_backend`'s choice (each
    backend's own op, so its saved outputs and backward are the real ones), dropout through
    the fused kernel (output + bool mask). ``backends`` counts the attention calls.

    It swaps ``torch.nn.functional.scaled_dot_product_attention`` and ``dropout`` for the
    time it is entered (modules look them up at call time), rather than using a
    ``TorchFunctionMode``: a mode is not active while non-reentrant checkpointing recomputes
    a block inside backward, and the recomputation must save what the forward saved."""

    def __init__(self) -> None:
        self.backends: Counter[str] = Counter()
        self._saved: tuple | None = None

    def __enter__(self) -> CudaKernels:
        self._saved = (F.scaled_dot_product_attention, F.dropout)
        F.scaled_dot_product_attention = self._attention
        F.dropout = self._dropout
        return self

    def __exit__(self, *exc) -> None:
        F.scaled_dot_product_attention, F.dropout = self._saved

    def _attention(
        self,
        q,
        k,
        v,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
    ):
        aten = torch.ops.aten
        if torch.is_autocast_enabled("cpu"):  # SDPA is on autocast's lower-precision list
            low = torch.get_autocast_dtype("cpu")
            q, k, v = (t.to(low) if t.is_floating_point() else t for t in (q, k, v))
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(low)
        backend = sdpa_backend(
            q.dtype, q.shape[-1], q.shape[-3], k.shape[-3], attn_mask is not None, enable_gqa
        )
        self.backends[backend] += 1
        if backend == "flash":
            return aten._scaled_dot_product_flash_attention(
                q, k, v, dropout_p, is_causal, False, scale=scale
            )[0]
        if backend == "efficient":
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            return aten._scaled_dot_product_efficient_attention(
                q, k, v, attn_mask, grad, dropout_p, is_causal, scale=scale
            )[0]
        return aten._scaled_dot_product_attention_math(
            q, k, v, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa
        )[0]

    @staticmethod
    def _dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return input
        if p == 1.0:
            return input * 0
        return torch.ops.aten.native_dropout(input, p, True)[0]


def _fake_copy(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are fresh tensors created under the
    active fake mode (tied parameters stay tied). The original is untouched."""
    meta = module
    with torch.device("meta"):
        clone = _clone_structure(meta)
    made: dict[int, torch.Tensor] = {}
    for (_, sub_src), (_, sub) in zip(
        module.named_modules(remove_duplicate=False), clone.named_modules(remove_duplicate=False)
    ):
        for name, p in list(sub_src._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                target = dtype if dtype is not None and p.is_floating_point() else p.dtype
                made[id(p)] = nn.Parameter(
                    torch.empty(p.shape, dtype=target), requires_grad=p.requires_grad
                )
            sub._parameters[name] = made[id(p)]
        for name, b in list(sub_src._buffers.items()):
            if b is not None:
                sub._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
    return clone


def _clone_structure(module: nn.Module) -> nn.Module:
    import copy

    memo: dict[int, object] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        memo[id(t)] = t  # share tensors: _fake_copy replaces them, nothing is copied
    return copy.deepcopy(module, memo)


def _default_batch(module: nn.Module, setup: TrainSetup) -> tuple:
    cfg = getattr(module, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None:
        raise PlannerError(
            "trace_step: give make_batch (the module has no config.vocab_size "
            "to draw token ids from)"
        )
    shape = (setup.micro_batch, setup.seq_len)
    idx = torch.randint(0, vocab, shape, dtype=torch.int64)
    return idx, torch.randint(0, vocab, shape, dtype=torch.int64)


def _default_loss(module: nn.Module, batch: tuple) -> tuple[torch.Tensor, object]:
    """The loss and the whole output (the caller may hold the logits in it)."""
    whole = module(*batch)
    out = whole
    if isinstance(out, tuple):
        out = out[1]
    elif hasattr(out, "loss"):
        out = out.loss
    if not isinstance(out, torch.Tensor) or out.dim() != 0:
        raise PlannerError(
            "trace_step: the module's output is not a scalar loss (nor a "
            "(logits, loss) tuple); give loss_fn"
        )
    return out, whole


def trace_step(
    module: nn.Module,
    setup: TrainSetup,
    make_batch: Callable[[nn.Module, TrainSetup], tuple] | None = None,
    loss_fn: Callable[[nn.Module, tuple], torch.Tensor] | None = None,
    steps: int = 2,
    kernels: str = "cuda",
    prepare: Callable[[nn.Module], None] | None = None,
    drop_grads: bool = False,
) -> TraceResult:
    """Measure one training step of ``module`` under fake tensors (no GPU, no real memory).

    ``setup`` gives the parameter dtype, autocast, micro-batch and sequence length, the
    optimizer (AdamW with 32-bit state, fused as ``torch.optim.AdamW(fused=True)`` runs it;
    SGD with momentum; or none) and whether to keep the logits (``logits_lifetime``).
    ``make_batch(module, setup)`` returns the forward's arguments (default: token ids and
    targets of shape ``[micro_batch, seq_len]``); ``loss_fn(module, batch)`` returns the
    scalar loss, or ``(loss, output)`` where ``output`` is held as ``setup.logits_lifetime``
    says (default: ``module(*batch)``, loss at index 1 or ``.loss``). ``kernels``: "cuda" runs
    attention and dropout as CUDA kernels do and counts the cuBLAS workspace
    (:class:`CudaKernels`), "cpu" leaves the CPU kernels. ``prepare(model)`` is called on the
    fake copy before the step (e.g. to switch on the module's own gradient checkpointing).
    ``drop_grads``: each parameter's gradient is dropped as soon as autograd has produced it
    (a post-accumulate-grad hook), as when the toolkit folds it into its own flat buffer; the
    step then measures the module's own tensors and the caller adds its buffers
    (:func:`hybrid_triton.planner.hf.estimate_hf` does, for the toolkit's setups).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not isinstance(module, nn.Module):
        raise PlannerError(f"trace_step expects an nn.Module, got {type(module).__name__}")
    if not isinstance(setup, TrainSetup):
        raise PlannerError(f"trace_step expects a TrainSetup, got {type(setup).__name__}")
    torch_state_bits = 8 * DTYPE_BYTES[setup.param_dtype]  # torch keeps moments like params
    if setup.optimizer != "none" and setup.state_bits != torch_state_bits:
        raise PlannerError(
            f"trace_step runs torch's own optimizers, whose state has the parameters' dtype "
            f"({torch_state_bits}-bit for {setup.param_dtype}); got state_bits="
            f"{setup.state_bits}. Use estimate() for other state sizes."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PlannerError(f"steps must be a positive integer, got {steps!r}")
    if kernels not in KERNELS:
        raise PlannerError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    make_batch = make_batch or _default_batch
    loss_fn = loss_fn or _default_loss
    tracker = _AllocationTracker()
    cuda = CudaKernels() if kernels == "cuda" else None
    autocast = (
        torch.autocast("cpu", dtype=_TORCH_DTYPE[setup.autocast])
        if setup.autocast
        else contextlib.nullcontext()
    )
    with FakeTensorMode(), tracker, cuda or contextlib.nullcontext():
        model = _fake_copy(module, _TORCH_DTYPE[setup.param_dtype])
        model.train()
        if prepare is not None:
            prepare(model)
        params = [p for p in model.parameters() if p.requires_grad]
        for t in list(model.parameters()) + list(model.buffers()):
            tracker.track(t)
        if drop_grads:
            for p in params:
                p.register_post_accumulate_grad_hook(_drop_grad)
        workspace = None
        if cuda is not None:  # cuBLAS's workspace, allocated by the first matmul, kept
            workspace = torch.empty(CUBLAS_WORKSPACE, dtype=torch.uint8)
            tracker.track(workspace)
        opt = _optimizer(setup, params)
        end_of_forward, grad_bytes = _run_steps(
            model, setup, make_batch, loss_fn, opt, params, tracker, autocast, steps
        )
        state_blocks = []
        if opt is not None:
            for state in opt.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        state_blocks.append(value.untyped_storage().nbytes())
        state_bytes = sum(state_blocks)
        param_bytes = sum(p.untyped_storage().nbytes() for p in model.parameters())
        tracker._snapshot()
        del workspace
    return TraceResult(
        tracker.peak,
        {k: v for k, v in tracker.stage_peaks.items() if k != "setup"},
        param_bytes,
        grad_bytes,
        state_bytes,
        end_of_forward,
        dict(cuda.backends) if cuda is not None else {},
        tracker.peak_stage,
        tracker.peak_slack,
        tracker.peak_transient,
        tuple(-(-b // ALLOC_ROUND) * ALLOC_ROUND for b in state_blocks),
        {k: v for k, v in tracker.stage_allocator.items() if k != "setup"},
    )


def _drop_grad(param: torch.Tensor) -> None:
    param.grad = None


def _optimizer(setup: TrainSetup, params: list) -> torch.optim.Optimizer | None:
    if setup.optimizer == "adamw":
        # fused: one kernel over all tensors and no temporaries, as the planner assumes
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    if setup.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=False)
    return None


def _run_steps(model, setup, make_batch, loss_fn, opt, params, tracker, autocast, steps):
    """``steps`` training steps; returns the live bytes at the end of the last forward and
    the gradients' bytes before the last ``zero_grad``."""
    end_of_forward = grad_bytes = 0
    held = None
    for _ in range(steps):
        batch = make_batch(model, setup)
        for leaf in tree_flatten(batch)[0]:
            if isinstance(leaf, torch.Tensor):
                tracker.track(leaf)
        for _ in range(setup.accum_steps):
            tracker.set_stage("forward")
            with autocast:
                loss = loss_fn(model, batch)
            # the previous output (setup.logits_lifetime == "next_forward") dies here, when
            # the new forward has returned, as `logits, loss = model(x, y)` does
            held = None
            if isinstance(loss, tuple):
                loss, held = loss
                if setup.logits_lifetime == "loss_only":
                    held = None
            end_of_forward = tracker.live
            tracker.set_stage("backward")
            loss.backward()
            del loss
        tracker.set_stage("optimizer")
        if opt is not None:
            opt.step()
        grad_bytes = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
        for p in params:  # zero_grad(set_to_none=True), also without an optimizer
            p.grad = None
        if setup.logits_lifetime == "step":
            del held  # the caller drops its output once the step is done
            held = None
        del batch
    return end_of_forward, grad_bytes
