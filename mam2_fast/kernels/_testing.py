"""Helpers shared by the kernel parity tests (tests/test_kernels_*.py).

Import this module *before* anything imports triton: on a machine without CUDA it sets
``TRITON_INTERPRET=1`` so the fused kernels run in Triton's CPU interpreter.
"""
from __future__ import annotations

import os
import time

import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")


def fresh_seed() -> int:
    """Seed torch from the clock; the returned seed goes into every failure message."""
    seed = time.time_ns() % (2 ** 31)
    torch.manual_seed(seed)
    return seed


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / max(||want||, tiny) in float64 (0 for two empty tensors)."""
    g, w = got.detach().double(), want.detach().double()
    if w.numel() == 0:
        return 0.0
    den = w.norm().item()
    num = (g - w).norm().item()
    if den == 0.0:
        return num
    return num / den


def assert_close(what: str, got: torch.Tensor, want: torch.Tensor, tol: float, seed: int) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)} (seed {seed})"
    assert torch.isfinite(got).all() == torch.isfinite(want).all(), \
        f"{what}: non-finite values differ (seed {seed})"
    e = rel_err(got, want)
    assert e <= tol, f"{what}: relative error {e:.3e} > tol {tol:.1e} (seed {seed})"


def fused_kernels_interpretable(module) -> bool:
    """On CPU the kernel module must have been decorated in interpreter mode."""
    if ON_CUDA:
        return True
    from triton.runtime.interpreter import InterpretedFunction
    return any(isinstance(v, InterpretedFunction) for v in vars(module).values())
