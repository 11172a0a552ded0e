"""Analytic minimum memory traffic of each fused op (shapes -> bytes), for the "% of copy
bandwidth" columns of ``bench_kernels.py``.

The minimum of a pass is: every input element the pass needs read once, every output element
written once, nothing else (no intermediates, no re-reads). What "needs" means here is exactly
what ``tests/test_kernel_bytes.py`` measures on the PyTorch references: an input element is
read when the pass's result depends on it (float inputs: a nonzero derivative; index and mask
inputs: read in full), and every output (a gradient included) is written in full, its zeros
too. So

* a gather reads only the gathered rows of ``x``, but its backward writes the dense ``dx``;
* the RGB-difference loss reads each clip pixel of the masked patches once (frame ``t`` is
  the minuend of one difference and the subtrahend of the next), and the predictions of
  frames ``t >= 1`` only (frame 0 has no target);
* an attention backward reads q, k, v and dO (o and the softmax statistics can be recomputed
  from them); a token alone in its attention group (one key: its softmax is 1, its output is
  its v) needs only v forward and only dO backward -- the ``singletons`` arguments;
* rows of a cross-entropy whose target is ``ignore_index`` are not read.

Each function returns :class:`MinBytes` ``(fwd, bwd)``: the forward pass, and the backward
pass alone (forward + backward = ``.total``). Dtypes are ``torch.dtype``; counts that depend
on the data (which spatial positions a batch of tube masks uses, how many packed rows sit in
frame 0, ...) come from the helpers at the end, which read host tensors.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

__all__ = ["MinBytes", "factorized_attention_bytes", "varlen_attention_bytes", "gather_tokens_bytes",
           "gather_visible_add_pos_bytes", "rgb_diff_mse_tube_bytes", "rgb_diff_mse_packed_bytes",
           "linear_cross_entropy_bytes", "attention_group_counts", "segment_singletons",
           "rgb_packed_counts", "positions_used"]


class MinBytes(NamedTuple):
    fwd: int   # forward: inputs read + output written
    bwd: int   # backward alone: dout + the inputs the gradients depend on read, gradients written

    @property
    def total(self) -> int:
        """forward + backward (a training step's traffic for the op)."""
        return self.fwd + self.bwd


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"kernel_bytes: {msg}")


# ----------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------
def factorized_attention_bytes(B: int, T: int, S: int, H: int, dh: int, dtype: torch.dtype,
                               valid_tokens: Optional[int] = None, singletons: int = 0,
                               mask_dtype: torch.dtype = torch.bool) -> MinBytes:
    """``factorized_attention(qkv [B, T, S, 3, H, dh], mode, valid)`` -> ``[B, T, S, H*dh]``
    (temporal and spatial alike). ``valid_tokens``: the number of True entries of ``valid
    [B, T, S]`` (None: no mask, every slot takes part); ``singletons``: the tokens alone in
    their attention group (:func:`attention_group_counts`; 0 at the benchmark's shapes).

    forward : q, k, v of the tokens (v only for singletons) + the mask; write the dense output.
    backward: q, k, v (none for singletons) + mask + dO of the tokens; write the dense dqkv.
    """
    el, D, grid = _size(dtype), H * dh, B * T * S
    n = grid if valid_tokens is None else valid_tokens
    _check(0 <= singletons <= n <= grid, f"need 0 <= singletons ({singletons}) <= tokens ({n}) <= {grid}")
    multi = n - singletons
    mask = 0 if valid_tokens is None else grid * _size(mask_dtype)
    fwd = (3 * multi + singletons) * D * el + mask + grid * D * el
    bwd = 3 * multi * D * el + mask + n * D * el + grid * 3 * D * el
    return MinBytes(fwd, bwd)


