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
}


def _nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia as nv
    except Exception:
        return False
    return os.path.isfile(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"))


@pytest.mark.skipif(not _nvidia_backend(), reason="Triton without its NVIDIA backend (ptxas)")
def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "mam2_fast.kernels.compile_check", "--quick", "--arch", "90"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = re.search(r"^ok: (\d+) specializations of (\d+) kernels .*\((.*)\)$", proc.stdout, re.M)
    assert m, proc.stdout[-2000:]
    compiled = set(m.group(3).split(", "))
    assert EXPECTED_KERNELS <= compiled, f"not compiled: {sorted(EXPECTED_KERNELS - compiled)}"


def test_compile_check_refuses_interpreter_mode():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "mam2_fast.kernels.compile_check", "--quick"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr
