"""Fine-tuning under torchrun --nproc_per_node 2 (gloo, CPU): ranks train in step (DDP)."""
import os
import subprocess
import sys

import pytest
import torch

from mam2_fast.data import make_demo_dataset


@pytest.mark.slow
def test_finetune_two_ranks_stay_identical(tmp_path):
    list_file = make_demo_dataset(tmp_path / "data", num_videos=16, seed=0)
    args = ["init=null", f"data.list_file={list_file}", "data.demo=false", "data.num_workers=0",
            "model.img_size=32", "model.num_frames=4", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
            "data.num_frames=4", "data.input_size=32", "data.sampling_stride=2", "data.num_sample=2",
            "train.batch_size=4", "train.max_steps=3", "train.save_every=3", "train.log_every=1",
            "train.tensorboard=false", "train.progress=false", "train.threads=1",
            f"test.list_file={list_file}", "test.every_epochs=1", "test.num_clips=1", "test.num_crops=1",
            "test.batch_size=2", f"train.output_dir={tmp_path / 'ft'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "mam2_fast.finetune", *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "weights identical across 2 ranks: True" in r.stdout
    ck = torch.load(tmp_path / "ft" / "checkpoint-00000003.pt", weights_only=False)
    assert ck["step"] == 3 and ck["kind"] == "finetune"
    # evaluations ran on both ranks (each scored its shard), rank 0 merged: all 16 videos, once
    import json
    for tag in ("eval-epoch1", "eval"):
        rep = json.loads((tmp_path / "ft" / tag / "eval.json").read_text())
        assert sorted(v["index"] for v in rep["videos"]) == list(range(16)), tag
    # the best evaluation's model is kept beside the checkpoints, loadable for evaluation
    from mam2_fast.evaluate import load_finetuned
    best = torch.load(tmp_path / "ft" / "checkpoint-best.pt", weights_only=True)
    assert best["eval"]["num_videos"] == 16 and best["step"] in (2, 3)
    model, cfg, path = load_finetuned(tmp_path / "ft" / "checkpoint-best.pt", torch.device("cpu"))
    assert path.name == "checkpoint-best.pt" and cfg.model.num_classes == model.head.out_features
