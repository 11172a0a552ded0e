"""Fine-tuning: layer-wise lr decay groups, mixup/cutmix label math, RandAugment across frames,
configs (Table 8), and a tiny train -> checkpoint -> resume loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mam2_fast.finetune import DEMO_YAML, demo_config_dict, train
from mam2_fast.ft.config import ClassifierConfig, finetune_config_from_dict, load_finetune_config
from mam2_fast.ft.mixup import Mixup, cutmix_box, mixed_targets, smooth_one_hot, soft_target_cross_entropy
from mam2_fast.ft.randaugment import OPS, RandAugment
from mam2_fast.models.classifier import VideoClassifier, layer_id_for, param_groups_layer_decay

TINY = dict(preset="tiny", img_size=32, num_frames=2, patch_size=16, embed_dim=32, depth=2, num_heads=2,
            num_classes=4)


def tiny_classifier(**kw) -> VideoClassifier:
    return VideoClassifier(ClassifierConfig(**{**TINY, **kw}))


# ----------------------------------------------------------------------------------------
# layer-wise lr decay
# ----------------------------------------------------------------------------------------
def test_layer_decay_groups():
    model = tiny_classifier()
    depth, decay = 2, 0.75
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=decay)
    seen = {}
    for g in groups:
        for name in g["param_names"]:
            seen[name] = (g["lr_scale"], g["weight_decay"])
    assert set(seen) == {n for n, _ in model.named_parameters()}        # every parameter, once
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert seen["patch_embed.weight"][0] == pytest.approx(decay ** (depth + 1))
    assert seen["pos_embed_time"] == (pytest.approx(decay ** (depth + 1)), 0.0)
    assert seen["blocks.0.attn.qkv.weight"] == (pytest.approx(decay ** depth), 0.05)
    assert seen["blocks.1.mlp.fc1.weight"][0] == pytest.approx(decay ** (depth - 1))
    assert seen["blocks.1.mlp.fc1.bias"][1] == 0.0                       # no decay on biases
    assert seen["blocks.0.norm1.weight"][1] == 0.0                       # nor on norms
    for name in ("norm.weight", "fc_norm.weight", "head.weight"):
        assert seen[name][0] == pytest.approx(1.0)
    assert seen["head.weight"][1] == 0.05
    assert layer_id_for("blocks.11.attn.proj.weight", 12) == 12


# ----------------------------------------------------------------------------------------
# mixup / cutmix
# ----------------------------------------------------------------------------------------
def test_label_smoothing_targets():
    y = smooth_one_hot(torch.tensor([0, 2]), 4, smoothing=0.1)
    assert torch.allclose(y[0], torch.tensor([0.925, 0.025, 0.025, 0.025]))
    assert torch.allclose(y.sum(1), torch.ones(2))
    m = mixed_targets(torch.tensor([0, 1, 2, 3]), 4, lam=0.7, smoothing=0.0)
    # clip i is mixed with clip B-1-i
    assert torch.allclose(m[0], torch.tensor([0.7, 0.0, 0.0, 0.3]))
    assert torch.allclose(m[1], torch.tensor([0.0, 0.7, 0.3, 0.0]))
    # cross-entropy to a one-hot soft target equals the usual one
    logits = torch.randn(3, 5)
    t = torch.tensor([1, 4, 0])
    assert torch.allclose(soft_target_cross_entropy(logits, smooth_one_hot(t, 5, 0.0)),
                          torch.nn.functional.cross_entropy(logits, t))


def test_mixup_blends_clips_and_labels():
    x = torch.randn(4, 2, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=4)
    out, soft, lam = mix(x, y, np.random.default_rng(0))
    assert 0 < lam < 1
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert torch.allclose(soft[0, 0], torch.tensor(lam)) and torch.allclose(soft[0, 3], torch.tensor(1 - lam))


def test_cutmix_same_box_all_frames_and_lam_is_area():
    x = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 3, 2, 16, 16).clone()   # clip i is constant i
    y = torch.tensor([0, 1, 2, 3])
    mix = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    for seed in range(5):
        out, soft, lam = mix(x, y, np.random.default_rng(seed))
        pasted = (out[0] == 3.0)                                               # from clip B-1
        assert torch.equal(pasted, pasted[:1].expand_as(pasted))              # identical in every frame
        assert lam == pytest.approx(1 - pasted[0, 0].float().mean().item())
        off = 0.1 / 4
        assert soft[0, 0] == pytest.approx(lam * (0.9 + off) + (1 - lam) * off)
        assert soft[0, 3] == pytest.approx(lam * off + (1 - lam) * (0.9 + off))
        assert soft.sum(1).allclose(torch.ones(4))
    y0, y1, x0, x1 = cutmix_box(16, 16, 0.75, np.random.default_rng(1))
    assert 0 <= y0 <= y1 <= 16 and 0 <= x0 <= x1 <= 16


def test_mixup_off_gives_smoothed_labels_and_odd_batch_raises():
    mix = Mixup(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=3)
    x = torch.randn(2, 1, 3, 4, 4)
    out, soft, lam = mix(x, torch.tensor([0, 2]), np.random.default_rng(0))
    assert lam == 1.0 and torch.equal(out, x)
    assert torch.allclose(soft, smooth_one_hot(torch.tensor([0, 2]), 3, 0.1))
    with pytest.raises(ValueError, match="even"):
        Mixup()(torch.randn(3, 1, 3, 4, 4), torch.tensor([0, 1, 2]), np.random.default_rng(0))


# ----------------------------------------------------------------------------------------
# RandAugment
# ----------------------------------------------------------------------------------------
def test_randaugment_identical_across_frames():
    g = torch.Generator().manual_seed(0)
    frame = torch.rand(1, 3, 24, 24, generator=g) * 255
    clip = frame.expand(4, 3, 24, 24).clone()
    ra = RandAugment(n=2, m=9, mstd=0.5)
    fired = set()
    for seed in range(40):
        plan = ra.sample(torch.Generator().manual_seed(seed))
        fired |= {name for name, _ in plan}
        out = ra.apply(clip, plan)
        assert out.shape == clip.shape
        assert torch.equal(out, out[:1].expand_as(out)), plan             # same op/magnitude in every frame
        assert float(out.min()) >= 0 and float(out.max()) <= 255.0 + 1e-3
    assert len(fired) >= 8                                                 # the policy really varies


def test_randaugment_per_frame_equivalence_and_determinism():
    g = torch.Generator().manual_seed(1)
    clip = torch.rand(3, 3, 20, 20, generator=g) * 255                     # frames differ
    ra = RandAugment()
    for seed in range(10):
        plan = ra.sample(torch.Generator().manual_seed(seed))
        whole = ra.apply(clip, plan)
        frames = torch.cat([ra.apply(clip[t:t + 1], plan) for t in range(3)])
        assert torch.allclose(whole, frames, atol=1e-4)                    # one draw applied frame by frame
        again = ra(clip, torch.Generator().manual_seed(seed))
        assert torch.equal(again, whole)
    for name, (op, to_arg, _) in OPS.items():                              # every op keeps range and shape
        y = op(clip, to_arg(9.0) + (1.0 if "Increasing" in name and name[:5] in ("Color", "Contr", "Brigh", "Sharp") else 0.0))
        assert y.shape == clip.shape and float(y.min()) >= -1e-4 and float(y.max()) <= 255.0 + 1e-3, name


# ----------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------
def test_demo_yaml_matches_builtin_demo():
    assert load_finetune_config(DEMO_YAML).to_dict() == finetune_config_from_dict(demo_config_dict()).to_dict()


@pytest.mark.parametrize("name,classes,base_lr,epochs,flip,sampling,clips", [
    ("k400", 400, 5e-4, 100, True, "dense", 7), ("ssv2", 174, 5e-4, 35, False, "segment", 2),
    ("ucf101", 101, 1e-4, 100, True, "dense", 5), ("hmdb51", 51, 1e-4, 60, True, "dense", 5)])
def test_table8_configs(name, classes, base_lr, epochs, flip, sampling, clips):
    cfg = load_finetune_config(DEMO_YAML.parent / f"finetune_{name}_vit_b.yaml", ["data.list_file=x.csv"])
    assert cfg.model.num_classes == classes and cfg.model.preset == "base" and cfg.model.drop_path == 0.1
    assert cfg.optim.base_lr == base_lr and cfg.optim.layer_decay == 0.75 and tuple(cfg.optim.betas) == (0.9, 0.999)
    assert cfg.optim.warmup_epochs == 5 and cfg.optim.weight_decay == 0.05 and cfg.train.epochs == epochs
    assert cfg.data.flip is flip and cfg.aug.sampling == sampling and cfg.test.num_clips == clips
    assert cfg.aug.mixup == 0.8 and cfg.aug.cutmix == 1.0 and cfg.aug.label_smoothing == 0.1
    assert (cfg.aug.rand_m, cfg.aug.rand_mstd) == (9, 0.5) and cfg.data.num_sample == 2


# ----------------------------------------------------------------------------------------
# training loop: checkpoint + resume
# ----------------------------------------------------------------------------------------
class LabeledSynthetic:
    """In-memory labeled clips with the FinetuneTrainData API."""

    def __init__(self, n=8, batch=4, T=2, S=32, classes=4):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, T, 3, S, S, generator=g)
        self.y = torch.arange(n) % classes
        self.batch, self.steps_per_epoch = batch, n // batch

    def iter_epoch(self, epoch, start_step=0):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(epoch))
        for s in range(start_step, self.steps_per_epoch):
            i = order[s * self.batch:(s + 1) * self.batch]
            yield s, {"clip": self.x[i], "label": self.y[i], "index": i}

    def stats(self):
        return {"bad_videos": 0}


def _tiny_cfg(tmp_path, **train):
    d = {"model": {k: v for k, v in TINY.items()},
         "data": {"demo": True, "num_frames": 2, "input_size": 32, "num_sample": 2},
         "optim": {"lr": 1e-3, "warmup_epochs": 1},
         "train": {"epochs": 2, "batch_size": 4, "output_dir": str(tmp_path / "run"), "log_every": 1,
                   "save_every": 1, "device": "cpu", "precision": "fp32", "tensorboard": False,
                   "progress": False, **train}}
    return finetune_config_from_dict(d)


def test_train_checkpoint_and_resume(tmp_path):
    torch.set_num_threads(1)
    full = train(_tiny_cfg(tmp_path / "a"), data=LabeledSynthetic(), log=lambda s: None)
    assert full["steps"] == 4
    ckpt = torch.load(full["checkpoint"], weights_only=False)
    assert ckpt["kind"] == "finetune" and ckpt["step"] == 4 and "head.weight" in ckpt["model"]
    # stop at step 2, resume to the end: identical weights
    train(_tiny_cfg(tmp_path / "b", max_steps=2), data=LabeledSynthetic(), log=lambda s: None)
    res = train(_tiny_cfg(tmp_path / "b"), data=LabeledSynthetic(), resume="auto", log=lambda s: None)
    assert res["steps"] == 4
    resumed = torch.load(res["checkpoint"], weights_only=False)["model"]
    for k, v in ckpt["model"].items():
        assert torch.allclose(v, resumed[k], atol=1e-6), k


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_under_half_precision_autocast(tmp_path, precision):
    """train.precision bf16 / fp16 (what ``auto`` picks on sm_80+ / older GPUs; CPU autocast
    here): the run trains with finite losses; fp16 keeps its loss scale in the checkpoint, as
    pre-training does."""
    torch.set_num_threads(1)
    res = train(_tiny_cfg(tmp_path, precision=precision), data=LabeledSynthetic(), log=lambda s: None)
    assert res["steps"] == 4
    ckpt = torch.load(res["checkpoint"], weights_only=False)
    assert ("loss_scale" in ckpt) == (precision == "fp16")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_demo_encoder_matches_pretraining_demo():
    from mam2_fast.ft.weights import arch_from_pretrain_config
    from mam2_fast.models.classifier import encoder_arch_dict
    from mam2_fast.config import config_from_dict
    from mam2_fast.pretrain import demo_config_dict as pretrain_demo

    ft = finetune_config_from_dict(demo_config_dict())
    # a checkpoint stores the resolved config (every key), not the demo's sparse dict
    resolved = config_from_dict(pretrain_demo()).to_dict()
    assert encoder_arch_dict(ft.model) == arch_from_pretrain_config(resolved)
    assert ft.init == pretrain_demo()["train"]["output_dir"]


class RecordingLabeled(LabeledSynthetic):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def iter_epoch(self, epoch, start_step=0):
        self.calls.append([])
        for s, batch in super().iter_epoch(epoch, start_step):
            self.calls[-1].append((epoch, s))
            yield s, batch


def test_epoch_remainder_dropped_under_accumulation(tmp_path):
    """3 micro-batches per epoch, accum 2: each epoch makes one optimizer step from 2 of them;
    the third is dropped instead of leaking its gradient into the next epoch's step."""
    torch.set_num_threads(1)
    data = RecordingLabeled(n=12, batch=4)
    res = train(_tiny_cfg(tmp_path / "r", accum_steps=2), data=data, log=lambda s: None)
    assert res["steps"] == 2
    assert data.calls == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]


