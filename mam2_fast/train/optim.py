"""Optimizer and learning-rate schedule (Table 7: AdamW 0.9/0.95, wd 0.05, cosine)."""
from __future__ import annotations

import math

import torch
from torch import nn

from mam2_fast.models.mam2 import param_groups_for_weight_decay


def scaled_lr(optim_cfg, effective_batch: int) -> float:
    """lr = base_lr * effective_batch / 256 (Appendix B) unless an absolute lr is given."""
    if optim_cfg.lr is not None:
        return float(optim_cfg.lr)
    return optim_cfg.base_lr * effective_batch / 256.0


def build_optimizer(model: nn.Module, optim_cfg, lr: float, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups_for_weight_decay(model, optim_cfg.weight_decay)
    fused_opt = str(optim_cfg.fused).lower()
    # fused AdamW (CUDA and CPU) also lets a non-finite step be skipped on the device (found_inf)
    use_fused = device.type in ("cuda", "cpu") if fused_opt == "auto" else fused_opt == "true"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             fused=use_fused or None)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> float:
    """Linear warmup to ``peak_lr`` then half-cosine decay to ``min_lr`` (per optimizer step)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
