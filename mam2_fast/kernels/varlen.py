"""Fused attention over packed variable-length token sets (random / cube / frame masking).

With masks whose visible sets differ per frame or per sample, padding every set to the full
grid wastes ``1 / (1 - ratio)`` of the attention work (4x at ratio 0.75). Here the visible
tokens of a batch are packed into one ``[Ntok, 3, H, dh]`` qkv tensor (any strides: usually a
view of the ``[Ntok, 3*H*dh]`` Linear output) and each attention problem is one segment:

* ``cu_seqlens [G+1]`` int32: segment g is sequence positions ``cu[g] .. cu[g+1]-1``;
* ``index [Ntok]`` (optional, int32/int64): sequence position p reads and writes packed row
  ``index[p]``; without it, position p is row p.

For tokens packed in (b, t, s) order, spatial attention is ``index=None`` with one segment per
(b, t); temporal attention reuses the same packed tensor with ``index`` = the rows sorted by
(b, s, t) and one segment per (b, s) -- no copies, only a permutation read by the kernel.
``index`` must be a permutation and ``cu_seqlens[-1] == Ntok`` (every row in exactly one
segment; not checked on the device). ``max_seqlen`` (host int) bounds the grid, as in
flash-attn's varlen API.

Forward: online softmax (fp32, base 2) per (query block, segment, head), saves the logsumexp
per (head, position). Backward: FlashAttention-2 recompute, a dK/dV kernel and a dQ kernel,
no atomics. Segments of at most ``attention.SHORT_L_MAX`` tokens (``max_seqlen``; the choice is
``attention._use_short``, shared with the grid kernels) take single-tile kernels instead: one
program per segment (and head, or looping over all heads), a plain softmax forward and a
single-pass backward (delta = rowsum(P * dP) in registers; dQ, dK, dV from one program).
Empty segments are allowed. The reference is
:func:`mam2_fast.kernels.reference.varlen_attention_ref`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mam2_fast.kernels._common import check_device, check_float, launch
from mam2_fast.kernels._flash import (online_softmax_step, probs_and_score_grads, single_tile_backward,
                                      single_tile_forward)
from mam2_fast.kernels.attention import (  # same tiling rules, same choice of kernel family
    _LOG2E, _SUPPORTED_DH_MAX, _blocks, _precision, _short_config, _use_short)


# Grid: one flat axis over (segment g, head h, block), the block fastest; G*H (segments times
# heads) passes CUDA's 65535 on grid axes 1 and 2 at ViT-B batch 28 with random masks, axis 0
# takes 2**31 - 1 (checked at launch, _common.launch).
@triton.jit
def _problem(NUM_BLOCKS, H):
    """This program's (block, segment g, head h)."""
    pid = tl.program_id(0)  # over G * H * NUM_BLOCKS
    block = pid % NUM_BLOCKS
    problem = pid // NUM_BLOCKS
    return block, problem // H, problem % H


@triton.jit
def _rows(INDEX, pos, ok, HAS_INDEX: tl.constexpr):
    """Packed row of each sequence position (int64)."""
    if HAS_INDEX:
        return tl.load(INDEX + pos, mask=ok, other=0).to(tl.int64)
    return pos.to(tl.int64)


