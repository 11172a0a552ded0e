"""The training loop's contract (mam2_fast/train/loop.py), pinned with a fake task: the order of
the task's hooks, accumulation, the epoch remainder, what a resume restores, a SIGTERM stop."""
import os
import signal

import pytest
import torch

from mam2_fast.config import _deep_merge, config_from_dict
from mam2_fast.pretrain import demo_config_dict
from mam2_fast.train.checkpoint import load_checkpoint
from mam2_fast.train.loop import Schedule, Task, run_task


class FakeData:
    """``micro_per_epoch`` micro-batches of ``[batch, 4]`` inputs, fixed per (epoch, pos)."""

    def __init__(self, micro_per_epoch: int = 5, batch: int = 2):
        self.steps_per_epoch, self.batch = micro_per_epoch, batch

    def iter_epoch(self, epoch: int, start_step: int = 0):
        for pos in range(start_step, self.steps_per_epoch):
            g = torch.Generator().manual_seed(100 * epoch + pos)
            yield pos, {"clip": torch.randn(self.batch, 4, generator=g)}

    def stats(self) -> dict:
        return {"bad_videos": 0}


class FakeTask(Task):
    """A one-weight linear model; records every hook the loop calls."""

    def __init__(self, sigterm_at_step=None):
        self.calls, self.micros, self.draws, self.lrs, self.grads, self.micro_grads = [], [], [], [], [], []
        self.records, self.sigterm_at_step = [], sigterm_at_step

    def check_checkpoint(self, path, ckpt):
        self.calls.append("check_checkpoint")

    def setup(self, run):
        self.calls.append("setup")
        self.run, self.cfg, self.data = run, run.cfg, FakeData(batch=run.cfg.train.batch_size)
        self.model = torch.nn.Linear(4, 1, bias=False)   # initialized from the run's seed

    def build_optimizer(self, schedule):
        self.calls.append("build_optimizer")
        self.schedule, self.wrapped = schedule, self.model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0, momentum=0.9)

    def load_state(self, ckpt):
        self.calls.append("load_state")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])

    def start(self, loop):
        self.calls.append("start")

    def prepare(self, batch, epoch, pos):
        self.calls.append("prepare")
        return epoch, pos

    def step(self, batch, prepared, micro):
        self.calls.append("step")
        assert prepared == (micro.epoch, micro.pos)
        if self.sigterm_at_step is not None and micro.step == self.sigterm_at_step and micro.index == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        self.micros.append(micro)
        noise = torch.rand(())                      # the global RNG: a resume must restore it
        self.draws.append(float(noise))
        loss = (self.model(batch["clip"]).mean() - noise) ** 2
        self.micro_grads.append(torch.autograd.grad(loss, self.model.weight, retain_graph=True)[0])
        return {"loss": loss, "loss_double": 2 * loss}

    def set_lr(self, lr):
        self.calls.append("set_lr")
        self.lrs.append(lr)
        self.grads.append(self.model.weight.grad.clone())   # all micro-batches of the step accumulated
        super().set_lr(lr)

    def on_log(self, rec):
        self.calls.append("on_log")
        self.records.append(rec)
        return "fake"

    def checkpoint_state(self):
        self.calls.append("checkpoint_state")
        return {**super().checkpoint_state(), "fake": "yes"}

    def write_checkpoint(self, run_dir, step, state, keep_last):
        self.calls.append("write_checkpoint")
        return super().write_checkpoint(run_dir, step, state, keep_last)

    def after_step(self, loop):
        self.calls.append("after_step")

    def finish(self, loop):
        self.calls.append("finish")
        return {"fake_summary": loop.pos.step}

    def close(self):
        self.calls.append("close")


def fake_cfg(out, **train):
    over = {"train": {"output_dir": str(out), "batch_size": 2, "accum_steps": 2, "epochs": 2, "log_every": 2,
                      "save_every": 3, "progress": False, "tensorboard": False, "device": "cpu", "prefetch": 0,
                      **train},
            "optim": {"lr": 0.1, "warmup_epochs": 0.5, "clip_grad": 0.0}}
    return config_from_dict(_deep_merge(demo_config_dict(), over))


def run_fake(out, resume=None, task=None, **train):
    task = task or FakeTask()
    summary = run_task(task, fake_cfg(out, **train), resume=resume, log=lambda s: None)
    return task, summary


