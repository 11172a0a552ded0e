"""The training loop's bookkeeping: background prefetch, epoch boundaries under gradient
accumulation, non-finite streaks between logging steps, loss means without skipped steps."""
import threading

import pytest
import torch

from mam2_fast.data.prefetch import Prefetcher
from mam2_fast.pretrain import train
from mam2_fast.train.metrics import read_metrics
from synthetic import SyntheticData
from test_engine import PoisonedData
from test_trainer_synthetic import small_cfg


# -- Prefetcher ------------------------------------------------------------------------------
def test_prefetcher_keeps_order_and_runs_prepare_ahead():
    seen_threads = set()

    def prepare(x):
        seen_threads.add(threading.current_thread().name)
        return x, torch.full((2,), float(x))

    got = [(i, t.tolist()) for i, t in Prefetcher(range(7), "cpu", prepare, depth=2)]
    assert got == [(i, [float(i)] * 2) for i in range(7)]
    assert seen_threads == {"mam2-prefetch"}


def test_prefetcher_depth_zero_is_inline():
    names = []
    out = list(Prefetcher(range(3), "cpu", lambda x: names.append(threading.current_thread().name) or x,
                          depth=0))
    assert out == [0, 1, 2] and set(names) == {threading.current_thread().name}


def test_prefetcher_reraises_the_producers_error():
    def gen():
        yield 1
        raise OSError("disk gone: /data/x.mp4")

    it = iter(Prefetcher(gen(), "cpu"))
    assert next(it) == 1
    with pytest.raises(OSError, match="/data/x.mp4"):
        next(it)


def test_prefetcher_early_stop_closes_the_source():
    closed = threading.Event()

    def gen():
        try:
            for i in range(1000):
                yield i
        finally:
            closed.set()

    p = Prefetcher(gen(), "cpu", depth=2)
    for i in p:
        if i == 3:
            break
    p.close()
    assert closed.wait(5.0), "the source generator was not closed"
    assert p._thread is None


def test_prefetcher_overlaps_with_the_consumer():
    """While the consumer still holds item 0, the thread is already preparing item 1 (an
    event, not a timing: run inline, the wait below would time out)."""
    import threading

    preparing = {i: threading.Event() for i in range(3)}

    def prepare(x):
        preparing[x].set()
        return x

    for x in Prefetcher(range(3), "cpu", prepare, depth=1):
        if x + 1 in preparing:
            assert preparing[x + 1].wait(5.0), f"item {x + 1} was not prepared while item {x} was in use"


# -- the loop ----------------------------------------------------------------------------------
class RecordingData(SyntheticData):
    """Records the (epoch, step) pairs each ``iter_epoch`` call handed out (the k-means
    tokenizer's fit reads the first batches of epoch 0 through its own call)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def iter_epoch(self, epoch, start_step=0):
        self.calls.append([])
        for step, batch in super().iter_epoch(epoch, start_step):
            self.calls[-1].append((epoch, step))
            yield step, batch


def test_epoch_remainder_micro_batches_are_dropped_under_accumulation(tmp_path):
    """5 micro-batches per epoch, accum 2: each epoch uses 4 (2 optimizer steps); the fifth
    would otherwise add its gradient to the next epoch's first step."""
    data = RecordingData(20, 4, 4, 32)
    cfg = small_cfg(tmp_path / "r", epochs=2, accum_steps=2, save_every=100)
    s = train(cfg, data=data, log=lambda s: None)
    assert s["steps"] == 4
    assert data.calls[-2:] == [[(e, p) for p in range(4)] for e in (0, 1)]


def test_resume_mid_epoch_under_accumulation_matches(tmp_path):
    full = tmp_path / "full"
    train(small_cfg(full, epochs=2, accum_steps=2, save_every=100), data=SyntheticData(20, 4, 4, 32),
          log=lambda s: None)
    part = tmp_path / "part"
    train(small_cfg(part, epochs=2, accum_steps=2, save_every=1, max_steps=3),
          data=SyntheticData(20, 4, 4, 32), log=lambda s: None)
    data = RecordingData(20, 4, 4, 32)
    train(small_cfg(part, epochs=2, accum_steps=2, save_every=100), data=data, resume="auto", log=lambda s: None)
    assert data.calls == [[(1, 2), (1, 3)]]   # the tokenizer comes from the checkpoint
    a = torch.load(full / "checkpoint-00000004.pt", weights_only=False)["model"]
    b = torch.load(part / "checkpoint-00000004.pt", weights_only=False)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k


def test_nonfinite_streak_between_log_steps_stops_the_run(tmp_path):
    """Steps 1-3 non-finite, step 4 good, logging every 4 steps: the streak of 3 ended before
    the log step, and must still stop the run (max_nonfinite=2)."""
    cfg = small_cfg(tmp_path / "n", max_steps=8, max_nonfinite=2, log_every=4, save_every=100)
    with pytest.raises(FloatingPointError, match="3 non-finite"):
        train(cfg, data=PoisonedData(16, 4, 4, 32, bad={(0, 0), (0, 1), (0, 2)}), log=lambda s: None)


def test_short_streak_does_not_stop_and_logged_losses_skip_it(tmp_path):
    cfg = small_cfg(tmp_path / "m", max_steps=8, max_nonfinite=2, log_every=4, save_every=100)
    s = train(cfg, data=PoisonedData(16, 4, 4, 32, bad={(0, 1)}), log=lambda s: None)
    assert s["steps"] == 8 and s["skipped_steps"] == 1
    recs = read_metrics(tmp_path / "m" / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs), [r["loss"] for r in recs]


class HostSyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ops that read a tensor's value on the host (``.item()``, ``bool(t)``, ``.tolist()``):
    on a GPU each one waits for the device. Thread-local: the prefetch thread is not counted."""

    SYNC_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.equal")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(str(func).startswith(op) for op in self.SYNC_OPS):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_no_host_sync_per_step(tmp_path, kernels):
    """The number of host reads does not grow with the number of steps between logging steps:
    8 steps cost what 4 do (one log + checkpoint at the last step in both)."""
    counts = {}
    for steps in (4, 8):
        cfg = small_cfg(tmp_path / f"s{steps}", epochs=2, max_steps=steps, log_every=1000, save_every=1000)
        cfg.model.kernels = kernels
        cfg.mask.kind = "random"
        cfg.train.prefetch = 1   # as on CUDA (auto): batches and masks are built on the prefetch thread
        with HostSyncCounter() as mode:
            train(cfg, data=SyntheticData(16, 4, 4, 32), log=lambda s: None)
        counts[steps] = mode.count
    assert counts[8] == counts[4], counts


def test_prefetch_auto_depth():
    from mam2_fast.data.prefetch import auto_depth
    assert auto_depth(-1, torch.device("cpu")) == 0
    assert auto_depth(-1, torch.device("cuda", 0)) == 1
    assert auto_depth(0, torch.device("cuda")) == 0 and auto_depth(2, torch.device("cpu")) == 2
