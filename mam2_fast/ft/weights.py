"""Reading encoder weights from pre-training checkpoints, exports and fine-tuning checkpoints.

Accepted sources (:func:`read_encoder_weights`):

* a pre-training checkpoint ``checkpoint-*.pt`` (dict with ``"model"``: MAM2 state dict, and
  ``"config"``: ``Config.to_dict()``),
* a run folder (its ``latest.txt`` / newest ``checkpoint-*.pt``),
* an exported encoder ``*.safetensors`` (:mod:`mam2_fast.export`),
* a fine-tuning checkpoint (``"kind": "finetune"``; its ``fc_norm.*`` / ``head.*`` are set aside),
* ``model.arch: videomae``: this project's VideoMAE pre-training / fine-tuning checkpoints,
  official VideoMAE ``checkpoint.pth`` files (``modeling_pretrain`` / ``modeling_finetune``
  names, under ``model`` or ``module``) and local HuggingFace VideoMAE folders
  (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``); see
  :mod:`mam2_fast.interop.videomae`. Their tensors come out under the internal VideoMAE
  names (official ``modeling_finetune`` names) and ``arch["arch"] == "videomae"``.

Every key of the source is accounted for: encoder keys (``patch_embed.*``,
``pos_embed_time``, ``pos_embed_space``, ``blocks.*``, ``norm.*``) are loaded, the known
pre-training-only modules (regressor, decoders, heads, mask query, projections) are
dropped and counted, anything else raises :class:`WeightsError` naming the key and file.
Missing encoder keys and shape mismatches raise the same way. Position embeddings whose
length differs (another ``num_frames`` / ``img_size``) are interpolated when
``interpolate_pos=True`` (the default), and the report says so.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from mam2_fast.errors import UserError
from mam2_fast.models.classifier import HEAD_PARAM_PREFIXES, VideoEncoder, is_encoder_key
from mam2_fast.train.checkpoint import find_latest, load_checkpoint

EXPORT_FORMAT = "mam2_fast.encoder"
EXPORT_VERSION = "1"

# modules of the pre-training model that fine-tuning does not use (MAM2 attribute names)
PRETRAIN_ONLY_PREFIXES = ("encoder_to_decoder.", "pos_to_decoder.", "mask_query", "regressor.",
                          "regressor_norm.", "appearance_decoder.", "motion_decoder.",
                          "appearance_head.", "motion_head.")
ARCH_KEYS = ("preset", "img_size", "num_frames", "patch_size", "in_chans", "embed_dim", "depth",
             "num_heads", "mlp_ratio", "arch", "tubelet_size", "final_norm", "temporal_fc")


class WeightsError(UserError, ValueError):
    """A weights file is unusable; the message names the file and, where it applies, the key."""


@dataclass
class EncoderWeights:
    state: dict                          # encoder keys only -> tensors
    source: str                          # the file read
    kind: str                            # pretrain | export | finetune
    arch: Optional[dict] = None          # encoder architecture (ARCH_KEYS) when known
    dropped: list = field(default_factory=list)   # pre-training-only / head keys set aside
    meta: dict = field(default_factory=dict)      # step, config, ...


def resolve_weights_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        latest = find_latest(p)
        if latest is None:
            raise WeightsError(f"{p}: folder holds no checkpoint-*.pt")
        return latest
    if not p.exists():
        raise WeightsError(f"weights file not found: {p}")
    if not p.is_file():
        raise WeightsError(f"{p}: not a regular file")
    return p


def _strip_module(state: dict) -> dict:
    # checkpoints saved from DistributedDataParallel / torch.compile wrappers
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _split_keys(state: dict, source: Path, allow_head: bool) -> tuple[dict, list]:
    enc, dropped = {}, []
    for k, v in state.items():
        if is_encoder_key(k):
            if not isinstance(v, Tensor):
                raise WeightsError(f"{source}: key '{k}' is not a tensor ({type(v).__name__})")
            enc[k] = v
        elif k.startswith(PRETRAIN_ONLY_PREFIXES) or (allow_head and k.startswith(HEAD_PARAM_PREFIXES)):
            dropped.append(k)
        else:
            raise WeightsError(f"{source}: unexpected key '{k}' (neither an encoder key nor a known "
                               f"pre-training-only module)")
    if not enc:
        raise WeightsError(f"{source}: no encoder keys (patch_embed.*, pos_embed_*, blocks.*, norm.*) found")
    return enc, dropped


def arch_from_pretrain_config(config: dict) -> dict:
    """``Config.to_dict()`` (or a fine-tuning config dict) -> resolved encoder arch."""
    from mam2_fast.models.mam2 import PRESETS

    m = dict(config["model"])
    if m.get("arch", "mam2") == "videomae":
        return _videomae_arch_from_config(m)
    preset = PRESETS[m.get("preset", "base")]
    return {"preset": m.get("preset", "base"), "img_size": m.get("img_size", 224),
            "num_frames": m.get("num_frames", 16), "patch_size": m.get("patch_size", 16),
            "in_chans": m.get("in_chans", 3), "embed_dim": m.get("embed_dim") or preset.embed_dim,
            "depth": m["depth"] if m.get("depth") is not None else preset.depth,
            "num_heads": m.get("num_heads") or preset.num_heads, "mlp_ratio": float(m.get("mlp_ratio", 4.0)),
            # configs from before model.temporal_fc existed always built it
            "temporal_fc": bool(m.get("temporal_fc", True))}


def _videomae_arch_from_config(m: dict) -> dict:
    from mam2_fast.models.mam2 import PRESETS
    from mam2_fast.models.videomae import VIDEOMAE_PRESETS

    name = m.get("preset", "base")
    vp = VIDEOMAE_PRESETS.get(name)
    mp = PRESETS.get(name)
    pick = lambda k, attr: m.get(k) or (vp[k] if vp and k in vp else getattr(mp, attr))  # noqa: E731
    depth = m["depth"] if m.get("depth") is not None else (vp["depth"] if vp and "depth" in vp else mp.depth)
    return {"preset": name, "img_size": m.get("img_size", 224), "num_frames": m.get("num_frames", 16),
            "patch_size": m.get("patch_size", 16), "in_chans": m.get("in_chans", 3),
            "embed_dim": pick("embed_dim", "embed_dim"), "depth": depth, "num_heads": pick("num_heads", "num_heads"),
            "mlp_ratio": float(m.get("mlp_ratio", 4.0)), "arch": "videomae",
            "tubelet_size": int(m.get("tubelet_size", 2)), "final_norm": bool(m.get("final_norm", True))}


def _read_videomae_source(p: Path) -> Optional[EncoderWeights]:
    """A HuggingFace folder or an official VideoMAE checkpoint; None when ``p`` is neither."""
    from mam2_fast.interop import videomae as vm

    try:
        if p.is_dir():
            if not vm.is_hf_folder(p):
                return None
            enc, arch, dropped, kind = vm.read_hf_folder(p)
            return EncoderWeights(enc, str(p), f"hf-{kind}", arch, dropped, {"format": "huggingface"})
        try:
            state = vm.load_official(p)
        except Exception:  # noqa: BLE001 - not an official checkpoint either: the caller reports
            return None
        if vm.looks_like_hf(state):
            enc, dropped, kind = vm.split_hf(state, str(p))
        elif vm.looks_like_videomae(state):
            enc, dropped, kind = vm.split_official(_strip_module(state), str(p))
        else:
            return None
    except vm.InteropError as e:
        raise WeightsError(str(e)) from e
    return EncoderWeights(enc, str(p), f"videomae-{kind}", vm.infer_arch(enc), dropped, {"format": "videomae"})


def read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    return state, meta


def read_encoder_weights(path: str | Path) -> EncoderWeights:
    """Read the encoder tensors of any accepted source (see module docstring)."""
    hf = Path(path).expanduser()
    if hf.is_dir() and (hf / "config.json").is_file():
        if (hf / "model.safetensors").is_file() and not any(hf.glob("checkpoint-*.pt")):
            try:
                is_export = json.loads((hf / "config.json").read_text()).get("format") == EXPORT_FORMAT
            except (OSError, ValueError):
                is_export = False
            if is_export:                      # a python -m mam2_fast.export folder
                return read_encoder_weights(hf / "model.safetensors")
        w = _read_videomae_source(hf)
        if w is not None:
            return w
    p = resolve_weights_path(path)
    if p.suffix == ".safetensors":
        state, meta = read_safetensors(p)
        if meta.get("format") != EXPORT_FORMAT:
            raise WeightsError(f"{p}: safetensors metadata 'format' is {meta.get('format')!r}, "
                               f"expected {EXPORT_FORMAT!r} (write it with python -m mam2_fast.export)")
        arch = json.loads(meta["arch"]) if "arch" in meta else None
        enc, dropped = _split_keys(_strip_module(state), p, allow_head=False)
        return EncoderWeights(enc, str(p), "export", _with_temporal_fc(arch, enc), dropped, meta)
    try:
        ckpt = load_checkpoint(p)
    except (RuntimeError, FileNotFoundError) as e:
        w = _read_videomae_source(p) if p.is_file() else None   # e.g. official ckpt with 'args'
        if w is not None:
            return w
        raise WeightsError(str(e)) from e
    if isinstance(ckpt, dict) and not isinstance(ckpt.get("config"), dict):
        from mam2_fast.interop import videomae as vm
        inner = next((ckpt[k] for k in ("model", "module") if isinstance(ckpt.get(k), dict)), ckpt)
        if vm.looks_like_videomae(_strip_module(inner)) or vm.looks_like_hf(inner):
            w = _read_videomae_source(p)
            if w is not None:
                return w
    if (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("config"), dict)
            and ckpt["config"].get("model", {}).get("arch") == "videomae"):
        from mam2_fast.interop import videomae as vm
        try:
            enc, dropped, _ = vm.split_official(_strip_module(ckpt["model"]), str(p))
        except vm.InteropError as e:
            raise WeightsError(str(e)) from e
        return EncoderWeights(enc, str(p), ckpt.get("kind", "pretrain"), arch_from_pretrain_config(ckpt["config"]),
                              dropped, {"step": ckpt.get("step"), "config": ckpt.get("config")})
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt["model"], dict):
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise WeightsError(f"{p}: not a mam2_fast checkpoint (no 'model' state dict; top-level: {keys})")
    kind = ckpt.get("kind", "pretrain")
    enc, dropped = _split_keys(_strip_module(ckpt["model"]), p, allow_head=(kind == "finetune"))
    arch = None
    if isinstance(ckpt.get("config"), dict) and "model" in ckpt["config"]:
        arch = arch_from_pretrain_config(ckpt["config"])
    meta = {"step": ckpt.get("step"), "config": ckpt.get("config")}
    return EncoderWeights(enc, str(p), kind, _with_temporal_fc(arch, enc), dropped, meta)


def _with_temporal_fc(arch: Optional[dict], enc: dict) -> Optional[dict]:
    """A MAM^2 encoder's ``temporal_fc`` read from its keys (older exports do not record it)."""
    if arch is None or arch.get("arch", "mam2") == "videomae":
        return arch
    return {**arch, "temporal_fc": any(k.startswith("blocks.") and ".temporal_fc." in k for k in enc)}


