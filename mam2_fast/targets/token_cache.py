"""Optional offline cache of appearance-tokenizer codes, keyed by video path + frame index.

Why: the frozen tokenizer (VQGAN f16: ~29M-parameter conv encoder with attention, on every
frame of every clip) can cost as much as the ViT forward itself -- the paper names the
on-the-fly tokenizer as what limits its batch size. Codes of a frame depend only on the
pixels the tokenizer sees, so they can be computed once and read back from disk.

THE TRADE-OFF (accuracy vs speed):

* A cached code is only correct for the exact pixels it was computed from: one fixed
  *crop grid* (frame decode -> resize -> crop, recorded in ``meta.json`` as ``crop``).
  With the usual random-resized-crop / multi-scale-crop + horizontal-flip augmentation of
  pre-training, the cached codes do NOT match the augmented clip: the crop moves the
  patch grid and changes the scale, and a flip mirrors the grid but the tokenizer is not
  flip-equivariant. Using the cache then silently trains on targets of a different view.
  Use it only when the pipeline's crop grid matches the cached one (e.g. a fixed
  center/resize crop, or augmentation restricted to cached views), and treat a run with
  mismatched crops as an approximation, not a reproduction.
* In exchange the tokenizer's cost drops to a memory-mapped read (uint16 codes:
  ``2 * h * w`` bytes per frame, 392 B for 14x14), and the tokenizer weights need not be
  on the GPU at all.

Layout (next to the dataset by default: ``<dataset_root>/.token_cache/<tokenizer_id>/``):

* ``meta.json``: ``{"format": 1, "tokenizer": id, "vocab_size": K, "grid": [h, w],
  "crop": str, "dtype": "uint16"|"int32"}`` -- checked on open, a mismatch raises;
* ``<sha1(video path)[:24]>.npy``: ``[num_frames, h, w]`` codes, memory-mapped; frames not
  yet computed hold the sentinel (the dtype's max value).

Video paths are used as given (pass paths relative to the dataset root so the cache moves
with the dataset). Concurrent writers of different frames of a file are safe; file
creation goes through a temporary file + atomic rename.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

FORMAT_VERSION = 1


def default_cache_dir(dataset_root: str, tokenizer_id: str) -> str:
    """``<dataset_root>/.token_cache/<tokenizer_id>`` (the tokenizer id should name the
    checkpoint and preprocessing, e.g. ``vqgan_imagenet_f16_16384-224c``)."""
    return os.path.join(dataset_root, ".token_cache", tokenizer_id)


class TokenCache:
    """Memory-mapped per-video token arrays.

    Args:
        root: cache directory (created in write mode).
        tokenizer_id: name of tokenizer + weights + preprocessing; must match on reopen.
        vocab_size: tokenizer vocabulary (selects uint16 storage when < 65535).
        grid: token grid ``(h, w)`` per frame.
        crop: description of the fixed crop grid the codes belong to (e.g.
            ``"short_side_256/center_224"``); must match on reopen.
        writable: open for writing (``put``/``fill``); read-only otherwise.
        max_open: open memmaps kept (LRU).
    """

    def __init__(self, root: str, tokenizer_id: str, vocab_size: int, grid: Tuple[int, int], crop: str,
                 writable: bool = False, max_open: int = 64):
        self.root = root
        self.writable = bool(writable)
        self.grid = (int(grid[0]), int(grid[1]))
        self.vocab_size = int(vocab_size)
        self.dtype = np.dtype(np.uint16 if self.vocab_size < np.iinfo(np.uint16).max else np.int32)
        self.sentinel = int(np.iinfo(self.dtype).max)
        self.meta = {"format": FORMAT_VERSION, "tokenizer": str(tokenizer_id), "vocab_size": self.vocab_size,
                     "grid": list(self.grid), "crop": str(crop), "dtype": self.dtype.name}
        self.max_open = int(max_open)
        self._open: "OrderedDict[str, np.memmap]" = OrderedDict()
        meta_path = os.path.join(root, "meta.json")
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                found = json.load(f)
            diff = {k: (found.get(k), v) for k, v in self.meta.items() if found.get(k) != v}
            if diff:
                raise ValueError(f"token cache {root!r} was built for other settings "
                                 f"(field: (cached, requested)): {diff}")
        elif self.writable:
            os.makedirs(root, exist_ok=True)
            tmp = meta_path + f".tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.meta, f, indent=1)
            os.replace(tmp, meta_path)
        else:
            raise FileNotFoundError(f"token cache: no meta.json in {root!r} (build it with writable=True)")

    # -- files ------------------------------------------------------------------------
    @staticmethod
    def key(video: str) -> str:
        return hashlib.sha1(str(video).encode("utf-8")).hexdigest()[:24]

    def path(self, video: str) -> str:
        return os.path.join(self.root, self.key(video) + ".npy")

    def _array(self, video: str, num_frames: Optional[int] = None) -> Optional[np.memmap]:
        p = self.path(video)
        arr = self._open.get(p)
        if arr is not None:
            self._open.move_to_end(p)
            return arr
        if not os.path.isfile(p):
            if num_frames is None or not self.writable:
                return None
            tmp = p + f".tmp{os.getpid()}"
            a = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=(int(num_frames),) + self.grid)
            a[:] = self.sentinel
            a.flush()
            del a
            if not os.path.exists(p):
                os.replace(tmp, p)
            else:
                os.remove(tmp)
        arr = np.load(p, mmap_mode="r+" if self.writable else "r")
        if tuple(arr.shape[1:]) != self.grid:
            raise ValueError(f"token cache: {p} has grid {arr.shape[1:]}, expected {self.grid}")
        self._open[p] = arr
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return arr

    def __contains__(self, video: str) -> bool:
        return os.path.isfile(self.path(video))

    # -- read / write -----------------------------------------------------------------
    def get(self, video: str, frames: Sequence[int]) -> Optional[Tensor]:
        """Codes ``[T, h, w]`` (long) of the given frame indices, or None if the video or any
        of the frames is not cached."""
        arr = self._array(video)
        idx = np.asarray(frames, dtype=np.int64)
        if arr is None or idx.size == 0 or idx.max() >= arr.shape[0] or idx.min() < 0:
            return None
        out = np.asarray(arr[idx])
        if (out == self.sentinel).any():
            return None
        return torch.from_numpy(out.astype(np.int64))

    def put(self, video: str, frames: Sequence[int], ids: Tensor, num_frames: int) -> None:
        """Store codes ``[T, h, w]`` of ``frames`` of a video with ``num_frames`` frames."""
        if not self.writable:
            raise PermissionError(f"token cache {self.root!r} is open read-only")
        ids = torch.as_tensor(ids)
        idx = np.asarray(frames, dtype=np.int64)
        if tuple(ids.shape) != (len(idx),) + self.grid:
            raise ValueError(f"token cache: ids shape {tuple(ids.shape)} != {(len(idx),) + self.grid}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token cache: ids outside [0, {self.vocab_size})")
        arr = self._array(video, num_frames)
        if arr.shape[0] != int(num_frames):
            raise ValueError(f"token cache: {video!r} cached with {arr.shape[0]} frames, got num_frames={num_frames}")
        arr[idx] = ids.cpu().numpy().astype(self.dtype)

    def flush(self) -> None:
        for arr in self._open.values():
            if self.writable:
                arr.flush()

    def lookup(self, videos: Sequence[str], frames: Tensor) -> Tuple[Tensor, Tensor]:
        """Batch read: ``frames [B, T]`` indices -> ``(ids [B, T, h, w] long, hit [B] bool)``;
        rows without a full hit hold zeros."""
        frames = torch.as_tensor(frames)
        B, T = frames.shape
        ids = torch.zeros(B, T, *self.grid, dtype=torch.long)
        hit = torch.zeros(B, dtype=torch.bool)
        for b, v in enumerate(videos):
            got = self.get(v, frames[b].tolist())
            if got is not None:
                ids[b], hit[b] = got, True
        return ids, hit

    @torch.no_grad()
    def tokens_for(self, tokenizer, videos: Sequence[str], frames: Tensor, clip: Tensor,
                   num_frames: Optional[Sequence[int]] = None) -> Tensor:
        """Codes of a batch: cached rows are read, the others are tokenized from ``clip``
        (``[B, T, 3, H, W]`` in [0, 1], THE FIXED CROP the cache is for) and, when writable
        and ``num_frames`` is given, written back. Returns ``[B, T, h, w]`` long on
        ``clip.device``."""
        ids, hit = self.lookup(videos, frames)
        ids = ids.to(clip.device)
        miss = (~hit).nonzero().flatten().tolist()
        if miss:
            new = tokenizer.tokenize(clip[miss])
            if tuple(new.shape[-2:]) != self.grid:
                raise ValueError(f"token cache: tokenizer grid {tuple(new.shape[-2:])} != cache grid {self.grid}")
            ids[miss] = new.to(ids.dtype)
            if self.writable and num_frames is not None:
                for j, b in enumerate(miss):
                    self.put(videos[b], torch.as_tensor(frames[b]).tolist(), new[j].cpu(), int(num_frames[b]))
        return ids


__all__ = ["TokenCache", "default_cache_dir", "FORMAT_VERSION"]
