"""What ``StreamingAdamW`` costs: device and host bytes, PCIe bytes per step, and the step time
those imply from rates the caller measured (nothing here is a guessed hardware figure).

Counts follow the engine's buffers exactly (``hybrid_triton.streaming``): per element of the
arena, bf16/fp16 weights on the device; fp32 master, fp32 accumulator, a bf16 staging copy
and the moments in host memory; two device chunk sets of fp32 master, fp32 gradient and
moments. The time model is the engine's schedule: each micro-batch's gradient copy overlaps
that micro-batch's backward (the slower one sets the pace), and the exact-AdamW update waits
for the global norm, so it runs after the last backward, with its ``h2d`` and ``d2h`` copies
pipelined (full-duplex PCIe: the slower direction sets the pace) and the kernel hidden behind
them.
"""

from __future__ import annotations

from dataclasses import dataclass


def moment_bytes(numel: int, state_bits: int, qblock: int | None = None) -> int:
    """Bytes of both moments of ``numel`` elements, per-block scales and padding included
    (the layouts of ``hybrid_triton.kernels.adamw.state_shapes``)."""
    if state_bits in (32, 16):
        return 2 * numel * state_bits // 8
    if state_bits not in (8, 4):
        raise ValueError(f"state_bits must be 32, 16, 8 or 4, got {state_bits}")
    q = qblock or {8: 256, 4: 128}[state_bits]
    blocks = -(-numel // q)
    codes = numel if state_bits == 8 else blocks * (q // 2)
    return 2 * (codes + 4 * blocks)


@dataclass(frozen=True)
class StreamingCost:
    device_bytes: int  # weights + the two chunk buffer sets
    host_bytes: int  # master + accumulator + staging + moments
    d2h_bytes_per_step: int
    h2d_bytes_per_step: int
    step_seconds: float
    gpu_busy_share: float  # compute time / step time


def streaming_cost(
    numel: int,
    *,
    state_bits: int = 8,
    num_micro_batches: int = 1,
    update: str = "device",
    chunk_numel: int = 1 << 24,
    weight_bytes: int = 2,
    qblock: int | None = None,
    compute_seconds_per_micro_batch: float,
    h2d_bytes_per_second: float,
    d2h_bytes_per_second: float,
    host_update_seconds: float = 0.0,
) -> StreamingCost:
    """Costs of one optimizer step of ``StreamingAdamW`` over ``numel`` arena elements.

    ``compute_seconds_per_micro_batch`` (forward + backward), the two PCIe rates and, for
    ``update="host"``, ``host_update_seconds`` (the host AdamW pass) are measurements."""
    if update not in ("device", "host"):
        raise ValueError(f"update must be 'device' or 'host', got {update!r}")
    if numel < 0 or num_micro_batches < 1 or chunk_numel < 1:
        raise ValueError("need numel >= 0, num_micro_batches >= 1, chunk_numel >= 1")
    if min(h2d_bytes_per_second, d2h_bytes_per_second) <= 0 or compute_seconds_per_micro_batch < 0:
        raise ValueError("PCIe rates must be > 0 and compute time >= 0")
    mom = moment_bytes(numel, state_bits, qblock)
    device = weight_bytes * numel
    if update == "device":  # the engine allocates two full chunks
        device += 2 * (chunk_numel * 8 + moment_bytes(chunk_numel, state_bits, qblock))
    host = numel * (4 + 4 + weight_bytes) + mom
    grads_out = num_micro_batches * weight_bytes * numel
    if update == "device":
        h2d = numel * 8 + mom  # master, gradient, moments in
        d2h_update = numel * 4 + mom  # master, moments out
        update_s = max(h2d / h2d_bytes_per_second, d2h_update / d2h_bytes_per_second)
    else:
        h2d, d2h_update = weight_bytes * numel, 0
        update_s = host_update_seconds + h2d / h2d_bytes_per_second
    per_micro = max(compute_seconds_per_micro_batch, weight_bytes * numel / d2h_bytes_per_second)
    step_s = num_micro_batches * per_micro + update_s
    busy = num_micro_batches * compute_seconds_per_micro_batch / step_s if step_s > 0 else 1.0
    return StreamingCost(device, host, grads_out + d2h_update, h2d, step_s, busy)


__all__ = ["StreamingCost", "moment_bytes", "streaming_cost"]
