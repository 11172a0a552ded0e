"""Parity: fused linear + cross-entropy vs ``reference.linear_cross_entropy_ref``
(== ``F.cross_entropy(x @ W.T + b, y, ignore_index=-100)``).

CPU (Triton interpreter): fp32 vs fp32 reference, rel. tol 1e-5 on the loss and on the
x / weight / bias gradients; bf16 vs a float64 reference, rel. tol 2e-2. CUDA: ViT-B head
shapes (K = 8192 / 16384) in bf16 vs float64, rel. tol 2e-2. Several chunk sizes are
forced so the multi-chunk accumulation is exercised. Fresh inputs; seed in failure messages.
"""
from mam2_fast.kernels import _testing as kt  # sets TRITON_INTERPRET=1 without CUDA: keep first

import math

import pytest
import torch

pytest.importorskip("triton")

from mam2_fast.kernels import linear_ce as LCE  # noqa: E402
from mam2_fast.kernels import linear_cross_entropy  # noqa: E402
from mam2_fast.kernels.reference import linear_cross_entropy_ref  # noqa: E402

if not kt.fused_kernels_interpretable(LCE):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)

DEV = kt.DEVICE
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def run_case(M, D, K, bias, ignore_frac, dtype, chunk_size=None, wanted=("x", "w", "b")):
    seed = kt.fresh_seed()
    tag = f"M{M} D{D} K{K} bias={bias} ignore={ignore_frac} {dtype} chunk={chunk_size}"
    x = torch.randn(M, D, device=DEV, dtype=dtype)
    w = (torch.randn(K, D, device=DEV, dtype=dtype) * D ** -0.5)
    b = torch.randn(K, device=DEV, dtype=dtype) if bias else None
    y = torch.randint(0, K, (M,), device=DEV)
    y[torch.rand(M, device=DEV) < ignore_frac] = -100
    leaves = {"x": x, "w": w, "b": b}
    for name in wanted:
        if leaves[name] is not None:
            leaves[name].requires_grad_(True)
    grads_of = [leaves[n] for n in wanted if leaves[n] is not None]

    loss = LCE.linear_cross_entropy_fused(x, w, b, y, chunk_size=chunk_size)
    scale = 1.7  # non-unit upstream gradient
    grads = torch.autograd.grad(loss * scale, grads_of) if grads_of else ()

    rd = torch.float32 if dtype == torch.float32 else torch.float64
    ref_leaves = [t.detach().to(rd).requires_grad_(t.requires_grad) if t is not None else None
                  for t in (x, w, b)]
    loss_r = linear_cross_entropy_ref(*ref_leaves, y)
    ref_grads_of = [r for r, n in zip(ref_leaves, ("x", "w", "b")) if n in wanted and r is not None]
    grads_r = torch.autograd.grad(loss_r * scale, ref_grads_of) if grads_of else ()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    tol = TOL[dtype]
    kt.assert_close(f"loss [{tag}]", loss, loss_r.float(), tol, seed)
    names = [n for n in wanted if leaves[n] is not None]
    for n, g, g_r in zip(names, grads, grads_r):
        assert g.dtype == dtype, f"grad {n} dtype {g.dtype} (seed {seed})"
        kt.assert_close(f"d{n} [{tag}]", g, g_r, tol, seed)


if kt.ON_CUDA:
    CASES = [
        (4096, 768, 16384, True, 0.0, torch.bfloat16, None),
        (3000, 768, 8192, False, 0.1, torch.bfloat16, 1024),
        (2048, 384, 16384, True, 0.05, torch.float16, None),
        (1000, 512, 8192, True, 0.2, torch.float32, 300),
    ]
else:
    CASES = [
        (150, 48, 1000, True, 0.1, torch.float32, None),   # K not a power of two, 3 chunks
        (1, 16, 37, False, 0.0, torch.float32, None),      # single row
        (70, 32, 2048, True, 0.3, torch.float32, 16),      # 2 K-tiles, 5 chunks
        (40, 24, 300, True, 0.0, torch.bfloat16, 7),
    ]


@pytest.mark.parametrize("M,D,K,bias,ignore,dtype,chunk", CASES)
def test_parity(M, D, K, bias, ignore, dtype, chunk):
    run_case(M, D, K, bias, ignore, dtype, chunk)


def test_partial_requires_grad():
    run_case(33, 16, 130, True, 0.2, torch.float32, 8, wanted=("w",))
    run_case(33, 16, 130, True, 0.2, torch.float32, None, wanted=("x", "b"))


def test_no_grad_and_dispatcher():
    seed = kt.fresh_seed()
    x, w, b = torch.randn(20, 16, device=DEV), torch.randn(50, 16, device=DEV), torch.randn(50, device=DEV)
    y = torch.randint(0, 50, (20,), device=DEV)
    y[3] = -1
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, b, y, backend="fused", ignore_index=-1)
    kt.assert_close("no-grad loss", loss, linear_cross_entropy_ref(x, w, b, y, ignore_index=-1),
                    1e-5, seed)
    # the comparison can fail: a wrong ignore_index is detected
    bad = linear_cross_entropy(x, w, b, y.clamp(min=0), backend="fused", ignore_index=-1)
    assert kt.rel_err(bad, linear_cross_entropy_ref(x, w, b, y, ignore_index=-1)) > 1e-3


def test_all_ignored_is_nan_like_reference():
    x = torch.randn(5, 8, device=DEV, requires_grad=True)
    w = torch.randn(12, 8, device=DEV)
    y = torch.full((5,), -100, device=DEV)
    loss = linear_cross_entropy(x, w, None, y, backend="fused")
    assert math.isnan(loss.item()) and math.isnan(linear_cross_entropy_ref(x, w, None, y).item())


@pytest.mark.skipif(not hasattr(torch, "get_autocast_dtype"), reason="needs torch>=2.4")
def test_autocast_bf16():
    """Under autocast the op casts x / W / b like F.linear; grads flow to fp32 params."""
    seed = kt.fresh_seed()
    x = torch.randn(24, 32, device=DEV, requires_grad=True)
    w = (torch.randn(100, 32, device=DEV) * 0.2).requires_grad_(True)
    b = torch.randn(100, device=DEV, requires_grad=True)
    y = torch.randint(0, 100, (24,), device=DEV)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, b, y, backend="fused")
        loss_r = linear_cross_entropy_ref(x, w, b, y)
    g = torch.autograd.grad(loss, (x, w, b))
    g_r = torch.autograd.grad(loss_r, (x, w, b))
    kt.assert_close("autocast loss", loss, loss_r, 1e-2, seed)
    for n, a, r in zip("xwb", g, g_r):
        assert a.dtype == torch.float32
        kt.assert_close(f"autocast d{n}", a, r, 3e-2, seed)


def test_bad_inputs_raise():
    x, w = torch.randn(4, 8, device=DEV), torch.randn(10, 8, device=DEV)
    y = torch.zeros(4, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError):
        linear_cross_entropy(x, w[:, :4], None, y, backend="fused")
    with pytest.raises(ValueError):
        linear_cross_entropy(x, w, None, y[:3], backend="fused")
    with pytest.raises(TypeError):
        linear_cross_entropy(x, w.double(), None, y, backend="fused")
    with pytest.raises(TypeError):
        linear_cross_entropy(x, w, None, y.float(), backend="fused")
