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

:class:`FinetuneTask` is what fine-tuning adds to the one training loop (:mod:`mam2_fast.train.loop`,
shared with pre-training: checkpoints, resume, accumulation, the non-finite guard, SIGTERM, progress
line, ``metrics.jsonl`` / CSV / TensorBoard): mixup and the soft-target loss in ``step``, evaluations
after epochs and at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mam2_fast.config import ConfigError, _deep_merge, parse_overrides
from mam2_fast.ft.config import FinetuneConfig, finetune_config_from_dict, load_finetune_config
from mam2_fast.ft.mixup import build_mixup, soft_target_cross_entropy
from mam2_fast.ft.weights import WeightsError, check_arch, load_encoder_into, read_encoder_weights
from mam2_fast.models.classifier import VideoClassifier, build_classifier, param_groups_layer_decay, set_scaled_lr
from mam2_fast.train import cli
from mam2_fast.train import distributed as D
from mam2_fast.train.backend import select_kernels
from mam2_fast.train.loop import Micro, Run, Schedule, Task, autocast_for, run_task

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


def evaluate_model(model, cfg: FinetuneConfig, test_list: str, device, amp, out_dir: Path, tag: str, log,
                   dist_info: Optional[D.DistInfo] = None) -> dict:
    """Multi-view evaluation of ``test_list``; under torchrun every rank scores its shard of the
    videos and the scores are merged (``evaluate.run_views``), rank 0 writes the report."""
    from mam2_fast.evaluate import classification_metrics, run_views, write_report
    from mam2_fast.ft.data import ViewData, class_names

    dist_info = dist_info or D.DistInfo()
    data = ViewData(cfg.data, test_list, cfg.test.num_clips, cfg.test.num_crops, cfg.test.sampling,
                    cfg.test.batch_size, device, shard=(dist_info.rank, dist_info.world_size))
    result = run_views(model, data, device, amp, gather=dist_info.enabled)
    model.train()
    metrics = classification_metrics(result["probs"], result["labels"], class_names(test_list, cfg.model.num_classes))
    if not dist_info.is_main:
        return {k: metrics[k] for k in ("top1", "top5", "mean_class_acc", "num_videos")}
    paths = write_report(result, metrics, out_dir / tag, {"list_file": test_list, "num_clips": cfg.test.num_clips,
                                                          "num_crops": cfg.test.num_crops}, records=data.records)
    log(f"eval ({tag}): top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% on {metrics['num_videos']} videos "
        f"({cfg.test.num_clips}x{cfg.test.num_crops} views) -> {paths['json']}")
    model.train()
    return {k: metrics[k] for k in ("top1", "top5", "mean_class_acc", "num_videos")}


BEST_CHECKPOINT = "checkpoint-best.pt"   # the model of the best evaluation (resume ignores it)


