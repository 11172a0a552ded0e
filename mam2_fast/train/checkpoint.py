"""Atomic checkpoints: write to a temporary file in the same folder, fsync, rename.

A run folder holds ``checkpoint-<step>.pt`` files and ``latest.txt`` naming the newest
complete one. A process killed at any moment leaves either the old or the new checkpoint,
never a torn file.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


def _atomic_write(path: Path, write_fn) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep_last: int = 2) -> Path:
    run_dir = Path(run_dir)
    path = run_dir / f"checkpoint-{step:08d}.pt"
    _atomic_write(path, lambda f: torch.save(state, f))
    _atomic_write(run_dir / "latest.txt", lambda f: f.write(path.name.encode()))
    old = sorted(run_dir.glob("checkpoint-*.pt"))[:-keep_last]
    for p in old:
        try:
            p.unlink()
        except OSError:
            pass
    return path


def find_latest(run_dir: str | Path) -> Optional[Path]:
    run_dir = Path(run_dir)
    pointer = run_dir / "latest.txt"
    if pointer.is_file():
        p = run_dir / pointer.read_text().strip()
        if p.is_file():
            return p
    found = sorted(run_dir.glob("checkpoint-*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from e
