"""Blockwise quantization against the copy ceiling, eager torch, torch.compile and bitsandbytes.

For every format (int8, int8_dynamic, int4, ternary), blocks of 256, fp32 input of 2^28
elements (2^16 at the quick size):

- ``quantize``: reads 4 B, writes the codes and one fp32 scale per block;
- ``quantize+EF``: also reads and writes the fp32 error buffer (error feedback);
- ``dequantize``: reads the codes and scales, writes fp32;
- ``dequantize_add``: reads codes, scales and the fp32 target, writes the target.

Providers: ``hybrid_triton`` (ours), ``torch_eager`` (the ``*_ref`` in kernels/, imported),
``torch_compile`` (that reference under ``torch.compile``), and ``bitsandbytes`` where it
imports: its 8-bit dynamic blockwise code for int8_dynamic (``quantize_blockwise`` /
``dequantize_blockwise``, blocksize 256) and its 4-bit FP4 blockwise code for int4
(``quantize_4bit`` / ``dequantize_4bit``, blocksize 256). ``config`` records the compression
ratio against fp32 and the SNR of a round trip on N(0, 1) input.

Run directly (``python benchmarks/kernels_quantize.py OUT.csv``) on a GPU, it times every case
with ``triton.testing.do_bench`` (median) at 2^28 for a few launch configurations, beside the
copy rate measured in the same run, and writes one CSV.
"""

from __future__ import annotations

import math

import torch
from hybrid_triton.kernels import (
    dequantize_add,
    dequantize_add_ref,
    dequantize_blockwise,
    dequantize_blockwise_ref,
    quantize_blockwise,
    quantize_blockwise_ref,
)
from hybrid_triton.kernels.quantize import FORMATS, num_blocks, packed_numel

from hybrid_triton.bench.kernel_case import CaseRun, KernelCase

BLOCK = 256
FULL_NUMEL = 1 << 28
QUICK_NUMEL = 1 << 16


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bitsandbytes():
    try:
        import bitsandbytes.functional as bnbf
    except Exception:
        return None
    return bnbf


def quantized_bytes(numel: int, fmt: str, block: int = BLOCK) -> int:
    return packed_numel(numel, fmt) + 4 * num_blocks(numel, block)


