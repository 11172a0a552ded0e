"""Start-of-run self-check of the fused kernels on the training device.

``kernels: auto`` trusts a fused op only after this check, in two parts:

1. numerics on the device: every fused op runs once on small random inputs of the run's
   dtype (odd sizes, empty segments), forward and backward, against its reference;
2. the run's own launch shapes: every launch one training step makes, at the run's batch,
   mask and widths (``launch_plan.check_launch_limits``, no memory, no GPU needed), is
   checked against CUDA's grid limits, so a shape the tiny inputs of part 1 cannot show
   (a grid past 65,535 on axis 1/2, 2^31 - 1 blocks on axis 0) is caught before step 1.

An op that fails either part runs its reference for the whole run (``kernels.
fall_back_to_reference``) with one warning naming it; the others stay fused. With
``kernels: fused`` a failure raises instead.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from mam2_fast import kernels
from mam2_fast.kernels import reference as ref

# bf16 tensor-core paths (tl.dot on bf16) and the tile sizes are tuned for Ampere and newer
MIN_CAPABILITY = (8, 0)

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


def _case_gather_tokens(device, dtype):
    x0 = torch.randn(3, 2, 37, 48, device=device, dtype=dtype)     # N not a power of two
    idx = torch.stack([torch.randperm(37, device=device)[:11].sort().values for _ in range(3)])

    def run(fn):
        x = x0.clone().requires_grad_(True)
        out = fn(x)
        out.float().square().sum().backward()
        return out, x.grad

    fused = run(lambda x: kernels.gather_tokens(x, idx, backend="fused"))
    refr = run(lambda x: ref.gather_tokens_ref(x, idx))
    return fused, refr


CASES: dict[str, Callable] = {
    "factorized_attention[temporal]": lambda d, t: _case_attention(d, t, "temporal"),
    "factorized_attention[spatial]": lambda d, t: _case_attention(d, t, "spatial"),
    "varlen_attention": _case_varlen,
    "linear_cross_entropy": _case_linear_ce,
    "gather_visible_add_pos": _case_gather,
    "gather_tokens": _case_gather_tokens,
    "rgb_diff_mse_tube": _case_rgb_diff,
    "rgb_diff_mse_packed": _case_rgb_diff_packed,
}


def check_fused_kernels(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Run every fused op against its reference; returns ``{op: problem}`` (empty when all pass)."""
    from mam2_fast.train import accel

    if accel.is_stand_in(device):
        return {}      # a stand-in device (dry runs on "meta") has no values to compare
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


def op_of_case(case: str) -> str:
    """``factorized_attention[temporal]`` -> ``factorized_attention`` (a :data:`kernels.FUSED_OPS` name)."""
    return case.split("[", 1)[0]


def union_across_ranks(problems: dict) -> dict:
    """In a multi-process run, the ops that failed the check on any rank, on every rank (the
    first rank's reason): all ranks then fall back alike, and under ``fused`` all of them raise,
    rather than one rank leaving while the others wait for it in the next collective. One
    ``all_gather_object``; a no-op in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return problems
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    merged: dict = {}
    for rank, found in enumerate(gathered):
        for op, why in (found or {}).items():
            merged.setdefault(op, why if rank == dist.get_rank() else f"on rank {rank}: {why}")
    return merged


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, log=print,
                    shapes=None) -> str:
    """The backend a run actually uses: ``reference`` / ``fused`` / ``auto`` -> checked choice.

    ``shapes`` (a :class:`~mam2_fast.kernels.launch_plan.RunShapes` of the run, at its per-device
    batch) adds the launch-limit check at the run's real shapes. Under ``auto`` each failing op
    falls back to its reference alone (one warning per op); ``fused`` raises on any failure.
    A run decides afresh: the fallbacks of an earlier run in this process are forgotten."""
    kernels.clear_fallbacks()
    if requested == "reference":
        return "reference"
    if requested == "auto" and device.type != "cuda":
        return "reference"
    if requested == "auto" and not kernels.triton_available():
        return _builtins_only("kernels: triton is not importable: the fused kernels cannot run", shapes,
                              device, dtype, log)
    from mam2_fast.train import accel

    cap = accel.capability(device)
    if cap is not None and cap < MIN_CAPABILITY:
        msg = (f"kernels: the fused Triton kernels need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
               f"(Ampere) or newer; {accel.device_name(device)} is {cap[0]}.{cap[1]}")
        if requested == "fused":
            raise RuntimeError(msg)
        return _builtins_only(msg, shapes, device, dtype, log)
    problems: dict[str, str] = {}
    for case, why in check_fused_kernels(device, dtype).items():
        problems.setdefault(op_of_case(case), f"{case}: {why}")
    if shapes is not None:
        from mam2_fast.kernels.launch_plan import check_launch_limits

        for op, why in check_launch_limits(shapes, dtype).items():
            problems.setdefault(op, why)
    problems = union_across_ranks(problems)
    if not problems:
        at = f", launches at batch {shapes.batch} within CUDA's limits" if shapes is not None else ""
        log(f"kernels: fused Triton kernels passed the start-of-run check on {device} ({dtype}{at})")
        return _keep_the_faster(requested, shapes, device, dtype, log)
    if requested == "fused":
        msg = "; ".join(f"{k}: {v}" for k, v in problems.items())
        raise RuntimeError(f"kernels: fused kernels failed the start-of-run check: {msg}")
    for op, why in problems.items():
        kernels.fall_back_to_reference(op, why)
        log(f"kernels: WARNING fused op {op} failed the start-of-run check ({why}); it runs its "
            f"reference for this run")
    if set(problems) >= set(kernels.FUSED_OPS):
        if requested == "auto" and shapes is not None:
            from mam2_fast.kernels.autotune import choose_ops

            choose_ops(shapes, device, dtype, log, fused=False)
        return "reference"
    return _keep_the_faster(requested, shapes, device, dtype, log)


def _builtins_only(why: str, shapes, device: torch.device, dtype: torch.dtype, log) -> str:
    """``auto`` where no fused kernel can run (an older GPU, no triton): every op runs its
    reference, except the calls where a torch built-in is faster (SDPA for attention: a V100
    or T4 still has its efficient-attention backend), chosen per call as usual; returns
    ``"reference"``."""
    for op in kernels.FUSED_OPS:
        kernels.fall_back_to_reference(op, why)
    if shapes is None:
        log(why + ": every op runs its reference")
        return "reference"
    log(why + ": every op runs its reference, or a faster torch built-in where one is")
    from mam2_fast.kernels.autotune import choose_ops

    choose_ops(shapes, device, dtype, log, fused=False)
    return "reference"


def _keep_the_faster(requested: str, shapes, device: torch.device, dtype: torch.dtype, log) -> str:
    """``auto`` at known shapes: each fused call slower than torch at them runs torch's
    reference or faster built-in (``kernels/autotune.py``); returns ``"fused"``."""
    if requested == "auto" and shapes is not None:
        from mam2_fast.kernels.autotune import choose_ops

        choose_ops(shapes, device, dtype, log)
    return "fused"
