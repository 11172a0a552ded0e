"""Dry runs of every entry point on the stand-in device (torch's ``meta``), at real widths.

The GPU path has never run where CI runs. On ``meta`` tensors carry shapes and dtypes but no
memory, and a tensor left on the CPU inside a device computation fails with "Tensor on device
meta is not on the expected device cpu" -- the same mistake that crashes on CUDA. With the
engine's accelerator seam (:mod:`mam2_fast.train.accel`) pointed at ``meta``, one full step of
each entry point runs here with the GPU branches taken: bf16 autocast (emulated on the
stand-in), fused kernels through their fake impls, the prefetch side stream, host reads at
the log step (placeholders), checkpoints.

Entry points: pre-training (every mask kind; VQGAN, DALL-E, k-means and pixel appearance
targets; RGB-difference, flow and clip-order motion targets; the VideoMAE baseline),
fine-tuning (every RandAugment op, mixup and cutmix, on the real batch assembly), multi-view
evaluation, the linear probe's feature pass, the profiler's step, and the step and kernel
benchmarks. Widths are ViT-B's (768, 12 heads, 16 x 224 x 224); depths are cut to 1-2 blocks
to keep the CPU-side model construction short (depth adds no new code path).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mam2_fast.train import accel

META = torch.device("meta")
ROOT = Path(__file__).resolve().parent.parent

VIT_B = {"preset": "base", "img_size": 224, "num_frames": 16, "patch_size": 16, "embed_dim": 768,
         "num_heads": 12, "depth": 2}


def on_meta(cfg):
    """``cfg`` with ``train.device = meta`` (the config validator only knows real devices)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="meta"))


# ----------------------------------------------------------------------------------------
# RandAugment: every op on a stand-in clip (how issue 13 found the equalize bug)
# ----------------------------------------------------------------------------------------
def _every_op_plan():
    from mam2_fast.ft.randaugment import _ENHANCE, OPS
    plan = []
    for name, (_, to_arg, _) in OPS.items():
        arg = to_arg(9.0)                      # the policy magnitude m = 9
        plan.append((name, 1.0 + arg if name in _ENHANCE else arg))
    return plan


@pytest.mark.parametrize("name,arg", _every_op_plan(), ids=lambda v: v if isinstance(v, str) else "")
def test_randaugment_op_on_stand_in(name, arg):
    from mam2_fast.ft.randaugment import RandAugment
    clip = torch.empty(16, 3, 224, 224, device=META)
    out = RandAugment.apply(clip, [(name, arg)])
    assert out.device == META and out.shape == clip.shape and out.dtype == torch.float32


# ----------------------------------------------------------------------------------------
# pre-training: train() for one optimizer step on the stand-in
# ----------------------------------------------------------------------------------------
class StandInClips:
    """The ``PretrainData`` interface, yielding normalized stand-in clips (as the GPU loader
    hands them over: already on the device)."""

    def __init__(self, batch: int, frames: int, size: int, dtype: torch.dtype, steps: int = 2):
        self.shape, self.dtype, self.steps_per_epoch = (batch, frames, 3, size, size), dtype, steps

    def iter_epoch(self, epoch: int, start_step: int = 0):
        for pos in range(start_step, self.steps_per_epoch):
            yield pos, {"clip": torch.empty(self.shape, device=META, dtype=self.dtype)}

    def stats(self) -> dict:
        return {}


def random_weight_tokenizer(tcfg, patch_size: int):
    """VQGAN / DALL-E tokenizers with random weights (no checkpoint), others as configured."""
    kw = dict(patch_size=patch_size, resize_mode=tcfg.resize_mode, dtype=tcfg.dtype, chunk_frames=tcfg.chunk_frames)
    if tcfg.kind == "vqgan":
        from mam2_fast.targets.vqgan import VQGANTokenizer
        return VQGANTokenizer(tcfg.preset or "vqgan_imagenet_f16_16384", **kw)
    if tcfg.kind == "dalle":
        from mam2_fast.targets.dalle import DalleTokenizer
        return DalleTokenizer(**kw)
    from mam2_fast.targets.tokenizer import build_tokenizer
    return build_tokenizer(tcfg, patch_size)


