"""VideoMAE baseline model (mam2_fast.models.videomae): shapes, masks, target, loss, parity."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from mam2_fast.models.videomae import (VideoMAE, flat_index, gather_rows, sinusoid_table, videomae_config,
                                       videomae_pixel_target)
from mam2_fast.targets.pixel import pixel_target


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw):
    base = dict(img_size=32, num_frames=4, embed_dim=32, depth=2, num_heads=2, decoder_dim=16,
                decoder_depth=1, decoder_heads=2, mask_ratio=0.5)
    return videomae_config("base", **{**base, **kw})


def test_mask_counts_and_shapes():
    cfg = videomae_config("base")  # ViT-B, 16x224, ratio 0.9
    from mam2_fast.models.videomae import tube_mask_generator

    info = tube_mask_generator(cfg)(3, torch.Generator().manual_seed(0))
    assert info.mask.shape == (3, 8, 196)
    assert (info.mask.sum(-1) == 176).all()               # int(0.9 * 196), every slice
    assert (info.mask == info.mask[:, :1]).all()           # tube: same slots in every slice
    assert info.vis_idx.shape == (3, 20) and info.mask_idx.shape == (3, 176)

    c = tiny()
    model = VideoMAE(c)
    B = 2
    info = model.mask_generator()(B, torch.Generator().manual_seed(0))
    clip = torch.randn(B, c.num_frames, 3, c.img_size, c.img_size)
    pred = model.predict(clip, info)
    nm = int(0.5 * 4)  # 2x2 grid, ratio 0.5
    assert pred.shape == (B, c.slices * nm, 2 * 16 * 16 * 3)
    assert model.target(clip, info).shape == pred.shape


def test_gather_order_matches_boolean_indexing():
    c = tiny()
    info = VideoMAE(c).mask_generator()(3, torch.Generator().manual_seed(2))
    x = torch.randn(3, c.slices * 4, 5)
    m = info.mask.flatten(1)
    vis = flat_index(info.vis_idx, c.slices, 4)
    msk = flat_index(info.mask_idx, c.slices, 4)
    assert torch.equal(gather_rows(x, vis), x[~m].reshape(3, -1, 5))
    assert torch.equal(gather_rows(x, msk), x[m].reshape(3, -1, 5))


def hand_target(clip, mean, std, tub=2, P=16):
    """Per tubelet, per channel normalization by explicit loops (VideoMAE's engine)."""
    B, T, C, H, W = clip.shape
    x = clip.double() * torch.tensor(std, dtype=torch.float64).view(1, 1, C, 1, 1) \
        + torch.tensor(mean, dtype=torch.float64).view(1, 1, C, 1, 1)
    rows = []
    for b in range(B):
        r = []
        for t in range(T // tub):
            for i in range(H // P):
                for j in range(W // P):
                    cube = x[b, t * tub:(t + 1) * tub, :, i * P:(i + 1) * P, j * P:(j + 1) * P]  # [tub, C, P, P]
                    cube = cube.permute(0, 2, 3, 1).reshape(-1, C)  # (t, ph, pw) x c
                    cube = (cube - cube.mean(0)) / (cube.std(0, unbiased=True) + 1e-6)
                    r.append(cube.reshape(-1))
        rows.append(torch.stack(r))
    return torch.stack(rows)


def test_target_and_loss_equal_hand_computation():
    c = tiny()
    torch.manual_seed(0)
    model = VideoMAE(c)
    B = 2
    clip = torch.randn(B, c.num_frames, 3, c.img_size, c.img_size)
    info = model.mask_generator()(B, torch.Generator().manual_seed(3))
    tgt = hand_target(clip, c.mean, c.std)
    full = videomae_pixel_target(clip, 2, 16, True, c.mean, c.std)
    torch.testing.assert_close(full.double(), tgt, rtol=1e-4, atol=1e-4)
    m = info.mask.flatten(1)
    labels = tgt[m].reshape(B, -1, tgt.shape[-1])
    pred = model.predict(clip, info)
    expected = ((pred.detach().double() - labels) ** 2).mean()
    loss = model(clip, info)["loss"]
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_tubelet_one_equals_pixel_target():
    clip = torch.randn(2, 3, 3, 32, 48)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    ours = videomae_pixel_target(clip, 1, 16, True, mean, std)
    ref = pixel_target(clip, 16, True, "videomae", mean, std).reshape(2, -1, 16 * 16 * 3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_sinusoid_table_matches_official_formula():
    n, d = 7, 10
    table = np.array([[pos / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for pos in range(n)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    torch.testing.assert_close(sinusoid_table(n, d)[0], torch.tensor(table, dtype=torch.float32))


def test_sdpa_attention_equals_explicit_attention():
    from mam2_fast.models.videomae import Attention

    torch.manual_seed(0)
    att = Attention(32, 4)
    torch.nn.init.normal_(att.q_bias)
    torch.nn.init.normal_(att.v_bias)
    x = torch.randn(2, 9, 32)
    B, N, C = x.shape
    bias = torch.cat((att.q_bias, torch.zeros_like(att.v_bias), att.v_bias))
    qkv = torch.nn.functional.linear(x, att.qkv.weight, bias).reshape(B, N, 3, 4, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (8 ** -0.5), qkv[1], qkv[2]
    ref = att.proj(((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1))
    torch.testing.assert_close(att(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not os.environ.get("VIDEOMAE_REPO"), reason="set VIDEOMAE_REPO to a MCG-NJU/VideoMAE checkout")
def test_parity_with_official_code():
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_videomae.py"
    spec = importlib.util.spec_from_file_location("bench_videomae", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mod = bench.load_official(os.environ["VIDEOMAE_REPO"])
    cfg = videomae_config("base", img_size=32, embed_dim=32, depth=2, num_heads=2, decoder_dim=16,
                          decoder_depth=1, decoder_heads=2)  # 16 frames: the official PatchEmbed fixes it
    res = bench.parity(mod, cfg, torch.device("cpu"))
    assert res["loss_rel_err"] < 1e-6 and res["worst_grad_rel_err"] < 1e-4
