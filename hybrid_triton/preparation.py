"""``prepare``: one call that asks the planner what fits and applies it to a user's model.

    from hybrid_triton import prepare

    prepared = prepare(model, gpu="auto", batch_size=8, seq_len=1024, lr=3e-4)
    print(prepared)                                  # the plan it applied
    model, opt = prepared.model, prepared.optimizer
    for input_ids in batches:                        # a plain loop ...
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    # ... or transformers.Trainer(model=model, optimizers=(opt, None), ...)

What it applies, from the setup the planner picks (the fastest that fits, in this order:
8-bit moments; then activation checkpointing; then 4-bit moments):

- the parameters in bf16, with fp32 master weights kept by :class:`FusedAdamW` (filled from
  the model's own fp32 values when it came in fp32, so nothing is rounded away); or, with
  ``master_weights=False``, no master copy: the bf16 weights take the update with stochastic
  rounding;
- the gradient path: one micro-batch per step -> autograd adds into one flat bf16 buffer
  (``FusedAdamW.attach_flat_grads``); several -> post-accumulate-grad hooks fold each
  gradient into an fp32 accumulator (:class:`GradAccumulator`, a sum, as ``.grad`` would
  accumulate) that the optimizer's ``step()`` reads;
- ``FusedAdamW`` with the planned state bits, weight decay on matrices and embeddings only
  (the Hugging Face ``Trainer``'s convention), global-norm clipping;
- activation checkpointing when planned: Hugging Face's ``gradient_checkpointing_enable``
  (non-reentrant), the model's own switch for the project's GPT-2, or else each block of the
  model's largest ``nn.ModuleList`` of identical blocks wrapped in
  ``torch.utils.checkpoint`` (non-reentrant);
- the chunked linear cross-entropy in place of transformers' full-logits loss for causal-LM
  heads it computes (:mod:`hybrid_triton.models.hf_loss`): ``model(input_ids, labels=...)``
  then returns the loss and no logits; without labels (``generate``) the forward is the
  model's own.

Everything is checked and planned before the model is touched: a setup that does not fit, or
a model the planner cannot read, raises and leaves the model as it was.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.utils.checkpoint

from hybrid_triton.planner.estimate import Estimate, estimate
from hybrid_triton.planner.fit import gpu_capacity_bytes
from hybrid_triton.planner.setup import TrainSetup
from hybrid_triton.planner.specs import PlannerError, spec_from_module

GiB = 2**30
# The planner's choices, the fastest first: (state bits, activation checkpointing).
CANDIDATES = ((8, False), (8, True), (4, True))


class PrepareError(ValueError):
    """The model cannot be prepared as asked; nothing was changed."""


@dataclass
class PreparedModel:
    """What :func:`prepare` returns: the model (changed in place), its optimizer, the setup
    the planner chose and its estimate, and what was applied."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    setup: TrainSetup
    plan: Estimate | None
    gpu: str
    usable_bytes: int
    applied: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        from hybrid_triton.planner.report import format_estimate

        if self.plan is None:
            lines = ["not planned (plan=False): nothing was estimated"]
        else:
            need = self.plan.device_bytes()
            lines = [
                format_estimate(self.plan),
                f"{self.gpu}: fits ({need / GiB:.2f} GiB needed, "
                f"{self.usable_bytes / GiB:.2f} GiB usable)",
            ]
        lines += ["applied:", *(f"  - {line}" for line in self.applied)]
        return "\n".join(lines)


