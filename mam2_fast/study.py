"""The paper's Table-2 ablations at a scale anyone can run: pre-train, fine-tune, linear probe.

    python -m mam2_fast.study --budget smoke                       # minutes on 2 CPU cores
    python -m mam2_fast.study --budget small --out runs/study_small  # longer, same grid
    python -m mam2_fast.study --budget full --device cuda           # the same command at GPU scale
    python -m mam2_fast.study --budget smoke --variants mam2,random --seeds 1   # part of the grid

Data: :mod:`mam2_fast.data.synthetic_study` -- a generated video set with two labels per video,
a **motion** label (the target object's direction; a clip and its time reversal differ only
in it, SSv2-like) and an **appearance** label (the target's identity, K400-like), over a
textured, panning background with moving distractor objects. One training split (pre-training
without labels, then fine-tuning and probe training) and one held-out test split.

Grid (``VARIANTS``): ``mam2`` (the model as configured), ``mam2_c`` (one coupled decoder),
``mam2_norm_motion`` (the RGB-difference target taken on the mean/std-normalized clip instead of
raw RGB: about 20x the target's variance), ``no_motion``, ``no_appearance``, ``no_regressor``, ``no_alignment``, ``pixel`` (the
appearance target is per-patch normalized pixels, MAE-style, motion kept), ``videomae``
(the VideoMAE baseline through the engine, ``model.arch=videomae``) and ``random`` (no
pre-training: a randomly initialized encoder for the probe, training from scratch for
fine-tuning). For every variant and seed:

1. pre-train (``mam2_fast.pretrain.train``) for the budget's steps; the last log's collapse
   monitor (``feat_std``, ``feat_rank``) is kept;
2. linear probes (``mam2_fast.probe``): frozen encoder, ridge classifier on the training split,
   accuracy on the test split for each label, twice (``PROBES``): ``grid`` pooling (keeps where
   and when, so a direction can be read from positions) and ``mean`` pooling (what the
   fine-tuning head sees: a direction only if the tokens encode motion);
3. fine-tune (``mam2_fast.finetune.train``, the paper's recipe scaled down) on the joint label
   ``identity * 4 + direction``; the test split's predictions give the motion accuracy
   (``pred % 4``) and the appearance accuracy (``pred // 4``).

Resumable: every finished stage of every cell is written at once to ``results.json`` in the
study folder (atomically); a killed study started again with the same command skips what is
recorded and continues a half-done pre-training or fine-tuning from its last checkpoint. A
different budget or grid in the same folder is refused (use another ``--out``).

Output in the study folder: ``results.json`` (every cell and stage), ``table.md`` (mean +- std
over seeds per variant, and the issue's targets checked), ``study.png`` (bars with std).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

VARIANTS: dict = {
    "mam2": {},
    "mam2_c": {"model": {"coupled_decoder": True}},
    "mam2_norm_motion": {"model": {"motion_space": "normalized"}},   # RGB difference of the normalized clip
    "no_motion": {"model": {"use_motion": False}},
    "no_appearance": {"model": {"use_appearance": False}},
    "no_regressor": {"model": {"use_regressor": False}},
    "no_alignment": {"model": {"use_alignment": False}},
    "pixel": {"model": {"appearance_target": "pixels"}},
    "videomae": {"model": {"arch": "videomae"}},
    "random": None,                      # no pre-training
}
# Fine-tuning recipes: "paper" is VideoMAE's (RandAugment, mixup 0.8 + cutmix 1.0, label smoothing
# 0.1, random-resized crops down to 8 % of the frame, layer decay 0.75; the ft config defaults) at
# the budget's epochs and lr; "light" turns the regularizers off (crops of 50-100 %, no layer
# decay) and trains 3x the epochs at 4x the lr, for budgets where the paper's recipe does not
# move the loss off ln(classes) (measured at smoke size: 2.77 -> 2.76 in 12 epochs).
FINETUNE_RECIPES: dict = {
    "paper": {},
    "light": {"aug": {"rand_augment": False, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0,
                      "scale": [0.5, 1.0]},
              "optim": {"layer_decay": 1.0}, "epochs_factor": 3, "lr_factor": 4},
}
LABELS = ("motion", "appearance")
N_DIRECTIONS = 4

# Budgets: data, model and schedule sizes. "micro" exists for the test suite. ``lr_schedule``:
# pre-training follows the paper's warmup + cosine over exactly the budget's steps (until
# 2026-12-04 the study ran its pre-training at the peak lr throughout: a schedule of 10**6
# epochs cut by ``max_steps``; folders made then have no such key and are refused).
BUDGETS: dict = {
    "micro": dict(train_videos=32, test_videos=16, video_size=36, video_frames=8, identities=2, distractors=1,
                  input_size=32, patch_size=16, num_frames=4, stride=2, embed_dim=32, depth=1, num_heads=2,
                  regressor_depth=1, appearance_depth=1, motion_depth=1, vocab_size=16,
                  pretrain_steps=4, pretrain_batch=8, pretrain_lr=5e-4, finetune_epochs=1, finetune_batch=8,
                  finetune_lr=5e-4, probe_clips=1, test_clips=1, seeds=1, lr_schedule="cosine"),
    "smoke": dict(train_videos=128, test_videos=64, video_size=40, video_frames=16, identities=4, distractors=2,
                  input_size=32, patch_size=8, num_frames=4, stride=3, embed_dim=64, depth=2, num_heads=2,
                  regressor_depth=1, appearance_depth=1, motion_depth=1, vocab_size=32,
                  pretrain_steps=240, pretrain_batch=8, pretrain_lr=5e-4, finetune_epochs=12, finetune_batch=8,
                  finetune_lr=5e-4, probe_clips=2, test_clips=2, seeds=3, lr_schedule="cosine"),
    "small": dict(train_videos=512, test_videos=192, video_size=56, video_frames=24, identities=4, distractors=2,
                  input_size=48, patch_size=8, num_frames=8, stride=2, embed_dim=128, depth=3, num_heads=4,
                  regressor_depth=2, appearance_depth=2, motion_depth=1, vocab_size=64,
                  pretrain_steps=1500, pretrain_batch=16, pretrain_lr=5e-4, finetune_epochs=10, finetune_batch=16,
                  finetune_lr=5e-4, probe_clips=2, test_clips=2, seeds=3, lr_schedule="cosine"),
    "full": dict(train_videos=4000, test_videos=800, video_size=112, video_frames=32, identities=6, distractors=3,
                 input_size=96, patch_size=16, num_frames=16, stride=2, embed_dim=192, depth=4, num_heads=3,
                 regressor_depth=2, appearance_depth=2, motion_depth=1, vocab_size=128,
                 pretrain_steps=20000, pretrain_batch=32, pretrain_lr=5e-4, finetune_epochs=30, finetune_batch=32,
                 finetune_lr=5e-4, probe_clips=2, test_clips=2, seeds=3, lr_schedule="cosine"),
}


# ----------------------------------------------------------------------------------------
# results file
# ----------------------------------------------------------------------------------------
class Results:
    """``results.json``: {"meta": {...}, "cells": {"<variant>/seed<k>": {stage: result}}};
    written atomically after every change."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        if path.is_file():
            data = json.loads(path.read_text())
            old = data.get("meta", {})
            for key in ("budget", "sizes"):
                if old.get(key) != meta.get(key):
                    raise SystemExit(f"study: {path} was made with another {key} ({old.get(key)!r}); "
                                     f"use another --out or delete it")
            self.data = data
        else:
            self.data = {"meta": meta, "cells": {}}
            self.save()

    def get(self, cell: str, stage: str):
        return self.data["cells"].get(cell, {}).get(stage)

    def put(self, cell: str, stage: str, value) -> None:
        self.data["cells"].setdefault(cell, {})[stage] = value
        self.save()

    def drop(self, cell: str, stages) -> None:
        """Forget ``stages`` of ``cell`` (they are run again)."""
        for stage in stages:
            self.data["cells"].get(cell, {}).pop(stage, None)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


