"""Typed run configuration, loaded from YAML (configs/) with command-line overrides.

A config file is a nested mapping whose sections mirror :class:`Config`. Unknown keys,
wrong types and out-of-range values raise :class:`ConfigError` naming the offending key
before anything is built. Overrides use dotted keys: ``model.depth=4 optim.base_lr=3e-4``.
A file may start from another with ``base: other.yaml`` (path relative to the file).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from mam2_fast.data.config import DataConfig
from mam2_fast.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key or value is invalid; the message names it (CLI: exit code 2)."""

    exit_code = 2
    prefix = "config error"


# ----------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    arch: str = "mam2"                   # mam2 | videomae (baseline: plain ViT, tubelet 2, pixels)
    preset: str = "base"                 # tiny | small | base | large (ViT width/depth/heads)
    img_size: int = 224
    num_frames: int = 16
    patch_size: int = 16                 # 1 x P x P patches (tubelet 1)
    tubelet_size: int = 2                # arch videomae only (MAM^2 uses 1 x P x P patches)
    in_chans: int = 3
    embed_dim: Optional[int] = None      # None: from preset
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    # regressor / decoders (Table 1a, 1c)
    decoder_dim: Optional[int] = None    # None: encoder width; otherwise projection after encoder
    decoder_heads: Optional[int] = None  # None: decoder_dim // 64
    regressor_depth: int = 4
    appearance_depth: int = 4
    motion_depth: int = 2
    # ablation switches (Table 2)
    use_regressor: bool = True
    use_alignment: bool = True
    use_appearance: bool = True
    use_motion: bool = True
    coupled_decoder: bool = False        # MAM^2-c: one decoder (appearance_depth blocks), two heads
    align_weight: float = 2.0            # alpha in Eq. 4
    align_reduction: str = "mean"        # Eq. 1: squared error averaged over channels ("mean",
                                         # CAE's released F.mse_loss) or summed ("sum", Eq. 1's
                                         # squared L2 read literally; ~D' x larger)
    motion_space: str = "raw"            # RGB-difference target on raw [0, 1] RGB (Sec. 2.2) |
                                         # normalized (the normalized clip the model sees)
    regressor_block: str = "cae"         # cae (CAE code: x = norm2(x); x = x + mlp(x), layer
                                         # scale, xavier init) | prenorm (x = x + mlp(norm2(x)))
    temporal_fc: bool = False            # TimeSformer's extra D x D linear after temporal attention
                                         # (off: matches the paper's 114 M / 403 M encoders)
    # targets (Table 1e/1f, Sec. 2.2)
    motion_target: str = "rgb_diff"      # Table 1f: rgb_diff (Eq. 3) | flow (RAFT flow of masked
                                         # patches; the trainer passes forward(motion_target=...))
                                         # | clip_order (swap 2 temporal clips per masked tube,
                                         # CE over 2 orders; tube/cube masks + regressor only)
    appearance_target: str = "tokens"    # tokens (CE over tokenizer codes, Eq. 2) | pixels
                                         # (MSE to per-patch normalized pixels, VideoMAE/MAE-ST
                                         # baselines; no tokenizer)
    grad_checkpointing: bool = False     # recompute each encoder/decoder/regressor block in backward
    # optical-flow motion target (Table 1f): torchvision RAFT from a local weights file
    flow_weights: Optional[str] = None
    flow_variant: str = "raft_large"     # raft_large | raft_small
    flow_updates: int = 12               # RAFT refinement iterations
    flow_scale: float = 1.0              # multiplier on the flow in pixels
    drop_path: float = 0.0
    layer_scale_init: Optional[float] = None  # regressor layer scale; None: 0.1 for cae (CAE's
                                         # decoder_layer_scale_init_value), 0 (off) for prenorm
    kernels: str = "reference"           # reference | fused | auto


