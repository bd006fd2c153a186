"""The toolkit's ops as torch custom ops (``torch.ops.hybrid_triton.*``), for ``torch.compile``.

Dynamo cannot trace into a Triton launcher's Python (nor the interpreter's), so a compiled
training step that calls ``cast_scale`` directly breaks the graph, and under
``fullgraph=True`` fails. Registered with ``torch.library.custom_op``, each op is one opaque
node with a fake implementation (shapes and dtypes, no data): compiled code keeps it whole and
runs the same launcher (Triton on CUDA, the interpreter or the torch reference on CPU, as the
dispatch rule says). In-place ops declare what they mutate, so functionalization orders them.

Schemas take tensors for the scalars that the plain launchers also accept as floats (a
compiled graph should not specialize on a learning rate). Importing this module registers the
ops once (and imports the launchers, so Triton); ``import hybrid_triton`` does not import it.

Ops (``torch.ops.hybrid_triton.<name>``; a trailing ``_`` marks one that works in place):

- ``cast_scale(x, scale, out_dtype) -> Tensor``, ``cast_scale_(x, scale, out, found_inf)``
- ``unscale(grad, inv_scale) -> Tensor``, ``unscale_(grad, inv_scale, out, found_inf)``
- ``accumulate_grads_(acc, grad, alpha, first, found_inf)``
- ``adamw_step_(master, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
  weight_decay, clip_coef, found_inf, shadow, state_bits, exp_avg_scale, exp_avg_sq_scale)``
"""

from __future__ import annotations

import torch
from hybrid_triton.kernels.accumulate import accumulate_grads as _accumulate_grads
from hybrid_triton.kernels.adamw import adamw_step as _adamw_step
from hybrid_triton.kernels.cast_scale import cast_scale as _cast_scale
from hybrid_triton.kernels.unscale import unscale as _unscale
from torch.library import custom_op

NAMESPACE = "hybrid_triton"


@custom_op(f"{NAMESPACE}::cast_scale", mutates_args=())
def cast_scale(x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``(x * scale).to(out_dtype)``; ``scale`` a float32 ``[1]`` tensor."""
    return _cast_scale(x, scale, out_dtype=out_dtype)


@cast_scale.register_fake
def _(x, scale, out_dtype):
    return torch.empty_like(x, dtype=out_dtype)


@custom_op(f"{NAMESPACE}::cast_scale_", mutates_args=("out", "found_inf"))
def cast_scale_(
    x: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, found_inf: torch.Tensor | None
) -> None:
    """``out = (x * scale).to(out.dtype)``, flagging non-finite results in ``found_inf``."""
    _cast_scale(x, scale, out=out, found_inf=found_inf)


@cast_scale_.register_fake
def _(x, scale, out, found_inf):
    return None


@custom_op(f"{NAMESPACE}::unscale", mutates_args=())
def unscale(grad: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """``float32(grad) * inv_scale``."""
    return _unscale(grad, inv_scale)


@unscale.register_fake
def _(grad, inv_scale):
    return torch.empty_like(grad, dtype=torch.float32)


@custom_op(f"{NAMESPACE}::unscale_", mutates_args=("out", "found_inf"))
def unscale_(
    grad: torch.Tensor, inv_scale: torch.Tensor, out: torch.Tensor, found_inf: torch.Tensor | None
) -> None:
    """``out = float32(grad) * inv_scale``, flagging non-finite gradients in ``found_inf``."""
    _unscale(grad, inv_scale, out=out, found_inf=found_inf)


@unscale_.register_fake
def _(grad, inv_scale, out, found_inf):
    return None


@custom_op(f"{NAMESPACE}::accumulate_grads_", mutates_args=("acc", "found_inf"))
def accumulate_grads_(
    acc: torch.Tensor,
    grad: torch.Tensor,
    alpha: torch.Tensor,
    first: bool,
    found_inf: torch.Tensor | None,
) -> None:
    """``acc = (0 if first else acc) + float32(grad) * alpha``, flagging non-finite."""
    _accumulate_grads(acc, grad, alpha=alpha, first=first, found_inf=found_inf)


@accumulate_grads_.register_fake
def _(acc, grad, alpha, first, found_inf):
    return None


@custom_op(
    f"{NAMESPACE}::adamw_step_",
    mutates_args=("master", "exp_avg", "exp_avg_sq", "step", "shadow", "exp_avg_scale",
                  "exp_avg_sq_scale"),
)  # fmt: skip
def adamw_step_(
    master: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip_coef: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    shadow: torch.Tensor | None,
    state_bits: int,
    exp_avg_scale: torch.Tensor | None,
    exp_avg_sq_scale: torch.Tensor | None,
) -> None:
    """One AdamW step over flat buffers, in place (:func:`hybrid_triton.kernels.adamw_step`)."""
    _adamw_step(
        master, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, step=step, clip_coef=clip_coef, found_inf=found_inf,
        shadow=shadow, state_bits=state_bits, exp_avg_scale=exp_avg_scale,
        exp_avg_sq_scale=exp_avg_sq_scale,
    )  # fmt: skip


@adamw_step_.register_fake
def _(master, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, clip_coef,
      found_inf, shadow, state_bits, exp_avg_scale, exp_avg_sq_scale):  # fmt: skip
    return None
