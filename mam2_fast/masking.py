"""Mask generators for masked video modeling (Table 1d, Appendix E).

All strategies draw exact counts from a seedable ``torch.Generator`` and return a
:class:`MaskInfo`. ``mask`` is always ``[B, T, N]`` bool with True = masked (hidden from the
encoder). Strategies that mask the same spatial set in every frame (``tube``, ``cube``)
also give sorted per-sample index lists so the model can work on compact
``[B, T, Nv, D]`` tensors; the others (``random``, ``frame``) leave ``vis_idx`` None and the
model keeps the full grid with validity masks.

* tube  - VideoMAE: one 2-D uniform random mask of ``round(ratio*N)`` patches, broadcast
  over time.
* cube  - BEiT/BEVT block-wise 2-D mask (random rectangles of at least ``min_block``
  patches, aspect in [1/max_aspect, max_aspect]) broadcast over time, trimmed or
  topped up at random to exactly ``round(ratio*N)`` patches.
* random - MAE-ST: ``round(ratio*T*N)`` patches uniformly over space-time; per-frame
  counts differ.
* frame - ``round(ratio*T)`` whole frames masked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

MASK_KINDS = ("tube", "cube", "random", "frame")


@dataclass
class MaskInfo:
    mask: Tensor                       # [B, T, N] bool, True = masked
    vis_idx: Optional[Tensor] = None   # [B, Nv] long, sorted (tube-like masks only)
    mask_idx: Optional[Tensor] = None  # [B, Nm] long, sorted (tube-like masks only)
    packed: Optional[dict] = None      # {masked: PackedSegments} cache (other masks), see segments()

    @property
    def is_tube(self) -> bool:
        return self.vis_idx is not None

    def segments(self, masked: bool) -> "PackedSegments":
        """Packed layout of the masked (or visible) token set; computed once. Free of device
        syncs when first asked on the CPU mask (``to()`` does that for non-tube masks)."""
        if self.packed is None:
            self.packed = {}
        if masked not in self.packed:
            self.packed[masked] = packed_segments(self.mask if masked else ~self.mask)
        return self.packed[masked]

    def to(self, device: torch.device) -> "MaskInfo":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        if not self.is_tube and self.mask.device.type == "cpu":
            self.segments(False), self.segments(True)  # on the host, before the copy
        packed = None if self.packed is None else {k: v.to(device) for k, v in self.packed.items()}
        return MaskInfo(mv(self.mask), mv(self.vis_idx), mv(self.mask_idx), packed)

    @staticmethod
    def cat(infos: list["MaskInfo"]) -> "MaskInfo":
        """Concatenate per-sample masks along the batch (tube indices kept when all have them
        with equal counts)."""
        mask = torch.cat([i.mask for i in infos])
        if all(i.is_tube for i in infos) and len({i.mask_idx.shape[1] for i in infos}) == 1:
            return MaskInfo(mask, torch.cat([i.vis_idx for i in infos]), torch.cat([i.mask_idx for i in infos]))
        return MaskInfo(mask)

    @staticmethod
    def from_spatial(mask2d: Tensor, num_frames: int) -> "MaskInfo":
        """Build a tube-like MaskInfo from ``[B, N]`` bool masks with equal counts per row."""
        B, N = mask2d.shape
        counts = mask2d.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"tube masks need equal masked counts per sample, got {counts.tolist()}")
        order = torch.argsort(mask2d.to(torch.int8), dim=1, stable=True)  # visible first, ascending index
        nm = int(counts[0])
        vis_idx = order[:, : N - nm].sort(dim=1).values
        mask_idx = order[:, N - nm:].sort(dim=1).values
        mask = mask2d[:, None, :].expand(B, num_frames, N).contiguous()
        return MaskInfo(mask, vis_idx, mask_idx)


@dataclass
class PackedSegments:
    """The tokens where ``valid [B, T, N]`` is True, packed in (b, t, n) order, and the
    attention segments over them (for ``kernels.varlen_attention``):

    * spatial: one segment per (b, t), positions = packed rows in order (no index);
    * temporal: one segment per (b, n), positions read packed rows through ``temporal_index``
      (rows sorted by (b, n, t)).
    """
    rows: Tensor            # [Ntok] long: flat grid index (b*T + t)*N + n of each packed token
    sample: Tensor          # [Ntok] long: b of each packed token (per-sample drop path)
    batch_size: int
    spatial_cu: Tensor      # [B*T + 1] int32
    spatial_max: int
    temporal_index: Tensor  # [Ntok] int32
    temporal_cu: Tensor     # [B*N + 1] int32
    temporal_max: int
    per_sample: Optional[int] = None  # the tokens of every sample when all samples have as many

    def to(self, device: torch.device) -> "PackedSegments":
        mv = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedSegments(mv(self.rows), mv(self.sample), self.batch_size, mv(self.spatial_cu),
                              self.spatial_max, mv(self.temporal_index), mv(self.temporal_cu), self.temporal_max,
                              self.per_sample)


def packed_segments(valid: Tensor) -> PackedSegments:
    """``valid [B, T, N]`` bool -> :class:`PackedSegments`. Reads counts on the host (build it
    from the CPU mask, before the mask goes to the device, to avoid a device sync)."""
    if valid.dim() != 3 or valid.dtype != torch.bool:
        raise ValueError(f"packed_segments: valid must be bool [B, T, N], got {valid.dtype} {tuple(valid.shape)}")
    B, T, N = valid.shape
    rows = valid.reshape(-1).nonzero().squeeze(1)                                   # [Ntok]
    zero = torch.zeros(1, dtype=torch.int64, device=valid.device)
    per_frame = valid.sum(dim=2).reshape(-1)                                        # [B*T]
    per_slot = valid.sum(dim=1).reshape(-1)                                         # [B*N]
    b, t, n = rows // (T * N), (rows // N) % T, rows % N
    temporal_index = torch.argsort((b * N + n) * T + t).to(torch.int32)
    per_sample = per_frame.view(B, T).sum(dim=1)                                    # [B]
    uniform = B > 0 and bool((per_sample == per_sample[0]).all())
    return PackedSegments(
        rows=rows,
        sample=b,
        batch_size=B,
        spatial_cu=torch.cat([zero, per_frame.cumsum(0)]).to(torch.int32),
        spatial_max=int(per_frame.max()) if per_frame.numel() else 0,
        temporal_index=temporal_index,
        temporal_cu=torch.cat([zero, per_slot.cumsum(0)]).to(torch.int32),
        temporal_max=int(per_slot.max()) if per_slot.numel() else 0,
        per_sample=int(per_sample[0]) if uniform else None)


def num_masked(ratio: float, total: int) -> int:
    """Exact masked count: round(ratio * total), kept within [1, total - 1] when total > 1."""
    n = int(math.floor(ratio * total + 0.5))
    if total > 1:
        n = min(max(n, 1), total - 1)
    return n


class MaskGenerator:
    def __init__(self, kind: str, ratio: float, num_frames: int, grid: tuple[int, int],
                 min_block: int = 16, max_aspect: float = 3.0):
        if kind not in MASK_KINDS:
            raise ValueError(f"mask.kind: unknown strategy {kind!r} (choose from {MASK_KINDS})")
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask.ratio must be in (0, 1), got {ratio}")
        self.kind, self.ratio = kind, ratio
        self.T, (self.h, self.w) = num_frames, grid
        self.N = self.h * self.w
        self.min_block, self.max_aspect = min_block, max_aspect

    def __call__(self, batch_size: int, generator: Optional[torch.Generator] = None) -> MaskInfo:
        g = generator
        B, T, N = batch_size, self.T, self.N
        if self.kind == "tube":
            nm = num_masked(self.ratio, N)
            scores = torch.rand(B, N, generator=g)
            idx = scores.argsort(dim=1)[:, :nm]
            mask2d = torch.zeros(B, N, dtype=torch.bool).scatter_(1, idx, True)
            return MaskInfo.from_spatial(mask2d, T)
        if self.kind == "cube":
            mask2d = torch.stack([self._block_mask(g) for _ in range(B)])
            return MaskInfo.from_spatial(mask2d, T)
        if self.kind == "random":
            nm = num_masked(self.ratio, T * N)
            idx = torch.rand(B, T * N, generator=g).argsort(dim=1)[:, :nm]
            mask = torch.zeros(B, T * N, dtype=torch.bool).scatter_(1, idx, True)
            return MaskInfo(mask.view(B, T, N))
        # frame
        nm = num_masked(self.ratio, T) if T > 1 else 0
        if T == 1:
            raise ValueError("frame masking needs num_frames > 1")
        idx = torch.rand(B, T, generator=g).argsort(dim=1)[:, :nm]
        frames = torch.zeros(B, T, dtype=torch.bool).scatter_(1, idx, True)
        return MaskInfo(frames[:, :, None].expand(B, T, N).contiguous())

    def _block_mask(self, g: Optional[torch.Generator]) -> Tensor:
        """BEiT block-wise masking on the h x w grid with an exact final count."""
        h, w, N = self.h, self.w, self.N
        target = num_masked(self.ratio, N)
        mask = torch.zeros(h, w, dtype=torch.bool)
        log_aspect = (math.log(1.0 / self.max_aspect), math.log(self.max_aspect))
        count, attempts = 0, 0
        while count < target and attempts < 100 * N:
            attempts += 1
            max_patches = target - count
            lo = min(self.min_block, max_patches)
            area = lo + float(torch.rand(1, generator=g)) * (max_patches - lo)
            aspect = math.exp(log_aspect[0] + float(torch.rand(1, generator=g)) * (log_aspect[1] - log_aspect[0]))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if bh < 1 or bw < 1 or bh > h or bw > w:
                continue
            top = int(torch.randint(0, h - bh + 1, (1,), generator=g))
            left = int(torch.randint(0, w - bw + 1, (1,), generator=g))
            block = mask[top: top + bh, left: left + bw]
            new = int((~block).sum())
            if 0 < new <= max_patches:
                block.fill_(True)
                count += new
        flat = mask.flatten()
        diff = target - int(flat.sum())
        if diff > 0:  # top up at random among unmasked
            free = (~flat).nonzero().squeeze(1)
            flat[free[torch.randperm(free.numel(), generator=g)[:diff]]] = True
        elif diff < 0:
            taken = flat.nonzero().squeeze(1)
            flat[taken[torch.randperm(taken.numel(), generator=g)[:-diff]]] = False
        return flat
