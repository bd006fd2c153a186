"""Gradient accumulation into the arena's fp32 accumulator, straight from backward.

``GradAccumulator`` registers a post-accumulate-grad hook on every arena parameter. As
backward produces each parameter's gradient, the hook folds it into that parameter's slice of
an fp32 accumulator with :func:`hybrid_triton.kernels.accumulate_grads` (first micro-batch
overwrites, later ones add; ``alpha = 1/N``; optionally unscaled by a loss scaler and checked
for non-finite values in the same pass) and drops it at once (``p.grad = None``). So no
full-size low-precision gradient buffer ever exists: at most one parameter's gradient is
alive at a time, plus what autograd itself holds.

The squared norms of the accumulated gradient (per segment and in total) are kept on the
device and are current after every micro-batch, so clipping needs no host copy. Micro-batch
boundaries are found automatically: the first hook of a backward pass queues a callback that
runs when that backward pass ends (the mechanism DDP uses).

Example::

    arena = FlatArena.from_module(model)
    accum = GradAccumulator(arena, num_micro_batches=4, batch_size=8)
    for micro in batches:                       # 4 micro-batches of 8
        model(micro).backward()                 # grads folded into accum.accumulator
    # accum.ready: the window is complete; accum.grads() are the mean gradients (fp32)
    # accum.grad_norm(): device tensor, sqrt of the total sum of squares
"""

from __future__ import annotations

import weakref

import torch

from hybrid_triton.arena import ArenaError, ArenaGroup, FlatArena
from hybrid_triton.kernels._checks import same_device
from hybrid_triton.kernels.accumulate import accumulate_grads


