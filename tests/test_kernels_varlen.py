"""Parity: fused packed variable-length attention (``kernels/varlen.py``) vs
``reference.varlen_attention_ref``, and both vs the grid attention with validity masks.

CPU (Triton interpreter): fp32 vs fp32 reference, rel. tol 1e-5; fp16 vs a float64 reference,
rel. tol 5e-3. CUDA: bf16 2e-2 / fp16 5e-3 vs float64 at ViT shapes. Forward output and the
qkv gradient. Segments of random lengths incl. 0 and 1, with and without a row index (a
random permutation), odd head dims; masks whose visible counts differ per frame and per
sample. Fresh inputs each run; the clock seed is in every failure message.
"""
from mam2_fast.kernels import _testing as kt  # sets TRITON_INTERPRET=1 without CUDA: keep first

import pytest
import torch

pytest.importorskip("triton")

from mam2_fast.kernels import varlen_attention  # noqa: E402  (the dispatching function)
from mam2_fast.kernels.reference import factorized_attention_ref, varlen_attention_ref  # noqa: E402
from mam2_fast.masking import packed_segments  # noqa: E402
from mam2_fast.kernels import varlen as VA  # noqa: E402

if not kt.fused_kernels_interpretable(VA):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this module "
                "in its own process", allow_module_level=True)

DEV = kt.DEVICE
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _ref_dtype(dtype):
    return torch.float32 if (dtype == torch.float32 and not kt.ON_CUDA) else torch.float64


def check(qkv_base, view, cu, max_len, index, dtype, tag, seed):
    """Fused vs reference (forward and d qkv) on the packed qkv ``view(qkv_base)``."""
    out = varlen_attention(view(qkv_base), cu, max_len, index, backend="fused")
    go = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv_base, go)
    ref_base = qkv_base.detach().to(_ref_dtype(dtype)).requires_grad_(True)
    want = varlen_attention_ref(view(ref_base), cu, max_len, index)
    (g_ref,) = torch.autograd.grad(want, ref_base, go.to(want.dtype))
    kt.assert_close(f"out {tag}", out, want, TOL[dtype], seed)
    kt.assert_close(f"dqkv {tag}", g, g_ref, TOL[dtype], seed)


def random_segments(lengths, permute):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    ntok = int(cu[-1])
    index = torch.randperm(ntok).to(torch.int32).to(DEV) if permute else None
    return cu.to(DEV), ntok, index


CASES = [  # (segment lengths, H, dh, permute)
    ([5, 0, 1, 17, 3], 2, 32, False),
    ([5, 0, 1, 17, 3], 2, 32, True),
    ([33, 2, 40], 1, 24, True),      # > one block, odd head dim
    ([1], 3, 16, False),             # one token
    ([0, 0], 2, 32, False),          # all empty
    ([7] * 6, 2, 64, True),          # regular sets through the varlen path
    ([70, 3, 0, 65], 2, 16, True),   # max_seqlen > 64: the flash kernels
    ([64, 1, 0, 20], 3, 32, False),  # max_seqlen 64: the last length of the short kernels
]


@pytest.mark.parametrize("lengths,H,dh,permute", CASES)
def test_parity_segments(lengths, H, dh, permute):
    seed = kt.fresh_seed()
    cu, ntok, index = random_segments(lengths, permute)
    base = torch.randn(ntok, 3 * H * dh, device=DEV, requires_grad=True)
    view = lambda t: t.view(ntok, 3, H, dh)  # noqa: E731
    check(base, view, cu, max(lengths), index, torch.float32, f"lengths={lengths} H{H} dh{dh} perm={permute}", seed)


def test_parity_strided_qkv_and_fp16():
    """qkv with non-unit strides (packed [Ntok, H, 3, dh] storage permuted) in fp16."""
    seed = kt.fresh_seed()
    lengths, H, dh = [9, 4, 0, 12], 2, 32
    cu, ntok, index = random_segments(lengths, True)
    base = torch.randn(ntok, H, 3, dh, device=DEV, dtype=torch.float16, requires_grad=True)
    check(base, lambda t: t.permute(0, 2, 1, 3), cu, 12, index, torch.float16, "strided fp16", seed)


def test_max_seqlen_may_exceed_the_longest_segment():
    seed = kt.fresh_seed()
    cu, ntok, index = random_segments([3, 6], True)
    base = torch.randn(ntok, 3 * 2 * 32, device=DEV, requires_grad=True)
    check(base, lambda t: t.view(ntok, 3, 2, 32), cu, 40, index, torch.float32, "max_seqlen 40", seed)


