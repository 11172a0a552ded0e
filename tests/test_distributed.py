"""torchrun --nproc_per_node 2 (gloo, CPU): ranks end identical and equal to one process with
the same global batch (same clips, same masks, same tokenizer), and a 2-rank checkpoint resumed
in one process matches the 1-process run continued alike."""
import os
import subprocess
import sys

import pytest
import torch

from mam2_fast.data import make_demo_dataset

COMMON = [
    "model.img_size=32", "model.num_frames=4", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
    "model.regressor_depth=1", "model.appearance_depth=1", "model.motion_depth=1",
    "data.num_frames=4", "data.input_size=32", "data.sampling_stride=2", "data.num_sample=2",
    "data.num_workers=0", "tokenizer.vocab_size=8", "tokenizer.kmeans_fit_clips=8",
    "optim.lr=1e-3", "optim.warmup_epochs=0", "train.max_steps=3", "train.save_every=3",
    "train.log_every=1", "train.tensorboard=false", "train.progress=false", "train.threads=1",
]


def _run(cmd, env):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-5000:]}"
    return r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_single_process(tmp_path, parallel):
    list_file = make_demo_dataset(tmp_path / "data", num_videos=16, seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    common = COMMON + [f"data.list_file={list_file}", "data.demo=false"]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "mam2_fast.pretrain", *common, "train.batch_size=4", f"train.parallel={parallel}",
                f"train.output_dir={tmp_path / 'two'}"], env)
    assert "weights identical across 2 ranks: True" in two
    _run([sys.executable, "-m", "mam2_fast.pretrain", *common, "train.batch_size=8",
          f"train.output_dir={tmp_path / 'one'}"], env)
    a = torch.load(tmp_path / "two" / "checkpoint-00000003.pt", weights_only=False)
    b = torch.load(tmp_path / "one" / "checkpoint-00000003.pt", weights_only=False)
    assert a["step"] == b["step"] == 3 and a["world_size"] == 2 and b["world_size"] == 1
    assert torch.equal(a["tokenizer"]["codebook"], b["tokenizer"]["codebook"])
    assert a["model"].keys() == b["model"].keys()
    # 3 AdamW steps at lr 1e-3: float reduction order differs between 2x4 and 1x8 clips, and
    # Adam's normalisation turns that into differences of ~1% of one step (1e-5) at most
    # Exception: the LayerNorm bias on the regressor's key input. It shifts every key of a query by
    # the same W_k b, which softmax ignores, so its true gradient is 0 and Adam normalises pure
    # rounding noise into steps of up to lr: compared at that scale. (The key projection has no
    # bias in the CAE block for the same reason.)
    for k in a["model"]:
        atol = 3e-3 if k.endswith("norm1_k.bias") else 2e-5
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-3, atol=atol, msg=lambda m: f"{k}: {m}")
    # the weights did move: not a trivially equal pair
    init_like = a["model"]["blocks.0.mlp.fc1.weight"]
    assert (a["model"]["blocks.0.mlp.fc1.weight"] != 0).any() and torch.isfinite(init_like).all()
    # resume on a different world size: the 2-rank checkpoint continues in 1 process (global
    # batch 8 either way) and must match the 1-process run continued alike
    for run_dir in ("two", "one"):
        out = _run([sys.executable, "-m", "mam2_fast.pretrain", *common, "train.batch_size=8", "train.max_steps=5",
                    "train.save_every=5", f"train.output_dir={tmp_path / run_dir}", "--resume"], env)
        assert "checkpoint-00000003.pt (step 3)" in out, out[-2000:]
    a = torch.load(tmp_path / "two" / "checkpoint-00000005.pt", weights_only=False)
    b = torch.load(tmp_path / "one" / "checkpoint-00000005.pt", weights_only=False)
    assert a["step"] == b["step"] == 5 and a["world_size"] == b["world_size"] == 1
    for k in a["model"]:
        atol = 5e-3 if k.endswith("norm1_k.bias") else 4e-5     # zero true gradient (above)
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-3, atol=atol, msg=lambda m: f"{k}: {m}")


_EXIT_SCRIPT = """
import atexit, sys
import mam2_fast.train.distributed as D
atexit.register(lambda: print("atexit-ran", flush=True))
D._JOINED_GROUP = {joined}
sys.stdout.write("summary-without-newline")   # block-buffered: a pipe
D.exit_worker(3)
"""


@pytest.mark.parametrize("joined", [True, False])
def test_exit_worker_skips_teardown_only_after_joining_a_group(joined):
    # a torchrun worker leaves with os._exit (DDP leaks its gloo group; normal teardown can
    # SIGABRT), but flushes what it printed first; a plain process exits normally
    r = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT.format(joined=joined)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=120)
    assert r.returncode == 3, r.stderr
    assert r.stdout.startswith("summary-without-newline")
    assert ("atexit-ran" in r.stdout) is (not joined)


_FAIL_SCRIPT = """
import atexit, sys
import mam2_fast.train.distributed as D
atexit.register(lambda: print("atexit-ran", flush=True))
D._JOINED_GROUP = {joined}
def main():
    print("before", end="")
    raise ValueError("bad thing in the step")
D.run_cli(main)
"""


@pytest.mark.parametrize("joined", [True, False])
def test_run_cli_reports_a_failed_worker(joined):
    r = subprocess.run([sys.executable, "-c", _FAIL_SCRIPT.format(joined=joined)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=120)
    assert r.returncode == 1
    assert "ValueError: bad thing in the step" in r.stderr and r.stdout.startswith("before")
    assert ("atexit-ran" in r.stdout) is (not joined)


def test_process_group_timeout_is_configurable(monkeypatch):
    from datetime import timedelta

    import mam2_fast.train.distributed as D

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(D, "_JOINED_GROUP", False)
    info = D.init_distributed("cpu", timeout_min=90)
    assert (info.rank, info.world_size) == (1, 2)
    assert seen == {"backend": "gloo", "timeout": timedelta(minutes=90)}
    from mam2_fast.config import TrainConfig
    assert TrainConfig().dist_timeout_min == 30.0
