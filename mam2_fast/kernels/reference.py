"""Plain PyTorch references for every fused kernel.

These functions are the single source of truth for what a fused kernel must
compute. The reference model (``mam2_fast.models.mam2``) calls them directly when
``kernels: reference`` is selected, and every parity test imports them from here.

Layout conventions (shared with the model):

* clip: ``[B, T, C, H, W]`` normalized frames (float).
* tokens: ``[B, T, S, D]`` where ``S`` is the per-frame token slot count. With tube
  masking every frame holds the same spatial positions, so ``S = Nv`` (visible) or
  ``S = Nm`` (masked) and no validity mask is needed. With masks whose per-frame sets
  differ (random space-time, frame masking) the model keeps the full grid ``S = N`` and
  passes ``valid [B, T, N]`` (True where a token takes part); invalid slots are neither
  keys nor meaningful queries, and their outputs are zero.
* patches: ``patchify`` flattens each 16x16 patch in ``(ph, pw, c)`` order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------
def attention_ref(q: Tensor, k: Tensor, v: Tensor, key_valid: Optional[Tensor] = None,
                  scale: Optional[float] = None) -> Tensor:
    """Softmax attention. q ``[..., Lq, dh]``, k/v ``[..., Lk, dh]``, key_valid ``[..., Lk]``.

    Query rows whose keys are all invalid return zeros (never NaN).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [..., Lq, Lk]
    if key_valid is not None:
        kv = key_valid.unsqueeze(-2)  # [..., 1, Lk]
        scores = scores.masked_fill(~kv, float("-inf"))
        any_valid = kv.any(dim=-1, keepdim=True)  # [..., 1, 1]
        scores = torch.where(any_valid, scores, torch.zeros_like(scores))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        probs = probs * any_valid.to(probs.dtype)
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def factorized_attention_ref(qkv: Tensor, mode: str, valid: Optional[Tensor] = None,
                             scale: Optional[float] = None) -> Tensor:
    """Divided space-time attention straight from a fused qkv projection.

    qkv:   ``[B, T, S, 3, H, dh]`` (the qkv Linear output viewed, no copies needed).
    mode:  ``"temporal"``: each slot ``s`` attends over the T frames at that slot;
           ``"spatial"``: each frame attends over its S slots.
    valid: optional ``[B, T, S]`` bool; invalid slots are masked out as keys and give
           zero output rows.
    returns ``[B, T, S, H * dh]``.
    """
    B, T, S, three, H, dh = qkv.shape
    assert three == 3, f"qkv must be [B, T, S, 3, H, dh], got {tuple(qkv.shape)}"
    q, k, v = qkv.unbind(dim=3)  # each [B, T, S, H, dh]
    if mode == "temporal":
        perm = (0, 2, 3, 1, 4)  # -> [B, S, H, T, dh]
        kv_mask = None if valid is None else valid.permute(0, 2, 1).unsqueeze(2)  # [B, S, 1, T]
    elif mode == "spatial":
        perm = (0, 1, 3, 2, 4)  # -> [B, T, H, S, dh]
        kv_mask = None if valid is None else valid.unsqueeze(2)  # [B, T, 1, S]
    else:
        raise ValueError(f"mode must be 'temporal' or 'spatial', got {mode!r}")
    q, k, v = (t.permute(*perm) for t in (q, k, v))
    if kv_mask is not None:
        kv_mask = kv_mask.expand(*q.shape[:-1])  # [..., H, L]
    out = attention_ref(q, k, v, kv_mask, scale)  # [B, S, H, T, dh] or [B, T, H, S, dh]
    if mode == "temporal":
        out = out.permute(0, 3, 1, 2, 4)  # [B, T, S, H, dh]
    else:
        out = out.permute(0, 1, 3, 2, 4)  # [B, T, S, H, dh]
    out = out.reshape(B, T, S, H * dh)
    if valid is not None:
        out = out * valid.unsqueeze(-1).to(out.dtype)
    return out


