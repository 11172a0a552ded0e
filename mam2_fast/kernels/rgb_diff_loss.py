"""Fused RGB-difference target + masked MSE (Eq. 3 of the paper), for tube masks and for
packed masked tokens (random / frame masks).

* tube: ``loss == rgb_diff_mse_tube_ref(clip, pred, mask_idx, patch)`` with
  ``pred [B, T, Nm, P*P*C]`` for the masked spatial slots ``mask_idx [B, Nm]`` of every frame;
* packed: ``loss == rgb_diff_mse_packed_ref(clip, pred, rows, patch)`` with ``pred [M, P*P*C]``
  the predictions of the masked tokens ``rows [M]`` (flat ``b*T*N + t*N + n``, any order and
  any count per sample), as the packed decoders produce them.

Neither materializes the patchified clip or the target: each program handles one predicted
patch, reads the two source patches of frames t and t-1 straight from ``clip [B, T, C, H, W]``
(any strides) in the clip's own memory order -- per channel a ``[ph, pw]`` tile, contiguous
along pw, so the loads vectorize -- and the prediction at the same values in the model's
(ph, pw, c) order (``reference.patchify``).

* forward: per-patch fp32 sums of squared error -> one deterministic ``sum`` -> mean over
  ``count`` values (tube: ``B * (T-1) * Nm * P*P*C``; packed: the rows with ``t >= 1`` times
  ``P*P*C``, counted on device -- no host sync).
* backward: recomputes the error, ``dpred = 2 * (pred - target) * g / count`` (frame 0 and
  therefore its rows get zero gradient). The incoming grad ``g`` is read on device (no sync).

``clip`` is a constant (the data): it gets no gradient. Passing a clip that requires grad
raises, rather than silently dropping that gradient. The difference is computed in fp32
(the reference computes it in the clip's dtype: identical for fp32 clips).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mam2_fast.kernels._common import check_device, check_float, launch, next_pow2


@triton.jit
def _rgb_diff_kernel(
    CLIP, PRED, IDX, OUT, SCALE,
    s_cb, s_ct, s_cc, s_ch, s_cw,    # clip strides [B, T, C, H, W]
    s_pb, s_pt, s_pm, s_pj,          # pred strides (packed: s_pm = row stride, s_pb = s_pt = 0)
    s_ib, s_im,                      # mask_idx strides (packed: rows stride in s_im)
    T, NM, N_PATCHES, W_PATCHES, C, P,
    PACKED: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One predicted patch per program. The clip is read in its own memory order: per channel
    c a [ph, pw] tile, contiguous along pw (vector loads); the prediction at the same values
    in the model's (ph, pw, c) flattening, ``j = (ph * P + pw) * C + c``."""
    # tube   -- forward: one program per (b, t >= 1, m), B*(T-1)*Nm; backward: B*T*Nm
    # packed -- one program per packed row (forward and backward), M
    row = tl.program_id(0)
    if PACKED:
        r = tl.load(IDX + row.to(tl.int64) * s_im).to(tl.int64)  # b*T*N + t*N + n
        n = (r % N_PATCHES).to(tl.int32)
        bt = r // N_PATCHES
        t = (bt % T).to(tl.int32)
        b = bt // T
        p_row = row.to(tl.int64) * s_pm
    else:
        m = row % NM
        bt = row // NM
        if BACKWARD:
            t = bt % T
            b = bt // T
        else:
            t = bt % (T - 1) + 1
            b = bt // (T - 1)
        p_row = b.to(tl.int64) * s_pb + t.to(tl.int64) * s_pt + m.to(tl.int64) * s_pm
        n = tl.load(IDX + b.to(tl.int64) * s_ib + m * s_im).to(tl.int32)
    ph = tl.arange(0, BLOCK_P)[:, None]                  # [BP, 1]
    pw = tl.arange(0, BLOCK_P)[None, :]                  # [1, BP]
    pm = (ph < P) & (pw < P)                             # [BP, BP]
    ld = pm & ((ph * 0 + t) > 0)  # rows of frame 0 read nothing: zero error, zero gradient
    hh = n // W_PATCHES
    ww = n % W_PATCHES
    # channel-0 pointers of the patch in frames t and t-1 ([BP, BP], 64-bit), and into pred
    cur_ptr = CLIP + b.to(tl.int64) * s_cb + t.to(tl.int64) * s_ct + \
        (hh * P).to(tl.int64) * s_ch + (ww * P).to(tl.int64) * s_cw + (ph * s_ch + pw * s_cw)
    prev_ptr = cur_ptr - s_ct
    pred_ptr = PRED + p_row + ((ph * P + pw) * C) * s_pj
    out_ptr = OUT + p_row + ((ph * P + pw) * C) * s_pj  # backward: OUT has pred's strides
    if BACKWARD:
        scale = tl.load(SCALE)  # 2 * grad_out / count
    acc = tl.zeros([BLOCK_P, BLOCK_P], dtype=tl.float32)
    for c in range(0, C):
        cur = tl.load(cur_ptr, mask=ld, other=0.0).to(tl.float32)
        prev = tl.load(prev_ptr, mask=ld, other=0.0).to(tl.float32)
        pred = tl.load(pred_ptr, mask=ld, other=0.0).to(tl.float32)
        err = pred - (cur - prev)
        if BACKWARD:
            tl.store(out_ptr, (err * scale).to(OUT.dtype.element_ty), mask=pm)
        else:
            acc += err * err
        cur_ptr += s_cc
        prev_ptr += s_cc
        pred_ptr += s_pj
        out_ptr += s_pj
    if not BACKWARD:
        tl.store(OUT + row, tl.sum(tl.sum(acc, axis=1), axis=0))


