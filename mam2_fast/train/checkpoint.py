"""Checkpoints that survive kills, storage glitches and full disks.

A run folder holds ``checkpoint-<step>.pt`` files, a ``checkpoint-<step>.pt.sha256`` beside
each (``sha256sum`` format: ``sha256sum -c checkpoint-00000500.pt.sha256`` checks it by hand)
and ``latest.txt`` naming the newest complete one.

* Writes are atomic: the checkpoint and its checksum go to temporary files in the same folder
  (hashed while written, fsynced), are renamed into place (checksum first), then ``latest.txt``
  is replaced. A process killed at any moment leaves the old or the new checkpoint, never a
  torn one; :func:`clean_stale_tmp` removes temporary files a killed writer left behind.
* No space left on the device (or a folder that turned read-only) while saving: the temporary
  file is removed, the previous checkpoint is untouched, and a :class:`CheckpointError` says so.
* Pruning (``keep_last``) only removes older checkpoints that carry a checksum file (written
  by this code) and a step below the one just written.
* Reading (:func:`load_checkpoint`) verifies the checksum and unpickles with
  ``weights_only=True``: a checkpoint holds tensors and plain Python types only (the RNG
  states are stored as tensors), so loading one never runs code from the file.
* :func:`find_resumable` (``--resume``) walks back from the newest checkpoint to the newest one
  that verifies and loads, naming each one it skips.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch

from mam2_fast.errors import CheckpointError, OutputDirError, UserFileNotFoundError

log = logging.getLogger("mam2_fast.checkpoint")

_CKPT = re.compile(r"^checkpoint-(\d+)\.pt$")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
# files a training run writes into its output folder (a new run refuses a folder holding them)
RUN_FILES = ("latest.txt", "metrics.jsonl", "metrics.csv", "config.json", "tokenizer.pt")


class _HashingWriter:
    """File wrapper: hashes what is written and remembers the OSError a write hit (torch.save
    turns it into a cryptic ``unexpected pos`` RuntimeError)."""

    def __init__(self, f):
        self.f, self.sha, self.size, self.error = f, hashlib.sha256(), 0, None

    def write(self, b) -> int:
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = e
            raise
        self.sha.update(memoryview(b)[:n] if n is not None else b)
        self.size += n if n is not None else len(b)
        return n

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path: Path, e: BaseException, writer: Optional[_HashingWriter]) -> Optional[CheckpointError]:
    """A clear error for a failed write (disk full, read-only folder), or None for other failures."""
    os_err = writer.error if writer is not None and writer.error is not None else e
    code = getattr(os_err, "errno", None)
    if code in _NO_SPACE:
        return CheckpointError(f"no space left on the device while writing {path} "
                               f"({os.strerror(code)}); nothing was replaced: the previous checkpoint "
                               f"is intact. Free space (or lower train.keep_last) and resume.")
    if code in _READ_ONLY:
        return CheckpointError(f"cannot write {path}: {os.strerror(code)} (is {path.parent} read-only?); "
                               f"the previous checkpoint is intact")
    return None


def _tmp_for(path: Path) -> Tuple[int, str]:
    try:
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e, None) or e


def _atomic_write(path: Path, write_fn: Callable, sidecar: Optional[Path] = None) -> str:
    """Write ``path`` atomically; returns its sha256. With ``sidecar``, a ``sha256sum`` line for
    ``path`` is written there too, and renamed into place just before ``path`` itself."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _tmp_for(path)
    tmps = [tmp]
    writer = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            write_fn(writer)
            f.flush()
            os.fsync(f.fileno())
        digest = writer.sha.hexdigest()
        if os.path.getsize(tmp) != writer.size:   # the writer sought back: hash the file instead
            digest = sha256_file(tmp)
        if sidecar is not None:
            sfd, stmp = _tmp_for(sidecar)
            tmps.append(stmp)
            with os.fdopen(sfd, "wb") as f:
                f.write(f"{digest}  {path.name}\n".encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(stmp, sidecar)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return digest
    except BaseException as e:
        for t in tmps:
            try:
                os.unlink(t)
            except OSError:
                pass
        if isinstance(e, Exception):
            clear = _write_error(path, e, writer)
            if clear is not None:
                raise clear from e
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


# ----------------------------------------------------------------------------------------
# RNG state as tensors and plain types (loadable with weights_only=True)
# ----------------------------------------------------------------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    if isinstance(npst, dict):
        keys = npst["keys"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((npst["kind"], keys.astype(np.uint32), npst["pos"], npst["has_gauss"],
                             npst["cached_gaussian"]))
    else:  # checkpoints written before the weights_only format
        np.random.set_state(npst)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------
# run folder
# ----------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> List[Tuple[int, Path]]:
    """``(step, path)`` of the folder's ``checkpoint-<step>.pt`` files, oldest first."""
    run_dir = Path(run_dir)
    out = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = _CKPT.match(p.name)
            if m and p.is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def clean_stale_tmp(run_dir: str | Path) -> List[Path]:
    """Remove temporary files a killed checkpoint writer left (``.checkpoint-*.tmp``,
    ``.latest.txt.*.tmp``) and checksum files whose checkpoint is gone. Returns them."""
    run_dir = Path(run_dir)
    removed = []
    if not run_dir.is_dir():
        return removed
    for p in run_dir.iterdir():
        n = p.name
        stale = (n.startswith((".checkpoint-", ".latest.txt.")) and n.endswith(".tmp")) or \
                (n.startswith("checkpoint-") and n.endswith(".pt.sha256") and not (run_dir / n[:-7]).exists())
        if stale and p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def run_files(run_dir: str | Path) -> List[Path]:
    """The files of a training run present in ``run_dir`` (checkpoints, metrics, config, ...)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for _, p in list_checkpoints(run_dir)]
    found += [run_dir / n for n in RUN_FILES if (run_dir / n).exists()]
    return found


def prepare_run_dir(run_dir: str | Path, resuming: bool, overwrite: bool = False, is_main: bool = True,
                    log_fn: Callable[[str], Any] = print) -> Path:
    """Make ``run_dir`` ready for a run, before anything is built.

    A folder holding another run's files is refused unless the run resumes (``--resume``) or
    ``overwrite`` is set (``--overwrite`` / ``train.overwrite=true``): then that run's files
    (checkpoints that carry a checksum file, ``latest.txt``, metrics, ``config.json``,
    ``tokenizer.pt``, ``tb/``) are removed, and nothing else. Stale temporary files of a killed
    writer are removed; a folder that cannot be written is a clear error.
    """
    run_dir = Path(run_dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputDirError(f"train.output_dir {run_dir} exists and is not a folder")
    existing = run_files(run_dir)
    if existing and not resuming:
        if not overwrite:
            names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
            raise OutputDirError(
                f"train.output_dir {run_dir} already holds a run ({names}); pass --resume to continue it, "
                f"--overwrite (train.overwrite=true) to replace it, or choose another --output-dir")
        if is_main:
            for p in existing:
                if _CKPT.match(p.name) and not checksum_path(p).is_file():
                    continue     # not written by this code: left alone
                p.unlink(missing_ok=True)
                checksum_path(p).unlink(missing_ok=True)
            if (run_dir / "tb").is_dir():
                shutil.rmtree(run_dir / "tb", ignore_errors=True)
            log_fn(f"--overwrite: removed the previous run's {len(existing)} file(s) in {run_dir}")
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=run_dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise OutputDirError(f"train.output_dir {run_dir} cannot be written: "
                                 f"{e.strerror or e}") from None
        for p in clean_stale_tmp(run_dir):
            log_fn(f"removed a stale temporary file left by an interrupted write: {p.name}")
    return run_dir


# ----------------------------------------------------------------------------------------
# save / find / load
# ----------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep_last: int = 2) -> Path:
    """Write ``checkpoint-<step>.pt`` (+ checksum, + ``latest.txt``) atomically, then prune."""
    run_dir = Path(run_dir)
    path = run_dir / f"checkpoint-{step:08d}.pt"
    _atomic_write(path, lambda f: torch.save(state, f), sidecar=checksum_path(path))
    _atomic_write(run_dir / "latest.txt", lambda f: f.write(path.name.encode()))
    # prune: only checkpoints this code wrote (a checksum beside them) of earlier steps
    older = [p for s, p in list_checkpoints(run_dir) if s < step and checksum_path(p).is_file()]
    for p in older[:max(0, len(older) - (keep_last - 1))]:
        for q in (p, checksum_path(p)):
            try:
                q.unlink()
            except OSError:
                pass
    return path


def find_latest(run_dir: str | Path) -> Optional[Path]:
    """The checkpoint ``latest.txt`` names, else the one with the highest step (not verified)."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest.txt"
    if pointer.is_file():
        try:
            p = run_dir / pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            p = None
        if p is not None and _CKPT.match(p.name) and p.is_file():
            return p
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def verify_checksum(path: str | Path) -> Optional[bool]:
    """True/False: the file matches / does not match its ``.sha256``; None: it has none."""
    side = checksum_path(path)
    if not side.is_file():
        return None
    try:
        want = side.read_text().split()[0].lower()
    except (OSError, UnicodeDecodeError, IndexError):
        return False
    return sha256_file(path) == want


def _numpy_safe_globals() -> list:
    """numpy types of checkpoints written before the RNG state was stored as tensors."""
    out = []
    try:
        from numpy.core.multiarray import _reconstruct  # noqa: PLC0415
        out += [_reconstruct, np.ndarray, np.dtype]
        out += [type(np.dtype(np.uint32))]
    except Exception:  # noqa: BLE001
        pass
    return out


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint on the CPU: checksum verified (when present), ``weights_only=True``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserFileNotFoundError(f"checkpoint not found: {path}")
    if verify and verify_checksum(path) is False:
        raise CheckpointError(f"checkpoint {path} is corrupt: its sha256 does not match "
                              f"{checksum_path(path).name} (truncated or damaged copy)")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain types; "
                                  f"it is not loaded (weights_only=True never runs code from a file)") from None
        raise CheckpointError(f"checkpoint {path} could not be read ({type(e).__name__}: {msg[:200]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint (a {type(obj).__name__})")
    return obj


def find_resumable(run_dir: str | Path, warn: Callable[[str], Any] = log.warning
                   ) -> Optional[Tuple[Path, dict]]:
    """``--resume`` (no file): the newest checkpoint that verifies and loads, as ``(path, state)``.

    Starts at the one ``latest.txt`` names (else the highest step) and walks back by step;
    each skipped file gets one warning naming it. None when the folder holds no checkpoint;
    :class:`CheckpointError` when none of them can be read.
    """
    run_dir = Path(run_dir).expanduser()
    order: List[Path] = []
    first = find_latest(run_dir)
    if first is not None:
        order.append(first)
    order += [p for _, p in reversed(list_checkpoints(run_dir)) if p not in order]
    if not order:
        return None
    skipped = []
    for p in order:
        try:
            state = load_checkpoint(p)
        except CheckpointError as e:
            warn(f"--resume: skipping {p}: {e}")
            skipped.append(p.name)
            continue
        if skipped:
            warn(f"--resume: using {p.name}, the newest checkpoint that verifies")
        return p, state
    raise CheckpointError(f"--resume: none of the {len(order)} checkpoint(s) in {run_dir} can be read "
                          f"({', '.join(skipped)})")
