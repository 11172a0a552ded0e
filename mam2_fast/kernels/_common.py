"""Shared helpers for the Triton kernels (import-light: triton is imported by the kernel
modules themselves, never here)."""
from __future__ import annotations

import os

import torch

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Set only by kernels/compile_check.py: the wrappers then accept CPU tensors and pick their GPU
# launch configurations, while every launch is compiled for a GPU target instead of run.
COMPILE_ONLY = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    if COMPILE_ONLY:
        return False
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_device(name: str, *tensors: torch.Tensor) -> None:
    """Fused kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not (interpreting() or COMPILE_ONLY):
            raise RuntimeError(
                f"{name}: fused Triton kernel got a CPU tensor; set TRITON_INTERPRET=1 (before "
                "triton is imported) to run it in the interpreter, or use backend='reference'")
        if t.device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"{name}: unsupported device {t.device}")


def check_float(name: str, what: str, t: torch.Tensor) -> None:
    if t.dtype not in _TRITON_DTYPES:
        raise TypeError(f"{name}: {what} must be float32/float16/bfloat16, got {t.dtype}")