@triton.jit
def _varlen_fwd_kernel(
    QKV, O, LSE, CU, INDEX,
    s_qr, s_q3, s_qh, s_qd,      # qkv strides (row, which, head, dim)
    s_or, s_oh, s_od,            # out strides (row, head, dim)
    NTOK, H, DH, qk_scale,       # qk_scale = softmax scale * log2(e)
    NUM_BLOCKS,                  # query blocks per (segment, head): cdiv(max_seqlen, BLOCK_M)
    HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, g, h = _problem(NUM_BLOCKS, H)
    start = tl.load(CU + g)
    L = tl.load(CU + g + 1) - start
    if pid_m * BLOCK_M < L:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_in = offs_m < L
        d_in = offs_d < DH
        q_rows = _rows(INDEX, start + offs_m, m_in, HAS_INDEX)
        head = h.to(tl.int64) * s_qh
        q = tl.load(QKV + head + q_rows[:, None] * s_qr + offs_d[None, :] * s_qd,
                    mask=m_in[:, None] & d_in[None, :], other=0.0)  # [M, D]
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, L, BLOCK_N):
            cols = start_n + offs_n
            n_in = cols < L
            k_rows = _rows(INDEX, start + cols, n_in, HAS_INDEX)
            kd = n_in[:, None] & d_in[None, :]
            k = tl.load(QKV + head + s_q3 + k_rows[:, None] * s_qr + offs_d[None, :] * s_qd, mask=kd, other=0.0)
            v = tl.load(QKV + head + 2 * s_q3 + k_rows[:, None] * s_qr + offs_d[None, :] * s_qd, mask=kd, other=0.0)
            m_i, l_i, acc = online_softmax_step(q, k, v, n_in, m_i, l_i, acc, qk_scale, PRECISION)
        out = acc / l_i[:, None]  # every valid query has at least itself as key
        tl.store(O + h.to(tl.int64) * s_oh + q_rows[:, None] * s_or + offs_d[None, :] * s_od,
                 out.to(O.dtype.element_ty), mask=m_in[:, None] & d_in[None, :])
        tl.store(LSE + h.to(tl.int64) * NTOK + start + offs_m, m_i + tl.log2(l_i), mask=m_in)


