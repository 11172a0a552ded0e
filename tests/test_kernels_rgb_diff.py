"""Parity: fused RGB-difference MSE vs the reference, for tube masks
(``reference.rgb_diff_mse_tube_ref``) and for packed masked tokens
(``reference.rgb_diff_mse_packed_ref``: random / frame masks, uneven counts, frame-0 rows).

CPU (Triton interpreter): fp32 vs fp32 reference, rel. tol 1e-5 on the loss and d(pred);
bf16 pred (or clip) vs a float64 reference, rel. tol 1e-2. Odd sizes: N = 37 patches, T = 3,
batch 1, patch sizes 3 and 6 (the clip tile is padded to a power of two), strided clips.
CUDA: 224x224 clips, 16 frames, masks 0.75 / 0.9, bf16 pred vs float64, rel. tol 1e-2. The
clip is a constant (no gradient). Fresh inputs each run; seed in failure messages.
"""
from mam2_fast.kernels import _testing as kt  # sets TRITON_INTERPRET=1 without CUDA: keep first

import pytest
import torch

pytest.importorskip("triton")

from mam2_fast.kernels import rgb_diff_loss as RGB  # noqa: E402
from mam2_fast.kernels import rgb_diff_mse_packed, rgb_diff_mse_tube  # noqa: E402
from mam2_fast.kernels import reference as ref  # noqa: E402
from mam2_fast.kernels.reference import rgb_diff_mse_packed_ref, rgb_diff_mse_tube_ref  # noqa: E402

if not kt.fused_kernels_interpretable(RGB):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)

