"""Fused factorized (divided) space-time attention, flash-attention style.

Reads q/k/v by strides straight from the qkv projection output ``[B, T, S, 3, H, dh]``
(usually a view of a ``[B, T, S, 3*H*dh]`` Linear output; any strides work) and writes
``[B, T, S, H*dh]`` directly: no permute / contiguous copies in forward or backward. The
gradient is returned in the qkv layout ``[B, T, S, 3, H, dh]`` (contiguous), so the
backward of the ``view`` onto the Linear output is free.

Both modes are the same kernel with a different stride mapping. Per (batch b, group g,
head h) the kernel sees one attention problem over a sequence of length L:

* ``temporal``: L = T (sequence over frames), g = slot s (G = S)
* ``spatial``:  L = S (sequence over slots),  g = frame t (G = T)

Forward: online softmax in fp32 (base-2 exponentials), saves the per-row logsumexp
(``lse [B*G*H, L]`` fp32, log2 domain). Backward: FlashAttention-2 recompute scheme, one
kernel for dK/dV (loop over query blocks) and one for dQ (loop over key blocks), no atomics.

Short sequences (L <= 64: temporal attention over T frames, spatial attention over the visible
slots) take another pair of kernels (``_short_*``): the whole sequence is one register tile, so
the forward is a plain softmax (no online rescaling) and the backward is **one** kernel per
problem: P is recomputed from the saved logsumexp, delta = rowsum(P * dP) is formed in registers
(equal to rowsum(dO * O), without reading O or a preprocess pass), and dQ, dK and dV are written
by the same program, without atomics. A program may loop over several heads of one (b, g)
(``HEADS_PER_PROG``), so the validity row is read once for all of them. The choice by length
is made in one place, :func:`_use_short`.

``valid [B, T, S]`` (optional, bool) has the reference semantics: invalid slots are not
keys, rows without any valid key output zeros, and outputs at invalid slots are zero (so
their incoming gradient is ignored).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mam2_fast.kernels._common import check_device, check_float, interpreting, launch, next_pow2
from mam2_fast.kernels._flash import (online_softmax_step, probs_and_score_grads, single_tile_backward,
                                      single_tile_forward)

_LOG2E = 1.4426950408889634
_SUPPORTED_DH_MAX = 256


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------
# Grid: one flat axis over (batch b, group g, head h, block), the block fastest (the programs of
# one problem run side by side and share its K/V in L2). B*G*H reaches 75k at ViT-B batch 32, past
# CUDA's 65535 on grid axes 1 and 2; axis 0 takes 2**31 - 1 (checked at launch, _common.launch).
@triton.jit
def _problem(NUM_BLOCKS, G, H):
    """This program's (block, problem, b, g, h); problem = (b * G + g) * H + h indexes lse rows."""
    pid = tl.program_id(0)  # over B * G * H * NUM_BLOCKS
    block = pid % NUM_BLOCKS
    problem = pid // NUM_BLOCKS
    h = problem % H
    bg = problem // H
    return block, problem, bg // G, bg % G, h


