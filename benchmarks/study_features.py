"""What the study's frozen encoders hand to a classifier (issue 15): probes by pooling, the
spread of the pooled feature, and how fast a head (or the whole classifier) fits it.

    python benchmarks/study_features.py runs/study_small pools --pools grid,mean,time
    python benchmarks/study_features.py runs/study_small spread
    python benchmarks/study_features.py runs/study_small energy
    python benchmarks/study_features.py runs/study_small fit --variant mam2 --label appearance --lr 1e-3 --epochs 3 --head-only
    python benchmarks/study_features.py runs/study_small_cos headfit --variants mam2,videomae --label appearance
    python benchmarks/study_features.py runs/study_small_cos scratch --arch cnn --distractors 0 --steps 600

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
* ``headfit``: the frozen encoders' mean-pooled features of one centre clip per video, then a
  linear head alone, trained with AdamW (batch 16, wd 0.05, constant ``--lr``) on one label,
  its input the head's ``fc_norm`` (a fresh LayerNorm) or the features standardized per
  dimension (as the ridge probe sees them); prints the test accuracy at ``--at`` steps. How
  many steps a head needs to find what the probe reads.
* ``scratch``: supervised training from scratch on the study's clips (one centre clip per
  video, decoded once; no augmentation), plain AdamW (``--lr``, warmup 30 then cosine over
  ``--steps``, batch 16) on the joint label, ``--arch vit`` (the study's classifier) or
  ``cnn`` (a 3-layer 3-D CNN, a locality prior); prints the held-out accuracy on both labels
  every 50 steps. ``--distractors N`` builds (once, beside the study's data) the same sizes and
  seeds with N distractors instead. Is the task learnable at this size, and by which model?
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

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


def view_data(sizes: dict, list_file: str, batch_size: int = 8, clips: Optional[int] = None):
    """The study's probe views of ``list_file`` (``clips`` per video, default the budget's)."""
    from mam2_fast.data.config import DataConfig
    from mam2_fast.ft.data import ViewData

    dcfg = DataConfig(num_frames=sizes["num_frames"], input_size=sizes["input_size"],
                      sampling_stride=sizes["stride"], num_workers=1)
    return ViewData(dcfg, list_file, clips or sizes["probe_clips"], 1, "dense", batch_size=batch_size, device="cpu")


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


@torch.no_grad()
def centre_clips(sizes: dict, list_file: str):
    """(clips [V, T, 3, H, W] float32, labels [V]): one centre clip per video, the study's loader."""
    xs, ys = [], []
    for batch in view_data(sizes, list_file, batch_size=16, clips=1):
        xs.append(batch["views"][:, 0].float())
        ys.append(batch["label"])
    return torch.cat(xs), torch.cat(ys)


