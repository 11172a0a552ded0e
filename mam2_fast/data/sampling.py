"""Frame-index and crop-box sampling, as in VideoMAE / MAE-ST.

Temporal (indices into the decoded video, ``L`` frames):

* :func:`dense_indices`   pre-training (Appendix B): ``T`` frames, stride ``s``, random start.
* :func:`segment_indices` TSN-style segments (SSv2 fine-tuning): one frame per segment.
* :func:`eval_clip_indices` ``K`` clips evenly spaced over the video (testing).

Clips longer than the video follow one stated rule (``short``): ``"loop"`` wraps the
index around (``i % L``), ``"pad"`` repeats the last frame (``min(i, L-1)``).

Spatial (boxes ``(x0, y0, w, h)`` in source pixels, later resized to ``input_size``):

* :func:`multiscale_crop_box` VideoMAE ``GroupMultiScaleCrop`` (scales, max_distort, fix_crop).
* :func:`three_crop_boxes`    testing: 3 square crops of side ``min(H, W)`` along the long side.

All randomness comes from an explicit ``numpy.random.Generator``; :func:`rng_for` derives one
from integer keys so that a sample's draws depend only on (seed, epoch, rank, position, ...).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

Box = Tuple[int, int, int, int]  # x0, y0, w, h

_TAGS = {"temporal": 1, "crop": 2, "replace": 3}


def rng_for(*keys: int, tag: str = "temporal") -> np.random.Generator:
    """A generator that depends only on ``keys`` (non-negative ints) and ``tag``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAGS[tag], *map(int, keys)])))


def _fit(idx: np.ndarray, num_video_frames: int, short: str) -> np.ndarray:
    if num_video_frames <= 0:
        raise ValueError("video has no frames")
    if short == "loop":
        return idx % num_video_frames
    if short == "pad":
        return np.minimum(idx, num_video_frames - 1)
    raise ValueError(f"unknown short-video rule {short!r} (loop | pad)")


def dense_indices(num_video_frames: int, num_frames: int, stride: int,
                  rng: np.random.Generator, short: str = "loop") -> np.ndarray:
    """``num_frames`` indices ``start + stride * i`` with a uniformly random valid start."""
    span = (num_frames - 1) * stride + 1
    max_start = num_video_frames - span
    start = int(rng.integers(0, max_start + 1)) if max_start > 0 else 0
    return _fit(start + stride * np.arange(num_frames), num_video_frames, short)


def segment_indices(num_video_frames: int, num_segments: int,
                    rng: np.random.Generator = None) -> np.ndarray:
    """TSN / VideoMAE-SSv2 sampling: split ``[0, L-1]`` into ``num_segments`` equal segments;
    training (``rng`` given) takes a random frame of each, testing its middle frame."""
    seg = (num_video_frames - 1) / num_segments
    out = []
    for i in range(num_segments):
        lo, hi = int(np.round(seg * i)), int(np.round(seg * (i + 1)))
        out.append(int(rng.integers(lo, hi + 1)) if rng is not None else (lo + hi) // 2)
    return np.asarray(out, dtype=np.int64)


def eval_clip_indices(num_video_frames: int, num_frames: int, stride: int, num_clips: int,
                      short: str = "loop") -> List[np.ndarray]:
    """``num_clips`` dense clips with starts evenly spaced from the first to the last valid one."""
    span = (num_frames - 1) * stride + 1
    step = max(num_video_frames - span, 0) / max(num_clips - 1, 1)
    return [_fit(int(step * k) + stride * np.arange(num_frames), num_video_frames, short)
            for k in range(num_clips)]


def _fix_offsets(w: int, h: int, cw: int, ch: int) -> List[Tuple[int, int]]:
    # VideoMAE GroupMultiScaleCrop.fill_fix_offset(more_fix_crop=True)
    ws, hs = (w - cw) // 4, (h - ch) // 4
    return [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs),
            (0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),
            (1 * ws, 1 * hs), (3 * ws, 1 * hs), (1 * ws, 3 * hs), (3 * ws, 3 * hs)]


def multiscale_crop_box(height: int, width: int, input_size: int, rng: np.random.Generator,
                        scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66),
                        max_distort: int = 1, fix_crop: bool = True) -> Box:
    """VideoMAE ``GroupMultiScaleCrop._sample_crop_size``: returns ``(x0, y0, w, h)``."""
    base = min(width, height)
    sizes = [int(base * s) for s in scales]
    sizes = [input_size if abs(s - input_size) < 3 else s for s in sizes]
    pairs = [(sizes[j], sizes[i]) for i in range(len(sizes)) for j in range(len(sizes))
             if abs(i - j) <= max_distort]
    cw, ch = pairs[int(rng.integers(len(pairs)))]
    cw, ch = min(cw, width), min(ch, height)  # a size snapped up to input_size may exceed a tiny frame
    if fix_crop:
        offsets = _fix_offsets(width, height, cw, ch)
        x0, y0 = offsets[int(rng.integers(len(offsets)))]
    else:
        x0 = int(rng.integers(0, width - cw + 1))
        y0 = int(rng.integers(0, height - ch + 1))
    return x0, y0, cw, ch


def three_crop_boxes(height: int, width: int) -> List[Box]:
    """Testing: three ``min(H,W)``-square crops at the start, middle and end of the long side
    (VideoMAE resizes the short side to the input size first; crop-then-resize is the same)."""
    side = min(height, width)
    step = (max(height, width) - side) // 2
    if width >= height:
        return [(step * k, 0, side, side) for k in range(3)]
    return [(0, step * k, side, side) for k in range(3)]


def center_crop_box(height: int, width: int, scale: float = 1.0) -> Box:
    """A centred square crop of side ``scale * min(H, W)``."""
    side = max(1, int(min(height, width) * scale))
    return (width - side) // 2, (height - side) // 2, side, side
