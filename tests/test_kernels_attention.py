"""Parity: fused factorized space-time attention vs ``reference.factorized_attention_ref``.

CPU (Triton interpreter): tiny shapes, fp32 fused vs fp32 reference, rel. tol 1e-5 (fp16:
vs float64 reference, rel. tol 5e-3; bf16 is skipped there because the Triton interpreter's
bf16 ``tl.dot`` is broken). CUDA: real ViT shapes in bf16/fp16 vs a float64 reference,
rel. tol 2e-2 (bf16) / 5e-3 (fp16). Forward output and the qkv gradient are checked.
Inputs are fresh each run; the clock seed is printed in every failure message.
"""
from mam2_fast.kernels import _testing as kt  # sets TRITON_INTERPRET=1 without CUDA: keep first

import pytest
import torch

pytest.importorskip("triton")

from mam2_fast.kernels import attention as A  # noqa: E402
from mam2_fast.kernels import factorized_attention  # noqa: E402
from mam2_fast.kernels.reference import factorized_attention_ref  # noqa: E402

if not kt.fused_kernels_interpretable(A):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this module "
                "in its own process", allow_module_level=True)

DEV = kt.DEVICE
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def make_valid(kind, B, T, S):
    """Validity masks: None, full, empty, random with per-frame differing counts, and random
    with whole frames / whole slots invalid (rows without any valid key in both modes)."""
    if kind is None:
        return None
    if kind == "full":
        return torch.ones(B, T, S, dtype=torch.bool, device=DEV)
    if kind == "empty":
        return torch.zeros(B, T, S, dtype=torch.bool, device=DEV)
    keep = torch.rand(B, T, 1, device=DEV) * 0.8 + 0.1  # per-frame keep ratio
    valid = torch.rand(B, T, S, device=DEV) < keep
    if kind == "dead":
        valid[0, T // 2, :] = False  # spatial: a frame without keys
        valid[-1, :, S // 2] = False  # temporal: a slot without keys
    return valid


def run_case(B, T, S, H, dh, mode, kind, dtype, layout="linear"):
    seed = kt.fresh_seed()
    tag = f"{mode} B{B} T{T} S{S} H{H} dh{dh} valid={kind} {dtype} {layout}"
    if layout == "linear":  # the model's case: a view of the [B, T, S, 3*H*dh] Linear output
        base = torch.randn(B, T, S, 3 * H * dh, device=DEV, dtype=dtype)
        view = lambda t: t.view(B, T, S, 3, H, dh)  # noqa: E731
    else:  # arbitrary strides: [B, T, S, H, 3, dh] storage permuted to [B, T, S, 3, H, dh]
        base = torch.randn(B, T, S, H, 3, dh, device=DEV, dtype=dtype)
        view = lambda t: t.permute(0, 1, 2, 4, 3, 5)  # noqa: E731
    base.requires_grad_(True)
    valid = make_valid(kind, B, T, S)

    out = factorized_attention(view(base), mode, valid, backend="fused")
    go = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, base, go)

    ref_dtype = torch.float32 if dtype == torch.float32 else torch.float64
    base_r = base.detach().to(ref_dtype).requires_grad_(True)
    out_r = factorized_attention_ref(view(base_r), mode, valid)
    (g_r,) = torch.autograd.grad(out_r, base_r, go.to(ref_dtype))

    assert out.dtype == dtype and out.is_contiguous()
    tol = TOL[dtype]
    kt.assert_close(f"out [{tag}]", out, out_r, tol, seed)
    kt.assert_close(f"dqkv [{tag}]", g, g_r, tol, seed)
    if valid is not None:  # exact zeros where the reference has exact zeros
        assert (out[~valid] == 0).all(), f"non-zero output at invalid slots [{tag}] (seed {seed})"
    return out, out_r


if kt.ON_CUDA:
    CASES = [
        # B, T, S, H, dh, mode, valid, dtype
        (4, 16, 196, 12, 64, "spatial", None, torch.bfloat16),
        (4, 16, 196, 12, 64, "temporal", None, torch.bfloat16),
        (8, 16, 49, 6, 64, "spatial", None, torch.bfloat16),
        (8, 16, 20, 6, 64, "temporal", None, torch.bfloat16),
        (2, 16, 196, 12, 64, "spatial", "random", torch.bfloat16),
        (2, 16, 196, 12, 64, "temporal", "dead", torch.bfloat16),
        (1, 7, 147, 16, 32, "spatial", "dead", torch.float16),
        (3, 32, 50, 4, 80, "temporal", "random", torch.float16),
        (2, 9, 133, 8, 128, "spatial", "random", torch.bfloat16),
        (2, 16, 196, 12, 64, "spatial", "empty", torch.bfloat16),
        (2, 16, 196, 12, 64, "spatial", "full", torch.float32),
    ]
else:
    CASES = [
        (1, 3, 7, 2, 32, "spatial", None, torch.float32),
        (1, 3, 7, 2, 32, "temporal", None, torch.float32),
        (2, 3, 37, 1, 32, "spatial", "random", torch.float32),   # 2 key blocks, ragged tail
        (1, 5, 6, 2, 32, "temporal", "dead", torch.float32),
        (2, 4, 9, 1, 64, "spatial", "dead", torch.float32),
        (1, 19, 3, 1, 32, "temporal", "random", torch.float32),  # T > 16: 32-wide block
        (1, 2, 5, 1, 80, "spatial", "random", torch.float32),    # dh 80 padded to 128
        (1, 3, 5, 1, 32, "spatial", "empty", torch.float32),
        (1, 3, 5, 1, 32, "temporal", "full", torch.float32),
        (1, 1, 5, 2, 32, "temporal", "random", torch.float32),   # T = 1
        (1, 3, 1, 2, 32, "spatial", None, torch.float32),        # S = 1
        (1, 3, 11, 2, 32, "spatial", "random", torch.float16),
        (1, 2, 70, 2, 32, "spatial", "random", torch.float32),   # L > 64: the flash kernels
        (1, 67, 2, 1, 32, "temporal", "dead", torch.float32),    # L > 64, temporal
        (1, 2, 65, 1, 16, "spatial", None, torch.float16),       # first length past the short kernels
        (2, 3, 64, 2, 32, "spatial", "dead", torch.float32),     # last length of the short kernels
    ]


@pytest.mark.parametrize("B,T,S,H,dh,mode,kind,dtype", CASES)
def test_parity(B, T, S, H, dh, mode, kind, dtype):
    run_case(B, T, S, H, dh, mode, kind, dtype)


@pytest.mark.parametrize("mode", ["spatial", "temporal"])
def test_arbitrary_qkv_strides(mode):
    run_case(1, 3, 6, 2, 32, mode, "random", torch.float32, layout="permuted")


def test_custom_scale_and_tolerance_discriminates():
    """The comparison must be able to fail: a 1% wrong softmax scale is far outside tol."""
    seed = kt.fresh_seed()
    qkv = torch.randn(1, 3, 9, 3, 2, 32, device=DEV)
    out = factorized_attention(qkv, "spatial", scale=0.3, backend="fused")
    kt.assert_close("custom scale", out, factorized_attention_ref(qkv, "spatial", scale=0.3),
                    TOL[torch.float32], seed)
    wrong = factorized_attention(qkv, "spatial", scale=0.303, backend="fused")
    assert kt.rel_err(wrong, factorized_attention_ref(qkv, "spatial", scale=0.3)) > 10 * TOL[torch.float32]


def test_auto_backend_matches_device():
    qkv = torch.randn(1, 2, 3, 3, 1, 32, device=DEV)
    out = factorized_attention(qkv, "temporal", backend="auto")
    ref = factorized_attention_ref(qkv, "temporal")
    if DEV.type == "cpu":
        assert torch.equal(out, ref)  # auto on CPU is the reference itself
    else:
        assert kt.rel_err(out, ref) < 1e-4


def test_bad_inputs_raise():
    qkv = torch.randn(1, 2, 3, 3, 1, 32, device=DEV)
    with pytest.raises(ValueError):
        factorized_attention(qkv[..., 0, :, :], "spatial", backend="fused")
    with pytest.raises(ValueError):
        factorized_attention(qkv, "diagonal", backend="fused")
    with pytest.raises(TypeError):
        factorized_attention(qkv.long(), "spatial", backend="fused")
    with pytest.raises(ValueError):
        factorized_attention(qkv, "spatial", torch.ones(1, 2, 4, dtype=torch.bool, device=DEV),
                             backend="fused")
    with pytest.raises(ValueError):
        factorized_attention(qkv, "spatial", backend="warp-speed")


def test_torch_compile_fullgraph():
    """The custom op is opaque to dynamo: no graph break, and autograd still works."""
    seed = kt.fresh_seed()
    B, T, S, H, dh = 1, 3, 5, 1, 32

    def f(lin, valid):
        return factorized_attention(lin.view(B, T, S, 3, H, dh), "temporal", valid, backend="fused")

    lin = torch.randn(B, T, S, 3 * H * dh, device=DEV, requires_grad=True)
    valid = torch.rand(B, T, S, device=DEV) < 0.7
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(lin, valid)
    (g,) = torch.autograd.grad(out.sum(), lin)
    lin_r = lin.detach().requires_grad_(True)
    out_r = factorized_attention_ref(lin_r.view(B, T, S, 3, H, dh), "temporal", valid)
    (g_r,) = torch.autograd.grad(out_r.sum(), lin_r)
    kt.assert_close("compiled out", out, out_r, 1e-5, seed)
    kt.assert_close("compiled grad", g, g_r, 1e-5, seed)


# --- the short-sequence kernels (L <= SHORT_L_MAX): both head loops, both families agree ----------
SHORT_CASES = [  # B, T, S, H, dh, mode, valid, dtype
    (2, 3, 49, 3, 32, "spatial", "random", torch.float32),
    (1, 16, 5, 2, 64, "temporal", "dead", torch.float32),
    (1, 4, 20, 3, 80, "spatial", "empty", torch.float32),
    (3, 1, 6, 2, 32, "temporal", None, torch.float16),     # T = 1
    (1, 5, 1, 4, 16, "spatial", "full", torch.float16),    # S = 1
]
if kt.ON_CUDA:
    SHORT_CASES += [(64, 16, 49, 12, 64, "spatial", "random", torch.bfloat16),
                    (64, 16, 49, 12, 64, "temporal", "dead", torch.bfloat16),
                    (16, 16, 64, 16, 64, "spatial", None, torch.bfloat16),
                    (8, 16, 20, 6, 64, "temporal", "random", torch.float16)]


@pytest.mark.parametrize("heads", ["1", "all"])
@pytest.mark.parametrize("B,T,S,H,dh,mode,kind,dtype", SHORT_CASES)
def test_short_kernels_both_head_loops(monkeypatch, heads, B, T, S, H, dh, mode, kind, dtype):
    """One program per head, or one per (b, g) looping over all H heads: both vs the reference."""
    L = T if mode == "temporal" else S
    assert A._use_short(L, dtype) or (kt.ON_CUDA and dtype == torch.float32)
    monkeypatch.setenv("MAM2_ATTN_HEADS_PER_PROG", "1" if heads == "1" else str(H))
    assert A._short_config(B * (S if mode == "temporal" else T), H, L, dh)[0] == (1 if heads == "1" else H)
    run_case(B, T, S, H, dh, mode, kind, dtype)


def test_dispatch_by_length_and_families_agree(monkeypatch):
    """L <= SHORT_L_MAX takes the short kernels, longer the flash kernels; forcing the flash
    kernels onto a short sequence gives the same result (each vs the reference, and vs each
    other), so a wrong dispatch or a broken family cannot hide."""
    assert A._use_short(A.SHORT_L_MAX) and not A._use_short(A.SHORT_L_MAX + 1)
    assert A._use_short(16, torch.float16) and A._use_short(16, torch.float32) == (not kt.ON_CUDA)
    seed = kt.fresh_seed()
    dtype = torch.float16 if kt.ON_CUDA else torch.float32
    qkv = torch.randn(2, 3, 37, 3, 2, 32, device=DEV, dtype=dtype, requires_grad=True)
    valid = torch.rand(2, 3, 37, device=DEV) < 0.6
    outs, grads = [], []
    for short in ("1", "0"):
        monkeypatch.setenv("MAM2_ATTN_SHORT", short)
        assert A._use_short(37, dtype) == (short == "1")
        out = factorized_attention(qkv, "spatial", valid, backend="fused")
        (g,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
        outs.append(out)
        grads.append(g)
    tol = TOL[dtype]
    kt.assert_close("short vs flash out", outs[0], outs[1], tol, seed)
    kt.assert_close("short vs flash grad", grads[0], grads[1], tol, seed)
