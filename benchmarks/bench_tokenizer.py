"""Time the appearance tokenizer (VQGAN f16, 16384 codes) that every pre-training step runs.

On the H200 the whole ViT-B step at batch 32 took ~930 ms with the VQGAN tokenizer running
(bench_step.py, default ``--tokenizer vqgan``), against ~44 ms for a VideoMAE step: this script
tells how much of that the tokenizer is, in which precision / memory format it runs fastest,
and (``--profile``) which kernels take its time.

    python benchmarks/bench_tokenizer.py --batch 32 --profile

Weights are random (same compute as the released checkpoint). Per variant: ms per step of
``batch`` clips of ``frames`` x ``size``^2 frames (CUDA events, median of ``--repeats``
after one warm-up), clips/s of tokenizing alone, and achieved TFLOP/s (FLOPs counted by
``torch.utils.flop_counter`` on one clip). Without CUDA it prints a message and exits 0
(``--smoke`` runs one tiny CPU call to check the script).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mam2_fast.targets.vqgan import VQGANTokenizer  # noqa: E402

_COMPILING = [False]

VARIANTS = {  # name -> VQGANTokenizer keyword arguments
    "bf16 contiguous": dict(dtype="bfloat16", channels_last=False),       # the default
    "bf16 channels-last": dict(dtype="bfloat16", channels_last=True),
    "fp16 channels-last": dict(dtype="float16", channels_last=True),
    "fp32 channels-last": dict(dtype="float32", channels_last=True),
    # an experiment, not a config option yet: weights cast to bf16 once and no autocast, so
    # GroupNorm / SiLU run on bf16 activations (autocast runs group_norm in fp32: every norm
    # then writes fp32 activations, twice the bytes, and each conv re-casts its weights)
    "bf16 weights no autocast": dict(dtype="float32", channels_last=True, pure_bf16=True),
    # tokenizer.fused_norm: GroupNorm + SiLU in one Triton kernel writing bf16 (kernels/group_norm.py)
    "bf16 contiguous fused-norm": dict(dtype="bfloat16", channels_last=False, fused_norm=True),
    # tokenizer.compile: the encoder + quantizer through torch.compile (Inductor fuses the
    # norm / activation / cast passes); its first call compiles (printed separately)
    "bf16 contiguous compiled": dict(dtype="bfloat16", channels_last=False, compiled=True),
    "bf16 channels-last compiled": dict(dtype="bfloat16", channels_last=True, compiled=True),
}


def make_tokenizer(dev: torch.device, pure_bf16: bool = False, fused_norm: bool = False,
                   compiled: bool = False, chunk_frames: int = 64, **kwargs) -> VQGANTokenizer:
    torch.manual_seed(0)    # the same random weights in every variant, so their codes can be compared
    tok = VQGANTokenizer(patch_size=16, chunk_frames=chunk_frames, **kwargs).to(dev)   # channels_last given by every variant
    tok.set_fused_norm(fused_norm)
    tok.set_compiled(compiled)
    if pure_bf16:
        tok.to(torch.bfloat16)
        tok.quantize.float()                       # distances stay fp32, as in every variant
        plain = tok.map_input
        tok.map_input = lambda x: plain(x).to(torch.bfloat16)
    return tok


def flops_per_clip(tok: VQGANTokenizer, frames: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        tok.tokenize(frames[:1])
    return float(fc.get_total_flops())


def time_ms(fn, repeats: int) -> list:
    """CUDA-event ms of ``repeats`` calls after one warm-up call (whose wall time, compilation
    included for a compiled variant, is printed)."""
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    print(f"    first call (warm-up{', compiles' if _COMPILING[0] else ''}): {time.perf_counter() - t0:.1f} s", flush=True)
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return out


def profile_top(fn, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, from: " + "; ".join(VARIANTS))
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of the first variant")
    p.add_argument("--chunk-frames", type=int, default=64,
                   help="frames per encoder call (training's tokenizer.chunk_frames default: 64; the "
                        "2026-12-04 H200 numbers were taken with 0 = all 512 frames in one call)")
    p.add_argument("--smoke", action="store_true", help="one tiny call on CPU (checks the script)")
    args = p.parse_args(argv)
    if args.smoke:
        tok = VQGANTokenizer(patch_size=16, dtype="float32", channels_last=False)
        codes = tok.tokenize(torch.rand(1, 2, 3, 32, 32))
        print("smoke: codes", tuple(codes.shape), "flops/clip", flops_per_clip(tok, torch.rand(1, 2, 3, 32, 32)))
        return 0
    if not torch.cuda.is_available():
        print("bench_tokenizer: no CUDA device; nothing to time (use --smoke on CPU).")
        return 0
    dev = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    frames = torch.rand(args.batch, args.frames, 3, args.size, args.size, device=dev)
    rows = []
    for i, name in enumerate(v.strip() for v in args.variants.split(",")):
        tok = make_tokenizer(dev, chunk_frames=args.chunk_frames, **VARIANTS[name])
        _COMPILING[0] = tok.compiled
        fn = lambda: tok.tokenize(frames)  # noqa: E731
        ms = time_ms(fn, args.repeats)
        med = statistics.median(ms)
        fl = flops_per_clip(tok, frames) * args.batch
        if i == 0:
            ref_ids = tok.tokenize(frames[:2])
        else:
            same = (tok.tokenize(frames[:2]) == ref_ids).float().mean().item()
            print(f"  {name}: codes equal to the first variant's on {same:.1%} of 2 clips' tokens", flush=True)
        rows.append((name, med, max(ms) - min(ms), args.batch / med * 1e3, fl / med / 1e9))
        print(f"  {name}: {med:.1f} ms per {args.batch} clips", flush=True)
        if i == 0 and args.profile:
            print(profile_top(fn), flush=True)
        del tok
        torch.cuda.empty_cache()
    print(f"\nVQGAN f16-16384 tokenizer, {args.batch} clips x {args.frames} frames x {args.size}^2")
    print(f"{'variant':<22}{'ms':>9}{'spread':>8}{'clips/s':>10}{'TFLOP/s':>9}")
    for name, med, spread, cps, tf in rows:
        print(f"{name:<22}{med:>9.1f}{spread:>8.1f}{cps:>10.1f}{tf:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