def format_stats(fmt: str, block: int = BLOCK) -> dict[str, float]:
    """Compression ratio against fp32 and the round-trip SNR on N(0, 1) (the reference, CPU)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 16, generator=gen)
    y = dequantize_blockwise_ref(quantize_blockwise_ref(x, fmt, block))
    noise = ((y.double() - x.double()) ** 2).sum()
    snr = 10 * math.log10(float((x.double() ** 2).sum() / noise))
    n = 1 << 20
    return {
        "compression_vs_fp32": round(4 * n / quantized_bytes(n, fmt, block), 3),
        "snr_db_normal": round(snr, 2),
    }


def _check_same(q, qr) -> None:
    if q.fmt == "ternary":  # scales are block sums in another order (tests/tolerances.py)
        torch.testing.assert_close(q.scales, qr.scales, rtol=2e-6, atol=0.0)
        same = (q.data == qr.data).float().mean().item()
        assert same > 0.999, f"ternary bytes agree on only {same:.5f}"
    else:
        assert torch.equal(q.data, qr.data), f"{q.fmt}: codes differ from the reference"
        assert torch.equal(q.scales, qr.scales), f"{q.fmt}: scales differ from the reference"


def _quantize_case(
    fmt: str,
    numel: int,
    label: str,
    ef: bool,
    compile_ref: bool,
    tile: int | None,
    num_warps: int | None,
) -> KernelCase:
    def setup() -> CaseRun:
        dev = _device()
        x = torch.randn(numel, device=dev)
        error = torch.zeros(numel, device=dev) if ef else None
        out = quantize_blockwise(x, fmt, BLOCK)  # reused buffers: no allocation when timed
        kw = {"error": error}

        def ours():
            return quantize_blockwise(x, fmt, BLOCK, out=out, tile=tile, num_warps=num_warps, **kw)

        def eager():
            return quantize_blockwise_ref(x, fmt, BLOCK, **kw)

        providers = {"hybrid_triton": ours, "torch_eager": eager}
        if compile_ref:
            compiled = torch.compile(quantize_blockwise_ref)
            providers["torch_compile"] = lambda: compiled(x, fmt, BLOCK, **kw)
        bnbf = _bitsandbytes()
        if bnbf is not None and dev == "cuda" and not ef:
            if fmt == "int8_dynamic":
                providers["bitsandbytes"] = lambda: bnbf.quantize_blockwise(x, blocksize=BLOCK)
            elif fmt == "int4":
                providers["bitsandbytes"] = lambda: bnbf.quantize_4bit(
                    x, blocksize=BLOCK, quant_type="fp4"
                )

        def check() -> None:
            e0 = error.clone() if ef else None
            e1 = error.clone() if ef else None
            q = quantize_blockwise(x, fmt, BLOCK, error=e0)
            qr = quantize_blockwise_ref(x, fmt, BLOCK, error=e1)
            _check_same(q, qr)
            if ef and fmt != "ternary":
                assert torch.equal(e0, e1), "error buffer differs from the reference"

        return CaseRun(providers=providers, check=check)

    moved = 4 * numel + quantized_bytes(numel, fmt) + (8 * numel if ef else 0)
    name = f"quantize{'+EF' if ef else ''} {fmt} fp32 block {BLOCK}"
    config = {"fmt": fmt, "block": BLOCK, "error_feedback": ef, **format_stats(fmt)}
    if tile or num_warps:
        config.update(tile=tile, num_warps=num_warps)
    return KernelCase("quantize", name, label, numel, moved, setup, config)


def _dequantize_case(
    fmt: str,
    numel: int,
    label: str,
    add: bool,
    compile_ref: bool,
    tile: int | None,
    num_warps: int | None,
) -> KernelCase:
    def setup() -> CaseRun:
        dev = _device()
        q = quantize_blockwise(torch.randn(numel, device=dev), fmt, BLOCK)
        target = torch.randn(numel, device=dev)
        out = torch.empty(numel, device=dev)
        if add:
            ours = lambda: dequantize_add(target, q, 0.5, tile=tile, num_warps=num_warps)
            eager = lambda: dequantize_add_ref(target, q, 0.5)
        else:
            ours = lambda: dequantize_blockwise(q, out=out, tile=tile, num_warps=num_warps)
            eager = lambda: dequantize_blockwise_ref(q, out=out)
        providers = {"hybrid_triton": ours, "torch_eager": eager}
        if compile_ref:
            ref = dequantize_add_ref if add else dequantize_blockwise_ref
            compiled = torch.compile(ref)
            providers["torch_compile"] = (
                (lambda: compiled(target, q, 0.5)) if add else (lambda: compiled(q, out=out))
            )
        bnbf = _bitsandbytes()
        if bnbf is not None and dev == "cuda" and not add:
            x = torch.randn(numel, device=dev)
            if fmt == "int8_dynamic":
                bq, state = bnbf.quantize_blockwise(x, blocksize=BLOCK)
                providers["bitsandbytes"] = lambda: bnbf.dequantize_blockwise(bq, state, out=out)
            elif fmt == "int4":
                bq, state = bnbf.quantize_4bit(x, blocksize=BLOCK, quant_type="fp4")
                providers["bitsandbytes"] = lambda: bnbf.dequantize_4bit(bq, state)

        def check() -> None:
            if add:
                t0, t1 = target.clone(), target.clone()
                dequantize_add(t0, q, 0.5)
                dequantize_add_ref(t1, q, 0.5)
                assert torch.equal(t0, t1), "dequantize_add differs from the reference"
            else:
                assert torch.equal(dequantize_blockwise(q), dequantize_blockwise_ref(q))

        return CaseRun(providers=providers, check=check)

    moved = quantized_bytes(numel, fmt) + (8 if add else 4) * numel
    name = f"{'dequantize_add' if add else 'dequantize'} {fmt} ->fp32 block {BLOCK}"
    config = {"fmt": fmt, "block": BLOCK, **format_stats(fmt)}
    if tile or num_warps:
        config.update(tile=tile, num_warps=num_warps)
    return KernelCase("quantize", name, label, numel, moved, setup, config)


def _cases(
    quick: bool, tile: int | None = None, num_warps: int | None = None, compile_ref: bool = True
) -> list[KernelCase]:
    numel = QUICK_NUMEL if quick else FULL_NUMEL
    label = f"2^{int(math.log2(numel))}"
    out: list[KernelCase] = []
    for fmt in FORMATS:
        for ef in (False, True):
            out.append(_quantize_case(fmt, numel, label, ef, compile_ref, tile, num_warps))
        for add in (False, True):
            out.append(_dequantize_case(fmt, numel, label, add, compile_ref, tile, num_warps))
    return out


def cases(quick: bool) -> list[KernelCase]:
    # torch.compile only where it has a GPU to compile for (inductor on CPU is slow to build).
    return _cases(quick, compile_ref=torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------
# Stand-alone GPU timing: do_bench (median) for a few launch configurations.


def _copy_ms(numel: int, bench) -> float:
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src))


def main(csv_path: str, compile_names: tuple[str, ...] = ()) -> None:
    import csv
    import gc

    import triton
    from triton.testing import do_bench

    def bench(fn) -> float:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    n = FULL_NUMEL
    copy_ms = _copy_ms(n, bench)
    copy_gbps = 8 * n / copy_ms / 1e6
    name = torch.cuda.get_device_name()
    print(
        f"# {name}, torch {torch.__version__}, triton {triton.__version__}; "
        f"copy fp32 2^28: {copy_ms:.4f} ms, {copy_gbps:.0f} GB/s"
    )
    header = ["device", "case", "provider", "tile", "num_warps", "ms", "gbps", "pct_copy"]
    header += ["compression_vs_fp32", "snr_db_normal"]
    # Rows are flushed as they come, so a run cut short keeps what it measured.
    fh = open(csv_path, "w", newline="")  # noqa: SIM115
    writer = csv.writer(fh)
    writer.writerow(header)
    writer.writerow([name, "copy fp32", "torch_copy", "", "", copy_ms, copy_gbps, 100.0, "", ""])
    configs = [(None, None), (2048, 4), (8192, 8), (16384, 16)]
    for ci, (tile, warps) in enumerate(configs):
        for case in _cases(False, tile, warps, compile_ref=False):
            run = case.setup()
            if ci == 0:
                try:
                    run.check()
                except AssertionError as err:  # report, and still time the case
                    print(f"CHECK FAILED {case.name}: {err}")
                if case.name in compile_names:
                    ref_fn = run.providers["torch_eager"]
                    run.providers["torch_compile"] = torch.compile(lambda f=ref_fn: f())
            for provider, fn in run.providers.items():
                if ci > 0 and provider != "hybrid_triton":
                    continue
                try:
                    ms = bench(fn)
                except Exception as err:  # a baseline that fails is reported, not fatal
                    print(f"{case.name} {provider}: {type(err).__name__}: {err}")
                    continue
                gbps = case.bytes_moved / ms / 1e6
                pct = 100 * gbps / copy_gbps
                cfg = case.config
                writer.writerow(
                    [
                        name,
                        case.name,
                        provider,
                        tile or "default",
                        warps or "default",
                        ms,
                        gbps,
                        pct,
                        cfg["compression_vs_fp32"],
                        cfg["snr_db_normal"],
                    ]
                )
                fh.flush()
                print(
                    f"{case.name:40s} {provider:14s} tile={tile} warps={warps} "
                    f"{ms:8.4f} ms {gbps:6.0f} GB/s {pct:5.1f}% of copy"
                )
            del run
            gc.collect()
            torch.cuda.empty_cache()
    fh.close()


if __name__ == "__main__":
    import sys

    main(sys.argv[1], tuple(sys.argv[2:]))
