"""Profile MAM^2 training steps: ``python -m mam2_fast.profile [--config FILE] [key=value ...]``.
(``model.arch=videomae`` profiles the VideoMAE baseline: no tokenizer or alignment phase,
FLOPs from ``flops.videomae_step_flops``.)

Times the training task's own step (:class:`MAM2Step`: ``PretrainTask.prepare`` / ``step``, then
the loop's ``backward`` / ``update``; model, tokenizer and AdamW built by the task's ``setup``),
``--warmup`` + ``--steps`` steps on synthetic clips (or the configured data with
``--real-data``), and prints

* clips/s and the step time (median over the timed steps);
* the step split: data wait, tokenizer, alignment target, forward (rest), backward,
  optimizer. On CUDA the phases are timed with CUDA events recorded at the phase
  boundaries (no synchronization inside a step; one ``synchronize`` at the end of every
  step, to close the step's timing window -- the training loop itself does not sync per
  step); on CPU with ``perf_counter``. The
  alignment target (the no-grad encoder pass on the masked tokens, inside the model's
  forward) is timed by wrapping the model's ``encode`` -- the model file is not touched;
* FLOPs per step from :mod:`mam2_fast.flops` and MFU against the device's dense bf16
  peak (table below; ``--peak-tflops`` overrides; none on CPU);
* epochs/hour and days for ``train.epochs`` on a dataset of ``--dataset-size`` videos
  (default Kinetics-400 train, 240k), each giving ``data.num_sample`` clips per epoch
  (repeated augmentation), for ``--gpus`` GPUs assuming linear scaling;
* a ``torch.profiler`` chrome trace of ``--trace-steps`` further steps in the output dir
  (``trace.json``, open in chrome://tracing or https://ui.perfetto.dev) plus ``profile.json``.

With no ``--config`` it profiles the CPU demo model (``mam2_fast.pretrain.demo_config_dict``).
Without a tokenizer checkpoint, VQGAN / DALL-E tokenizers are built with random weights
(same compute, meaningless codes: fine for timing); k-means gets a random codebook on
synthetic data and is fitted on the data with ``--real-data``.

    python -m mam2_fast.profile --config configs/k400_vit_b.yaml --steps 20 train.batch_size=32
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch

from mam2_fast.pretrain import PretrainTask, select_device  # the trainer's own task and rules
from mam2_fast.config import Config, ConfigError
from mam2_fast.flops import config_without_data, mam2_step_flops, videomae_step_flops
from mam2_fast.train import accel

K400_TRAIN_VIDEOS = 240_000

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets.
PEAK_BF16_TFLOPS: Dict[str, float] = {
    "H200": 989.4,          # SXM (H200 NVL: 835)
    "H100 SXM": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.5,
    "A100": 312.0,          # SXM and PCIe
    "L40S": 362.1,
    "A10G": 70.0,
    "L4": 121.0,
}


def peak_for_name(name: str) -> Optional[float]:
    """Dense bf16 peak TFLOP/s for a CUDA device name (``torch.cuda.get_device_name``)."""
    n = name.upper()
    if "H200" in n:
        key = "H100 NVL" if "NVL" in n else "H200"
    elif "H100" in n:
        key = "H100 NVL" if "NVL" in n else ("H100 PCIe" if "PCIE" in n else "H100 SXM")
    elif "A100" in n:
        key = "A100"
    else:
        key = next((k for k in PEAK_BF16_TFLOPS if k.upper() in n), None)
    return PEAK_BF16_TFLOPS[key] if key else None


def device_peak(device: torch.device, override: Optional[float] = None) -> tuple[str, Optional[float]]:
    """(device name, dense bf16 peak TFLOP/s or None; ``override`` wins)."""
    if not accel.is_gpu(device):
        return "cpu", override
    name = accel.device_name(device)
    return name, override if override is not None else peak_for_name(name)


# ----------------------------------------------------------------------------------------
# phase timing
# ----------------------------------------------------------------------------------------
class PhaseTimer:
    """Per-step phase times. ``mark(name)`` closes the phase that started at the previous
    mark. CUDA (and the stand-in device): events (read after the end-of-step synchronize);
    CPU: ``perf_counter``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = accel.is_gpu(device)
        self.steps: List[List[tuple]] = []
        self.host: List[Dict[str, float]] = []
        self._cur: List[tuple] = []
        self._last = None

    def _now(self):
        if self.cuda:
            e = accel.new_event(self.device, enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start_step(self) -> None:
        self._cur = []
        self.host.append({})
        self._last = self._now()

    def mark(self, name: str) -> None:
        t = self._now()
        self._cur.append((name, self._last, t))
        self._last = t

    def host_time(self, name: str, seconds: float) -> None:
        self.host[-1][name] = self.host[-1].get(name, 0.0) + seconds

    def end_step(self) -> None:
        self.steps.append(self._cur)

    def reset(self) -> None:
        self.steps, self.host = [], []

    def per_step_ms(self) -> List[Dict[str, float]]:
        if self.cuda:
            accel.synchronize(self.device)
        out = []
        for step in self.steps:
            d: Dict[str, float] = {}
            for name, a, b in step:
                ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
                d[name] = d.get(name, 0.0) + ms
            out.append(d)
        return out

    def median_ms(self) -> Dict[str, float]:
        steps = self.per_step_ms()
        names: List[str] = []
        for s in steps:
            names += [n for n in s if n not in names]
        res = {n: statistics.median([s.get(n, 0.0) for s in steps]) for n in names}
        hnames = sorted({k for h in self.host for k in h})
        for k in hnames:
            res[k] = statistics.median([h.get(k, 0.0) * 1e3 for h in self.host])
        return res


# ----------------------------------------------------------------------------------------
# building the step
# ----------------------------------------------------------------------------------------
class SyntheticClips:
    """Random normal clips already on the device (a few buffers, rotated): no data cost."""

    def __init__(self, batch: int, cfg: Config, device: torch.device, buffers: int = 2, seed: int = 0):
        m = cfg.model
        g = torch.Generator(device="cpu").manual_seed(seed)
        dtype = torch.bfloat16 if cfg.data.out_dtype == "bfloat16" else torch.float32
        self.clips = [torch.randn(batch, m.num_frames, m.in_chans, m.img_size, m.img_size, generator=g)
                      .to(device=device, dtype=dtype) for _ in range(buffers)]
        self.i = 0
        self.steps_per_epoch = 1 << 30

    def __iter__(self) -> Iterator[dict]:
        while True:
            self.i += 1
            yield {"clip": self.clips[self.i % len(self.clips)]}


def real_data_iter(data) -> Iterator[dict]:
    epoch = 0
    while True:
        for _, batch in data.iter_epoch(epoch):
            yield batch
        epoch += 1


def _denormalize(clip: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=clip.device, dtype=clip.dtype).view(1, 1, -1, 1, 1)
    s = torch.tensor(std, device=clip.device, dtype=clip.dtype).view(1, 1, -1, 1, 1)
    return (clip * s + m).clamp_(0, 1)


def build_tokenizer_for_timing(cfg: Config, device: torch.device, data=None, log=print):
    """The configured tokenizer; random weights when no checkpoint is given (timing only)."""
    t = cfg.tokenizer
    if not cfg.model.use_appearance or getattr(cfg.model, "appearance_target", "tokens") == "pixels":
        return None
    P = cfg.model.patch_size
    if t.kind == "kmeans":
        from mam2_fast.targets.tokenizer import KMeansTokenizer

        tok = KMeansTokenizer(t.vocab_size, P, t.kmeans_pool)
        if data is not None:  # fit on the first clips of the data, as pretrain does
            frames, n = [], 0
            for _, batch in data.iter_epoch(0):
                frames.append(_denormalize(accel.to_host(batch["clip"]).float(), cfg.data.mean, cfg.data.std))
                n += frames[-1].shape[0]
                if n >= t.kmeans_fit_clips:
                    break
            t0 = time.perf_counter()
            tok.fit(torch.cat(frames)[: t.kmeans_fit_clips], seed=cfg.train.seed)
            log(f"fitted k-means tokenizer on {min(n, t.kmeans_fit_clips)} clips in {time.perf_counter() - t0:.1f}s")
            return tok.to(device).eval()
        g = torch.Generator().manual_seed(0)
        cb = torch.randn(t.vocab_size, tok.codebook.shape[1], generator=g)
        tok.codebook.copy_(cb / cb.norm(dim=1, keepdim=True))
        tok.fitted.fill_(True)
        return tok.to(device).eval()
    if t.kind in ("vqgan", "dalle") and not t.checkpoint:
        kw = dict(patch_size=P, resize_mode=t.resize_mode, dtype=t.dtype, chunk_frames=t.chunk_frames)
        if t.kind == "vqgan":
            from mam2_fast.targets.vqgan import VQGANTokenizer

            tok = VQGANTokenizer(t.checkpoint_config or t.preset or "vqgan_imagenet_f16_16384", **kw)
            tok.set_fused_norm(bool(getattr(t, "fused_norm", False)))
        else:
            from mam2_fast.targets.dalle import DalleTokenizer

            tok = DalleTokenizer(**kw)
        log(f"tokenizer {t.kind}: no checkpoint given, random weights (timing only, codes meaningless)")
        return tok.prepare(device)
    from mam2_fast.targets.tokenizer import build_tokenizer

    tok = build_tokenizer(t, P)
    return tok.prepare(device) if hasattr(tok, "prepare") else tok.to(device).eval()


class TimedPretrainTask(PretrainTask):
    """The training task (:class:`mam2_fast.pretrain.PretrainTask`) with the profiler's
    stand-ins for what timing does not need: the tokenizer of :func:`build_tokenizer_for_timing`
    (random weights when no checkpoint is given: same compute) or the one passed in, and random
    flow of the target's shape (RAFT is not part of this profile); the weight files those would
    read are not required."""

    def __init__(self, data, tokenizer=None, fit_data=None):
        super().__init__(data)
        self.given_tokenizer, self.fit_data = tokenizer, fit_data

    def _check_target_files(self) -> None:
        pass   # missing tokenizer / RAFT weights: the stand-ins below

    def _build_tokenizer(self, fit_data):
        if self.cfg.model.arch == "videomae":
            return None
        if self.given_tokenizer is not None:
            return self.given_tokenizer
        return build_tokenizer_for_timing(self.cfg, self.run.device, self.fit_data, self.run.log)

    def _build_flow_target(self):
        m = self.cfg.model
        if not (m.arch == "mam2" and m.use_motion and m.motion_target == "flow"):
            return None
        return RandomFlow(m.patch_size)


class RandomFlow(torch.nn.Module):
    """Stand-in flow target: random ``[B, T, N, P*P*2]`` on the clip's device."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        B, T, _, H, W = frames.shape
        P = self.patch_size
        return torch.randn(B, T, (H // P) * (W // P), P * P * 2, device=frames.device)


class _FedBatches:
    """The task's data when the caller feeds the batches: the schedule's ``steps_per_epoch`` only."""
    steps_per_epoch = 1 << 30

    def stats(self) -> dict:
        return {}


class MAM2Step:
    """One training step as training runs it, timed by phase: the training task's own ``prepare``
    (masks) and ``step`` (targets, forward, losses), then the loop's :func:`~mam2_fast.train.loop.backward`
    and :func:`~mam2_fast.train.loop.update` (non-finite guard, clip, AdamW) -- no copy of them here.

    ``compile``: ``None`` (eager), ``"default"``, ``"max-autotune-no-cudagraphs"`` or
    ``"reduce-overhead"`` (CUDA graphs) -- ``train.compile`` / ``train.compile_mode``.
    ``data``: the real data (k-means is fitted on it), else none is read: the caller feeds batches.
    """

    def __init__(self, cfg: Config, device: torch.device, data=None, compile: Optional[str] = None,
                 log: Callable[[str], None] = print, split_alignment: bool = True, tokenizer=None):
        from mam2_fast.train import distributed as D
        from mam2_fast.train.loop import Run, Schedule, make_guard

        if compile:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=True, compile_mode=compile))
        self.batch = cfg.train.batch_size
        self.device = device
        self.videomae = getattr(cfg.model, "arch", "mam2") == "videomae"
        self.task = TimedPretrainTask(data if data is not None else _FedBatches(), tokenizer, fit_data=data)
        self.run = Run(cfg, device, D.DistInfo(), Path(cfg.train.output_dir).expanduser(), log)
        self.task.setup(self.run)
        self.cfg = self.task.cfg
        self.schedule = Schedule.plan(self.cfg, self.task.data.steps_per_epoch, 1)
        self.task.build_optimizer(self.schedule)
        self.guard = make_guard(self.task, self.run)
        self.task.model.train()
        self.task.init_steps()       # not task.start: it would write tokenizer.pt into the run folder
        self.model, self.tokenizer, self.optimizer = self.task.model, self.task.tokenizer, self.task.optimizer
        self.timer: Optional[PhaseTimer] = None
        self.steps_done = 0
        if self.tokenizer is not None or self.task.flow_target is not None or self.task.clip_order:
            self._wrap_targets()
        if split_alignment and not compile and not self.videomae:
            self._wrap_encode()

    def _wrap_targets(self) -> None:
        """Time the task's targets (tokenizer codes, flow, clip-order labels) as the tokenizer phase."""
        task, orig = self.task, self.task.targets

        def targets(clip, info, micro):
            with torch.profiler.record_function("tokenizer"):
                out = orig(clip, info, micro)
            if self.timer is not None:
                self.timer.mark("tokenizer")
            return out

        task.targets = targets  # instance attribute: the task's code is unchanged

    def _wrap_encode(self) -> None:
        """Time the alignment target (the no-grad encoder pass on the masked tokens) apart."""
        model, orig = self.model, self.model.encode

        def encode(clip, info, masked=False, patches=None):
            if not masked:
                return orig(clip, info, masked, patches)
            timer = self.timer
            if timer is not None:
                timer.mark("forward")
            with torch.profiler.record_function("alignment_target"):
                out = orig(clip, info, masked, patches)
            if timer is not None:
                timer.mark("alignment target")
            return out

        model.encode = encode  # instance attribute: the model file is unchanged

    def step(self, batch_iter: Iterator[dict], timer: Optional[PhaseTimer] = None) -> torch.Tensor:
        """One optimizer step of one micro-batch; returns the (device) loss. Phases: data (next
        batch, masks), tokenizer (targets), forward (incl. the alignment target when split),
        backward, optimizer."""
        from mam2_fast.train.loop import Micro, backward, update

        self.timer = timer
        mark = timer.mark if timer is not None else (lambda name: None)
        rf = torch.profiler.record_function
        n = self.steps_done
        if timer is not None:
            timer.start_step()
        with rf("data"):
            t0 = time.perf_counter()
            batch = next(batch_iter)
            if timer is not None:
                timer.host_time("data wait (host)", time.perf_counter() - t0)
            info = self.task.prepare(batch, 0, n)        # the loop runs it on the prefetch thread
        mark("data")
        with rf("forward"):
            losses = self.task.step(batch, info, Micro(step=n, epoch=0, pos=n, index=0, last=True, logs=False))
        mark("forward")
        with rf("backward"):
            backward(self.guard, losses["loss"], 1)
        mark("backward")
        with rf("optimizer"):
            update(self.task, self.guard, self.schedule.lr(n))
        mark("optimizer")
        if timer is not None:
            timer.end_step()
        self.timer = None
        self.steps_done += 1
        return losses["loss"].detach()

    def flops(self):
        if self.videomae:
            return videomae_step_flops(self.model.cfg, batch=self.batch)
        vocab = self.model.vocab_size
        counted = self.tokenizer is not None and getattr(self.tokenizer, "counts_flops", True)
        packed = getattr(self.model, "kernel_backend", "reference") != "reference"  # fused: packed sets
        return mam2_step_flops(self.cfg, batch=self.batch, vocab_size=vocab, include_tokenizer=counted,
                               packed=packed)


class RandomCodes(torch.nn.Module):
    """Stand-in tokenizer: uniform random code ids on the device (no tokenizer cost), to time
    the model step alone with a ``vocab_size``-way appearance head."""

    counts_flops = False

    def __init__(self, vocab_size: int, patch_size: int, seed: int = 0):
        super().__init__()
        self.vocab_size, self.patch_size, self.seed = int(vocab_size), int(patch_size), seed

    def grid_size(self, height: int, width: int) -> tuple:
        return height // self.patch_size, width // self.patch_size

    @torch.no_grad()
    def tokenize(self, frames: torch.Tensor) -> torch.Tensor:
        B, T, _, H, W = frames.shape
        h, w = self.grid_size(H, W)
        return torch.randint(0, self.vocab_size, (B, T, h, w), device=frames.device)


def sync(device: torch.device) -> None:
    accel.synchronize(device)


def time_steps(step_fn: Callable[[], object], device: torch.device, warmup: int, iters: int,
               repeats: int = 1) -> List[float]:
    """Seconds per step for each of ``repeats`` windows of ``iters`` steps after ``warmup``
    steps; one synchronize before and after each window."""
    for _ in range(warmup):
        step_fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            step_fn()
        sync(device)
        out.append((time.perf_counter() - t0) / iters)
    return out


# ----------------------------------------------------------------------------------------
# profile run
# ----------------------------------------------------------------------------------------
PHASE_ORDER = ("data", "tokenizer", "alignment target", "forward", "backward", "optimizer")


def run_profile(cfg: Config, warmup: int = 3, steps: int = 10, real_data: bool = False,
                dataset_size: int = K400_TRAIN_VIDEOS, gpus: int = 1, peak_tflops: Optional[float] = None,
                output_dir: Optional[str] = None, trace_steps: int = 2, compile: Optional[str] = None,
                log: Callable[[str], None] = print) -> dict:
    threads = torch.get_num_threads()
    try:
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        return _run_profile(cfg, warmup, steps, real_data, dataset_size, gpus, peak_tflops, output_dir,
                            trace_steps, compile, log)
    finally:
        torch.set_num_threads(threads)


def _run_profile(cfg, warmup, steps, real_data, dataset_size, gpus, peak_tflops, output_dir, trace_steps,
                 compile, log) -> dict:
    torch.manual_seed(cfg.train.seed)
    device = select_device(cfg)
    B = cfg.train.batch_size
    data = None
    if real_data:
        from mam2_fast.data import build_pretrain_data

        data = build_pretrain_data(cfg.data, batch_size=B, seed=cfg.train.seed, device=device)
        batches = real_data_iter(data)
    else:
        batches = iter(SyntheticClips(B, cfg, device))
    if compile is None and getattr(cfg.train, "compile", False):
        compile = getattr(cfg.train, "compile_mode", "default")
    runner = MAM2Step(cfg, device, data=data, compile=compile, log=log)   # the training task's step
    n_params = sum(p.numel() for p in runner.model.parameters())
    log(f"model {cfg.model.preset}: {n_params / 1e6:.2f}M parameters, batch {B}, device {device}, "
        f"precision {cfg.train.precision}, kernels {cfg.model.kernels}, compile {compile or 'off'}, "
        f"data {'real' if real_data else 'synthetic'}")

    timer = PhaseTimer(device)
    for _ in range(warmup):
        runner.step(batches, timer)
        sync(device)
    timer.reset()
    wall: List[float] = []
    loss = None
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = runner.step(batches, timer)
        sync(device)  # phase boundary: end of step
        wall.append(time.perf_counter() - t0)
    phases = timer.median_ms()
    step_s = statistics.median(wall)
    clips_s = B / step_s
    loss_v = accel.host_float(loss) if loss is not None else float("nan")

    sf = runner.flops()
    name, peak = device_peak(device, peak_tflops)
    achieved = sf.total / step_s / 1e12
    mfu = achieved / peak if peak else None
    gpu_ms = {k: phases.get(k, 0.0) for k in PHASE_ORDER}
    model_ms = gpu_ms["alignment target"] + gpu_ms["forward"] + gpu_ms["backward"]
    model_tflops = sf.model / (model_ms * 1e-3) / 1e12 if model_ms > 0 else float("nan")
    clips_per_epoch = dataset_size * cfg.data.num_sample
    epochs_h = clips_s * gpus * 3600 / clips_per_epoch
    res = {
        "config": cfg.name, "device": name, "batch": B, "steps": steps, "warmup": warmup,
        "step_ms": step_s * 1e3, "step_ms_all": [w * 1e3 for w in wall], "clips_per_s": clips_s,
        "phases_ms": phases, "loss": loss_v,
        "flops_per_step": sf.total, "flops_per_clip": sf.per_clip(), "model_flops_per_clip": sf.per_clip(sf.model),
        "tokenizer_flops_per_clip": sf.per_clip(sf.tokenizer), "achieved_tflops": achieved,
        "peak_tflops": peak, "mfu": mfu, "model_phase_tflops": model_tflops,
        "model_phase_mfu": (model_tflops / peak) if peak else None,
        "dataset_size": dataset_size, "num_sample": cfg.data.num_sample, "gpus": gpus,
        "epochs_per_hour": epochs_h, "epochs": cfg.train.epochs,
        "days_for_epochs": cfg.train.epochs / epochs_h / 24 if epochs_h > 0 else float("inf"),
        "max_memory_gib": accel.max_memory_gib(device),
        "flop_notes": sf.notes,
    }

    out_dir = Path(output_dir or (Path(cfg.train.output_dir) / "profile")).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    if trace_steps > 0:
        res["trace"] = str(write_trace(runner, batches, device, trace_steps, out_dir / "trace.json"))
    (out_dir / "profile.json").write_text(json.dumps(res, indent=2))
    res["output_dir"] = str(out_dir)
    if data is not None:
        res["data_stats"] = data.stats()
        data.close()
    return res


def write_trace(runner: MAM2Step, batches: Iterator[dict], device: torch.device, steps: int, path: Path) -> Path:
    """A ``torch.profiler`` chrome trace of ``steps`` further steps."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            with torch.profiler.record_function("train_step"):
                runner.step(batches, None)
            sync(device)
    prof.export_chrome_trace(str(path))
    return path


def format_report(res: dict) -> str:
    L = []
    L.append(f"device {res['device']}  batch {res['batch']}  ({res['steps']} timed steps after "
             f"{res['warmup']} warm-up; medians)")
    L.append(f"step {res['step_ms']:.1f} ms   {res['clips_per_s']:.2f} clips/s   loss {res['loss']:.4f}")
    ph = res["phases_ms"]
    L.append(f"{'phase':<24}{'ms':>10}{'share':>8}")
    tot = sum(ph.get(k, 0.0) for k in PHASE_ORDER) or 1.0
    for k in PHASE_ORDER:
        if k in ph:
            L.append(f"{k:<24}{ph[k]:>10.2f}{100 * ph[k] / tot:>7.1f}%")
    if "data wait (host)" in ph:
        L.append(f"{'  (host wait for batch)':<24}{ph['data wait (host)']:>10.2f}")
    L.append(f"FLOPs/clip {res['flops_per_clip'] / 1e12:.3f} TFLOP (model {res['model_flops_per_clip'] / 1e12:.3f}, "
             f"tokenizer {res['tokenizer_flops_per_clip'] / 1e12:.3f})")
    if res["mfu"] is not None:
        L.append(f"achieved {res['achieved_tflops']:.1f} TFLOP/s of {res['peak_tflops']:.1f} peak (bf16 dense): "
                 f"MFU {100 * res['mfu']:.1f} %  (model phases alone {100 * res['model_phase_mfu']:.1f} %)")
    else:
        L.append(f"achieved {res['achieved_tflops']:.4f} TFLOP/s; MFU n/a (no peak for {res['device']}; "
                 f"--peak-tflops sets one)")
    L.append(f"{res['epochs_per_hour']:.3f} epochs/hour on {res['gpus']} GPU(s) for {res['dataset_size']} videos x "
             f"{res['num_sample']} clips; {res['epochs']} epochs = {res['days_for_epochs']:.1f} days")
    if res.get("max_memory_gib") is not None:
        L.append(f"max allocated {res['max_memory_gib']:.2f} GiB")
    for n in res.get("flop_notes", []):
        L.append(f"note: {n}")
    if res.get("trace"):
        L.append(f"trace: {res['trace']}")
    L.append(f"summary: {res['output_dir']}/profile.json")
    return "\n".join(L)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mam2_fast.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML config; omitted: the CPU demo config")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--batch-size", type=int, help="shorthand for train.batch_size=...")
    p.add_argument("--real-data", action="store_true", help="read the configured data (default: synthetic clips)")
    p.add_argument("--dataset-size", type=int, default=K400_TRAIN_VIDEOS,
                   help=f"videos per epoch for epochs/hour (default {K400_TRAIN_VIDEOS}, Kinetics-400 train)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for epochs/hour (linear scaling)")
    p.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for MFU (default: bf16 dense table)")
    p.add_argument("--output-dir", help="trace + profile.json folder (default: <train.output_dir>/profile)")
    p.add_argument("--trace-steps", type=int, default=2, help="steps recorded in the trace (0: no trace)")
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   help="torch.compile the model (mode: default | max-autotune-no-cudagraphs | reduce-overhead)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON too")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.kernels=fused train.batch_size=16")
    return p.parse_intermixed_args(argv)  # overrides may come before and after options


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.config:
        return config_without_data(args.config, overrides, keep_data=args.real_data)
    from mam2_fast.pretrain import demo_config_dict

    return config_without_data(None, overrides, base=demo_config_dict(), keep_data=args.real_data)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    res = run_profile(cfg, warmup=args.warmup, steps=args.steps, real_data=args.real_data,
                      dataset_size=args.dataset_size, gpus=args.gpus, peak_tflops=args.peak_tflops,
                      output_dir=args.output_dir, trace_steps=args.trace_steps, compile=args.compile,
                      log=lambda s: print(f"[profile] {s}", flush=True))
    print(format_report(res), flush=True)
    if args.json:
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