def test_order_of_calls_and_epoch_remainder(tmp_path):
    """5 micro-batches per epoch, 2 per step: 2 steps per epoch, the 5th micro-batch is dropped."""
    task, summary = run_fake(tmp_path / "run")
    s = task.schedule
    assert (s.accum, s.steps_per_epoch, s.epoch_micro, s.total_steps, s.last_step) == (2, 2, 4, 4, 4)
    micro = ["prepare", "step"]

    def opt_step(step):
        return (micro * 2 + ["set_lr"] + (["on_log"] if step % 2 == 0 else [])
                + (["checkpoint_state", "write_checkpoint"] if step in (3, 4) else []) + ["after_step"])
    assert task.calls == (["setup", "build_optimizer", "start"] + sum((opt_step(k) for k in range(1, 5)), [])
                          + ["finish", "close"])
    assert [(m.epoch, m.pos, m.index, m.last, m.logs, m.step) for m in task.micros] == [
        (0, 0, 0, False, False, 0), (0, 1, 1, True, False, 0), (0, 2, 0, False, False, 1), (0, 3, 1, True, True, 1),
        (1, 0, 0, False, False, 2), (1, 1, 1, True, False, 2), (1, 2, 0, False, False, 3), (1, 3, 1, True, True, 3)]
    assert task.lrs == [s.lr(k) for k in range(4)]
    assert summary["steps"] == 4 and not summary["interrupted"] and summary["fake_summary"] == 4
    assert summary["checkpoint"].endswith("checkpoint-00000004.pt")
    assert [r["step"] for r in task.records] == [2, 4] == [r["step"] for r in (summary["first"], summary["last"])]


def test_accumulation_averages_the_micro_batches(tmp_path):
    task, _ = run_fake(tmp_path / "run", accum_steps=2)
    for k, grad in enumerate(task.grads):
        want = (task.micro_grads[2 * k] + task.micro_grads[2 * k + 1]) / 2
        torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-7)
    rec = task.records[0]   # the log window's means over its micro-batches
    assert rec["loss_double"] == pytest.approx(2 * rec["loss"], rel=1e-6)
    assert {"step", "epoch", "lr", "loss", "loss_double", "grad_norm", "clips_per_s", "skipped_steps",
            "data_bad_videos"} <= set(rec)


def test_global_batch_sets_accumulation():
    cfg = fake_cfg("unused", accum_steps=1, global_batch=8)
    s = Schedule.plan(cfg, micro_per_epoch=9, world=2)
    assert (s.accum, s.effective_batch, s.steps_per_epoch, s.epoch_micro) == (2, 8, 4, 8)
    short = Schedule.plan(fake_cfg("unused", accum_steps=4), micro_per_epoch=3, world=1)
    assert (short.steps_per_epoch, short.epoch_micro) == (1, 3)   # an epoch shorter than a step: steps span epochs


def test_resume_restores_position_state_and_rng(tmp_path):
    full, _ = run_fake(tmp_path / "full")
    first, s1 = run_fake(tmp_path / "resumed", max_steps=3)
    ck = load_checkpoint(s1["checkpoint"])
    assert (ck["step"], ck["epoch"], ck["micro_in_epoch"], ck["samples_in_epoch"], ck["world_size"]) == (3, 1, 2, 4, 1)
    assert ck["fake"] == "yes" and ck["schedule"]["total_steps"] == 4 and {"model", "optimizer", "rng", "config"} <= set(ck)
    second, s2 = run_fake(tmp_path / "resumed", resume="auto")
    assert second.calls[:5] == ["check_checkpoint", "setup", "build_optimizer", "load_state", "start"]
    # the resumed run picks up at epoch 1, micro-batch 2, step 3 and continues the uninterrupted run exactly
    assert [(m.epoch, m.pos, m.step) for m in second.micros] == [(1, 2, 3), (1, 3, 3)]
    assert second.draws == full.draws[6:] and second.lrs == full.lrs[3:]
    assert first.draws + second.draws == full.draws
    torch.testing.assert_close(second.model.weight, full.model.weight, rtol=0, atol=0)
    assert s2["steps"] == 4


def test_sigterm_checkpoints_at_the_next_step_and_stops(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    task, summary = run_fake(tmp_path / "run", task=FakeTask(sigterm_at_step=1), save_every=100, log_every=100)
    assert summary["interrupted"] and summary["steps"] == 2
    assert summary["checkpoint"].endswith("checkpoint-00000002.pt")
    # the step that saw the signal: checkpoint (off the cadence), no after_step, then the end
    assert task.calls[-6:] == ["step", "set_lr", "checkpoint_state", "write_checkpoint", "finish", "close"]
    assert task.calls.count("after_step") == 1
    ck = load_checkpoint(summary["checkpoint"])
    assert (ck["step"], ck["epoch"], ck["micro_in_epoch"]) == (2, 1, 0)   # epoch 0 used up: resume at epoch 1
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_error_in_a_step_stops_the_prefetch_thread(tmp_path):
    class Boom(FakeTask):
        def step(self, batch, prepared, micro):
            if micro.step == 1:
                raise RuntimeError("boom")
            return super().step(batch, prepared, micro)

    import threading
    with pytest.raises(RuntimeError, match="boom"):
        run_fake(tmp_path / "run", task=Boom(), prefetch=2)
    assert not [t for t in threading.enumerate() if t.name == "mam2-prefetch" and t.is_alive()]
