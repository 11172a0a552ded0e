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
