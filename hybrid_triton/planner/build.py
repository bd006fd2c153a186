"""What can be built today, and how: the one place that says which planned setups the toolkit
(or plain PyTorch) can run, and the calls that build each one.

The planner can estimate setups nobody can run yet (that is how one learns whether a feature
would pay off), but ``fit`` must only recommend what a user can build. ``NOT_BUILDABLE`` lists
the combinations that cannot be built, each with the reason; when the toolkit learns one
(an optimizer step that streams moments through host memory, FusedAdamW on bf16 parameters
without a master copy), delete its row and ``fit`` starts offering it.

- :func:`why_not_buildable` (``setup -> reason or None``), :func:`is_buildable`;
- :func:`build_steps` (``spec, setup -> lines``): the toolkit calls, Hugging Face's
  ``gradient_checkpointing_enable`` and the allocator's environment variable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from hybrid_triton.planner.setup import TrainSetup
from hybrid_triton.planner.specs import ModelSpec, PlannerError


def _low_precision(s: TrainSetup) -> bool:
    return s.param_dtype != "fp32"


def uses_fused_adamw(s: TrainSetup) -> bool:
    """The toolkit's FusedAdamW is the only optimizer here that keeps fp32 master weights
    for bf16/fp16 parameters, stores moments in 16/8/4 bits beside fp32 parameters, or
    updates bf16 parameters without a master copy by stochastic rounding from flat
    gradients or with other than bf16 moments (plain PyTorch's optimizers keep their state
    in the parameters' dtype and round to nearest)."""
    if s.optimizer != "adamw":
        return False
    if s.master_weights or s.trainer:
        return True
    if s.param_dtype == "bf16":
        return s.grad_mode != "full" or s.state_bits != 16
    return not _low_precision(s) and s.state_bits != 32


class Rule(NamedTuple):
    name: str
    applies: Callable[[TrainSetup], bool]
    reason: str


NOT_BUILDABLE: tuple[Rule, ...] = (
    Rule(
        "moments in host memory every step",
        lambda s: s.offload == "cpu",
        "optimizer moments kept in host memory at every step (offload='cpu'): no optimizer "
        "in the toolkit streams them through the step yet (HybridTrainer's StateOffloader "
        "moves them out for Predict phases only)",
    ),
    Rule(
        "low-precision parameters without a master copy, state not in their dtype",
        lambda s: (
            s.param_dtype == "fp16"
            and not s.master_weights
            and s.optimizer != "none"
            and s.state_bits != 16
        ),
        "fp16 parameters without fp32 master weights: plain PyTorch's optimizers keep "
        "their state in the parameters' dtype (state_bits=16), and FusedAdamW's stochastic "
        "rounding without a master copy is for bf16 parameters only",
    ),
    Rule(
        "low-precision parameters without a master copy, flat or hook-folded gradients",
        lambda s: s.param_dtype == "fp16" and not s.master_weights and s.grad_mode != "full",
        "flat or hook-folded gradients feed FusedAdamW, which needs fp32 master weights for "
        "fp16 parameters (stochastic rounding without a master copy is for bf16 only)",
    ),
    Rule(
        "FusedAdamW gathering per-parameter gradients",
        lambda s: uses_fused_adamw(s) and s.grad_mode == "full",
        "FusedAdamW with per-parameter .grad tensors gathers them into a flat copy at every "
        "step, which this plan does not count: plan grad_mode 'flat' (attach_flat_grads, one "
        "micro-batch per step) or 'hook' (GradAccumulator)",
    ),
    Rule(
        "low-bit or master-weight SGD",
        lambda s: s.optimizer == "sgd" and (s.master_weights or s.state_bits not in (32, 16)),
        "SGD runs as torch.optim.SGD only (momentum in the parameters' dtype); FusedAdamW is AdamW",
    ),
    Rule(
        "flat or hook-folded gradients without FusedAdamW",
        lambda s: s.grad_mode != "full" and s.optimizer != "none" and not uses_fused_adamw(s),
        "flat and hook-folded gradients are read by FusedAdamW (opt.step(grad=...)); plain "
        "PyTorch optimizers read .grad",
    ),
)


def why_not_buildable(setup: TrainSetup) -> str | None:
    """None when the toolkit or plain PyTorch can build ``setup`` today, else the reason (the
    first row of ``NOT_BUILDABLE`` that applies)."""
    for rule in NOT_BUILDABLE:
        if rule.applies(setup):
            return rule.reason
    return None


def is_buildable(setup: TrainSetup) -> bool:
    return why_not_buildable(setup) is None


_TORCH_DTYPE = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}


