"""Dataset converters (K400 CSV, SSv2 JSON -> list files, resize, resume, bad files), the list
parser's VideoMAE-v2 / K400 CSV / ambiguous lines, decode threads per local world size."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mam2_fast.data.official_lists import k400_filename, read_k400_csv, ssv2_class_names, ssv2_entries
from mam2_fast.data.prepare import main as prepare_main, probe_video, resize_video
from mam2_fast.data.video_list import read_list_file
from mam2_fast.errors import UserValueError


def write_video(path, w=64, h=48, frames=6, fps=10):
    import av
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libvpx" if str(path).endswith(".webm") else "mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.full((h, w, 3), (i * 30) % 255, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def video_size(path):
    import av
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(video=0))
        return s.codec_context.width, s.codec_context.height, n


K400_CSV = ("label,youtube_id,time_start,time_end,split\n"
            "zumba,aaa,10,20,train\n"
            "\"abseiling\",b-b_b,0,10,train\n"
            "zumba,ccc,5,15,train\n")
K400_VAL = "label,youtube_id,time_start,time_end,split\nabseiling,ddd,1,11,val\n"


# ----------------------------------------------------------------------------------------
# label files
# ----------------------------------------------------------------------------------------
def test_k400_filename_and_csv(tmp_path):
    assert k400_filename("abc", 10, 20) == "abc_000010_000020.mp4"
    assert k400_filename("abc", "10.0", "20.0") == "abc_000010_000020.mp4"
    (tmp_path / "t.csv").write_text(K400_CSV)
    clips, names = read_k400_csv(str(tmp_path / "t.csv"))
    assert names == ["abseiling", "zumba"]
    assert [(c.filename, c.label, c.line) for c in clips] == [
        ("aaa_000010_000020.mp4", 1, 2), ("b-b_b_000000_000010.mp4", 0, 3), ("ccc_000005_000015.mp4", 1, 4)]
    (tmp_path / "bad.csv").write_text("label,youtube_id,time_start,time_end,split\nzumba,x,ten,20,train\n")
    with pytest.raises(UserValueError, match=r"bad\.csv:2"):
        read_k400_csv(str(tmp_path / "bad.csv"))


def test_ssv2_labels_from_template(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"Putting something on something": "1",
                                                      "Approaching something with your camera": "0"}))
    (tmp_path / "train.json").write_text(json.dumps([
        {"id": "12", "label": "putting a cup on a table", "template": "Putting [something] on [something]",
         "placeholders": ["a cup", "a table"]},
        {"id": "7", "label": "approaching a dog", "template": "Approaching [something] with your camera",
         "placeholders": ["a dog"]}]))
    names = ssv2_class_names(str(tmp_path / "labels.json"))
    assert names == ["Approaching something with your camera", "Putting something on something"]
    clips = ssv2_entries(str(tmp_path / "train.json"), names)
    assert [(c.filename, c.label) for c in clips] == [("12.webm", 1), ("7.webm", 0)]
    (tmp_path / "test.json").write_text(json.dumps([{"id": "3"}]))
    with pytest.raises(UserValueError, match="template"):
        ssv2_entries(str(tmp_path / "test.json"), names)


# ----------------------------------------------------------------------------------------
# list parser
# ----------------------------------------------------------------------------------------
def test_list_parser_videomae_v2_k400_csv_and_ambiguity(tmp_path):
    (tmp_path / "pre.txt").write_text("videos/a.mp4 0 -1\nvideos/my clip.mp4 0 -1\n")
    recs = read_list_file(str(tmp_path / "pre.txt"))
    assert [(os.path.relpath(r.path, tmp_path), r.label) for r in recs] == [("videos/a.mp4", -1),
                                                                            ("videos/my clip.mp4", -1)]
    (tmp_path / "amb.txt").write_text("a.mp4 1\nclip 5 3\n")
    with pytest.raises(UserValueError, match=r"amb\.txt:2: ambiguous"):
        read_list_file(str(tmp_path / "amb.txt"))
    (tmp_path / "k.csv").write_text(K400_CSV)
    recs = read_list_file(str(tmp_path / "k.csv"), root=str(tmp_path))
    assert [(os.path.basename(r.path), r.label, r.line) for r in recs] == [
        ("aaa_000010_000020.mp4", 1, 2), ("b-b_b_000000_000010.mp4", 0, 3), ("ccc_000005_000015.mp4", 1, 4)]
    # plain lists are unchanged
    (tmp_path / "plain.txt").write_text("a.mp4 3\nb.mp4,4\n")
    assert [r.label for r in read_list_file(str(tmp_path / "plain.txt"))] == [3, 4]
    # and fine-tuning refuses the unlabelled pre-training lines, naming the line
    from mam2_fast.data.video_list import check_labels
    with pytest.raises(UserValueError, match=r"pre\.txt:1: label -1"):
        check_labels(read_list_file(str(tmp_path / "pre.txt")), 400, str(tmp_path / "pre.txt"))


def test_decode_threads_divided_by_local_world_size(monkeypatch):
    from mam2_fast.data.config import DataConfig
    from mam2_fast.data.loader import _decode_threads
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    cfg = DataConfig(num_workers=4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert _decode_threads(cfg) == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert _decode_threads(cfg) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert _decode_threads(cfg) == 1
    assert _decode_threads(DataConfig(num_workers=4, decode_threads=3)) == 3


# ----------------------------------------------------------------------------------------
# converters
# ----------------------------------------------------------------------------------------
def test_resize_video_short_side(tmp_path):
    src = tmp_path / "in.mp4"
    write_video(src, 64, 48, frames=5)
    ok, why, out = resize_video(str(src), str(tmp_path / "out.mp4"), 32)
    assert ok, why
    assert video_size(out) == (42, 32, 5)          # 64 * 32/48 = 42.7 -> even 42
    ok, why, out = resize_video(str(src), str(tmp_path / "same.mp4"), 64)   # already small: copied
    assert ok and why == "copied" and video_size(out)[:2] == (64, 48)
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    assert probe_video(str(tmp_path / "junk.mp4"))[0] is False
    ok, why, _ = resize_video(str(tmp_path / "junk.mp4"), str(tmp_path / "j.mp4"), 32)
    assert not ok and why and not (tmp_path / "j.mp4").exists()


def test_prepare_k400_resize_resume_and_bad_files(tmp_path, capsys):
    vids = tmp_path / "k400"
    write_video(vids / "train" / "aaa_000010_000020.mp4")
    write_video(vids / "train" / "zumba" / "ccc_000005_000015.mp4")     # per-class folder: found too
    (vids / "val").mkdir(parents=True)
    (vids / "val" / "ddd_000001_000011.mp4").write_bytes(b"broken")     # unreadable
    (tmp_path / "train.csv").write_text(K400_CSV)                          # b-b_b is missing
    (tmp_path / "val.csv").write_text(K400_VAL)
    out = tmp_path / "lists"
    args = ["k400", "--csv", str(tmp_path / "train.csv"), "--csv", str(tmp_path / "val.csv"), "--videos", str(vids),
            "--out", str(out), "--short-side", "32", "--workers", "1"]
    assert prepare_main(args) == 0
    err = capsys.readouterr().err
    assert "[prepare] k400 train: 2/2 (100.0%)" in err and "bad" in err
    train = read_list_file(str(out / "train.txt"))
    assert [(os.path.basename(r.path), r.label) for r in train] == [("aaa_000010_000020.mp4", 1),
                                                                    ("ccc_000005_000015.mp4", 1)]
    assert all(r.path.startswith(str(out / "videos")) for r in train)
    assert video_size(train[0].path)[1] == 32
    assert (out / "val.txt").read_text() == ""
    bad = (out / "bad_files.txt").read_text().splitlines()
    assert any(b.startswith("train\tb-b_b_000000_000010.mp4\tmissing") for b in bad)
    assert any(b.startswith("val\tddd_000001_000011.mp4\t") for b in bad)
    assert json.loads((out / "labels.json").read_text())["names"] == ["abseiling", "zumba"]
    # resumable: a rerun re-encodes nothing (outputs untouched)
    mtime = os.path.getmtime(train[0].path)
    assert prepare_main(args) == 0
    assert os.path.getmtime(train[0].path) == mtime
    s = json.loads((out / "summary.json").read_text())
    assert s["splits"]["train"] == {"listed": 2, "in_label_file": 3, "missing": 1, "unreadable": 0,
                                    "list": str(out / "train.txt")}


def test_prepare_ssv2_without_resize(tmp_path):
    vids = tmp_path / "ssv2"
    write_video(vids / "12.mp4")                    # another container than the .webm named: found by stem
    write_video(vids / "7.webm")
    (tmp_path / "labels.json").write_text(json.dumps({"Putting something on something": "1",
                                                      "Approaching something with your camera": "0"}))
    (tmp_path / "val.json").write_text(json.dumps([
        {"id": "12", "template": "Putting [something] on [something]"},
        {"id": "7", "template": "Approaching [something] with your camera"},
        {"id": "99", "template": "Approaching [something] with your camera"}]))
    out = tmp_path / "lists"
    assert prepare_main(["ssv2", "--labels", str(tmp_path / "labels.json"), "--split", f"val={tmp_path / 'val.json'}",
                         "--videos", str(vids), "--out", str(out), "--check", "--workers", "1"]) == 0
    recs = read_list_file(str(out / "val.txt"))
    assert [(os.path.basename(r.path), r.label) for r in recs] == [("12.mp4", 1), ("7.webm", 0)]
    assert "99.webm\tmissing" in (out / "bad_files.txt").read_text()
    assert prepare_main(["ssv2", "--labels", str(tmp_path / "labels.json"), "--split", "nofile",
                         "--videos", str(vids), "--out", str(out)]) == 2


def test_decode_time_short_side_resize(tmp_path):
    from mam2_fast.config import ConfigError, load_config
    from mam2_fast.data.dataset import ClipSource, TemporalSampling, resize_short_side
    from mam2_fast.data.video_list import VideoRecord
    f = np.random.default_rng(0).integers(0, 255, (3, 60, 80, 3), dtype=np.uint8)
    r = resize_short_side(f, 30)
    assert r.shape == (3, 30, 40, 3) and r.dtype == np.uint8
    assert abs(float(r.mean()) - float(f.mean())) < 2.0
    assert resize_short_side(f, 64) is f                                     # no upscaling
    assert resize_short_side(f.transpose(0, 2, 1, 3), 30).shape == (3, 40, 30, 3)   # portrait
    write_video(tmp_path / "v.mp4", 64, 48, frames=8)
    full = ClipSource([VideoRecord(str(tmp_path / "v.mp4"), 0)], TemporalSampling("dense", 4, 1)).load(0, (0, 0))
    small = ClipSource([VideoRecord(str(tmp_path / "v.mp4"), 0)], TemporalSampling("dense", 4, 1),
                       short_side=24).load(0, (0, 0))
    assert full.shape == (1, 4, 48, 64, 3) and small.shape == (1, 4, 24, 32, 3)
    with pytest.raises(ConfigError, match="decode_short_side"):
        load_config(None, ["data.decode_short_side=-1", "data.list_file=x.txt"])
