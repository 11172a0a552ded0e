"""MAM^2: Masked Appearance-Motion Modeling (reference model, plain PyTorch).

Pipeline (Sec. 2, Table 9), for a clip ``[B, T, C, H, W]`` cut into ``N = HW/P^2`` patches
per frame:

    patch embed (2-D conv per frame)            [B, T, N, D]
    + separable pos (time [T, D] + space [N, D]), keep visible tokens
    encoder: divided space-time blocks          [B, T, Nv, D]
    regressor: cross-attention blocks           mask queries -> [B, T, Nm, D']
        alignment: MSE to encoder(masked patches) computed without gradient (Eq. 1)
    appearance decoder (divided blocks) + head  -> code logits [B, T, Nm, K]  (Eq. 2)
    motion decoder (divided blocks) + head      -> RGB diff     [B, T, Nm, P*P*C] (Eq. 3)
    loss = L_app + L_motion + alpha * L_align   (Eq. 4)

Token sets: with tube-like masks (``MaskInfo.is_tube``) every frame holds the same spatial
slots, so the encoder works on ``[B, T, Nv, D]`` and decoders on ``[B, T, Nm, D']`` with no
padding. Other masks (random space-time, frame) keep the full grid ``[B, T, N, D]`` and a
validity mask ``[B, T, N]``: temporal attention at a spatial slot only sees the frames in
which that slot is in the set, spatial attention only the set's slots of the frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mam2_fast import kernels
from mam2_fast.kernels import reference as ref
from mam2_fast.masking import MaskInfo


@dataclass(frozen=True)
class VitPreset:
    embed_dim: int
    depth: int
    num_heads: int


PRESETS = {
    "tiny": VitPreset(192, 4, 3),     # CPU demo and tests
    "small": VitPreset(384, 12, 6),   # ViT-S
    "base": VitPreset(768, 12, 12),   # ViT-B
    "large": VitPreset(1024, 24, 16),  # ViT-L
}


# ----------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------
def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth per sample (first dimension)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FactorizedAttention(nn.Module):
    """Multi-head self-attention along one axis of ``[B, T, S, D]`` tokens.

    ``mode="temporal"``: sequences over T at each slot; ``mode="spatial"``: over the S slots
    of each frame. The qkv projection output is handed to the kernel as a
    ``[B, T, S, 3, H, dh]`` view (no permutes).
    """

    def __init__(self, dim: int, num_heads: int, mode: str, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim, self.mode = num_heads, dim // num_heads, mode
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = "reference"

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        B, T, S, D = x.shape
        qkv = self.qkv(x).view(B, T, S, 3, self.num_heads, self.head_dim)  # [B, T, S, 3, H, dh]
        out = kernels.factorized_attention(qkv, self.mode, valid, backend=self.backend)  # [B, T, S, D]
        return self.proj(out)


class DividedBlock(nn.Module):
    """TimeSformer divided space-time block: temporal attention (+ zero-initialized
    ``temporal_fc``), then spatial attention, then MLP; pre-norm, LayerNorm eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.temporal_norm = nn.LayerNorm(dim, eps=1e-6)
        self.temporal_attn = FactorizedAttention(dim, num_heads, "temporal")
        self.temporal_fc = nn.Linear(dim, dim)
        nn.init.zeros_(self.temporal_fc.weight)  # TimeSformer: temporal branch starts as identity
        nn.init.zeros_(self.temporal_fc.bias)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = FactorizedAttention(dim, num_heads, "spatial")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        # x: [B, T, S, D]; valid: [B, T, S] or None (all slots valid)
        x = x + self.drop_path(self.temporal_fc(self.temporal_attn(self.temporal_norm(x), valid)))
        x = x + self.drop_path(self.attn(self.norm1(x), valid))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q [B, Lq, D], k/v [B, Lk, D]
        B, Lq, D = q.shape
        H, dh = self.num_heads, self.head_dim
        q = self.q(q).view(B, Lq, H, dh).transpose(1, 2)
        k = self.k(k).view(B, -1, H, dh).transpose(1, 2)
        v = self.v(v).view(B, -1, H, dh).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, Lq, dh]
        return self.proj(out.transpose(1, 2).reshape(B, Lq, D))