class PoisonedLabeled(LabeledSynthetic):
    """Clips of the micro-batches in ``bad`` ((epoch, step) pairs) are NaN: their loss and the
    step's gradients are non-finite."""

    def __init__(self, *a, bad=(), **kw):
        super().__init__(*a, **kw)
        self.bad = set(bad)

    def iter_epoch(self, epoch, start_step=0):
        for s, batch in super().iter_epoch(epoch, start_step):
            if (epoch, s) in self.bad:
                batch = {**batch, "clip": torch.full_like(batch["clip"], float("nan"))}
            yield s, batch


def test_nonfinite_step_skipped_on_device_and_left_out_of_logged_means(tmp_path):
    """Step 5 of 8 is NaN: training goes on, that step leaves the weights and AdamW's step
    count as they were after step 4 (step 6 moves them again), and no logged mean is NaN."""
    torch.set_num_threads(1)
    cfg = _tiny_cfg(tmp_path / "p", epochs=4, log_every=4, save_every=1, keep_last=100, max_nonfinite=2)
    res = train(cfg, data=PoisonedLabeled(n=8, batch=4, bad={(2, 0)}), log=lambda s: None)
    assert res["steps"] == 8 and res["skipped_steps"] == 1
    from mam2_fast.train.metrics import read_metrics
    recs = read_metrics(tmp_path / "p" / "run" / "metrics.jsonl")
    assert [r["skipped_steps"] for r in recs] == [0, 1]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["train_acc"]) for r in recs), recs
    ck = {k: torch.load(tmp_path / "p" / "run" / f"checkpoint-{k:08d}.pt", weights_only=False) for k in (4, 5, 6)}
    for name, w in ck[4]["model"].items():
        assert torch.equal(w, ck[5]["model"][name]), name
    assert any(not torch.equal(w, ck[6]["model"][n]) for n, w in ck[5]["model"].items())
    steps = lambda c: [float(st["step"]) for st in c["optimizer"]["state"].values()]  # noqa: E731
    assert steps(ck[5]) == steps(ck[4]) and all(v == 4.0 for v in steps(ck[5]))