def _precision_steps(s: TrainSetup) -> list[str]:
    if s.param_dtype == "fp32" and s.autocast:
        lines = [
            "keep the parameters fp32; run the forward and the loss under "
            f"`torch.autocast('cuda', dtype={_TORCH_DTYPE[s.autocast]})`"
        ]
        if s.autocast == "fp16":
            lines.append(
                "scale the loss (fp16's range): `scaler = torch.amp.GradScaler()`, "
                "`scaler.scale(loss).backward()`, `scaler.step(opt)`, `scaler.update()`"
            )
        return lines
    if s.param_dtype == "fp32":
        return ["fp32 parameters, no autocast"]
    cast = f"`model.to({_TORCH_DTYPE[s.param_dtype]})` after moving it to the GPU"
    if s.master_weights:
        return [f"{cast}: the parameters become shadows of FusedAdamW's fp32 master weights"]
    if uses_fused_adamw(s):
        return [
            f"{cast}; no master copy: FusedAdamW(..., master_weights=False) rounds each "
            "update to bf16 stochastically (unbiased)"
        ]
    return [f"{cast}; no master copy (updates below the dtype's resolution are lost)"]


def _optimizer_steps(s: TrainSetup) -> list[str]:
    if s.optimizer == "none":
        return ["no optimizer state (optimizer 'none')"]
    if s.optimizer == "sgd":
        return ["`opt = torch.optim.SGD(model.parameters(), lr=..., momentum=0.9)`"]
    if not uses_fused_adamw(s):
        return ["`opt = torch.optim.AdamW(model.parameters(), lr=..., fused=True)`"]
    master = "" if s.master_weights or s.trainer else ", master_weights=False"
    lines = [
        "`from hybrid_triton import FlatArena`; `from hybrid_triton.optim import FusedAdamW`",
        "`arena = FlatArena.from_module(model)` (after the move to the GPU and the cast)",
        f"`opt = FusedAdamW(arena, lr=..., state_bits={s.state_bits}{master}, max_grad_norm=1.0)`",
    ]
    if s.trainer:
        lines.append(
            "`from hybrid_triton.trainer import HybridTrainer`; `trainer = HybridTrainer(model, "
            "loss_fn, optimizer=opt, config=TrainerConfig(micro_batches="
            f"{s.accum_steps}))` (it picks the gradient path: "
            + ("a flat buffer" if s.grad_mode == "flat" else "hook-folded fp32")
            + "; no attach_flat_grads)"
        )
    elif s.grad_mode == "flat":
        lines.append(
            "`opt.attach_flat_grads()` once: every .grad is a view of one flat buffer "
            "(one micro-batch per optimizer step); `opt.step()`, `opt.zero_grad()`"
        )
    elif s.grad_mode == "hook":
        lines.append(
            "`from hybrid_triton.accumulation import GradAccumulator`; `accum = "
            f"GradAccumulator(arena, num_micro_batches={s.accum_steps}, module=model)`; after "
            "the backwards `opt.step(grad=accum.accumulator, grad_sumsq=accum.total_sumsq)`"
        )
    return lines


def _checkpoint_steps(s: TrainSetup, spec: ModelSpec) -> list[str]:
    if not s.checkpointing:
        return []
    blocks = s.checkpoint_blocks
    if blocks is not None and blocks < spec.n_layer:
        return [
            f"activation checkpointing of the first {blocks} blocks: "
            f"`GPT2Config(activation_checkpointing=True, checkpoint_blocks={blocks})` "
            "(hybrid_triton.models.gpt2; Hugging Face models checkpoint every block)"
        ]
    return [
        "activation checkpointing per block: `model.gradient_checkpointing_enable()` (Hugging "
        "Face models); `GPT2Config(activation_checkpointing=True)` (hybrid_triton.models.gpt2); "
        "other modules: `torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)` "
        "around each block"
    ]


def build_steps(spec: ModelSpec, setup: TrainSetup) -> list[str]:
    """How to build ``setup`` for ``spec``: one line per step, in order. Raises
    :class:`PlannerError` when it cannot be built (:func:`why_not_buildable`)."""
    reason = why_not_buildable(setup)
    if reason is not None:
        raise PlannerError(f"this setup cannot be built today: {reason}")
    s = setup
    lines = []
    if s.allocator == "expandable":
        lines.append(
            "`export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` before the process "
            "starts (the plan assumes PyTorch's expandable segments)"
        )
    if uses_fused_adamw(s) and not s.trainer and s.param_dtype == "bf16":
        lines.append(
            "in one call (Hugging Face models, the project's GPT-2, or any module with "
            "plan=False): `prepared = hybrid_triton.prepare(model, gpu=..., batch_size="
            f"{s.micro_batch}, seq_len={s.seq_len}"
            + ("" if s.master_weights else ", master_weights=False")
            + ")`; or step by step:"
        )
    lines += _precision_steps(s)
    lines += _checkpoint_steps(s, spec)
    lines += _optimizer_steps(s)
    if s.fused_loss:
        lines.append(
            "the fused chunked loss: `GPT2Config(fused_loss=True, "
            f"loss_chunk_tokens={s.loss_chunk_tokens})` (hybrid_triton.models.gpt2 only)"
        )
    step = f"micro-batch {s.micro_batch} x {s.seq_len} tokens"
    if s.accum_steps > 1:
        step += f", {s.accum_steps} micro-batches per optimizer step"
    lines.append(step)
    return lines
