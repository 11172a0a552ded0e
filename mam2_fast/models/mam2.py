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

Reductions (one convention for Eq. 1 and Eq. 3): a token's squared error is averaged over
its values -- the D' channels of a latent (``align_reduction="mean"``, CAE's released
``F.mse_loss``; ``"sum"`` reads Eq. 1's squared L2 literally, ~D' times larger) and the
P*P*C values of an RGB-difference patch -- then averaged over the masked tokens (Eq. 1) or
the masked patches of frames t >= 1 (Eq. 3). The RGB difference is taken on raw [0, 1] RGB
(``motion_space="raw"``, Sec. 2.2; :meth:`MAM2.motion_clip`) or on the normalized clip.

Token sets: with tube-like masks (``MaskInfo.is_tube``) every frame holds the same spatial
slots, so the encoder works on ``[B, T, Nv, D]`` and decoders on ``[B, T, Nm, D']`` with no
padding. Other masks (random space-time, frame) keep the full grid ``[B, T, N, D]`` and a
validity mask ``[B, T, N]``: temporal attention at a spatial slot only sees the frames in
which that slot is in the set, spatial attention only the set's slots of the frame. With
``kernels: fused | auto`` the encoder (visible pass and alignment-target pass) and the two
decoders instead run on the set's tokens packed as ``[Ntok, D]`` (``MaskInfo.segments``)
with variable-length attention, so at ratio 0.75 the visible pass costs a quarter of the
grid and the decoders three quarters; the regressor computes only the masked queries when
every sample has as many (random and frame masks do; keys stay every position). The heads
and losses then read the packed rows too (the RGB-difference loss through its packed fused
kernel), so nothing returns to the grid. Results equal the grid path.

Targets (``ModelConfig``):

* ``appearance_target="tokens"`` (default): CE over tokenizer codes (Eq. 2), needs
  ``codes``. ``"pixels"``: the appearance head regresses per-patch normalized pixels
  (``targets.pixel.pixel_target(clip, P)`` with its defaults, VideoMAE per-channel norm)
  with MSE over all masked patches (VideoMAE / MAE-ST baselines; no tokenizer).
* ``motion_target="rgb_diff"`` (default): Eq. 3. ``"flow"`` (Table 1f): the head outputs
  ``P*P*2`` values per patch, regressed to the flow target the caller passes as
  ``motion_target [B, T, N, P*P*2]`` (``targets.flow.FlowTarget``; frame 0 is excluded)
  with the same reduction as Eq. 3. ``"clip_order"`` (Sec. 2.2, tube masks and the
  regressor only): the regressed latents of each masked tube are cut into two temporal
  clips, swapped or not (label 0/1 from ``generator`` / ``order_labels``), and the motion
  decoder with a per-tube [CLS] (an extra leading time step) predicts the order (CE over
  2 classes); see :meth:`MAM2.clip_order_logits`.

Call: ``model(clip, info, codes=None, motion_target=None, generator=None, order_labels=None)``
returns a dict with ``loss`` (Eq. 4) and its terms ``loss_app`` / ``loss_motion`` /
``loss_align``, plus ``app_acc`` (token target) and ``order_acc`` / ``order_labels``
(clip order) for logging.

``grad_checkpointing`` recomputes each encoder / decoder / regressor block in the backward
pass (``torch.utils.checkpoint``, ``use_reentrant=False``): same loss and gradients, less
activation memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mam2_fast import kernels
from mam2_fast.kernels import reference as ref
from mam2_fast.train import accel
from mam2_fast.masking import MaskInfo, PackedSegments

MOTION_TARGETS = ("rgb_diff", "flow", "clip_order")
APPEARANCE_TARGETS = ("tokens", "pixels")
MOTION_SPACES = ("raw", "normalized")
IMAGENET_MEAN = (0.485, 0.456, 0.406)   # = DataConfig's defaults; build_model takes the run's
IMAGENET_STD = (0.229, 0.224, 0.225)


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
def run_block(block: nn.Module, *args, checkpointed: bool = False):
    """``block(*args)``, recomputed in the backward pass when ``checkpointed`` and autograd is
    recording (``torch.utils.checkpoint``, non-reentrant; RNG state such as drop-path
    masks is replayed, so results equal the plain call)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def drop_path(x: Tensor, p: float, training: bool, packed: Optional[PackedSegments] = None) -> Tensor:
    """Stochastic depth per sample: the first dimension, or for packed tokens ``[Ntok, D]``
    the sample each token belongs to (``packed.sample``)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    if packed is not None:
        per_sample = x.new_empty(packed.batch_size).bernoulli_(keep).div_(keep)
        return x * per_sample[packed.sample].unsqueeze(-1)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, packed: Optional[PackedSegments] = None) -> Tensor:
        return drop_path(x, self.p, self.training, packed)


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

    def forward(self, x: Tensor, valid=None) -> Tensor:
        if isinstance(valid, PackedSegments):  # packed tokens [Ntok, D]
            qkv = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim)  # [Ntok, 3, H, dh]
            if self.mode == "temporal":
                cu, longest, index = valid.temporal_cu, valid.temporal_max, valid.temporal_index
            else:
                cu, longest, index = valid.spatial_cu, valid.spatial_max, None
            return self.proj(kernels.varlen_attention(qkv, cu, longest, index, backend=self.backend))
        B, T, S, D = x.shape
        qkv = self.qkv(x).view(B, T, S, 3, self.num_heads, self.head_dim)  # [B, T, S, 3, H, dh]
        out = kernels.factorized_attention(qkv, self.mode, valid, backend=self.backend)  # [B, T, S, D]
        return self.proj(out)


