"""Every fused Triton kernel compiles for sm_90 (H100) at its real launch configurations.

The interpreter parity tests cannot see compiler-only failures (tl.dot shape/dtype rules,
shared-memory limits); ``mam2_fast.kernels.compile_check`` compiles each launch the model
makes down to a cubin without a GPU. It runs in a subprocess because the kernels must be
JIT functions there, not the interpreter's (the parity tests set TRITON_INTERPRET=1).
"""
import os
import re
import subprocess
import sys

import pytest

EXPECTED_KERNELS = {
    "_attn_fwd_kernel", "_attn_bwd_preprocess", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
    "_varlen_fwd_kernel", "_varlen_bwd_preprocess", "_varlen_bwd_dkdv_kernel", "_varlen_bwd_dq_kernel",
    "_gather_kernel", "_scatter_kernel", "_scatter_pos_kernel", "_rgb_diff_kernel", "_ce_rows_kernel",
    "_short_fwd_kernel", "_short_bwd_kernel", "_varlen_short_fwd_kernel", "_varlen_short_bwd_kernel",
    "_gn_stats_kernel", "_gn_apply_kernel",
}


def _nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia as nv
    except Exception:
        return False
    return os.path.isfile(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"))


@pytest.mark.skipif(not _nvidia_backend(), reason="Triton without its NVIDIA backend (ptxas)")
@pytest.mark.parametrize("arch", [80, 90])
def test_all_kernels_compile_without_spills(arch):
    """sm_80 (A100, the design card's target) and sm_90 (H100/H200): every bf16 launch the
    presets make compiles, fits the architecture's shared memory per block and does not spill
    registers (ptxas -v). Before the 8-warp backward tiles, _attn_bwd_dkdv_kernel and
    _varlen_bwd_dkdv_kernel (64 x 64, dh 64) spilled ~200 B per thread on sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "mam2_fast.kernels.compile_check", "--quick", "--arch", str(arch)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SPILL" not in proc.stderr, proc.stderr[-3000:]
    assert "NARROW" not in proc.stderr, proc.stderr[-3000:]
    # compiled as a launch on the GPU would specialize them (alignment, unit strides), so the
    # access-width check ran
    assert "specialized as launched: yes" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    regs = [int(r) for r in re.findall(r"regs (\d+)", proc.stdout)]
    assert regs and max(regs) <= 255, proc.stdout[-2000:]
    m = re.search(r"^ok: (\d+) specializations of (\d+) kernels .*\((.*)\)$", proc.stdout, re.M)
    assert m, proc.stdout[-2000:]
    compiled = set(m.group(3).split(", "))
    assert EXPECTED_KERNELS <= compiled, f"not compiled: {sorted(EXPECTED_KERNELS - compiled)}"


def test_compile_check_refuses_interpreter_mode():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "mam2_fast.kernels.compile_check", "--quick"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr


def test_spilling_bf16_kernel_fails_the_check(monkeypatch, capsys):
    from mam2_fast.kernels import compile_check as cc

    recs = [{"kernel": "_k", "dtype": "bf16", "constexprs": {"BLOCK_M": 64}, "num_warps": 4, "shared": 1024,
             "regs": 255, "spill_stores": 196, "spill_loads": 196},
            {"kernel": "_k", "dtype": "fp32", "constexprs": {"BLOCK_M": 64}, "num_warps": 4, "shared": 1024,
             "regs": 255, "spill_stores": 8, "spill_loads": 8},
            {"kernel": "_j", "dtype": "bf16", "constexprs": {}, "num_warps": 4, "shared": 0,
             "regs": 40, "spill_stores": 0, "spill_loads": 0}]
    assert [r["kernel"] for r in cc.spills(recs)] == ["_k"]          # bf16 only; fp32 is reported
    monkeypatch.setattr(cc, "run_checks", lambda arch, quick: recs)
    assert cc.main(["--arch", "80", "--table"]) == 1
    out = capsys.readouterr()
    assert "| sm_80 kernel |" in out.out and "SPILL sm_80: _k" in out.err
    assert cc.main(["--arch", "80", "--allow-spills"]) == 0
    dh128 = [{"kernel": "_attn_bwd_dkdv_kernel", "dtype": "bf16", "constexprs": {"BLOCK_D": 128}, "num_warps": 4,
              "shared": 1024, "regs": 168, "spill_stores": 8, "spill_loads": 8}]
    monkeypatch.setattr(cc, "run_checks", lambda arch, quick: dh128)   # head dim 128: no preset uses it
    assert cc.main(["--arch", "90"]) == 0 and "not a preset shape" in capsys.readouterr().err
    dh64 = [dict(dh128[0], constexprs={"BLOCK_D": 64})]
    monkeypatch.setattr(cc, "run_checks", lambda arch, quick: dh64)
    assert cc.main(["--arch", "90"]) == 1
    assert cc._record_dtype({"x": "*bf16", "lse": "*fp32"}) == "bf16"


_ACCESS_SCRIPT = """
import torch
from mam2_fast.kernels import compile_check as cc
if UNSPECIALIZED:
    cc._jit_specializer = lambda target: None
with cc.compile_instead_of_launch(90) as recs:
    cc._gather_cases(torch.bfloat16, 768)
    cc._rgb_diff_cases(torch.bfloat16, 16, clip_dtype=torch.float32)
for r in recs:
    print("REC", r["kernel"], r["specialized"], cc.format_accesses(r["accesses"]))
print("NARROW", sorted({r["kernel"] for r in cc.narrow_accesses(recs)}))
"""


@pytest.mark.skipif(not _nvidia_backend(), reason="Triton without its NVIDIA backend (ptxas)")
@pytest.mark.parametrize("unspecialized", [False, True])
def test_access_width_check_sees_unvectorized_loads(unspecialized):
    """The gathers, the scatters and the RGB-difference clip loads compile to 16-byte (clip:
    >= 8-byte) vector accesses when compiled as launched. The check can fail: the same launches
    compiled without the launch's specialization (no alignment or unit stride known) move one
    bf16 element per instruction, and the check names every one of those kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = _ACCESS_SCRIPT.replace("UNSPECIALIZED", str(unspecialized))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [line.split(" ", 3)[1:] for line in proc.stdout.splitlines() if line.startswith("REC ")]
    narrow = re.search(r"^NARROW (.*)$", proc.stdout, re.M).group(1)
    assert recs and all(spec == str(not unspecialized) for _, spec, _ in recs), proc.stdout
    if unspecialized:
        assert narrow == str(["_gather_kernel", "_rgb_diff_kernel", "_scatter_kernel", "_scatter_pos_kernel"])
        assert all("ld16" in acc for kernel, _, acc in recs if kernel != "_rgb_diff_kernel"), proc.stdout
    else:
        assert narrow == "[]", proc.stdout
        assert all("ld128" in acc and "st128" in acc and "16x" not in acc
                   for kernel, _, acc in recs if kernel != "_rgb_diff_kernel"), proc.stdout


def test_narrow_access_records_fail_the_check(monkeypatch, capsys):
    from mam2_fast.kernels import compile_check as cc

    base = {"dtype": "bf16", "constexprs": {}, "num_warps": 4, "shared": 0, "regs": 32, "spill_stores": 0,
            "spill_loads": 0, "specialized": True}
    wide = dict(base, kernel="_gather_kernel", accesses={"ld128": 2, "ld64": 2, "st128": 2})
    narrow = dict(base, kernel="_scatter_kernel", accesses={"ld16": 16, "ld32": 2, "st128": 2})
    ce = dict(base, kernel="_ce_rows_kernel", accesses={"ld128": 4, "ld16": 1, "st128": 2})   # ld16 allowed
    other = dict(base, kernel="_attn_fwd_kernel", accesses={"ld16": 8, "st16": 8})            # not checked
    fp32 = dict(narrow, dtype="fp32")
    assert cc.narrow_accesses([wide, narrow, ce, other, fp32]) == [narrow]
    monkeypatch.setattr(cc, "run_checks", lambda arch, quick: [wide, narrow])
    assert cc.main(["--arch", "90"]) == 1
    assert "NARROW sm_90: _scatter_kernel" in capsys.readouterr().err
    monkeypatch.setattr(cc, "run_checks", lambda arch, quick: [wide, ce, other])
    assert cc.main(["--arch", "90"]) == 0
    assert "specialized as launched: yes" in capsys.readouterr().out
