"""VQGAN (taming-transformers) appearance tokenizer, plus the machinery shared by the frozen
pretrained code tokenizers (VQGAN here, DALL-E in ``dalle.py``).

VQGAN: encoder + quantizer in our own code with taming's module names, so released
``.ckpt`` files load unchanged (``state_dict`` keys ``encoder.*``, ``quant_conv.*``,
``quantize.*``; decoder / loss / discriminator keys are ignored). Presets:
``vqgan_imagenet_f16_16384``, ``vqgan_imagenet_f16_1024`` (VectorQuantizer2, nearest code
by L2) and ``vqgan_gumbel_openimages_f8_8192`` (GumbelQuantize, argmax of the logits).

Shared machinery:

* :func:`resize_frames` -- the resize applied when a tokenizer's stride differs from the
  model's patch size (f8 tokenizers on 224 input -> 112 so the token grid is 14x14).
* :func:`safe_torch_load` -- reads a ``torch.save`` file without executing foreign code:
  ``weights_only=True`` first; if the file holds other pickled objects (pytorch_lightning
  callbacks in taming ``.ckpt`` files, the ``dall_e`` module classes in ``encoder.pkl``) a
  restricted unpickler turns every class it does not know into an inert stand-in and
  keeps the tensors.
* :class:`FrozenCodeTokenizer` -- the common ``tokenize`` loop: resize, map the input
  range, run the encoder frozen (inference mode, bf16 autocast on CUDA, channels-last),
  batched over ``B*T`` frames with optional chunking.
"""
from __future__ import annotations

import copy
import os
import pickle
import re
import types
import warnings
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mam2_fast.train import accel

RESIZE_MODES = ("lanczos", "bilinear", "bicubic", "area", "nearest")


