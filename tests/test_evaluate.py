"""Multi-view evaluation: view averaging, metrics, report files, view loading, sampling helpers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mam2_fast.evaluate import classification_metrics, multiview_probs, topk_correct, write_report
from mam2_fast.ft.data import random_resized_crop_box, segment_test_clips
from mam2_fast.ft.plots import read_png_size, write_png


class ViewLogits(torch.nn.Module):
    """Logits read from the clip: class scores = clip[:, 0, 0, 0, :K]."""

    def forward(self, clip):
        return clip[:, 0, 0, 0, :3]


def test_multiview_probs_average_softmax_over_views():
    B, V = 2, 6
    logits = torch.randn(B, V, 3)
    views = torch.zeros(B, V, 1, 1, 1, 3)
    views[..., :] = logits[:, :, None, None, None, :]
    probs = multiview_probs(ViewLogits(), views, chunk=4)                     # chunking crosses videos
    assert torch.allclose(probs, logits.softmax(-1).mean(1), atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(B))
    # averaging softmax differs from softmax of averaged logits: make sure it is the former
    assert not torch.allclose(probs, logits.mean(1).softmax(-1), atol=1e-4)


def test_metrics_topk_per_class_confusion():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0, 0.0, 0.0],
                          [0.1, 0.6, 0.3, 0.0, 0.0, 0.0],
                          [0.5, 0.1, 0.4, 0.0, 0.0, 0.0],
                          [0.0, 0.01, 0.09, 0.1, 0.1, 0.7]])
    labels = torch.tensor([0, 1, 2, 0])
    m = classification_metrics(probs, labels, names=list("abcdef"))
    assert m["top1"] == pytest.approx(50.0)
    assert m["top5"] == pytest.approx(75.0)                                    # last: label 0 is 6th
    assert m["per_class_acc"] == {"a": 50.0, "b": 100.0, "c": 0.0, "d": None, "e": None, "f": None}
    assert m["mean_class_acc"] == pytest.approx(50.0)
    cm = np.array(m["confusion"])
    assert cm[0, 0] == 1 and cm[0, 5] == 1 and cm[2, 0] == 1 and cm.sum() == 4
    assert topk_correct(probs, labels, 2).tolist() == [True, True, True, False]


@pytest.mark.parametrize("matplotlib_off", [False, True])
def test_write_report_json_and_png(tmp_path, monkeypatch, matplotlib_off):
    if matplotlib_off:
        monkeypatch.setenv("MAM2_FAST_NO_MATPLOTLIB", "1")
    probs = torch.softmax(torch.randn(5, 3), -1)
    labels = torch.tensor([0, 1, 2, 1, 0])
    m = classification_metrics(probs, labels)
    paths = write_report({"probs": probs, "labels": labels, "index": torch.arange(5)}, m, tmp_path / "ev")
    rep = json.loads(open(paths["json"]).read())
    assert rep["num_videos"] == 5 and len(rep["videos"]) == 5 and np.array(rep["confusion"]).shape == (3, 3)
    w, h = read_png_size(paths["png"])
    assert w > 10 and h > 10


def test_png_writer_roundtrip_header(tmp_path):
    img = np.zeros((5, 7, 3), np.uint8)
    img[2, 3] = (255, 0, 0)
    p = write_png(tmp_path / "x.png", img)
    assert read_png_size(p) == (7, 5)
    try:
        from PIL import Image
    except ImportError:
        return
    back = np.asarray(Image.open(p).convert("RGB"))
    assert np.array_equal(back, img)


def test_sampling_helpers():
    rng = np.random.default_rng(0)
    for _ in range(50):
        x0, y0, w, h = random_resized_crop_box(90, 120, (0.08, 1.0), (0.75, 1.333), rng)
        assert 0 <= x0 and 0 <= y0 and x0 + w <= 120 and y0 + h <= 90 and w > 0 and h > 0
    clips = segment_test_clips(48, 8, 2)
    assert len(clips) == 2 and all(len(c) == 8 for c in clips)
    assert (clips[0] < clips[1]).all() and clips[1].max() < 48
    assert len(segment_test_clips(48, 8, 1)) == 1


def test_view_data_on_demo_videos(tmp_path):
    from mam2_fast.data import make_demo_dataset
    from mam2_fast.data.config import DataConfig
    from mam2_fast.ft.data import ViewData

    lst = make_demo_dataset(str(tmp_path / "demo"), num_videos=3, seed=5, size=48, num_frames=12)
    cfg = DataConfig(list_file=lst, num_frames=4, sampling_stride=2, input_size=32, num_workers=0)
    data = ViewData(cfg, lst, num_clips=2, num_crops=3, batch_size=2)
    batches = list(data)
    assert [b["views"].shape for b in batches] == [(2, 6, 4, 3, 32, 32), (1, 6, 4, 3, 32, 32)]
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 1, 2]
    # crops of one clip differ only spatially: square demo frames -> the 3 crops coincide
    v = batches[0]["views"][0]
    assert torch.allclose(v[0], v[1]) and not torch.allclose(v[0], v[3])


@pytest.mark.slow
def test_evaluation_across_two_ranks_equals_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m mam2_fast.evaluate``: each gloo rank scores every other
    video (7 videos: shards of 4 and 3), rank 0 merges; the report equals one process's."""
    import json
    import os
    import subprocess
    import sys

    from mam2_fast.data import make_demo_dataset
    from mam2_fast.ft.config import finetune_config_from_dict
    from mam2_fast.models.classifier import build_classifier
    from mam2_fast.train.checkpoint import save_checkpoint

    lst = make_demo_dataset(str(tmp_path / "demo"), num_videos=7, seed=3, size=40, num_frames=10)
    cfg = finetune_config_from_dict({
        "model": {"preset": "tiny", "img_size": 32, "num_frames": 4, "patch_size": 16, "embed_dim": 32,
                  "depth": 1, "num_heads": 2, "num_classes": 12},
        "data": {"list_file": lst, "num_frames": 4, "sampling_stride": 2, "input_size": 32, "num_workers": 0},
        "test": {"num_clips": 2, "num_crops": 1, "batch_size": 2},
        "train": {"device": "cpu", "output_dir": str(tmp_path / "run")}})
    torch.manual_seed(0)
    model = build_classifier(cfg.model)
    save_checkpoint(tmp_path / "run", 1, {"kind": "finetune", "step": 1, "config": cfg.to_dict(),
                                          "model": model.state_dict()})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    common = ["-m", "mam2_fast.evaluate", str(tmp_path / "run"), "--list", lst, "--device", "cpu"]
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *common, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "eval.json").read_text())
    b = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert len(a["videos"]) == len(b["videos"]) == 7
    for va, vb in zip(a["videos"], b["videos"]):
        assert va["index"] == vb["index"] and va["pred"] == vb["pred"] and va["label"] == vb["label"]
        assert abs(va["score"] - vb["score"]) < 1e-5
    assert a["top1"] == b["top1"] and a["confusion"] == b["confusion"]
    assert "2 ranks" in two.stderr


