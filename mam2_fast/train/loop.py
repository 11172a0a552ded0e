"""The one training loop: pre-training and fine-tuning are two :class:`Task` s on :func:`run_task`.

The loop knows optimizer steps, micro-batches and epochs, never what a model computes. It reads
top to bottom:

``run_task(task, cfg, resume, log)``:

1. :func:`start` -- seed and threads, device, process group (``torchrun``), the checkpoint to
   resume, the run folder (another run's files are never overwritten).
2. ``task.setup(run)`` -- the task builds its data and model.
3. :meth:`Schedule.plan` -- accumulation from ``train.global_batch``, the scaled lr, steps per
   epoch (a remainder of micro-batches that makes no whole step is dropped), warmup, last step.
4. ``task.build_optimizer(schedule)``, then :func:`restore` -- on resume the task loads its
   state, the loop its position (step, epoch, clips of the epoch done) and the RNG state.
5. :class:`Loop` -- epochs of prefetched micro-batches; each micro-batch is ``task.step(...)``
   (the forward pass and its losses) and one backward under the right gradient-sync context;
   every ``accum`` of them one optimizer step through the non-finite guard; then the log window,
   the stop agreement across ranks (SIGTERM), the checkpoint cadence and ``task.after_step``.
6. The summary (``task.finish`` adds its own entries).

A task is any object with the methods of :class:`Task` (the base class gives the defaults).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mam2_fast.config import ConfigError
from mam2_fast.data.prefetch import Prefetcher, auto_depth
from mam2_fast.train import accel
from mam2_fast.train import distributed as D
from mam2_fast.train.checkpoint import (find_resumable, load_checkpoint, prepare_run_dir, rng_state, save_checkpoint,
                                        set_rng_state)
from mam2_fast.train.metrics import MetricsLogger, Progress
from mam2_fast.train.optim import NonFiniteGuard, lr_at, lr_batch, scaled_lr, scaled_min_lr, set_lr


# ----------------------------------------------------------------------------------------
# device, precision, signals
# ----------------------------------------------------------------------------------------
def select_device(cfg) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not accel.cuda_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
    if want == "auto":
        return torch.device("cuda" if accel.cuda_available() else "cpu")
    return torch.device(want)   # also the stand-in "meta" (dry runs, see mam2_fast.train.accel)


def amp_dtype(device: torch.device, precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``train.precision`` on ``device`` (None: fp32). ``auto``: on GPUs
    bf16 where it is native (sm_80+), else fp16 (V100 / T4, with a loss scaler); fp32 on CPU."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if not accel.is_gpu(device):
            return None                   # CPU: fp32 unless bf16 / fp16 is asked for
        return torch.bfloat16 if accel.bf16_supported(device) else torch.float16
    return torch.float16 if precision == "fp16" else torch.bfloat16


def autocast_for(device: torch.device, precision: str):
    dtype = amp_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else accel.autocast(device, dtype)


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
# the run: process, device, resume, folder
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """Where this process trains: the config, its device and rank, the run folder, the
    checkpoint being resumed (None: a fresh start) and ``log`` (rank 0 speaks for the run)."""
    cfg: Any
    device: torch.device
    dist: D.DistInfo
    run_dir: Path
    log: Callable[[str], Any]
    ckpt: Optional[dict] = None

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main


def start(cfg, resume: Optional[str], log, check_checkpoint: Callable = lambda path, ckpt: None) -> Run:
    """Seed and threads, device, process group, the checkpoint to resume, the run folder."""
    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = select_device(cfg)
    dist_info = D.init_distributed(device.type, cfg.train.dist_timeout_min)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    main_log = log if dist_info.is_main else (lambda s: None)
    run_dir = Path(cfg.train.output_dir).expanduser()
    ckpt = None
    if resume:
        found = find_resumable(run_dir, warn=main_log) if resume == "auto" else (Path(resume), load_checkpoint(resume))
        if found is None:
            main_log(f"--resume: no checkpoint in {run_dir}, starting fresh")
        else:
            path, ckpt = found
            check_checkpoint(path, ckpt)
            main_log(f"resuming from {path} (step {ckpt['step']})")
    # another run's files are never overwritten (unless train.overwrite); stale .tmp files go
    prepare_run_dir(run_dir, resuming=bool(resume), overwrite=cfg.train.overwrite, is_main=dist_info.is_main,
                    log_fn=main_log)
    return Run(cfg, device, dist_info, run_dir, main_log, ckpt)


# ----------------------------------------------------------------------------------------
# schedule and position
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Optimizer steps of the run, from the config and the data's micro-batches per epoch."""
    accum: int              # micro-batches per optimizer step (per rank)
    effective_batch: int    # clips per optimizer step, all ranks together
    peak_lr: float
    min_lr: float
    steps_per_epoch: int
    epoch_micro: int        # micro-batches used per epoch
    total_steps: int
    warmup_steps: int
    last_step: int          # total_steps, or train.max_steps when smaller

    @classmethod
    def plan(cls, cfg, micro_per_epoch: int, world: int) -> "Schedule":
        t = cfg.train
        accum = t.accum_steps
        if t.global_batch is not None:
            per_step = t.batch_size * world
            if t.global_batch % per_step:
                raise ConfigError(f"train.global_batch {t.global_batch} is not a multiple of "
                                  f"batch_size x world_size = {per_step}")
            accum = t.global_batch // per_step
        effective_batch = t.batch_size * accum * world
        peak_lr = scaled_lr(cfg.optim, lr_batch(effective_batch, cfg.data))
        min_lr = min(peak_lr, scaled_min_lr(cfg.optim, lr_batch(effective_batch, cfg.data)))
        steps_per_epoch = max(1, micro_per_epoch // accum)
        # micro-batches used per epoch: whole optimizer steps only (a remainder is dropped, like
        # drop_last, so no gradient leaks into the next epoch); an epoch shorter than one step
        # lets a step span epochs
        epoch_micro = steps_per_epoch * accum if micro_per_epoch >= accum else micro_per_epoch
        total_steps = steps_per_epoch * t.epochs
        warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
        last_step = min(total_steps, t.max_steps) if t.max_steps else total_steps
        return cls(accum, effective_batch, peak_lr, min_lr, steps_per_epoch, epoch_micro, total_steps,
                   warmup_steps, last_step)

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr)

    def state(self) -> dict:
        return {"peak_lr": self.peak_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}