# ----------------------------------------------------------------------------------------
# resize
# ----------------------------------------------------------------------------------------
def _lanczos_matrix(in_size: int, out_size: int, a: int = 3, device=None) -> Tensor:
    """``[out_size, in_size]`` Lanczos-``a`` resampling weights, built the way PIL's
    ``Image.resize(..., Image.LANCZOS)`` builds them (support widened by the downscale
    factor, weights renormalized per output pixel, edge taps clipped)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = a * filterscale
    out = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        x = (torch.arange(lo, hi, dtype=torch.float64) - center + 0.5) / filterscale
        w = torch.where(x.abs() < a, torch.sinc(x) * torch.sinc(x / a), torch.zeros_like(x))
        s = w.sum()
        out[i, lo:hi] = w / s if s != 0 else w
    return out.to(device=device, dtype=torch.float32)


_LANCZOS_CACHE: Dict[Tuple[int, int, str], Tensor] = {}


def resize_frames(x: Tensor, size: Tuple[int, int], mode: str = "lanczos") -> Tensor:
    """Resize ``[N, C, H, W]`` float frames in [0, 1] to ``size`` (h, w).

    ``lanczos``: separable Lanczos-3 matching PIL's LANCZOS filter, the interpolation BEiT
    (``second_interpolation='lanczos'``) uses for its 112-pixel tokenizer input; the result
    is clamped to [0, 1] like PIL's 8-bit output (not quantized).
    ``bilinear``/``bicubic``: ``F.interpolate`` with ``antialias=True`` (PIL-like when
    downscaling). ``area``/``nearest``: plain ``F.interpolate``.
    """
    H, W = x.shape[-2:]
    h, w = int(size[0]), int(size[1])
    if (H, W) == (h, w):
        return x
    if mode == "lanczos":
        key_h, key_w = (H, h, str(x.device)), (W, w, str(x.device))
        if key_h not in _LANCZOS_CACHE:
            _LANCZOS_CACHE[key_h] = _lanczos_matrix(H, h, device=x.device)
        if key_w not in _LANCZOS_CACHE:
            _LANCZOS_CACHE[key_w] = _lanczos_matrix(W, w, device=x.device)
        mh, mw = _LANCZOS_CACHE[key_h], _LANCZOS_CACHE[key_w]
        # horizontal pass first, clamped like PIL's 8-bit intermediate, then vertical
        y = torch.matmul(x.float(), mw.t()).clamp_(0.0, 1.0)  # [N, C, H, w]
        y = torch.matmul(mh, y).clamp_(0.0, 1.0)  # [N, C, h, w]
        return y.to(x.dtype)
    if mode in ("bilinear", "bicubic"):
        y = F.interpolate(x, size=(h, w), mode=mode, align_corners=False, antialias=True)
        return y.clamp_(0.0, 1.0) if mode == "bicubic" else y
    if mode in ("area", "nearest"):
        return F.interpolate(x, size=(h, w), mode=mode)
    raise ValueError(f"tokenizer resize: unknown mode {mode!r} (known: {', '.join(RESIZE_MODES)})")


# ----------------------------------------------------------------------------------------
# restricted loading
# ----------------------------------------------------------------------------------------
class _Stub:
    """Inert stand-in for a class the restricted unpickler does not allow. It accepts any
    construction arguments, state and items, and executes nothing."""

    _stub_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state, slots = state
            if slots:
                self.__dict__.update(slots)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_stub_state"] = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("_stub_items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("_stub_list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("_stub_list", []).extend(values)

    def __repr__(self):
        return f"<stand-in for {self._stub_name}>"


_STUB_TYPES: Dict[Tuple[str, str], type] = {}


def _stub_type(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STUB_TYPES:
        _STUB_TYPES[key] = type(name, (_Stub,), {"_stub_name": f"{module}.{name}", "__module__": "mam2_fast.stub." + module})
    return _STUB_TYPES[key]


def _rebuild_from_type_v2(func, new_type, args, state):
    """Safe version of ``torch._tensor._rebuild_from_type_v2``: the tensor subclass is kept
    only when it is a real torch tensor type; python attributes are dropped."""
    ret = func(*args)
    if isinstance(new_type, type) and issubclass(new_type, torch.Tensor) and type(ret) is not new_type:
        ret = ret.as_subclass(new_type)
    return ret


def _allowed_global(module: str, name: str):
    import torch._utils as tu

    if module == "collections" and name == "OrderedDict":
        return OrderedDict
    if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "dict", "list", "tuple", "slice", "complex", "bytearray"):
        import builtins

        return getattr(builtins, name)
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter",
                                             "_rebuild_parameter_with_state", "_rebuild_tensor_v3"):
        return getattr(tu, name, None)
    if module == "torch._tensor" and name == "_rebuild_from_type_v2":
        return _rebuild_from_type_v2
    if module == "torch" and name in ("Size", "device"):
        return getattr(torch, name)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module == "torch.nn.parameter" and name == "Parameter":
        return torch.nn.Parameter
    if module == "torch._tensor" and name == "Tensor":
        return torch.Tensor
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        obj = _allowed_global(module, name)
        if obj is not None:
            return obj
        return _stub_type(module, name)


_restricted_pickle = types.SimpleNamespace(
    Unpickler=_RestrictedUnpickler,
    load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load(),
    __name__="mam2_fast_restricted_pickle",
)


def safe_torch_load(path: str, what: str = "checkpoint") -> Any:
    """Load a ``torch.save`` file on the CPU without running code from it.

    Tries ``torch.load(weights_only=True)``; if the file holds objects that loader refuses
    (pytorch_lightning callback states in taming ``.ckpt`` files, whole pickled modules
    such as DALL-E's ``encoder.pkl``) it re-reads the file with a restricted unpickler
    that maps every unknown class to an inert stand-in (:class:`_Stub`) and keeps tensors.
    """
    if not path:
        raise FileNotFoundError(f"{what}: no checkpoint path given")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: checkpoint file not found: {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        refused = exc
    except Exception as exc:  # not a zip / pickle at all
        raise ValueError(f"{what}: could not read {path!r} as a torch checkpoint: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except Exception as exc:
        last = str(refused).strip().splitlines()[-1] if str(refused).strip() else ""
        raise ValueError(f"{what}: could not read {path!r} as a torch checkpoint ({exc}; weights_only "
                         f"load: {last[:200]})") from exc
    found = f"it pickles {m.group(1)}" if m else "weights_only load refused"
    warnings.warn(f"{what}: {os.path.basename(path)} holds non-tensor pickled objects ({found}); read it with "
                  f"a restricted unpickler that keeps the tensors and replaces unknown classes by inert "
                  f"stand-ins (no code from the file runs)", stacklevel=3)
    return obj


def module_tensors(obj: Any, prefix: str = "") -> "OrderedDict[str, Tensor]":
    """Parameters and buffers of a pickled ``nn.Module`` tree (real or stand-in), keyed by
    dotted path like ``state_dict()``. Works from the objects' ``__dict__`` so it needs
    neither the original classes nor their code."""
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    d = getattr(obj, "__dict__", {})
    for store in ("_parameters", "_buffers"):
        for k, v in (d.get(store) or {}).items():
            if isinstance(v, Tensor):
                out[prefix + k] = v
    for k, child in (d.get("_modules") or {}).items():
        if child is not None:
            out.update(module_tensors(child, prefix + k + "."))
    return out


def check_state_dict(model: nn.Module, sd: Dict[str, Tensor], what: str, source: str, limit: int = 8) -> None:
    """Raise a ValueError naming the first missing / unexpected / wrongly shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shape):
        return
    lines = [f"{what}: checkpoint {source!r} does not match the architecture "
             f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shape)} shape mismatches)"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shape)):
        if items:
            more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"  {label}: " + ", ".join(items[:limit]) + more)
    lines.append("  (check the preset / YAML config: ch, ch_mult, num_res_blocks, attn_resolutions, "
                 "resolution, z_channels, n_embed, embed_dim)")
    raise ValueError("\n".join(lines))