def varlen_attention_bytes(ntok: int, segments: int, H: int, dh: int, dtype: torch.dtype,
                           indexed: bool = False, singletons: int = 0,
                           cu_dtype: torch.dtype = torch.int32,
                           index_dtype: torch.dtype = torch.int32) -> MinBytes:
    """``varlen_attention(qkv [Ntok, 3, H, dh], cu_seqlens [segments+1], max_seqlen, index)``
    -> ``[Ntok, H*dh]``; ``indexed``: a position -> row ``index [Ntok]`` is passed;
    ``singletons``: tokens of 1-token segments (:func:`segment_singletons`)."""
    el, D = _size(dtype), H * dh
    _check(0 <= singletons <= ntok, f"singletons ({singletons}) must lie in [0, ntok = {ntok}]")
    meta = (segments + 1) * _size(cu_dtype) + (ntok * _size(index_dtype) if indexed else 0)
    multi = ntok - singletons
    fwd = (3 * multi + singletons) * D * el + meta + ntok * D * el
    bwd = 3 * multi * D * el + meta + ntok * D * el + ntok * 3 * D * el
    return MinBytes(fwd, bwd)


# ----------------------------------------------------------------------------------------
# gathers
# ----------------------------------------------------------------------------------------
def gather_tokens_bytes(B: int, T: int, N: int, K: int, D: int, dtype: torch.dtype,
                        idx_dtype: torch.dtype = torch.int64) -> MinBytes:
    """``gather_tokens(x [B, T, N, D], idx [B, K])`` -> ``[B, T, K, D]``.

    forward : the K gathered rows of every frame + idx; write the output.
    backward: dout + idx (not x); write the dense dx ``[B, T, N, D]`` (zeros off idx)."""
    el = _size(dtype)
    rows, idx = B * T * K * D * el, B * K * _size(idx_dtype)
    return MinBytes(rows + idx + rows, rows + idx + B * T * N * D * el)


def gather_visible_add_pos_bytes(B: int, T: int, N: int, K: int, D: int, dtype: torch.dtype,
                                 pos_dtype: Optional[torch.dtype] = None,
                                 idx_dtype: torch.dtype = torch.int64,
                                 pos_rows: Optional[int] = None) -> MinBytes:
    """``gather_visible_add_pos(x [B, T, N, D], pos_t [T, D], pos_s [N, D], idx [B, K])`` ->
    ``[B, T, K, D]`` in the promoted dtype of x and the tables (the model: bf16 x, fp32
    tables -> fp32). ``pos_rows``: the spatial positions some row of idx uses
    (:func:`positions_used`; default N, all of them).

    forward : gathered rows of x + pos_t + the used rows of pos_s + idx; write the output.
    backward: dout + idx (no x, no tables); write dense dx, dpos_t, dpos_s."""
    pos_dtype = dtype if pos_dtype is None else pos_dtype
    el, pe = _size(dtype), _size(pos_dtype)
    oe = _size(torch.promote_types(dtype, pos_dtype))
    pos_rows = N if pos_rows is None else pos_rows
    _check(0 <= pos_rows <= N, f"pos_rows ({pos_rows}) must lie in [0, N = {N}]")
    g, idx = B * T * K * D, B * K * _size(idx_dtype)
    fwd = g * el + T * D * pe + pos_rows * D * pe + idx + g * oe
    bwd = g * oe + idx + B * T * N * D * el + T * D * pe + N * D * pe
    return MinBytes(fwd, bwd)


# ----------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------
def rgb_diff_mse_tube_bytes(B: int, T: int, Nm: int, patch: int, pred_dtype: torch.dtype,
                            clip_dtype: torch.dtype = torch.float32, channels: int = 3,
                            idx_dtype: torch.dtype = torch.int64,
                            loss_dtype: torch.dtype = torch.float32) -> MinBytes:
    """``rgb_diff_mse_tube(clip [B, T, C, H, W], pred [B, T, Nm, P*P*C], mask_idx [B, Nm])``
    -> 0-dim loss. Needs T >= 2 and Nm >= 1 (else the loss is a constant 0).

    forward : the clip's pixels of the Nm masked patches in all T frames (once each), pred of
              frames 1..T-1, mask_idx; write the loss.
    backward: the same + dloss; write the dense dpred (frame 0: zeros)."""
    _check(T >= 2 and Nm >= 1, f"needs T >= 2 and Nm >= 1, got T = {T}, Nm = {Nm}")
    P = patch * patch * channels
    pe = _size(pred_dtype)
    reads = B * T * Nm * P * _size(clip_dtype) + B * (T - 1) * Nm * P * pe + B * Nm * _size(idx_dtype)
    le = _size(loss_dtype)
    return MinBytes(reads + le, reads + le + B * T * Nm * P * pe)


