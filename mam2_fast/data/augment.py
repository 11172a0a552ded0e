"""Device-side augmentation: crop boxes + flip + bilinear resize + mean/std, in one pass.

Input is what the workers decoded, uint8 channels-last ``[N, T, H, W, 3]`` (already on the
device); output is the model's layout ``[M, T, 3, S, S]`` in float32 or bfloat16. Each
output clip ``m`` reads source clip ``src[m]`` through its own box and flip flag and is
written to row ``dst[m]`` of ``out``, so clips of different resolutions can fill one batch.

Resizing matches ``F.interpolate(crop, (S, S), mode="bilinear", align_corners=False)`` on
the cropped region (no antialias), i.e. source samples never leave the crop box.

The fused kernel lives in ``mam2_fast/csrc/`` (CUDA + an OpenMP CPU twin). It is compiled on
first use (``torch.utils.cpp_extension.load``, cached under ``~/.cache/mam2_fast/ext``; about a
minute once) unless it was built at install time (``MAM2_BUILD_EXT=1``, see setup.py);
``MAM2_NO_EXT=1`` skips it. Without it a plain-torch implementation runs (one notice).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("mam2_fast.data")

_ext = None
_ext_error: Optional[str] = None
_notified = False


def load_extension():
    """The compiled augmentation extension, or ``None`` (reason in ``_ext_error``): the module
    built at install time (``mam2_fast._augment``), else compiled now and cached (first use)."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            from mam2_fast import _augment  # built by setup.py with MAM2_BUILD_EXT=1
            _ext = _augment
        except ImportError as e:
            if os.environ.get("MAM2_NO_EXT", "0").lower() in ("1", "true", "yes", "on"):
                _ext_error = "MAM2_NO_EXT is set"
            else:
                try:
                    _ext = _compile_extension()
                except Exception as e2:  # noqa: BLE001 - no compiler, no headers...: the torch fallback runs
                    _ext_error = f"{e}; compiling it failed: {type(e2).__name__}: {str(e2).strip().splitlines()[-1][:300] if str(e2).strip() else ''}"
    return _ext


def _compile_extension():
    """``torch.utils.cpp_extension.load`` of ``mam2_fast/csrc`` (the CUDA kernel too with a CUDA
    build of torch and a toolkit), cached per torch version and build kind; other processes
    wait on the build's lock and then load the cached library."""
    from torch.utils.cpp_extension import CUDA_HOME, load

    src = Path(__file__).resolve().parent.parent / "csrc"
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and \
        os.environ.get("MAM2_NO_CUDA", "0").lower() not in ("1", "true", "yes", "on")
    sources = [str(src / "augment.cpp")] + ([str(src / "augment_cuda.cu")] if with_cuda else [])
    cuda_flag = ["-DWITH_CUDA"] if with_cuda else []
    tag = f"torch{torch.__version__.replace('+', '_')}-{'cuda' if with_cuda else 'cpu'}"
    build = Path(os.environ.get("MAM2_EXT_CACHE", "~/.cache/mam2_fast/ext")).expanduser() / tag
    build.mkdir(parents=True, exist_ok=True)
    log.info("compiling the augmentation extension (%s) into %s: once, about a minute", tag, build)
    return load(name="mam2_fast_augment", sources=sources, build_directory=str(build),
                extra_include_paths=[str(src)], extra_cflags=["-O3", "-std=c++17", "-fopenmp"] + cuda_flag,
                extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math"] + cuda_flag,
                with_cuda=with_cuda, verbose=False)


def extension_has_cuda() -> bool:
    ext = load_extension()
    return bool(ext is not None and ext.has_cuda())


_SCALE_BIAS: dict = {}


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor -> ``device`` without blocking the host (pinned staging on CUDA)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _scale_bias(mean: Sequence[float], std: Sequence[float], device) -> tuple:
    # (v / 255 - mean) / std == v * scale + bias; made once per (mean, std, device)
    key = (tuple(float(m) for m in mean), tuple(float(s) for s in std), str(device))
    if key not in _SCALE_BIAS:
        std_t = torch.tensor(std, dtype=torch.float64)
        scale = (1.0 / (255.0 * std_t)).float()
        bias = (-torch.tensor(mean, dtype=torch.float64) / std_t).float()
        _SCALE_BIAS[key] = (_to_device(scale, torch.device(device)), _to_device(bias, torch.device(device)))
    return _SCALE_BIAS[key]