def test_nonfinite_streak_between_log_steps_stops_the_run(tmp_path):
    """Steps 1-3 non-finite, logging every 4: the streak ended before the log step and must
    still stop the run (max_nonfinite=2)."""
    torch.set_num_threads(1)
    cfg = _tiny_cfg(tmp_path / "s", epochs=4, log_every=4, save_every=100, max_nonfinite=2)
    with pytest.raises(FloatingPointError, match="3 non-finite"):
        train(cfg, data=PoisonedLabeled(n=8, batch=4, bad={(0, 0), (0, 1), (1, 0)}), log=lambda s: None)


def test_finetune_no_host_sync_per_step(tmp_path):
    """Host reads do not grow with the steps between log steps: 8 steps cost what 4 do."""
    from test_engine_loop import HostSyncCounter

    torch.set_num_threads(1)
    counts = {}
    for steps in (4, 8):
        cfg = _tiny_cfg(tmp_path / f"h{steps}", epochs=4, max_steps=steps, log_every=1000, save_every=1000)
        with HostSyncCounter() as mode:
            train(cfg, data=LabeledSynthetic(n=8, batch=4), log=lambda s: None)
        counts[steps] = mode.count
    assert counts[8] == counts[4], counts


def test_prefetch_thread_gives_the_same_run(tmp_path):
    """Batches built ahead on the prefetch thread (train.prefetch=1, the CUDA default) train
    exactly as when built inline (the CPU default): same order, same augmentation keys."""
    torch.set_num_threads(1)
    runs = {}
    for depth in (0, 1):
        res = train(_tiny_cfg(tmp_path / f"p{depth}", prefetch=depth, accum_steps=2, epochs=3),
                    data=RecordingLabeled(n=12, batch=4), log=lambda s: None)
        runs[depth] = torch.load(res["checkpoint"], weights_only=False)["model"]
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_prefetch_thread_stopped_when_the_run_fails(tmp_path):
    import threading

    torch.set_num_threads(1)
    cfg = _tiny_cfg(tmp_path / "f", epochs=4, log_every=4, save_every=100, max_nonfinite=2, prefetch=1)
    with pytest.raises(FloatingPointError):
        train(cfg, data=PoisonedLabeled(n=8, batch=4, bad={(0, 0), (0, 1), (1, 0)}), log=lambda s: None)
    assert not [t for t in threading.enumerate() if t.name == "mam2-prefetch"]
