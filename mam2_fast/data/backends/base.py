"""The decoding interface every backend implements.

A backend opens one video and returns RGB ``uint8`` frames ``[T, H, W, 3]`` at requested
0-based frame indices (any order, repeats allowed). Frame ``i`` is the ``i``-th frame in
presentation order, so all backends agree on which picture an index names.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


class DecodeError(RuntimeError):
    """A video could not be opened or decoded; the message names the file."""


class VideoReader:
    """An open video. ``num_frames`` may be an estimate for containers without a frame count;
    indices past the real end are clamped to the last decoded frame."""

    num_frames: int

    def read(self, indices: Sequence[int]) -> np.ndarray:  # -> uint8 [T, H, W, 3]
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Backend:
    name = "base"

    def __init__(self, threads: int = 1):
        self.threads = threads

    def open(self, path: str, num_frames: Optional[int] = None) -> VideoReader:
        raise NotImplementedError


def gather(frames: dict, indices: Sequence[int], path: str) -> np.ndarray:
    """Stack ``frames[i]`` for ``indices``; an index past the last decoded frame takes it."""
    if not frames:
        raise DecodeError(f"{path}: no frames decoded")
    last = max(frames)
    out = [frames[i] if i in frames else frames[min(last, _nearest_below(frames, i))] for i in indices]
    return np.stack(out)


def _nearest_below(frames: dict, i: int) -> int:
    below = [k for k in frames if k <= i]
    return max(below) if below else min(frames)
