"""In-memory synthetic clips with the pre-training data API (no decoding), for fast tests."""
from __future__ import annotations

import torch


class SyntheticData:
    """Deterministic clips of a bright square moving over noise; same API as build_pretrain_data."""

    def __init__(self, num_videos: int, batch_size: int, num_frames: int, size: int, seed: int = 0):
        self.num_videos, self.batch_size = num_videos, batch_size
        self.T, self.size, self.seed = num_frames, size, seed
        self.steps_per_epoch = num_videos // batch_size
        self.samples_per_epoch = self.steps_per_epoch * batch_size

    def clip(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + index)
        T, S = self.T, self.size
        x = (torch.rand(1, 3, S, S, generator=g) * 0.2).repeat(T, 1, 1, 1)  # static background
        side = S // 4
        y0, x0 = torch.randint(0, S - side, (2,), generator=g).tolist()
        dy, dx = torch.randint(-3, 4, (2,), generator=g).tolist()
        color = torch.rand(3, 1, 1, generator=g)
        for t in range(T):
            yy = min(max(y0 + dy * t, 0), S - side)
            xx = min(max(x0 + dx * t, 0), S - side)
            x[t, :, yy: yy + side, xx: xx + side] = color
        return (x - 0.45) / 0.225

    def iter_epoch(self, epoch: int, start_step: int = 0):
        order = torch.randperm(self.num_videos, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        for step in range(start_step, self.steps_per_epoch):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            clips = torch.stack([self.clip(int(i)) for i in idx])
            yield step, {"clip": clips, "label": torch.zeros(len(idx), dtype=torch.long), "index": idx}

    def stats(self) -> dict:
        return {"bad_videos": 0}
