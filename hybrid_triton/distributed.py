"""Multi-GPU: the toolkit's kernels, flat arena, FusedAdamW and trainer under torch.distributed.

The toolkit grows no engine of its own (DESIGN.md, Growing past one GPU): PyTorch shards the
model (FSDP2, ``torch.distributed.fsdp.fully_shard``) or replicates it; the arena, the
accumulator and the optimizer work on each rank's local data, and a handful of small
collectives keep the ranks in step. Nothing here waits for the host: every reduction is a
``dist.all_reduce`` / ``dist.broadcast`` on a device tensor, queued like a kernel.

Two layouts:

- **sharded** (FSDP2): :func:`shard_arena` moves every FSDP parameter's local shard (the
  padded ``_sharded_param_data`` FSDP all-gathers from) into one flat buffer, so the fused
  AdamW step is one launch over the rank's shards and FSDP's next all-gather reads what it
  wrote. Gradients arrive already reduce-scattered (averaged over ranks) in the sharded
  parameters' ``.grad``; :class:`ShardedGradAccumulator` folds them into the rank's fp32
  accumulator from FSDP's post-accumulate-grad hooks, micro-batch by micro-batch.
- **replicated** (data parallel): every rank holds the whole model; the hook-fed fp32
  accumulator (:class:`~hybrid_triton.accumulation.GradAccumulator`) is local, and one
  all-reduce of that flat buffer per optimizer step makes it the global mean. DDP's own
  reducer reads ``.grad``, which the accumulator's hooks drop, so a DDP-wrapped model must
  run its backward passes under ``no_sync()`` (:func:`no_sync`); a plain module plus
  :func:`broadcast_parameters` does the same job without DDP's gradient buckets.

:class:`DistributedFusedAdamW` does the per-step communication of either layout inside
``step()``: the non-finite flag reduced with MAX (every rank skips the same step), the
gradient's sum of squares reduced with SUM (sharded: one global norm for clipping), or the
flat gradient all-reduced and its norms recomputed in one pass (replicated).

:class:`DistributedHybridTrainer` is :class:`~hybrid_triton.trainer.HybridTrainer` on top of
these, with phase decisions identical on every rank, and checkpoints through
``torch.distributed.checkpoint`` (DCP) that reshard on load. See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hybrid_triton.accumulation import GradAccumulator
from hybrid_triton.arena import ArenaError, ArenaGroup, FlatArena
from hybrid_triton.checkpoint import CheckpointError
from hybrid_triton.kernels.accumulate import accumulate_grads
from hybrid_triton.optim import FusedAdamW
from hybrid_triton.scheduler import Phase
from hybrid_triton.trainer import HybridTrainer

GRAD_SYNC = ("auto", "sharded", "all_reduce", "none")
DIST_CHECKPOINT_FORMAT = "hybrid_triton.DistributedHybridTrainer/1"


class DistributedError(RuntimeError):
    """torch.distributed is not set up the way a helper needs, or a model cannot be handled."""


# ---------------------------------------------------------------------------- collectives


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in ``group`` (1 when torch.distributed is not initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def _check_flag(op: str, t: torch.Tensor, name: str, dtypes=(torch.float32,)) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or t.numel() != 1:
        got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t)
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} must be a {want} tensor of one element, got {got}")
    if not t.is_contiguous():
        raise TypeError(f"{op}: {name} must be contiguous (it is reduced in place)")


def all_reduce_flag(
    found_inf: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Reduce the device-side non-finite flag with MAX across ranks, in place; returns it.

    After this every rank holds 1.0 if any rank found a non-finite value (or asked to skip),
    so every rank skips the same optimizer step and moves its loss scale the same way. The
    collective is queued on the device: no host sync. A no-op with one rank."""
    _check_flag("all_reduce_flag", found_inf, "found_inf")
    if world_size(group) > 1:
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
    return found_inf


def all_reduce_sumsq(sumsq: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum a float32 or float64 ``[1]`` sum of squares over ranks, in place (sharded
    gradients: the local sums add up to the global one, so clipping uses the global norm).
    Returns it."""
    _check_flag("all_reduce_sumsq", sumsq, "sumsq", (torch.float32, torch.float64))
    if world_size(group) > 1:
        dist.all_reduce(sumsq, op=dist.ReduceOp.SUM, group=group)
    return sumsq


def all_reduce_mean(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The mean of ``t`` over ranks, in place (SUM then a device multiply: gloo has no AVG)."""
    n = world_size(group)
    if n > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        t.mul_(1.0 / n)
    return t


def broadcast_parameters(
    params: nn.Module | FlatArena | ArenaGroup, src: int = 0, group: dist.ProcessGroup | None = None
) -> None:
    """Give every rank the parameters of rank ``src`` (what DDP does at construction). An arena
    is one broadcast per flat buffer; a module one per parameter and buffer."""
    if world_size(group) == 1:
        return
    if isinstance(params, FlatArena):
        tensors = [g.flat for g in params.groups]
    elif isinstance(params, ArenaGroup):
        tensors = [params.flat]
    elif isinstance(params, nn.Module):
        tensors = [p.data for p in params.parameters()] + list(params.buffers())
    else:
        raise TypeError(
            f"broadcast_parameters: expected a module, FlatArena or ArenaGroup, got "
            f"{type(params).__name__}"
        )
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=src, group=group)


