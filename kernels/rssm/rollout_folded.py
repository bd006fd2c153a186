"""RSSM rollout, folded variant: the linear part of each step folded into the GRU's input.

Same model and outputs as rollout.py (read its module docstring first). Per member, with
``W_ih = [Wx | Wz]`` (columns for x and for z) and ``W_head = [Wh | Wq]`` (columns for h and
for z), everything between ``h_{s-1}`` and the gates of step s is affine in
``(h_{s-1}, x_{s-1})`` for s >= 1:

    z_{s-1} = P h_{s-1} + bp                                  (P = W_prior, bp = b_prior)
    y_{s-1} = Wy h_{s-1} + SKIP x_{s-1} + by                  Wy = Wh + Wq P       [O, H]
                                                              by = Wq bp + b_head  [O]
    x_s     = N h_{s-1} + M x_{s-1} + e                       N  = FEED Wy         [I, H]
                                                              M  = MIX + FEED SKIP [I, I]
                                                              e  = FEED by + DRIFT [I]
    gi_s    = Wx x_s + Wz z_{s-1} + b_ih
            = A h_{s-1} + C x_{s-1} + d                       A  = Wx N + Wz P     [3H, H]
                                                              C  = Wx M            [3H, I]
                                                              d  = Wx e + Wz bp + b_ih

Step 0 is not folded: its input is the given ``[x_0, z0]``, so ``gi_0 = W_ih [x_0, z0] + b_ih``
is computed from the member weights in the kernel's prologue.

Why. In the fused kernel a step is a chain of dependent reductions after h_{s-1} arrives:
z (over h), then y (over z), then x (over y), then gi (over x and z), then the gates. Folded, a
step is one level of independent reductions over the state ``(h_{s-1}, x_{s-1})`` that the
previous step published (A and W_hh for the program's tile of gates; N and Wy for its share
of the small rows), then the gates. The small rows ``[x_s; y_{s-1}]`` (I + O of them) are
split over the programs of a group like the hidden rows: each program writes its rows of
x_s into a double-buffered x scratch beside h (published by the same barrier) and its rows
of y_{s-1} into the trajectory; nothing is computed redundantly per program.

The derived matrices (A, C, d, N, e, M, Wy, by) are new fp32 tensors, computed per call by a
few batched torch matmuls in :func:`fold_weights` (fp32 even for bf16 member weights;
TF32 is switched off for them). W_hh, b_hh, W_ih and b_ih are read in place. Under
``RolloutGraph`` the fold is captured with the kernel, so in-place updates of the member
weights or the feedback maps are seen by the next replay. Kernel layout otherwise as the
fused kernel: ``SPLIT`` programs per (member, batch row), one tile of hidden rows each,
volatile-polled counter barrier, double buffers, last-program member reduction, and the
SPLIT=1 path for the Triton interpreter. Iteration 0 reads h0 straight from its input (no
prologue barrier); iteration T computes only y_{T-1}.

In-kernel fold (``FOLD_IN_KERNEL``, the ``folded_inkernel*`` variants). Where the tiling
keeps a program's h-side tiles resident in registers, each program folds its own rows in the
kernel's prologue instead (:func:`_fold_member_tiles`): it builds Wy and by for its member
redundantly (O x H, small), then its tiles of A, C and d and its small rows of [N; Wy],
[M; SKIP] and [e; by] by rank-1 updates straight into the registers the steps use, in fp32
FMAs; nothing derived is written to memory and no torch op runs before the launch. Cost per
program: about 3 BLOCK_H (H (S + O) + I (I + 2 O)) + H O (S + BLOCK_X) FMAs. Where the tiles
are not resident (large H, or few warps), the launcher falls back to fold_weights; the
steps are the same either way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ._sync import _arrive_and_wait, _reduce_members

FOLDED_BLOCK_R = 256  # elements per chunk of the final member reduction


class FoldedWeights(NamedTuple):
    """The per-call fold of the member weights and feedback maps (fp32, contiguous)."""

    a: torch.Tensor  # [K, 3H, H]  h_{s-1} -> gate inputs gi_s
    c: torch.Tensor  # [K, 3H, I]  x_{s-1} -> gi_s
    d: torch.Tensor  # [K, 3H]     gi_s bias
    n: torch.Tensor  # [K, I, H]   h_{s-1} -> x_s
    e: torch.Tensor  # [K, I]      x_s bias
    m: torch.Tensor  # [I, I]      x_{s-1} -> x_s (shared by the members)
    wy: torch.Tensor  # [K, O, H]  h_{s-1} -> y_{s-1}
    by: torch.Tensor  # [K, O]     y_{s-1} bias (SKIP maps x_{s-1} -> y_{s-1}, as given)


def fold_weights(weights, feedback) -> FoldedWeights:
    """Fold ``RSSMWeights`` and ``RSSMFeedback`` into :class:`FoldedWeights` (see the module
    docstring): ten small batched matmuls, in fp32, without TF32 (its 10-bit mantissa would
    put ~1e-3 relative error into every folded weight)."""
    I = feedback.mix.shape[0]
    H = weights.w_hh.shape[2]
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        w_ih = weights.w_ih.float()  # a view for fp32 weights; an upcast copy for bf16
        wx, wz = w_ih[..., :I], w_ih[..., I:]
        w_head = weights.w_head.float()
        wh, wq = w_head[..., :H], w_head[..., H:]
        p = weights.w_prior.float()
        bp = weights.b_prior.float().unsqueeze(-1)
        wy = torch.baddbmm(wh, wq, p)
        by = torch.baddbmm(weights.b_head.float().unsqueeze(-1), wq, bp).squeeze(-1)
        m = torch.addmm(feedback.mix, feedback.feed, feedback.skip)
        n = torch.matmul(feedback.feed, wy)
        e = torch.addmm(feedback.drift, by, feedback.feed.T)
        a = torch.baddbmm(torch.bmm(wz, p), wx, n)
        c = torch.matmul(wx, m)
        d = torch.baddbmm(weights.b_ih.float().unsqueeze(-1), wz, bp)
        d = torch.baddbmm(d, wx, e.unsqueeze(-1)).squeeze(-1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return FoldedWeights(a, c, d, n, e, m, wy, by)


class FoldedTiling(NamedTuple):
    programs: int  # per (member, batch row) group
    block_h: int  # hidden rows per program
    block_x: int  # small rows ([x_s; y_{s-1}], I + O in all) per program
    block_c: int  # columns of h per chunk of the recurrent reductions
    resident: bool  # the tile's h-side weights held in registers across steps


# Per-thread fp32 registers the folded kernel may spend on resident weights, and the elements
# of one weight chunk per warp when it streams them (the fused kernel's budgets).
FOLDED_RESIDENT_REGS_PER_THREAD = 160
FOLDED_CHUNK_ELEMS_PER_WARP = 1024


def folded_tiling(
    H: int,
    I: int,
    S: int,
    O: int,
    split: int,
    num_warps: int,
    full_row: bool,
) -> FoldedTiling:
    """Tiles for ``split`` programs per group (at most that many). ``full_row``: stream the
    whole row of h in one chunk when the weights are not resident (one h load per step
    instead of one per chunk; the weights then come from L1 in one go)."""
    block_h = min(triton.next_power_of_2(H), triton.next_power_of_2(triton.cdiv(H, split)))
    programs = triton.cdiv(H, block_h)
    block_x = triton.next_power_of_2(triton.cdiv(I + O, programs))
    h_pad, i_pad = triton.next_power_of_2(H), triton.next_power_of_2(I)
    threads = 32 * num_warps
    per_col = 6 * block_h + block_x  # A and W_hh (3 gates each), N / Wy rows
    # C and [M; SKIP] stay live; step 0's W_ih tile is dead before the loop (not counted).
    fixed = (3 * block_h + block_x) * i_pad
    resident = per_col * h_pad + fixed <= FOLDED_RESIDENT_REGS_PER_THREAD * threads
    if resident or full_row:
        block_c = h_pad
    else:
        fit = max(1, FOLDED_CHUNK_ELEMS_PER_WARP * num_warps // per_col)
        block_c = min(h_pad, max(16, 1 << (fit.bit_length() - 1)))
    return FoldedTiling(programs, block_h, block_x, block_c, resident)


# Columns of W_ih (rows of MIX and W_prior) per round of the in-kernel fold's loops over I and
# S: the loads of a round are issued back to back. 2, not more: an offline sm_90 compile of the
# target point (8 warps) spilled in those loops at 4 and 8 (each column is a [BLOCK_H] vector
# per gate held whole by every thread), and not at 2.
FOLD_UNROLL = 2


@triton.jit
def _fold_member_tiles(
    w_ih,
    w_head,
    w_prior,
    b_ih,
    b_prior,
    b_head,
    mix_ptr,
    feed_ptr,
    skip_ptr,
    drift_ptr,
    rows,
    small,
    H,
    I,
    S,
    O,
    BLOCK_H: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_C: tl.constexpr,
    I_PAD: tl.constexpr,
    O_PAD: tl.constexpr,
    UNROLL: tl.constexpr,
    STATIC_BOUNDS: tl.constexpr,
    I_C: tl.constexpr,
    S_C: tl.constexpr,
    O_C: tl.constexpr,
):
    # fold_weights for one program's rows, into registers (member pointers already offset).
    # Regrouped so that every product is a short run of rank-1 updates into the program's
    # own tiles (no other intermediate of H or I rows); with G = Wx FEED ([BLOCK_H, O] per
    # gate):
    #     Wy = Wh + Wq P,  by = b_head + Wq bp     (the whole [O, H], redundantly per program)
    #     A  = Wx N + Wz P            = Wz P + G Wy
    #     C  = Wx M                   = Wx MIX + G SKIP
    #     d  = Wx e + Wz bp + b_ih    = b_ih + Wx DRIFT + Wz bp + G by
    # and for the small rows, with R = FEED[row] for an x row and the one-hot of o for a y
    # row ([BLOCK_X, O]): [N; Wy] = R Wy, [M; SKIP] = [MIX; 0] + R SKIP, [e; by] = [DRIFT;
    # 0] + R by. About 3 BLOCK_H (H (S + O) + I (I + 2 O)) + H O (S + BLOCK_X) fp32 FMAs per
    # program (no TF32), in the order of the terms above.
    IS = I + S
    HS = H + S
    offs_i = tl.arange(0, I_PAD)
    offs_o = tl.arange(0, O_PAD)
    offs_c = tl.arange(0, BLOCK_C)
    mask_i = offs_i < I
    mask_o = offs_o < O
    m_c = offs_c < H
    m_r = rows < H
    is_x = small < I
    row_y = tl.where((small >= I) & (small < I + O), small - I, -1)  # -1: not a y row

    # Rank-S part: Wz P into the gate tiles, Wq P into Wy, Wz bp into d.
    wa_r = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    wa_u = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    wa_n = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    wy = tl.zeros([O_PAD, BLOCK_C], dtype=tl.float32)
    d_r = tl.load(b_ih + rows, mask=m_r, other=0.0).to(tl.float32)
    d_u = tl.load(b_ih + H + rows, mask=m_r, other=0.0).to(tl.float32)
    d_n = tl.load(b_ih + 2 * H + rows, mask=m_r, other=0.0).to(tl.float32)
    by = tl.load(b_head + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    for j0 in range(0, S_C if STATIC_BOUNDS else S, UNROLL):
        for dj in tl.static_range(UNROLL):
            j = j0 + dj
            ok = j < S
            p_row = tl.load(w_prior + j * H + offs_c, mask=m_c & ok, other=0.0).to(tl.float32)
            bias_p = tl.load(b_prior + j, mask=ok, other=0.0).to(tl.float32)
            wq_col = tl.load(w_head + offs_o * HS + H + j, mask=mask_o & ok, other=0.0).to(
                tl.float32
            )
            p_z = w_ih + rows * IS + I + j
            wz_r = tl.load(p_z, mask=m_r & ok, other=0.0).to(tl.float32)
            wz_u = tl.load(p_z + H * IS, mask=m_r & ok, other=0.0).to(tl.float32)
            wz_n = tl.load(p_z + 2 * H * IS, mask=m_r & ok, other=0.0).to(tl.float32)
            wa_r += wz_r[:, None] * p_row[None, :]
            wa_u += wz_u[:, None] * p_row[None, :]
            wa_n += wz_n[:, None] * p_row[None, :]
            wy += wq_col[:, None] * p_row[None, :]
            d_r += wz_r * bias_p
            d_u += wz_u * bias_p
            d_n += wz_n * bias_p
            by += wq_col * bias_p
    wy += tl.load(
        w_head + offs_o[:, None] * HS + offs_c[None, :],
        mask=mask_o[:, None] & m_c[None, :],
        other=0.0,
    ).to(tl.float32)

    # Rank-I part: Wx MIX into C (column i of Wx re-read from L1, row i of MIX).
    c_r = tl.zeros([BLOCK_H, I_PAD], dtype=tl.float32)
    c_u = tl.zeros([BLOCK_H, I_PAD], dtype=tl.float32)
    c_n = tl.zeros([BLOCK_H, I_PAD], dtype=tl.float32)
    for i0 in range(0, I_C if STATIC_BOUNDS else I, UNROLL):
        for di in tl.static_range(UNROLL):
            ok = i0 + di < I
            mix_row = tl.load(mix_ptr + (i0 + di) * I + offs_i, mask=mask_i & ok, other=0.0)
            p_col = w_ih + rows * IS + i0 + di
            c_r += (
                tl.load(p_col, mask=m_r & ok, other=0.0).to(tl.float32)[:, None] * mix_row[None, :]
            )
            c_u += (
                tl.load(p_col + H * IS, mask=m_r & ok, other=0.0).to(tl.float32)[:, None]
                * mix_row[None, :]
            )
            c_n += (
                tl.load(p_col + 2 * H * IS, mask=m_r & ok, other=0.0).to(tl.float32)[:, None]
                * mix_row[None, :]
            )

    # Rank-O part: column o of G = Wx FEED[:, o] times row o of Wy, SKIP and by; the small
    # rows' R[:, o] the same way. The Wx tile and DRIFT give Wx DRIFT on the way.
    m_x = m_r[:, None] & mask_i[None, :]
    p_x = w_ih + rows[:, None] * IS + offs_i[None, :]
    wx_r = tl.load(p_x, mask=m_x, other=0.0).to(tl.float32)
    wx_u = tl.load(p_x + H * IS, mask=m_x, other=0.0).to(tl.float32)
    wx_n = tl.load(p_x + 2 * H * IS, mask=m_x, other=0.0).to(tl.float32)
    drift = tl.load(drift_ptr + offs_i, mask=mask_i, other=0.0)
    d_r += tl.sum(wx_r * drift[None, :], axis=1)
    d_u += tl.sum(wx_u * drift[None, :], axis=1)
    d_n += tl.sum(wx_n * drift[None, :], axis=1)
    w_small = tl.zeros([BLOCK_X, BLOCK_C], dtype=tl.float32)
    f_small = tl.load(
        mix_ptr + small[:, None] * I + offs_i[None, :],
        mask=is_x[:, None] & mask_i[None, :],
        other=0.0,
    )
    g_small = tl.load(drift_ptr + small, mask=is_x, other=0.0)
    for o in range(O_C if STATIC_BOUNDS else O):
        wy_row = tl.sum(tl.where(offs_o[:, None] == o, wy, 0.0), axis=0)
        by_o = tl.sum(tl.where(offs_o == o, by, 0.0), axis=0)
        feed_col = tl.load(feed_ptr + offs_i * O + o, mask=mask_i, other=0.0)
        skip_row = tl.load(skip_ptr + o * I + offs_i, mask=mask_i, other=0.0)
        g_r = tl.sum(wx_r * feed_col[None, :], axis=1)
        g_u = tl.sum(wx_u * feed_col[None, :], axis=1)
        g_n = tl.sum(wx_n * feed_col[None, :], axis=1)
        wa_r += g_r[:, None] * wy_row[None, :]
        wa_u += g_u[:, None] * wy_row[None, :]
        wa_n += g_n[:, None] * wy_row[None, :]
        c_r += g_r[:, None] * skip_row[None, :]
        c_u += g_u[:, None] * skip_row[None, :]
        c_n += g_n[:, None] * skip_row[None, :]
        d_r += g_r * by_o
        d_u += g_u * by_o
        d_n += g_n * by_o
        r_col = tl.load(feed_ptr + small * O + o, mask=is_x, other=0.0)
        r_col += tl.where(row_y == o, 1.0, 0.0)
        w_small += r_col[:, None] * wy_row[None, :]
        f_small += r_col[:, None] * skip_row[None, :]
        g_small += r_col * by_o
    return wa_r, wa_u, wa_n, w_small, c_r, c_u, c_n, d_r, d_u, d_n, f_small, g_small


@triton.jit
def _rssm_rollout_folded_kernel(
    x0_ptr,
    h0_ptr,
    z0_ptr,
    w_ih_ptr,
    w_hh_ptr,
    b_ih_ptr,
    b_hh_ptr,
    a_ptr,
    c_ptr,
    d_ptr,
    n_ptr,
    e_ptr,
    m_ptr,
    wy_ptr,
    by_ptr,
    skip_ptr,
    w_prior_ptr,
    b_prior_ptr,
    w_head_ptr,
    b_head_ptr,
    mix_ptr,
    feed_ptr,
    drift_ptr,
    traj_ptr,
    mean_ptr,
    var_ptr,
    h_buf_ptr,
    x_buf_ptr,
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
    BLOCK_X: tl.constexpr,
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
    FOLD_IN_KERNEL: tl.constexpr,
    UNROLL: tl.constexpr,
    I_C: tl.constexpr,
    S_C: tl.constexpr,
):
    # Iteration s (0..T) reads the state (h_{s-1}, x_{s-1}) once and computes, all from it:
    # this program's rows of h_s (gates from A, C, d and W_hh) and its small rows of
    # [x_s; y_{s-1}] (from N / Wy and M / SKIP). Loop bounds as in rollout.py (inline, with
    # constexpr copies under the interpreter).
    pid = tl.program_id(0)
    group = pid // SPLIT
    part = pid % SPLIT
    k64 = (group // B).to(tl.int64)
    b64 = (group % B).to(tl.int64)
    kb = k64 * B + b64
    IS = I + S
    # int64 member offsets: K * 3H * H passes 2^31 for large ensembles.
    w_hh = w_hh_ptr + k64 * 3 * H * H
    a = a_ptr + k64 * 3 * H * H
    n = n_ptr + k64 * I * H
    wy = wy_ptr + k64 * O * H
    h_buf = h_buf_ptr + kb * 2 * H
    x_buf = x_buf_ptr + kb * 2 * I
    counter = sync_ptr + group

    offs_i = tl.arange(0, I_PAD)
    offs_s = tl.arange(0, S_PAD)
    offs_c = tl.arange(0, BLOCK_C)
    mask_i = offs_i < I
    mask_s = offs_s < S
    rows = part * BLOCK_H + tl.arange(0, BLOCK_H)
    m_r = rows < H
    # Small rows: 0..I-1 are x_s, I..I+O-1 are y_{s-1}; a program may own none.
    small = part * BLOCK_X + tl.arange(0, BLOCK_X)
    is_x = small < I
    is_y = (small >= I) & (small < I + O)
    row_y = tl.where(is_y, small - I, 0)

    # Step 0's gate inputs from the given x_0 and z0 with the member's W_ih (not folded).
    x_given = tl.load(x0_ptr + b64 * I + offs_i, mask=mask_i, other=0.0)
    z_given = tl.load(z0_ptr + kb * S + offs_s, mask=mask_s, other=0.0)
    w_ih = w_ih_ptr + k64 * 3 * H * IS
    b_ih = b_ih_ptr + k64 * 3 * H
    m_x = m_r[:, None] & mask_i[None, :]
    p_x = w_ih + rows[:, None] * IS + offs_i[None, :]
    m_z = m_r[:, None] & mask_s[None, :]
    p_z = w_ih + rows[:, None] * IS + I + offs_s[None, :]
    gi0_r = tl.sum(tl.load(p_x, mask=m_x, other=0.0).to(tl.float32) * x_given[None, :], 1)
    gi0_u = tl.sum(tl.load(p_x + H * IS, mask=m_x, other=0.0).to(tl.float32) * x_given[None, :], 1)
    gi0_n = tl.sum(
        tl.load(p_x + 2 * H * IS, mask=m_x, other=0.0).to(tl.float32) * x_given[None, :], 1
    )
    gi0_r += tl.sum(tl.load(p_z, mask=m_z, other=0.0).to(tl.float32) * z_given[None, :], 1)
    gi0_u += tl.sum(tl.load(p_z + H * IS, mask=m_z, other=0.0).to(tl.float32) * z_given[None, :], 1)
    gi0_n += tl.sum(
        tl.load(p_z + 2 * H * IS, mask=m_z, other=0.0).to(tl.float32) * z_given[None, :], 1
    )
    gi0_r += tl.load(b_ih + rows, mask=m_r, other=0.0).to(tl.float32)
    gi0_u += tl.load(b_ih + H + rows, mask=m_r, other=0.0).to(tl.float32)
    gi0_n += tl.load(b_ih + 2 * H + rows, mask=m_r, other=0.0).to(tl.float32)
    x0_rows = tl.load(x0_ptr + b64 * I + small, mask=is_x, other=0.0)

    # Small operands, held in registers for the whole rollout.
    b_hh = b_hh_ptr + k64 * 3 * H
    bh_r = tl.load(b_hh + rows, mask=m_r, other=0.0).to(tl.float32)
    bh_u = tl.load(b_hh + H + rows, mask=m_r, other=0.0).to(tl.float32)
    bh_n = tl.load(b_hh + 2 * H + rows, mask=m_r, other=0.0).to(tl.float32)
    if FOLD_IN_KERNEL:
        # Folded here, from the member weights and the feedback maps, straight into the
        # registers the steps use: no fold_weights launches, nothing written to memory.
        tl.static_assert(RESIDENT, "the in-kernel fold keeps its tiles resident")
        (wa_r, wa_u, wa_n, w_small, c_r, c_u, c_n, d_r, d_u, d_n, f_small, g_small) = (
            _fold_member_tiles(
                w_ih, w_head_ptr + k64 * O * (H + S), w_prior_ptr + k64 * S * H, b_ih,
                b_prior_ptr + k64 * S, b_head_ptr + k64 * O, mix_ptr, feed_ptr, skip_ptr,
                drift_ptr, rows, small, H, I, S, O,
                BLOCK_H, BLOCK_X, BLOCK_C, I_PAD, O_PAD, UNROLL, STATIC_BOUNDS, I_C, S_C,
                O_C,
            )
        )  # fmt: skip
    else:
        d = d_ptr + k64 * 3 * H
        d_r = tl.load(d + rows, mask=m_r, other=0.0)
        d_u = tl.load(d + H + rows, mask=m_r, other=0.0)
        d_n = tl.load(d + 2 * H + rows, mask=m_r, other=0.0)
        p_c = c_ptr + k64 * 3 * H * I + rows[:, None] * I + offs_i[None, :]
        c_r = tl.load(p_c, mask=m_x, other=0.0)
        c_u = tl.load(p_c + H * I, mask=m_x, other=0.0)
        c_n = tl.load(p_c + 2 * H * I, mask=m_x, other=0.0)
        # [M; SKIP] rows of this program, and their bias [e; by].
        f_small = tl.load(
            m_ptr + small[:, None] * I + offs_i[None, :],
            mask=is_x[:, None] & mask_i[None, :],
            other=0.0,
        ) + tl.load(
            skip_ptr + row_y[:, None] * I + offs_i[None, :],
            mask=is_y[:, None] & mask_i[None, :],
            other=0.0,
        )
        g_small = tl.load(e_ptr + k64 * I + small, mask=is_x, other=0.0) + tl.load(
            by_ptr + k64 * O + row_y, mask=is_y, other=0.0
        )
    if RESIDENT:
        # The whole row of h fits one chunk: the tile's h-side weights stay in registers, so
        # a step reads nothing but the state from memory.
        m_c = offs_c < H
        m_h = m_r[:, None] & m_c[None, :]
        if not FOLD_IN_KERNEL:
            p_a = a + rows[:, None] * H + offs_c[None, :]
            wa_r = tl.load(p_a, mask=m_h, other=0.0)
            wa_u = tl.load(p_a + H * H, mask=m_h, other=0.0)
            wa_n = tl.load(p_a + 2 * H * H, mask=m_h, other=0.0)
        p_h = w_hh + rows[:, None] * H + offs_c[None, :]
        wh_r = tl.load(p_h, mask=m_h, other=0.0).to(tl.float32)
        wh_u = tl.load(p_h + H * H, mask=m_h, other=0.0).to(tl.float32)
        wh_n = tl.load(p_h + 2 * H * H, mask=m_h, other=0.0).to(tl.float32)
        if not FOLD_IN_KERNEL:
            w_small = tl.load(
                n + small[:, None] * H + offs_c[None, :],
                mask=is_x[:, None] & m_c[None, :],
                other=0.0,
            ) + tl.load(
                wy + row_y[:, None] * H + offs_c[None, :],
                mask=is_y[:, None] & m_c[None, :],
                other=0.0,
            )

    h_own = tl.load(h0_ptr + kb * H + rows, mask=m_r, other=0.0)
    for s in range(T_C + 1 if STATIC_BOUNDS else T + 1):
        # The state of iteration s: h_{s-1} (h0 itself at s = 0) and x_{s-1} (none at s = 0).
        if s == 0:
            h_cur = h0_ptr + kb * H
        else:
            h_cur = h_buf + (s % 2) * H
        ga_r = tl.zeros([BLOCK_H], dtype=tl.float32)
        ga_u = tl.zeros([BLOCK_H], dtype=tl.float32)
        ga_n = tl.zeros([BLOCK_H], dtype=tl.float32)
        gh_r = tl.zeros([BLOCK_H], dtype=tl.float32)
        gh_u = tl.zeros([BLOCK_H], dtype=tl.float32)
        gh_n = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc_small = tl.zeros([BLOCK_X], dtype=tl.float32)
        if RESIDENT:
            # volatile: the state was written by other SMs; a stale L1 line would be wrong.
            hv = tl.load(h_cur + offs_c, mask=offs_c < H, other=0.0, volatile=True)
            ga_r += tl.sum(wa_r * hv[None, :], axis=1)
            ga_u += tl.sum(wa_u * hv[None, :], axis=1)
            ga_n += tl.sum(wa_n * hv[None, :], axis=1)
            gh_r += tl.sum(wh_r * hv[None, :], axis=1)
            gh_u += tl.sum(wh_u * hv[None, :], axis=1)
            gh_n += tl.sum(wh_n * hv[None, :], axis=1)
            acc_small += tl.sum(w_small * hv[None, :], axis=1)
        else:
            for c0 in range(0, H_C if STATIC_BOUNDS else H, BLOCK_C):
                cols = c0 + offs_c
                m_c = cols < H
                hv = tl.load(h_cur + cols, mask=m_c, other=0.0, volatile=True)
                m_h = m_r[:, None] & m_c[None, :]
                p_a = a + rows[:, None] * H + cols[None, :]
                ga_r += tl.sum(tl.load(p_a, mask=m_h, other=0.0) * hv[None, :], 1)
                ga_u += tl.sum(tl.load(p_a + H * H, mask=m_h, other=0.0) * hv[None, :], 1)
                ga_n += tl.sum(tl.load(p_a + 2 * H * H, mask=m_h, other=0.0) * hv[None, :], 1)
                p_h = w_hh + rows[:, None] * H + cols[None, :]
                gh_r += tl.sum(tl.load(p_h, mask=m_h, other=0.0).to(tl.float32) * hv[None, :], 1)
                gh_u += tl.sum(
                    tl.load(p_h + H * H, mask=m_h, other=0.0).to(tl.float32) * hv[None, :], 1
                )
                gh_n += tl.sum(
                    tl.load(p_h + 2 * H * H, mask=m_h, other=0.0).to(tl.float32) * hv[None, :], 1
                )
                w_sc = tl.load(
                    n + small[:, None] * H + cols[None, :],
                    mask=is_x[:, None] & m_c[None, :],
                    other=0.0,
                ) + tl.load(
                    wy + row_y[:, None] * H + cols[None, :],
                    mask=is_y[:, None] & m_c[None, :],
                    other=0.0,
                )
                acc_small += tl.sum(w_sc * hv[None, :], axis=1)
        xv = tl.load(x_buf + (s % 2) * I + offs_i, mask=mask_i & (s > 0), other=0.0, volatile=True)

        # This program's small rows: y_{s-1} into the trajectory, x_s into the next state
        # (the given x_0 at s = 0, where there is no y).
        small_out = acc_small + tl.sum(f_small * xv[None, :], axis=1) + g_small
        out = traj_ptr + ((k64 * T + tl.maximum(s - 1, 0)) * B + b64) * O
        tl.store(out + row_y, small_out, mask=is_y & (s > 0))
        x_next = tl.where(s == 0, x0_rows, small_out)
        tl.store(x_buf + ((s + 1) % 2) * I + small, x_next, mask=is_x & (s < T))

        # GRU step s for this tile's rows (its result is dropped at s = T).
        gi_r = tl.where(s == 0, gi0_r, ga_r + tl.sum(c_r * xv[None, :], axis=1) + d_r)
        gi_u = tl.where(s == 0, gi0_u, ga_u + tl.sum(c_u * xv[None, :], axis=1) + d_u)
        gi_n = tl.where(s == 0, gi0_n, ga_n + tl.sum(c_n * xv[None, :], axis=1) + d_n)
        reset = tl.sigmoid(gi_r + gh_r + bh_r)
        update = tl.sigmoid(gi_u + gh_u + bh_u)
        pre_n = gi_n + reset * (gh_n + bh_n)
        # tanh(a) = 2 sigmoid(2a) - 1: stable for large |a|, no tl.tanh in every version.
        cand = 2.0 * tl.sigmoid(2.0 * pre_n) - 1.0
        h_own = (1.0 - update) * cand + update * h_own
        tl.store(h_buf + ((s + 1) % 2) * H + rows, h_own, mask=m_r & (s < T))
        if s < T:
            _arrive_and_wait(counter, (s + 1) * SPLIT, SPLIT, SYNC)

    _reduce_members(sync_ptr, traj_ptr, mean_ptr, var_ptr, K, B, T, O, SPLIT, BLOCK_R,
                    STATIC_BOUNDS, K_C, B_C, T_C, O_C)  # fmt: skip


def launch_folded(
    x0: torch.Tensor,
    h0: torch.Tensor,
    z0: torch.Tensor,
    weights,
    feedback,
    steps: int,
    tiling: FoldedTiling,
    h_buf: torch.Tensor,
    sync: torch.Tensor,
    traj: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    *,
    sync_code: int,
    num_warps: int,
    static: bool,
    in_kernel: bool = False,
) -> None:
    """Fold the weights and launch the folded kernel (inputs already checked by
    ``rollout.rssm_rollout``, outputs and workspace views allocated there).

    ``in_kernel``: each program folds its own tiles in the kernel's prologue (no torch ops
    before the launch) when the tiling keeps them resident; otherwise, and without it, the
    fold is :func:`fold_weights` before the launch."""
    K, B, H = h0.shape
    I, S, O = x0.shape[1], z0.shape[2], weights.w_head.shape[1]
    fold_in_kernel = in_kernel and tiling.resident
    if fold_in_kernel:
        # The kernel never reads the folded operands: any fp32 tensor stands in for them.
        folded = FoldedWeights(*([h0] * len(FoldedWeights._fields)))
    else:
        folded = fold_weights(weights, feedback)
    # x_{s} double buffers; no zeroing needed: iteration 0 writes the slot iteration 1 reads.
    x_buf = empty(K * B * 2 * I, dtype=torch.float32, device=h0.device)
    _rssm_rollout_folded_kernel[(K * B * tiling.programs,)](
        x0, h0, z0, weights.w_ih, weights.w_hh, weights.b_ih, weights.b_hh,
        *folded[:6], folded.wy, folded.by, feedback.skip,
        weights.w_prior, weights.b_prior, weights.w_head, weights.b_head,
        feedback.mix, feedback.feed, feedback.drift,
        traj, mean, var, h_buf, x_buf, sync,
        K, B, steps, H, I, S, O,
        SPLIT=tiling.programs,
        BLOCK_H=tiling.block_h,
        BLOCK_X=tiling.block_x,
        BLOCK_C=tiling.block_c,
        RESIDENT=tiling.resident,
        SYNC=sync_code,
        I_PAD=triton.next_power_of_2(I),
        S_PAD=triton.next_power_of_2(S),
        O_PAD=triton.next_power_of_2(O),
        BLOCK_R=FOLDED_BLOCK_R,
        STATIC_BOUNDS=static,
        K_C=K if static else 0,
        B_C=B if static else 0,
        T_C=steps if static else 0,
        H_C=H if static else 0,
        O_C=O if static else 0,
        FOLD_IN_KERNEL=fold_in_kernel,
        UNROLL=FOLD_UNROLL,
        I_C=I if static else 0,
        S_C=S if static else 0,
        num_warps=num_warps,
    )  # fmt: skip
