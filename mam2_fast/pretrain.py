"""MAM^2 pre-training: ``python -m mam2_fast.pretrain [--config FILE] [key=value ...]``.

With no arguments it runs the CPU demo: builds a small procedural video dataset (real video
files + a VideoMAE list file) in a cache folder, fits the k-means demo tokenizer, trains the
tiny model for a few minutes and prints where the checkpoint and metrics are.

The loop reads top to bottom: config -> device -> data -> tokenizer -> model -> optimizer ->
(resume) -> steps (mask, targets, forward, backward, step, log, checkpoint).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from mam2_fast.data.prefetch import Prefetcher, auto_depth
from mam2_fast.config import Config, ConfigError, config_from_dict, load_config, parse_overrides, _deep_merge
from mam2_fast.masking import MaskGenerator, MaskInfo
from mam2_fast.models.mam2 import build_model
from mam2_fast.targets.tokenizer import build_tokenizer
from mam2_fast.train import accel
from mam2_fast.train.checkpoint import (find_resumable, load_checkpoint, prepare_run_dir, rng_state, save_checkpoint,
                                        set_rng_state)
from mam2_fast.train.metrics import MetricsLogger, Progress
from mam2_fast.train.collapse import CollapseWatch, FeatureTap, collapse_stats, encoder_output_module
from mam2_fast.train.optim import NonFiniteGuard, build_optimizer, lr_at, lr_batch, scaled_lr, scaled_min_lr, set_lr

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


def resume_value_as_override(args: argparse.Namespace) -> argparse.Namespace:
    """``--resume key.sub=value`` (no checkpoint path given, an override right after it):
    resume from the latest checkpoint and keep the override, instead of reading it as a path."""
    r = args.resume
    if r and r != "auto" and re.match(r"^[A-Za-z_]\w*(\.\w+)+=", r) and not os.path.exists(r):
        args.overrides = [r, *args.overrides]
        args.resume = "auto"
    return args


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mam2_fast.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML config (configs/*.yaml); omitted: the CPU demo")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint file, or (no value) the latest in train.output_dir")
    p.add_argument("--output-dir", help="shorthand for train.output_dir=...")
    p.add_argument("--max-steps", type=int, help="shorthand for train.max_steps=...")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run's files in train.output_dir (shorthand for train.overwrite=true)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.depth=4 mask.ratio=0.9")
    args = p.parse_intermixed_args(argv)  # overrides may come before and after options
    return resume_value_as_override(args)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if getattr(args, "overwrite", False):
        overrides.append("train.overwrite=true")
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


# ----------------------------------------------------------------------------------------
# device and precision
# ----------------------------------------------------------------------------------------
def select_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not accel.cuda_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
    if want == "auto":
        return torch.device("cuda" if accel.cuda_available() else "cpu")
    return torch.device(want)   # also the stand-in "meta" (dry runs, see mam2_fast.train.accel)


def autocast_for(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "auto":
        if accel.is_gpu(device) and accel.bf16_supported(device):
            return accel.autocast(device, torch.bfloat16)
        return contextlib.nullcontext()  # CPU: fp32 unless bf16 is asked for
    return accel.autocast(device, torch.bfloat16)


def choose_kernels(model: torch.nn.Module, requested: str, device: torch.device, precision: str,
                   batch_size: int, log, mask_kind: Optional[str] = None, mask_ratio: float = 0.0) -> str:
    """The start-of-run kernel check (``kernels/selfcheck.py``) at the run's dtype and launch
    shapes; sets and returns the model's backend (ops that fail run their reference)."""
    from mam2_fast.kernels.launch_plan import RunShapes
    from mam2_fast.kernels.selfcheck import resolve_backend

    run_dtype = torch.bfloat16 if (precision == "bf16" or (
        precision == "auto" and accel.is_gpu(device) and accel.bf16_supported(device))) else torch.float32
    shapes = RunShapes.of_model(model, batch_size, mask_kind, mask_ratio)
    backend = resolve_backend(requested, device, run_dtype, log, shapes)
    model.set_kernel_backend(backend)
    return backend


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


