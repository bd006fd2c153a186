"""Segment tables: where each tensor lives inside a flat buffer.

Elementwise ops over a flat buffer are one 1-D launch and need no table. Ops that also
produce per-segment results (gradient norms, per-segment scales) launch one program per
*block of one segment*: the block table lists, for every program, its segment id and the
element range it covers, so no block straddles two segments and each program reduces into
exactly one segment's slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Segments:
    """Offsets and sizes of the segments of one flat buffer (all offsets in elements)."""

    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    names: tuple[str, ...] = ()
    total: int = -1
    _tables: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.numels):
            raise ValueError("Segments: offsets and numels differ in length")
        if self.names and len(self.names) != len(self.numels):
            raise ValueError("Segments: names and numels differ in length")
        end = 0
        for i, (off, n) in enumerate(zip(self.offsets, self.numels)):
            if n < 0 or off < end:
                raise ValueError(
                    f"Segments: segment {i} (offset {off}, numel {n}) overlaps the previous one"
                )
            end = off + n
        if self.total < 0:
            object.__setattr__(self, "total", end)
        elif self.total < end:
            raise ValueError(f"Segments: total {self.total} is smaller than the last end {end}")

    @classmethod
    def from_numels(
        cls, numels: Sequence[int], names: Sequence[str] = (), align: int = 1
    ) -> Segments:
        """Pack segments back to back, each offset rounded up to a multiple of ``align``."""
        offsets, pos = [], 0
        for n in numels:
            pos = -(-pos // align) * align
            offsets.append(pos)
            pos += int(n)
        return cls(tuple(offsets), tuple(int(n) for n in numels), tuple(names), pos)

    def __len__(self) -> int:
        return len(self.numels)

    def aligned(self, multiple: int) -> bool:
        return all(off % multiple == 0 for off in self.offsets)

    def block_table(self, block: int, device: torch.device | str) -> torch.Tensor:
        """int64 ``[num_blocks, 3]``: (segment id, start, end) of every program's range.

        Cached per (block, device); built once on the host and copied once.
        """
        key = (int(block), str(torch.device(device)))
        table = self._tables.get(key)
        if table is None:
            rows = []
            for seg, (off, n) in enumerate(zip(self.offsets, self.numels)):
                for start in range(off, off + n, block):
                    rows.append((seg, start, min(start + block, off + n)))
            table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3).to(device)
            self._tables[key] = table
        return table


def pack(tensors: Sequence[torch.Tensor], align: int = 1) -> tuple[torch.Tensor, Segments]:
    """Copy a list of same-dtype tensors into one new flat buffer (for user tensor lists)."""
    if not tensors:
        raise ValueError("pack: needs at least one tensor")
    dtype, device = tensors[0].dtype, tensors[0].device
    for i, t in enumerate(tensors):
        if t.dtype != dtype or t.device != device:
            raise ValueError(
                f"pack: tensor {i} is {t.dtype} on {t.device}; all must be {dtype} on {device}"
            )
    segs = Segments.from_numels([t.numel() for t in tensors], align=align)
    flat = torch.zeros(segs.total, dtype=dtype, device=device)
    for t, off, n in zip(tensors, segs.offsets, segs.numels):
        flat[off : off + n].copy_(t.reshape(-1))
    return flat, segs


def unpack(flat: torch.Tensor, segs: Segments, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``like`` (the inverse of :func:`pack`, without copies)."""
    return [flat[off : off + n].view(t.shape) for t, off, n in zip(like, segs.offsets, segs.numels)]
