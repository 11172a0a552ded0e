"""The fused launches of a run, computed at its real shapes without memory or a GPU.

A run's launch grids depend only on a few shapes: batch, frames, patches per frame, widths,
heads, the mask (kind, ratio) and the appearance vocabulary. :class:`RunShapes` holds them
(:meth:`RunShapes.of_model` reads them off a built model), and :func:`planned_calls` lists
every fused op call that the model makes in one training step, in the order it makes them,
each as a function that runs that op's launch computation, forward and backward, on ``meta``
tensors. Under :func:`_common.recording_launches` every launch checks its grid against CUDA's
limits and is recorded instead of run, so

* :func:`record_launches` returns the grids of a step (the test of every shipped preset at
  batch 1..256, ``tests/test_launch_limits.py``), and
* :func:`check_launch_limits` returns ``{op: error}`` for the ops CUDA would refuse (the
  start-of-run check, ``selfcheck.resolve_backend``).

Which ops a step calls (``models/mam2.py``, ``models/classifier.py``), with ``kernels`` fused:

* tube-like masks (tube, cube), ``Nv`` visible and ``Nm`` masked slots per frame: the visible
  gather + positions, encoder attention on ``[B, T, Nv]``; the alignment target (no grad): the
  masked gather and encoder attention on ``[B, T, Nm]``; decoder attention on ``[B, T, Nm]``
  (clip order: the motion decoder on ``[B, 1+T, Nm]``); the appearance CE on ``B*T*Nm`` rows,
  or for pixel / flow targets the gather of the target (no grad); the tube RGB-difference loss.
* random and frame masks: the same on packed token sets with varlen attention (spatial
  segments per (b, t), temporal per (b, n)); the packed RGB-difference loss.
* without the regressor (Table 2): decoders on the full grid and the masked gather after.
* fine-tuning / evaluation (:class:`~mam2_fast.models.classifier.VideoClassifier`): encoder
  attention on the full grid ``[B, T, N]``.

The VideoMAE baseline (joint attention through SDPA) makes no fused call.

Packed segments take their worst-case length (a frame's N slots, a slot's T frames, capped by
the set's size): the largest grid any draw of the mask can give.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, List, NamedTuple, Optional

import torch

from mam2_fast.kernels._common import LaunchLimitError, LaunchRecord, recording_launches
from mam2_fast.masking import num_masked

_META = torch.device("meta")


@dataclass(frozen=True)
class RunShapes:
    """The shapes that decide a run's fused launches."""
    batch: int                    # clips per step on one device
    frames: int                   # T
    patches: int                  # N, patches per frame
    patch: int                    # P
    channels: int                 # C
    embed_dim: int                # encoder width D
    heads: int                    # encoder heads
    decoder_dim: int = 0          # regressor / decoder width D' (pre-training only)
    decoder_heads: int = 0
    mask_kind: Optional[str] = None   # tube | cube | random | frame; None: all tokens (fine-tuning)
    mask_ratio: float = 0.0
    vocab_size: Optional[int] = None  # appearance classes with the token target
    appearance_target: Optional[str] = "tokens"   # tokens | pixels | None (no appearance task)
    motion_target: Optional[str] = "rgb_diff"     # rgb_diff | flow | clip_order | None
    use_regressor: bool = True
    use_alignment: bool = True
    train: bool = True            # backward launches too

    def with_batch(self, batch: int) -> "RunShapes":
        return replace(self, batch=batch)

    @staticmethod
    def of_model(model: torch.nn.Module, batch: int, mask_kind: Optional[str] = None,
                 mask_ratio: float = 0.0, train: bool = True) -> Optional["RunShapes"]:
        """Shapes of a built MAM2 or video classifier / encoder (any device, ``meta`` too);
        None for a model without fused ops (the VideoMAE baseline)."""
        from mam2_fast.models.mam2 import MAM2, FactorizedAttention

        attn = [m for m in model.modules() if isinstance(m, FactorizedAttention)]
        if not attn:
            return None
        if isinstance(model, MAM2):
            cfg = model.cfg
            enc_heads = model.blocks[0].attn.num_heads if len(model.blocks) else 1
            decoder = model.appearance_decoder or model.motion_decoder
            dec_heads = decoder.blocks[0].attn.num_heads if decoder is not None and len(decoder.blocks) \
                else enc_heads
            head = model.appearance_head
            return RunShapes(
                batch=batch, frames=model.num_frames, patches=model.num_patches, patch=model.patch_size,
                channels=model.in_chans, embed_dim=model.embed_dim, heads=enc_heads,
                decoder_dim=model.decoder_dim, decoder_heads=dec_heads,
                mask_kind=mask_kind or "tube", mask_ratio=mask_ratio,
                vocab_size=head.out_features if head is not None else model.vocab_size,
                appearance_target=model.appearance_target if cfg.use_appearance else None,
                motion_target=model.motion_target if cfg.use_motion else None,
                use_regressor=cfg.use_regressor, use_alignment=cfg.use_alignment, train=train)
        encoder = next(m for m in model.modules() if hasattr(m, "forward_features") and hasattr(m, "num_patches"))
        return RunShapes(batch=batch, frames=encoder.num_frames, patches=encoder.num_patches,
                         patch=encoder.patch_size, channels=encoder.in_chans,
                         embed_dim=attn[0].num_heads * attn[0].head_dim, heads=attn[0].num_heads,
                         mask_kind=None, train=train)


