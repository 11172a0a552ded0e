"""Fused token gathers for tube masks (the same spatial slots in every frame).

* :func:`gather_visible_add_pos_fused`: ``x [B, T, N, D]`` + ``pos_t [T, D]`` + ``pos_s [N, D]``
  gathered at ``idx [B, Nv]`` -> ``[B, T, Nv, D]`` in one pass (the ``[B, T, N, D]`` sum is
  never formed). Backward, one pass over the output gradient: ``dx`` (zeros at unselected
  slots, no memset, no atomics), ``dpos_s [N, D]`` and ``dpos_t [T, D]`` (deterministic:
  per-slot partials, then one small reduction).
* :func:`gather_tokens_fused`: ``x [B, T, N, D]`` at ``idx [B, K]`` -> ``[B, T, K, D]``;
  backward is the scatter into zeros-filled ``[B, T, N, D]``.

Backward requires each row of ``idx`` to hold **distinct** indices (true for masks): the
scatter writes instead of accumulating. Out-of-range indices are undefined behaviour.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mam2_fast.kernels._common import check_device, check_float, interpreting, launch, next_pow2


@triton.jit
def _gather_kernel(
    X, POS_T, POS_S, IDX, OUT,
    s_xb, s_xt, s_xn, s_xd,
    s_pt, s_ps,              # row strides of pos_t / pos_s (unit column stride)
    s_ib, s_ik,
    T, K, D,
    HAS_POS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # over B * T * K; OUT is contiguous [B, T, K, D]
    k = row % K
    bt = row // K
    t = bt % T
    b = bt // T
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = offs < D
    n = tl.load(IDX + b.to(tl.int64) * s_ib + k * s_ik)
    v = tl.load(X + b.to(tl.int64) * s_xb + t.to(tl.int64) * s_xt + n * s_xn + offs * s_xd,
                mask=dm, other=0.0).to(tl.float32)
    if HAS_POS:
        v += tl.load(POS_T + t * s_pt + offs, mask=dm, other=0.0).to(tl.float32)
        v += tl.load(POS_S + n * s_ps + offs, mask=dm, other=0.0).to(tl.float32)
    tl.store(OUT + row.to(tl.int64) * D + offs, v.to(OUT.dtype.element_ty), mask=dm)


@triton.jit
def _scatter_kernel(
    DOUT, INV, DX,
    s_ob, s_ot, s_ok, s_od,  # dout strides [B, T, K, D]
    T, N, D,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # over B * T * N; DX is contiguous [B, T, N, D]
    n = row % N
    bt = row // N
    t = bt % T
    b = bt // T
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = offs < D
    i = tl.load(INV + b.to(tl.int64) * N + n)  # position of slot n in idx[b], -1 if absent
    g = tl.load(DOUT + b.to(tl.int64) * s_ob + t.to(tl.int64) * s_ot + i * s_ok + offs * s_od,
                mask=dm & ((offs * 0 + i) >= 0), other=0.0)
    tl.store(DX + row.to(tl.int64) * D + offs, g.to(DX.dtype.element_ty), mask=dm)


@triton.jit
def _scatter_pos_kernel(
    DOUT, INV, DX, DPOS_S, DPOS_T_PART,
    s_ob, s_ot, s_ok, s_od,
    B, T, N, D,
    WRITE_DX: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (slot n, D-block): loops over (t, b), writes dx[b, t, n] and reduces
    dpos_s[n] (fp32) and the partial dpos_t_part[n, t] = sum_b dx[b, t, n] (fp32)."""
    n = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = offs < D
    acc_s = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t in range(0, T):
        acc_t = tl.zeros([BLOCK_D], dtype=tl.float32)
        # walk b with 64-bit pointers (loop counters are 32-bit)
        inv_ptr = INV + n
        do_ptr = DOUT + t * s_ot + offs * s_od
        dx_ptr = DX + (t * N + n) * D + offs
        for b in range(0, B):
            i = tl.load(inv_ptr)
            g = tl.load(do_ptr + i * s_ok, mask=dm & ((offs * 0 + i) >= 0), other=0.0)
            if WRITE_DX:
                tl.store(dx_ptr, g.to(DX.dtype.element_ty), mask=dm)
            acc_t += g.to(tl.float32)
            inv_ptr += N
            do_ptr += s_ob
            dx_ptr += T * N * D
        tl.store(DPOS_T_PART + (n.to(tl.int64) * T + t) * D + offs, acc_t, mask=dm)
        acc_s += acc_t
    tl.store(DPOS_S + n.to(tl.int64) * D + offs, acc_s, mask=dm)


