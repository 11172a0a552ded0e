"""Engine features: graph-break-free model under torch.compile, non-finite step skipping,
SIGTERM checkpoint-and-exit, resume on a different world size."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mam2_fast.config import ModelConfig, config_from_dict
from mam2_fast.masking import MaskGenerator
from mam2_fast.models.mam2 import build_model
from mam2_fast.pretrain import train
from mam2_fast.train.metrics import read_metrics
from synthetic import SyntheticData
from test_trainer_synthetic import small_cfg


@pytest.mark.parametrize("kind,kernels", [("tube", "reference"), ("random", "reference"), ("random", "auto")])
def test_model_has_no_graph_breaks(kind, kernels):
    """random + auto on CPU: the packed encoder path with the reference varlen attention."""
    import torch._dynamo as dynamo
    cfg = ModelConfig(preset="tiny", img_size=32, num_frames=4, embed_dim=32, depth=1, num_heads=2,
                      regressor_depth=1, appearance_depth=1, motion_depth=1, kernels=kernels)
    model = build_model(cfg, vocab_size=8)
    info = MaskGenerator(kind, 0.75, 4, (2, 2))(2, torch.Generator().manual_seed(0)).to("cpu")
    clip, codes = torch.randn(2, 4, 3, 32, 32), torch.randint(0, 8, (2, 4, 4))
    dynamo.reset()
    explanation = dynamo.explain(model)(clip, info, codes)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


class PoisonedData(SyntheticData):
    """Every clip of steps listed in ``bad`` is NaN."""

    def __init__(self, *a, bad=(), **kw):
        super().__init__(*a, **kw)
        self.bad = set(bad)

    def iter_epoch(self, epoch, start_step=0):
        for step, batch in super().iter_epoch(epoch, start_step):
            if (epoch, step) in self.bad:
                batch = {**batch, "clip": torch.full_like(batch["clip"], float("nan"))}
            yield step, batch


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    cfg = small_cfg(tmp_path / "a", max_steps=4, save_every=100)
    s = train(cfg, data=PoisonedData(16, 4, 4, 32, bad={(0, 1)}), log=lambda s: None)
    assert s["skipped_steps"] == 1
    ck = torch.load(tmp_path / "a" / "checkpoint-00000004.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert read_metrics(tmp_path / "a" / "metrics.jsonl")[-1]["skipped_steps"] == 1


def test_too_many_nonfinite_steps_stop_the_run(tmp_path):
    cfg = small_cfg(tmp_path / "b", max_steps=8, max_nonfinite=2)
    bad = {(0, 0), (0, 1), (0, 2), (0, 3)}
    with pytest.raises(FloatingPointError, match="non-finite"):
        train(cfg, data=PoisonedData(16, 4, 4, 32, bad=bad), log=lambda s: None)


def test_sigterm_writes_checkpoint_and_resume_continues(tmp_path):
    """Kill a real CLI run with SIGTERM mid-training; it checkpoints and exits 143 (not 0 like a
    finished run); --resume goes on."""
    from mam2_fast.data import make_demo_dataset
    list_file = make_demo_dataset(tmp_path / "data", num_videos=16, seed=0)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "mam2_fast.pretrain", f"data.list_file={list_file}", "data.demo=false",
            "model.img_size=32", "model.num_frames=4", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
            "model.regressor_depth=1", "model.appearance_depth=1", "model.motion_depth=1",
            "data.num_frames=4", "data.input_size=32", "data.sampling_stride=2", "data.num_workers=0",
            "tokenizer.vocab_size=8", "tokenizer.kmeans_fit_clips=8", "train.batch_size=4",
            "train.save_every=1000", "train.log_every=1", "train.tensorboard=false", "train.epochs=200",
            f"train.output_dir={out}", "train.threads=1"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, text[-3000:]
    assert "stop requested" in text
    step = int((out / "latest.txt").read_text().split("-")[1].split(".")[0])
    assert step >= 1
    r = subprocess.run(args[:-2] + ["train.max_steps=" + str(step + 2), f"train.output_dir={out}", "--resume"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from" in r.stdout and (out / f"checkpoint-{step + 2:08d}.pt").exists()


def test_resume_without_config_reads_the_runs_config(tmp_path):
    from mam2_fast.pretrain import parse_args, resolve_config
    cfg = small_cfg(tmp_path / "r", max_steps=2)
    train(cfg, data=SyntheticData(16, 4, 4, 32), log=lambda s: None)
    got = resolve_config(parse_args(["--resume", "--output-dir", str(tmp_path / "r"), "train.max_steps=4"]))
    assert got.model.embed_dim == 64 and got.train.max_steps == 4 and got.train.output_dir == str(tmp_path / "r")
    got = resolve_config(parse_args(["--resume", str(tmp_path / "r" / "checkpoint-00000002.pt")]))
    assert got.model.embed_dim == 64
    # --resume RUN_DIR: the folder as init=, export and evaluate take it
    a = parse_args(["--resume", str(tmp_path / "r"), "train.max_steps=4"])
    assert a.resume == "auto" and a.output_dir == str(tmp_path / "r")
    got = resolve_config(a)
    assert got.model.embed_dim == 64 and got.train.output_dir == str(tmp_path / "r") and got.train.max_steps == 4
    res = train(got, data=SyntheticData(16, 4, 4, 32), resume=a.resume, log=lambda s: None)
    assert res["steps"] == 4
    with pytest.raises(SystemExit, match="another"):
        parse_args(["--resume", str(tmp_path / "r"), "--output-dir", str(tmp_path / "elsewhere")])


@pytest.mark.parametrize("module", ["pretrain", "finetune", "profile"])
def test_cli_overrides_before_and_after_options(module):
    import importlib
    parse_args = importlib.import_module(f"mam2_fast.{module}").parse_args
    a = parse_args(["model.depth=4", "--output-dir", "x", "train.epochs=2"])
    assert a.overrides == ["model.depth=4", "train.epochs=2"] and a.output_dir == "x"
    if module != "profile":
        # an override right after a bare --resume is an override, not a checkpoint path
        a = parse_args(["--resume", "model.depth=4", "train.epochs=2"])
        assert a.resume == "auto" and a.overrides == ["model.depth=4", "train.epochs=2"]
        a = parse_args(["--resume", "runs/x/checkpoint-00000002.pt", "train.epochs=2"])
        assert a.resume == "runs/x/checkpoint-00000002.pt" and a.overrides == ["train.epochs=2"]


@pytest.mark.parametrize("over,key", [(["tokenizer.kind=vqgan"], "tokenizer.checkpoint"),
                                      (["tokenizer.kind=dalle", "tokenizer.checkpoint=/no/such/encoder.pkl"],
                                       "tokenizer.checkpoint"),
                                      (["tokenizer.kind=vqgan", "tokenizer.checkpoint={file}",
                                        "tokenizer.checkpoint_config=/no/such.yaml"], "tokenizer.checkpoint_config")])
def test_missing_tokenizer_weights_stop_before_any_data_is_built(tmp_path, capsys, over, key):
    from mam2_fast import pretrain
    real = tmp_path / "last.ckpt"
    real.write_bytes(b"x")
    argv = [o.format(file=real) for o in over] + [f"data.demo_dir={tmp_path / 'demo'}",
                                                 f"train.output_dir={tmp_path / 'run'}"]
    from mam2_fast.config import ConfigError
    with pytest.raises(ConfigError, match=key) as e:   # the CLI (train/distributed.run_cli) prints it as one line, exit 2
        pretrain.main(argv)
    assert e.value.exit_code == 2
    assert not (tmp_path / "demo").exists()          # the demo set was not built
