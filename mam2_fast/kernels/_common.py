"""Shared helpers for the Triton kernels (import-light: triton is imported by the kernel
modules themselves, never here)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Set only by kernels/compile_check.py: the wrappers then accept CPU tensors and pick their GPU
# launch configurations, while every launch is compiled for a GPU target instead of run.
COMPILE_ONLY = False

# CUDA's limits on a launch grid: blocks along x (axis 0), y (axis 1) and z (axis 2).
CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


class LaunchLimitError(RuntimeError):
    """A Triton launch whose grid CUDA would refuse (raised before anything is launched)."""


@dataclass(frozen=True)
class LaunchRecord:
    """One launch seen by :func:`recording_launches`: the fused op, its kernel, the grid and a
    description of the shapes it was computed from."""
    op: str
    kernel: str
    grid: tuple
    shape: str


# the list launches are recorded into instead of run (see recording_launches), or None
_recorder: Optional[List[LaunchRecord]] = None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``). False
    while compiling (compile_check) or recording launches: both want the GPU configurations."""
    if COMPILE_ONLY or _recorder is not None:
        return False
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(kernel))


def check_grid(grid: Sequence[int], op: str, kernel: str, shape: str) -> tuple:
    """``grid`` as a tuple of ints, or :class:`LaunchLimitError` naming the op, the kernel and
    the shapes when CUDA would refuse it (axis 0 up to 2**31 - 1 blocks, axes 1 and 2 up to
    65535, every axis at least 1)."""
    grid = tuple(int(n) for n in grid)
    if not 1 <= len(grid) <= 3:
        raise LaunchLimitError(f"{op}: kernel {kernel} got a {len(grid)}-D grid {grid} ({shape})")
    for axis, (blocks, limit) in enumerate(zip(grid, CUDA_GRID_LIMITS)):
        if blocks < 1:
            raise LaunchLimitError(f"{op}: kernel {kernel} grid {grid} has {blocks} blocks on axis "
                                   f"{axis}; empty launches must be skipped by the caller ({shape})")
        if blocks > limit:
            raise LaunchLimitError(f"{op}: kernel {kernel} grid {grid} exceeds CUDA's limit on axis "
                                   f"{axis} ({blocks} > {limit} blocks) at {shape}")
    return grid


def launch(kernel, grid: Sequence[int], *args, op: str, shape: str, **kwargs):
    """The one way the package launches a Triton kernel: ``kernel[grid](*args, **kwargs)`` after
    :func:`check_grid`. Inside :func:`recording_launches` the launch is recorded, not run."""
    name = _kernel_name(kernel)
    grid = check_grid(grid, op, name, shape)
    if _recorder is not None:
        _recorder.append(LaunchRecord(op, name, grid, shape))
        return None
    return kernel[grid](*args, **kwargs)


DIRECT_LAUNCH = "(direct kernel[grid] launch, not through kernels._common.launch)"


@contextmanager
def recording_launches() -> Iterator[List[LaunchRecord]]:
    """Within the block every :func:`launch` checks its grid and appends a
    :class:`LaunchRecord` to the yielded list instead of running the kernel, and the launch
    helpers pick their GPU configurations. Feed them ``meta`` tensors to compute the launches
    of any shape without memory or a GPU.

    A ``kernel[grid](...)`` that bypasses :func:`launch` is checked and recorded too, with
    ``op`` = :data:`DIRECT_LAUNCH` (so a test can insist that there is none)."""
    global _recorder
    from triton.runtime.jit import KernelInterface

    def direct(kernel, grid):
        def record(*args, **kwargs):
            name = _kernel_name(kernel)
            grid_ = check_grid(grid, DIRECT_LAUNCH, name, "unknown shapes")
            records.append(LaunchRecord(DIRECT_LAUNCH, name, grid_, "unknown shapes"))
        return record

    previous, records = _recorder, []
    original = KernelInterface.__getitem__
    _recorder = records
    KernelInterface.__getitem__ = direct
    try:
        yield records
    finally:
        KernelInterface.__getitem__ = original
        _recorder = previous


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_device(name: str, *tensors: torch.Tensor) -> None:
    """Fused kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter.
    ``meta`` tensors are accepted too: the custom ops then run their registered fake impls
    (shapes only, nothing launched), which is how a whole step is dry-run without a GPU."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not (interpreting() or COMPILE_ONLY):
            raise RuntimeError(
                f"{name}: fused Triton kernel got a CPU tensor; set TRITON_INTERPRET=1 (before "
                "triton is imported) to run it in the interpreter, or use backend='reference'")
        if t.device.type not in ("cpu", "cuda", "meta"):
            raise RuntimeError(f"{name}: unsupported device {t.device}")


def check_float(name: str, what: str, t: torch.Tensor) -> None:
    if t.dtype not in _TRITON_DTYPES:
        raise TypeError(f"{name}: {what} must be float32/float16/bfloat16, got {t.dtype}")
