"""PyAV backend (default): bundles FFmpeg, seeks to the key frame before the first wanted
frame and decodes forward (codec threading on), mapping each frame's pts to its index."""
from __future__ import annotations

from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

from .base import Backend, DecodeError, VideoReader, gather


class PyAVReader(VideoReader):
    def __init__(self, path: str, threads: int):
        import av

        self.path = path
        try:
            self.container = av.open(path)
            self.stream = self.container.streams.video[0]
        except Exception as e:  # av.error.*, IndexError (no video stream)
            raise DecodeError(f"{path}: cannot open ({type(e).__name__}: {e})") from None
        s = self.stream
        # codec threads pay off only on large frames; tiny videos decode faster on one
        small = (s.codec_context.width or 0) * (s.codec_context.height or 0) < 320 * 240
        s.thread_type = "AUTO"
        s.thread_count = 1 if small else max(1, threads)
        self.rate = Fraction(s.average_rate or s.guessed_rate or 25)
        self.time_base = s.time_base or Fraction(1, 1000)
        self.start = s.start_time or 0
        n = s.frames
        if not n:  # containers without a frame count: estimate from the duration
            dur = float(s.duration * self.time_base) if s.duration else \
                (self.container.duration or 0) / 1e6
            n = int(round(dur * float(self.rate)))
        if n <= 0:
            raise DecodeError(f"{path}: video stream has no frames")
        self.num_frames = n

    def _index(self, pts: Optional[int], fallback: int) -> int:
        if pts is None:
            return fallback
        return int(round(float((pts - self.start) * self.time_base * self.rate)))

    def _decode_range(self, first: int, last: int, wanted: set) -> dict:
        target = self.start + int(first / self.rate / self.time_base)
        self.container.seek(max(target, self.start), stream=self.stream, backward=True, any_frame=False)
        frames, idx = {}, None
        for frame in self.container.decode(self.stream):
            idx = self._index(frame.pts, -1 if idx is None else idx + 1)
            if idx > last:
                break
            if idx in wanted:
                frames[idx] = frame.to_ndarray(format="rgb24")
        return frames

    def read(self, indices: Sequence[int]) -> np.ndarray:
        wanted = set(int(i) for i in indices)
        first, last = min(wanted), max(wanted)
        try:
            frames = self._decode_range(first, last, wanted)
            if first not in frames and first > 0:  # seek overshot (broken index): decode from 0
                frames.update(self._decode_range(0, last, wanted - set(frames)))
        except Exception as e:
            raise DecodeError(f"{self.path}: decode failed ({type(e).__name__}: {e})") from None
        return gather(frames, indices, self.path)

    def close(self) -> None:
        self.container.close()


class PyAVBackend(Backend):
    name = "pyav"

    def open(self, path: str, num_frames: Optional[int] = None) -> VideoReader:
        return PyAVReader(path, self.threads)
