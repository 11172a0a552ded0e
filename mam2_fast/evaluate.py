"""Multi-view evaluation of a fine-tuned classifier.

    python -m mam2_fast.evaluate runs/finetune_demo                 # its latest checkpoint
    python -m mam2_fast.evaluate CKPT --list val.txt --clips 7 --crops 3 --out eval/

Every video is seen as ``K`` temporal clips x 3 spatial crops (Appendix B: K400 7x3,
SSv2 2x3); the softmax scores of its views are averaged, then top-1 / top-5, mean per-class
accuracy, per-class accuracy and the confusion matrix are computed. Writes
``<out>/eval.json`` (all numbers, the confusion matrix, per-video predictions) and
``<out>/confusion.png`` (row-normalized; matplotlib if installed, else a plain heat map).
Defaults (list file, K, crops, sampling) come from the checkpoint's fine-tuning config.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from mam2_fast.config import ConfigError
from mam2_fast.train import accel


# ----------------------------------------------------------------------------------------
# multi-view inference and metrics
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def multiview_probs(model: torch.nn.Module, views: Tensor, chunk: int = 16) -> Tensor:
    """views ``[B, V, T, C, H, W]`` -> softmax scores averaged over the V views ``[B, K]``."""
    B, V = views.shape[:2]
    flat = views.flatten(0, 1)                                        # [B*V, T, C, H, W]
    logits = torch.cat([model(flat[i:i + chunk]).float() for i in range(0, flat.shape[0], chunk)])
    return logits.softmax(-1).view(B, V, -1).mean(dim=1)             # [B, K]


def topk_correct(probs: Tensor, labels: Tensor, k: int) -> Tensor:
    """bool [B]: label among the k highest scores."""
    k = min(k, probs.shape[1])
    return (probs.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def classification_metrics(probs: Tensor, labels: Tensor, names: Optional[list] = None) -> dict:
    """probs [B, K], labels [B] -> top1/top5 (percent), per-class accuracy, confusion matrix."""
    K = probs.shape[1]
    names = names or [str(i) for i in range(K)]
    pred = probs.argmax(1)
    cm = confusion_matrix(pred.numpy(), labels.numpy(), K)
    support = cm.sum(1)
    per_class = {names[c]: (float(cm[c, c] / support[c] * 100) if support[c] else None) for c in range(K)}
    seen = [v for v in per_class.values() if v is not None]
    return {"num_videos": int(labels.numel()),
            "top1": float(topk_correct(probs, labels, 1).float().mean() * 100),
            "top5": float(topk_correct(probs, labels, 5).float().mean() * 100),
            "mean_class_acc": float(np.mean(seen)) if seen else 0.0,
            "per_class_acc": per_class, "class_support": {names[c]: int(support[c]) for c in range(K)},
            "confusion": cm.tolist(), "class_names": list(names)}


def run_views(model: torch.nn.Module, data, device: torch.device, amp=None, log=None, gather: bool = False) -> dict:
    """Averaged scores for every video of a :class:`~mam2_fast.ft.data.ViewData`.

    ``gather=True`` (a process group is initialized and ``data`` is this rank's shard): every
    rank's scores are gathered and merged in list order, so every rank returns exactly what one
    process evaluating the whole list returns (each video's views are scored by one rank, by
    the same computation)."""
    model.eval()
    probs, labels, index = [], [], []
    t0, n = time.time(), 0
    for batch in data:
        with amp or contextlib.nullcontext():
            probs.append(accel.to_host(multiview_probs(model, batch["views"].to(device))))
        labels.append(accel.to_host(batch["label"]))
        index.append(accel.to_host(batch["index"]))
        n += labels[-1].numel()
        if log is not None:
            log(f"eval: {n}/{len(data)} videos ({time.time() - t0:.0f}s)")
    result = {"probs": torch.cat(probs) if probs else None, "labels": torch.cat(labels) if labels else None,
              "index": torch.cat(index) if index else None, "skipped": list(data.skipped)}
    if gather:
        result = merge_shards(gather_objects(result))
    if result["probs"] is None:
        raise RuntimeError(f"eval: no readable videos in {data.list_file}")
    return result


def gather_objects(obj) -> list:
    """``obj`` of every rank of the default process group (a list in rank order)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_shards(parts: list) -> dict:
    """Per-rank ``run_views`` results -> one result in list order (by video index)."""
    skipped = sorted({s for p in parts for s in p["skipped"]})
    parts = [p for p in parts if p["probs"] is not None]
    if not parts:
        return {"probs": None, "labels": None, "index": None, "skipped": skipped}
    index = torch.cat([p["index"] for p in parts])
    order = torch.argsort(index)
    return {"probs": torch.cat([p["probs"] for p in parts])[order],
            "labels": torch.cat([p["labels"] for p in parts])[order], "index": index[order], "skipped": skipped}


def write_report(result: dict, metrics: dict, out_dir: str | Path, extra: Optional[dict] = None,
                 records=None) -> dict:
    """eval.json + confusion.png under ``out_dir``; returns the paths."""
    from mam2_fast.ft.plots import save_confusion_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probs, labels, index = result["probs"], result["labels"], result["index"]
    videos = [{"index": int(i), "path": records[int(i)].path if records else None, "label": int(y),
               "pred": int(p.argmax()), "score": float(p.max())} for i, y, p in zip(index, labels, probs)]
    report = {**(extra or {}), **metrics, "skipped": result.get("skipped", []), "videos": videos}
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    png = save_confusion_png(np.asarray(metrics["confusion"]), metrics["class_names"], out / "confusion.png",
                             title=f"top-1 {metrics['top1']:.1f}%  ({metrics['num_videos']} videos)")
    return {"json": str(out / "eval.json"), "png": str(png)}


def format_metrics(m: dict) -> str:
    lines = [f"videos {m['num_videos']}  top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  "
             f"mean class acc {m['mean_class_acc']:.2f}%"]
    worst = sorted(((v, k) for k, v in m["per_class_acc"].items() if v is not None))[:5]
    if worst:
        lines.append("lowest classes: " + ", ".join(f"{k} {v:.0f}%" for v, k in worst))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def load_finetuned(path: str | Path, device: torch.device):
    """(model, FinetuneConfig, checkpoint path) from a fine-tuning checkpoint or run folder."""
    from mam2_fast.ft.config import finetune_config_from_dict
    from mam2_fast.ft.weights import WeightsError, resolve_weights_path
    from mam2_fast.models.classifier import build_classifier
    from mam2_fast.train.checkpoint import load_checkpoint

    p = resolve_weights_path(path)
    try:
        ckpt = load_checkpoint(p)
    except (RuntimeError, FileNotFoundError) as e:
        raise WeightsError(str(e)) from e
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "finetune":
        raise WeightsError(f"{p}: not a fine-tuning checkpoint (write one with python -m mam2_fast.finetune)")
    cfg = finetune_config_from_dict(ckpt["config"])
    model = build_classifier(cfg.model)
    res = model.load_state_dict(ckpt["model"], strict=False)
    if res.missing_keys or res.unexpected_keys:
        bad = (res.missing_keys or res.unexpected_keys)[0]
        raise WeightsError(f"{p}: {'missing' if res.missing_keys else 'unexpected'} key '{bad}'")
    return model.to(device).eval(), cfg, p


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mam2_fast.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="fine-tuning checkpoint or run folder")
    ap.add_argument("--list", help="list file to evaluate (default: the config's test.list_file / demo val split)")
    ap.add_argument("--clips", type=int, help="K temporal clips (default: test.num_clips)")
    ap.add_argument("--crops", type=int, choices=(1, 3), help="spatial crops (default: test.num_crops)")
    ap.add_argument("--batch-size", type=int, help="videos per batch (default: test.batch_size)")
    ap.add_argument("--limit", type=int, help="evaluate only the first N videos")
    ap.add_argument("--out", help="output folder (default: <run>/eval)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args(argv)

    from mam2_fast.ft.data import ViewData, class_names, demo_lists
    from mam2_fast.ft.weights import WeightsError

    device = torch.device("cuda" if args.device == "auto" and accel.cuda_available() else
                          ("cpu" if args.device == "auto" else args.device))
    # under torchrun every rank scores its shard of the videos; rank 0 merges and reports
    from mam2_fast.train.distributed import init_distributed

    dist_info = init_distributed(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    try:
        model, cfg, path = load_finetuned(args.checkpoint, device)
    except (WeightsError, ConfigError) as e:
        print(f"evaluate error: {e}", file=sys.stderr)
        return 2
    list_file = args.list or cfg.test.list_file
    if list_file is None:
        if not cfg.data.demo:
            print("evaluate error: no --list given and the config has no test.list_file", file=sys.stderr)
            return 2
        list_file = demo_lists(cfg.data)[1]
    data = ViewData(cfg.data, list_file, args.clips or cfg.test.num_clips, args.crops or cfg.test.num_crops,
                    cfg.test.sampling, args.batch_size or cfg.test.batch_size, device, limit=args.limit,
                    shard=(dist_info.rank, dist_info.world_size))
    quiet = lambda s: None  # noqa: E731
    log = (lambda s: print(f"[mam2_fast] {s}", file=sys.stderr, flush=True)) if dist_info.is_main else quiet  # noqa: E731
    log(f"evaluating {path} on {len(data.records)} videos of {list_file}: {data.num_clips} clips x "
        f"{data.num_crops} crops" + (f", {dist_info.world_size} ranks" if dist_info.enabled else ""))
    # bf16 autocast where it is native (GPUs from Ampere on), as in training
    amp = accel.autocast(device, torch.bfloat16) if accel.is_gpu(device) and accel.bf16_supported(device) else None
    result = run_views(model, data, device, amp=amp, log=log, gather=dist_info.enabled)
    if not dist_info.is_main:
        return 0
    metrics = classification_metrics(result["probs"], result["labels"], class_names(list_file, cfg.model.num_classes))
    out = Path(args.out) if args.out else path.parent / "eval"
    paths = write_report(result, metrics, out, {"checkpoint": str(path), "list_file": list_file,
                                                "num_clips": data.num_clips, "num_crops": data.num_crops},
                         records=data.records)
    print(format_metrics(metrics))
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


if __name__ == "__main__":
    from mam2_fast.train.distributed import exit_worker

    exit_worker(main())
