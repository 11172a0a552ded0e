"""Supervised fine-tuning of a pre-trained MAM^2 encoder (Table 8 recipe).

    python -m mam2_fast.finetune                                    # CPU demo (configs/finetune_demo.yaml)
    python -m mam2_fast.finetune -c configs/finetune_k400_vit_b.yaml init=runs/k400_vit_b
    python -m mam2_fast.finetune -c ... --resume                    # continue the latest checkpoint

Model: the divided space-time encoder on all tokens, mean pooling, fc_norm, linear head
(:mod:`mam2_fast.models.classifier`), initialized from ``init`` (pre-training checkpoint, run
folder or exported ``.safetensors``; strict key/shape checks, see :mod:`mam2_fast.ft.weights`).
Recipe: AdamW (0.9, 0.999), wd 0.05, lr = base_lr x batch / 256, layer-wise lr decay 0.75,
5 warmup epochs then cosine, label smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment
(9, 0.5) identical across the frames of a clip, drop path 0.1, repeated sampling 2
(``data.num_sample``), flip off for SSv2. At the end (and every ``test.every_epochs``) the
model is evaluated with K clips x 3 crops on ``test.list_file`` (demo: the held-out demo split).

Checkpoints (atomic ``checkpoint-<step>.pt`` + ``latest.txt``), resume, progress line,
``metrics.jsonl`` / CSV / TensorBoard are the pre-training ones (``mam2_fast.train``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mam2_fast.config import ConfigError, _deep_merge, parse_overrides
from mam2_fast.ft.config import FinetuneConfig, finetune_config_from_dict, load_finetune_config
from mam2_fast.ft.mixup import build_mixup, soft_target_cross_entropy
from mam2_fast.ft.weights import WeightsError, check_arch, load_encoder_into, read_encoder_weights
from mam2_fast.models.classifier import VideoClassifier, build_classifier, param_groups_layer_decay, set_scaled_lr
from mam2_fast.pretrain import StopRequest, autocast_for, choose_kernels, resume_value_as_override, select_device
from mam2_fast.train.checkpoint import (find_resumable, load_checkpoint, prepare_run_dir, rng_state, save_checkpoint,
                                        set_rng_state)
from mam2_fast.train import accel
from mam2_fast.train.metrics import MetricsLogger, Progress
from mam2_fast.data.prefetch import Prefetcher, auto_depth
from mam2_fast.train.optim import NonFiniteGuard, lr_at, lr_batch, scaled_lr, scaled_min_lr

DEMO_YAML = Path(__file__).resolve().parent.parent / "configs" / "finetune_demo.yaml"


def demo_config_dict() -> dict:
    """The no-argument demo (kept equal to configs/finetune_demo.yaml by a test)."""
    return {
        "name": "finetune_demo",
        "init": "runs/demo",
        "model": {"preset": "tiny", "img_size": 96, "num_frames": 8, "patch_size": 16, "embed_dim": 128,
                  "depth": 3, "num_heads": 4, "num_classes": 12,
                  "drop_path": 0.1},
        "data": {"demo": True, "demo_num_videos": 256, "num_frames": 8, "sampling_stride": 4,
                 "input_size": 96, "num_sample": 2, "num_workers": 1,
                 "flip": False},  # direction labels: no mirroring (as SSv2)
        "aug": {"sampling": "dense"},
        "test": {"num_clips": 2, "num_crops": 3, "batch_size": 8},
        "optim": {"lr": 5.0e-4, "warmup_epochs": 0.25, "layer_decay": 0.75},
        "train": {"epochs": 2, "batch_size": 8, "output_dir": "runs/finetune_demo", "log_every": 8,
                  "save_every": 32, "device": "cpu", "precision": "fp32"},
    }


# ----------------------------------------------------------------------------------------
# setup pieces
# ----------------------------------------------------------------------------------------
def distributed_env(device: torch.device):
    """Join the torchrun process group (DDP; NCCL on GPUs, gloo on CPU) when WORLD_SIZE > 1."""
    from mam2_fast.train.distributed import init_distributed
    return init_distributed(device.type)


def build_finetune_model(cfg: FinetuneConfig, log=print) -> tuple[VideoClassifier, Optional[dict]]:
    """Classifier from ``cfg.model``, encoder loaded from ``cfg.init`` (strict)."""
    model = build_classifier(cfg.model)
    if cfg.init is None:
        log("init: none (random initialization)")
        return model, None
    weights = read_encoder_weights(cfg.init)
    check_arch(weights, cfg.model)
    report = load_encoder_into(model, weights)
    log(f"init: {report['loaded']} encoder tensors from {report['source']} ({report['kind']}); "
        f"set aside {len(report['dropped'])} pre-training-only tensors"
        + (f"; interpolated {', '.join(report['interpolated'])}" if report["interpolated"] else ""))
    return model, report


def build_optimizer(model: VideoClassifier, cfg: FinetuneConfig, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups_layer_decay(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    for g in groups:
        g.pop("param_names", None)
    fused = str(cfg.optim.fused).lower()
    # fused AdamW (CUDA and CPU, as in pre-training) also skips a non-finite step on the device
    use_fused = device.type in ("cuda", "cpu") if fused == "auto" else fused == "true"
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=use_fused or None)


def resolve_data(cfg: FinetuneConfig, log=print) -> tuple[FinetuneConfig, Optional[str]]:
    """Fill ``data.list_file`` (and the test list) from the demo set when ``data.demo``."""
    test_list = cfg.test.list_file
    if cfg.data.demo and cfg.data.list_file is None:
        from mam2_fast.ft.data import demo_lists

        train_list, val_list = demo_lists(cfg.data)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, list_file=train_list))
        test_list = test_list or val_list
        log(f"demo dataset: train {train_list}, test {test_list}")
    return cfg, test_list


def check_list_labels(cfg: FinetuneConfig, data, test_list: Optional[str]) -> None:
    """Training and test labels in ``[0, model.num_classes)`` before anything is trained."""
    from mam2_fast.data.video_list import check_labels, read_list_file
    if getattr(data, "records", None) is not None and cfg.data.list_file:
        check_labels(data.records, cfg.model.num_classes, cfg.data.list_file)
    if test_list:
        check_labels(read_list_file(test_list, cfg.data.root, cfg.data.format), cfg.model.num_classes, test_list)


def evaluate_model(model, cfg: FinetuneConfig, test_list: str, device, amp, out_dir: Path, tag: str, log) -> dict:
    from mam2_fast.evaluate import classification_metrics, run_views, write_report
    from mam2_fast.ft.data import ViewData, class_names

    data = ViewData(cfg.data, test_list, cfg.test.num_clips, cfg.test.num_crops, cfg.test.sampling,
                    cfg.test.batch_size, device)
    result = run_views(model, data, device, amp)
    metrics = classification_metrics(result["probs"], result["labels"], class_names(test_list, cfg.model.num_classes))
    paths = write_report(result, metrics, out_dir / tag, {"list_file": test_list, "num_clips": cfg.test.num_clips,
                                                          "num_crops": cfg.test.num_crops}, records=data.records)
    log(f"eval ({tag}): top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% on {metrics['num_videos']} videos "
        f"({cfg.test.num_clips}x{cfg.test.num_crops} views) -> {paths['json']}")
    model.train()
    return {k: metrics[k] for k in ("top1", "top5", "mean_class_acc", "num_videos")}


# ----------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------
def train(cfg: FinetuneConfig, data=None, test_list: Optional[str] = None, resume: Optional[str] = None,
          log=print) -> dict:
    """Fine-tune; returns a summary (paths, first/last loss, final evaluation)."""
    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    from mam2_fast.train import distributed as D

    device = select_device(cfg)
    dist_info = distributed_env(device)
    rank, world = dist_info.rank, dist_info.world_size
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    if not dist_info.is_main:
        log = lambda s: None  # noqa: E731 - rank 0 speaks for the run
    run_dir = Path(cfg.train.output_dir).expanduser()

    ckpt = None
    if resume:
        found = find_resumable(run_dir, warn=log) if resume == "auto" else (Path(resume), load_checkpoint(resume))
        if found is None:
            log(f"--resume: no checkpoint in {run_dir}, starting fresh")
        else:
            path, ckpt = found
            if ckpt.get("kind") != "finetune":
                raise WeightsError(f"{path}: not a fine-tuning checkpoint; pass pre-trained weights as init=")
            log(f"resuming from {path} (step {ckpt['step']})")
    # another run's files are never overwritten (unless train.overwrite); stale .tmp files go
    prepare_run_dir(run_dir, resuming=bool(resume), overwrite=cfg.train.overwrite, is_main=dist_info.is_main,
                    log_fn=log)

    if data is None:
        cfg, found = resolve_data(cfg, log)
        test_list = test_list or found
        from mam2_fast.ft.data import FinetuneTrainData

        data = FinetuneTrainData(cfg.data, cfg.aug, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                 rank=rank, world_size=world, device=device)
    check_list_labels(cfg, data, test_list)   # a label >= num_classes: an error naming its line, now

    if ckpt is not None:
        model = build_classifier(cfg.model)
        model.load_state_dict(ckpt["model"])
    else:
        model, _ = build_finetune_model(cfg, log)
    model = model.to(device)
    if cfg.model.kernels != "reference" and hasattr(model, "set_kernel_backend"):
        choose_kernels(model, cfg.model.kernels, device, cfg.train.precision, cfg.train.batch_size, log)
    log(f"model: {cfg.model.preset} classifier, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters, {cfg.model.num_classes} classes, device {device}")

    accum = cfg.train.accum_steps
    if cfg.train.global_batch is not None:
        per_step = cfg.train.batch_size * world
        if cfg.train.global_batch % per_step:
            raise ConfigError(f"train.global_batch {cfg.train.global_batch} is not a multiple of "
                              f"batch_size x world_size = {per_step}")
        accum = cfg.train.global_batch // per_step
    effective_batch = cfg.train.batch_size * accum * world
    peak_lr = scaled_lr(cfg.optim, lr_batch(effective_batch, cfg.data))
    min_lr = min(peak_lr, scaled_min_lr(cfg.optim, lr_batch(effective_batch, cfg.data)))
    steps_per_epoch = max(1, data.steps_per_epoch // accum)
    # micro-batches used per epoch: whole optimizer steps (the remainder is dropped, so no
    # gradient leaks into the next epoch's first step), as in pretrain
    epoch_micro = steps_per_epoch * accum if data.steps_per_epoch >= accum else data.steps_per_epoch

    def epoch_batches(ep: int, start: int):
        if start >= epoch_micro:
            return
        for pos, batch in data.iter_epoch(ep, start_step=start):
            yield pos, batch
            if pos + 1 >= epoch_micro:
                return
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    last_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    optimizer = build_optimizer(model, cfg, device)
    if cfg.train.parallel == "fsdp" and dist_info.enabled:
        raise ConfigError("train.parallel: fine-tuning runs DDP under torchrun; 'fsdp' is for pre-training")
    wrapped = D.wrap_model(model, dist_info, "ddp", device)   # the raw model keeps the parameter names
    mixup = build_mixup(cfg.aug, cfg.model.num_classes)
    step, epoch, micro_pos = 0, 0, 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, micro_pos = ckpt["step"], ckpt["epoch"], ckpt["micro_in_epoch"]
        set_rng_state(ckpt["rng"])

    run_dir.mkdir(parents=True, exist_ok=True)
    if dist_info.is_main:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    metrics = MetricsLogger(run_dir, tensorboard=cfg.train.tensorboard, enabled=dist_info.is_main)
    progress = Progress(last_step, start=step, enabled=cfg.train.progress and dist_info.is_main)
    log(f"training {last_step - step} steps ({steps_per_epoch}/epoch, effective batch {effective_batch}, "
        f"peak lr {peak_lr:.2e}, layer decay {cfg.optim.layer_decay}) -> {run_dir}")

    def state_dict_for_save() -> dict:
        ep, pos = (epoch + 1, 0) if micro_pos >= epoch_micro else (epoch, micro_pos)
        return {"kind": "finetune", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "epoch": ep, "micro_in_epoch": pos, "rng": rng_state(), "config": cfg.to_dict(),
                "init": cfg.init, "schedule": {"peak_lr": peak_lr, "total_steps": total_steps,
                                               "warmup_steps": warmup_steps}}

    amp = autocast_for(device, cfg.train.precision)
    sums: dict = {}
    count, clips, t_log = 0, 0, time.time()
    first_record = last_record = None
    last_ckpt: Optional[Path] = None
    evals: list = []
    prefetch_depth = auto_depth(cfg.train.prefetch, device)   # -1: a background thread on CUDA only
    # the all-reduced gradient norm is the same on every rank, so all ranks agree on a skip
    guard = NonFiniteGuard(optimizer, (p for p in model.parameters() if p.requires_grad), cfg.optim.clip_grad,
                           cfg.train.max_nonfinite, device)
    model.train()
    batches = None   # the prefetch thread is stopped on every way out of the loop
    stop = StopRequest().__enter__()   # SIGTERM: checkpoint at the next step, exit 143 (as pre-training)
    interrupted = False
    try:
        while step < last_step:
            micro = micro_pos % accum
            batches = Prefetcher(epoch_batches(epoch, micro_pos), device, depth=prefetch_depth)
            for pos, batch in batches:
                clip = batch["clip"].to(device, non_blocking=True)               # [B, T, C, H, W]
                label = batch["label"].to(device)                                # [B]
                rng = np.random.default_rng([cfg.train.seed, step, micro, rank, 0x313])
                clip, soft, _ = mixup(clip, label, rng)                          # soft [B, K]
                last_micro = micro + 1 == accum
                sync = wrapped.no_sync() if (dist_info.enabled and not last_micro) else contextlib.nullcontext()
                with sync:
                    with amp:
                        logits = wrapped(clip)                                   # [B, K]
                    loss = soft_target_cross_entropy(logits, soft)
                    (loss / accum).backward()
                with torch.no_grad():
                    ok = guard.micro(loss)                      # the logged means leave non-finite ones out
                    acc = (logits.argmax(-1) == label).float().mean()
                    sums["loss"] = sums.get("loss", 0.0) + torch.where(ok, loss.detach().float(), 0.0)
                    sums["train_acc"] = sums.get("train_acc", 0.0) + torch.where(ok, acc, 0.0)
                count += 1
                clips += clip.shape[0]
                micro_pos = pos + 1
                micro += 1
                if micro < accum:
                    continue
                micro = 0

                lr = lr_at(step, total_steps, warmup_steps, peak_lr, min_lr)
                set_scaled_lr(optimizer, lr)
                guard.step()       # a non-finite step is skipped on the device (fused AdamW)
                step += 1

                if step % cfg.train.log_every == 0 or step == last_step:
                    dt = time.time() - t_log
                    n_ok, n_skipped, new_skips, streak_error = guard.end_log_window(step, last_ckpt)
                    rec = {"step": step, "epoch": epoch, "lr": lr, **{k: accel.host_float(v) / n_ok if n_ok else float("nan") for k, v in sums.items()},
                           "clips_per_s": clips / max(dt, 1e-9), "skipped_steps": n_skipped,
                           **{f"data_{k}": v for k, v in data.stats().items()}}
                    metrics.log(rec)
                    first_record = first_record or rec
                    last_record = rec
                    progress.update(step, f"loss {rec['loss']:.4f} acc {rec['train_acc']:.3f} lr {lr:.2e}",
                                    rec["clips_per_s"])
                    sums, count, clips, t_log = {}, 0, 0, time.time()
                    if new_skips:
                        log(f"step {step}: {new_skips} update(s) skipped since the last log (non-finite gradients)")
                    if streak_error is not None:
                        progress.close()
                        raise streak_error
                want_stop = stop.requested
                if dist_info.enabled and (step % cfg.train.stop_check_every == 0 or step == last_step):
                    want_stop = D.all_ranks_agree(want_stop, dist_info, device)
                elif dist_info.enabled:
                    want_stop = False
                if (step % cfg.train.save_every == 0 or step == last_step or want_stop) and dist_info.is_main:
                    last_ckpt = save_checkpoint(run_dir, step, state_dict_for_save(), cfg.train.keep_last)
                if want_stop:
                    log(f"stop requested (SIGTERM): checkpoint written at step {step}")
                    interrupted = True
                    break
                end_of_epoch = micro_pos >= epoch_micro
                if (test_list and cfg.test.every_epochs and end_of_epoch and (epoch + 1) % cfg.test.every_epochs == 0
                        and step < last_step):
                    if dist_info.is_main:
                        ev = evaluate_model(model, cfg, test_list, device, amp, run_dir, f"eval-epoch{epoch + 1}", log)
                        metrics.log({"step": step, "epoch": epoch, **{f"val_{k}": v for k, v in ev.items()}})
                        evals.append({"step": step, **ev})
                        model.train()
                    if dist_info.enabled:
                        torch.distributed.barrier()
                if step >= last_step:
                    break
            else:
                epoch += 1
                micro_pos = 0
                continue
            break
    finally:
        stop.__exit__(None, None, None)
        if batches is not None:
            batches.close()

    progress.close()
    final = None
    if test_list and dist_info.is_main and not interrupted:
        final = evaluate_model(model, cfg, test_list, device, amp, run_dir, "eval", log)
        metrics.log({"step": step, "epoch": epoch, **{f"val_{k}": v for k, v in final.items()}})
    metrics.close()
    if hasattr(data, "close"):
        data.close()
    ranks_identical = None
    if dist_info.enabled:
        ranks_identical = D.weights_identical_across_ranks(model, dist_info, device)
        log(f"weights identical across {world} ranks: {ranks_identical}")
        D.cleanup_distributed()
    return {"ranks_identical": ranks_identical, "run_dir": str(run_dir), "checkpoint": str(last_ckpt) if last_ckpt else None,
            "metrics": str(metrics.jsonl_path), "steps": step, "skipped_steps": guard.total_skipped(),
            "first": first_record, "last": last_record,
            "evals": evals, "final_eval": final, "interrupted": interrupted}


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mam2_fast.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML config (configs/finetune_*.yaml); omitted: the CPU demo")
    p.add_argument("--init", help="shorthand for init=... (checkpoint, run folder or .safetensors; 'none': random)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a fine-tuning checkpoint, or (no value) the latest in train.output_dir")
    p.add_argument("--output-dir", help="shorthand for train.output_dir=...")
    p.add_argument("--max-steps", type=int, help="shorthand for train.max_steps=...")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run's files in train.output_dir (shorthand for train.overwrite=true)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=1e-3 aug.mixup=0")
    args = p.parse_intermixed_args(argv)  # overrides may come before and after options
    return resume_value_as_override(args)


def resolve_config(args: argparse.Namespace) -> FinetuneConfig:
    overrides = list(args.overrides)
    if args.init is not None:
        overrides.append("init=null" if args.init.lower() in ("none", "null", "random") else f"init={args.init}")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if getattr(args, "overwrite", False):
        overrides.append("train.overwrite=true")
    if args.config:
        return load_finetune_config(args.config, overrides)
    return finetune_config_from_dict(_deep_merge(demo_config_dict(), parse_overrides(overrides)))


def format_summary(summary: dict) -> str:
    lines = [f"done: {summary['steps']} steps"]
    f, l = summary.get("first"), summary.get("last")
    if f and l:
        lines.append(f"loss {f['loss']:.4f} -> {l['loss']:.4f}, train acc {f['train_acc']:.3f} -> {l['train_acc']:.3f}")
    if summary.get("final_eval"):
        e = summary["final_eval"]
        lines.append(f"eval: top-1 {e['top1']:.2f}%  top-5 {e['top5']:.2f}%  mean class acc {e['mean_class_acc']:.2f}%"
                     f"  ({e['num_videos']} videos)")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    lines.append(f"metrics:    {summary['metrics']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        summary = train(cfg, resume=args.resume, log=lambda s: print(f"[mam2_fast] {s}", flush=True))
    except WeightsError as e:
        print(f"weights error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary), flush=True)
    from mam2_fast.train.distributed import EXIT_SIGTERM
    return EXIT_SIGTERM if summary.get("interrupted") else 0   # stopped by SIGTERM, checkpoint written


if __name__ == "__main__":
    from mam2_fast.train.distributed import run_cli
    run_cli(main)   # a torchrun worker leaves without interpreter teardown (see exit_worker)
