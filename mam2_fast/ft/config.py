"""Typed fine-tuning configuration (Table 8), loaded with the pre-training YAML machinery.

Sections: ``model`` (:class:`ClassifierConfig`), ``data`` (the pre-training
:class:`~mam2_fast.data.config.DataConfig`: list file, decoding, frames, stride, repeated
sampling ``num_sample``, flip, mean/std), ``aug`` (:class:`AugConfig`), ``test``
(:class:`TestConfig`), ``optim`` (:class:`FinetuneOptimConfig`), ``train`` (the pre-training
:class:`~mam2_fast.config.TrainConfig`). ``init`` names the pre-trained weights: a
pre-training checkpoint, a run folder (its latest checkpoint) or an exported
``.safetensors`` encoder; ``null`` trains from random initialization.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mam2_fast.config import (ConfigError, TrainConfig, _at_least, _build, _check, _deep_merge, _one_of, _to_plain,
                              parse_overrides, read_yaml, validate_data, validate_optim, validate_train)
from mam2_fast.config import OptimConfig
from mam2_fast.data.config import DataConfig


@dataclass
class ClassifierConfig:
    arch: str = "mam2"                   # mam2 (divided space-time) | videomae (plain ViT, tubelets)
    preset: str = "base"                 # tiny | small | base | large
    img_size: int = 224
    num_frames: int = 16
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: Optional[int] = None      # None: from preset
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    num_classes: int = 400
    drop_path: float = 0.1               # Table 8
    head_dropout: float = 0.0
    head_init_scale: float = 0.001       # VideoMAE: head weights scaled down at init
    kernels: str = "reference"           # attention backend: reference | fused | auto
    temporal_fc: bool = False            # arch mam2: TimeSformer's extra linear after temporal
                                         # attention; must match the pre-trained encoder
    tubelet_size: int = 2                # arch videomae only: frames per tubelet
    final_norm: bool = True              # arch videomae only: encoder LayerNorm before pooling
                                         # (false = official fine-tuning's use_mean_pooling)


@dataclass
class AugConfig:
    sampling: str = "dense"              # training clips: dense (stride data.sampling_stride) | segment (TSN)
    scale: tuple = (0.08, 1.0)           # random resized crop: area fraction range
    ratio: tuple = (0.75, 1.3333333)     # random resized crop: aspect ratio range
    rand_augment: bool = True
    rand_n: int = 2                      # RandAugment (9, 0.5): n ops, magnitude 9, magnitude std 0.5
    rand_m: float = 9.0
    rand_mstd: float = 0.5
    mixup: float = 0.8                   # Beta(alpha, alpha); 0 disables
    cutmix: float = 1.0                  # Beta(alpha, alpha); 0 disables
    mixup_prob: float = 1.0              # probability of mixing a batch at all
    switch_prob: float = 0.5             # with both on: probability of cutmix instead of mixup
    label_smoothing: float = 0.1


@dataclass
class TestConfig:
    list_file: Optional[str] = None      # evaluation list (same format as data.list_file)
    sampling: str = "dense"              # dense: K clips spread over the video | segment: K TSN offsets
    num_clips: int = 5                   # K temporal clips ...
    num_crops: int = 3                   # ... x 3 spatial crops (1: centre crop)
    batch_size: int = 4                  # videos per evaluation batch (each = K x crops views)
    every_epochs: int = 0                # evaluate during training every n epochs; 0: at the end only


@dataclass
class FinetuneOptimConfig(OptimConfig):
    base_lr: float = 5e-4                # lr = base_lr * effective_batch / 256
    betas: tuple = (0.9, 0.999)
    layer_decay: float = 0.75            # layer-wise lr decay (BEiT / VideoMAE)
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6                 # VideoMAE fine-tuning: 1e-6 * batch / 256


@dataclass
class FinetuneConfig:
    name: str = "finetune"
    init: Optional[str] = None           # pre-training checkpoint | run folder | .safetensors | null
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(num_sample=2, epoch_unit="videos"))
    aug: AugConfig = field(default_factory=AugConfig)
    test: TestConfig = field(default_factory=TestConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, output_dir="runs/finetune"))

    def to_dict(self) -> dict:
        return _to_plain(self)

    def validate(self) -> "FinetuneConfig":
        validate(self)
        return self


def load_finetune_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                         defaults: Optional[dict] = None) -> FinetuneConfig:
    """YAML file (or ``defaults`` when no file) + dotted overrides -> validated config."""
    data = read_yaml(path) if path else dict(defaults or {})
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    return _build(FinetuneConfig, data).validate()


def finetune_config_from_dict(data: dict) -> FinetuneConfig:
    return _build(FinetuneConfig, data).validate()


def validate(cfg: FinetuneConfig) -> None:
    from mam2_fast.models.mam2 import PRESETS

    m = cfg.model
    _one_of(m.arch, "model.arch", ("mam2", "videomae"))
    _one_of(m.preset, "model.preset", tuple(PRESETS))
    if m.arch == "videomae":
        _check(m.tubelet_size >= 1 and m.num_frames % m.tubelet_size == 0, "model.num_frames",
               f"{m.num_frames} must be a multiple of model.tubelet_size ({m.tubelet_size})")
    _check(m.img_size > 0 and m.patch_size > 0 and m.img_size % m.patch_size == 0, "model.img_size",
           f"{m.img_size} must be a positive multiple of model.patch_size ({m.patch_size})")
    _check(m.num_frames >= 1, "model.num_frames", f"must be >= 1, got {m.num_frames}")
    _check(m.num_classes >= 2, "model.num_classes", f"must be >= 2, got {m.num_classes}")
    for name in ("embed_dim", "depth", "num_heads"):
        v = getattr(m, name)
        _check(v is None or v > 0, f"model.{name}", f"must be > 0, got {v}")
    _check(0.0 <= m.drop_path < 1.0, "model.drop_path", f"must be in [0, 1), got {m.drop_path}")
    _check(0.0 <= m.head_dropout < 1.0, "model.head_dropout", f"must be in [0, 1), got {m.head_dropout}")
    _one_of(m.kernels, "model.kernels", ("reference", "fused", "auto"))
    _at_least(m.in_chans, "model.in_chans", 1)
    _check(m.mlp_ratio > 0, "model.mlp_ratio", f"must be > 0, got {m.mlp_ratio}")
    _at_least(m.head_init_scale, "model.head_init_scale", 0)
    _at_least(m.tubelet_size, "model.tubelet_size", 1)

    a = cfg.aug
    _one_of(a.sampling, "aug.sampling", ("dense", "segment"))
    _check(len(a.scale) == 2 and 0 < a.scale[0] <= a.scale[1] <= 1, "aug.scale", f"must be 0 < lo <= hi <= 1, got {a.scale}")
    _check(len(a.ratio) == 2 and 0 < a.ratio[0] <= a.ratio[1], "aug.ratio", f"must be 0 < lo <= hi, got {a.ratio}")
    _check(a.rand_n >= 0, "aug.rand_n", f"must be >= 0, got {a.rand_n}")
    _check(0 <= a.rand_m <= 10, "aug.rand_m", f"must be in [0, 10], got {a.rand_m}")
    _check(a.rand_mstd >= 0, "aug.rand_mstd", f"must be >= 0, got {a.rand_mstd}")
    _at_least(a.mixup, "aug.mixup", 0)
    _at_least(a.cutmix, "aug.cutmix", 0)
    _check(0 <= a.mixup_prob <= 1, "aug.mixup_prob", f"must be in [0, 1], got {a.mixup_prob}")
    _check(0 <= a.switch_prob <= 1, "aug.switch_prob", f"must be in [0, 1], got {a.switch_prob}")
    _check(0 <= a.label_smoothing < 1, "aug.label_smoothing", f"must be in [0, 1), got {a.label_smoothing}")

    t = cfg.test
    _one_of(t.sampling, "test.sampling", ("dense", "segment"))
    _check(t.num_clips >= 1, "test.num_clips", f"must be >= 1, got {t.num_clips}")
    _one_of(t.num_crops, "test.num_crops", (1, 3))
    _check(t.batch_size >= 1, "test.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.every_epochs >= 0, "test.every_epochs", f"must be >= 0, got {t.every_epochs}")

    o = cfg.optim
    _check(o.base_lr > 0, "optim.base_lr", f"must be > 0, got {o.base_lr}")
    _check(o.lr is None or o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(0 < o.layer_decay <= 1, "optim.layer_decay", f"must be in (0, 1], got {o.layer_decay}")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", f"must be two numbers in [0, 1), got {o.betas}")
    validate_optim(o)

    r = cfg.train
    _check(r.epochs >= 1, "train.epochs", f"must be >= 1, got {r.epochs}")
    _check(r.batch_size >= 1, "train.batch_size", f"must be >= 1, got {r.batch_size}")
    _check(r.max_steps is None or r.max_steps >= 1, "train.max_steps", f"must be >= 1, got {r.max_steps}")
    _check(r.accum_steps >= 1, "train.accum_steps", f"must be >= 1, got {r.accum_steps}")
    _one_of(r.device, "train.device", ("auto", "cpu", "cuda"))
    _one_of(r.precision, "train.precision", ("auto", "bf16", "fp16", "fp32"))
    validate_train(r)

    d = cfg.data
    _check(d.num_frames == m.num_frames, "data.num_frames", f"{d.num_frames} must equal model.num_frames ({m.num_frames})")
    _check(d.input_size == m.img_size, "data.input_size", f"{d.input_size} must equal model.img_size ({m.img_size})")
    _check(d.num_sample >= 1 and r.batch_size % d.num_sample == 0, "data.num_sample",
           f"train.batch_size ({r.batch_size}) must be a multiple of data.num_sample ({d.num_sample})")
    _check(d.demo or d.list_file is not None, "data.list_file", "is required unless data.demo is true")
    validate_data(d)


def replace_data(cfg: FinetuneConfig, **changes) -> FinetuneConfig:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))


__all__ = ["AugConfig", "ClassifierConfig", "ConfigError", "FinetuneConfig", "FinetuneOptimConfig", "TestConfig",
           "finetune_config_from_dict", "load_finetune_config", "replace_data"]
