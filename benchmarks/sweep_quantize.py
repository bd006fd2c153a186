"""Launch-configuration sweep of ``quantize_blockwise`` on a GPU (tuning, not a report).

For each format, times the quantize kernel (fp32 input, 2^28 elements, block 256) with and
without error feedback over a grid of tiles (elements per program), warps and, for the packed
formats, both tile layouts (the third field of ``QUANTIZE_LAUNCH``: a [blocks, bytes,
codes-per-byte] tile, or a [blocks, block] tile packed through a reshape), beside the fp32
copy rate measured in the same run. Each configuration is checked against the torch
reference before it is timed. Writes a CSV; ``QUANTIZE_LAUNCH`` in ``kernels/quantize.py``
is set from it, and the ``kernels`` suite's committed report then measures those defaults.

    python -m benchmarks.sweep_quantize OUT.csv [FMT ...]
"""

from __future__ import annotations

import csv
import itertools
import sys

import torch
from hybrid_triton.kernels import quantize, quantize_blockwise, quantize_blockwise_ref
from triton.testing import do_bench

from benchmarks.kernels_quantize import BLOCK, _check_same, quantized_bytes

NUMEL = 1 << 28
TILES = (1024, 2048, 4096, 8192)
WARPS = (4, 8, 16)


def _bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _time_quantize(x, fmt, error, out) -> float:
    return _bench(lambda: quantize_blockwise(x, fmt, BLOCK, error=error, out=out))


def main(csv_path: str, formats: tuple[str, ...]) -> None:
    x = torch.randn(NUMEL, device="cuda")
    error = torch.zeros(NUMEL, device="cuda")
    dst = torch.empty_like(x)
    copy_ms = _bench(lambda: dst.copy_(x))
    copy_gbps = 8 * NUMEL / copy_ms / 1e6
    print(f"# {torch.cuda.get_device_name()}: copy fp32 2^28 {copy_ms:.4f} ms {copy_gbps:.0f} GB/s")
    small = x[: 1 << 20]
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["fmt", "error_feedback", "layout", "tile", "warps", "ms", "pct_copy"])
        for fmt in formats:
            packed = quantize.FORMATS[fmt].per_byte > 1
            layouts = (True, False) if packed else (True,)
            out = quantize_blockwise(x, fmt, BLOCK)
            defaults = {ef: quantize.QUANTIZE_LAUNCH[(fmt, ef)] for ef in (False, True)}
            for ef, three_d, tile, warps in itertools.product((False, True), layouts, TILES, WARPS):
                quantize.QUANTIZE_LAUNCH[(fmt, ef)] = (tile, warps, three_d)
                try:
                    err = (lambda: torch.zeros_like(small)) if ef else (lambda: None)
                    _check_same(
                        quantize_blockwise(small, fmt, BLOCK, error=err()),
                        quantize_blockwise_ref(small, fmt, BLOCK, error=err()),
                    )
                    ms = _time_quantize(x, fmt, error if ef else None, out)
                except Exception as err:  # a configuration that fails is reported, not fatal
                    print(f"{fmt} ef={ef} 3d={three_d} tile={tile} warps={warps}: {err!r:.200}")
                    continue
                moved = 4 * NUMEL + quantized_bytes(NUMEL, fmt) + (8 * NUMEL if ef else 0)
                pct = 100 * moved / ms / 1e6 / copy_gbps
                layout = "3d" if (three_d and packed) else "2d"
                writer.writerow([fmt, int(ef), layout, tile, warps, f"{ms:.5f}", f"{pct:.1f}"])
                fh.flush()
                print(f"{fmt:13s} ef={int(ef)} {layout} tile={tile:5d} warps={warps:2d} "
                      f"{ms:8.4f} ms {pct:5.1f}% of copy")  # fmt: skip
            quantize.QUANTIZE_LAUNCH.update({(fmt, ef): cfg for ef, cfg in defaults.items()})


if __name__ == "__main__":
    main(sys.argv[1], tuple(sys.argv[2:]) or ("int8_dynamic", "int4", "ternary"))
