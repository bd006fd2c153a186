"""RSSM ensemble rollout: K GRU members x T steps in one Triton launch.

Math, per member k and batch row b (weights of member k; shapes in brackets):

    inp_s   = [x_s, z_{s-1}]                                    [I + S]
    gi, gh  = W_ih inp_s + b_ih,  W_hh h_{s-1} + b_hh           [3H] each, gate order (r, u, n)
    r, u    = sigmoid(gi_r + gh_r), sigmoid(gi_u + gh_u)
    n       = tanh(gi_n + r * gh_n)                             (torch.nn.GRUCell convention)
    h_s     = (1 - u) * n + u * h_{s-1}                         [H]
    z_s     = W_prior h_s + b_prior                             [S]  mean of the learned prior
    y_s     = W_head [h_s, z_s] + b_head + SKIP x_s             [O]  heads (+ shared residual)
    x_{s+1} = MIX x_s + FEED y_s + DRIFT                        [I]  prediction fed back

for s = 0..T-1, starting from (x_0 [B, I], h_{-1} = h0 [K, B, H], z_{-1} = z0 [K, B, S]).
Outputs: the trajectories ``traj [K, T, B, O]`` and, over the K members, ``mean [T, B, O]``
and the population variance ``var [T, B, O]`` (divides by K, so K=1 gives 0).
SKIP [O, I], MIX [I, I], FEED [I, O] and DRIFT [I] are shared by the members: they say how the
heads' outputs become the next step's input features (hybrid_triton/dynamics.py builds them).

Kernel layout. The sequential dependency over T sets the latency floor, so the kernel keeps
the whole rollout in one launch. Each (member, batch row) pair is a *group* of ``SPLIT``
programs; each program owns hidden tiles ``part, part+SPLIT, ...`` of BLOCK_H rows, so its
weight slice (3 gates x BLOCK_H x (H + I + S)) stays hot in its SM's L1 across all T steps.
Each step the programs of a group publish their slice of h_s to a double-buffered scratch in
global memory (L2) and meet at a global-memory barrier (an atomic counter per group, spun on
with acquire loads); after it every program reads the full h_s and computes the latent and the
heads redundantly (they are small), so no second barrier is needed. SPLIT > 1 requires all
programs to be co-resident (the launcher keeps the grid <= the SM count). With SPLIT = 1 one
program loops over all tiles and the barrier is a plain ``debug_barrier``: this is the path
the Triton interpreter runs (it executes programs one after another, so a spin would hang).
The member reduction (mean, variance) is done by whichever program finishes last (an atomic
"done" counter, the CUDA threadFenceReduction pattern), which also resets the counters so
the workspace can be reused by the next call without a memset launch.

Variants (issue 4, ``VARIANTS``, ``rssm_rollout(..., variant=)``): the legacy kernel above, and
a fused kernel that reads h once per step (the heads of step s-1 and the matvec of step s share
the read), with the tile's weights held in registers when they fit, and either the legacy
acquire polls or volatile polls (which leave L1 alone). ``benchmarks/sweep_rssm.py`` measured
them on the H100 (reports/rssm/2026-11-24_sweep_h100/); :func:`default_variant` picks the
fastest per hidden size from that sweep. The ``folded*`` variants (rollout_folded.py) fold the
linear part of each step (latent, heads, feedback, GRU input) into the gate inputs, so a step
is one level of reductions over (h_{s-1}, x_{s-1}).

References: Hafner et al., DreamerV3 (RSSM); PyTorch ``nn.GRUCell``; CUDA cooperative-groups
grid sync (same arrive/spin/fence structure, written with Triton atomics).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._checks import KernelInputError, check_tensor
from .._dispatch import impl_for_device, use_triton
from ._sync import _arrive_and_wait, _reduce_members

OP = "rssm_rollout"
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
BLOCK_H = 16  # hidden rows per tile: 16 x 3 gates x (H+I+S) fp32 = 60 KB at H=256: fits L1
MAX_BLOCK_C = 128  # columns per chunk of the recurrent matvec
BLOCK_R = 256  # elements per chunk of the final member reduction


class RSSMWeights(NamedTuple):
    """Per-member weights, stacked over the K members (fp32 or bf16, one dtype for all)."""

    w_ih: torch.Tensor  # [K, 3H, I+S]  GRU input weights, input = [features, previous latent]
    w_hh: torch.Tensor  # [K, 3H, H]
    b_ih: torch.Tensor  # [K, 3H]
    b_hh: torch.Tensor  # [K, 3H]
    w_prior: torch.Tensor  # [K, S, H]  mean of the latent prior p(z | h)
    b_prior: torch.Tensor  # [K, S]
    w_head: torch.Tensor  # [K, O, H+S]  heads on [h, z]
    b_head: torch.Tensor  # [K, O]


class RSSMFeedback(NamedTuple):
    """How outputs become next inputs; shared by all members, always fp32."""

    skip: torch.Tensor  # [O, I]  residual from the features into the heads
    mix: torch.Tensor  # [I, I]  features carried to the next step
    feed: torch.Tensor  # [I, O]  heads' outputs written into the next features
    drift: torch.Tensor  # [I]     constant per-step change (e.g. the step counter)


class RolloutResult(NamedTuple):
    traj: torch.Tensor  # [K, T, B, O] fp32
    mean: torch.Tensor  # [T, B, O]
    var: torch.Tensor  # [T, B, O] population variance over members


@triton.jit
def _rssm_rollout_kernel(
    x0_ptr,
    h0_ptr,
    z0_ptr,
    w_ih_ptr,
    w_hh_ptr,
    b_ih_ptr,
    b_hh_ptr,
    w_prior_ptr,
    b_prior_ptr,
    w_head_ptr,
    b_head_ptr,
    skip_ptr,
    mix_ptr,
    feed_ptr,
    drift_ptr,
    traj_ptr,
    mean_ptr,
    var_ptr,
    h_buf_ptr,
    sync_ptr,
    K,
    B,
    T,
    H,
    I,
    S,
    O,
    SPLIT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,
    I_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
    O_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    STATIC_BOUNDS: tl.constexpr,
    K_C: tl.constexpr,
    B_C: tl.constexpr,
    T_C: tl.constexpr,
    H_C: tl.constexpr,
    O_C: tl.constexpr,
):
    # The interpreter rewrites every assignment into a 1-element array, which range() rejects
    # under numpy >= 2.4, so loop bounds are written inline, from constexpr copies when
    # STATIC_BOUNDS (interpreter only); compiled code keeps them runtime (one binary for all
    # T and H).
    pid = tl.program_id(0)
    group = pid // SPLIT
    part = pid % SPLIT
    k64 = (group // B).to(tl.int64)
    b64 = (group % B).to(tl.int64)
    kb = k64 * B + b64
    IS = I + S
    HS = H + S
    # int64 member offsets: K * 3H * (H+I+S) passes 2^31 for large ensembles.
    w_ih = w_ih_ptr + k64 * 3 * H * IS
    w_hh = w_hh_ptr + k64 * 3 * H * H
    b_ih = b_ih_ptr + k64 * 3 * H
    b_hh = b_hh_ptr + k64 * 3 * H
    w_prior = w_prior_ptr + k64 * S * H
    b_prior = b_prior_ptr + k64 * S
    w_head = w_head_ptr + k64 * O * HS
    b_head = b_head_ptr + k64 * O
    h_buf = h_buf_ptr + kb * 2 * H
    counter = sync_ptr + group

    offs_i = tl.arange(0, I_PAD)
    offs_s = tl.arange(0, S_PAD)
    offs_o = tl.arange(0, O_PAD)
    offs_r = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    mask_i = offs_i < I
    mask_s = offs_s < S
    mask_o = offs_o < O

    x = tl.load(x0_ptr + b64 * I + offs_i, mask=mask_i, other=0.0)
    z = tl.load(z0_ptr + kb * S + offs_s, mask=mask_s, other=0.0)
    # Shared (member-independent) feedback maps and the member's small head biases.
    skip = tl.load(
        skip_ptr + offs_o[:, None] * I + offs_i[None, :],
        mask=mask_o[:, None] & mask_i[None, :],
        other=0.0,
    )
    mix = tl.load(
        mix_ptr + offs_i[:, None] * I + offs_i[None, :],
        mask=mask_i[:, None] & mask_i[None, :],
        other=0.0,
    )
    feed_t = tl.load(  # FEED [I, O] read transposed, as [O_PAD, I_PAD]
        feed_ptr + offs_i[None, :] * O + offs_o[:, None],
        mask=mask_o[:, None] & mask_i[None, :],
        other=0.0,
    )
    drift = tl.load(drift_ptr + offs_i, mask=mask_i, other=0.0)
    bias_prior = tl.load(b_prior + offs_s, mask=mask_s, other=0.0).to(tl.float32)
    bias_head = tl.load(b_head + offs_o, mask=mask_o, other=0.0).to(tl.float32)

    for tile in range(
        0 if SPLIT == 1 else part,
        ((H_C if STATIC_BOUNDS else H) + BLOCK_H - 1) // BLOCK_H,
        SPLIT,
    ):
        rows = tile * BLOCK_H + offs_r
        m_r = rows < H
        h_init = tl.load(h0_ptr + kb * H + rows, mask=m_r, other=0.0)
        tl.store(h_buf + rows, h_init, mask=m_r)
    _arrive_and_wait(counter, SPLIT, SPLIT, 0)  # SYNC 0: acquire polls

    for s in range(T_C if STATIC_BOUNDS else T):
        h_cur = h_buf + (s % 2) * H
        h_nxt = h_buf + ((s + 1) % 2) * H
        for tile in range(
            0 if SPLIT == 1 else part,
            ((H_C if STATIC_BOUNDS else H) + BLOCK_H - 1) // BLOCK_H,
            SPLIT,
        ):
            rows = tile * BLOCK_H + offs_r
            m_r = rows < H
            # Input part: features x and previous latent z.
            m_x = m_r[:, None] & mask_i[None, :]
            p_x = w_ih + rows[:, None] * IS + offs_i[None, :]
            gi_r = tl.sum(tl.load(p_x, mask=m_x, other=0.0).to(tl.float32) * x[None, :], axis=1)
            gi_u = tl.sum(
                tl.load(p_x + H * IS, mask=m_x, other=0.0).to(tl.float32) * x[None, :], axis=1
            )
            gi_n = tl.sum(
                tl.load(p_x + 2 * H * IS, mask=m_x, other=0.0).to(tl.float32) * x[None, :], axis=1
            )
            m_z = m_r[:, None] & mask_s[None, :]
            p_z = w_ih + rows[:, None] * IS + I + offs_s[None, :]
            gi_r += tl.sum(tl.load(p_z, mask=m_z, other=0.0).to(tl.float32) * z[None, :], axis=1)
            gi_u += tl.sum(
                tl.load(p_z + H * IS, mask=m_z, other=0.0).to(tl.float32) * z[None, :], axis=1
            )
            gi_n += tl.sum(
                tl.load(p_z + 2 * H * IS, mask=m_z, other=0.0).to(tl.float32) * z[None, :], axis=1
            )
            # Recurrent part, chunked over the columns of h.
            gh_r = tl.zeros([BLOCK_H], dtype=tl.float32)
            gh_u = tl.zeros([BLOCK_H], dtype=tl.float32)
            gh_n = tl.zeros([BLOCK_H], dtype=tl.float32)
            for c0 in range(0, H_C if STATIC_BOUNDS else H, BLOCK_C):
                cols = c0 + offs_c
                m_c = cols < H
                # volatile: h was written by other SMs; a stale L1 line would be wrong.
                hv = tl.load(h_cur + cols, mask=m_c, other=0.0, volatile=True)
                m_h = m_r[:, None] & m_c[None, :]
                p_h = w_hh + rows[:, None] * H + cols[None, :]
                gh_r += tl.sum(tl.load(p_h, mask=m_h, other=0.0).to(tl.float32) * hv[None, :], 1)
                gh_u += tl.sum(
                    tl.load(p_h + H * H, mask=m_h, other=0.0).to(tl.float32) * hv[None, :], 1
                )
                gh_n += tl.sum(
                    tl.load(p_h + 2 * H * H, mask=m_h, other=0.0).to(tl.float32) * hv[None, :], 1
                )
            gi_r += tl.load(b_ih + rows, mask=m_r, other=0.0).to(tl.float32)
            gi_u += tl.load(b_ih + H + rows, mask=m_r, other=0.0).to(tl.float32)
            gi_n += tl.load(b_ih + 2 * H + rows, mask=m_r, other=0.0).to(tl.float32)
            gh_r += tl.load(b_hh + rows, mask=m_r, other=0.0).to(tl.float32)
            gh_u += tl.load(b_hh + H + rows, mask=m_r, other=0.0).to(tl.float32)
            gh_n += tl.load(b_hh + 2 * H + rows, mask=m_r, other=0.0).to(tl.float32)
            reset = tl.sigmoid(gi_r + gh_r)
            update = tl.sigmoid(gi_u + gh_u)
            pre_n = gi_n + reset * gh_n
            # tanh(a) = 2 sigmoid(2a) - 1: stable for large |a|, no tl.tanh in every version.
            cand = 2.0 * tl.sigmoid(2.0 * pre_n) - 1.0
            h_old = tl.load(h_cur + rows, mask=m_r, other=0.0, volatile=True)
            h_new = (1.0 - update) * cand + update * h_old
            tl.store(h_nxt + rows, h_new, mask=m_r)
        _arrive_and_wait(counter, (s + 2) * SPLIT, SPLIT, 0)

        # Latent prior mean and heads from the full h_s (redundant per program: small).
        z_acc = tl.zeros([S_PAD], dtype=tl.float32)
        y_acc = tl.zeros([O_PAD], dtype=tl.float32)
        for c0 in range(0, H_C if STATIC_BOUNDS else H, BLOCK_C):
            cols = c0 + offs_c
            m_c = cols < H
            hv = tl.load(h_nxt + cols, mask=m_c, other=0.0, volatile=True)
            w_p = tl.load(
                w_prior + offs_s[:, None] * H + cols[None, :],
                mask=mask_s[:, None] & m_c[None, :],
                other=0.0,
            ).to(tl.float32)
            z_acc += tl.sum(w_p * hv[None, :], axis=1)
            w_y = tl.load(
                w_head + offs_o[:, None] * HS + cols[None, :],
                mask=mask_o[:, None] & m_c[None, :],
                other=0.0,
            ).to(tl.float32)
            y_acc += tl.sum(w_y * hv[None, :], axis=1)
        z = z_acc + bias_prior
        w_yz = tl.load(
            w_head + offs_o[:, None] * HS + H + offs_s[None, :],
            mask=mask_o[:, None] & mask_s[None, :],
            other=0.0,
        ).to(tl.float32)
        y = y_acc + tl.sum(w_yz * z[None, :], axis=1) + bias_head
        y += tl.sum(skip * x[None, :], axis=1)
        if part == 0:
            tl.store(traj_ptr + ((k64 * T + s) * B + b64) * O + offs_o, y, mask=mask_o)
        x_next = tl.sum(mix * x[None, :], axis=1) + tl.sum(feed_t * y[:, None], axis=0)
        x = x_next + drift

    _reduce_members(sync_ptr, traj_ptr, mean_ptr, var_ptr, K, B, T, O, SPLIT, BLOCK_R,
                    STATIC_BOUNDS, K_C, B_C, T_C, O_C)  # fmt: skip


# ------------------------------------------------------------------ fused kernel (issue 4 variants)
# Synchronization between the programs of a group, per step (the SYNC constexpr):
SYNC_ACQUIRE = 0  # counter; arrive with a release atomic, poll with acquire loads (the legacy
#                   barrier: each acquire poll also invalidates the SM's L1, weights included)
SYNC_VOLATILE = 1  # counter; poll with volatile loads (no L1 invalidation); h is read volatile
# (The sweep of 2026-11-24 also had step-tagged h words without a counter, "flag": they failed
# the reference check at some measured point in every configuration and were removed.)


@triton.jit
def _rssm_rollout_fused_kernel(
    x0_ptr,
    h0_ptr,
    z0_ptr,
    w_ih_ptr,
    w_hh_ptr,
    b_ih_ptr,
    b_hh_ptr,
    w_prior_ptr,
    b_prior_ptr,
    w_head_ptr,
    b_head_ptr,
    skip_ptr,
    mix_ptr,
    feed_ptr,
    drift_ptr,
    traj_ptr,
    mean_ptr,
    var_ptr,
    h_buf_ptr,
    sync_ptr,
    K,
    B,
    T,
    H,
    I,
    S,
    O,
    SPLIT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,
    RESIDENT: tl.constexpr,
    SYNC: tl.constexpr,
    I_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
    O_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    STATIC_BOUNDS: tl.constexpr,
    K_C: tl.constexpr,
    B_C: tl.constexpr,
    T_C: tl.constexpr,
    H_C: tl.constexpr,
    O_C: tl.constexpr,
):
    # One tile of BLOCK_H hidden rows per program (SPLIT * BLOCK_H >= H, the launcher's
    # choice). Iteration s reads h_{s-1} once and uses it twice: the heads of step s-1 (latent
    # z_{s-1}, output y_{s-1}, next input x_s) and the recurrent matvec of step s; the input
    # part of step s then needs only x_s and z_{s-1}, already in registers. One read of h per
    # step instead of three; iteration T does the last heads. Loop bounds as in the legacy
    # kernel (inline, constexpr copies under the interpreter).
    pid = tl.program_id(0)
    group = pid // SPLIT
    part = pid % SPLIT
    k64 = (group // B).to(tl.int64)
    b64 = (group % B).to(tl.int64)
    kb = k64 * B + b64
    IS = I + S
    HS = H + S
    w_ih = w_ih_ptr + k64 * 3 * H * IS
    w_hh = w_hh_ptr + k64 * 3 * H * H
    b_ih = b_ih_ptr + k64 * 3 * H
    b_hh = b_hh_ptr + k64 * 3 * H
    w_prior = w_prior_ptr + k64 * S * H
    w_head = w_head_ptr + k64 * O * HS
    h_buf = h_buf_ptr + kb * 2 * H
    counter = sync_ptr + group

    offs_i = tl.arange(0, I_PAD)
    offs_s = tl.arange(0, S_PAD)
    offs_o = tl.arange(0, O_PAD)
    offs_c = tl.arange(0, BLOCK_C)
    mask_i = offs_i < I
    mask_s = offs_s < S
    mask_o = offs_o < O
    rows = part * BLOCK_H + tl.arange(0, BLOCK_H)
    m_r = rows < H

    # Small operands, held in registers for the whole rollout.
    skip = tl.load(
        skip_ptr + offs_o[:, None] * I + offs_i[None, :],
        mask=mask_o[:, None] & mask_i[None, :],
        other=0.0,
    )
    mix = tl.load(
        mix_ptr + offs_i[:, None] * I + offs_i[None, :],
        mask=mask_i[:, None] & mask_i[None, :],
        other=0.0,
    )
    feed_t = tl.load(  # FEED [I, O] read transposed, as [O_PAD, I_PAD]
        feed_ptr + offs_i[None, :] * O + offs_o[:, None],
        mask=mask_o[:, None] & mask_i[None, :],
        other=0.0,
    )
    drift = tl.load(drift_ptr + offs_i, mask=mask_i, other=0.0)
    bias_prior = tl.load(b_prior_ptr + k64 * S + offs_s, mask=mask_s, other=0.0).to(tl.float32)
    bias_head = tl.load(b_head_ptr + k64 * O + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    w_yz = tl.load(
        w_head + offs_o[:, None] * HS + H + offs_s[None, :],
        mask=mask_o[:, None] & mask_s[None, :],
        other=0.0,
    ).to(tl.float32)
    m_x = m_r[:, None] & mask_i[None, :]
    p_x = w_ih + rows[:, None] * IS + offs_i[None, :]
    wx_r = tl.load(p_x, mask=m_x, other=0.0).to(tl.float32)
    wx_u = tl.load(p_x + H * IS, mask=m_x, other=0.0).to(tl.float32)
    wx_n = tl.load(p_x + 2 * H * IS, mask=m_x, other=0.0).to(tl.float32)
    m_z = m_r[:, None] & mask_s[None, :]
    p_z = w_ih + rows[:, None] * IS + I + offs_s[None, :]
    wz_r = tl.load(p_z, mask=m_z, other=0.0).to(tl.float32)
    wz_u = tl.load(p_z + H * IS, mask=m_z, other=0.0).to(tl.float32)
    wz_n = tl.load(p_z + 2 * H * IS, mask=m_z, other=0.0).to(tl.float32)
    bi_r = tl.load(b_ih + rows, mask=m_r, other=0.0).to(tl.float32)
    bi_u = tl.load(b_ih + H + rows, mask=m_r, other=0.0).to(tl.float32)
    bi_n = tl.load(b_ih + 2 * H + rows, mask=m_r, other=0.0).to(tl.float32)
    bh_r = tl.load(b_hh + rows, mask=m_r, other=0.0).to(tl.float32)
    bh_u = tl.load(b_hh + H + rows, mask=m_r, other=0.0).to(tl.float32)
    bh_n = tl.load(b_hh + 2 * H + rows, mask=m_r, other=0.0).to(tl.float32)
    if RESIDENT:
        # The whole row of h fits one chunk: the recurrent and head weights of this tile stay
        # in registers, so a step reads nothing but h from memory.
        m_c = offs_c < H
        m_h = m_r[:, None] & m_c[None, :]
        p_h = w_hh + rows[:, None] * H + offs_c[None, :]
        wh_r = tl.load(p_h, mask=m_h, other=0.0).to(tl.float32)
        wh_u = tl.load(p_h + H * H, mask=m_h, other=0.0).to(tl.float32)
        wh_n = tl.load(p_h + 2 * H * H, mask=m_h, other=0.0).to(tl.float32)
        w_p = tl.load(
            w_prior + offs_s[:, None] * H + offs_c[None, :],
            mask=mask_s[:, None] & m_c[None, :],
            other=0.0,
        ).to(tl.float32)
        w_y = tl.load(
            w_head + offs_o[:, None] * HS + offs_c[None, :],
            mask=mask_o[:, None] & m_c[None, :],
            other=0.0,
        ).to(tl.float32)

    x = tl.load(x0_ptr + b64 * I + offs_i, mask=mask_i, other=0.0)
    z = tl.load(z0_ptr + kb * S + offs_s, mask=mask_s, other=0.0)
    h_own = tl.load(h0_ptr + kb * H + rows, mask=m_r, other=0.0)
    tl.store(h_buf + rows, h_own, mask=m_r)
    _arrive_and_wait(counter, SPLIT, SPLIT, SYNC)

    for s in range(T_C + 1 if STATIC_BOUNDS else T + 1):
        h_cur = h_buf + (s % 2) * H
        gh_r = tl.zeros([BLOCK_H], dtype=tl.float32)
        gh_u = tl.zeros([BLOCK_H], dtype=tl.float32)
        gh_n = tl.zeros([BLOCK_H], dtype=tl.float32)
        z_acc = tl.zeros([S_PAD], dtype=tl.float32)
        y_acc = tl.zeros([O_PAD], dtype=tl.float32)
        if RESIDENT:
            # volatile: h was written by other SMs; a stale L1 line would be wrong.
            hv = tl.load(h_cur + offs_c, mask=offs_c < H, other=0.0, volatile=True)
            gh_r += tl.sum(wh_r * hv[None, :], axis=1)
            gh_u += tl.sum(wh_u * hv[None, :], axis=1)
            gh_n += tl.sum(wh_n * hv[None, :], axis=1)
            z_acc += tl.sum(w_p * hv[None, :], axis=1)
            y_acc += tl.sum(w_y * hv[None, :], axis=1)
        else:
            for c0 in range(0, H_C if STATIC_BOUNDS else H, BLOCK_C):
                cols = c0 + offs_c
                m_c = cols < H
                hv = tl.load(h_cur + cols, mask=m_c, other=0.0, volatile=True)
                m_h = m_r[:, None] & m_c[None, :]
                p_h = w_hh + rows[:, None] * H + cols[None, :]
                gh_r += tl.sum(tl.load(p_h, mask=m_h, other=0.0).to(tl.float32) * hv[None, :], 1)
                gh_u += tl.sum(
                    tl.load(p_h + H * H, mask=m_h, other=0.0).to(tl.float32) * hv[None, :], 1
                )
                gh_n += tl.sum(
                    tl.load(p_h + 2 * H * H, mask=m_h, other=0.0).to(tl.float32) * hv[None, :], 1
                )
                w_pc = tl.load(
                    w_prior + offs_s[:, None] * H + cols[None, :],
                    mask=mask_s[:, None] & m_c[None, :],
                    other=0.0,
                ).to(tl.float32)
                z_acc += tl.sum(w_pc * hv[None, :], axis=1)
                w_yc = tl.load(
                    w_head + offs_o[:, None] * HS + cols[None, :],
                    mask=mask_o[:, None] & m_c[None, :],
                    other=0.0,
                ).to(tl.float32)
                y_acc += tl.sum(w_yc * hv[None, :], axis=1)

        # Heads of step s-1 (nothing to do at s = 0: x_0 and z_{-1} are the inputs).
        has_h = s > 0
        z_new = z_acc + bias_prior
        y = y_acc + tl.sum(w_yz * z_new[None, :], axis=1) + bias_head
        y += tl.sum(skip * x[None, :], axis=1)
        out = traj_ptr + ((k64 * T + tl.maximum(s - 1, 0)) * B + b64) * O
        tl.store(out + offs_o, y, mask=mask_o & has_h & (part == 0))
        x_new = tl.sum(mix * x[None, :], axis=1) + tl.sum(feed_t * y[:, None], axis=0) + drift
        x = tl.where(has_h, x_new, x)
        z = tl.where(has_h, z_new, z)

        # GRU step s for this tile's rows (its result is dropped at s = T).
        gi_r = tl.sum(wx_r * x[None, :], axis=1) + tl.sum(wz_r * z[None, :], axis=1) + bi_r
        gi_u = tl.sum(wx_u * x[None, :], axis=1) + tl.sum(wz_u * z[None, :], axis=1) + bi_u
        gi_n = tl.sum(wx_n * x[None, :], axis=1) + tl.sum(wz_n * z[None, :], axis=1) + bi_n
        reset = tl.sigmoid(gi_r + gh_r + bh_r)
        update = tl.sigmoid(gi_u + gh_u + bh_u)
        pre_n = gi_n + reset * (gh_n + bh_n)
        # tanh(a) = 2 sigmoid(2a) - 1: stable for large |a|, no tl.tanh in every version.
        cand = 2.0 * tl.sigmoid(2.0 * pre_n) - 1.0
        h_own = (1.0 - update) * cand + update * h_own
        tl.store(h_buf + ((s + 1) % 2) * H + rows, h_own, mask=m_r & (s < T))
        if s < T:
            _arrive_and_wait(counter, (s + 2) * SPLIT, SPLIT, SYNC)

    _reduce_members(sync_ptr, traj_ptr, mean_ptr, var_ptr, K, B, T, O, SPLIT, BLOCK_R,
                    STATIC_BOUNDS, K_C, B_C, T_C, O_C)  # fmt: skip


def _check_inputs(
    x0: torch.Tensor,
    h0: torch.Tensor,
    z0: torch.Tensor,
    weights: RSSMWeights,
    feedback: RSSMFeedback,
    steps: int,
) -> tuple[int, int, int, int, int, int]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise KernelInputError(f"{OP}: steps must be an int >= 1, got {steps!r}")
    if not isinstance(weights, RSSMWeights) or not isinstance(feedback, RSSMFeedback):
        raise KernelInputError(f"{OP}: weights must be RSSMWeights and feedback RSSMFeedback")
    check_tensor(OP, "h0", h0, dtypes=(torch.float32,))
    if h0.dim() != 3 or min(h0.shape) < 1:
        raise KernelInputError(
            f"{OP}: h0 must be [K, B, H] with K, B, H >= 1, got {tuple(h0.shape)}"
        )
    K, B, H = h0.shape
    device = h0.device
    check_tensor(OP, "x0", x0, dtypes=(torch.float32,), device=device)
    if x0.dim() != 2 or x0.shape[0] != B or x0.shape[1] < 1:
        raise KernelInputError(f"{OP}: x0 must be [B={B}, I>=1], got {tuple(x0.shape)}")
    I = x0.shape[1]
    check_tensor(OP, "z0", z0, dtypes=(torch.float32,), device=device)
    if z0.dim() != 3 or tuple(z0.shape[:2]) != (K, B) or z0.shape[2] < 1:
        raise KernelInputError(f"{OP}: z0 must be [K={K}, B={B}, S>=1], got {tuple(z0.shape)}")
    S = z0.shape[2]
    if weights.w_head.dim() != 3 or weights.w_head.shape[1] < 1:
        raise KernelInputError(
            f"{OP}: w_head must be [K, O, H+S], got {tuple(weights.w_head.shape)}"
        )
    O = weights.w_head.shape[1]
    wdtype = weights.w_ih.dtype
    expected = {
        "w_ih": (K, 3 * H, I + S),
        "w_hh": (K, 3 * H, H),
        "b_ih": (K, 3 * H),
        "b_hh": (K, 3 * H),
        "w_prior": (K, S, H),
        "b_prior": (K, S),
        "w_head": (K, O, H + S),
        "b_head": (K, O),
    }
    for name, shape in expected.items():
        t = getattr(weights, name)
        check_tensor(OP, name, t, dtypes=WEIGHT_DTYPES, device=device)
        if t.dtype != wdtype:
            raise KernelInputError(f"{OP}: {name} is {t.dtype} but w_ih is {wdtype}; use one dtype")
        if tuple(t.shape) != shape:
            raise KernelInputError(
                f"{OP}: {name} has shape {tuple(t.shape)}; expected {shape} "
                f"(K={K}, H={H}, I={I}, S={S}, O={O})"
            )
    for name, shape in {"skip": (O, I), "mix": (I, I), "feed": (I, O), "drift": (I,)}.items():
        t = getattr(feedback, name)
        check_tensor(OP, name, t, dtypes=(torch.float32,), device=device)
        if tuple(t.shape) != shape:
            raise KernelInputError(
                f"{OP}: feedback.{name} has shape {tuple(t.shape)}; expected {shape}"
            )
    return K, B, H, I, S, O


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


class RolloutVariant(NamedTuple):
    """One way of running the rollout (issue 4's latency work; ``VARIANTS`` names them).

    ``fused``: the fused kernel (one tile per program, one read of h per step) instead of the
    legacy one. ``sync``: ``"acquire"`` or ``"volatile"`` (see the ``SYNC_*`` constants).
    ``num_warps``: more warps give the fused kernel more registers for resident weights.
    ``folded``: the folded kernel of rollout_folded.py (the linear chain folded into the gate
    inputs; ``fused`` is ignored). ``full_row``: the folded kernel reads the whole row of h
    in one chunk per step when its weights are not resident. ``in_kernel``: the folded kernel
    folds the weights in its prologue (no ``fold_weights`` before the launch) where its tiles
    are resident, and falls back to ``fold_weights`` where they are not.
    """

    fused: bool
    sync: str
    num_warps: int
    folded: bool = False
    full_row: bool = False
    in_kernel: bool = False


_SYNC_CODES = {"acquire": SYNC_ACQUIRE, "volatile": SYNC_VOLATILE}
VARIANTS: dict[str, RolloutVariant] = {
    "legacy": RolloutVariant(False, "acquire", 4),
    "fused_acquire": RolloutVariant(True, "acquire", 4),
    "fused_volatile": RolloutVariant(True, "volatile", 4),
    "fused_volatile_w8": RolloutVariant(True, "volatile", 8),
    # rollout_folded.py: one level of reductions per step (in the 2026-11-25 H100 sweep).
    "folded": RolloutVariant(True, "volatile", 4, folded=True),
    "folded_w8": RolloutVariant(True, "volatile", 8, folded=True),
    "folded_row": RolloutVariant(True, "volatile", 4, folded=True, full_row=True),
    "folded_row_w8": RolloutVariant(True, "volatile", 8, folded=True, full_row=True),
    # The fold inside the launch where the tiles are resident (rollout_folded.py,
    # FOLD_IN_KERNEL; fold_weights elsewhere): not yet measured on the GPU.
    "folded_inkernel": RolloutVariant(True, "volatile", 4, folded=True, in_kernel=True),
    "folded_inkernel_w8": RolloutVariant(True, "volatile", 8, folded=True, in_kernel=True),
    "folded_inkernel_w16": RolloutVariant(True, "volatile", 16, folded=True, in_kernel=True),
}
# Hidden sizes the H100 sweeps measured each default at (reports/rssm/2026-11-24_sweep_h100/
# and 2026-11-25_sweep_h100/, graph replay, K=5 or 16, B=1, T=1..200): fused_volatile is the
# fastest of the variants at H=64 and H=256 (T=50; at T=1 within 1% of legacy), and
# fused_volatile_w8 at H=512 (540 us; legacy 621, fused_volatile 645) and H=1024 (1633 us;
# legacy 2298, fused_volatile 5614). The choice is by H only: at T=200 the folded variants
# were 6% faster (folded_row_w8 825 us vs 881) and at K=16 fused_volatile_w8 5% faster (332
# vs 351), single points each, not a rule. Above 1024 and below 64 the nearest measured size
# decides (not measured).
FUSED_VOLATILE_MAX_H = 256
FUSED_VOLATILE_W8_MIN_H = 512


def default_variant(H: int) -> str:
    """The variant ``rssm_rollout(variant=None)`` runs for hidden size ``H`` (see above)."""
    if H <= FUSED_VOLATILE_MAX_H:
        return "fused_volatile"
    if H >= FUSED_VOLATILE_W8_MIN_H:
        return "fused_volatile_w8"
    return "legacy"


# Per-thread fp32 registers the fused kernel may spend on resident weights, and the elements
# of one [BLOCK_H, BLOCK_C] weight chunk per warp when it streams them instead.
RESIDENT_REGS_PER_THREAD = 160
CHUNK_ELEMS_PER_WARP = 1024


class FusedTiling(NamedTuple):
    programs: int  # per (member, batch row) group
    block_h: int
    block_c: int
    resident: bool


def fused_tiling(
    H: int, I: int, S: int, O: int, split: int, variant: RolloutVariant
) -> FusedTiling:
    """Tile sizes of the fused kernel for ``split`` programs per group (at most that many)."""
    block_h = min(triton.next_power_of_2(H), triton.next_power_of_2(triton.cdiv(H, split)))
    programs = triton.cdiv(H, block_h)
    h_pad = triton.next_power_of_2(H)
    threads = 32 * variant.num_warps
    i_pad, s_pad, o_pad = (triton.next_power_of_2(v) for v in (I, S, O))
    resident_elems = (3 * block_h + s_pad + o_pad) * h_pad
    fixed_elems = 3 * block_h * (i_pad + s_pad) + i_pad * i_pad + 2 * o_pad * i_pad
    resident = resident_elems + fixed_elems <= RESIDENT_REGS_PER_THREAD * threads
    if resident:
        block_c = h_pad
    else:
        # Five matrices share a chunk (3 gates, prior, head): size it for all of them.
        per_col = 3 * block_h + s_pad + o_pad
        fit = max(1, CHUNK_ELEMS_PER_WARP * variant.num_warps // per_col)
        block_c = min(h_pad, max(16, 1 << (fit.bit_length() - 1)))
    return FusedTiling(programs, block_h, block_c, resident)


def default_split(K: int, B: int, H: int, device: torch.device) -> int:
    """Programs per (member, batch row): as many as the SMs allow, at most one per tile."""
    if device.type != "cuda":
        return 1
    groups = K * B
    return max(1, min(triton.cdiv(H, BLOCK_H), _sm_count(device) // groups))


def _workspace_words(K: int, B: int, H: int) -> int:
    # [h: K*B x 2 slots x H fp32][K*B barrier counters][done counter]
    return 2 * K * B * H + K * B + 1


def make_workspace(K: int, B: int, H: int, device: torch.device | str) -> torch.Tensor:
    """Scratch for ``rssm_rollout``: h double buffers and barrier counters (zeroed once; the
    kernel leaves the counters at zero when it ends, so the workspace can be reused)."""
    return torch.zeros(_workspace_words(K, B, H), dtype=torch.int32, device=device)


def workspace_parts(
    workspace: torch.Tensor, K: int, B: int, H: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a workspace: (h double buffers fp32, counters [K*B + 1]: per group, then done)."""
    h_buf = workspace[: 2 * K * B * H].view(torch.float32)
    counters = workspace[2 * K * B * H : _workspace_words(K, B, H)]
    return h_buf, counters


def rssm_rollout(
    x0: torch.Tensor,
    h0: torch.Tensor,
    z0: torch.Tensor,
    weights: RSSMWeights,
    feedback: RSSMFeedback,
    steps: int,
    *,
    split: int | None = None,
    workspace: torch.Tensor | None = None,
    variant: str | None = None,
) -> RolloutResult:
    """Roll K RSSM members forward ``steps`` steps in one launch; see the module docstring.

    ``split`` forces the programs per (member, batch row) (1 = the interpreter-safe path);
    ``workspace`` (from :func:`make_workspace`) avoids a zero-fill per call; ``variant`` names
    a kernel variant of ``VARIANTS`` (None: :func:`default_variant` of H, the fastest measured).
    Stream-ordered: a reused workspace must not be shared by concurrent launches.
    """
    K, B, H, I, S, O = _check_inputs(x0, h0, z0, weights, feedback, steps)
    device = h0.device
    if variant is None:
        variant = default_variant(H)
    if variant not in VARIANTS:
        raise KernelInputError(f"{OP}: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    chosen = VARIANTS[variant]
    if not use_triton(h0):
        return rssm_rollout_ref(x0, h0, z0, weights, feedback, steps)
    if split is None:
        split = default_split(K, B, H, device)
    if not isinstance(split, int) or split < 1 or split > triton.cdiv(H, BLOCK_H):
        raise KernelInputError(f"{OP}: split must be an int in [1, {triton.cdiv(H, BLOCK_H)}]")
    if chosen.folded:
        from .rollout_folded import folded_tiling

        tiling = folded_tiling(H, I, S, O, split, chosen.num_warps, chosen.full_row)
    else:
        tiling = fused_tiling(H, I, S, O, split, chosen) if chosen.fused else None
    programs = tiling.programs if tiling is not None else split
    static = impl_for_device(device) == "triton-interpreter"
    if programs > 1:
        if static:
            raise KernelInputError(f"{OP}: split > 1 spins on a barrier; the interpreter needs 1")
        if K * B * programs > _sm_count(device):
            raise KernelInputError(
                f"{OP}: split={split} needs {K * B * programs} co-resident programs; "
                f"the GPU has {_sm_count(device)} SMs"
            )
    need = _workspace_words(K, B, H)
    if workspace is None:
        workspace = make_workspace(K, B, H, device)
    else:
        check_tensor(OP, "workspace", workspace, dtypes=(torch.int32,), device=device)
        if workspace.numel() < need:
            raise KernelInputError(f"{OP}: workspace has {workspace.numel()} words; needs {need}")
    h_buf, sync = workspace_parts(workspace, K, B, H)
    traj = empty(K, steps, B, O, dtype=torch.float32, device=device)
    mean = empty(steps, B, O, dtype=torch.float32, device=device)
    var = empty(steps, B, O, dtype=torch.float32, device=device)
    if chosen.folded:
        from .rollout_folded import launch_folded

        launch_folded(
            x0, h0, z0, weights, feedback, steps, tiling, h_buf, sync, traj, mean, var,
            sync_code=_SYNC_CODES[chosen.sync], num_warps=chosen.num_warps, static=static,
            in_kernel=chosen.in_kernel,
        )  # fmt: skip
        return RolloutResult(traj, mean, var)
    pads = dict(
        I_PAD=triton.next_power_of_2(I),
        S_PAD=triton.next_power_of_2(S),
        O_PAD=triton.next_power_of_2(O),
        BLOCK_R=BLOCK_R,
        STATIC_BOUNDS=static,
        K_C=K if static else 0,
        B_C=B if static else 0,
        T_C=steps if static else 0,
        H_C=H if static else 0,
        O_C=O if static else 0,
    )
    if tiling is None:
        _rssm_rollout_kernel[(K * B * split,)](
            x0, h0, z0, *weights, *feedback, traj, mean, var, h_buf, sync,
            K, B, steps, H, I, S, O,
            SPLIT=split,
            BLOCK_H=BLOCK_H,
            BLOCK_C=min(MAX_BLOCK_C, triton.next_power_of_2(H)),
            num_warps=chosen.num_warps,
            **pads,
        )  # fmt: skip
    else:
        _rssm_rollout_fused_kernel[(K * B * tiling.programs,)](
            x0, h0, z0, *weights, *feedback, traj, mean, var, h_buf, sync,
            K, B, steps, H, I, S, O,
            SPLIT=tiling.programs,
            BLOCK_H=tiling.block_h,
            BLOCK_C=tiling.block_c,
            RESIDENT=tiling.resident,
            SYNC=_SYNC_CODES[chosen.sync],
            num_warps=chosen.num_warps,
            **pads,
        )  # fmt: skip
    return RolloutResult(traj, mean, var)


class RolloutGraph:
    """``rssm_rollout`` captured once as a CUDA graph, for repeated rollouts of fixed shapes.

    A direct call validates 14 tensors and binds ~40 launch arguments in Python each time; at
    small T that host work, not the kernel, is the latency. The graph does it once: a call
    copies the new ``x0, h0, z0`` into its static inputs and replays (one ``cudaGraphLaunch``).

    ``weights`` and ``feedback`` are read in place at every replay (in-place updates of the
    model's parameters are seen; replacing a tensor is not: build a new graph). The returned
    :class:`RolloutResult` tensors are the graph's static outputs, overwritten by the next call
    (clone what you keep). Off CUDA (CPU, the interpreter) there is no graph: calls run
    :func:`rssm_rollout` directly, with the same contract.
    """

    def __init__(
        self,
        x0: torch.Tensor,
        h0: torch.Tensor,
        z0: torch.Tensor,
        weights: RSSMWeights,
        feedback: RSSMFeedback,
        steps: int,
        *,
        split: int | None = None,
        variant: str | None = None,
    ) -> None:
        _check_inputs(x0, h0, z0, weights, feedback, steps)
        self.weights, self.feedback, self.steps, self.split = weights, feedback, steps, split
        self.variant = variant
        self.x0, self.h0, self.z0 = x0.clone(), h0.clone(), z0.clone()
        K, B, H = h0.shape
        self.workspace = make_workspace(K, B, H, h0.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if h0.device.type == "cuda" and impl_for_device(h0.device) == "triton":
            # Compile and run once outside the capture (a capture cannot compile or allocate).
            side = torch.cuda.Stream(h0.device)
            side.wait_stream(torch.cuda.current_stream(h0.device))
            with torch.cuda.stream(side):
                self._launch()
            torch.cuda.current_stream(h0.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.result = self._launch()

    def _launch(self) -> RolloutResult:
        return rssm_rollout(
            self.x0, self.h0, self.z0, self.weights, self.feedback, self.steps,
            split=self.split, workspace=self.workspace, variant=self.variant,
        )  # fmt: skip

    def replay(self) -> RolloutResult:
        """Roll out from the current static inputs ``self.x0, self.h0, self.z0``."""
        if self.graph is None:
            return self._launch()
        self.graph.replay()
        return self.result

    def __call__(self, x0: torch.Tensor, h0: torch.Tensor, z0: torch.Tensor) -> RolloutResult:
        for name, new, static in (("x0", x0, self.x0), ("h0", h0, self.h0), ("z0", z0, self.z0)):
            if (
                new.shape != static.shape
                or new.dtype != static.dtype
                or new.device != static.device
            ):
                raise KernelInputError(
                    f"{OP}: RolloutGraph built for {name} {tuple(static.shape)} {static.dtype} on "
                    f"{static.device}; got {tuple(new.shape)} {new.dtype} on {new.device}"
                )
        self.x0.copy_(x0)
        self.h0.copy_(h0)
        self.z0.copy_(z0)
        return self.replay()


def gru_cell_batched(
    inp: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor,
    b_hh: torch.Tensor,
) -> torch.Tensor:
    """K GRU cells at once: inp [K, B, In], h [K, B, H] -> [K, B, H] (nn.GRUCell math)."""
    gi = torch.baddbmm(b_ih.unsqueeze(1), inp, w_ih.transpose(1, 2))
    gh = torch.baddbmm(b_hh.unsqueeze(1), h, w_hh.transpose(1, 2))
    i_r, i_u, i_n = gi.chunk(3, dim=-1)
    h_r, h_u, h_n = gh.chunk(3, dim=-1)
    reset = torch.sigmoid(i_r + h_r)
    update = torch.sigmoid(i_u + h_u)
    cand = torch.tanh(i_n + reset * h_n)
    return (1 - update) * cand + update * h


def rssm_rollout_ref(
    x0: torch.Tensor,
    h0: torch.Tensor,
    z0: torch.Tensor,
    weights: RSSMWeights,
    feedback: RSSMFeedback,
    steps: int,
) -> RolloutResult:
    """The batched torch form (baddbmm over members). Computes in float64 when x0 is float64,
    else float32 (bf16 weights are upcast, as the kernel does)."""
    dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    w = RSSMWeights(*(t.to(dtype) for t in weights))
    f = RSSMFeedback(*(t.to(dtype) for t in feedback))
    K = h0.shape[0]
    x = x0.to(dtype).unsqueeze(0).expand(K, *x0.shape)
    h, z = h0.to(dtype), z0.to(dtype)
    outputs = []
    for _ in range(steps):
        h = gru_cell_batched(torch.cat([x, z], dim=-1), h, w.w_ih, w.w_hh, w.b_ih, w.b_hh)
        z = torch.baddbmm(w.b_prior.unsqueeze(1), h, w.w_prior.transpose(1, 2))
        y = torch.baddbmm(w.b_head.unsqueeze(1), torch.cat([h, z], -1), w.w_head.transpose(1, 2))
        y = y + x @ f.skip.T
        outputs.append(y)
        x = x @ f.mix.T + y @ f.feed.T + f.drift
    traj = torch.stack(outputs, dim=1)  # [K, T, B, O]
    return RolloutResult(traj, traj.mean(0), traj.var(0, unbiased=False))
