"""Frame-index sampling, MultiScaleCrop boxes, and the resumable distributed sampler."""
import numpy as np
import pytest

from mam2_fast.data.sampler import ResumableSampler
from mam2_fast.data.sampling import (dense_indices, multiscale_crop_box, rng_for, segment_indices,
                                     eval_clip_indices, three_crop_boxes)


def test_dense_stride_and_range():
    for seed in range(50):
        idx = dense_indices(300, 16, 4, rng_for(seed))
        assert np.all(np.diff(idx) == 4) and idx[0] >= 0 and idx[-1] < 300
    starts = {int(dense_indices(100, 16, 4, rng_for(s))[0]) for s in range(300)}
    assert starts == set(range(0, 100 - 61 + 1))  # every valid start is reachable


def test_short_video_rules():
    loop = dense_indices(10, 8, 2, rng_for(0), short="loop")
    pad = dense_indices(10, 8, 2, rng_for(0), short="pad")
    assert loop.tolist() == [0, 2, 4, 6, 8, 0, 2, 4]
    assert pad.tolist() == [0, 2, 4, 6, 8, 9, 9, 9]
    with pytest.raises(ValueError):
        dense_indices(10, 8, 2, rng_for(0), short="bogus")


def test_segments_and_test_clips():
    mid = segment_indices(81, 8)
    assert mid.tolist() == [5, 15, 25, 35, 45, 55, 65, 75]
    rnd = segment_indices(81, 8, rng_for(3))
    assert np.all(np.abs(rnd - mid) <= 5)
    clips = eval_clip_indices(100, 16, 4, 5)
    assert [c[0] for c in clips] == [0, 9, 19, 29, 39] and clips[-1][-1] == 99
    assert len(three_crop_boxes(240, 320)) == 3 and three_crop_boxes(240, 320)[2] == (80, 0, 240, 240)


def test_multiscale_crop_follows_videomae():
    H, W, S = 240, 320, 224
    seen = set()
    for s in range(500):
        x0, y0, w, h = multiscale_crop_box(H, W, S, rng_for(s))
        assert 0 <= x0 and x0 + w <= W and 0 <= y0 and y0 + h <= H
        seen.add((w, h))
    sizes = [int(240 * s) for s in (1, .875, .75, .66)]
    sizes = [S if abs(v - S) < 3 else v for v in sizes]
    allowed = {(sizes[j], sizes[i]) for i in range(4) for j in range(4) if abs(i - j) <= 1}
    assert seen == allowed


@pytest.mark.parametrize("world", [1, 3])
def test_sampler_partition_and_determinism(world):
    n, vps = 50, 4
    samplers = [ResumableSampler(n, seed=7, rank=r, world_size=world, videos_per_step=vps) for r in range(world)]
    orders = [s.rank_order(2) for s in samplers]
    assert all(len(o) == samplers[0].steps_per_epoch * vps for o in orders)
    if world == 1:  # one epoch = one permutation
        full = samplers[0].epoch_order(2)
        assert sorted(full.tolist()) == list(range(n))
    all_ = np.concatenate(orders)
    assert len(set(all_.tolist())) == len(all_)  # ranks never overlap within an epoch
    again = ResumableSampler(n, seed=7, rank=0, world_size=world, videos_per_step=vps)
    assert np.array_equal(again.rank_order(2), orders[0])
    assert not np.array_equal(again.rank_order(3), orders[0])
    assert not np.array_equal(ResumableSampler(n, seed=8, world_size=world, videos_per_step=vps).rank_order(2),
                              orders[0])


def test_sampler_resume_and_repeated_sampling():
    s = ResumableSampler(40, seed=1, num_sample=4, videos_per_step=2)
    assert s.videos_per_epoch == 10 and s.steps_per_epoch == 5
    full = list(s.iter_positions(3))
    assert list(s.iter_positions(3, start_step=2)) == full[4:]
    # consecutive epochs walk through the permutation stream: 4 epochs cover every video once
    seen = np.concatenate([s.epoch_order(e) for e in range(4)])
    assert sorted(seen.tolist()) == list(range(40))


def test_sampler_too_small():
    with pytest.raises(ValueError, match="no full batch"):
        ResumableSampler(3, videos_per_step=4)
