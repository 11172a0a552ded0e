"""Kernel dispatch: each op has a plain PyTorch reference (``reference.py``) and, where
available, a fused Triton/CUDA implementation. ``backend`` is ``"reference"``, ``"fused"``
or ``"auto"`` (fused when the inputs live on a GPU and Triton is importable)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from mam2_fast.kernels import reference as ref

BACKENDS = ("reference", "fused", "auto")


def _use_fused(backend: str, *tensors: Tensor) -> bool:
    if backend == "reference":
        return False
    if backend not in BACKENDS:
        raise ValueError(f"kernels: unknown backend {backend!r} (choose from {BACKENDS})")
    if backend == "fused":
        return True
    return False  # "auto": no fused kernels registered yet


def factorized_attention(qkv: Tensor, mode: str, valid: Optional[Tensor] = None,
                         scale: Optional[float] = None, backend: str = "reference") -> Tensor:
    return ref.factorized_attention_ref(qkv, mode, valid, scale)


def gather_visible_add_pos(x: Tensor, pos_t: Tensor, pos_s: Tensor, idx: Tensor,
                           backend: str = "reference") -> Tensor:
    return ref.gather_visible_add_pos_ref(x, pos_t, pos_s, idx)


def rgb_diff_mse_tube(clip: Tensor, pred: Tensor, mask_idx: Tensor, patch: int,
                      backend: str = "reference") -> Tensor:
    return ref.rgb_diff_mse_tube_ref(clip, pred, mask_idx, patch)


def linear_cross_entropy(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         backend: str = "reference") -> Tensor:
    return ref.linear_cross_entropy_ref(x, weight, bias, target)
