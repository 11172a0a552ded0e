"""Linear probe: frozen encoder, pooled features, multinomial logistic regression.

    python -m mam2_fast.probe --init runs/demo --compare-random --random-seeds 5 --pool grid  # demo proof
    python -m mam2_fast.probe --init encoder.safetensors --train-list train.txt --test-list val.txt

Features: every video is seen as ``--clips`` temporal clips x ``--crops`` spatial crops; each
view is encoded by the frozen encoder (all tokens, final norm) and pooled: ``--pool mean``
averages all tokens to ``[D]`` (default); ``--pool time`` averages each frame's tokens and
concatenates the frames in order, ``[T*D]``; ``--pool grid`` averages the cells of a coarse
``--grid t,s`` split (t time spans x s x s regions, default 2 x 2 x 2) and concatenates them,
``[t*s*s*D]``: it keeps where and when, which a motion label such as the demo's direction
needs (a global mean cannot tell a left-to-right sweep from its time reversal).
The classifier (``--method``): features standardized with training statistics, then closed-form
ridge regression to one-hot targets (default; seconds) or softmax regression fitted by
full-batch L-BFGS (``logistic``); the L2 penalty is picked from a small grid by 4-fold
cross-validation grouped by video. Training uses every view as a sample; a test video's
prediction averages the scores of its views.

Targets: ``--targets`` takes names ``label`` (the list file's label), ``label//K`` or
``label%K``; ``shape`` and ``direction`` are aliases of ``label//4`` and ``label%4`` for the
demo set (``label = shape_id * 4 + direction_id``).

Demo data (no ``--train-list``): probe-train = 480 demo videos (seed 2), probe-test = 240 demo
videos (seed 3), both disjoint from the pre-training videos (seed 0). ``--compare-random``
also probes randomly initialized encoders of the same architecture (``--random-seeds``).
"""
from __future__ import annotations

import argparse
import json
import math
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
from mam2_fast.models.classifier import VideoEncoder, build_encoder
from mam2_fast.train import accel

ALIASES = {"shape": "label//4", "direction": "label%4"}
LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1)          # logistic: absolute L2
DEMO_TRAIN_VIDEOS, DEMO_TEST_VIDEOS = 480, 240
RIDGE_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ridge: L2 per sample


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
POOLS = ("mean", "time", "grid")
DEFAULT_GRID = (2, 2)             # (time spans, regions per side)


@torch.no_grad()
def pool_tokens(tokens: Tensor, pool: str, grid: tuple = DEFAULT_GRID) -> Tensor:
    """encoder tokens [B, T, N, D] (N = h*w, a square patch grid) -> probe feature:

    * ``mean``: all tokens averaged, [B, D];
    * ``time``: per-frame means over space, frames concatenated in order, [B, T*D];
    * ``grid``: means over the cells of a coarse ``grid = (t, s)`` split of the token grid
      (t time spans x s x s spatial regions, adaptive like a spatial pyramid level),
      concatenated in (time, row, column) order, [B, t*s*s*D].
    """
    if pool == "mean":
        return tokens.mean(dim=(1, 2))
    if pool == "time":
        return tokens.mean(dim=2).flatten(1)
    if pool == "grid":
        B, T, N, D = tokens.shape
        h = math.isqrt(N)
        if h * h != N:
            raise ValueError(f"grid pooling needs a square patch grid, got N={N} tokens per frame")
        t, s = int(grid[0]), int(grid[1])
        if not (1 <= t <= T and 1 <= s <= h):
            raise ValueError(f"pool grid {tuple(grid)} does not fit the token grid T={T}, {h}x{h}")
        x = tokens.reshape(B, T, h, h, D).permute(0, 4, 1, 2, 3)                # [B, D, T, h, w]
        cells = F.adaptive_avg_pool3d(x, (t, s, s))                             # [B, D, t, s, s]
        return cells.permute(0, 2, 3, 4, 1).flatten(1)                          # [B, t*s*s*D]
    raise ValueError(f"unknown pooling {pool!r} ({' | '.join(POOLS)})")


