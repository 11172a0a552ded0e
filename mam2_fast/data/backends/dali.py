"""NVIDIA DALI backend (optional extra ``[dali]``; the only module that imports ``nvidia.dali``).

``device="mixed"`` decodes on the GPU (NVDEC: H.264/HEVC/VP9/...); ``device="cpu"`` uses DALI's
CPU operator, which decodes only VP9, VP8 and MJPEG. The whole file is decoded by
``fn.experimental.decoders.video`` and the wanted indices are gathered from it, which is
fine for the short clips of action datasets but not meant for hour-long videos.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .base import Backend, DecodeError, VideoReader


def available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


class _DaliPipe:
    def __init__(self, device: str, threads: int, device_id: Optional[int]):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=1, num_threads=max(1, threads), device_id=device_id,
                      prefetch_queue_depth=1)
        def pipe():
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            return fn.experimental.decoders.video(data, device=device)

        self.pipe = pipe()
        self.pipe.build()

    def decode(self, encoded: np.ndarray) -> np.ndarray:  # -> uint8 [F, H, W, 3]
        self.pipe.feed_input("data", [encoded])
        (out,) = self.pipe.run()
        if hasattr(out, "as_cpu"):
            out = out.as_cpu()
        return np.array(out.at(0))


class DaliReader(VideoReader):
    def __init__(self, path: str, pipe: _DaliPipe):
        self.path = path
        try:
            encoded = np.fromfile(path, dtype=np.uint8)
        except OSError as e:
            raise DecodeError(f"{path}: cannot open ({e})") from None
        if encoded.size == 0:
            raise DecodeError(f"{path}: empty file")
        try:
            self.frames = pipe.decode(encoded)
        except Exception as e:
            raise DecodeError(f"{path}: decode failed ({type(e).__name__}: {e})") from None
        self.num_frames = int(self.frames.shape[0])
        if self.num_frames == 0:
            raise DecodeError(f"{path}: video stream has no frames")

    def read(self, indices: Sequence[int]) -> np.ndarray:
        return self.frames[np.minimum(np.asarray(indices, dtype=np.int64), self.num_frames - 1)]


class DaliBackend(Backend):
    name = "dali"

    def __init__(self, threads: int = 1, device: str = "auto"):
        super().__init__(threads)
        if device == "auto":
            import torch

            device = "mixed" if torch.cuda.is_available() else "cpu"
        self.device = device
        self._pipe = None

    def open(self, path: str, num_frames: Optional[int] = None) -> VideoReader:
        if self._pipe is None:  # built lazily, inside the worker process
            device_id = 0 if self.device == "mixed" else None
            self._pipe = _DaliPipe(self.device, self.threads, device_id)
        return DaliReader(path, self._pipe)
