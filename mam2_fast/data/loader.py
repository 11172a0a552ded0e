"""The pre-training input pipeline: sampler -> decode workers -> device augmentation.

    data = build_pretrain_data(cfg.data, batch_size=B, seed=0, rank=0, world_size=1, device=dev)
    for step, batch in data.iter_epoch(epoch, start_step=0):
        batch["clip"]   # [B, T, 3, S, S] float32/bf16 on dev, normalized
        batch["label"]  # long [B];  batch["index"]: long [B] dataset indices

Workers only decode (uint8 ``[num_sample, T, H, W, 3]`` per video); crops, flips, resizing and
normalization run on ``device`` in one fused pass (:mod:`.augment`). A batch holds
``B / num_sample`` videos, each contributing ``num_sample`` differently augmented clips.

A video that fails to decode (or times out) is logged with its path, counted in
:meth:`PretrainData.stats`, and replaced by another video drawn deterministically from
(seed, epoch, rank, position, attempt); too many failures stop the run with a clear error
(:class:`~mam2_fast.errors.DataError`). A clip whose decode worker died (killed, out of
memory) is decoded again by the replacement worker, once: the batch is the one an
uninterrupted run sees; if that worker dies too, the video counts as unreadable.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from mam2_fast.errors import DataError, UserValueError

from .augment import crop_resize_normalize, make_params
from .config import DataConfig
from .dataset import ClipSource, TemporalSampling
from .sampler import ResumableSampler
from .sampling import multiscale_crop_box, rng_for
from .video_list import read_list_file
from .workers import DecodePool

log = logging.getLogger("mam2_fast.data")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_MAX_ATTEMPTS = 20        # replacements tried for one batch position before giving up
_MIN_JUDGED = 16          # decodes before max_bad_fraction is enforced


def resolve_list_file(cfg: DataConfig) -> str:
    if cfg.list_file is not None:
        return cfg.list_file
    if cfg.demo:
        from .demo import make_demo_dataset
        return make_demo_dataset(cfg.demo_dir, num_videos=cfg.demo_num_videos, seed=0)
    raise UserValueError("data.list_file is required unless data.demo is true")


def local_world_size() -> int:
    """Processes on this node (torchrun's ``LOCAL_WORLD_SIZE``; 1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _decode_threads(cfg: DataConfig) -> int:
    """``data.decode_threads``, or the node's cores shared by every decode worker of every
    local rank: ``cpu_count // (num_workers * LOCAL_WORLD_SIZE)`` (at least 1)."""
    if cfg.decode_threads > 0:
        return cfg.decode_threads
    return max(1, (os.cpu_count() or 1) // (max(1, cfg.num_workers) * local_world_size()))


class PretrainData:
    def __init__(self, cfg: DataConfig, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device = torch.device("cpu")):
        if batch_size % cfg.num_sample:
            raise ValueError(f"batch size {batch_size} must be a multiple of data.num_sample={cfg.num_sample}")
        if cfg.out_dtype not in _DTYPES:
            raise ValueError(f"data.out_dtype must be one of {tuple(_DTYPES)}, got {cfg.out_dtype!r}")
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.out_dtype = _DTYPES[cfg.out_dtype]
        self.list_file = resolve_list_file(cfg)
        self.records = read_list_file(self.list_file, cfg.root, cfg.format)
        self.labels = torch.tensor([r.label for r in self.records], dtype=torch.long)
        temporal = TemporalSampling("dense", cfg.num_frames, cfg.sampling_stride, cfg.num_sample,
                                    cfg.short_video, train=True)
        backend = "frames" if cfg.format == "frames" else cfg.backend
        self.source = ClipSource(self.records, temporal, backend, _decode_threads(cfg), cfg.frame_pattern,
                                 cfg.decode_short_side)
        self.videos_per_step = batch_size // cfg.num_sample
        self.sampler = ResumableSampler(len(self.records), seed=seed, rank=rank, world_size=world_size,
                                        num_sample=cfg.num_sample, videos_per_step=self.videos_per_step,
                                        epoch_unit=cfg.epoch_unit)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.samples_per_epoch = self.steps_per_epoch * batch_size * world_size
        self._stats: Counter = Counter()
        self._pool: Optional[DecodePool] = None
        self._task_ids = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    # -- lifecycle --------------------------------------------------------------------
    @property
    def pool(self) -> DecodePool:
        if self._pool is None:
            c = self.cfg
            self._pool = DecodePool(self.source, c.num_workers, c.prefetch, c.decode_timeout_s,
                                    c.mp_context, c.max_worker_restarts)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def stats(self) -> Dict[str, int]:
        s = {k: 0 for k in ("decoded_videos", "bad_videos", "decode_timeouts", "worker_restarts")}
        s.update(self._stats)
        if self._pool is not None:
            s["worker_restarts"] = self._pool.restarts
        return dict(s)

    # -- iteration --------------------------------------------------------------------
    def global_pos(self, pos: int) -> int:
        """This rank's video position -> its position in the epoch's global order (videos are
        dealt round-robin). Random choices are keyed by it, so the clip at a global position is
        the same for every world size: a run resumed on another number of GPUs, or a single
        process with the same global batch, sees identical clips."""
        return pos * self.world_size + self.rank

    def _replacement(self, epoch: int, pos: int, attempt: int) -> int:
        rng = rng_for(self.seed, epoch, self.global_pos(pos), attempt, tag="replace")
        return int(rng.integers(len(self.records)))

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        """Yields ``(step_in_epoch, batch)`` for ``start_step <= step < steps_per_epoch``."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        order = self.sampler.rank_order(epoch)
        vps = self.videos_per_step
        pool = self.pool
        lookahead = max(2 * vps, pool.capacity())
        tasks: Dict[int, Tuple[int, int, int]] = {}      # task_id -> (pos, attempt, index)
        ready: Dict[int, Tuple[int, torch.Tensor]] = {}  # pos -> (index, frames)
        retry: List[Tuple[int, int, int]] = []           # (pos, attempt, index) to resubmit
        next_pos = start_step * vps
        epoch_bad = epoch_done = 0
        lost_once: set = set()                           # (pos, attempt) whose worker died once

        def submit(pos: int, attempt: int, index: int) -> bool:
            self._task_ids += 1
            keys = (self.seed, epoch, self.global_pos(pos), attempt)
            if not pool.submit((self._task_ids, index, keys)):
                return False
            tasks[self._task_ids] = (pos, attempt, index)
            return True

        try:
            for step in range(start_step, self.steps_per_epoch):
                want = range(step * vps, (step + 1) * vps)
                while not all(p in ready for p in want):
                    while retry and submit(*retry[0]):
                        retry.pop(0)
                    while not retry and next_pos < min(len(order), step * vps + lookahead) \
                            and submit(next_pos, 0, int(order[next_pos])):
                        next_pos += 1
                    for ev in pool.poll(timeout=1.0):
                        if ev.task_id not in tasks:
                            continue  # left over from an abandoned epoch
                        pos, attempt, index = tasks.pop(ev.task_id)
                        if ev.kind == "ok":
                            ready[pos] = (index, torch.as_tensor(ev.payload))
                            self._stats["decoded_videos"] += 1
                            epoch_done += 1
                            continue
                        if ev.kind == "requeue":
                            retry.append((pos, attempt, index))
                            continue
                        if ev.kind == "lost" and (pos, attempt) not in lost_once:
                            # the worker died (killed, OOM): decode the same clip again, once
                            lost_once.add((pos, attempt))
                            log.warning("data: decode worker lost while decoding %s (%s); decoding it again",
                                        self.records[index].path, ev.payload)
                            retry.append((pos, attempt, index))
                            continue
                        # bad | timeout | lost: this video failed; draw a replacement
                        key = "decode_timeouts" if ev.kind == "timeout" else "bad_videos"
                        self._stats[key] += 1
                        epoch_bad += 1
                        epoch_done += 1
                        path = self.records[index].path
                        log.warning("data: skipping unreadable video %s (%s: %s)", path, ev.kind, ev.payload)
                        if attempt + 1 >= _MAX_ATTEMPTS:
                            raise DataError(f"data: {_MAX_ATTEMPTS} videos in a row failed to decode "
                                               f"(last: {path}); is the dataset readable with backend "
                                               f"{self.source.backend_name!r}?")
                        if epoch_done >= _MIN_JUDGED and epoch_bad > self.cfg.max_bad_fraction * epoch_done:
                            raise DataError(f"data: {epoch_bad} of {epoch_done} videos failed to decode "
                                               f"this epoch (> data.max_bad_fraction={self.cfg.max_bad_fraction}); "
                                               f"last: {path}")
                        retry.append((pos, attempt + 1, self._replacement(epoch, pos, attempt + 1)))
                yield step, self._make_batch(epoch, [(p, *ready.pop(p)) for p in want])
        finally:
            for task_id in list(tasks):  # results of abandoned tasks are dropped by poll's caller
                tasks.pop(task_id)

    # -- batch assembly ---------------------------------------------------------------
    def _make_batch(self, epoch: int, videos: List[Tuple[int, int, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """videos: (pos, index, uint8 [S, T, H, W, 3]) -> the batch dict on ``self.device``."""
        cfg, S = self.cfg, self.cfg.num_sample
        B, T = len(videos) * S, cfg.num_frames
        out = torch.empty(B, T, 3, cfg.input_size, cfg.input_size, dtype=self.out_dtype, device=self.device)
        # group videos by resolution: one stacked upload + one kernel launch per group
        groups: Dict[Tuple[int, int], List[int]] = {}
        for v, (_, _, frames) in enumerate(videos):
            groups.setdefault(tuple(frames.shape[2:4]), []).append(v)
        for (H, W), members in groups.items():
            src = torch.stack([videos[v][2] for v in members]).flatten(0, 1)   # [V*S, T, H, W, 3]
            if self.device.type == "cuda":
                src = src.pin_memory().to(self.device, non_blocking=True)
            rows = []
            for g, v in enumerate(members):
                pos, index, _ = videos[v]
                for s in range(S):
                    rng = rng_for(self.seed, epoch, self.global_pos(pos), index, s, tag="crop")
                    box = multiscale_crop_box(H, W, cfg.input_size, rng, cfg.multiscale_scales,
                                              cfg.max_distort, cfg.fix_crop)
                    flip = cfg.flip and bool(rng.random() < 0.5)
                    rows.append((g * S + s, v * S + s, box, flip))
            params = make_params(*zip(*rows)) if rows else None
            crop_resize_normalize(src, params, cfg.mean, cfg.std, out, impl=cfg.augment_impl)
        index = torch.tensor([i for _, i, _ in videos], dtype=torch.long).repeat_interleave(S)
        label = self.labels[index]
        if self.device.type == "cuda":  # pinned staging: the copies do not block the host
            label, index = label.pin_memory(), index.pin_memory()
        return {"clip": out, "label": label.to(self.device, non_blocking=True),
                "index": index.to(self.device, non_blocking=True)}


def build_pretrain_data(cfg: DataConfig, batch_size: int, seed: int = 0, rank: int = 0,
                        world_size: int = 1, device: torch.device = torch.device("cpu")) -> PretrainData:
    """The pre-training pipeline for one rank (see module docstring)."""
    return PretrainData(cfg, batch_size, seed, rank, world_size, device)