@torch.no_grad()
def extract_features(encoders: dict, data, device: torch.device, chunk: int = 16, log=None,
                     pool: str = "mean", grid: tuple = DEFAULT_GRID) -> tuple[dict, Tensor]:
    """One decoding pass of a ViewData through every frozen encoder:
    ({name: features [num_videos, V, D] float32}, labels [num_videos])."""
    feats: dict = {name: [] for name in encoders}
    labels = []
    t0 = time.time()
    for batch in data:
        views = batch["views"].to(device)                                  # [B, V, T, C, H, W]
        B, V = views.shape[:2]
        flat = views.flatten(0, 1)                                         # [B*V, T, C, H, W]
        for name, enc in encoders.items():
            f = torch.cat([pool_tokens(enc.forward_features(flat[i:i + chunk]), pool, grid).float()
                           for i in range(0, flat.shape[0], chunk)])
            feats[name].append(accel.to_host(f.view(B, V, -1)))            # [B, V, D]
        labels.append(accel.to_host(batch["label"]))
        if log:
            log(f"features: {sum(x.shape[0] for x in labels)}/{len(data)} videos ({time.time() - t0:.0f}s)")
    return {name: torch.cat(f) for name, f in feats.items()}, torch.cat(labels)


# ----------------------------------------------------------------------------------------
# the linear classifier
# ----------------------------------------------------------------------------------------
def fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int = 100) -> tuple[Tensor, Tensor]:
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


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i::k] for i in range(k)]


def fit_ridge(x: Tensor, y: Tensor, num_classes: int, lambdas) -> dict:
    """Closed-form ridge regression to one-hot targets (bias unpenalized), all ``lambdas`` from
    one eigendecomposition: {l2: (W [D, K], b [K])}."""
    x = x.double()
    Y = F.one_hot(y, num_classes).double()
    mx, my = x.mean(0), Y.mean(0)
    xc, yc = x - mx, Y - my
    evals, evecs = torch.linalg.eigh(xc.T @ xc)                       # [D], [D, D]
    proj = evecs.T @ (xc.T @ yc)                                      # [D, K]
    out = {}
    for l2 in lambdas:
        W = evecs @ (proj / (evals + l2 * x.shape[0])[:, None])
        out[l2] = (W, my - mx @ W)
    return out


def predict_scores(feats: Tensor, W: Tensor, b: Tensor, method: str) -> Tensor:
    """feats [N, V, D] (standardized) -> view-averaged scores [N, K] (softmax for logistic)."""
    s = feats.double() @ W + b
    return (s.softmax(-1) if method == "logistic" else s).mean(1)


def linear_probe(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, method: str = "ridge",
                 lambdas=None, folds: int = 4, seed: int = 0) -> dict:
    """Features [N, V, D] + labels -> {"train_acc", "test_acc", "l2", "cv_acc", "chance"} (percent).

    ``method``: ``ridge`` (closed form, default) or ``logistic`` (L-BFGS softmax regression).
    The L2 strength (relative to the number of samples for ridge) is chosen by ``folds``-fold
    cross-validation over videos on the training set.
    """
    classes = int(max(train_y.max(), test_y.max())) + 1
    lambdas = tuple(lambdas or (RIDGE_LAMBDAS if method == "ridge" else LAMBDAS))
    mu = train_f.flatten(0, 1).mean(0)
    sd = train_f.flatten(0, 1).std(0).clamp(min=1e-6)
    tr, te = (train_f - mu) / sd, (test_f - mu) / sd
    V = tr.shape[1]

    def fit(idx) -> dict:
        x = tr[idx].flatten(0, 1)                                    # every view is a sample
        y = train_y[idx].repeat_interleave(V)
        if method == "ridge":
            return fit_ridge(x, y, classes, lambdas)
        return {l2: fit_logistic(x, y, classes, l2) for l2 in lambdas}

    cv = {l2: 0 for l2 in lambdas}
    if len(lambdas) > 1:
        for fold in _folds(len(tr), folds, seed):
            keep = np.setdiff1d(np.arange(len(tr)), fold)
            for l2, (W, b) in fit(keep).items():
                cv[l2] += int((predict_scores(tr[fold], W, b, method).argmax(1) == train_y[fold]).sum())
        cv = {l2: 100.0 * c / len(tr) for l2, c in cv.items()}
        best = max(cv, key=lambda l: (cv[l], l))                     # ties -> stronger penalty
    else:
        best = lambdas[0]
    W, b = fit(np.arange(len(tr)))[best] if method == "ridge" else fit_logistic(
        tr.flatten(0, 1), train_y.repeat_interleave(V), classes, best)
    acc = lambda f, y: 100.0 * float((predict_scores(f, W, b, method).argmax(1) == y).double().mean())  # noqa: E731
    return {"method": method, "l2": best, "cv_acc": cv.get(best) if len(lambdas) > 1 else None,
            "train_acc": acc(tr, train_y), "test_acc": acc(te, test_y), "chance": 100.0 / classes}