# ----------------------------------------------------------------------------------------
# common tokenize loop
# ----------------------------------------------------------------------------------------
class FrozenCodeTokenizer(nn.Module):
    """Base of the frozen pretrained tokenizers.

    Subclasses set ``vocab_size``, ``stride`` (encoder downsampling factor) and implement
    ``map_input(x01) -> encoder input`` and ``codes(x) -> [N, h, w] long``.

    Grid rule: with ``patch_size`` given, the token grid equals the model's patch grid
    ``(H // patch_size, W // patch_size)``; frames are resized to ``grid * stride`` pixels
    first whenever that differs from their size (224 -> 112 for f8 with 16-px patches),
    with ``resize_mode``. ``patch_size=None`` keeps the frame size (grid = size // stride).
    """

    vocab_size: int
    stride: int

    def __init__(self, patch_size: Optional[int] = None, resize_mode: str = "lanczos",
                 dtype: str = "bfloat16", chunk_frames: int = 0, channels_last: bool = True):
        super().__init__()
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"tokenizer resize: unknown mode {resize_mode!r} (known: {', '.join(RESIZE_MODES)})")
        if dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"tokenizer dtype must be 'bfloat16', 'float16' or 'float32', got {dtype!r}")
        self.patch_size = None if patch_size is None else int(patch_size)
        self.resize_mode = resize_mode
        self.dtype_name = dtype
        self.chunk_frames = int(chunk_frames or 0)
        self.channels_last = bool(channels_last)
        self.compiled = False                  # tokenizer.compile: see set_compiled
        self._compiled_codes = None

    # -- protocol ---------------------------------------------------------------------
    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        if self.patch_size is not None:
            return height // self.patch_size, width // self.patch_size
        return height // self.stride, width // self.stride

    def input_size(self, height: int, width: int) -> Tuple[int, int]:
        """Frame size fed to the encoder for a ``height x width`` frame."""
        h, w = self.grid_size(height, width)
        return h * self.stride, w * self.stride

    def describe(self) -> Dict[str, Any]:
        """The tokenizer's effective preprocessing, for logs and run configs."""
        out = {"class": type(self).__name__, "vocab_size": self.vocab_size, "stride": self.stride,
               "patch_size": self.patch_size, "resize_mode": self.resize_mode, "dtype": self.dtype_name,
               "chunk_frames": self.chunk_frames, "compiled": self.compiled}
        if self.patch_size is not None:
            out["input_for_224"] = self.input_size(224, 224)
            out["grid_for_224"] = self.grid_size(224, 224)
        return out

    # -- to implement -----------------------------------------------------------------
    def map_input(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def codes(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    # -- compiled ---------------------------------------------------------------------
    def set_compiled(self, on: bool = True) -> "FrozenCodeTokenizer":
        """Run :meth:`codes` through ``torch.compile`` (``tokenizer.compile``): Inductor fuses
        the encoder's GroupNorm, SiLU, residual adds and dtype casts, the elementwise passes
        that took about 70 % of the VQGAN tokenizer's time on the H200 in eager mode
        (``benchmarks/bench_tokenizer.py --profile``, 2026-12-04). Static shapes (a chunk of
        ``chunk_frames`` frames, and the last, shorter chunk: at most two graphs); the first
        call of each shape compiles. The codes equal the eager ones up to near-ties of the
        nearest-code decision (the fused arithmetic rounds differently). With
        ``tokenizer.fused_norm`` also set, the compiled graph keeps the plain GroupNorm + SiLU
        (Inductor fuses them) rather than the Triton kernel."""
        self.compiled = bool(on)
        self._compiled_codes = None
        return self

    def _codes_fn(self):
        if not self.compiled:
            return self.codes
        if self._compiled_codes is None:
            self._compiled_codes = torch.compile(self.codes, dynamic=False)
        return self._compiled_codes

    # -- frozen -----------------------------------------------------------------------
    def train(self, mode: bool = True):
        return super().train(False)  # always eval: frozen

    def _autocast_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        if not accel.is_gpu(device) or self.dtype_name == "float32":
            return None  # CPU: float32 (bf16 convs are slow there)
        return torch.bfloat16 if self.dtype_name == "bfloat16" else torch.float16

    def tokenize(self, frames: Tensor) -> Tensor:
        """frames ``[B, T, 3, H, W]`` in [0, 1] -> ids ``[B, T, h, w]`` (long). The encoder runs
        under ``inference_mode``; the ids are returned as a normal tensor (a clone of the
        small id grid) so they can serve as loss targets in autograd-tracked code."""
        if self.channels_last and frames.is_cuda and not getattr(self, "_channels_last_done", False):
            self.to(memory_format=torch.channels_last)  # conv weights NHWC once, outside inference mode
            self._channels_last_done = True
        with torch.inference_mode():
            ids = self._tokenize(frames)
        with torch.no_grad():
            return ids.clone()

    def _tokenize(self, frames: Tensor) -> Tensor:
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"{type(self).__name__}.tokenize expects frames [B, T, 3, H, W], got {tuple(frames.shape)}")
        B, T, C, H, W = frames.shape
        h, w = self.grid_size(H, W)
        if h == 0 or w == 0:
            raise ValueError(f"{type(self).__name__}: frames {H}x{W} are too small for the token grid")
        ih, iw = self.input_size(H, W)
        x = frames.reshape(B * T, C, H, W)
        n = x.shape[0]
        chunk = self.chunk_frames if self.chunk_frames > 0 else n
        amp = self._autocast_dtype(x.device)
        codes = self._codes_fn()
        outs = []
        for s in range(0, n, chunk):
            xc = x[s:s + chunk].float()
            xc = resize_frames(xc, (ih, iw), self.resize_mode)
            xc = self.map_input(xc)
            if self.channels_last and xc.device.type == "cuda":
                xc = xc.contiguous(memory_format=torch.channels_last)
            with accel.autocast(xc.device, amp or torch.float32, enabled=amp is not None):
                ids = codes(xc)
            if ids.shape[-2:] != (h, w):
                raise RuntimeError(f"{type(self).__name__}: produced a {tuple(ids.shape[-2:])} grid for input "
                                   f"{ih}x{iw}, expected {(h, w)}")
            outs.append(ids)
        return torch.cat(outs).reshape(B, T, h, w).long()

    def prepare(self, device=None, channels_last: Optional[bool] = None) -> "FrozenCodeTokenizer":
        """Move to ``device``, freeze and (on CUDA) switch convolutions to channels-last."""
        if device is not None:
            self.to(device)
        self.requires_grad_(False)
        self.eval()
        cl = self.channels_last if channels_last is None else channels_last
        if cl and next(self.parameters()).device.type == "cuda":
            self.to(memory_format=torch.channels_last)
        return self


# ========================================================================================
# VQGAN (taming-transformers) encoder + quantizer
# ========================================================================================
# Each preset is taming's ``model.params`` block (ddconfig / n_embed / embed_dim) plus the
# quantizer kind ("vq": VectorQuantizer2, nearest code by L2; "gumbel": GumbelQuantize,
# argmax of the 1x1-conv logits).
_F16_DD = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
               ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
_F8_DD = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
              ch_mult=[1, 1, 2, 4], num_res_blocks=2, attn_resolutions=[32], dropout=0.0)
