"""Collapse monitor math (train/collapse.py): feature spread, effective rank, the tap and the warning."""
import math

import pytest
import torch
from torch import nn

from mam2_fast.train.collapse import (CollapseWatch, FeatureTap, collapse_stats, effective_rank,
                                      encoder_output_module, feature_spread, subsample_rows)


def test_constant_features_have_no_spread_and_rank_one():
    x = torch.randn(1, 32).expand(500, 32).clone()            # every token the same vector
    assert feature_spread(x).item() == pytest.approx(0.0, abs=1e-6)
    assert effective_rank(x).item() == pytest.approx(1.0)
    assert effective_rank(x, center=False).item() == pytest.approx(1.0, abs=1e-3)   # one direction
    assert effective_rank(torch.zeros(64, 16)).item() == 1.0


def test_gaussian_features_are_near_full_rank_and_unit_spread():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g)
    assert feature_spread(x).item() == pytest.approx(1.0, abs=0.03)
    r = effective_rank(x, max_tokens=4096).item()
    assert 0.9 * 64 < r <= 64


def test_rank_counts_directions_and_ignores_a_shared_offset():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(48, 48, generator=g))[0][:, :4]      # 4 orthonormal directions
    coef = torch.randn(2000, 4, generator=g)
    coef = coef / coef.std(dim=0)                                            # equal energy per direction
    x = coef @ basis.T                                                       # [2000, 48], rank 4
    r = effective_rank(x, max_tokens=2000).item()
    assert 3.6 < r < 4.05
    offset = 10.0 * torch.randn(48, generator=g)                             # e.g. a LayerNorm bias
    assert effective_rank(x + offset, max_tokens=2000).item() == pytest.approx(r, rel=1e-3)
    assert effective_rank(x + offset, max_tokens=2000, center=False).item() < 2.0   # uncentered: the offset dominates
    assert feature_spread(x + offset).item() == pytest.approx(feature_spread(x).item(), rel=1e-4)


def test_shapes_subsample_and_stats_dict():
    x = torch.randn(2, 8, 36, 16)                                            # [B, T, N, D]
    assert subsample_rows(x.reshape(-1, 16), 100).shape == (100, 16)
    assert subsample_rows(x.reshape(-1, 16), 10_000).shape == (576, 16)
    s = collapse_stats(x, max_tokens=256)
    assert set(s) == {"feat_std", "feat_rank"} and all(isinstance(v, float) for v in s.values())
    assert s["feat_rank"] <= 16
    with pytest.raises(ValueError):
        feature_spread(torch.randn(5))


def test_tap_keeps_the_first_call_after_arm_only():
    norm = nn.LayerNorm(8)
    tap = FeatureTap(norm)
    norm(torch.randn(3, 8))
    assert tap.take() is None                                                # unarmed: nothing kept
    tap.arm()
    a, b = torch.randn(4, 8), torch.randn(5, 8)
    first = norm(a)
    norm(b)                                                                  # e.g. the alignment-target pass
    got = tap.take()
    assert got is not None and got.shape == (4, 8) and torch.equal(got, first.detach())
    assert not got.requires_grad
    assert tap.take() is None
    tap.remove()
    tap.arm()
    norm(a)
    assert tap.take() is None                                                # hook removed


def test_encoder_output_module_finds_mam2_and_videomae_norms():
    from mam2_fast.config import ModelConfig
    from mam2_fast.models.mam2 import build_model
    m = build_model(ModelConfig(preset="tiny", img_size=32, num_frames=2, embed_dim=32, depth=1, num_heads=2,
                                regressor_depth=1, appearance_depth=1, motion_depth=1), vocab_size=8)
    assert encoder_output_module(m) is m.norm

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Module()
            self.encoder.norm = nn.LayerNorm(4)
    w = Wrapped()
    assert encoder_output_module(w) is w.encoder.norm
    assert encoder_output_module(nn.Linear(2, 2)) is None


def test_watch_warns_on_a_steady_fall_only():
    w = CollapseWatch(patience=3, ratio=0.7)
    assert w.update("feat_rank", 50.0) is None
    # noisy but not falling steadily: no warning
    for v in (48, 51, 47, 49, 46, 50):
        assert w.update("feat_rank", float(v)) is None
    w = CollapseWatch(patience=3, ratio=0.7)
    msgs = [w.update("feat_rank", v) for v in (50.0, 45.0, 40.0, 36.0, 33.0, 31.0, 30.5)]
    assert msgs[:4] == [None] * 4                                            # 36 > 0.7 * 50
    assert msgs[4] is not None and "feat_rank" in msgs[4] and "0.66" in msgs[4]
    assert msgs[5] is None and msgs[6] is None                               # not again until 0.7 x 33
    assert w.update("feat_rank", float("nan")) is None