def varlen_attention_ref(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, index: Optional[Tensor] = None,
                         scale: Optional[float] = None) -> Tensor:
    """Attention within segments of packed tokens (see ``kernels/varlen.py``).

    qkv ``[Ntok, 3, H, dh]``; segment g holds sequence positions ``cu_seqlens[g] ..
    cu_seqlens[g+1]-1``; position p is packed row ``index[p]`` (row p without index). Every
    row must lie in exactly one segment. Returns ``[Ntok, H*dh]``.
    """
    ntok, three, H, dh = qkv.shape
    assert three == 3, f"qkv must be [Ntok, 3, H, dh], got {tuple(qkv.shape)}"
    cu = cu_seqlens.long()
    G = cu.numel() - 1
    lens = cu[1:] - cu[:-1]                                             # [G]
    seg = torch.repeat_interleave(torch.arange(G, device=qkv.device), lens, output_size=ntok)  # [Ntok] segment of p
    slot = torch.arange(ntok, device=qkv.device) - cu[:-1][seg]         # [Ntok] place within it
    rows = torch.arange(ntok, device=qkv.device) if index is None else index.long()
    padded = qkv.new_zeros(G, max_seqlen, 3, H, dh).index_put((seg, slot), qkv[rows])  # [G, L, 3, H, dh]
    valid = torch.zeros(G, max_seqlen, dtype=torch.bool, device=qkv.device)
    valid[seg, slot] = True
    q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)                   # each [G, H, L, dh]
    out = attention_ref(q, k, v, valid[:, None, :].expand(G, H, max_seqlen), scale)  # [G, H, L, dh]
    out = out.transpose(1, 2)[seg, slot].reshape(ntok, H * dh)          # position order
    return out.new_zeros(ntok, H * dh).index_put((rows,), out)         # back to row order


# ----------------------------------------------------------------------------------------
# masked gather / scatter
# ----------------------------------------------------------------------------------------
def gather_tokens_ref(x: Tensor, idx: Tensor) -> Tensor:
    """Gather the same spatial slots in every frame. x ``[B, T, N, D]``, idx ``[B, K]`` long
    -> ``[B, T, K, D]``. Its backward is a scatter-add into ``[B, T, N, D]``."""
    B, T, N, D = x.shape
    index = idx[:, None, :, None].expand(B, T, idx.shape[1], D)
    return torch.gather(x, 2, index)


def gather_visible_add_pos_ref(x: Tensor, pos_t: Tensor, pos_s: Tensor, idx: Tensor) -> Tensor:
    """Visible-token gather fused with the separable position-embedding add.

    x ``[B, T, N, D]`` patch embeddings, pos_t ``[T, D]``, pos_s ``[N, D]``,
    idx ``[B, Nv]`` (sorted spatial indices kept in every frame) -> ``[B, T, Nv, D]``.
    """
    pos = pos_t[:, None, :] + pos_s[None, :, :]  # [T, N, D]
    return gather_tokens_ref(x + pos.unsqueeze(0), idx)


def scatter_tokens_ref(tokens: Tensor, idx: Tensor, N: int) -> Tensor:
    """Inverse of gather_tokens_ref: tokens ``[B, T, K, D]`` -> zeros-filled ``[B, T, N, D]``."""
    B, T, K, D = tokens.shape
    out = tokens.new_zeros(B, T, N, D)
    index = idx[:, None, :, None].expand(B, T, K, D)
    return out.scatter(2, index, tokens)


# ----------------------------------------------------------------------------------------
# targets and losses
# ----------------------------------------------------------------------------------------
def patchify(clip: Tensor, patch: int) -> Tensor:
    """clip ``[B, T, C, H, W]`` -> ``[B, T, N, patch*patch*C]`` in (ph, pw, c) order."""
    B, T, C, H, W = clip.shape
    if H % patch or W % patch:
        raise ValueError(f"clip size {H}x{W} is not divisible by patch {patch}")
    h, w = H // patch, W // patch
    x = clip.reshape(B, T, C, h, patch, w, patch)
    x = x.permute(0, 1, 3, 5, 4, 6, 2)  # [B, T, h, w, ph, pw, C]
    return x.reshape(B, T, h * w, patch * patch * C)


