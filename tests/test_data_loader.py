"""The trainer-facing pipeline: demo dataset, build_pretrain_data, resumption, failures."""
import json
import logging
import os
import time

import pytest
import torch

from mam2_fast.data import DataConfig, build_pretrain_data, make_demo_dataset
from mam2_fast.data.dataset import ClipSource


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(str(tmp_path_factory.mktemp("demo")), num_videos=24, seed=0)


def _cfg(list_file, **kw):
    base = dict(list_file=list_file, num_frames=4, input_size=48, sampling_stride=3, num_sample=2,
                num_workers=0, decode_timeout_s=30.0)
    base.update(kw)
    return DataConfig(**base)


def _epoch(data, epoch, start_step=0):
    return [(s, {k: v.clone() for k, v in b.items()}) for s, b in data.iter_epoch(epoch, start_step)]


def test_demo_dataset_files_and_idempotence(demo):
    root = os.path.dirname(demo)
    lines = open(demo).read().split("\n")[:-1]
    assert len(lines) == 24
    meta = json.load(open(os.path.join(root, "labels.json")))
    assert meta["num_classes"] == 12 and meta["shapes"] == ["circle", "square", "triangle"]
    path, label = lines[0].rsplit(" ", 1)
    name = os.path.basename(path)  # 00000_<shape>_<direction>.mp4 agrees with the label
    shape, direction = name[:-4].split("_")[1:]
    assert int(label) == meta["shapes"].index(shape) * 4 + meta["directions"].index(direction)
    mtime = os.path.getmtime(path)
    assert make_demo_dataset(root, num_videos=24, seed=0) == demo
    assert os.path.getmtime(path) == mtime  # reused, not rebuilt


def test_batch_contract(demo):
    data = build_pretrain_data(_cfg(demo), batch_size=4, seed=0)
    assert data.steps_per_epoch == 6            # 24 / num_sample 2 = 12 videos, 2 per batch
    assert data.samples_per_epoch == 24         # effective samples (repeated clips count): N
    steps = _epoch(data, 0)
    assert [s for s, _ in steps] == list(range(6))
    b = steps[0][1]
    assert b["clip"].shape == (4, 4, 3, 48, 48) and b["clip"].dtype == torch.float32
    assert b["label"].dtype == torch.long and b["index"].dtype == torch.long
    assert torch.equal(b["index"][0::2], b["index"][1::2])        # 2 clips per decoded video
    assert not torch.equal(b["clip"][0], b["clip"][1])              # ... augmented differently
    assert torch.equal(b["label"], data.labels[b["index"]])
    assert -2.2 < b["clip"].min() and b["clip"].max() < 2.7         # normalized
    assert data.stats()["bad_videos"] == 0
    data.close()


def test_resume_and_workers_are_deterministic(demo):
    cfg = _cfg(demo, num_sample=1, num_workers=0)
    full = _epoch(build_pretrain_data(cfg, batch_size=4, seed=3), 1)
    resumed = _epoch(build_pretrain_data(cfg, batch_size=4, seed=3), 1, start_step=4)
    assert [s for s, _ in resumed] == [4, 5]
    for (s1, a), (s2, b) in zip(full[4:], resumed):
        assert s1 == s2 and torch.equal(a["index"], b["index"]) and torch.equal(a["clip"], b["clip"])
    data = build_pretrain_data(_cfg(demo, num_sample=1, num_workers=2), batch_size=4, seed=3)
    multi = _epoch(data, 1)
    data.close()
    for (_, a), (_, b) in zip(full, multi):
        assert torch.equal(a["clip"], b["clip"]) and torch.equal(a["label"], b["label"])
    other = _epoch(build_pretrain_data(cfg, batch_size=4, seed=3), 2)
    assert not all(torch.equal(a["index"], b["index"]) for (_, a), (_, b) in zip(full, other))


def test_distributed_ranks_split_the_epoch(demo):
    cfg = _cfg(demo, num_sample=1)
    idx = []
    for rank in range(2):
        data = build_pretrain_data(cfg, batch_size=4, seed=0, rank=rank, world_size=2)
        assert data.steps_per_epoch == 3 and data.samples_per_epoch == 24
        idx += [i for _, b in data.iter_epoch(0) for i in b["index"].tolist()]
    assert sorted(idx) == list(range(24))


