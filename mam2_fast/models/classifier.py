"""Video classifier for fine-tuning: the MAM^2 encoder on all tokens + a VideoMAE-style head.

    clip [B, T, C, H, W]
    patch embed (2-D conv per frame)                     [B, T, N, D]
    + separable positions (time [T, D] + space [N, D])   [B, T, N, D]
    divided space-time blocks (drop path), final norm    [B, T, N, D]   == MAM2.forward_features
    mean over all T*N tokens, fc_norm (LayerNorm)        [B, D]
    dropout, linear head                                 [B, num_classes]

Encoder parameter names are exactly the pre-training model's (``patch_embed.*``,
``pos_embed_time``, ``pos_embed_space``, ``blocks.*``, ``norm.*``), so a pre-training
checkpoint loads key for key (see :mod:`mam2_fast.ft.weights`). Unlike VideoMAE, the
encoder's final ``norm`` is kept before pooling so that every pre-trained key is used and
the pooled feature is exactly the mean of ``MAM2.forward_features``; ``fc_norm`` and
``head`` are new.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mam2_fast.models.mam2 import PRESETS, DividedBlock, FactorizedAttention

ENCODER_PARAM_PREFIXES = ("patch_embed.", "pos_embed_time", "pos_embed_space", "blocks.", "norm.")
HEAD_PARAM_PREFIXES = ("fc_norm.", "head.")


def is_encoder_key(name: str) -> bool:
    return name in ("pos_embed_time", "pos_embed_space") or name.startswith(("patch_embed.", "blocks.", "norm."))


def resolve_arch(cfg) -> tuple[int, int, int]:
    """(embed_dim, depth, num_heads) of a model config with preset + optional overrides."""
    preset = PRESETS[cfg.preset]
    D = cfg.embed_dim or preset.embed_dim
    depth = cfg.depth if cfg.depth is not None else preset.depth
    heads = cfg.num_heads or preset.num_heads
    return D, depth, heads


class VideoEncoder(nn.Module):
    """The MAM^2 encoder alone (same parameter names), run on all tokens."""

    def __init__(self, cfg, drop_path: float = 0.0):
        super().__init__()
        D, depth, heads = resolve_arch(cfg)
        self.embed_dim, self.depth, self.num_heads = D, depth, heads
        self.patch_size, self.in_chans, self.num_frames = cfg.patch_size, cfg.in_chans, cfg.num_frames
        self.grid = (cfg.img_size // cfg.patch_size, cfg.img_size // cfg.patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        T, N, P, C = cfg.num_frames, self.num_patches, cfg.patch_size, cfg.in_chans

        self.patch_embed = nn.Conv2d(C, D, kernel_size=P, stride=P)
        self.pos_embed_time = nn.Parameter(torch.zeros(T, D))    # [T, D]
        self.pos_embed_space = nn.Parameter(torch.zeros(N, D))   # [N, D]
        dpr = [x.item() for x in torch.linspace(0, drop_path, max(depth, 1))]
        self.blocks = nn.ModuleList([DividedBlock(D, heads, cfg.mlp_ratio, dpr[i], bool(getattr(cfg, "temporal_fc", False)))
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self._init_encoder()
        self.set_kernel_backend(getattr(cfg, "kernels", "reference"))

    def _init_encoder(self) -> None:
        # same initialization as MAM2 (random-init baselines are comparable)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed_time, std=0.02)
        nn.init.trunc_normal_(self.pos_embed_space, std=0.02)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for blk in self.blocks:
            if blk.temporal_fc is not None:
                nn.init.zeros_(blk.temporal_fc.weight)
                nn.init.zeros_(blk.temporal_fc.bias)

    def set_kernel_backend(self, backend: str) -> None:
        for m in self.modules():
            if isinstance(m, FactorizedAttention):
                m.backend = backend

    def forward_features(self, clip: Tensor) -> Tensor:
        """clip ``[B, T, C, H, W]`` -> normalized tokens ``[B, T, N, D]``."""
        B, T, C, H, W = clip.shape
        want = (self.num_frames, self.in_chans, self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        if (T, C, H, W) != want:
            raise ValueError(f"clip shape {tuple(clip.shape)} does not match the model [B, {', '.join(map(str, want))}]")
        x = self.patch_embed(clip.reshape(B * T, C, H, W))                         # [B*T, D, h, w]
        x = x.flatten(2).transpose(1, 2).reshape(B, T, self.num_patches, self.embed_dim)  # [B, T, N, D]
        x = x + (self.pos_embed_time[:, None, :] + self.pos_embed_space[None, :, :])
        for blk in self.blocks:
            x = blk(x, None)
        return self.norm(x)

    def pooled(self, clip: Tensor) -> Tensor:
        """Mean over all tokens: ``[B, D]`` (the linear-probe feature)."""
        return self.forward_features(clip).mean(dim=(1, 2))

    def encoder_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if is_encoder_key(k)}


class VideoClassifier(VideoEncoder):
    """Encoder + mean pooling + ``fc_norm`` + dropout + ``head``. Build with :func:`build_classifier`."""

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
        x = self.forward_features(clip)             # [B, T, N, D]
        x = self.fc_norm(x.mean(dim=(1, 2)))        # [B, D]
        return self.head(self.head_drop(x))         # [B, num_classes]


def build_classifier(cfg) -> VideoClassifier:
    """``cfg.arch``: ``mam2`` -> :class:`VideoClassifier`; ``videomae`` -> the plain-ViT
    :class:`~mam2_fast.models.videomae_classifier.VideoMAEClassifier`."""
    if getattr(cfg, "arch", "mam2") == "videomae":
        from mam2_fast.models.videomae_classifier import VideoMAEClassifier
        return VideoMAEClassifier(cfg)
    return VideoClassifier(cfg)


def build_encoder(cfg):
    """The encoder alone (no head) for ``cfg.arch`` (probe, export)."""
    if getattr(cfg, "arch", "mam2") == "videomae":
        from mam2_fast.models.videomae_classifier import VideoMAEEncoder
        return VideoMAEEncoder(cfg)
    return VideoEncoder(cfg)


# ----------------------------------------------------------------------------------------
# optimizer groups: layer-wise lr decay (BEiT / VideoMAE)
# ----------------------------------------------------------------------------------------
def layer_id_for(name: str, depth: int) -> int:
    """0: embeddings; i + 1: ``blocks.i``; depth + 1: final norm, fc_norm, head."""
    if name.startswith(("patch_embed.", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_layer_decay(model: VideoEncoder, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups per (layer, decay/no-decay) with ``lr_scale = layer_decay ** (depth + 1 - layer)``.

    No weight decay on 1-D tensors (norms, biases) and position embeddings. The trainer sets
    ``group["lr"] = lr * group["lr_scale"]`` every step.
    """
    depth = model.depth
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name.startswith("pos_embed")
        lid = layer_id_for(name, depth)
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "layer_id": lid,
                           "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (depth + 1 - lid)}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def set_scaled_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def encoder_arch_dict(cfg) -> dict:
    """The fields that define the encoder's parameters (stored in exports)."""
    D, depth, heads = resolve_arch(cfg)
    arch = {"preset": cfg.preset, "img_size": cfg.img_size, "num_frames": cfg.num_frames,
            "patch_size": cfg.patch_size, "in_chans": cfg.in_chans, "embed_dim": D, "depth": depth,
            "num_heads": heads, "mlp_ratio": float(cfg.mlp_ratio)}
    if getattr(cfg, "arch", "mam2") != "videomae":
        arch["temporal_fc"] = bool(getattr(cfg, "temporal_fc", False))
    if getattr(cfg, "arch", "mam2") == "videomae":   # mam2 exports keep their original fields
        arch.update(arch="videomae", tubelet_size=int(cfg.tubelet_size),
                    final_norm=bool(getattr(cfg, "final_norm", True)))
    return arch


def count_params(model: nn.Module, prefix: Optional[tuple] = None) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if prefix is None or n.startswith(prefix))