def test_view_data_shards_cover_the_list_once(tmp_path):
    from mam2_fast.data import make_demo_dataset
    from mam2_fast.data.config import DataConfig
    from mam2_fast.evaluate import merge_shards
    from mam2_fast.ft.data import ViewData

    lst = make_demo_dataset(str(tmp_path / "demo"), num_videos=5, seed=5, size=40, num_frames=8)
    cfg = DataConfig(list_file=lst, num_frames=4, sampling_stride=2, input_size=32, num_workers=0)
    parts = []
    for rank in range(3):
        data = ViewData(cfg, lst, num_clips=1, num_crops=1, batch_size=2, shard=(rank, 3))
        idx = [i for b in data for i in b["index"].tolist()]
        assert idx == list(range(rank, 5, 3)) and len(data) == len(idx)
        parts.append({"probs": torch.eye(5)[idx], "labels": data.labels[idx], "index": torch.tensor(idx),
                      "skipped": []})
    merged = merge_shards(parts + [{"probs": None, "labels": None, "index": None, "skipped": ["x.mp4"]}])
    assert merged["index"].tolist() == list(range(5)) and torch.equal(merged["probs"], torch.eye(5))
    assert merged["skipped"] == ["x.mp4"]
    with pytest.raises(ValueError, match="shard"):
        ViewData(cfg, lst, num_clips=1, shard=(3, 3))