class PlannedCall(NamedTuple):
    op: str                     # the dispatch name (kernels.FUSED_OPS)
    what: str                   # where the model makes the call
    run: Callable[[], None]     # its launch computation (forward, and backward when training)


# ----------------------------------------------------------------------------------------
# one op's launch computation on meta tensors
# ----------------------------------------------------------------------------------------
def _attention(B: int, T: int, S: int, D: int, H: int, dtype, train: bool) -> Callable[[], None]:
    def run():
        from mam2_fast.kernels import attention
        dh = D // H
        qkv = torch.empty(B, T, S, 3 * D, device=_META, dtype=dtype).view(B, T, S, 3, H, dh)
        for mode in ("temporal", "spatial"):
            out, lse = attention._fwd(qkv, None, mode, dh ** -0.5)            # [B, T, S, D]
            if train:
                attention._bwd(torch.empty_like(out), qkv, out, lse, None, mode, dh ** -0.5)
    return run


def _varlen(B: int, T: int, N: int, per_sample: int, frame_max: int, slot_max: int,
            D: int, H: int, dtype, train: bool) -> Callable[[], None]:
    """Packed set of ``per_sample`` tokens per clip; spatial segments per (b, t) of at most
    ``frame_max`` tokens, temporal segments per (b, n) of at most ``slot_max``."""
    def run():
        from mam2_fast.kernels import varlen
        ntok, dh = B * per_sample, D // H
        qkv = torch.empty(ntok, 3 * D, device=_META, dtype=dtype).view(ntok, 3, H, dh)
        temporal_index = torch.empty(ntok, device=_META, dtype=torch.int32)
        for segments, longest, index in ((B * T, frame_max, None), (B * N, slot_max, temporal_index)):
            cu = torch.empty(segments + 1, device=_META, dtype=torch.int32)
            out, lse = varlen._fwd(qkv, cu, index, longest, dh ** -0.5)         # [Ntok, D]
            if train:
                varlen._bwd(torch.empty_like(out), qkv, out, lse, cu, index, longest, dh ** -0.5)
    return run


def _gather_add_pos(B: int, T: int, N: int, K: int, D: int, dtype, train: bool) -> Callable[[], None]:
    def run():
        from mam2_fast.kernels import gather
        x = torch.empty(B, T, N, D, device=_META, dtype=dtype)
        pos_t = torch.empty(T, D, device=_META, dtype=torch.float32)
        pos_s = torch.empty(N, D, device=_META, dtype=torch.float32)
        idx = torch.empty(B, K, device=_META, dtype=torch.int64)
        out = gather._gather(x, pos_t, pos_s, idx, gather._out_dtype(x, pos_t, pos_s))  # [B, T, K, D]
        if train:
            gather._gather_pos_bwd(torch.empty_like(out), idx, N, True)
    return run


def _gather_tokens(B: int, T: int, N: int, K: int, D: int, dtype, train: bool) -> Callable[[], None]:
    def run():
        from mam2_fast.kernels import gather
        x = torch.empty(B, T, N, D, device=_META, dtype=dtype)
        idx = torch.empty(B, K, device=_META, dtype=torch.int64)
        out = gather._gather(x, None, None, idx, dtype)                          # [B, T, K, D]
        if train:
            gather._scatter(torch.empty_like(out), idx, N)
    return run