@triton.jit
def _attn_fwd_kernel(
    QKV, O, LSE, VALID,
    s_qb, s_qg, s_ql, s_q3, s_qh, s_qd,  # qkv strides mapped to (b, g, l, which, h, d)
    s_ob, s_og, s_ol, s_oh, s_od,        # out strides (b, g, l, h, d)
    s_vb, s_vg, s_vl,                    # valid strides (b, g, l)
    G, H, L, DH, qk_scale,               # qk_scale = softmax scale * log2(e)
    NUM_BLOCKS,                          # query blocks per problem: cdiv(L, BLOCK_M)
    HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, problem, b, g, h = _problem(NUM_BLOCKS, G, H)
    base = b.to(tl.int64) * s_qb + g.to(tl.int64) * s_qg + h.to(tl.int64) * s_qh
    q_ptr = QKV + base
    k_ptr = QKV + base + s_q3
    v_ptr = QKV + base + 2 * s_q3

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows   [M]
    offs_n = tl.arange(0, BLOCK_N)                    # key columns  [N]
    offs_d = tl.arange(0, BLOCK_D)                    # head dim     [D]
    m_in = offs_m < L
    d_in = offs_d < DH

    q = tl.load(q_ptr + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd,
                mask=m_in[:, None] & d_in[None, :], other=0.0)  # [M, D]

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: all-masked rows stay NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        n_in = cols < L
        if HAS_VALID:
            kv_ok = tl.load(VALID + b.to(tl.int64) * s_vb + g.to(tl.int64) * s_vg + cols * s_vl,
                            mask=n_in, other=0) != 0
            n_in = n_in & kv_ok
        kd_mask = n_in[:, None] & d_in[None, :]
        k = tl.load(k_ptr + cols[:, None] * s_ql + offs_d[None, :] * s_qd, mask=kd_mask, other=0.0)
        v = tl.load(v_ptr + cols[:, None] * s_ql + offs_d[None, :] * s_qd, mask=kd_mask, other=0.0)
        m_i, l_i, acc = online_softmax_step(q, k, v, n_in, m_i, l_i, acc, qk_scale, PRECISION)

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), 1.0e30)
    if HAS_VALID:
        q_ok = tl.load(VALID + b.to(tl.int64) * s_vb + g.to(tl.int64) * s_vg + offs_m * s_vl,
                       mask=m_in, other=0) != 0
        out = tl.where(q_ok[:, None], out, 0.0)
    o_base = O + b.to(tl.int64) * s_ob + g.to(tl.int64) * s_og + h.to(tl.int64) * s_oh
    tl.store(o_base + offs_m[:, None] * s_ol + offs_d[None, :] * s_od,
             out.to(O.dtype.element_ty), mask=m_in[:, None] & d_in[None, :])
    tl.store(LSE + problem.to(tl.int64) * L + offs_m, lse, mask=m_in)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA, VALID,
    s_ob, s_og, s_ol, s_oh, s_od,
    s_db, s_dg, s_dl, s_dh, s_dd,
    s_vb, s_vg, s_vl,
    G, H, L, DH, NUM_BLOCKS,
    HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[row] = sum_d dO[row, d] * O[row, d]  (rows of invalid queries -> 0)."""
    pid_m, problem, b, g, h = _problem(NUM_BLOCKS, G, H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < L
    md = m_in[:, None] & (offs_d < DH)[None, :]
    o = tl.load(O + b.to(tl.int64) * s_ob + g.to(tl.int64) * s_og + h.to(tl.int64) * s_oh
                + offs_m[:, None] * s_ol + offs_d[None, :] * s_od, mask=md, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * s_db + g.to(tl.int64) * s_dg + h.to(tl.int64) * s_dh
                 + offs_m[:, None] * s_dl + offs_d[None, :] * s_dd, mask=md, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if HAS_VALID:
        q_ok = tl.load(VALID + b.to(tl.int64) * s_vb + g.to(tl.int64) * s_vg + offs_m * s_vl,
                       mask=m_in, other=0) != 0
        delta = tl.where(q_ok, delta, 0.0)
    tl.store(DELTA + problem.to(tl.int64) * L + offs_m, delta, mask=m_in)


@triton.jit
def _attn_bwd_dkdv_kernel(
    QKV, DO, LSE, DELTA, VALID, DQKV,
    s_qb, s_qg, s_ql, s_q3, s_qh, s_qd,
    s_db, s_dg, s_dl, s_dh, s_dd,        # dO strides
    s_gb, s_gg, s_gl, s_g3, s_gh, s_gd,  # dqkv strides
    s_vb, s_vg, s_vl,
    G, H, L, DH, qk_scale, sm_scale, NUM_BLOCKS,
    HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n, problem, b, g, h = _problem(NUM_BLOCKS, G, H)
    base = b.to(tl.int64) * s_qb + g.to(tl.int64) * s_qg + h.to(tl.int64) * s_qh
    do_base = DO + b.to(tl.int64) * s_db + g.to(tl.int64) * s_dg + h.to(tl.int64) * s_dh
    v_base = VALID + b.to(tl.int64) * s_vb + g.to(tl.int64) * s_vg
    row_base = problem.to(tl.int64) * L

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < DH
    n_in = offs_n < L
    if HAS_VALID:
        n_in = n_in & (tl.load(v_base + offs_n * s_vl, mask=offs_n < L, other=0) != 0)
    nd = n_in[:, None] & d_in[None, :]
    k = tl.load(QKV + base + s_q3 + offs_n[:, None] * s_ql + offs_d[None, :] * s_qd, mask=nd, other=0.0)
    v = tl.load(QKV + base + 2 * s_q3 + offs_n[:, None] * s_ql + offs_d[None, :] * s_qd, mask=nd, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, L, BLOCK_M):
        rows = start_m + offs_m
        m_in = rows < L
        if HAS_VALID:
            m_in = m_in & (tl.load(v_base + rows * s_vl, mask=rows < L, other=0) != 0)
        md = m_in[:, None] & d_in[None, :]
        q = tl.load(QKV + base + rows[:, None] * s_ql + offs_d[None, :] * s_qd, mask=md, other=0.0)
        do = tl.load(do_base + rows[:, None] * s_dl + offs_d[None, :] * s_dd, mask=md, other=0.0)
        lse = tl.load(LSE + row_base + rows, mask=rows < L, other=1.0e30)
        delta = tl.load(DELTA + row_base + rows, mask=rows < L, other=0.0)
        p, ds = probs_and_score_grads(q, k, v, do, lse, delta, m_in, n_in, qk_scale, PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * sm_scale

    g_base = DQKV + b.to(tl.int64) * s_gb + g.to(tl.int64) * s_gg + h.to(tl.int64) * s_gh
    st_mask = (offs_n < L)[:, None] & d_in[None, :]  # invalid keys get explicit zeros
    tl.store(g_base + s_g3 + offs_n[:, None] * s_gl + offs_d[None, :] * s_gd,
             dk.to(DQKV.dtype.element_ty), mask=st_mask)
    tl.store(g_base + 2 * s_g3 + offs_n[:, None] * s_gl + offs_d[None, :] * s_gd,
             dv.to(DQKV.dtype.element_ty), mask=st_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    QKV, DO, LSE, DELTA, VALID, DQKV,
    s_qb, s_qg, s_ql, s_q3, s_qh, s_qd,
    s_db, s_dg, s_dl, s_dh, s_dd,
    s_gb, s_gg, s_gl, s_g3, s_gh, s_gd,
    s_vb, s_vg, s_vl,
    G, H, L, DH, qk_scale, sm_scale, NUM_BLOCKS,
    HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, problem, b, g, h = _problem(NUM_BLOCKS, G, H)
    base = b.to(tl.int64) * s_qb + g.to(tl.int64) * s_qg + h.to(tl.int64) * s_qh
    v_base = VALID + b.to(tl.int64) * s_vb + g.to(tl.int64) * s_vg
    row_base = problem.to(tl.int64) * L

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < DH
    m_in = offs_m < L
    if HAS_VALID:
        m_in = m_in & (tl.load(v_base + offs_m * s_vl, mask=offs_m < L, other=0) != 0)
    md = m_in[:, None] & d_in[None, :]
    q = tl.load(QKV + base + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd, mask=md, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * s_db + g.to(tl.int64) * s_dg + h.to(tl.int64) * s_dh
                 + offs_m[:, None] * s_dl + offs_d[None, :] * s_dd, mask=md, other=0.0)
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < L, other=1.0e30)
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < L, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        n_in = cols < L
        if HAS_VALID:
            n_in = n_in & (tl.load(v_base + cols * s_vl, mask=cols < L, other=0) != 0)
        nd = n_in[:, None] & d_in[None, :]
        k = tl.load(QKV + base + s_q3 + cols[:, None] * s_ql + offs_d[None, :] * s_qd, mask=nd, other=0.0)
        v = tl.load(QKV + base + 2 * s_q3 + cols[:, None] * s_ql + offs_d[None, :] * s_qd, mask=nd, other=0.0)
        _, ds = probs_and_score_grads(q, k, v, do, lse, delta, m_in, n_in, qk_scale, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * sm_scale
    g_base = DQKV + b.to(tl.int64) * s_gb + g.to(tl.int64) * s_gg + h.to(tl.int64) * s_gh
    tl.store(g_base + offs_m[:, None] * s_gl + offs_d[None, :] * s_gd,
             dq.to(DQKV.dtype.element_ty), mask=(offs_m < L)[:, None] & d_in[None, :])


# ----------------------------------------------------------------------------------------
# short sequences (L <= SHORT_L_MAX): one register tile per problem, single-pass backward
# ----------------------------------------------------------------------------------------
@triton.jit
def _short_problem(G, HEAD_GROUPS):
    """This program's (b, g, head group); grid = B * G * HEAD_GROUPS on axis 0."""
    pid = tl.program_id(0)
    hg = pid % HEAD_GROUPS
    bg = pid // HEAD_GROUPS
    return bg // G, bg % G, hg


