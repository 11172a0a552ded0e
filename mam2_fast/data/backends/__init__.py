"""Decoding backends behind one interface (:class:`~.base.Backend`).

``pyav`` (default), ``decord`` and ``opencv`` where installed, ``frames`` for pre-extracted
JPEG/PNG folders, ``dali`` when ``nvidia.dali`` is importable. Optional libraries are
imported only when their backend is used.
"""
from __future__ import annotations

import importlib.util
from typing import List

from .base import Backend, DecodeError, VideoReader

BACKENDS = ("pyav", "decord", "opencv", "frames", "dali")
_MODULES = {"pyav": "av", "decord": "decord", "opencv": "cv2", "frames": "PIL", "dali": None}


def is_available(name: str) -> bool:
    if name == "dali":
        from .dali import available

        return available()
    mod = _MODULES.get(name)
    return mod is not None and importlib.util.find_spec(mod) is not None


def available_backends() -> List[str]:
    return [b for b in BACKENDS if is_available(b)]


def make_backend(name: str, threads: int = 1, frame_pattern: str = "img_{:05d}.jpg") -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"data.backend: unknown backend {name!r} (choose from {BACKENDS})")
    if not is_available(name):
        extra = {"dali": " (pip install mam2_fast[dali])"}.get(name, "")
        raise ImportError(f"data.backend={name!r} needs {_MODULES[name] or 'nvidia.dali'}, "
                          f"which is not installed{extra}")
    if name == "pyav":
        from .pyav import PyAVBackend
        return PyAVBackend(threads)
    if name == "decord":
        from .decord_backend import DecordBackend
        return DecordBackend(threads)
    if name == "opencv":
        from .opencv_backend import OpenCVBackend
        return OpenCVBackend(threads)
    if name == "frames":
        from .frames import FrameFolderBackend
        return FrameFolderBackend(threads, frame_pattern)
    from .dali import DaliBackend
    return DaliBackend(threads)


__all__ = ["BACKENDS", "Backend", "DecodeError", "VideoReader", "available_backends",
           "is_available", "make_backend"]
