"""Fused GroupNorm (+ SiLU) for the frozen tokenizer's encoder, inference only.

On the H200 the VQGAN tokenizer that every MAM² step runs took 500-640 ms of a ~930 ms ViT-B
step at batch 32, about 70 % of it in elementwise kernels (``benchmarks/bench_tokenizer.py``
profile): under bf16 autocast ``group_norm`` runs in fp32, so each ``GroupNorm -> SiLU ->
conv`` reads the bf16 activation, writes it in fp32, reads and writes it again for SiLU and
once more for the conv's cast back: about 20 bytes per element. Here one pass computes the
per-(sample, group) statistics and a second writes ``silu(x * a_c + b_c)`` straight in the
input's dtype: 6 bytes per element in bf16.

* ``x [N, C, H, W]`` contiguous (NCHW: a group's ``C/G`` channels are one contiguous span of
  ``C/G * H * W`` values), fp32 / fp16 / bf16; ``weight``, ``bias [C]`` any float dtype.
* statistics in fp32, shifted by the group's first value (no cancellation when the mean is
  large against the spread), two-pass: ``_gn_stats_kernel`` (one program per (n, g)) then
  ``_gn_apply_kernel`` (grid over (n, c) rows x blocks of H*W).
* forward only: the tokenizer is frozen and runs under ``inference_mode``; a call that needs
  a gradient raises.

Reference: :func:`mam2_fast.kernels.reference.group_norm_silu_ref` (``F.group_norm`` in fp32,
then SiLU). Not timed on a GPU yet: ``tokenizer.fused_norm`` (default off) turns it on.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mam2_fast.kernels._common import check_device, check_float, interpreting, launch, next_pow2


@triton.jit
def _gn_stats_kernel(X, MEAN, RSTD, SPAN, eps, BLOCK: tl.constexpr):
    """Mean and 1/std of one contiguous group span of ``SPAN`` values (program = n * G + g)."""
    pid = tl.program_id(0)
    base = X + pid.to(tl.int64) * SPAN
    shift = tl.load(base).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, SPAN, BLOCK):
        idx = start + offs
        ok = idx < SPAN
        v = tl.where(ok, tl.load(base + idx, mask=ok, other=0.0).to(tl.float32) - shift, 0.0)
        acc += v
        acc2 += v * v
    mean_s = tl.sum(acc, axis=0) / SPAN
    var = tl.maximum(tl.sum(acc2, axis=0) / SPAN - mean_s * mean_s, 0.0)
    tl.store(MEAN + pid, mean_s + shift)
    tl.store(RSTD + pid, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _gn_apply_kernel(X, Y, MEAN, RSTD, W, B, C, G, HW, NUM_BLOCKS,
                     SILU: tl.constexpr, BLOCK: tl.constexpr):
    """``y = [silu](x * a + b)`` over one block of one (n, c) row of ``HW`` values, with
    ``a = w_c * rstd_(n, g)`` and ``b = b_c - mean_(n, g) * a``."""
    pid = tl.program_id(0)                     # over N * C * NUM_BLOCKS, the block fastest
    blk = pid % NUM_BLOCKS
    row = pid // NUM_BLOCKS                    # n * C + c
    c = row % C
    grp = (row // C) * G + c // (C // G)
    a = tl.load(W + c).to(tl.float32) * tl.load(RSTD + grp)
    b = tl.load(B + c).to(tl.float32) - tl.load(MEAN + grp) * a
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < HW
    base = row.to(tl.int64) * HW
    v = tl.load(X + base + offs, mask=ok, other=0.0).to(tl.float32) * a + b
    if SILU:
        v = v / (1.0 + tl.exp(-v))
    tl.store(Y + base + offs, v.to(Y.dtype.element_ty), mask=ok)


def group_norm_silu_fused(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float = 1e-6,
                          silu: bool = True, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``[silu](group_norm(x))`` for ``x [N, C, H, W]`` contiguous; the result in ``out_dtype``
    (default x's dtype). Equivalent to :func:`reference.group_norm_silu_ref`."""
    name = "group_norm_silu"
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be [N, C, H, W], got {tuple(x.shape)}")
    N, C, H, W = x.shape
    if C % num_groups != 0:
        raise ValueError(f"{name}: {C} channels do not split into {num_groups} groups")
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"{name}: weight and bias must be [C] = [{C}], got {tuple(weight.shape)} "
                         f"and {tuple(bias.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{name}: x must be contiguous NCHW (a group is one span), got strides {x.stride()}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        raise RuntimeError(f"{name}: forward only (the frozen tokenizer); a gradient was asked for")
    check_float(name, "x", x)
    check_device(name, x)
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype or x.dtype)
    if x.numel() == 0:
        return y
    G, HW = num_groups, H * W
    span = (C // G) * HW
    mean = torch.empty(N * G, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    shape = f"x [N, C, H, W] = {list(x.shape)} {x.dtype}, {G} groups"
    stats_block = min(next_pow2(span), 1024 if interpreting() else 4096)
    launch(_gn_stats_kernel, (N * G,), x, mean, rstd, span, float(eps), BLOCK=stats_block,
           num_warps=1 if interpreting() else 8, op=f"{name} statistics", shape=shape)
    block = min(next_pow2(HW), 1024 if interpreting() else 2048)
    blocks = triton.cdiv(HW, block)
    launch(_gn_apply_kernel, (N * C * blocks,), x, y, mean, rstd, weight, bias, C, G, HW, blocks,
           SILU=bool(silu), BLOCK=block, num_warps=1 if interpreting() else 4,
           op=f"{name} apply", shape=shape)
    return y
