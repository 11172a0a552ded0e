"""Start-of-run self-check of the fused kernels on the training device.

``kernels: auto`` trusts the fused path only after this check: every fused op runs once on
small random inputs of the run's dtype, forward and backward, and is compared with its
reference. A failure (exception, or relative error above the stated tolerance) makes
``auto`` fall back to the reference path with a one-line warning naming the op; with
``kernels: fused`` it raises instead.
"""
from __future__ import annotations

from typing import Callable

import torch

from mam2_fast import kernels
from mam2_fast.kernels import reference as ref

# relative-error tolerances by dtype (fused vs reference computed in float32)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _case_attention(device, dtype, mode):
    qkv = torch.randn(2, 3, 11, 3, 2, 32, device=device, dtype=dtype)  # odd T and S

    def run(fn):
        x = qkv.clone().requires_grad_(True)
        out = fn(x)
        out.float().square().sum().backward()
        return out, x.grad

    fused = run(lambda x: kernels.factorized_attention(x, mode, backend="fused"))
    refr = run(lambda x: ref.factorized_attention_ref(x.float(), mode).to(dtype))
    return fused, refr


def _case_varlen(device, dtype):
    cu = torch.tensor([0, 5, 5, 22, 23], dtype=torch.int32, device=device)  # odd and empty segments
    index = torch.randperm(23, device=device).to(torch.int32)
    qkv = torch.randn(23, 3, 2, 32, device=device, dtype=dtype)

    def run(fn):
        x = qkv.clone().requires_grad_(True)
        out = fn(x)
        out.float().square().sum().backward()
        return out, x.grad

    fused = run(lambda x: kernels.varlen_attention(x, cu, 17, index, backend="fused"))
    refr = run(lambda x: ref.varlen_attention_ref(x.float(), cu, 17, index).to(dtype))
    return fused, refr


def _case_linear_ce(device, dtype):
    x0 = torch.randn(70, 32, device=device, dtype=dtype)
    w0 = torch.randn(300, 32, device=device, dtype=dtype) * 0.05
    y = torch.randint(0, 300, (70,), device=device)

    def run(fn):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        loss = fn(x, w)
        loss.backward()
        return loss, x.grad, w.grad

    fused = run(lambda x, w: kernels.linear_cross_entropy(x, w, None, y, backend="fused"))
    refr = run(lambda x, w: ref.linear_cross_entropy_ref(x.float(), w.float(), None, y))
    return fused, refr


def _case_gather(device, dtype):
    x0 = torch.randn(2, 4, 49, 64, device=device, dtype=dtype)
    pt, ps = torch.randn(4, 64, device=device, dtype=dtype), torch.randn(49, 64, device=device, dtype=dtype)
    idx = torch.stack([torch.randperm(49, device=device)[:13].sort().values for _ in range(2)])

    def run(fn):
        x = x0.clone().requires_grad_(True)
        out = fn(x)
        out.float().square().sum().backward()
        return out, x.grad

    fused = run(lambda x: kernels.gather_visible_add_pos(x, pt, ps, idx, backend="fused"))
    refr = run(lambda x: ref.gather_visible_add_pos_ref(x, pt, ps, idx))
    return fused, refr


def _case_rgb_diff(device, dtype):
    clip = torch.randn(2, 4, 3, 48, 48, device=device, dtype=dtype)
    idx = torch.stack([torch.randperm(9, device=device)[:5].sort().values for _ in range(2)])
    p0 = torch.randn(2, 4, 5, 768, device=device, dtype=dtype)

    def run(fn):
        p = p0.clone().requires_grad_(True)
        loss = fn(p)
        loss.backward()
        return loss, p.grad

    fused = run(lambda p: kernels.rgb_diff_mse_tube(clip, p, idx, 16, backend="fused"))
    refr = run(lambda p: ref.rgb_diff_mse_tube_ref(clip.float(), p.float(), idx, 16))
    return fused, refr


def _case_rgb_diff_packed(device, dtype):
    clip = torch.randn(2, 4, 3, 48, 48, device=device, dtype=dtype)
    rows = (torch.rand(2 * 4 * 9, device=device) < 0.7).nonzero().squeeze(1)   # uneven counts
    p0 = torch.randn(rows.numel(), 768, device=device, dtype=dtype)

    def run(fn):
        p = p0.clone().requires_grad_(True)
        loss = fn(p)
        loss.backward()
        return loss, p.grad

    fused = run(lambda p: kernels.rgb_diff_mse_packed(clip, p, rows, 16, backend="fused"))
    refr = run(lambda p: ref.rgb_diff_mse_packed_ref(clip.float(), p.float(), rows, 16))
    return fused, refr


CASES: dict[str, Callable] = {
    "factorized_attention[temporal]": lambda d, t: _case_attention(d, t, "temporal"),
    "factorized_attention[spatial]": lambda d, t: _case_attention(d, t, "spatial"),
    "varlen_attention": _case_varlen,
    "linear_cross_entropy": _case_linear_ce,
    "gather_visible_add_pos": _case_gather,
    "rgb_diff_mse_tube": _case_rgb_diff,
    "rgb_diff_mse_packed": _case_rgb_diff_packed,
}


def check_fused_kernels(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Run every fused op against its reference; returns ``{op: problem}`` (empty when all pass)."""
    problems: dict[str, str] = {}
    tol = TOLERANCE.get(dtype, 3e-2)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    try:
        for name, case in CASES.items():
            try:
                fused, refr = case(device, dtype)
                errs = [_rel(f, r) for f, r in zip(fused, refr)]
                if not all(e <= tol for e in errs):
                    problems[name] = f"relative error {max(errs):.2e} > {tol:.0e}"
            except Exception as e:  # noqa: BLE001 - any failure means: do not use this kernel
                problems[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        torch.random.set_rng_state(gen_state)
    return problems


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, log=print) -> str:
    """The backend a run actually uses: ``reference`` / ``fused`` / ``auto`` -> checked choice."""
    if requested == "reference":
        return "reference"
    if requested == "auto" and (device.type != "cuda" or not kernels.triton_available()):
        return "reference"
    problems = check_fused_kernels(device, dtype)
    if not problems:
        log(f"kernels: fused Triton kernels passed the start-of-run check on {device} ({dtype})")
        return "fused"
    msg = "; ".join(f"{k}: {v}" for k, v in problems.items())
    if requested == "fused":
        raise RuntimeError(f"kernels: fused kernels failed the start-of-run check: {msg}")
    log(f"kernels: WARNING fused kernels failed the start-of-run check ({msg}); using the reference path")
    return "reference"
