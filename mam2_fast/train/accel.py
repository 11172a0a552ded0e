"""The engine's one seam to the accelerator.

Every real ``torch.cuda`` call of the engine (side streams and events, synchronize, memory
statistics, device name, capability and bf16 queries), every autocast region and every host
read of a device value (``.item()``, ``.tolist()``, ``bool``/``float`` of a device tensor,
``.cpu()`` of results) goes through the functions here, so the engine can be pointed at a
**stand-in device**: torch's ``meta`` device, which carries shapes and dtypes but no memory
and runs no kernels. A whole training step then runs on a CPU-only machine at real widths
(ViT-B, 16 x 224) with the GPU code paths taken, and a tensor created on the CPU inside a
device computation fails loudly ("Tensor on device meta is not on the expected device cpu")
instead of first failing on a GPU host. ``tests/test_dry_run_meta.py`` runs every entry point
this way.

What the stand-in does differently, and nothing else:

* it reports itself as a bf16-capable GPU (capability ``STAND_IN_CAPABILITY``);
* streams and events are stand-ins with the CUDA API the engine uses (``wait_event``,
  ``record``, ``elapsed_time`` -> 0.0), so the prefetch side-stream path runs;
* memory statistics are 0, synchronize is a no-op;
* host reads return placeholders: 0 / 0.0 / False unless the call site names the value
  that lets the run go on, and ``to_host`` gives zeros of the right shape and dtype on the
  CPU;
* autocast, which torch does not offer on ``meta``, is emulated (:class:`StandInAutocast`):
  the inputs of the ops CUDA autocast runs in bf16 (matmuls, linear, convolutions,
  attention) are cast down, those it runs in float32 (norms, softmax, losses) are cast up,
  and the few it promotes are promoted, so every op sees the dtypes it sees on a GPU.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

STAND_IN = "meta"                 # the stand-in device type
STAND_IN_CAPABILITY = (9, 0)      # it claims to be an sm_90 GPU (bf16, the configs the presets tune for)
STAND_IN_NAME = "meta (stand-in device)"


def as_device(device: Any) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def is_stand_in(device: Any) -> bool:
    """True for the stand-in device (``meta``)."""
    return as_device(device).type == STAND_IN


def is_gpu(device: Any) -> bool:
    """True where the engine takes its GPU paths: CUDA, or the stand-in for it."""
    return as_device(device).type in ("cuda", STAND_IN)


def cuda_available() -> bool:
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------
# queries
# ----------------------------------------------------------------------------------------
def bf16_supported(device: Any) -> bool:
    """bf16 autocast is worth it on this device: CUDA only where bf16 is native (Ampere, sm_80,
    and newer; ``torch.cuda.is_bf16_supported()`` also counts the slow emulation on V100 / T4);
    the stand-in: yes."""
    device = as_device(device)
    if device.type == "cuda":
        cap = capability(device)
        return cap is not None and cap >= (8, 0)
    return device.type == STAND_IN


def capability(device: Any) -> Optional[tuple]:
    """CUDA compute capability ``(major, minor)``; the stand-in's; None elsewhere."""
    device = as_device(device)
    if device.type == "cuda":
        return tuple(torch.cuda.get_device_capability(device))
    return STAND_IN_CAPABILITY if device.type == STAND_IN else None


def device_name(device: Any) -> str:
    device = as_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return STAND_IN_NAME if device.type == STAND_IN else device.type


# ----------------------------------------------------------------------------------------
# streams, events, synchronize
# ----------------------------------------------------------------------------------------
class StandInEvent:
    """The part of ``torch.cuda.Event`` the engine uses; times are 0."""

    def __init__(self, enable_timing: bool = False):
        self.enable_timing = enable_timing

    def record(self, stream: Optional["StandInStream"] = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "StandInEvent") -> float:
        return 0.0


class StandInStream:
    """The part of ``torch.cuda.Stream`` the engine uses."""

    def __init__(self, device: Any = STAND_IN):
        self.device = as_device(device)

    def wait_event(self, event: StandInEvent) -> None:
        pass

    def wait_stream(self, stream: "StandInStream") -> None:
        pass

    def record_event(self, event: Optional[StandInEvent] = None) -> StandInEvent:
        event = event or StandInEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass


def new_stream(device: Any):
    """A side stream on a GPU device (CUDA or stand-in); None elsewhere."""
    device = as_device(device)
    if device.type == "cuda":
        return torch.cuda.Stream(device=device)
    return StandInStream(device) if device.type == STAND_IN else None


def current_stream(device: Any):
    device = as_device(device)
    if device.type == "cuda":
        return torch.cuda.current_stream(device)
    return StandInStream(device) if device.type == STAND_IN else None


def use_stream(stream) -> contextlib.AbstractContextManager:
    """``with use_stream(s):`` work issued in the block goes to ``s`` (CUDA); a no-op else."""
    if isinstance(stream, torch.cuda.Stream):
        return torch.cuda.stream(stream)
    return contextlib.nullcontext()


def new_event(device: Any, enable_timing: bool = False):
    device = as_device(device)
    if device.type == "cuda":
        return torch.cuda.Event(enable_timing=enable_timing)
    return StandInEvent(enable_timing)


def record_stream(tensor: torch.Tensor, stream) -> None:
    """Tell the caching allocator that ``tensor`` is used on ``stream`` (CUDA tensors only)."""
    if tensor.is_cuda and isinstance(stream, torch.cuda.Stream):
        tensor.record_stream(stream)