def _block_d(D: int) -> int:
    return min(max(16, next_pow2(D)), 256 if interpreting() else 1024)


def _inverse(idx: Tensor, N: int) -> Tensor:
    """idx [B, K] -> inv [B, N] int32: inv[b, idx[b, k]] = k, -1 elsewhere."""
    B, K = idx.shape
    inv = torch.full((B, N), -1, device=idx.device, dtype=torch.int32)
    src = torch.arange(K, device=idx.device, dtype=torch.int32).expand(B, K)
    return inv.scatter_(1, idx.long(), src)


def _gather(x: Tensor, pos_t, pos_s, idx: Tensor, out_dtype: torch.dtype) -> Tensor:
    B, T, N, D = x.shape
    K = idx.shape[1]
    out = torch.empty(B, T, K, D, device=x.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    has_pos = pos_t is not None
    BD = _block_d(D)
    launch(_gather_kernel, (B * T * K, triton.cdiv(D, BD)),   # rows on axis 0 (2**31 - 1)
           x, pos_t if has_pos else x, pos_s if has_pos else x, idx, out,
           *x.stride(), pos_t.stride(0) if has_pos else 0, pos_s.stride(0) if has_pos else 0,
           *idx.stride(), T, K, D, HAS_POS=has_pos, BLOCK_D=BD,
           op=f"{'gather_visible_add_pos' if has_pos else 'gather_tokens'} forward",
           shape=f"x [B, T, N, D] = {list(x.shape)} {x.dtype}, idx [B, K] = {list(idx.shape)}")
    return out


def _scatter(dout: Tensor, idx: Tensor, N: int) -> Tensor:
    """dout ``[B, T, K, D]`` -> dx ``[B, T, N, D]``: dout at the slots ``idx [B, K]``, zeros elsewhere."""
    B, T, K, D = dout.shape
    dx = torch.empty(B, T, N, D, device=dout.device, dtype=dout.dtype)
    if dx.numel() == 0:
        return dx
    BD = _block_d(D)
    launch(_scatter_kernel, (B * T * N, triton.cdiv(D, BD)),  # rows on axis 0 (2**31 - 1)
           dout, _inverse(idx, N), dx, *dout.stride(), T, N, D, BLOCK_D=BD,
           op="gather_tokens backward",
           shape=f"dout [B, T, K, D] = {list(dout.shape)} {dout.dtype}, N {N}")
    return dx


def _gather_pos_bwd(dout: Tensor, idx: Tensor, N: int, write_dx: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """-> dx [B, T, N, D] (dout's dtype; empty if not write_dx), dpos_t [T, D], dpos_s [N, D] fp32."""
    B, T, K, D = dout.shape
    dev = dout.device
    dx = torch.empty(B, T, N, D, device=dev, dtype=dout.dtype) if write_dx else dout.new_empty(0)
    dpos_s = torch.empty(N, D, device=dev, dtype=torch.float32)
    part_t = torch.empty(N, T, D, device=dev, dtype=torch.float32)
    if N * D == 0 or T == 0:
        return dx.zero_(), torch.zeros(T, D, device=dev), dpos_s.zero_()
    if B == 0:
        return dx, torch.zeros(T, D, device=dev), dpos_s.zero_()
    BD = _block_d(D)
    launch(_scatter_pos_kernel, (N, triton.cdiv(D, BD)),
           dout, _inverse(idx, N), dx if write_dx else dpos_s, dpos_s, part_t,
           *dout.stride(), B, T, N, D, WRITE_DX=write_dx, BLOCK_D=BD,
           op="gather_visible_add_pos backward",
           shape=f"dout [B, T, K, D] = {list(dout.shape)} {dout.dtype}, N {N}, dx: {write_dx}")
    return dx, part_t.sum(0), dpos_s


# ----------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("mam2_fast::gather_tokens", mutates_args=())
def _gather_op(x: Tensor, idx: Tensor) -> Tensor:
    return _gather(x, None, None, idx, x.dtype)


@_gather_op.register_fake
def _gather_fake(x, idx):
    B, T, N, D = x.shape
    return x.new_empty(B, T, idx.shape[1], D)


@torch.library.custom_op("mam2_fast::scatter_tokens", mutates_args=())
def _scatter_op(dout: Tensor, idx: Tensor, N: int) -> Tensor:
    return _scatter(dout, idx, N)


@_scatter_op.register_fake
def _scatter_fake(dout, idx, N):
    B, T, K, D = dout.shape
    return dout.new_empty(B, T, N, D)


def _gather_setup(ctx, inputs, output):
    x, idx = inputs
    ctx.save_for_backward(idx)
    ctx.N, ctx.x_dtype = x.shape[2], x.dtype


def _gather_backward(ctx, dout):
    (idx,) = ctx.saved_tensors
    return _scatter_op(dout.to(ctx.x_dtype), idx, ctx.N), None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("mam2_fast::gather_add_pos", mutates_args=())
def _gather_pos_op(x: Tensor, pos_t: Tensor, pos_s: Tensor, idx: Tensor) -> Tensor:
    return _gather(x, pos_t, pos_s, idx, _out_dtype(x, pos_t, pos_s))


@_gather_pos_op.register_fake
def _gather_pos_fake(x, pos_t, pos_s, idx):
    B, T, N, D = x.shape
    return x.new_empty(B, T, idx.shape[1], D, dtype=_out_dtype(x, pos_t, pos_s))


@torch.library.custom_op("mam2_fast::gather_add_pos_bwd", mutates_args=())
def _gather_pos_bwd_op(dout: Tensor, idx: Tensor, N: int, write_dx: bool
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    return _gather_pos_bwd(dout, idx, N, write_dx)


@_gather_pos_bwd_op.register_fake
def _gather_pos_bwd_fake(dout, idx, N, write_dx):
    B, T, K, D = dout.shape
    dx = dout.new_empty(B, T, N, D) if write_dx else dout.new_empty(0)
    return dx, dout.new_empty(T, D, dtype=torch.float32), dout.new_empty(N, D, dtype=torch.float32)


def _gather_pos_setup(ctx, inputs, output):
    x, pos_t, pos_s, idx = inputs
    ctx.save_for_backward(idx)
    ctx.N = x.shape[2]
    ctx.dtypes = (x.dtype, pos_t.dtype, pos_s.dtype)


def _gather_pos_backward(ctx, dout):
    (idx,) = ctx.saved_tensors
    need_x, need_t, need_s = ctx.needs_input_grad[:3]
    x_dt, t_dt, s_dt = ctx.dtypes
    if not (need_x or need_t or need_s):
        return None, None, None, None
    if not (need_t or need_s):
        return _scatter_op(dout.to(x_dt), idx, ctx.N), None, None, None
    dx, dpos_t, dpos_s = _gather_pos_bwd_op(dout, idx, ctx.N, bool(need_x))
    return (dx.to(x_dt) if need_x else None, dpos_t.to(t_dt) if need_t else None,
            dpos_s.to(s_dt) if need_s else None, None)


_gather_pos_op.register_autograd(_gather_pos_backward, setup_context=_gather_pos_setup)


# ----------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------
def _out_dtype(x: Tensor, pos_t: Tensor, pos_s: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, pos_t.dtype), pos_s.dtype)


def _check_x_idx(name: str, x: Tensor, idx: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be [B, T, N, D], got {tuple(x.shape)}")
    if idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: idx must be [B={x.shape[0]}, K], got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: idx must be int64/int32, got {idx.dtype}")
    check_float(name, "x", x)


def gather_tokens_fused(x: Tensor, idx: Tensor) -> Tensor:
    """Fused equivalent of :func:`reference.gather_tokens_ref`: x ``[B, T, N, D]`` (any
    strides), idx ``[B, K]`` distinct per row -> contiguous ``[B, T, K, D]``."""
    _check_x_idx("gather_tokens", x, idx)
    check_device("gather_tokens", x, idx)
    return _gather_op(x, idx)


def gather_visible_add_pos_fused(x: Tensor, pos_t: Tensor, pos_s: Tensor, idx: Tensor) -> Tensor:
    """Fused equivalent of :func:`reference.gather_visible_add_pos_ref`.

    x ``[B, T, N, D]`` (any strides), pos_t ``[T, D]``, pos_s ``[N, D]`` (unit column
    stride), idx ``[B, Nv]`` distinct per row -> ``[B, T, Nv, D]`` in the promoted dtype.
    """
    name = "gather_visible_add_pos"
    _check_x_idx(name, x, idx)
    B, T, N, D = x.shape
    if tuple(pos_t.shape) != (T, D) or tuple(pos_s.shape) != (N, D):
        raise ValueError(f"{name}: need pos_t [T, D] = {(T, D)} and pos_s [N, D] = {(N, D)}, got "
                         f"{tuple(pos_t.shape)} and {tuple(pos_s.shape)}")
    check_float(name, "pos_t", pos_t)
    check_float(name, "pos_s", pos_s)
    check_device(name, x, pos_t, pos_s, idx)
    if pos_t.stride(-1) != 1:
        pos_t = pos_t.contiguous()
    if pos_s.stride(-1) != 1:
        pos_s = pos_s.contiguous()
    return _gather_pos_op(x, pos_t, pos_s, idx)