@dataclasses.dataclass
class Position:
    """How far the run is: optimizer steps, the epoch, micro-batches of the epoch consumed."""
    step: int = 0
    epoch: int = 0
    micro_pos: int = 0

    def state(self, epoch_micro: int, clips_per_micro: int) -> dict:
        """The checkpoint's position (an epoch used up is saved as the next one's start); the
        clips done this epoch by all ranks together let another world size resume it."""
        ep, pos = (self.epoch + 1, 0) if self.micro_pos >= epoch_micro else (self.epoch, self.micro_pos)
        return {"step": self.step, "epoch": ep, "micro_in_epoch": pos, "samples_in_epoch": pos * clips_per_micro}


def restore(task, run: Run) -> Position:
    """Resume: the task's state, then the loop's position and (same world size) the RNG state."""
    ckpt = run.ckpt
    if ckpt is None:
        return Position()
    task.load_state(ckpt)
    batch = task.cfg.train.batch_size
    # data position: clips of this epoch already consumed by all ranks together
    done = ckpt.get("samples_in_epoch", ckpt.get("micro_in_epoch", 0) * batch)
    per_micro = batch * run.world
    pos = Position(ckpt["step"], ckpt["epoch"], done // per_micro)
    if done % per_micro:
        run.log(f"resume: {done} clips done this epoch is not a multiple of {per_micro} "
                f"(batch x world); restarting at {pos.micro_pos * per_micro}")
    if ckpt.get("world_size", 1) == run.world:
        set_rng_state(ckpt["rng"])
    return pos


# ----------------------------------------------------------------------------------------
# the task: what differs between jobs
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Micro:
    """What ``task.step`` is told about its micro-batch."""
    step: int         # optimizer steps done before this micro-batch's step
    epoch: int
    pos: int          # the micro-batch's index in the epoch (per rank)
    index: int        # its index within the accumulation (0 .. accum - 1)
    last: bool        # the last of the accumulation: its backward reduces the gradients
    logs: bool        # ``last`` and the optimizer step that follows is a log step


class Task:
    """A job on the loop. ``setup`` sets ``cfg`` (possibly resolved further), ``data`` (with
    ``steps_per_epoch``, ``iter_epoch(epoch, start_step)`` yielding ``(pos, batch)`` whose
    ``batch["clip"]`` counts the clips, and ``stats()``) and ``model``; ``build_optimizer`` sets
    ``wrapped`` (DDP / FSDP2 or the model) and ``optimizer``. The loop calls, in order:
    ``check_checkpoint`` (resume only), ``setup``, ``build_optimizer``, ``load_state`` (resume only),
    ``start``, then per micro-batch ``prepare`` (on the prefetch thread) and ``step``, per optimizer
    step ``set_lr``, ``on_log`` (log steps), ``checkpoint_state`` / ``write_checkpoint`` (checkpoint
    steps), ``after_step``; last ``finish`` and ``close``."""

    cfg: Any = None
    data: Any = None
    model: Optional[torch.nn.Module] = None
    wrapped: Optional[torch.nn.Module] = None
    optimizer: Optional[torch.optim.Optimizer] = None

    def check_checkpoint(self, path: Path, ckpt: dict) -> None:
        """Refuse a checkpoint this task cannot resume (raise)."""

    def setup(self, run: Run) -> None:
        raise NotImplementedError

    def build_optimizer(self, schedule: Schedule) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """Extra words for the 'training N steps (...)' line."""
        return ""

    def load_state(self, ckpt: dict) -> None:
        """Load what ``checkpoint_state`` saved (model, optimizer, ...)."""

    def start(self, loop: "Loop") -> None:
        """Just before the first step (the run folder and config.json exist)."""

    def prepare(self, batch: dict, epoch: int, pos: int) -> Any:
        """Per micro-batch on the prefetch thread (host work that can run ahead)."""
        return None

    def step(self, batch: dict, prepared: Any, micro: Micro) -> dict:
        """The forward pass: ``{"loss": ..., other logged scalars}`` (device tensors); the loop
        runs the backward of ``loss / accum``."""
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def on_log(self, rec: dict) -> str:
        """A log step: add to ``rec`` (before it is written); returns the progress line's text."""
        return " ".join(f"{k} {v:.4f}" for k, v in rec.items() if k.startswith("loss"))

    def checkpoint_state(self) -> dict:
        """The task's part of a checkpoint (called on every rank: may be a collective)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def write_checkpoint(self, run_dir: Path, step: int, state: dict, keep_last: int) -> Path:
        return save_checkpoint(run_dir, step, state, keep_last)

    def after_step(self, loop: "Loop") -> None:
        """After an optimizer step, its log and checkpoint (not after a stop request)."""

    def finish(self, loop: "Loop") -> dict:
        """After the last step (progress closed, metrics still open): entries for the summary."""
        return {}

    def close(self) -> None:
        """Release the data (decode workers)."""


# ----------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------
def make_guard(task: Task, run: Run) -> NonFiniteGuard:
    """The non-finite guard of ``task``'s optimizer; fp16: a dynamic loss scale on the device,
    state saved with each checkpoint (and restored from the one resumed)."""
    cfg = task.cfg
    fp16 = amp_dtype(run.device, cfg.train.precision) == torch.float16
    guard = NonFiniteGuard(task.optimizer, (p for p in task.model.parameters() if p.requires_grad),
                           cfg.optim.clip_grad, cfg.train.max_nonfinite, run.device, loss_scale=fp16)
    if fp16 and run.ckpt is not None and "loss_scale" in run.ckpt:
        guard.load_scale_state(run.ckpt["loss_scale"])
    return guard


# A training step is, per micro-batch, ``task.step`` then :func:`backward`, and every ``accum``
# micro-batches :func:`update`; the loop adds gradient sync, logs and checkpoints. The profiler
# and the step benchmarks (mam2_fast/profile.py, benchmarks/) time these same calls.
def backward(guard: NonFiniteGuard, loss: torch.Tensor, accum: int) -> None:
    """The backward of one micro-batch: ``loss / accum`` (times the fp16 loss scale)."""
    (guard.scale_loss(loss) / accum).backward()


def update(task: Task, guard: NonFiniteGuard, lr: float) -> torch.Tensor:
    """One optimizer step at ``lr``: clip and step, a non-finite step skipped on the device
    (no host sync); returns the gradient norm (device)."""
    task.set_lr(lr)
    return guard.step()


class LogWindow:
    """Sums of the logged scalars between two log steps (device tensors: no host sync per step)."""

    def __init__(self):
        self.sums: dict = {}
        self.count, self.clips, self.t0 = 0, 0, time.time()

    def add(self, losses: dict, ok: torch.Tensor, clips: int) -> None:
        for k, v in losses.items():   # the logged means leave non-finite losses out
            self.sums[k] = self.sums.get(k, 0.0) + torch.where(ok, v.detach().float(), 0.0)
        self.count += 1
        self.clips += clips

    def add_grad_norm(self, gnorm: torch.Tensor) -> None:
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + torch.nan_to_num(gnorm.detach().float(), 0.0)

    def record(self, pos: Position, lr: float, accum: int, n_ok: float, n_skipped: int, world: int,
               data_stats: dict) -> dict:
        """The window's means (a window without a finite loss: NaN) and throughput."""
        dt = time.time() - self.t0
        n_opt = max(1, self.count // accum)
        return {"step": pos.step, "epoch": pos.epoch, "lr": lr,
                **{k: accel.host_float(v) / (n_opt if k == "grad_norm" else n_ok) if n_ok else float("nan")
                   for k, v in self.sums.items()},
                "clips_per_s": self.clips * world / max(dt, 1e-9), "skipped_steps": n_skipped,
                **{f"data_{k}": v for k, v in data_stats.items()}}


class Loop:
    """Steps of one run; the hooks get it to read ``pos``, ``schedule``, ``run`` and ``metrics``."""

    def __init__(self, task: Task, run: Run, schedule: Schedule, pos: Position):
        self.task, self.run, self.schedule, self.pos = task, run, schedule, pos
        cfg, dist = task.cfg, run.dist
        run.run_dir.mkdir(parents=True, exist_ok=True)
        if run.is_main:
            (run.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self.metrics = MetricsLogger(run.run_dir, tensorboard=cfg.train.tensorboard, enabled=run.is_main)
        self.progress = Progress(schedule.last_step, start=pos.step, enabled=cfg.train.progress and run.is_main)
        self.guard = make_guard(task, run)
        self.fsdp_sync = dist.enabled and hasattr(task.wrapped, "set_requires_gradient_sync")   # FSDP2
        self.prefetch_depth = auto_depth(cfg.train.prefetch, run.device)   # -1: 1 on CUDA, 0 on CPU
        self.window = LogWindow()
        self.micro = 0              # micro-batches accumulated towards the next optimizer step
        self.first_record: Optional[dict] = None
        self.last_record: Optional[dict] = None
        self.last_ckpt: Optional[Path] = None
        self.interrupted = False
        self.stop: Optional[StopRequest] = None
        s = schedule
        run.log(f"training {s.last_step - pos.step} steps ({s.steps_per_epoch}/epoch, effective batch "
                f"{s.effective_batch}"
                f"{f' = {cfg.train.batch_size} x {s.accum} accum x {run.world} ranks' if s.accum * run.world > 1 else ''}"
                f", peak lr {s.peak_lr:.2e}{task.describe()}) -> {run.run_dir}")

    def is_log_step(self, step: int) -> bool:
        return step % self.task.cfg.train.log_every == 0 or step == self.schedule.last_step

    def epoch_batches(self, epoch: int, start: int):
        """``(pos, batch, prepared)`` of ``epoch`` from micro-batch ``start`` up to ``epoch_micro``;
        runs on the prefetch thread (decode polling, upload, ``task.prepare``)."""
        end = self.schedule.epoch_micro
        if start >= end:
            return
        it = self.task.data.iter_epoch(epoch, start_step=start)
        try:
            for pos, batch in it:
                yield pos, batch, self.task.prepare(batch, epoch, pos)
                if pos + 1 >= end:
                    break
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def run_steps(self) -> None:
        """Epochs of micro-batches until the last step or a stop request."""
        batches: Optional[Prefetcher] = None
        try:
            with StopRequest() as self.stop:
                while self.pos.step < self.schedule.last_step:
                    batches = Prefetcher(self.epoch_batches(self.pos.epoch, self.pos.micro_pos), self.run.device,
                                         depth=self.prefetch_depth)
                    for pos, batch, prepared in batches:
                        if self.micro_batch(pos, batch, prepared):
                            return
                    batches.close()
                    self.pos.epoch += 1
                    self.pos.micro_pos = 0
        finally:  # every way out (an exception in the step too) stops the prefetch thread
            if batches is not None:
                batches.close()

    def grad_sync(self, last: bool):
        """Gradients are reduced across ranks on the last micro-batch of a step only."""
        wrapped = self.task.wrapped
        if self.fsdp_sync:            # FSDP2: reduce-scatter on the last micro-batch only
            wrapped.set_requires_gradient_sync(last)
        elif self.run.dist.enabled and not last and hasattr(wrapped, "no_sync"):
            return wrapped.no_sync()  # DDP
        return contextlib.nullcontext()

    def micro_batch(self, pos: int, batch: dict, prepared) -> bool:
        """One micro-batch (and the optimizer step it completes); True: the run is over."""
        accum = self.schedule.accum
        last = self.micro + 1 == accum
        micro = Micro(self.pos.step, self.pos.epoch, pos, self.micro, last,
                      last and self.is_log_step(self.pos.step + 1))
        with self.grad_sync(last):
            losses = self.task.step(batch, prepared, micro)
            backward(self.guard, losses["loss"], accum)
        ok = self.guard.micro(losses["loss"])
        self.window.add(losses, ok, batch["clip"].shape[0])
        self.pos.micro_pos = pos + 1
        self.micro += 1
        if self.micro < accum:
            return False
        self.micro = 0
        return self.optimizer_step()

    def optimizer_step(self) -> bool:
        """Step (no host sync: a non-finite step is skipped on the device), log, agree on a
        stop, checkpoint; True: the run is over."""
        lr = self.schedule.lr(self.pos.step)
        self.window.add_grad_norm(update(self.task, self.guard, lr))
        self.pos.step += 1
        step, last_step = self.pos.step, self.schedule.last_step
        if self.is_log_step(step):
            self.log_window(lr)
        want_stop = self.stop_agreed()
        if step % self.task.cfg.train.save_every == 0 or step == last_step or want_stop:
            self.save()
        if want_stop:
            self.run.log(f"stop requested (SIGTERM): checkpoint written at step {step}")
            self.interrupted = True
            return True
        self.task.after_step(self)
        return step >= last_step

    def log_window(self, lr: float) -> None:
        step = self.pos.step
        n_ok, n_skipped, new_skips, streak_error = self.guard.end_log_window(step, self.last_ckpt)
        rec = self.window.record(self.pos, lr, self.schedule.accum, n_ok, n_skipped, self.run.world,
                                 self.task.data.stats())
        text = self.task.on_log(rec)
        self.metrics.log(rec)
        self.first_record = self.first_record or rec
        self.last_record = rec
        self.progress.update(step, text, rec["clips_per_s"])
        self.window = LogWindow()
        if new_skips:
            self.run.log(f"step {step}: {new_skips} update(s) skipped since the last log (non-finite gradients)")
        if streak_error is not None:
            self.progress.close()
            raise streak_error

    def stop_agreed(self) -> bool:
        """A SIGTERM on any rank stops every rank at the same step (checked every
        ``train.stop_check_every`` steps under torchrun)."""
        want_stop = self.stop.requested
        dist = self.run.dist
        if not dist.enabled:
            return want_stop
        step = self.pos.step
        if step % self.task.cfg.train.stop_check_every == 0 or step == self.schedule.last_step:
            return D.all_ranks_agree(want_stop, dist, self.run.device)
        return False

    def save(self) -> None:
        task_state = self.task.checkpoint_state()   # every rank (a collective under DDP/FSDP)
        if not self.run.is_main:
            return
        cfg, world = self.task.cfg, self.run.world
        state = {**task_state, **self.pos.state(self.schedule.epoch_micro, cfg.train.batch_size * world),
                 "world_size": world, "rng": rng_state(), "config": cfg.to_dict(), "schedule": self.schedule.state()}
        if self.guard.scaled:
            state["loss_scale"] = self.guard.scale_state()
        self.last_ckpt = self.task.write_checkpoint(self.run.run_dir, self.pos.step, state, cfg.train.keep_last)

    def summary(self) -> dict:
        """Close the run: the task's last words, metrics, data, process group; the summary."""
        self.progress.close()
        extra = self.task.finish(self)
        self.metrics.close()
        self.task.close()
        run = self.run
        summary = {"run_dir": str(run.run_dir), "checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
                   "metrics": str(self.metrics.jsonl_path), "steps": self.pos.step, "interrupted": self.interrupted,
                   "skipped_steps": self.guard.total_skipped(), "first": self.first_record,
                   "last": self.last_record, "data_stats": self.task.data.stats(), "ranks_identical": None, **extra}
        if run.dist.enabled:
            summary["ranks_identical"] = D.weights_identical_across_ranks(self.task.model, run.dist, run.device)
            run.log(f"weights identical across {run.world} ranks: {summary['ranks_identical']}")
            D.cleanup_distributed()
        return summary


def run_task(task: Task, cfg, resume: Optional[str] = None, log=print) -> dict:
    """Train ``task`` from ``cfg`` (``resume``: a checkpoint file, or ``"auto"``: the latest in
    ``train.output_dir``); returns the summary (paths, first/last log records, steps)."""
    run = start(cfg, resume, log, task.check_checkpoint)
    task.setup(run)
    schedule = Schedule.plan(task.cfg, task.data.steps_per_epoch, run.world)
    task.build_optimizer(schedule)
    pos = restore(task, run)
    loop = Loop(task, run, schedule, pos)
    task.model.train()
    task.start(loop)
    loop.run_steps()
    return loop.summary()
