"""What the study's frozen encoders hand to a classifier (issue 15): probes by pooling, the
spread of the pooled feature, and how fast a head (or the whole classifier) fits it.

    python benchmarks/study_features.py runs/study_small pools --pools grid,mean,time
    python benchmarks/study_features.py runs/study_small spread
    python benchmarks/study_features.py runs/study_small energy
    python benchmarks/study_features.py runs/study_small fit --variant mam2 --label appearance --lr 1e-3 --epochs 3 --head-only

``STUDY`` is a folder made by ``python -m mam2_fast.study`` (its ``results.json`` holds the
budget's sizes and every pre-trained cell's checkpoint). ``--variants`` picks the cells (seed 0
by default; ``random`` is the seed's random encoder, as in the study).

* ``pools``: the study's ridge probe (``mam2_fast.probe.probe_encoders``) on both labels, once
  per pooling: ``grid`` (2 time halves x 2x2 regions; reads a direction from positions),
  ``mean`` (what the fine-tuning head sees), ``time`` (per-frame means in order).
* ``spread``: the mean-pooled feature of ``--clips`` held-out clips; prints the norm of its
  between-video std over the norm of its mean, and the per-dimension std across videos after
  a LayerNorm (the head's ``fc_norm``). A random encoder is near 1 and 0.6-0.7.
* ``energy``: the raw-RGB difference target (Eq. 3) of ``--batches`` pre-training batches (the
  study's loader and augmentation): its energy per value (= the MSE of predicting zero) and the
  parts a prediction constant over each patch (patch mean) or over 4x4 blocks could explain.
* ``fit``: the study's fine-tuning classifier and training data (the ``light`` recipe's
  augmentation), trained with plain AdamW on one label (``motion`` / ``appearance`` /
  ``joint``) for ``--epochs``; prints the mean training loss and accuracy per epoch against
  ln(classes). ``--head-only`` freezes the encoder.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mam2_fast import study  # noqa: E402

LABEL_FN = {"motion": lambda y: y % study.N_DIRECTIONS, "appearance": lambda y: y // study.N_DIRECTIONS,
            "joint": lambda y: y}


def study_parts(folder: str):
    """(budget sizes, {"train", "test"} list files, {variant: checkpoint} of seed 0 cells)."""
    root = Path(folder)
    res = json.loads((root / "results.json").read_text())
    sizes = res["meta"]["sizes"]
    lists = {k: str(root / "data" / k / "list.txt") for k in ("train", "test")}
    ckpts = {c.split("/")[0]: st["pretrain"]["checkpoint"] for c, st in res["cells"].items()
             if c.endswith("/seed0") and isinstance(st.get("pretrain"), dict) and st["pretrain"].get("checkpoint")}
    return sizes, lists, ckpts


def scratch_arch(folder: str, sizes: dict, lists: dict) -> dict:
    """The study's architecture for its ``random`` cells (as ``mam2_fast.study.run_cell``)."""
    from mam2_fast.ft.weights import arch_from_pretrain_config

    return arch_from_pretrain_config(study.pretrain_config(dict(sizes), "mam2", 0, lists["train"], Path(folder),
                                                           "cpu").to_dict())


def load_encoders(folder: str, sizes: dict, lists: dict, ckpts: dict, variants: list) -> dict:
    from mam2_fast.probe import load_frozen_encoder, random_encoder

    encs = {}
    for v in variants:
        if v == "random":
            encs[v] = random_encoder(scratch_arch(folder, sizes, lists), 1000)   # the study's seed-0 random encoder
        elif v not in ckpts:
            raise SystemExit(f"study_features: no pre-trained seed-0 cell {v!r} in the study (have {sorted(ckpts)})")
        else:
            encs[v] = load_frozen_encoder(ckpts[v], log=lambda s: None)[0]
    return encs


def view_data(sizes: dict, list_file: str, batch_size: int = 8):
    from mam2_fast.data.config import DataConfig
    from mam2_fast.ft.data import ViewData

    dcfg = DataConfig(num_frames=sizes["num_frames"], input_size=sizes["input_size"],
                      sampling_stride=sizes["stride"], num_workers=1)
    return ViewData(dcfg, list_file, sizes["probe_clips"], 1, "dense", batch_size=batch_size, device="cpu")


def run_pools(sizes: dict, lists: dict, encs: dict, pools: list) -> dict:
    from mam2_fast.probe import probe_encoders

    out = {}
    targets = [f"label%{study.N_DIRECTIONS}", f"label//{study.N_DIRECTIONS}"]
    for pool in pools:
        res = probe_encoders(encs, view_data(sizes, lists["train"]), view_data(sizes, lists["test"]), targets,
                             "cpu", lambda s: None, pool=pool)
        for name, r in res.items():
            out[(pool, name)] = (r[targets[0]]["test_acc"], r[targets[1]]["test_acc"])
            print(f"{pool:5s} {name:14s} motion {out[(pool, name)][0]:5.1f}%  appearance {out[(pool, name)][1]:5.1f}%",
                  flush=True)
    return out


@torch.no_grad()
def pooled_spread(encoder, data, clips: int) -> dict:
    feats, n = [], 0
    encoder.eval()
    for batch in data:
        x = batch["views"][:, 0]                                         # [B, T, C, H, W]
        feats.append(encoder.forward_features(x).float().mean(dim=(1, 2)))  # [B, D]
        n += x.shape[0]
        if n >= clips:
            break
    P = torch.cat(feats)[:clips]                                         # [V, D]
    ln = F.layer_norm(P, P.shape[1:])
    return {"between_over_mean": float(P.std(0).norm() / P.mean(0).norm()),
            "ln_std_across_videos": float(ln.std(0).mean()), "clips": int(P.shape[0])}