def _linear_ce(M: int, D: int, K: int, dtype, train: bool) -> Callable[[], None]:
    """The row-kernel launches of ``linear_ce._forward`` over its chunks (the logits and
    gradient GEMMs between them are cuBLAS calls, not Triton launches)."""
    def run():
        from mam2_fast.kernels import linear_ce
        target = torch.empty(M, device=_META, dtype=torch.int64)
        row_loss = torch.empty(M, device=_META, dtype=torch.float32)
        inv_n = torch.empty(1, device=_META, dtype=torch.float32)
        chunks = linear_ce._row_chunks(M, K, None)
        shape = f"x [M, D] = {[M, D]} {dtype}, weight [K, D] = {[K, D]}, {len(chunks)} chunks"
        for start, end in chunks:
            logits = torch.empty(end - start, K, device=_META, dtype=dtype)     # [c, K]
            linear_ce._launch_rows(logits, target[start:end], row_loss[start:end], inv_n, -100, train, shape)
    return run


def _clip(s: RunShapes, dtype) -> torch.Tensor:
    side = int(round(s.patches ** 0.5)) * s.patch
    return torch.empty(s.batch, s.frames, s.channels, side, side, device=_META, dtype=dtype)


def _rgb_diff_tube(s: RunShapes, Nm: int, dtype, train: bool) -> Callable[[], None]:
    def run():
        from mam2_fast.kernels import rgb_diff_loss
        clip, ppc = _clip(s, dtype), s.patch * s.patch * s.channels
        pred = torch.empty(s.batch, s.frames, Nm, ppc, device=_META, dtype=dtype)
        idx = torch.empty(s.batch, Nm, device=_META, dtype=torch.int64)
        partial = torch.empty(s.batch * (s.frames - 1) * Nm, device=_META, dtype=torch.float32)
        rgb_diff_loss._launch(clip, pred, idx, s.patch, partial, partial, backward=False)
        if train:
            scale = torch.empty(1, device=_META, dtype=torch.float32)
            rgb_diff_loss._launch(clip, pred, idx, s.patch, torch.empty_like(pred), scale, backward=True)
    return run


def _rgb_diff_packed(s: RunShapes, M: int, dtype, train: bool) -> Callable[[], None]:
    def run():
        from mam2_fast.kernels import rgb_diff_loss
        clip, ppc = _clip(s, dtype), s.patch * s.patch * s.channels
        pred = torch.empty(M, ppc, device=_META, dtype=dtype)
        rows = torch.empty(M, device=_META, dtype=torch.int64)
        partial = torch.empty(M, device=_META, dtype=torch.float32)
        rgb_diff_loss._launch_packed(clip, pred, rows, s.patch, partial, partial, backward=False)
        if train:
            scale = torch.empty(1, device=_META, dtype=torch.float32)
            rgb_diff_loss._launch_packed(clip, pred, rows, s.patch, torch.empty_like(pred), scale, backward=True)
    return run


