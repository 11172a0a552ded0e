"""Appearance tokenizers: frames -> discrete code ids, one id per patch of the model grid.

Every tokenizer follows the :class:`Tokenizer` protocol. Input frames are float pixels in
``[0, 1]`` laid out ``[B, T, 3, H, W]``; output ids are ``[B, T, h, w]`` (long) where
``(h, w)`` equals the model's patch grid (14x14 for 224 input with 16-pixel patches).
A tokenizer maps its own input range itself (VQGAN expects [-1, 1], DALL-E 0.8x+0.1).

The default :class:`KMeansTokenizer` needs no downloaded weights: a k-means codebook over
normalized, pooled patch pixels, fitted on a sample of the training clips, saved with the
run (``state_dict``) and reloaded from it.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mam2_fast.train import accel


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int

    def tokenize(self, frames: Tensor) -> Tensor:
        """frames ``[B, T, 3, H, W]`` in [0, 1] -> ids ``[B, T, h, w]`` (long)."""
        ...

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(h, w)`` produced for a frame of the given size."""
        ...


class KMeansTokenizer(nn.Module):
    """Nearest-centroid codes of per-patch normalized, average-pooled pixels.

    Each ``patch x patch`` RGB patch is average-pooled to ``pool x pool``, flattened to
    ``pool*pool*3`` values and normalized to zero mean and unit norm over those values
    (with a small floor so flat patches stay well defined), keeping edges and texture while
    discarding brightness. Codes are the nearest of ``vocab_size`` k-means centroids.
    """

    def __init__(self, vocab_size: int = 64, patch_size: int = 16, pool: int = 4):
        super().__init__()
        if patch_size % pool:
            raise ValueError(f"kmeans tokenizer: patch_size {patch_size} not divisible by pool {pool}")
        self.vocab_size = int(vocab_size)
        self.patch_size = int(patch_size)
        self.pool = int(pool)
        self.register_buffer("codebook", torch.zeros(vocab_size, pool * pool * 3))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._known_fitted = False   # host copy of ``fitted`` once seen True (no per-call device sync)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def features(self, frames: Tensor) -> Tensor:
        """frames ``[B, T, 3, H, W]`` -> patch features ``[B, T, h, w, F]`` (float32)."""
        B, T, C, H, W = frames.shape
        if C != 3:
            raise ValueError(f"kmeans tokenizer expects 3-channel frames, got shape {tuple(frames.shape)}")
        h, w = self.grid_size(H, W)
        x = frames.reshape(B * T, C, H, W).float()
        x = F.adaptive_avg_pool2d(x[:, :, : h * self.patch_size, : w * self.patch_size], (h * self.pool, w * self.pool))
        x = x.reshape(B, T, C, h, self.pool, w, self.pool).permute(0, 1, 3, 5, 4, 6, 2)
        x = x.reshape(B, T, h, w, self.pool * self.pool * C)
        x = x - x.mean(dim=-1, keepdim=True)
        return x / x.norm(dim=-1, keepdim=True).clamp(min=0.05)

    @torch.no_grad()
    def fit(self, frames: Tensor, iters: int = 30, max_samples: int = 50_000, seed: int = 0) -> "KMeansTokenizer":
        """Fit the codebook by k-means++ initialization and Lloyd iterations."""
        feats = self.features(frames).reshape(-1, self.codebook.shape[1])
        g = torch.Generator().manual_seed(seed)
        if feats.shape[0] > max_samples:
            feats = feats[torch.randperm(feats.shape[0], generator=g)[:max_samples]]
        K = self.vocab_size
        if feats.shape[0] < K:
            raise ValueError(f"kmeans tokenizer: {feats.shape[0]} patches are too few for {K} codes")
        # k-means++ seeding
        centers = feats[torch.randint(feats.shape[0], (1,), generator=g)]
        d2 = torch.cdist(feats, centers).squeeze(1) ** 2
        for _ in range(1, K):
            probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / d2.numel())
            nxt = feats[torch.multinomial(probs, 1, generator=g)]
            centers = torch.cat([centers, nxt])
            d2 = torch.minimum(d2, (torch.cdist(feats, nxt).squeeze(1)) ** 2)
        for _ in range(iters):
            assign = torch.cdist(feats, centers).argmin(dim=1)
            sums = torch.zeros_like(centers).index_add_(0, assign, feats)
            counts = torch.bincount(assign, minlength=K).to(feats.dtype)
            empty = counts == 0
            centers = torch.where(empty[:, None], centers, sums / counts.clamp(min=1)[:, None])
        self.codebook.copy_(centers)
        self.fitted.fill_(True)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_fitted = False   # re-read ``fitted`` from the loaded state

    @torch.no_grad()
    def tokenize(self, frames: Tensor) -> Tensor:
        if not self._known_fitted:
            if not accel.host_bool(self.fitted, stand_in=True):   # read from the device once, not every step
                raise RuntimeError("kmeans tokenizer used before fit() or loading a fitted state")
            self._known_fitted = True
        feats = self.features(frames)  # [B, T, h, w, F]
        flat = feats.reshape(-1, feats.shape[-1])
        # nearest centroid by ||f||^2 - 2 f.c + ||c||^2 (||f||^2 is constant per row)
        cb = self.codebook.to(flat.dtype)
        scores = flat @ cb.t() * 2 - (cb * cb).sum(dim=1)[None]
        return scores.argmax(dim=1).reshape(feats.shape[:-1])


def build_tokenizer(cfg, patch_size: int) -> nn.Module:
    """Build the appearance target named by ``cfg.kind`` (a TokenizerConfig).

    ``kmeans`` (default, no download), ``vqgan`` (taming-transformers ``.ckpt`` in
    ``cfg.checkpoint``; architecture from ``cfg.checkpoint_config`` YAML, else ``cfg.preset``,
    else inferred from the checkpoint), ``dalle`` (OpenAI ``encoder.pkl`` in
    ``cfg.checkpoint``) -- all follow the :class:`Tokenizer` protocol with a token grid equal
    to the ``patch_size`` grid -- and ``pixel``, which returns a
    :class:`~mam2_fast.targets.pixel.PixelTarget` (a regression target: ``forward(clip)``
    gives per-patch normalized pixels, there is no ``tokenize``/``vocab_size``).
    Optional fields (read with defaults): ``resize_mode`` ("lanczos"), ``dtype``
    ("bfloat16"), ``chunk_frames`` (0 = all frames at once), ``pixel_norm`` (True),
    ``pixel_norm_mode`` ("videomae").
    """
    kind = getattr(cfg, "kind", "kmeans")
    if kind == "kmeans":
        return KMeansTokenizer(vocab_size=cfg.vocab_size, patch_size=patch_size, pool=cfg.kmeans_pool)
    if kind == "vqgan":
        from mam2_fast.targets.vqgan import build_vqgan_tokenizer

        return build_vqgan_tokenizer(cfg, patch_size)
    if kind == "dalle":
        from mam2_fast.targets.dalle import build_dalle_tokenizer

        return build_dalle_tokenizer(cfg, patch_size)
    if kind == "pixel":
        from mam2_fast.targets.pixel import PixelTarget

        return PixelTarget(patch_size, normalize=bool(getattr(cfg, "pixel_norm", True)),
                           norm_mode=getattr(cfg, "pixel_norm_mode", "videomae"))
    raise ValueError(f"tokenizer.kind: unknown tokenizer {kind!r} (known: 'kmeans', 'vqgan', 'dalle', 'pixel')")