def prepare(
    model: nn.Module,
    gpu: str | int | float = "auto",
    *,
    batch_size: int,
    seq_len: int,
    accum_steps: int = 1,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = 1.0,
    state_bits: int | None = None,
    checkpointing: bool | None = None,
    chunked_loss: bool | None = None,
    master_weights: bool = True,
    plan: bool = True,
    margin: float = 0.1,
    device: torch.device | str | None = None,
) -> PreparedModel:
    """Plan and apply the toolkit's memory setup to ``model`` (see the module docstring).

    ``gpu``: a GPU preset name, a size in GiB, or "auto" (the local card). ``batch_size``,
    ``seq_len``, ``accum_steps``: the micro-batch shape and micro-batches per optimizer step.
    ``state_bits`` / ``checkpointing``: fix the planner's choice (None: it decides).
    ``chunked_loss``: None applies it where the head allows; True requires it.
    ``master_weights``: False is the leanest setup: bf16 parameters updated in place with
    stochastic rounding (no fp32 copy; 6 bytes a parameter with 8-bit moments, 5 with 4-bit).
    ``plan``: False applies the setup asked for (``state_bits`` 8 and no checkpointing unless
    given) without estimating it, for modules the planner cannot read (neither a Hugging Face
    model nor the project's GPT-2); the result's ``plan`` is then None. ``device``: where the
    model trains (default: CUDA when available)."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PrepareError(f"prepare: {name} must be a positive integer, got {value!r}")
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise PrepareError(f"prepare: accum_steps must be a positive integer, got {accum_steps!r}")
    if state_bits not in (None, 32, 16, 8, 4):
        raise PrepareError(f"prepare: state_bits must be None, 32, 16, 8 or 4, got {state_bits!r}")
    if not isinstance(model, nn.Module):
        raise PrepareError(f"prepare expects an nn.Module, got {type(model).__name__}")
    if not isinstance(master_weights, bool) or not isinstance(plan, bool):
        raise PrepareError("prepare: master_weights and plan must be True or False")
    target = torch.device(device) if device is not None else _default_device()
    use_chunked = _chunked_loss_choice(model, chunked_loss)
    if checkpointing and not _can_checkpoint(model):
        raise PrepareError(
            f"prepare: checkpointing=True, but {type(model).__name__} has no checkpointing "
            "switch and no nn.ModuleList of identical blocks to wrap"
        )
    candidates = [
        _setup(bits, ckpt, batch_size, seq_len, accum_steps, use_chunked, master_weights)
        for bits, ckpt in _choices(state_bits, checkpointing)
    ]
    if plan:
        setup, estimate_, label, usable = _plan(model, gpu, candidates, margin)
    else:
        setup, estimate_, label, usable = candidates[0], None, "not planned", 0
    applied = [f"setup: {setup.describe()}"]
    optimizer = _apply(
        model, setup, target, applied, lr, betas, eps, weight_decay, max_grad_norm, use_chunked
    )
    return PreparedModel(model, optimizer, setup, estimate_, label, usable, applied)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _chunked_loss_choice(model: nn.Module, wanted: bool | None) -> bool:
    from hybrid_triton.models.hf_loss import chunked_loss_blocker

    if wanted is False:
        return False
    reason = chunked_loss_blocker(model)
    if reason is not None and wanted:
        raise PrepareError(f"prepare: chunked_loss=True, but {reason}")
    return reason is None


def _choices(state_bits: int | None, checkpointing: bool | None) -> list[tuple[int, bool]]:
    """The planner's candidates, the fastest first, with the caller's fixed choices."""
    out = []
    for bits, ckpt in CANDIDATES:
        choice = (bits if state_bits is None else state_bits,
                  ckpt if checkpointing is None else checkpointing)  # fmt: skip
        if choice not in out:
            out.append(choice)
    return out


def _setup(bits, ckpt, batch, seq, accum, chunked, master_weights) -> TrainSetup:
    return TrainSetup(
        param_dtype="bf16",
        master_weights=master_weights,
        grad_mode="flat" if accum == 1 else "hook",
        state_bits=bits,
        micro_batch=batch,
        seq_len=seq,
        accum_steps=accum,
        checkpointing=ckpt,
        fused_loss=chunked,
        trainer=False,
    )


def _plan(model, gpu, candidates: list[TrainSetup], margin: float):
    """The first candidate setup that fits: (setup, estimate, gpu label, usable bytes)."""
    try:
        label, capacity = gpu_capacity_bytes(gpu)
        spec = spec_from_module(model)
    except PlannerError as exc:
        raise PrepareError(f"prepare: {exc}") from exc
    if not 0 <= margin < 1:
        raise PrepareError(f"prepare: margin must be a fraction in [0, 1), got {margin!r}")
    usable = int(capacity * (1 - margin))
    tried = []
    for setup in candidates:
        try:
            plan = estimate(spec, setup)
        except PlannerError as exc:
            raise PrepareError(
                f"prepare: the planner cannot estimate this model ({exc}); pass plan=False "
                "to apply a setup without an estimate"
            ) from exc
        if plan.device_bytes() <= usable:
            return setup, plan, label, usable
        tried.append((setup, plan))
    leanest = min(tried, key=lambda t: t[1].device_bytes())
    raise PrepareError(
        f"prepare: nothing fits {label} ({usable / GiB:.2f} GiB usable with margin "
        f"{margin:.0%}): the leanest setup ({leanest[0].describe()}) needs "
        f"{leanest[1].device_bytes() / GiB:.2f} GiB; use a smaller batch or sequence"
    )


def _apply(model, setup, device, applied, lr, betas, eps, weight_decay, max_grad_norm, chunked):
    from hybrid_triton.optim import FusedAdamW

    fp32_values = _to_bf16(model, device, applied)
    decay, plain = _decay_split(model)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    optimizer = FusedAdamW(
        groups,
        lr=lr,
        betas=betas,
        eps=eps,
        state_bits=setup.state_bits,
        master_weights=setup.master_weights,
        max_grad_norm=max_grad_norm,
    )
    if setup.master_weights:
        _fill_master(optimizer, fp32_values)
    weights = (
        "fp32 master weights"
        if setup.master_weights
        else "bf16 weights updated with stochastic rounding (no master copy)"
    )
    applied.append(
        f"FusedAdamW: {setup.state_bits}-bit moments, {weights}, weight decay "
        f"{weight_decay} on {len(decay)} matrices/embeddings, none on {len(plain)} others"
    )
    if setup.grad_mode == "flat":
        optimizer.attach_flat_grads()
        applied.append("gradients: one flat bf16 buffer that autograd adds into")
    else:
        optimizer = _with_accumulator(optimizer, setup.accum_steps)
        applied.append(
            f"gradients: folded into an fp32 accumulator over {setup.accum_steps} "
            "micro-batches (post-accumulate-grad hooks)"
        )
    if setup.checkpointing:
        _enable_checkpointing(model, applied)
    if chunked:
        _use_chunked_loss(model, setup.loss_chunk_tokens)
        applied.append(
            f"loss: chunked linear cross-entropy ({setup.loss_chunk_tokens} positions a "
            "chunk), no logits when labels are given"
        )
    return optimizer


def _to_bf16(model: nn.Module, device: torch.device, applied: list[str]) -> dict[int, torch.Tensor]:
    """Move the model to ``device`` in bf16; return the fp32 values of its floating
    parameters (on the host) so the master weights start from them, not from their rounding."""
    fp32 = {
        id(p): p.detach().to("cpu", copy=True)
        for p in model.parameters()
        if p.dtype == torch.float32
    }
    model.to(device=device, dtype=torch.bfloat16)
    applied.append(f"parameters: bf16 on {device} (fp32 values kept as the master weights)")
    return fp32


def _decay_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Matrices and embeddings decay; biases and norm gains do not (as the HF Trainer)."""
    seen, decay, plain = set(), [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else plain).append(p)
    return decay, plain


