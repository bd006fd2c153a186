"""Device-side pieces every rollout kernel shares: the per-step group barrier of the fused
kernels and the closing member reduction (``rollout.py`` and ``rollout_folded.py`` call them;
Triton inlines them, so they cost nothing at run time)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _arrive_and_wait(counter_ptr, target, SPLIT: tl.constexpr, SYNC: tl.constexpr):
    # Every thread of this program has issued its stores before thread 0 arrives.
    tl.debug_barrier()
    if SPLIT > 1:
        # release: our rows reach L2 before the count does.
        tl.atomic_add(counter_ptr, 1, sem="release")
        if SYNC == 0:
            seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
            while seen < target:
                seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
        else:
            # Volatile polls read L2 and leave L1 (the weight slice) alone; the reads that
            # follow are volatile too and are issued only once the loop has exited.
            seen = tl.load(counter_ptr, volatile=True)
            while seen < target:
                seen = tl.load(counter_ptr, volatile=True)
        tl.debug_barrier()


@triton.jit
def _reduce_members(
    sync_ptr,
    traj_ptr,
    mean_ptr,
    var_ptr,
    K,
    B,
    T,
    O,
    SPLIT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    STATIC_BOUNDS: tl.constexpr,
    K_C: tl.constexpr,
    B_C: tl.constexpr,
    T_C: tl.constexpr,
    O_C: tl.constexpr,
):
    # The last program to finish reduces over the members and resets the counters, so the
    # workspace is ready for the next call without a memset (threadFenceReduction pattern).
    tl.debug_barrier()
    done = tl.atomic_add(sync_ptr + K * B, 1, sem="acq_rel")
    if done == K * B * SPLIT - 1:
        offs = tl.arange(0, BLOCK_R)
        for g0 in range(0, K_C * B_C if STATIC_BOUNDS else K * B, BLOCK_R):
            tl.store(
                sync_ptr + g0 + offs, tl.zeros([BLOCK_R], dtype=tl.int32), mask=g0 + offs < K * B
            )
        tl.store(sync_ptr + K * B, 0)
        n = T * B * O
        for e0 in range(0, T_C * B_C * O_C if STATIC_BOUNDS else T * B * O, BLOCK_R):
            idx = e0 + offs
            m = idx < n
            acc = tl.zeros([BLOCK_R], dtype=tl.float32)
            for kk in range(K_C if STATIC_BOUNDS else K):
                acc += tl.load(traj_ptr + kk * n + idx, mask=m, other=0.0, volatile=True)
            mean = acc / K
            # Two passes (mean, then squared deviations): no cancellation when members agree.
            acc2 = tl.zeros([BLOCK_R], dtype=tl.float32)
            for kk in range(K_C if STATIC_BOUNDS else K):
                d = tl.load(traj_ptr + kk * n + idx, mask=m, other=0.0, volatile=True) - mean
                acc2 += d * d
            tl.store(mean_ptr + idx, mean, mask=m)
            tl.store(var_ptr + idx, acc2 / K, mask=m)
