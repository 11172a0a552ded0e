"""Trainer on in-memory synthetic clips: runs, overfits, resumes exactly."""
import dataclasses
import json

import pytest
import torch

from mam2_fast.config import config_from_dict
from mam2_fast.pretrain import train
from mam2_fast.train.metrics import read_metrics
from synthetic import SyntheticData


def small_cfg(out_dir, **train_over):
    d = {
        "model": {"preset": "tiny", "img_size": 32, "num_frames": 4, "embed_dim": 64, "depth": 2,
                  "num_heads": 2, "regressor_depth": 1, "appearance_depth": 1, "motion_depth": 1},
        "tokenizer": {"kind": "kmeans", "vocab_size": 8, "kmeans_fit_clips": 8},
        "data": {"demo": True, "num_frames": 4, "input_size": 32},
        "optim": {"lr": 1e-3, "warmup_epochs": 0},
        "train": {"epochs": 3, "batch_size": 4, "output_dir": str(out_dir), "log_every": 1, "save_every": 2,
                  "device": "cpu", "precision": "fp32", "progress": False, "tensorboard": False, **train_over},
    }
    return config_from_dict(d)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def test_resume_after_kill_reproduces_next_losses(tmp_path):
    full = tmp_path / "full"
    cfg = small_cfg(full)
    train(cfg, data=SyntheticData(16, 4, 4, 32), log=lambda s: None)
    ref = losses(full)
    assert len(ref) == 12

    part = tmp_path / "part"
    cfg_a = small_cfg(part, max_steps=6)          # "killed" after the checkpoint at step 6
    train(cfg_a, data=SyntheticData(16, 4, 4, 32), log=lambda s: None)
    cfg_b = small_cfg(part)
    train(cfg_b, data=SyntheticData(16, 4, 4, 32), resume="auto", log=lambda s: None)
    got = losses(part)
    for s in range(7, 13):
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), f"step {s}: {got[s]} vs {ref[s]}"


def test_gradient_accumulation_matches_big_batch(tmp_path):
    """batch 4 x accum 1 and batch 2 x accum 2 see the same clips and masks (both keyed by the
    global position) and the same effective batch / lr: after 2 optimizer steps their weights
    agree. Not bit-exact: AdamW's first steps normalize near-zero gradients (e.g. the
    regressor's key biases), so summation-order noise there moves weights by up to ~1e-4.
    The control, batch 2 x accum 1 (half the clips per step), lands ~500x farther away;
    measured: 1.1e-3 vs 0.51 (L2 over all weights)."""
    def weights(name, batch, accum):
        cfg = small_cfg(tmp_path / name, batch_size=batch, accum_steps=accum, max_steps=2, save_every=2)
        s = train(cfg, data=SyntheticData(16, batch, 4, 32), log=lambda s: None)
        assert s["steps"] == 2
        return torch.load(tmp_path / name / "checkpoint-00000002.pt", weights_only=False)["model"]

    def dist(x, y):
        return torch.cat([(x[k].float() - y[k].float()).flatten() for k in x]).norm().item()

    big, accumulated, control = weights("a", 4, 1), weights("b", 2, 2), weights("c", 2, 1)
    assert big.keys() == accumulated.keys()
    assert dist(big, accumulated) < 0.02 * dist(big, control), (dist(big, accumulated), dist(big, control))


def test_checkpoint_files_are_complete(tmp_path):
    cfg = small_cfg(tmp_path, max_steps=4)
    s = train(cfg, data=SyntheticData(16, 4, 4, 32), log=lambda s: None)
    files = sorted(p.name for p in tmp_path.glob("checkpoint-*.pt"))
    assert files == ["checkpoint-00000002.pt", "checkpoint-00000004.pt"]
    assert (tmp_path / "latest.txt").read_text() == "checkpoint-00000004.pt"
    assert not list(tmp_path.glob(".*.tmp"))
    ck = torch.load(tmp_path / "checkpoint-00000004.pt", weights_only=False)
    assert {"model", "optimizer", "tokenizer", "step", "epoch", "micro_in_epoch", "rng", "config"} <= set(ck)
    assert ck["step"] == 4 and ck["epoch"] == 1 and ck["micro_in_epoch"] == 0


@pytest.mark.parametrize("over", [
    {"motion_target": "clip_order"},
    {"appearance_target": "pixels"},
    {"coupled_decoder": True},
    {"use_regressor": False},
    {"grad_checkpointing": True},
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_trainer_runs_each_target_and_switch(tmp_path, over):
    cfg = small_cfg(tmp_path, max_steps=2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **over))
    cfg.validate()
    s = train(cfg, data=SyntheticData(16, 4, 4, 32), log=lambda s: None)
    rec = s["last"]
    assert s["steps"] == 2 and all(v == v for v in rec.values() if isinstance(v, float))
    if over.get("motion_target") == "clip_order":
        assert "order_acc" in rec
    if over.get("appearance_target") == "pixels":
        assert "app_acc" not in rec and "loss_app" in rec
        assert not (tmp_path / "tokenizer.pt").exists()


def test_flow_target_needs_weights():
    from mam2_fast.config import ConfigError
    with pytest.raises(ConfigError, match="model.flow_weights"):
        config_from_dict({"model": {"motion_target": "flow"}, "data": {"demo": True}})


def test_videomae_baseline_trains_through_the_engine(tmp_path):
    cfg = small_cfg(tmp_path, max_steps=3)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="videomae", preset="small",
                                                             embed_dim=32, depth=1, num_heads=2, decoder_dim=16,
                                                             decoder_heads=2, appearance_depth=1),
                              mask=dataclasses.replace(cfg.mask, ratio=0.5))
    cfg.validate()
    s = train(cfg, data=SyntheticData(16, 4, 4, 32), log=lambda s: None)
    assert s["steps"] == 3 and s["last"]["loss"] > 0 and "loss_app" not in s["last"]
    ck = torch.load(tmp_path / "checkpoint-00000003.pt", weights_only=False)
    assert any(k.startswith("encoder.blocks.0") for k in ck["model"]) and ck["tokenizer"] is None


def test_fp16_trains_with_a_loss_scale_saved_and_resumed(tmp_path):
    """train.precision=fp16 (CPU autocast in fp16 here): the loss is scaled, the scale is kept in
    every checkpoint and restored on resume; a stop-and-resume run logs the same losses."""
    full, part = tmp_path / "full", tmp_path / "part"
    train(small_cfg(full, precision="fp16"), data=SyntheticData(16, 4, 4, 32), log=lambda s: None)
    ckpt = torch.load(full / "checkpoint-00000012.pt", weights_only=True)
    assert ckpt["loss_scale"]["scale"] >= 1.0 and "good_steps" in ckpt["loss_scale"]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(full).values())
    train(small_cfg(part, precision="fp16", max_steps=6), data=SyntheticData(16, 4, 4, 32), log=lambda s: None)
    train(small_cfg(part, precision="fp16"), data=SyntheticData(16, 4, 4, 32), resume="auto", log=lambda s: None)
    ref, got = losses(full), losses(part)
    for s in range(7, 13):
        assert got[s] == pytest.approx(ref[s], rel=1e-4, abs=1e-5), f"step {s}: {got[s]} vs {ref[s]}"
    assert torch.load(part / "checkpoint-00000012.pt", weights_only=True)["loss_scale"] == ckpt["loss_scale"]
