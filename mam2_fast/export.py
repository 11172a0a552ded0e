"""Export a pre-trained (or fine-tuned) encoder: this project's format or a HuggingFace folder.

    python -m mam2_fast.export runs/demo                       # -> runs/demo/encoder/{model.safetensors,config.json}
    python -m mam2_fast.export runs/demo -o enc.safetensors     # -> enc.safetensors + enc.json
    python -m mam2_fast.export runs/videomae --format hf-videomae -o hf/   # transformers.VideoMAEModel folder
    python -m mam2_fast.export checkpoint.pth --format hf-videomae -o hf/  # official VideoMAE -> HuggingFace

Input: a pre-training checkpoint, a run folder (latest checkpoint), a fine-tuning checkpoint
(its ``fc_norm``/``head`` are left out), or for ``model.arch: videomae`` also an official
VideoMAE ``checkpoint.pth`` or a HuggingFace VideoMAE folder. Fine-tuning (``init: <path>``),
the linear probe (``--init <path>``) and :func:`load_encoder` read the ``mam2_fast`` export
(file or folder) directly.

Formats
-------
``--format mam2_fast`` (default): ``model.safetensors`` + ``config.json`` in a folder (default
``<run>/encoder/``), or ``X.safetensors`` + ``X.json`` when ``-o`` names a ``.safetensors``
file. ``config.json`` (also embedded in the safetensors metadata under ``config``) holds
everything needed to run the encoder:

* ``arch``: ``arch`` (``mam2`` | ``videomae``), preset, img_size, num_frames, patch_size,
  in_chans, embed_dim, depth, num_heads, mlp_ratio (+ tubelet_size, final_norm for videomae);
* ``input``: ``layout`` ``[B, T, C, H, W]`` float, RGB, ``num_frames`` frames taken every
  ``sampling_stride`` frames, ``img_size`` square crop (the short side resized to it, centre
  crop at test time), pixel values ``(v / 255 - mean) / std`` with ``mean`` / ``std``;
* ``output``: ``forward_features`` tokens ``[B, T', N, D]`` after the final LayerNorm
  (``T' = T`` for mam2, ``T / tubelet_size`` for videomae; ``N = (img_size / patch_size)^2``),
  ``pooled`` ``[B, D]`` (their mean, the linear-probe feature);
* ``loader``: ``mam2_fast.export.load_encoder``; ``source``, ``step``, ``kind``.

Loading an export (any Python with this package installed)::

    from mam2_fast.export import load_encoder
    encoder, config = load_encoder("runs/demo/encoder")        # folder, .safetensors or .json
    feats = encoder.pooled(clip)                                # clip [B, T, C, H, W], normalized

``--format hf-videomae`` (``model.arch: videomae`` only; MAM^2's divided space-time blocks
have no HuggingFace counterpart): ``config.json`` + ``model.safetensors`` +
``preprocessor_config.json`` that ``transformers.VideoMAEModel.from_pretrained`` loads
(``use_mean_pooling: false``, its ``layernorm`` is the encoder's final norm; key map in
:mod:`mam2_fast.interop.videomae`). When ``transformers`` is importable the folder is
loaded back and its ``last_hidden_state`` compared with this project's encoder on a random
clip (``--no-verify`` skips it).

``mam2_fast`` tensor names (MAM^2; float32 unless ``--dtype``), ``L = depth``, ``D =
embed_dim``, ``T = num_frames``, ``N = (img_size / patch_size)^2``, ``P = patch_size``; the
MAM2 / VideoClassifier parameter names, unchanged, with the TimeSformer equivalent:

===========================================  ===================  ===============================================
key                                          shape                TimeSformer (``model.`` prefix) / meaning
===========================================  ===================  ===============================================
``patch_embed.weight`` / ``.bias``           [D, C, P, P] / [D]   ``patch_embed.proj.*``; per-frame 2-D patches
``pos_embed_time``                           [T, D]               ``time_embed`` ([1, T, D]); added to every slot
``pos_embed_space``                          [N, D]               ``pos_embed`` without the cls row ([1, N+1, D])
``blocks.{i}.temporal_norm.*``               [D]                  ``blocks.{i}.temporal_norm1.*``
``blocks.{i}.temporal_attn.qkv.*``           [3D, D] / [3D]       ``blocks.{i}.temporal_attn.qkv.*``
``blocks.{i}.temporal_attn.proj.*``          [D, D] / [D]         ``blocks.{i}.temporal_attn.proj.*``
``blocks.{i}.temporal_fc.*``                 [D, D] / [D]         ``blocks.{i}.temporal_fc.*``
``blocks.{i}.norm1.*``                       [D]                  ``blocks.{i}.norm1.*`` (spatial attention)
``blocks.{i}.attn.qkv.*`` / ``attn.proj.*``  [3D, D] / [D, D]     ``blocks.{i}.attn.*`` (spatial attention)
``blocks.{i}.norm2.*``                       [D]                  ``blocks.{i}.norm2.*``
``blocks.{i}.mlp.fc1.*`` / ``mlp.fc2.*``     [4D, D] / [D, 4D]    ``blocks.{i}.mlp.fc1.*`` / ``fc2.*``
``norm.weight`` / ``norm.bias``              [D]                  ``norm.*``; final LayerNorm (eps 1e-6)
===========================================  ===================  ===============================================

qkv rows are ordered ``[q; k; v]``, heads contiguous (``[3, H, D/H]``). There is no cls
token; TimeSformer's ``pos_embed`` row 0 has no counterpart. Pre-training-only modules
(``regressor*``, ``appearance_*``, ``motion_*``, ``mask_query``, ``encoder_to_decoder``,
``pos_to_decoder``) are not exported. ``model.arch: videomae`` encoders use the official
VideoMAE ``modeling_finetune`` names (``patch_embed.proj.*``, ``blocks.{i}.attn.qkv.weight``,
``blocks.{i}.attn.q_bias`` / ``v_bias``, ...; positions are the fixed sinusoid table).

Safetensors metadata: ``format`` = ``mam2_fast.encoder``, ``format_version`` = ``2``, ``arch``
(JSON), ``config`` (the JSON above), ``source``, ``step``, ``kind``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from mam2_fast.ft.weights import (EXPORT_FORMAT, WeightsError, read_encoder_weights, resolve_weights_path)

EXPORT_FORMAT_VERSION = "2"
FORMATS = ("mam2_fast", "hf-videomae")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_INPUT = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "sampling_stride": 4}


def _source_path(source: str | Path) -> Path:
    p = Path(source).expanduser()
    if p.is_dir() and (p / "config.json").is_file() and not any(p.glob("checkpoint-*.pt")):
        return p                           # HuggingFace / exported folder
    return resolve_weights_path(p)


def input_spec(w, arch: dict) -> dict:
    """The preprocessing a consumer needs, from the run's data config when recorded."""
    data = ((w.meta.get("config") or {}).get("data") or {}) if isinstance(w.meta.get("config"), dict) else {}
    mean = list(data.get("mean", _DEFAULT_INPUT["mean"]))
    std = list(data.get("std", _DEFAULT_INPUT["std"]))
    return {"layout": "[B, T, C, H, W]", "dtype": "float32", "channels": "RGB",
            "num_frames": int(arch["num_frames"]), "img_size": int(arch["img_size"]),
            "sampling_stride": int(data.get("sampling_stride", _DEFAULT_INPUT["sampling_stride"])),
            "resize": "short side to img_size, centre crop img_size x img_size (test)",
            "normalize": "(v / 255 - mean) / std per channel, v in [0, 255]", "mean": mean, "std": std,
            "recorded": bool(data)}


