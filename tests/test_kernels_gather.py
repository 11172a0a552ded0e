"""Parity: fused token gathers vs ``reference.gather_visible_add_pos_ref`` /
``reference.gather_tokens_ref``, forward and all gradients (dx, dpos_t, dpos_s).

CPU (Triton interpreter): fp32 vs fp32 reference, rel. tol 1e-6 (pure data movement plus
fp32 sums); bf16 vs float64 reference, rel. tol 1e-2; fp16 vs float64, 5e-3; gather_tokens (a
copy) exact in every dtype. Odd sizes: N = 37, T = 1 and 3, batch 1, K = 1, D not a power of
two (40, 48, 80, 96, 384), empty index sets, batches that end in a partial step of the position
backward's batch loop, per-sample unsorted indices. CUDA: ViT-B shapes (N = 196, masks 0.75 / 0.9) in bf16 vs float64, rel. tol 1e-2. The
position gradients are bit-identical run to run (two-stage reduction, no atomics), also when
the batch is split over several chunks. Fresh inputs; seed in failure messages.
"""
from mam2_fast.kernels import _testing as kt  # sets TRITON_INTERPRET=1 without CUDA: keep first

import pytest
import torch

pytest.importorskip("triton")

from mam2_fast.kernels import gather as GA  # noqa: E402
from mam2_fast.kernels import gather_tokens, gather_visible_add_pos  # noqa: E402
from mam2_fast.kernels.reference import gather_tokens_ref, gather_visible_add_pos_ref  # noqa: E402

if not kt.fused_kernels_interpretable(GA):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)

DEV = kt.DEVICE
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def make_idx(B, N, K):
    return torch.stack([torch.randperm(N, device=DEV)[:K].sort().values for _ in range(B)])


def make_x(B, T, N, D, dtype, layout):
    if layout == "contiguous":
        return torch.randn(B, T, N, D, device=DEV, dtype=dtype)
    return torch.randn(B, N, T, D, device=DEV, dtype=dtype).transpose(1, 2)  # strided view


def run_pos_case(B, T, N, D, K, dtype, pos_dtype=None, layout="contiguous", pos_grad=True):
    seed = kt.fresh_seed()
    pos_dtype = pos_dtype or dtype
    tag = f"B{B} T{T} N{N} D{D} K{K} {dtype}/{pos_dtype} {layout} pos_grad={pos_grad}"
    x = make_x(B, T, N, D, dtype, layout).requires_grad_(True)
    pt = torch.randn(T, D, device=DEV, dtype=pos_dtype).requires_grad_(pos_grad)
    ps = torch.randn(N, D, device=DEV, dtype=pos_dtype).requires_grad_(pos_grad)
    idx = make_idx(B, N, K)
    leaves = [x, pt, ps] if pos_grad else [x]

    out = gather_visible_add_pos(x, pt, ps, idx, backend="fused")
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, go)

    hi = dtype == torch.float32 and pos_dtype == torch.float32
    rd = torch.float32 if hi else torch.float64
    leaves_r = [t.detach().to(rd).requires_grad_(True) for t in (x, pt, ps)]
    out_r = gather_visible_add_pos_ref(*leaves_r, idx)
    grads_r = torch.autograd.grad(out_r, leaves_r[:len(leaves)], go.to(rd))

    want_dtype = torch.promote_types(dtype, pos_dtype)
    assert out.dtype == want_dtype and out.shape == (B, T, K, D)
    tol = TOL[torch.float32 if hi else torch.bfloat16 if torch.bfloat16 in (dtype, pos_dtype) else torch.float16]
    kt.assert_close(f"out [{tag}]", out, out_r, tol, seed)
    for name, g, g_r, leaf in zip(("dx", "dpos_t", "dpos_s"), grads, grads_r, leaves):
        assert g.dtype == leaf.dtype, f"{name} dtype {g.dtype} != {leaf.dtype} (seed {seed})"
        kt.assert_close(f"{name} [{tag}]", g, g_r, tol, seed)


def run_tokens_case(B, T, N, D, K, dtype, layout="contiguous"):
    seed = kt.fresh_seed()
    tag = f"gather_tokens B{B} T{T} N{N} D{D} K{K} {dtype} {layout}"
    x = make_x(B, T, N, D, dtype, layout).requires_grad_(True)
    idx = make_idx(B, N, K)
    out = gather_tokens(x, idx, backend="fused")
    go = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, x, go)
    out_r = gather_tokens_ref(x, idx)
    (g_r,) = torch.autograd.grad(out_r, x, go)
    # pure data movement: exact in every dtype
    assert torch.equal(out, out_r), f"out [{tag}] (seed {seed})"
    assert torch.equal(g, g_r), f"dx [{tag}] (seed {seed})"


