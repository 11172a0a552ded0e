"""Labeled clips for fine-tuning, evaluation and probing, built on :mod:`mam2_fast.data`.

Training (:class:`FinetuneTrainData`): the pre-training pipeline (resumable sampler, decode
workers, bad-video replacement) with fine-tuning views: ``data.num_sample`` clips per video
(repeated sampling), dense (``aug.sampling=dense``) or TSN segment sampling, then per clip a
random resized crop + flip (off when ``data.flip`` is false, e.g. SSv2), RandAugment drawn once
per clip, and mean/std normalization. Batches: ``{"clip": [B, T, 3, S, S], "label": [B],
"index": [B]}``.

Evaluation (:class:`ViewData`): every video of a list in order, ``K`` temporal clips x
``num_crops`` spatial crops (3: along the long side, 1: centre). Batches: ``{"views":
[B, V, T, 3, S, S], "label": [B], "index": [B]}`` with ``V = K * num_crops``; an unreadable
video is logged with its path, counted, and left out.

Adapter note: this module subclasses ``mam2_fast.data.loader.PretrainData`` (overriding
``_make_batch`` and the temporal sampling of ``source``) because the data package does not
yet expose a fine-tuning/test loader.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mam2_fast.data.augment import crop_resize_normalize, make_params
from mam2_fast.data.config import DataConfig
from mam2_fast.data.dataset import ClipSource, TemporalSampling
from mam2_fast.data.loader import PretrainData, _decode_threads
from mam2_fast.data.sampling import Box, center_crop_box, rng_for, segment_indices, three_crop_boxes
from mam2_fast.data.video_list import read_list_file
from mam2_fast.data.workers import DecodePool
from mam2_fast.ft.randaugment import RandAugment

log = logging.getLogger("mam2_fast.ft")

DEMO_VAL_SEED = 1          # demo evaluation videos: a different seed than the pre-training set (0)
DEMO_VAL_VIDEOS = 48


# ----------------------------------------------------------------------------------------
# sampling helpers
# ----------------------------------------------------------------------------------------
def random_resized_crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                            rng: np.random.Generator) -> Box:
    """torchvision ``RandomResizedCrop.get_params`` with an explicit generator: ``(x0, y0, w, h)``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # fallback: central crop with the ratio clamped into range
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def segment_test_clips(num_video_frames: int, num_segments: int, num_clips: int) -> List[np.ndarray]:
    """TSN testing with ``K`` clips: clip ``k`` takes offset ``(k + 0.5) / K`` inside every segment
    (VideoMAE SSv2 ``test_num_segment``); ``K = 1`` is the segment middles."""
    if num_clips == 1:
        return [segment_indices(num_video_frames, num_segments, None)]
    seg = num_video_frames / num_segments
    return [np.minimum((seg * np.arange(num_segments) + seg * (k + 0.5) / num_clips).astype(np.int64),
                       num_video_frames - 1) for k in range(num_clips)]


class SegmentTestSampling(TemporalSampling):
    """``TemporalSampling`` for K TSN test clips (picklable: shipped to decode workers)."""

    def indices(self, num_video_frames: int, rng: np.random.Generator) -> List[np.ndarray]:
        return segment_test_clips(num_video_frames, self.num_frames, self.num_clips)


def torch_generator(*keys: int) -> torch.Generator:
    seed = int(rng_for(*keys, tag="crop").integers(0, 2 ** 62))
    return torch.Generator().manual_seed(seed)


def pixel_scale_std() -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """mean/std making ``crop_resize_normalize`` output raw pixel values in [0, 255]."""
    return (0.0, 0.0, 0.0), (1.0 / 255.0,) * 3


def normalize_(pix: torch.Tensor, mean, std) -> torch.Tensor:
    """pixels [..., 3, H, W] in [0, 255] -> (x / 255 - mean) / std, in place."""
    m = torch.tensor(mean, dtype=pix.dtype, device=pix.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=pix.dtype, device=pix.device).view(3, 1, 1)
    return pix.div_(255.0).sub_(m).div_(s)