class StandInFlowNet(nn.Module):
    """RAFT's call signature, a convolution for its network (torchvision is not installed
    here; with it, the real RAFT architecture with random weights is used)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, a, b, num_flow_updates: int = 12):
        return [self.conv(torch.cat([a, b], dim=1))]


def random_weight_raft(weights_path, variant="raft_large"):
    if importlib.util.find_spec("torchvision") is not None:
        from torchvision.models import optical_flow
        return getattr(optical_flow, variant)(weights=None, progress=False).eval().requires_grad_(False)
    return StandInFlowNet().eval().requires_grad_(False)


PRETRAIN_CASES = {
    # id: (mask kind, model overrides, tokenizer)
    "tube-vqgan-rgbdiff-fused": ("tube", {"kernels": "fused"}, {"kind": "vqgan", "preset": "vqgan_imagenet_f16_16384"}),
    "random-dalle-rgbdiff-fused": ("random", {"kernels": "fused"}, {"kind": "dalle"}),
    "cube-kmeans-cliporder": ("cube", {"motion_target": "clip_order"}, {"kind": "kmeans", "vocab_size": 64}),
    "frame-pixels-flow-fused": ("frame", {"kernels": "fused", "appearance_target": "pixels", "motion_target": "flow",
                                          "flow_weights": "raft.pth"}, {"kind": "kmeans"}),
    "random-kmeans-reference": ("random", {"kernels": "reference"}, {"kind": "kmeans", "vocab_size": 64}),
    "videomae-baseline-fused": ("tube", {"arch": "videomae", "kernels": "fused"}, {"kind": "kmeans"}),
}


def pretrain_config(tmp_path, mask: str, model: dict, tokenizer: dict, batch: int = 4):
    from mam2_fast.config import config_from_dict
    cfg = config_from_dict({
        "model": {**VIT_B, "regressor_depth": 1, "appearance_depth": 1, "motion_depth": 1, **model},
        "mask": {"kind": mask, "ratio": 0.9 if mask == "random" else 0.75},
        "tokenizer": tokenizer,
        "data": {"num_frames": 16, "input_size": 224, "num_sample": 2, "out_dtype": "bfloat16",
                 "list_file": "unread.txt"},
        "optim": {"clip_grad": 1.0},
        "train": {"batch_size": batch, "max_steps": 1, "epochs": 1, "log_every": 1, "output_dir": str(tmp_path / "run"),
                  "precision": "auto", "prefetch": -1, "progress": False, "tensorboard": False},
    })
    return on_meta(cfg)


@pytest.mark.parametrize("case", list(PRETRAIN_CASES))
def test_pretrain_step_on_stand_in(case, tmp_path, monkeypatch):
    from mam2_fast import pretrain
    from mam2_fast.targets import flow

    mask, model, tokenizer = PRETRAIN_CASES[case]
    monkeypatch.setattr(pretrain, "build_tokenizer", random_weight_tokenizer)
    monkeypatch.setattr(pretrain, "check_target_files", lambda cfg: None)   # random weights stand in
    monkeypatch.setattr(flow, "load_raft", random_weight_raft)
    cfg = pretrain_config(tmp_path, mask, model, tokenizer)
    data = StandInClips(cfg.train.batch_size, 16, 224, torch.bfloat16)
    summary = pretrain.train(cfg, data=data, log=lambda s: None)
    assert summary["steps"] == 1
    assert summary["checkpoint"] is not None and Path(summary["checkpoint"]).is_file()
    assert "loss" in summary["last"]


def test_stand_in_takes_the_gpu_paths():
    """The stand-in device gets what CUDA gets: bf16 autocast, a prefetch thread on a side
    stream, a bf16 run dtype; the CPU keeps fp32 and inline batches."""
    from mam2_fast.data.prefetch import Prefetcher, auto_depth
    from mam2_fast.pretrain import autocast_for

    assert auto_depth(-1, META) == 1 and auto_depth(-1, torch.device("cpu")) == 0
    with autocast_for(META, "auto"):
        y = nn.Linear(8, 8).to(META)(torch.empty(2, 8, device=META))
    assert y.dtype == torch.bfloat16
    items = list(Prefetcher(({"x": torch.empty(3, device=META)} for _ in range(3)), META, depth=1))
    assert len(items) == 3 and all(i["x"].device == META for i in items)
    assert accel.new_stream(META) is not None and accel.new_stream("cpu") is None


# ----------------------------------------------------------------------------------------
# fine-tuning: the real batch assembly (crop/resize/normalize, every RandAugment op) + train()
# ----------------------------------------------------------------------------------------
def write_list_file(path: Path, videos: int = 4, classes: int = 4) -> str:
    path.write_text("".join(f"video{i}.mp4 {i % classes}\n" for i in range(videos)))
    return str(path)


class EveryOp:
    """RandAugment stand-in that applies every op of the policy to each clip."""

    def __call__(self, clip, g):
        from mam2_fast.ft.randaugment import RandAugment
        return RandAugment.apply(clip.float(), _every_op_plan())


class StandInFinetuneData:
    """``FinetuneTrainData`` with its decode step replaced by uint8 frames already on the
    host: each batch goes through the real ``_make_batch`` (upload, crop/resize/normalize,
    RandAugment on the device) on the stand-in."""

    def __init__(self, cfg, list_file: str, steps: int = 2):
        from mam2_fast.ft.data import FinetuneTrainData
        data_cfg = dataclasses.replace(cfg.data, list_file=list_file)
        self.inner = FinetuneTrainData(data_cfg, cfg.aug, batch_size=cfg.train.batch_size, seed=0, device=META)
        self.inner.randaug = EveryOp()
        self.steps_per_epoch = steps
        self.cfg = data_cfg

    def iter_epoch(self, epoch: int, start_step: int = 0):
        S, T = self.cfg.num_sample, self.cfg.num_frames
        n = self.inner.videos_per_step
        for pos in range(start_step, self.steps_per_epoch):
            videos = [(pos * n + v, v, torch.zeros(S, T, 240, 320, 3, dtype=torch.uint8)) for v in range(n)]
            yield pos, self.inner._make_batch(epoch, videos)

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        self.inner.close()


def finetune_config(tmp_path, mixup: float, cutmix: float):
    from mam2_fast.ft.config import finetune_config_from_dict
    cfg = finetune_config_from_dict({
        "model": {**VIT_B, "num_classes": 4, "kernels": "fused"},
        "data": {"num_frames": 16, "input_size": 224, "num_sample": 2, "out_dtype": "bfloat16",
                 "list_file": "unread.txt"},
        "aug": {"mixup": mixup, "cutmix": cutmix, "mixup_prob": 1.0},
        "optim": {"clip_grad": 1.0},
        "train": {"batch_size": 4, "max_steps": 1, "epochs": 1, "log_every": 1, "output_dir": str(tmp_path / "ft"),
                  "precision": "auto", "prefetch": -1, "progress": False, "tensorboard": False},
    })
    return on_meta(cfg)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_finetune_step_on_stand_in(mix, tmp_path):
    from mam2_fast import finetune
    cfg = finetune_config(tmp_path, mixup=0.8 if mix == "mixup" else 0.0, cutmix=1.0 if mix == "cutmix" else 0.0)
    data = StandInFinetuneData(cfg, write_list_file(tmp_path / "train.txt"))
    summary = finetune.train(cfg, data=data, test_list=None, log=lambda s: None)
    assert summary["steps"] == 1 and summary["checkpoint"] is not None


# ----------------------------------------------------------------------------------------
# multi-view evaluation and the probe's feature pass
# ----------------------------------------------------------------------------------------
class StandInViews:
    """``ViewData`` with decoding replaced by host uint8 frames: each batch goes through the
    real ``_views`` (upload + crops on the device) and ``_collate``."""

    def __init__(self, cfg, list_file: str, clips: int = 2, crops: int = 3, batch: int = 2):
        from mam2_fast.ft.data import ViewData
        self.inner = ViewData(cfg.data, list_file, clips, crops, "dense", batch, META)
        self.list_file, self.skipped, self.records = list_file, [], self.inner.records

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        views, K, T = [], self.inner.num_clips, self.inner.cfg.num_frames
        for i in range(len(self.inner)):
            views.append((i, self.inner._views(torch.zeros(K, T, 240, 320, 3, dtype=torch.uint8))))
            if len(views) == self.inner.batch_size:
                yield self.inner._collate(views)
                views = []
        if views:
            yield self.inner._collate(views)


def test_multiview_evaluation_on_stand_in(tmp_path):
    from mam2_fast.evaluate import classification_metrics, run_views, write_report
    from mam2_fast.models.classifier import build_classifier
    from mam2_fast.pretrain import autocast_for

    cfg = finetune_config(tmp_path, 0.8, 1.0)
    model = build_classifier(cfg.model).to(META)
    data = StandInViews(cfg, write_list_file(tmp_path / "val.txt", videos=3))
    result = run_views(model, data, META, autocast_for(META, "auto"))
    assert result["probs"].shape == (3, 4) and result["probs"].device.type == "cpu"
    metrics = classification_metrics(result["probs"], result["labels"])
    paths = write_report(result, metrics, tmp_path / "eval")
    assert Path(paths["json"]).is_file()


def test_probe_features_on_stand_in(tmp_path):
    from mam2_fast.models.classifier import build_encoder
    from mam2_fast.probe import extract_features

    cfg = finetune_config(tmp_path, 0.8, 1.0)
    enc = build_encoder(cfg.model).to(META).eval()
    data = StandInViews(cfg, write_list_file(tmp_path / "probe.txt", videos=3), clips=1, crops=3)
    for pool in ("mean", "time", "grid"):
        feats, labels = extract_features({"pretrained": enc}, data, META, pool=pool)
        assert feats["pretrained"].shape[:2] == (3, 3) and feats["pretrained"].device.type == "cpu"
        assert labels.shape == (3,)


# ----------------------------------------------------------------------------------------
# profile and the benchmarks' step functions
# ----------------------------------------------------------------------------------------
def test_profile_on_stand_in(tmp_path, monkeypatch):
    from mam2_fast.config import config_from_dict
    from mam2_fast.profile import format_report, run_profile

    cfg = on_meta(config_from_dict({
        "model": {**VIT_B, "regressor_depth": 1, "appearance_depth": 1, "motion_depth": 1, "kernels": "fused"},
        "tokenizer": {"kind": "vqgan", "preset": "vqgan_imagenet_f16_16384"},
        "data": {"num_frames": 16, "input_size": 224, "out_dtype": "bfloat16",
                 "list_file": "unread.txt"},
        "train": {"batch_size": 4, "precision": "auto", "output_dir": str(tmp_path)},
    }))
    res = run_profile(cfg, warmup=1, steps=1, trace_steps=1, output_dir=str(tmp_path / "prof"), log=lambda s: None)
    assert res["device"] == accel.STAND_IN_NAME and res["max_memory_gib"] == 0.0
    assert "step" in format_report(res)


@pytest.fixture
def benchmarks_on_path():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    yield
    sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("variant", ["eager", "fused"])
def test_bench_step_on_stand_in(variant, benchmarks_on_path):
    import bench_step
    shallow = ["model.depth=2", "model.regressor_depth=1", "model.appearance_depth=1", "model.motion_depth=1"]
    args = SimpleNamespace(tokenizer="vqgan", smoke=False, override=shallow, warmup=1, iters=1, repeats=1,
                           peak_tflops=None, verbose=True)
    row = bench_step.bench_one("B", 8, variant, args, META)
    assert "error" not in row, row
    assert row["device"] == accel.STAND_IN_NAME


def test_bench_kernels_on_stand_in(benchmarks_on_path, capsys):
    import bench_kernels
    # smoke=True only picks host timing (perf_counter instead of triton's do_bench); the shapes are ViT-B's
    args = SimpleNamespace(models=["B"], batch=[32], masks=[0.75, 0.9], frames=16, image=224, classes=16384,
                           smoke=True)
    tables = []
    for op in (bench_kernels.bench_attention, bench_kernels.bench_varlen, bench_kernels.bench_gather,
               bench_kernels.bench_rgb, bench_kernels.bench_ce):
        tables += op(args, META, torch.bfloat16)
    checked = 0
    for tab in tables:
        for shape, variant, ms_f, ms_fb, _, _, note in tab.rows:
            if variant in ("reference", "fused (triton)", "packed (triton)", "grid+valid (triton)"):
                assert not note and ms_f is not None and ms_fb is not None, (tab.title, shape, variant, note)
                checked += 1
    assert checked >= 20


def test_bench_videomae_ours_on_stand_in(benchmarks_on_path):
    """Our side of the VideoMAE comparison (the official code indexes with boolean masks, a
    data-dependent shape the stand-in cannot carry; it runs on the GPU host only)."""
    import bench_videomae
    from mam2_fast.models.videomae import videomae_config
    args = SimpleNamespace(smoke=False, warmup=1, iters=1, repeats=1, peak_tflops=None)
    row = bench_videomae.bench_variant("ours", None, videomae_config("base"), 8, args, META)
    assert "error" not in row, row
    assert row["max_gib"] == 0.0


def test_cuda_graph_timing_skips_a_variant_that_syncs_on_the_host(benchmarks_on_path, monkeypatch):
    """--cuda-graphs: a variant that would wait for the device from the host inside the capture
    (``.item()``, nonzero, ...) is found by an eager run under sync debug mode "error" and timed
    eagerly, never captured (a capture failing half-way left CUDA state broken on the H200);
    the debug mode is restored. Simulated: this CPU build has no sync debug mode."""
    import bench_kernels

    state = {"mode": 0}
    captured = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: state["mode"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: state.update(mode=m))
    monkeypatch.setattr(bench_kernels, "CUDA_GRAPHS", True)
    monkeypatch.setattr(bench_kernels, "graphed", lambda fn: captured.append(fn) or fn)
    monkeypatch.setattr(bench_kernels, "bench", lambda fn, smoke: (fn(), 2.0)[1])
    monkeypatch.setattr(accel, "synchronize", lambda *a: None)

    x = torch.randn(5, requires_grad=True)

    def syncing():                      # .item() under mode "error" raises, as CUDA's would
        if state["mode"] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
        return (x * 2).sum()

    ms_f, ms_fb, note = bench_kernels.run_variant(syncing, [x], smoke=False)
    assert (ms_f, ms_fb) == (2.0, 2.0) and note.startswith("no graph (host sync: called a synchronizing")
    assert captured == [] and state["mode"] == 0

    ms_f, ms_fb, note = bench_kernels.run_variant(lambda: (x * 3).sum(), [x], smoke=False)
    assert note == "graph" and len(captured) == 2 and state["mode"] == 0


def test_device_time_option_times_through_device_time(benchmarks_on_path, monkeypatch):
    """--device-time: bench() hands each call to kernels.device_time on the run's device and
    counts the measurements that could not be queued ahead of the device."""
    import bench_kernels
    from mam2_fast.kernels import device_time

    seen = []

    def fake(fn, device, warmup, reps):
        fn()
        seen.append(device)
        return device_time.DeviceTiming(0.25, 1.0, queued=len(seen) == 1)
    monkeypatch.setattr(device_time, "device_time", fake)
    monkeypatch.setattr(bench_kernels, "DEVICE_TIME", True)
    monkeypatch.setattr(bench_kernels, "DEVICE", META)
    monkeypatch.setattr(bench_kernels, "_HOST_GAPS", [0])
    calls = []
    assert bench_kernels.bench(lambda: calls.append(1), smoke=False) == 0.25
    assert bench_kernels.bench(lambda: calls.append(1), smoke=False) == 0.25
    assert seen == [META, META] and len(calls) == 2 and bench_kernels._HOST_GAPS == [1]
    # smoke keeps the host clock
    monkeypatch.setattr(bench_kernels, "DEVICE_TIME", True)
    bench_kernels.bench(lambda: calls.append(1), smoke=True)
    assert len(seen) == 2
