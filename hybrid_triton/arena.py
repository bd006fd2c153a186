"""Flat parameter arena: a model's trainable parameters as views into contiguous buffers.

``FlatArena.from_module(model)`` moves every trainable parameter into one flat buffer per
(dtype, device) group and makes the ``nn.Parameter`` objects views into it, so forward and
backward run unchanged, optimizers that hold the parameters keep working, and
``state_dict()`` is unchanged (same keys, shapes and values). Tied parameters are stored
once (the segment lists every name that refers to it); frozen parameters and buffers are left
where they are.

Per-parameter state (fp32 master weights, fp32 gradient accumulators, optimizer moments)
is allocated with :meth:`ArenaGroup.new_state`: a flat buffer with the same segment layout,
so every elementwise kernel over it is one launch (DESIGN.md, Flat arenas).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hybrid_triton.kernels._segments import Segments

# Segment offsets are rounded up to 64 elements (256 B in fp32): every segment starts on a
# boundary that lets the kernels use 16-byte vector loads from a segment start.
ARENA_ALIGN = 64

_arena_ids = itertools.count(1)


class ArenaError(ValueError):
    """An arena was used with a buffer or module it does not belong to."""


@dataclass(frozen=True)
class Segment:
    name: str
    offset: int
    numel: int
    shape: tuple[int, ...]
    aliases: tuple[str, ...] = ()

    @property
    def end(self) -> int:
        return self.offset + self.numel


class ArenaGroup:
    """One flat buffer: all trainable parameters of one dtype on one device."""

    def __init__(
        self,
        arena_id: int,
        dtype: torch.dtype,
        device: torch.device,
        params: list[nn.Parameter],
        names: list[list[str]],
    ) -> None:
        self.arena_id = arena_id
        self.dtype = dtype
        self.device = device
        self.params = params
        self.segments = Segments.from_numels(
            [p.numel() for p in params], names=[n[0] for n in names], align=ARENA_ALIGN
        )
        self.table = [
            Segment(n[0], off, p.numel(), tuple(p.shape), tuple(n[1:]))
            for p, n, off in zip(params, names, self.segments.offsets)
        ]
        # Gaps between aligned segments are zero and stay zero under every elementwise op
        # the toolkit runs (zero gradient, zero moments, zero weight decay on zero).
        self.flat = torch.zeros(self.segments.total, dtype=dtype, device=device)
        with torch.no_grad():
            for p, seg in zip(params, self.table):
                view = self.flat[seg.offset : seg.end].view(seg.shape)
                view.copy_(p.data)
                p.data = view
        self._state_buffers: set[int] = set()

    @classmethod
    def from_params(
        cls,
        params: list[nn.Parameter],
        names: list[list[str]] | None = None,
        dtype: torch.dtype | None = None,
    ) -> ArenaGroup:
        """A group from a plain list of same-dtype, same-device parameters (for optimizers
        built from ``model.parameters()``, or a chosen subset of a module's parameters).
        ``names``: per parameter, its name and then any aliases (default ``param<i>``).
        ``dtype``: the flat buffer's dtype (default: the parameters'); the parameters become
        views of that dtype (e.g. fp32 parameters turned into bf16 shadows)."""
        if not params:
            raise ArenaError("ArenaGroup.from_params: got no parameters")
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) != 1:
            raise ArenaError(
                f"ArenaGroup.from_params: parameters mix dtypes or devices "
                f"({sorted(map(str, kinds))}); build one group per dtype and device"
            )
        param_dtype, device = next(iter(kinds))
        names = names if names is not None else [[f"param{i}"] for i in range(len(params))]
        return cls(next(_arena_ids), dtype or param_dtype, device, list(params), names)

    @property
    def numel(self) -> int:
        """Elements of the flat buffer, alignment gaps included."""
        return self.segments.total

    @property
    def param_numel(self) -> int:
        return sum(s.numel for s in self.table)

    def new_state(
        self,
        dtype: torch.dtype = torch.float32,
        fill: float | None = 0.0,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A flat per-parameter state buffer with this group's layout."""
        buf = torch.empty(self.numel, dtype=dtype, device=device or self.device)
        if fill is not None:
            buf.fill_(fill)
        self._state_buffers.add(id(buf))
        return buf

    def master_copy(self) -> torch.Tensor:
        """A new fp32 copy of the parameters (master weights)."""
        master = self.new_state(torch.float32, fill=None)
        master.copy_(self.flat)
        return master

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """``buf`` cut into per-parameter views shaped like the parameters."""
        self.check_buffer(buf, "buffer")
        return [buf[s.offset : s.end].view(s.shape) for s in self.table]

    def check_buffer(self, buf: torch.Tensor, what: str = "buffer") -> None:
        """Raise :class:`ArenaError` unless ``buf`` has this group's flat layout."""
        if not isinstance(buf, torch.Tensor) or buf.dim() != 1 or buf.numel() != self.numel:
            got = tuple(buf.shape) if isinstance(buf, torch.Tensor) else type(buf).__name__
            raise ArenaError(
                f"{what} does not belong to this arena: expected a flat tensor of {self.numel} "
                f"elements (arena {self.arena_id}, {len(self.table)} segments), got {got}"
            )

    def segment(self, name: str) -> Segment:
        for s in self.table:
            if s.name == name or name in s.aliases:
                return s
        raise KeyError(f"no parameter named {name!r} in this arena")