def unpatchify(patches: Tensor, patch: int, C: int, h: int, w: int) -> Tensor:
    """Inverse of patchify: ``[B, T, N, P*P*C]`` -> ``[B, T, C, h*P, w*P]``."""
    B, T = patches.shape[:2]
    x = patches.reshape(B, T, h, w, patch, patch, C).permute(0, 1, 6, 2, 4, 3, 5)
    return x.reshape(B, T, C, h * patch, w * patch)


def rgb_diff_target_ref(clip: Tensor, patch: int) -> Tensor:
    """RGB difference of every patch: x_t - x_{t-1} for t >= 1.

    clip ``[B, T, C, H, W]`` -> ``[B, T, N, P*P*C]``; frame 0 holds zeros (it has no target
    and is excluded from the loss).
    """
    p = patchify(clip, patch)
    diff = torch.zeros_like(p)
    diff[:, 1:] = p[:, 1:] - p[:, :-1]
    return diff


def rgb_diff_mse_ref(clip: Tensor, pred: Tensor, mask: Tensor, patch: int) -> Tensor:
    """Eq. 3: mean over masked patches of frames t >= 1 of the squared error (mean over the
    P*P*C values of a patch, as MAE/VideoMAE do).

    clip ``[B, T, C, H, W]``; pred ``[B, T, N, P*P*C]`` (only masked entries are read);
    mask ``[B, T, N]`` bool, True = masked. Returns a 0-dim tensor (0 when nothing counts).
    """
    target = rgb_diff_target_ref(clip, patch)
    sel = mask.clone()
    sel[:, 0] = False
    err = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [B, T, N]
    count = sel.sum()
    return (err * sel).sum() / count.clamp(min=1)


def rgb_diff_mse_tube_ref(clip: Tensor, pred: Tensor, mask_idx: Tensor, patch: int) -> Tensor:
    """Eq. 3 for tube masks: pred ``[B, T, Nm, P*P*C]`` holds the predictions for the masked
    spatial slots ``mask_idx [B, Nm]`` of every frame. Frames t >= 1 count; mean over the
    ``B * (T-1) * Nm`` patches of the per-patch mean squared error."""
    target = gather_tokens_ref(rgb_diff_target_ref(clip, patch), mask_idx)  # [B, T, Nm, PPC]
    B, T, Nm, _ = pred.shape
    if T < 2 or Nm == 0:
        return pred.sum() * 0.0
    err = ((pred[:, 1:].float() - target[:, 1:].float()) ** 2).mean(dim=-1)  # [B, T-1, Nm]
    return err.mean()


def rgb_diff_mse_packed_ref(clip: Tensor, pred: Tensor, rows: Tensor, patch: int) -> Tensor:
    """Eq. 3 for packed masked tokens: pred ``[M, P*P*C]`` holds the predictions for the flat
    token rows ``rows [M]`` (``b*T*N + t*N + n``). Rows of frame 0 have no target and do not
    count; mean over the counted rows of the per-patch mean squared error (0 when none)."""
    B, T = clip.shape[:2]
    target = rgb_diff_target_ref(clip, patch)                       # [B, T, N, PPC]
    N = target.shape[2]
    target = target.reshape(B * T * N, -1).index_select(0, rows)    # [M, PPC]
    counted = (rows // N) % T > 0                                   # [M]
    err = ((pred.float() - target.float()) ** 2).mean(dim=-1)       # [M]
    return (err * counted).sum() / counted.sum().clamp(min=1)


def linear_cross_entropy_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                             ignore_index: int = -100) -> Tensor:
    """``F.cross_entropy(x @ W.T + b, y)`` (mean over non-ignored rows).

    x ``[M, D]``, weight ``[K, D]``, bias ``[K]`` or None, target ``[M]`` long.
    """
    logits = F.linear(x, weight, bias).float()
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def group_norm_silu_ref(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float = 1e-6,
                        silu: bool = True) -> Tensor:
    """``[silu](F.group_norm(x))`` computed in fp32 (as bf16 autocast runs ``group_norm``);
    x ``[N, C, H, W]`` -> fp32 ``[N, C, H, W]``."""
    y = F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps)
    return F.silu(y) if silu else y