# ----------------------------------------------------------------------------------------
# training data
# ----------------------------------------------------------------------------------------
class FinetuneTrainData(PretrainData):
    """Fine-tuning batches (see module docstring); iterate with ``iter_epoch(epoch, start_step)``."""

    def __init__(self, cfg: DataConfig, aug, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device = torch.device("cpu")):
        super().__init__(cfg, batch_size, seed, rank, world_size, device)
        self.aug = aug
        mode = "segment" if aug.sampling == "segment" else "dense"
        temporal = TemporalSampling(mode, cfg.num_frames, cfg.sampling_stride, cfg.num_sample,
                                    cfg.short_video, train=True)
        backend = "frames" if cfg.format == "frames" else cfg.backend
        self.source = ClipSource(self.records, temporal, backend, _decode_threads(cfg), cfg.frame_pattern,
                                 cfg.decode_short_side)
        self.randaug = RandAugment(aug.rand_n, aug.rand_m, aug.rand_mstd) if aug.rand_augment and aug.rand_n > 0 else None

    def _make_batch(self, epoch: int, videos: List[Tuple[int, int, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        cfg, S = self.cfg, self.cfg.num_sample
        B, T = len(videos) * S, cfg.num_frames
        pix = torch.empty(B, T, 3, cfg.input_size, cfg.input_size, dtype=torch.float32, device=self.device)
        pmean, pstd = pixel_scale_std()
        groups: Dict[Tuple[int, int], List[int]] = {}
        for v, (_, _, frames) in enumerate(videos):
            groups.setdefault(tuple(frames.shape[2:4]), []).append(v)
        for (H, W), members in groups.items():
            src = torch.stack([videos[v][2] for v in members]).flatten(0, 1).to(self.device)  # [V*S, T, H, W, 3]
            rows = []
            for g, v in enumerate(members):
                pos, index, _ = videos[v]
                for s in range(S):
                    rng = rng_for(self.seed, epoch, self.rank, pos, index, s, tag="crop")
                    box = random_resized_crop_box(H, W, self.aug.scale, self.aug.ratio, rng)
                    flip = cfg.flip and bool(rng.random() < 0.5)
                    rows.append((g * S + s, v * S + s, box, flip))
            crop_resize_normalize(src, make_params(*zip(*rows)), pmean, pstd, pix, impl=cfg.augment_impl)
        for v, (pos, index, _) in enumerate(videos):
            for s in range(S):
                if self.randaug is not None:
                    g = torch_generator(self.seed, epoch, self.rank, pos, index, s, 7)
                    pix[v * S + s] = self.randaug(pix[v * S + s], g)
        clip = normalize_(pix, cfg.mean, cfg.std).to(self.out_dtype)
        index = torch.tensor([i for _, i, _ in videos], dtype=torch.long).repeat_interleave(S)
        return {"clip": clip, "label": self.labels[index].to(self.device), "index": index.to(self.device)}


# ----------------------------------------------------------------------------------------
# evaluation views
# ----------------------------------------------------------------------------------------
class ViewData:
    """Multi-view test clips of every video in ``list_file``, in list order."""

    def __init__(self, cfg: DataConfig, list_file: str, num_clips: int, num_crops: int = 3,
                 sampling: str = "dense", batch_size: int = 4, device: torch.device = torch.device("cpu"),
                 limit: Optional[int] = None, shard: Tuple[int, int] = (0, 1)):
        """``shard=(rank, world)``: this process reads every ``world``-th video from ``rank`` on
        (labels and indices stay those of the whole list; ``evaluate.run_views`` merges the
        shards back into list order)."""
        self.cfg, self.num_clips, self.num_crops = cfg, num_clips, num_crops
        self.batch_size, self.device = batch_size, torch.device(device)
        self.list_file = list_file
        self.records = read_list_file(list_file, cfg.root, cfg.format)[:limit]
        self.labels = torch.tensor([r.label for r in self.records], dtype=torch.long)
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"ViewData: shard {shard} is not (rank, world) with 0 <= rank < world")
        self.ids = list(range(rank, len(self.records), world))     # the videos this process reads
        if sampling == "segment":
            temporal = SegmentTestSampling("segment", cfg.num_frames, cfg.sampling_stride, num_clips,
                                           cfg.short_video, train=False)
        else:
            temporal = TemporalSampling("test", cfg.num_frames, cfg.sampling_stride, num_clips,
                                        cfg.short_video, train=False)
        backend = "frames" if cfg.format == "frames" else cfg.backend
        self.source = ClipSource(self.records, temporal, backend, _decode_threads(cfg), cfg.frame_pattern,
                                 cfg.decode_short_side)
        self.skipped: List[str] = []

    @property
    def views_per_video(self) -> int:
        return self.num_clips * self.num_crops

    def __len__(self) -> int:
        return len(self.ids)

    def _views(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [K, T, H, W, 3] -> normalized [K * crops, T, 3, S, S] (clip-major)."""
        K, T, H, W, _ = frames.shape
        cfg = self.cfg
        boxes = three_crop_boxes(H, W) if self.num_crops == 3 else [center_crop_box(H, W)]
        out = torch.empty(K * len(boxes), T, 3, cfg.input_size, cfg.input_size, dtype=torch.float32, device=self.device)
        rows = [(k, k * len(boxes) + c, box, False) for k in range(K) for c, box in enumerate(boxes)]
        crop_resize_normalize(frames.to(self.device), make_params(*zip(*rows)), cfg.mean, cfg.std, out,
                              impl=cfg.augment_impl)
        return out

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        c = self.cfg
        pool = DecodePool(self.source, c.num_workers, c.prefetch, c.decode_timeout_s, c.mp_context,
                          c.max_worker_restarts)
        done: Dict[int, Optional[torch.Tensor]] = {}
        ids = self.ids
        next_submit, next_emit = 0, 0          # positions in ids
        batch: List[Tuple[int, torch.Tensor]] = []
        try:
            while next_emit < len(ids):
                while next_submit < len(ids) and next_submit - next_emit < 4 * max(1, c.num_workers) * c.prefetch \
                        and pool.submit((ids[next_submit], ids[next_submit], (0, ids[next_submit]))):
                    next_submit += 1
                for ev in pool.poll(timeout=1.0):
                    if ev.kind == "ok":
                        done[ev.task_id] = torch.as_tensor(ev.payload)
                    elif ev.kind == "requeue":
                        pool_resubmit = ev.task_id
                        while not pool.submit((pool_resubmit, pool_resubmit, (0, pool_resubmit))):
                            pool.poll(timeout=0.1)
                    else:
                        path = self.records[ev.task_id].path
                        log.warning("eval: skipping unreadable video %s (%s: %s)", path, ev.kind, ev.payload)
                        self.skipped.append(path)
                        done[ev.task_id] = None
                while next_emit < len(ids) and ids[next_emit] in done:
                    frames = done.pop(ids[next_emit])
                    if frames is not None:
                        batch.append((ids[next_emit], self._views(frames)))
                    next_emit += 1
                    if len(batch) == self.batch_size:
                        yield self._collate(batch)
                        batch = []
            if batch:
                yield self._collate(batch)
        finally:
            pool.close()

    def _collate(self, batch: List[Tuple[int, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        index = torch.tensor([i for i, _ in batch], dtype=torch.long)
        return {"views": torch.stack([v for _, v in batch]), "label": self.labels[index].to(self.device),
                "index": index.to(self.device)}


# ----------------------------------------------------------------------------------------
# demo splits
# ----------------------------------------------------------------------------------------
def demo_lists(cfg: DataConfig, val_videos: int = DEMO_VAL_VIDEOS) -> Tuple[str, str]:
    """(train list, evaluation list) of the procedural demo set: the training split is the
    pre-training demo set (``data.demo_dir``, seed 0); the evaluation split is generated with
    seed 1 in ``<demo_dir>-val`` (disjoint videos, same 12 classes)."""
    from mam2_fast.data import make_demo_dataset

    root = os.path.expanduser(cfg.demo_dir).rstrip("/")
    train = make_demo_dataset(root, num_videos=cfg.demo_num_videos, seed=0)
    val = make_demo_dataset(f"{root}-val", num_videos=val_videos, seed=DEMO_VAL_SEED)
    return train, val


def labels_file_for(list_file: str) -> Optional[str]:
    """``labels.json`` beside a list file (the demo set writes one), else None."""
    p = os.path.join(os.path.dirname(os.path.abspath(list_file)), "labels.json")
    return p if os.path.isfile(p) else None


def class_names(list_file: str, num_classes: int) -> List[str]:
    import json

    p = labels_file_for(list_file)
    if p:
        with open(p) as f:
            names = json.load(f).get("names")
        if names and len(names) == num_classes:
            return list(names)
    return [str(i) for i in range(num_classes)]