# ----------------------------------------------------------------------------------------
# the fine-tuning task (the loop is mam2_fast/train/loop.py)
# ----------------------------------------------------------------------------------------
class FinetuneTask(Task):
    """The classifier on the loop: mixup and the soft-target loss in ``step``, DDP only,
    layer-decayed lr, evaluations every ``test.every_epochs`` and at the end."""

    def __init__(self, data=None, test_list: Optional[str] = None):
        self.data, self.test_list = data, test_list
        self.evals: list = []
        self.best: Optional[dict] = None      # the best evaluation so far (checkpoint-best.pt)

    def check_checkpoint(self, path: Path, ckpt: dict) -> None:
        if ckpt.get("kind") != "finetune":
            raise WeightsError(f"{path}: not a fine-tuning checkpoint; pass pre-trained weights as init=")

    def setup(self, run: Run) -> None:
        self.run, cfg = run, run.cfg
        if self.data is None:
            cfg, found = resolve_data(cfg, run.log)
            self.test_list = self.test_list or found
            from mam2_fast.ft.data import FinetuneTrainData

            self.data = FinetuneTrainData(cfg.data, cfg.aug, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                          rank=run.rank, world_size=run.world, device=run.device)
        self.cfg = cfg
        check_list_labels(cfg, self.data, self.test_list)   # a label >= num_classes: an error naming its line, now
        if run.ckpt is not None:
            model = build_classifier(cfg.model)
            model.load_state_dict(run.ckpt["model"])
        else:
            model, _ = build_finetune_model(cfg, run.log)
        self.model = model.to(run.device)
        select_kernels(self.model, cfg, run)
        run.log(f"model: {cfg.model.preset} classifier, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                f"parameters, {cfg.model.num_classes} classes, device {run.device}")
        self.amp = autocast_for(run.device, cfg.train.precision)

    def build_optimizer(self, schedule: Schedule) -> None:
        self.optimizer = build_optimizer(self.model, self.cfg, self.run.device)
        if self.cfg.train.parallel == "fsdp" and self.run.dist.enabled:
            raise ConfigError("train.parallel: fine-tuning runs DDP under torchrun; 'fsdp' is for pre-training")
        self.wrapped = D.wrap_model(self.model, self.run.dist, "ddp", self.run.device)   # the raw model keeps the names
        self.mixup = build_mixup(self.cfg.aug, self.cfg.model.num_classes)

    def describe(self) -> str:
        return f", layer decay {self.cfg.optim.layer_decay}"

    def load_state(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])   # the model was loaded in setup
        self.best = ckpt.get("best_eval")

    def checkpoint_state(self) -> dict:
        return {"kind": "finetune", "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "init": self.cfg.init, "best_eval": self.best}

    def step(self, batch: dict, prepared, micro: Micro) -> dict:
        clip = batch["clip"].to(self.run.device, non_blocking=True)          # [B, T, C, H, W]
        label = batch["label"].to(self.run.device)                           # [B]
        rng = np.random.default_rng([self.cfg.train.seed, micro.step, micro.index, self.run.rank, 0x313])
        clip, soft, _ = self.mixup(clip, label, rng)                         # soft [B, K]
        with self.amp:
            logits = self.wrapped(clip)                                      # [B, K]
        loss = soft_target_cross_entropy(logits, soft)
        with torch.no_grad():
            acc = (logits.argmax(-1) == label).float().mean()
        return {"loss": loss, "train_acc": acc}

    def set_lr(self, lr: float) -> None:
        set_scaled_lr(self.optimizer, lr)   # times each group's layer-decay scale

    def on_log(self, rec: dict) -> str:
        return f"loss {rec['loss']:.4f} acc {rec['train_acc']:.3f} lr {rec['lr']:.2e}"

    def _evaluate(self, loop, tag: str) -> dict:
        """Every rank scores its shard; rank 0 logs, and keeps ``checkpoint-best.pt`` (the model
        with the best top-1 so far, with its evaluation) when this one beats the previous best."""
        run = self.run
        ev = evaluate_model(self.model, self.cfg, self.test_list, run.device, self.amp, run.run_dir, tag, run.log,
                            run.dist)
        loop.metrics.log({"step": loop.pos.step, "epoch": loop.pos.epoch, **{f"val_{k}": v for k, v in ev.items()}})
        if self.best is None or ev["top1"] > self.best["top1"]:
            self.best = {"step": loop.pos.step, "tag": tag, **ev}
            if run.is_main:
                self._write_best(loop)
        return ev

    def _write_best(self, loop) -> None:
        from mam2_fast.train.checkpoint import _atomic_write, checksum_path

        path = self.run.run_dir / BEST_CHECKPOINT
        state = {"kind": "finetune", "step": loop.pos.step, "model": self.model.state_dict(),
                 "config": self.cfg.to_dict(), "init": self.cfg.init, "eval": dict(self.best)}
        _atomic_write(path, lambda f: torch.save(state, f), sidecar=checksum_path(path))
        self.run.log(f"best top-1 so far ({self.best['top1']:.2f}%): {path}")

    def after_step(self, loop) -> None:
        """At the end of every ``test.every_epochs``-th epoch (but the last): evaluate, all ranks."""
        pos, every = loop.pos, self.cfg.test.every_epochs
        end_of_epoch = pos.micro_pos >= loop.schedule.epoch_micro
        if not (self.test_list and every and end_of_epoch and (pos.epoch + 1) % every == 0
                and pos.step < loop.schedule.last_step):
            return
        ev = self._evaluate(loop, f"eval-epoch{pos.epoch + 1}")
        self.evals.append({"step": pos.step, **ev})

    def finish(self, loop) -> dict:
        final = None
        if self.test_list and not loop.interrupted:
            final = self._evaluate(loop, "eval")
        return {"evals": self.evals, "final_eval": final if self.run.is_main else None, "best_eval": self.best}

    def close(self) -> None:
        if hasattr(self.data, "close"):
            self.data.close()


def train(cfg: FinetuneConfig, data=None, test_list: Optional[str] = None, resume: Optional[str] = None,
          log=print) -> dict:
    """Fine-tune; returns a summary (paths, first/last loss, final evaluation)."""
    return run_task(FinetuneTask(data, test_list), cfg, resume, log)


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = cli.training_parser(
        "python -m mam2_fast.finetune", __doc__,
        config_help="YAML config (configs/finetune_*.yaml); omitted: the CPU demo",
        resume_help="resume from a fine-tuning checkpoint, or (no value) the latest in train.output_dir",
        overrides_help="dotted overrides, e.g. optim.base_lr=1e-3 aug.mixup=0",
        extra=lambda p: p.add_argument(
            "--init", help="shorthand for init=... (checkpoint, run folder or .safetensors; 'none': random)"))
    return cli.parse(parser, argv)


def resolve_config(args: argparse.Namespace) -> FinetuneConfig:
    overrides = list(args.overrides)
    if args.init is not None:
        overrides.append("init=null" if args.init.lower() in ("none", "null", "random") else f"init={args.init}")
    overrides += cli.shorthand_overrides(args)
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
    return cli.main(parse_args(argv), resolve_config, train, format_summary,
                    user_errors=((WeightsError, "weights error"),))


if __name__ == "__main__":
    from mam2_fast.train.distributed import run_cli
    run_cli(main)   # a torchrun worker leaves without interpreter teardown (see exit_worker)
