"""decord backend (where installed): random access by frame index."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .base import Backend, DecodeError, VideoReader


class DecordReader(VideoReader):
    def __init__(self, path: str, threads: int):
        import decord

        self.path = path
        try:
            self.vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=max(0, threads))
        except Exception as e:
            raise DecodeError(f"{path}: cannot open ({type(e).__name__}: {e})") from None
        self.num_frames = len(self.vr)
        if self.num_frames <= 0:
            raise DecodeError(f"{path}: video stream has no frames")

    def read(self, indices: Sequence[int]) -> np.ndarray:
        idx = np.minimum(np.asarray(indices, dtype=np.int64), self.num_frames - 1)
        uniq, inv = np.unique(idx, return_inverse=True)
        try:
            frames = self.vr.get_batch(uniq.tolist()).asnumpy()
        except Exception as e:
            raise DecodeError(f"{self.path}: decode failed ({type(e).__name__}: {e})") from None
        return frames[inv]

    def close(self) -> None:
        del self.vr


class DecordBackend(Backend):
    name = "decord"

    def open(self, path: str, num_frames: Optional[int] = None) -> VideoReader:
        return DecordReader(path, self.threads)
