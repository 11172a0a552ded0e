"""benchmarks/gpu_session.sh, the one prepared call a lent GPU gets (15 minutes of device time
in all): a broken argument or a missing file there costs the whole session, so its commands
are checked here, on CPU. The benchmark stages run with a stub Python that records its
argv; each benchmark's own argument parser then reads the exact argv (without CUDA they parse
and return 0), and every named variant, test file and stage must exist."""
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def _session(tmp_path, env_extra, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_SESSION", "KERNELS_ARGS", "STEP_ARGS",
                                                                      "TOKENIZER_VARIANTS"))}
    env.update(OUT=str(tmp_path / "out"), GPU_SESSION_LOGS=str(tmp_path / "logs"), **env_extra)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120,
                          cwd=ROOT)


def test_dry_run_plans_every_stage_within_the_budget(tmp_path):
    proc = _session(tmp_path, {}, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = re.findall(r"^== (\w+) \(limit (\d+)s", proc.stdout, re.M)
    names = [n for n, _ in stages]
    assert names[:3] == ["env", "kernels", "parity"], names          # device-time ratios first
    assert {"tokenizer", "step", "choice", "train", "loader"} <= set(names)
    assert sum(int(s) for _, s in stages) <= 540                       # the script's own budget
    for f in re.findall(r"(tests/test_\w+\.py)", proc.stdout):          # every parity file exists
        assert (ROOT / f).is_file(), f
    assert "--device-time" in proc.stdout


def test_benchmark_stages_pass_arguments_their_scripts_accept(tmp_path, monkeypatch):
    log = tmp_path / "argv.jsonl"
    stub = tmp_path / "python"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    proc = _session(tmp_path, {"PYTHON": str(stub), "GPU_SESSION_STAGES": "kernels,tokenizer,step,choice"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    by_script = {(c[1] if c[0] == "-m" else Path(c[0]).name): (c[2:] if c[0] == "-m" else c[1:]) for c in calls}
    assert set(by_script) == {"bench_kernels.py", "bench_tokenizer.py", "bench_step.py",
                              "mam2_fast.kernels.autotune"}, calls

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr("mam2_fast.train.accel.cuda_available", lambda: False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    import bench_kernels
    import bench_step
    import bench_tokenizer

    for module, name in ((bench_kernels, "bench_kernels.py"), (bench_step, "bench_step.py"),
                         (bench_tokenizer, "bench_tokenizer.py")):
        try:
            assert module.main(by_script[name]) == 0, name         # parses, then: no CUDA here
        except SystemExit as e:                                   # argparse refused an argument
            pytest.fail(f"{name} {by_script[name]}: argparse exit {e.code}")
    argv = by_script["bench_tokenizer.py"]
    variants = argv[argv.index("--variants") + 1].split(",")
    assert variants and all(v in bench_tokenizer.VARIANTS for v in variants), variants
    assert any(bench_tokenizer.VARIANTS[v].get("compiled") for v in variants)
    argv = by_script["bench_step.py"]
    assert all(v in bench_step.VARIANTS for v in argv[argv.index("--variants") + 1].split(","))
    assert "--device-time" in by_script["bench_kernels.py"]
    from mam2_fast.kernels import autotune       # parses, loads the config; then: no CUDA here
    assert autotune.main(by_script["mam2_fast.kernels.autotune"]) == 2