VQGAN_PRESETS: Dict[str, Dict[str, Any]] = {
    "vqgan_imagenet_f16_16384": dict(quantizer="vq", n_embed=16384, embed_dim=256, ddconfig=_F16_DD),
    "vqgan_imagenet_f16_1024": dict(quantizer="vq", n_embed=1024, embed_dim=256, ddconfig=_F16_DD),
    "vqgan_gumbel_openimages_f8_8192": dict(quantizer="gumbel", n_embed=8192, embed_dim=256, ddconfig=_F8_DD),
}
_QUANT_ROWS = 8192  # rows per quantizer chunk: bounds the [rows, n_embed] fp32 distance matrix


def _group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


def _norm_act(norm: nn.GroupNorm, x: Tensor, silu: bool = True) -> Tensor:
    """``[silu](norm(x))``; with ``norm.fused`` set (``VQGANTokenizer.set_fused_norm``) and a
    contiguous CUDA input (or the Triton interpreter, for tests) one fused kernel writes the
    result in x's dtype (``kernels/group_norm.py``) instead of autocast's fp32 GroupNorm, SiLU
    and cast passes. Inside ``torch.compile`` (``tokenizer.compile``) the plain modules run:
    Inductor fuses them itself."""
    if (getattr(norm, "fused", False) and x.is_contiguous() and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        from mam2_fast.kernels._common import interpreting
        if x.is_cuda or interpreting():
            from mam2_fast.kernels.group_norm import group_norm_silu_fused
            return group_norm_silu_fused(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu)
    y = norm(x)
    return F.silu(y) if silu else y


class _ResBlock(nn.Module):
    """taming ``ResnetBlock`` without time embedding: GN-swish-conv3 x2 + (1x1) shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = _group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_norm_act(self.norm1, x))
        h = self.conv2(_norm_act(self.norm2, h))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class _AttnBlock(nn.Module):
    """taming ``AttnBlock``: single-head self-attention over the h*w positions, 1x1 convs
    for q/k/v/proj_out, scale c**-0.5 (run with scaled_dot_product_attention)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _group_norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        h = _norm_act(self.norm, x, silu=False)
        q, k, v = (m(h).reshape(b, 1, c, hh * ww).transpose(-1, -2) for m in (self.q, self.k, self.v))
        if q.dtype != v.dtype or k.dtype != v.dtype:
            q, k = q.to(v.dtype), k.to(v.dtype)
        o = F.scaled_dot_product_attention(q, k, v)  # [b, 1, hw, c]
        o = o.transpose(-1, -2).reshape(b, c, hh, ww)
        return x + self.proj_out(o)


class _Downsample(nn.Module):
    """Stride-2 3x3 conv after asymmetric zero padding (0, 1, 0, 1)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Level(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1 = _ResBlock(c, c)
        self.attn_1 = _AttnBlock(c)
        self.block_2 = _ResBlock(c, c)


class VQGANEncoder(nn.Module):
    """taming ``Encoder`` (same module names, hence same state_dict keys)."""

    def __init__(self, ch: int, ch_mult, num_res_blocks: int, attn_resolutions, resolution: int,
                 z_channels: int, in_channels: int = 3, double_z: bool = False, resamp_with_conv: bool = True,
                 **_ignored):
        super().__init__()
        if not resamp_with_conv:
            raise ValueError("vqgan: resamp_with_conv=False (avg-pool downsampling) is not supported")
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = {int(r) for r in attn_resolutions}
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = int(num_res_blocks)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + ch_mult
        curr_res = int(resolution)
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(self.num_resolutions):
            level = _Level()
            block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
            for _ in range(self.num_res_blocks):
                level.block.append(_ResBlock(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(_AttnBlock(block_in))
            if i != self.num_resolutions - 1:
                level.downsample = _Downsample(block_in)
                curr_res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)
        self.stride = 2 ** (self.num_resolutions - 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j in range(self.num_res_blocks):
                h = level.block[j](h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_norm_act(self.norm_out, h))


class VectorQuantizerCodes(nn.Module):
    """taming ``VectorQuantizer2`` (key ``embedding.weight``), codes only: the index of the
    nearest codebook vector by squared L2 distance, computed in float32."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def forward(self, z: Tensor) -> Tensor:
        """z ``[N, D, h, w]`` -> ids ``[N, h, w]``."""
        N, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D).float()
        e = self.embedding.weight.float()
        e2 = (e * e).sum(dim=1)
        ids = []
        with accel.autocast(z.device, enabled=False):
            for s in range(0, flat.shape[0], _QUANT_ROWS):
                f = flat[s:s + _QUANT_ROWS]
                # ||f||^2 + ||e||^2 - 2 f.e, as taming computes it (||f||^2 kept for identical ties)
                d = (f * f).sum(dim=1, keepdim=True) + e2[None] - 2.0 * (f @ e.t())
                ids.append(d.argmin(dim=1))
        return torch.cat(ids).reshape(N, h, w)