def rgb_diff_mse_packed_bytes(M: int, counted: int, clip_patches: int, patch: int, pred_dtype: torch.dtype,
                              clip_dtype: torch.dtype = torch.float32, channels: int = 3,
                              rows_dtype: torch.dtype = torch.int64,
                              loss_dtype: torch.dtype = torch.float32) -> MinBytes:
    """``rgb_diff_mse_packed(clip, pred [M, P*P*C], rows [M])`` -> 0-dim loss. ``counted``: rows
    in frames t >= 1; ``clip_patches``: distinct clip patches their targets use (the row's and
    the previous frame's); both from :func:`rgb_packed_counts`. Needs counted >= 1.

    forward : those clip patches, pred of the counted rows, rows; write the loss.
    backward: the same + dloss; write the dense dpred."""
    _check(1 <= counted <= M, f"needs 1 <= counted ({counted}) <= M ({M})")
    P = patch * patch * channels
    pe = _size(pred_dtype)
    reads = clip_patches * P * _size(clip_dtype) + counted * P * pe + M * _size(rows_dtype)
    le = _size(loss_dtype)
    return MinBytes(reads + le, reads + le + M * P * pe)


def linear_cross_entropy_bytes(M: int, D: int, K: int, dtype: torch.dtype,
                               weight_dtype: Optional[torch.dtype] = None, bias: bool = True,
                               ignored: int = 0, target_dtype: torch.dtype = torch.int64,
                               loss_dtype: torch.dtype = torch.float32) -> MinBytes:
    """``linear_cross_entropy(x [M, D], weight [K, D], bias [K], target [M])`` -> 0-dim loss
    (mean over the rows not ``ignore_index``; ``ignored`` of them are, at least one is not).

    forward : x of the counted rows, W, b, target; write the loss (the [M, K] logits are
              never needed in memory).
    backward: the same + dloss; write the dense dx, dW, db."""
    _check(0 <= ignored < M, f"needs 0 <= ignored ({ignored}) < M ({M})")
    we = _size(dtype if weight_dtype is None else weight_dtype)
    xe = _size(dtype)
    params = K * D * we + (K * we if bias else 0)
    reads = (M - ignored) * D * xe + params + M * _size(target_dtype)
    le = _size(loss_dtype)
    return MinBytes(reads + le, reads + le + M * D * xe + params)


# ----------------------------------------------------------------------------------------
# data-dependent counts (host tensors)
# ----------------------------------------------------------------------------------------
def attention_group_counts(valid: torch.Tensor, mode: str) -> Tuple[int, int]:
    """``valid [B, T, S]`` -> (valid tokens, tokens alone in their group) for ``mode``
    (temporal: groups are the (b, s) columns over T; spatial: the (b, t) frames)."""
    per_group = valid.sum(dim=1 if mode == "temporal" else 2)
    return int(valid.sum()), int((per_group == 1).sum())


def segment_singletons(cu_seqlens: torch.Tensor) -> int:
    """Tokens in 1-token segments of ``cu_seqlens``."""
    lens = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    return int((lens == 1).sum())


def rgb_packed_counts(rows: torch.Tensor, T: int, N: int) -> Tuple[int, int]:
    """Flat rows ``b*T*N + t*N + n`` -> (rows with t >= 1, distinct clip patches their
    targets read: the row's own and the one a frame earlier)."""
    rows = rows.long()
    counted = rows[(rows // N) % T > 0]
    return int(counted.numel()), int(torch.cat([counted, counted - N]).unique().numel())


def positions_used(idx: torch.Tensor) -> int:
    """Distinct spatial positions over the rows of ``idx [B, K]`` (rows of pos_s a gather reads)."""
    return int(idx.unique().numel())
