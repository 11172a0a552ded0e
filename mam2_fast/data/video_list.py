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
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from mam2_fast.errors import UserFileNotFoundError, UserValueError

_SPLIT = re.compile(r"[,\s]+")


@dataclass(frozen=True)
class VideoRecord:
    path: str                       # video file, or frame folder
    label: int
    num_frames: Optional[int] = None  # known for frame folders; probed for video files
    line: int = field(default=0, compare=False)   # line number in the list file (for messages)


def _resolve(path: str, root: str, list_dir: str) -> str:
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return path
    return os.path.join(os.path.expanduser(root) if root else list_dir, path)


def read_list_file(list_file: str, root: str = "", fmt: str = "video") -> List[VideoRecord]:
    """Parse a VideoMAE list file; raises ``FileNotFoundError`` naming a missing path."""
    list_file = os.path.expanduser(list_file)
    if not os.path.isfile(list_file):
        raise UserFileNotFoundError(f"data: list file not found: {list_file}")
    if root and not os.path.isdir(os.path.expanduser(root)):
        raise UserFileNotFoundError(f"data: data root not found: {root}")
    if fmt not in ("video", "frames"):
        raise UserValueError(f"data: unknown list format {fmt!r} (video | frames)")
    list_dir = os.path.dirname(os.path.abspath(list_file))
    records: List[VideoRecord] = []
    try:
        with open(list_file) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserValueError(f"data: cannot read list file {list_file}: {e}") from None
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # paths may contain spaces: numbers are taken from the right
        parts = _SPLIT.split(line)
        want = 2 if fmt == "video" else 3
        if len(parts) < want:
            raise UserValueError(f"data: {list_file}:{lineno}: expected {want} fields, got {line!r}")
        try:
            nums = [int(p) for p in parts[-(want - 1):]]
        except ValueError:
            raise UserValueError(f"data: {list_file}:{lineno}: non-integer field in {line!r}") from None
        # re-cut the path from the raw line so that inner spaces survive
        path = line
        for _ in range(want - 1):
            path = re.sub(r"[,\s]+[-+]?\d+\s*$", "", path)
        path = _resolve(path.strip(), root, list_dir)
        if fmt == "video":
            records.append(VideoRecord(path, nums[0], line=lineno))
        else:
            records.append(VideoRecord(path, nums[1], num_frames=nums[0], line=lineno))
    if not records:
        raise UserValueError(f"data: list file is empty: {list_file}")
    return records


def check_labels(records: Sequence[VideoRecord], num_classes: int, list_file: str,
                 key: str = "model.num_classes") -> None:
    """Every label in ``[0, num_classes)``, checked before training (a bad one would otherwise
    crash the step that draws it); the error names the file and line."""
    for r in records:
        if not 0 <= r.label < num_classes:
            raise UserValueError(f"data: {list_file}:{r.line}: label {r.label} is outside [0, {num_classes}) "
                                 f"({key}={num_classes})")