def synchronize(device: Any = None) -> None:
    """Wait for the device's queued work (CUDA); a no-op elsewhere."""
    device = as_device(device) if device is not None else None
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------
def reset_peak_memory(device: Any) -> None:
    if as_device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def max_memory_gib(device: Any) -> Optional[float]:
    """Peak allocated memory since the last reset, GiB (CUDA); 0.0 on the stand-in; None else."""
    device = as_device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return 0.0 if device.type == STAND_IN else None


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------------------
# host reads of device values
# ----------------------------------------------------------------------------------------
def _placeholder(t: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == STAND_IN


def host_float(t, stand_in: float = 0.0) -> float:
    """``float(t)``; a stand-in tensor reads as ``stand_in``."""
    return stand_in if _placeholder(t) else float(t)


def host_int(t, stand_in: int = 0) -> int:
    """``int(t)``; a stand-in tensor reads as ``stand_in``."""
    return stand_in if _placeholder(t) else int(t)


def host_bool(t, stand_in: bool = False) -> bool:
    """``bool(t)``; a stand-in tensor reads as ``stand_in`` (the value that lets the run go on)."""
    return stand_in if _placeholder(t) else bool(t)


def host_list(t: torch.Tensor) -> list:
    """``t.tolist()``; a stand-in tensor reads as zeros."""
    return to_host(t).tolist()


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t.cpu()``; a stand-in tensor becomes zeros of its shape and dtype on the CPU."""
    if _placeholder(t):
        return torch.zeros(t.shape, dtype=t.dtype)
    return t.cpu()


# ----------------------------------------------------------------------------------------
# autocast
# ----------------------------------------------------------------------------------------
def autocast(device: Any, dtype: Optional[torch.dtype] = None, enabled: bool = True):
    """``torch.autocast`` for ``device`` (a device or a device type string); on the stand-in
    the emulation :class:`StandInAutocast` (``enabled=False`` suspends it in the block, as
    ``torch.autocast(..., enabled=False)`` does inside an autocast region)."""
    device_type = device if isinstance(device, str) else as_device(device).type
    if device_type != STAND_IN:
        if dtype is None:
            return torch.autocast(device_type, enabled=enabled)
        return torch.autocast(device_type, dtype=dtype, enabled=enabled)
    if not enabled:
        return _suspend_stand_in_autocast()
    return StandInAutocast(dtype or torch.bfloat16)


def autocast_dtype(device: Any) -> Optional[torch.dtype]:
    """The dtype autocast casts matmuls to on ``device`` right now, or None when autocast is
    off there (for code that mimics autocast by hand, e.g. a fused op's input casts)."""
    device_type = device if isinstance(device, str) else as_device(device).type
    if device_type == STAND_IN:
        active = getattr(_state, "active", None)
        return active[-1] if active and not getattr(_state, "suspended", 0) else None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


_LOWER = {  # CUDA autocast's lower-precision ops
    F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
    torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.Tensor.addmm,
    torch.baddbmm, torch.Tensor.baddbmm, torch.addbmm, torch.einsum,
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.scaled_dot_product_attention,
}
_FLOAT32 = {  # ... and those it runs in float32
    F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
    torch.Tensor.softmax, torch.Tensor.log_softmax, F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss,
    F.smooth_l1_loss, F.binary_cross_entropy_with_logits, F.kl_div, torch.logsumexp, torch.Tensor.logsumexp,
    torch.cumsum, torch.Tensor.cumsum, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log,
    torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt, torch.Tensor.rsqrt, torch.cdist,
}
_PROMOTE = {  # ... and those it runs in the widest input type
    torch.addcmul, torch.addcdiv, torch.Tensor.addcmul, torch.Tensor.addcdiv, F.grid_sample,
    torch.index_put, torch.Tensor.index_put, torch.scatter_add, torch.Tensor.scatter_add, torch.atan2,
    torch.cross, torch.dot, torch.tensordot,
}
_state = threading.local()


def _cast(obj, pred, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if pred(obj) else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, pred, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, pred, dtype) for k, v in obj.items()}
    return obj


def _tensors_of(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors_of(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors_of(o)


class StandInAutocast(TorchFunctionMode):
    """Autocast on the stand-in device: casts the floating inputs of the ops above like CUDA
    autocast does (only tensors on the stand-in; float64 untouched)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype

    def __enter__(self):
        _state.active = [*getattr(_state, "active", []), self.dtype]
        return super().__enter__()

    def __exit__(self, *exc):
        _state.active = _state.active[:-1]
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(_state, "suspended", 0):
            return func(*args, **kwargs)
        on_stand_in = lambda t, dt: t.device.type == STAND_IN and t.dtype in dt  # noqa: E731
        if func in _LOWER:
            pred = lambda t: on_stand_in(t, (torch.float32, torch.float16, torch.bfloat16))  # noqa: E731
            args, kwargs = _cast(args, pred, self.dtype), _cast(kwargs, pred, self.dtype)
        elif func in _FLOAT32 and "dtype" not in kwargs:
            pred = lambda t: on_stand_in(t, (torch.float16, torch.bfloat16))  # noqa: E731
            args, kwargs = _cast(args, pred, torch.float32), _cast(kwargs, pred, torch.float32)
        elif func in _PROMOTE:
            floats = [t.dtype for t in _tensors_of((args, kwargs)) if t.is_floating_point()]
            if floats:
                widest = max(floats, key=lambda d: torch.finfo(d).bits)
                pred = lambda t: on_stand_in(t, (torch.float16, torch.bfloat16, torch.float32))  # noqa: E731
                args, kwargs = _cast(args, pred, widest), _cast(kwargs, pred, widest)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _suspend_stand_in_autocast():
    _state.suspended = getattr(_state, "suspended", 0) + 1
    try:
        yield
    finally:
        _state.suspended -= 1