class DividedBlock(nn.Module):
    """TimeSformer divided space-time block: temporal attention, then spatial attention, then
    MLP; pre-norm, LayerNorm eps 1e-6.

    ``temporal_fc=True`` adds TimeSformer's extra zero-initialized ``D x D`` linear after the
    temporal attention (its temporal branch starts as identity). The paper's encoder sizes
    (114 M ViT-B, 403 M ViT-L; Tables 3/4) match the block without it, and Table 9 lists only
    MHA-T, MHA-S and MLP, so ``model.temporal_fc`` defaults to false."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 temporal_fc: bool = False):
        super().__init__()
        self.temporal_norm = nn.LayerNorm(dim, eps=1e-6)
        self.temporal_attn = FactorizedAttention(dim, num_heads, "temporal")
        self.temporal_fc = nn.Linear(dim, dim) if temporal_fc else None
        if self.temporal_fc is not None:
            nn.init.zeros_(self.temporal_fc.weight)  # TimeSformer: temporal branch starts as identity
            nn.init.zeros_(self.temporal_fc.bias)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = FactorizedAttention(dim, num_heads, "spatial")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, valid=None) -> Tensor:
        # x: [B, T, S, D] with valid [B, T, S] or None (all slots valid),
        #    or packed tokens [Ntok, D] with valid a PackedSegments
        packed = valid if isinstance(valid, PackedSegments) else None
        t = self.temporal_attn(self.temporal_norm(x), valid)
        if self.temporal_fc is not None:
            t = self.temporal_fc(t)
        x = x + self.drop_path(t, packed)
        x = x + self.drop_path(self.attn(self.norm1(x), valid), packed)
        x = x + self.drop_path(self.mlp(self.norm2(x)), packed)
        return x


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, k_bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        # a key bias adds the same term to every score of a query, which softmax ignores: its
        # gradient is 0 and CAE's code keeps it at zero (k_bias=False there)
        self.k = nn.Linear(dim, dim, bias=qkv_bias and k_bias)
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


REGRESSOR_BLOCKS = ("cae", "prenorm")


class RegressorBlock(nn.Module):
    """Latent contextual regressor block: queries attend to [visible latents, queries];
    positions are added to queries and keys, not to values.

    ``style="cae"`` (default) is CAE's released ``RegressorBlock`` (``models/modeling_cae_helper.py``):
    ``x = x_q + g1 * cross_attn(...)``, then the stream itself is normalized before the MLP
    residual, ``x = norm2(x); x = x + g2 * mlp(x)``, with layer scale ``g1, g2`` (CAE's
    ``decoder_layer_scale_init_value`` 0.1). ``style="prenorm"`` is the usual pre-norm residual
    ``x = x + g2 * mlp(norm2(x))`` (no layer scale unless ``layer_scale_init > 0``).
    Parameter names are the same in both styles (``norm2``, ``mlp``, ``gamma_1/2``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale_init: float = 0.0, style: str = "prenorm"):
        super().__init__()
        if style not in REGRESSOR_BLOCKS:
            raise ValueError(f"model.regressor_block: {style!r} is not one of {REGRESSOR_BLOCKS}")
        self.style = style
        self.norm1_q = nn.LayerNorm(dim, eps=1e-6)
        self.norm1_k = nn.LayerNorm(dim, eps=1e-6)
        self.norm1_v = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads, k_bias=style != "cae")
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
        if self.style == "cae":
            x = self.norm2(x)                       # CAE: the stream is normalized, then the MLP residual
            m = self.mlp(x)
        else:
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
    """pos ``[T, N, D]`` -> per-sample positions of a token set ``[B, T, K|N, D]``.

    Tube masks index the shared ``[T, N, D]`` table directly (its backward accumulates into
    ``[T, N, D]``; no ``[B, T, N, D]`` gradient buffer as a gather from the expanded
    table would need)."""
    B = info.mask.shape[0]
    if info.is_tube:
        idx = info.mask_idx if masked else info.vis_idx          # [B, K]
        return pos[:, idx].transpose(0, 1)                       # [T, B, K, D] -> [B, T, K, D]
    return pos.unsqueeze(0).expand(B, *pos.shape)


# ----------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------
class Decoder(nn.Module):
    """Divided space-time blocks + final norm, on masked-token sets.

    ``cls_token=True`` adds a learnable ``cls_token [dim]`` (the clip-order [CLS], kept
    inside the decoder so its name carries the ``motion_decoder.`` prefix of the
    pre-training-only modules)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0,
                 cls_token: bool = False, temporal_fc: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList([DividedBlock(dim, num_heads, mlp_ratio, drop_path, temporal_fc)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.cls_token = nn.Parameter(torch.zeros(dim)) if cls_token else None
        self.grad_checkpointing = False

    def forward(self, x: Tensor, valid: Optional[Tensor] = None, return_first: bool = False):
        first = None
        for i, blk in enumerate(self.blocks):
            x = run_block(blk, x, valid, checkpointed=self.grad_checkpointing)
            if i == 0:
                first = x
        x = self.norm(x)
        return (x, first) if return_first else x


class DecoderInput(NamedTuple):
    """What MAM^2's decoders read (``MAM2._decoder_inputs``)."""
    dec_in: Tensor                     # [M, D'] packed, [B, T, Nm|N, D'] regressed, [B, T, N, D'] full grid
    valid: Any                         # the decoders' token set: PackedSegments, grid mask or None
    rows: Optional[Tensor]             # [M] flat token rows of the packed path, else None
    pred_latent: Optional[Tensor]      # the regressed latents (None without a regressor)
    full_grid: bool                    # no regressor: decoder outputs cover all T x N slots