class GradAccumulator:
    """Fold gradients into fp32 flat accumulators from post-accumulate-grad hooks.

    Args:
        arena: the model's :class:`FlatArena` (every group is handled; all groups must be on
            one device) or a single :class:`ArenaGroup`.
        num_micro_batches: N, the micro-batches per accumulation window (optimizer step).
        module: optional; when given, checked to be the module the arena was built from.
        alpha: multiplier of each micro-batch's gradient; default ``1 / N`` (the accumulator
            then holds the mean gradient when each micro-batch's loss is a mean).
        scaler: optional ``DynamicLossScaler``: gradients are unscaled by its ``inv_scale`` and
            non-finite ones set its ``found_inf``, in the same pass.
        inv_scale, found_inf: the same without a scaler (float or float32 ``[1]`` tensor; flag).
        batch_size: samples per micro-batch, for the effective-batch metrics.
        accumulators: optional fp32 flat buffers (one per group, from ``group.new_state``).
        track_norms: keep per-segment and total sums of squares on the device.
    """

    def __init__(
        self,
        arena: FlatArena | ArenaGroup,
        num_micro_batches: int,
        *,
        module: torch.nn.Module | None = None,
        alpha: float | None = None,
        scaler=None,
        inv_scale: float | torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
        batch_size: int | None = None,
        accumulators: list[torch.Tensor] | None = None,
        track_norms: bool = True,
    ) -> None:
        if isinstance(arena, FlatArena):
            if module is not None:
                arena.check_module(module)
            groups = list(arena.groups)
        elif isinstance(arena, ArenaGroup):
            if module is not None:
                raise ArenaError(
                    "GradAccumulator: pass the FlatArena (not one group) to check the module"
                )
            groups = [arena]
        else:
            raise ArenaError(
                f"GradAccumulator: expected a FlatArena or ArenaGroup, got {type(arena).__name__}"
            )
        if isinstance(num_micro_batches, bool) or int(num_micro_batches) < 1:
            raise ValueError(
                f"GradAccumulator: num_micro_batches must be >= 1, got {num_micro_batches}"
            )
        devices = {g.device for g in groups}
        if len(devices) != 1:
            raise ArenaError(f"GradAccumulator: arena groups span several devices: {devices}")
        if scaler is not None and (inv_scale is not None or found_inf is not None):
            raise ValueError("GradAccumulator: pass a scaler or inv_scale/found_inf, not both")
        if accumulators is not None:
            if len(accumulators) != len(groups):
                raise ArenaError(
                    f"GradAccumulator: {len(accumulators)} accumulators for {len(groups)} groups"
                )
            for g, buf in zip(groups, accumulators):
                g.check_buffer(buf, "accumulator")
                if buf.dtype != torch.float32 or not same_device(buf.device, g.device):
                    raise ArenaError(
                        f"GradAccumulator: an accumulator must be float32 on {g.device}, got "
                        f"{buf.dtype} on {buf.device}"
                    )
        self.device = next(iter(devices))
        if scaler is not None:
            inv_scale, found_inf = scaler.inv_scale, scaler.found_inf
        self.groups = groups
        self.num_micro_batches = int(num_micro_batches)
        self.alpha = 1.0 / self.num_micro_batches if alpha is None else alpha
        self.inv_scale = inv_scale
        self.found_inf = found_inf
        self.batch_size = batch_size
        self.track_norms = track_norms
        self.accumulators = (
            list(accumulators)
            if accumulators is not None
            else [g.new_state(torch.float32) for g in groups]
        )
        self._views = [
            [acc[s.offset : s.end] for s in g.table] for g, acc in zip(groups, self.accumulators)
        ]
        # Sums of squares in float64: a gradient of 1e20 squares to 1e40, past fp32's range
        # (the step would then read an infinite norm as a non-finite gradient).
        self.seg_sumsq = [
            torch.zeros(len(g.table), dtype=torch.float64, device=self.device) for g in groups
        ]
        self.total_sumsq = torch.zeros(1, dtype=torch.float64, device=self.device)
        self._completed = 0  # backward passes finished in the current window
        self._windows = 0  # windows completed since creation
        self._in_backward = False
        self._touched = [[False] * len(g.table) for g in groups]
        self._handles = [
            p.register_post_accumulate_grad_hook(self._make_hook(gi, si))
            for gi, g in enumerate(groups)
            for si, p in enumerate(g.params)
        ]

    # -- hooks -------------------------------------------------------------------------------

    def _make_hook(self, group_index: int, segment_index: int):
        # The hook holds the accumulator weakly: hooks live in the parameters' C++ autograd
        # data, which Python's garbage collector cannot see, so a strong reference here makes
        # parameter -> hook -> accumulator -> arena group -> parameter a cycle that is never
        # collected (a dropped training setup kept its weights and buffers on the GPU). Keep
        # a reference to the accumulator while training; once it is gone, its hooks do nothing.
        owner = weakref.ref(self)

        def hook(param: torch.Tensor) -> None:
            accumulator = owner()
            if accumulator is not None:
                accumulator._fold(group_index, segment_index, param)

        return hook

    def _begin_backward(self) -> None:
        if self._completed >= self.num_micro_batches:
            self._completed = 0  # the previous window was consumed: start a new one
        self._in_backward = True
        if self.track_norms:
            for s in self.seg_sumsq:
                s.zero_()
            self.total_sumsq.zero_()
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _fold_target(
        self, gi: int, si: int, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where segment ``si`` of group ``gi`` accumulates, and the gradient to fold there
        (subclasses map sharded gradients to their local part)."""
        return self._views[gi][si], grad

    def _fold(self, gi: int, si: int, param: torch.Tensor) -> None:
        if not self._in_backward:
            self._begin_backward()
        grad = param.grad
        if grad is None:
            return
        target, grad = self._fold_target(gi, si, grad)
        if grad.layout != torch.strided:
            raise TypeError(
                f"{type(self).__name__}: sparse gradients are not supported ({grad.layout})"
            )
        accumulate_grads(
            target,
            grad if grad.is_contiguous() else grad.contiguous(),
            alpha=self.alpha,
            first=self._completed == 0,
            inv_scale=self.inv_scale,
            found_inf=self.found_inf,
            seg_sumsq=self.seg_sumsq[gi] if self.track_norms else None,
            total_sumsq=self.total_sumsq if self.track_norms else None,
            segment_index=si if self.track_norms else None,
        )
        # Drop the gradient now: no full-size low-precision gradient buffer ever builds up.
        param.grad = None
        self._touched[gi][si] = True

    def _end_backward(self) -> None:
        first = self._completed == 0
        for gi, touched in enumerate(self._touched):
            for si, was_touched in enumerate(touched):
                if was_touched:
                    touched[si] = False
                    continue
                # No gradient this micro-batch (an unused parameter): the window's sum so far.
                view = self._views[gi][si]
                if first:
                    view.zero_()
                if self.track_norms:
                    sq = view.to(torch.float64).square().sum()
                    self.seg_sumsq[gi][si : si + 1].copy_(sq)
                    self.total_sumsq.add_(sq)
        self._completed += 1
        if self._completed == self.num_micro_batches:
            self._windows += 1
        self._in_backward = False

    # -- public API --------------------------------------------------------------------------

    @property
    def accumulator(self) -> torch.Tensor:
        """The fp32 flat accumulator (single-group arenas)."""
        if len(self.accumulators) != 1:
            raise ArenaError(
                f"GradAccumulator: {len(self.accumulators)} groups; use .accumulators[i]"
            )
        return self.accumulators[0]

    @property
    def micro_batch(self) -> int:
        """Micro-batches folded in the current window (0 .. N)."""
        return self._completed

    @property
    def ready(self) -> bool:
        """True once N micro-batches have been folded: the accumulator holds the full window."""
        return self._completed == self.num_micro_batches

    @property
    def progress(self) -> float:
        return self._completed / self.num_micro_batches

    def grads(self, group: int = 0) -> list[torch.Tensor]:
        """The accumulated gradients of one group, as fp32 views shaped like its parameters."""
        return self.groups[group].views(self.accumulators[group])

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the accumulated gradient: a float32 ``[1]`` device tensor."""
        return self.total_sumsq.sqrt()

    def segment_norms(self, group: int = 0) -> torch.Tensor:
        """Per-parameter L2 norms of the accumulated gradient (float32 device tensor)."""
        return self.seg_sumsq[group].sqrt()

    def reset(self) -> None:
        """Start a new window at the next backward (the next micro-batch overwrites)."""
        if self._in_backward:
            raise RuntimeError("GradAccumulator.reset() during a backward pass")
        self._completed = 0

    def metrics(self) -> dict:
        """Host-side counters (no sync) plus device tensors for the norms."""
        out = {
            "micro_batch": self._completed,
            "num_micro_batches": self.num_micro_batches,
            "progress": self.progress,
            "ready": self.ready,
            "windows": self._windows,
            "grad_sumsq": self.total_sumsq,
        }
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
            out["effective_batch"] = self.batch_size * self.num_micro_batches
            out["samples_accumulated"] = self.batch_size * self._completed
        return out

    def remove(self) -> None:
        """Remove the hooks: parameters get ordinary ``.grad`` again."""
        for h in self._handles:
            h.remove()
        self._handles = []


class FlatGradBuffer:
    """One micro-batch per step, no hooks: autograd writes the gradients straight into one
    flat buffer of the parameters' dtype (``FusedAdamW.attach_flat_grads``: each parameter's
    ``.grad`` is a view of it), which the optimizer step then reads.

    Why. With a single micro-batch there is nothing to accumulate, so the fp32 accumulator
    buys no precision: each parameter's gradient reaches it already rounded to the parameter
    dtype (a parameter used twice in one forward, such as GPT-2's tied embedding, has its two
    terms summed by autograd in that dtype on either path). Its post-accumulate-grad hooks
    cost one kernel launch per parameter, host-side work that on the H100 made a GPT-2 small
    step take 42 ms instead of 27 ms (the toolkit_memory recipe's median steps,
    reports/gpt2/training/2026-11-25_003310 and _004836). The buffer is also half the
    accumulator's size for bf16 parameters (2 instead of 4 bytes per element).

    It offers the part of :class:`GradAccumulator`'s interface that ``HybridTrainer`` uses:
    ``accumulator`` (the flat buffer), ``reset()`` before the step's backward, ``finish()``
    after it (the fp32 sum of squares, its finite check into ``found_inf``, and a host-side
    check that autograd did not replace a ``.grad`` view), ``grad_norm()``, ``total_sumsq``
    and the window counters. Single-group arenas only; no loss scaling (fp16 needs the
    accumulator's unscale pass).

    Args:
        optimizer: the :class:`~hybrid_triton.optim.FusedAdamW` whose arena group holds the
            parameters (its flat gradient buffer is attached here).
        found_inf: float32 ``[1]`` device flag, raised when the gradient is not finite.
    """

    num_micro_batches = 1
    inv_scale = None

    def __init__(self, optimizer, found_inf: torch.Tensor | None = None) -> None:
        self.optimizer = optimizer
        self.group: ArenaGroup = optimizer.arena_group
        self.device = self.group.device
        self.accumulator = optimizer.attach_flat_grads()
        self.alpha = 1.0
        if found_inf is None:
            found_inf = torch.zeros(1, dtype=torch.float32, device=self.device)
        self.found_inf = found_inf
        self.total_sumsq = torch.zeros(1, dtype=torch.float64, device=self.device)
        self._completed = 0
        self._windows = 0

    @property
    def micro_batch(self) -> int:
        return self._completed

    @property
    def ready(self) -> bool:
        return self._completed == 1

    @property
    def progress(self) -> float:
        return float(self._completed)

    def reset(self) -> None:
        """Zero the buffer (in place) before the step's backward; parameters whose ``.grad``
        was dropped (a Predict phase sets them to None) get their views back."""
        if self.alpha != 1.0 or self.num_micro_batches != 1:
            raise ValueError(
                "FlatGradBuffer: one micro-batch of weight 1 per step (nothing is scaled or "
                f"accumulated), got num_micro_batches={self.num_micro_batches}, "
                f"alpha={self.alpha}"
            )
        self.optimizer.zero_grad()
        self._completed = 0

    def finish(self) -> None:
        """After the backward pass: the global sum of squares (fp32, on the device) and the
        non-finite flag; raises if a parameter's ``.grad`` is no longer a view of the buffer
        (host-side pointer check, no sync), because the step would then read stale zeros."""
        base, size = self.accumulator.data_ptr(), self.accumulator.element_size()
        for p, seg in zip(self.group.params, self.group.table):
            if p.grad is None or p.grad.data_ptr() != base + seg.offset * size:
                raise RuntimeError(
                    "FlatGradBuffer: a parameter's .grad is no longer a view of the flat "
                    "gradient buffer (was model.zero_grad() or a hook replacing .grad used?); "
                    "use TrainerConfig(grad_path='hooks') for such models"
                )
        # Chunked so that any temporary of the reduction stays small for large models; in
        # float64 so that large finite gradients (1e20) do not square to inf.
        self.total_sumsq.zero_()
        for chunk in self.accumulator.split(2**25):
            self.total_sumsq.add_(torch.linalg.vector_norm(chunk, dtype=torch.float64).square())
        bad = (~torch.isfinite(self.total_sumsq)).to(torch.float32)
        torch.maximum(self.found_inf, bad, out=self.found_inf)
        self._completed = 1
        self._windows += 1

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradient: a float32 ``[1]`` device tensor."""
        return self.total_sumsq.sqrt()

    def remove(self) -> None:
        """Detach the buffer: parameters get ordinary ``.grad`` again."""
        self.optimizer.detach_flat_grads()