def test_bfloat16_output(demo):
    data = build_pretrain_data(_cfg(demo, out_dtype="bfloat16"), batch_size=2, seed=0)
    _, b = next(iter(data.iter_epoch(0)))
    assert b["clip"].dtype == torch.bfloat16


def _with_bad(demo, tmp_path, n_bad):
    lines = open(demo).read().split("\n")[:-1]
    bad = []
    for i in range(n_bad):
        p = tmp_path / f"bad{i}.mp4"
        src = lines[i].rsplit(" ", 1)[0]
        data = open(src, "rb").read()
        p.write_bytes(data[:100] if i % 2 else b"")   # truncated / zero-length
        bad.append(str(p))
        lines[i] = f"{p} {lines[i].rsplit(' ', 1)[1]}"
    lf = tmp_path / "list.txt"
    lf.write_text("\n".join(lines) + "\n")
    return str(lf), bad


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_videos_are_skipped_counted_and_named(demo, tmp_path, caplog, workers):
    lf, bad = _with_bad(demo, tmp_path, 3)
    data = build_pretrain_data(_cfg(lf, num_sample=1, num_workers=workers), batch_size=4, seed=0)
    with caplog.at_level(logging.WARNING, logger="mam2_fast.data"):
        batches = _epoch(data, 0)
    data.close()
    assert len(batches) == 6
    seen = {i for _, b in batches for i in b["index"].tolist()}
    assert not seen & {0, 1, 2}                       # bad ones replaced
    assert data.stats()["bad_videos"] >= 3
    assert all(any(p in r.getMessage() for r in caplog.records) for p in bad)


def test_all_bad_dataset_fails_clearly(tmp_path):
    lf = tmp_path / "list.txt"
    lf.write_text("".join(f"{tmp_path}/v{i}.mp4 0\n" for i in range(8)))
    for i in range(8):
        (tmp_path / f"v{i}.mp4").write_bytes(b"not a video")
    data = build_pretrain_data(_cfg(str(lf), num_sample=1), batch_size=2, seed=0)
    with pytest.raises(RuntimeError, match="failed to decode"):
        _epoch(data, 0)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        build_pretrain_data(_cfg(str(tmp_path / "nope.txt")), batch_size=2)
    lf = tmp_path / "l.txt"
    lf.write_text("a.mp4 1\n")
    with pytest.raises(FileNotFoundError, match="no_root"):
        build_pretrain_data(_cfg(str(lf), root=str(tmp_path / "no_root")), batch_size=2)


_real_load = ClipSource.load


def _hang_on_first(self, index, keys):
    if keys[-1] == 0 and keys[-2] == 0:  # position 0, first attempt
        time.sleep(3600)
    return _real_load(self, index, keys)


def _die_on_first(self, index, keys):
    if keys[-1] == 0 and keys[-2] == 0:
        os._exit(3)
    return _real_load(self, index, keys)


def _bug(self, index, keys):
    raise KeyError("a bug, not a bad video")


@pytest.mark.parametrize("workers", [0, 1])
def test_hanging_decode_is_abandoned(demo, monkeypatch, workers):
    monkeypatch.setattr(ClipSource, "load", _hang_on_first)  # forked workers inherit it
    # 2 s: far above a normal decode of these small clips, even on a loaded CI machine
    data = build_pretrain_data(_cfg(demo, num_sample=1, num_workers=workers, decode_timeout_s=2.0),
                               batch_size=2, seed=0)
    batches = _epoch(data, 0)
    data.close()
    assert len(batches) == 12 and data.stats()["decode_timeouts"] == 1


def test_dead_worker_is_restarted(demo, monkeypatch):
    """A clip that kills its worker every time: decoded again once (2 restarts), then counted."""
    monkeypatch.setattr(ClipSource, "load", _die_on_first)
    data = build_pretrain_data(_cfg(demo, num_sample=1, num_workers=2), batch_size=2, seed=0)
    batches = _epoch(data, 0)
    stats = data.stats()
    data.close()
    assert len(batches) == 12 and stats["worker_restarts"] == 2 and stats["bad_videos"] == 1


@pytest.mark.parametrize("workers", [0, 1])
def test_worker_bug_fails_with_traceback(demo, monkeypatch, workers):
    monkeypatch.setattr(ClipSource, "load", _bug)
    data = build_pretrain_data(_cfg(demo, num_workers=workers), batch_size=2, seed=0)
    with pytest.raises(RuntimeError, match="a bug, not a bad video"):
        _epoch(data, 0)
    data.close()