@triton.jit
def _varlen_bwd_preprocess(
    O, DO, DELTA, CU, INDEX,
    s_or, s_oh, s_od, s_dr, s_dh, s_dd,
    NTOK, H, DH, NUM_BLOCKS,
    HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[h, pos] = sum_d dO[row, h, d] * O[row, h, d]."""
    pid_m, g, h = _problem(NUM_BLOCKS, H)
    start = tl.load(CU + g)
    L = tl.load(CU + g + 1) - start
    if pid_m * BLOCK_M < L:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_in = offs_m < L
        md = m_in[:, None] & (offs_d < DH)[None, :]
        rows = _rows(INDEX, start + offs_m, m_in, HAS_INDEX)
        o = tl.load(O + h.to(tl.int64) * s_oh + rows[:, None] * s_or + offs_d[None, :] * s_od, mask=md, other=0.0)
        do = tl.load(DO + h.to(tl.int64) * s_dh + rows[:, None] * s_dr + offs_d[None, :] * s_dd, mask=md, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + h.to(tl.int64) * NTOK + start + offs_m, delta, mask=m_in)


@triton.jit
def _varlen_bwd_dkdv_kernel(
    QKV, DO, LSE, DELTA, CU, INDEX, DQKV,
    s_qr, s_q3, s_qh, s_qd,
    s_dr, s_dh, s_dd,
    s_gr, s_g3, s_gh, s_gd,
    NTOK, H, DH, qk_scale, sm_scale, NUM_BLOCKS,
    HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n, g, h = _problem(NUM_BLOCKS, H)
    start = tl.load(CU + g)
    L = tl.load(CU + g + 1) - start
    if pid_n * BLOCK_N < L:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_in = offs_d < DH
        n_in = offs_n < L
        nd = n_in[:, None] & d_in[None, :]
        head = h.to(tl.int64) * s_qh
        k_rows = _rows(INDEX, start + offs_n, n_in, HAS_INDEX)
        k = tl.load(QKV + head + s_q3 + k_rows[:, None] * s_qr + offs_d[None, :] * s_qd, mask=nd, other=0.0)
        v = tl.load(QKV + head + 2 * s_q3 + k_rows[:, None] * s_qr + offs_d[None, :] * s_qd, mask=nd, other=0.0)
        stat = h.to(tl.int64) * NTOK + start
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start_m in range(0, L, BLOCK_M):
            pos = start_m + offs_m
            m_in = pos < L
            md = m_in[:, None] & d_in[None, :]
            q_rows = _rows(INDEX, start + pos, m_in, HAS_INDEX)
            q = tl.load(QKV + head + q_rows[:, None] * s_qr + offs_d[None, :] * s_qd, mask=md, other=0.0)
            do = tl.load(DO + h.to(tl.int64) * s_dh + q_rows[:, None] * s_dr + offs_d[None, :] * s_dd,
                         mask=md, other=0.0)
            lse = tl.load(LSE + stat + pos, mask=m_in, other=1.0e30)
            delta = tl.load(DELTA + stat + pos, mask=m_in, other=0.0)
            p, ds = probs_and_score_grads(q, k, v, do, lse, delta, m_in, n_in, qk_scale, PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dk = dk * sm_scale
        g_head = DQKV + h.to(tl.int64) * s_gh
        tl.store(g_head + s_g3 + k_rows[:, None] * s_gr + offs_d[None, :] * s_gd,
                 dk.to(DQKV.dtype.element_ty), mask=nd)
        tl.store(g_head + 2 * s_g3 + k_rows[:, None] * s_gr + offs_d[None, :] * s_gd,
                 dv.to(DQKV.dtype.element_ty), mask=nd)


@triton.jit
def _varlen_bwd_dq_kernel(
    QKV, DO, LSE, DELTA, CU, INDEX, DQKV,
    s_qr, s_q3, s_qh, s_qd,
    s_dr, s_dh, s_dd,
    s_gr, s_g3, s_gh, s_gd,
    NTOK, H, DH, qk_scale, sm_scale, NUM_BLOCKS,
    HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, g, h = _problem(NUM_BLOCKS, H)
    start = tl.load(CU + g)
    L = tl.load(CU + g + 1) - start
    if pid_m * BLOCK_M < L:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_in = offs_d < DH
        m_in = offs_m < L
        md = m_in[:, None] & d_in[None, :]
        head = h.to(tl.int64) * s_qh
        q_rows = _rows(INDEX, start + offs_m, m_in, HAS_INDEX)
        q = tl.load(QKV + head + q_rows[:, None] * s_qr + offs_d[None, :] * s_qd, mask=md, other=0.0)
        do = tl.load(DO + h.to(tl.int64) * s_dh + q_rows[:, None] * s_dr + offs_d[None, :] * s_dd,
                     mask=md, other=0.0)
        stat = h.to(tl.int64) * NTOK + start
        lse = tl.load(LSE + stat + offs_m, mask=m_in, other=1.0e30)
        delta = tl.load(DELTA + stat + offs_m, mask=m_in, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, L, BLOCK_N):
            cols = start_n + offs_n
            n_in = cols < L
            nd = n_in[:, None] & d_in[None, :]
            k_rows = _rows(INDEX, start + cols, n_in, HAS_INDEX)
            k = tl.load(QKV + head + s_q3 + k_rows[:, None] * s_qr + offs_d[None, :] * s_qd, mask=nd, other=0.0)
            v = tl.load(QKV + head + 2 * s_q3 + k_rows[:, None] * s_qr + offs_d[None, :] * s_qd, mask=nd, other=0.0)
            _, ds = probs_and_score_grads(q, k, v, do, lse, delta, m_in, n_in, qk_scale, PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dq = dq * sm_scale
        tl.store(DQKV + h.to(tl.int64) * s_gh + q_rows[:, None] * s_gr + offs_d[None, :] * s_gd,
                 dq.to(DQKV.dtype.element_ty), mask=md)


# ----------------------------------------------------------------------------------------
# short segments (max_seqlen <= attention.SHORT_L_MAX): one register tile per segment
# ----------------------------------------------------------------------------------------
@triton.jit
def _short_segment(CU, INDEX, HEAD_GROUPS, HAS_INDEX: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's segment for the single-tile kernels: (head group, first position, length,
    in-segment mask [L], packed rows [L] int64); grid = G * HEAD_GROUPS on axis 0."""
    pid = tl.program_id(0)
    g = pid // HEAD_GROUPS
    start = tl.load(CU + g)
    L = tl.load(CU + g + 1) - start
    offs_l = tl.arange(0, BLOCK_L)
    l_in = offs_l < L
    return pid % HEAD_GROUPS, start, L, l_in, _rows(INDEX, start + offs_l, l_in, HAS_INDEX)


@triton.jit
def _varlen_short_fwd_kernel(
    QKV, O, LSE, CU, INDEX,
    s_qr, s_q3, s_qh, s_qd,
    s_or, s_oh, s_od,
    NTOK, H, DH, qk_scale, HEAD_GROUPS,
    HAS_INDEX: tl.constexpr, HEADS_PER_PROG: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    hg, start, L, l_in, rows = _short_segment(CU, INDEX, HEAD_GROUPS, HAS_INDEX, BLOCK_L)   # rows [L]
    if L > 0:
        offs_l = tl.arange(0, BLOCK_L)
        offs_d = tl.arange(0, BLOCK_D)
        ld_mask = l_in[:, None] & (offs_d < DH)[None, :]
        q_off = rows[:, None] * s_qr + offs_d[None, :] * s_qd
        o_off = rows[:, None] * s_or + offs_d[None, :] * s_od
        for i in range(0, HEADS_PER_PROG):
            h = (hg * HEADS_PER_PROG + i).to(tl.int64)
            base = QKV + h * s_qh
            q = tl.load(base + q_off, mask=ld_mask, other=0.0)                  # [L, D]
            k = tl.load(base + s_q3 + q_off, mask=ld_mask, other=0.0)
            v = tl.load(base + 2 * s_q3 + q_off, mask=ld_mask, other=0.0)
            out, lse = single_tile_forward(q, k, v, l_in, qk_scale, PRECISION)   # [L, D], [L]
            tl.store(O + h * s_oh + o_off, out.to(O.dtype.element_ty), mask=ld_mask)
            tl.store(LSE + h * NTOK + start + offs_l, lse, mask=l_in)


@triton.jit
def _varlen_short_bwd_kernel(
    QKV, DO, LSE, CU, INDEX, DQKV,
    s_qr, s_q3, s_qh, s_qd,
    s_dr, s_dh, s_dd,
    s_gr, s_g3, s_gh, s_gd,
    NTOK, H, DH, qk_scale, sm_scale, HEAD_GROUPS,
    HAS_INDEX: tl.constexpr, HEADS_PER_PROG: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    hg, start, L, l_in, rows = _short_segment(CU, INDEX, HEAD_GROUPS, HAS_INDEX, BLOCK_L)   # rows [L]
    if L > 0:
        offs_l = tl.arange(0, BLOCK_L)
        offs_d = tl.arange(0, BLOCK_D)
        ld_mask = l_in[:, None] & (offs_d < DH)[None, :]
        pair_ok = l_in[:, None] & l_in[None, :]
        q_off = rows[:, None] * s_qr + offs_d[None, :] * s_qd
        do_off = rows[:, None] * s_dr + offs_d[None, :] * s_dd
        g_off = rows[:, None] * s_gr + offs_d[None, :] * s_gd
        for i in range(0, HEADS_PER_PROG):
            h = (hg * HEADS_PER_PROG + i).to(tl.int64)
            base = QKV + h * s_qh
            q = tl.load(base + q_off, mask=ld_mask, other=0.0)                  # [L, D]
            k = tl.load(base + s_q3 + q_off, mask=ld_mask, other=0.0)
            v = tl.load(base + 2 * s_q3 + q_off, mask=ld_mask, other=0.0)
            do = tl.load(DO + h * s_dh + do_off, mask=ld_mask, other=0.0)
            lse = tl.load(LSE + h * NTOK + start + offs_l, mask=l_in, other=1.0e30)
            dq, dk, dv = single_tile_backward(q, k, v, do, lse, pair_ok, qk_scale, sm_scale, PRECISION)
            gb = DQKV + h * s_gh + g_off
            tl.store(gb, dq.to(DQKV.dtype.element_ty), mask=ld_mask)
            tl.store(gb + s_g3, dk.to(DQKV.dtype.element_ty), mask=ld_mask)
            tl.store(gb + 2 * s_g3, dv.to(DQKV.dtype.element_ty), mask=ld_mask)


# ----------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------
def _shape(qkv: Tensor, segments: int, max_seqlen: int, index: Optional[Tensor]) -> str:
    return (f"qkv [Ntok, 3, H, dh] = {list(qkv.shape)} {qkv.dtype}, {segments} segments, "
            f"max_seqlen {max_seqlen}, index: {index is not None}")


def _index_arg(index: Optional[Tensor], cu: Tensor) -> Tensor:
    return cu if index is None else index  # dummy pointer when HAS_INDEX=False


def _fwd(qkv: Tensor, cu: Tensor, index: Optional[Tensor], max_seqlen: int, scale: float) -> Tuple[Tensor, Tensor]:
    ntok, _, H, dh = qkv.shape
    G = cu.numel() - 1
    out = torch.empty(ntok, H * dh, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(H, ntok, device=qkv.device, dtype=torch.float32)
    if out.numel() == 0 or G == 0 or max_seqlen == 0:
        return out, lse
    o3 = out.view(ntok, H, dh)
    if _use_short(max_seqlen, qkv.dtype):
        hpp, BL, BD, warps = _short_config(G, H, max_seqlen, dh)
        launch(_varlen_short_fwd_kernel, (G * (H // hpp),),
               qkv, o3, lse, cu, _index_arg(index, cu), *qkv.stride(), *o3.stride(),
               ntok, H, dh, scale * _LOG2E, H // hpp,
               HAS_INDEX=index is not None, HEADS_PER_PROG=hpp, BLOCK_L=BL, BLOCK_D=BD,
               PRECISION=_precision(qkv.dtype), num_warps=warps,
               op="varlen_attention forward (short)", shape=_shape(qkv, G, max_seqlen, index))
        return out, lse
    BM, BN, BD, warps = _blocks(max_seqlen, dh, qkv.dtype)
    m_blocks = triton.cdiv(max_seqlen, BM)
    launch(_varlen_fwd_kernel, (G * H * m_blocks,),
           qkv, o3, lse, cu, _index_arg(index, cu), *qkv.stride(), *o3.stride(),
           ntok, H, dh, scale * _LOG2E, m_blocks,
           HAS_INDEX=index is not None, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
           PRECISION=_precision(qkv.dtype), num_warps=warps,
           op="varlen_attention forward", shape=_shape(qkv, G, max_seqlen, index))
    return out, lse


def _bwd(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, cu: Tensor, index: Optional[Tensor],
         max_seqlen: int, scale: float) -> Tensor:
    ntok, _, H, dh = qkv.shape
    G = cu.numel() - 1
    dqkv = torch.empty(ntok, 3, H, dh, device=qkv.device, dtype=qkv.dtype)
    if dqkv.numel() == 0 or G == 0 or max_seqlen == 0:
        return dqkv.zero_()
    grad_out = grad_out.to(qkv.dtype)
    do3 = grad_out.view(ntok, H, dh) if grad_out.stride(-1) == 1 else grad_out.contiguous().view(ntok, H, dh)
    ia, has_index = _index_arg(index, cu), index is not None
    if _use_short(max_seqlen, qkv.dtype):
        hpp, BL, BD, warps = _short_config(G, H, max_seqlen, dh)
        launch(_varlen_short_bwd_kernel, (G * (H // hpp),),
               qkv, do3, lse, cu, ia, dqkv, *qkv.stride(), *do3.stride(), *dqkv.stride(),
               ntok, H, dh, scale * _LOG2E, scale, H // hpp,
               HAS_INDEX=has_index, HEADS_PER_PROG=hpp, BLOCK_L=BL, BLOCK_D=BD,
               PRECISION=_precision(qkv.dtype), num_warps=warps,
               op="varlen_attention backward (short)", shape=_shape(qkv, G, max_seqlen, index))
        return dqkv
    o3 = out.view(ntok, H, dh)
    delta = torch.empty_like(lse)
    BM, BN, BD, warps = _blocks(max_seqlen, dh, qkv.dtype)
    m_blocks, n_blocks = triton.cdiv(max_seqlen, BM), triton.cdiv(max_seqlen, BN)
    where = dict(op="varlen_attention backward", shape=_shape(qkv, G, max_seqlen, index))
    launch(_varlen_bwd_preprocess, (G * H * m_blocks,),
           o3, do3, delta, cu, ia, *o3.stride(), *do3.stride(), ntok, H, dh, m_blocks,
           HAS_INDEX=has_index, BLOCK_M=BM, BLOCK_D=BD, num_warps=warps, **where)
    args = (qkv, do3, lse, delta, cu, ia, dqkv, *qkv.stride(), *do3.stride(), *dqkv.stride(),
            ntok, H, dh, scale * _LOG2E, scale)
    common = dict(HAS_INDEX=has_index, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                  PRECISION=_precision(qkv.dtype), num_warps=warps, **where)
    # dK/dV: query blocks half the key block (64 x 64 spilled 64 B/thread on sm_80, 180 B at
    # dh 128; compile_check); the interpreter runs it too (16 x 32) so the parity tests cover it
    dkdv = dict(common, BLOCK_M=BN // 2 if BN >= 32 else BM, num_stages=1)
    launch(_varlen_bwd_dkdv_kernel, (G * H * n_blocks,), *args, n_blocks, **dkdv)
    launch(_varlen_bwd_dq_kernel, (G * H * m_blocks,), *args, m_blocks, **common)
    return dqkv


# ----------------------------------------------------------------------------------------
# torch.library custom ops
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("mam2_fast::varlen_attention_fwd", mutates_args=())
def _fwd_op(qkv: Tensor, cu_seqlens: Tensor, index: Optional[Tensor], max_seqlen: int,
            scale: float) -> Tuple[Tensor, Tensor]:
    return _fwd(qkv, cu_seqlens, index, max_seqlen, scale)


@_fwd_op.register_fake
def _fwd_fake(qkv, cu_seqlens, index, max_seqlen, scale):
    ntok, _, H, dh = qkv.shape
    return qkv.new_empty(ntok, H * dh), qkv.new_empty(H, ntok, dtype=torch.float32)


@torch.library.custom_op("mam2_fast::varlen_attention_bwd", mutates_args=())
def _bwd_op(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
            index: Optional[Tensor], max_seqlen: int, scale: float) -> Tensor:
    return _bwd(grad_out, qkv, out, lse, cu_seqlens, index, max_seqlen, scale)


@_bwd_op.register_fake
def _bwd_fake(grad_out, qkv, out, lse, cu_seqlens, index, max_seqlen, scale):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, cu, index, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cu, index)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _backward(ctx, grad_out, grad_lse):
    qkv, out, lse, cu, index = ctx.saved_tensors
    dqkv = _bwd_op(grad_out, qkv, out, lse, cu, index, ctx.max_seqlen, ctx.scale)
    return dqkv, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------
def varlen_attention_fused(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, index: Optional[Tensor] = None,
                           scale: Optional[float] = None) -> Tensor:
    """Fused equivalent of :func:`reference.varlen_attention_ref`.

    qkv ``[Ntok, 3, H, dh]`` (any strides), cu_seqlens ``[G+1]`` int32, index ``[Ntok]`` int
    or None, max_seqlen >= the longest segment -> ``[Ntok, H*dh]`` contiguous, qkv's dtype.
    """
    name = "varlen_attention"
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"{name}: qkv must be [Ntok, 3, H, dh], got {tuple(qkv.shape)}")
    check_float(name, "qkv", qkv)
    if qkv.shape[-1] > _SUPPORTED_DH_MAX:
        raise ValueError(f"{name}: head dim {qkv.shape[-1]} > {_SUPPORTED_DH_MAX} is not supported")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name}: cu_seqlens must be a 1-D int32 tensor [G+1], got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if index is not None and (index.shape != (qkv.shape[0],) or index.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"{name}: index must be int32/int64 [Ntok={qkv.shape[0]}], got "
                         f"{index.dtype} {tuple(index.shape)}")
    for what, t in (("cu_seqlens", cu_seqlens), ("index", index)):
        if t is not None and t.device != qkv.device:
            raise ValueError(f"{name}: {what} is on {t.device}, qkv on {qkv.device}")
    check_device(name, qkv)
    scale = float(qkv.shape[-1] ** -0.5 if scale is None else scale)
    out, _ = _fwd_op(qkv, cu_seqlens, index, int(max_seqlen), scale)
    return out