# ----------------------------------------------------------------------------------------
# the calls of one step
# ----------------------------------------------------------------------------------------
def planned_calls(s: RunShapes, dtype: torch.dtype = torch.bfloat16) -> List[PlannedCall]:
    """Every fused op call of one step of a run with shapes ``s`` (see the module docstring)."""
    B, T, N, D, H, train = s.batch, s.frames, s.patches, s.embed_dim, s.heads, s.train
    calls: List[PlannedCall] = []
    add = lambda op, what, run: calls.append(PlannedCall(op, what, run))  # noqa: E731
    if s.mask_kind is None:  # fine-tuning / evaluation: the encoder on every token
        add("factorized_attention", f"encoder [B, T, N] = {[B, T, N]}", _attention(B, T, N, D, H, dtype, train))
        return calls
    Dd, Hd = s.decoder_dim or D, s.decoder_heads or H
    ppc = s.patch * s.patch * s.channels
    decoders = s.appearance_target is not None or s.motion_target not in (None, "clip_order")

    if s.mask_kind in ("tube", "cube"):
        Nm = num_masked(s.mask_ratio, N)
        Nv = N - Nm
        add("gather_visible_add_pos", f"visible tokens + positions, Nv {Nv}",
            _gather_add_pos(B, T, N, Nv, D, dtype, train))
        add("factorized_attention", f"encoder [B, T, Nv] = {[B, T, Nv]}", _attention(B, T, Nv, D, H, dtype, train))
        if s.use_alignment:
            add("gather_visible_add_pos", f"alignment target: masked tokens, Nm {Nm}",
                _gather_add_pos(B, T, N, Nm, D, dtype, False))
            add("factorized_attention", f"alignment target encoder [B, T, Nm] = {[B, T, Nm]}",
                _attention(B, T, Nm, D, H, dtype, False))
        dec_slots = Nm if s.use_regressor else N
        if decoders:
            add("factorized_attention", f"decoders [B, T, {dec_slots}]", _attention(B, T, dec_slots, Dd, Hd, dtype, train))
        if s.motion_target == "clip_order":
            add("factorized_attention", f"clip-order decoder [B, 1+T, Nm] = {[B, 1 + T, Nm]}",
                _attention(B, T + 1, Nm, Dd, Hd, dtype, train))
        if not s.use_regressor:
            add("gather_tokens", "decoder output -> masked tokens", _gather_tokens(B, T, N, Nm, Dd, dtype, train))
        if s.appearance_target == "tokens" and s.vocab_size:
            add("linear_cross_entropy", f"appearance head, M = B*T*Nm = {B * T * Nm}",
                _linear_ce(B * T * Nm, Dd, s.vocab_size, dtype, train))
        elif s.appearance_target == "pixels":
            add("gather_tokens", "pixel target at the masked tokens", _gather_tokens(B, T, N, Nm, ppc, torch.float32, False))
        if s.motion_target == "rgb_diff":
            add("rgb_diff_mse_tube", "motion loss (Eq. 3)", _rgb_diff_tube(s, Nm, dtype, train))
        elif s.motion_target == "flow":
            add("gather_tokens", "flow target at the masked tokens",
                _gather_tokens(B, T, N, Nm, s.patch * s.patch * 2, torch.float32, False))
        return calls

    # random / frame masks: packed token sets, varlen attention
    if s.mask_kind == "random":
        masked = num_masked(s.mask_ratio, T * N)
        visible = T * N - masked
        vis_frame, vis_slot = min(N, visible), min(T, visible)   # longest possible segments
        msk_frame, msk_slot = min(N, masked), min(T, masked)
    elif s.mask_kind == "frame":
        masked_frames = num_masked(s.mask_ratio, T)
        masked, visible = masked_frames * N, (T - masked_frames) * N
        vis_frame, vis_slot, msk_frame, msk_slot = N, T - masked_frames, N, masked_frames
    else:
        raise ValueError(f"launch_plan: unknown mask kind {s.mask_kind!r}")
    add("varlen_attention", f"encoder, packed visible set ({visible} per clip)",
        _varlen(B, T, N, visible, vis_frame, vis_slot, D, H, dtype, train))
    if s.use_alignment:
        add("varlen_attention", f"alignment target encoder, packed masked set ({masked} per clip)",
            _varlen(B, T, N, masked, msk_frame, msk_slot, D, H, dtype, False))
    if decoders:
        if s.use_regressor:
            add("varlen_attention", f"decoders, packed masked set ({masked} per clip)",
                _varlen(B, T, N, masked, msk_frame, msk_slot, Dd, Hd, dtype, train))
        else:
            add("factorized_attention", f"decoders [B, T, N] = {[B, T, N]}", _attention(B, T, N, Dd, Hd, dtype, train))
    if s.appearance_target == "tokens" and s.vocab_size:
        add("linear_cross_entropy", f"appearance head, M = B*{masked} = {B * masked}",
            _linear_ce(B * masked, Dd, s.vocab_size, dtype, train))
    if s.motion_target == "rgb_diff" and s.use_regressor:
        add("rgb_diff_mse_packed", "motion loss (Eq. 3), packed", _rgb_diff_packed(s, B * masked, dtype, train))
    return calls


def record_launches(s: RunShapes, dtype: torch.dtype = torch.bfloat16) -> List[LaunchRecord]:
    """The checked grids of every fused launch of one step; raises
    :class:`~mam2_fast.kernels._common.LaunchLimitError` at the first that CUDA would refuse."""
    with recording_launches() as records:
        for call in planned_calls(s, dtype):
            call.run()
    return records


def check_launch_limits(s: RunShapes, dtype: torch.dtype = torch.bfloat16) -> dict:
    """``{op: error}`` for the fused ops whose launches at shapes ``s`` CUDA would refuse."""
    problems: dict = {}
    with recording_launches():
        for call in planned_calls(s, dtype):
            if call.op in problems:
                continue
            try:
                call.run()
            except LaunchLimitError as e:
                problems[call.op] = f"{call.what}: {e}"
    return problems
