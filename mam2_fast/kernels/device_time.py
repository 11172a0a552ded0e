"""Device time of a callable on a GPU, without CUDA graphs: queue it behind a sleeping kernel.

Timing one fused op eagerly (synchronize, call, synchronize) measures the host: Python, the
autograd and custom-op dispatch, Triton's launcher. For the small problems of a MAM² step
(a gather of 40 MB, attention over 16 frames) that host time is larger than the kernels' own,
so an eager timing ranks ops by launch overhead. In a training step the host runs ahead of the
device (a ViT-B step at batch 32 is ~300 ms of device work against ~20 ms of host work), so
what an op costs there is its device time.

:func:`device_time` measures that, the way ``triton.testing.do_bench`` does (an event pair
around each call, L2 flushed between calls, median) with one addition: a ``torch.cuda._sleep``
kernel is queued first, long enough that the host has queued every call before the device
starts on them, so no host gap falls inside a measured interval. Whether that held is checked,
not assumed: when the sleep had already finished by the time the host was done queuing (the
callable synchronizes with the host: ``.item()``, a copy to the CPU, or the sleep was too
short), the sleep is lengthened once and the measurement repeated; if it still did not hold,
the result says so (``queued=False``: host gaps are included, an upper bound).

CUDA graphs would measure the same without the sleep, but a capture fails on any host sync and
a capture that fails part-way can leave the generator and the allocator in capture state (seen
on the H200 on 2026-12-04); this needs nothing of the callable.

On the CPU (and the stand-in device) there is no separate device clock: the result is the
median wall time of one call, ``device_ms == host_ms``.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from mam2_fast.train import accel

# the host clock (tests replace it to drive a simulated device)
clock: Callable[[], float] = time.perf_counter

_L2_FLUSH_BYTES = 256 * 2 ** 20      # larger than any current GPU's L2 (H100/H200: 50/60 MB)
_MAX_SLEEP_MS = 2000.0
_CYCLES_PER_MS: Dict[str, float] = {}
_FLUSH: Dict[str, torch.Tensor] = {}


@dataclass(frozen=True)
class DeviceTiming:
    """Milliseconds per call: ``device_ms`` the device's work (median over the calls),
    ``host_ms`` the host's time to issue one call (mean), ``queued`` whether every measured
    call was queued before the device reached it (True: no host gap in ``device_ms``)."""
    device_ms: float
    host_ms: float
    queued: bool


def sleep(device: torch.device, cycles: int) -> None:
    """Queue a kernel that spins for ``cycles`` GPU clock cycles (CUDA); a no-op elsewhere."""
    if device.type == "cuda" and cycles > 0:
        torch.cuda._sleep(int(cycles))


def cycles_per_ms(device: torch.device) -> float:
    """GPU clock cycles per millisecond of :func:`sleep`, measured once per device."""
    key = str(device)
    if key not in _CYCLES_PER_MS:
        cycles = 10 ** 7
        sleep(device, cycles // 10)          # first use: module load outside the measurement
        accel.synchronize(device)
        start, end = accel.new_event(device, enable_timing=True), accel.new_event(device, enable_timing=True)
        start.record()
        sleep(device, cycles)
        end.record()
        accel.synchronize(device)
        ms = start.elapsed_time(end)
        _CYCLES_PER_MS[key] = cycles / ms if ms > 0 else 1e6
    return _CYCLES_PER_MS[key]


def _flush_l2(device: torch.device) -> None:
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    _FLUSH[key].zero_()


def _median(xs: List[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _host_only(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> DeviceTiming:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        accel.synchronize(device)
        t0 = clock()
        fn()
        accel.synchronize(device)
        times.append((clock() - t0) * 1e3)
    ms = _median(times)
    return DeviceTiming(ms, ms, False)


def device_time(fn: Callable[[], object], device: torch.device, warmup: int = 2, reps: int = 10,
                flush_l2: bool = True) -> DeviceTiming:
    """Time ``fn`` on ``device``: see the module docstring. ``reps`` calls are measured (each
    queues its kernels; keep reps x kernels per call under the launch queue's ~1000 entries)."""
    device = accel.as_device(device)
    if device.type != "cuda":
        return _host_only(fn, device, warmup, reps)
    with _on(device):                        # the sleep and the events go to the device's own stream
        return _device_time(fn, device, warmup, reps, flush_l2)


def _on(device: torch.device):
    """``torch.cuda.device(device)`` for an indexed CUDA device (cuda:1 while cuda:0 is
    current), else nothing."""
    if device.index is not None and torch.cuda.is_available():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _device_time(fn: Callable[[], object], device: torch.device, warmup: int, reps: int,
                 flush_l2: bool) -> DeviceTiming:
    flush = (lambda: _flush_l2(device)) if flush_l2 else (lambda: None)
    for _ in range(warmup):
        fn()
    rate = cycles_per_ms(device)
    # the host's time to queue the measured sequence (flushes and event records included)
    accel.synchronize(device)
    t0 = clock()
    for _ in range(reps):
        flush()
        fn()
    host_total_ms = (clock() - t0) * 1e3
    accel.synchronize(device)
    sleep_ms = min(_MAX_SLEEP_MS, 2.0 * host_total_ms + 1.0)
    for attempt in range(2):
        starts = [accel.new_event(device, enable_timing=True) for _ in range(reps)]
        ends = [accel.new_event(device, enable_timing=True) for _ in range(reps)]
        sleep(device, int(sleep_ms * rate))
        first = accel.new_event(device)
        first.record()                       # reached by the device when the sleep ends
        for s, e in zip(starts, ends):
            flush()
            s.record()
            fn()
            e.record()
        queued = not first.query()           # the device was still asleep: everything was queued in time
        accel.synchronize(device)
        device_ms = _median([s.elapsed_time(e) for s, e in zip(starts, ends)])
        if queued or sleep_ms >= _MAX_SLEEP_MS:
            break
        sleep_ms = min(_MAX_SLEEP_MS, 4.0 * sleep_ms)
    return DeviceTiming(device_ms, host_total_ms / reps, queued)


def device_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, reps: int = 10,
              flush_l2: bool = True) -> float:
    """:func:`device_time`'s ``device_ms``."""
    return device_time(fn, device, warmup, reps, flush_l2).device_ms


def describe(t: Optional[DeviceTiming]) -> str:
    if t is None:
        return "n/a"
    return f"{t.device_ms:.3f} ms device, {t.host_ms:.3f} ms host" + ("" if t.queued else " (host gaps included)")


def release() -> None:
    """Free the L2-flush buffers (256 MiB per device)."""
    _FLUSH.clear()
