"""Readable pictures (issue 18): loss curves with a title, numbered axes and a legend; visualize
panels with row titles; confusion matrices -- drawn with Pillow (matplotlib forced off)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mam2_fast.ft import plots


@pytest.fixture(autouse=True)
def _pillow_only(monkeypatch):
    monkeypatch.setenv("MAM2_FAST_NO_MATPLOTLIB", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _open(path) -> np.ndarray:
    im = Image.open(path)
    assert im.format == "PNG"
    assert im.mode == "RGB"
    return np.asarray(im)


def _inked(a: np.ndarray, box, bg=plots.BACKGROUND) -> int:
    """Pixels in ``box`` (x0, y0, x1, y1) that differ from the background."""
    x0, y0, x1, y1 = (int(v) for v in box)
    region = a[max(y0, 0):y1, max(x0, 0):x1].astype(int)
    return int((np.abs(region - np.array(bg)).sum(-1) > 60).sum())


def _records(n=40):
    return [{"step": 10 * i, "loss": 3.0 * np.exp(-i / 10) + 0.2, "loss_app": 2.0 * np.exp(-i / 12),
             "app_acc": 0.5 * (1 - np.exp(-i / 15))} for i in range(n)]


def test_curves_png_has_title_ticks_and_legend(tmp_path):
    p = plots.save_curves_png(_records(), ("loss", "loss_app", "app_acc", "absent"), tmp_path / "c" / "curves.png",
                              title="runs/demo")
    a = _open(p)
    img, lay = plots.render_curves(_records(), ("loss", "loss_app", "app_acc", "absent"), title="runs/demo")
    assert a.shape == (img.height, img.width, 3) and lay["size"] == (img.width, img.height)
    assert img.width >= 400 and img.height >= 200

    # the title strip carries text
    tx0, ty0, tx1, ty1 = lay["title_box"]
    assert ty1 <= lay["panels"][0]["box"][1]
    assert _inked(a, (0, 0, a.shape[1], ty1 + 2)) > 30

    # losses share a panel (two legend entries), the accuracy has its own
    assert [p["title"] for p in lay["panels"]] == ["loss", "accuracy"]
    loss_panel, acc_panel = lay["panels"]
    assert [e["label"] for e in loss_panel["legend"]] == ["loss", "loss_app"]
    assert [e["label"] for e in acc_panel["legend"]] == ["app_acc"]
    cols = [e["color"] for e in loss_panel["legend"] + acc_panel["legend"]]
    assert len(set(cols)) == 3
    for e in loss_panel["legend"]:
        assert _inked(a, e["box"]) > 20                            # swatch + label drawn
    # both series' colours are present in the file (curves + legend swatches)
    flat = a.reshape(-1, 3)
    for c in cols:
        assert (np.abs(flat.astype(int) - np.array(c)).sum(-1) < 10).sum() > 20, c

    # numbered ticks on both axes, spanning the data, each label drawn
    for panel in lay["panels"]:
        for axis in ("xticks", "yticks"):
            ticks = panel[axis]
            assert len(ticks) >= 3, (panel["title"], axis)
            for t in ticks:
                unit = {"k": 1e3, "M": 1e6}.get(t["label"][-1], 1)
                assert float(t["label"].rstrip("kM")) * unit == pytest.approx(t["value"], rel=1e-6, abs=1e-9)
                assert _inked(a, t["box"]) > 3
    xs = [t["value"] for t in loss_panel["xticks"]]
    assert min(xs) <= 100 and max(xs) >= 300                        # steps 0..390
    ys = [t["value"] for t in loss_panel["yticks"]]
    assert min(ys) <= 1.0 and max(ys) >= 2.5                       # loss 0..3.2


def test_two_series_two_legend_entries_and_single_points(tmp_path):
    img, lay = plots.render_line_panels(
        [{"title": "t", "ylabel": "v", "series": [("a", [0, 1, 2], [1, 2, 3]), ("b", [1], [5.0])]}], "two series")
    assert len(lay["panels"][0]["legend"]) == 2
    a = np.asarray(img)
    for e in lay["panels"][0]["legend"]:
        assert (np.abs(a.reshape(-1, 3).astype(int) - np.array(e["color"])).sum(-1) < 10).sum() > 10


def test_curves_without_keys_or_with_nonfinite_values(tmp_path):
    with pytest.raises(ValueError, match="none of"):
        plots.save_curves_png([{"step": 1, "x": 1}], ("loss",), tmp_path / "x.png")
    recs = [{"step": 0, "loss": float("nan")}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": float("inf")},
            {"step": 3, "loss": 0.5}]
    p = plots.save_curves_png(recs, ("loss",), tmp_path / "nan.png")
    assert Image.open(p).size[0] > 100


def test_nice_ticks_and_labels():
    assert plots.nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert plots.nice_ticks(0.3, 5.3) == [1, 2, 3, 4, 5]
    t = plots.nice_ticks(120000, 122000)
    assert t[0] >= 120000 and t[-1] <= 122000 and len(t) >= 3
    assert plots.format_tick(0.25, 0.05) == "0.25"
    assert plots.format_tick(2.5, 2.5) == "2.5"
    assert plots.format_tick(40000, 10000) == "40k"
    assert plots.format_tick(3, 1) == "3"
    assert plots.nice_ticks(2.0, 2.0)                              # constant series still get ticks


def test_image_grid_row_titles(tmp_path):
    rng = np.random.default_rng(0)
    names = ["input frames", "mask (dark = masked)", "target: RGB diff", "prediction: RGB diff"]
    rows = [(n, [rng.random((16, 16, 3)) for _ in range(3)]) for n in names]
    p = plots.save_image_grid(rows, tmp_path / "g.png", title="clip title", col_titles=["frame 0", "frame 1", "frame 2"])
    a = _open(p)
    img, lay = plots.render_image_grid(rows, title="clip title", col_titles=["frame 0", "frame 1", "frame 2"])
    assert a.shape == (img.height, img.width, 3)
    assert [r["title"] for r in lay["rows"]] == names
    assert _inked(a, (0, 0, a.shape[1], lay["title_box"][3] + 1)) > 30
    first_cell_x = lay["rows"][0]["cells"][0][0]
    for r in lay["rows"]:
        x0, y0, x1, y1 = r["label_box"]
        assert x1 <= first_cell_x and _inked(a, (0, y0, first_cell_x - 1, y1), bg=(255, 255, 255)) > 30
        assert len(r["cells"]) == 3 and r["cells"][0][2] - r["cells"][0][0] >= 64    # upscaled to be seen
    for b in lay["col_boxes"]:
        assert _inked(a, b) > 5
    # the images themselves are pasted unchanged (nearest upscaling)
    x0, y0, x1, y1 = lay["rows"][1]["cells"][2]
    s = (x1 - x0) // 16
    tile = a[y0:y1:s, x0:x1:s]
    assert np.abs(tile.astype(int) - (rows[1][1][2] * 255 + 0.5).astype(int)).max() <= 1


def test_confusion_png_has_title_and_names(tmp_path):
    cm = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    p = plots.save_confusion_png(cm, ["walk", "run", "jump"], tmp_path / "cm.png", title="top-1 75.0%")
    a = _open(p)
    img, lay = plots.render_confusion(cm, ["walk", "run", "jump"], title="top-1 75.0%")
    assert a.shape == (img.height, img.width, 3)
    assert _inked(a, (0, 0, a.shape[1], lay["title_box"][3] + 1)) > 30
    mx0, my0, mx1, my1 = lay["matrix_box"]
    assert _inked(a, (0, my0, mx0 - 1, my1)) > 30                   # class names left of the matrix


def test_visualize_panels_have_row_titles(tmp_path):
    from mam2_fast.config import ModelConfig
    from mam2_fast.masking import MaskGenerator
    from mam2_fast.models.mam2 import build_model
    from mam2_fast.targets.tokenizer import KMeansTokenizer
    from mam2_fast.visualize import ROW_TITLES, clip_panels

    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", img_size=32, num_frames=4, embed_dim=32, depth=1, num_heads=2,
                      regressor_depth=1, appearance_depth=1, motion_depth=1)
    tok = KMeansTokenizer(vocab_size=8, patch_size=16).fit(torch.rand(2, 4, 3, 32, 32))
    model = build_model(cfg, vocab_size=8).eval()
    mean, std = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)
    clip = torch.randn(1, 4, 3, 32, 32)
    info = MaskGenerator("tube", 0.5, 4, (2, 2))(1, torch.Generator().manual_seed(0))
    rows, stats = clip_panels(model, tok, clip, info, mean, std)
    titles = [r[0] for r in rows]
    assert titles == list(ROW_TITLES.values())
    assert titles[0].startswith("input") and "mask" in titles[1]
    assert sum(t.startswith("target") for t in titles) == 2 and sum(t.startswith("prediction") for t in titles) == 2
    assert all(len(imgs) == 4 for _, imgs in rows)
    p = plots.save_image_grid(rows, tmp_path / "clip0.png", title="demo  " + str(stats),
                              col_titles=[f"frame {t}" for t in range(4)])
    a = _open(p)
    _, lay = plots.render_image_grid(rows, title="demo", col_titles=[f"frame {t}" for t in range(4)])
    first_cell_x = lay["rows"][0]["cells"][0][0]
    for r in lay["rows"]:
        assert _inked(a, (0, r["label_box"][1], first_cell_x - 1, r["label_box"][3]), bg=(255, 255, 255)) > 30


def test_matplotlib_path_when_installed(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("MAM2_FAST_NO_MATPLOTLIB")
    assert plots.have_matplotlib()
    p = plots.save_curves_png(_records(), ("loss", "loss_app", "app_acc"), tmp_path / "m.png", title="mpl")
    rows = [("input frames", [np.zeros((8, 8, 3))] * 2), ("prediction", [np.ones((8, 8, 3))] * 2)]
    g = plots.save_image_grid(rows, tmp_path / "g.png", title="t", col_titles=["frame 0", "frame 1"])
    c = plots.save_confusion_png(np.eye(3, dtype=int), ["a", "b", "c"], tmp_path / "cm.png", title="t")
    for f in (p, g, c):
        assert Image.open(f).size[0] > 100


def test_visualize_cli_writes_titled_clip_panels_and_curves(tmp_path, capsys):
    """``python -m mam2_fast.visualize CKPT``: a small pre-training checkpoint, the demo videos."""
    import json

    from mam2_fast.config import load_config
    from mam2_fast.models.mam2 import build_model
    from mam2_fast.targets.tokenizer import build_tokenizer
    from mam2_fast.visualize import main

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml",
                      ["model.img_size=32", "model.num_frames=4", "data.num_frames=4", "data.input_size=32",
                       "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.regressor_depth=1",
                       "model.appearance_depth=1", "tokenizer.vocab_size=8", f"data.demo_dir={run / 'demo'}",
                       "data.demo_num_videos=2"])
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.tokenizer, cfg.model.patch_size)
    tok.fit(torch.rand(2, 4, 3, 32, 32))
    model = build_model(cfg.model, vocab_size=8, pixel_mean=tuple(cfg.data.mean), pixel_std=tuple(cfg.data.std))
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "tokenizer": tok.state_dict()},
               run / "checkpoint-00000010.pt")
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(10):
            f.write(json.dumps({"step": s, "loss": 3 - 0.1 * s, "loss_app": 2 - 0.1 * s, "loss_motion": 0.5,
                                "loss_align": 0.1, "app_acc": 0.05 * s}) + "\n")
    assert main([str(run / "checkpoint-00000010.pt"), "--clips", "1"]) == 0
    written = json.loads(capsys.readouterr().out)["written"]
    assert [Path(p).name for p in written] == ["clip0.png", "curves.png"]
    clip = _open(written[0])
    assert clip.shape[0] > 6 * 64 and clip.shape[1] > 4 * 64                 # 6 titled rows x 4 frames
    assert _inked(clip, (0, 0, clip.shape[1], 28)) > 30                       # title strip
    assert _inked(clip, (0, 40, 100, clip.shape[0])) > 200                    # row-title column
    curves = _open(written[1]).reshape(-1, 3).astype(int)
    for c in plots.SERIES_COLORS[:5]:                                         # 4 losses + app_acc
        assert (np.abs(curves - np.array(c)).sum(-1) < 10).sum() > 10, c