# ----------------------------------------------------------------------------------------
# encoders
# ----------------------------------------------------------------------------------------
def load_frozen_encoder(init: str, log=print) -> tuple[VideoEncoder, dict]:
    w = read_encoder_weights(init)
    if w.arch is None:
        raise WeightsError(f"{w.source}: no architecture recorded (config/metadata missing)")
    enc = build_encoder(encoder_config_from_arch(w.arch))   # arch mam2 | videomae
    report = load_encoder_into(enc, w, interpolate_pos=False)
    log(f"encoder: {report['loaded']} tensors from {w.source} ({w.kind}), arch {w.arch}")
    return enc.requires_grad_(False).eval(), w.arch


def random_encoder(arch: dict, seed: int) -> VideoEncoder:
    torch.manual_seed(seed)
    return build_encoder(encoder_config_from_arch(arch)).requires_grad_(False).eval()


def demo_probe_lists(demo_dir: str, train_videos: int = DEMO_TRAIN_VIDEOS, test_videos: int = DEMO_TEST_VIDEOS) -> tuple[str, str]:
    from mam2_fast.data import make_demo_dataset

    root = os.path.expanduser(demo_dir).rstrip("/")
    return (make_demo_dataset(f"{root}-probe-train", num_videos=train_videos, seed=2),
            make_demo_dataset(f"{root}-probe-test", num_videos=test_videos, seed=3))


