"""A generated two-label video dataset for the representation study (``python -m mam2_fast.study``).

Each video shows one *target* object over a cluttered scene and carries two labels:

* **appearance** (identity, K400-like): which of ``IDENTITIES`` the target is -- its outline
  (disc, square, triangle, cross, ring, diamond, ...). Colour and the object's stripe texture
  are drawn at random per video, so colour is no shortcut.
* **motion** (direction, SSv2-like): the way the target travels (left, right, up, down). A
  clip and its time reversal hold the same frames in the other order and carry opposite
  labels, so the label needs temporal order, not appearance.

``label = identity * len(DIRECTIONS) + direction`` (one list-file label; the study derives both
as ``label // 4`` and ``label % 4``).

Not trivially separable:

* background: low-frequency colour texture plus high-frequency grain (i.i.d. per video),
  slowly panning (the camera drifts 0-1 px a frame in a random direction, so "something
  moves" is not the label);
* distractors: ``distractors`` smaller objects of random identity and colour, each moving in
  its own random direction (they may share the target's identity or direction);
* the target's size, speed, start, colour and stripes vary; it may be partly covered by a
  distractor (drawn on top at random).

Videos are real mp4 files (PyAV, as :mod:`mam2_fast.data.demo`) with a VideoMAE list file
``path label`` and ``labels.json``; a ``manifest.json`` written last marks a finished build,
which is reused as is (idempotent, deterministic in ``seed``).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import numpy as np

from mam2_fast.data.demo import _smooth_noise, write_video

IDENTITIES = ("disc", "square", "triangle", "cross", "ring", "diamond")
DIRECTIONS = ("left", "right", "up", "down")
_DIR_VEC = {0: (-1, 0), 1: (1, 0), 2: (0, -1), 3: (0, 1)}
_VERSION = 1


def _identity_mask(identity: int, yy: np.ndarray, xx: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(xx), np.abs(yy)
    if identity == 0:                                            # disc
        return xx ** 2 + yy ** 2 <= r ** 2
    if identity == 1:                                            # square
        return (ax <= 0.85 * r) & (ay <= 0.85 * r)
    if identity == 2:                                            # upward triangle
        return (yy <= r / 2) & (ax <= 0.866 * (yy + r) / 1.5)
    if identity == 3:                                            # plus-shaped cross
        w = 0.32 * r
        return ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    if identity == 4:                                            # ring
        d2 = xx ** 2 + yy ** 2
        return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)
    if identity == 5:                                            # diamond
        return ax + ay <= 1.1 * r
    raise ValueError(f"identity {identity} is not in 0..{len(IDENTITIES) - 1}")


def _path(rng: np.random.Generator, size: int, r: float, direction: int, num_frames: int,
          travel_frac: tuple) -> tuple:
    """Start (x0, y0) and per-frame step (vx, vy) so that the whole path stays in the frame."""
    dx, dy = _DIR_VEC[direction]
    margin = r + 1
    travel = float(rng.uniform(*travel_frac)) * max(size - 2 * margin, 1.0)
    speed = travel / max(num_frames - 1, 1)
    lo_x = margin + (travel if dx < 0 else 0)
    hi_x = size - margin - (travel if dx > 0 else 0)
    lo_y = margin + (travel if dy < 0 else 0)
    hi_y = size - margin - (travel if dy > 0 else 0)
    x0 = rng.uniform(lo_x, max(hi_x, lo_x + 1e-3))
    y0 = rng.uniform(lo_y, max(hi_y, lo_y + 1e-3))
    return x0, y0, dx * speed, dy * speed


def _contrasting_colour(rng: np.random.Generator) -> np.ndarray:
    c = rng.uniform(0.0, 1.0, 3)
    c[rng.integers(3)] = 1.0 if c.mean() < 0.5 else 0.0
    return c


# the share of the free frame width (size minus the object's diameter) the target crosses over
# the whole video, drawn uniformly per video
TARGET_TRAVEL = (0.45, 0.75)


def render_video(rng: np.random.Generator, label: int, size: int = 64, num_frames: int = 16,
                 distractors: int = 2, grain: float = 0.12, target_travel: tuple = TARGET_TRAVEL) -> np.ndarray:
    """uint8 ``[num_frames, size, size, 3]`` of ``label = identity * 4 + direction``."""
    lo, hi = (float(v) for v in target_travel)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"target_travel must be (lo, hi) with 0 <= lo <= hi <= 1, got {tuple(target_travel)}")
    identity, direction = divmod(int(label), len(DIRECTIONS))
    if not 0 <= identity < len(IDENTITIES):
        raise ValueError(f"label {label}: identity {identity} is not in 0..{len(IDENTITIES) - 1}")
    pad = size // 4                                              # the background pans inside a larger canvas
    canvas = size + 2 * pad
    bg = 0.25 + 0.45 * _smooth_noise(rng, canvas, int(rng.integers(3, 8)))
    bg = np.clip(bg + grain * (rng.random((canvas, canvas, 3)) - 0.5), 0.0, 1.0)
    pan = rng.uniform(0.0, 1.0) * rng.choice([-1.0, 1.0], 2)     # px / frame
    pan = np.clip(pan * (num_frames - 1), -pad, pad) / max(num_frames - 1, 1)

    objects = []                                                # (identity, r, x0, y0, vx, vy, colour, stripes, phase)
    r = float(rng.uniform(0.16, 0.22)) * size
    objects.append((identity, r, *_path(rng, size, r, direction, num_frames, (lo, hi)),
                    _contrasting_colour(rng), float(rng.uniform(0.5, 1.2)), float(rng.uniform(0, 6.3))))
    for _ in range(distractors):
        rd = float(rng.uniform(0.07, 0.11)) * size
        objects.append((int(rng.integers(len(IDENTITIES))), rd,
                        *_path(rng, size, rd, int(rng.integers(4)), num_frames, (0.2, 0.8)),
                        _contrasting_colour(rng), float(rng.uniform(0.5, 1.2)), float(rng.uniform(0, 6.3))))
    order = list(range(len(objects)))
    if rng.random() < 0.5:                                      # a distractor may pass over the target
        order = order[1:] + order[:1]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        ox, oy = int(round(pad + pan[0] * t)), int(round(pad + pan[1] * t))
        frame = bg[oy:oy + size, ox:ox + size].copy()
        for k in order:
            ident, rr, x0, y0, vx, vy, colour, stripes, phase = objects[k]
            lx, ly = xx - (x0 + vx * t), yy - (y0 + vy * t)
            mask = _identity_mask(ident, ly, lx, rr)
            texture = 1.0 - 0.35 * (np.sin((lx - ly) * stripes + phase) > 0)   # moves with the object
            frame[mask] = colour * texture[mask][:, None]
        out[t] = (np.clip(frame, 0, 1) * 255).astype(np.uint8)
    return out


def label_names() -> list:
    return [f"{i}-{d}" for i in IDENTITIES for d in DIRECTIONS]


def num_classes(identities: int = len(IDENTITIES)) -> int:
    return identities * len(DIRECTIONS)


def make_study_dataset(root: str, num_videos: int, seed: int, size: int = 64, num_frames: int = 16,
                       identities: int = 4, distractors: int = 2, target_travel: tuple = TARGET_TRAVEL) -> str:
    """Write ``num_videos`` balanced videos under ``root`` (a folder owned by the study) and return
    the path of the list file; a finished build with the same parameters is reused."""
    target_travel = tuple(float(v) for v in target_travel)
    if not 1 <= identities <= len(IDENTITIES):
        raise ValueError(f"identities must be in 1..{len(IDENTITIES)}, got {identities}")
    want = {"version": _VERSION, "num_videos": num_videos, "seed": seed, "size": size,
            "num_frames": num_frames, "identities": identities, "distractors": distractors}
    if target_travel != TARGET_TRAVEL:          # recorded only when set, so older builds still match
        want["target_travel"] = list(target_travel)
    list_path = os.path.join(root, "list.txt")
    manifest = os.path.join(root, "manifest.json")
    try:
        with open(manifest) as f:
            if json.load(f) == want and os.path.isfile(list_path):
                return list_path
    except (OSError, ValueError):
        pass
    if os.path.isdir(root):
        shutil.rmtree(root)
    vids = os.path.join(root, "videos")
    os.makedirs(vids)
    rng = np.random.default_rng(seed)
    n_cls = num_classes(identities)
    labels = np.arange(num_videos) % n_cls
    rng.shuffle(labels)
    lines = []
    for i, label in enumerate(labels):
        frames = render_video(rng, int(label), size, num_frames, distractors, target_travel=target_travel)
        path = os.path.join(vids, f"{i:05d}.mp4")
        write_video(path, frames)
        lines.append(f"{os.path.abspath(path)} {int(label)}")
    with open(list_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "labels.json"), "w") as f:
        json.dump({"names": label_names()[:n_cls], "identities": list(IDENTITIES[:identities]),
                   "directions": list(DIRECTIONS), "label": "identity * 4 + direction"}, f, indent=1)
    with open(manifest, "w") as f:
        json.dump(want, f)
    return list_path


def contact_sheet(path: str, seed: int = 0, size: int = 64, num_frames: int = 16,
                  identities: int = 4, frames_shown: int = 4, out: Optional[str] = None) -> str:
    """A PNG of one video per class (rows) x ``frames_shown`` frames, for the docs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for label in range(num_classes(identities)):
        v = render_video(rng, label, size, num_frames)
        idx = np.linspace(0, num_frames - 1, frames_shown).round().astype(int)
        rows.append(np.concatenate(list(v[idx]), axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(out or path)
    return out or path
