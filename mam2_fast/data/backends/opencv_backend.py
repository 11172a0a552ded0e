"""OpenCV backend (where installed). Reads sequentially with ``grab`` (skipped frames are not
converted) because ``CAP_PROP_POS_FRAMES`` seeking is not frame-exact on every build.

Known issue: once cv2 has decoded in the main process (``num_workers=0``), ``fork``-started
workers can deadlock inside cv2; the decode timeout then abandons them. Use
``mp_context: forkserver`` (needs an ``if __name__ == "__main__"`` guard) with OpenCV."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .base import Backend, DecodeError, VideoReader, gather


class OpenCVReader(VideoReader):
    def __init__(self, path: str, threads: int):
        import cv2

        self.cv2, self.path = cv2, path
        if threads > 0:
            cv2.setNumThreads(threads)
        self.cap = cv2.VideoCapture(path)
        if not self.cap.isOpened():
            raise DecodeError(f"{path}: cannot open")
        self.num_frames = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if self.num_frames <= 0:
            raise DecodeError(f"{path}: video stream has no frames")

    def read(self, indices: Sequence[int]) -> np.ndarray:
        wanted = set(int(i) for i in indices)
        last, frames = max(wanted), {}
        self.cap.set(self.cv2.CAP_PROP_POS_FRAMES, 0)
        for i in range(last + 1):
            if not self.cap.grab():
                break
            if i in wanted:
                ok, bgr = self.cap.retrieve()
                if not ok:
                    raise DecodeError(f"{self.path}: decode failed at frame {i}")
                frames[i] = self.cv2.cvtColor(bgr, self.cv2.COLOR_BGR2RGB)
        return gather(frames, indices, self.path)

    def close(self) -> None:
        self.cap.release()


class OpenCVBackend(Backend):
    name = "opencv"

    def open(self, path: str, num_frames: Optional[int] = None) -> VideoReader:
        return OpenCVReader(path, self.threads)