@pytest.mark.parametrize("B,T,N", [(1, 3, 7), (2, 4, 13), (2, 1, 10)])
@pytest.mark.parametrize("mode", ["spatial", "temporal"])
def test_packed_masks_match_grid_attention(B, T, N, mode):
    """Packing the visible tokens of a random space-time mask and running varlen attention
    equals grid attention with validity masks at those tokens (both orders, fused and ref)."""
    seed = kt.fresh_seed()
    H, dh = 2, 32
    valid = torch.rand(B, T, N) < (torch.rand(B, T, 1) * 0.7 + 0.2)   # per-frame counts differ
    valid[0, 0, 0] = True
    seg = packed_segments(valid).to(DEV)
    valid = valid.to(DEV)
    grid = torch.randn(B, T, N, 3 * H * dh, device=DEV)
    want = factorized_attention_ref(grid.view(B, T, N, 3, H, dh), mode, valid).reshape(B * T * N, H * dh)[seg.rows]
    packed = grid.reshape(B * T * N, 3, H, dh)[seg.rows]                  # [Ntok, 3, H, dh]
    cu, mx, index = ((seg.spatial_cu, seg.spatial_max, None) if mode == "spatial"
                     else (seg.temporal_cu, seg.temporal_max, seg.temporal_index))
    for backend in ("reference", "fused"):
        got = varlen_attention(packed, cu, mx, index, backend=backend)
        kt.assert_close(f"{backend} {mode} B{B} T{T} N{N}", got, want, 1e-5, seed)


def test_packed_segments_layout():
    valid = torch.tensor([[[1, 0, 1], [0, 1, 1]]], dtype=torch.bool)      # B=1, T=2, N=3
    seg = packed_segments(valid)
    assert seg.rows.tolist() == [0, 2, 4, 5]
    assert seg.spatial_cu.tolist() == [0, 2, 4] and seg.spatial_max == 2
    # temporal order (n, t): n0:t0 -> row 0; n1:t1 -> row 2 (grid 4); n2:t0, t1 -> rows 1, 3
    assert seg.temporal_index.tolist() == [0, 2, 1, 3]
    assert seg.temporal_cu.tolist() == [0, 1, 2, 4] and seg.temporal_max == 2


def test_bad_arguments():
    qkv = torch.randn(4, 3, 2, 16, device=DEV)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(qkv, cu.long(), 4, backend="fused")
    with pytest.raises(ValueError, match="index"):
        varlen_attention(qkv, cu, 4, torch.arange(3, device=DEV), backend="fused")
    with pytest.raises(ValueError, match=r"\[Ntok, 3, H, dh\]"):
        varlen_attention(qkv[:, :2], cu, 4, backend="fused")


@pytest.mark.parametrize("heads", ["1", "all"])
def test_short_segments_both_head_loops_and_flash_agree(monkeypatch, heads):
    """Segments up to SHORT_L_MAX take the single-tile kernels (one program per segment and
    head, or per segment looping over all heads); forcing the flash kernels gives the same
    result, and both match the reference."""
    from mam2_fast.kernels import attention as A
    seed = kt.fresh_seed()
    dtype = torch.float16 if kt.ON_CUDA else torch.float32
    lengths, H, dh = [49, 0, 1, 20, 33, 7], 3, 32
    cu, ntok, index = random_segments(lengths, True)
    base = torch.randn(ntok, 3 * H * dh, device=DEV, dtype=dtype, requires_grad=True)
    view = lambda t: t.view(ntok, 3, H, dh)  # noqa: E731
    monkeypatch.setenv("MAM2_ATTN_HEADS_PER_PROG", heads)
    assert A._use_short(max(lengths), dtype)
    check(base, view, cu, max(lengths), index, dtype, f"short heads={heads}", seed)
    outs = []
    for short in ("1", "0"):
        monkeypatch.setenv("MAM2_ATTN_SHORT", short)
        out = varlen_attention(view(base), cu, max(lengths), index, backend="fused")
        (g,) = torch.autograd.grad(out, base, torch.ones_like(out))
        outs.append((out, g))
    kt.assert_close("short vs flash out", outs[0][0], outs[1][0], TOL[dtype], seed)
    kt.assert_close("short vs flash grad", outs[0][1], outs[1][1], TOL[dtype], seed)