@triton.jit
def _short_fwd_kernel(
    QKV, O, LSE, VALID,
    s_qb, s_qg, s_ql, s_q3, s_qh, s_qd,
    s_ob, s_og, s_ol, s_oh, s_od,
    s_vb, s_vg, s_vl,
    G, H, L, DH, qk_scale, HEAD_GROUPS,
    HAS_VALID: tl.constexpr, HEADS_PER_PROG: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    b, g, hg = _short_problem(G, HEAD_GROUPS)
    offs_l = tl.arange(0, BLOCK_L)          # positions, as queries (rows) and keys (columns) [L]
    offs_d = tl.arange(0, BLOCK_D)          # [D]
    l_in = offs_l < L
    d_in = offs_d < DH
    key_ok = l_in
    if HAS_VALID:
        key_ok = l_in & (tl.load(VALID + b.to(tl.int64) * s_vb + g.to(tl.int64) * s_vg + offs_l * s_vl,
                                 mask=l_in, other=0) != 0)
    qd_mask = l_in[:, None] & d_in[None, :]
    kd_mask = key_ok[:, None] & d_in[None, :]
    rows = offs_l[:, None] * s_ql + offs_d[None, :] * s_qd
    o_rows = offs_l[:, None] * s_ol + offs_d[None, :] * s_od
    q_bg = b.to(tl.int64) * s_qb + g.to(tl.int64) * s_qg
    o_bg = b.to(tl.int64) * s_ob + g.to(tl.int64) * s_og
    for i in range(0, HEADS_PER_PROG):
        h = hg * HEADS_PER_PROG + i
        base = QKV + q_bg + h.to(tl.int64) * s_qh
        q = tl.load(base + rows, mask=qd_mask, other=0.0)                 # [L, D]
        k = tl.load(base + s_q3 + rows, mask=kd_mask, other=0.0)          # [L, D]
        v = tl.load(base + 2 * s_q3 + rows, mask=kd_mask, other=0.0)      # [L, D]
        out, lse = single_tile_forward(q, k, v, key_ok, qk_scale, PRECISION)   # [L, D], [L]
        if HAS_VALID:
            out = tl.where(key_ok[:, None], out, 0.0)   # outputs at invalid slots are zero
        tl.store(O + o_bg + h.to(tl.int64) * s_oh + o_rows, out.to(O.dtype.element_ty), mask=qd_mask)
        tl.store(LSE + ((b * G + g) * H + h).to(tl.int64) * L + offs_l, lse, mask=l_in)


@triton.jit
def _short_bwd_kernel(
    QKV, DO, LSE, VALID, DQKV,
    s_qb, s_qg, s_ql, s_q3, s_qh, s_qd,
    s_db, s_dg, s_dl, s_dh, s_dd,
    s_gb, s_gg, s_gl, s_g3, s_gh, s_gd,
    s_vb, s_vg, s_vl,
    G, H, L, DH, qk_scale, sm_scale, HEAD_GROUPS,
    HAS_VALID: tl.constexpr, HEADS_PER_PROG: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    b, g, hg = _short_problem(G, HEAD_GROUPS)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    l_in = offs_l < L
    d_in = offs_d < DH
    ok = l_in                                  # valid slots: queries kept and keys attended
    if HAS_VALID:
        ok = l_in & (tl.load(VALID + b.to(tl.int64) * s_vb + g.to(tl.int64) * s_vg + offs_l * s_vl,
                             mask=l_in, other=0) != 0)
    ok_mask = ok[:, None] & d_in[None, :]
    pair_ok = ok[:, None] & ok[None, :]        # [L, L] (query, key)
    rows = offs_l[:, None] * s_ql + offs_d[None, :] * s_qd
    do_rows = offs_l[:, None] * s_dl + offs_d[None, :] * s_dd
    g_rows = offs_l[:, None] * s_gl + offs_d[None, :] * s_gd
    st_mask = l_in[:, None] & d_in[None, :]    # invalid slots get explicit zeros
    q_bg = b.to(tl.int64) * s_qb + g.to(tl.int64) * s_qg
    do_bg = b.to(tl.int64) * s_db + g.to(tl.int64) * s_dg
    g_bg = b.to(tl.int64) * s_gb + g.to(tl.int64) * s_gg
    for i in range(0, HEADS_PER_PROG):
        h = hg * HEADS_PER_PROG + i
        base = QKV + q_bg + h.to(tl.int64) * s_qh
        q = tl.load(base + rows, mask=ok_mask, other=0.0)                  # [L, D]
        k = tl.load(base + s_q3 + rows, mask=ok_mask, other=0.0)
        v = tl.load(base + 2 * s_q3 + rows, mask=ok_mask, other=0.0)
        do = tl.load(DO + do_bg + h.to(tl.int64) * s_dh + do_rows, mask=ok_mask, other=0.0)
        lse = tl.load(LSE + ((b * G + g) * H + h).to(tl.int64) * L + offs_l, mask=l_in, other=1.0e30)
        dq, dk, dv = single_tile_backward(q, k, v, do, lse, pair_ok, qk_scale, sm_scale, PRECISION)
        gb = DQKV + g_bg + h.to(tl.int64) * s_gh + g_rows
        tl.store(gb, dq.to(DQKV.dtype.element_ty), mask=st_mask)
        tl.store(gb + s_g3, dk.to(DQKV.dtype.element_ty), mask=st_mask)
        tl.store(gb + 2 * s_g3, dv.to(DQKV.dtype.element_ty), mask=st_mask)


# ----------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------
def _map6(strides, mode: str):
    """[B, T, S, 3, H, dh] strides -> (b, g, l, which, h, d) for the mode."""
    sb, st, ss, s3, sh, sd = strides
    return (sb, ss, st, s3, sh, sd) if mode == "temporal" else (sb, st, ss, s3, sh, sd)


def _map5(strides, mode: str):
    """[B, T, S, H, dh] strides -> (b, g, l, h, d)."""
    sb, st, ss, sh, sd = strides
    return (sb, ss, st, sh, sd) if mode == "temporal" else (sb, st, ss, sh, sd)


def _map3(valid: Optional[Tensor], mode: str):
    if valid is None:
        return (0, 0, 0)
    sb, st, ss = valid.stride()
    return (sb, ss, st) if mode == "temporal" else (sb, st, ss)


def _dims(qkv: Tensor, mode: str):
    B, T, S, _, H, dh = qkv.shape
    G, L = (S, T) if mode == "temporal" else (T, S)
    return B, T, S, H, dh, G, L


def _blocks(L: int, dh: int, dtype: Optional[torch.dtype] = None):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for sequences of length ``L``, head dim ``dh``.

    Register budget, from ptxas on sm_80 and sm_90 (``python -m mam2_fast.kernels.compile_check
    --arch 80|90 --table``): 64 x 64 tiles at 4 warps reach 255 registers per thread and spill
    (varlen forward on sm_80, dK/dV backward on both) -> 8 warps; at dh 128 even 8 warps
    spill in dK/dV and fp32 64 x 64 tiles need 180 KB of shared memory (A100: 163 KB) ->
    32 x 32 tiles."""
    block_d = max(16, next_pow2(dh))
    if interpreting():
        blk = 16 if L <= 16 else 32
        return blk, blk, block_d, 1
    # short sequences (temporal, T<=32): one block covers the sequence
    if L <= 32:
        blk = max(16, next_pow2(L))
        return blk, blk, block_d, 4
    if block_d >= 128:
        return 32, 32, block_d, 4
    return 64, 64, block_d, 8


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (the reference / test path); half types use tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def _shape(qkv: Tensor, valid: Optional[Tensor]) -> str:
    return f"qkv [B, T, S, 3, H, dh] = {list(qkv.shape)} {qkv.dtype}, valid: {valid is not None}"


def _valid_arg(valid: Optional[Tensor], like: Tensor) -> Tensor:
    if valid is None:
        return like  # dummy pointer, never read (HAS_VALID=False)
    return valid.view(torch.uint8) if valid.dtype == torch.bool else valid


SHORT_L_MAX = 64   # sequences up to this length take the single-tile kernels (_short_*)


def _use_short(L: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """The one place the kernel family is chosen: single-tile kernels with a single-pass
    backward for L <= SHORT_L_MAX in bf16 / fp16, the flash-attention tiling otherwise.
    fp32 stays on the flash kernels on a GPU: a whole 64-long sequence in fp32 with exact
    (``ieee``) products spills hundreds of bytes per thread on sm_90 (compile_check); under the
    interpreter fp32 takes the short kernels too, so the CPU parity tests cover their logic.
    ``MAM2_ATTN_SHORT=0`` turns them off (benchmarks)."""
    if L > SHORT_L_MAX or os.environ.get("MAM2_ATTN_SHORT", "1") == "0":
        return False
    return dtype in (torch.bfloat16, torch.float16) or interpreting()


def _short_config(BG: int, H: int, L: int, dh: int):
    """(heads per program, BLOCK_L, BLOCK_D, num_warps) of the short kernels. One program per
    (b, g, h) unless there are so many (b, g) pairs that looping over all heads still leaves
    thousands of programs (then the validity row and the program start are paid once per
    (b, g)); ``MAM2_ATTN_HEADS_PER_PROG`` = 1, H or ``all`` forces it (benchmarks)."""
    block_l = max(16, next_pow2(L))
    block_d = max(16, next_pow2(dh))
    forced = os.environ.get("MAM2_ATTN_HEADS_PER_PROG", "")
    if forced == "all" or forced == str(H):
        hpp = H
    elif forced == "1":
        hpp = 1
    else:
        # H200, ViT-B (12 heads), forward: at 4704 (b, g) pairs (temporal, B 32, 147 slots) the
        # all-heads loop took 0.146 ms against 0.290 one head per program; at 3136 (B 64, 49
        # slots) and below one head per program was faster (0.108 vs 0.139 ms)
        hpp = H if BG >= 4096 else 1
    if interpreting():
        return hpp, block_l, block_d, 1
    # ptxas on sm_90 (compile_check), bf16: 16-long tiles at 4 warps spill 4-12 B/thread at
    # dh 64, at 2 warps none (66-96 registers); 64 x 64 tiles at 8 warps 80-135 registers
    warps = 2 if block_l <= 16 else (8 if block_l * block_d >= 64 * 64 else 4)
    return hpp, block_l, block_d, warps


def _short_fwd(qkv: Tensor, valid: Optional[Tensor], mode: str, scale: float, out: Tensor, lse: Tensor) -> None:
    B, T, S, H, dh, G, L = _dims(qkv, mode)
    o5 = out.view(B, T, S, H, dh)
    hpp, BL, BD, warps = _short_config(B * G, H, L, dh)
    groups = H // hpp
    launch(_short_fwd_kernel, (B * G * groups,),
           qkv, o5, lse, _valid_arg(valid, qkv),
           *_map6(qkv.stride(), mode), *_map5(o5.stride(), mode), *_map3(valid, mode),
           G, H, L, dh, scale * _LOG2E, groups,
           HAS_VALID=valid is not None, HEADS_PER_PROG=hpp, BLOCK_L=BL, BLOCK_D=BD,
           PRECISION=_precision(qkv.dtype), num_warps=warps,
           op=f"factorized_attention[{mode}] forward (short)", shape=_shape(qkv, valid))


def _short_bwd(do5: Tensor, qkv: Tensor, lse: Tensor, valid: Optional[Tensor], mode: str, scale: float,
               dqkv: Tensor) -> None:
    B, T, S, H, dh, G, L = _dims(qkv, mode)
    hpp, BL, BD, warps = _short_config(B * G, H, L, dh)
    groups = H // hpp
    launch(_short_bwd_kernel, (B * G * groups,),
           qkv, do5, lse, _valid_arg(valid, qkv), dqkv,
           *_map6(qkv.stride(), mode), *_map5(do5.stride(), mode), *_map6(dqkv.stride(), mode),
           *_map3(valid, mode), G, H, L, dh, scale * _LOG2E, scale, groups,
           HAS_VALID=valid is not None, HEADS_PER_PROG=hpp, BLOCK_L=BL, BLOCK_D=BD,
           PRECISION=_precision(qkv.dtype), num_warps=warps,
           op=f"factorized_attention[{mode}] backward (short)", shape=_shape(qkv, valid))


def _fwd(qkv: Tensor, valid: Optional[Tensor], mode: str, scale: float) -> Tuple[Tensor, Tensor]:
    B, T, S, H, dh, G, L = _dims(qkv, mode)
    out = torch.empty(B, T, S, H * dh, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(B * G * H, L, device=qkv.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    if _use_short(L, qkv.dtype):
        _short_fwd(qkv, valid, mode, scale, out, lse)
        return out, lse
    o5 = out.view(B, T, S, H, dh)
    BM, BN, BD, warps = _blocks(L, dh, qkv.dtype)
    m_blocks = triton.cdiv(L, BM)
    launch(_attn_fwd_kernel, (B * G * H * m_blocks,),
           qkv, o5, lse, _valid_arg(valid, qkv),
           *_map6(qkv.stride(), mode), *_map5(o5.stride(), mode), *_map3(valid, mode),
           G, H, L, dh, scale * _LOG2E, m_blocks,
           HAS_VALID=valid is not None, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
           PRECISION=_precision(qkv.dtype), num_warps=warps,
           op=f"factorized_attention[{mode}] forward", shape=_shape(qkv, valid))
    return out, lse


def _bwd(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, valid: Optional[Tensor],
         mode: str, scale: float) -> Tensor:
    B, T, S, H, dh, G, L = _dims(qkv, mode)
    dqkv = torch.empty(B, T, S, 3, H, dh, device=qkv.device, dtype=qkv.dtype)
    if dqkv.numel() == 0:
        return dqkv
    if grad_out.dtype != qkv.dtype:
        grad_out = grad_out.to(qkv.dtype)
    do5 = grad_out.view(B, T, S, H, dh) if grad_out.stride(-1) == 1 else \
        grad_out.as_strided((B, T, S, H, dh), (*grad_out.stride()[:3], dh * grad_out.stride(3),
                                               grad_out.stride(3)))
    if _use_short(L, qkv.dtype):
        _short_bwd(do5, qkv, lse, valid, mode, scale, dqkv)
        return dqkv
    o5 = out.view(B, T, S, H, dh)
    delta = torch.empty_like(lse)
    BM, BN, BD, warps = _blocks(L, dh, qkv.dtype)
    va = _valid_arg(valid, qkv)
    vs = _map3(valid, mode)
    has_valid = valid is not None
    qs, ds, gs = _map6(qkv.stride(), mode), _map5(do5.stride(), mode), _map6(dqkv.stride(), mode)
    m_blocks, n_blocks = triton.cdiv(L, BM), triton.cdiv(L, BN)  # query / key blocks per problem
    where = dict(op=f"factorized_attention[{mode}] backward", shape=_shape(qkv, valid))
    launch(_attn_bwd_preprocess, (B * G * H * m_blocks,),
           o5, do5, delta, va, *_map5(o5.stride(), mode), *ds, *vs, G, H, L, dh, m_blocks,
           HAS_VALID=has_valid, BLOCK_M=BM, BLOCK_D=BD, num_warps=warps, **where)
    common = dict(HAS_VALID=has_valid, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                  PRECISION=_precision(qkv.dtype), num_warps=warps, **where)
    # dK/dV: query blocks half the key block, one stage (64 x 64 spilled 20 B/thread on sm_90
    # under Triton 3.6; compile_check); the interpreter runs it too (16 x 32), so parity covers it
    dkdv = dict(common, BLOCK_M=BN // 2 if BN >= 32 else BM, num_stages=1)
    launch(_attn_bwd_dkdv_kernel, (B * G * H * n_blocks,),
           qkv, do5, lse, delta, va, dqkv, *qs, *ds, *gs, *vs, G, H, L, dh,
           scale * _LOG2E, scale, n_blocks, **dkdv)
    launch(_attn_bwd_dq_kernel, (B * G * H * m_blocks,),
           qkv, do5, lse, delta, va, dqkv, *qs, *ds, *gs, *vs, G, H, L, dh,
           scale * _LOG2E, scale, m_blocks, **common)
    return dqkv


# ----------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile: no graph break, no tracing of Triton)
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("mam2_fast::factorized_attention_fwd", mutates_args=())
def _fwd_op(qkv: Tensor, valid: Optional[Tensor], mode: str, scale: float) -> Tuple[Tensor, Tensor]:
    return _fwd(qkv, valid, mode, scale)


@_fwd_op.register_fake
def _fwd_fake(qkv, valid, mode, scale):
    B, T, S, H, dh, G, L = _dims(qkv, mode)
    return (qkv.new_empty(B, T, S, H * dh),
            qkv.new_empty(B * G * H, L, dtype=torch.float32))


@torch.library.custom_op("mam2_fast::factorized_attention_bwd", mutates_args=())
def _bwd_op(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, valid: Optional[Tensor],
            mode: str, scale: float) -> Tensor:
    return _bwd(grad_out, qkv, out, lse, valid, mode, scale)


@_bwd_op.register_fake
def _bwd_fake(grad_out, qkv, out, lse, valid, mode, scale):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, valid, mode, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, valid)
    ctx.mode, ctx.scale = mode, scale


def _backward(ctx, grad_out, grad_lse):
    qkv, out, lse, valid = ctx.saved_tensors
    return _bwd_op(grad_out, qkv, out, lse, valid, ctx.mode, ctx.scale), None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------
def factorized_attention_fused(qkv: Tensor, mode: str, valid: Optional[Tensor] = None,
                               scale: Optional[float] = None) -> Tensor:
    """Fused equivalent of :func:`reference.factorized_attention_ref`.

    qkv ``[B, T, S, 3, H, dh]`` (any strides), valid ``[B, T, S]`` bool or None
    -> ``[B, T, S, H*dh]`` contiguous, same dtype as qkv.
    """
    name = "factorized_attention"
    if qkv.dim() != 6 or qkv.shape[3] != 3:
        raise ValueError(f"{name}: qkv must be [B, T, S, 3, H, dh], got {tuple(qkv.shape)}")
    if mode not in ("temporal", "spatial"):
        raise ValueError(f"{name}: mode must be 'temporal' or 'spatial', got {mode!r}")
    check_float(name, "qkv", qkv)
    dh = qkv.shape[-1]
    if dh > _SUPPORTED_DH_MAX:
        raise ValueError(f"{name}: head dim {dh} > {_SUPPORTED_DH_MAX} is not supported")
    if valid is not None:
        if valid.shape != qkv.shape[:3]:
            raise ValueError(f"{name}: valid must be [B, T, S] = {tuple(qkv.shape[:3])}, "
                             f"got {tuple(valid.shape)}")
        if valid.dtype != torch.bool:
            raise TypeError(f"{name}: valid must be bool, got {valid.dtype}")
        if valid.device != qkv.device:
            raise ValueError(f"{name}: valid is on {valid.device}, qkv on {qkv.device}")
    check_device(name, qkv)
    scale = float(dh ** -0.5 if scale is None else scale)
    out, _ = _fwd_op(qkv, valid, mode, scale)
    return out