def motion_energy(folder: str, sizes: dict, lists: dict, batches: int) -> dict:
    """Energy of the raw-RGB frame differences of the study's pre-training clips, and the
    parts that a per-patch / per-4x4-block constant carries."""
    from mam2_fast.data.loader import PretrainData

    cfg = study.pretrain_config(dict(sizes), "mam2", 0, lists["train"], Path(folder) / "energy-scratch", "cpu")
    std = torch.tensor(cfg.data.std).view(1, 1, 3, 1, 1)
    P = sizes["patch_size"]
    tot = patch = block = 0.0
    data = PretrainData(cfg.data, cfg.train.batch_size, seed=0)
    n = 0
    for _, batch in data.iter_epoch(0, 0):
        x = batch["clip"].float() * std                        # raw-RGB scale (the mean cancels) [B, T, C, H, W]
        d = (x[:, 1:] - x[:, :-1]).flatten(0, 1)                # [B*(T-1), C, H, W]
        tot += d.pow(2).mean().item()
        patch += F.avg_pool2d(d, P).pow(2).mean().item()
        block += F.avg_pool2d(d, 4).pow(2).mean().item()
        n += 1
        if n >= batches:
            break
    return {"energy": tot / n, "patch_mean_part": patch / tot, "block4_part": block / tot, "batches": n}


def run_fit(folder: str, sizes: dict, lists: dict, ckpts: dict, args) -> list:
    from mam2_fast.finetune import build_finetune_model
    from mam2_fast.ft.data import FinetuneTrainData
    from mam2_fast.ft.weights import read_encoder_weights

    b = dict(sizes)
    if args.variant == "random":
        init, arch = None, scratch_arch(folder, sizes, lists)
    elif args.variant not in ckpts:
        raise SystemExit(f"study_features: no pre-trained seed-0 cell {args.variant!r} in the study (have {sorted(ckpts)})")
    else:
        init = ckpts[args.variant]
        arch = read_encoder_weights(init).arch
    cfg = study.finetune_config(b, init, 0, lists["train"], lists["test"], Path(folder) / "fit-scratch", "cpu", arch,
                                study.FINETUNE_RECIPES["light"])
    torch.manual_seed(0)
    model, _ = build_finetune_model(cfg, log=lambda s: None)
    if args.head_only:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(("head.", "fc_norm."))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.05)
    data = FinetuneTrainData(cfg.data, cfg.aug, batch_size=b["finetune_batch"], seed=0)
    classes = {"motion": study.N_DIRECTIONS, "appearance": b["identities"],
               "joint": b["identities"] * study.N_DIRECTIONS}[args.label]
    print(f"fit {args.variant} on {args.label} ({classes} classes, ln = {math.log(classes):.3f}), lr {args.lr}, "
          f"{'head only' if args.head_only else 'whole classifier'}", flush=True)
    rows, t0 = [], time.time()
    for epoch in range(args.epochs):
        losses, accs = [], []
        for _, batch in data.iter_epoch(epoch, 0):
            y = LABEL_FN[args.label](batch["label"])
            logits = model(batch["clip"])[:, :classes]
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            accs.append((logits.argmax(1) == y).float().mean().item())
        rows.append((sum(losses) / len(losses), sum(accs) / len(accs)))
        print(f"epoch {epoch}: loss {rows[-1][0]:.3f} train acc {100 * rows[-1][1]:.1f}% ({time.time() - t0:.0f}s)",
              flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", help="a study folder (python -m mam2_fast.study --out ...)")
    ap.add_argument("what", choices=("pools", "spread", "energy", "fit"))
    ap.add_argument("--variants", default="mam2,no_motion,videomae,random")
    ap.add_argument("--pools", default="grid,mean,time")
    ap.add_argument("--clips", type=int, default=96, help="spread: held-out clips")
    ap.add_argument("--batches", type=int, default=8, help="energy: pre-training batches")
    ap.add_argument("--variant", default="mam2", help="fit: the cell to start from ('random': scratch)")
    ap.add_argument("--label", default="appearance", choices=tuple(LABEL_FN))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--head-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes, lists, ckpts = study_parts(args.study)
    if args.what == "fit":
        run_fit(args.study, sizes, lists, ckpts, args)
        return 0
    if args.what == "energy":
        e = motion_energy(args.study, sizes, lists, args.batches)
        print(f"raw RGB-difference energy per value {e['energy']:.5f} (the zero-prediction MSE); patch-mean "
              f"part {100 * e['patch_mean_part']:.1f} %, 4x4-block part {100 * e['block4_part']:.1f} % "
              f"({e['batches']} batches)")
        return 0
    encs = load_encoders(args.study, sizes, lists, ckpts, args.variants.split(","))
    if args.what == "pools":
        run_pools(sizes, lists, encs, args.pools.split(","))
    else:
        for name, enc in encs.items():
            s = pooled_spread(enc, view_data(sizes, lists["test"], 16), args.clips)
            print(f"{name:14s} pooled between-video std / mean {s['between_over_mean']:.4f}; after LayerNorm, "
                  f"per-dim std across videos {s['ln_std_across_videos']:.4f} ({s['clips']} clips)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
