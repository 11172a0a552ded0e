"""A procedural action dataset of real video files, for demos and tests.

Each video shows one textured shape (circle, square, triangle) moving in one direction
(left, right, up, down) over a random low-frequency textured background:
``label = shape_id * 4 + direction_id`` (12 classes). 32 frames of 128x128 at 25 fps,
encoded as mp4 (H.264 if the encoder exists, else MPEG-4 Part 2) with PyAV.

The shape crosses 45-75 % of the free width or height over the video (about 1.4-2.3 px a frame
at 128x128), so a clip of 8 frames at stride 4 sees it move 2-3 patches of 16 px: direction
is a visible motion signal, not a sub-patch one.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Tuple

import numpy as np

SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
_VERSION = 3
_DIR_VEC = {0: (-1, 0), 1: (1, 0), 2: (0, -1), 3: (0, 1)}  # (dx, dy) in pixels


def _codec() -> str:
    import av

    for name in ("libx264", "h264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise RuntimeError("demo: PyAV has neither an H.264 nor an MPEG-4 encoder")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency colour texture [size, size, 3] in [0, 1]: bilinear upsampled coarse noise."""
    coarse = rng.random((cells + 1, cells + 1, 3))
    t = np.linspace(0, cells, size)
    i0 = np.minimum(t.astype(int), cells - 1)
    f = (t - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]          # [S, C+1, 3]
    cols = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]     # [S, S, 3]
    return cols


def _shape_mask(shape: int, yy: np.ndarray, xx: np.ndarray, r: float) -> np.ndarray:
    if shape == 0:
        return xx ** 2 + yy ** 2 <= r ** 2
    if shape == 1:
        return (np.abs(xx) <= r) & (np.abs(yy) <= r)
    # upward triangle inscribed in the radius-r circle
    return (yy <= r / 2) & (np.abs(xx) <= 0.866 * (yy + r) / 1.5)


def render_video(rng: np.random.Generator, label: int, size: int = 128,
                 num_frames: int = 32) -> np.ndarray:
    """uint8 [num_frames, size, size, 3] for ``label``."""
    shape, direction = divmod(label, 4)
    bg = 0.3 + 0.4 * _smooth_noise(rng, size, int(rng.integers(3, 7)))
    r = float(rng.uniform(0.14, 0.22)) * size   # 18-28 px at 128x128
    color = rng.uniform(0.0, 1.0, 3)
    color[rng.integers(3)] = 1.0 if color.mean() < 0.5 else 0.0  # stand out from the background
    stripes = float(rng.uniform(0.25, 0.6))
    dx, dy = _DIR_VEC[direction]
    margin = r + 2
    travel = float(rng.uniform(0.45, 0.75)) * (size - 2 * margin)   # pixels over the whole video
    speed = travel / max(num_frames - 1, 1)
    # start so that the whole path stays inside the frame
    lo_x = margin + (travel if dx < 0 else 0)
    hi_x = size - margin - (travel if dx > 0 else 0)
    lo_y = margin + (travel if dy < 0 else 0)
    hi_y = size - margin - (travel if dy > 0 else 0)
    x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        cx, cy = x0 + dx * speed * t, y0 + dy * speed * t
        ly, lx = yy - cy, xx - cx
        mask = _shape_mask(shape, ly, lx, r)
        texture = 1.0 - 0.35 * (np.sin((lx + ly) * stripes) > 0)  # stripes move with the shape
        frame = bg.copy()
        frame[mask] = color * texture[mask][:, None]
        out[t] = (frame * 255).astype(np.uint8)
    return out


def write_video(path: str, frames: np.ndarray, fps: int = 25, codec: str = None) -> None:
    """Encode uint8 [T, H, W, 3] frames to ``path`` with PyAV."""
    import av

    codec = codec or _codec()
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "18", "g": "16"}
        else:
            stream.bit_rate = 2_000_000
            stream.gop_size = 16
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _manifest(num_videos: int, seed: int, size: int, num_frames: int) -> dict:
    return {"version": _VERSION, "num_videos": num_videos, "seed": seed, "size": size,
            "num_frames": num_frames}


MARKER = ".mam2_fast_demo"      # marks a folder the demo builder owns (it writes only there)
_LEGACY = {"videos", "train.txt", "labels.json", "manifest.json"}   # single-variant layout (before v4)


def variant_name(num_videos: int, seed: int, size: int, num_frames: int) -> str:
    """Sub-folder of one demo variant: different sizes never share (or delete) files."""
    return f"n{num_videos}-seed{seed}-{size}px-{num_frames}f-v{_VERSION}"


