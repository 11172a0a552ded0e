"""Pixel target (per-patch normalized pixels) and optical-flow target (RAFT via torchvision)."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from mam2_fast.kernels.reference import patchify, rgb_diff_target_ref, unpatchify
from mam2_fast.targets.flow import FlowTarget, flow_patches, load_raft
from mam2_fast.targets.pixel import PixelTarget, pixel_target


def _torchvision_ok() -> bool:
    try:
        importlib.import_module("torchvision.models.optical_flow")
        return True
    except Exception:
        return False


HAS_TV = _torchvision_ok()


# ----------------------------------------------------------------------------------------
# pixel target
# ----------------------------------------------------------------------------------------
def test_pixel_target_unnormalized_is_patchify():
    clip = torch.randn(2, 3, 3, 8, 12)
    t = pixel_target(clip, 4, normalize=False)
    assert t.shape == (2, 3, 6, 4 * 4 * 3)
    assert torch.equal(t, patchify(clip, 4))
    assert torch.equal(unpatchify(t, 4, 3, 2, 3), clip)
    # (ph, pw, c) order: value of pixel (y=1, x=2) channel 1 of patch 0 sits at (1*4+2)*3+1
    assert t[0, 0, 0, (1 * 4 + 2) * 3 + 1] == clip[0, 0, 1, 1, 2]


def test_pixel_target_videomae_norm():
    clip = torch.rand(1, 2, 3, 8, 8) * 3 + 1
    t = pixel_target(clip, 4)  # videomae: per patch, per channel, unbiased std
    q = t.reshape(1, 2, 4, 16, 3)
    assert torch.allclose(q.mean(dim=-2), torch.zeros(1, 2, 4, 3), atol=1e-5)
    assert torch.allclose(q.std(dim=-2), torch.ones(1, 2, 4, 3), atol=1e-4)
    # VideoMAE formula on the same data
    p = patchify(clip, 4).reshape(1, 2, 4, 16, 3)
    ref = (p - p.mean(dim=-2, keepdim=True)) / (p.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    assert torch.allclose(t, ref.reshape(1, 2, 4, 48), atol=1e-6)
    # per-channel affine (ImageNet normalization) does not change the videomae target
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normed = (clip - torch.tensor(mean).view(1, 1, 3, 1, 1)) / torch.tensor(std).view(1, 1, 3, 1, 1)
    assert torch.allclose(pixel_target(normed, 4, mean=mean, std=std), t, atol=1e-4)


def test_pixel_target_mae_norm_and_module():
    clip = torch.rand(2, 1, 3, 8, 8)
    t = pixel_target(clip, 4, norm_mode="mae")
    assert torch.allclose(t.mean(dim=-1), torch.zeros(2, 1, 4), atol=1e-5)
    assert torch.allclose(t.var(dim=-1, unbiased=False), torch.ones(2, 1, 4), atol=1e-3)
    p = patchify(clip, 4)
    ref = (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True, unbiased=False) + 1e-6) ** 0.5
    assert torch.allclose(t, ref, atol=1e-6)
    m = PixelTarget(4, normalize=True, norm_mode="mae")
    assert torch.equal(m(clip), t)
    assert torch.equal(PixelTarget(4, normalize=False)(clip), p)
    flat = torch.full((1, 1, 3, 4, 4), 0.7)  # constant patch: finite (zero) target
    assert torch.isfinite(pixel_target(flat, 4)).all() and torch.isfinite(pixel_target(flat, 4, norm_mode="mae")).all()
    with pytest.raises(ValueError, match="norm_mode"):
        pixel_target(clip, 4, norm_mode="bad")
    with pytest.raises(ValueError, match="not divisible"):
        pixel_target(torch.rand(1, 1, 3, 6, 8), 4)


# ----------------------------------------------------------------------------------------
# flow target
# ----------------------------------------------------------------------------------------
class _DiffFlow(nn.Module):
    """Fake flow network: u = mean over channels of (img2 - img1), v = -u; checks RAFT's input
    contract (range [-1, 1], size divisible by 8) and returns a list of iterates like RAFT."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, a, b):
        assert a.shape == b.shape and a.shape[-1] % 8 == 0 and a.shape[-2] % 8 == 0
        assert float(a.min()) >= -1 and float(a.max()) <= 1
        self.calls.append(a.shape[0])
        d = (b - a).mean(dim=1, keepdim=True)
        return [torch.zeros_like(torch.cat([d, -d], 1)), torch.cat([d, -d], 1)]


