"""Traced mode: run a real module's training step under fake tensors and measure allocations.

For models the formulas do not cover (any ``nn.Module``), :func:`trace_step` copies the
module's structure with fake parameters (``torch._subclasses.FakeTensorMode``: shapes and
dtypes, no data, no memory, no GPU), runs forward, loss, backward and an optimizer step, and
records every storage that ops allocate and when it is freed (a ``TorchDispatchMode`` that
watches op outputs, plus weak references to their storages), rounding each block as the
CUDA caching allocator does (512 B). It reports the allocated peak per stage and the model
state (parameters, gradients, optimizer state) apart from the rest (activations and
temporaries).

Limits: the kernels that run are the CPU ones (their meta implementations), and autocast
follows the CPU op lists, so what one op saves can differ from its CUDA kernel (attention in
particular; and CPU autocast lists ``cross_entropy_loss`` as fp32, CUDA's does not, so the
traced log-probabilities are fp32 where CUDA keeps them bf16: 2 B per token and vocabulary
entry more than a GPU allocates). Use it for the structure of an unknown model; use
:func:`estimate` where the formulas know the model. The module given is not changed.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hybrid_triton.planner.estimate import ALLOC_ROUND
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

    @property
    def activation_peak_bytes(self) -> int:
        """The peak less the model state alive at the end of the step."""
        return self.peak_bytes - self.param_bytes - self.grad_bytes - self.optimizer_state_bytes

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["activation_peak_bytes"] = self.activation_peak_bytes
        return out


class _AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the storages that ops create."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.stage = "setup"
        self.stage_peaks: dict[str, int] = {}
        self._seen: dict[int, int] = {}  # id(storage) -> rounded bytes

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        nbytes = storage.nbytes()
        rounded = -(-nbytes // ALLOC_ROUND) * ALLOC_ROUND if nbytes else 0
        self._seen[key] = rounded
        self.live += rounded
        weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.live)
        if self.stage != "setup":
            self.stage_peaks[self.stage] = max(self.stage_peaks.get(self.stage, 0), self.live)

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self.track(leaf)
        return out

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self.stage_peaks[stage] = max(self.stage_peaks.get(stage, 0), self.live)


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
) -> TraceResult:
    """Measure one training step of ``module`` under fake tensors (no GPU, no real memory).

    ``setup`` gives the parameter dtype, autocast, micro-batch and sequence length, the
    optimizer (AdamW with 32-bit state, SGD with momentum, or none) and whether to keep the
    logits (``logits_lifetime``). ``make_batch(module, setup)`` returns the forward's
    arguments (default: token ids and targets of shape ``[micro_batch, seq_len]``);
    ``loss_fn(module, batch)`` returns the scalar loss, or ``(loss, output)`` where
    ``output`` is held as ``setup.logits_lifetime`` says (default: ``module(*batch)``, loss
    at index 1 or ``.loss``).
    Gradient checkpointing, hooks and state bits other than 32 are the module's and the
    optimizer's business: trace the real objects to measure them.
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
    make_batch = make_batch or _default_batch
    loss_fn = loss_fn or _default_loss
    tracker = _AllocationTracker()
    autocast = (
        torch.autocast("cpu", dtype=_TORCH_DTYPE[setup.autocast])
        if setup.autocast
        else contextlib.nullcontext()
    )
    with FakeTensorMode(), tracker:
        model = _fake_copy(module, _TORCH_DTYPE[setup.param_dtype])
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        for t in list(model.parameters()) + list(model.buffers()):
            tracker.track(t)
        if setup.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
        elif setup.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=False)
        else:
            opt = None
        end_of_forward = 0
        for _ in range(steps):
            batch = make_batch(model, setup)
            for leaf in tree_flatten(batch)[0]:
                if isinstance(leaf, torch.Tensor):
                    tracker.track(leaf)
            for _ in range(setup.accum_steps):
                tracker.set_stage("forward")
                with autocast:
                    loss = loss_fn(model, batch)
                # the previous output (setup.logits_lifetime == "next_forward") dies here,
                # when the new forward has returned, as `logits, loss = model(x, y)` does
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
            grad_bytes = sum(
                p.grad.untyped_storage().nbytes() for p in params if p.grad is not None
            )
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            if setup.logits_lifetime == "step":
                del held  # the caller drops its output once the step is done
                held = None
            del batch
        state_bytes = 0
        if opt is not None:
            for state in opt.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        state_bytes += value.untyped_storage().nbytes()
        param_bytes = sum(p.untyped_storage().nbytes() for p in model.parameters())
    return TraceResult(
        tracker.peak,
        {k: v for k, v in tracker.stage_peaks.items() if k != "setup"},
        param_bytes,
        grad_bytes,
        state_bytes,
        end_of_forward,
    )