class GumbelQuantizerCodes(nn.Module):
    """taming ``GumbelQuantize`` (keys ``proj.*``, ``embed.weight``), codes only: argmax of
    the 1x1-conv logits, in float32. No Gumbel noise is ever added (this is the mode of the
    hard Gumbel-softmax sample, i.e. what the quantizer converges to at temperature -> 0)."""

    def __init__(self, num_hiddens: int, embed_dim: int, n_embed: int):
        super().__init__()
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def forward(self, z: Tensor) -> Tensor:
        N, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D).float()
        wgt = self.proj.weight.float().reshape(self.proj.out_channels, D)
        bias = self.proj.bias.float()
        ids = []
        with accel.autocast(z.device, enabled=False):
            for s in range(0, flat.shape[0], _QUANT_ROWS):
                ids.append(F.linear(flat[s:s + _QUANT_ROWS], wgt, bias).argmax(dim=1))
        return torch.cat(ids).reshape(N, h, w)


def parse_vqgan_config(cfg: Any) -> Dict[str, Any]:
    """Normalize a taming YAML config (path, text or dict) or preset name to
    ``{quantizer, n_embed, embed_dim, ddconfig}``."""
    if isinstance(cfg, str) and cfg in VQGAN_PRESETS:
        return copy.deepcopy(VQGAN_PRESETS[cfg])
    if isinstance(cfg, str):
        import yaml

        if not os.path.isfile(cfg):
            raise FileNotFoundError(f"vqgan: config file not found: {cfg!r}")
        with open(cfg) as f:
            cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"vqgan: config must be a mapping, got {type(cfg).__name__}")
    target = ""
    if "model" in cfg:
        target = str(cfg["model"].get("target", ""))
        params = cfg["model"].get("params", {})
    else:
        target = str(cfg.get("target", ""))
        params = cfg.get("params", cfg)
    if "ddconfig" not in params or "n_embed" not in params:
        raise ValueError("vqgan: config lacks model.params.ddconfig / n_embed (taming layout expected)")
    quantizer = params.get("quantizer")
    if quantizer is None:
        quantizer = "gumbel" if "Gumbel" in target else "vq"
    if "EMA" in target:
        raise ValueError(f"vqgan: {target} (EMA quantizer) is not supported")
    if params.get("remap"):
        raise ValueError("vqgan: quantizer index remapping (params.remap) is not supported")
    return dict(quantizer=quantizer, n_embed=int(params["n_embed"]), embed_dim=int(params["embed_dim"]),
                ddconfig=dict(params["ddconfig"]))


