"""End-to-end MAM^2 training-step benchmark: clips/s, MFU, memory, largest batch per GPU.

For each model (ViT-B by default, 16 x 224, tube 0.75, configs/pretrain_base.yaml) and
batch size it times whole training steps (tokenizer + forward incl. alignment target +
backward + fused AdamW) on synthetic clips already on the GPU, for the variants

* ``eager``      -- ``model.kernels=reference``, eager PyTorch (the reference engine)
* ``fused``      -- ``model.kernels=fused`` (Triton kernels), eager
* ``compile``    -- fused + ``torch.compile(model)`` (default mode)
* ``cudagraphs`` -- fused + ``torch.compile(model, mode="reduce-overhead")`` (CUDA graphs)

and prints ms/step, clips/s, the ratio to ``eager``, achieved TFLOP/s, MFU (FLOPs from
``mam2_fast.flops``, peak from ``mam2_fast.profile.PEAK_BF16_TFLOPS``) and max allocated
memory. Timing: ``--warmup`` steps, then ``--repeats`` windows of ``--iters`` steps, each
window between two ``cuda.synchronize`` calls; the median window is reported (spread shown).
Then it binary-searches the largest batch per GPU (``--max-batch B,L``; OOM caught).

``--tokenizer vqgan`` (default) runs the VQGAN-f16-16384 encoder every step (random
weights: same compute), as training does; ``--tokenizer codes`` replaces it by random
codes (16384-way head kept) to time the model step alone; ``kmeans`` uses k-means codes.

Without CUDA it prints a message and exits 0. ``--smoke`` runs tiny shapes on CPU (eager
only, plus the batch search against a simulated memory limit) to check the script itself.

    python benchmarks/bench_step.py --models B --batch 16,32,48 --out step.json
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mam2_fast.flops import config_without_data  # noqa: E402
from mam2_fast.train import accel  # noqa: E402
from mam2_fast.profile import (MAM2Step, RandomCodes, SyntheticClips, device_peak, sync,  # noqa: E402
                               time_steps)

PRESETS = {"S": "small", "B": "base", "L": "large"}
VARIANTS = {  # name: (kernels, compile mode)
    "eager": ("reference", None),
    "fused": ("fused", None),
    "compile": ("fused", "default"),
    "cudagraphs": ("fused", "reduce-overhead"),
}


def is_oom(exc: BaseException) -> bool:
    return accel.is_oom(exc)


def free_memory() -> None:
    gc.collect()
    accel.empty_cache()


def make_config(model: str, batch: int, variant: str, tokenizer: str, smoke: bool, extra: List[str]):
    kernels, _ = VARIANTS[variant]
    over = [f"train.batch_size={batch}", f"model.kernels={kernels}", "train.precision=auto",
            "train.device=auto"]
    if smoke:
        over += ["model.img_size=32", "model.num_frames=4", "model.depth=2", "model.embed_dim=64",
                 "model.num_heads=2", "model.regressor_depth=1", "model.appearance_depth=1",
                 "model.motion_depth=1", "data.num_sample=1", "train.threads=1"]
    else:
        over.append(f"model.preset={PRESETS[model]}")
    if tokenizer == "kmeans":
        over += ["tokenizer.kind=kmeans", "tokenizer.vocab_size=64"]
    elif tokenizer == "vqgan" and not smoke:
        over += ["tokenizer.kind=vqgan"]
    elif smoke:
        over += ["tokenizer.kind=kmeans", "tokenizer.vocab_size=64"]
    return config_without_data(str(ROOT / "configs" / "pretrain_base.yaml"), over + list(extra))


def build_runner(cfg, device, variant: str, tokenizer: str, smoke: bool) -> MAM2Step:
    _, mode = VARIANTS[variant]
    tok = None
    if tokenizer == "codes":
        tok = RandomCodes(64 if smoke else 16384, cfg.model.patch_size)
    return MAM2Step(cfg, device, compile=mode, tokenizer=tok, split_alignment=False, log=lambda s: None)


def bench_one(model: str, batch: int, variant: str, args, device) -> Dict:
    row = {"model": model, "batch": batch, "variant": variant}
    runner = None
    try:
        cfg = make_config(model, batch, variant, args.tokenizer, args.smoke, args.override)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        runner = build_runner(cfg, device, variant, args.tokenizer, args.smoke)
        batches = iter(SyntheticClips(batch, cfg, device))
        accel.reset_peak_memory(device)
        warm = 1 if args.smoke else args.warmup + (3 if VARIANTS[variant][1] else 0)
        times = time_steps(lambda: runner.step(batches), device, warm, 1 if args.smoke else args.iters,
                           1 if args.smoke else args.repeats)
        s = statistics.median(times)
        sf = runner.flops()
        name, peak = device_peak(device, args.peak_tflops)
        row.update(ms=s * 1e3, spread_ms=(max(times) - min(times)) * 1e3, clips_s=batch / s,
                   tflops=sf.total / s / 1e12, mfu=(sf.total / s / 1e12 / peak) if peak else None,
                   flops_per_clip=sf.per_clip(), device=name,
                   max_gib=accel.max_memory_gib(device))
    except Exception as exc:  # OOM or a variant that does not work here: report, go on
        row["error"] = "OOM" if is_oom(exc) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        if not is_oom(exc) and args.verbose:
            traceback.print_exc()
    finally:
        del runner
        free_memory()
    return row


def largest_batch(fits: Callable[[int], bool], start: int = 8, cap: int = 1024) -> int:
    """Largest b in [1, cap] with fits(b), assuming fits is monotone: double from ``start``
    until it fails (or reaches ``cap``), then bisect. Returns 0 if even b=1 does not fit."""
    lo, hi = 0, cap + 1          # invariant: lo fits (0 trivially), hi does not
    b = min(max(1, start), cap)
    while True:
        if fits(b):
            lo = b
            if b >= cap:
                return b
            b = min(2 * b, cap)
        else:
            hi = b
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_batch_for(model: str, args, device) -> Dict:
    variant = args.max_batch_variant
    cfg = make_config(model, 1, variant, args.tokenizer, args.smoke, args.override)
    runner = build_runner(cfg, device, variant, args.tokenizer, args.smoke)
    tried: Dict[int, bool] = {}

    def fits(b: int) -> bool:
        try:
            batches = iter(SyntheticClips(b, cfg, device, buffers=1))
            for _ in range(2):
                runner.step(batches)
            sync(device)
            ok = True
        except Exception as exc:
            if not is_oom(exc):
                raise
            ok = False
        finally:
            runner.optimizer.zero_grad(set_to_none=True)
            free_memory()
        tried[b] = ok
        print(f"  max-batch {model}: batch {b}: {'fits' if ok else 'OOM'}", flush=True)
        return ok

    best = largest_batch(fits, start=args.max_batch_start, cap=args.max_batch_cap)
    del runner
    free_memory()
    return {"model": model, "variant": variant, "max_batch": best, "tried": tried}


def print_table(rows: List[Dict]) -> None:
    hdr = (f"{'model':<6}{'batch':>6}  {'variant':<11}{'ms/step':>10}{'spread':>8}{'clips/s':>10}"
           f"{'x eager':>9}{'TFLOP/s':>10}{'MFU':>8}{'max GiB':>9}")
    print("\n" + hdr)
    print("-" * len(hdr))
    base = {(r["model"], r["batch"]): r.get("clips_s") for r in rows if r["variant"] == "eager"}
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<6}{r['batch']:>6}  {r['variant']:<11}  {r['error']}")
            continue
        b = base.get((r["model"], r["batch"]))
        ratio = f"{r['clips_s'] / b:9.2f}" if b else f"{'':>9}"
        mfu = f"{100 * r['mfu']:7.1f}%" if r.get("mfu") is not None else f"{'n/a':>8}"
        mem = f"{r['max_gib']:9.2f}" if r.get("max_gib") is not None else f"{'n/a':>9}"
        print(f"{r['model']:<6}{r['batch']:>6}  {r['variant']:<11}{r['ms']:>10.2f}{r['spread_ms']:>8.2f}"
              f"{r['clips_s']:>10.2f}{ratio}{r['tflops']:>10.2f}{mfu}{mem}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="B", help="comma list of S,B,L (default B)")
    p.add_argument("--batch", default="8,16,32", help="per-GPU batch sizes (default 8,16,32)")
    p.add_argument("--variants", default="eager,fused,compile,cudagraphs")
    p.add_argument("--tokenizer", default="vqgan", choices=("vqgan", "codes", "kmeans"))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--max-batch", default="B,L", help="models for the largest-batch search ('' skips)")
    p.add_argument("--max-batch-variant", default="fused", choices=tuple(VARIANTS))
    p.add_argument("--max-batch-start", type=int, default=16)
    p.add_argument("--max-batch-cap", type=int, default=512)
    p.add_argument("--out", help="write all rows as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny CPU shapes, to check the script")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing variants")
    p.add_argument("--override", nargs="*", default=[], help="extra dotted config overrides")
    args = p.parse_args(argv)

    if not args.smoke and not accel.cuda_available():
        print("bench_step: no CUDA device here; nothing to measure (use --smoke to check the script on CPU).")
        return 0
    device = torch.device("cuda" if (accel.cuda_available() and not args.smoke) else "cpu")
    threads = torch.get_num_threads()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.smoke:
        models, batches = models[:1], [2]
        variants = [v for v in variants if v == "eager"] or ["eager"]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"device {accel.device_name(device)}, torch {torch.__version__}", flush=True)

    rows = []
    t0 = time.time()
    for m in models:
        for b in batches:
            for v in variants:
                r = bench_one(m, b, v, args, device)
                rows.append(r)
                msg = r.get("error") or f"{r['clips_s']:.2f} clips/s, {r['ms']:.1f} ms/step"
                print(f"[{time.time() - t0:6.0f}s] {m} batch {b} {v}: {msg}", flush=True)
    torch.set_num_threads(threads)

    maxb = []
    if args.smoke:
        cap = 5  # simulated memory limit: batches above 5 "OOM"
        best = largest_batch(lambda b: b <= cap, start=2, cap=64)
        assert best == cap, best
        maxb.append({"model": "smoke", "variant": "simulated", "max_batch": best})
    else:
        for m in [x.strip() for x in args.max_batch.split(",") if x.strip()]:
            try:
                maxb.append(max_batch_for(m, args, device))
            except Exception as exc:
                maxb.append({"model": m, "error": f"{type(exc).__name__}: {exc}"[:200]})

    print_table(rows)
    if maxb:
        print("\nlargest batch per GPU (16x224, 2 steps each; %s):" % args.max_batch_variant)
        for r in maxb:
            print(f"  {r['model']}: {r.get('max_batch', r.get('error'))}")
    if args.smoke:
        print("\n(smoke: CPU, tiny shapes -- timings mean nothing for the GPU)")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "max_batch": maxb, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
