"""VideoMAE pre-training model (Tong et al., 2022) for the baseline through this engine.

Same function as the official ``modeling_pretrain.PretrainVisionTransformer`` +
``engine_for_pretraining`` target (MCG-NJU/VideoMAE), with the same module names, so an
official ``state_dict`` loads unchanged (``load_state_dict(strict=True)``):

* tubelet embedding ``Conv3d(C, D, (2, 16, 16), stride (2, 16, 16))`` -> ``T/2 * N`` tokens
  in (t, h, w) order;
* fixed sinusoidal positions over the flat token index (encoder width for the encoder,
  decoder width for the decoder); not parameters;
* plain ViT blocks (joint space-time attention), pre-norm LayerNorm eps 1e-6, qkv with
  ``q_bias`` / ``v_bias`` and no key bias, GELU MLP; attention runs through
  ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU);
* the encoder sees the visible tokens only (tube mask, ratio 0.9: 176 of 196 slots of
  every temporal slice hidden); ``encoder_to_decoder`` (no bias); the decoder (4 blocks,
  width 384, 6 heads for ViT-B) sees ``[visible ++ mask tokens]`` + positions and predicts
  the masked tokens' pixels (``head`` to ``2 * 16 * 16 * 3``);
* target: the clip un-normalized to [0, 1], cut into ``2 x 16 x 16`` tubelets, each channel
  of a tubelet normalized over its 512 pixels ``(x - mean) / (std_unbiased + 1e-6)``,
  flattened in ``(t, ph, pw, c)`` order; loss = MSE over the masked tokens.

Masks are :class:`mam2_fast.masking.MaskInfo` tube masks over the ``T/2`` temporal slices
(``MaskGenerator("tube", ratio, T // 2, grid)``); the visible / masked token sets are
taken with index gathers (no boolean indexing, hence no host synchronization), in the
same order as the official ``x[~mask]`` / ``x[mask]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mam2_fast.masking import MaskGenerator, MaskInfo
from mam2_fast.models.mam2 import Mlp, drop_path  # same module names as the official code

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class VideoMAEConfig:
    img_size: int = 224
    num_frames: int = 16
    tubelet_size: int = 2
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_dim: int = 384
    decoder_depth: int = 4
    decoder_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    mask_ratio: float = 0.9
    norm_target: bool = True
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @property
    def grid(self) -> tuple:
        g = self.img_size // self.patch_size
        return (g, g)

    @property
    def slices(self) -> int:
        return self.num_frames // self.tubelet_size

    def num_masked_per_frame(self) -> int:
        # VideoMAE's TubeMaskingGenerator: int(ratio * N) (floor); MaskGenerator rounds --
        # equal for the ratios used (0.9 * 196 = 176.4, 0.75 * 196 = 147).
        return int(self.mask_ratio * self.grid[0] * self.grid[1])


VIDEOMAE_PRESETS = {
    # encoder (D, depth, heads), decoder (D', heads) as in modeling_pretrain.py; decoder depth 4.
    # ``tiny`` is not an official VideoMAE size: the encoder is mam2.PRESETS["tiny"] (CPU demo
    # and tests, so the baseline runs beside MAM^2 at demo scale), the decoder half its width
    # as for the official sizes (3 heads of 32 channels, since 96 does not split into 64s).
    "tiny": dict(embed_dim=192, depth=4, num_heads=3, decoder_dim=96, decoder_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6, decoder_dim=192, decoder_heads=3),
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_dim=384, decoder_heads=6),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_dim=512, decoder_heads=8),
}


def videomae_config(preset: str = "base", **kw) -> VideoMAEConfig:
    if preset not in VIDEOMAE_PRESETS:
        raise ValueError(f"videomae: unknown preset {preset!r} (known: {', '.join(VIDEOMAE_PRESETS)})")
    return VideoMAEConfig(**{**VIDEOMAE_PRESETS[preset], **kw})


# ----------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------
def sinusoid_table(n_position: int, d_hid: int) -> Tensor:
    """VideoMAE's ``get_sinusoid_encoding_table``: ``[1, n_position, d_hid]`` float32."""
    pos = np.arange(n_position, dtype=np.float64)[:, None]
    j = np.arange(d_hid)
    table = pos / np.power(10000, 2 * (j // 2) / d_hid)[None, :]
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float32).unsqueeze(0)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int, tubelet: int, patch: int):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet, patch, patch),
                              stride=(tubelet, patch, patch))

    def forward(self, x: Tensor) -> Tensor:
        """x ``[B, C, T, H, W]`` -> ``[B, T/2 * h * w, D]``."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, dh]
        out = F.scaled_dot_product_attention(q, k, v)  # scale dh^-0.5, as qk_scale=None
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def _xavier_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.tubelet_size, cfg.patch_size)
        n = cfg.slices * cfg.grid[0] * cfg.grid[1]
        self.register_buffer("pos_embed", sinusoid_table(n, cfg.embed_dim), persistent=False)
        dpr = [x.item() for x in torch.linspace(0, cfg.drop_path, cfg.depth)]
        self.blocks = nn.ModuleList([Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, dpr[i])
                                     for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.apply(_xavier_init)


class Decoder(nn.Module):
    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        dpr = [x.item() for x in torch.linspace(0, cfg.drop_path, cfg.decoder_depth)]
        self.blocks = nn.ModuleList([Block(cfg.decoder_dim, cfg.decoder_heads, cfg.mlp_ratio, cfg.qkv_bias, dpr[i])
                                     for i in range(cfg.decoder_depth)])
        self.norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.head = nn.Linear(cfg.decoder_dim, cfg.tubelet_size * cfg.patch_size ** 2 * cfg.in_chans)
        self.apply(_xavier_init)


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x ``[B, L, D]`` at idx ``[B, K]`` -> ``[B, K, D]``."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def flat_index(slot_idx: Tensor, slices: int, n: int) -> Tensor:
    """Per-slice slot indices ``[B, K]`` -> flat token indices ``[B, slices*K]`` in (t, slot) order."""
    t = torch.arange(slices, device=slot_idx.device).view(1, slices, 1) * n
    return (t + slot_idx.unsqueeze(1)).reshape(slot_idx.shape[0], -1)


def videomae_pixel_target(clip: Tensor, tubelet: int, patch: int, normalize: bool = True,
                          mean: Optional[Sequence[float]] = IMAGENET_MEAN,
                          std: Optional[Sequence[float]] = IMAGENET_STD, eps: float = 1e-6) -> Tensor:
    """clip ``[B, T, C, H, W]`` (normalized) -> ``[B, T/tubelet * h * w, tubelet*P*P*C]``
    float32 targets, as VideoMAE's ``engine_for_pretraining`` computes them: un-normalize,
    per tubelet and channel ``(x - mean) / (std_unbiased + eps)`` over ``tubelet*P*P``
    pixels, flattened ``(t, ph, pw, c)``. With ``tubelet=1`` this equals
    ``pixel_target(clip, patch, norm_mode="videomae", mean, std)`` flattened over frames."""
    B, T, C, H, W = clip.shape
    x = clip.float()
    if mean is not None:
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 1, C, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 1, C, 1, 1)
        x = x * s + m
    h, w = H // patch, W // patch
    x = x.reshape(B, T // tubelet, tubelet, C, h, patch, w, patch)
    x = x.permute(0, 1, 4, 6, 2, 5, 7, 3)  # [B, t, h, w, p0, p1, p2, C]
    x = x.reshape(B, (T // tubelet) * h * w, tubelet * patch * patch, C)
    if normalize:
        x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + eps)
    return x.reshape(B, x.shape[1], -1)


def tube_mask_generator(cfg: VideoMAEConfig) -> MaskGenerator:
    """Tube masks over the ``T/2`` slices with VideoMAE's count ``int(ratio * N)``."""
    n = cfg.grid[0] * cfg.grid[1]
    nm = min(max(cfg.num_masked_per_frame(), 1), n - 1)
    return MaskGenerator("tube", nm / n, cfg.slices, cfg.grid)


