"""Linear probe: frozen encoder, pooled features, multinomial logistic regression.

    python -m mam2_fast.probe --init runs/demo --compare-random          # the demo proof
    python -m mam2_fast.probe --init encoder.safetensors --train-list train.txt --test-list val.txt

Features: every video is seen as ``--clips`` temporal clips x ``--crops`` spatial crops; each
view is encoded by the frozen encoder (all tokens, final norm) and mean-pooled to ``[D]``.
The classifier: features standardized with training statistics, softmax regression with an
L2 penalty fitted by full-batch L-BFGS; the penalty is picked from a small grid by 4-fold
cross-validation grouped by video. Training uses every view as a sample; a test video's
prediction averages the softmax of its views.

Targets: ``--targets`` takes names ``label`` (the list file's label), ``label//K`` or
``label%K``; ``shape`` and ``direction`` are aliases of ``label//4`` and ``label%4`` for the
demo set (``label = shape_id * 4 + direction_id``).

Demo data (no ``--train-list``): probe-train = 144 demo videos (seed 2), probe-test = 96 demo
videos (seed 3), both disjoint from the 64 pre-training videos (seed 0). ``--compare-random``
also probes randomly initialized encoders of the same architecture (``--random-seeds``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mam2_fast.ft.weights import WeightsError, encoder_config_from_arch, load_encoder_into, read_encoder_weights
from mam2_fast.models.classifier import VideoEncoder

ALIASES = {"shape": "label//4", "direction": "label%4"}
LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


# ----------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------
def derive_target(labels: Tensor, spec: str) -> Tensor:
    expr = ALIASES.get(spec, spec).replace(" ", "")
    if expr == "label":
        return labels.clone()
    for op, fn in (("//", torch.div), ("%", torch.remainder)):
        if expr.startswith("label" + op):
            k = int(expr[len("label" + op):])
            return fn(labels, k, rounding_mode="floor") if op == "//" else fn(labels, k)
    raise ValueError(f"unknown probe target {spec!r} (label | label//K | label%K | shape | direction)")


# ----------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(encoder: VideoEncoder, data, device: torch.device, chunk: int = 16, log=None) -> tuple[Tensor, Tensor]:
    """ViewData -> (features [num_videos, V, D] float32, labels [num_videos])."""
    encoder.eval()
    feats, labels = [], []
    t0 = time.time()
    for batch in data:
        views = batch["views"].to(device)                                  # [B, V, T, C, H, W]
        B, V = views.shape[:2]
        flat = views.flatten(0, 1)
        f = torch.cat([encoder.pooled(flat[i:i + chunk]).float() for i in range(0, flat.shape[0], chunk)])
        feats.append(f.view(B, V, -1).cpu())
        labels.append(batch["label"].cpu())
        if log:
            log(f"features: {sum(x.shape[0] for x in feats)}/{len(data)} videos ({time.time() - t0:.0f}s)")
    return torch.cat(feats), torch.cat(labels)


# ----------------------------------------------------------------------------------------
# the linear classifier
# ----------------------------------------------------------------------------------------
def fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int = 200) -> tuple[Tensor, Tensor]:
    """Softmax regression on x [M, D] (standardized), y [M]: (W [D, K], b [K]); L-BFGS, full batch."""
    x = x.double()
    W = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def predict_videos(feats: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """feats [N, V, D] (standardized) -> view-averaged softmax [N, K]."""
    return (feats.double() @ W + b).softmax(-1).mean(1)


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i::k] for i in range(k)]


def linear_probe(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor,
                 lambdas=LAMBDAS, folds: int = 4, seed: int = 0) -> dict:
    """Features [N, V, D] + labels -> {"train_acc", "test_acc", "l2", "cv_acc"} (percent)."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    mu = train_f.flatten(0, 1).mean(0)
    sd = train_f.flatten(0, 1).std(0).clamp(min=1e-6)
    tr, te = (train_f - mu) / sd, (test_f - mu) / sd
    V = tr.shape[1]

    def fit_views(idx):
        x = tr[idx].flatten(0, 1)                                    # every view is a sample
        y = train_y[idx].repeat_interleave(V)
        return x, y

    cv = {}
    if len(lambdas) > 1:
        for l2 in lambdas:
            correct = 0
            for fold in _folds(len(tr), folds, seed):
                keep = np.setdiff1d(np.arange(len(tr)), fold)
                W, b = fit_logistic(*fit_views(keep), classes, l2)
                correct += int((predict_videos(tr[fold], W, b).argmax(1) == train_y[fold]).sum())
            cv[l2] = 100.0 * correct / len(tr)
        best = max(cv, key=lambda l: (cv[l], l))                     # ties -> stronger penalty
    else:
        best = lambdas[0]
    W, b = fit_logistic(*fit_views(np.arange(len(tr))), classes, best)
    return {"l2": best, "cv_acc": cv.get(best),
            "train_acc": 100.0 * float((predict_videos(tr, W, b).argmax(1) == train_y).double().mean()),
            "test_acc": 100.0 * float((predict_videos(te, W, b).argmax(1) == test_y).double().mean()),
            "chance": 100.0 / classes}


