"""python -m mam2_fast.profile on the tiny CPU config (1 warm-up + 1 timed step), the peak
table, and the benchmark scripts' --smoke modes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mam2_fast import profile

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.img_size=32", "model.num_frames=4", "model.depth=2", "model.embed_dim=64", "model.num_heads=2",
        "model.regressor_depth=1", "model.appearance_depth=1", "model.motion_depth=1",
        "train.batch_size=2", "train.threads=1", "data.num_sample=2"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_cli_tiny(tmp_path, capsys):
    rc = profile.main(["--warmup", "1", "--steps", "1", "--trace-steps", "1", "--output-dir", str(tmp_path),
                       "--dataset-size", "1000", *TINY])
    assert rc == 0
    text = capsys.readouterr().out
    for word in ("clips/s", "tokenizer", "alignment target", "backward", "optimizer", "epochs/hour", "MFU"):
        assert word in text, word
    res = json.loads((tmp_path / "profile.json").read_text())
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["traceEvents"]
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forward", "backward", "optimizer", "alignment_target"} <= names
    assert res["batch"] == 2 and res["clips_per_s"] > 0
    for k in ("data", "tokenizer", "alignment target", "forward", "backward", "optimizer"):
        assert res["phases_ms"][k] >= 0
    assert res["phases_ms"]["alignment target"] > 0
    # epochs/hour: clips/s * 3600 / (videos * num_sample)
    assert res["epochs_per_hour"] == pytest.approx(res["clips_per_s"] * 3600 / (1000 * 2))
    assert res["mfu"] is None  # no CPU peak unless --peak-tflops
    assert res["flops_per_clip"] > 0 and torch.get_num_threads() == 1


def test_profile_peak_override_gives_mfu(tmp_path):
    cfg = profile.resolve_config(profile.parse_args(["--peak-tflops", "1", *TINY]))
    res = profile.run_profile(cfg, warmup=0, steps=1, peak_tflops=1.0, output_dir=str(tmp_path), trace_steps=0,
                              log=lambda s: None)
    assert res["mfu"] == pytest.approx(res["achieved_tflops"] / 1.0)
    assert not (tmp_path / "trace.json").exists()


def test_peak_table():
    assert profile.peak_for_name("NVIDIA H100 80GB HBM3") == 989.4
    assert profile.peak_for_name("NVIDIA H100 PCIe") == 756.5
    assert profile.peak_for_name("NVIDIA H100 NVL") == 835.0
    assert profile.peak_for_name("NVIDIA H200") == 989.4
    assert profile.peak_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert profile.peak_for_name("Some Other GPU") is None


def test_largest_batch_search():
    bench = _load("bench_step")
    for cap in (1, 5, 16, 17, 100):
        seen = []
        best = bench.largest_batch(lambda b: seen.append(b) or b <= cap, start=8, cap=512)
        assert best == cap and len(seen) < 20
    assert bench.largest_batch(lambda b: False, start=8) == 0
    assert bench.largest_batch(lambda b: True, start=8, cap=40) == 40


def test_bench_scripts_smoke(capsys):
    assert _load("bench_step").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "clips/s" in out and "smoke" in out
    assert _load("bench_videomae").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "ours" in out


def test_profile_videomae_baseline(tmp_path):
    """model.arch=videomae: the baseline model is profiled (no tokenizer or alignment phase)
    and its FLOPs are VideoMAE's, not MAM^2's."""
    from mam2_fast.flops import videomae_step_flops
    args = profile.parse_args(["--config", str(ROOT / "configs" / "videomae_baseline_k400.yaml"),
                               "model.decoder_dim=32", "model.decoder_heads=2", *TINY])
    cfg = profile.resolve_config(args)
    res = profile.run_profile(cfg, warmup=0, steps=1, output_dir=str(tmp_path), trace_steps=0, log=lambda s: None)
    assert res["phases_ms"].get("tokenizer", 0.0) == 0.0
    assert res["phases_ms"].get("alignment target", 0.0) == 0.0
    runner = profile.MAM2Step(cfg, torch.device("cpu"), log=lambda s: None)
    assert runner.videomae and runner.tokenizer is None
    want = videomae_step_flops(runner.model.cfg, batch=2)
    assert res["flops_per_step"] == pytest.approx(want.total)
    assert res["tokenizer_flops_per_clip"] == 0
