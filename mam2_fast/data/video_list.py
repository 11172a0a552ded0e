"""VideoMAE list files.

Two formats, one record type:

* ``video``:  ``path label`` per line (space or comma separated), e.g. Kinetics-400/UCF101.
* ``frames``: ``folder num_frames label`` per line, e.g. SSv2 or HMDB51 pre-extracted to
  JPEGs named by ``frame_pattern`` (1-based: ``img_00001.jpg`` is frame 0).

Relative paths are joined to ``root``; with an empty ``root`` they are taken relative to
the list file's folder. Blank lines and lines starting with ``#`` are ignored.

Also read as ``video`` lists:

* VideoMAE-v2 / MGMAE pre-training lines ``path 0 -1`` (``path start_idx -1``: a video file,
  no label): label ``-1`` (unlabelled; fine-tuning's label check refuses it);
* an official Kinetics-400 CSV (header ``label,youtube_id,time_start,time_end,split``): each
  row is ``{youtube_id}_{start:06d}_{end:06d}.mp4`` under ``root``, labelled by the index of
  its class in the sorted class names (:mod:`mam2_fast.data.official_lists`).

A ``video`` line ending in two integers other than ``... -1`` (``path 5 3``: a path ending in
a number, or a start / frame count?) is ambiguous and refused, naming the line.
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
    first = next((ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")), "")
    if fmt == "video" and _is_k400_header(first):
        from mam2_fast.data.official_lists import read_k400_csv
        clips, _ = read_k400_csv(list_file)
        return [VideoRecord(_resolve(c.filename, root, list_dir), c.label, line=c.line) for c in clips]
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # paths may contain spaces: numbers are taken from the right
        parts = _SPLIT.split(line)
        if fmt == "video" and len(parts) >= 3 and _is_int(parts[-1]) and _is_int(parts[-2]):
            if int(parts[-1]) != -1:
                raise UserValueError(f"data: {list_file}:{lineno}: ambiguous line {line!r}: a 'path label' line "
                                     f"ends in one integer (rename a path ending in a number); 'path start -1' "
                                     f"is a VideoMAE-v2 pre-training line; frame folders need data.format: frames")
            path = re.sub(r"[,\s]+[-+]?\d+[,\s]+-1\s*$", "", line)    # VideoMAE-v2: path start_idx -1
            records.append(VideoRecord(_resolve(path.strip(), root, list_dir), -1, line=lineno))
            continue
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


def _is_int(s: str) -> bool:
    return re.fullmatch(r"[-+]?\d+", s) is not None


def _is_k400_header(line: str) -> bool:
    from mam2_fast.data.official_lists import is_k400_header
    return is_k400_header(line)


def check_labels(records: Sequence[VideoRecord], num_classes: int, list_file: str,
                 key: str = "model.num_classes") -> None:
    """Every label in ``[0, num_classes)``, checked before training (a bad one would otherwise
    crash the step that draws it); the error names the file and line."""
    for r in records:
        if not 0 <= r.label < num_classes:
            raise UserValueError(f"data: {list_file}:{r.line}: label {r.label} is outside [0, {num_classes}) "
                                 f"({key}={num_classes})")
