"""DALL-E dVAE encoder (OpenAI ``dall_e``) as an appearance tokenizer.

The released ``encoder.pkl`` is a ``torch.save`` of the whole ``dall_e.encoder.Encoder``
module. It is read here WITHOUT the ``dall_e`` package: a restricted unpickler
(:func:`mam2_fast.targets.vqgan.safe_torch_load`) turns the ``dall_e`` / ``torch.nn``
classes into inert stand-ins, and the parameters are collected from the pickled module
tree by their dotted names (``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.w``,
..., ``blocks.output.conv.w``) and loaded into :class:`DalleEncoder`, our own re-implementation
with the same layout:

* ``input``: 7x7 conv 3 -> n_hid;
* 4 groups of ``n_blk_per_group`` bottleneck blocks with widths n_hid, 2n_hid, 4n_hid,
  8n_hid, each of the first three followed by a 2x2 max-pool (stride 8 in total);
  a block is ``id_path(x) + post_gain * res_path(x)``, ``post_gain = 1 / n_layers**2``,
  ``res_path = relu-conv3-relu-conv3-relu-conv3-relu-conv1`` with ``n_out // 4`` hidden
  channels and ``id_path`` a 1x1 conv when the width changes;
* ``output``: relu + 1x1 conv 8n_hid -> vocab_size (8192) logits; codes = argmax.

Input mapping: ``0.8 x + 0.1`` of [0, 1] pixels (``dall_e.utils.map_pixels``). BEiT/BEVT
feed 112x112 frames (PIL Lanczos from the same crop as the 224 view) for a 14x14 grid;
here the frames are resized to ``grid * 8`` with ``resize_mode`` (Lanczos-3 by default).
"""
from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mam2_fast.train import accel
from mam2_fast.targets.vqgan import FrozenCodeTokenizer, check_state_dict, module_tensors, safe_torch_load


class _DConv(nn.Module):
    """dall_e ``utils.Conv2d``: parameters ``w`` ``[out, in, k, k]`` and ``b``, 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.w, std=(n_in * kw * kw) ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class _DBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1.0 / (n_layers ** 2)
        self.id_path = _DConv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", _DConv(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", _DConv(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", _DConv(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", _DConv(n_hid, n_out, 1)),
        ]))

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class _Output(nn.Module):
    def __init__(self, n_in: int, vocab_size: int):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv = _DConv(n_in, vocab_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        # dall_e runs this conv in float32 even in its fp16 mode
        with accel.autocast(x.device, enabled=False):
            return self.conv(self.relu(x).float())


class DalleEncoder(nn.Module):
    """Re-implementation of ``dall_e.encoder.Encoder`` with identical parameter names."""

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192,
                 input_channels: int = 3, group_count: int = 4):
        super().__init__()
        if group_count != 4:
            raise ValueError(f"dalle: group_count must be 4 (the released layout), got {group_count}")
        n_layers = group_count * n_blk_per_group
        widths = [n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
        groups = [("input", _DConv(input_channels, n_hid, 7))]
        prev = n_hid
        for g, width in enumerate(widths, start=1):
            items = []
            for i in range(n_blk_per_group):
                items.append((f"block_{i + 1}", _DBlock(prev if i == 0 else width, width, n_layers)))
            prev = width
            if g < 4:
                items.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(items))))
        groups.append(("output", _Output(8 * n_hid, vocab_size)))
        self.blocks = nn.Sequential(OrderedDict(groups))
        self.vocab_size = vocab_size
        self.stride = 8

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


def _infer_dalle_arch(sd: Dict[str, Tensor], source: str) -> Dict[str, int]:
    try:
        n_hid, c_in = sd["blocks.input.w"].shape[:2]
        vocab = sd["blocks.output.conv.w"].shape[0]
    except KeyError as exc:
        raise ValueError(f"dalle: {source!r} is not a DALL-E encoder (no key {exc}); "
                         f"keys start with {sorted(sd)[:4]}") from exc
    blocks = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.group_1\.block_(\d+)\.", k)] if m}
    return dict(n_hid=int(n_hid), input_channels=int(c_in), vocab_size=int(vocab),
                n_blk_per_group=max(blocks) if blocks else 1)


def load_dalle_state_dict(path: str) -> Dict[str, Tensor]:
    """Tensors of a DALL-E ``encoder.pkl`` (pickled module, read without ``dall_e``) or of a
    plain state-dict file with the same keys."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pickled module always needs the restricted reader
        obj = safe_torch_load(path, "dalle")
    if isinstance(obj, dict):
        if "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    else:
        sd = dict(module_tensors(obj))
    if not sd:
        raise ValueError(f"dalle: {path!r} holds no tensors (expected OpenAI's encoder.pkl)")
    return sd