class StudyStopped(SystemExit):
    """A pre-training or fine-tuning run of the study stopped before its end (SIGTERM: the run
    wrote a checkpoint and returned). Nothing is recorded for that stage; the same command
    resumes it. A SystemExit, so the per-stage error handling does not record it as a result."""


# ----------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------
def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_dict(b: dict) -> dict:
    return {"preset": "tiny", "img_size": b["input_size"], "num_frames": b["num_frames"],
            "patch_size": b["patch_size"], "embed_dim": b["embed_dim"], "depth": b["depth"],
            "num_heads": b["num_heads"]}


def data_dict(b: dict, list_file: str, num_sample: int = 1) -> dict:
    return {"list_file": list_file, "num_frames": b["num_frames"], "sampling_stride": b["stride"],
            "input_size": b["input_size"], "num_sample": num_sample, "num_workers": 1, "flip": False}


PRETRAIN_SAMPLES = 2    # clips per video in a pre-training batch (data.num_sample)


def pretrain_epochs(b: dict) -> int:
    """Epochs whose warmup + cosine schedule ends with the budget's steps: the loop's steps per
    epoch on one process are the data sampler's (``data.epoch_unit`` default, ``num_sample``
    clips per video, drop_last); ``max_steps`` then stops inside the last epoch."""
    from mam2_fast.data.config import DataConfig
    from mam2_fast.data.sampler import ResumableSampler

    per_epoch = ResumableSampler(b["train_videos"], num_sample=PRETRAIN_SAMPLES,
                                 videos_per_step=b["pretrain_batch"] // PRETRAIN_SAMPLES,
                                 epoch_unit=DataConfig().epoch_unit).steps_per_epoch
    return max(1, math.ceil(b["pretrain_steps"] / per_epoch))


