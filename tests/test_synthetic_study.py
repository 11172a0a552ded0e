"""The study's generated videos (mam2_fast/data/synthetic_study.py): how far the target travels,
and that a changed generator setting is part of a build's and a study's identity."""
import json

import numpy as np
import pytest

from mam2_fast import study
from mam2_fast.data import synthetic_study as S


@pytest.mark.parametrize("direction", range(4))
def test_target_travel_sets_how_far_the_target_crosses_the_frame(direction):
    size, r, T = 56, 10.0, 16
    free = size - 2 * (r + 1)
    for travel in (0.0, 0.3, 1.0):
        for seed in range(20):
            x0, y0, vx, vy = S._path(np.random.default_rng(seed), size, r, direction, T, (travel, travel))
            assert np.hypot(vx, vy) * (T - 1) == pytest.approx(travel * free)
            for t in (0, T - 1):                      # the whole path stays inside the frame
                x, y = x0 + vx * t, y0 + vy * t
                assert r + 1 - 1e-6 <= x <= size - r - 1 + 1e-3 and r + 1 - 1e-6 <= y <= size - r - 1 + 1e-3
            dx, dy = S._DIR_VEC[direction]
            assert vx * dx >= 0 and vy * dy >= 0 and (travel == 0 or vx * dx + vy * dy > 0)


def test_render_video_rejects_a_bad_travel():
    with pytest.raises(ValueError, match="target_travel"):
        S.render_video(np.random.default_rng(0), 0, size=32, num_frames=4, target_travel=(0.8, 0.5))
    with pytest.raises(ValueError, match="target_travel"):
        S.render_video(np.random.default_rng(0), 0, size=32, num_frames=4, target_travel=(0.5, 1.5))


def test_more_travel_moves_the_target_further():
    """Same draws, no distractors, no grain: the target (the pixels far from the video's
    per-pixel median, i.e. from the slowly panning background) moves further between the
    first and the last frame."""
    def centroid_shift(travel):
        shifts = []
        for seed in range(6):
            v = S.render_video(np.random.default_rng(seed), 1, size=48, num_frames=12,  # identity 0, direction 1
                               distractors=0, grain=0.0, target_travel=(travel, travel)).astype(float)
            bg = np.median(v, axis=0)                 # the target moves over a slowly panning background
            cs = []
            for f in (v[0], v[-1]):
                m = np.abs(f - bg).sum(-1) > 60
                ys, xs = np.nonzero(m)
                cs.append((xs.mean(), ys.mean()))
            shifts.append(np.hypot(cs[1][0] - cs[0][0], cs[1][1] - cs[0][1]))
        return float(np.mean(shifts))
    small, large = centroid_shift(0.3), centroid_shift(0.95)
    assert large > 2 * small, (small, large)


def test_a_changed_travel_is_recorded_and_rebuilds(tmp_path):
    kw = dict(size=32, num_frames=6, identities=2, distractors=1)
    lst = S.make_study_dataset(str(tmp_path / "d"), 8, seed=1, **kw)
    man = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert "target_travel" not in man                 # the default is not written: older builds still match
    first = open(lst).read()
    video = open(first.split()[0], "rb").read()
    S.make_study_dataset(str(tmp_path / "d"), 8, seed=1, target_travel=(0.9, 1.0), **kw)
    man = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert man["target_travel"] == [0.9, 1.0]
    assert open(lst).read() == first                  # same videos and labels listed ...
    assert open(first.split()[0], "rb").read() != video   # ... but rendered again with the new travel


def test_study_build_data_passes_the_overrides(tmp_path):
    b = {**study.BUDGETS["micro"], "train_videos": 8, "test_videos": 8, "target_travel": [0.9, 1.0], "video_frames": 9}
    lists = study.build_data(tmp_path, b, lambda s: None)
    for split in ("train", "test"):
        man = json.loads((tmp_path / "data" / split / "manifest.json").read_text())
        assert man["target_travel"] == [0.9, 1.0] and man["num_frames"] == 9
        assert lists[split].endswith("list.txt")


@pytest.mark.parametrize("args, match", [
    (["--target-travel", "0.9"], "LO,HI"),
    (["--target-travel", "0.9,0.5"], "0 <= LO <= HI <= 1"),
    (["--target-travel", "a,b"], "LO,HI"),
    (["--video-frames", "3"], "shorter than the micro budget's clip"),
])
def test_bad_generator_overrides_stop_before_anything_runs(tmp_path, args, match):
    out = tmp_path / "study"
    with pytest.raises(SystemExit, match=match):
        study.main(["--budget", "micro", "--out", str(out)] + args)
    assert not out.exists()


def test_a_study_folder_refuses_another_travel(tmp_path):
    meta = {"budget": "micro", "sizes": {**study.BUDGETS["micro"], "target_travel": [0.9, 1.0]}}
    study.Results(tmp_path / "results.json", meta)
    with pytest.raises(SystemExit, match="another sizes"):
        study.Results(tmp_path / "results.json", {"budget": "micro", "sizes": dict(study.BUDGETS["micro"])})