def sync_gradients(
    grad: torch.Tensor,
    segments,
    *,
    group: dist.ProcessGroup | None = None,
    found_inf: torch.Tensor | None = None,
    seg_sumsq: torch.Tensor | None = None,
    total_sumsq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Make a replicated fp32 flat gradient the mean over ranks, in place.

    One all-reduce (SUM) of the flat buffer, then one pass of ``accumulate_grads`` over it
    that divides by the world size and, in the same pass, recomputes the per-segment and total
    sums of squares and sets ``found_inf`` on a non-finite value (a local sum is stale after
    the reduction). ``found_inf`` is then reduced with MAX, so a flag set on one rank by other
    means (a guard) skips the step everywhere."""
    if not isinstance(grad, torch.Tensor) or grad.dtype != torch.float32 or grad.dim() != 1:
        raise TypeError(
            "sync_gradients: grad must be a flat float32 tensor (an fp32 accumulator), got "
            f"{getattr(grad, 'dtype', type(grad))} of shape {tuple(getattr(grad, 'shape', ()))}"
        )
    if segments.total != grad.numel():
        raise ArenaError(
            f"sync_gradients: the segments cover {segments.total} elements, grad has {grad.numel()}"
        )
    n = world_size(group)
    if n > 1:
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
    # the sums in one dtype: the caller's, else float64 (large finite gradients square past
    # fp32's range)
    given = seg_sumsq if seg_sumsq is not None else total_sumsq
    dtype = given.dtype if given is not None else torch.float64
    if seg_sumsq is None:
        seg_sumsq = torch.zeros(len(segments), dtype=dtype, device=grad.device)
    if total_sumsq is None:
        total_sumsq = torch.zeros(1, dtype=dtype, device=grad.device)
    accumulate_grads(
        grad,
        grad,
        alpha=1.0 / n,
        first=True,
        found_inf=found_inf,
        segments=segments,
        seg_sumsq=seg_sumsq,
        total_sumsq=total_sumsq,
    )
    if found_inf is not None:
        all_reduce_flag(found_inf, group)
    return grad


def sync_accumulator(accum: GradAccumulator, group: dist.ProcessGroup | None = None) -> None:
    """After the last micro-batch of a window: every flat accumulator of ``accum`` becomes the
    mean over ranks, with its norms and non-finite flag recomputed (:func:`sync_gradients`).
    For user loops with replicated models; :class:`DistributedFusedAdamW` with
    ``grad_sync="all_reduce"`` does this inside ``step()`` instead (use one, not both)."""
    if not accum.ready:
        raise RuntimeError(
            f"sync_accumulator: the window is not complete ({accum.micro_batch} of "
            f"{accum.num_micro_batches} micro-batches folded)"
        )
    accum.total_sumsq.zero_()
    for g, acc, seg in zip(accum.groups, accum.accumulators, accum.seg_sumsq):
        part = torch.zeros(1, dtype=accum.total_sumsq.dtype, device=acc.device)
        flag = accum.found_inf if isinstance(accum.found_inf, torch.Tensor) else None
        sync_gradients(acc, g.segments, group=group, found_inf=flag, seg_sumsq=seg,
                       total_sumsq=part)  # fmt: skip
        accum.total_sumsq.add_(part)


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """``model.no_sync()`` for a DDP-wrapped model, nothing otherwise.

    Why every micro-batch, not only the first N-1 as usual: the accumulator's hooks fold each
    gradient into the fp32 accumulator and drop ``.grad``, which DDP's reducer would then read
    as missing (it all-reduces zeros and writes them back into ``.grad``). The gradient is
    averaged instead once per step, over the flat accumulator."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


# ---------------------------------------------------------------------------- FSDP2 arena


def _fsdp_params(model: nn.Module) -> list[Any]:
    """The ``FSDPParam`` objects of every ``fully_shard``-ed module in ``model``, in module
    order (each once)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    out, seen = [], set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        param_group = getattr(state, "_fsdp_param_group", None)
        for fp in getattr(param_group, "fsdp_params", None) or []:
            if id(fp) not in seen:
                seen.add(id(fp))
                out.append(fp)
    return out


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` (or a submodule) was wrapped by FSDP2's ``fully_shard``."""
    return bool(_fsdp_params(model))


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (a plain tensor is its own)."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


@dataclass(frozen=True)
class ShardInfo:
    """Where one parameter's local shard lives: ``local_numel`` elements at the start of its
    arena segment (whose ``numel`` is the padded shard FSDP all-gathers), the first
    ``local_rows`` of the ``padded_shape``; ``global_shape`` is the unsharded parameter's."""

    name: str
    local_numel: int
    local_rows: int
    padded_shape: tuple[int, ...]
    global_shape: tuple[int, ...]


class ShardedArena:
    """The flat arena over one rank's FSDP2 shards. Build it with :func:`shard_arena`.

    ``group``: an :class:`~hybrid_triton.arena.ArenaGroup` whose segments are the padded local
    shards and whose ``params`` are the sharded ``DTensor`` parameters (so optimizers and hooks
    see the real parameters); ``shards[i]`` says which part of segment ``i`` is real."""

    def __init__(self, module: nn.Module, group: ArenaGroup, shards: list[ShardInfo]) -> None:
        self.module_ref = weakref.ref(module)  # not id(): ids are reused after collection
        self.group = group
        self.shards = shards

    @property
    def params(self) -> list[nn.Parameter]:
        return self.group.params

    def local_views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """``buf`` (arena layout) cut into the real (unpadded) local shard of each parameter."""
        self.group.check_buffer(buf, "buffer")
        out = []
        for seg, sh in zip(self.group.table, self.shards):
            rows = buf[seg.offset : seg.end].view(sh.padded_shape)
            out.append(rows.narrow(0, 0, sh.local_rows) if sh.padded_shape else rows)
        return out


def shard_arena(model: nn.Module) -> ShardedArena:
    """Pack the local shards of every FSDP2 parameter of ``model`` into one flat buffer.

    Call after ``fully_shard`` (and after moving the model to its device), before training.
    Each parameter's padded local shard (what FSDP all-gathers from) becomes a segment of the
    arena and the sharded ``DTensor`` keeps its local tensor as a view of that segment, so
    the optimizer's one-launch step writes exactly what the next all-gather reads. FSDP's
    lazy initialization recognises the new storage (``FSDPParam.reset_sharded_param`` keeps a
    local tensor that shares the padded buffer's storage), so nothing is copied back.

    Limits (raise :class:`DistributedError`): one dtype and device for all shards, no CPU
    offload policy (``CPUOffloadPolicy``), no tensor-subclass parameters (``fsdp_pre_all_gather``
    extensions), dim-0 sharding only (``shard_placement_fn`` left alone), and every trainable
    parameter of ``model`` managed by FSDP.
    """
    fsdp_params = _fsdp_params(model)
    if not fsdp_params:
        raise DistributedError(
            f"shard_arena: {type(model).__name__} has no fully_shard-ed module; call "
            "torch.distributed.fsdp.fully_shard on it (and its blocks) first"
        )
    managed = {id(fp.sharded_param) for fp in fsdp_params}
    loose = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in managed]
    if loose:
        raise DistributedError(
            f"shard_arena: trainable parameters outside every fully_shard unit: {loose[:5]}; "
            "call fully_shard on the root module too"
        )
    kinds = {(fp.sharded_param.dtype, _local(fp.sharded_param).device) for fp in fsdp_params}
    if len(kinds) != 1:
        raise DistributedError(
            f"shard_arena: the shards mix dtypes or devices ({sorted(map(str, kinds))}); the "
            "arena needs one of each"
        )
    # FSDP fills FSDPParam._param_fqn at its lazy init (the first forward); the arena is built
    # before, so names come from the module (the first name of a tied parameter).
    names_by_id = {id(p): n for n, p in model.named_parameters()}
    padded: list[torch.Tensor] = []
    shards: list[ShardInfo] = []
    for fp in fsdp_params:
        name = names_by_id[id(fp.sharded_param)]
        if getattr(fp, "offload_to_cpu", False):
            raise DistributedError(
                f"shard_arena: {name} is offloaded to the CPU by FSDP; the arena "
                "keeps shards on the device (use the trainer's own offload instead)"
            )
        if fp.fsdp_placement.dim != 0:
            raise DistributedError(
                f"shard_arena: {name} is sharded on dim {fp.fsdp_placement.dim}; "
                "only dim-0 sharding (FSDP's default) is supported"
            )
        data = fp._sharded_param_data
        if type(data) is not torch.Tensor:
            raise DistributedError(
                f"shard_arena: {name} is a tensor subclass ({type(data).__name__}); "
                "FSDP extensions are not supported"
            )
        local = _local(fp.sharded_param)
        padded_shape = tuple(fp.padded_sharded_param_size)
        shards.append(
            ShardInfo(
                name,
                local.numel(),
                local.shape[0] if local.dim() else 1,
                padded_shape,
                tuple(fp.sharded_param.shape),
            )
        )
        padded.append(data.view(padded_shape))
    names = [[sh.name] for sh in shards]
    # The arena copies each padded shard into its flat buffer and turns the tensors we pass
    # into views of it; then FSDP's two references (the padded 1-D data it all-gathers from,
    # and the DTensor's local tensor, the first rows of it) are pointed at those views.
    group = ArenaGroup.from_params(padded, names)
    for fp, view, sh in zip(fsdp_params, padded, shards):
        fp._sharded_param_data = view.view(-1)
        local = view.narrow(0, 0, sh.local_rows) if view.dim() else view
        fp.sharded_param._local_tensor = local
    group.params = [fp.sharded_param for fp in fsdp_params]
    return ShardedArena(model, group, shards)


