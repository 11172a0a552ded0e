"""RandAugment for video clips in plain torch, one draw per clip applied to all its frames.

Follows timm's ``rand-m9-mstd0.5-inc1`` policy (VideoMAE fine-tuning, Table 8 "(9, 0.5)"):
``n`` ops drawn with replacement from the "increasing" list below, each applied with
probability 0.5 at magnitude ``~ N(m, mstd)`` clipped to [0, 10]; signed ops flip sign with
probability 0.5. Every random decision is made once per clip, so all frames get the same op,
magnitude, sign and geometry (as VideoMAE applies one PIL op with the same arguments to every
frame); statistics-based ops (auto-contrast, equalize, contrast) use each frame's own
statistics, exactly like the per-frame PIL calls.

Input/output: float ``[T, C, H, W]`` in pixel units [0, 255] (C = 3, RGB).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

FILL = (124.0, 116.0, 104.0)  # timm: ImageNet mean in pixels, fill for geometric ops
MAX_LEVEL = 10.0


# ----------------------------------------------------------------------------------------
# ops: x [T, C, H, W] float in [0, 255] -> same
# ----------------------------------------------------------------------------------------
def _gray(x: Tensor) -> Tensor:
    # PIL "L": ITU-R 601-2 luma, [T, 1, H, W]
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: Tensor, b: Tensor, factor: float) -> Tensor:
    # PIL ImageEnhance: b + factor * (a - b), a the image, b the degenerate
    return (b + factor * (a - b)).clamp(0, 255)


def auto_contrast(x: Tensor, _: float = 0.0) -> Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp(min=1e-6), torch.ones_like(hi))
    lo = torch.where(hi > lo, lo, torch.zeros_like(lo))
    return ((x - lo) * scale).clamp(0, 255)


def equalize(x: Tensor, _: float = 0.0) -> Tensor:
    """PIL ImageOps.equalize per frame and channel."""
    T, C, H, W = x.shape
    v = x.round().clamp(0, 255).long().reshape(T * C, H * W)                   # [TC, HW]
    hist = torch.zeros(T * C, 256, dtype=torch.long, device=x.device).scatter_add_(1, v, torch.ones_like(v))
    last = hist.shape[1] - 1 - (hist.flip(1) > 0).long().argmax(dim=1)         # last non-empty bin
    step = (hist.sum(1) - hist.gather(1, last[:, None])[:, 0]) // 255           # [TC]
    cum = torch.cumsum(hist, dim=1) - hist                                       # counts below each bin
    lut = ((cum + (step // 2)[:, None]) // step.clamp(min=1)[:, None]).clamp(0, 255)
    out = lut.gather(1, v).float()
    out = torch.where((step > 0)[:, None], out, v.float())
    return out.reshape(T, C, H, W)


def invert(x: Tensor, _: float = 0.0) -> Tensor:
    return 255.0 - x


def posterize(x: Tensor, bits: float) -> Tensor:
    shift = 8 - int(bits)
    if shift <= 0:
        return x
    return ((x.round().clamp(0, 255).long() >> shift) << shift).float()


def solarize(x: Tensor, thresh: float) -> Tensor:
    return torch.where(x >= thresh, 255.0 - x, x)


def solarize_add(x: Tensor, add: float, thresh: float = 128.0) -> Tensor:
    return torch.where(x < thresh, (x + add).clamp(0, 255), x)


def color(x: Tensor, factor: float) -> Tensor:
    return _blend(x, _gray(x).expand_as(x), factor)


def contrast(x: Tensor, factor: float) -> Tensor:
    mean = _gray(x).round().mean(dim=(1, 2, 3), keepdim=True)     # per frame, PIL: int(mean + .5)
    return _blend(x, (mean + 0.5).floor().expand_as(x), factor)


def brightness(x: Tensor, factor: float) -> Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def sharpness(x: Tensor, factor: float) -> Tensor:
    # PIL SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1) / 13, borders keep the original pixels
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device) / 13.0
    T, C, H, W = x.shape
    smooth = F.conv2d(x.reshape(T * C, 1, H, W), k.view(1, 1, 3, 3)).reshape(T, C, H - 2, W - 2)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(x, degenerate, factor)


def affine(x: Tensor, matrix: tuple) -> Tensor:
    """Inverse-map affine warp (PIL ``Image.transform(AFFINE, matrix)``: output pixel (u, v)
    reads input (a u + b v + c, d u + e v + f)), bilinear, FILL outside."""
    a, b, c, d, e, f = matrix
    T, C, H, W = x.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=x.dtype, device=x.device),
                            torch.arange(W, dtype=x.dtype, device=x.device), indexing="ij")
    # pixel centres, PIL convention
    u, v = xs + 0.5, ys + 0.5
    sx, sy = a * u + b * v + c, d * u + e * v + f
    grid = torch.stack([sx / W * 2 - 1, sy / H * 2 - 1], dim=-1)              # [H, W, 2], align_corners=False
    grid = grid.unsqueeze(0).expand(T, H, W, 2)
    ones = torch.ones(T, 1, H, W, dtype=x.dtype, device=x.device)
    out = F.grid_sample(torch.cat([x, ones], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    valid = out[:, -1:]
    fill = torch.tensor(FILL[:C], dtype=x.dtype, device=x.device).view(1, C, 1, 1)
    return out[:, :-1] + (1 - valid) * fill


def rotate(x: Tensor, degrees: float) -> Tensor:
    H, W = x.shape[-2:]
    cx, cy = W / 2.0, H / 2.0
    t = math.radians(degrees)  # PIL rotates counter-clockwise; inverse map below
    a, b = math.cos(t), math.sin(t)
    c_, d = -math.sin(t), math.cos(t)
    return affine(x, (a, b, cx - a * cx - b * cy, c_, d, cy - c_ * cx - d * cy))


def shear_x(x: Tensor, s: float) -> Tensor:
    return affine(x, (1, s, 0, 0, 1, 0))


def shear_y(x: Tensor, s: float) -> Tensor:
    return affine(x, (1, 0, 0, s, 1, 0))


def translate_x_rel(x: Tensor, frac: float) -> Tensor:
    return affine(x, (1, 0, frac * x.shape[-1], 0, 1, 0))


def translate_y_rel(x: Tensor, frac: float) -> Tensor:
    return affine(x, (1, 0, 0, 0, 1, frac * x.shape[-2]))


# ----------------------------------------------------------------------------------------
# the policy: name -> (op, level -> argument, signed)
# ----------------------------------------------------------------------------------------
def _enhance(level: float) -> float:
    return level / MAX_LEVEL * 0.9          # "increasing": factor = 1 +- this


OPS: dict[str, tuple[Callable, Callable[[float], float], bool]] = {
    "AutoContrast": (auto_contrast, lambda m: 0.0, False),
    "Equalize": (equalize, lambda m: 0.0, False),
    "Invert": (invert, lambda m: 0.0, False),
    "Rotate": (rotate, lambda m: m / MAX_LEVEL * 30.0, True),
    "PosterizeIncreasing": (posterize, lambda m: 4 - int(m / MAX_LEVEL * 4), False),
    "SolarizeIncreasing": (solarize, lambda m: 256 - m / MAX_LEVEL * 256, False),
    "SolarizeAdd": (solarize_add, lambda m: float(int(m / MAX_LEVEL * 110)), False),
    "ColorIncreasing": (color, _enhance, True),
    "ContrastIncreasing": (contrast, _enhance, True),
    "BrightnessIncreasing": (brightness, _enhance, True),
    "SharpnessIncreasing": (sharpness, _enhance, True),
    "ShearX": (shear_x, lambda m: m / MAX_LEVEL * 0.3, True),
    "ShearY": (shear_y, lambda m: m / MAX_LEVEL * 0.3, True),
    "TranslateXRel": (translate_x_rel, lambda m: m / MAX_LEVEL * 0.45, True),
    "TranslateYRel": (translate_y_rel, lambda m: m / MAX_LEVEL * 0.45, True),
}
_ENHANCE = {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}


class RandAugment:
    """``RandAugment(n=2, m=9, mstd=0.5)(clip [T, C, H, W], generator)``; see module docstring."""

    def __init__(self, n: int = 2, m: float = 9.0, mstd: float = 0.5, prob: float = 0.5,
                 ops: Optional[list[str]] = None):
        self.n, self.m, self.mstd, self.prob = n, m, mstd, prob
        self.ops = list(ops or OPS)
        unknown = [o for o in self.ops if o not in OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment op(s) {unknown}; known: {list(OPS)}")

    def sample(self, g: torch.Generator) -> list[tuple[str, float]]:
        """The clip's draw: ``[(op name, argument)]`` for the ops that fire."""
        plan = []
        for _ in range(self.n):
            name = self.ops[int(torch.randint(len(self.ops), (1,), generator=g))]
            fire = float(torch.rand((), generator=g)) < self.prob
            level = self.m + self.mstd * float(torch.randn((), generator=g)) if self.mstd > 0 else self.m
            level = min(MAX_LEVEL, max(0.0, level))
            negate = float(torch.rand((), generator=g)) < 0.5
            if not fire:
                continue
            _, to_arg, signed = OPS[name]
            arg = to_arg(level)
            if signed and negate:
                arg = -arg
            if name in _ENHANCE:
                arg = 1.0 + arg
            plan.append((name, arg))
        return plan

    @staticmethod
    def apply(clip: Tensor, plan: list[tuple[str, float]]) -> Tensor:
        x = clip
        for name, arg in plan:
            x = OPS[name][0](x, arg)
        return x

    def __call__(self, clip: Tensor, g: torch.Generator) -> Tensor:
        if clip.ndim != 4 or clip.shape[1] != 3:
            raise ValueError(f"RandAugment expects [T, 3, H, W] pixels in [0, 255], got {tuple(clip.shape)}")
        return self.apply(clip.float(), self.sample(g))