def infer_vqgan_config(sd: Dict[str, Tensor]) -> Dict[str, Any]:
    """Architecture from the encoder / quantizer tensors of a taming state dict (used when
    neither a YAML config nor a preset is given)."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
        nblocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
        ch_mult = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
        attn_levels = [i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd]
        z_channels = sd["quant_conv.weight"].shape[1]
        double_z = sd["encoder.conv_out.weight"].shape[0] == 2 * z_channels
        embed_dim = sd["quant_conv.weight"].shape[0]
        if "quantize.proj.weight" in sd:
            quantizer, n_embed = "gumbel", sd["quantize.proj.weight"].shape[0]
        else:
            quantizer, n_embed = "vq", sd["quantize.embedding.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"vqgan: cannot infer the architecture, checkpoint lacks key {exc}") from exc
    resolution = 256
    attn_res = [resolution // 2 ** i for i in attn_levels]
    return dict(quantizer=quantizer, n_embed=int(n_embed), embed_dim=int(embed_dim),
                ddconfig=dict(ch=int(ch), ch_mult=ch_mult, num_res_blocks=nblocks, attn_resolutions=attn_res,
                              resolution=resolution, z_channels=int(z_channels), double_z=bool(double_z),
                              in_channels=3))


def extract_state_dict(obj: Any, source: str, what: str) -> Dict[str, Tensor]:
    """The ``state_dict`` entry of a checkpoint (or the object itself when it is one)."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{what}: {source!r} holds no state_dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