def _fill_master(optimizer, fp32: dict[int, torch.Tensor]) -> None:
    if not fp32:
        return
    with torch.no_grad():
        for param, master in optimizer.master_views():
            value = fp32.get(id(param))
            if value is not None:
                master.copy_(value.reshape(master.shape))


def _with_accumulator(optimizer, accum_steps: int):
    from hybrid_triton.accumulation import GradAccumulator

    accumulator = GradAccumulator(optimizer.arena_group, accum_steps, alpha=1.0)
    step = optimizer.step

    def folded_step(closure=None, **kwargs):
        if not accumulator.ready:  # host-side counter, no sync
            raise RuntimeError(
                f"step(): {accumulator.micro_batch} of {accum_steps} micro-batches folded; "
                f"prepare planned {accum_steps} backward passes per optimizer step"
            )
        kwargs.setdefault("grad", accumulator.accumulator)
        kwargs.setdefault("grad_sumsq", accumulator.total_sumsq)
        return step(closure, **kwargs)

    optimizer.step = folded_step
    optimizer.grad_accumulator = accumulator
    return optimizer


def _can_checkpoint(model: nn.Module) -> bool:
    return (
        hasattr(model, "gradient_checkpointing_enable")
        or hasattr(model, "activation_checkpointing")
        or _block_list(model) is not None
    )


def _block_list(model: nn.Module) -> nn.ModuleList | None:
    """The model's repeated blocks: its largest ``nn.ModuleList`` of modules of one class."""
    lists = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1
    ]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def _enable_checkpointing(model: nn.Module, applied: list[str]) -> None:
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        applied.append("activation checkpointing: every layer (gradient_checkpointing_enable)")
    elif hasattr(model, "activation_checkpointing") and hasattr(model, "checkpoint_blocks"):
        model.activation_checkpointing = True
        model.checkpoint_blocks = None
        applied.append("activation checkpointing: every block (the model's own switch)")
    else:
        blocks = _block_list(model)
        for block in blocks:
            block.forward = functools.partial(_checkpointed, block.forward)
        applied.append(
            f"activation checkpointing: each of the {len(blocks)} "
            f"{type(blocks[0]).__name__} blocks (torch.utils.checkpoint, non-reentrant)"
        )


def _checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _use_chunked_loss(model: nn.Module, chunk_tokens: int) -> None:
    """Route ``model(input_ids, labels=...)`` through the chunked loss; without labels the
    model's own forward runs (generation, evaluation of logits)."""
    from hybrid_triton.models.hf_loss import causal_lm_loss

    own_forward = model.forward

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None or input_ids is None:
            return own_forward(input_ids=input_ids, labels=labels, **kwargs)
        kwargs.pop("return_dict", None)
        loss = causal_lm_loss(
            self,
            input_ids,
            labels,
            chunk_tokens=chunk_tokens,
            num_items_in_batch=num_items_in_batch,
            **kwargs,
        )
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
