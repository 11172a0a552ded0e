import pytest
import torch

from mam2_fast.masking import MaskGenerator, MaskInfo, num_masked


@pytest.mark.parametrize("T,grid,ratio", [(16, (14, 14), 0.75), (5, (3, 7), 0.6), (1, (4, 4), 0.9)])
def test_tube_exact_counts_and_broadcast(T, grid, ratio):
    N = grid[0] * grid[1]
    info = MaskGenerator("tube", ratio, T, grid)(6, torch.Generator().manual_seed(1))
    nm = num_masked(ratio, N)
    assert info.mask.shape == (6, T, N)
    assert (info.mask.sum(dim=2) == nm).all()
    assert (info.mask == info.mask[:, :1]).all(), "tube masks must be equal in every frame"
    assert info.is_tube and info.mask_idx.shape == (6, nm) and info.vis_idx.shape == (6, N - nm)
    for b in range(6):
        assert set(info.mask_idx[b].tolist()).isdisjoint(info.vis_idx[b].tolist())
        assert info.mask[b, 0, info.mask_idx[b]].all() and not info.mask[b, 0, info.vis_idx[b]].any()
        assert (info.mask_idx[b].diff() > 0).all()


def test_paper_default_counts():
    assert num_masked(0.75, 196) == 147  # Table 9: 196 x 0.25 = 49 visible per frame


def test_cube_is_blockwise_tube_with_exact_count():
    gen = MaskGenerator("cube", 0.4, 8, (14, 14))
    info = gen(4, torch.Generator().manual_seed(0))
    assert (info.mask.sum(dim=2) == num_masked(0.4, 196)).all()
    assert (info.mask == info.mask[:, :1]).all()
    # block-wise: masked patches mostly have masked 4-neighbours (random masks would not)
    m = info.mask[:, 0].view(4, 14, 14).float()
    nb = torch.zeros_like(m)
    nb[:, 1:] += m[:, :-1]; nb[:, :-1] += m[:, 1:]; nb[:, :, 1:] += m[:, :, :-1]; nb[:, :, :-1] += m[:, :, 1:]
    frac_with_neighbour = ((nb > 0) & (m > 0)).sum() / m.sum()
    assert frac_with_neighbour > 0.9


def test_random_spacetime_exact_total_and_varying_frames():
    info = MaskGenerator("random", 0.9, 16, (14, 14))(3, torch.Generator().manual_seed(0))
    assert not info.is_tube
    assert (info.mask.flatten(1).sum(1) == num_masked(0.9, 16 * 196)).all()
    per_frame = info.mask.sum(dim=2)
    assert per_frame.unique().numel() > 1


def test_frame_masking():
    info = MaskGenerator("frame", 0.5, 6, (3, 3))(2, torch.Generator().manual_seed(0))
    frames = info.mask.all(dim=2)
    assert (frames.sum(1) == 3).all()
    assert ((info.mask.any(dim=2)) == frames).all()


def test_seedable():
    g = MaskGenerator("tube", 0.75, 4, (6, 6))
    a = g(3, torch.Generator().manual_seed(5)).mask
    b = g(3, torch.Generator().manual_seed(5)).mask
    c = g(3, torch.Generator().manual_seed(6)).mask
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask.kind"):
        MaskGenerator("checkerboard", 0.5, 4, (4, 4))
    with pytest.raises(ValueError, match="mask.ratio"):
        MaskGenerator("tube", 1.0, 4, (4, 4))
    with pytest.raises(ValueError, match="equal masked counts"):
        MaskInfo.from_spatial(torch.tensor([[True, False], [True, True]]), 2)


def test_packed_segments_per_sample_count():
    from mam2_fast.masking import MaskGenerator, MaskInfo, packed_segments

    g = torch.Generator().manual_seed(0)
    for kind in ("random", "frame"):
        info = MaskGenerator(kind, 0.75, 4, (3, 5))(3, g)
        seg = info.segments(True)
        assert seg.per_sample == int(info.mask[0].sum()) and seg.rows.numel() == 3 * seg.per_sample
        assert info.to(torch.device("cpu")).segments(False).per_sample == 60 - seg.per_sample
    uneven = torch.zeros(2, 4, 15, dtype=torch.bool)
    uneven[0, :, :3] = True
    uneven[1, :, :5] = True
    assert packed_segments(uneven).per_sample is None
    assert MaskInfo(uneven).segments(True).rows.numel() == 32