class VQGANTokenizer(FrozenCodeTokenizer):
    """Frozen taming-transformers VQGAN encoder + quantizer as an appearance tokenizer.

    ``tokenize(frames [B, T, 3, H, W] in [0, 1])`` maps to [-1, 1] (``2x - 1``), resizes to
    ``grid * stride`` when the stride differs from ``patch_size`` (f8 on 224 -> 112, see
    :class:`FrozenCodeTokenizer`), and returns code ids ``[B, T, h, w]``.
    The encoder runs under bf16 autocast on CUDA (``dtype``); the quantizer decision (L2
    distances / gumbel logits) is always computed in float32.
    """

    def __init__(self, config: Any = "vqgan_imagenet_f16_16384", patch_size: Optional[int] = None,
                 resize_mode: str = "lanczos", dtype: str = "bfloat16", chunk_frames: int = 0,
                 channels_last: bool = False):
        # channels_last off: on the H200 (benchmarks/bench_tokenizer.py, 32 clips x 16 x 224^2,
        # bf16 autocast) the VQGAN encoder took 502 ms contiguous against 637 ms channels-last,
        # its GroupNorm / SiLU / cast passes falling to strided elementwise kernels in NHWC
        super().__init__(patch_size=patch_size, resize_mode=resize_mode, dtype=dtype,
                         chunk_frames=chunk_frames, channels_last=channels_last)
        spec = parse_vqgan_config(config) if not (isinstance(config, dict) and "quantizer" in config) else copy.deepcopy(config)
        self.spec = spec
        dd = spec["ddconfig"]
        self.encoder = VQGANEncoder(**dd)
        self.quant_conv = nn.Conv2d(int(dd["z_channels"]), spec["embed_dim"], 1)
        if spec["quantizer"] == "vq":
            self.quantize = VectorQuantizerCodes(spec["n_embed"], spec["embed_dim"])
        elif spec["quantizer"] == "gumbel":
            # taming builds GumbelQuantize(z_channels, embed_dim, n_embed) and applies it to the
            # quant_conv output (embed_dim channels); the two are equal in every released model.
            self.quantize = GumbelQuantizerCodes(int(dd["z_channels"]), spec["embed_dim"], spec["n_embed"])
        else:
            raise ValueError(f"vqgan: unknown quantizer {spec['quantizer']!r} (known: 'vq', 'gumbel')")
        self.vocab_size = int(spec["n_embed"])
        self.stride = self.encoder.stride
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_checkpoint(cls, checkpoint: str, config: Optional[str] = None, preset: Optional[str] = None,
                        **kwargs) -> "VQGANTokenizer":
        """Load a taming ``.ckpt`` unchanged. Architecture from ``config`` (YAML path), else
        ``preset``, else inferred from the checkpoint's tensors. Only ``encoder.*``,
        ``quant_conv.*`` and ``quantize.*`` are used; any mismatch raises naming the keys."""
        if preset and not config and preset not in VQGAN_PRESETS:
            raise ValueError(f"vqgan: unknown preset {preset!r} (known: {', '.join(VQGAN_PRESETS)})")
        sd = extract_state_dict(safe_torch_load(checkpoint, "vqgan"), checkpoint, "vqgan")
        if config:
            spec = parse_vqgan_config(config)
        elif preset:
            if preset not in VQGAN_PRESETS:
                raise ValueError(f"vqgan: unknown preset {preset!r} (known: {', '.join(VQGAN_PRESETS)})")
            spec = parse_vqgan_config(preset)
        else:
            spec = infer_vqgan_config(sd)
        tok = cls(spec, **kwargs)
        tok.load_taming_state_dict(sd, source=checkpoint)
        return tok

    def load_taming_state_dict(self, sd: Dict[str, Tensor], source: str = "<state_dict>") -> None:
        keep = ("encoder.", "quant_conv.", "quantize.")
        sub = {k: v for k, v in sd.items() if k.startswith(keep)}
        check_state_dict(self, sub, "vqgan", source)
        self.load_state_dict(sub, strict=True)

    def set_fused_norm(self, on: bool = True) -> "VQGANTokenizer":
        """Run the encoder's GroupNorm (+ SiLU) through the fused kernel on CUDA
        (``tokenizer.fused_norm``); the unfused modules stay and run everywhere else."""
        for m in self.encoder.modules():
            if isinstance(m, nn.GroupNorm):
                m.fused = bool(on)
        return self

    def map_input(self, x: Tensor) -> Tensor:
        return x * 2.0 - 1.0

    def codes(self, x: Tensor) -> Tensor:
        z = self.quant_conv(self.encoder(x))
        return self.quantize(z)

    def describe(self) -> Dict[str, Any]:
        out = super().describe()
        out.update(quantizer=self.spec["quantizer"], input_range="[-1, 1]")
        return out


