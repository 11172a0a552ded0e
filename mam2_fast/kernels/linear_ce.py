"""Fused linear + cross-entropy (the appearance head, K = 8192 / 16384 classes).

``loss = F.cross_entropy(x @ W.T + b, y, ignore_index=-100)`` (mean over non-ignored rows)
without ever holding the full ``[M, K]`` logits. Design (Liger-Kernel style):

* rows are processed in chunks of ``C`` tokens; per chunk the logits ``[C, K]`` come from one
  cuBLAS GEMM (``addmm``, input dtype, like the reference's ``F.linear``);
* a Triton kernel, one program per row, streams the row in ``BLOCK_K`` tiles with an online
  max / sum-exp (fp32), writes the row loss and then overwrites the logits **in place** with
  ``d loss / d logits = (softmax - onehot(y)) / n_valid`` (zero for ignored rows; stored times
  ``DLOGITS_SCALE`` and unscaled with 1 / n_valid after the GEMMs, so fp16 does not underflow);
* the chunk's gradients follow from two more GEMMs: ``dx = dlogits @ W`` and
  ``dW += dlogits.T @ x``, ``db += dlogits.sum(0)``. ``dW`` and ``db`` are accumulated across
  the chunks in fp32 (each chunk's GEMM writes fp32, it is never rounded to the input dtype
  first) and cast to the weight's dtype once at the end.

Targets are checked once per call (on CUDA a device-side assert, no host sync; elsewhere one
host read): a target outside ``[0, K)`` that is not ``ignore_index`` raises ``IndexError`` naming the op, the value
and ``K``, as ``F.cross_entropy`` refuses it. (Skipped on the ``meta`` stand-in device and
while a CUDA graph is being captured; the kernel clamps such a target, it never reads outside
the row.)

So gradients are computed during the forward (the loss is a scalar; backward only scales
them by the incoming grad). When no input requires grad the gradient GEMMs are skipped.
Peak extra memory: one ``[C, K]`` chunk plus fp32 ``dW``/``db``.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mam2_fast.kernels._common import check_device, check_float, interpreting, launch, next_pow2
from mam2_fast.train import accel

log = logging.getLogger("mam2_fast")


@triton.jit
def _ce_rows_kernel(
    LOGITS, s_lm,          # [C, K] chunk (row stride s_lm, unit column stride), overwritten
    TARGET, LOSS,          # [C] int64, [C] fp32 row losses
    K, ignore_index, GRAD_SCALE,  # GRAD_SCALE: the float the stored dlogits are multiplied by
    COMPUTE_GRAD: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    ptr = LOGITS + row.to(tl.int64) * s_lm
    y = tl.load(TARGET + row)
    offs = tl.arange(0, BLOCK_K)

    # pass 1: online max / sum-exp over the row (fp32)
    m = tl.full([BLOCK_K], -1.0e30, dtype=tl.float32)  # finite start: no inf - inf
    s = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + offs
        z = tl.load(ptr + cols, mask=cols < K, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)  # padding lanes: exp(-inf) = 0
        m = m_new
    row_max = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - row_max), axis=0)
    lse = row_max + tl.log(total)

    ignored = y == ignore_index
    # never read outside the row (out-of-range targets are refused on the host, see check_targets)
    y_safe = tl.where(ignored | (y < 0) | (y >= K), 0, y)
    z_y = tl.load(ptr + y_safe).to(tl.float32)
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - z_y))

    if COMPUTE_GRAD:
        # pass 2: dlogits = (softmax - onehot) * GRAD_SCALE, in place (1 / n_valid is applied
        # after the GEMMs, in fp32: folded in here, softmax / n_valid underflows in fp16)
        scale = tl.where(ignored, 0.0, GRAD_SCALE)
        for start in range(0, K, BLOCK_K):
            cols = start + offs
            cm = cols < K
            z = tl.load(ptr + cols, mask=cm, other=0.0).to(tl.float32)
            g = tl.exp(z - lse)
            g = tl.where(cols == y, g - 1.0, g) * scale
            tl.store(ptr + cols, g.to(LOGITS.dtype.element_ty), mask=cm)


def _chunk_rows(M: int, K: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    if interpreting():
        return 64
    # ~2^26 logits (128 MiB bf16) per chunk, but at least 256 rows
    return max(256, min(M, (1 << 26) // K))


def _row_chunks(M: int, K: int, chunk_size: Optional[int]):
    """The ``(start, end)`` row ranges of the chunks of ``M`` rows (each one logits GEMM and one
    kernel launch)."""
    C = _chunk_rows(M, K, chunk_size)
    return [(start, min(M, start + C)) for start in range(0, M, C)]


def _launch_rows(logits: Tensor, target: Tensor, row_loss: Tensor, grad_scale: float, ignore_index: int,
                 compute_grad: bool, shape: str) -> None:
    """Row losses of one chunk ``logits [c, K]`` (and, in place, its dlogits)."""
    K = logits.shape[1]
    BLOCK_K = min(next_pow2(K), 1024 if interpreting() else 4096)
    launch(_ce_rows_kernel, (logits.shape[0],),  # one program per row of the chunk, axis 0
           logits, logits.stride(0), target, row_loss, K, ignore_index, grad_scale,
           COMPUTE_GRAD=compute_grad, BLOCK_K=BLOCK_K, num_warps=8 if BLOCK_K >= 2048 else 4,
           op=f"linear_cross_entropy {'forward+backward' if compute_grad else 'forward'}", shape=shape)


def check_targets(target: Tensor, K: int, ignore_index: int) -> None:
    """Refuse a target ``[M]`` outside ``[0, K)`` that is not ``ignore_index``, as
    ``F.cross_entropy`` does: on CUDA with a device-side assert (``torch._assert_async``: no host
    sync on the training step's hot path; the error surfaces at the next sync, like
    ``F.cross_entropy``'s own); elsewhere an ``IndexError`` naming the value (one host read).
    Skipped on the stand-in device and inside CUDA graph capture."""
    if target.numel() == 0 or accel.is_stand_in(target.device):
        return
    if target.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= K))   # [M] bool
    if target.is_cuda:
        torch._assert_async(~bad.any(), f"linear_cross_entropy: a target is out of bounds for K = {K} classes "
                                        f"(each must be in [0, {K}) or equal ignore_index = {ignore_index})")
        return
    if accel.host_bool(bad.any()):                                     # CPU: the call's one host read
        values = accel.to_host(target[bad])
        raise IndexError(f"linear_cross_entropy: target {int(values[0])} is out of bounds for K = {K} "
                         f"classes ({values.numel()} bad target(s); each must be in [0, {K}) or equal "
                         f"ignore_index = {ignore_index})")


def _add_gemm_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc [K, D] fp32 += a [K, c] @ b [c, D]`` with the product written in fp32: for bf16 / fp16
    ``a``, ``b`` the GEMM's fp32 result is never rounded to the input dtype. On CUDA the GEMM
    takes the inputs as they are (cuBLAS, fp32 output); elsewhere (the CPU interpreter) they
    are upcast first."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    key = (a.device.type, a.dtype)
    mode = _FP32_OUT_GEMM.get(key)
    if mode is None:
        mode = _FP32_OUT_GEMM[key] = _pick_fp32_out_gemm(a) if a.is_cuda else "upcast"
    _GEMM_FORMS[mode](acc, a, b)


def _gemm_addmm(acc: Tensor, a: Tensor, b: Tensor) -> None:   # addmm.dtype_out into the accumulator
    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def _gemm_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:      # mm.dtype: fp32 product, then one add
    acc.add_(torch.mm(a, b, out_dtype=torch.float32))


def _gemm_upcast(acc: Tensor, a: Tensor, b: Tensor) -> None:
    acc.addmm_(a.float(), b.float())


_GEMM_FORMS = {"addmm": _gemm_addmm, "mm": _gemm_mm, "upcast": _gemm_upcast}


def _pick_fp32_out_gemm(a: Tensor) -> str:
    """The first fp32-output GEMM form that runs on ``a``'s device and dtype *and* gives the
    upcast GEMM's result on a small random case (an accumulator that already holds values, so
    a form that drops or misreads it is caught): once per (device type, dtype) and process."""
    g = torch.Generator(device=a.device).manual_seed(0)
    a_t = torch.randn(96, 40, device=a.device, generator=g).to(a.dtype)
    b_t = torch.randn(40, 72, device=a.device, generator=g).to(a.dtype)
    acc0 = torch.randn(96, 72, device=a.device, generator=g)
    want = acc0.double() + a_t.double() @ b_t.double()
    for mode in ("addmm", "mm"):
        acc = acc0.clone()
        try:
            _GEMM_FORMS[mode](acc, a_t, b_t)
        except (RuntimeError, TypeError, NotImplementedError):
            continue
        err = ((acc.double() - want).norm() / want.norm()).item()
        if err < 1e-5:
            return mode
        log.warning("linear_cross_entropy: the fp32-output GEMM form %r gives rel. error %.1e on %s %s; "
                    "not used", mode, err, a.device, a.dtype)
    return "upcast"


# dlogits are stored times this power of two (exact in every dtype): softmax of 16384 classes is
# ~6e-5, below fp16's smallest normal once divided by n_valid (seen on the H200: db rel. error 5.6e-2
# at M 2048, K 16384 in fp16); 1 - p times it stays far below fp16's max (65504)
DLOGITS_SCALE = 1024.0

# (device type, dtype) -> the fp32-output GEMM form that works there (checked on first use, see _add_gemm_fp32)
_FP32_OUT_GEMM: dict = {}


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
             ignore_index: int, compute_grad: bool, chunk_size: Optional[int]):
    """x [M, D], weight [K, D], bias [K] | None, target [M]
    -> loss (fp32 scalar), grad_x [M, D], grad_w [K, D], grad_b [K] (empty when unused)."""
    M, D = x.shape
    K = weight.shape[0]
    dev = x.device
    check_targets(target, K, ignore_index)
    n_valid = (target != ignore_index).sum().to(torch.float32)  # on device: no host sync
    inv_n = (1.0 / n_valid).reshape(1)  # inf when every row is ignored -> loss nan like F.cross_entropy
    # stored dlogits are (softmax - onehot) * DLOGITS_SCALE; the gradients are multiplied by
    # unscale = 1 / (n_valid * DLOGITS_SCALE) in fp32 at the end (0 when every row is ignored)
    unscale = torch.where(n_valid > 0, 1.0 / (n_valid * DLOGITS_SCALE), torch.zeros_like(n_valid))
    row_loss = torch.empty(M, device=dev, dtype=torch.float32)
    # distinct empty placeholders (custom-op outputs may not alias each other)
    grad_x, grad_w, grad_b = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    chunks = _row_chunks(M, K, chunk_size)
    n_chunks = len(chunks)
    if compute_grad:
        grad_x = torch.empty_like(x)
        # fp32 accumulators across chunks, scaled and cast once after the last chunk
        acc_w = torch.zeros(K, D, device=dev, dtype=torch.float32)
        acc_b = torch.zeros(K, device=dev, dtype=torch.float32) if bias is not None else None
    shape = f"x [M, D] = {list(x.shape)} {x.dtype}, weight [K, D] = {list(weight.shape)}, {n_chunks} chunks"
    for start, end in chunks:
        xc = x[start:end]  # [c, D]
        logits = torch.addmm(bias, xc, weight.t()) if bias is not None else xc @ weight.t()  # [c, K]
        _launch_rows(logits, target[start:end], row_loss[start:end], DLOGITS_SCALE, ignore_index, compute_grad, shape)
        if compute_grad:  # logits now hold dlogits * DLOGITS_SCALE [c, K]
            torch.mm(logits, weight, out=grad_x[start:end])  # [c, D]
            _add_gemm_fp32(acc_w, logits.t(), xc)             # [K, D] fp32
            if acc_b is not None:
                acc_b.add_(logits.sum(0, dtype=torch.float32))  # [K] fp32
    loss = row_loss.sum() * inv_n[0]
    if compute_grad:
        grad_x.mul_(unscale)                                   # fp32 product, one rounding
        grad_w = (acc_w * unscale).to(weight.dtype)
        if acc_b is not None:
            grad_b = (acc_b * unscale).to(bias.dtype)
    return loss, grad_x, grad_w, grad_b


# ----------------------------------------------------------------------------------------
# custom op (gradients are produced by the forward; backward scales them)
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("mam2_fast::linear_cross_entropy", mutates_args=())
def _lce_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
            compute_grad: bool, chunk_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        return _forward(x, weight, bias, target, ignore_index, compute_grad,
                        chunk_size if chunk_size > 0 else None)


@_lce_op.register_fake
def _lce_fake(x, weight, bias, target, ignore_index, compute_grad, chunk_size):
    loss = x.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return loss, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    gb = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return loss, x.new_empty(x.shape), weight.new_empty(weight.shape), gb


def _setup_context(ctx, inputs, output):
    x, weight, bias, target, ignore_index, compute_grad, chunk_size = inputs
    loss, gx, gw, gb = output
    ctx.has_bias = bias is not None
    ctx.compute_grad = compute_grad
    ctx.save_for_backward(gx, gw, gb)


def _backward(ctx, g_loss, _gx, _gw, _gb):
    if not ctx.compute_grad:
        raise RuntimeError("linear_cross_entropy: backward called although no input required "
                           "grad at forward time")
    gx, gw, gb = ctx.saved_tensors
    g = g_loss.to(torch.float32)
    dx = (gx * g).to(gx.dtype)
    dw = (gw * g).to(gw.dtype)
    db = (gb * g).to(gb.dtype) if ctx.has_bias else None
    return dx, dw, db, None, None, None, None


_lce_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                               ignore_index: int = -100, chunk_size: Optional[int] = None) -> Tensor:
    """Fused equivalent of :func:`reference.linear_cross_entropy_ref`.

    x ``[M, D]``, weight ``[K, D]``, bias ``[K]`` or None, target ``[M]`` int
    -> fp32 scalar loss (mean over rows whose target != ignore_index; nan if none).
    """
    name = "linear_cross_entropy"
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: need x [M, D] and weight [K, D], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if target.shape != (x.shape[0],):
        raise ValueError(f"{name}: target must be [M] = [{x.shape[0]}], got {tuple(target.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: bias must be [K] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: target must be int64/int32, got {target.dtype}")
    dt = accel.autocast_dtype(x.device)   # mimic F.linear under autocast (stand-in device too)
    if dt is not None:
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    check_float(name, "x", x)
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"{name}: x, weight and bias must share a dtype (got {x.dtype}, "
                        f"{weight.dtype}, {None if bias is None else bias.dtype}); cast first "
                        "or run under autocast with the cast done by the caller")
    check_device(name, x, weight, bias, target)
    needs = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                         (bias is not None and bias.requires_grad))
    loss, _, _, _ = _lce_op(x.contiguous(), weight.contiguous(),
                            None if bias is None else bias.contiguous(), target.contiguous(),
                            int(ignore_index), bool(needs), int(chunk_size or 0))
    return loss
