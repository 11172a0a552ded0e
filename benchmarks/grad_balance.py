"""Which loss term trains the encoder at initialization, at the paper's scale (issue 15).

For a freshly initialized MAM² model of a config (default ``configs/pretrain_base.yaml``,
ViT-B, 16 x 224, tube 0.75) it prints, per weighted loss term (``loss_app``, ``loss_motion``,
``align_weight * loss_align``), the loss and the norm of its gradient on the encoder's
parameters, averaged over a few clips of a VideoMAE-style list file (the CPU demo's videos by
default, decoded and augmented as training does). The appearance codes are random ids of the
16384-way head (at initialization the head's prediction is near uniform, so the CE gradient
does not depend on which ids they are); the motion target is the clip's own RGB difference.

    python benchmarks/grad_balance.py --list ~/.cache/mam2_fast/demo/<set>/train.txt --clips 2
    python benchmarks/grad_balance.py --list LIST model.motion_space=normalized

``python -m mam2_fast.study --grad-balance RUN`` gives the same numbers for a small run of
the study, before and after its pre-training.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mam2_fast.data.loader import PretrainData  # noqa: E402
from mam2_fast.flops import config_without_data  # noqa: E402
from mam2_fast.masking import MaskGenerator  # noqa: E402
from mam2_fast.models.mam2 import build_model  # noqa: E402
from mam2_fast.study import ENCODER_PREFIXES  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "pretrain_base.yaml"))
    p.add_argument("--list", required=True, help="VideoMAE-style list file of videos")
    p.add_argument("--clips", type=int, default=2, help="clips (one per step, batch 1)")
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = config_without_data(args.config, ["model.kernels=reference", "train.batch_size=1", "data.num_sample=1",
                                            f"data.list_file={args.list}", "data.root=", "data.num_workers=0",
                                            "data.demo=false"] + list(args.overrides))
    model = build_model(cfg.model, vocab_size=args.vocab, pixel_mean=tuple(cfg.data.mean),
                        pixel_std=tuple(cfg.data.std)).train()
    enc = [p for n, p in model.named_parameters() if n.startswith(ENCODER_PREFIXES)]
    masker = MaskGenerator(cfg.mask.kind, cfg.mask.ratio, cfg.model.num_frames, model.grid,
                           cfg.mask.cube_min_block, cfg.mask.cube_max_aspect)
    data = PretrainData(cfg.data, 1, seed=args.seed)
    weights = {"loss_app": 1.0, "loss_motion": 1.0, "loss_align": float(cfg.model.align_weight)}
    sums: dict = {}
    n = 0
    for _, b in data.iter_epoch(0):
        clip = b["clip"].float()                                             # [1, T, 3, H, W]
        info = masker(1, torch.Generator().manual_seed(args.seed + n))
        T, N = cfg.model.num_frames, model.num_patches
        out = model(clip, info, codes=torch.randint(0, args.vocab, (1, T, N)))
        for k, w in weights.items():
            if k not in out:
                continue
            grads = torch.autograd.grad(w * out[k], enc, retain_graph=True, allow_unused=True)
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))
            s = sums.setdefault(k, [0.0, 0.0])
            s[0] += norm
            s[1] += float(out[k].detach())
        n += 1
        print(f"clip {n}: " + ", ".join(f"{k} {float(out[k].detach()):.4f}" for k in weights if k in out), flush=True)
        if n >= args.clips:
            break
    if hasattr(data, "close"):
        data.close()
    total = sum(v[0] for v in sums.values()) / n
    res = {k: {"loss": v[1] / n, "weight": weights[k], "weighted_grad_norm_encoder": v[0] / n,
               "share": v[0] / n / total} for k, v in sums.items()}
    print(json.dumps({"config": args.config, "overrides": args.overrides, "clips": n, "terms": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
