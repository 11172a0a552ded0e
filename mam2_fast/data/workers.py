"""Decode workers that cannot stall a run.

Each worker (a process, or a thread when ``num_workers == 0``) owns a duplex pipe: the
main process sends ``(task_id, index, keys)``; the worker answers ``start`` (with a time
stamp) and then ``ok`` (uint8 frames), ``bad`` (the file is unreadable: message names it)
or ``fatal`` (a bug: the traceback). :class:`DecodePool.poll` turns these, plus dead
processes and decodes running past ``timeout_s``, into :class:`Event`\\ s. A worker that
dies or hangs is replaced (at most ``max_restarts`` times per run, then the run fails); the
clip a dead worker was decoding comes back as a ``lost`` event (the loader decodes it again
once), the ones queued behind it as ``requeue`` events. A worker found dead when a task is
sent to it (``BrokenPipeError``) is replaced the same way and the task goes to the new one.

Worker processes end with their parent, whatever killed it (SIGKILL, the OOM killer): on
Linux each one asks for ``SIGKILL`` when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and a
watchdog thread in every worker checks every half second that the parent still lives (the
fallback elsewhere, and for workers started from a non-main thread, whose parent-death
signal would fire when that *thread* ends). Decoded frames travel as file-descriptor shared
memory (torch's default on Linux): nothing is left in ``/dev/shm`` or on disk.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.multiprocessing  # noqa: F401  (registers tensor sharing for pipes)

from mam2_fast.errors import DataError

from .backends import DecodeError

Task = Tuple[int, int, Tuple[int, ...]]  # task_id, video index, rng keys


@dataclass
class Event:
    kind: str          # ok | bad | timeout | lost
    task_id: int
    payload: Any = None  # ok: uint8 tensor [S, T, H, W, 3]; bad/timeout: message


def _serve(conn, source, as_tensor: bool) -> None:
    """The worker loop (runs in a child process or a thread)."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, index, keys = msg
        try:
            conn.send(("start", task_id, time.time()))
            try:
                frames = source.load(index, keys)
                frames = torch.from_numpy(frames) if as_tensor else frames
                conn.send(("ok", task_id, frames))
            except DecodeError as e:
                conn.send(("bad", task_id, str(e)))
            except Exception:
                conn.send(("fatal", task_id, traceback.format_exc()))
                return
        except (BrokenPipeError, EOFError, OSError):  # main side gone (abandoned thread)
            return


_PR_SET_PDEATHSIG = 1
WATCHDOG_INTERVAL_S = 0.5


def _set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Linux: have the kernel send ``sig`` to this process when its parent (thread) dies."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except Exception:  # noqa: BLE001 -- the watchdog still covers it
        return False


def _parent_gone(parent_pid: int, start_ppid: int) -> bool:
    """The parent died: this process was re-parented, or ``parent_pid`` no longer exists (a
    zombie parent still exists, hence the re-parenting test first)."""
    if os.getppid() != start_ppid:
        return True
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


def _watch_parent(parent_pid: int, start_ppid: int, interval: float = WATCHDOG_INTERVAL_S) -> None:
    while True:
        time.sleep(interval)
        if _parent_gone(parent_pid, start_ppid):
            os._exit(0)   # nothing to flush: results go to a dead process


def _process_main(conn, source, parent_pid: Optional[int] = None, expect_ppid: Optional[int] = None,
                  death_signal: bool = True) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process
    if parent_pid is not None:
        if death_signal:
            _set_parent_death_signal()
        start_ppid = os.getppid()
        # the parent may have died before the death signal was armed
        if (expect_ppid is not None and start_ppid != expect_ppid) or _parent_gone(parent_pid, start_ppid):
            os._exit(0)
        threading.Thread(target=_watch_parent, args=(parent_pid, start_ppid), name="mam2-parent-watch",
                         daemon=True).start()
    torch.set_num_threads(1)
    _serve(conn, source, as_tensor=True)


class _Worker:
    def __init__(self, ctx, source, use_process: bool):
        self.conn, child = mp.Pipe(duplex=True)
        self.inflight: Dict[int, Optional[float]] = {}  # task_id -> start time (None: queued)
        self.tasks: Dict[int, Task] = {}
        self.use_process = use_process
        if use_process:
            method = ctx.get_start_method()
            # PR_SET_PDEATHSIG fires when the *thread* that started the worker ends: arm it only
            # for workers started from the main thread (or by the single-threaded forkserver)
            on_main = threading.current_thread() is threading.main_thread()
            death_signal = method == "forkserver" or on_main
            expect_ppid = os.getpid() if method == "fork" else None
            self.proc = ctx.Process(target=_process_main, args=(child, source, os.getpid(), expect_ppid,
                                                                death_signal), daemon=True)
            self.proc.start()
            child.close()
        else:
            self.proc = threading.Thread(target=_serve, args=(child, source, False), daemon=True)
            self.proc.start()
            self._child = child

    @property
    def sentinel(self):
        return self.proc.sentinel if self.use_process else None

    def alive(self) -> bool:
        return self.proc.is_alive()

    def exit_info(self) -> str:
        return f"exit code {self.proc.exitcode}" if self.use_process else "thread exited"

    def kill(self) -> None:
        if self.use_process:
            self.proc.kill()
            self.proc.join(timeout=5)
        else:  # a thread cannot be killed: abandon it; it exits when it next touches the pipe
            self._child.close()
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        if self.use_process:
            self.proc.join(timeout=2)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=2)
        self.conn.close()


