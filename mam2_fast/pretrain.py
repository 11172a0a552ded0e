"""MAM^2 pre-training: ``python -m mam2_fast.pretrain [--config FILE] [key=value ...]``.

With no arguments it runs the CPU demo: builds a small procedural video dataset (real video
files + a VideoMAE list file) in a cache folder, fits the k-means demo tokenizer, trains the
tiny model for a few minutes and prints where the checkpoint and metrics are.

:class:`PretrainTask` is what pre-training adds to the one training loop
(:mod:`mam2_fast.train.loop`): data -> tokenizer -> model -> targets and masks; per micro-batch
masks (prefetch thread), then targets (tokens / flow / clip order) and the model's losses.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import torch

from mam2_fast.config import Config, ConfigError, config_from_dict, load_config, parse_overrides, _deep_merge
from mam2_fast.masking import MaskGenerator, MaskInfo
from mam2_fast.models.mam2 import build_model
from mam2_fast.targets.tokenizer import build_tokenizer
from mam2_fast.train import accel, cli
from mam2_fast.train.backend import choose_kernels, select_kernels  # noqa: F401  (choose_kernels re-exported)
from mam2_fast.train import distributed as D
from mam2_fast.train.checkpoint import save_checkpoint
from mam2_fast.train.cli import resume_value_as_override  # noqa: F401  (re-exported)
from mam2_fast.train.collapse import CollapseWatch, FeatureTap, collapse_stats, encoder_output_module
from mam2_fast.train.loop import Micro, Run, Schedule, Task, run_task
from mam2_fast.train.loop import StopRequest, autocast_for, select_device  # noqa: F401  (re-exported)
from mam2_fast.train.optim import build_optimizer

LOSS_KEYS = ("loss", "loss_app", "loss_motion", "loss_align", "app_acc", "order_acc")

def demo_config_dict() -> dict:
    """The no-argument demo (kept equal to configs/demo.yaml by a test)."""
    return {
        "name": "demo",
        "model": {"preset": "tiny", "img_size": 96, "num_frames": 8, "patch_size": 16,
                  "embed_dim": 128, "depth": 3, "num_heads": 4,
                  "regressor_depth": 2, "appearance_depth": 2, "motion_depth": 1, "align_reduction": "mean"},
        "mask": {"kind": "tube", "ratio": 0.75},
        "tokenizer": {"kind": "kmeans", "vocab_size": 64, "kmeans_fit_clips": 48},
        "data": {"demo": True, "demo_num_videos": 256, "num_frames": 8, "sampling_stride": 4,
                 "input_size": 96, "num_sample": 2, "num_workers": 1},
        "optim": {"base_lr": 1.5e-4, "lr": 5e-4, "warmup_epochs": 1, "clip_grad": 1.0},
        "train": {"epochs": 15, "batch_size": 8, "output_dir": "runs/demo", "log_every": 10,
                  "save_every": 50, "device": "cpu", "precision": "fp32"},
    }


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = cli.training_parser(
        "python -m mam2_fast.pretrain", __doc__, config_help="YAML config (configs/*.yaml); omitted: the CPU demo",
        resume_help="resume from a checkpoint file, or (no value) the latest in train.output_dir",
        overrides_help="dotted overrides, e.g. model.depth=4 mask.ratio=0.9")
    return cli.parse(parser, argv)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides) + cli.shorthand_overrides(args)
    if args.config:
        return load_config(args.config, overrides)
    saved = saved_run_config(args)
    if saved is not None:  # --resume without --config: the run's own config.json
        return config_from_dict(_deep_merge(saved, parse_overrides(overrides)))
    data = _deep_merge(demo_config_dict(), parse_overrides(overrides))
    return config_from_dict(data)


def saved_run_config(args: argparse.Namespace) -> Optional[dict]:
    """config.json of the run being resumed (``--resume FILE`` or ``--resume --output-dir DIR``)."""
    if not args.resume:
        return None
    if args.resume != "auto":
        run_dir = Path(args.resume).expanduser().parent
    elif args.output_dir:
        run_dir = Path(args.output_dir).expanduser()
    else:
        return None
    path = run_dir / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_target_files(cfg: Config) -> None:
    """The weights the targets need, checked before anything is built: a VQGAN / DALL-E
    tokenizer needs ``tokenizer.checkpoint`` (an existing file), the flow target
    ``model.flow_weights``; a ``ConfigError`` names the key."""
    m, t = cfg.model, cfg.tokenizer
    tokens = m.arch == "mam2" and m.use_appearance and m.appearance_target == "tokens"
    if tokens and t.kind in ("vqgan", "dalle"):
        where = ("taming-transformers' VQGAN ImageNet f16 16384 'last.ckpt' (README: Appearance and motion "
                 "targets)" if t.kind == "vqgan" else "OpenAI's DALL-E 'encoder.pkl'")
        if not t.checkpoint:
            raise ConfigError(f"tokenizer.checkpoint: tokenizer.kind '{t.kind}' needs its weights: {where}")
        if not Path(t.checkpoint).expanduser().is_file():
            raise ConfigError(f"tokenizer.checkpoint: {t.checkpoint} is not a file")
        if t.checkpoint_config and not Path(t.checkpoint_config).expanduser().is_file():
            raise ConfigError(f"tokenizer.checkpoint_config: {t.checkpoint_config} is not a file")
    if m.use_motion and m.motion_target == "flow" and m.flow_weights and \
            not Path(m.flow_weights).expanduser().is_file():
        raise ConfigError(f"model.flow_weights: {m.flow_weights} is not a file")


# ----------------------------------------------------------------------------------------
# masks, baseline
# ----------------------------------------------------------------------------------------
def _generator(*key) -> torch.Generator:
    h = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))


def make_masks(masker: MaskGenerator, batch_size: int, num_sample: int, seed: int, epoch: int,
               step_in_epoch: int, rank: int, world: int) -> MaskInfo:
    """One mask per clip, keyed by the clip's *global* position in the epoch.

    With round-robin dealing of videos to ranks, video ``j`` of this rank's step is global
    video ``(step * videos_per_step + j) * world + rank``; keying masks by it (and the repeat
    index) makes them independent of the world size and of resuming.
    """
    vps = batch_size // num_sample
    infos = []
    for b in range(batch_size):
        j, rep = divmod(b, num_sample)
        g = (step_in_epoch * vps + j) * world + rank
        infos.append(masker(1, _generator(seed, "mask", epoch, g, rep)))
    return MaskInfo.cat(infos)


def build_baseline(cfg: Config):
    """The VideoMAE baseline (plain ViT, tubelet embedding, pixel target) from a Config."""
    from mam2_fast.models.videomae import build_videomae, videomae_config
    m = cfg.model
    over = {k: v for k, v in dict(embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                                  decoder_dim=m.decoder_dim, decoder_heads=m.decoder_heads).items() if v is not None}
    vcfg = videomae_config(m.preset, img_size=m.img_size, num_frames=m.num_frames, tubelet_size=m.tubelet_size,
                           patch_size=m.patch_size, in_chans=m.in_chans, mlp_ratio=m.mlp_ratio,
                           drop_path=m.drop_path, mask_ratio=cfg.mask.ratio, decoder_depth=m.appearance_depth,
                           mean=tuple(cfg.data.mean), std=tuple(cfg.data.std), **over)
    return build_videomae(vcfg)


def make_order_labels(info: MaskInfo, num_sample: int, seed: int, epoch: int, step_in_epoch: int,
                      rank: int, world: int) -> torch.Tensor:
    """Clip-order labels ``[B, Nm]`` keyed like the masks (world-size independent)."""
    from mam2_fast.models.mam2 import MAM2
    B, Nm = info.mask_idx.shape
    vps = B // num_sample
    rows = []
    for b in range(B):
        j, rep = divmod(b, num_sample)
        g = (step_in_epoch * vps + j) * world + rank
        rows.append(MAM2.draw_order_labels((1, Nm), torch.device("cpu"), _generator(seed, "order", epoch, g, rep)))
    return torch.cat(rows)


# ----------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------
def denormalize(clip: torch.Tensor, mean, std) -> torch.Tensor:
    """normalized ``[B, T, 3, H, W]`` -> pixels in [0, 1]."""
    m = torch.tensor(mean, device=clip.device, dtype=clip.dtype).view(1, 1, -1, 1, 1)
    s = torch.tensor(std, device=clip.device, dtype=clip.dtype).view(1, 1, -1, 1, 1)
    return (clip * s + m).clamp_(0, 1)


def prepare_tokenizer(cfg: Config, fit_data, device: torch.device, dist_info, log) -> torch.nn.Module:
    """Build the appearance tokenizer; the k-means one is fitted on rank 0 (on the first clips of
    the *global* epoch-0 order, so every world size fits the same codebook) and broadcast."""
    from mam2_fast.train.distributed import broadcast_module

    tok = build_tokenizer(cfg.tokenizer, cfg.model.patch_size)
    if cfg.tokenizer.kind == "kmeans":
        if dist_info.is_main:
            frames, n = [], 0
            for _, batch in fit_data().iter_epoch(0):
                frames.append(denormalize(accel.to_host(batch["clip"]).float(), cfg.data.mean, cfg.data.std))
                n += frames[-1].shape[0]
                if n >= cfg.tokenizer.kmeans_fit_clips:
                    break
            t0 = time.time()
            tok.fit(torch.cat(frames)[: cfg.tokenizer.kmeans_fit_clips], seed=cfg.train.seed)
            log(f"fitted k-means tokenizer ({tok.vocab_size} codes) on {min(n, cfg.tokenizer.kmeans_fit_clips)} "
                f"clips in {time.time() - t0:.1f}s")
        tok = tok.to(device)
        broadcast_module(tok, dist_info)
    return tok.to(device).eval()


# ----------------------------------------------------------------------------------------
# the pre-training task (the loop is mam2_fast/train/loop.py)
# ----------------------------------------------------------------------------------------
class PretrainTask(Task):
    """MAM^2 (or the VideoMAE baseline) on the loop: masks on the prefetch thread, targets and
    losses in ``step``, collapse measures in the log, the tokenizer in the checkpoint."""

    def __init__(self, data=None):
        self.data, self.owns_data = data, data is None

    # -- setup: data -> tokenizer -> model -> targets and masks -------------------------------
    def setup(self, run: Run) -> None:
        self.run, self.cfg = run, run.cfg
        self._check_target_files()            # before any data is decoded or built
        fit_data = self._build_data()
        self.tokenizer = self._build_tokenizer(fit_data)
        self.model = self._build_model()
        m = self.cfg.model
        self.flow_target = self._build_flow_target()
        self.clip_order = m.arch == "mam2" and m.use_motion and m.motion_target == "clip_order"
        if m.arch == "videomae":
            self.masker = self.model.mask_generator()          # tube over the T / tubelet temporal slices
        else:
            self.masker = MaskGenerator(self.cfg.mask.kind, self.cfg.mask.ratio, m.num_frames, self.model.grid,
                                        self.cfg.mask.cube_min_block, self.cfg.mask.cube_max_aspect)

    def _check_target_files(self) -> None:
        check_target_files(self.cfg)

    def _build_flow_target(self) -> Optional[torch.nn.Module]:
        """RAFT flow of the clip, ``[B, T, N, P*P*2]`` (the flow motion target only)."""
        m = self.cfg.model
        if not (m.arch == "mam2" and m.use_motion and m.motion_target == "flow"):
            return None
        from mam2_fast.targets.flow import FlowTarget
        return FlowTarget(m.patch_size, weights_path=m.flow_weights, variant=m.flow_variant,
                          num_flow_updates=m.flow_updates, flow_scale=m.flow_scale).to(self.run.device).eval()

    def _build_data(self):
        """The training data (the demo set is made first when asked for); returns what fits the
        k-means tokenizer: the first clips of the *global* epoch-0 order."""
        run, cfg = self.run, self.cfg
        fit_data = lambda: self.data  # noqa: E731
        if self.data is None:
            from mam2_fast.data import build_pretrain_data, make_demo_dataset

            if cfg.data.demo and cfg.data.list_file is None:
                root = Path(os.path.expanduser(cfg.data.demo_dir))
                if run.is_main:
                    make_demo_dataset(root, num_videos=cfg.data.demo_num_videos, seed=0)
                if run.dist.enabled:
                    import torch.distributed as tdist
                    tdist.barrier()
                list_file = make_demo_dataset(root, num_videos=cfg.data.demo_num_videos, seed=0)
                cfg = self.cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, list_file=str(list_file)))
                run.log(f"demo dataset: {list_file}")
            self.data = build_pretrain_data(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                            rank=run.rank, world_size=run.world, device=run.device)
            fit_data = lambda: self.data if run.world == 1 else build_pretrain_data(  # noqa: E731
                cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed, rank=0, world_size=1,
                device=run.device)
        self.num_sample = cfg.data.num_sample if cfg.train.batch_size % cfg.data.num_sample == 0 else 1
        return fit_data

    def _build_tokenizer(self, fit_data) -> Optional[torch.nn.Module]:
        """The appearance tokenizer (token targets only): the resumed one, else fitted."""
        cfg, run = self.cfg, self.run
        if not (cfg.model.arch == "mam2" and cfg.model.use_appearance and cfg.model.appearance_target == "tokens"):
            return None
        if run.ckpt is not None and run.ckpt.get("tokenizer") is not None:
            tokenizer = build_tokenizer(cfg.tokenizer, cfg.model.patch_size)
            tokenizer.load_state_dict(run.ckpt["tokenizer"])
            return tokenizer.to(run.device).eval()
        return prepare_tokenizer(cfg, fit_data, run.device, run.dist, run.log)

    def _build_model(self) -> torch.nn.Module:
        cfg, run = self.cfg, self.run
        if cfg.model.arch == "videomae":
            model = build_baseline(cfg).to(run.device)
        else:
            vocab = self.tokenizer.vocab_size if self.tokenizer is not None else None
            model = build_model(cfg.model, vocab_size=vocab, pixel_mean=tuple(cfg.data.mean),
                                pixel_std=tuple(cfg.data.std)).to(run.device)
        select_kernels(model, cfg, run, cfg.mask.kind, cfg.mask.ratio)
        n_params = sum(p.numel() for p in model.parameters())
        run.log(f"model: {cfg.model.preset} encoder, {n_params / 1e6:.2f}M parameters, device {run.device}, "
                f"{run.world} process(es){' (' + cfg.train.parallel + ')' if run.dist.enabled else ''}")
        return model

    def build_optimizer(self, schedule: Schedule) -> None:
        from mam2_fast.models import videomae
        from mam2_fast.models.mam2 import DividedBlock, RegressorBlock
        run = self.run
        self.wrapped = D.wrap_model(self.model, run.dist, self.cfg.train.parallel, run.device,
                                    (DividedBlock, RegressorBlock, videomae.Block))
        self.optimizer = build_optimizer(self.wrapped, self.cfg.optim, schedule.peak_lr, run.device)

    # -- checkpoint ---------------------------------------------------------------------------
    def load_state(self, ckpt: dict) -> None:
        D.load_full_state(self.wrapped, self.optimizer, ckpt["model"], ckpt["optimizer"])

    def checkpoint_state(self) -> dict:
        model_sd, optim_sd = D.full_state(self.wrapped, self.optimizer)   # collective under DDP/FSDP
        return {"model": model_sd, "optimizer": optim_sd,
                "tokenizer": self.tokenizer.state_dict() if self.tokenizer is not None else None}

    def write_checkpoint(self, run_dir: Path, step: int, state: dict, keep_last: int) -> Path:
        return save_checkpoint(run_dir, step, state, keep_last)   # this module's name (tests replace it)

    # -- steps --------------------------------------------------------------------------------
    def start(self, loop) -> None:
        run = self.run
        if run.is_main and self.tokenizer is not None and run.ckpt is None:
            torch.save(self.tokenizer.state_dict(), run.run_dir / "tokenizer.pt")
        self.init_steps()

    def init_steps(self) -> None:
        """What ``step`` needs: the (compiled) model, the collapse tap, autocast, the pixel
        statistics (``start`` calls it; so does the profiler, which runs no loop)."""
        run, cfg = self.run, self.cfg
        self.step_model = torch.compile(self.wrapped, mode=cfg.train.compile_mode) if cfg.train.compile else self.wrapped
        # collapse monitor: the encoder's output on the visible tokens of each log step (train/collapse.py);
        # off under torch.compile (a hook armed per step would re-trace the graph)
        tap_at = encoder_output_module(self.model) if run.is_main and not cfg.train.compile else None
        self.feature_tap = FeatureTap(tap_at) if tap_at is not None else None
        self.collapse_watch = CollapseWatch()
        self.amp = autocast_for(run.device, cfg.train.precision)
        self.norm_mean = torch.tensor(cfg.data.mean, device=run.device).view(1, 1, -1, 1, 1)   # for denormalize
        self.norm_std = torch.tensor(cfg.data.std, device=run.device).view(1, 1, -1, 1, 1)
        self.graphs = cfg.train.compile and cfg.train.compile_mode == "reduce-overhead" and run.device.type == "cuda"

    def prepare(self, batch: dict, epoch: int, pos: int) -> MaskInfo:
        """The micro-batch's masks (host RNG keyed by the clips' global position, non-blocking upload)."""
        run = self.run
        return make_masks(self.masker, batch["clip"].shape[0], self.num_sample, self.cfg.train.seed, epoch, pos,
                          run.rank, run.world).to(run.device)

    def _pixels(self, clip: torch.Tensor) -> torch.Tensor:
        return (clip.float() * self.norm_std + self.norm_mean).clamp_(0, 1)

    def targets(self, clip: torch.Tensor, info: MaskInfo, micro: Micro) -> dict:
        """What the model is trained to predict besides the pixels it sees: tokenizer codes,
        flow, clip-order labels (keyed like the masks)."""
        run, extra = self.run, {}
        if self.tokenizer is not None:
            with torch.inference_mode():
                codes = self.tokenizer.tokenize(self._pixels(clip))            # [B, T, h, w]
            extra["codes"] = codes.flatten(2).clone()                           # [B, T, N]
        if self.flow_target is not None:
            with torch.inference_mode():
                flow = self.flow_target(self._pixels(clip))                     # [B, T, N, P*P*2]
            extra["motion_target"] = flow.clone()
        if self.clip_order:
            extra["order_labels"] = make_order_labels(info, self.num_sample, self.cfg.train.seed, micro.epoch,
                                                      micro.pos, run.rank, run.world).to(run.device, non_blocking=True)
        return extra

    def step(self, batch: dict, info: MaskInfo, micro: Micro) -> dict:
        clip = batch["clip"].to(self.run.device, non_blocking=True)       # [B, T, C, H, W]
        extra = self.targets(clip, info, micro)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.feature_tap is not None and micro.logs:
            self.feature_tap.arm()                             # the step that logs: keep its features
        with self.amp:
            out = self.step_model(clip, info, **extra)
        return {k: out[k] for k in LOSS_KEYS if k in out}

    def on_log(self, rec: dict) -> str:
        feats = self.feature_tap.take() if self.feature_tap is not None else None
        if feats is not None and not feats.is_meta and bool(torch.isfinite(feats).all()):
            rec.update(collapse_stats(feats))       # feat_std, feat_rank (not of a NaN step)
            for k in ("feat_std", "feat_rank"):
                warning = self.collapse_watch.update(k, rec[k])
                if warning:
                    self.run.log(f"warning: step {rec['step']}: {warning}")
        text = " ".join(f"{k.replace('loss_', '')} {rec[k]:.4f}" for k in LOSS_KEYS if k in rec)
        if "feat_std" in rec:
            text += f" | feat std {rec['feat_std']:.3f} rank {rec['feat_rank']:.1f}"
        return text

    def close(self) -> None:
        if self.owns_data and hasattr(self.data, "close"):
            self.data.close()  # stop decode workers


def train(cfg: Config, data=None, resume: Optional[str] = None, log=print) -> dict:
    """Run pre-training; returns a summary dict (paths, first/last losses, steps).

    Under ``torchrun`` each process trains one shard of every global batch (DDP or FSDP2);
    metrics, progress and checkpoint files come from rank 0.
    """
    return run_task(PretrainTask(data), cfg, resume, log)


def format_summary(summary: dict) -> str:
    lines = [f"done: {summary['steps']} steps"]
    first, last = summary.get("first"), summary.get("last")
    if first and last:
        lines.append(f"{'term':<12}{'first':>10}{'last':>10}")
        for k in LOSS_KEYS + ("feat_std", "feat_rank"):
            if k in first and k in last:
                lines.append(f"{k:<12}{first[k]:>10.4f}{last[k]:>10.4f}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    lines.append(f"metrics:    {summary['metrics']} (CSV beside it, TensorBoard in tb/)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    return cli.main(parse_args(argv), resolve_config, train, format_summary)


if __name__ == "__main__":
    from mam2_fast.train.distributed import run_cli
    run_cli(main)   # a torchrun worker leaves without interpreter teardown (see exit_worker)