def pretrain_config(b: dict, variant: str, seed: int, list_file: str, out_dir: Path, device: str,
                    extra: Optional[dict] = None):
    from mam2_fast.config import config_from_dict

    d = {"name": f"study-{variant}",
         "model": {**model_dict(b), "regressor_depth": b["regressor_depth"],
                   "appearance_depth": b["appearance_depth"], "motion_depth": b["motion_depth"]},
         "mask": {"kind": "tube", "ratio": 0.75},
         "tokenizer": {"kind": "kmeans", "vocab_size": b["vocab_size"], "kmeans_fit_clips": 32},
         "data": data_dict(b, list_file, num_sample=PRETRAIN_SAMPLES),
         "optim": {"lr": b["pretrain_lr"], "warmup_epochs": 1, "clip_grad": 1.0},
         "train": {"epochs": pretrain_epochs(b), "max_steps": b["pretrain_steps"], "batch_size": b["pretrain_batch"],
                   "seed": seed, "device": device, "precision": "auto", "output_dir": str(out_dir),
                   "log_every": max(1, min(20, b["pretrain_steps"] // 4)), "save_every": max(1, b["pretrain_steps"] // 4),
                   "keep_last": 1, "progress": False, "tensorboard": False}}
    d = _merge(d, VARIANTS[variant] or {})
    if d["model"].get("arch") == "videomae":
        # VideoMAE's presets start at ViT-S; the study's sizes override its widths, and its
        # decoder runs at the encoder's width like MAM^2's decoders here (a like-for-like grid)
        d["model"].update(preset="small", tubelet_size=2, decoder_dim=b["embed_dim"], decoder_heads=b["num_heads"])
    d = _merge(d, extra or {})
    return config_from_dict(d)


def finetune_config(b: dict, init: Optional[str], seed: int, list_file: str, test_list: str, out_dir: Path,
                    device: str, arch: Optional[dict] = None, extra: Optional[dict] = None):
    from mam2_fast.ft.config import ClassifierConfig, finetune_config_from_dict

    model = {**model_dict(b), "num_classes": b["identities"] * N_DIRECTIONS, "drop_path": 0.1}
    fields = getattr(ClassifierConfig, "__dataclass_fields__", {})
    if arch and arch.get("arch") == "videomae":
        if "arch" not in fields:
            raise RuntimeError("this checkout cannot fine-tune a VideoMAE encoder (ClassifierConfig has no arch)")
        model["arch"] = "videomae"
        if "tubelet_size" in fields:
            model["tubelet_size"] = int(arch.get("tubelet_size", 2))
    if arch and "temporal_fc" in arch and "temporal_fc" in fields:
        model["temporal_fc"] = bool(arch["temporal_fc"])
    d = {"name": "study-finetune", "init": init, "model": model,
         "data": data_dict(b, list_file, num_sample=1), "aug": {"sampling": "dense"},
         "test": {"list_file": test_list, "num_clips": b["test_clips"], "num_crops": 1, "batch_size": 8},
         "optim": {"lr": b["finetune_lr"], "warmup_epochs": 0.5, "layer_decay": 0.75},
         "train": {"epochs": b["finetune_epochs"], "batch_size": b["finetune_batch"], "seed": seed,
                   "device": device, "precision": "auto", "output_dir": str(out_dir),
                   "log_every": 8, "save_every": 10 ** 6, "keep_last": 1, "progress": False, "tensorboard": False}}
    extra = dict(extra or {})
    epochs_factor, lr_factor = extra.pop("epochs_factor", 1), extra.pop("lr_factor", 1)
    d["train"]["epochs"] = int(d["train"]["epochs"] * epochs_factor)
    d["optim"]["lr"] = d["optim"]["lr"] * lr_factor
    d = _merge(d, extra)
    return finetune_config_from_dict(d)


# ----------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------
def _file_log(path: Path) -> Callable[[str], None]:
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(s: str) -> None:
        with open(path, "a") as f:
            f.write(s + "\n")
    return log


def run_pretrain(cfg, out_dir: Path) -> dict:
    from mam2_fast.pretrain import train
    from mam2_fast.train.checkpoint import find_latest

    t0 = time.time()
    resume = "auto" if out_dir.exists() and any(out_dir.glob("checkpoint-*.pt")) else None
    summary = train(cfg, resume=resume, log=_file_log(out_dir.parent / f"{out_dir.name}.log"))
    if summary.get("interrupted"):
        raise StudyStopped(f"study: pre-training in {out_dir} stopped at step {summary.get('steps')} (SIGTERM); "
                           f"nothing recorded for it: run the same command again to resume it")
    ckpt = summary.get("checkpoint") or (str(find_latest(out_dir)) if find_latest(out_dir) else None)
    last = summary.get("last") or {}
    first = summary.get("first") or {}
    keep = ("loss", "loss_app", "loss_motion", "loss_align", "feat_std", "feat_rank")
    return {"checkpoint": ckpt, "steps": summary.get("steps"), "seconds": round(time.time() - t0, 1),
            "first": {k: first[k] for k in keep if k in first}, "last": {k: last[k] for k in keep if k in last}}


# The probes: stage name -> token pooling. ``grid`` keeps where and when (2 time spans x 2x2
# regions), so it can read a direction from *where* an object is in each half of the clip
# (position features); ``mean`` is what the fine-tuning head sees (all tokens averaged), so
# it reads a direction only when the tokens themselves encode motion.
PROBES: dict = {"probe": "grid", "probe_mean": "mean"}


def run_probe(encoder, b: dict, train_list: str, test_list: str, device, pool: str = "grid") -> dict:
    from mam2_fast.data.config import DataConfig
    from mam2_fast.ft.data import ViewData
    from mam2_fast.probe import probe_encoders

    dcfg = DataConfig(num_frames=b["num_frames"], input_size=b["input_size"], sampling_stride=b["stride"],
                      num_workers=1)
    views = lambda lst: ViewData(dcfg, lst, b["probe_clips"], 1, "dense", batch_size=8, device=device)  # noqa: E731
    res = probe_encoders({"enc": encoder}, views(train_list), views(test_list),
                         [f"label%{N_DIRECTIONS}", f"label//{N_DIRECTIONS}"], device, lambda s: None, pool=pool)["enc"]
    out = {"motion": res[f"label%{N_DIRECTIONS}"]["test_acc"], "appearance": res[f"label//{N_DIRECTIONS}"]["test_acc"],
           "chance_motion": res[f"label%{N_DIRECTIONS}"]["chance"],
           "chance_appearance": res[f"label//{N_DIRECTIONS}"]["chance"], "pool": pool}
    if pool == "grid":
        out.update(heldout_collapse(encoder, views(test_list), device))
    return out


def heldout_collapse(encoder, data, device, max_batches: int = 2) -> dict:
    """The collapse monitor's measures on held-out clips: the frozen encoder's final token
    features (every token of up to ``max_batches`` batches, first view), as in issue 15's
    diagnosis (random encoders are the reference)."""
    import torch
    from mam2_fast.train.collapse import collapse_stats

    tokens = []
    encoder = encoder.to(device).eval()
    with torch.no_grad():
        for i, batch in enumerate(data):
            if i >= max_batches:
                break
            clips = batch["views"][:, 0].to(device)                               # [B, T, C, H, W]
            tokens.append(encoder.forward_features(clips).float().flatten(0, -2).cpu())
    stats = collapse_stats(torch.cat(tokens), max_tokens=2048)
    return {"heldout_feat_std": stats["feat_std"], "heldout_feat_rank": stats["feat_rank"]}


def run_finetune(cfg, test_list: str, out_dir: Path) -> dict:
    from mam2_fast.finetune import train

    t0 = time.time()
    resume = "auto" if out_dir.exists() and any(out_dir.glob("checkpoint-*.pt")) else None
    summary = train(cfg, test_list=test_list, resume=resume, log=_file_log(out_dir.parent / f"{out_dir.name}.log"))
    if summary.get("interrupted"):
        raise StudyStopped(f"study: fine-tuning in {out_dir} stopped at step {summary.get('steps')} (SIGTERM); "
                           f"nothing recorded for it: run the same command again to resume it")
    report = json.loads((out_dir / "eval" / "eval.json").read_text())
    vids = report["videos"]
    lab = np.array([v["label"] for v in vids])
    pred = np.array([v["pred"] for v in vids])
    return {"motion": float(100.0 * np.mean(pred % N_DIRECTIONS == lab % N_DIRECTIONS)),
            "appearance": float(100.0 * np.mean(pred // N_DIRECTIONS == lab // N_DIRECTIONS)),
            "joint": float(report["top1"]), "steps": summary.get("steps"), "seconds": round(time.time() - t0, 1)}


def _device(name: str):
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_cell(res: Results, study: Path, b: dict, variant: str, seed: int, lists: dict, device: str,
             log: Callable[[str], None], extra: Optional[dict] = None) -> None:
    import torch
    from mam2_fast.ft.weights import arch_from_pretrain_config
    from mam2_fast.probe import load_frozen_encoder, random_encoder

    cell = f"{variant}/seed{seed}"
    tdev = torch.device(device)
    runs = study / "runs" / variant
    init, arch = None, None
    if VARIANTS[variant] is None:
        arch = arch_from_pretrain_config(pretrain_config(b, "mam2", seed, lists["train"], runs, device).to_dict())
    else:
        pre = res.get(cell, "pretrain")
        if pre is not None and (pre.get("steps") or 0) < b["pretrain_steps"]:
            # recorded by a study that did not know a stopped run (before 2026-12-07): its encoder
            # is part-trained, so it and everything measured on it are redone (resumed)
            log(f"{cell}: recorded pre-training stopped at step {pre.get('steps')} of {b['pretrain_steps']}; "
                f"resuming it and redoing the cell's probes and fine-tuning")
            res.drop(cell, ["pretrain", *PROBES, "finetune"])
            pre = None
        if pre is None or not (pre.get("checkpoint") and Path(pre["checkpoint"]).is_file()):
            log(f"{cell}: pre-training {b['pretrain_steps']} steps")
            cfg = pretrain_config(b, variant, seed, lists["train"], runs / f"pretrain-seed{seed}", device,
                                  (extra or {}).get("pretrain"))
            pre = run_pretrain(cfg, runs / f"pretrain-seed{seed}")
            res.put(cell, "pretrain", pre)
            last = pre["last"]
            log(f"{cell}: pre-trained in {pre['seconds']:.0f}s; last log " +
                ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
        init = pre["checkpoint"]
    for stage, pool in PROBES.items():
        if res.get(cell, stage) is not None:
            continue
        t0 = time.time()
        try:
            if init is None:
                enc = random_encoder(arch, 1000 + seed)
            else:
                enc, arch = load_frozen_encoder(init, log=lambda s: None)
            pr = run_probe(enc, b, lists["train"], lists["test"], tdev, pool)
            pr["seconds"] = round(time.time() - t0, 1)
            log(f"{cell}: {pool}-pool probe motion {pr['motion']:.1f}% appearance {pr['appearance']:.1f}% "
                f"({pr['seconds']:.0f}s)")
        except Exception as e:  # noqa: BLE001 - recorded, the grid goes on
            pr = {"error": f"{type(e).__name__}: {e}"}
            log(f"{cell}: {pool}-pool probe failed: {pr['error']}")
        res.put(cell, stage, pr)
    if res.get(cell, "finetune") is None:
        if init is not None and arch is None:
            from mam2_fast.ft.weights import read_encoder_weights
            arch = read_encoder_weights(init).arch
        out = runs / f"finetune-seed{seed}"
        try:
            cfg = finetune_config(b, init, seed, lists["train"], lists["test"], out, device, arch,
                                  (extra or {}).get("finetune"))
            ft = run_finetune(cfg, lists["test"], out)
        except Exception as e:  # noqa: BLE001 - recorded, the grid goes on (e.g. an arch this checkout cannot fine-tune)
            ft = {"error": f"{type(e).__name__}: {e}"}
            log(f"{cell}: fine-tuning failed: {ft['error']}")
        res.put(cell, "finetune", ft)
        if "error" not in ft:
            log(f"{cell}: fine-tune motion {ft['motion']:.1f}% appearance {ft['appearance']:.1f}% "
                f"({ft['seconds']:.0f}s)")


# ----------------------------------------------------------------------------------------
# summary: table, targets, plot
# ----------------------------------------------------------------------------------------
def aggregate(res: Results, variants: list, seeds: list) -> dict:
    """{variant: {"probe_motion": (mean, std, n), ...}} over the finished seeds."""
    out = {}
    for v in variants:
        row = {}
        for stage in ("probe", "probe_mean", "finetune"):
            for lab in LABELS:
                vals = [res.get(f"{v}/seed{s}", stage) for s in seeds]
                vals = [x[lab] for x in vals if x and lab in x]
                if vals:
                    row[f"{stage}_{lab}"] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                                             len(vals))
        for key in ("heldout_feat_std", "heldout_feat_rank"):
            vals = [res.get(f"{v}/seed{s}", "probe") for s in seeds]
            vals = [x[key] for x in vals if x and key in x]
            if vals:
                row[key] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals))
        out[v] = row
    return out


def _fmt(cell, digits: int = 1) -> str:
    if cell is None:
        return "n/a"
    m, s, n = cell
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def check_targets(agg: dict) -> list:
    """The issue's targets: [(text, verdict, numbers)]; a verdict is pass / miss / n/a."""
    def get(v, k):
        return agg.get(v, {}).get(k)

    def beats(a, b, margin_std: float = 0.0):
        if a is None or b is None:
            return "n/a", ""
        gap = a[0] - b[0]
        if margin_std and min(a[2], b[2]) < 2:          # a std needs two seeds on both sides
            return "n/a", f"{a[0]:.1f} vs {b[0]:.1f} (gap {gap:+.1f}; a margin in std needs >= 2 seeds)"
        need = margin_std * max(a[1], b[1])
        return ("pass" if gap > need else "miss"), f"{a[0]:.1f} vs {b[0]:.1f} (gap {gap:+.1f}, needed > {need:.1f})"

    rows = []
    for lab in LABELS:
        rows.append((f"fine-tune from MAM² beats scratch on {lab} by > 2 std",
                     *beats(get("mam2", f"finetune_{lab}"), get("random", f"finetune_{lab}"), 2.0)))
    stages = {"finetune": "fine-tune", "probe": "grid probe", "probe_mean": "mean-pool probe"}
    for other in ("pixel", "videomae"):
        for stage, name in stages.items():
            rows.append((f"MAM² beats {other} on motion ({name})",
                         *beats(get("mam2", f"{stage}_motion"), get(other, f"{stage}_motion"))))
    for stage, name in stages.items():
        rows.append((f"removing motion hurts the motion label ({name})",
                     *beats(get("mam2", f"{stage}_motion"), get("no_motion", f"{stage}_motion"))))
    return rows


def finetune_at_chance(agg: dict, identities: int, test_videos: int) -> Optional[str]:
    """A note when every fine-tuned cell is within two binomial standard errors of chance on both
    labels (then fine-tuning cannot rank the initializations at this budget); else None."""
    chance = {"motion": 1.0 / N_DIRECTIONS, "appearance": 1.0 / identities}
    best, bound = {}, {}
    for lab, p in chance.items():
        vals = [row[f"finetune_{lab}"][0] for row in agg.values() if row.get(f"finetune_{lab}")]
        if not vals:
            return None
        best[lab] = max(vals)
        bound[lab] = 100.0 * (p + 2.0 * math.sqrt(p * (1.0 - p) / max(test_videos, 1)))
        if best[lab] > bound[lab]:
            return None
    return ("Fine-tuning stayed at chance for every initialization, scratch included (best cell: motion "
            f"{best['motion']:.1f} %, appearance {best['appearance']:.1f} %; chance + 2 binomial standard errors "
            f"over {test_videos} test videos: {bound['motion']:.1f} % / {bound['appearance']:.1f} %). At this "
            "budget fine-tuning cannot rank the initializations; the probes can.")


def write_table(res: Results, study: Path, variants: list, seeds: list, command: str) -> str:
    agg = aggregate(res, variants, seeds)
    meta = res.data["meta"]
    lines = [f"Study `{meta['budget']}` — {len(seeds)} seed(s); test accuracy (%) on the held-out split, "
             f"mean ± std over seeds. Chance: motion {100 / N_DIRECTIONS:.0f}%, appearance "
             f"{100 / meta['sizes']['identities']:.0f}%.", "",
             f"Command: `{command}`", "",
             "Probes: *grid* pools 2 time spans x 2x2 regions (a direction can be read from where the "
             "target is in each half); *mean* averages all tokens, as the fine-tuning head does (a "
             "direction is read only if the tokens encode motion).", "",
             "| variant | fine-tune motion | fine-tune appearance | grid probe motion | grid probe appearance | "
             "mean probe motion | mean probe appearance | held-out feat std | held-out feat rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        r = agg[v]
        lines.append(f"| {v} | {_fmt(r.get('finetune_motion'))} | {_fmt(r.get('finetune_appearance'))} | "
                     f"{_fmt(r.get('probe_motion'))} | {_fmt(r.get('probe_appearance'))} | "
                     f"{_fmt(r.get('probe_mean_motion'))} | {_fmt(r.get('probe_mean_appearance'))} | "
                     f"{_fmt(r.get('heldout_feat_std'), 3)} | {_fmt(r.get('heldout_feat_rank'))} |")
    errors = {f"{c} {stage}": st[stage]["error"] for c, st in res.data["cells"].items()
              for stage in (*PROBES, "finetune") if isinstance(st.get(stage), dict) and "error" in st[stage]}
    if errors:
        lines += ["", "Errors: " + "; ".join(f"{c}: {e}" for c, e in sorted(errors.items()))]
    note = finetune_at_chance(agg, meta["sizes"]["identities"], meta["sizes"]["test_videos"])
    if note:
        lines += ["", note]
    lines += ["", "| target (issue 15) | verdict | numbers |", "|---|---|---|"]
    for text, verdict, nums in check_targets(agg):
        lines.append(f"| {text} | {verdict} | {nums} |")
    text = "\n".join(lines) + "\n"
    (study / "table.md").write_text(text)
    try:
        plot(agg, variants, study / "study.png", f"study {meta['budget']} ({len(seeds)} seeds)")
    except Exception as e:  # noqa: BLE001 - the plot is optional (Pillow)
        print(f"[study] plot skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return text


def plot(agg: dict, variants: list, path: Path, title: str) -> None:
    """Grouped bars (fine-tune / probe x motion / appearance) with std whiskers, Pillow only."""
    from PIL import Image, ImageDraw

    series = [("finetune_motion", (31, 119, 180)), ("finetune_appearance", (255, 127, 14)),
              ("probe_motion", (44, 160, 44)), ("probe_appearance", (214, 39, 40)),
              ("probe_mean_motion", (148, 103, 189)), ("probe_mean_appearance", (140, 86, 75))]
    names = {"probe_motion": "grid probe motion", "probe_appearance": "grid probe appearance",
             "probe_mean_motion": "mean probe motion", "probe_mean_appearance": "mean probe appearance"}
    W, H, left, bottom, top = 140 + 100 * len(variants), 440, 50, 70, 80
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    ph = H - bottom - top
    y = lambda v: top + ph * (1 - v / 100.0)  # noqa: E731
    for g in range(0, 101, 20):
        d.line([(left, y(g)), (W - 10, y(g))], fill=(225, 225, 225))
        d.text((8, y(g) - 6), f"{g}%", fill="black")
    d.text((left, 10), title, fill="black")
    for i, (name, colour) in enumerate(series):
        d.rectangle([W - 190, 10 + 12 * i, W - 182, 18 + 12 * i], fill=colour)
        d.text((W - 178, 8 + 12 * i), names.get(name, name.replace("_", " ")), fill="black")
    bw = 15
    for j, v in enumerate(variants):
        x0 = left + 10 + 100 * j
        for i, (name, colour) in enumerate(series):
            cell = agg.get(v, {}).get(name)
            if cell is None:
                continue
            m, s, _ = cell
            xa = x0 + i * bw
            d.rectangle([xa, y(m), xa + bw - 3, y(0)], fill=colour)
            if s > 0:
                xc = xa + (bw - 3) / 2
                d.line([(xc, y(min(100, m + s))), (xc, y(max(0, m - s)))], fill="black")
        d.text((x0, H - bottom + 8), v, fill="black")
    d.line([(left, y(0)), (W - 10, y(0))], fill="black")
    img.save(path)


def target_baselines(run_dir: str, batches: int = 16) -> dict:
    """What a model that ignores its input scores on a pre-training run's targets, over
    ``batches`` training batches of the run's own data and tokenizer: the appearance codes'
    marginal entropy (the CE of predicting their frequencies) and the MSE of predicting zero
    motion (raw-RGB frame differences, as ``motion_space: raw``)."""
    import torch
    from mam2_fast.config import config_from_dict
    from mam2_fast.data.loader import PretrainData
    from mam2_fast.targets.tokenizer import build_tokenizer

    run = Path(run_dir)
    cfg = config_from_dict(json.loads((run / "config.json").read_text()))
    tok = None
    if cfg.tokenizer.kind == "kmeans" and (run / "tokenizer.pt").is_file():
        tok = build_tokenizer(cfg.tokenizer, cfg.model.patch_size)
        tok.load_state_dict(torch.load(run / "tokenizer.pt", weights_only=True))
    data = PretrainData(cfg.data, cfg.train.batch_size, seed=cfg.train.seed)
    mean = torch.tensor(cfg.data.mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 1, 3, 1, 1)
    counts, sq, n = None, 0.0, 0
    with torch.no_grad():
        for i, (_, b) in enumerate(data.iter_epoch(0)):
            raw = b["clip"].float() * std + mean                                  # [B, T, 3, H, W]
            sq += float(((raw[:, 1:] - raw[:, :-1]) ** 2).mean())
            n += 1
            if tok is not None:
                c = torch.bincount(tok.tokenize(raw).flatten(), minlength=tok.vocab_size).float()
                counts = c if counts is None else counts + c
            if i + 1 >= batches:
                break
    if hasattr(data, "close"):
        data.close()
    out = {"zero_motion_mse_raw": sq / max(n, 1)}
    if counts is not None:
        p = counts[counts > 0] / counts.sum()
        out["code_entropy_nats"] = float(-(p * p.log()).sum())
        out["log_vocab"] = math.log(tok.vocab_size)
    return out


ENCODER_PREFIXES = ("patch_embed.", "pos_embed_time", "pos_embed_space", "blocks.", "norm.")


def loss_gradient_balance(run_dir: str, batches: int = 4, at_init: bool = False) -> dict:
    """How hard each loss term pulls on the **encoder**: the norm of the gradient of each
    weighted term (``loss_app``, ``loss_motion``, ``align_weight * loss_align``) with respect to
    the encoder's parameters, averaged over ``batches`` training batches of the run's own data,
    masks and tokenizer. ``at_init``: the run's model freshly initialized (seeded as the run),
    else its latest checkpoint. A term whose gradient is orders of magnitude below the others
    shapes the encoder little, whatever its loss value does."""
    import torch
    from mam2_fast.config import config_from_dict
    from mam2_fast.data.loader import PretrainData
    from mam2_fast.masking import MaskGenerator
    from mam2_fast.models.mam2 import build_model
    from mam2_fast.pretrain import make_masks
    from mam2_fast.targets.tokenizer import build_tokenizer
    from mam2_fast.train.checkpoint import find_latest, load_checkpoint

    run = Path(run_dir)
    cfg = config_from_dict(json.loads((run / "config.json").read_text()))
    if cfg.model.arch != "mam2":
        raise SystemExit(f"study: --grad-balance needs a MAM2 run, {run} is {cfg.model.arch!r}")
    tok = None
    if cfg.tokenizer.kind == "kmeans" and (run / "tokenizer.pt").is_file():
        tok = build_tokenizer(cfg.tokenizer, cfg.model.patch_size)
        tok.load_state_dict(torch.load(run / "tokenizer.pt", weights_only=True))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, vocab_size=tok.vocab_size if tok is not None else None,
                        pixel_mean=tuple(cfg.data.mean), pixel_std=tuple(cfg.data.std))
    source = "init"
    if not at_init:
        ckpt_path = find_latest(run)
        if ckpt_path is None:
            raise SystemExit(f"study: no checkpoint in {run}")
        model.load_state_dict(load_checkpoint(ckpt_path)["model"])
        source = ckpt_path.name
    model.train()
    enc = [p for n, p in model.named_parameters() if n.startswith(ENCODER_PREFIXES)]
    masker = MaskGenerator(cfg.mask.kind, cfg.mask.ratio, cfg.model.num_frames, model.grid,
                           cfg.mask.cube_min_block, cfg.mask.cube_max_aspect)
    data = PretrainData(cfg.data, cfg.train.batch_size, seed=cfg.train.seed)
    mean = torch.tensor(cfg.data.mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 1, 3, 1, 1)
    weights = {"loss_app": 1.0, "loss_motion": 1.0, "loss_align": float(cfg.model.align_weight)}
    sums: dict = {}
    n = 0
    for i, (_, b) in enumerate(data.iter_epoch(0)):
        clip = b["clip"].float()                                              # [B, T, 3, H, W]
        info = make_masks(masker, clip.shape[0], 1, cfg.train.seed, 0, i, 0, 1)
        extra = {}
        if tok is not None:
            extra["codes"] = tok.tokenize((clip * std + mean).clamp(0, 1)).flatten(2)   # [B, T, N]
        out = model(clip, info, **extra)
        for k, w in weights.items():
            if k not in out:
                continue
            grads = torch.autograd.grad(w * out[k], enc, retain_graph=True, allow_unused=True)
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))
            sums.setdefault(k, {"grad_norm": 0.0, "loss": 0.0})
            sums[k]["grad_norm"] += norm
            sums[k]["loss"] += float(out[k].detach())
        n += 1
        if n >= batches:
            break
    if hasattr(data, "close"):
        data.close()
    terms = {k: {"weighted_grad_norm_encoder": v["grad_norm"] / n, "loss": v["loss"] / n, "weight": weights[k]}
             for k, v in sums.items()}
    total = sum(t["weighted_grad_norm_encoder"] for t in terms.values()) or 1.0
    for t in terms.values():
        t["share"] = t["weighted_grad_norm_encoder"] / total
    return {"run": str(run), "model": source, "batches": n, "terms": terms}


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def build_data(study: Path, b: dict, log) -> dict:
    from mam2_fast.data.synthetic_study import make_study_dataset

    t0 = time.time()
    kw = dict(size=b["video_size"], num_frames=b["video_frames"], identities=b["identities"],
              distractors=b["distractors"])
    if "target_travel" in b:
        kw["target_travel"] = tuple(b["target_travel"])
    lists = {"train": make_study_dataset(str(study / "data" / "train"), b["train_videos"], seed=1, **kw),
             "test": make_study_dataset(str(study / "data" / "test"), b["test_videos"], seed=2, **kw)}
    log(f"data: {b['train_videos']} train / {b['test_videos']} test videos ({time.time() - t0:.0f}s) in {study / 'data'}")
    return lists


_LOCKS: dict = {}


def _lock_study(study: Path):
    """An exclusive lock on ``study/.lock`` for this process (released when it exits): two
    processes on one study folder would both train a cell and interleave ``results.json``
    (seen: a study restarted while the first was still running mixed two fine-tuning recipes)."""
    import fcntl
    key = str(study.resolve())
    if key in _LOCKS:
        return _LOCKS[key]
    f = open(study / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise SystemExit(f"study: another process is running the study in {study} (it holds {study / '.lock'}); "
                         f"wait for it or stop it first") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[key] = f
    return f


def run_study(out: str, budget: str = "smoke", variants: Optional[list] = None, seeds: Optional[int] = None,
              device: str = "auto", log=print, command: str = "", sizes: Optional[dict] = None,
              extra: Optional[dict] = None, first_seed: int = 0) -> dict:
    """Run (or continue) a study; returns {"results": path, "table": text}. ``first_seed``: the
    seeds are ``first_seed .. first_seed + seeds - 1`` (to add seeds to a grid run elsewhere)."""
    if budget not in BUDGETS:
        raise SystemExit(f"study: unknown budget {budget!r} ({' | '.join(BUDGETS)})")
    b = {**BUDGETS[budget], **(sizes or {})}
    variants = variants or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"study: unknown variant(s) {unknown} ({', '.join(VARIANTS)})")
    if first_seed < 0:
        raise SystemExit(f"study: --first-seed must be >= 0, got {first_seed}")
    seed_list = list(range(first_seed, first_seed + (seeds if seeds is not None else b["seeds"])))
    device = _device(device)
    study = Path(out).expanduser()
    study.mkdir(parents=True, exist_ok=True)
    lock = _lock_study(study)   # held until this process exits: one study process per folder
    res = Results(study / "results.json", {"budget": budget, "sizes": b})
    lists = build_data(study, b, log)
    t0 = time.time()
    for seed in seed_list:                 # seed-major: a partial study has every variant at seed 0 first
        for v in variants:
            run_cell(res, study, b, v, seed, lists, device, log, extra)
    table = write_table(res, study, variants, seed_list, command or f"python -m mam2_fast.study --budget {budget} --out {out}")
    log(f"study done in {time.time() - t0:.0f}s: {study / 'results.json'}, {study / 'table.md'}, {study / 'study.png'}")
    return {"results": str(study / "results.json"), "table": table}


def parse_travel(text: str) -> list:
    """'LO,HI' -> [LO, HI] with 0 <= LO <= HI <= 1 (a clear error otherwise)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"study: --target-travel wants LO,HI (two numbers), got {text!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise SystemExit(f"study: --target-travel wants 0 <= LO <= HI <= 1, got {text!r}")
    return [lo, hi]


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mam2_fast.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="smoke", choices=[k for k in BUDGETS if k != "micro"] + ["micro"])
    ap.add_argument("--out", default=None, help="study folder (default runs/study_<budget>)")
    ap.add_argument("--variants", default=None, help=f"comma list (default all: {','.join(VARIANTS)})")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the budget's, 3)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="number of the first seed (default 0): --first-seed 2 --seeds 1 runs seed 2 only")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--finetune-recipe", default="paper", choices=tuple(FINETUNE_RECIPES),
                    help="paper: VideoMAE's fine-tuning augmentation (default); light: no RandAugment, "
                         "mixup, cutmix or label smoothing, crops of 50-100 %% (short budgets)")
    ap.add_argument("--baselines", metavar="RUN", default=None,
                    help="print the trivial baselines of a pre-training run's targets (code entropy, "
                         "zero-motion MSE) and exit")
    ap.add_argument("--grad-balance", metavar="RUN", default=None,
                    help="print the norm of each weighted loss term's gradient on the encoder for a "
                         "MAM2 pre-training run (its latest checkpoint and its initialization) and exit")
    ap.add_argument("--video-frames", type=int, default=None,
                    help="frames per generated video (default: the budget's); with the budget's clip "
                         "(num_frames x stride) spanning the whole video, a clip sees the whole path")
    ap.add_argument("--target-travel", default=None, metavar="LO,HI",
                    help="share of the free frame width the target crosses over a video, drawn in "
                         "[LO, HI] (default 0.45,0.75); larger means more motion per clip")
    args = ap.parse_args(argv)
    if args.grad_balance:
        print(json.dumps({"init": loss_gradient_balance(args.grad_balance, at_init=True),
                          "trained": loss_gradient_balance(args.grad_balance)}, indent=1))
        return 0
    if args.baselines:
        print(json.dumps(target_baselines(args.baselines), indent=1))
        return 0
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out = args.out or f"runs/study_{args.budget}"
    cmd = "python -m mam2_fast.study " + " ".join(sys.argv[1:] if argv is None else argv)
    log = lambda s: print(f"[study] {s}", flush=True)  # noqa: E731
    recipe = args.finetune_recipe
    # a non-default recipe is part of the study's identity (a folder never mixes recipes)
    sizes = {"finetune_recipe": recipe} if recipe != "paper" else {}
    # so are the generator's settings when changed (recorded only then: older folders still match)
    if args.video_frames is not None:
        bb = BUDGETS[args.budget]
        need = (bb["num_frames"] - 1) * bb["stride"] + 1
        if args.video_frames < need:
            raise SystemExit(f"study: --video-frames {args.video_frames} is shorter than the {args.budget} "
                             f"budget's clip ({bb['num_frames']} frames at stride {bb['stride']}: {need})")
        sizes["video_frames"] = args.video_frames
    if args.target_travel is not None:
        sizes["target_travel"] = parse_travel(args.target_travel)
    sizes = sizes or None
    extra = {"finetune": FINETUNE_RECIPES[recipe]} if recipe != "paper" else None
    r = run_study(out, args.budget, args.variants.split(",") if args.variants else None, args.seeds, args.device,
                  log, cmd, sizes=sizes, extra=extra, first_seed=args.first_seed)
    print(r["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
