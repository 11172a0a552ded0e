"""Positive control for fine-tuning: the whole path (list file -> decode -> crops -> classifier ->
AdamW -> multi-view evaluation) learns a task a tiny model can learn in a few dozen steps.

The study (``mam2_fast.study``) finds fine-tuning at chance for every initialization on its
cluttered videos; this test is what says that is the task and the budget, not the pipeline: if
labels were dealt to the wrong clips, the evaluation read the wrong videos, or the optimizer
never stepped, the held-out accuracy here would sit at chance (25 %) too. With the training
labels shuffled (the same videos, a broken video-label link) it must stay near chance.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from mam2_fast.data.demo import write_video                      # noqa: E402
from mam2_fast.finetune import train                              # noqa: E402
from mam2_fast.ft.config import finetune_config_from_dict         # noqa: E402

COLOURS = np.array([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, 0.1]])


def colour_block_videos(root: str, n: int, seed: int, size: int = 32, frames: int = 8,
                        shuffle_labels: bool = False) -> str:
    """``n`` videos: a block of one of 4 colours (the label) moving over grey noise; list file path."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    labels = np.arange(n) % len(COLOURS)
    rng.shuffle(labels)
    lines = []
    for i, label in enumerate(labels):
        bg = 0.35 + 0.3 * rng.random((frames, size, size, 3))
        side = int(rng.integers(size // 3, size // 2 + 1))
        x0, y0 = rng.integers(0, size - side, 2)
        vx, vy = rng.integers(-1, 2, 2)
        for t in range(frames):
            x = int(np.clip(x0 + vx * t, 0, size - side))
            y = int(np.clip(y0 + vy * t, 0, size - side))
            bg[t, y:y + side, x:x + side] = COLOURS[label]
        path = os.path.join(root, f"{i:04d}.mp4")
        write_video(path, (bg * 255).astype(np.uint8))
        lines.append((path, int(label)))
    if shuffle_labels:
        perm = rng.permutation(n)
        lines = [(p, lines[j][1]) for (p, _), j in zip(lines, perm)]
    list_file = os.path.join(root, "list.txt")
    with open(list_file, "w") as f:
        f.write("".join(f"{p} {y}\n" for p, y in lines))
    return list_file


def _finetune(tmp_path, name: str, train_list: str, test_list: str) -> dict:
    cfg = finetune_config_from_dict({
        "name": name, "init": None,
        "model": {"preset": "tiny", "img_size": 32, "num_frames": 4, "patch_size": 8, "embed_dim": 32,
                  "depth": 1, "num_heads": 2, "num_classes": 4, "drop_path": 0.0},
        "data": {"list_file": train_list, "num_frames": 4, "sampling_stride": 2, "input_size": 32,
                 "num_sample": 1, "num_workers": 1, "flip": False},
        "aug": {"rand_augment": False, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0,
                "scale": [0.6, 1.0]},
        "test": {"list_file": test_list, "num_clips": 1, "num_crops": 1, "batch_size": 8},
        "optim": {"lr": 2e-3, "warmup_epochs": 0.5, "layer_decay": 1.0},
        "train": {"epochs": 8, "batch_size": 8, "seed": 0, "device": "cpu", "precision": "fp32",
                  "output_dir": str(tmp_path / name), "log_every": 4, "save_every": 10 ** 6,
                  "keep_last": 1, "progress": False, "tensorboard": False}})
    train(cfg, test_list=test_list, log=lambda s: None)
    return json.loads((tmp_path / name / "eval" / "eval.json").read_text())


def test_finetune_from_scratch_learns_a_learnable_task_and_not_shuffled_labels(tmp_path):
    torch.set_num_threads(2)
    test_list = colour_block_videos(str(tmp_path / "test"), 32, seed=2)
    learned = _finetune(tmp_path, "true", colour_block_videos(str(tmp_path / "train"), 48, seed=1), test_list)
    shuffled = _finetune(tmp_path, "shuffled",
                         colour_block_videos(str(tmp_path / "train_shuffled"), 48, seed=1, shuffle_labels=True),
                         test_list)
    assert len(learned["videos"]) == 32 and len(shuffled["videos"]) == 32
    print(f"held-out top-1: true labels {learned['top1']:.1f} %, shuffled {shuffled['top1']:.1f} %")
    # chance is 25 %; 32 test videos: one standard error of a chance-level score is ~8 points
    assert learned["top1"] >= 75.0, learned["top1"]
    assert shuffled["top1"] <= 50.0, shuffled["top1"]