@dataclass
class MaskConfig:
    kind: str = "tube"                   # tube | random | cube | frame (Table 1d)
    ratio: float = 0.75
    cube_min_block: int = 16             # block-wise (BEiT) masking: min patches per block
    cube_max_aspect: float = 3.0


@dataclass
class TokenizerConfig:
    kind: str = "kmeans"                 # kmeans | vqgan | dalle
    vocab_size: int = 64                 # kmeans codes; VQGAN/DALL-E read theirs from the model
    kmeans_pool: int = 4
    kmeans_fit_clips: int = 32           # clips sampled from the training data to fit k-means
    checkpoint: Optional[str] = None
    checkpoint_config: Optional[str] = None
    preset: Optional[str] = None
    dtype: str = "bfloat16"              # tokenizer compute dtype on CUDA (float32 on CPU)
    chunk_frames: int = 64               # frames per tokenizer call (bounds memory)
    resize_mode: str = "lanczos"         # resize when the tokenizer stride != patch size (BEiT)
    fused_norm: bool = False             # VQGAN on CUDA: fused GroupNorm + SiLU kernel (not yet timed on a GPU)
    compile: bool = False                # VQGAN / DALL-E: torch.compile the encoder + quantizer (not yet timed on a GPU)


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4              # lr = base_lr * effective_batch / 256
    lr: Optional[float] = None           # absolute lr; overrides the scaling rule
    min_lr: float = 1e-5                 # cosine floor; scaled like base_lr (VideoMAE code:
                                         # min_lr * batch / 256) unless scale_min_lr is false
    scale_min_lr: bool = True
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    warmup_epochs: float = 20.0
    clip_grad: float = 0.0               # max grad norm; 0 disables
    fused: str = "auto"                  # torch fused AdamW: auto | true | false


@dataclass
class TrainConfig:
    epochs: int = 800
    batch_size: int = 32                 # per process
    accum_steps: int = 1
    global_batch: Optional[int] = None   # if set: accum_steps = global_batch / (batch_size * world)
    max_steps: Optional[int] = None      # stop early (demo, smoke tests)
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda
    precision: str = "auto"              # auto (GPUs: bf16 where native, sm_80+, else fp16 with a
                                         # loss scaler; CPU: fp32) | bf16 | fp16 | fp32
    output_dir: str = "runs/mam2"
    log_every: int = 10
    save_every: int = 500                # optimizer steps between checkpoints
    keep_last: int = 2
    overwrite: bool = False              # replace another run's files in output_dir (else refused unless --resume)
    progress: bool = True
    tensorboard: bool = True
    threads: int = 0                     # torch CPU threads; 0 keeps torch's default
    # engine (issue 6)
    parallel: str = "ddp"                # ddp | fsdp (FSDP2 fully_shard); used under torchrun
    compile: bool = False                # torch.compile the model (fused kernels are custom ops)
    compile_mode: str = "default"        # default | reduce-overhead (CUDA graphs) | max-autotune
    max_nonfinite: int = 5               # stop after this many non-finite steps in a row
    stop_check_every: int = 10           # steps between distributed agreement on SIGTERM stops
    dist_timeout_min: float = 30.0       # process-group timeout: a collective waits this long for the slowest rank
    prefetch: int = -1                   # batches assembled ahead on a background thread (0: inline; -1: 1 on CUDA, 0 on CPU)


@dataclass
class Config:
    name: str = "mam2"
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return _to_plain(self)

    def validate(self) -> "Config":
        validate(self)
        return self


