"""VideoMAE weights in and out: official ``checkpoint.pth`` files, HuggingFace folders.

Internal names (``model.arch: videomae`` encoder, :mod:`mam2_fast.models.videomae_classifier`)
are the official ``modeling_finetune`` names; the official ``modeling_pretrain`` names are
the same under ``encoder.``. HuggingFace ``transformers`` (``VideoMAEModel``; under
``videomae.`` in ``VideoMAEForPreTraining`` / ``VideoMAEForVideoClassification``):

==========================================  ===========================================================
internal                                    HuggingFace
==========================================  ===========================================================
``patch_embed.proj.{weight,bias}``          ``embeddings.patch_embeddings.projection.{weight,bias}``
``blocks.{i}.norm1.*``                      ``encoder.layer.{i}.layernorm_before.*``
``blocks.{i}.attn.qkv.weight`` [3D, D]      ``encoder.layer.{i}.attention.attention.{query,key,value}.weight``
``blocks.{i}.attn.q_bias`` / ``v_bias``     ``...attention.attention.q_bias`` / ``v_bias`` (transformers 4)
                                            or ``...attention.attention.query.bias`` / ``value.bias`` (5)
``blocks.{i}.attn.proj.*``                  ``encoder.layer.{i}.attention.output.dense.*``
``blocks.{i}.norm2.*``                      ``encoder.layer.{i}.layernorm_after.*``
``blocks.{i}.mlp.fc1.*`` / ``fc2.*``        ``encoder.layer.{i}.intermediate.dense.*`` / ``output.dense.*``
``norm.*``                                  ``layernorm.*`` (``use_mean_pooling: false``)
``fc_norm.*`` / ``head.*``                  ``fc_norm.*`` / ``classifier.*``
==========================================  ===========================================================

Positions are the fixed sinusoid table over the flat (t, h, w) token index in all three;
they are not stored. Reading accepts both HuggingFace bias spellings; writing uses the one
the installed ``transformers`` loads (checked by :func:`hf_bias_style`), else the version-5
spelling. (A transformers release that does not know a spelling leaves those biases at
zero without an error, hence ``export`` verifies the written folder numerically when
``transformers`` is importable.)
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

# official widths -> heads (ViT-S/B/L/H/g); other widths: 64 channels per head
KNOWN_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
PRETRAIN_ONLY = ("decoder.", "encoder_to_decoder.", "mask_token", "pos_embed")
HEAD_KEYS = ("fc_norm.", "head.")


class InteropError(ValueError):
    pass


# ----------------------------------------------------------------------------------------
# recognizing and normalizing official VideoMAE state dicts
# ----------------------------------------------------------------------------------------
def looks_like_videomae(state: dict) -> bool:
    return any(k in state for k in ("encoder.patch_embed.proj.weight", "patch_embed.proj.weight"))


def looks_like_hf(state: dict) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state)


def infer_arch(enc: dict) -> dict:
    """Architecture of internal-named VideoMAE encoder tensors (shapes only). ``num_heads``,
    ``img_size`` and ``num_frames`` cannot be read from weights: official widths get their
    official head count, others 64 channels per head; frames / size default to 16 / 224 and
    are listed under ``inferred``."""
    w = enc["patch_embed.proj.weight"]                       # [D, C, t, P, P]
    D, C, t, P = int(w.shape[0]), int(w.shape[1]), int(w.shape[2]), int(w.shape[3])
    depth = 1 + max((int(k.split(".")[1]) for k in enc if k.startswith("blocks.")), default=-1)
    hidden = int(enc["blocks.0.mlp.fc1.weight"].shape[0]) if depth else 4 * D
    return {"arch": "videomae", "preset": _preset_for(D, depth), "img_size": 224, "num_frames": 16,
            "patch_size": P, "in_chans": C, "embed_dim": D, "depth": depth,
            "num_heads": KNOWN_HEADS.get(D, max(1, D // 64)), "mlp_ratio": hidden / D, "tubelet_size": t,
            "final_norm": "norm.weight" in enc, "qkv_bias": "blocks.0.attn.q_bias" in enc,
            "inferred": ["num_heads", "img_size", "num_frames"]}


def _preset_for(D: int, depth: int) -> str:
    from mam2_fast.models.mam2 import PRESETS
    for name, p in PRESETS.items():
        if p.embed_dim == D and p.depth == depth:
            return name
    return "base"


def split_official(state: dict, source: str) -> tuple[dict, list, str]:
    """Official VideoMAE state dict (pre-training ``encoder.*`` + decoder, or fine-tuning
    names) -> (internal encoder tensors, dropped keys, kind ``pretrain`` | ``finetune``)."""
    pretrain = any(k.startswith("encoder.") for k in state)
    enc, dropped = {}, []
    for k, v in state.items():
        name = k[len("encoder."):] if pretrain and k.startswith("encoder.") else k
        if pretrain and not k.startswith("encoder."):
            if k.startswith(PRETRAIN_ONLY):
                dropped.append(k)
                continue
            raise InteropError(f"{source}: unexpected key '{k}' in a VideoMAE pre-training checkpoint")
        if name.startswith(("patch_embed.", "blocks.", "norm.")):
            if not isinstance(v, Tensor):
                raise InteropError(f"{source}: key '{k}' is not a tensor")
            enc[name] = v
        elif name.startswith(HEAD_KEYS) or name == "pos_embed":
            if name == "pos_embed":
                _check_fixed_pos(v, source)
            dropped.append(k)
        else:
            raise InteropError(f"{source}: unexpected key '{k}' (not a VideoMAE encoder, decoder or head key)")
    if "patch_embed.proj.weight" not in enc:
        raise InteropError(f"{source}: no VideoMAE patch embedding ('patch_embed.proj.weight') found")
    return enc, dropped, ("pretrain" if pretrain else "finetune")


def _check_fixed_pos(v: Tensor, source: str) -> None:
    from mam2_fast.models.videomae import sinusoid_table
    v = v.reshape(-1, v.shape[-1]).float()
    ref = sinusoid_table(v.shape[0], v.shape[1])[0]
    if not torch.allclose(v, ref, atol=1e-4):
        raise InteropError(f"{source}: 'pos_embed' is not the fixed sinusoid table (learnable position "
                           f"embeddings are not supported for model.arch videomae)")


# ----------------------------------------------------------------------------------------
# HuggingFace <-> internal
# ----------------------------------------------------------------------------------------
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_SIMPLE = {  # layer-relative HF name -> internal block-relative name
    "layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
}


def split_hf(state: dict, source: str) -> tuple[dict, list, str]:
    """HuggingFace VideoMAE tensors -> (internal encoder tensors, dropped keys, kind)."""
    prefixed = any(k.startswith("videomae.") for k in state)
    enc, dropped, qkv = {}, [], {}
    kind = "finetune" if any(k.startswith(("classifier.", "fc_norm.")) for k in state) else "pretrain"
    for k, v in state.items():
        name = k[len("videomae."):] if prefixed and k.startswith("videomae.") else k
        if prefixed and not k.startswith("videomae."):
            if k.startswith(("decoder.", "encoder_to_decoder.", "mask_token", "fc_norm.", "classifier.")):
                dropped.append(k)
                continue
            raise InteropError(f"{source}: unexpected key '{k}'")
        if name.startswith("embeddings.patch_embeddings.projection."):
            enc["patch_embed.proj." + name.rsplit(".", 1)[1]] = v
        elif name.startswith("layernorm."):
            enc["norm." + name.rsplit(".", 1)[1]] = v
        elif name.startswith(("fc_norm.", "classifier.", "decoder.", "encoder_to_decoder.", "mask_token")):
            dropped.append(k)
        elif (m := _HF_LAYER.match(name)):
            i, rest = m.group(1), m.group(2)
            att = "attention.attention."
            if rest.startswith(att):
                part = rest[len(att):]
                if part in ("query.weight", "key.weight", "value.weight"):
                    qkv[(i, part.split(".")[0])] = v
                elif part in ("q_bias", "query.bias"):
                    enc[f"blocks.{i}.attn.q_bias"] = v
                elif part in ("v_bias", "value.bias"):
                    enc[f"blocks.{i}.attn.v_bias"] = v
                elif part == "key.bias":
                    if v.abs().max() > 0:
                        raise InteropError(f"{source}: '{k}' is non-zero; VideoMAE has no key bias")
                    dropped.append(k)
                else:
                    raise InteropError(f"{source}: unexpected key '{k}'")
            else:
                base, _, leaf = rest.rpartition(".")
                if base not in _HF_SIMPLE:
                    raise InteropError(f"{source}: unexpected key '{k}'")
                enc[f"blocks.{i}.{_HF_SIMPLE[base]}.{leaf}"] = v
        else:
            raise InteropError(f"{source}: unexpected key '{k}' (not a HuggingFace VideoMAE key)")
    layers = sorted({i for i, _ in qkv}, key=int)
    for i in layers:
        try:
            enc[f"blocks.{i}.attn.qkv.weight"] = torch.cat([qkv[(i, n)] for n in ("query", "key", "value")])
        except KeyError as e:
            raise InteropError(f"{source}: layer {i} lacks its attention {e.args[0][1]} weight") from None
    if "patch_embed.proj.weight" not in enc:
        raise InteropError(f"{source}: no 'embeddings.patch_embeddings.projection.weight' found")
    return enc, dropped, kind


def hf_bias_style() -> str:
    """``"old"`` (``q_bias`` / ``v_bias`` parameters, transformers 4) or ``"new"``
    (``query.bias`` / ``value.bias``) for the installed transformers; ``"new"`` without it."""
    try:
        from transformers import VideoMAEConfig
        from transformers.models.videomae.modeling_videomae import VideoMAESelfAttention
    except Exception:  # noqa: BLE001 - transformers absent or broken
        return "new"
    att = VideoMAESelfAttention(VideoMAEConfig(hidden_size=64, num_attention_heads=1, intermediate_size=64))
    names = dict(att.named_parameters())
    return "old" if "q_bias" in names else "new"


def internal_to_hf(enc: dict, depth: int, bias_style: str = "new", prefix: str = "") -> dict:
    """Internal VideoMAE encoder tensors -> HuggingFace ``VideoMAEModel`` names."""
    out = {}
    inv = {v: k for k, v in _HF_SIMPLE.items()}
    for k, v in enc.items():
        if k.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            out["layernorm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            lay = f"encoder.layer.{i}."
            att = lay + "attention.attention."
            if rest == "attn.qkv.weight":
                q, kk, vv = v.chunk(3, dim=0)
                out[att + "query.weight"], out[att + "key.weight"], out[att + "value.weight"] = q, kk, vv
            elif rest == "attn.q_bias":
                out[att + ("q_bias" if bias_style == "old" else "query.bias")] = v
            elif rest == "attn.v_bias":
                out[att + ("v_bias" if bias_style == "old" else "value.bias")] = v
            else:
                base, _, leaf = rest.rpartition(".")
                out[lay + inv[base] + "." + leaf] = v
        else:
            raise InteropError(f"internal_to_hf: unexpected encoder key '{k}'")
    return {prefix + k: v.contiguous() for k, v in out.items()}


def hf_config(arch: dict, mean=None, std=None) -> dict:
    """``config.json`` for ``transformers.VideoMAEModel`` building ``arch`` exactly."""
    D = int(arch["embed_dim"])
    cfg = {
        "architectures": ["VideoMAEModel"], "model_type": "videomae",
        "image_size": int(arch["img_size"]), "patch_size": int(arch["patch_size"]),
        "num_channels": int(arch["in_chans"]), "num_frames": int(arch["num_frames"]),
        "tubelet_size": int(arch.get("tubelet_size", 2)), "hidden_size": D,
        "num_hidden_layers": int(arch["depth"]), "num_attention_heads": int(arch["num_heads"]),
        "intermediate_size": int(round(D * float(arch.get("mlp_ratio", 4.0)))), "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": 1e-6, "qkv_bias": bool(arch.get("qkv_bias", True)),
        "qv_bias": bool(arch.get("qkv_bias", True)),
        "use_mean_pooling": not bool(arch.get("final_norm", True)),
        "torch_dtype": "float32",
    }
    if mean is not None:
        cfg["image_mean"], cfg["image_std"] = list(mean), list(std)
    return cfg


def arch_from_hf_config(c: dict, enc: dict) -> dict:
    D = int(c.get("hidden_size", 768))
    img = c.get("image_size", 224)
    img = int(img[0] if isinstance(img, (list, tuple)) else img)
    patch = c.get("patch_size", 16)
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    depth = int(c.get("num_hidden_layers", 12))
    return {"arch": "videomae", "preset": _preset_for(D, depth), "img_size": img,
            "num_frames": int(c.get("num_frames", 16)), "patch_size": patch,
            "in_chans": int(c.get("num_channels", 3)), "embed_dim": D, "depth": depth,
            "num_heads": int(c.get("num_attention_heads", 12)),
            "mlp_ratio": int(c.get("intermediate_size", 4 * D)) / D, "tubelet_size": int(c.get("tubelet_size", 2)),
            "final_norm": "norm.weight" in enc, "qkv_bias": "blocks.0.attn.q_bias" in enc}


# ----------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------
def is_hf_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "videomae"
    except (OSError, ValueError):
        return False


def read_hf_folder(path: Path) -> tuple[dict, dict, list, str]:
    """(internal encoder tensors, arch, dropped keys, kind) of a local HuggingFace VideoMAE folder."""
    c = json.loads((path / "config.json").read_text())
    st, binf = path / "model.safetensors", path / "pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file
        state = load_file(str(st))
    elif binf.is_file():
        state = torch.load(binf, map_location="cpu", weights_only=True)
    elif list(path.glob("model-*.safetensors")):
        from safetensors.torch import load_file
        state = {}
        for f in sorted(path.glob("model-*.safetensors")):
            state.update(load_file(str(f)))
    else:
        raise InteropError(f"{path}: HuggingFace folder without model.safetensors or pytorch_model.bin")
    enc, dropped, kind = split_hf(state, str(path))
    return enc, arch_from_hf_config(c, enc), dropped, kind


def load_official(path: Path) -> dict:
    """The state dict of an official VideoMAE ``checkpoint.pth`` (``model`` or ``module``
    entry, or a bare state dict), read with ``weights_only=True`` (``args`` namespaces allowed)."""
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return state_of(obj, path)


def state_of(obj, path) -> dict:
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return obj
    raise InteropError(f"{path}: no 'model' / 'module' state dict in the checkpoint")


def write_hf_folder(out: Path, enc: dict, arch: dict, mean=None, std=None, bias_style: Optional[str] = None,
                    extra_config: Optional[dict] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``preprocessor_config.json``) loadable
    with ``transformers.VideoMAEModel.from_pretrained(out)``."""
    from safetensors.torch import save_file

    style = bias_style or hf_bias_style()
    out.mkdir(parents=True, exist_ok=True)
    tensors = internal_to_hf(enc, int(arch["depth"]), style)
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = hf_config(arch)
    cfg.update(extra_config or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if mean is not None:
        size = int(arch["img_size"])
        pre = {"image_processor_type": "VideoMAEImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
               "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
               "resample": 2}
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return out


__all__ = ["InteropError", "looks_like_videomae", "looks_like_hf", "infer_arch", "split_official", "split_hf",
           "internal_to_hf", "hf_config", "hf_bias_style", "is_hf_folder", "read_hf_folder", "load_official",
           "write_hf_folder", "arch_from_hf_config"]
