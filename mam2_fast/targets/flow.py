"""Optical-flow motion target (paper Sec. 2.2, Table 1f): RAFT flow between consecutive frames.

``FlowTarget(weights_path=...)(frames [B, T, 3, H, W] in [0, 1]) -> [B, T, N, P*P*2]``:
for ``t >= 1`` the patches of the flow from frame ``t-1`` to frame ``t`` (pixels, channel
order ``(u, v)`` = (x, y) displacement, patches flattened ``(ph, pw, c)`` like
``reference.patchify``); frame 0 holds zeros (no target, excluded from the loss) -- the
same convention as ``rgb_diff_target_ref``.

RAFT is torchvision's implementation (``torchvision.models.optical_flow.raft_large``,
or ``raft_small``) with weights read from a LOCAL file (a torchvision state dict such as
``raft_large_C_T_SKHT_V2-ff5fadd5.pth``); nothing is downloaded. Input frames are mapped
to [-1, 1] as torchvision's ``OpticalFlow`` transform does, and padded to a multiple of 8
(replicate) when needed. RAFT runs frozen in float32 under ``inference_mode``; it is far
more expensive than the RGB-difference target (the paper's reason to prefer RGB-diff).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mam2_fast.kernels.reference import patchify

RAFT_VARIANTS = ("raft_large", "raft_small")


def _import_raft(variant: str):
    if variant not in RAFT_VARIANTS:
        raise ValueError(f"flow target: unknown RAFT variant {variant!r} (known: {', '.join(RAFT_VARIANTS)})")
    try:
        from torchvision.models import optical_flow  # noqa: WPS433
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise ImportError(
            "flow target needs torchvision (torchvision.models.optical_flow.raft_large) importable beside "
            f"this torch {torch.__version__}; install the matching torchvision build, or use the "
            f"RGB-difference motion target. Import failed with: {type(exc).__name__}: {exc}") from exc
    return getattr(optical_flow, variant)


def load_raft(weights_path: Optional[str], variant: str = "raft_large") -> nn.Module:
    """torchvision RAFT with weights from a local state-dict file (never downloads)."""
    if not weights_path:
        raise ValueError("flow target needs a local RAFT weights file (e.g. raft_large_C_T_SKHT_V2-ff5fadd5.pth "
                         "from torchvision); no path was given and nothing is downloaded")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"flow target: RAFT weights file not found: {weights_path!r}")
    builder = _import_raft(variant)
    model = builder(weights=None, progress=False)
    sd = torch.load(weights_path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"flow target: {weights_path!r} does not match torchvision {variant}: "
                         f"missing {list(missing)[:8]}, unexpected {list(unexpected)[:8]}")
    return model.eval().requires_grad_(False)


def flow_patches(flow: Tensor, patch: int) -> Tensor:
    """Flow of consecutive frames ``[B, T-1, 2, H, W]`` -> target ``[B, T, N, P*P*2]`` with a
    zero frame 0 (``rgb_diff_target_ref`` convention)."""
    B, Tm1, C, H, W = flow.shape
    p = patchify(flow.float(), patch)  # [B, T-1, N, P*P*2]
    return torch.cat([torch.zeros_like(p[:, :1]), p], dim=1)


class FlowTarget(nn.Module):
    """Optical-flow motion target.

    Args:
        patch: model patch size (16).
        weights_path: local torchvision RAFT state dict. Required unless ``model`` is given.
        variant: ``"raft_large"`` (default, as in the paper) or ``"raft_small"``.
        num_flow_updates: RAFT refinement iterations (torchvision default 12).
        flow_scale: multiplier applied to the flow (pixels) -- e.g. ``1/patch`` to bring
            targets near unit scale; 1.0 keeps pixels.
        chunk_pairs: frame pairs per RAFT call (0 = all ``B*(T-1)`` at once).
        model: any ``f(img1, img2) -> flow [N, 2, H, W]`` (or torchvision's list of
            iterates, the last one is used) taking images in [-1, 1]; replaces RAFT (tests,
            other flow networks).
    """

    def __init__(self, patch: int, weights_path: Optional[str] = None, variant: str = "raft_large",
                 num_flow_updates: int = 12, flow_scale: float = 1.0, chunk_pairs: int = 0,
                 model: Optional[Callable] = None):
        super().__init__()
        self.patch = int(patch)
        self.num_flow_updates = int(num_flow_updates)
        self.flow_scale = float(flow_scale)
        self.chunk_pairs = int(chunk_pairs or 0)
        self._is_raft = model is None
        self.model = load_raft(weights_path, variant) if model is None else model

    def train(self, mode: bool = True):
        return super().train(False)  # frozen

    def _flow(self, a: Tensor, b: Tensor) -> Tensor:
        if self._is_raft:
            out = self.model(a, b, num_flow_updates=self.num_flow_updates)
        else:
            out = self.model(a, b)
        if isinstance(out, (list, tuple)):
            out = out[-1]
        return out

    def forward(self, frames: Tensor) -> Tensor:
        """frames ``[B, T, 3, H, W]`` in [0, 1] -> ``[B, T, N, P*P*2]`` (float32, frame 0 zero).
        RAFT runs under ``inference_mode``; the result is a normal tensor (usable as an MSE
        target in autograd-tracked code)."""
        with torch.inference_mode():
            out = self._forward(frames)
        with torch.no_grad():
            return out.clone()

    def _forward(self, frames: Tensor) -> Tensor:
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"flow target expects frames [B, T, 3, H, W], got {tuple(frames.shape)}")
        B, T, C, H, W = frames.shape
        if H % self.patch or W % self.patch:
            raise ValueError(f"flow target: frame size {H}x{W} is not divisible by patch {self.patch}")
        if T < 2:
            return frames.new_zeros(B, T, (H // self.patch) * (W // self.patch), self.patch * self.patch * 2,
                                    dtype=torch.float32)
        x = frames.float() * 2.0 - 1.0
        a = x[:, :-1].reshape(B * (T - 1), C, H, W)
        b = x[:, 1:].reshape(B * (T - 1), C, H, W)
        ph, pw = (-H) % 8, (-W) % 8
        if ph or pw:  # RAFT needs sizes divisible by 8
            a = F.pad(a, (0, pw, 0, ph), mode="replicate")
            b = F.pad(b, (0, pw, 0, ph), mode="replicate")
        n = a.shape[0]
        chunk = self.chunk_pairs if self.chunk_pairs > 0 else n
        flows = [self._flow(a[s:s + chunk], b[s:s + chunk])[:, :, :H, :W].float() for s in range(0, n, chunk)]
        flow = torch.cat(flows).reshape(B, T - 1, 2, H, W)
        if self.flow_scale != 1.0:
            flow = flow * self.flow_scale
        return flow_patches(flow, self.patch)


__all__ = ["FlowTarget", "load_raft", "flow_patches", "RAFT_VARIANTS"]
