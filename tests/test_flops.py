"""The analytic FLOP count (mam2_fast.flops) equals the FLOPs torch's flop formulas measure.

Tolerance: the count must match the measured matmul/conv FLOPs exactly (rel. 1e-9), since
both count the same products. SDPA runs with the MATH backend during measurement: torch's
flop registry has no entry for the CPU flash-attention op, which would hide the
regressor's attention products from the measurement (not from the count).
"""
from __future__ import annotations

from mam2_fast.kernels import _testing  # noqa: F401  (TRITON_INTERPRET=1 without CUDA; before triton)

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mam2_fast.flops import (FlopCounter, config_without_data, mam2_step_flops, vqgan_frame_flops,
                             videomae_step_flops)
from mam2_fast.masking import MaskGenerator
from mam2_fast.models.mam2 import build_model
from mam2_fast.pretrain import demo_config_dict

TINY = ["model.img_size=32", "model.num_frames=4", "model.depth=2", "model.embed_dim=64", "model.num_heads=2",
        "model.regressor_depth=2", "model.appearance_depth=2", "model.motion_depth=1"]
REL = 1e-9


@pytest.fixture(autouse=True)
def _one_thread():
    # the CI/dev machines are small and shared: one intra-op thread is much faster there
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _measure_mam2(cfg, B: int = 2, K: int = 64) -> int:
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=K)
    mg = MaskGenerator(cfg.mask.kind, cfg.mask.ratio, cfg.model.num_frames, model.grid)
    info = mg(B, torch.Generator().manual_seed(0))
    m = cfg.model
    clip = torch.randn(B, m.num_frames, 3, m.img_size, m.img_size)
    codes = torch.randint(0, K, (B, m.num_frames, model.num_patches))
    kw = {}
    if m.motion_target == "flow":
        kw["motion_target"] = torch.randn(B, m.num_frames, model.num_patches, m.patch_size ** 2 * 2)
    with FlopCounter() as fc, sdpa_kernel(SDPBackend.MATH):
        out = model(clip, info, codes, **kw)
        out["loss"].backward()
    return fc.total


@pytest.mark.parametrize("extra", [
    [],                                        # tube mask, regressor, both decoders
    ["model.decoder_dim=32"],                  # projections to a narrower decoder
    ["mask.kind=random"],                      # full grid with validity masks
    ["mask.kind=frame"],
    ["model.use_regressor=false"],
    ["model.coupled_decoder=true"],
    ["model.use_alignment=false", "model.use_motion=false"],
    ["model.appearance_target=pixels"],        # VideoMAE-style pixel head, no tokenizer
    ["model.appearance_target=pixels", "mask.kind=random"],
    ["model.motion_target=flow", "model.flow_weights=raft.pth"],
])
def test_mam2_count_matches_measured(extra):
    cfg = config_without_data(None, TINY + extra, base=demo_config_dict())
    B = 2
    measured = _measure_mam2(cfg, B)
    sf = mam2_step_flops(cfg, batch=B, vocab_size=64, include_tokenizer=False)
    assert sf.total == pytest.approx(measured, rel=REL), sf.table()


def test_backward_is_twice_forward_for_trained_parts():
    cfg = config_without_data(None, TINY, base=demo_config_dict())
    sf = mam2_step_flops(cfg, batch=2, vocab_size=64, include_tokenizer=False)
    for t in sf.terms:
        if t.group == "trained" and t.name != "patch embed":
            assert t.bwd == 2 * t.fwd, t
        if t.group != "trained":
            assert t.bwd == 0, t
    assert sf.by_name()["patch embed"].bwd == sf.by_name()["patch embed"].fwd  # no clip gradient


def test_vqgan_count_matches_measured():
    from mam2_fast.targets.vqgan import VQGANTokenizer

    spec = dict(quantizer="vq", n_embed=128, embed_dim=16,
                ddconfig=dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16],
                              resolution=64, z_channels=16, double_z=False, in_channels=3))
    tok = VQGANTokenizer(spec, patch_size=None, dtype="float32")
    x = torch.rand(2, 3, 48, 48)  # not the config resolution: sizes follow the input
    with FlopCounter() as fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        tok.codes(x * 2 - 1)
    f = vqgan_frame_flops(spec, 48, 48)
    assert 2 * sum(f.values()) == pytest.approx(fc.total, rel=REL)
    assert f["attention"] > 0 and f["quantizer"] > 0


def test_vqgan_f16_per_frame_and_vit_totals():
    from mam2_fast.targets.vqgan import VQGAN_PRESETS

    f = vqgan_frame_flops(VQGAN_PRESETS["vqgan_imagenet_f16_16384"], 224, 224)
    assert 105e9 <= sum(f.values()) <= 108.5e9  # the 105-108 GFLOP per 224^2 frame
    base = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "configs" / "pretrain_base.yaml")
    sf = mam2_step_flops(config_without_data(base), batch=32)
    # issue's sanity figures: ~4.3 TFLOP with VQGAN, ~2.6 without (our count: 4.64 / 2.92,
    # see benchmarks/RESULTS.md for the breakdown of the difference)
    assert 4.0e12 < sf.per_clip() < 5.0e12
    assert 2.4e12 < sf.per_clip(sf.model) < 3.2e12
    assert sf.per_clip(sf.tokenizer) == pytest.approx(16 * sum(f.values()), rel=1e-9)