def build_vqgan_tokenizer(cfg: Any, patch_size: int) -> VQGANTokenizer:
    """VQGAN tokenizer from a TokenizerConfig-like object (fields read with getattr)."""
    ckpt = getattr(cfg, "checkpoint", None)
    yaml_cfg = getattr(cfg, "checkpoint_config", None)
    preset = getattr(cfg, "preset", None)
    kwargs = dict(patch_size=patch_size, resize_mode=getattr(cfg, "resize_mode", None) or "lanczos",
                  dtype=getattr(cfg, "dtype", "bfloat16"), chunk_frames=getattr(cfg, "chunk_frames", 0) or 0)
    if not ckpt:
        raise ValueError("tokenizer.kind='vqgan' needs tokenizer.checkpoint: path to a taming-transformers "
                         ".ckpt (e.g. vqgan_imagenet_f16_16384/checkpoints/last.ckpt)")
    tok = VQGANTokenizer.from_checkpoint(ckpt, config=yaml_cfg, preset=preset, **kwargs)
    tok.set_fused_norm(bool(getattr(cfg, "fused_norm", False)))
    tok.set_compiled(bool(getattr(cfg, "compile", False)))
    vs = getattr(cfg, "vocab_size", None)
    if vs and int(vs) != tok.vocab_size:
        warnings.warn(f"tokenizer.vocab_size={vs} but the VQGAN checkpoint has {tok.vocab_size} codes; "
                      f"using {tok.vocab_size}", stacklevel=2)
    return tok


__all__ = ["resize_frames", "safe_torch_load", "module_tensors", "check_state_dict", "FrozenCodeTokenizer",
           "RESIZE_MODES", "VQGAN_PRESETS", "VQGANEncoder", "VQGANTokenizer", "VectorQuantizerCodes",
           "GumbelQuantizerCodes", "parse_vqgan_config", "infer_vqgan_config", "build_vqgan_tokenizer"]
