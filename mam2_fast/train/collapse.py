"""Representation-collapse monitor: how spread out the encoder's token features are.

Two measures of a token feature set ``x [..., D]`` (flattened to ``[M, D]`` rows):

* :func:`feature_spread` -- the standard deviation of each feature dimension across the
  tokens, averaged over the dimensions. A collapsed encoder (every token mapped to the same
  vector) gives 0.
* :func:`effective_rank` -- ``exp(H(p))`` with ``p`` the singular values of the (centered,
  by default) token matrix divided by their sum and ``H`` the Shannon entropy (Roy &
  Vetterli 2007). Between 1 (one direction, or none) and ``min(M, D)`` (all singular values
  equal). Computed on at most ``max_tokens`` rows taken at an even stride (no RNG, so the
  monitor never disturbs the training random stream).

Pre-training (``mam2_fast.pretrain``) reads the encoder's output on the visible tokens the
step already computes -- :class:`FeatureTap`, a forward hook on the encoder's final norm
armed only for the step that logs, so other steps pay nothing and nothing syncs with the
host between log steps -- and logs ``feat_std`` and ``feat_rank``.
:class:`CollapseWatch` warns when either falls steadily: ``patience`` log windows in a row
each lower than the one before and the value under ``ratio`` x its first logged value.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn


def _rows(x: Tensor) -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"token features must be [..., D], got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1]).float()


def subsample_rows(x: Tensor, max_tokens: int) -> Tensor:
    """At most ``max_tokens`` rows of ``x [M, D]``, evenly strided (deterministic)."""
    m = x.shape[0]
    if m <= max_tokens:
        return x
    idx = torch.linspace(0, m - 1, max_tokens, device=x.device).round().long()
    return x.index_select(0, idx)


@torch.no_grad()
def feature_spread(x: Tensor) -> Tensor:
    """Per-dimension standard deviation across tokens, averaged over dimensions (a 0-d tensor).
    ``x [..., D]``; population std (a single token gives 0)."""
    r = _rows(x)
    return r.std(dim=0, unbiased=False).mean()


@torch.no_grad()
def effective_rank(x: Tensor, max_tokens: int = 1024, center: bool = True, eps: float = 1e-12) -> Tensor:
    """``exp`` of the entropy of the normalized singular values of the token matrix (0-d tensor).

    ``x [..., D]``; at most ``max_tokens`` rows are used (:func:`subsample_rows`). With
    ``center`` the mean token is removed first, so a feature offset shared by every token
    (e.g. a LayerNorm bias) does not count as a direction. A set without spread (constant
    tokens, or all zeros) has effective rank 1."""
    raw = subsample_rows(_rows(x), max_tokens)
    r = raw - raw.mean(dim=0, keepdim=True) if center else raw
    s = torch.linalg.svdvals(r)
    total = s.sum()
    if not torch.isfinite(total):
        return total.new_tensor(float("nan"))
    # no spread left (up to rounding of the centering): one direction at most
    if s.max() <= 1e-5 * torch.linalg.norm(raw) + 1e-30:
        return total.new_tensor(1.0)
    p = s / total
    h = -(p * torch.log(p.clamp(min=eps))).sum()
    return torch.exp(h)


@torch.no_grad()
def collapse_stats(x: Tensor, max_tokens: int = 1024) -> dict:
    """``{"feat_std": float, "feat_rank": float}`` of token features ``x [..., D]`` (one host sync)."""
    r = _rows(x.detach())
    pair = torch.stack([feature_spread(r), effective_rank(r, max_tokens)]).cpu()
    return {"feat_std": float(pair[0]), "feat_rank": float(pair[1])}


def encoder_output_module(model: nn.Module) -> Optional[nn.Module]:
    """The module whose first call in a training forward is the encoder's output on the visible
    tokens: the encoder's final norm (``model.norm`` for MAM^2, ``model.encoder.norm`` for the
    VideoMAE baseline); None if the model has neither."""
    for path in ("norm", "encoder.norm"):
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if isinstance(m, nn.Module):
            return m
    return None


class FeatureTap:
    """Keeps the output of ``module``'s first call after :meth:`arm` (detached), then disarms.

    In MAM^2's forward the encoder's final norm runs first on the visible tokens, then (under
    ``no_grad``) on the masked tokens for the alignment target; the tap keeps the first.
    Unarmed the hook only checks a flag."""

    def __init__(self, module: nn.Module):
        self.armed = False
        self.value: Optional[Tensor] = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):  # noqa: ARG002
        if self.armed:
            self.armed = False
            self.value = output.detach()

    def arm(self) -> None:
        self.armed, self.value = True, None

    def take(self) -> Optional[Tensor]:
        v, self.value, self.armed = self.value, None, False
        return v

    def remove(self) -> None:
        self._handle.remove()


class CollapseWatch:
    """Warns when a monitored value falls steadily relative to its first logged value.

    ``update(name, value)`` returns a warning string when the value has fallen in each of the
    last ``patience`` log windows and stands below ``ratio`` x its first value; after a
    warning the next one for that name needs a further fall to ``ratio`` x the last warned
    value (no warning every window)."""

    def __init__(self, patience: int = 3, ratio: float = 0.7):
        self.patience, self.ratio = patience, ratio
        self.first: dict = {}
        self.prev: dict = {}
        self.streak: dict = {}
        self.warn_below: dict = {}

    def update(self, name: str, value: float) -> Optional[str]:
        if value is None or not math.isfinite(value):
            return None
        if name not in self.first:
            self.first[name] = value
            self.prev[name] = value
            self.streak[name] = 0
            self.warn_below[name] = self.ratio * value
            return None
        self.streak[name] = self.streak[name] + 1 if value < self.prev[name] else 0
        self.prev[name] = value
        if self.streak[name] >= self.patience and value < self.warn_below[name]:
            self.warn_below[name] = self.ratio * value
            first = self.first[name]
            return (f"possible representation collapse: {name} fell {self.streak[name]} log windows in a row, "
                    f"now {value:.4g} = {value / first:.2f} x its first value {first:.4g}")
        return None
