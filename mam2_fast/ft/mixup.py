"""Mixup / CutMix for clips and soft-target cross-entropy (timm ``Mixup``, mode "batch").

Per batch, with probability ``prob``: CutMix (probability ``switch_prob`` when both are on) or
Mixup, ``lam ~ Beta(alpha, alpha)``; each clip is mixed with the batch flipped
(``x[i]`` with ``x[B-1-i]``). CutMix cuts one box, the same in every frame, and corrects
``lam`` to the kept area. Targets: label-smoothed one-hot ``y`` mixed the same way,
``lam * y + (1 - lam) * y.flip(0)``, with ``off = smoothing / K`` and
``on = 1 - smoothing + off``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def smooth_one_hot(target: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """long [B] -> float [B, K]."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    out = torch.full((target.shape[0], num_classes), off, device=target.device)
    return out.scatter_(1, target.long().view(-1, 1), on)


def mixed_targets(target: Tensor, num_classes: int, lam: float, smoothing: float) -> Tensor:
    y = smooth_one_hot(target, num_classes, smoothing)
    return y * lam + y.flip(0) * (1.0 - lam)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """timm ``rand_bbox``: a box of area ``(1 - lam) H W`` centred uniformly (clipped): y0, y1, x0, x1."""
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = int(np.clip(cy - ch // 2, 0, height)), int(np.clip(cy + ch // 2, 0, height))
    x0, x1 = int(np.clip(cx - cw // 2, 0, width)), int(np.clip(cx + cw // 2, 0, width))
    return y0, y1, x0, x1


@dataclass
class Mixup:
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    num_classes: int = 1000

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def draw(self, rng: np.random.Generator) -> Tuple[float, bool]:
        """(lam, use_cutmix) for one batch; lam = 1 means no mixing."""
        if not self.active or rng.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(rng.beta(alpha, alpha)), use_cutmix

    def __call__(self, clip: Tensor, target: Tensor, rng: np.random.Generator) -> Tuple[Tensor, Tensor, float]:
        """clip [B, T, C, H, W], target long [B] -> (mixed clip, soft targets [B, K], lam)."""
        if clip.shape[0] % 2:
            raise ValueError(f"mixup needs an even batch size, got {clip.shape[0]}")
        lam, use_cutmix = self.draw(rng)
        if lam < 1.0:
            if use_cutmix:
                H, W = clip.shape[-2:]
                y0, y1, x0, x1 = cutmix_box(H, W, lam, rng)
                clip = clip.clone()
                clip[..., y0:y1, x0:x1] = clip.flip(0)[..., y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)   # correct lam to the pasted area
            else:
                clip = clip * lam + clip.flip(0) * (1.0 - lam)
        return clip, mixed_targets(target, self.num_classes, lam, self.label_smoothing), lam


def soft_target_cross_entropy(logits: Tensor, soft: Tensor) -> Tensor:
    return torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def build_mixup(aug, num_classes: int) -> Mixup:
    return Mixup(aug.mixup, aug.cutmix, aug.mixup_prob, aug.switch_prob, aug.label_smoothing, num_classes)
