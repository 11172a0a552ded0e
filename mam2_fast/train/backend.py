"""The kernel backend of a run, shared by the training tasks: the start-of-run check
(``kernels/selfcheck.py``) at the run's dtype and launch shapes."""
from __future__ import annotations

from typing import Optional

import torch

from mam2_fast.train.loop import Run, amp_dtype


def choose_kernels(model: torch.nn.Module, requested: str, device: torch.device, precision: str,
                   batch_size: int, log, mask_kind: Optional[str] = None, mask_ratio: float = 0.0) -> str:
    """The start-of-run kernel check (``kernels/selfcheck.py``) at the run's dtype and launch
    shapes; sets and returns the model's backend (ops that fail run their reference)."""
    from mam2_fast.kernels.launch_plan import RunShapes
    from mam2_fast.kernels.selfcheck import resolve_backend

    run_dtype = amp_dtype(device, precision) or torch.float32
    shapes = RunShapes.of_model(model, batch_size, mask_kind, mask_ratio)
    backend = resolve_backend(requested, device, run_dtype, log, shapes)
    model.set_kernel_backend(backend)
    return backend


def select_kernels(model: torch.nn.Module, cfg, run: Run, mask_kind: Optional[str] = None,
                   mask_ratio: float = 0.0) -> None:
    """:func:`choose_kernels` for a task's model when ``cfg.model.kernels`` asks for fused ones
    (and the model has a kernel backend); ``reference`` needs no check."""
    if cfg.model.kernels != "reference" and hasattr(model, "set_kernel_backend"):
        choose_kernels(model, cfg.model.kernels, run.device, cfg.train.precision, cfg.train.batch_size, run.log,
                       mask_kind, mask_ratio)
