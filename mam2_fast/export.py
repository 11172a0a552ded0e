"""Export a pre-trained (or fine-tuned) encoder as a ``.safetensors`` file.

    python -m mam2_fast.export runs/demo                      # -> runs/demo/encoder.safetensors
    python -m mam2_fast.export runs/demo/checkpoint-00000100.pt -o encoder.safetensors

Input: a pre-training checkpoint, a run folder (latest checkpoint), or a fine-tuning
checkpoint (its ``fc_norm``/``head`` are left out). Fine-tuning (``init: <file>``) and the
linear probe (``--init <file>``) load the export directly.

File layout
-----------
Tensors (float32 unless ``--dtype``), ``L = depth``, ``D = embed_dim``, ``T = num_frames``,
``N = (img_size / patch_size)^2``, ``P = patch_size``; names are the MAM2 / VideoClassifier
parameter names, unchanged (identity key map), with the TimeSformer equivalent for reference:

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
``pos_to_decoder``) are not exported.

Metadata (safetensors string map): ``format`` = ``mam2_fast.encoder``, ``format_version`` =
``1``, ``arch`` (JSON: preset, img_size, num_frames, patch_size, in_chans, embed_dim, depth,
num_heads, mlp_ratio), ``source`` (checkpoint path), ``step``, ``kind`` (pretrain | finetune).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from mam2_fast.ft.weights import (EXPORT_FORMAT, EXPORT_VERSION, WeightsError, read_encoder_weights,
                                  resolve_weights_path)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_encoder(source: str | Path, out: Optional[str | Path] = None, dtype: str = "float32") -> Path:
    """Write the encoder of ``source`` to ``out`` (default: ``encoder.safetensors`` beside it)."""
    from safetensors.torch import save_file

    path = resolve_weights_path(source)
    w = read_encoder_weights(path)
    if w.kind == "export":
        raise WeightsError(f"{path}: already an exported encoder")
    if w.arch is None:
        raise WeightsError(f"{path}: checkpoint has no 'config' to record the architecture from")
    out = Path(out) if out else path.parent / "encoder.safetensors"
    tensors = {k: v.detach().to(_DTYPES[dtype]).contiguous() for k, v in sorted(w.state.items())}
    meta = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "arch": json.dumps(w.arch),
            "source": str(path), "step": str(w.meta.get("step")), "kind": w.kind}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out)  # atomic: a reader never sees a half-written export
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mam2_fast.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="checkpoint file or run folder")
    p.add_argument("-o", "--output", help="output .safetensors (default: encoder.safetensors beside the checkpoint)")
    p.add_argument("--dtype", default="float32", choices=tuple(_DTYPES))
    args = p.parse_args(argv)
    try:
        out = export_encoder(args.source, args.output, args.dtype)
    except WeightsError as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    w = read_encoder_weights(out)
    n = sum(v.numel() for v in w.state.values())
    print(f"[mam2_fast] wrote {out}: {len(w.state)} tensors, {n / 1e6:.2f}M parameters, arch {w.meta['arch']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
