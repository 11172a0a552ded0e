"""VideoMAE baseline through this engine vs the official VideoMAE model code, same process.

Ours: ``mam2_fast.models.videomae`` (SDPA attention, index gathers instead of boolean
indexing, no host syncs), eager and ``torch.compile``d. Official: ``modeling_pretrain.py``
of MCG-NJU/VideoMAE imported from a local checkout (``--videomae-repo PATH``; nothing of
it is copied here) with the target computation of its ``engine_for_pretraining.py``
(re-written with ``reshape``/``permute`` instead of einops, same arithmetic). If ``timm``
is not installed, a small stand-in module provides the three helpers the official files
import from it (``drop_path``, ``to_2tuple``, ``trunc_normal_``) and ``register_model``.

Both run ViT-B/16, 16 x 224, tubelet 2, tube mask 0.9, decoder 4 x 384, the same fused
AdamW (lr 1.5e-4 x B / 256, betas 0.9/0.95, wd 0.05), the same synthetic clips, under bf16
autocast (the official recipe uses fp16 + GradScaler; both get bf16 here so the comparison is
about the code, not the precision). Ours is timed through the training task's own step
(``mam2_fast.profile.MAM2Step``: the pre-training task's masks, forward and loss, the loop's
backward and guarded update, which also takes the gradient norm, as training does); the
official code has no task, so its side is a plain forward / backward / AdamW step. Before timing, the official weights are
loaded into ours (``strict=True``) and loss + gradients are compared on one batch (fp32).

Timing as in bench_step.py: warm-up, ``--repeats`` windows of ``--iters`` steps between
``cuda.synchronize`` calls, median window; MFU from ``mam2_fast.flops.videomae_step_flops``.

Without ``--videomae-repo`` the official side is skipped with a message. Without CUDA the
script prints a message and exits 0; ``--smoke`` runs tiny shapes on CPU (parity check +
one timed step per variant) to check the script itself.

    git clone https://github.com/MCG-NJU/VideoMAE /tmp/VideoMAE
    python benchmarks/bench_videomae.py --videomae-repo /tmp/VideoMAE --batch 32,64
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import itertools
import json
import statistics
import sys
import time
import types
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mam2_fast.flops import videomae_step_flops  # noqa: E402
from mam2_fast.models.videomae import (IMAGENET_MEAN, IMAGENET_STD, VideoMAE, tube_mask_generator,  # noqa: E402
                                       videomae_config)
from mam2_fast.profile import device_peak, sync, time_steps  # noqa: E402
from mam2_fast.train import accel  # noqa: E402


# ----------------------------------------------------------------------------------------
# loading the official code
# ----------------------------------------------------------------------------------------
def _install_timm_stub() -> None:
    """Minimal ``timm`` providing what modeling_finetune/modeling_pretrain import."""
    def drop_path(x, drop_prob: float = 0.0, training: bool = False):
        if drop_prob == 0.0 or not training:
            return x
        keep = 1 - drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x.div(keep) * mask

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)

    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.drop_path, layers.to_2tuple, layers.trunc_normal_ = drop_path, to_2tuple, trunc_normal_
    registry.register_model = lambda fn: fn
    timm.models, models.layers, models.registry = models, layers, registry
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                        "timm.models.registry": registry})


def load_official(repo: str):
    """Import ``modeling_pretrain`` from a VideoMAE checkout; returns the module."""
    path = Path(repo).expanduser().resolve()
    if not (path / "modeling_pretrain.py").is_file():
        raise FileNotFoundError(f"--videomae-repo {repo}: no modeling_pretrain.py there")
    try:
        importlib.import_module("timm.models.layers")
        importlib.import_module("timm.models.registry")
    except Exception:
        _install_timm_stub()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    for name in ("modeling_finetune", "modeling_pretrain"):
        sys.modules.pop(name, None)
    return importlib.import_module("modeling_pretrain")


def official_model(mod, cfg) -> nn.Module:
    return mod.PretrainVisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, encoder_embed_dim=cfg.embed_dim,
        encoder_depth=cfg.depth, encoder_num_heads=cfg.num_heads, encoder_num_classes=0,
        decoder_num_classes=cfg.tubelet_size * cfg.patch_size ** 2 * cfg.in_chans,
        decoder_embed_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_heads,
        mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        tubelet_size=cfg.tubelet_size, drop_path_rate=cfg.drop_path)


def official_loss(model: nn.Module, clip: torch.Tensor, bool_masked_pos: torch.Tensor, cfg) -> torch.Tensor:
    """engine_for_pretraining.train_one_epoch's target + loss (einops replaced by reshape)."""
    videos = clip.transpose(1, 2)  # [B, C, T, H, W], as the official loader gives
    with torch.no_grad():
        mean = torch.as_tensor(IMAGENET_MEAN, device=videos.device)[None, :, None, None, None]
        std = torch.as_tensor(IMAGENET_STD, device=videos.device)[None, :, None, None, None]
        unnorm = videos.float() * std + mean
        B, C, T, H, W = unnorm.shape
        p0, p = cfg.tubelet_size, cfg.patch_size
        # 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c'
        sq = unnorm.reshape(B, C, T // p0, p0, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
        sq = sq.reshape(B, -1, p0 * p * p, C)
        norm = (sq - sq.mean(dim=-2, keepdim=True)) / (sq.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
        patches = norm.reshape(B, norm.shape[1], -1)  # 'b n p c -> b n (p c)'
        labels = patches[bool_masked_pos].reshape(B, -1, patches.shape[-1])
    outputs = model(videos, bool_masked_pos)
    return nn.MSELoss()(input=outputs.float(), target=labels)


# ----------------------------------------------------------------------------------------
# parity and timing
# ----------------------------------------------------------------------------------------
def parity(mod, cfg, device, batch: int = 2) -> Dict[str, float]:
    """Official weights -> ours (strict); loss and grads on one fp32 batch (TF32 off)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _parity(mod, cfg, device, batch)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _parity(mod, cfg, device, batch: int) -> Dict[str, float]:
    torch.manual_seed(0)
    off = official_model(mod, cfg).to(device).float()
    ours = VideoMAE(cfg).to(device)
    missing = ours.load_state_dict(off.state_dict(), strict=True)
    clip = torch.randn(batch, cfg.num_frames, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    info = ours.mask_generator()(batch, torch.Generator().manual_seed(1)).to(device)
    bmp = info.mask.flatten(1)
    l_off = official_loss(off, clip, bmp, cfg)
    l_off.backward()
    l_ours = ours(clip, info)["loss"]
    l_ours.backward()
    go = dict(off.named_parameters())
    worst = 0.0
    for n, p in ours.named_parameters():
        g1, g2 = p.grad, go[n].grad
        worst = max(worst, float((g1 - g2).norm() / g2.norm().clamp_min(1e-30)))
    lo, lu = float(l_off.detach()), float(l_ours.detach())
    res = {"loss_official": lo, "loss_ours": lu, "loss_rel_err": abs(lo - lu) / abs(lo), "worst_grad_rel_err": worst}
    del off, ours
    return res


def make_optimizer(model: nn.Module, batch: int, device) -> torch.optim.Optimizer:
    """The official side's AdamW: our defaults (fused, lr 1.5e-4 x B / 256, betas 0.9/0.95, wd 0.05),
    as the training task builds it for our side."""
    from mam2_fast.config import OptimConfig
    from mam2_fast.train.optim import build_optimizer, scaled_lr

    oc = OptimConfig()
    return build_optimizer(model, oc, scaled_lr(oc, batch), device)


def task_config(vcfg, batch: int, device):
    """The pre-training Config (``model.arch=videomae``) whose task builds ``vcfg``'s model:
    bf16 autocast on the GPU (fp32 on CPU), default optimizer, synthetic data (none is read)."""
    from mam2_fast.config import config_from_dict

    model = {k: getattr(vcfg, k) for k in ("img_size", "num_frames", "tubelet_size", "patch_size", "in_chans",
                                            "embed_dim", "depth", "num_heads", "decoder_dim", "decoder_heads",
                                            "mlp_ratio", "drop_path")}
    return config_from_dict({
        "model": {"arch": "videomae", "preset": "base", "appearance_depth": vcfg.decoder_depth, **model},
        "mask": {"kind": "tube", "ratio": vcfg.mask_ratio},
        "data": {"demo": True, "num_frames": vcfg.num_frames, "input_size": vcfg.img_size, "num_sample": 1,
                 "mean": list(vcfg.mean), "std": list(vcfg.std)},
        "train": {"batch_size": batch, "precision": "bf16" if accel.is_gpu(device) else "fp32"},
    })


def our_step(vcfg, batch: int, clips: List[torch.Tensor], device, compile: bool):
    """Our side: the training task's own step (``mam2_fast.profile.MAM2Step``: PretrainTask's masks,
    forward and loss, the loop's backward and guarded AdamW update) on ``clips`` in turn. The
    official code has no task, so its side keeps the hand-written step in :func:`bench_variant`."""
    from mam2_fast.profile import MAM2Step

    runner = MAM2Step(task_config(vcfg, batch, device), device, compile="default" if compile else None,
                      split_alignment=False, log=lambda s: None)
    if runner.model.cfg != vcfg:
        raise ValueError(f"the task's VideoMAE config differs from the benchmark's: {runner.model.cfg} vs {vcfg}")
    batches = ({"clip": clips[i % len(clips)]} for i in itertools.count(1))
    return runner, lambda: runner.step(batches)


def bench_variant(variant: str, mod, cfg, batch: int, args, device) -> Dict:
    row = {"variant": variant, "batch": batch}
    model = opt = runner = None
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        clips = [torch.randn(batch, cfg.num_frames, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
                 for _ in range(2)]
        if variant == "official":
            model = official_model(mod, cfg).to(device).train()
            opt = make_optimizer(model, batch, device)
            masker = tube_mask_generator(cfg)
            amp = accel.autocast(device, torch.bfloat16, enabled=accel.is_gpu(device))
            it = [0]

            def step():
                it[0] += 1
                clip = clips[it[0] % 2]
                info = masker(batch, g).to(device)
                with amp:
                    loss = official_loss(model, clip, info.mask.flatten(1), cfg)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            runner, step = our_step(cfg, batch, clips, device, compile=variant == "ours+compile")

        accel.reset_peak_memory(device)
        warm = 1 if args.smoke else args.warmup + (3 if variant == "ours+compile" else 0)
        times = time_steps(step, device, warm, 1 if args.smoke else args.iters, 1 if args.smoke else args.repeats)
        s = statistics.median(times)
        sf = videomae_step_flops(cfg, batch)
        name, peak = device_peak(device, args.peak_tflops)
        row.update(ms=s * 1e3, spread_ms=(max(times) - min(times)) * 1e3, clips_s=batch / s,
                   tflops=sf.total / s / 1e12, mfu=(sf.total / s / 1e12 / peak) if peak else None,
                   max_gib=accel.max_memory_gib(device))
    except Exception as exc:
        row["error"] = "OOM" if accel.is_oom(exc) else f"{type(exc).__name__}: {str(exc)[:160]}"
    finally:
        del model, opt, runner
        gc.collect()
        accel.empty_cache()
    return row


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videomae-repo", help="local checkout of github.com/MCG-NJU/VideoMAE (official side)")
    p.add_argument("--preset", default="base", choices=("small", "base", "large"))
    p.add_argument("--batch", default="32", help="per-GPU batch sizes (default 32, the official recipe)")
    p.add_argument("--variants", default="official,ours,ours+compile")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny CPU shapes, to check the script")
    args = p.parse_args(argv)

    if not args.smoke and not accel.cuda_available():
        print("bench_videomae: no CUDA device here; nothing to measure (use --smoke to check the script on CPU).")
        return 0
    device = torch.device("cuda" if (accel.cuda_available() and not args.smoke) else "cpu")
    mod = None
    if args.videomae_repo:
        mod = load_official(args.videomae_repo)
    else:
        print("bench_videomae: no --videomae-repo given: the official VideoMAE side is skipped "
              "(git clone https://github.com/MCG-NJU/VideoMAE and pass its path).")
    if args.smoke:
        # the official PatchEmbed fixes num_frames=16, so keep 16 frames; shrink the rest
        cfg = videomae_config("base", img_size=32, embed_dim=64, depth=2, num_heads=2, decoder_dim=32,
                              decoder_depth=1, decoder_heads=2)
        batches = [2]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    else:
        cfg = videomae_config(args.preset)
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device {accel.device_name(device)}, torch {torch.__version__}", flush=True)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if mod is None:
        variants = [v for v in variants if v != "official"]
    if args.smoke:
        variants = [v for v in variants if v != "ours+compile"]

    out: Dict = {"parity": None, "rows": []}
    if mod is not None:
        out["parity"] = par = parity(mod, cfg, device)
        print(f"parity (official weights in ours, fp32): loss {par['loss_official']:.6f} vs {par['loss_ours']:.6f} "
              f"(rel {par['loss_rel_err']:.1e}), worst grad rel err {par['worst_grad_rel_err']:.1e}", flush=True)
    for b in batches:
        for v in variants:
            r = bench_variant(v, mod, cfg, b, args, device)
            out["rows"].append(r)
            msg = r.get("error") or f"{r['clips_s']:.2f} clips/s, {r['ms']:.1f} ms/step"
            print(f"  batch {b} {v}: {msg}", flush=True)

    hdr = f"{'batch':>6}  {'variant':<14}{'ms/step':>10}{'spread':>8}{'clips/s':>10}{'x official':>11}{'TFLOP/s':>10}{'MFU':>8}{'max GiB':>9}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    base = {r["batch"]: r.get("clips_s") for r in out["rows"] if r["variant"] == "official"}
    for r in out["rows"]:
        if "error" in r:
            print(f"{r['batch']:>6}  {r['variant']:<14}  {r['error']}")
            continue
        b = base.get(r["batch"])
        ratio = f"{r['clips_s'] / b:11.2f}" if b else f"{'n/a':>11}"
        mfu = f"{100 * r['mfu']:7.1f}%" if r.get("mfu") is not None else f"{'n/a':>8}"
        mem = f"{r['max_gib']:9.2f}" if r.get("max_gib") is not None else f"{'n/a':>9}"
        print(f"{r['batch']:>6}  {r['variant']:<14}{r['ms']:>10.2f}{r['spread_ms']:>8.2f}{r['clips_s']:>10.2f}"
              f"{ratio}{r['tflops']:>10.2f}{mfu}{mem}")
    sf = videomae_step_flops(cfg, 1)
    print(f"\nVideoMAE step FLOPs: {sf.per_clip() / 1e12:.3f} TFLOP/clip")
    if args.smoke:
        torch.set_num_threads(threads)
        print("(smoke: CPU, tiny shapes -- timings mean nothing for the GPU)")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
