"""Pictures without hard dependencies: matplotlib when installed (``pip install
mam2_fast[viz]``), otherwise plain image mosaics written by a tiny zlib PNG writer.

Set ``MAM2_FAST_NO_MATPLOTLIB=1`` to force the fallback (used by the tests).
"""
from __future__ import annotations

import colorsys
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def have_matplotlib() -> bool:
    if os.environ.get("MAM2_FAST_NO_MATPLOTLIB"):
        return False
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------------------
# PNG writer and colour maps
# ----------------------------------------------------------------------------------------
def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """uint8 [H, W, 3] (or float in [0, 1]) -> an 8-bit RGB PNG."""
    a = np.asarray(rgb)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    H, W, _ = a.shape
    raw = b"".join(b"\x00" + a[y].tobytes() for y in range(H))       # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def read_png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG header (tests)."""
    data = Path(path).read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG")
    return struct.unpack(">II", data[16:24])


def heat(x: np.ndarray) -> np.ndarray:
    """values in [0, 1] -> RGB [.., 3] (dark blue -> yellow, viridis-like)."""
    stops = np.array([[0.27, 0.00, 0.33], [0.23, 0.32, 0.55], [0.13, 0.57, 0.55], [0.37, 0.79, 0.38], [0.99, 0.91, 0.14]])
    t = np.clip(x, 0, 1) * (len(stops) - 1)
    i = np.minimum(t.astype(int), len(stops) - 2)
    f = (t - i)[..., None]
    return stops[i] * (1 - f) + stops[i + 1] * f


def code_palette(num_codes: int) -> np.ndarray:
    """Distinct colours for code ids: golden-ratio hues, alternating lightness. [K, 3]."""
    cols = []
    for k in range(num_codes):
        h = (k * 0.61803398875) % 1.0
        light = 0.45 if k % 2 else 0.62
        cols.append(colorsys.hls_to_rgb(h, light, 0.75))
    return np.asarray(cols)


def signed_map(x: np.ndarray, scale: Optional[float] = None) -> np.ndarray:
    """signed values [..., 3] (RGB differences) -> RGB in [0, 1] around mid-gray."""
    s = scale if scale is not None else max(float(np.abs(x).max()), 1e-6)
    return np.clip(0.5 + 0.5 * x / s, 0, 1)


# ----------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------
def _pad(img: np.ndarray, h: int, w: int) -> np.ndarray:
    out = np.ones((h, w, 3))
    out[: img.shape[0], : img.shape[1]] = img[:h, :w]
    return out


def save_image_grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], path: str | Path,
                    title: str = "", gap: int = 2) -> Path:
    """Rows of images ``[(row title, [img [H, W, 3] in [0, 1], ...]), ...]`` -> one PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ncols = max(len(imgs) for _, imgs in rows)
    if have_matplotlib():
        plt = _plt()
        fig, axes = plt.subplots(len(rows), ncols, figsize=(1.3 * ncols + 1.2, 1.3 * len(rows) + 0.5), squeeze=False)
        for r, (name, imgs) in enumerate(rows):
            for c in range(ncols):
                ax = axes[r][c]
                ax.axis("off")
                if c < len(imgs):
                    ax.imshow(np.clip(imgs[c], 0, 1), interpolation="nearest")
            axes[r][0].text(-0.08, 0.5, name, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=7)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    h = max(i.shape[0] for _, imgs in rows for i in imgs)
    w = max(i.shape[1] for _, imgs in rows for i in imgs)
    canvas = np.ones((len(rows) * (h + gap), ncols * (w + gap), 3))
    for r, (_, imgs) in enumerate(rows):
        for c, img in enumerate(imgs):
            canvas[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = _pad(img, h, w)
    return write_png(path, canvas)


def save_confusion_png(cm: np.ndarray, names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalized confusion matrix (rows: true class, columns: predicted)."""
    path = Path(path)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    K = cm.shape[0]
    if have_matplotlib():
        plt = _plt()
        size = min(0.35 * K + 2.5, 30)
        fig, ax = plt.subplots(figsize=(size, size))
        ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
        if K <= 50:
            ax.set_xticks(range(K), names, rotation=90, fontsize=6)
            ax.set_yticks(range(K), names, fontsize=6)
            for i in range(K):
                for j in range(K):
                    if cm[i, j]:
                        ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=5,
                                color="black" if norm[i, j] > 0.5 else "white")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    cell = max(2, min(16, 512 // K))
    img = np.repeat(np.repeat(heat(norm), cell, 0), cell, 1)
    return write_png(path, img)


def _raster_lines(series: Sequence[tuple[np.ndarray, np.ndarray]], size=(240, 400)) -> np.ndarray:
    H, W = size
    img = np.ones((H, W, 3))
    xs = np.concatenate([s[0] for s in series])
    ys = np.concatenate([s[1] for s in series])
    x0, x1 = xs.min(), max(xs.max(), xs.min() + 1e-9)
    y0, y1 = ys.min(), max(ys.max(), ys.min() + 1e-9)
    img[H - 10, 10:W - 10] = 0.0                                  # axes
    img[10:H - 10, 10] = 0.0
    cols = code_palette(len(series) + 1)[1:]
    for (x, y), col in zip(series, cols):
        px = 10 + (x - x0) / (x1 - x0) * (W - 21)
        py = H - 10 - (y - y0) / (y1 - y0) * (H - 21)
        for a in range(len(px) - 1):
            n = int(max(abs(px[a + 1] - px[a]), abs(py[a + 1] - py[a]), 1)) + 1
            for t in np.linspace(0, 1, n):
                u = int(round(px[a] + t * (px[a + 1] - px[a])))
                v = int(round(py[a] + t * (py[a + 1] - py[a])))
                img[max(v - 1, 0): v + 1, max(u - 1, 0): u + 1] = col
        if len(px) == 1:
            img[int(py[0]) - 1: int(py[0]) + 2, int(px[0]) - 1: int(px[0]) + 2] = col
    return img


def save_curves_png(records: Sequence[dict], keys: Sequence[str], path: str | Path, x_key: str = "step",
                    title: str = "") -> Path:
    """One panel per key present in ``records`` (e.g. metrics.jsonl rows), value vs ``x_key``."""
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        raise ValueError(f"none of {list(keys)} found in the metrics records")
    series = []
    for k in keys:
        pts = [(r[x_key], r[k]) for r in records if k in r and x_key in r and r[k] is not None]
        series.append((k, np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)))
    path = Path(path)
    if have_matplotlib():
        plt = _plt()
        fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series), 2.8), squeeze=False)
        for ax, (k, x, y) in zip(axes[0], series):
            ax.plot(x, y, lw=1.2)
            ax.set_title(k, fontsize=9)
            ax.set_xlabel(x_key, fontsize=8)
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    panels = [_raster_lines([(x, y)]) for _, x, y in series]
    return write_png(path, np.concatenate([np.pad(p, ((0, 0), (0, 4), (0, 0)), constant_values=1) for p in panels], 1))