DEV = kt.DEVICE
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def run_case(B, T, C, H, W, P, Nm, dtype, layout="contiguous"):
    seed = kt.fresh_seed()
    tag = f"B{B} T{T} C{C} {H}x{W} P{P} Nm{Nm} {dtype} {layout}"
    N = (H // P) * (W // P)
    if layout == "contiguous":
        clip = torch.randn(B, T, C, H, W, device=DEV)
        pred_full = torch.randn(B, T, Nm, P * P * C, device=DEV, dtype=dtype)
    else:  # strided clip (from [B, C, T, H, W]) and a pred that is a slice of a wider tensor
        clip = torch.randn(B, C, T, H, W, device=DEV).transpose(1, 2)
        pred_full = torch.randn(B, T, Nm, P * P * C + 5, device=DEV, dtype=dtype)[..., 3:-2]
    idx = torch.stack([torch.randperm(N, device=DEV)[:Nm].sort().values for _ in range(B)])
    pred = pred_full.detach().requires_grad_(True)

    loss = rgb_diff_mse_tube(clip, pred, idx, P, backend="fused")
    g_scale = 2.5
    (g,) = torch.autograd.grad(loss * g_scale, pred)

    rd = torch.float32 if dtype == torch.float32 else torch.float64
    pred_r = pred.detach().to(rd).requires_grad_(True)
    loss_r = rgb_diff_mse_tube_ref(clip.to(rd), pred_r, idx, P)
    (g_r,) = torch.autograd.grad(loss_r * g_scale, pred_r)

    assert loss.dim() == 0 and g.dtype == dtype and g.shape == pred.shape
    kt.assert_close(f"loss [{tag}]", loss, loss_r, TOL[dtype], seed)
    kt.assert_close(f"dpred [{tag}]", g, g_r, TOL[dtype], seed)
    if T > 0:
        assert (g[:, 0] == 0).all(), f"frame 0 must get zero gradient [{tag}] (seed {seed})"


if kt.ON_CUDA:
    CASES = [
        (8, 16, 3, 224, 224, 16, 147, torch.bfloat16),  # mask 0.75
        (8, 16, 3, 224, 224, 16, 176, torch.bfloat16),  # mask 0.9
        (4, 16, 3, 224, 224, 16, 147, torch.float32),
        (2, 7, 3, 160, 112, 16, 60, torch.float16),
    ]
else:
    CASES = [
        (2, 3, 3, 12, 16, 4, 5, torch.float32),
        (1, 2, 3, 8, 8, 4, 4, torch.float32),      # every slot masked
        (1, 4, 3, 32, 32, 16, 3, torch.float32),   # P = 16: 768 values per patch
        (2, 3, 1, 6, 9, 3, 2, torch.float32),      # C = 1, odd grid
        (1, 3, 3, 8, 12, 4, 4, torch.bfloat16),
        (1, 3, 3, 2, 74, 2, 20, torch.float32),    # N = 37 (a 1 x 37 grid), batch 1, T = 3
        (2, 3, 3, 12, 18, 6, 4, torch.bfloat16),   # P = 6: an 8 x 8 tile, masked
    ]


@pytest.mark.parametrize("B,T,C,H,W,P,Nm,dtype", CASES)
def test_parity(B, T, C, H, W, P, Nm, dtype):
    run_case(B, T, C, H, W, P, Nm, dtype)


def test_strided_inputs():
    run_case(2, 3, 3, 8, 12, 4, 3, torch.float32, layout="strided")


@pytest.mark.parametrize("packed", [False, True])
def test_bf16_clip(packed):
    """A bf16 clip is read as is (the difference in fp32): parity with a float64 reference."""
    seed = kt.fresh_seed()
    B, T, C, H, W, P = 2, 3, 3, 8, 12, 4
    N = (H // P) * (W // P)
    clip = torch.randn(B, T, C, H, W, device=DEV, dtype=torch.bfloat16)
    if packed:
        rows = uneven_rows(B, T, N, 0.6, DEV)
        pred = torch.randn(rows.numel(), P * P * C, device=DEV, requires_grad=True)
        fused, refr, index = rgb_diff_mse_packed, rgb_diff_mse_packed_ref, rows
    else:
        index = torch.stack([torch.randperm(N, device=DEV)[:4].sort().values for _ in range(B)])
        pred = torch.randn(B, T, 4, P * P * C, device=DEV, requires_grad=True)
        fused, refr = rgb_diff_mse_tube, rgb_diff_mse_tube_ref
    loss = fused(clip, pred, index, P, backend="fused")
    (g,) = torch.autograd.grad(loss, pred)
    pred_r = pred.detach().double().requires_grad_(True)
    loss_r = refr(clip.double(), pred_r, index, P)
    (g_r,) = torch.autograd.grad(loss_r, pred_r)
    kt.assert_close(f"loss [bf16 clip, packed={packed}]", loss, loss_r, 1e-5, seed)
    kt.assert_close(f"dpred [bf16 clip, packed={packed}]", g, g_r, 1e-5, seed)


@pytest.mark.parametrize("T,Nm", [(1, 3), (3, 0)])
def test_degenerate_is_zero(T, Nm):
    clip = torch.randn(1, T, 3, 8, 8, device=DEV)
    pred = torch.randn(1, T, Nm, 48, device=DEV, requires_grad=True)
    idx = torch.arange(Nm, device=DEV)[None]
    loss = rgb_diff_mse_tube(clip, pred, idx, 4, backend="fused")
    assert loss.item() == 0.0 == rgb_diff_mse_tube_ref(clip, pred, idx, 4).item()
    (g,) = torch.autograd.grad(loss, pred)
    assert (g == 0).all()


def test_tolerance_discriminates():
    """A target shifted by one frame (x_t - x_{t-2}-like bug) must fail the comparison."""
    seed = kt.fresh_seed()
    clip = torch.randn(1, 4, 3, 8, 8, device=DEV)
    idx = torch.tensor([[0, 2, 3]], device=DEV)
    pred = torch.randn(1, 4, 3, 48, device=DEV)
    pred.requires_grad_(True)
    ref = rgb_diff_mse_tube_ref(clip, pred, idx, 4)
    kt.assert_close("loss", rgb_diff_mse_tube(clip, pred, idx, 4, backend="fused"), ref, 1e-5, seed)
    # compare the gradient, not the scalar loss: two sums of squares can agree by chance (a
    # 7.7e-4 relative gap was seen once), the per-element gradients of a wrong target cannot
    (g_ref,) = torch.autograd.grad(ref, pred)
    (g_wrong,) = torch.autograd.grad(rgb_diff_mse_tube(clip.flip(1), pred, idx, 4, backend="fused"), pred)
    assert kt.rel_err(g_wrong, g_ref) > 0.1, f"seed {seed}"


def test_bad_inputs_raise():
    clip = torch.randn(1, 3, 3, 8, 8, device=DEV)
    pred = torch.randn(1, 3, 2, 48, device=DEV)
    idx = torch.tensor([[0, 1]], device=DEV)
    with pytest.raises(ValueError):  # clip gets no gradient from the fused loss
        rgb_diff_mse_tube(clip.requires_grad_(True), pred, idx, 4, backend="fused")
    clip = clip.detach()
    with pytest.raises(ValueError):
        rgb_diff_mse_tube(clip, pred[..., :40], idx, 4, backend="fused")
    with pytest.raises(ValueError):
        rgb_diff_mse_tube(clip, pred, idx, 3, backend="fused")
    with pytest.raises(ValueError):
        rgb_diff_mse_tube(clip, pred, idx.float(), 4, backend="fused")


# -- packed masked tokens ------------------------------------------------------------------
def uneven_rows(B, T, N, ratio, device, shuffle=False):
    """Flat masked rows ``b*T*N + t*N + n`` of a random (per-token) mask: counts differ per
    sample and per frame; ascending unless ``shuffle``."""
    mask = torch.rand(B, T, N, device=device) < ratio
    rows = mask.reshape(-1).nonzero().squeeze(1)
    if shuffle:
        rows = rows[torch.randperm(rows.numel(), device=device)]
    return rows


def run_packed_case(B, T, C, H, W, P, ratio, dtype, shuffle=False, strided=False):
    seed = kt.fresh_seed()
    N = (H // P) * (W // P)
    tag = f"packed B{B} T{T} C{C} {H}x{W} P{P} ratio{ratio} {dtype} shuffle={shuffle} strided={strided}"
    clip = torch.randn(B, T, C, H, W, device=DEV)
    rows = uneven_rows(B, T, N, ratio, DEV, shuffle)
    M, PPC = rows.numel(), P * P * C
    if strided:
        pred_full = torch.randn(M, PPC + 7, device=DEV, dtype=dtype)[:, 4:-3]
    else:
        pred_full = torch.randn(M, PPC, device=DEV, dtype=dtype)
    pred = pred_full.detach().requires_grad_(True)
    loss = rgb_diff_mse_packed(clip, pred, rows, P, backend="fused")
    (g,) = torch.autograd.grad(loss * 1.7, pred)

    rd = torch.float32 if dtype == torch.float32 else torch.float64
    pred_r = pred.detach().to(rd).requires_grad_(True)
    loss_r = rgb_diff_mse_packed_ref(clip.to(rd), pred_r, rows, P)
    (g_r,) = torch.autograd.grad(loss_r * 1.7, pred_r)
    assert loss.dim() == 0 and g.dtype == dtype and g.shape == pred.shape
    kt.assert_close(f"loss [{tag}]", loss, loss_r, TOL[dtype], seed)
    kt.assert_close(f"dpred [{tag}]", g, g_r, TOL[dtype], seed)
    first = (rows // N) % T == 0
    assert (g[first] == 0).all(), f"frame-0 rows must get zero gradient [{tag}] (seed {seed})"


if kt.ON_CUDA:
    PACKED_CASES = [
        (8, 16, 3, 224, 224, 16, 0.75, torch.bfloat16, False),
        (8, 16, 3, 224, 224, 16, 0.9, torch.bfloat16, False),
        (2, 7, 3, 160, 112, 16, 0.5, torch.float16, True),
        (4, 16, 3, 224, 224, 16, 0.75, torch.float32, False),
    ]
else:
    PACKED_CASES = [
        (2, 3, 3, 12, 16, 4, 0.6, torch.float32, False),
        (1, 4, 3, 32, 32, 16, 0.75, torch.float32, True),   # P = 16, shuffled rows
        (3, 2, 1, 6, 9, 3, 0.5, torch.float32, False),      # C = 1, odd grid
        (1, 3, 3, 8, 8, 4, 1.0, torch.float32, False),      # every token masked
        (2, 3, 3, 8, 12, 4, 0.7, torch.bfloat16, True),
        (1, 3, 3, 2, 74, 2, 0.5, torch.float32, True),      # N = 37, batch 1
    ]


@pytest.mark.parametrize("B,T,C,H,W,P,ratio,dtype,shuffle", PACKED_CASES)
def test_packed_parity(B, T, C, H, W, P, ratio, dtype, shuffle):
    run_packed_case(B, T, C, H, W, P, ratio, dtype, shuffle)


def test_packed_strided_pred():
    run_packed_case(2, 3, 3, 8, 12, 4, 0.6, torch.float32, strided=True)


def test_packed_equals_grid_loss():
    """The packed loss is the grid loss ``rgb_diff_mse_ref`` of the same mask (the path the
    reference model takes), predictions placed at their rows."""
    seed = kt.fresh_seed()
    B, T, C, H, W, P = 2, 4, 3, 8, 12, 4
    N, PPC = (H // P) * (W // P), P * P * C
    clip = torch.randn(B, T, C, H, W, device=DEV)
    mask = torch.rand(B, T, N, device=DEV) < 0.6
    rows = mask.reshape(-1).nonzero().squeeze(1)
    pred = torch.randn(rows.numel(), PPC, device=DEV)
    grid = torch.zeros(B * T * N, PPC, device=DEV).index_copy(0, rows, pred).view(B, T, N, PPC)
    kt.assert_close("packed vs grid", rgb_diff_mse_packed(clip, pred, rows, P, backend="fused"),
                    ref.rgb_diff_mse_ref(clip, grid, mask, P), 1e-5, seed)


@pytest.mark.parametrize("T,only_first", [(1, False), (3, True), (3, None)])
def test_packed_degenerate_is_zero(T, only_first):
    B, P, N = 2, 4, 4
    clip = torch.randn(B, T, 3, 8, 8, device=DEV)
    if only_first is None:
        rows = torch.zeros(0, dtype=torch.long, device=DEV)       # nothing masked
    else:
        rows = torch.tensor([0, 3, T * N + 1], device=DEV)          # frame 0 of both samples only
    pred = torch.randn(rows.numel(), 48, device=DEV, requires_grad=True)
    loss = rgb_diff_mse_packed(clip, pred, rows, P, backend="fused")
    assert loss.item() == 0.0 == rgb_diff_mse_packed_ref(clip, pred, rows, P).item()
    (g,) = torch.autograd.grad(loss, pred)
    assert (g == 0).all()


def test_packed_discriminates():
    """Rows read one frame off (a t/n decoding bug) must fail the comparison."""
    seed = kt.fresh_seed()
    B, T, P, N = 2, 4, 4, 6
    clip = torch.randn(B, T, 3, 8, 12, device=DEV)
    rows = uneven_rows(B, T, N, 0.6, DEV)
    rows = rows[(rows // N) % T < T - 1]                      # room to shift by one frame
    pred = torch.randn(rows.numel(), 48, device=DEV, requires_grad=True)
    (g_ref,) = torch.autograd.grad(rgb_diff_mse_packed_ref(clip, pred, rows, P), pred)
    (g_wrong,) = torch.autograd.grad(rgb_diff_mse_packed(clip, pred, rows + N, P, backend="fused"), pred)
    assert kt.rel_err(g_wrong, g_ref) > 0.1, f"seed {seed}"


def test_packed_bad_inputs_raise():
    clip = torch.randn(1, 3, 3, 8, 8, device=DEV)
    rows = torch.tensor([1, 5, 9], device=DEV)
    pred = torch.randn(3, 48, device=DEV)
    with pytest.raises(ValueError, match="constant"):
        rgb_diff_mse_packed(clip.clone().requires_grad_(True), pred, rows, 4, backend="fused")
    with pytest.raises(ValueError, match="pred must be"):
        rgb_diff_mse_packed(clip, pred[:2], rows, 4, backend="fused")
    with pytest.raises(ValueError, match="not divisible"):
        rgb_diff_mse_packed(clip, pred, rows, 3, backend="fused")
    with pytest.raises(ValueError, match="int64/int32"):
        rgb_diff_mse_packed(clip, pred, rows.float(), 4, backend="fused")
    with pytest.raises(ValueError, match="need clip"):
        rgb_diff_mse_packed(clip, pred.view(1, 3, 48), rows, 4, backend="fused")
