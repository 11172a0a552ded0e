"""Fused token gathers for tube masks (the same spatial slots in every frame).

* :func:`gather_visible_add_pos_fused`: ``x [B, T, N, D]`` + ``pos_t [T, D]`` + ``pos_s [N, D]``
  gathered at ``idx [B, Nv]`` -> ``[B, T, Nv, D]`` in one pass (the ``[B, T, N, D]`` sum is
  never formed). Backward, one pass over the output gradient, parallel over tokens: ``dx``
  written in x's dtype (zeros at unselected slots, no memset, no atomics), ``dpos_s [N, D]``
  and ``dpos_t [T, D]`` by a deterministic two-stage reduction (fp32 partial sums per program
  into a buffer, then a fixed-order ``torch.sum``): bit-identical run to run.
* :func:`gather_tokens_fused`: ``x [B, T, N, D]`` at ``idx [B, K]`` -> ``[B, T, K, D]``, a
  plain copy in x's dtype (no fp32 round trip); backward is the scatter into zeros-filled
  ``[B, T, N, D]``.

The gather and the plain scatter work on 2-D tiles ``[rows, BLOCK_D]``: ``BLOCK_D`` divides D
where it can (384 -> 128, 768 / 1024 -> 256), so no lane idles on the model widths, and a tile
holds several rows so each program moves ~2K elements. The position backward's tiles are 3-D,
``[BLOCK_B batch rows, BLOCK_N slots, BLOCK_D]`` (again ~2K elements): each step of its loop over
the batch has BLOCK_B independent row loads in flight, summed over the batch axis in registers.

Backward requires each row of ``idx`` to hold **distinct** indices (true for masks): the
scatter writes instead of accumulating. Out-of-range indices are undefined behaviour.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mam2_fast.kernels._common import check_device, check_float, launch, next_pow2


@triton.jit
def _gather_kernel(
    X, POS_T, POS_S, IDX, OUT,
    s_xb, s_xt, s_xn, s_xd,  # x strides [B, T, N, D] (any)
    s_pt, s_ps,              # row strides of pos_t / pos_s (unit column stride)
    s_ib, s_ik,              # idx strides [B, K]
    R, T, K, D,              # R = B * T * K rows of OUT (contiguous [B, T, K, D])
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Tile [BLOCK_R rows of OUT, BLOCK_D columns]: out[b, t, k] = x[b, t, idx[b, k]]
    (+ pos_t[t] + pos_s[idx[b, k]] in fp32), stored in OUT's dtype."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] int32 (R < 2**31)
    rm = rows < R
    k = rows % K
    bt = rows // K
    t = (bt % T).to(tl.int64)
    b = (bt // T).to(tl.int64)
    n = tl.load(IDX + b * s_ib + k * s_ik, mask=rm, other=0).to(tl.int64)  # [BR] slot of each row
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)               # [BD]
    m2 = rm[:, None] & (cols < D)[None, :]                                  # [BR, BD]
    v = tl.load(X + (b * s_xb + t * s_xt + n * s_xn)[:, None] + (cols * s_xd)[None, :],
                mask=m2, other=0.0)
    if HAS_POS:
        v = v.to(tl.float32)
        v += tl.load(POS_T + (t * s_pt)[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        v += tl.load(POS_S + (n * s_ps)[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(OUT + (rows.to(tl.int64) * D)[:, None] + cols[None, :], v.to(OUT.dtype.element_ty), mask=m2)


@triton.jit
def _scatter_kernel(
    DOUT, INV, DX,
    s_ob, s_ot, s_ok, s_od,  # dout strides [B, T, K, D]
    R, T, N, D,              # R = B * T * N rows of DX (contiguous [B, T, N, D])
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Tile [BLOCK_R rows of DX, BLOCK_D columns]: dx[b, t, n] = dout[b, t, inv[b, n]], zeros
    where slot n was not gathered (inv = -1)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] int32 (R < 2**31)
    rm = rows < R
    n = rows % N
    bt = rows // N
    t = (bt % T).to(tl.int64)
    b = (bt // T).to(tl.int64)
    i = tl.load(INV + b * N + n, mask=rm, other=-1).to(tl.int64)  # [BR] position of n in idx[b]
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)     # [BD]
    cm = (cols < D)[None, :]
    g = tl.load(DOUT + (b * s_ob + t * s_ot + i * s_ok)[:, None] + (cols * s_od)[None, :],
                mask=(rm & (i >= 0))[:, None] & cm, other=0.0)
    tl.store(DX + (rows.to(tl.int64) * D)[:, None] + cols[None, :], g.to(DX.dtype.element_ty),
             mask=rm[:, None] & cm)


@triton.jit
def _scatter_pos_kernel(
    DOUT, INV, DX, PART_S, PART_T,
    s_ob, s_ot, s_ok, s_od,   # dout strides [B, T, K, D]
    B, T, N, D,
    B_CHUNK, N_BLOCKS,        # batch rows per program; cdiv(N, BLOCK_N)
    WRITE_DX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (slot block nb, frame t, batch chunk c) x D-block; 3-D tiles [BLOCK_B batch rows,
    BLOCK_N slots, BLOCK_D columns], BLOCK_B rows of the chunk per step (independent loads in
    flight). For each b of the chunk: dx[b, t, n-block] = dout at inv (zeros at unselected
    slots, if WRITE_DX); the fp32 sums over those b go to PART_S[c, t, n-block] and, summed over
    the block's slots too, to PART_T[c, nb, t] (first stage of the position gradients; no
    atomics, a fixed summation order)."""
    pid = tl.program_id(0)    # over n_chunks * T * N_BLOCKS, slot blocks fastest
    nb = pid % N_BLOCKS
    t = ((pid // N_BLOCKS) % T).to(tl.int64)
    c = pid // (N_BLOCKS * T)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)                   # [BN]
    nm = n < N
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    cm = cols < D
    cm3 = cm[None, None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_start = c.to(tl.int64) * B_CHUNK
    b_end = tl.minimum(b_start + B_CHUNK, B)
    for j in range(0, b_end - b_start, BLOCK_B):               # the chunk's batch rows, in order
        b64 = b_start + j + tl.arange(0, BLOCK_B)              # [BB] int64
        m2 = (b64 < b_end)[:, None] & nm[None, :]              # [BB, BN]
        i = tl.load(INV + b64[:, None] * N + n[None, :], mask=m2, other=-1).to(tl.int64)
        g = tl.load(DOUT + (b64 * s_ob + t * s_ot)[:, None, None] + (i * s_ok)[:, :, None]
                    + (cols * s_od)[None, None, :], mask=(m2 & (i >= 0))[:, :, None] & cm3, other=0.0)
        if WRITE_DX:
            tl.store(DX + (((b64[:, None] * T + t) * N + n[None, :]) * D)[:, :, None] + cols[None, None, :],
                     g.to(DX.dtype.element_ty), mask=m2[:, :, None] & cm3)
        acc += tl.sum(g.to(tl.float32), axis=0)
    c64 = c.to(tl.int64)
    m2 = nm[:, None] & cm[None, :]
    tl.store(PART_S + ((c64 * T + t) * N + n)[:, None] * D + cols[None, :], acc, mask=m2)
    tl.store(PART_T + ((c64 * N_BLOCKS + nb) * T + t) * D + cols, tl.sum(acc, axis=0), mask=cm)


# elements per tile (8 KiB of fp32, 4 KiB of bf16 per program; 16 per thread at 4 warps: no
# spills even when compiled without the stride specializations, see compile_check)
_TILE = 2048


def _block_d(D: int) -> int:
    """The tile's width: the widest power of two <= 256 dividing D (no masked lanes: 384 -> 128,
    768 / 1024 -> 256); one padded block of next_pow2(D) when D has no such divisor >= 16."""
    bd = 256
    while bd > 16 and D % bd:
        bd //= 2
    return bd if D % bd == 0 else min(max(16, next_pow2(D)), 1024)


def _tile(D: int) -> Tuple[int, int]:
    """(BLOCK_R, BLOCK_D) of the 2-D tiles."""
    bd = _block_d(D)
    return max(1, _TILE // bd), bd


def _check_rows(R: int, op: str, shape: str) -> None:
    """The tile kernels index rows in int32 (element offsets are int64)."""
    if R >= 2 ** 31:
        raise ValueError(f"{op}: {R} token rows exceed the kernels' int32 row index (2**31 - 1) at {shape}")


def _inverse(idx: Tensor, N: int) -> Tensor:
    """idx [B, K] -> inv [B, N] int32: inv[b, idx[b, k]] = k, -1 elsewhere."""
    B, K = idx.shape
    inv = torch.full((B, N), -1, device=idx.device, dtype=torch.int32)
    src = torch.arange(K, device=idx.device, dtype=torch.int32).expand(B, K)
    return inv.scatter_(1, idx.long(), src)


def _gather(x: Tensor, pos_t, pos_s, idx: Tensor, out_dtype: torch.dtype) -> Tensor:
    """x [B, T, N, D] (+ pos_t [T, D] + pos_s [N, D]) at idx [B, K] -> [B, T, K, D] in out_dtype."""
    B, T, N, D = x.shape
    K = idx.shape[1]
    out = torch.empty(B, T, K, D, device=x.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    has_pos = pos_t is not None
    op = f"{'gather_visible_add_pos' if has_pos else 'gather_tokens'} forward"
    shape = f"x [B, T, N, D] = {list(x.shape)} {x.dtype}, idx [B, K] = {list(idx.shape)}"
    R = B * T * K
    _check_rows(R, op, shape)
    BR, BD = _tile(D)
    launch(_gather_kernel, (triton.cdiv(R, BR), triton.cdiv(D, BD)),   # row tiles on axis 0 (2**31 - 1)
           x, pos_t if has_pos else x, pos_s if has_pos else x, idx, out,
           *x.stride(), pos_t.stride(0) if has_pos else 0, pos_s.stride(0) if has_pos else 0,
           *idx.stride(), R, T, K, D, HAS_POS=has_pos, BLOCK_R=BR, BLOCK_D=BD, num_warps=4,
           op=op, shape=shape)
    return out


def _scatter(dout: Tensor, idx: Tensor, N: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """dout ``[B, T, K, D]`` -> dx ``[B, T, N, D]`` in ``dtype`` (default dout's): dout at the
    slots ``idx [B, K]``, zeros elsewhere."""
    B, T, K, D = dout.shape
    dx = torch.empty(B, T, N, D, device=dout.device, dtype=dtype or dout.dtype)
    if dx.numel() == 0:
        return dx
    shape = f"dout [B, T, K, D] = {list(dout.shape)} {dout.dtype}, N {N}"
    R = B * T * N
    _check_rows(R, "gather_tokens backward", shape)
    BR, BD = _tile(D)
    launch(_scatter_kernel, (triton.cdiv(R, BR), triton.cdiv(D, BD)),  # row tiles on axis 0 (2**31 - 1)
           dout, _inverse(idx, N), dx, *dout.stride(), R, T, N, D, BLOCK_R=BR, BLOCK_D=BD, num_warps=4,
           op="gather_tokens backward", shape=shape)
    return dx


# [slots, columns] elements of the position-gradient scatter's tile (a quarter of a gather
# tile: it also carries the fp32 sums through its loop over the batch) ...
_POS_TILE = 512
# ... times the batch rows it reads per step (a gather tile in all)
_POS_BLOCK_B = 4
# programs the position-gradient scatter aims for (enough to fill an H100/H200 at ~4 per SM;
# more would only grow the partial-sum buffer)
_POS_BWD_PROGRAMS = 512


def _gather_pos_bwd(dout: Tensor, idx: Tensor, N: int, write_dx: bool,
                    dx_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """dout [B, T, K, D] -> dx [B, T, N, D] (dx_dtype, default dout's; empty if not write_dx),
    dpos_t [T, D], dpos_s [N, D] (fp32)."""
    B, T, K, D = dout.shape
    dev = dout.device
    dx_dtype = dx_dtype or dout.dtype
    dx = torch.empty(B, T, N, D, device=dev, dtype=dx_dtype) if write_dx else dout.new_empty(0, dtype=dx_dtype)
    if N * D == 0 or T == 0 or B == 0:
        return dx.zero_(), torch.zeros(T, D, device=dev), torch.zeros(N, D, device=dev)
    BD = _block_d(D)
    BN = min(max(1, _POS_TILE // BD), next_pow2(N))   # [BN, BD] per batch row, fp32 sums kept
    n_blocks, d_blocks = triton.cdiv(N, BN), triton.cdiv(D, BD)
    # split the batch into as few chunks as give ~_POS_BWD_PROGRAMS programs
    n_chunks = min(B, triton.cdiv(_POS_BWD_PROGRAMS, n_blocks * T * d_blocks))
    b_chunk = triton.cdiv(B, n_chunks)
    n_chunks = triton.cdiv(B, b_chunk)
    part_s = torch.empty(n_chunks, T, N, D, device=dev, dtype=torch.float32)         # sums over b of a chunk
    part_t = torch.empty(n_chunks, n_blocks, T, D, device=dev, dtype=torch.float32)  # ... and over a slot block
    launch(_scatter_pos_kernel, (n_chunks * T * n_blocks, d_blocks),  # large product on axis 0
           dout, _inverse(idx, N), dx if write_dx else part_s, part_s, part_t,
           *dout.stride(), B, T, N, D, b_chunk, n_blocks,
           WRITE_DX=write_dx, BLOCK_B=_POS_BLOCK_B, BLOCK_N=BN, BLOCK_D=BD, num_warps=4,
           op="gather_visible_add_pos backward",
           shape=f"dout [B, T, K, D] = {list(dout.shape)} {dout.dtype}, N {N}, dx: {write_dx}")
    # second stage: fixed-order reductions of the partials (deterministic)
    return dx, part_t.sum(dim=(0, 1)), part_s.sum(dim=(0, 1))


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
def _scatter_op(dout: Tensor, idx: Tensor, N: int, dtype: torch.dtype) -> Tensor:
    return _scatter(dout, idx, N, dtype)


@_scatter_op.register_fake
def _scatter_fake(dout, idx, N, dtype):
    B, T, K, D = dout.shape
    return dout.new_empty(B, T, N, D, dtype=dtype)


def _gather_setup(ctx, inputs, output):
    x, idx = inputs
    ctx.save_for_backward(idx)
    ctx.N, ctx.x_dtype = x.shape[2], x.dtype


def _gather_backward(ctx, dout):
    (idx,) = ctx.saved_tensors
    return _scatter_op(dout, idx, ctx.N, ctx.x_dtype), None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("mam2_fast::gather_add_pos", mutates_args=())
def _gather_pos_op(x: Tensor, pos_t: Tensor, pos_s: Tensor, idx: Tensor) -> Tensor:
    return _gather(x, pos_t, pos_s, idx, _out_dtype(x, pos_t, pos_s))


@_gather_pos_op.register_fake
def _gather_pos_fake(x, pos_t, pos_s, idx):
    B, T, N, D = x.shape
    return x.new_empty(B, T, idx.shape[1], D, dtype=_out_dtype(x, pos_t, pos_s))


@torch.library.custom_op("mam2_fast::gather_add_pos_bwd", mutates_args=())
def _gather_pos_bwd_op(dout: Tensor, idx: Tensor, N: int, write_dx: bool, dx_dtype: torch.dtype
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    return _gather_pos_bwd(dout, idx, N, write_dx, dx_dtype)


@_gather_pos_bwd_op.register_fake
def _gather_pos_bwd_fake(dout, idx, N, write_dx, dx_dtype):
    B, T, K, D = dout.shape
    dx = dout.new_empty(B, T, N, D, dtype=dx_dtype) if write_dx else dout.new_empty(0, dtype=dx_dtype)
    return dx, dout.new_empty(T, D, dtype=torch.float32), dout.new_empty(N, D, dtype=torch.float32)


def _gather_pos_setup(ctx, inputs, output):
    x, pos_t, pos_s, idx = inputs
    ctx.save_for_backward(idx)
    ctx.N = x.shape[2]
    ctx.dtypes = (x.dtype, pos_t.dtype, pos_s.dtype)


def _gather_pos_backward(ctx, dout):
    """dout [B, T, K, D] (promoted dtype) -> dx in x's dtype (written by the kernel, no cast
    pass), dpos_t / dpos_s in their parameters' dtypes."""
    (idx,) = ctx.saved_tensors
    need_x, need_t, need_s = ctx.needs_input_grad[:3]
    x_dt, t_dt, s_dt = ctx.dtypes
    if not (need_x or need_t or need_s):
        return None, None, None, None
    if not (need_t or need_s):
        return _scatter_op(dout, idx, ctx.N, x_dt), None, None, None
    dx, dpos_t, dpos_s = _gather_pos_bwd_op(dout, idx, ctx.N, bool(need_x), x_dt)
    return (dx if need_x else None, dpos_t.to(t_dt) if need_t else None,
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
