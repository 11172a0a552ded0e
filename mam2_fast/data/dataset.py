"""Worker-side loading: one video record -> uint8 frames of ``num_sample`` clips.

:class:`ClipSource` is small and picklable; it is shipped to every decode worker, which
opens the backend lazily. All randomness arrives as integer keys, so a clip depends only on
(seed, epoch, rank, position, attempt), never on which worker decoded it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from .backends import Backend, DecodeError, make_backend
from .sampling import dense_indices, rng_for, segment_indices, eval_clip_indices
from .video_list import VideoRecord


@dataclass(frozen=True)
class TemporalSampling:
    """How frame indices are drawn from a video of ``L`` frames.

    mode ``dense``: ``num_clips`` random dense clips (pre-training; ``num_clips = num_sample``);
    ``segment``: TSN segments, random frame per segment (``train``) or middle (test);
    ``test``: ``num_clips`` evenly spaced dense clips (K-clip testing).
    """
    mode: str = "dense"
    num_frames: int = 16
    stride: int = 4
    num_clips: int = 1
    short: str = "loop"
    train: bool = True

    def indices(self, num_video_frames: int, rng: np.random.Generator) -> List[np.ndarray]:
        L = num_video_frames
        if self.mode == "dense":
            return [dense_indices(L, self.num_frames, self.stride, rng, self.short)
                    for _ in range(self.num_clips)]
        if self.mode == "segment":
            return [segment_indices(L, self.num_frames, rng if self.train else None)
                    for _ in range(self.num_clips)]
        if self.mode == "test":
            return eval_clip_indices(L, self.num_frames, self.stride, self.num_clips, self.short)
        raise ValueError(f"unknown temporal sampling mode {self.mode!r}")


class ClipSource:
    def __init__(self, records: Sequence[VideoRecord], temporal: TemporalSampling,
                 backend: str = "pyav", threads: int = 1, frame_pattern: str = "img_{:05d}.jpg",
                 short_side: int = 0):
        self.records = list(records)
        self.temporal = temporal
        self.backend_name, self.threads, self.frame_pattern = backend, threads, frame_pattern
        self.short_side = int(short_side or 0)   # > 0: decoded frames resized to this short side
        self._backend: Optional[Backend] = None

    def __len__(self) -> int:
        return len(self.records)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_backend"] = None
        return state

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = make_backend(self.backend_name, self.threads, self.frame_pattern)
        return self._backend

    def load(self, index: int, keys: Sequence[int]) -> np.ndarray:
        """uint8 [num_clips, T, H, W, 3]; raises :class:`DecodeError` naming the file."""
        rec = self.records[index]
        if self.backend_name != "frames":
            try:
                if os.path.getsize(rec.path) == 0:
                    raise DecodeError(f"{rec.path}: empty file")
            except OSError as e:
                raise DecodeError(f"{rec.path}: cannot open ({e.strerror})") from None
        with self.backend.open(rec.path, rec.num_frames) as video:
            clips = self.temporal.indices(video.num_frames, rng_for(*keys, tag="temporal"))
            flat = np.concatenate(clips)                       # one decode pass for all clips
            frames = video.read(flat)                          # [S*T, H, W, 3]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or 0 in frames.shape:
            raise DecodeError(f"{rec.path}: decoder returned frames of shape {frames.shape} {frames.dtype}")
        if self.short_side > 0:
            frames = resize_short_side(frames, self.short_side)
        return frames.reshape(len(clips), -1, *frames.shape[1:])


def resize_short_side(frames: np.ndarray, short_side: int) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> shorter side ``short_side`` (aspect kept, bilinear with
    antialiasing); frames already at most that size are returned unchanged (no upscaling)."""
    N, H, W, _ = frames.shape
    if min(H, W) <= short_side:
        return frames
    import torch
    import torch.nn.functional as F

    if H <= W:
        size = (short_side, max(1, int(round(W * short_side / H))))
    else:
        size = (max(1, int(round(H * short_side / W))), short_side)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