def test_kmeans_tokenizer_count():
    from mam2_fast.flops import tokenizer_flops
    from mam2_fast.targets.tokenizer import KMeansTokenizer

    cfg = config_without_data(None, TINY, base=demo_config_dict())
    tok = KMeansTokenizer(64, 16, 4)
    tok.fitted.fill_(True)
    frames = torch.rand(2, 4, 3, 32, 32)
    with FlopCounter() as fc:
        tok.tokenize(frames)
    notes: list = []
    counted = sum(tokenizer_flops(cfg.tokenizer, 2, 4, 32, 16, notes).values())
    assert counted == fc.total


def test_videomae_count_matches_measured():
    from mam2_fast.models.videomae import VideoMAE, videomae_config

    cfg = videomae_config("base", img_size=32, embed_dim=64, depth=2, num_heads=2, decoder_dim=32,
                          decoder_depth=2, decoder_heads=2)
    model = VideoMAE(cfg)
    info = model.mask_generator()(2, torch.Generator().manual_seed(0))
    clip = torch.randn(2, cfg.num_frames, 3, 32, 32)
    with FlopCounter() as fc, sdpa_kernel(SDPBackend.MATH):
        model(clip, info)["loss"].backward()
    assert videomae_step_flops(cfg, 2).total == pytest.approx(fc.total, rel=REL)


def test_flop_counter_agrees_with_flopcountermode():
    from torch.utils.flop_counter import FlopCounterMode

    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = torch.randn(5, 16)
    with FlopCounterMode(display=False) as ref:
        net(x).sum().backward()
    with FlopCounter() as ours:
        net(x).sum().backward()
    assert ours.total == ref.get_total_flops()


def test_packed_count_matches_fused_model_on_frame_masks():
    """kernels=fused runs frame masks packed. The flop counter sees every matmul of that run
    except the varlen attention products (Triton); add those from the drawn mask's actual
    per-frame / per-slot lengths and the total must equal ``packed=True`` exactly (frame masks
    have fixed lengths). Pixel head: the token head would be the fused Triton CE."""
    pytest.importorskip("triton")
    cfg = config_without_data(None, TINY + ["mask.kind=frame", "model.appearance_target=pixels",
                                            "model.kernels=fused"], base=demo_config_dict())
    B, m = 2, cfg.model
    torch.manual_seed(0)
    model = build_model(m)
    info = MaskGenerator("frame", cfg.mask.ratio, m.num_frames, model.grid)(B, torch.Generator().manual_seed(0))
    clip = torch.randn(B, m.num_frames, 3, m.img_size, m.img_size)
    with FlopCounter() as fc, sdpa_kernel(SDPBackend.MATH):
        model(clip, info)["loss"].backward()

    def varlen_attention(valid, depth, width):  # fwd + 2x bwd of QK^T and PV over the set
        per_frame, per_slot = valid.sum(dim=2).double(), valid.sum(dim=1).double()
        return 3 * depth * 4 * width * float((per_frame ** 2).sum() + (per_slot ** 2).sum())

    D = model.embed_dim
    attn = varlen_attention(~info.mask, m.depth, D)                       # encoder, trained
    attn += varlen_attention(info.mask, m.depth, D) / 3                   # alignment target, no grad
    attn += varlen_attention(info.mask, m.appearance_depth + m.motion_depth, model.decoder_dim)
    sf = mam2_step_flops(cfg, batch=B, include_tokenizer=False, packed=True)
    assert sf.total == pytest.approx(fc.total + attn, rel=REL), sf.table()
    grid = mam2_step_flops(cfg, batch=B, include_tokenizer=False)
    assert sf.total < grid.total


def test_packed_random_mask_lengths_match_sampled_masks():
    """E[sum L_t^2], E[sum L_n^2] of packed_set_sums vs the mean over 3000 drawn random masks."""
    from mam2_fast.flops import packed_set_sums

    T, N = 4, 15
    mg = MaskGenerator("random", 0.75, T, (3, 5))
    info = mg(3000, torch.Generator().manual_seed(0))
    for masked in (True, False):
        valid = info.mask if masked else ~info.mask
        tokens, sq_frames, sq_slots = packed_set_sums("random", 0.75, T, N, masked)
        assert tokens == int(valid[0].sum())
        got_frames = float((valid.sum(dim=2).double() ** 2).sum(dim=1).mean())
        got_slots = float((valid.sum(dim=1).double() ** 2).sum(dim=1).mean())
        assert got_frames == pytest.approx(sq_frames, rel=1e-2) and got_slots == pytest.approx(sq_slots, rel=1e-2)
    with pytest.raises(ValueError, match="not packed"):
        packed_set_sums("tube", 0.75, T, N, True)