class StopRequest:
    """SIGTERM sets a flag; the loop checkpoints at the next step boundary and exits (SIGINT
    keeps Python's default: KeyboardInterrupt, no checkpoint)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        import signal

        def handler(signum, frame):  # noqa: ARG001
            self.requested = True

        for sig in (signal.SIGTERM,):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        import signal
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ----------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------
def train(cfg: Config, data=None, resume: Optional[str] = None, log=print) -> dict:
    """Run pre-training; returns a summary dict (paths, first/last losses, steps).

    Under ``torchrun`` each process trains one shard of every global batch (DDP or FSDP2);
    metrics, progress and checkpoint files come from rank 0.
    """
    from mam2_fast.models.mam2 import DividedBlock, RegressorBlock
    from mam2_fast.train import distributed as D

    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = select_device(cfg)
    dist_info = D.init_distributed(device.type)
    rank, world = dist_info.rank, dist_info.world_size
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    main_log = log if dist_info.is_main else (lambda s: None)
    run_dir = Path(cfg.train.output_dir).expanduser()

    # -- resume: find the checkpoint first (its tokenizer replaces fitting) -----------------
    ckpt = None
    if resume:
        found = find_resumable(run_dir, warn=main_log) if resume == "auto" else (Path(resume), load_checkpoint(resume))
        if found is None:
            main_log(f"--resume: no checkpoint in {run_dir}, starting fresh")
        else:
            path, ckpt = found
            main_log(f"resuming from {path} (step {ckpt['step']})")
    # another run's files are never overwritten (unless train.overwrite); stale .tmp files go
    prepare_run_dir(run_dir, resuming=bool(resume), overwrite=cfg.train.overwrite, is_main=dist_info.is_main,
                    log_fn=main_log)

    # -- data --------------------------------------------------------------------------------
    fit_data = lambda: data  # noqa: E731
    owns_data = data is None
    if data is None:
        from mam2_fast.data import build_pretrain_data, make_demo_dataset

        if cfg.data.demo and cfg.data.list_file is None:
            root = Path(os.path.expanduser(cfg.data.demo_dir))
            if dist_info.is_main:
                list_file = make_demo_dataset(root, num_videos=cfg.data.demo_num_videos, seed=0)
            if dist_info.enabled:
                import torch.distributed as tdist
                tdist.barrier()
            list_file = make_demo_dataset(root, num_videos=cfg.data.demo_num_videos, seed=0)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, list_file=str(list_file)))
            main_log(f"demo dataset: {list_file}")
        data = build_pretrain_data(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                   rank=rank, world_size=world, device=device)
        fit_data = lambda: data if world == 1 else build_pretrain_data(  # noqa: E731
            cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed, rank=0, world_size=1, device=device)
    num_sample = cfg.data.num_sample if cfg.train.batch_size % cfg.data.num_sample == 0 else 1

    # -- tokenizer and model ---------------------------------------------------------------
    tokenizer = None
    if cfg.model.arch == "mam2" and cfg.model.use_appearance and cfg.model.appearance_target == "tokens":
        if ckpt is not None and ckpt.get("tokenizer") is not None:
            tokenizer = build_tokenizer(cfg.tokenizer, cfg.model.patch_size)
            tokenizer.load_state_dict(ckpt["tokenizer"])
            tokenizer = tokenizer.to(device).eval()
        else:
            tokenizer = prepare_tokenizer(cfg, fit_data, device, dist_info, main_log)
    if cfg.model.arch == "videomae":
        model = build_baseline(cfg).to(device)
    else:
        model = build_model(cfg.model, vocab_size=tokenizer.vocab_size if tokenizer is not None else None,
                            pixel_mean=tuple(cfg.data.mean), pixel_std=tuple(cfg.data.std)).to(device)
    if cfg.model.kernels != "reference" and hasattr(model, "set_kernel_backend"):
        choose_kernels(model, cfg.model.kernels, device, cfg.train.precision, cfg.train.batch_size, main_log,
                       cfg.mask.kind, cfg.mask.ratio)
    n_params = sum(p.numel() for p in model.parameters())
    main_log(f"model: {cfg.model.preset} encoder, {n_params / 1e6:.2f}M parameters, device {device}, "
             f"{world} process(es){' (' + cfg.train.parallel + ')' if dist_info.enabled else ''}")
    flow_target = None
    if cfg.model.arch == "mam2" and cfg.model.use_motion and cfg.model.motion_target == "flow":
        from mam2_fast.targets.flow import FlowTarget
        flow_target = FlowTarget(cfg.model.patch_size, weights_path=cfg.model.flow_weights,
                                 variant=cfg.model.flow_variant, num_flow_updates=cfg.model.flow_updates,
                                 flow_scale=cfg.model.flow_scale).to(device).eval()
    clip_order = cfg.model.arch == "mam2" and cfg.model.use_motion and cfg.model.motion_target == "clip_order"
    if cfg.model.arch == "videomae":
        masker = model.mask_generator()          # tube over the T / tubelet temporal slices
    else:
        masker = MaskGenerator(cfg.mask.kind, cfg.mask.ratio, cfg.model.num_frames, model.grid,
                               cfg.mask.cube_min_block, cfg.mask.cube_max_aspect)

    # -- optimizer and schedule --------------------------------------------------------------
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
    # micro-batches used per epoch: whole optimizer steps only (a remainder is dropped, like
    # drop_last, so no gradient leaks into the next epoch); an epoch shorter than one step
    # lets a step span epochs
    epoch_micro = steps_per_epoch * accum if data.steps_per_epoch >= accum else data.steps_per_epoch
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    last_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps

    from mam2_fast.models import videomae
    wrapped = D.wrap_model(model, dist_info, cfg.train.parallel, device,
                           (DividedBlock, RegressorBlock, videomae.Block))
    optimizer = build_optimizer(wrapped, cfg.optim, peak_lr, device)
    step, epoch, micro_pos = 0, 0, 0
    if ckpt is not None:
        D.load_full_state(wrapped, optimizer, ckpt["model"], ckpt["optimizer"])
        step, epoch = ckpt["step"], ckpt["epoch"]
        # data position: clips of this epoch already consumed by all ranks together
        done = ckpt.get("samples_in_epoch", ckpt.get("micro_in_epoch", 0) * cfg.train.batch_size)
        per_micro = cfg.train.batch_size * world
        micro_pos = done // per_micro
        if done % per_micro:
            main_log(f"resume: {done} clips done this epoch is not a multiple of {per_micro} "
                     f"(batch x world); restarting at {micro_pos * per_micro}")
        if ckpt.get("world_size", 1) == world:
            set_rng_state(ckpt["rng"])
    step_model = torch.compile(wrapped, mode=cfg.train.compile_mode) if cfg.train.compile else wrapped

    run_dir.mkdir(parents=True, exist_ok=True)
    if dist_info.is_main:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if tokenizer is not None and ckpt is None:
            torch.save(tokenizer.state_dict(), run_dir / "tokenizer.pt")
    metrics = MetricsLogger(run_dir, tensorboard=cfg.train.tensorboard, enabled=dist_info.is_main)
    progress = Progress(last_step, start=step, enabled=cfg.train.progress and dist_info.is_main)
    main_log(f"training {last_step - step} steps ({steps_per_epoch}/epoch, effective batch {effective_batch}"
             f"{f' = {cfg.train.batch_size} x {accum} accum x {world} ranks' if accum * world > 1 else ''}, "
             f"peak lr {peak_lr:.2e}) -> {run_dir}")

    def save() -> Path | None:
        model_sd, optim_sd = D.full_state(wrapped, optimizer)   # collective under DDP/FSDP
        path = None
        if dist_info.is_main:
            ep, pos = (epoch + 1, 0) if micro_pos >= epoch_micro else (epoch, micro_pos)
            state = {"model": model_sd, "optimizer": optim_sd,
                     "tokenizer": tokenizer.state_dict() if tokenizer is not None else None,
                     "step": step, "epoch": ep, "micro_in_epoch": pos,
                     "samples_in_epoch": pos * cfg.train.batch_size * world, "world_size": world,
                     "rng": rng_state(), "config": cfg.to_dict(),
                     "schedule": {"peak_lr": peak_lr, "total_steps": total_steps, "warmup_steps": warmup_steps}}
            path = save_checkpoint(run_dir, step, state, cfg.train.keep_last)
        return path

    guard = NonFiniteGuard(optimizer, (p for p in model.parameters() if p.requires_grad), cfg.optim.clip_grad,
                           cfg.train.max_nonfinite, device)
    sums: dict = {}
    count, clips, t_log = 0, 0, time.time()
    first_record: Optional[dict] = None
    last_record: Optional[dict] = None
    last_ckpt: Optional[Path] = None
    interrupted = False
    model.train()
    # collapse monitor: the encoder's output on the visible tokens of each log step (train/collapse.py);
    # off under torch.compile (a hook armed per step would re-trace the graph)
    tap_at = encoder_output_module(model) if dist_info.is_main and not cfg.train.compile else None
    feature_tap = FeatureTap(tap_at) if tap_at is not None else None
    collapse_watch = CollapseWatch()
    amp = autocast_for(device, cfg.train.precision)
    mean, std = cfg.data.mean, cfg.data.std
    norm_mean = torch.tensor(mean, device=device).view(1, 1, -1, 1, 1)   # for denormalize, made once
    norm_std = torch.tensor(std, device=device).view(1, 1, -1, 1, 1)
    fsdp_sync = dist_info.enabled and hasattr(wrapped, "set_requires_gradient_sync")   # FSDP2
    graphs = cfg.train.compile and cfg.train.compile_mode == "reduce-overhead" and device.type == "cuda"
    prefetch_depth = auto_depth(cfg.train.prefetch, device)   # -1: 1 on CUDA, 0 on CPU

    def epoch_batches(ep: int, start: int):
        """``(pos, batch, masks)`` of epoch ``ep`` from micro-batch ``start`` up to ``epoch_micro``;
        runs on the prefetch thread (decode polling, upload, augmentation, masks)."""
        if start >= epoch_micro:
            return
        it = data.iter_epoch(ep, start_step=start)
        try:
            for pos, batch in it:
                info = make_masks(masker, batch["clip"].shape[0], num_sample, cfg.train.seed, ep, pos,
                                  rank, world).to(device)              # host RNG, non-blocking upload
                yield pos, batch, info
                if pos + 1 >= epoch_micro:
                    break
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    micro = 0   # micro-batches accumulated towards the next optimizer step
    batches: Optional[Prefetcher] = None
    try:
        with StopRequest() as stop:
            while step < last_step:
                batches = Prefetcher(epoch_batches(epoch, micro_pos), device, depth=prefetch_depth)
                for pos, batch, info in batches:
                    clip = batch["clip"].to(device, non_blocking=True)       # [B, T, C, H, W]
                    codes = None
                    if tokenizer is not None:
                        with torch.inference_mode():
                            pixels = (clip.float() * norm_std + norm_mean).clamp_(0, 1)
                            codes = tokenizer.tokenize(pixels)                # [B, T, h, w]
                        codes = codes.flatten(2).clone()                      # [B, T, N]
                    extra = {}
                    if flow_target is not None:
                        with torch.inference_mode():
                            pixels = (clip.float() * norm_std + norm_mean).clamp_(0, 1)
                            flow = flow_target(pixels)                        # [B, T, N, P*P*2]
                        extra["motion_target"] = flow.clone()
                    if clip_order:
                        extra["order_labels"] = make_order_labels(info, num_sample, cfg.train.seed, epoch, pos,
                                                                  rank, world).to(device, non_blocking=True)
                    last_micro = micro + 1 == accum
                    sync_ctx = contextlib.nullcontext()
                    if fsdp_sync:            # FSDP2: reduce-scatter on the last micro-batch only
                        wrapped.set_requires_gradient_sync(last_micro)
                    elif dist_info.enabled and not last_micro and hasattr(wrapped, "no_sync"):
                        sync_ctx = wrapped.no_sync()                          # DDP
                    if graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    if feature_tap is not None and last_micro and (
                            (step + 1) % cfg.train.log_every == 0 or step + 1 == last_step):
                        feature_tap.arm()                             # the step that logs: keep its features
                    with sync_ctx:
                        with amp:
                            out = step_model(clip, info, **({"codes": codes} if codes is not None else {}), **extra)
                        (out["loss"] / accum).backward()
                    ok = guard.micro(out["loss"])     # the logged means leave non-finite ones out
                    for k in LOSS_KEYS:
                        if k in out:
                            v = out[k].detach().float()
                            sums[k] = sums.get(k, 0.0) + torch.where(ok, v, 0.0)
                    count += 1
                    clips += clip.shape[0]
                    micro_pos = pos + 1
                    micro += 1
                    if micro < accum:
                        continue
                    micro = 0

                    # -- optimizer step (no host sync: a non-finite step is skipped on the device) ----
                    lr = lr_at(step, total_steps, warmup_steps, peak_lr, min_lr)
                    set_lr(optimizer, lr)
                    gnorm = guard.step()
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + torch.nan_to_num(gnorm.detach().float(), 0.0)
                    step += 1

                    if step % cfg.train.log_every == 0 or step == last_step:
                        dt = time.time() - t_log
                        n_opt = max(1, count // accum)
                        n_ok, n_skipped, _, streak_error = guard.end_log_window(step, last_ckpt)
                        rec = {"step": step, "epoch": epoch, "lr": lr,
                               **{k: accel.host_float(v) / (n_opt if k == "grad_norm" else n_ok) if n_ok
                                  else float("nan")
                                  for k, v in sums.items()},   # a window without a finite loss: NaN
                               "clips_per_s": clips * world / max(dt, 1e-9), "skipped_steps": n_skipped,
                               **{f"data_{k}": v for k, v in data.stats().items()}}
                        feats = feature_tap.take() if feature_tap is not None else None
                        if feats is not None and not feats.is_meta and bool(torch.isfinite(feats).all()):
                            rec.update(collapse_stats(feats))       # feat_std, feat_rank (not of a NaN step)
                            for k in ("feat_std", "feat_rank"):
                                warning = collapse_watch.update(k, rec[k])
                                if warning:
                                    main_log(f"warning: step {step}: {warning}")
                        metrics.log(rec)
                        first_record = first_record or rec
                        last_record = rec
                        text = " ".join(f"{k.replace('loss_', '')} {rec[k]:.4f}" for k in LOSS_KEYS if k in rec)
                        if "feat_std" in rec:
                            text += f" | feat std {rec['feat_std']:.3f} rank {rec['feat_rank']:.1f}"
                        progress.update(step, text, rec["clips_per_s"])
                        sums, count, clips, t_log = {}, 0, 0, time.time()
                        if streak_error is not None:
                            progress.close()
                            raise streak_error
                    want_stop = stop.requested
                    if dist_info.enabled and (step % cfg.train.stop_check_every == 0 or step == last_step):
                        want_stop = D.all_ranks_agree(want_stop, dist_info, device)
                    elif dist_info.enabled:
                        want_stop = False
                    if step % cfg.train.save_every == 0 or step == last_step or want_stop:
                        last_ckpt = save() or last_ckpt
                    if want_stop:
                        main_log(f"stop requested (SIGTERM): checkpoint written at step {step}")
                        interrupted = True
                        break
                    if step >= last_step:
                        break
                else:
                    batches.close()
                    epoch += 1
                    micro_pos = 0
                    continue
                batches.close()
                break
    finally:  # an exception in the step: stop the prefetch thread (and decode polling)
        if batches is not None:
            batches.close()

    progress.close()
    metrics.close()
    if owns_data and hasattr(data, "close"):
        data.close()  # stop decode workers
    summary = {"run_dir": str(run_dir), "checkpoint": str(last_ckpt) if last_ckpt else None,
               "metrics": str(metrics.jsonl_path), "steps": step, "interrupted": interrupted,
               "skipped_steps": guard.total_skipped(),
               "first": first_record, "last": last_record, "data_stats": data.stats()}
    if dist_info.enabled:
        summary["ranks_identical"] = D.weights_identical_across_ranks(model, dist_info, device)
        main_log(f"weights identical across {world} ranks: {summary['ranks_identical']}")
        D.cleanup_distributed()
    return summary


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
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    summary = train(cfg, resume=args.resume, log=lambda s: print(f"[mam2_fast] {s}", flush=True))
    print(format_summary(summary), flush=True)
    from mam2_fast.train.distributed import EXIT_SIGTERM
    return EXIT_SIGTERM if summary.get("interrupted") else 0   # stopped by SIGTERM, checkpoint written


if __name__ == "__main__":
    from mam2_fast.train.distributed import run_cli
    run_cli(main)   # a torchrun worker leaves without interpreter teardown (see exit_worker)