def test_flow_target_convention_with_fake_model():
    frames = torch.rand(2, 4, 3, 16, 16)
    net = _DiffFlow()
    ft = FlowTarget(patch=8, model=net, chunk_pairs=4)
    out = ft(frames)
    assert out.shape == (2, 4, 4, 8 * 8 * 2) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))  # frame 0: no target
    assert net.calls == [4, 2]  # B*(T-1) = 6 pairs in chunks of 4
    assert not out.is_inference()  # usable as an MSE target under autograd
    pred = torch.zeros_like(out, requires_grad=True)
    torch.nn.functional.mse_loss(pred, out).backward()
    # frame t holds the flow from t-1 to t: here 2*(mean_c x_t - mean_c x_{t-1}) in channel u
    d = 2 * (frames[:, 1:] - frames[:, :-1]).mean(dim=2, keepdim=True)
    want = flow_patches(torch.cat([d, -d], dim=2), 8)
    assert torch.allclose(out, want, atol=1e-6)
    # same layout as the rgb-diff target: channel u of flow == the mean-channel rgb diff * 2
    rgb = rgb_diff_target_ref(frames.mean(dim=2, keepdim=True), 8)
    assert torch.allclose(out[..., 0::2], 2 * rgb, atol=1e-6)
    assert torch.allclose(out[..., 1::2], -2 * rgb, atol=1e-6)


def test_flow_target_pads_to_multiple_of_8_and_scales():
    frames = torch.rand(1, 3, 3, 12, 20)  # 12 and 20 are not multiples of 8
    out = FlowTarget(patch=4, model=_DiffFlow(), flow_scale=0.25)(frames)
    assert out.shape == (1, 3, 15, 32)
    ref = FlowTarget(patch=4, model=_DiffFlow())(frames)
    assert torch.allclose(out, ref * 0.25)
    one = FlowTarget(patch=4, model=_DiffFlow())(frames[:, :1])
    assert one.shape == (1, 1, 15, 32) and not one.any()
    with pytest.raises(ValueError, match="not divisible"):
        FlowTarget(patch=8, model=_DiffFlow())(frames)


def test_flow_target_errors(tmp_path):
    with pytest.raises(ValueError, match="no path was given"):
        FlowTarget(patch=16)
    with pytest.raises(ValueError, match="no path was given"):
        load_raft(None)
    with pytest.raises(FileNotFoundError, match="raft_missing.pth"):
        FlowTarget(patch=16, weights_path=str(tmp_path / "raft_missing.pth"))
    weights = tmp_path / "raft.pth"
    torch.save({"x": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match="unknown RAFT variant"):
        load_raft(str(weights), variant="raft_huge")
    if not HAS_TV:
        with pytest.raises(ImportError, match="torchvision"):
            FlowTarget(patch=16, weights_path=str(weights))
    else:
        with pytest.raises(ValueError, match="does not match torchvision"):
            FlowTarget(patch=16, weights_path=str(weights))


@pytest.mark.skipif(not HAS_TV, reason="torchvision (optical_flow) is not importable beside this torch")
def test_flow_target_raft_small_random_weights(tmp_path):
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    path = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), path)
    ft = FlowTarget(patch=16, weights_path=str(path), variant="raft_small", num_flow_updates=2)
    out = ft(torch.rand(1, 2, 3, 64, 64))
    assert out.shape == (1, 2, 16, 16 * 16 * 2) and torch.isfinite(out).all()
    assert not out[:, 0].any()