class MAM2(nn.Module):
    """MAM^2 pre-training model. Build with :func:`build_model` from a ``ModelConfig``."""

    # Long on purpose: the submodules are made in this one order -- each draws its initial weights
    # from the global RNG and the state_dict keys follow it, so checkpoints and seeded runs depend
    # on it; read top to bottom it is the architecture (encoder, regressor, decoders, heads).
    def __init__(self, cfg, pixel_mean: Optional[tuple] = None, pixel_std: Optional[tuple] = None):
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
        self.motion_target = getattr(cfg, "motion_target", "rgb_diff")
        self.appearance_target = getattr(cfg, "appearance_target", "tokens")
        self.motion_space = getattr(cfg, "motion_space", "raw")
        self._check_target_config(cfg)
        tfc = bool(getattr(cfg, "temporal_fc", False))
        reg_style = getattr(cfg, "regressor_block", "cae")
        ls = getattr(cfg, "layer_scale_init", None)
        reg_ls = (0.1 if reg_style == "cae" else 0.0) if ls is None else float(ls)
        # the data pipeline's per-channel normalization: the model sees (x - mean) / std; the
        # RGB-difference target in raw [0, 1] RGB is std * (n_t - n_{t-1}) (the mean cancels)
        mean = pixel_mean if pixel_mean is not None else IMAGENET_MEAN
        std = pixel_std if pixel_std is not None else IMAGENET_STD
        if len(mean) != C or len(std) != C:
            raise ValueError(f"pixel_mean / pixel_std need {C} values, got {mean} / {std}")
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32), persistent=False)

        # embeddings shared ("multiplexed") by encoder, regressor and decoders
        self.patch_embed = nn.Conv2d(C, D, kernel_size=P, stride=P)
        self.pos_embed_time = nn.Parameter(torch.zeros(T, D))    # e^t [T, D]
        self.pos_embed_space = nn.Parameter(torch.zeros(N, D))   # e^s [N, D]
        dpr = [x.item() for x in torch.linspace(0, cfg.drop_path, max(depth, 1), device="cpu")]
        self.blocks = nn.ModuleList([DividedBlock(D, heads, cfg.mlp_ratio, dpr[i], tfc) for i in range(depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6)

        # projection after the encoder when regressor/decoder width differs (Table 1c)
        self.encoder_to_decoder = nn.Linear(D, Dd) if Dd != D else nn.Identity()
        self.pos_to_decoder = nn.Linear(D, Dd, bias=False) if Dd != D else nn.Identity()
        self.mask_query = nn.Parameter(torch.zeros(Dd))

        self.regressor = None
        if cfg.use_regressor:
            self.regressor = nn.ModuleList([
                RegressorBlock(Dd, dheads, cfg.mlp_ratio, 0.0, reg_ls, reg_style)
                for _ in range(cfg.regressor_depth)])
            self.regressor_norm = nn.LayerNorm(Dd, eps=1e-6)

        self.appearance_decoder = self.motion_decoder = None
        if cfg.coupled_decoder:
            self.appearance_decoder = Decoder(Dd, cfg.appearance_depth, dheads, cfg.mlp_ratio, temporal_fc=tfc)
        else:
            if cfg.use_appearance:
                self.appearance_decoder = Decoder(Dd, cfg.appearance_depth, dheads, cfg.mlp_ratio, temporal_fc=tfc)
            if cfg.use_motion:
                self.motion_decoder = Decoder(Dd, cfg.motion_depth, dheads, cfg.mlp_ratio,
                                              cls_token=self.motion_target == "clip_order", temporal_fc=tfc)
        self.appearance_head: Optional[nn.Linear] = None
        if cfg.use_appearance and self.appearance_target == "pixels":
            self.appearance_head = nn.Linear(Dd, P * P * C)   # per-patch normalized pixels
        motion_out = {"rgb_diff": P * P * C, "flow": P * P * 2, "clip_order": 2}[self.motion_target]
        self.motion_head = nn.Linear(Dd, motion_out) if cfg.use_motion else None
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.pos_embed_time, std=0.02)
        nn.init.trunc_normal_(self.pos_embed_space, std=0.02)
        nn.init.trunc_normal_(self.mask_query, std=0.02)
        if self.motion_decoder is not None and self.motion_decoder.cls_token is not None:
            nn.init.trunc_normal_(self.motion_decoder.cls_token, std=0.02)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.modules():
            if isinstance(m, DividedBlock) and m.temporal_fc is not None:
                nn.init.zeros_(m.temporal_fc.weight)
                nn.init.zeros_(m.temporal_fc.bias)
        if self.regressor is not None and reg_style == "cae":
            # CAE's released code: xavier-uniform linears (its _init_weights), zero biases
            for m in self.regressor.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        self.set_kernel_backend(cfg.kernels)
        self.set_grad_checkpointing(getattr(cfg, "grad_checkpointing", False))

    @staticmethod
    def _check_target_config(cfg) -> None:
        """Model-side guard for the target switches (``config.validate`` checks the same)."""
        mt, at = getattr(cfg, "motion_target", "rgb_diff"), getattr(cfg, "appearance_target", "tokens")
        if mt not in MOTION_TARGETS:
            raise ValueError(f"model.motion_target: {mt!r} is not one of {MOTION_TARGETS}")
        if at not in APPEARANCE_TARGETS:
            raise ValueError(f"model.appearance_target: {at!r} is not one of {APPEARANCE_TARGETS}")
        ms = getattr(cfg, "motion_space", "raw")
        if ms not in MOTION_SPACES:
            raise ValueError(f"model.motion_space: {ms!r} is not one of {MOTION_SPACES}")
        if mt == "clip_order" and cfg.use_motion:
            if not cfg.use_regressor:
                raise ValueError("model.motion_target='clip_order' shuffles the regressor's latents: "
                                 "it needs model.use_regressor=true")
            if cfg.coupled_decoder:
                raise ValueError("model.motion_target='clip_order' needs its own motion decoder: "
                                 "it cannot be used with model.coupled_decoder=true")
            if cfg.num_frames < 2:
                raise ValueError("model.motion_target='clip_order' needs model.num_frames >= 2")

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
        if not self.cfg.use_appearance or self.appearance_target == "pixels":
            return  # the pixel-regression head has a fixed size and is built in __init__
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

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing of every encoder / decoder / regressor block."""
        self.grad_checkpointing = bool(enabled)
        for m in self.modules():
            if isinstance(m, Decoder):
                m.grad_checkpointing = self.grad_checkpointing

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

    def encode_tokens(self, tokens: Tensor, valid) -> Tensor:
        """Run the encoder blocks + final norm on a token set ``[B, T, S, D]`` (positions added;
        ``valid [B, T, S]`` or None), or on packed tokens ``[Ntok, D]`` (``valid`` a PackedSegments)."""
        x = tokens
        for blk in self.blocks:
            x = run_block(blk, x, valid, checkpointed=self.grad_checkpointing)
        return self.norm(x)

    def encode(self, clip: Tensor, info: MaskInfo, masked: bool = False,
               patches: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Encoder on the visible (or, for targets, masked) tokens: ``[B, T, S, D]``, valid.
        ``patches``: the clip's patch embeddings ``[B, T, N, D]`` when already computed."""
        x = self.embed_patches(clip) if patches is None else patches
        if info.is_tube:
            idx = info.mask_idx if masked else info.vis_idx
            tokens = kernels.gather_visible_add_pos(x, self.pos_embed_time, self.pos_embed_space, idx,
                                                    backend=self.kernel_backend)
            valid = None
        elif self.kernel_backend != "reference":
            # packed: only the set's tokens go through the encoder (varlen attention)
            B, T, N, D = x.shape
            out = self.encode_packed(x, info, masked)                            # [Ntok, D]
            rows = info.segments(masked).rows
            grid = out.new_zeros(B * T * N, D).index_copy(0, rows, out)         # zeros off the set
            return grid.view(B, T, N, D), (info.mask if masked else ~info.mask)
        else:
            tokens, valid = select_tokens(x + self.pos_grid(), info, masked)
        return self.encode_tokens(tokens, valid), valid

    def encode_packed(self, patches: Tensor, info: MaskInfo, masked: bool) -> Tensor:
        """Encoder on the visible (or masked) token set of a random / frame mask, packed:
        patch embeddings ``[B, T, N, D]`` -> ``[Ntok, D]`` in ``info.segments(masked).rows``
        order (varlen attention over each sample's frames and slots)."""
        B, T, N, D = patches.shape
        seg = info.segments(masked)
        pos = self.pos_grid().reshape(T * N, D)[seg.rows % (T * N)]              # [Ntok, D]
        tokens = patches.reshape(B * T * N, D)[seg.rows] + pos                   # [Ntok, D]
        return self.encode_tokens(tokens, seg)

    def forward_features(self, clip: Tensor) -> Tensor:
        """Encoder on all tokens (fine-tuning / probing): ``[B, T, N, D]``."""
        x = self.embed_patches(clip) + self.pos_grid()
        return self.encode_tokens(x, None)

    def regress(self, latent: Tensor, info: MaskInfo, valid_vis: Optional[Tensor],
                packed: Optional[PackedSegments] = None) -> Tensor:
        """Latent contextual regressor: predicted latents of the masked tokens.

        latent: visible latents in decoder width, ``[B, T, Nv, D']`` (tube) or ``[B, T, N, D']``.
        returns ``[B, T, Nm, D']`` (tube) or ``[B, T, N, D']`` (grid; masked slots meaningful);
        with ``packed`` (the masked set's segments, equal counts per sample) only the masked
        queries are computed: ``[M, D']`` in ``packed.rows`` order.
        """
        B, T = latent.shape[:2]
        Dd = self.decoder_dim
        pos = self.pos_to_decoder(self.pos_grid())  # [T, N, D']
        if packed is not None:
            # queries = the masked positions only; keys = every position (visible latent or
            # the current query), as on the grid path
            TN, M = T * self.num_patches, packed.per_sample
            idx = (packed.rows - packed.sample * TN).view(B, M)          # [B, M] ascending
            pos_flat = pos.reshape(TN, Dd)
            pos_q = pos_flat[idx]                                         # [B, M, D']
            pos_k = pos_flat.unsqueeze(0).expand(B, TN, Dd)
            vis = latent.reshape(B, TN, Dd)
            slots = idx.unsqueeze(-1).expand(B, M, Dd)
            x = self.mask_query.expand(B, M, Dd)
            for blk in self.regressor:
                # keys in the promoted dtype, as torch.cat / torch.where give the other paths
                # (under autocast the latents are bf16 / fp16 and the queries fp32)
                dt = torch.promote_types(vis.dtype, x.dtype)
                x = run_block(blk, x, vis.to(dt).scatter(1, slots, x.to(dt)), pos_q, pos_k,
                              checkpointed=self.grad_checkpointing)
            return self.regressor_norm(x).reshape(B * M, Dd)
        pos_q = select_pos(pos, info, masked=True).reshape(B, -1, Dd)  # [B, Lq, D']
        if info.is_tube:
            Lq = pos_q.shape[1]
            pos_v = select_pos(pos, info, masked=False).reshape(B, -1, Dd)
            vis = latent.reshape(B, -1, Dd)
            x = self.mask_query.expand(B, Lq, Dd)
            pos_k = torch.cat([pos_v, pos_q], dim=1)
            for blk in self.regressor:
                x = run_block(blk, x, torch.cat([vis, x], dim=1), pos_q, pos_k,
                              checkpointed=self.grad_checkpointing)
            x = self.regressor_norm(x)
            return x.reshape(B, T, -1, Dd)
        # grid: one key per position -- the visible latent where visible, else the query
        m = info.mask.reshape(B, -1, 1)
        vis = latent.reshape(B, -1, Dd)
        x = self.mask_query.expand(B, m.shape[1], Dd)
        for blk in self.regressor:
            x = run_block(blk, x, torch.where(m, x, vis), pos_q, pos_q, checkpointed=self.grad_checkpointing)
        x = self.regressor_norm(x)
        return x.reshape(B, T, -1, Dd)

    # -- targets ---------------------------------------------------------------------------
    def motion_clip(self, clip: Tensor) -> Tensor:
        """The clip whose adjacent-frame differences are the RGB-difference target (Eq. 3).

        ``motion_space="raw"`` (default; Sec. 2.2 "difference of the raw RGB values"): the
        normalized clip ``n = (x - mean) / std`` scaled back per channel, ``n * std``; its frame
        differences equal those of the raw [0, 1] clip ``x = n * std + mean`` exactly (the mean
        cancels), without the offset's rounding in low precision. ``"normalized"``: the clip
        as the model sees it (differences of normalized pixels, ~1/std^2 = ~19.6x the raw MSE)."""
        if self.motion_space == "normalized":
            return clip
        return clip * self.pixel_std.to(clip.dtype).view(1, 1, -1, 1, 1)

    def masked_patch_mse(self, pred: Tensor, target: Tensor, info: MaskInfo, skip_first_frame: bool,
                         rows: Optional[Tensor] = None) -> Tensor:
        """Per-patch MSE (mean over the patch's values), averaged over the masked patches
        (frames ``t >= 1`` only when ``skip_first_frame``, as Eq. 3).

        pred: ``[B, T, Nm, Dp]`` (tube), ``[B, T, N, Dp]`` (grid; masked slots read), or
        ``[M, Dp]`` for the flat token ``rows [M]`` (packed path);
        target: full-grid ``[B, T, N, Dp]`` (a constant)."""
        target = target.detach()
        if rows is not None:
            B, T, N, Dp = target.shape
            err = ((pred.float() - target.reshape(-1, Dp).index_select(0, rows).float()) ** 2).mean(dim=-1)
            if not skip_first_frame:
                return err.mean() if err.numel() else pred.sum() * 0.0
            counted = (rows // N) % T > 0                                     # [M]
            return (err * counted).sum() / counted.sum().clamp(min=1)
        if info.is_tube:
            tgt = kernels.gather_tokens(target, info.mask_idx, backend=self.kernel_backend)  # [B, T, Nm, Dp]
            if skip_first_frame:
                pred, tgt = pred[:, 1:], tgt[:, 1:]
            if pred.numel() == 0:
                return pred.sum() * 0.0
            return ((pred.float() - tgt.float()) ** 2).mean(dim=-1).mean()
        sel = info.mask
        if skip_first_frame:
            sel = sel.clone()
            sel[:, 0] = False
        err = ((pred.float() - target.float()) ** 2).mean(dim=-1)          # [B, T, N]
        return (err * sel).sum() / sel.sum().clamp(min=1)

    @staticmethod
    def draw_order_labels(shape: tuple, device: torch.device,
                          generator: Optional[torch.Generator] = None) -> Tensor:
        """Clip-order labels ``{0, 1}`` (long) of the given shape, from ``generator`` (on its
        own device, then moved) or the global RNG of ``device``."""
        if generator is not None:
            return torch.randint(0, 2, shape, generator=generator, device=generator.device).to(device)
        return torch.randint(0, 2, shape, device=device)

    @staticmethod
    def shuffle_clips(x: Tensor, labels: Tensor) -> Tensor:
        """Split ``x [B, T, K, D]`` along time into clip 1 = frames ``[0, T//2)`` and clip 2 =
        frames ``[T//2, T)``; where ``labels [B, K]`` is 1 the tube becomes (clip 2, clip 1)
        (frame order inside a clip kept), where 0 it stays (clip 1, clip 2)."""
        h = x.shape[1] // 2
        swapped = torch.cat([x[:, h:], x[:, :h]], dim=1)
        return torch.where(labels[:, None, :, None].bool(), swapped, x)

    def clip_order_logits(self, pred_latent: Tensor, info: MaskInfo, labels: Tensor) -> Tensor:
        """Clip-order prediction (Sec. 2.2) -> logits ``[B, Nm, 2]`` over the two clip orders.

        At each masked tube ``j`` the regressed latents ``pred_latent[:, :, j]`` ``[B, T, Nm, D']``
        are cut into two clips along time and swapped where ``labels [B, Nm]`` is 1
        (:meth:`shuffle_clips`). Positions (time + space) are added *after* the shuffle, i.e.
        by the new frame index, so they carry nothing about the label (the paper's note on
        temporal leakage through the regressor's query positions still applies to the
        latents themselves).

        [CLS] placement: the decoder's divided blocks attend over time at each slot and over
        slots within each frame, so the learnable [CLS] (``motion_decoder.cls_token`` + the
        slot's spatial position, no temporal position) is inserted as an extra leading
        time step at every masked slot: the input is ``[B, 1 + T, Nm, D']``. Temporal
        attention lets each tube's [CLS] read all T (shuffled) frames of its own tube;
        spatial attention in that extra "frame" mixes only the [CLS] tokens of the sample's
        tubes, and the real frames never see a [CLS] except through their own tube's
        temporal attention. The decoder output at time step 0 goes through the motion head
        (``Linear(D', 2)``). The [CLS] reads its tube only through temporal attention; with
        ``model.temporal_fc=true`` (zero-initialized, TimeSformer) the very first step trains
        ``temporal_fc`` (and the [CLS] / spatial path) but sends no clip-order gradient
        into the regressor and encoder; from the second step on it does. Without it (the
        default) the gradient reaches them from the first step."""
        if not info.is_tube:
            raise ValueError("model.motion_target='clip_order' needs tube-like masks (mask.kind tube or "
                             "cube): every masked slot must be a whole tube over time")
        dec = self.motion_decoder
        B, T, Nm, Dd = pred_latent.shape
        pos = self.pos_to_decoder(self.pos_grid())                                  # [T, N, D']
        x = self.shuffle_clips(pred_latent, labels) + select_pos(pos, info, masked=True)
        pos_s = self.pos_to_decoder(self.pos_embed_space)[info.mask_idx]            # [B, Nm, D']
        cls = (dec.cls_token + pos_s).to(x.dtype)
        x = torch.cat([cls[:, None], x], dim=1)                                    # [B, 1 + T, Nm, D']
        feat = dec(x, None)[:, 0]                                                   # [B, Nm, D']
        return self.motion_head(feat)                                               # [B, Nm, 2]

    # -- forward ---------------------------------------------------------------------------
    # forward() reads as: check the inputs, encode the visible tokens, the alignment target,
    # the decoders' inputs (regressor), the decoders, then one loss term per task (Eq. 4).
    # Shapes: B clips, T frames, N patches a frame, Nv / Nm visible / masked slots a frame
    # (tube-like masks), M masked tokens of the batch (packed path), D / D' encoder / decoder
    # widths; grid (random / frame / cube masks) tensors keep all N slots.
    def forward(self, clip: Tensor, info: MaskInfo, codes: Optional[Tensor] = None,
                motion_target: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None,
                order_labels: Optional[Tensor] = None) -> dict:
        """Compute the MAM^2 losses.

        clip  ``[B, T, C, H, W]`` normalized frames; info: the mask;
        codes ``[B, T, N]`` appearance token ids (required when the appearance task is on
        with ``appearance_target="tokens"``; unused with ``"pixels"``);
        motion_target ``[B, T, N, P*P*2]`` flow target (required with
        ``motion_target="flow"``, e.g. ``targets.flow.FlowTarget``; unused otherwise);
        generator: draws the clip-order labels (``motion_target="clip_order"``; the global
        RNG when None); or pass them drawn already as ``order_labels [B, Nm]`` long in {0, 1}
        (e.g. ``MAM2.draw_order_labels``) -- a generator inside a ``torch.compile``d forward
        is a graph break, pre-drawn labels (or the global RNG) are not.
        Returns a dict with ``loss`` and its terms (``loss_app``, ``loss_motion``,
        ``loss_align``, weighted as Eq. 4) plus ``app_acc`` (token target) for logging;
        with clip order also ``order_acc`` and the drawn ``order_labels [B, Nm]``.
        """
        cfg = self.cfg
        clip_order = cfg.use_motion and self.motion_target == "clip_order"
        self._check_forward_inputs(clip, info, motion_target, clip_order)
        patches = self.embed_patches(clip)                                 # [B, T, N, D], shared
        latent, valid_vis = self.encode(clip, info, masked=False, patches=patches)  # [B, T, Nv|N, D]
        latent = self.encoder_to_decoder(latent)                           # [B, T, Nv|N, D']
        pos = self.pos_to_decoder(self.pos_grid())                         # [T, N, D']

        # packed decoders (random / frame masks, fused kernels): the regressor, decoders, heads
        # and losses work on the masked tokens only, [M, .] in info.segments(masked=True).rows
        # order, instead of the grid with the visible slots as padding
        packed_dec = self.regressor is not None and not info.is_tube and self.kernel_backend != "reference"
        align_target = self._alignment_target(clip, info, patches, packed_dec) if cfg.use_alignment else None
        dec = self._decoder_inputs(latent, info, valid_vis, pos, packed_dec)
        app_feat, motion_feat, first_block = self._run_decoders(dec, info, clip_order)

        out: dict = {}
        loss = clip.new_zeros(())
        if cfg.use_alignment:
            # regressed latents of masked tokens; without a regressor: first decoder block's
            r = dec.pred_latent if dec.pred_latent is not None else self._masked_view(first_block, info, dec.full_grid)
            out["loss_align"] = self._alignment_loss(r, align_target, info, packed_dec, dec.rows)
            loss = loss + cfg.align_weight * out["loss_align"]
        if cfg.use_appearance:
            out.update(self._appearance_loss(clip, info, codes, app_feat, dec.rows, packed_dec))
            loss = loss + out["loss_app"]
        if clip_order:
            out.update(self._clip_order_loss(clip, info, dec.pred_latent, generator, order_labels))
            loss = loss + out["loss_motion"]
        elif cfg.use_motion:
            out["loss_motion"] = self._motion_loss(clip, info, motion_feat, motion_target, dec.rows, packed_dec)
            loss = loss + out["loss_motion"]
        out["loss"] = loss
        return out

    def _check_forward_inputs(self, clip: Tensor, info: MaskInfo, motion_target: Optional[Tensor],
                              clip_order: bool) -> None:
        """Refuse what the motion task cannot use before anything runs: clip order needs
        tube-like masks, the flow target must be ``[B, T, N, P*P*2]``."""
        if clip_order and not info.is_tube:
            raise ValueError("model.motion_target='clip_order' needs tube-like masks (mask.kind tube or "
                             "cube): every masked slot must be a whole tube over time")
        if self.cfg.use_motion and self.motion_target == "flow":
            if motion_target is None:
                raise ValueError("model.motion_target='flow': forward() needs motion_target "
                                 "[B, T, N, P*P*2] (targets.flow.FlowTarget on the clip)")
            B, T = clip.shape[:2]
            want = (B, T, self.num_patches, self.patch_size * self.patch_size * 2)
            if tuple(motion_target.shape) != want:
                raise ValueError(f"motion_target (flow) must be {list(want)}, got {list(motion_target.shape)}")

    def _alignment_target(self, clip: Tensor, info: MaskInfo, patches: Tensor, packed_dec: bool) -> Tensor:
        """The encoder's latents of the masked tokens (no gradient), in decoder width:
        ``[M, D']`` (packed) or ``[B, T, Nm|N, D']``."""
        with torch.no_grad():
            if packed_dec:
                target = self.encode_packed(patches, info, masked=True)          # [M, D]
            else:
                target, _ = self.encode(clip, info, masked=True, patches=patches)  # [B, T, Nm|N, D]
            return self.encoder_to_decoder(target).detach()

    def _decoder_inputs(self, latent: Tensor, info: MaskInfo, valid_vis, pos: Tensor,
                        packed_dec: bool) -> DecoderInput:
        """The regressor's predicted latents of the masked tokens plus their positions, or
        (w/o regressor, Table 2) the visible latents and mask queries on the full grid.
        latent ``[B, T, Nv|N, D']``, pos ``[T, N, D']``."""
        valid_m = None if info.is_tube else info.mask
        Dd = self.decoder_dim
        if self.regressor is None:
            # w/o regressor (Table 2): decoders see visible latents and mask queries together
            B, T = latent.shape[:2]
            pos_full = pos.unsqueeze(0).expand(B, *pos.shape)
            full = self.mask_query.expand(B, T, self.num_patches, Dd)
            if info.is_tube:   # in the promoted dtype, as torch.where below (autocast: bf16 latents)
                dt = torch.promote_types(full.dtype, latent.dtype)
                full = full.to(dt).scatter(2, info.vis_idx[:, None, :, None].expand(B, T, -1, Dd), latent.to(dt))
            else:
                full = torch.where(info.mask.unsqueeze(-1), full, latent)
            return DecoderInput(full + pos_full, None, None, None, True)   # [B, T, N, D']
        if not packed_dec:
            pred_latent = self.regress(latent, info, valid_vis)        # [B, T, Nm|N, D']
            return DecoderInput(pred_latent + select_pos(pos, info, masked=True), valid_m, None,
                                pred_latent, False)
        # packed: the decoders run on the masked tokens only (varlen attention), not on the grid
        # with the visible slots as padding; so does the regressor when every sample has as many
        # masked tokens (random / frame masks do)
        T = latent.shape[1]
        dec_valid = info.segments(masked=True)
        dec_rows = dec_valid.rows                                   # [M]
        if dec_valid.per_sample is not None:
            pred_latent = self.regress(latent, info, valid_vis, packed=dec_valid)  # [M, D']
            dec_in = pred_latent + pos.reshape(-1, Dd)[dec_rows % (T * self.num_patches)]
        else:
            pred_latent = self.regress(latent, info, valid_vis)    # [B, T, N, D']
            dec_in = (pred_latent + pos).reshape(-1, Dd).index_select(0, dec_rows)  # [M, D']
        return DecoderInput(dec_in, dec_valid, dec_rows, pred_latent, False)

    def _masked_view(self, x: Tensor, info: MaskInfo, full_grid: bool) -> Tensor:
        """Decoder output on the full grid -> the masked token set (packed / regressed: already it)."""
        if not full_grid:
            return x
        return kernels.gather_tokens(x, info.mask_idx, backend=self.kernel_backend) if info.is_tube else x

    def _run_decoders(self, dec: DecoderInput, info: MaskInfo, clip_order: bool):
        """The appearance and motion decoders -> ``(app_feat, motion_feat, first_block)``, each
        ``[B, T, Nm|N, D']`` or ``[M, D']`` (or None); ``first_block``: the first decoder block's
        output (the alignment input without a regressor). Clip order decodes in its loss."""
        app_feat = motion_feat = first_block = None
        if self.appearance_decoder is not None:
            app_feat, first_block = self.appearance_decoder(dec.dec_in, dec.valid, return_first=True)
            app_feat = self._masked_view(app_feat, info, dec.full_grid)     # [B, T, Nm|N, D'] or [M, D']
            if self.cfg.coupled_decoder:
                motion_feat = app_feat
        if self.motion_decoder is not None and not clip_order:
            motion_feat, mfirst = self.motion_decoder(dec.dec_in, dec.valid, return_first=True)
            motion_feat = self._masked_view(motion_feat, info, dec.full_grid)
            if first_block is None:
                first_block = mfirst
        return app_feat, motion_feat, first_block

    def _alignment_loss(self, r: Tensor, align_target: Tensor, info: MaskInfo, packed_dec: bool,
                        dec_rows: Optional[Tensor]) -> Tensor:
        """Eq. 1: squared error of the predicted latents ``r`` to the encoder's (masked tokens)."""
        if packed_dec and r.dim() != 2:  # grid regressor (uneven counts) -> the masked rows
            r = r.reshape(-1, self.decoder_dim).index_select(0, dec_rows)   # [M, D']
        sq = (r.float() - align_target.float()) ** 2
        err = sq.sum(dim=-1) if self.cfg.align_reduction == "sum" else sq.mean(dim=-1)  # [B, T, Nm|N] or [M]
        if info.is_tube or packed_dec:
            return err.mean()
        return (err * info.mask).sum() / info.mask.sum().clamp(min=1)

    def _appearance_loss(self, clip: Tensor, info: MaskInfo, codes: Optional[Tensor], app_feat: Tensor,
                         dec_rows: Optional[Tensor], packed_dec: bool) -> dict:
        """``{"loss_app"}``: MSE to the per-patch normalized pixels, or (Eq. 2) the cross entropy
        over the tokenizer's codes ``[B, T, N]`` with ``app_acc``."""
        if self.appearance_target == "pixels":
            with torch.no_grad(), accel.autocast(clip.device, enabled=False):
                from mam2_fast.targets.pixel import pixel_target  # lazy: keep models independent of targets
                pix = pixel_target(clip, self.patch_size)                   # [B, T, N, P*P*C] float32
            return {"loss_app": self.masked_patch_mse(self.appearance_head(app_feat), pix, info,
                                                      skip_first_frame=False, rows=dec_rows)}
        if codes is None:
            raise ValueError("appearance task is on: forward() needs codes [B, T, N]")
        if self.appearance_head is None:
            raise RuntimeError("call set_vocab_size() before training the appearance head")
        if info.is_tube:
            B, T = clip.shape[:2]
            tgt = torch.gather(codes, 2, info.mask_idx[:, None, :].expand(B, T, -1))  # [B, T, Nm]
            feat = app_feat.reshape(-1, self.decoder_dim)
            tgt = tgt.reshape(-1)
        else:
            rows = info.segments(masked=True).rows                      # [M] (no data-dependent shape)
            feat = app_feat if packed_dec else app_feat.reshape(-1, self.decoder_dim).index_select(0, rows)
            tgt = codes.reshape(-1).index_select(0, rows)               # feat [M, D'], tgt [M]
        loss_app = kernels.linear_cross_entropy(feat, self.appearance_head.weight,
                                                self.appearance_head.bias, tgt, backend=self.kernel_backend)
        with torch.no_grad():
            acc = (self.appearance_head(feat.detach()[:4096]).argmax(-1) == tgt[:4096]).float().mean()
        return {"loss_app": loss_app, "app_acc": acc}

    def _clip_order_loss(self, clip: Tensor, info: MaskInfo, pred_latent: Tensor,
                         generator: Optional[torch.Generator], order_labels: Optional[Tensor]) -> dict:
        """Clip order (Sec. 2.2): labels ``[B, Nm]`` (given, or drawn from ``generator`` / the
        global RNG), the cross entropy of :meth:`clip_order_logits`; ``order_acc``, ``order_labels``."""
        if order_labels is None:
            labels = self.draw_order_labels(tuple(info.mask_idx.shape), clip.device, generator)  # [B, Nm]
        else:
            if tuple(order_labels.shape) != tuple(info.mask_idx.shape):
                raise ValueError(f"order_labels must be [B, Nm] = {list(info.mask_idx.shape)}, "
                                 f"got {list(order_labels.shape)}")
            labels = order_labels.to(device=clip.device, dtype=torch.long)
        logits = self.clip_order_logits(pred_latent, info, labels).float()       # [B, Nm, 2]
        loss_motion = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1))
        out = {}
        with torch.no_grad():
            out["order_acc"] = (logits.argmax(-1) == labels).float().mean()
        out["order_labels"] = labels
        out["loss_motion"] = loss_motion
        return out

    def _motion_loss(self, clip: Tensor, info: MaskInfo, motion_feat: Tensor, motion_target: Optional[Tensor],
                     dec_rows: Optional[Tensor], packed_dec: bool) -> Tensor:
        """The flow MSE or (Eq. 3) the RGB-difference MSE of the masked patches (frames t >= 1)."""
        pred = self.motion_head(motion_feat)                            # [B, T, Nm|N, P*P*(C|2)] or [M, .]
        if self.motion_target == "flow":
            return self.masked_patch_mse(pred, motion_target, info, skip_first_frame=True, rows=dec_rows)
        mclip = self.motion_clip(clip)                                  # raw: std-scaled clip
        if packed_dec:
            return kernels.rgb_diff_mse_packed(mclip, pred, dec_rows, self.patch_size, backend=self.kernel_backend)
        if info.is_tube:
            return kernels.rgb_diff_mse_tube(mclip, pred, info.mask_idx, self.patch_size,
                                             backend=self.kernel_backend)
        return ref.rgb_diff_mse_ref(mclip, pred, info.mask, self.patch_size)

    @torch.no_grad()
    def predict(self, clip: Tensor, info: MaskInfo) -> dict:
        """Predictions for visualization: ``app_logits`` (token target) or ``app_pixels``
        (pixel target), and ``rgb_diff`` / ``flow`` (motion target) or, for clip order,
        ``clip_order_logits [B, Nm, 2]`` of the unshuffled tubes (true class 0)."""
        cfg = self.cfg
        latent, valid_vis = self.encode(clip, info)
        latent = self.encoder_to_decoder(latent)
        res: dict = {}
        if self.regressor is None:
            raise NotImplementedError("predict() needs the regressor")
        pred_latent = self.regress(latent, info, valid_vis)
        dec_in = pred_latent + select_pos(self.pos_to_decoder(self.pos_grid()), info, True)
        valid = None if info.is_tube else info.mask
        app_key = "app_pixels" if self.appearance_target == "pixels" else "app_logits"
        motion_key = "flow" if self.motion_target == "flow" else "rgb_diff"
        if self.appearance_decoder is not None and self.appearance_head is not None:
            f = self.appearance_decoder(dec_in, valid)
            res[app_key] = self.appearance_head(f)
            if cfg.coupled_decoder and self.motion_head is not None:
                res[motion_key] = self.motion_head(f)
        if self.motion_decoder is not None:
            if self.motion_target == "clip_order":
                if info.is_tube:
                    labels = torch.zeros_like(info.mask_idx)
                    res["clip_order_logits"] = self.clip_order_logits(pred_latent, info, labels)
            else:
                res[motion_key] = self.motion_head(self.motion_decoder(dec_in, valid))
        return res


def build_model(cfg, vocab_size: Optional[int] = None, pixel_mean: Optional[tuple] = None,
                pixel_std: Optional[tuple] = None) -> MAM2:
    """``pixel_mean`` / ``pixel_std``: the data pipeline's normalization (``data.mean`` /
    ``data.std``; ImageNet's when None), used by the raw-RGB motion target."""
    model = MAM2(cfg, pixel_mean, pixel_std)
    if vocab_size is not None:
        model.set_vocab_size(vocab_size)
    return model


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms, biases, position embeddings and the mask query (any 1-D tensor)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.startswith("pos_embed") or name in ("mask_query", "mask_token") or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
