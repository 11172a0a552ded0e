"""Pre-extracted frame folders (JPEG/PNG), VideoMAE style: ``folder/<pattern.format(i + 1)>``."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from .base import Backend, DecodeError, VideoReader


class FrameFolderReader(VideoReader):
    def __init__(self, folder: str, num_frames: Optional[int], pattern: str):
        if not os.path.isdir(folder):
            raise DecodeError(f"{folder}: frame folder not found")
        self.folder, self.pattern = folder, pattern
        if num_frames is None:  # count consecutive files
            num_frames = 0
            while os.path.exists(self._file(num_frames)):
                num_frames += 1
        if num_frames <= 0:
            raise DecodeError(f"{folder}: no frames")
        self.num_frames = num_frames

    def _file(self, i: int) -> str:
        return os.path.join(self.folder, self.pattern.format(i + 1))

    def read(self, indices: Sequence[int]) -> np.ndarray:
        from PIL import Image

        cache = {}
        for i in set(int(i) for i in indices):
            path = self._file(min(i, self.num_frames - 1))
            try:
                with Image.open(path) as im:
                    cache[i] = np.asarray(im.convert("RGB"))
            except Exception as e:
                raise DecodeError(f"{path}: cannot read frame ({type(e).__name__}: {e})") from None
        try:
            return np.stack([cache[int(i)] for i in indices])
        except ValueError as e:  # frames of different sizes
            raise DecodeError(f"{self.folder}: {e}") from None


class FrameFolderBackend(Backend):
    name = "frames"

    def __init__(self, threads: int = 1, pattern: str = "img_{:05d}.jpg"):
        super().__init__(threads)
        self.pattern = pattern

    def open(self, path: str, num_frames: Optional[int] = None) -> VideoReader:
        return FrameFolderReader(path, num_frames, self.pattern)
