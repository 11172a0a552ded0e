"""Fault injection at CI size (issue 17): what a week-long run meets, on a tiny model.

* SIGKILL mid-run (between steps, and in the middle of a checkpoint write), then ``--resume``:
  the resumed losses equal the uninterrupted run's; no ``.tmp`` file survives.
* A truncated / bit-flipped newest checkpoint: ``--resume`` falls back to the newest one that
  verifies with one warning naming the skipped file; an explicit file stays a hard error.
* Checkpoints load with ``weights_only=True``: a planted pickle payload is not run.
* No space left while saving (ENOSPC, injected): clear error, previous checkpoint intact.
* A read-only output folder, a folder of another run (refused unless --resume/--overwrite),
  pruning that leaves files it did not write.
* The demo builder writes only inside its marked folder.
* Corrupt / empty / truncated / text / missing videos mixed into a list: skipped, counted,
  named; a mostly bad list: one clean ``error:`` line (user errors never show a traceback).
* Decode workers: a dead one is replaced and its clip decoded again (same batches); all of
  them end when their parent is SIGKILLed (also when started from a non-main thread).
* A non-finite streak: the log window is recorded as NaN (not 0.0).
* Fine-tuning labels outside ``num_classes``: an error naming the line, before training.

The SIGTERM path (checkpoint, exit code 143, resume) runs as a real CLI in
``test_engine.py::test_sigterm_writes_checkpoint_and_resume_continues``; a hanging decode
cut by its timeout in ``test_data_loader.py::test_hanging_decode_is_abandoned``.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mam2_fast.errors import CheckpointError, DataError, OutputDirError, UserError
from mam2_fast.pretrain import train
from mam2_fast.train import checkpoint as C
from mam2_fast.train.metrics import read_metrics
from synthetic import SyntheticData
from test_engine import PoisonedData
from test_trainer_synthetic import small_cfg

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
QUIET = lambda s: None  # noqa: E731


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")}


def _data():
    return SyntheticData(16, 4, 4, 32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 12-step run (3 epochs of 4 steps, checkpoints every 2 steps)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(small_cfg(out, threads=1), data=_data(), log=QUIET)
    return _losses(out)


def _same_losses(got, ref, steps):
    for s in steps:
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), f"step {s}: {got[s]} vs {ref[s]}"


def _tmp_files(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------
# SIGKILL, then resume
# ----------------------------------------------------------------------------------------
_DRIVER = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    from mam2_fast import pretrain
    from mam2_fast.train import checkpoint as C
    from synthetic import SyntheticData
    from test_trainer_synthetic import small_cfg

    mode, out, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class KilledData(SyntheticData):
        # SIGKILL while the batch of global step ``kill_step`` (1-based) is being made
        def iter_epoch(self, epoch, start_step=0):
            for step, batch in super().iter_epoch(epoch, start_step):
                if mode == "between_steps" and epoch * self.steps_per_epoch + step + 1 == kill_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield step, batch

    real_save = pretrain.save_checkpoint
    def save(run_dir, step, state, keep_last=2):
        if mode == "during_write" and step == kill_step:   # SIGKILL after 4 KiB of the file
            real_write = C._HashingWriter.write
            def write(self, b):
                n = real_write(self, b)
                if self.size > 4096:
                    os.kill(os.getpid(), signal.SIGKILL)
                return n
            C._HashingWriter.write = write
        return real_save(run_dir, step, state, keep_last)
    pretrain.save_checkpoint = save
    pretrain.train(small_cfg(out, threads=1), data=KilledData(16, 4, 4, 32), log=lambda s: None)
    print("NOT KILLED")
""")