def probe_encoders(encoders: dict, train_data, test_data, targets: list[str], device, log,
                   method: str = "ridge", folds: int = 4, pool: str = "mean",
                   grid: tuple = DEFAULT_GRID) -> dict:
    """{name: frozen encoder} -> {name: {target: linear_probe result}}."""
    t0 = time.time()
    encoders = {k: e.to(device).eval() for k, e in encoders.items()}
    trf, try_ = extract_features(encoders, train_data, device, pool=pool, grid=grid)
    tef, tey = extract_features(encoders, test_data, device, pool=pool, grid=grid)
    log(f"features of {len(encoders)} encoder(s) in {time.time() - t0:.0f}s")
    out = {name: {spec: linear_probe(trf[name], derive_target(try_, spec), tef[name], derive_target(tey, spec),
                                     method, folds=folds) for spec in targets} for name in encoders}
    for name, res in out.items():
        log(f"{name}: " + ", ".join(f"{k} {v['test_acc']:.1f}%" for k, v in res.items()))
    return out


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mam2_fast.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="pre-training checkpoint, run folder or exported .safetensors")
    ap.add_argument("--train-list", help="probe training list (default: demo probe-train split)")
    ap.add_argument("--test-list", help="probe test list (default: demo probe-test split)")
    ap.add_argument("--root", default="", help="data root for relative list paths")
    ap.add_argument("--targets", default=None, help="comma list (default: label,shape,direction on the demo, else label)")
    ap.add_argument("--clips", type=int, default=2, help="temporal clips per video")
    ap.add_argument("--crops", type=int, default=1, choices=(1, 3), help="spatial crops per clip")
    ap.add_argument("--stride", type=int, default=None, help="frame stride (default: the pre-training config's)")
    ap.add_argument("--method", default="ridge", choices=("ridge", "logistic"),
                    help="ridge: closed form (default); logistic: L-BFGS softmax regression")
    ap.add_argument("--pool", default="mean", choices=POOLS,
                    help="mean: average of all tokens [D] (default); time: per-frame spatial means, "
                         "concatenated [T*D]; grid: means over a coarse time x space grid (--grid), concatenated")
    ap.add_argument("--grid", default="2,2", help="with --pool grid: 't,s' = t time spans x s x s regions (default 2,2)")
    ap.add_argument("--compare-random", action="store_true", help="also probe randomly initialized encoders")
    ap.add_argument("--random-seeds", type=int, default=1, help="random encoders to average (with --compare-random)")
    ap.add_argument("--demo-dir", default="~/.cache/mam2_fast/demo")
    ap.add_argument("--demo-train-videos", type=int, default=DEMO_TRAIN_VIDEOS, help="demo probe-train videos")
    ap.add_argument("--demo-test-videos", type=int, default=DEMO_TEST_VIDEOS, help="demo probe-test videos")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--out", help="JSON report (default: probe.json beside the weights)")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        grid = tuple(int(v) for v in args.grid.split(","))
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError
    except ValueError:
        print(f"probe error: --grid must be 't,s' with two positive integers, got {args.grid!r}", file=sys.stderr)
        return 2

    from mam2_fast.data.config import DataConfig
    from mam2_fast.ft.data import ViewData

    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda s: print(f"[mam2_fast] {s}", file=sys.stderr, flush=True)  # noqa: E731
    device = torch.device("cuda" if accel.cuda_available() else "cpu")
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
    train_list, test_list = demo_probe_lists(args.demo_dir, args.demo_train_videos, args.demo_test_videos) if demo else (args.train_list, args.test_list)
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

    encoders = {"pretrained": encoder}
    if args.compare_random:
        encoders.update({f"random{s}": random_encoder(arch, 1000 + s) for s in range(args.random_seeds)})
    per_encoder = probe_encoders(encoders, train_data, test_data, targets, device, log, args.method,
                                 pool=args.pool, grid=grid)
    results = {"pretrained": per_encoder["pretrained"]}
    if args.compare_random:
        runs = [per_encoder[f"random{s}"] for s in range(args.random_seeds)]
        results["random"] = {t: {"test_acc": float(np.mean([r[t]["test_acc"] for r in runs])),
                                 "train_acc": float(np.mean([r[t]["train_acc"] for r in runs])),
                                 "chance": runs[0][t]["chance"]} for t in targets}
        results["random_runs"] = runs
    report = {"init": w.source, "arch": arch, "train_list": train_list, "test_list": test_list,
              "clips": args.clips, "crops": args.crops, "pool": args.pool, "grid": list(grid) if args.pool == "grid" else None, "method": args.method, "stride": stride, "targets": targets, **results}
    out = Path(args.out) if args.out else Path(w.source).parent / "probe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))

    print_table(results, targets, ["pretrained"] + (["random"] if args.compare_random else []))
    print(f"report: {out}")
    return 0


def print_table(results: dict, targets: list, cols: list) -> None:
    """Chance and test accuracy per target, one column per encoder kind."""
    print(f"{'target':<12}{'chance':>8}" + "".join(f"{c + ' test':>18}" for c in cols))
    for t in targets:
        print(f"{t:<12}{results['pretrained'][t]['chance']:>7.1f}%"
              + "".join(f"{results[c][t]['test_acc']:>17.1f}%" for c in cols))


if __name__ == "__main__":
    raise SystemExit(main())
