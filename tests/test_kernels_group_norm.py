"""Parity: fused GroupNorm (+ SiLU) of the tokenizer's encoder vs ``reference.group_norm_silu_ref``.

CPU (Triton interpreter): fp32 vs the fp32 reference, rel. tol 1e-5; fp16 inputs / outputs vs a
float64 reference, rel. tol 5e-3. CUDA: VQGAN shapes in bf16 vs float64, rel. tol 1e-2 (one bf16
rounding of the output). Odd sizes: H*W not a power of two, one channel per group, batch 1,
a large mean against a small spread (the shifted statistics). Fresh inputs; seed in messages.
"""
from mam2_fast.kernels import _testing as kt  # sets TRITON_INTERPRET=1 without CUDA: keep first

import pytest
import torch

pytest.importorskip("triton")

from mam2_fast.kernels import group_norm as GN  # noqa: E402
from mam2_fast.kernels.reference import group_norm_silu_ref  # noqa: E402

if not kt.fused_kernels_interpretable(GN):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)

DEV = kt.DEVICE
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}

if kt.ON_CUDA:
    CASES = [  # N, C, H, W, G, silu, dtype, offset
        (32, 128, 56, 56, 32, True, torch.bfloat16, 0.0),
        (8, 512, 14, 14, 32, True, torch.bfloat16, 0.0),
        (4, 256, 28, 28, 32, False, torch.bfloat16, 0.0),
        (3, 64, 17, 13, 16, True, torch.float16, 5.0),
    ]
else:
    CASES = [
        (2, 8, 5, 7, 4, True, torch.float32, 0.0),     # H*W = 35
        (1, 6, 3, 3, 6, False, torch.float32, 0.0),    # one channel per group, batch 1
        (2, 4, 9, 9, 2, True, torch.float16, 0.0),
        (1, 8, 4, 6, 2, True, torch.float32, 50.0),    # mean 50, std 1: shifted statistics
        (1, 16, 40, 40, 4, True, torch.float32, 0.0),  # spans of 6400 values: several stats blocks
    ]


@pytest.mark.parametrize("N,C,H,W,G,silu,dtype,offset", CASES)
def test_parity(N, C, H, W, G, silu, dtype, offset):
    seed = kt.fresh_seed()
    x = (torch.randn(N, C, H, W, device=DEV) * 2 + offset).to(dtype)
    w = torch.randn(C, device=DEV)
    b = torch.randn(C, device=DEV)
    y = GN.group_norm_silu_fused(x, G, w, b, 1e-6, silu)
    ref_dtype = torch.float32 if dtype == torch.float32 and not kt.ON_CUDA else torch.float64
    want = group_norm_silu_ref(x.to(ref_dtype), G, w.to(ref_dtype), b.to(ref_dtype), 1e-6, silu)
    assert y.dtype == dtype and y.shape == x.shape
    kt.assert_close(f"gn N{N} C{C} {H}x{W} G{G} silu={silu} {dtype} offset {offset}", y, want, TOL[dtype], seed)


def test_out_dtype_and_the_check_can_fail():
    seed = kt.fresh_seed()
    x = torch.randn(2, 8, 6, 6, device=DEV)
    w, b = torch.randn(8, device=DEV), torch.randn(8, device=DEV)
    y = GN.group_norm_silu_fused(x, 4, w, b, out_dtype=torch.float16)
    assert y.dtype == torch.float16
    kt.assert_close("out_dtype fp16", y, group_norm_silu_ref(x, 4, w, b), 5e-3, seed)
    # the comparison can fail: a wrong grouping is detected. The channels get different means
    # (0..7) so 2- and 4-channel group statistics are far apart; on plain randn the gap fell below
    # 1e-2 about one draw in 12,500 (seed 4022: 9.9e-3); with the offsets the smallest of 1e5 is 7.5e-2
    xs = x + torch.arange(8, device=DEV, dtype=x.dtype).view(1, 8, 1, 1)
    wrong = GN.group_norm_silu_fused(xs, 2, w, b)           # other grouping: far off
    assert kt.rel_err(wrong, group_norm_silu_ref(xs, 4, w, b)) > 1e-2, f"seed {seed}"


def test_bad_inputs_raise():
    x = torch.randn(2, 8, 4, 4, device=DEV)
    w, b = torch.ones(8, device=DEV), torch.zeros(8, device=DEV)
    with pytest.raises(ValueError, match="groups"):
        GN.group_norm_silu_fused(x, 3, w, b)
    with pytest.raises(ValueError, match="contiguous"):
        GN.group_norm_silu_fused(x.to(memory_format=torch.channels_last), 4, w, b)
    with pytest.raises(ValueError, match=r"\[C\]"):
        GN.group_norm_silu_fused(x, 4, w[:4], b)
    with pytest.raises(RuntimeError, match="forward only"):
        GN.group_norm_silu_fused(x.requires_grad_(True), 4, w, b)


def test_vqgan_encoder_with_the_fused_norm_matches(monkeypatch):
    """The switch ``tokenizer.fused_norm``: a small taming encoder (res blocks, attention block,
    output norm) gives the same latents fused and unfused."""
    from mam2_fast.targets.vqgan import VQGANTokenizer
    seed = kt.fresh_seed()
    spec = {"quantizer": "vq", "n_embed": 16, "embed_dim": 8,
            "ddconfig": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                         "resolution": 16, "z_channels": 8, "in_channels": 3}}
    tok = VQGANTokenizer(spec, patch_size=8, dtype="float32").to(DEV)
    for p in tok.parameters():            # non-trivial norm affine parameters
        p.data.normal_(0, 0.2) if p.dim() == 1 else None
    x = torch.rand(2, 3, 16, 16, device=DEV) * 2 - 1
    calls = []
    real = GN.group_norm_silu_fused
    monkeypatch.setattr(GN, "group_norm_silu_fused", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    with torch.no_grad():
        plain = tok.encoder(x)
        tok.set_fused_norm(True)
        fused = tok.encoder(x)
        tok.set_fused_norm(False)
        again = tok.encoder(x)
    assert torch.equal(plain, again)
    kt.assert_close("fused-norm VQGAN latents", fused, plain, 1e-4 if not kt.ON_CUDA else 1e-3, seed)
    # the fused kernel ran for every norm of the encoder (2 res blocks x 2, 1 + 2 + 2 in mid, out)
    n_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in tok.encoder.modules())
    assert len(calls) == n_norms, (len(calls), n_norms)
