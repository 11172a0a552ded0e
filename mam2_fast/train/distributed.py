"""Process groups, model wrapping (DDP / FSDP2) and full (world-size independent) state dicts.

Launch with ``torchrun``: it sets RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous. NCCL is
used on GPUs, gloo on CPU. Checkpoints hold *full* state dicts (model and optimizer keyed by
parameter name), so a run can resume on a different number of processes.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from mam2_fast.errors import UserError  # noqa: F401  (re-exported: caught by run_cli)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_JOINED_GROUP = False   # this process joined a torchrun process group (see exit_worker)
EXIT_SIGTERM = 143      # a run stopped by SIGTERM after writing its checkpoint (128 + 15, as a shell reports it)


def init_distributed(device_kind: str, timeout_min: Optional[float] = None) -> DistInfo:
    """Join the torchrun process group if one is described by the environment.

    ``timeout_min`` (``train.dist_timeout_min``): how long a collective may wait for the slowest
    rank before the job aborts (torch's default is 10 min for NCCL); raise it when one rank does
    long work the others wait for (a big evaluation, a slow checkpoint on shared storage)."""
    global _JOINED_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local)
        kwargs = {}
        if timeout_min:
            from datetime import timedelta
            kwargs["timeout"] = timedelta(minutes=float(timeout_min))
        dist.init_process_group(backend=backend, **kwargs)
    _JOINED_GROUP = True
    return DistInfo(rank, world, local)


def exit_worker(code: int) -> None:
    """End a CLI process with ``code``; a torchrun worker skips the interpreter's teardown.

    DDP keeps its process group alive after ``destroy_process_group`` (torch 2.13, gloo: the
    group's ``pt_gloo_runloop`` and ``gloo_tcp_loop`` threads still run after the DDP module is
    deleted and ``gc.collect()``; a plain all-reduce does not leak). If the interpreter then
    finalizes while a ``pt_gloo_runloop`` thread is releasing its last work item, that thread
    takes the GIL (``PyEval_AcquireThread`` from ``ProcessGroupGloo::runLoop``), Python ends it
    with ``pthread_exit``, the forced unwind meets a ``noexcept`` frame, and the rank dies with
    SIGABRT ("terminate called without an active exception") after the run has finished and
    written everything; torchrun then reports the job as failed. Seen in CI and in 2 of about
    100 launches of a 10-line DDP script on a loaded 2-core machine (native backtrace taken).
    So a worker that joined a group flushes stdout, stderr and logging, then leaves with
    ``os._exit`` (the training loop has already closed every checkpoint, metric file and data
    worker): finalization never starts.
    A process that never joined a group exits normally (``SystemExit``).
    """
    if not _JOINED_GROUP:
        raise SystemExit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, parallel: str, device: torch.device,
               shard_types: tuple = ()) -> nn.Module:
    """DDP (default) or FSDP2 ``fully_shard`` per block then the root; no-op in one process."""
    if not info.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for m in model.modules():
            if shard_types and isinstance(m, shard_types):
                fully_shard(m)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def full_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> tuple[dict, Optional[dict]]:
    """Full model / optimizer state dicts keyed by parameter name (collective under DDP/FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    if optimizer is None:
        return get_model_state_dict(model, options=opts), None
    return get_state_dict(model, optimizer, options=opts)


def load_full_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], model_sd: dict,
                    optim_sd: Optional[dict]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict
    opts = StateDictOptions(full_state_dict=True, strict=True)
    if optimizer is None or optim_sd is None:
        set_model_state_dict(model, model_sd, options=opts)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)


def broadcast_module(module: nn.Module, info: DistInfo, src: int = 0) -> None:
    """Copy parameters and buffers of ``module`` from rank ``src`` to every rank."""
    if not info.enabled:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def all_ranks_agree(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def weights_identical_across_ranks(model: nn.Module, info: DistInfo, device: torch.device) -> bool:
    """Compare every rank's full parameters with rank 0's (exact equality)."""
    if not info.enabled:
        return True
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    flat = torch.cat([v.detach().float().flatten().cpu() for _, v in sorted(sd.items())]).to(device)
    ref = flat.clone()
    dist.broadcast(ref, 0)
    same = torch.tensor([1.0 if torch.equal(flat, ref) else 0.0], device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item() > 0)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def report_user_error(e: BaseException) -> None:
    """One line on stderr, from rank 0 only (every rank raises the same error)."""
    if _is_rank0():
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{getattr(e, 'prefix', 'error')}: {msg}", file=sys.stderr, flush=True)


def run_cli(main) -> None:
    """``python -m`` entry of a training CLI: ``exit_worker(main())``.

    * ``main()`` returns the exit code (0 done, 2 config error, 143 stopped by SIGTERM after
      writing its checkpoint).
    * A :class:`~mam2_fast.errors.UserError` (missing or malformed file, too many unreadable
      videos, unreadable checkpoint, bad weights, output folder of another run, ...) prints
      ``error: <message>`` as one line from rank 0 and exits with code 1, without a traceback.
    * Any other exception is a bug: outside torchrun it propagates (traceback, code 1); in a
      torchrun worker it is printed with its traceback and ends the process with code 1
      through :func:`exit_worker` (130 for Ctrl-C), so a failed rank reports its error
      rather than a teardown SIGABRT.
    """
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not _JOINED_GROUP:
            raise
    except UserError as e:
        report_user_error(e)
        code = getattr(e, "exit_code", 1)
    except BaseException as e:  # noqa: BLE001 -- reported here, then the worker exits
        if not _JOINED_GROUP:
            raise
        import traceback
        traceback.print_exc()
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
    exit_worker(code)