# ----------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------
class VideoMAE(nn.Module):
    """VideoMAE pre-training model; ``forward(clip [B, T, C, H, W], info) -> {"loss", ...}``."""

    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        if cfg.num_frames % cfg.tubelet_size:
            raise ValueError(f"num_frames {cfg.num_frames} is not a multiple of tubelet_size {cfg.tubelet_size}")
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.num_patches = cfg.grid[0] * cfg.grid[1]
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # official code never applies _init_weights to these two: default Linear init
        self.encoder_to_decoder = nn.Linear(cfg.embed_dim, cfg.decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        self.register_buffer("pos_embed", sinusoid_table(cfg.slices * self.num_patches, cfg.decoder_dim),
                             persistent=False)

    def mask_generator(self) -> MaskGenerator:
        return tube_mask_generator(self.cfg)

    def _indices(self, info: MaskInfo) -> tuple[Tensor, Tensor]:
        if not info.is_tube or info.mask.shape[1] != self.cfg.slices:
            raise ValueError(f"videomae: needs a tube MaskInfo over {self.cfg.slices} temporal slices "
                             f"(MaskGenerator('tube', ratio, num_frames // tubelet, grid)), "
                             f"got mask {tuple(info.mask.shape)}")
        n = self.num_patches
        return flat_index(info.vis_idx, self.cfg.slices, n), flat_index(info.mask_idx, self.cfg.slices, n)

    def predict(self, clip: Tensor, info: MaskInfo) -> Tensor:
        """Predicted pixels of the masked tokens ``[B, T/2 * Nm, 2*P*P*C]``."""
        vis, msk = self._indices(info)
        x = self.encoder.patch_embed(clip.transpose(1, 2))           # [B, L, D]
        x = x + self.encoder.pos_embed.to(x.dtype)
        x = gather_rows(x, vis)                                      # [B, Lv, D]
        for blk in self.encoder.blocks:
            x = blk(x)
        x = self.encoder.head(self.encoder.norm(x))
        x = self.encoder_to_decoder(x)                               # [B, Lv, D']
        B, _, Dd = x.shape
        # positions in the clip's dtype, as the official ``type_as(x)`` on the input video:
        # under autocast the decoder's residual stream is then float32, like the official one
        pos = self.pos_embed.to(clip.dtype).expand(B, -1, -1)
        pos_vis, pos_msk = gather_rows(pos, vis), gather_rows(pos, msk)
        x = torch.cat([x + pos_vis, self.mask_token + pos_msk], dim=1)
        for blk in self.decoder.blocks:
            x = blk(x)
        nm = msk.shape[1]
        return self.decoder.head(self.decoder.norm(x[:, -nm:]))

    def target(self, clip: Tensor, info: MaskInfo) -> Tensor:
        c = self.cfg
        with torch.no_grad():
            t = videomae_pixel_target(clip, c.tubelet_size, c.patch_size, c.norm_target, c.mean, c.std)
            return gather_rows(t, self._indices(info)[1])

    def forward(self, clip: Tensor, info: MaskInfo) -> dict:
        labels = self.target(clip, info)
        pred = self.predict(clip, info)
        loss = F.mse_loss(pred.float(), labels)
        return {"loss": loss}


def build_videomae(cfg: Optional[VideoMAEConfig] = None, **kw) -> VideoMAE:
    return VideoMAE(cfg if cfg is not None else videomae_config("base", **kw))


__all__ = ["VideoMAEConfig", "tube_mask_generator", "VIDEOMAE_PRESETS", "videomae_config", "VideoMAE", "build_videomae",
           "videomae_pixel_target", "sinusoid_table", "flat_index", "gather_rows"]