class DalleTokenizer(FrozenCodeTokenizer):
    """Frozen DALL-E dVAE encoder: ``tokenize(frames [B, T, 3, H, W] in [0, 1])`` -> argmax
    codes ``[B, T, h, w]`` (8192-way). Frames are resized to ``grid * 8`` (112 for a 224
    frame with 16-px patches) with ``resize_mode`` and mapped ``0.8 x + 0.1``."""

    def __init__(self, patch_size: Optional[int] = None, n_hid: int = 256, n_blk_per_group: int = 2,
                 vocab_size: int = 8192, input_channels: int = 3, resize_mode: str = "lanczos",
                 dtype: str = "bfloat16", chunk_frames: int = 0, channels_last: bool = True):
        super().__init__(patch_size=patch_size, resize_mode=resize_mode, dtype=dtype,
                         chunk_frames=chunk_frames, channels_last=channels_last)
        self.encoder = DalleEncoder(n_hid=n_hid, n_blk_per_group=n_blk_per_group, vocab_size=vocab_size,
                                    input_channels=input_channels)
        self.vocab_size = int(vocab_size)
        self.stride = self.encoder.stride
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_checkpoint(cls, checkpoint: str, **kwargs) -> "DalleTokenizer":
        sd = load_dalle_state_dict(checkpoint)
        arch = _infer_dalle_arch(sd, checkpoint)
        tok = cls(**arch, **kwargs)
        sd = {"encoder." + k: v for k, v in sd.items()}
        check_state_dict(tok, sd, "dalle", checkpoint)
        tok.load_state_dict(sd, strict=True)
        return tok

    def map_input(self, x: Tensor) -> Tensor:
        return 0.8 * x + 0.1

    def codes(self, x: Tensor) -> Tensor:
        return self.encoder(x).argmax(dim=1)

    def describe(self) -> Dict[str, Any]:
        out = super().describe()
        out.update(input_range="0.8x+0.1")
        return out


def build_dalle_tokenizer(cfg: Any, patch_size: int) -> DalleTokenizer:
    ckpt = getattr(cfg, "checkpoint", None)
    if not ckpt:
        raise ValueError("tokenizer.kind='dalle' needs tokenizer.checkpoint: path to OpenAI's DALL-E "
                         "encoder.pkl")
    tok = DalleTokenizer.from_checkpoint(
        ckpt, patch_size=patch_size, resize_mode=getattr(cfg, "resize_mode", None) or "lanczos",
        dtype=getattr(cfg, "dtype", "bfloat16"), chunk_frames=getattr(cfg, "chunk_frames", 0) or 0)
    tok.set_compiled(bool(getattr(cfg, "compile", False)))
    vs = getattr(cfg, "vocab_size", None)
    if vs and int(vs) != tok.vocab_size:
        warnings.warn(f"tokenizer.vocab_size={vs} but the DALL-E encoder has {tok.vocab_size} codes; "
                      f"using {tok.vocab_size}", stacklevel=2)
    return tok


__all__ = ["DalleEncoder", "DalleTokenizer", "load_dalle_state_dict", "build_dalle_tokenizer"]
