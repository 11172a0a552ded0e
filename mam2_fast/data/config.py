"""Data configuration (list files, sampling, decoding, augmentation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    # Where the videos are. ``list_file`` is a VideoMAE-style list: ``path label`` per line
    # (space or comma separated). ``None`` with ``demo: true`` builds the procedural demo set.
    list_file: Optional[str] = None
    root: str = ""                      # prefix joined to relative paths in the list file
    format: str = "video"               # "video" (path label) | "frames" (folder num_frames label)
    frame_pattern: str = "img_{:05d}.jpg"  # file names inside a frame folder (1-based index)
    demo: bool = False                  # build and use the procedural demo dataset
    demo_dir: str = "~/.cache/mam2_fast/demo"
    demo_num_videos: int = 64
    # sampling
    num_frames: int = 16
    sampling_stride: int = 4            # dense sampling stride (Appendix B: 4)
    num_sample: int = 1                 # repeated augmentation: clips per decoded video
    epoch_unit: str = "clips"           # what an epoch and the lr-scaling batch count under repeated
                                        # sampling: "clips" (MAE-ST: an epoch is N clips from
                                        # N / num_sample videos; lr scales with clips per step) |
                                        # "videos" (VideoMAE code: every video once, num_sample clips
                                        # each; lr scales with videos per step = clips / num_sample)
    short_video: str = "loop"           # clip longer than the video: "loop" (wrap) | "pad" (repeat last)
    # augmentation
    input_size: int = 224
    multiscale_scales: tuple = (1.0, 0.875, 0.75, 0.66)  # VideoMAE MultiScaleCrop scales
    max_distort: int = 1                # MultiScaleCrop: max index distance between w/h scales
    fix_crop: bool = True               # MultiScaleCrop: crop at one of 13 fixed positions
    flip: bool = True                   # horizontal flip (off for SSv2)
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    out_dtype: str = "float32"          # clip dtype handed to the model: float32 | bfloat16
    augment_impl: str = "auto"          # auto (fused extension if built) | extension | torch
    # decoding
    backend: str = "pyav"               # pyav | decord | opencv | frames | dali
    num_workers: int = 2                # decode processes; 0 decodes in a background thread
    prefetch: int = 4                   # videos queued per worker
    decode_threads: int = 0             # codec threads per worker; 0: cpu_count // (workers * LOCAL_WORLD_SIZE)
    decode_short_side: int = 0          # > 0: decoded frames resized to this short side in the
                                        # worker (e.g. 320 for un-resized K400); 0: as stored
    mp_context: str = "fork"            # worker start method: fork | forkserver | spawn
    decode_timeout_s: float = 60.0
    max_bad_fraction: float = 0.5       # stop if more than this fraction of a pass is unreadable
    max_worker_restarts: int = 8        # worker deaths tolerated per run before failing