def run_headfit(sizes: dict, lists: dict, encs: dict, label: str, lr: float, at: list, head_input: str,
                seed: int = 0) -> dict:
    """{variant: [(step, test accuracy %)]} of a linear head on frozen mean-pooled features."""
    from mam2_fast.probe import pool_tokens

    classes = {"motion": study.N_DIRECTIONS, "appearance": sizes["identities"],
               "joint": sizes["identities"] * study.N_DIRECTIONS}[label]
    (xtr, ytr), (xte, yte) = centre_clips(sizes, lists["train"]), centre_clips(sizes, lists["test"])
    ytr, yte = LABEL_FN[label](ytr), LABEL_FN[label](yte)
    out = {}
    for name, enc in encs.items():
        with torch.no_grad():
            ftr, fte = (torch.cat([pool_tokens(enc.forward_features(x[i:i + 16]), "mean").float()
                                   for i in range(0, len(x), 16)]) for x in (xtr, xte))
        torch.manual_seed(seed)
        norm = torch.nn.LayerNorm(ftr.shape[1])
        head = torch.nn.Linear(ftr.shape[1], classes)
        torch.nn.init.trunc_normal_(head.weight, std=0.02)
        head.weight.data.mul_(0.001)                        # the classifier's head init (VideoMAE init_scale)
        torch.nn.init.zeros_(head.bias)
        mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
        inp = norm if head_input == "fc_norm" else (lambda f: (f - mu) / sd)
        params = [*head.parameters()] + ([*norm.parameters()] if head_input == "fc_norm" else [])
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
        g = torch.Generator().manual_seed(seed)
        rows = []
        for step in range(1, max(at) + 1):
            i = torch.randint(0, len(ytr), (16,), generator=g)
            loss = F.cross_entropy(head(inp(ftr[i])), ytr[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step in at:
                with torch.no_grad():
                    rows.append((step, 100.0 * (head(inp(fte)).argmax(1) == yte).float().mean().item()))
        out[name] = rows
        print(f"{name:14s} head on {head_input}, {label}, lr {lr}: "
              + " | ".join(f"{s} steps {a:.1f}%" for s, a in rows), flush=True)
    return out


class SmallCNN3D(torch.nn.Module):
    """Three strided 3-D convolutions, global average pool, linear: a locality prior to set
    against the ViT on the same clips."""

    def __init__(self, classes: int):
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(nn.Conv3d(3, 32, (3, 5, 5), padding=(1, 2, 2), stride=(1, 2, 2)), nn.GELU(),
                                 nn.Conv3d(32, 64, 3, padding=1, stride=(1, 2, 2)), nn.GELU(),
                                 nn.Conv3d(64, 128, 3, padding=1, stride=2), nn.GELU(),
                                 nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(128, classes))

    def forward(self, clips):                                # [B, T, 3, H, W]
        return self.net(clips.transpose(1, 2))


def run_scratch(folder: str, sizes: dict, lists: dict, arch: str, steps: int, lr: float,
                distractors: Optional[int] = None, every: int = 50, seed: int = 0) -> list:
    """[(step, training loss, held-out motion %, held-out appearance %)] of a classifier trained
    from scratch on the joint label (see the module docstring)."""
    from mam2_fast.ft.config import ClassifierConfig
    from mam2_fast.models.classifier import VideoClassifier

    if distractors is not None and distractors != sizes["distractors"]:
        from mam2_fast.data.synthetic_study import make_study_dataset

        kw = dict(size=sizes["video_size"], num_frames=sizes["video_frames"], identities=sizes["identities"],
                  distractors=distractors)
        root = Path(folder) / f"data_distractors{distractors}"
        lists = {"train": make_study_dataset(str(root / "train"), sizes["train_videos"], seed=1, **kw),
                 "test": make_study_dataset(str(root / "test"), sizes["test_videos"], seed=2, **kw)}
    (xtr, ytr), (xte, yte) = centre_clips(sizes, lists["train"]), centre_clips(sizes, lists["test"])
    classes = sizes["identities"] * study.N_DIRECTIONS
    torch.manual_seed(seed)
    if arch == "vit":
        model = VideoClassifier(ClassifierConfig(**study.model_dict(sizes), num_classes=classes, drop_path=0.0))
    else:
        model = SmallCNN3D(classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    rows, t0 = [], time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 30) * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        i = torch.randint(0, len(ytr), (16,), generator=g)
        loss = F.cross_entropy(model(xtr[i]), ytr[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                pred = torch.cat([model(xte[j:j + 32]).argmax(1) for j in range(0, len(yte), 32)])
            model.train()
            mot = 100.0 * (pred % study.N_DIRECTIONS == yte % study.N_DIRECTIONS).float().mean().item()
            app = 100.0 * (pred // study.N_DIRECTIONS == yte // study.N_DIRECTIONS).float().mean().item()
            rows.append((step, loss.item(), mot, app))
            print(f"{arch} step {step}: loss {loss.item():.3f} held-out motion {mot:.1f}% appearance {app:.1f}% "
                  f"({time.time() - t0:.0f}s)", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", help="a study folder (python -m mam2_fast.study --out ...)")
    ap.add_argument("what", choices=("pools", "spread", "energy", "fit", "headfit", "scratch"))
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
    ap.add_argument("--at", default="100,300,1000,3000", help="headfit: steps at which to test")
    ap.add_argument("--head-input", default="fc_norm", choices=("fc_norm", "standardized"))
    ap.add_argument("--arch", default="vit", choices=("vit", "cnn"), help="scratch: the model")
    ap.add_argument("--steps", type=int, default=600, help="scratch: training steps")
    ap.add_argument("--distractors", type=int, default=None, help="scratch: build the data with N distractors")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes, lists, ckpts = study_parts(args.study)
    if args.what == "scratch":
        run_scratch(args.study, sizes, lists, args.arch, args.steps, args.lr, args.distractors)
        return 0
    if args.what == "headfit":
        at = sorted({int(x) for x in args.at.split(",")})
        encs = load_encoders(args.study, sizes, lists, ckpts, args.variants.split(","))
        run_headfit(sizes, lists, encs, args.label, args.lr, at, args.head_input)
        return 0
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
