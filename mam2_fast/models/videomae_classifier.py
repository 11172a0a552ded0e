"""VideoMAE encoder (all tokens) and classifier: ``model.arch: videomae`` for fine-tuning,
probing, evaluation and export.

    clip [B, T, C, H, W]
    tubelet embed Conv3d (tubelet x P x P)              [B, T/tubelet * N, D]
    + fixed sinusoid positions over the flat index       (not a parameter)
    joint space-time ViT blocks (q_bias / v_bias)        [B, L, D]
    final LayerNorm (``final_norm: true``, default)      [B, L, D]   -> forward_features [B, T', N, D]
    mean over all tokens, fc_norm, dropout, linear head  [B, num_classes]

Parameter names are those of the official ``modeling_finetune.VisionTransformer``
(MCG-NJU/VideoMAE) -- ``patch_embed.proj.*``, ``blocks.{i}.norm1.*``,
``blocks.{i}.attn.qkv.weight``, ``blocks.{i}.attn.q_bias`` / ``v_bias``,
``blocks.{i}.attn.proj.*``, ``blocks.{i}.norm2.*``, ``blocks.{i}.mlp.fc1.*`` / ``fc2.*``,
``norm.*``, ``fc_norm.*``, ``head.*`` -- i.e. the pre-training model's ``encoder.*`` keys
without the ``encoder.`` prefix, so an official or an in-tool VideoMAE pre-training
checkpoint loads key for key (:mod:`mam2_fast.ft.weights`, :mod:`mam2_fast.interop.videomae`).

``final_norm: true`` keeps the pre-trained encoder's final LayerNorm before pooling (as the
MAM^2 classifier does, so the two are compared with the same head); ``false`` is the
official fine-tuning's ``use_mean_pooling`` (no final norm; what official / HuggingFace
*fine-tuned* checkpoints hold). :meth:`forward_features` returns the tokens as
``[B, T / tubelet, N, D]`` so the probe's poolings apply unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mam2_fast.models.videomae import Block, PatchEmbed, sinusoid_table


def resolve_videomae_arch(cfg) -> tuple[int, int, int]:
    from mam2_fast.models.classifier import resolve_arch
    return resolve_arch(cfg)


class VideoMAEEncoder(nn.Module):
    """Plain ViT with tubelet embedding, on all tokens (the VideoMAE encoder)."""

    def __init__(self, cfg, drop_path: float = 0.0):
        super().__init__()
        D, depth, heads = resolve_videomae_arch(cfg)
        if D % heads:
            raise ValueError(f"width {D} is not divisible by {heads} heads")
        self.arch = "videomae"
        self.embed_dim, self.depth, self.num_heads = D, depth, heads
        self.patch_size, self.in_chans, self.num_frames = cfg.patch_size, cfg.in_chans, cfg.num_frames
        self.tubelet_size = int(getattr(cfg, "tubelet_size", 2))
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"num_frames {self.num_frames} is not a multiple of tubelet_size {self.tubelet_size}")
        self.grid = (cfg.img_size // cfg.patch_size, cfg.img_size // cfg.patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.slices = self.num_frames // self.tubelet_size
        self.final_norm = bool(getattr(cfg, "final_norm", True))
        self.patch_embed = PatchEmbed(cfg.in_chans, D, self.tubelet_size, cfg.patch_size)
        self.register_buffer("pos_embed", sinusoid_table(self.slices * self.num_patches, D), persistent=False)
        dpr = [x.item() for x in torch.linspace(0, drop_path, max(depth, 1))]
        self.blocks = nn.ModuleList([Block(D, heads, cfg.mlp_ratio, getattr(cfg, "qkv_bias", True), dpr[i])
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6) if self.final_norm else nn.Identity()
        self._init_encoder()

    def _init_encoder(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_kernel_backend(self, backend: str) -> None:
        """No fused kernels for the plain ViT (attention runs through SDPA)."""

    def tokens(self, clip: Tensor) -> Tensor:
        """clip ``[B, T, C, H, W]`` -> tokens ``[B, T/tubelet * N, D]`` in (t, h, w) order."""
        B, T, C, H, W = clip.shape
        want = (self.num_frames, self.in_chans, self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        if (T, C, H, W) != want:
            raise ValueError(f"clip shape {tuple(clip.shape)} does not match the model [B, {', '.join(map(str, want))}]")
        x = self.patch_embed(clip.transpose(1, 2))
        x = x + self.pos_embed.to(dtype=x.dtype, device=x.device)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_features(self, clip: Tensor) -> Tensor:
        """clip ``[B, T, C, H, W]`` -> tokens ``[B, T/tubelet, N, D]``."""
        x = self.tokens(clip)
        return x.view(x.shape[0], self.slices, self.num_patches, self.embed_dim)

    def pooled(self, clip: Tensor) -> Tensor:
        return self.tokens(clip).mean(dim=1)

    def encoder_state_dict(self) -> dict:
        from mam2_fast.models.classifier import is_encoder_key
        return {k: v for k, v in self.state_dict().items() if is_encoder_key(k)}


class VideoMAEClassifier(VideoMAEEncoder):
    """Encoder + mean pooling + ``fc_norm`` + dropout + ``head`` (official fine-tuning head)."""

    def __init__(self, cfg):
        super().__init__(cfg, drop_path=cfg.drop_path)
        D = self.embed_dim
        self.num_classes = cfg.num_classes
        self.fc_norm = nn.LayerNorm(D, eps=1e-6)
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(D, cfg.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(cfg.head_init_scale)

    def forward(self, clip: Tensor) -> Tensor:
        x = self.fc_norm(self.tokens(clip).mean(dim=1))
        return self.head(self.head_drop(x))


__all__ = ["VideoMAEEncoder", "VideoMAEClassifier"]