class DecodePool:
    def __init__(self, source, num_workers: int, prefetch: int = 4, timeout_s: float = 60.0,
                 mp_context: str = "fork", max_restarts: int = 8):
        self.source, self.prefetch, self.timeout_s = source, max(1, prefetch), timeout_s
        self.max_restarts, self.restarts = max_restarts, 0
        self.use_process = num_workers > 0
        self.ctx = None
        if self.use_process:
            self.ctx = mp.get_context(mp_context)
            if mp_context == "forkserver":
                self.ctx.set_forkserver_preload(["torch", "mam2_fast.data.workers"])
        self.workers: List[_Worker] = [self._spawn() for _ in range(max(1, num_workers))]
        self.closed = False
        self._pending: List[Event] = []   # events of workers replaced while submitting

    def _spawn(self) -> _Worker:
        return _Worker(self.ctx, self.source, self.use_process)

    # -- submitting -------------------------------------------------------------------
    def capacity(self) -> int:
        return sum(self.prefetch - len(w.inflight) for w in self.workers)

    def submit(self, task: Task) -> bool:
        i = min(range(len(self.workers)), key=lambda i: len(self.workers[i].inflight))
        w = self.workers[i]
        if len(w.inflight) >= self.prefetch:
            return False
        try:
            w.conn.send(task)
        except (OSError, EOFError):   # BrokenPipeError: the worker died; replace it, send again
            self._pending += self._replace(i, f"decode worker died ({w.exit_info()})", "lost")
            w = self.workers[i]
            w.conn.send(task)
        w.inflight[task[0]] = None
        w.tasks[task[0]] = task
        return True

    # -- receiving --------------------------------------------------------------------
    def poll(self, timeout: float = 0.5) -> List[Event]:
        """Wait up to ``timeout`` seconds for results; returns what happened meanwhile."""
        handles = [w.conn for w in self.workers] + [w.sentinel for w in self.workers if w.sentinel is not None]
        if not self._pending:
            wait(handles, timeout=min(timeout, self._time_to_deadline()))
        events, self._pending = self._pending, []
        for i, w in enumerate(self.workers):
            events += self._drain(i, w)
        events += self._check_timeouts()
        return events

    def _time_to_deadline(self) -> float:
        starts = [t for w in self.workers for t in w.inflight.values() if t is not None]
        if not starts:
            return 3600.0
        return max(0.01, min(starts) + self.timeout_s - time.time())

    def _drain(self, i: int, w: _Worker) -> List[Event]:
        events: List[Event] = []
        try:
            while w.conn.poll():
                kind, task_id, payload = w.conn.recv()
                if kind == "start":
                    if task_id in w.inflight:
                        w.inflight[task_id] = payload
                    continue
                if kind == "fatal":
                    raise RuntimeError(f"data: decode worker failed with an unexpected error:\n{payload}")
                w.inflight.pop(task_id, None)
                w.tasks.pop(task_id, None)
                events.append(Event(kind, task_id, payload))
        except (EOFError, OSError, ConnectionError):  # the worker died mid-message
            pass
        if not w.alive():
            events += self._replace(i, f"decode worker died ({w.exit_info()})", "lost")
        return events

    def _check_timeouts(self) -> List[Event]:
        now, events = time.time(), []
        for i, w in enumerate(self.workers):
            hung = [t for t, s in w.inflight.items() if s is not None and now - s > self.timeout_s]
            if hung:
                events += self._replace(i, f"decode exceeded {self.timeout_s:g}s", "timeout")
        return events

    def _replace(self, i: int, reason: str, kind: str) -> List[Event]:
        """Kill/abandon worker ``i`` and start a new one. The task it was decoding becomes a
        ``kind`` event (counted against that video); queued tasks come back as ``requeue``."""
        w = self.workers[i]
        if kind == "lost":
            self.restarts += 1
            if self.restarts > self.max_restarts:
                raise DataError(f"data: {reason}; {self.restarts} worker restarts exceed "
                                   f"data.max_worker_restarts={self.max_restarts}")
        w.kill()
        events = []
        for task_id, start in w.inflight.items():
            if start is not None:
                events.append(Event(kind, task_id, reason))
            else:
                events.append(Event("requeue", task_id, w.tasks[task_id]))
        self.workers[i] = self._spawn()
        return events

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for w in self.workers:
            w.stop()