def trainable_parameters(module: nn.Module) -> list[tuple[nn.Parameter, list[str]]]:
    """The module's trainable parameters in registration order, each once with all its names
    (a tied parameter's other names are aliases)."""
    by_param: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        if id(p) in by_param:
            by_param[id(p)][1].append(name)
        else:
            by_param[id(p)] = (p, [name])
    return list(by_param.values())


class FlatArena:
    """All trainable parameters of a module, grouped by (dtype, device) into flat buffers."""

    def __init__(self, module: nn.Module) -> None:
        self.arena_id = next(_arena_ids)
        # A weak reference, not id(): a module built after this one was garbage collected can
        # get the same id.
        self.module_ref = weakref.ref(module)
        entries = trainable_parameters(module)
        if not entries:
            raise ArenaError(f"{type(module).__name__} has no trainable parameters to pack")
        grouped: dict[tuple[torch.dtype, torch.device], list[tuple[nn.Parameter, list[str]]]] = {}
        for p, names in entries:
            if not p.is_floating_point():
                raise ArenaError(f"parameter {names[0]} has non-float dtype {p.dtype}")
            grouped.setdefault((p.dtype, p.device), []).append((p, names))
        self.groups: list[ArenaGroup] = [
            ArenaGroup(self.arena_id, dtype, device, [p for p, _ in items], [n for _, n in items])
            for (dtype, device), items in grouped.items()
        ]

    @classmethod
    def from_module(cls, module: nn.Module) -> FlatArena:
        return cls(module)

    @property
    def group(self) -> ArenaGroup:
        """The only group; an error when the module mixes dtypes or devices."""
        if len(self.groups) != 1:
            kinds = ", ".join(f"{g.dtype} on {g.device}" for g in self.groups)
            raise ArenaError(f"this arena has {len(self.groups)} groups ({kinds}); pick one")
        return self.groups[0]

    @property
    def param_numel(self) -> int:
        return sum(g.param_numel for g in self.groups)

    def parameters(self) -> Iterator[nn.Parameter]:
        for g in self.groups:
            yield from g.params

    def check_module(self, module: nn.Module) -> None:
        if self.module_ref() is not module:
            raise ArenaError(
                f"this arena was built from another module (arena {self.arena_id}); build one "
                f"with FlatArena.from_module({type(module).__name__}(...))"
            )

    def summary(self) -> str:
        lines = []
        for g in self.groups:
            lines.append(
                f"group {str(g.dtype).replace('torch.', '')} on {g.device}: "
                f"{len(g.table)} segments, {g.param_numel:,} parameters, "
                f"{g.numel:,} elements with alignment"
            )
        return "\n".join(lines)