# ----------------------------------------------------------------------------------------
# loading into a model
# ----------------------------------------------------------------------------------------
def _interp_time(pos: Tensor, T: int) -> Tensor:
    # [T0, D] -> [T, D], linear
    return F.interpolate(pos.t()[None], size=T, mode="linear", align_corners=False)[0].t()


def _interp_space(pos: Tensor, N: int) -> Tensor:
    # [N0, D] (square grid) -> [N, D], bicubic
    g0, g = int(round(math.sqrt(pos.shape[0]))), int(round(math.sqrt(N)))
    if g0 * g0 != pos.shape[0] or g * g != N:
        raise ValueError("non-square grid")
    x = pos.t().reshape(1, -1, g0, g0)
    return F.interpolate(x, size=(g, g), mode="bicubic", align_corners=False).reshape(-1, N).t()


def load_encoder_into(model: VideoEncoder, weights: EncoderWeights, interpolate_pos: bool = True) -> dict:
    """Copy ``weights`` into the encoder part of ``model``; strict on keys and shapes.

    Returns a report: ``loaded`` (count), ``dropped`` (source keys set aside), ``interpolated``.
    """
    own = model.state_dict()
    expected = [k for k in own if is_encoder_key(k)]
    missing = [k for k in expected if k not in weights.state]
    if missing:
        raise WeightsError(f"{weights.source}: missing encoder key '{missing[0]}'"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = [k for k in weights.state if k not in own]
    set_aside = []
    if getattr(model, "arch", "mam2") == "videomae" and not getattr(model, "final_norm", True):
        # the official VideoMAE fine-tuning (use_mean_pooling) drops the pre-trained final norm
        set_aside = [k for k in unexpected if k.startswith("norm.")]
        unexpected = [k for k in unexpected if not k.startswith("norm.")]
    if unexpected:
        raise WeightsError(f"{weights.source}: unexpected key '{unexpected[0]}' for this model "
                           f"(depth {model.depth})" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    state, interpolated = {}, []
    for k in expected:
        v = weights.state[k]
        want = own[k].shape
        if v.shape != want:
            if interpolate_pos and k in ("pos_embed_time", "pos_embed_space") and v.ndim == 2 and v.shape[1] == want[1]:
                try:
                    v = _interp_time(v.float(), want[0]) if k == "pos_embed_time" else _interp_space(v.float(), want[0])
                    interpolated.append(f"{k} {tuple(weights.state[k].shape)} -> {tuple(want)}")
                except ValueError:
                    pass
            if v.shape != want:
                raise WeightsError(f"{weights.source}: shape mismatch for key '{k}': file has "
                                   f"{tuple(weights.state[k].shape)}, model expects {tuple(want)}")
        state[k] = v.to(own[k].dtype)
    result = model.load_state_dict(state, strict=False)
    left = [k for k in result.missing_keys if is_encoder_key(k)]
    assert not left and not result.unexpected_keys, (left, result.unexpected_keys)
    return {"loaded": len(state), "dropped": list(weights.dropped) + set_aside, "interpolated": interpolated,
            "source": weights.source, "kind": weights.kind}


def check_arch(weights: EncoderWeights, model_cfg) -> None:
    """Raise naming the field when a known source architecture differs from ``model_cfg`` in
    width/depth/heads/patch size (frames and image size may differ: positions are interpolated)."""
    if not weights.arch:
        return
    from mam2_fast.models.classifier import encoder_arch_dict

    mine = encoder_arch_dict(model_cfg)
    theirs_arch, my_arch = weights.arch.get("arch", "mam2"), mine.get("arch", "mam2")
    if theirs_arch != my_arch:
        raise WeightsError(f"{weights.source}: encoder arch is {theirs_arch} but model.arch is {my_arch}; "
                           f"set model.arch={theirs_arch}")
    inferred = set(weights.arch.get("inferred", ()))
    if my_arch == "mam2" and "temporal_fc" in mine:
        has_fc = any(k.startswith("blocks.") and ".temporal_fc." in k for k in weights.state)
        if has_fc != mine["temporal_fc"]:
            raise WeightsError(f"{weights.source}: the encoder {'has' if has_fc else 'has no'} temporal_fc "
                               f"(TimeSformer's linear after temporal attention) but model.temporal_fc is "
                               f"{str(mine['temporal_fc']).lower()}; set model.temporal_fc={str(has_fc).lower()}")
    if my_arch == "videomae" and weights.arch.get("final_norm") and not mine.get("final_norm", True):
        inferred.add("final_norm")   # final_norm false on a normed encoder: the norm is set aside
    for k in ("embed_dim", "depth", "num_heads", "patch_size", "in_chans", "mlp_ratio", "tubelet_size", "final_norm"):
        if k in inferred or k not in mine:
            continue
        if k in weights.arch and weights.arch[k] != mine[k]:
            raise WeightsError(f"{weights.source}: encoder {k} is {weights.arch[k]} but model.{k} resolves to "
                               f"{mine[k]}; set model.* to match the pre-trained encoder")


def encoder_config_from_arch(arch: dict, num_classes: int = 2, **extra):
    """A :class:`~mam2_fast.ft.config.ClassifierConfig` building exactly the encoder ``arch``."""
    from mam2_fast.ft.config import ClassifierConfig

    fields = {k: arch[k] for k in ARCH_KEYS if k in arch}
    return ClassifierConfig(**fields, num_classes=num_classes, **extra)