def make_params(src: Sequence[int], dst: Sequence[int], boxes: Sequence[Sequence[int]],
                flips: Sequence[bool]) -> Tensor:
    """int32 [M, 7]: (src, dst, x0, y0, w, h, flip) per output clip."""
    rows = [[int(s), int(d), *map(int, b), int(bool(f))] for s, d, b, f in zip(src, dst, boxes, flips)]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 7)


def _check(frames: Tensor, params: Tensor, out: Tensor) -> None:
    if frames.dtype != torch.uint8 or frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(f"augment: frames must be uint8 [N,T,H,W,3], got {tuple(frames.shape)} {frames.dtype}")
    if out.dim() != 5 or out.shape[2] != 3 or out.shape[1] != frames.shape[1]:
        raise ValueError(f"augment: out must be [B,T,3,S,S] with T={frames.shape[1]}, got {tuple(out.shape)}")
    if out.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"augment: out dtype must be float32 or bfloat16, got {out.dtype}")
    if params.dtype != torch.int32 or params.dim() != 2 or params.shape[1] != 7:
        raise ValueError("augment: params must be int32 [M, 7]")
    p = params.cpu()
    H, W = frames.shape[2], frames.shape[3]
    if len(p) and ((p[:, 0] < 0).any() or (p[:, 0] >= frames.shape[0]).any()
                   or (p[:, 1] < 0).any() or (p[:, 1] >= out.shape[0]).any()
                   or (p[:, 2] < 0).any() or (p[:, 3] < 0).any() or (p[:, 4] < 1).any() or (p[:, 5] < 1).any()
                   or (p[:, 2] + p[:, 4] > W).any() or (p[:, 3] + p[:, 5] > H).any()):
        raise ValueError(f"augment: a crop box or index is out of range for frames {tuple(frames.shape)}")


def crop_resize_normalize_torch(frames: Tensor, params: Tensor, mean, std, out: Tensor) -> Tensor:
    """Plain-torch reference: per clip crop -> F.interpolate(bilinear) -> flip -> normalize."""
    size = (out.shape[3], out.shape[4])
    m = torch.tensor(mean, dtype=torch.float32, device=frames.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=frames.device).view(1, 3, 1, 1)
    for src, dst, x0, y0, w, h, flip in params.tolist():
        crop = frames[src, :, y0:y0 + h, x0:x0 + w].permute(0, 3, 1, 2).float()   # [T, 3, h, w]
        clip = F.interpolate(crop, size=size, mode="bilinear", align_corners=False)
        if flip:
            clip = clip.flip(-1)
        out[dst] = ((clip / 255.0 - m) / s).to(out.dtype)
    return out


def crop_resize_normalize(frames: Tensor, params: Tensor, mean: Sequence[float], std: Sequence[float],
                          out: Tensor, impl: str = "auto") -> Tensor:
    """Fill ``out`` [B, T, 3, S, S] from ``frames`` uint8 [N, T, H, W, 3] (same device).

    ``params`` int32 [M, 7] rows ``(src, dst, x0, y0, w, h, flip)``; ``impl`` is ``auto``
    (extension when built for this device, else torch), ``extension`` or ``torch``.
    """
    global _notified
    _check(frames, params, out)
    if impl not in ("auto", "extension", "torch"):
        raise ValueError(f"augment: unknown impl {impl!r} (auto | extension | torch)")
    ext = load_extension() if impl != "torch" else None
    usable = ext is not None and (frames.device.type == "cpu" or (frames.is_cuda and ext.has_cuda()))
    if impl == "extension" and not usable:
        raise RuntimeError(f"augment: fused extension unavailable for {frames.device} ({_ext_error or 'built without CUDA'})")
    if not usable:
        if impl == "auto" and not _notified:
            _notified = True
            why = _ext_error or f"built without CUDA, data on {frames.device}"
            log.warning("mam2_fast: fused augmentation extension not available (%s); using plain torch", why)
        return crop_resize_normalize_torch(frames, params, mean, std, out)
    scale, bias = _scale_bias(mean, std, frames.device)
    ext.crop_resize_normalize(frames.contiguous(), _to_device(params, frames.device), scale, bias, out)
    return out
