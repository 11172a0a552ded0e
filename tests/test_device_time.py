"""kernels.device_time: device time without CUDA graphs, checked against a simulated GPU.

The simulation keeps a host clock and a device timeline: a call costs host time and queues
device work, which starts when both the device is free and the host has queued it; an event
completes when the device reaches it. A timer that measured host time (an eager timing), or
that did not cover the host's queuing with the sleep, reads the host cost here, not the device's.
"""
from types import SimpleNamespace

import pytest
import torch

from mam2_fast.kernels import device_time as dt

CYCLES_PER_MS = 1.98e6      # a 1.98 GHz clock


class FakeGPU:
    def __init__(self, event_host_ms=0.002):
        self.host = 0.0          # ms
        self.busy_until = 0.0    # when the device finishes what is queued
        self.event_host_ms = event_host_ms
        self.launches = 0

    def enqueue(self, ms):
        self.launches += 1
        start = max(self.busy_until, self.host)
        self.busy_until = start + ms
        return self.busy_until

    def synchronize(self, device=None):
        self.host = max(self.host, self.busy_until)

    def clock(self):
        return self.host / 1e3

    def sleep(self, device, cycles):
        if cycles > 0:
            self.enqueue(cycles / CYCLES_PER_MS)

    def new_event(self, device, enable_timing=False):
        gpu = self

        class Event:
            t = None

            def record(self, stream=None):
                gpu.host += gpu.event_host_ms
                self.t = gpu.enqueue(0.0)

            def query(self):
                return self.t <= gpu.host

            def elapsed_time(self, end):
                return end.t - self.t
        return Event()

    def op(self, host_ms, device_ms, sync=False):
        def fn():
            self.host += host_ms
            self.enqueue(device_ms)
            if sync:                       # e.g. .item(): waits for the device
                self.synchronize()
        return fn


@pytest.fixture
def gpu(monkeypatch):
    g = FakeGPU()
    fake_accel = SimpleNamespace(as_device=torch.device, synchronize=g.synchronize, new_event=g.new_event)
    monkeypatch.setattr(dt, "accel", fake_accel)
    monkeypatch.setattr(dt, "clock", g.clock)
    monkeypatch.setattr(dt, "sleep", g.sleep)
    monkeypatch.setattr(dt, "_flush_l2", lambda device: g.enqueue(0.06))
    monkeypatch.setattr(dt, "_CYCLES_PER_MS", {})
    return g


CUDA = torch.device("cuda")


@pytest.mark.parametrize("host_ms,device_ms", [(0.5, 0.05), (0.08, 0.3), (1.7, 0.011)])
def test_reads_device_time_when_the_host_is_slower(gpu, host_ms, device_ms):
    t = dt.device_time(gpu.op(host_ms, device_ms), CUDA, warmup=2, reps=7)
    assert t.queued
    assert t.device_ms == pytest.approx(device_ms, rel=1e-6)
    assert t.host_ms == pytest.approx(host_ms, rel=0.1)
    assert dt.cycles_per_ms(CUDA) == pytest.approx(CYCLES_PER_MS, rel=1e-9)


def test_without_the_sleep_the_host_gaps_show_and_are_flagged(gpu, monkeypatch):
    """The check can fail: with the sleep taken out, the same op reads its host cost, and the
    timer says the measurement was not queued."""
    monkeypatch.setattr(dt, "sleep", lambda device, cycles: None)
    t = dt.device_time(gpu.op(0.5, 0.05), CUDA, warmup=1, reps=5)
    assert not t.queued
    assert t.device_ms > 0.4


def test_an_op_that_syncs_with_the_host_is_flagged(gpu):
    t = dt.device_time(gpu.op(0.5, 0.05, sync=True), CUDA, warmup=1, reps=5)
    assert not t.queued
    assert "host gaps included" in dt.describe(t)


def test_cpu_reads_wall_time(monkeypatch):
    now = [0.0]

    def fn():
        now[0] += 0.003
    monkeypatch.setattr(dt, "clock", lambda: now[0])
    t = dt.device_time(fn, torch.device("cpu"), warmup=1, reps=3)
    assert t.device_ms == pytest.approx(3.0) and t.host_ms == pytest.approx(3.0) and not t.queued


def test_the_launch_queue_stays_short(gpu):
    """reps x (flush + events + the op's launches) stays far below CUDA's ~1000 pending launches."""
    before = gpu.launches
    dt.device_time(gpu.op(0.1, 0.1), CUDA, warmup=2, reps=10)
    assert gpu.launches - before < 200