def _block_p(patch: int):
    """(BLOCK_P, num_warps): one [BLOCK_P, BLOCK_P] tile per channel, ~4 values per thread."""
    bp = max(4, next_pow2(patch))
    return bp, max(1, min(4, bp * bp // 128))


def _check(clip: Tensor, pred: Tensor, mask_idx: Tensor, patch: int):
    name = "rgb_diff_mse_tube"
    if clip.dim() != 5 or pred.dim() != 4 or mask_idx.dim() != 2:
        raise ValueError(f"{name}: need clip [B,T,C,H,W], pred [B,T,Nm,P*P*C], mask_idx [B,Nm]; "
                         f"got {tuple(clip.shape)}, {tuple(pred.shape)}, {tuple(mask_idx.shape)}")
    B, T, C, H, W = clip.shape
    if H % patch or W % patch:
        raise ValueError(f"{name}: clip size {H}x{W} is not divisible by patch {patch}")
    Nm = mask_idx.shape[1]
    if tuple(pred.shape) != (B, T, Nm, patch * patch * C):
        raise ValueError(f"{name}: pred must be {(B, T, Nm, patch * patch * C)}, got {tuple(pred.shape)}")
    if mask_idx.shape[0] != B or mask_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: mask_idx must be int64/int32 [B={B}, Nm], got "
                         f"{mask_idx.dtype} {tuple(mask_idx.shape)}")
    check_float(name, "clip", clip)
    check_float(name, "pred", pred)
    check_device(name, clip, pred, mask_idx)


def _launch(clip, pred, mask_idx, patch, out, scale, backward: bool):
    B, T, C, H, W = clip.shape
    Nm = mask_idx.shape[1]
    rows = B * T * Nm if backward else B * (T - 1) * Nm
    if rows == 0:
        return
    BP, warps = _block_p(patch)
    launch(_rgb_diff_kernel, (rows,),  # one program per predicted patch, axis 0 (2**31 - 1)
           clip, pred, mask_idx, out, scale,
           *clip.stride(), *pred.stride(), *mask_idx.stride(),
           T, Nm, (H // patch) * (W // patch), W // patch, C, patch,
           PACKED=False, BACKWARD=backward, BLOCK_P=BP, num_warps=warps,
           op=f"rgb_diff_mse_tube {'backward' if backward else 'forward'}",
           shape=f"clip {list(clip.shape)} {clip.dtype}, pred {list(pred.shape)}, patch {patch}")


@torch.library.custom_op("mam2_fast::rgb_diff_mse_tube", mutates_args=())
def _rgb_op(clip: Tensor, pred: Tensor, mask_idx: Tensor, patch: int) -> Tensor:
    B, T, C, _, _ = clip.shape
    Nm = mask_idx.shape[1]
    partial = torch.empty(B * (T - 1) * Nm, device=pred.device, dtype=torch.float32)
    _launch(clip, pred, mask_idx, patch, partial, partial, backward=False)
    return partial.sum() / float(B * (T - 1) * Nm * patch * patch * C)


@_rgb_op.register_fake
def _rgb_fake(clip, pred, mask_idx, patch):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("mam2_fast::rgb_diff_mse_tube_bwd", mutates_args=())
def _rgb_bwd_op(grad: Tensor, clip: Tensor, pred: Tensor, mask_idx: Tensor, patch: int) -> Tensor:
    B, T, C, _, _ = clip.shape
    Nm = mask_idx.shape[1]
    count = B * (T - 1) * Nm * patch * patch * C
    scale = (grad.to(torch.float32) * (2.0 / count)).reshape(1)
    dpred = torch.empty_like(pred)
    if dpred.stride() != pred.stride():  # non-dense pred: kernel writes with pred's strides
        pred = pred.contiguous()
        dpred = torch.empty_like(pred)
    _launch(clip, pred, mask_idx, patch, dpred, scale, backward=True)
    return dpred


@_rgb_bwd_op.register_fake
def _rgb_bwd_fake(grad, clip, pred, mask_idx, patch):
    return torch.empty_like(pred)


def _register_autograd(op, bwd_op) -> None:
    """``op(clip, pred, index, patch)`` -> loss; its gradient for ``pred`` is
    ``bwd_op(grad, clip, pred, index, patch)`` (clip, index and patch get none)."""

    def setup_context(ctx, inputs, output):
        clip, pred, index, patch = inputs
        ctx.save_for_backward(clip, pred, index)
        ctx.patch = patch

    def backward(ctx, grad):
        clip, pred, index = ctx.saved_tensors
        return None, bwd_op(grad, clip, pred, index, ctx.patch), None, None

    op.register_autograd(backward, setup_context=setup_context)


_register_autograd(_rgb_op, _rgb_bwd_op)


def rgb_diff_mse_tube_fused(clip: Tensor, pred: Tensor, mask_idx: Tensor, patch: int) -> Tensor:
    """Fused equivalent of :func:`reference.rgb_diff_mse_tube_ref` (fp32 0-dim loss).

    clip ``[B, T, C, H, W]`` (constant, no grad), pred ``[B, T, Nm, P*P*C]``,
    mask_idx ``[B, Nm]`` spatial indices (row-major over the ``H/P x W/P`` patch grid).
    """
    _check(clip, pred, mask_idx, patch)
    if clip.requires_grad and torch.is_grad_enabled():
        raise ValueError("rgb_diff_mse_tube (fused): clip is treated as a constant and gets no "
                         "gradient; pass clip.detach() (or use backend='reference')")
    B, T = pred.shape[:2]
    Nm = mask_idx.shape[1]
    if T < 2 or Nm == 0:
        return pred.sum() * 0.0
    return _rgb_op(clip, pred, mask_idx, int(patch))


# -- packed masked tokens (random / frame masks) ------------------------------------------
def _check_packed(clip: Tensor, pred: Tensor, rows: Tensor, patch: int):
    name = "rgb_diff_mse_packed"
    if clip.dim() != 5 or pred.dim() != 2 or rows.dim() != 1:
        raise ValueError(f"{name}: need clip [B,T,C,H,W], pred [M,P*P*C], rows [M]; "
                         f"got {tuple(clip.shape)}, {tuple(pred.shape)}, {tuple(rows.shape)}")
    B, T, C, H, W = clip.shape
    if H % patch or W % patch:
        raise ValueError(f"{name}: clip size {H}x{W} is not divisible by patch {patch}")
    if tuple(pred.shape) != (rows.shape[0], patch * patch * C):
        raise ValueError(f"{name}: pred must be {(rows.shape[0], patch * patch * C)} "
                         f"(one row per entry of rows), got {tuple(pred.shape)}")
    if rows.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: rows must be int64/int32, got {rows.dtype}")
    check_float(name, "clip", clip)
    check_float(name, "pred", pred)
    check_device(name, clip, pred, rows)


def _packed_count(clip: Tensor, rows: Tensor, patch: int) -> Tensor:
    """fp32 0-dim tensor: the number of averaged values (rows with t >= 1, times P*P*C), >= 1."""
    B, T, C, H, W = clip.shape
    N = (H // patch) * (W // patch)
    counted = ((rows // N) % T > 0).sum().to(torch.float32)
    return (counted * float(patch * patch * C)).clamp(min=1.0)


def _launch_packed(clip, pred, rows, patch, out, scale, backward: bool):
    B, T, C, H, W = clip.shape
    M = rows.shape[0]
    if M == 0:
        return
    BP, warps = _block_p(patch)
    launch(_rgb_diff_kernel, (M,),  # one program per packed row, axis 0 (2**31 - 1)
           clip, pred, rows, out, scale,
           *clip.stride(), 0, 0, pred.stride(0), pred.stride(1), 0, rows.stride(0),
           T, 1, (H // patch) * (W // patch), W // patch, C, patch,
           PACKED=True, BACKWARD=backward, BLOCK_P=BP, num_warps=warps,
           op=f"rgb_diff_mse_packed {'backward' if backward else 'forward'}",
           shape=f"clip {list(clip.shape)} {clip.dtype}, pred {list(pred.shape)}, patch {patch}")


@torch.library.custom_op("mam2_fast::rgb_diff_mse_packed", mutates_args=())
def _rgb_packed_op(clip: Tensor, pred: Tensor, rows: Tensor, patch: int) -> Tensor:
    partial = torch.empty(rows.shape[0], device=pred.device, dtype=torch.float32)
    _launch_packed(clip, pred, rows, patch, partial, partial, backward=False)
    return partial.sum() / _packed_count(clip, rows, patch)


@_rgb_packed_op.register_fake
def _rgb_packed_fake(clip, pred, rows, patch):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("mam2_fast::rgb_diff_mse_packed_bwd", mutates_args=())
def _rgb_packed_bwd_op(grad: Tensor, clip: Tensor, pred: Tensor, rows: Tensor, patch: int) -> Tensor:
    scale = (grad.to(torch.float32) * 2.0 / _packed_count(clip, rows, patch)).reshape(1)
    if pred.stride(1) != 1 or pred.stride(0) != pred.shape[1]:
        pred = pred.contiguous()
    dpred = torch.empty_like(pred)
    _launch_packed(clip, pred, rows, patch, dpred, scale, backward=True)
    return dpred


@_rgb_packed_bwd_op.register_fake
def _rgb_packed_bwd_fake(grad, clip, pred, rows, patch):
    return torch.empty_like(pred)


_register_autograd(_rgb_packed_op, _rgb_packed_bwd_op)


def rgb_diff_mse_packed_fused(clip: Tensor, pred: Tensor, rows: Tensor, patch: int) -> Tensor:
    """Fused equivalent of :func:`reference.rgb_diff_mse_packed_ref` (fp32 0-dim loss).

    clip ``[B, T, C, H, W]`` (constant, no grad), pred ``[M, P*P*C]`` the predictions of the
    masked tokens ``rows [M]`` (flat ``b*T*N + t*N + n``, N the patches of a frame). Rows of
    frame 0 have no target: they are not counted and get zero gradient.
    """
    _check_packed(clip, pred, rows, patch)
    if clip.requires_grad and torch.is_grad_enabled():
        raise ValueError("rgb_diff_mse_packed (fused): clip is treated as a constant and gets no "
                         "gradient; pass clip.detach() (or use backend='reference')")
    if clip.shape[1] < 2 or rows.shape[0] == 0:
        return pred.sum() * 0.0
    return _rgb_packed_op(clip, pred, rows, int(patch))
