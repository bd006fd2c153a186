"""A log-domain 8-bit code for Adam's second moment (``exp_avg_sq``) while it is compressed.

Why not the linear or cubic 8-bit codes the first moment uses: those scale each block by its
largest value, so an entry below the code's smallest step (about 5e-7 of the block's maximum
for the cubic code) comes back as exactly 0. Adam divides by ``sqrt(v)``: a zeroed ``v`` next
to a surviving ``exp_avg`` makes the first update after the restore up to hundreds of times
the learning rate on that element. What the update needs is a bounded *relative* error of
``sqrt(v)`` on every element, which a code uniform in ``log2(v)`` gives:

- code 0 is exactly 0 (and only 0); codes 1..255 are spaced evenly in ``log2|x|`` between the
  block's smallest and largest nonzero magnitude;
- so every nonzero entry comes back nonzero, and its relative error is at most
  ``2 ** (step / 2) - 1`` with ``step = (log2 max - log2 min) / 254`` of its block (0.5%
  for a block spanning 10 decades; for ``sqrt(v)`` half of that).

One byte per element plus two fp32 numbers per block: the same memory as the 8-bit codes.
Signs are not kept (a second moment is never negative). Encoding works on chunks of blocks so
its temporaries stay a small fraction of the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LEVELS = 254  # codes 1..255
CHUNK_BLOCKS = 4096


@dataclass
class LogCoded:
    codes: torch.Tensor  # uint8 [blocks * block]
    lo: torch.Tensor  # fp32 [blocks]: log2 of the block's smallest nonzero magnitude
    step: torch.Tensor  # fp32 [blocks]: log2 distance between neighbouring codes
    block: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.lo, self.step))


def encode(t: torch.Tensor, block: int) -> LogCoded:
    """The log code of ``|t|`` (a float tensor) in blocks of ``block`` elements."""
    if not t.is_floating_point():
        raise TypeError(f"moment_code.encode: expected a float tensor, got {t.dtype}")
    if block < 1:
        raise ValueError(f"moment_code.encode: block must be >= 1, got {block}")
    flat = t.reshape(-1)
    n = flat.numel()
    blocks = max(1, -(-n // block))
    codes = torch.zeros(blocks * block, dtype=torch.uint8, device=t.device)
    lo = torch.zeros(blocks, dtype=torch.float32, device=t.device)
    step = torch.zeros(blocks, dtype=torch.float32, device=t.device)
    for b0 in range(0, blocks, CHUNK_BLOCKS):
        b1 = min(blocks, b0 + CHUNK_BLOCKS)
        x = torch.zeros((b1 - b0) * block, dtype=torch.float32, device=t.device)
        part = flat[b0 * block : b1 * block]
        x[: part.numel()] = part.abs()
        x = x.view(b1 - b0, block)
        nz = x > 0
        lg = torch.log2(torch.where(nz, x, torch.ones_like(x)))
        lo_c = torch.where(nz, lg, torch.full_like(lg, float("inf"))).amin(dim=1)
        hi_c = torch.where(nz, lg, torch.full_like(lg, float("-inf"))).amax(dim=1)
        empty = ~nz.any(dim=1)
        lo_c = torch.where(empty, torch.zeros_like(lo_c), lo_c)
        hi_c = torch.where(empty, torch.zeros_like(hi_c), hi_c)
        st = (hi_c - lo_c) / LEVELS
        safe = torch.where(st > 0, st, torch.ones_like(st))
        q = torch.round((lg - lo_c[:, None]) / safe[:, None]).clamp_(0, LEVELS) + 1
        codes[b0 * block : b1 * block] = (
            torch.where(nz, q, torch.zeros_like(q)).view(-1).to(torch.uint8)
        )
        lo[b0:b1] = lo_c
        step[b0:b1] = st
    return LogCoded(codes, lo, step, int(block), tuple(t.shape), t.dtype)


def decode(q: LogCoded, out: torch.Tensor) -> torch.Tensor:
    """Write the decoded values into ``out`` (shape and dtype of the encoded tensor)."""
    if tuple(out.shape) != q.shape or out.dtype != q.dtype:
        raise ValueError(
            f"moment_code.decode: out is {tuple(out.shape)} {out.dtype}; expected {q.shape} "
            f"{q.dtype}"
        )
    flat = out.view(-1)
    n = flat.numel()
    blocks = q.lo.numel()
    for b0 in range(0, blocks, CHUNK_BLOCKS):
        b1 = min(blocks, b0 + CHUNK_BLOCKS)
        c = q.codes[b0 * q.block : b1 * q.block].view(b1 - b0, q.block).to(torch.float32)
        lg = q.lo[b0:b1, None] + (c - 1) * q.step[b0:b1, None]
        x = torch.where(c > 0, torch.exp2(lg), torch.zeros_like(lg)).view(-1)
        end = min(n, b1 * q.block)
        flat[b0 * q.block : end] = x[: end - b0 * q.block].to(out.dtype)
    return out