class RegressorBlock(nn.Module):
    """CAE latent contextual regressor block: queries attend to [visible latents, queries];
    positions are added to queries and keys, not to values."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale_init: float = 0.0):
        super().__init__()
        self.norm1_q = nn.LayerNorm(dim, eps=1e-6)
        self.norm1_k = nn.LayerNorm(dim, eps=1e-6)
        self.norm1_v = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        if layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale_init))
            self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale_init))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x_q: Tensor, x_kv: Tensor, pos_q: Tensor, pos_k: Tensor) -> Tensor:
        # x_q [B, Lq, D] current queries; x_kv [B, Lk, D] visible latents ++ queries
        a = self.cross_attn(self.norm1_q(x_q + pos_q), self.norm1_k(x_kv + pos_k), self.norm1_v(x_kv))
        x = x_q + self.drop_path(a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.mlp(self.norm2(x))
        return x + self.drop_path(m if self.gamma_2 is None else self.gamma_2 * m)


# ----------------------------------------------------------------------------------------
# token-set helpers
# ----------------------------------------------------------------------------------------
def select_tokens(x: Tensor, info: MaskInfo, masked: bool,
                  backend: str = "reference") -> tuple[Tensor, Optional[Tensor]]:
    """Pick the visible (masked=False) or masked (masked=True) tokens of ``x [B, T, N, D]``.

    Tube-like masks: ``[B, T, K, D]`` and ``None``; otherwise the full grid with the other
    set zeroed and its validity mask ``[B, T, N]``.
    """
    if info.is_tube:
        return kernels.gather_tokens(x, info.mask_idx if masked else info.vis_idx, backend=backend), None
    valid = info.mask if masked else ~info.mask
    return x * valid.unsqueeze(-1).to(x.dtype), valid


def select_pos(pos: Tensor, info: MaskInfo, masked: bool) -> Tensor:
    """pos ``[T, N, D]`` -> per-sample positions of a token set ``[B, T, K|N, D]``."""
    B = info.mask.shape[0]
    full = pos.unsqueeze(0).expand(B, *pos.shape)
    if info.is_tube:
        return ref.gather_tokens_ref(full, info.mask_idx if masked else info.vis_idx)
    return full


# ----------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------
class Decoder(nn.Module):
    """Divided space-time blocks + final norm, on masked-token sets."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList([DividedBlock(dim, num_heads, mlp_ratio, drop_path) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor, valid: Optional[Tensor] = None, return_first: bool = False):
        first = None
        for i, blk in enumerate(self.blocks):
            x = blk(x, valid)
            if i == 0:
                first = x
        x = self.norm(x)
        return (x, first) if return_first else x