def _complete(folder: str, want: dict) -> bool:
    """``folder`` holds a finished build of ``want`` (manifest written last, every video there)."""
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            if json.load(f) != want:
                return False
        with open(os.path.join(folder, "train.txt")) as f:
            paths = [line.rsplit(" ", 1)[0] for line in f if line.strip()]
        return len(paths) == want["num_videos"] and all(os.path.getsize(p) > 0 for p in paths)
    except (OSError, ValueError):
        return False


def _claim(root: str) -> None:
    """Make ``root`` the demo builder's folder, or refuse: it must be new, empty, already
    marked, or a demo cache of the older single-variant layout."""
    from mam2_fast.errors import UserError

    marker = os.path.join(root, MARKER)
    if os.path.isfile(marker):
        return
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"data.demo_dir {root} exists and is not a folder")
    entries = set(os.listdir(root)) if os.path.isdir(root) else set()
    foreign = {e for e in entries if not e.startswith(".build-")} - _LEGACY
    if foreign or (entries and "manifest.json" not in entries):
        shown = ", ".join(sorted(foreign or entries)[:3])
        raise UserError(f"data.demo_dir {root} is not empty and is not a demo folder (no {MARKER}; holds {shown}); "
                        f"the demo builder writes only into a new, empty or demo folder: set data.demo_dir to one")
    os.makedirs(root, exist_ok=True)
    with open(marker + f".{os.getpid()}.tmp", "w") as f:
        f.write("mam2_fast demo dataset cache: the demo builder writes and deletes only inside this folder\n")
    os.replace(marker + f".{os.getpid()}.tmp", marker)


def make_demo_dataset(root: str, num_videos: int = 64, seed: int = 0, size: int = 128,
                      num_frames: int = 32) -> str:
    """Write the demo videos under ``root`` and return the path of their list file.

    ``root`` is the demo builder's own folder: it must be new or empty the first time, and is
    then marked with a ``.mam2_fast_demo`` file; a non-empty folder without the marker is
    refused (nothing in it is touched). Each variant (number of videos, seed, size, frames)
    lives in its own sub-folder (:func:`variant_name`) holding ``videos/*.mp4``,
    ``train.txt`` (``path label``, absolute paths), ``labels.json`` (the label encoding) and
    ``manifest.json`` (written last: marks the build complete). Idempotent: a complete variant
    is reused as is; ``root`` may also name a complete variant folder itself.
    """
    root = os.path.abspath(os.path.expanduser(str(root)))
    want = _manifest(num_videos, seed, size, num_frames)
    if _complete(root, want):           # a variant folder, or a cache of the older layout
        return os.path.join(root, "train.txt")
    _claim(root)
    final = os.path.join(root, variant_name(num_videos, seed, size, num_frames))
    list_file = os.path.join(final, "train.txt")
    if _complete(final, want):
        return list_file
    # build in a private folder of the marked root, then move it into place (safe against
    # concurrent builders: the first rename wins, the others use its result)
    tmp = os.path.join(root, f".build-{os.getpid()}-{os.urandom(4).hex()}")
    os.makedirs(os.path.join(tmp, "videos"))
    try:
        codec = _codec()
        rng = np.random.default_rng(seed)
        labels = np.arange(num_videos) % (len(SHAPES) * len(DIRECTIONS))
        rng.shuffle(labels)
        lines = []
        for i, label in enumerate(labels):
            frames = render_video(np.random.default_rng([seed, i]), int(label), size, num_frames)
            name = f"videos/{i:05d}_{SHAPES[label // 4]}_{DIRECTIONS[label % 4]}.mp4"
            write_video(os.path.join(tmp, name), frames, codec=codec)
            lines.append((name, int(label)))
        with open(os.path.join(tmp, "labels.json"), "w") as f:
            json.dump({"num_classes": len(SHAPES) * len(DIRECTIONS), "label": "shape_id * 4 + direction_id",
                       "shapes": list(SHAPES), "directions": list(DIRECTIONS), "codec": codec,
                       "names": [f"{s} {d}" for s in SHAPES for d in DIRECTIONS]}, f, indent=1)
        with open(os.path.join(tmp, "train.txt"), "w") as f:
            f.writelines(f"{os.path.join(final, name)} {label}\n" for name, label in lines)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:   # last: marks complete
            json.dump(want, f)
        if os.path.isdir(final) and not _complete(final, want):   # an interrupted build of ours
            stale = os.path.join(root, f".build-stale-{os.getpid()}-{os.urandom(4).hex()}")
            try:
                os.replace(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
        try:
            os.replace(tmp, final)
        except OSError:
            if not _complete(final, want):   # another builder won the race with a complete set
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return list_file


def demo_label_names() -> Tuple[str, ...]:
    return tuple(f"{s} {d}" for s in SHAPES for d in DIRECTIONS)
