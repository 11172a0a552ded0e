"""The flash-attention math shared by the grid (``attention.py``) and packed (``varlen.py``)
kernels: one online-softmax step of the forward and the probabilities / score gradients of
the FlashAttention-2 backward. Both work on register tiles the callers load with their own
addressing (strides over a grid, or rows through an index), in the log2 domain
(``qk_scale`` = softmax scale * log2(e)) with fp32 accumulation.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(q, k, v, key_ok, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr):
    """Fold one key block into the running (max, sum, weighted values) of a query block.

    q [M, D], k/v [N, D] (masked loads), key_ok [N] bool, m_i/l_i [M] fp32, acc [M, D] fp32.
    Returns the updated (m_i, l_i, acc).
    """
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale   # [M, N] fp32
    s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def probs_and_score_grads(q, k, v, do, lse, delta, query_ok, key_ok, qk_scale, PRECISION: tl.constexpr):
    """Recompute the probabilities of one (query block, key block) tile from the saved
    logsumexp and return them with the score gradients: (p [M, N], ds [M, N]), both zero
    outside ``query_ok [M] x key_ok [N]``. ``delta [M]`` = rowsum(dO * O)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale   # [M, N]
    p = tl.exp2(s - lse[:, None])
    p = tl.where(query_ok[:, None] & key_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)              # [M, N]
    ds = p * (dp - delta[:, None])
    return p, ds


# ---- single-tile kernels (a whole sequence of <= 64 positions in one register tile) --------
@triton.jit
def single_tile_forward(q, k, v, key_ok, qk_scale, PRECISION: tl.constexpr):
    """Plain softmax attention of one whole sequence: q/k/v [L, D] (masked loads), key_ok [L].
    Returns (out [L, D] fp32 -- zero for rows without a key --, lse [L] fp32 in the log2
    domain, 1e30 for rows without a key)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale   # [L, L]
    s = tl.where(key_ok[None, :], s, float("-inf"))
    m = tl.maximum(tl.max(s, axis=1), -1.0e30)   # finite: rows without keys stay NaN-free
    p = tl.exp2(s - m[:, None])
    l_sum = tl.sum(p, axis=1)
    has_key = l_sum > 0.0
    l_safe = tl.where(has_key, l_sum, 1.0)
    out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / l_safe[:, None]
    lse = tl.where(has_key, m + tl.log2(l_safe), 1.0e30)
    return out, lse


@triton.jit
def single_tile_backward(q, k, v, do, lse, pair_ok, qk_scale, sm_scale, PRECISION: tl.constexpr):
    """Single-pass backward of one whole sequence: P from the saved logsumexp, delta =
    rowsum(P * dP) in registers (equal to rowsum(dO * O), without reading O), then dQ, dK, dV
    [L, D] fp32; ``pair_ok [L, L]`` (query, key) zeroes what the forward did not attend."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale    # [L, L]
    p = tl.where(pair_ok, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)             # [L, L]
    delta = tl.sum(p * dp, axis=1)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * sm_scale
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * sm_scale
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    return dq, dk, dv