class ShardedGradAccumulator(GradAccumulator):
    """:class:`~hybrid_triton.accumulation.GradAccumulator` over a :class:`ShardedArena`.

    FSDP2 reduce-scatters each micro-batch's gradients (averaged over ranks) into the sharded
    parameters' ``.grad`` and then runs their post-accumulate-grad hooks; the hook folds the
    local shard into the rank's fp32 accumulator (``accumulate_grads``, weight ``alpha``) and
    drops it. The padded tail of each segment stays zero. Norms (``total_sumsq``) are of the
    local shards: reduce them with :func:`all_reduce_sumsq` (``DistributedFusedAdamW`` does)."""

    def __init__(self, arena: ShardedArena, num_micro_batches: int, **kwargs: Any) -> None:
        if not isinstance(arena, ShardedArena):
            raise ArenaError(
                f"ShardedGradAccumulator: expected a ShardedArena (shard_arena(model)), got "
                f"{type(arena).__name__}"
            )
        super().__init__(arena.group, num_micro_batches, **kwargs)
        self.sharded_arena = arena

    def _fold_target(
        self, gi: int, si: int, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # FSDP2 hands the hook a sharded DTensor: fold its local shard into the real (unpadded)
        # part of the segment.
        local = _local(grad)
        return self._views[gi][si][: local.numel()], local


# ---------------------------------------------------------------------------- optimizer


class DistributedFusedAdamW(FusedAdamW):
    """:class:`~hybrid_triton.optim.FusedAdamW` that keeps the ranks in step inside ``step()``.

    Args:
        params: a :class:`ShardedArena` (FSDP2: every rank steps its own shards), or what
            ``FusedAdamW`` takes (replicated: every rank steps the whole model).
        grad_sync: what ``step()`` communicates before the update:

            - ``"sharded"`` (default for a ShardedArena): the gradient's sum of squares is
              summed over ranks (global norm for clipping and the finite check), the flag
              reduced with MAX;
            - ``"all_reduce"`` (default otherwise): the flat gradient is all-reduced to the
              mean over ranks, in place, and its norm recomputed in the same pass
              (:func:`sync_gradients`); then the flag reduced with MAX;
            - ``"none"``: the caller already reduced everything (e.g. DDP's own reducer).
        process_group: the ranks to reduce over (default: the world).
        Other arguments: as :class:`~hybrid_triton.optim.FusedAdamW`.

    ``state_dict()`` is the local (per-rank) flat layout; :meth:`sharded_state_dict` gives a
    per-parameter form that ``torch.distributed.checkpoint`` reshards on load.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        grad_sync: str = "auto",
        process_group: dist.ProcessGroup | None = None,
        **kwargs: Any,
    ) -> None:
        if grad_sync not in GRAD_SYNC:
            raise ValueError(f"DistributedFusedAdamW: grad_sync must be one of {GRAD_SYNC}")
        self.sharded_arena = params if isinstance(params, ShardedArena) else None
        if self.sharded_arena is not None:
            if grad_sync == "all_reduce":
                raise ValueError(
                    "DistributedFusedAdamW: sharded gradients are reduce-scattered by FSDP; "
                    "grad_sync='all_reduce' would sum different shards"
                )
            params = self.sharded_arena.group
        if grad_sync == "auto":
            grad_sync = "sharded" if self.sharded_arena is not None else "all_reduce"
        self.grad_sync = grad_sync
        self.process_group = process_group
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)

    def attach_flat_grads(self) -> torch.Tensor:
        if self.sharded_arena is not None:
            raise ArenaError(
                "DistributedFusedAdamW: FSDP writes the sharded gradients itself; use a "
                "ShardedGradAccumulator (or let step() gather them)"
            )
        return super().attach_flat_grads()

    def _gather_grads(self) -> torch.Tensor:
        if self.sharded_arena is None:
            return super()._gather_grads()
        g = self.arena_group
        flat = torch.zeros(g.numel, dtype=g.dtype, device=g.device)
        for p, seg in zip(g.params, g.table):
            if p.grad is not None:
                local = _local(p.grad).reshape(-1)
                flat[seg.offset : seg.offset + local.numel()].copy_(local)
        return flat

    @torch.no_grad()
    def step(
        self,
        closure=None,
        *,
        grad: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
        grad_sumsq: torch.Tensor | None = None,
        grad_scale: float | torch.Tensor | None = None,
    ):
        """One AdamW step on this rank's data after the collectives of ``grad_sync``.
        Arguments as :meth:`FusedAdamW.step`; ``grad``, ``found_inf`` and ``grad_sumsq`` are
        reduced in place (so a trainer's accumulator and norm read global values after)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pg = self.process_group
        group = self.arena_group
        g = self._gather_grads() if grad is None else grad
        if self.grad_sync == "all_reduce":
            if g.dtype != torch.float32:
                # Low-precision gradients are averaged in fp32 (a one-off copy).
                g = g.to(torch.float32)
            group.check_buffer(g, "grad")
            if grad_sumsq is None:
                grad_sumsq = torch.zeros(1, dtype=torch.float32, device=g.device)
            sync_gradients(g, group.segments, group=pg, found_inf=found_inf,
                           total_sumsq=grad_sumsq)  # fmt: skip
        elif self.grad_sync == "sharded":
            if grad_sumsq is None:
                grad_sumsq = torch.linalg.vector_norm(g, 2, dtype=torch.float32).square()
                grad_sumsq = grad_sumsq.reshape(1)
            all_reduce_sumsq(grad_sumsq, pg)
            if found_inf is not None:
                all_reduce_flag(found_inf, pg)
        elif found_inf is not None:
            all_reduce_flag(found_inf, pg)
        super().step(grad=g, found_inf=found_inf, grad_sumsq=grad_sumsq, grad_scale=grad_scale)
        return loss

    # -------------------------------------------------------------------- resharding state

    def _param_entries(self) -> list[tuple[str, torch.Tensor | None, Any]]:
        """(name, parameter, shard info or None) per arena segment."""
        g = self.arena_group
        if self.sharded_arena is not None:
            return [(sh.name, p, sh) for p, sh in zip(g.params, self.sharded_arena.shards)]
        # A FlatArena names segments by the module's parameter names (a tied one by its first).
        return [(s.name, p, None) for s, p in zip(g.table, g.params)]

    def _moment_values(self, which: str) -> torch.Tensor:
        """float32 ``[arena numel]`` of one moment (8/4-bit decoded)."""
        st = self.flat_state
        if self.state_bits in (32, 16):
            return st[which].float()
        from hybrid_triton.kernels.adamw import dequantize_moments_ref

        return dequantize_moments_ref(st[which], st[f"{which}_scale"], self.arena_group.numel,
                                      self.state_bits, which, self.qblock)  # fmt: skip

    def _wrap(self, flat: torch.Tensor, param: Any, seg: Any, info: ShardInfo | None):
        """Segment ``seg`` of ``flat`` as a tensor shaped like the parameter: a DTensor with
        the parameter's sharding for FSDP (so DCP reshards it), a plain tensor otherwise."""
        block = flat[seg.offset : seg.end]
        if info is None:
            return block.view(seg.shape)
        from torch.distributed.tensor import DTensor

        local = block.view(info.padded_shape)
        local = local.narrow(0, 0, info.local_rows) if info.padded_shape else local
        return DTensor.from_local(
            local,
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )

    def sharded_state_dict(self) -> dict[str, Any]:
        """The optimizer state per parameter name, in fp32 (8/4-bit moments decoded): keys
        ``exp_avg.<name>``, ``exp_avg_sq.<name>``, ``master.<name>`` (with master weights),
        ``step`` and ``hparams``. Values are DTensors for FSDP parameters, so
        ``torch.distributed.checkpoint`` saves each rank's shard and reshards on load; plain
        tensors for a replicated model. Built from fresh fp32 buffers (not references)."""
        g = self.arena_group
        flats = {"exp_avg": self._moment_values("exp_avg").clone(),
                 "exp_avg_sq": self._moment_values("exp_avg_sq").clone()}  # fmt: skip
        if self.master_weights:
            flats["master"] = self.master.clone()
        out: dict[str, Any] = {}
        for (name, param, info), seg in zip(self._param_entries(), g.table):
            for key, flat in flats.items():
                out[f"{key}.{name}"] = self._wrap(flat, param, seg, info)
        out["step"] = self.flat_state["step"].clone()
        hp = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        hp["betas"] = list(hp["betas"])
        out["hparams"] = hp
        return out

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`sharded_state_dict` produced (after DCP filled it in place):
        moments re-encoded in this optimizer's ``state_bits``, master weights, step count and
        hyper-parameters."""
        from hybrid_triton.kernels.adamw import quantize_moments_ref

        g = self.arena_group
        targets: dict[str, torch.Tensor] = {}
        for key in ("exp_avg", "exp_avg_sq", "master"):
            if key == "master" and not self.master_weights:
                continue
            flat = torch.zeros(g.numel, dtype=torch.float32, device=g.device)
            for (name, param, info), seg in zip(self._param_entries(), g.table):
                src = state.get(f"{key}.{name}")
                if src is None:
                    raise KeyError(f"load_sharded_state_dict: no entry {key}.{name}")
                dst = self._wrap(flat, param, seg, info)
                _local(dst).copy_(_local(src))
            targets[key] = flat
        st = self.flat_state
        for which in ("exp_avg", "exp_avg_sq"):
            if self.state_bits in (32, 16):
                st[which].copy_(targets[which])
            else:
                codes, absmax = quantize_moments_ref(targets[which], self.state_bits, which,
                                                     self.qblock)  # fmt: skip
                st[which].copy_(codes)
                st[f"{which}_scale"].copy_(absmax)
        if self.master_weights:
            self.master.copy_(targets["master"])
            self.sync_shadows()
        st["step"].copy_(torch.as_tensor(state["step"], dtype=torch.float32).reshape(1))
        hp = state.get("hparams") or {}
        for k, v in hp.items():
            self.param_groups[0][k] = tuple(v) if k == "betas" else v
        self._lr.fill_(float(self.param_groups[0]["lr"]))
        self._lr_value = float(self.param_groups[0]["lr"])


# ---------------------------------------------------------------------------- the trainer


class _RankZeroDynamics:
    """A device-side dynamics model (the RSSM ensemble) whose outputs every rank takes from
    rank 0: its inputs are made global first (the loss averaged over ranks; sharded update
    norms summed in squares), and ``confidence`` / ``predict`` are broadcast from rank 0, so
    phase decisions and predicted updates are identical on every rank (each rank's own model
    may differ: different initial draws). Collectives only, no host sync."""

    device_side = True

    def __init__(self, inner: Any, group: dist.ProcessGroup | None, sharded: bool) -> None:
        self.inner = inner
        self.group = group
        self.sharded = sharded
        self.src = dist.get_global_rank(group, 0) if group is not None else 0

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().contiguous().clone()
        if world_size(self.group) > 1:
            dist.broadcast(t, src=self.src, group=self.group)
        return t

    def observe_device(self, stats: dict[str, Any]) -> None:
        stats = dict(stats)
        loss = stats["loss"].detach().float().reshape(1).clone()
        stats["loss"] = all_reduce_mean(loss, self.group).reshape(())
        if self.sharded:
            sq = stats["update_norms"].detach().float().square().contiguous()
            if world_size(self.group) > 1:
                dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.group)
            stats["update_norms"] = sq.sqrt()
        self.inner.observe_device(stats)

    def observe(self, loss: float, phase: str) -> None:
        self.inner.observe(loss, phase)

    def confidence(self) -> torch.Tensor:
        conf = self.inner.confidence()
        return self._bcast(torch.as_tensor(conf, dtype=torch.float32).reshape(1)).reshape(())

    def predict(self, horizon: int) -> tuple[Any, torch.Tensor]:
        loss_mean, scales = self.inner.predict(horizon)
        if isinstance(loss_mean, torch.Tensor):
            loss_mean = self._bcast(loss_mean.float())
        return loss_mean, self._bcast(scales.float())

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def _host(x: Any) -> Any:
    """Tensors of a nested state copied to the CPU (for a pickled blob)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _host(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_host(v) for v in x)
    return x


class DistributedHybridTrainer(HybridTrainer):
    """:class:`~hybrid_triton.trainer.HybridTrainer` on every rank of a process group.

    ``model``: a module wrapped by FSDP2's ``fully_shard`` (its blocks and the root; the
    arena, accumulator and optimizer then work on this rank's shards), or a replicated one
    (a plain module, whose parameters are broadcast from rank 0 here, or a DDP-wrapped one,
    whose backward passes run under ``no_sync`` and whose gradient is averaged once per step
    over the flat fp32 accumulator). Each rank passes its own share of the global batch.

    What keeps the ranks in step (with no host sync):

    - the optimizer (:class:`DistributedFusedAdamW`) reduces the non-finite flag with MAX, so
      every rank skips the same steps and moves its loss scale the same way; the gradient
      norm is global (sum of squares reduced, or the replicated gradient all-reduced);
    - each step's loss is averaged over ranks on the device before it goes to the host, so
      every host-side decision (phase transitions, confidence, divergence checks, rollback)
      is taken from identical values; a device-side dynamics model's confidence and
      predictions are broadcast from rank 0;
    - offload and restore of optimizer state run per rank, on its own shards;
    - :meth:`save` / :meth:`load` go through ``torch.distributed.checkpoint``: parameters and
      optimizer state per parameter (DTensors under FSDP), so a checkpoint written at one
      world size loads at another.

    Args: as :class:`HybridTrainer`, plus ``process_group`` (default: the world). A given
    ``optimizer`` must be a :class:`DistributedFusedAdamW` over this model.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        optimizer: DistributedFusedAdamW | None = None,
        config: Any = None,
        *,
        lr: float = 1e-3,
        optimizer_kwargs: dict[str, Any] | None = None,
        dynamics: Any | None = None,
        max_groups: int = 16,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError(
                "DistributedHybridTrainer: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group (torchrun sets the environment) first"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"DistributedHybridTrainer: model must be an nn.Module, got {type(model).__name__}"
            )
        self.process_group = process_group
        self.sharded = is_sharded(model)
        config = HybridTrainer._resolve_config(config)
        # The gradient sync and the sharded fold work on the fp32 accumulator's hooks.
        if config.grad_path == "flat":
            raise DistributedError(
                "DistributedHybridTrainer: grad_path='flat' is single-process only (the "
                "gradient sync reads the fp32 accumulator); use 'hooks' or 'auto'"
            )
        config = dataclasses.replace(config, grad_path="hooks")
        if rank(process_group) != 0 and (config.metrics_path is not None or config.progress):
            # One metrics file and one progress bar per run: rank 0's (the values are global).
            config = dataclasses.replace(config, metrics_path=None, progress=False)
        if optimizer is None:
            if self.sharded:
                params: Any = shard_arena(model)
            else:
                inner = getattr(model, "module", model)  # DDP keeps the module as .module
                params = FlatArena.from_module(inner)
                broadcast_parameters(params, group=process_group)
            optimizer = DistributedFusedAdamW(
                params, lr=lr, process_group=process_group, **(optimizer_kwargs or {})
            )
        elif not isinstance(optimizer, DistributedFusedAdamW):
            raise TypeError(
                "DistributedHybridTrainer: optimizer must be a DistributedFusedAdamW, got "
                f"{type(optimizer).__name__}"
            )
        if self.sharded != (optimizer.sharded_arena is not None):
            raise DistributedError(
                "DistributedHybridTrainer: the model is "
                f"{'sharded' if self.sharded else 'replicated'} but the optimizer was built "
                f"over {'a ShardedArena' if optimizer.sharded_arena is not None else 'a FlatArena'}"
            )
        super().__init__(
            model,
            loss_fn,
            optimizer,
            config,
            lr=lr,
            optimizer_kwargs=optimizer_kwargs,
            dynamics=dynamics,
            max_groups=max_groups,
        )
        if self.sharded:
            # FSDP hands over reduce-scattered DTensor gradients: fold their local shards.
            self.accum.remove()
            self.accum = ShardedGradAccumulator(
                optimizer.sharded_arena, self.cfg.micro_batches, found_inf=self.found_inf
            )
            self._bind_precision(self.controller.plan)
        if getattr(self.dynamics, "device_side", False):
            self.dynamics = _RankZeroDynamics(self.dynamics, process_group, self.sharded)

    @property
    def world_size(self) -> int:
        return world_size(self.process_group)

    @property
    def rank(self) -> int:
        return rank(self.process_group)

    # -------------------------------------------------------------------- hook points

    def _backward_step(self, batch: Any, size: int, plan: Any):
        # DDP's reducer would all-reduce the .grad the accumulator's hooks drop (zeros):
        # bypass it; the optimizer averages the flat accumulator instead.
        with no_sync(self.model):
            return super()._backward_step(batch, size, plan)

    def _push(self, loss, gnorm, scale, plan, size: int, started) -> None:
        # The global mean loss, on the device, before it goes to the host: every rank's
        # phase logic then sees the same numbers.
        loss = all_reduce_mean(loss.detach().float().reshape(1).clone(), self.process_group)
        super()._push(loss.reshape(()), gnorm, scale, plan, size, started)

    # -------------------------------------------------------------------- checkpoints

    def _host_state(self) -> dict[str, Any]:
        return {
            "format": DIST_CHECKPOINT_FORMAT,
            "world_size": self.world_size,
            "config": self.cfg.to_dict(),
            "scaler": None if self.scaler is None else _host(self.scaler.state_dict()),
            "controller": self.controller.state_dict(),
            "dynamics": _host(self.dynamics.state_dict()),
            "corrector": _host(self.corrector.state_dict()),
            "divergence": self.divergence.state_dict(),
            "metrics": self.metrics.state_dict(),
            "confidence": self.confidence,
            "episode": self.episode,
            "rolled_back_episode": self._rolled_back_episode,
            "rng": torch.get_rng_state(),
        }

    def _dcp_state(self, trainer_blob: bytes) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {
            "model": get_model_state_dict(self.model),
            "optim": self.optimizer.sharded_state_dict(),
            "trainer": trainer_blob,
        }

    def save(self, path) -> str:
        """Write a ``torch.distributed.checkpoint`` directory at ``path`` (every rank calls
        this). Parameters and optimizer state are saved per parameter (each rank its shards),
        so :meth:`load` works at another world size or sharding. The host-side state of the
        phase logic (identical on every rank) is one pickled entry. Allowed outside Predict
        episodes only (Warmup, Full, or Correct after a rollback): the Predict buffers are
        per-rank and the snapshot of a running episode is not resharded. Returns ``path``."""
        import io

        import torch.distributed.checkpoint as dcp

        if self.phase is Phase.PREDICT or self._direction is not None or self._accum_freed:
            raise CheckpointError(
                f"DistributedHybridTrainer.save: step {self.step_count} is inside a Predict "
                "episode (Predict or the Correct after it); save at a Warmup or Full step"
            )
        self.flush()  # a checkpoint is a place where waiting is fine
        with self.offloader.materialized():
            buf = io.BytesIO()
            torch.save(self._host_state(), buf)
            state = self._dcp_state(buf.getvalue())
            dcp.save(state, checkpoint_id=os.fspath(path), process_group=self.process_group)
        return os.fspath(path)

    def load(self, path) -> None:
        """Load a checkpoint written by :meth:`save`, at any world size. The host state is
        read and checked (format, config) before anything of this trainer changes."""
        import io

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such distributed checkpoint directory")
        self.flush()
        if self.offloader.offloaded:
            self.offloader.restore()
            self.offloader.wait()
        if self._accum_freed:
            acc = self.accum.accumulator
            acc.untyped_storage().resize_(acc.numel() * acc.element_size())
            acc.zero_()
            self._accum_freed = False
        state = self._dcp_state(b"")
        try:
            dcp.load(state, checkpoint_id=path, process_group=self.process_group)
        except Exception as err:  # missing keys, other model: say which checkpoint
            raise CheckpointError(f"{path}: cannot load the distributed checkpoint: {err}") from err
        host = torch.load(io.BytesIO(state["trainer"]), map_location="cpu", weights_only=True)
        if not isinstance(host, dict) or host.get("format") != DIST_CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path}: not a DistributedHybridTrainer checkpoint (expected format "
                f"{DIST_CHECKPOINT_FORMAT!r})"
            )
        for key in ("micro_batches", "quant_block", "direction_format"):
            if host["config"].get(key) != getattr(self.cfg, key):
                raise CheckpointError(
                    f"{path}: config field {key} is {host['config'].get(key)!r} in the "
                    f"checkpoint and {getattr(self.cfg, key)!r} here"
                )
        if (host["scaler"] is None) != (self.scaler is None):
            raise CheckpointError(f"{path}: loss scaler presence differs from this trainer's")
        with torch.no_grad():
            set_model_state_dict(self.model, state["model"])
            self.optimizer.load_sharded_state_dict(state["optim"])
        if host["scaler"] is not None:
            self.scaler.load_state_dict(host["scaler"])
        self.controller.load_state_dict(host["controller"])
        self.dynamics.load_state_dict(host["dynamics"])
        self.corrector.load_state_dict(host["corrector"])
        self.divergence.load_state_dict(host["divergence"])
        self.metrics.load_state_dict(host["metrics"])
        self.confidence = float(host["confidence"])
        self.episode = int(host["episode"])
        self._rolled_back_episode = int(host["rolled_back_episode"])
        self._snapshot = self._direction = self._alphas = self._prediction = None
        self._pending.clear()
        self._bind_precision(self.controller.plan)
        torch.set_rng_state(host["rng"])


__all__ = [
    "DIST_CHECKPOINT_FORMAT",
    "GRAD_SYNC",
    "DistributedError",
    "DistributedFusedAdamW",
    "DistributedHybridTrainer",
    "ShardInfo",
    "ShardedArena",
    "ShardedGradAccumulator",
    "all_reduce_flag",
    "all_reduce_mean",
    "all_reduce_sumsq",
    "broadcast_parameters",
    "is_sharded",
    "no_sync",
    "rank",
    "shard_arena",
    "sync_accumulator",
    "sync_gradients",
    "world_size",
]