if kt.ON_CUDA:
    POS_CASES = [
        (8, 16, 196, 768, 49, torch.bfloat16, torch.float32),
        (8, 16, 196, 768, 20, torch.bfloat16, torch.bfloat16),
        (4, 16, 196, 1024, 49, torch.float32, torch.float32),
        (3, 7, 147, 384, 37, torch.float16, torch.float16),
    ]
    TOK_CASES = [(8, 16, 196, 768, 147, torch.bfloat16), (2, 5, 100, 384, 90, torch.float32)]
else:
    POS_CASES = [
        (2, 3, 11, 40, 4, torch.float32, torch.float32),
        (1, 5, 13, 16, 13, torch.float32, torch.float32),   # every slot kept
        (1, 2, 7, 24, 0, torch.float32, torch.float32),     # nothing kept
        (2, 3, 9, 300, 3, torch.float32, torch.float32),    # D > one 256-wide block
        (2, 2, 6, 32, 3, torch.bfloat16, torch.float32),    # mixed: fp32 out
        (1, 3, 5, 32, 2, torch.bfloat16, torch.bfloat16),
        (1, 3, 37, 48, 9, torch.float32, torch.float32),    # N = 37, batch 1, D = 3 * 16
        (2, 3, 37, 384, 11, torch.bfloat16, torch.bfloat16),  # ViT-S width: 3 tiles of 128
        (2, 3, 37, 96, 5, torch.bfloat16, torch.float32),   # mixed, D = 3 * 32
        (3, 3, 37, 40, 0, torch.float32, torch.float32),    # empty index sets, D = 40 (padded tile)
        (2, 1, 13, 80, 1, torch.float16, torch.float16),    # T = 1, K = 1, D = 80, fp16 vs float64
        (1, 4, 20, 80, 7, torch.float16, torch.float32),    # mixed fp16 / fp32: fp32 out
        (3, 2, 9, 48, 1, torch.float32, torch.float32),     # K = 1
        (6, 1, 10, 80, 5, torch.float32, torch.float32),    # B = 6: a full and a partial batch step
        (5, 2, 11, 48, 6, torch.float16, torch.float16),    # fp16, batch steps 4 + 1
    ]
    TOK_CASES = [(2, 3, 11, 40, 4, torch.float32), (1, 2, 6, 24, 6, torch.bfloat16),
                 (1, 2, 6, 24, 0, torch.float32), (1, 3, 37, 384, 9, torch.bfloat16),
                 (2, 3, 37, 48, 37, torch.float32), (3, 3, 37, 96, 0, torch.bfloat16),
                 (2, 1, 13, 80, 1, torch.float16), (1, 4, 20, 80, 20, torch.float16),
                 (5, 2, 9, 48, 1, torch.float32)]


@pytest.mark.parametrize("B,T,N,D,K,dtype,pos_dtype", POS_CASES)
def test_gather_add_pos(B, T, N, D, K, dtype, pos_dtype):
    run_pos_case(B, T, N, D, K, dtype, pos_dtype)


def test_gather_add_pos_strided_and_frozen_pos():
    run_pos_case(2, 3, 8, 24, 3, torch.float32, layout="strided")
    run_pos_case(2, 3, 8, 24, 3, torch.float32, pos_grad=False)


@pytest.mark.parametrize("B,T,N,D,K,dtype", TOK_CASES)
def test_gather_tokens(B, T, N, D, K, dtype):
    run_tokens_case(B, T, N, D, K, dtype)


def test_gather_tokens_strided():
    run_tokens_case(2, 3, 8, 24, 5, torch.float32, layout="strided")


def test_per_sample_unsorted_indices():
    """Each sample keeps its own, unsorted slots (the first and last slot included): forward and
    all three gradients vs the fp32 reference, and the plain gather bit-exact."""
    seed = kt.fresh_seed()
    B, T, N, D = 3, 2, 9, 80
    idx = torch.tensor([[8, 0, 3], [2, 7, 1], [4, 5, 6]], device=DEV)
    x = torch.randn(B, T, N, D, device=DEV, requires_grad=True)
    pt = torch.randn(T, D, device=DEV, requires_grad=True)
    ps = torch.randn(N, D, device=DEV, requires_grad=True)
    out = gather_visible_add_pos(x, pt, ps, idx, backend="fused")
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, pt, ps], go)
    out_r = gather_visible_add_pos_ref(x, pt, ps, idx)
    grads_r = torch.autograd.grad(out_r, [x, pt, ps], go)
    kt.assert_close("out [unsorted per-sample idx]", out, out_r, 1e-6, seed)
    for name, g, g_r in zip(("dx", "dpos_t", "dpos_s"), grads, grads_r):
        kt.assert_close(f"{name} [unsorted per-sample idx]", g, g_r, 1e-6, seed)
    assert torch.equal(grads[0][0, :, 5], torch.zeros(T, D, device=grads[0].device, dtype=grads[0].dtype)), f"unselected slot got a gradient (seed {seed})"
    z = gather_tokens(x, idx, backend="fused")
    assert torch.equal(z, gather_tokens_ref(x, idx)), f"gather_tokens (seed {seed})"
    (gz,) = torch.autograd.grad(z, x, go)
    assert torch.equal(gz, torch.autograd.grad(gather_tokens_ref(x, idx), x, go)[0]), f"seed {seed}"


