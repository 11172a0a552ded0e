"""Pixel reconstruction target (MAE / VideoMAE / MAE-ST style), per frame and per patch.

``pixel_target(clip [B, T, C, H, W], patch, normalize=True) -> [B, T, N, P*P*C]`` with
patches flattened in ``(ph, pw, c)`` order (``mam2_fast.kernels.reference.patchify``).

Normalization (``normalize=True``) is per patch:

* ``norm_mode="videomae"`` (default): each channel of a patch separately, over its P*P
  pixels, ``(x - mean) / (std_unbiased + 1e-6)`` -- VideoMAE's ``normlize_target``;
* ``norm_mode="mae"``: over all P*P*C values of the patch, ``(x - mean) / sqrt(var + 1e-6)``
  (biased var) -- MAE / MAE-ST's ``norm_pix_loss``.

If the clip was normalized with a per-channel ``mean``/``std`` (ImageNet statistics), pass
them to undo it first, as VideoMAE does; with ``norm_mode="videomae"`` this only changes
the result through the epsilon, with ``"mae"`` and with ``normalize=False`` it matters.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from mam2_fast.kernels.reference import patchify

NORM_MODES = ("videomae", "mae")


def pixel_target(clip: Tensor, patch: int, normalize: bool = True, norm_mode: str = "videomae",
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 eps: float = 1e-6) -> Tensor:
    """clip ``[B, T, C, H, W]`` -> per-patch (optionally normalized) pixels ``[B, T, N, P*P*C]``
    in float32, ``(ph, pw, c)`` order."""
    if clip.dim() != 5:
        raise ValueError(f"pixel_target expects clip [B, T, C, H, W], got {tuple(clip.shape)}")
    if norm_mode not in NORM_MODES:
        raise ValueError(f"pixel_target: unknown norm_mode {norm_mode!r} (known: {', '.join(NORM_MODES)})")
    x = clip.float()
    C = x.shape[2]
    if mean is not None or std is not None:
        m = torch.as_tensor(mean if mean is not None else [0.0] * C, dtype=x.dtype, device=x.device)
        s = torch.as_tensor(std if std is not None else [1.0] * C, dtype=x.dtype, device=x.device)
        x = x * s.view(1, 1, C, 1, 1) + m.view(1, 1, C, 1, 1)
    p = patchify(x, patch)  # [B, T, N, P*P*C]
    if not normalize:
        return p
    if norm_mode == "mae":
        mu = p.mean(dim=-1, keepdim=True)
        var = p.var(dim=-1, unbiased=False, keepdim=True)
        return (p - mu) / (var + eps).sqrt()
    B, T, N, _ = p.shape
    q = p.reshape(B, T, N, patch * patch, C)
    mu = q.mean(dim=-2, keepdim=True)
    sd = q.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    return ((q - mu) / (sd + eps)).reshape(B, T, N, patch * patch * C)


class PixelTarget(nn.Module):
    """Module wrapper of :func:`pixel_target` (no parameters). A regression target, not a
    :class:`~mam2_fast.targets.tokenizer.Tokenizer`: ``forward(clip)`` returns
    ``[B, T, N, out_dim(C)]`` floats (``is_regression_target = True``, no ``vocab_size``)."""

    is_regression_target = True

    def __init__(self, patch: int, normalize: bool = True, norm_mode: str = "videomae",
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        super().__init__()
        if norm_mode not in NORM_MODES:
            raise ValueError(f"pixel target: unknown norm_mode {norm_mode!r} (known: {', '.join(NORM_MODES)})")
        self.patch, self.normalize, self.norm_mode = int(patch), bool(normalize), norm_mode
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)

    @torch.no_grad()
    def forward(self, clip: Tensor) -> Tensor:
        return pixel_target(clip, self.patch, self.normalize, self.norm_mode, self.mean, self.std)

    def out_dim(self, channels: int = 3) -> int:
        return self.patch * self.patch * channels

    def extra_repr(self) -> str:
        return f"patch={self.patch}, normalize={self.normalize}, norm_mode={self.norm_mode!r}"


__all__ = ["pixel_target", "PixelTarget", "NORM_MODES"]