@pytest.mark.parametrize("mode,kill_step,resumes_at", [("between_steps", 6, 4), ("during_write", 4, 2)])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, reference, mode, kill_step, resumes_at):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(repo=str(REPO), tests=str(TESTS)))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(driver), mode, str(out), str(kill_step)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr[-3000:]
    if mode == "during_write":
        assert _tmp_files(out), "the kill should have left a partial .tmp checkpoint"
    assert C.find_latest(out).name == f"checkpoint-{resumes_at:08d}.pt"
    logs = []
    threads = torch.get_num_threads()
    try:
        s = train(small_cfg(out, threads=1), data=_data(), resume="auto", log=logs.append)
    finally:
        torch.set_num_threads(threads)
    assert any(f"step {resumes_at})" in line for line in logs), logs
    assert s["steps"] == 12 and not _tmp_files(out)
    _same_losses(_losses(out), reference, range(resumes_at + 1, 13))


# ----------------------------------------------------------------------------------------
# corrupt checkpoints
# ----------------------------------------------------------------------------------------
def _two_checkpoints(tmp_path):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        train(small_cfg(out, threads=1, max_steps=6), data=_data(), log=QUIET)   # keeps 4 and 6
    finally:
        torch.set_num_threads(threads)
    assert [s for s, _ in C.list_checkpoints(out)] == [4, 6]
    return out


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, reference, damage):
    out = _two_checkpoints(tmp_path)
    newest = out / "checkpoint-00000006.pt"
    raw = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(raw[: len(raw) // 2])
    else:   # silent corruption: still a readable zip of the right size, caught by the checksum
        raw[len(raw) // 2] ^= 0xFF
        newest.write_bytes(bytes(raw))
    # an explicit file (or init=) stays a hard error, naming the file
    with pytest.raises(CheckpointError, match="checkpoint-00000006.pt"):
        C.load_checkpoint(newest)
    logs = []
    threads = torch.get_num_threads()
    try:
        train(small_cfg(out, threads=1), data=_data(), resume="auto", log=logs.append)
    finally:
        torch.set_num_threads(threads)
    skipped = [line for line in logs if "skipping" in line]
    assert len(skipped) == 1 and "checkpoint-00000006.pt" in skipped[0], logs
    assert any("resuming from" in line and "checkpoint-00000004.pt" in line for line in logs), logs
    _same_losses(_losses(out), reference, range(5, 13))


def test_explicit_corrupt_resume_and_init_are_clear_errors(tmp_path):
    from mam2_fast.ft.weights import read_encoder_weights
    run = tmp_path / "r"
    C.save_checkpoint(run, 1, {"model": {"w": torch.ones(3)}, "step": 1})
    p = run / "checkpoint-00000001.pt"
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(UserError, match="checkpoint-00000001.pt"):
        read_encoder_weights(str(p))       # finetune init=
    with pytest.raises(UserError, match="checkpoint-00000001.pt"):
        read_encoder_weights(str(run))     # init= a run folder
    with pytest.raises(CheckpointError, match="none of the 1 checkpoint"):
        C.find_resumable(run, warn=QUIET)
    with pytest.raises(UserError, match="not found"):
        C.load_checkpoint(run / "checkpoint-00000009.pt")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MAM2_PAYLOAD']}",))


def test_checkpoints_load_weights_only_and_never_run_code(tmp_path, monkeypatch):
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("MAM2_PAYLOAD", str(marker))
    # a real checkpoint (RNG states, config dict, optimizer) loads with plain weights_only=True
    state = {"model": {"w": torch.randn(3)}, "rng": C.rng_state(), "config": small_cfg(tmp_path).to_dict(),
             "step": 3, "schedule": {"peak_lr": 1e-3}}
    C.save_checkpoint(tmp_path / "ok", 3, state)
    loaded = torch.load(tmp_path / "ok" / "checkpoint-00000003.pt", weights_only=True)
    np.random.seed(5)
    C.set_rng_state(loaded["rng"])
    assert np.random.get_state()[1].tolist() == state["rng"]["numpy"]["keys"].tolist()
    # a planted payload is refused, not run
    evil = tmp_path / "evil" / "checkpoint-00000001.pt"
    evil.parent.mkdir()
    torch.save({"model": {}, "x": _Payload()}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        C.load_checkpoint(evil)
    with pytest.raises(CheckpointError):
        C.find_resumable(evil.parent, warn=QUIET)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------
# disk full, read-only folder, another run's folder
# ----------------------------------------------------------------------------------------
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_write = C._HashingWriter.write
    saves = []
    real_save = C.save_checkpoint

    def save(run_dir, step, state, keep_last=2):
        saves.append(step)
        return real_save(run_dir, step, state, keep_last)

    class FullDisk:      # the file object under the writer fails as a full disk does
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    def write(self, b):
        if len(saves) >= 2 and self.size > 2048 and not isinstance(self.f, FullDisk):
            self.f = FullDisk(self.f)
        return real_write(self, b)

    monkeypatch.setattr("mam2_fast.pretrain.save_checkpoint", save)
    monkeypatch.setattr(C._HashingWriter, "write", write)
    with pytest.raises(CheckpointError, match="no space left") as ei:
        train(small_cfg(out, max_steps=6), data=_data(), log=QUIET)
    assert "previous checkpoint is intact" in str(ei.value) and "\n" not in str(ei.value)
    assert C.find_latest(out).name == "checkpoint-00000002.pt"
    assert C.verify_checksum(out / "checkpoint-00000002.pt") is True
    assert not (out / "checkpoint-00000004.pt").exists() and not _tmp_files(out)
    C.load_checkpoint(out / "checkpoint-00000002.pt")


def test_read_only_output_folder_fails_before_anything_is_built(tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    if os.access(out, os.W_OK):   # root ignores the mode bits: a read-only file system then
        def refuse(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(C.tempfile, "mkstemp", refuse)

    class NoData(SyntheticData):
        def iter_epoch(self, *a, **k):
            raise AssertionError("data was read before the output folder was checked")

    try:
        with pytest.raises(OutputDirError, match="cannot be written"):
            train(small_cfg(out), data=NoData(16, 4, 4, 32), log=QUIET)
    finally:
        out.chmod(0o755)


def test_another_runs_folder_is_refused_then_overwrite_or_resume(tmp_path):
    out = tmp_path / "run"
    train(small_cfg(out, max_steps=4, save_every=4), data=_data(), log=QUIET)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    with pytest.raises(OutputDirError, match="already holds a run.*--resume.*--overwrite"):
        train(small_cfg(out, max_steps=2), data=_data(), log=QUIET)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before   # untouched
    # a file of the user's (no checksum: not written by this code) is never pruned
    foreign = out / "checkpoint-00000009.pt"
    foreign.write_bytes(b"user's file")
    (out / "notes.txt").write_text("mine")
    s = train(small_cfg(out, max_steps=2, save_every=1, overwrite=True, keep_last=1), data=_data(), log=QUIET)
    assert s["checkpoint"].endswith("checkpoint-00000002.pt") and Path(s["checkpoint"]).exists()
    assert not (out / "checkpoint-00000004.pt").exists()            # the old run's, removed by --overwrite
    assert (out / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]   # not mixed with the old run
    s = train(small_cfg(out, max_steps=3, save_every=1, keep_last=1), data=_data(), resume="auto", log=QUIET)
    assert s["steps"] == 3 and foreign.read_bytes() == b"user's file"
    assert [p.name for _, p in C.list_checkpoints(out)] == ["checkpoint-00000003.pt", "checkpoint-00000009.pt"]


def test_stale_tmp_files_are_cleaned_at_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".checkpoint-00000004.pt.abc123.tmp", out / ".latest.txt.x1.tmp",
             out / "checkpoint-00000004.pt.sha256"]
    for p in stale:
        p.write_bytes(b"partial")
    keep = out / "notes.tmp"
    keep.write_text("a user's file")
    C.prepare_run_dir(out, resuming=True, log_fn=QUIET)
    assert not any(p.exists() for p in stale) and keep.exists()


# ----------------------------------------------------------------------------------------
# the demo builder
# ----------------------------------------------------------------------------------------
def test_demo_builder_writes_only_in_its_marked_folder(tmp_path):
    from mam2_fast.data.demo import MARKER, make_demo_dataset
    user = tmp_path / "mine"
    (user / "videos").mkdir(parents=True)
    (user / "videos" / "holiday.mp4").write_bytes(b"precious")
    (user / "train.txt").write_text("my list\n")
    with pytest.raises(UserError, match="not a demo folder"):
        make_demo_dataset(str(user), num_videos=2, size=32, num_frames=4)
    assert (user / "videos" / "holiday.mp4").read_bytes() == b"precious"
    assert (user / "train.txt").read_text() == "my list\n" and not (user / MARKER).exists()
    root = tmp_path / "demo"
    a = make_demo_dataset(str(root), num_videos=2, size=32, num_frames=4)
    b = make_demo_dataset(str(root), num_videos=3, size=32, num_frames=4)   # another size
    assert (root / MARKER).is_file() and Path(a).parent != Path(b).parent
    for lf, n in ((a, 2), (b, 3)):   # both variants intact side by side
        paths = [line.rsplit(" ", 1)[0] for line in Path(lf).read_text().splitlines()]
        assert len(paths) == n and all(os.path.getsize(p) > 0 for p in paths)
    assert make_demo_dataset(str(root), num_videos=2, size=32, num_frames=4) == a


# ----------------------------------------------------------------------------------------
# bad videos, user errors
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    from mam2_fast.data.demo import make_demo_dataset
    return make_demo_dataset(str(tmp_path_factory.mktemp("demo")), num_videos=12, seed=0, size=48, num_frames=16)


def _data_cfg(list_file, **kw):
    from mam2_fast.data import DataConfig
    base = dict(list_file=str(list_file), num_frames=4, input_size=32, sampling_stride=2, num_sample=1,
                num_workers=1, decode_timeout_s=30.0)
    base.update(kw)
    return DataConfig(**base)


def test_corrupt_videos_mixed_into_a_list_are_skipped_counted_and_named(small_demo, tmp_path, caplog):
    from mam2_fast.data import build_pretrain_data
    lines = Path(small_demo).read_text().splitlines()
    src = lines[0].rsplit(" ", 1)[0]
    bad = {"empty.mp4": b"", "truncated.mp4": Path(src).read_bytes()[:300], "text.mp4": b"hello, not a video\n"}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    names = list(bad) + ["missing.mp4"]
    for i, name in enumerate(names):
        lines[i] = f"{tmp_path / name} {lines[i].rsplit(' ', 1)[1]}"
    lf = tmp_path / "list.txt"
    lf.write_text("\n".join(lines) + "\n")
    data = build_pretrain_data(_data_cfg(lf, max_bad_fraction=0.9), batch_size=2, seed=0)
    with caplog.at_level(logging.WARNING, logger="mam2_fast.data"):
        batches = [b["index"].tolist() for _, b in data.iter_epoch(0)]
    data.close()
    assert len(batches) == 6 and not {i for b in batches for i in b} & {0, 1, 2, 3}
    assert data.stats()["bad_videos"] >= 4
    for name in names:
        assert any(name in r.getMessage() for r in caplog.records), name


def test_user_errors_print_one_line_without_traceback(tmp_path, capsys, monkeypatch):
    from mam2_fast.pretrain import main
    from mam2_fast.train.distributed import run_cli
    lf = tmp_path / "bad.txt"
    lf.write_text("".join(f"{tmp_path}/v{i}.mp4 0\n" for i in range(20)))
    for i in range(20):
        (tmp_path / f"v{i}.mp4").write_bytes(b"not a video")
    common = ["data.demo=false", "model.img_size=32", "model.num_frames=4", "data.num_frames=4", "data.input_size=32",
              "model.preset=tiny", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
              "data.num_workers=0", "train.device=cpu", "train.progress=false", "train.tensorboard=false"]
    cases = [
        ([f"data.list_file={tmp_path / 'nope.txt'}"], "error: data: list file not found"),
        ([f"data.list_file={lf}"], "error: data: "),                       # too many bad videos
        ([f"data.list_file={lf}", "--resume", str(tmp_path / "x.pt")], "error: checkpoint not found"),
    ]
    for i, (args, want) in enumerate(cases):
        argv = common + [f"train.output_dir={tmp_path / f'run{i}'}"] + args
        with pytest.raises(SystemExit) as ei:
            run_cli(lambda: main(argv))
        err = capsys.readouterr().err.strip().splitlines()
        assert ei.value.code == 1 and len(err) == 1 and err[0].startswith(want), (args, err)
        assert "Traceback" not in err[0]
    # other ranks stay silent; a real bug keeps its traceback (propagates)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as ei:
        run_cli(lambda: main(common + [f"data.list_file={tmp_path / 'nope.txt'}",
                                       f"train.output_dir={tmp_path / 'r1'}"]))
    assert ei.value.code == 1 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")

    def bug():
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        run_cli(bug)


def test_mostly_bad_list_is_a_data_error(tmp_path):
    from mam2_fast.data import build_pretrain_data
    lf = tmp_path / "list.txt"
    lf.write_text("".join(f"{tmp_path}/v{i}.mp4 0\n" for i in range(8)))
    for i in range(8):
        (tmp_path / f"v{i}.mp4").write_bytes(b"not a video")
    data = build_pretrain_data(_data_cfg(lf, num_workers=0), batch_size=2, seed=0)
    with pytest.raises(DataError, match="failed to decode"):
        list(data.iter_epoch(0))
    data.close()


def test_finetune_labels_checked_against_num_classes_with_line_number(tmp_path):
    from mam2_fast.data.video_list import check_labels, read_list_file
    from mam2_fast.errors import UserValueError
    lf = tmp_path / "l.txt"
    lf.write_text("# header\na.mp4 0\nb.mp4 11\n\nc.mp4 12\n")
    recs = read_list_file(str(lf))
    check_labels(recs, 13, str(lf))
    with pytest.raises(UserValueError, match=r"l\.txt:5: label 12 is outside \[0, 12\)"):
        check_labels(recs, 12, str(lf))


# ----------------------------------------------------------------------------------------
# non-finite streak
# ----------------------------------------------------------------------------------------
def test_nonfinite_log_window_is_recorded_as_nan(tmp_path):
    out = tmp_path / "nan"
    s = train(small_cfg(out, max_steps=4, log_every=2, save_every=100, max_nonfinite=5),
              data=PoisonedData(16, 4, 4, 32, bad={(0, 0), (0, 1)}), log=QUIET)
    recs = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert s["skipped_steps"] == 2
    assert math.isnan(recs[2]["loss"]) and recs[2]["skipped_steps"] == 2    # not 0.0
    assert math.isfinite(recs[4]["loss"]) and recs[4]["loss"] > 0


# ----------------------------------------------------------------------------------------
# decode workers
# ----------------------------------------------------------------------------------------
class _Zeros:
    def load(self, index, keys):
        return np.full((1, 2, 4, 4, 3), index, dtype=np.uint8)


def _run_tasks(pool, n):
    got, t = {}, 0
    while len(got) < n:
        while t < n and pool.submit((t, t, (0,))):
            t += 1
        for ev in pool.poll(timeout=1.0):
            if ev.kind == "ok":
                got[ev.task_id] = int(ev.payload.flatten()[0])
    return got


def test_worker_found_dead_at_submit_is_replaced(tmp_path):
    from mam2_fast.data.workers import DecodePool
    pool = DecodePool(_Zeros(), num_workers=1, prefetch=2, timeout_s=30)
    try:
        dead = pool.workers[0].proc
        os.kill(dead.pid, signal.SIGKILL)
        dead.join(5)
        got = _run_tasks(pool, 4)          # the first send hits a broken pipe: no exception
        assert got == {i: i for i in range(4)} and pool.restarts == 1
    finally:
        pool.close()


_die_marker = None


def _die_once(self, index, keys):
    from mam2_fast.data.dataset import ClipSource
    if keys[-2] == 0 and keys[-1] == 0 and not os.path.exists(_die_marker):
        open(_die_marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)   # like the OOM killer
    return ClipSource._real_load(self, index, keys)


def test_killed_worker_clip_is_decoded_again(small_demo, tmp_path, monkeypatch):
    global _die_marker
    from mam2_fast.data import build_pretrain_data
    from mam2_fast.data.dataset import ClipSource
    cfg = _data_cfg(small_demo, num_workers=2)
    clean = build_pretrain_data(cfg, batch_size=2, seed=0)
    ref = [b["clip"].clone() for _, b in clean.iter_epoch(0)]
    clean.close()
    _die_marker = str(tmp_path / "died")
    monkeypatch.setattr(ClipSource, "_real_load", ClipSource.load, raising=False)
    monkeypatch.setattr(ClipSource, "load", _die_once)
    data = build_pretrain_data(cfg, batch_size=2, seed=0)
    got = [b["clip"].clone() for _, b in data.iter_epoch(0)]
    stats = data.stats()
    data.close()
    assert os.path.exists(_die_marker) and stats["worker_restarts"] == 1 and stats["bad_videos"] == 0
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))


_ORPHAN_SCRIPT = textwrap.dedent("""
    import os, sys, threading, time
    sys.path.insert(0, {repo!r})
    from mam2_fast.data.workers import DecodePool

    class Hang:
        def load(self, index, keys):
            time.sleep(3600)          # a decode stuck in a codec

    pools = []
    def make():
        pool = DecodePool(Hang(), num_workers=2, prefetch=1, timeout_s=3600)
        pool.submit((1, 0, (0,)))
        pools.append(pool)
    if sys.argv[1] == "thread":       # as under the CUDA prefetch thread: that thread then ends
        t = threading.Thread(target=make)
        t.start()
        t.join()
    else:
        make()
    time.sleep(1.5)
    print(" ".join(str(w.proc.pid) for w in pools[0].workers), flush=True)
    time.sleep(3600)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("started_from", ["main", "thread"])
def test_workers_end_when_their_parent_is_killed(tmp_path, started_from):
    script = tmp_path / "orphans.py"
    script.write_text(_ORPHAN_SCRIPT.format(repo=str(REPO)))
    proc = subprocess.Popen([sys.executable, str(script), started_from], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip(), proc.stderr.read()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)   # alive after the starting thread ended
    finally:
        proc.kill()
        proc.wait(30)
    deadline = time.time() + 5.0
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"decode workers {left} outlived their parent"
    shm = [n for n in os.listdir("/dev/shm") if any(f"_{p}_" in n for p in pids + [proc.pid])] \
        if os.path.isdir("/dev/shm") else []
    assert not shm, shm


# ----------------------------------------------------------------------------------------
# fine-tuning: SIGTERM, like pre-training
# ----------------------------------------------------------------------------------------
def test_finetune_sigterm_checkpoints_and_reports_it(tmp_path):
    from mam2_fast.finetune import train as ft_train
    from test_finetune import LabeledSynthetic, _tiny_cfg

    class TermAtSecondBatch(LabeledSynthetic):
        def iter_epoch(self, epoch, start_step=0):
            for s, b in super().iter_epoch(epoch, start_step):
                if epoch == 0 and s == 1:
                    os.kill(os.getpid(), signal.SIGTERM)   # as a scheduler's preemption notice
                yield s, b

    logs = []
    s = ft_train(_tiny_cfg(tmp_path, save_every=100), data=TermAtSecondBatch(), log=logs.append)
    assert s["interrupted"] and s["steps"] == 2 and any("stop requested" in line for line in logs)
    assert Path(s["checkpoint"]).name == "checkpoint-00000002.pt" and s["final_eval"] is None
    r = ft_train(_tiny_cfg(tmp_path, save_every=100), data=LabeledSynthetic(), resume="auto", log=QUIET)
    assert r["steps"] == 4 and not r["interrupted"]
