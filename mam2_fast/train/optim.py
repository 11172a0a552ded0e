"""Optimizer and learning-rate schedule (Table 7: AdamW 0.9/0.95, wd 0.05, cosine)."""
from __future__ import annotations

import math

import torch
from torch import nn

from mam2_fast.models.mam2 import param_groups_for_weight_decay
from mam2_fast.train import accel


def lr_batch(effective_batch: int, data_cfg) -> float:
    """The batch the lr scaling rule counts: clips per optimizer step, or videos per step
    (clips / num_sample) under ``data.epoch_unit: videos`` (VideoMAE's code)."""
    if getattr(data_cfg, "epoch_unit", "clips") == "videos":
        return effective_batch / max(1, data_cfg.num_sample)
    return float(effective_batch)


def scaled_lr(optim_cfg, effective_batch: float) -> float:
    """lr = base_lr * effective_batch / 256 (Appendix B) unless an absolute lr is given."""
    if optim_cfg.lr is not None:
        return float(optim_cfg.lr)
    return optim_cfg.base_lr * effective_batch / 256.0


def scaled_min_lr(optim_cfg, effective_batch: float) -> float:
    """The cosine floor: min_lr * effective_batch / 256 as VideoMAE's code scales it, or min_lr
    as given (``optim.scale_min_lr: false``, or an absolute ``optim.lr``)."""
    if optim_cfg.lr is not None or not getattr(optim_cfg, "scale_min_lr", False):
        return float(optim_cfg.min_lr)
    return optim_cfg.min_lr * effective_batch / 256.0


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


class NonFiniteGuard:
    """Optimizer steps that skip non-finite gradients on the device, with no per-step host sync.

    ``micro(loss)`` counts a micro-batch's loss as finite or not (the logged means leave the
    non-finite ones out: weight the sums with the returned mask). ``step()`` clips the
    gradient norm and steps: fused AdamW gets ``found_inf`` and skips a non-finite step on the
    device; another optimizer reads the flag on the host (one sync per step). Counters live on
    the device: the current run of skipped steps, the longest run since the last log step, the
    total. ``end_log_window()`` reads them at a log step and returns the error to raise when
    the longest run reached ``max_nonfinite``: a run of skips that ended between two log steps
    still counts.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params, clip_grad: float, max_nonfinite: int,
                 device: torch.device, loss_scale: bool = False, init_scale: float = 2.0 ** 16,
                 growth_interval: int = 2000):
        self.optimizer, self.params = optimizer, list(params)
        self.max_norm = clip_grad if clip_grad > 0 else float("inf")
        self.max_nonfinite = max_nonfinite
        self.fused = bool(optimizer.defaults.get("fused"))
        self.zero = torch.zeros((), device=device)
        self.streak, self.longest, self.skipped, self.finite = (self.zero.clone() for _ in range(4))
        self._skipped_at_log = 0
        # fp16 loss scaling (GradScaler's rule, kept on the device): the loss is multiplied by
        # ``scale``; a step with non-finite gradients is skipped and halves it (not below 1), 2000
        # good steps in a row double it. Overflow skips count towards ``max_nonfinite`` only once
        # the scale is at its floor of 1 (then the loss itself is non-finite).
        self.scaled, self.growth_interval = loss_scale, growth_interval
        self.scale = torch.full((), init_scale if loss_scale else 1.0, device=device)
        self.good_steps = self.zero.clone()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.scaled else loss

    def scale_state(self) -> dict:
        return {"scale": accel.host_float(self.scale, 2.0 ** 16), "good_steps": accel.host_int(self.good_steps)}

    def load_scale_state(self, state: dict) -> None:
        self.scale.fill_(float(state["scale"]))
        self.good_steps.fill_(int(state["good_steps"]))

    def _unscale_and_clip(self) -> torch.Tensor:
        """Scaled gradients -> true gradients clipped to ``max_norm``, in one multiply; returns the
        true gradient norm (non-finite after an overflow)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return self.zero.clone()
        gnorm = torch.nn.utils.get_total_norm(grads)
        if hasattr(gnorm, "full_tensor"):   # FSDP2: a DTensor
            gnorm = gnorm.full_tensor()
        gnorm = gnorm / self.scale
        coef = torch.clamp(self.max_norm / (gnorm + 1e-6), max=1.0) / self.scale
        torch._foreach_mul_(grads, coef)
        return gnorm

    def micro(self, loss: torch.Tensor) -> torch.Tensor:
        """Bool scalar: ``loss`` is finite (counted for the log window's means)."""
        ok = torch.isfinite(loss.detach())
        self.finite = self.finite + ok.float()
        return ok

    def step(self) -> torch.Tensor:
        """Clip, step (or skip) and zero the gradients; returns the gradient norm (device)."""
        if self.scaled:
            gnorm = self._unscale_and_clip()
        else:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
            if hasattr(gnorm, "full_tensor"):   # FSDP2: a DTensor
                gnorm = gnorm.full_tensor()
        found_inf = (~torch.isfinite(gnorm)).float()
        if self.fused:
            self.optimizer.found_inf, self.optimizer.grad_scale = found_inf, None
            self.optimizer.step()
        elif not accel.host_bool(found_inf):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        counts = found_inf
        if self.scaled:
            counts = found_inf * (self.scale <= 1.0).float()          # an overflow above the floor: no count
            self.good_steps = (self.good_steps + 1) * (1 - found_inf)
            grow = (self.good_steps >= self.growth_interval).float()
            self.scale = torch.where(found_inf > 0, (self.scale * 0.5).clamp(min=1.0), self.scale * (1 + grow))
            self.good_steps = self.good_steps * (1 - grow)
        self.streak = (self.streak + 1) * counts
        self.longest = torch.maximum(self.longest, self.streak)
        self.skipped = self.skipped + found_inf
        return gnorm

    def end_log_window(self, step: int, last_ckpt=None) -> tuple[float, int, int, "FloatingPointError | None"]:
        """At a log step: (finite micro-batches in the window (0 when every loss of the window
        was non-finite: the caller records its means as NaN, not 0), skipped steps in total,
        skipped since the last log step, the error to raise or None); starts a new window."""
        n_ok = accel.host_float(self.finite)
        skipped = accel.host_int(self.skipped)
        new = skipped - self._skipped_at_log
        self._skipped_at_log = skipped
        longest = accel.host_int(self.longest)
        self.finite, self.longest = self.zero.clone(), self.streak.clone()
        err = None
        if longest >= self.max_nonfinite:
            err = FloatingPointError(
                f"{longest} non-finite losses/gradients in a row (seen at the log step {step}; "
                f"train.max_nonfinite={self.max_nonfinite}); last good checkpoint: {last_ckpt}")
        return n_ok, skipped, new, err

    def total_skipped(self) -> int:
        return accel.host_int(self.skipped)