def export_config(w, arch: dict, tensors_name: str) -> dict:
    vm = arch.get("arch", "mam2") == "videomae"
    T = int(arch["num_frames"]) // (int(arch.get("tubelet_size", 2)) if vm else 1)
    N = (int(arch["img_size"]) // int(arch["patch_size"])) ** 2
    D = int(arch["embed_dim"])
    return {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION,
            "arch": {"arch": "mam2", **arch} if not vm else dict(arch), "input": input_spec(w, arch),
            "output": {"forward_features": f"[B, {T}, {N}, {D}] tokens after the final LayerNorm",
                       "pooled": f"[B, {D}] mean of forward_features (linear-probe feature)"},
            "loader": "mam2_fast.export.load_encoder", "tensors": tensors_name,
            "source": w.source, "step": w.meta.get("step"), "kind": w.kind}


def _out_paths(out: Path) -> tuple[Path, Path]:
    if out.suffix == ".safetensors":
        return out, out.with_suffix(".json")
    return out / "model.safetensors", out / "config.json"


def export_encoder(source: str | Path, out: Optional[str | Path] = None, dtype: str = "float32",
                   fmt: str = "mam2_fast", verify: bool = True, log=lambda s: None,
                   arch_override: Optional[dict] = None) -> Path:
    """Write the encoder of ``source``; returns the tensors file (``mam2_fast``) or the folder
    (``hf-videomae``). ``arch_override`` sets what weights cannot tell (an official VideoMAE
    checkpoint's ``num_heads`` for a non-standard width, ``num_frames``, ``img_size``)."""
    if fmt not in FORMATS:
        raise WeightsError(f"unknown export format {fmt!r} ({' | '.join(FORMATS)})")
    path = _source_path(source)
    w = read_encoder_weights(path)
    if w.arch is None:
        raise WeightsError(f"{path}: checkpoint has no 'config' to record the architecture from")
    arch = {k: v for k, v in w.arch.items() if k != "inferred"}
    arch.update({k: v for k, v in (arch_override or {}).items() if v is not None})
    base = path if path.is_dir() else path.parent
    if fmt == "hf-videomae":
        if arch.get("arch", "mam2") != "videomae":
            raise WeightsError(f"{path}: --format hf-videomae needs a model.arch videomae encoder (MAM^2's divided "
                               f"space-time blocks have no HuggingFace counterpart); use --format mam2_fast")
        from mam2_fast.interop.videomae import write_hf_folder
        folder = Path(out) if out else base / "hf-videomae"
        spec = input_spec(w, arch)
        tmp = folder.with_name(f".{folder.name}.tmp")
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp)
        write_hf_folder(tmp, w.state, arch, spec["mean"], spec["std"])
        if verify:
            err = verify_hf_folder(tmp, w.state, arch)
            log("verified with transformers: max |diff| of last_hidden_state "
                f"{err:.2e}" if err is not None else "transformers is not importable: folder not verified")
        if folder.exists():
            import shutil
            shutil.rmtree(folder)
        tmp.replace(folder)
        return folder
    if w.kind == "export":
        raise WeightsError(f"{path}: already an exported encoder")
    from safetensors.torch import save_file

    out = Path(out) if out else base / "encoder"
    tensors_path, config_path = _out_paths(out)
    cfg = export_config(w, arch, tensors_path.name)
    tensors = {k: v.detach().to(_DTYPES[dtype]).contiguous() for k, v in sorted(w.state.items())}
    meta = {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "arch": json.dumps(arch),
            "config": json.dumps(cfg), "source": str(path), "step": str(w.meta.get("step")), "kind": w.kind}
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tensors_path.with_name(f".{tensors_path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(tensors_path)  # atomic: a reader never sees a half-written export
    ctmp = config_path.with_name(f".{config_path.name}.tmp")
    ctmp.write_text(json.dumps(cfg, indent=2) + "\n")
    ctmp.replace(config_path)
    return tensors_path


def verify_hf_folder(folder: Path, enc: dict, arch: dict, atol: float = 1e-4) -> Optional[float]:
    """Load ``folder`` with ``transformers.VideoMAEModel`` and compare its output with this
    project's encoder holding ``enc``; returns the max abs difference (None without
    transformers) and raises :class:`WeightsError` beyond ``atol`` (e.g. biases left at zero)."""
    try:
        from transformers import VideoMAEModel
    except Exception:  # noqa: BLE001
        return None
    from mam2_fast.ft.weights import encoder_config_from_arch
    from mam2_fast.models.videomae_classifier import VideoMAEEncoder

    ours = VideoMAEEncoder(encoder_config_from_arch(arch)).eval()
    ours.load_state_dict({k: v.float() for k, v in enc.items()}, strict=True)
    hf = VideoMAEModel.from_pretrained(str(folder)).eval()
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(1, int(arch["num_frames"]), int(arch["in_chans"]), int(arch["img_size"]),
                       int(arch["img_size"]), generator=g)
    with torch.no_grad():
        a = ours.tokens(clip)
        b = hf(pixel_values=clip).last_hidden_state
    err = float((a - b).abs().max())
    if not err <= atol:
        raise WeightsError(f"{folder}: transformers.VideoMAEModel gives other outputs than the exported encoder "
                           f"(max |diff| {err:.3g}); the installed transformers may not read these key names")
    return err


# ----------------------------------------------------------------------------------------
# the documented loader
# ----------------------------------------------------------------------------------------
def load_encoder(path: str | Path, device: str | torch.device = "cpu"):
    """Load a ``mam2_fast`` export: ``(encoder, config)``.

    ``path``: the export folder, its ``model.safetensors``/``X.safetensors`` or its json.
    ``encoder`` is a frozen ``eval()`` module (:class:`~mam2_fast.models.classifier.VideoEncoder`
    for ``arch: mam2``, :class:`~mam2_fast.models.videomae_classifier.VideoMAEEncoder` for
    ``videomae``) with ``forward_features(clip)`` -> ``[B, T', N, D]`` and ``pooled(clip)`` ->
    ``[B, D]``; ``clip`` is ``[B, T, C, H, W]`` float, preprocessed as ``config["input"]`` says
    (frames, stride, size, mean/std). ``config`` is the dict of ``config.json``.
    """
    from mam2_fast.ft.weights import encoder_config_from_arch, load_encoder_into
    from mam2_fast.models.classifier import build_encoder

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "model.safetensors"
    elif p.suffix == ".json":
        cfg = json.loads(p.read_text())
        p = p.with_name(cfg.get("tensors", p.with_suffix(".safetensors").name))
    w = read_encoder_weights(p)
    if w.arch is None:
        raise WeightsError(f"{p}: no architecture recorded")
    cfg = json.loads(w.meta["config"]) if "config" in w.meta else {"arch": w.arch}
    encoder = build_encoder(encoder_config_from_arch(w.arch))
    load_encoder_into(encoder, w, interpolate_pos=False)
    return encoder.requires_grad_(False).eval().to(device), cfg


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mam2_fast.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="checkpoint file or run folder (videomae: also checkpoint.pth or a HF folder)")
    p.add_argument("-o", "--output", help="output folder, or a .safetensors file (default: <run>/encoder/ or "
                                          "<run>/hf-videomae/)")
    p.add_argument("--format", default="mam2_fast", choices=FORMATS)
    p.add_argument("--dtype", default="float32", choices=tuple(_DTYPES))
    p.add_argument("--no-verify", action="store_true", help="hf-videomae: skip the check with transformers")
    for flag in ("num-heads", "num-frames", "img-size"):
        p.add_argument(f"--{flag}", type=int, help=f"{flag.replace('-', '_')} when the weights cannot tell it "
                                                   f"(official VideoMAE checkpoints: heads of a non-standard "
                                                   f"width; 16 frames x 224 assumed)")
    args = p.parse_args(argv)
    log = lambda s: print(f"[mam2_fast] {s}", flush=True)  # noqa: E731
    over = {"num_heads": args.num_heads, "num_frames": args.num_frames, "img_size": args.img_size}
    try:
        out = export_encoder(args.source, args.output, args.dtype, args.format, not args.no_verify, log, over)
    except WeightsError as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    if args.format == "hf-videomae":
        print(f"[mam2_fast] wrote {out} (transformers.VideoMAEModel.from_pretrained({str(out)!r}))")
        return 0
    w = read_encoder_weights(out)
    n = sum(v.numel() for v in w.state.values())
    print(f"[mam2_fast] wrote {out} + {_out_paths(Path(args.output) if args.output else out.parent)[1].name}: "
          f"{len(w.state)} tensors, {n / 1e6:.2f}M parameters, arch {w.meta['arch']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
