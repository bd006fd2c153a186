"""Chunked fused linear + cross-entropy with backward: the LM-head loss without the logits.

The math: for final hidden states ``h [N, d]``, the output projection ``W [V, d]`` (GPT-2's
tied token embedding) and targets ``t [N]`` (``ignore_index`` marks positions not counted),

    z = h @ W.T                          logits            [N, V]
    loss = sum_i (logsumexp(z_i) - z_i[t_i]) / n       n = #{i : t_i != ignore_index}
    dL/dz_i = (softmax(z_i) - onehot(t_i)) / n          (zero for ignored rows)
    dL/dh = dL/dz @ W,     dL/dW = dL/dz.T @ h

``F.cross_entropy(h @ W.T, t)`` materializes ``z`` (8192 x 50304 in bf16 is 0.77 GiB for GPT-2
small at 8 x 1024 tokens) and, in backward, its fp32/bf16 log-probabilities and gradients
beside it (the planner counts 2.3 GiB). Here the rows are taken ``chunk_tokens`` at a time:
per chunk the logits are computed in the compute dtype, one Triton program per row turns
them **in place** into ``dL/dz`` (an online max / sum-of-exp pass in fp32, then a pass that
writes ``(softmax - onehot) / n``, so no fp32 copy of the chunk exists), and two matmuls fold
the chunk into ``dL/dh`` (its rows of an ``[N, d]`` buffer) and ``dL/dW`` (an fp32 ``[V, d]``
accumulator: the sum over chunks is kept in fp32, each chunk's product is rounded once).

By default the gradients are made during forward (as Liger-Kernel's fused linear cross
entropy does): the loss is a scalar, so backward only scales them by the incoming gradient,
and the logits are never recomputed. ``grads_in_forward=False`` saves ``h`` and ``W`` instead
and recomputes each chunk's logits in backward (one more ``[N, d] x [d, V]`` matmul; it keeps
nothing vocabulary-sized between forward and backward).

Dtypes: under ``torch.autocast`` (fp32 parameters) the matmuls run in the autocast dtype, as
``F.linear`` would; otherwise in the inputs' dtype. Row statistics and the loss are fp32 (fp64
for fp64 inputs). The returned loss is fp32 (fp64 for fp64 inputs); gradients come back in the
dtype of their input.

Dispatch (``hybrid_triton.kernels._dispatch``): the per-row kernel runs through Triton on CUDA
(and through the interpreter on CPU under ``TRITON_INTERPRET=1``); otherwise the same math in
torch on an fp32 copy of the chunk. Under fake tensors (the planner's traced mode) only the
Triton path's allocations are made, so a trace measures what the GPU holds. No host sync: the
count ``n`` stays on the device.

Reference: ``F.cross_entropy(hidden @ weight.T, targets, ignore_index=...)`` (the tests compare
against it in float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from hybrid_triton.kernels._alloc import empty
from hybrid_triton.kernels._checks import KernelInputError, check_tensor
from hybrid_triton.kernels._dispatch import use_triton

OP = "linear_cross_entropy"
FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_BLOCK_V = 4096  # columns per loop iteration of a row program (16 KiB of fp32 registers)


@triton.jit
def _ce_rows_kernel(
    logits_ptr,  # [C, V] compute dtype; overwritten with dL/dz when WANT_GRAD
    targets_ptr,  # [C] int64
    loss_ptr,  # [C] ACC dtype: per-row loss, 0 for ignored rows
    inv_count_ptr,  # [1] ACC dtype: 1 / (number of counted targets of the whole batch)
    V,
    stride_row,
    ignore_index,
    BLOCK_V: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,  # cdiv(V, BLOCK_V): a compile-time trip count (V is fixed)
    WANT_GRAD: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    # Pass 1: online max and sum of exp (fp32 at least), so a row is read once for the stats.
    row_max = tl.full((), float("-inf"), ACC)
    row_sum = tl.zeros((), ACC)
    for i in range(NUM_BLOCKS):
        start = i * BLOCK_V
        mask = start + cols < V
        z = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(ACC)
        new_max = tl.maximum(row_max, tl.max(z, axis=0))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        row_max = new_max
    lse = row_max + tl.log(row_sum)
    counted = target != ignore_index
    # An out-of-range target cannot be reported without a host sync; clamp the read so it
    # stays inside the row (the loss is then wrong, never a stray memory access).
    safe_target = tl.minimum(tl.maximum(tl.where(counted, target, 0), 0), V - 1)
    z_target = tl.load(base + safe_target).to(ACC)
    tl.store(loss_ptr + row, tl.where(counted, lse - z_target, 0.0))
    if WANT_GRAD:
        scale = tl.where(counted, tl.load(inv_count_ptr), 0.0)
        # Pass 2: dL/dz = (softmax - onehot) * scale, written over the logits it reads.
        for i in range(NUM_BLOCKS):
            offs = i * BLOCK_V + cols
            mask = offs < V
            z = tl.load(base + offs, mask=mask, other=0.0).to(ACC)
            grad = (tl.exp(z - lse) - tl.where(offs == target, 1.0, 0.0)) * scale
            tl.store(base + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ce_rows_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    inv_count: torch.Tensor,
    ignore_index: int,
    want_grad: bool,
) -> torch.Tensor:
    """Per-row loss of a ``[C, V]`` logits chunk (``_acc_dtype``; 0 for ignored rows); with
    ``want_grad`` the chunk is overwritten with ``(softmax - onehot) * inv_count``."""
    rows, vocab = logits.shape
    acc = _acc_dtype(logits.dtype)
    loss = empty(rows, dtype=acc, device=logits.device)
    if rows == 0 or is_fake(logits):
        # Fake tensors (the planner's traced mode): what the Triton path allocates, no math.
        return loss
    if use_triton(logits):
        block = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
        _ce_rows_kernel[(rows,)](
            logits,
            targets,
            loss,
            inv_count,
            vocab,
            logits.stride(0),
            ignore_index,
            BLOCK_V=block,
            NUM_BLOCKS=triton.cdiv(vocab, block),
            WANT_GRAD=want_grad,
            ACC=tl.float64 if acc == torch.float64 else tl.float32,
            num_warps=8 if block >= 2048 else 4,
        )
        return loss
    z = logits.to(acc)  # the torch path keeps an fp32 copy of the chunk
    counted = targets != ignore_index
    safe_target = torch.where(counted, targets, 0).clamp_(0, vocab - 1).unsqueeze(1)
    lse = torch.logsumexp(z, dim=1)
    loss.copy_(torch.where(counted, lse - z.gather(1, safe_target).squeeze(1), 0.0))
    if want_grad:
        z.sub_(lse.unsqueeze(1)).exp_()
        z.scatter_add_(1, safe_target, torch.full_like(lse, -1.0).unsqueeze(1))
        z.mul_(torch.where(counted, inv_count, 0.0).unsqueeze(1))
        logits.copy_(z)
    return loss


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.dtype in (torch.float32,):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    inv_count: torch.Tensor,
    ignore_index: int,
    chunk_tokens: int,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
) -> torch.Tensor:
    """Loss sum over all rows, chunk by chunk; fills ``grad_hidden`` (rows, compute dtype) and
    adds into ``grad_weight`` (fp32 or wider) when given. ``hidden``/``weight`` are already in
    the compute dtype."""
    want_grad = grad_hidden is not None or grad_weight is not None
    total = torch.zeros((), dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[start : start + chunk_tokens]
        logits = h @ weight.t()
        total += _ce_rows_(
            logits, targets[start : start + chunk_tokens], inv_count, ignore_index, want_grad
        ).sum()
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start : start + chunk_tokens])
        if grad_weight is not None:
            if grad_weight.dtype == logits.dtype:
                grad_weight.addmm_(logits.t(), h)
            else:  # fp32 accumulator: the chunk's product is rounded once, the sum is not
                grad_weight.add_(logits.t() @ h)
        del logits  # before the next chunk's logits are allocated
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_tokens, grads_in_forward):
        dtype = _compute_dtype(hidden, weight)
        acc = _acc_dtype(dtype)
        count = (targets != ignore_index).sum()
        # 0 counted targets: loss 0 / 0 = nan, as F.cross_entropy's mean gives.
        inv_count = (1.0 / count.to(acc)).reshape(1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            grads = grads_in_forward and (need_h or need_w)
            gh = empty(*h.shape, dtype=dtype, device=h.device) if grads and need_h else None
            gw = (
                torch.zeros(
                    w.shape, dtype=torch.promote_types(dtype, torch.float32), device=w.device
                )
                if grads and need_w
                else None
            )
            total = _chunks(h, w, targets, inv_count, ignore_index, chunk_tokens, gh, gw)
        ctx.grads_in_forward = grads
        ctx.meta = (ignore_index, chunk_tokens, dtype, hidden.dtype, weight.dtype)
        if grads:
            # Kept in the inputs' dtypes: backward only scales them.
            ctx.save_for_backward(
                None if gh is None else gh.to(hidden.dtype),
                None if gw is None else gw.to(weight.dtype),
            )
        else:
            ctx.save_for_backward(hidden, weight, targets, inv_count)
        return total * inv_count.squeeze(0)

    @staticmethod
    def backward(ctx, grad_loss):
        ignore_index, chunk_tokens, dtype, hidden_dtype, weight_dtype = ctx.meta
        if ctx.grads_in_forward:
            gh, gw = ctx.saved_tensors
        else:
            hidden, weight, targets, inv_count = ctx.saved_tensors
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            h, w = hidden.to(dtype), weight.to(dtype)
            gh = empty(*h.shape, dtype=dtype, device=h.device) if need_h else None
            gw = (
                torch.zeros(
                    w.shape, dtype=torch.promote_types(dtype, torch.float32), device=w.device
                )
                if need_w
                else None
            )
            _chunks(h, w, targets, inv_count, ignore_index, chunk_tokens, gh, gw)
            gh = None if gh is None else gh.to(hidden_dtype)
            gw = None if gw is None else gw.to(weight_dtype)
        grad_loss = grad_loss.to(torch.float32 if dtype != torch.float64 else dtype)
        gh = None if gh is None else gh * grad_loss.to(gh.dtype)
        gw = None if gw is None else gw * grad_loss.to(gw.dtype)
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_tokens: int = 1024,
    grads_in_forward: bool = True,
) -> torch.Tensor:
    """Mean cross entropy of ``hidden @ weight.T`` against ``targets``, chunked, with autograd.

    ``hidden``: ``[N, d]`` float (fp32/bf16/fp16/fp64), ``weight``: ``[V, d]`` on the same
    device, ``targets``: ``[N]`` int64 with values in ``[0, V)`` or ``ignore_index``.
    Equals ``F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)`` (mean
    over counted targets, nan when none is counted) while at most ``chunk_tokens x V`` logits
    exist at a time. Returns a 0-dim fp32 tensor (fp64 for fp64 inputs).
    """
    check_tensor(OP, "hidden", hidden, dtypes=FLOAT_INPUTS, contiguous=False)
    check_tensor(OP, "weight", weight, dtypes=FLOAT_INPUTS, device=hidden.device, contiguous=False)
    check_tensor(OP, "targets", targets, dtypes=(torch.int64,), device=hidden.device)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise KernelInputError(
            f"{OP}: expected hidden [N, d] and weight [V, d] with the same d, got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise KernelInputError(
            f"{OP}: expected targets [N] with N = {hidden.shape[0]} (hidden's rows), got "
            f"shape {tuple(targets.shape)}"
        )
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise KernelInputError(f"{OP}: chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise KernelInputError(f"{OP}: ignore_index must be an int, got {ignore_index!r}")
    return _LinearCrossEntropy.apply(
        hidden.contiguous(),
        weight.contiguous(),
        targets,
        ignore_index,
        chunk_tokens,
        bool(grads_in_forward),
    )