class MAM2(nn.Module):
    """MAM^2 pre-training model. Build with :func:`build_model` from a ``ModelConfig``."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        preset = PRESETS[cfg.preset]
        D = cfg.embed_dim or preset.embed_dim
        depth = cfg.depth if cfg.depth is not None else preset.depth
        heads = cfg.num_heads or preset.num_heads
        Dd = cfg.decoder_dim or D
        dheads = cfg.decoder_heads or (heads if Dd == D else max(1, Dd // 64))
        self.embed_dim, self.decoder_dim = D, Dd
        self.patch_size, self.in_chans, self.num_frames = cfg.patch_size, cfg.in_chans, cfg.num_frames
        self.grid = (cfg.img_size // cfg.patch_size, cfg.img_size // cfg.patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.vocab_size: Optional[int] = None  # set by set_vocab_size before the head is built
        T, N, P, C = cfg.num_frames, self.num_patches, cfg.patch_size, cfg.in_chans

        # embeddings shared ("multiplexed") by encoder, regressor and decoders
        self.patch_embed = nn.Conv2d(C, D, kernel_size=P, stride=P)
        self.pos_embed_time = nn.Parameter(torch.zeros(T, D))    # e^t [T, D]
        self.pos_embed_space = nn.Parameter(torch.zeros(N, D))   # e^s [N, D]
        dpr = [x.item() for x in torch.linspace(0, cfg.drop_path, max(depth, 1))]
        self.blocks = nn.ModuleList([DividedBlock(D, heads, cfg.mlp_ratio, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6)

        # projection after the encoder when regressor/decoder width differs (Table 1c)
        self.encoder_to_decoder = nn.Linear(D, Dd) if Dd != D else nn.Identity()
        self.pos_to_decoder = nn.Linear(D, Dd, bias=False) if Dd != D else nn.Identity()
        self.mask_query = nn.Parameter(torch.zeros(Dd))

        self.regressor = None
        if cfg.use_regressor:
            self.regressor = nn.ModuleList([
                RegressorBlock(Dd, dheads, cfg.mlp_ratio, 0.0, cfg.layer_scale_init)
                for _ in range(cfg.regressor_depth)])
            self.regressor_norm = nn.LayerNorm(Dd, eps=1e-6)

        self.appearance_decoder = self.motion_decoder = None
        if cfg.coupled_decoder:
            self.appearance_decoder = Decoder(Dd, cfg.appearance_depth, dheads, cfg.mlp_ratio)
        else:
            if cfg.use_appearance:
                self.appearance_decoder = Decoder(Dd, cfg.appearance_depth, dheads, cfg.mlp_ratio)
            if cfg.use_motion:
                self.motion_decoder = Decoder(Dd, cfg.motion_depth, dheads, cfg.mlp_ratio)
        self.appearance_head: Optional[nn.Linear] = None
        self.motion_head = nn.Linear(Dd, P * P * C) if cfg.use_motion else None
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.pos_embed_time, std=0.02)
        nn.init.trunc_normal_(self.pos_embed_space, std=0.02)
        nn.init.trunc_normal_(self.mask_query, std=0.02)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.modules():
            if isinstance(m, DividedBlock):
                nn.init.zeros_(m.temporal_fc.weight)
                nn.init.zeros_(m.temporal_fc.bias)
        self.set_kernel_backend(cfg.kernels)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_vocab_size(self, vocab_size: int) -> None:
        """Build the appearance head once the tokenizer's vocabulary is known."""
        if not self.cfg.use_appearance:
            return
        if self.appearance_head is not None and self.appearance_head.out_features == vocab_size:
            return
        self.vocab_size = vocab_size
        head = nn.Linear(self.decoder_dim, vocab_size)
        self._init_weights(head)
        self.appearance_head = head.to(self.mask_query.device)

    def set_kernel_backend(self, backend: str) -> None:
        self.kernel_backend = backend
        for m in self.modules():
            if isinstance(m, FactorizedAttention):
                m.backend = backend

    # -- pieces ---------------------------------------------------------------------------
    def pos_grid(self) -> Tensor:
        """Separable positions summed over the full grid: ``[T, N, D]``."""
        return self.pos_embed_time[:, None, :] + self.pos_embed_space[None, :, :]

    def embed_patches(self, clip: Tensor) -> Tensor:
        """clip ``[B, T, C, H, W]`` -> patch tokens ``[B, T, N, D]`` (no positions)."""
        B, T, C, H, W = clip.shape
        if (T, C, H, W) != (self.num_frames, self.in_chans, self.grid[0] * self.patch_size, self.grid[1] * self.patch_size):
            raise ValueError(
                f"clip shape {tuple(clip.shape)} does not match the model "
                f"[B, {self.num_frames}, {self.in_chans}, {self.grid[0] * self.patch_size}, {self.grid[1] * self.patch_size}]")
        x = self.patch_embed(clip.reshape(B * T, C, H, W))  # [B*T, D, h, w]
        return x.flatten(2).transpose(1, 2).reshape(B, T, self.num_patches, self.embed_dim)

    def encode_tokens(self, tokens: Tensor, valid: Optional[Tensor]) -> Tensor:
        """Run the encoder blocks + final norm on a token set ``[B, T, S, D]`` (positions added)."""
        x = tokens
        for blk in self.blocks:
            x = blk(x, valid)
        return self.norm(x)

    def encode(self, clip: Tensor, info: MaskInfo, masked: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """Encoder on the visible (or, for targets, masked) tokens: ``[B, T, S, D]``, valid."""
        x = self.embed_patches(clip)
        if info.is_tube:
            idx = info.mask_idx if masked else info.vis_idx
            tokens = kernels.gather_visible_add_pos(x, self.pos_embed_time, self.pos_embed_space, idx,
                                                    backend=self.kernel_backend)
            valid = None
        else:
            tokens, valid = select_tokens(x + self.pos_grid(), info, masked)
        return self.encode_tokens(tokens, valid), valid

    def forward_features(self, clip: Tensor) -> Tensor:
        """Encoder on all tokens (fine-tuning / probing): ``[B, T, N, D]``."""
        x = self.embed_patches(clip) + self.pos_grid()
        return self.encode_tokens(x, None)

    def regress(self, latent: Tensor, info: MaskInfo, valid_vis: Optional[Tensor]) -> Tensor:
        """Latent contextual regressor: predicted latents of the masked tokens.

        latent: visible latents in decoder width, ``[B, T, Nv, D']`` (tube) or ``[B, T, N, D']``.
        returns ``[B, T, Nm, D']`` (tube) or ``[B, T, N, D']`` (grid; masked slots meaningful).
        """
        B, T = latent.shape[:2]
        Dd = self.decoder_dim
        pos = self.pos_to_decoder(self.pos_grid())  # [T, N, D']
        pos_q = select_pos(pos, info, masked=True).reshape(B, -1, Dd)  # [B, Lq, D']
        if info.is_tube:
            Lq = pos_q.shape[1]
            pos_v = select_pos(pos, info, masked=False).reshape(B, -1, Dd)
            vis = latent.reshape(B, -1, Dd)
            x = self.mask_query.expand(B, Lq, Dd)
            pos_k = torch.cat([pos_v, pos_q], dim=1)
            for blk in self.regressor:
                x = blk(x, torch.cat([vis, x], dim=1), pos_q, pos_k)
            x = self.regressor_norm(x)
            return x.reshape(B, T, -1, Dd)
        # grid: one key per position -- the visible latent where visible, else the query
        m = info.mask.reshape(B, -1, 1)
        vis = latent.reshape(B, -1, Dd)
        x = self.mask_query.expand(B, m.shape[1], Dd)
        for blk in self.regressor:
            x = blk(x, torch.where(m, x, vis), pos_q, pos_q)
        x = self.regressor_norm(x)
        return x.reshape(B, T, -1, Dd)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, clip: Tensor, info: MaskInfo, codes: Optional[Tensor] = None) -> dict:
        """Compute the MAM^2 losses.

        clip  ``[B, T, C, H, W]`` normalized frames; info: the mask;
        codes ``[B, T, N]`` appearance token ids (required when the appearance task is on).
        Returns a dict with ``loss`` and its terms (``loss_app``, ``loss_motion``,
        ``loss_align``, weighted as Eq. 4) plus ``app_acc`` for logging.
        """
        cfg = self.cfg
        B, T = clip.shape[:2]
        Dd = self.decoder_dim
        out: dict = {}
        latent, valid_vis = self.encode(clip, info, masked=False)         # [B, T, Nv|N, D]
        latent = self.encoder_to_decoder(latent)                           # [B, T, Nv|N, D']
        pos = self.pos_to_decoder(self.pos_grid())                         # [T, N, D']
        valid_m = None if info.is_tube else info.mask

        align_target = None
        if cfg.use_alignment:
            with torch.no_grad():
                target, _ = self.encode(clip, info, masked=True)           # [B, T, Nm|N, D]
                align_target = self.encoder_to_decoder(target).detach()

        if self.regressor is not None:
            pred_latent = self.regress(latent, info, valid_vis)            # [B, T, Nm|N, D']
            dec_in = pred_latent + select_pos(pos, info, masked=True)
            dec_valid, take = valid_m, None
        else:
            # w/o regressor (Table 2): decoders see visible latents and mask queries together
            pos_full = pos.unsqueeze(0).expand(B, *pos.shape)
            full = self.mask_query.expand(B, T, self.num_patches, Dd)
            if info.is_tube:
                full = full.scatter(2, info.vis_idx[:, None, :, None].expand(B, T, -1, Dd), latent)
            else:
                full = torch.where(info.mask.unsqueeze(-1), full, latent)
            dec_in = full + pos_full
            dec_valid, take = None, True
            pred_latent = None

        def masked_view(x: Tensor) -> Tensor:
            # decoder output on the full grid -> the masked token set
            if take is None:
                return x
            return kernels.gather_tokens(x, info.mask_idx, backend=self.kernel_backend) if info.is_tube else x

        app_feat = motion_feat = first_block = None
        if self.appearance_decoder is not None:
            app_feat, first_block = self.appearance_decoder(dec_in, dec_valid, return_first=True)
            app_feat = masked_view(app_feat)
            if cfg.coupled_decoder:
                motion_feat = app_feat
        if self.motion_decoder is not None:
            motion_feat, mfirst = self.motion_decoder(dec_in, dec_valid, return_first=True)
            motion_feat = masked_view(motion_feat)
            if first_block is None:
                first_block = mfirst

        zero = clip.new_zeros(())
        loss = zero
        if cfg.use_alignment:
            # regressed latents of masked tokens; without a regressor: first decoder block's
            r = pred_latent if pred_latent is not None else masked_view(first_block)
            sq = (r.float() - align_target.float()) ** 2
            err = sq.sum(dim=-1) if cfg.align_reduction == "sum" else sq.mean(dim=-1)  # [B, T, Nm|N]
            loss_align = err.mean() if info.is_tube else (err * info.mask).sum() / info.mask.sum().clamp(min=1)
            out["loss_align"] = loss_align
            loss = loss + cfg.align_weight * loss_align

        if cfg.use_appearance:
            if codes is None:
                raise ValueError("appearance task is on: forward() needs codes [B, T, N]")
            if self.appearance_head is None:
                raise RuntimeError("call set_vocab_size() before training the appearance head")
            if info.is_tube:
                tgt = torch.gather(codes, 2, info.mask_idx[:, None, :].expand(B, T, -1))  # [B, T, Nm]
                feat = app_feat.reshape(-1, Dd)
                tgt = tgt.reshape(-1)
            else:
                feat = app_feat[info.mask]                                  # [M, D']
                tgt = codes[info.mask]
            loss_app = kernels.linear_cross_entropy(feat, self.appearance_head.weight,
                                                    self.appearance_head.bias, tgt, backend=self.kernel_backend)
            with torch.no_grad():
                acc = (self.appearance_head(feat[:4096]).argmax(-1) == tgt[:4096]).float().mean()
            out["loss_app"], out["app_acc"] = loss_app, acc
            loss = loss + loss_app

        if cfg.use_motion:
            pred = self.motion_head(motion_feat)                            # [B, T, Nm|N, P*P*C]
            if info.is_tube:
                loss_motion = kernels.rgb_diff_mse_tube(clip, pred, info.mask_idx, self.patch_size,
                                                        backend=self.kernel_backend)
            else:
                loss_motion = ref.rgb_diff_mse_ref(clip, pred, info.mask, self.patch_size)
            out["loss_motion"] = loss_motion
            loss = loss + loss_motion

        out["loss"] = loss
        return out

    @torch.no_grad()
    def predict(self, clip: Tensor, info: MaskInfo) -> dict:
        """Predicted appearance logits/codes and RGB differences for visualization."""
        cfg = self.cfg
        latent, valid_vis = self.encode(clip, info)
        latent = self.encoder_to_decoder(latent)
        res: dict = {}
        if self.regressor is None:
            raise NotImplementedError("predict() needs the regressor")
        dec_in = self.regress(latent, info, valid_vis) + select_pos(self.pos_to_decoder(self.pos_grid()), info, True)
        valid = None if info.is_tube else info.mask
        if self.appearance_decoder is not None and self.appearance_head is not None:
            f = self.appearance_decoder(dec_in, valid)
            res["app_logits"] = self.appearance_head(f)
            if cfg.coupled_decoder and self.motion_head is not None:
                res["rgb_diff"] = self.motion_head(f)
        if self.motion_decoder is not None:
            res["rgb_diff"] = self.motion_head(self.motion_decoder(dec_in, valid))
        return res


def build_model(cfg, vocab_size: Optional[int] = None) -> MAM2:
    model = MAM2(cfg)
    if vocab_size is not None:
        model.set_vocab_size(vocab_size)
    return model


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms, biases, position embeddings and the mask query (any 1-D tensor)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.startswith("pos_embed") or name == "mask_query" or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