# ----------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------
def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type ``tp``; raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is tuple or origin is tuple or tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return tuple(value) if (tp is tuple or origin is tuple) else list(value)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known in this section: {', '.join(names)})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, _chain: tuple = ()) -> dict:
    """Read a config file, following ``base:`` chains (a file that includes itself, directly
    or through others, is an error naming the cycle)."""
    if not _chain:                       # a packaged preset by name (mam2_fast.presets)
        from mam2_fast.presets import missing_config_message, resolve_config_path
        path = resolve_config_path(path)
        if not path.is_file():
            raise ConfigError(missing_config_message(path))
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    real = path.resolve()
    if real in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, real)[list(_chain).index(real):])
        raise ConfigError(f"{path}: 'base:' includes itself ({cycle})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
        data = _deep_merge(read_yaml(path.parent / base, (*_chain, real)), data)
    return data


def parse_overrides(items: list[str]) -> dict:
    """``["model.depth=4", "mask.kind=random"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    data = read_yaml(path) if path else {}
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    cfg = _build(Config, data)
    return cfg.validate()


def config_from_dict(data: dict) -> Config:
    return _build(Config, data).validate()


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------
def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value: Any, key: str, choices: tuple) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(map(repr, choices))}")


def _at_least(value: Any, key: str, low: float) -> None:
    _check(value >= low, key, f"must be >= {low:g}, got {value}")   # NaN fails too


def validate_data(d: DataConfig, prefix: str = "data") -> None:
    """Every :class:`DataConfig` value in range (shared by pre-training and fine-tuning)."""
    from mam2_fast.data.backends import BACKENDS
    k = lambda name: f"{prefix}.{name}"  # noqa: E731
    _check(d.list_file is None or d.list_file.strip() != "", k("list_file"), "must not be empty")
    _one_of(d.format, k("format"), ("video", "frames"))
    _one_of(d.epoch_unit, k("epoch_unit"), ("clips", "videos"))
    try:
        d.frame_pattern.format(1)
        ok = d.frame_pattern.format(1) != d.frame_pattern.format(2)
    except (IndexError, KeyError, ValueError):
        ok = False
    _check(ok, k("frame_pattern"), f"must hold one index field such as 'img_{{:05d}}.jpg', got {d.frame_pattern!r}")
    _check(d.demo_dir.strip() != "", k("demo_dir"), "must not be empty")
    _at_least(d.demo_num_videos, k("demo_num_videos"), 1)
    _at_least(d.num_frames, k("num_frames"), 1)
    _at_least(d.sampling_stride, k("sampling_stride"), 1)
    _at_least(d.num_sample, k("num_sample"), 1)
    _one_of(d.short_video, k("short_video"), ("loop", "pad"))
    _at_least(d.input_size, k("input_size"), 1)
    _check(len(d.multiscale_scales) >= 1 and all(isinstance(s, (int, float)) and 0 < s <= 1
                                                  for s in d.multiscale_scales),
           k("multiscale_scales"), f"must be one or more numbers in (0, 1], got {d.multiscale_scales}")
    _at_least(d.max_distort, k("max_distort"), 0)
    _check(len(d.mean) >= 1 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in d.mean),
           k("mean"), f"must be one finite number per channel, got {d.mean}")
    _check(len(d.std) == len(d.mean) and all(isinstance(v, (int, float)) and v > 0 and math.isfinite(v)
                                             for v in d.std),
           k("std"), f"must be one number > 0 per channel (as many as data.mean), got {d.std}")
    _one_of(d.out_dtype, k("out_dtype"), ("float32", "bfloat16"))
    _one_of(d.augment_impl, k("augment_impl"), ("auto", "extension", "torch"))
    _one_of(d.backend, k("backend"), tuple(BACKENDS))
    _at_least(d.num_workers, k("num_workers"), 0)
    _at_least(d.prefetch, k("prefetch"), 1)
    _at_least(d.decode_threads, k("decode_threads"), 0)
    _at_least(d.decode_short_side, k("decode_short_side"), 0)
    _one_of(d.mp_context, k("mp_context"), ("fork", "forkserver", "spawn"))
    _check(d.decode_timeout_s > 0, k("decode_timeout_s"), f"must be > 0 seconds, got {d.decode_timeout_s}")
    _check(0.0 <= d.max_bad_fraction <= 1.0, k("max_bad_fraction"), f"must be in [0, 1], got {d.max_bad_fraction}")
    _at_least(d.max_worker_restarts, k("max_worker_restarts"), 0)


def validate_train(r: "TrainConfig") -> None:
    """Every :class:`TrainConfig` value in range (shared by pre-training and fine-tuning)."""
    _at_least(r.epochs, "train.epochs", 1)
    _at_least(r.batch_size, "train.batch_size", 1)
    _at_least(r.accum_steps, "train.accum_steps", 1)
    _check(r.global_batch is None or r.global_batch >= 1, "train.global_batch", f"must be >= 1, got {r.global_batch}")
    _check(r.max_steps is None or r.max_steps >= 1, "train.max_steps", f"must be >= 1, got {r.max_steps}")
    _check(0 <= r.seed < 2 ** 32, "train.seed", f"must be in [0, 2**32), got {r.seed}")
    _one_of(r.device, "train.device", ("auto", "cpu", "cuda"))
    _one_of(r.precision, "train.precision", ("auto", "bf16", "fp16", "fp32"))
    _check(r.output_dir.strip() != "", "train.output_dir", "must not be empty")
    _at_least(r.log_every, "train.log_every", 1)
    _at_least(r.save_every, "train.save_every", 1)
    _at_least(r.keep_last, "train.keep_last", 1)
    _at_least(r.threads, "train.threads", 0)
    _one_of(r.parallel, "train.parallel", ("ddp", "fsdp"))
    _one_of(r.compile_mode, "train.compile_mode", ("default", "reduce-overhead", "max-autotune",
                                                   "max-autotune-no-cudagraphs"))
    _at_least(r.max_nonfinite, "train.max_nonfinite", 1)
    _at_least(r.stop_check_every, "train.stop_check_every", 1)
    _check(r.prefetch >= -1, "train.prefetch", f"must be >= 0, or -1 for auto; got {r.prefetch}")
    _check(r.dist_timeout_min > 0, "train.dist_timeout_min", f"must be > 0 minutes, got {r.dist_timeout_min}")


def validate_optim(o: "OptimConfig") -> None:
    """Every :class:`OptimConfig` value in range (shared by pre-training and fine-tuning)."""
    _check(o.base_lr > 0, "optim.base_lr", f"must be > 0, got {o.base_lr}")
    _check(o.lr is None or o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _at_least(o.min_lr, "optim.min_lr", 0)
    _at_least(o.weight_decay, "optim.weight_decay", 0)
    _check(len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas), "optim.betas",
           f"must be two numbers in [0, 1), got {o.betas}")
    _check(o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}")
    _at_least(o.warmup_epochs, "optim.warmup_epochs", 0)
    _at_least(o.clip_grad, "optim.clip_grad", 0)
    _one_of(str(o.fused).lower(), "optim.fused", ("auto", "true", "false"))


def validate(cfg: Config) -> None:
    """Every pre-training value in range and consistent; the first failing check raises a
    ``ConfigError`` naming its key, in this order: model, mask, tokenizer, the optim and train
    checks shared with fine-tuning (:func:`validate_optim`, :func:`validate_train`) and
    pre-training's own batch check, data against the model, then :func:`validate_data`."""
    m = cfg.model
    _validate_arch(m, cfg.mask.kind)
    _validate_model_values(m)
    _validate_model_tasks(m, cfg.mask.kind)
    _validate_mask(cfg.mask)
    _validate_tokenizer(cfg.tokenizer)
    validate_optim(cfg.optim)
    validate_train(cfg.train)
    _validate_pretrain_batch(cfg.train)
    _validate_data_against_model(cfg.data, m)
    validate_data(cfg.data)


def _validate_arch(m: ModelConfig, mask_kind: str) -> None:
    """``model.arch`` and ``model.preset`` (the VideoMAE baseline: its presets, tubelets, tube masks)."""
    from mam2_fast.models.mam2 import PRESETS  # local import: models import config types

    _one_of(m.arch, "model.arch", ("mam2", "videomae"))
    _one_of(m.preset, "model.preset", tuple(PRESETS))
    if m.arch == "videomae":
        from mam2_fast.models.videomae import VIDEOMAE_PRESETS
        _one_of(m.preset, "model.preset", tuple(VIDEOMAE_PRESETS))
        _check(m.num_frames % m.tubelet_size == 0, "model.num_frames",
               f"{m.num_frames} must be a multiple of model.tubelet_size ({m.tubelet_size})")
        _check(mask_kind == "tube", "mask.kind", "the VideoMAE baseline uses tube masking")


def _validate_model_values(m: ModelConfig) -> None:
    """Each ``model.*`` value in range on its own (sizes, depths, choices, flow settings)."""
    _check(m.img_size > 0 and m.img_size % m.patch_size == 0, "model.img_size",
           f"{m.img_size} must be a positive multiple of model.patch_size ({m.patch_size})")
    _check(m.num_frames >= 1, "model.num_frames", f"must be >= 1, got {m.num_frames}")
    _check(m.patch_size > 0, "model.patch_size", f"must be > 0, got {m.patch_size}")
    for name in ("embed_dim", "depth", "num_heads", "decoder_dim", "decoder_heads"):
        v = getattr(m, name)
        _check(v is None or v > 0, f"model.{name}", f"must be > 0, got {v}")
    for name in ("regressor_depth", "appearance_depth", "motion_depth"):
        _check(getattr(m, name) >= 0, f"model.{name}", f"must be >= 0, got {getattr(m, name)}")
    _check(0.0 <= m.drop_path < 1.0, "model.drop_path", f"must be in [0, 1), got {m.drop_path}")
    _check(m.align_weight >= 0, "model.align_weight", f"must be >= 0, got {m.align_weight}")
    _one_of(m.align_reduction, "model.align_reduction", ("sum", "mean"))
    _one_of(m.motion_space, "model.motion_space", ("raw", "normalized"))
    _one_of(m.regressor_block, "model.regressor_block", ("cae", "prenorm"))
    _check(m.layer_scale_init is None or m.layer_scale_init >= 0, "model.layer_scale_init",
           f"must be >= 0 (0 disables it, null takes the block's default), got {m.layer_scale_init}")
    _one_of(m.motion_target, "model.motion_target", ("rgb_diff", "flow", "clip_order"))
    _one_of(m.appearance_target, "model.appearance_target", ("tokens", "pixels"))
    if m.use_motion and m.motion_target == "flow":
        _check(m.flow_weights is not None, "model.flow_weights",
               "motion_target 'flow' needs a local RAFT weights file (torchvision raft_large state dict)")
    _one_of(m.flow_variant, "model.flow_variant", ("raft_large", "raft_small"))
    _check(m.flow_updates >= 1, "model.flow_updates", f"must be >= 1, got {m.flow_updates}")
    _one_of(m.kernels, "model.kernels", ("reference", "fused", "auto"))
    _at_least(m.tubelet_size, "model.tubelet_size", 1)
    _at_least(m.in_chans, "model.in_chans", 1)
    _check(m.mlp_ratio > 0, "model.mlp_ratio", f"must be > 0, got {m.mlp_ratio}")
    _check(m.flow_scale > 0 and math.isfinite(m.flow_scale), "model.flow_scale", f"must be > 0, got {m.flow_scale}")


def _validate_model_tasks(m: ModelConfig, mask_kind: str) -> None:
    """The task switches fit together: a task on, the decoders they use deep enough, clip order's
    needs (whole masked tubes, the regressor, its own decoder, two clips)."""
    _check(m.use_appearance or m.use_motion, "model.use_appearance",
           "at least one of use_appearance / use_motion must be true")
    if m.use_regressor:
        _check(m.regressor_depth >= 1, "model.regressor_depth", "must be >= 1 when use_regressor is true")
    if m.use_appearance or m.coupled_decoder:
        _check(m.appearance_depth >= 1, "model.appearance_depth", "must be >= 1 when the appearance decoder is used")
    if m.use_motion and not m.coupled_decoder:
        _check(m.motion_depth >= 1, "model.motion_depth", "must be >= 1 when the motion decoder is used")
    if m.use_motion and m.motion_target == "clip_order":
        _check(mask_kind in ("tube", "cube"), "model.motion_target",
               f"'clip_order' needs whole masked tubes: mask.kind must be 'tube' or 'cube', got {mask_kind!r}")
        _check(m.use_regressor, "model.motion_target", "'clip_order' shuffles the regressor's latents: "
               "it needs model.use_regressor=true")
        _check(not m.coupled_decoder, "model.motion_target",
               "'clip_order' needs its own motion decoder: it cannot be used with model.coupled_decoder=true")
        _check(m.num_frames >= 2, "model.motion_target", f"'clip_order' needs model.num_frames >= 2, got {m.num_frames}")


def _validate_mask(k: MaskConfig) -> None:
    _one_of(k.kind, "mask.kind", ("tube", "random", "cube", "frame"))
    _check(0.0 < k.ratio < 1.0, "mask.ratio", f"must be in (0, 1), got {k.ratio}")
    _check(k.cube_min_block >= 1, "mask.cube_min_block", f"must be >= 1, got {k.cube_min_block}")
    _check(k.cube_max_aspect >= 1.0, "mask.cube_max_aspect", f"must be >= 1, got {k.cube_max_aspect}")


def _validate_tokenizer(t: TokenizerConfig) -> None:
    _one_of(t.kind, "tokenizer.kind", ("kmeans", "vqgan", "dalle"))
    _check(t.vocab_size >= 2, "tokenizer.vocab_size", f"must be >= 2, got {t.vocab_size}")
    _check(t.kmeans_fit_clips >= 1, "tokenizer.kmeans_fit_clips", f"must be >= 1, got {t.kmeans_fit_clips}")
    _one_of(t.dtype, "tokenizer.dtype", ("bfloat16", "float16", "float32"))
    _one_of(t.resize_mode, "tokenizer.resize_mode", ("lanczos", "bilinear", "bicubic", "area", "nearest"))
    _check(t.chunk_frames >= 1, "tokenizer.chunk_frames", f"must be >= 1, got {t.chunk_frames}")
    _at_least(t.kmeans_pool, "tokenizer.kmeans_pool", 1)


def _validate_pretrain_batch(r: TrainConfig) -> None:
    """Pre-training's own train check: ``global_batch`` a whole number of per-process batches."""
    _check(r.global_batch is None or (r.global_batch >= r.batch_size and r.global_batch % r.batch_size == 0),
           "train.global_batch", f"{r.global_batch} must be a multiple of train.batch_size ({r.batch_size})")


def _validate_data_against_model(d: DataConfig, m: ModelConfig) -> None:
    """The clips the data makes fit the model (frames, size, channels) and a source is named."""
    _one_of(d.format, "data.format", ("video", "frames"))
    _check(d.num_frames == m.num_frames, "data.num_frames",
           f"{d.num_frames} must equal model.num_frames ({m.num_frames})")
    _check(d.input_size == m.img_size, "data.input_size",
           f"{d.input_size} must equal model.img_size ({m.img_size})")
    _check(d.sampling_stride >= 1, "data.sampling_stride", f"must be >= 1, got {d.sampling_stride}")
    _check(d.num_sample >= 1, "data.num_sample", f"must be >= 1, got {d.num_sample}")
    _check(len(d.mean) == m.in_chans and len(d.std) == m.in_chans, "data.mean",
           f"mean/std need {m.in_chans} values")
    _check(all(s > 0 for s in d.std), "data.std", f"must be > 0, got {d.std}")
    _check(d.demo or d.list_file is not None, "data.list_file",
           "is required unless data.demo is true")
