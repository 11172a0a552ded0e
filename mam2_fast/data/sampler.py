"""Deterministic, resumable, distributed-aware order of videos.

An epoch decodes ``M = ceil(N / num_sample)`` videos so that, with repeated sampling, an
epoch counts ``N`` effective samples (MAE-ST Sec. 4). Videos come from an endless stream of
seeded permutations of the dataset (pass ``p`` is ``perm(seed, p)``), so every video is
seen equally often even when ``M < N``. The epoch's ``M`` videos are padded by wrapping to a
multiple of ``world_size`` and dealt round-robin to ranks (like ``DistributedSampler``).

Everything is a pure function of (seed, epoch, rank, world_size, position): resuming at a
position yields exactly the videos the uninterrupted run would have seen.
"""
from __future__ import annotations

import math
from typing import Iterator, Tuple

import numpy as np


class ResumableSampler:
    def __init__(self, num_items: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_sample: int = 1, videos_per_step: int = 1, epoch_unit: str = "clips"):
        if num_items <= 0:
            raise ValueError("sampler: dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"sampler: rank {rank} outside world size {world_size}")
        self.num_items, self.seed = num_items, seed
        self.rank, self.world_size = rank, world_size
        if epoch_unit not in ("clips", "videos"):
            raise ValueError(f"sampler: epoch_unit must be 'clips' or 'videos', got {epoch_unit!r}")
        # global, before padding: "clips" reads N / num_sample videos (N clips), "videos" all N
        self.videos_per_epoch = num_items if epoch_unit == "videos" else math.ceil(num_items / num_sample)
        self.videos_per_rank = math.ceil(self.videos_per_epoch / world_size)
        self.videos_per_step = videos_per_step
        self.steps_per_epoch = self.videos_per_rank // videos_per_step     # drop_last
        if self.steps_per_epoch == 0:
            raise ValueError(f"sampler: {num_items} videos give no full batch of {videos_per_step} "
                             f"videos per rank on {world_size} rank(s); lower the batch size")

    def _perm(self, p: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 0x5EED, p])))
        return rng.permutation(self.num_items)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All ranks' videos of ``epoch``, padded: int64 [videos_per_rank * world_size]."""
        n, m = self.num_items, self.videos_per_epoch
        g0 = epoch * m
        passes = range(g0 // n, (g0 + m - 1) // n + 1)
        stream = np.concatenate([self._perm(p) for p in passes])
        order = stream[g0 - passes[0] * n: g0 - passes[0] * n + m]
        total = self.videos_per_rank * self.world_size
        return np.resize(order, total)  # wraps around to pad

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's videos of ``epoch``, in order: int64 [steps_per_epoch * videos_per_step]."""
        mine = self.epoch_order(epoch)[self.rank::self.world_size]
        return mine[: self.steps_per_epoch * self.videos_per_step]

    def iter_positions(self, epoch: int, start_step: int = 0) -> Iterator[Tuple[int, int]]:
        """Yields ``(position, video_index)`` from ``start_step`` on."""
        order = self.rank_order(epoch)
        for pos in range(start_step * self.videos_per_step, len(order)):
            yield pos, int(order[pos])