# ----------------------------------------------------------------------------------------
# encoders
# ----------------------------------------------------------------------------------------
def load_frozen_encoder(init: str, log=print) -> tuple[VideoEncoder, dict]:
    w = read_encoder_weights(init)
    if w.arch is None:
        raise WeightsError(f"{w.source}: no architecture recorded (config/metadata missing)")
    enc = VideoEncoder(encoder_config_from_arch(w.arch))
    report = load_encoder_into(enc, w, interpolate_pos=False)
    log(f"encoder: {report['loaded']} tensors from {w.source} ({w.kind}), arch {w.arch}")
    return enc.requires_grad_(False).eval(), w.arch


def random_encoder(arch: dict, seed: int) -> VideoEncoder:
    torch.manual_seed(seed)
    return VideoEncoder(encoder_config_from_arch(arch)).requires_grad_(False).eval()


def demo_probe_lists(demo_dir: str, train_videos: int = 144, test_videos: int = 96) -> tuple[str, str]:
    from mam2_fast.data import make_demo_dataset

    root = os.path.expanduser(demo_dir).rstrip("/")
    return (make_demo_dataset(f"{root}-probe-train", num_videos=train_videos, seed=2),
            make_demo_dataset(f"{root}-probe-test", num_videos=test_videos, seed=3))


def probe_encoder(encoder: VideoEncoder, train_data, test_data, targets: list[str], device, log,
                  folds: int = 4) -> dict:
    t0 = time.time()
    encoder = encoder.to(device)
    trf, try_ = extract_features(encoder, train_data, device)
    tef, tey = extract_features(encoder, test_data, device)
    t_feat = time.time() - t0
    out = {}
    for spec in targets:
        out[spec] = linear_probe(trf, derive_target(try_, spec), tef, derive_target(tey, spec), folds=folds)
    log(f"probe done in {time.time() - t0:.0f}s (features {t_feat:.0f}s): "
        + ", ".join(f"{k} {v['test_acc']:.1f}%" for k, v in out.items()))
    return out


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mam2_fast.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="pre-training checkpoint, run folder or exported .safetensors")
    ap.add_argument("--train-list", help="probe training list (default: demo probe-train split)")
    ap.add_argument("--test-list", help="probe test list (default: demo probe-test split)")
    ap.add_argument("--root", default="", help="data root for relative list paths")
    ap.add_argument("--targets", default=None, help="comma list (default: label,shape,direction on the demo, else label)")
    ap.add_argument("--clips", type=int, default=2, help="temporal clips per video")
    ap.add_argument("--crops", type=int, default=3, choices=(1, 3), help="spatial crops per clip")
    ap.add_argument("--stride", type=int, default=None, help="frame stride (default: the pre-training config's)")
    ap.add_argument("--compare-random", action="store_true", help="also probe randomly initialized encoders")
    ap.add_argument("--random-seeds", type=int, default=1, help="random encoders to average (with --compare-random)")
    ap.add_argument("--demo-dir", default="~/.cache/mam2_fast/demo")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--out", help="JSON report (default: probe.json beside the weights)")
    args = ap.parse_args(argv)

    from mam2_fast.data.config import DataConfig
    from mam2_fast.ft.data import ViewData

    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda s: print(f"[mam2_fast] {s}", file=sys.stderr, flush=True)  # noqa: E731
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        encoder, arch = load_frozen_encoder(args.init, log)
        w = read_encoder_weights(args.init)
    except WeightsError as e:
        print(f"probe error: {e}", file=sys.stderr)
        return 2
    demo = args.train_list is None
    if demo != (args.test_list is None):
        print("probe error: give both --train-list and --test-list, or neither (demo)", file=sys.stderr)
        return 2
    train_list, test_list = demo_probe_lists(args.demo_dir) if demo else (args.train_list, args.test_list)
    targets = (args.targets or ("label,shape,direction" if demo else "label")).split(",")
    stride = args.stride
    if stride is None:
        cfg = w.meta.get("config") or {}
        stride = int((cfg.get("data") or {}).get("sampling_stride", 4))
    dcfg = DataConfig(root=args.root, num_frames=arch["num_frames"], input_size=arch["img_size"],
                      sampling_stride=stride, num_workers=args.workers)
    views = lambda lst: ViewData(dcfg, lst, args.clips, args.crops, "dense", batch_size=8, device=device)  # noqa: E731
    train_data, test_data = views(train_list), views(test_list)
    log(f"probe: {len(train_data)} train / {len(test_data)} test videos, {args.clips}x{args.crops} views, "
        f"targets {targets}")

    results = {"pretrained": probe_encoder(encoder, train_data, test_data, targets, device, log)}
    if args.compare_random:
        runs = [probe_encoder(random_encoder(arch, 1000 + s), train_data, test_data, targets, device, log)
                for s in range(args.random_seeds)]
        results["random"] = {t: {k: float(np.mean([r[t][k] for r in runs])) if k in ("train_acc", "test_acc", "chance")
                                 else runs[0][t][k] for k in runs[0][t]} for t in targets}
        results["random_runs"] = runs
    report = {"init": w.source, "arch": arch, "train_list": train_list, "test_list": test_list,
              "clips": args.clips, "crops": args.crops, "stride": stride, "targets": targets, **results}
    out = Path(args.out) if args.out else Path(w.source).parent / "probe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))

    cols = ["pretrained"] + (["random"] if args.compare_random else [])
    print(f"{'target':<12}{'chance':>8}" + "".join(f"{c + ' test':>18}" for c in cols))
    for t in targets:
        print(f"{t:<12}{results['pretrained'][t]['chance']:>7.1f}%"
              + "".join(f"{results[c][t]['test_acc']:>17.1f}%" for c in cols))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