def test_tolerance_discriminates():
    """Swapping the roles of pos_t/pos_s-sized gradients or dropping one must be caught."""
    seed = kt.fresh_seed()
    x = torch.randn(2, 3, 7, 16, device=DEV)
    pt, ps = torch.randn(3, 16, device=DEV), torch.randn(7, 16, device=DEV)
    idx = make_idx(2, 7, 3)
    ref = gather_visible_add_pos_ref(x, pt, ps, idx)
    kt.assert_close("out", gather_visible_add_pos(x, pt, ps, idx, backend="fused"), ref, 1e-6, seed)
    wrong = gather_visible_add_pos(x, pt, ps * 0, idx, backend="fused")
    assert kt.rel_err(wrong, ref) > 1e-3


def test_bad_inputs_raise():
    x = torch.randn(2, 3, 7, 16, device=DEV)
    pt, ps = torch.randn(3, 16, device=DEV), torch.randn(7, 16, device=DEV)
    idx = make_idx(2, 7, 3)
    with pytest.raises(ValueError):
        gather_visible_add_pos(x, pt[:2], ps, idx, backend="fused")
    with pytest.raises(ValueError):
        gather_visible_add_pos(x, pt, ps, idx[:1], backend="fused")
    with pytest.raises(TypeError):
        gather_tokens(x, idx.float(), backend="fused")
    with pytest.raises(ValueError):
        gather_tokens(x[0], idx, backend="fused")


def test_tile_width_divides_model_widths():
    """No idle lanes at the model widths: the tile width divides D (a padded tile otherwise)."""
    assert [GA._block_d(D) for D in (384, 768, 1024, 48, 512)] == [128, 256, 256, 16, 256]
    assert GA._block_d(40) == 64 and GA._block_d(8) == 16


@pytest.mark.parametrize("programs", [10 ** 6, 27, 1], ids=["chunk1", "chunk2-uneven", "one-chunk"])
def test_position_grads_deterministic_across_batch_chunks(monkeypatch, programs):
    """The batch split into chunks of 1, of 2 (B = 5: an uneven last chunk) or not at all:
    parity with the reference, and two runs give bit-identical gradients."""
    monkeypatch.setattr(GA, "_POS_BWD_PROGRAMS", programs)
    seed = kt.fresh_seed()
    B, T, N, D, K = 5, 3, 37, 48, 12
    x = torch.randn(B, T, N, D, device=DEV, dtype=torch.bfloat16)
    pt = torch.randn(T, D, device=DEV)
    ps = torch.randn(N, D, device=DEV)
    idx = make_idx(B, N, K)
    go = torch.randn(B, T, K, D, device=DEV)

    def grads():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, pt, ps)]
        out = gather_visible_add_pos(*leaves, idx, backend="fused")
        return torch.autograd.grad(out, leaves, go)

    first, second = grads(), grads()
    for name, a, b in zip(("dx", "dpos_t", "dpos_s"), first, second):
        assert torch.equal(a, b), f"{name} differs between two runs (seed {seed})"
    leaves_r = [t.detach().double().requires_grad_(True) for t in (x, pt, ps)]
    want = torch.autograd.grad(gather_visible_add_pos_ref(*leaves_r, idx), leaves_r, go.double())
    for name, g, w in zip(("dx", "dpos_t", "dpos_s"), first, want):
        kt.assert_close(f"{name} [chunks for {programs} programs]", g, w, 1e-2 if name == "dx" else 1e-6, seed)


def test_dx_in_x_dtype_without_pos_grad():
    """Frozen positions: the plain scatter writes dx in x's dtype from the fp32 output grad."""
    seed = kt.fresh_seed()
    x = torch.randn(1, 3, 37, 48, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    pt, ps = torch.randn(3, 48, device=DEV), torch.randn(37, 48, device=DEV)
    idx = make_idx(1, 37, 10)
    out = gather_visible_add_pos(x, pt, ps, idx, backend="fused")
    assert out.dtype == torch.float32
    go = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, x, go)
    (g_r,) = torch.autograd.grad(gather_visible_add_pos_ref(x, pt, ps, idx), x, go)
    assert g.dtype == torch.bfloat16, f"seed {seed}"
    # the kernel rounds fp32 -> bf16 (the interpreter truncates where CUDA rounds to nearest)
    kt.assert_close("dx (bf16, frozen positions)", g, g_r, 1e-2, seed)
