"""Pictures a person can read: loss / accuracy curves, image mosaics with row titles, confusion
matrices.

Drawn with Pillow (a dependency) by default; matplotlib is used instead when it is installed
(``pip install mam2_fast[viz]``). Set ``MAM2_FAST_NO_MATPLOTLIB=1`` to force Pillow (the tests
do). Every figure has a title; curves have numbered ticks on both axes and a legend; mosaics
have a title per row (and per column when given).

The ``render_*`` functions return ``(PIL.Image, layout)``: the layout dict names the boxes
``(x0, y0, x1, y1)`` of the title, the panels, their ticks and legend entries (tests and
callers that compose figures read it); the ``save_*`` functions write the PNG and return its
path.
"""
from __future__ import annotations

import colorsys
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
GRID = (226, 226, 226)
FRAME = (90, 90, 90)
# matplotlib's tab10: distinct from each other, from the ink and from the grid
SERIES_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


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
# PNG files and colour maps
# ----------------------------------------------------------------------------------------
def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    a = np.asarray(rgb)
    if a.dtype != np.uint8:
        a = (np.clip(np.nan_to_num(a.astype(np.float64)), 0, 1) * 255 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """uint8 [H, W, 3] (or float in [0, 1], or [H, W] gray) -> an 8-bit RGB PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_to_uint8(rgb)).convert("RGB").save(path, format="PNG")
    return path


def read_png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a PNG file."""
    from PIL import Image

    with Image.open(path) as im:
        if im.format != "PNG":
            raise ValueError(f"{path}: not a PNG")
        return im.size


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
# text and ticks (Pillow)
# ----------------------------------------------------------------------------------------
_FONTS: dict = {}


def _font(size: int):
    """Pillow's bundled scalable font at ``size`` px (its bitmap font where FreeType is absent)."""
    if size not in _FONTS:
        from PIL import ImageFont
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except (TypeError, ImportError, OSError):      # old Pillow / no FreeType
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def _text_size(draw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return int(math.ceil(x1 - min(x0, 0))), int(math.ceil(y1 - min(y0, 0)))


def _measure(text: str, size: int) -> tuple[int, int]:
    from PIL import Image, ImageDraw
    return _text_size(ImageDraw.Draw(Image.new("RGB", (1, 1))), text, _font(size))


def _fit_text(text: str, size: int, width: int) -> str:
    """``text`` cut with an ellipsis so that it is at most ``width`` px wide."""
    if width <= 0 or _measure(text, size)[0] <= width:
        return text
    while len(text) > 1 and _measure(text + "…", size)[0] > width:
        text = text[:-1]
    return text + "…"


def _draw_text(img, xy: tuple[float, float], text: str, size: int, fill=INK, anchor: str = "la",
               rotate: bool = False) -> tuple[int, int, int, int]:
    """Draw ``text``; ``anchor`` as Pillow's (l/m/r x t/m/b); ``rotate``: 90° counter-clockwise
    (read bottom to top). Returns the box it covers."""
    from PIL import Image, ImageDraw

    font = _font(size)
    draw = ImageDraw.Draw(img)
    w, h = _text_size(draw, text, font)
    if rotate:
        tile = Image.new("RGBA", (w + 2, h + 2), (0, 0, 0, 0))
        ImageDraw.Draw(tile).text((1, 1), text, font=font, fill=tuple(fill) + (255,))
        tile = tile.rotate(90, expand=True)
        w, h = tile.size
    ax, ay = anchor[0], anchor[1]
    x = xy[0] - (w / 2 if ax == "m" else w if ax == "r" else 0)
    y = xy[1] - (h / 2 if ay == "m" else h if ay == "b" else 0)
    x, y = int(round(x)), int(round(y))
    if rotate:
        img.paste(tile, (x, y), tile)
    else:
        draw.text((x, y), text, font=font, fill=tuple(fill))
    return (x, y, x + w, y + h)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi < lo:
        lo, hi = hi, lo
    if hi - lo <= 0:
        d = abs(lo) * 0.1 or 1.0
        lo, hi = lo - d, hi + d
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def format_tick(v: float, step: float) -> str:
    """A tick label with as many decimals as the tick spacing needs (k / M for large steps)."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6 and step >= 1e5:
        return f"{v / 1e6:g}M"
    if a >= 1e4 and step >= 1e3:
        return f"{v / 1e3:g}k"
    if a < 1e-3 or a >= 1e7:
        return f"{v:.2g}"
    decimals = max(0, -int(math.floor(math.log10(step) + 1e-9))) if step > 0 else 3
    if step > 0 and abs(round(step * 10 ** decimals) - step * 10 ** decimals) > 1e-6:
        decimals += 1                              # 2.5 x 10^k
    return f"{v:.{decimals}f}"


# ----------------------------------------------------------------------------------------
# line plots
# ----------------------------------------------------------------------------------------
def _range(values: Sequence[np.ndarray], pad: float) -> tuple[float, float]:
    v = np.concatenate([np.asarray(a, float).ravel() for a in values]) if values else np.zeros(0)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 0:
        d = abs(lo) * 0.1 or 0.5
        return lo - d, hi + d
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def _densify(pts: Sequence[tuple[float, float]], spacing: float = 4.0) -> np.ndarray:
    """A polyline's points plus points every ``spacing`` px along its segments ``[n, 2]``."""
    p = np.asarray(pts, float).reshape(-1, 2)
    if len(p) < 2:
        return p
    seg = np.diff(p, axis=0)
    n = np.clip(np.ceil(np.hypot(seg[:, 0], seg[:, 1]) / spacing).astype(int), 1, 200)
    t = np.concatenate([np.arange(k) / k for k in n])
    start = np.repeat(p[:-1], n, axis=0)
    return np.concatenate([start + np.repeat(seg, n, axis=0) * t[:, None], p[-1:]])


# Long on purpose: one drawing pass on one canvas; the steps (axes, ticks, grid, lines, legend) share
# the panel's box, scales and fonts and fill the returned layout as they draw, so helpers would
# only pass those a dozen locals back and forth.
def render_line_panels(panels: Sequence[dict], title: str, xlabel: str = "step",
                       panel_size: tuple[int, int] = (460, 320)):
    """Side-by-side line charts with a figure title, numbered ticks on both axes, a grid and a
    legend per panel.

    ``panels``: ``[{"title": str, "ylabel": str, "series": [(label, x, y), ...]}, ...]``.
    Returns ``(PIL.Image, layout)`` with ``layout = {"size", "title_box", "panels": [{"title",
    "box" (plot area), "title_box", "xticks", "yticks", "legend": [{"label", "color", "box"}]}]}``.
    """
    from PIL import Image, ImageDraw

    pw, ph = panel_size
    fs, tick_fs, title_fs = 13, 11, 16
    title_h = 34
    W, H = pw * len(panels), title_h + ph
    img = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(img)
    layout = {"size": (W, H), "panels": [],
              "title_box": _draw_text(img, (W / 2, title_h / 2), _fit_text(title, title_fs, W - 8), title_fs,
                                      anchor="mm")}
    color_i = 0
    for p_i, panel in enumerate(panels):
        ox = p_i * pw
        series = [(lbl, np.asarray(x, float), np.asarray(y, float)) for lbl, x, y in panel["series"]]
        fin = [(lbl, x[np.isfinite(x) & np.isfinite(y)], y[np.isfinite(x) & np.isfinite(y)]) for lbl, x, y in series]
        x_lo, x_hi = _range([x for _, x, _ in fin], 0.0)
        y_lo, y_hi = _range([y for _, _, y in fin], 0.05)
        yt = [t for t in nice_ticks(y_lo, y_hi) if y_lo - 1e-12 <= t <= y_hi + 1e-12]
        xt = [t for t in nice_ticks(x_lo, x_hi) if x_lo - 1e-12 <= t <= x_hi + 1e-12]
        ystep = yt[1] - yt[0] if len(yt) > 1 else (y_hi - y_lo)
        xstep = xt[1] - xt[0] if len(xt) > 1 else (x_hi - x_lo)
        ylabels = [format_tick(t, ystep) for t in yt]
        label_w = max([_measure(s, tick_fs)[0] for s in ylabels] + [10])
        left = ox + 16 + fs + 6 + label_w + 6            # ylabel, tick labels, tick marks
        last_w = _measure(format_tick(xt[-1], xstep), tick_fs)[0] if xt else 0
        right = ox + pw - max(14, last_w // 2 + 6)        # the last x tick label fits
        top = title_h + 26                                 # panel title above the plot
        bottom = H - (tick_fs + 8 + fs + 10)               # tick labels and xlabel below
        box = (left, top, right, bottom)

        def px(x):
            return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

        def py(y):
            return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

        # grid, ticks, tick labels
        yticks, xticks = [], []
        for t, s in zip(yt, ylabels):
            v = int(round(py(t)))
            draw.line([(left, v), (right, v)], fill=GRID, width=1)
            draw.line([(left - 5, v), (left, v)], fill=FRAME, width=1)
            yticks.append({"value": t, "label": s,
                           "box": _draw_text(img, (left - 8, v), s, tick_fs, anchor="rm")})
        for t in xt:
            u = int(round(px(t)))
            s = format_tick(t, xstep)
            draw.line([(u, top), (u, bottom)], fill=GRID, width=1)
            draw.line([(u, bottom), (u, bottom + 5)], fill=FRAME, width=1)
            xticks.append({"value": t, "label": s,
                           "box": _draw_text(img, (u, bottom + 7), s, tick_fs, anchor="mt")})
        draw.rectangle(box, outline=FRAME, width=1)
        _draw_text(img, ((left + right) / 2, H - 4), xlabel, fs, anchor="mb")
        if panel.get("ylabel"):
            _draw_text(img, (ox + 6, (top + bottom) / 2), _fit_text(panel["ylabel"], fs, bottom - top), fs,
                       anchor="lm", rotate=True)
        ptitle = _draw_text(img, ((left + right) / 2, top - 6),
                            _fit_text(panel.get("title", ""), fs + 1, right - left), fs + 1, anchor="mb")

        # the curves
        colors, all_pts = [], []
        for lbl, x, y in fin:
            col = SERIES_COLORS[color_i % len(SERIES_COLORS)]
            color_i += 1
            colors.append(col)
            if x.size == 0:
                continue
            order = np.argsort(x, kind="stable")
            pts = [(float(px(a)), float(py(b))) for a, b in zip(x[order], y[order])]
            all_pts.append(_densify(pts))
            if len(pts) > 1:
                draw.line(pts, fill=col, width=2, joint="curve")
            for u, v in (pts if len(pts) <= 1 else []):
                draw.ellipse((u - 3, v - 3, u + 3, v + 3), fill=col)

        # legend: inside the plot area, in the corner the curves cross least
        legend = []
        if fin:
            rows = [(lbl, col) for (lbl, _, _), col in zip(fin, colors)]
            tw = max(_measure(lbl, tick_fs)[0] for lbl, _ in rows)
            lh = tick_fs + 6
            lw = min(34 + tw + 8, right - left - 12)
            lhh = lh * len(rows) + 6
            corners = [(right - 6 - lw, top + 6), (left + 6, top + 6), (right - 6 - lw, bottom - 6 - lhh),
                       (left + 6, bottom - 6 - lhh)]
            pts_a = np.concatenate(all_pts) if all_pts else np.zeros((0, 2))

            def crossed(c):
                inside = ((pts_a[:, 0] >= c[0] - 4) & (pts_a[:, 0] <= c[0] + lw + 4)
                          & (pts_a[:, 1] >= c[1] - 4) & (pts_a[:, 1] <= c[1] + lhh + 4))
                return int(inside.sum())

            lx0, ly0 = min(corners, key=crossed)       # ties: the first (top right)
            lx1 = lx0 + lw
            draw.rectangle((lx0, ly0, lx1, ly0 + lhh), fill=BACKGROUND, outline=FRAME)
            for i, (lbl, col) in enumerate(rows):
                cy = ly0 + 3 + lh * i + lh / 2
                draw.line([(lx0 + 6, cy), (lx0 + 28, cy)], fill=col, width=3)
                tb = _draw_text(img, (lx0 + 34, cy), _fit_text(lbl, tick_fs, lx1 - lx0 - 38), tick_fs, anchor="lm")
                legend.append({"label": lbl, "color": col, "box": (int(lx0 + 4), int(cy - lh / 2), tb[2], int(cy + lh / 2))})
        layout["panels"].append({"title": panel.get("title", ""), "box": box, "title_box": ptitle,
                                 "xticks": xticks, "yticks": yticks, "legend": legend})
    return img, layout


def _group_curves(keys: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Keys -> panels: every ``*loss*`` key on one panel, every ``*acc*`` key on another (they
    have different scales), anything else on a panel of its own."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        g = "loss" if "loss" in k else "accuracy" if "acc" in k else k
        groups.setdefault(g, []).append(k)
    return list(groups.items())


def _curve_series(records: Sequence[dict], keys: Sequence[str], x_key: str):
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        raise ValueError(f"none of {list(keys)} found in the metrics records")
    out = {}
    for k in keys:
        pts = [(r[x_key], r[k]) for r in records if k in r and x_key in r and r[k] is not None]
        out[k] = (np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float))
    return keys, out


def render_curves(records: Sequence[dict], keys: Sequence[str], x_key: str = "step", title: str = ""):
    """``(PIL.Image, layout)`` of ``records``' ``keys`` against ``x_key``: losses on one panel,
    accuracies on another, each curve in the legend (see :func:`render_line_panels`)."""
    keys, data = _curve_series(records, keys, x_key)
    panels = [{"title": g, "ylabel": g, "series": [(k, *data[k]) for k in ks]} for g, ks in _group_curves(keys)]
    return render_line_panels(panels, title or f"metrics against {x_key}", xlabel=x_key)


def save_curves_png(records: Sequence[dict], keys: Sequence[str], path: str | Path, x_key: str = "step",
                    title: str = "") -> Path:
    """Curves of ``records`` (e.g. metrics.jsonl rows), value against ``x_key``: one panel for
    the losses, one for the accuracies, with a title, numbered axes and a legend."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if have_matplotlib():
        keys, data = _curve_series(records, keys, x_key)
        groups = _group_curves(keys)
        plt = _plt()
        fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
        for ax, (g, ks) in zip(axes[0], groups):
            for k in ks:
                x, y = data[k]
                order = np.argsort(x, kind="stable")
                ax.plot(x[order], y[order], lw=1.2, label=k, marker="o" if len(x) == 1 else None)
            ax.set_title(g, fontsize=9)
            ax.set_xlabel(x_key, fontsize=8)
            ax.set_ylabel(g, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(title or f"metrics against {x_key}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    img, _ = render_curves(records, keys, x_key=x_key, title=title)
    img.save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------------------
# image mosaics
# ----------------------------------------------------------------------------------------
def render_image_grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], title: str = "", gap: int = 2,
                      col_titles: Optional[Sequence[str]] = None, min_cell: int = 64):
    """Rows of images ``[(row title, [img [H, W, 3] in [0, 1], ...]), ...]`` -> ``(PIL.Image,
    layout)``: a title strip, the row titles in a column on the left, optional column titles,
    images scaled up (nearest) to at least ``min_cell`` px. ``layout``: ``{"size", "title_box",
    "rows": [{"title", "label_box", "cells": [box, ...]}], "col_boxes"}``."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("save_image_grid: no rows")
    ncols = max(len(imgs) for _, imgs in rows)
    h = max((i.shape[0] for _, imgs in rows for i in imgs), default=1)
    w = max((i.shape[1] for _, imgs in rows for i in imgs), default=1)
    scale = max(1, math.ceil(min_cell / max(min(h, w), 1)))
    ch, cw = h * scale, w * scale
    fs, title_fs = 13, 15
    gap = max(gap, 2)
    label_w = min(max(_measure(name, fs)[0] for name, _ in rows) + 16, 260)
    title_h = 30
    head_h = fs + 10 if col_titles else 0
    W = label_w + ncols * (cw + gap) + gap
    W = max(W, min(_measure(title, title_fs)[0] + 16, 1600))
    H = title_h + head_h + len(rows) * (ch + gap) + gap
    img = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(img)
    layout = {"size": (W, H), "rows": [], "col_boxes": [],
              "title_box": _draw_text(img, (W / 2, title_h / 2), _fit_text(title or "", title_fs, W - 8), title_fs,
                                      anchor="mm")}
    if col_titles:
        for c, name in enumerate(col_titles[:ncols]):
            x0 = label_w + gap + c * (cw + gap)
            layout["col_boxes"].append(_draw_text(img, (x0 + cw / 2, title_h + head_h / 2),
                                                  _fit_text(str(name), fs, cw), fs, anchor="mm"))
    for r, (name, imgs) in enumerate(rows):
        y0 = title_h + head_h + gap + r * (ch + gap)
        if r % 2:
            draw.rectangle((0, y0 - gap // 2, label_w - 4, y0 + ch + gap // 2), fill=(244, 244, 244))
        lb = _draw_text(img, (label_w - 10, y0 + ch / 2), _fit_text(name, fs, label_w - 14), fs, anchor="rm")
        cells = []
        for c, a in enumerate(imgs):
            x0 = label_w + gap + c * (cw + gap)
            tile = Image.fromarray(_to_uint8(a)).convert("RGB")
            if scale > 1:
                tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
            img.paste(tile, (x0, y0))
            cells.append((x0, y0, x0 + tile.width, y0 + tile.height))
        layout["rows"].append({"title": name, "label_box": lb, "cells": cells})
    return img, layout


def save_image_grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], path: str | Path,
                    title: str = "", gap: int = 2, col_titles: Optional[Sequence[str]] = None) -> Path:
    """Rows of images ``[(row title, [img [H, W, 3] in [0, 1], ...]), ...]`` -> one PNG with a
    title, the row titles on the left and optional column titles."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ncols = max(len(imgs) for _, imgs in rows)
    if have_matplotlib():
        plt = _plt()
        extra = 0.3 if col_titles else 0.0
        fig, axes = plt.subplots(len(rows), ncols, figsize=(1.3 * ncols + 1.8, 1.3 * len(rows) + 0.6 + extra),
                                 squeeze=False)
        for r, (name, imgs) in enumerate(rows):
            for c in range(ncols):
                ax = axes[r][c]
                ax.axis("off")
                if c < len(imgs):
                    ax.imshow(np.clip(imgs[c], 0, 1), interpolation="nearest")
                if r == 0 and col_titles and c < len(col_titles):
                    ax.set_title(str(col_titles[c]), fontsize=7)
            axes[r][0].text(-0.08, 0.5, name, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    img, _ = render_image_grid(rows, title=title, gap=gap, col_titles=col_titles)
    img.save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------------------
# confusion matrix
# ----------------------------------------------------------------------------------------
def render_confusion(cm: np.ndarray, names: Sequence[str], title: str = ""):
    """Row-normalized confusion matrix (rows: true class, columns: predicted) with class names
    on both axes (up to 50 classes), counts in the cells when they fit, and a colour bar.
    Returns ``(PIL.Image, layout)``."""
    from PIL import Image, ImageDraw

    cm = np.asarray(cm)
    K = cm.shape[0]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    cell = max(4, min(40, 720 // max(K, 1)))
    fs = 11
    named = K <= 50 and cell >= 8
    labels = [str(n) for n in names][:K] if names is not None else [str(i) for i in range(K)]
    labels += [str(i) for i in range(len(labels), K)]
    lab_w = min(max(_measure(s, fs)[0] for s in labels) + 8, 160) if named else 0
    title_h, axis_h, bar_w = 30, fs + 10, 60
    left = axis_h + lab_w + 4
    top = title_h + 4
    Wm = K * cell
    W = left + Wm + 12 + bar_w
    H = top + Wm + 4 + lab_w + axis_h
    W = max(W, _measure(title, 15)[0] + 16)
    img = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(img)
    layout = {"size": (W, H), "title_box": _draw_text(img, (W / 2, title_h / 2),
                                                       _fit_text(title or "confusion matrix (row-normalized)", 15, W - 8),
                                                       15, anchor="mm")}
    mat = Image.fromarray(_to_uint8(heat(norm))).resize((Wm, Wm), Image.NEAREST)
    img.paste(mat, (left, top))
    layout["matrix_box"] = (left, top, left + Wm, top + Wm)
    if named:
        for i, s in enumerate(labels):
            s = _fit_text(s, fs, lab_w - 8)
            _draw_text(img, (left - 4, top + i * cell + cell / 2), s, fs, anchor="rm")
            _draw_text(img, (left + i * cell + cell / 2, top + Wm + 4), s, fs, anchor="mt", rotate=True)
        if cell >= 18:
            for i in range(K):
                for j in range(K):
                    if cm[i, j]:
                        _draw_text(img, (left + j * cell + cell / 2, top + i * cell + cell / 2), str(int(cm[i, j])),
                                   9 if cell < 26 else fs, fill=(0, 0, 0) if norm[i, j] > 0.5 else (255, 255, 255),
                                   anchor="mm")
    _draw_text(img, (left + Wm / 2, H - 3), "predicted", fs + 1, anchor="mb")
    _draw_text(img, (4, top + Wm / 2), "true", fs + 1, anchor="lm", rotate=True)
    # colour bar 0..1
    bx = left + Wm + 12
    bar = heat(np.linspace(1, 0, max(Wm, 2))[:, None].repeat(12, 1))
    img.paste(Image.fromarray(_to_uint8(bar)), (bx, top))
    draw.rectangle((bx, top, bx + 12, top + max(Wm, 2)), outline=FRAME)
    for t in (0.0, 0.5, 1.0):
        _draw_text(img, (bx + 16, top + (1 - t) * (max(Wm, 2) - 1)), f"{t:.1f}", fs, anchor="lm")
    return img, layout


def save_confusion_png(cm: np.ndarray, names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalized confusion matrix (rows: true class, columns: predicted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    K = cm.shape[0]
    if have_matplotlib():
        plt = _plt()
        size = min(0.35 * K + 2.5, 30)
        fig, ax = plt.subplots(figsize=(size, size))
        im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
        if K <= 50:
            ax.set_xticks(range(K), names, rotation=90, fontsize=6)
            ax.set_yticks(range(K), names, fontsize=6)
            for i in range(K):
                for j in range(K):
                    if cm[i, j]:
                        ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=5,
                                color="black" if norm[i, j] > 0.5 else "white")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title or "confusion matrix (row-normalized)", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    img, _ = render_confusion(cm, names, title=title)
    img.save(path, format="PNG")
    return path


__all__ = ["have_matplotlib", "write_png", "read_png_size", "heat", "code_palette", "signed_map", "nice_ticks",
           "format_tick", "render_line_panels", "render_curves", "save_curves_png", "render_image_grid",
           "save_image_grid", "render_confusion", "save_confusion_png", "SERIES_COLORS"]
