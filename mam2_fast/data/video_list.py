"""VideoMAE list files.

Two formats, one record type:

* ``video``:  ``path label`` per line (space or comma separated), e.g. Kinetics-400/UCF101.
* ``frames``: ``folder num_frames label`` per line, e.g. SSv2 or HMDB51 pre-extracted to
  JPEGs named by ``frame_pattern`` (1-based: ``img_00001.jpg`` is frame 0).

Relative paths are joined to ``root``; with an empty ``root`` they are taken relative to
the list file's folder. Blank lines and lines starting with ``#`` are ignored.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional

_SPLIT = re.compile(r"[,\s]+")


@dataclass(frozen=True)
class VideoRecord:
    path: str                       # video file, or frame folder
    label: int
    num_frames: Optional[int] = None  # known for frame folders; probed for video files


def _resolve(path: str, root: str, list_dir: str) -> str:
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return path
    return os.path.join(os.path.expanduser(root) if root else list_dir, path)


def read_list_file(list_file: str, root: str = "", fmt: str = "video") -> List[VideoRecord]:
    """Parse a VideoMAE list file; raises ``FileNotFoundError`` naming a missing path."""
    list_file = os.path.expanduser(list_file)
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"data: list file not found: {list_file}")
    if root and not os.path.isdir(os.path.expanduser(root)):
        raise FileNotFoundError(f"data: data root not found: {root}")
    if fmt not in ("video", "frames"):
        raise ValueError(f"data: unknown list format {fmt!r} (video | frames)")
    list_dir = os.path.dirname(os.path.abspath(list_file))
    records: List[VideoRecord] = []
    with open(list_file) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # paths may contain spaces: numbers are taken from the right
            parts = _SPLIT.split(line)
            want = 2 if fmt == "video" else 3
            if len(parts) < want:
                raise ValueError(f"data: {list_file}:{lineno}: expected {want} fields, got {line!r}")
            try:
                nums = [int(p) for p in parts[-(want - 1):]]
            except ValueError:
                raise ValueError(f"data: {list_file}:{lineno}: non-integer field in {line!r}") from None
            # re-cut the path from the raw line so that inner spaces survive
            path = line
            for _ in range(want - 1):
                path = re.sub(r"[,\s]+[-+]?\d+\s*$", "", path)
            path = _resolve(path.strip(), root, list_dir)
            if fmt == "video":
                records.append(VideoRecord(path, nums[0]))
            else:
                records.append(VideoRecord(path, nums[1], num_frames=nums[0]))
    if not records:
        raise ValueError(f"data: list file is empty: {list_file}")
    return records
