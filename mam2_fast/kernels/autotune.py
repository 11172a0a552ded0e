"""Per-op choice at run time: a fused op is used only where it beats torch at the run's shapes.

``kernels: auto`` runs, once per run and after the start-of-run check (``selfcheck``), each fused
op that one training step calls (``launch_plan.planned_calls``) forward and backward at the
run's shapes, on the run's device and dtype, against the same call through its plain-torch
reference (SDPA for attention, ``F.cross_entropy`` on full logits, advanced indexing, ...), and
keeps the faster. A slower fused op is sent back to its reference for the whole run
(``kernels.fall_back_to_reference``), so a user never gets a fused op that is slower than
torch's. The choice is logged in one line and cached in a JSON file keyed by device name,
dtype and shapes (``~/.cache/mam2_fast/kernel_choice.json``; ``MAM2_KERNEL_CACHE`` moves it,
``MAM2_KERNEL_RETUNE=1`` ignores it), so a resumed run or a second run at the same shapes does
not time again.

On a GPU each op is timed by its device time (``kernels.device_time``: queued behind a sleeping
kernel, so the host's launch overhead, which a training step hides, does not decide), on the
CPU by its wall time. Each op is timed on one representative call (the encoder's for
attention, the appearance head for the cross-entropy, ...): the op's other calls in a step
have the same kind of shape.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from mam2_fast import kernels
from mam2_fast.masking import num_masked

Timer = Callable[[Callable[[], None], torch.device], float]


def _fwd_bwd(out: torch.Tensor) -> None:
    (out.float().sum() if out.dim() else out.float()).backward()


def _pair(make: Callable[[str], None]) -> Tuple[Callable[[], None], Callable[[], None]]:
    return (lambda: make("fused")), (lambda: make("reference"))


def op_cases(s, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Dict[str, tuple]:
    """``{op: (run_fused, run_reference)}`` for every fused op a step at shapes ``s``
    (a :class:`~mam2_fast.kernels.launch_plan.RunShapes`) calls; each runs forward + backward."""
    from mam2_fast.kernels.launch_plan import planned_calls

    ops = {c.op for c in planned_calls(s, dtype)}
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, T, N, D, H = s.batch, s.frames, s.patches, s.embed_dim, s.heads
    Dd = s.decoder_dim or D
    ratio = s.mask_ratio if s.mask_kind is not None else 0.0
    Nm = num_masked(ratio, N) if ratio else 0
    Nv = N - Nm
    rnd = lambda *shape, dt=dtype: torch.randn(*shape, generator=g).to(device=device, dtype=dt)  # noqa: E731
    idx = torch.stack([torch.randperm(N, generator=g)[:max(Nv, 1)].sort().values for _ in range(B)]).to(device)
    midx = torch.stack([torch.randperm(N, generator=g)[:max(Nm, 1)].sort().values for _ in range(B)]).to(device)
    cases: Dict[str, tuple] = {}

    if "factorized_attention" in ops:
        S = Nv if s.mask_kind in ("tube", "cube") else N
        qkv0 = rnd(B, T, S, 3, H, D // H)

        def attn(backend):
            qkv = qkv0.detach().requires_grad_()
            out = kernels.factorized_attention(qkv, "temporal", backend=backend)
            _fwd_bwd(kernels.factorized_attention(qkv, "spatial", backend=backend) + out)
        cases["factorized_attention"] = _pair(attn)
    if "varlen_attention" in ops:
        per_frame = max(1, (T * N - num_masked(ratio, T * N)) // T)        # visible tokens per frame
        ntok = B * T * per_frame
        cu = torch.arange(0, ntok + 1, per_frame, dtype=torch.int32).to(device)
        qkv0 = rnd(ntok, 3, H, D // H)

        def varlen(backend):
            qkv = qkv0.detach().requires_grad_()
            _fwd_bwd(kernels.varlen_attention(qkv, cu, per_frame, None, backend=backend))
        cases["varlen_attention"] = _pair(varlen)
    if "gather_visible_add_pos" in ops:
        x0, pt, ps = rnd(B, T, N, D), rnd(T, D, dt=torch.float32), rnd(N, D, dt=torch.float32)

        def gather(backend):
            x = x0.detach().requires_grad_()
            _fwd_bwd(kernels.gather_visible_add_pos(x, pt, ps, idx, backend=backend))
        cases["gather_visible_add_pos"] = _pair(gather)
    if "gather_tokens" in ops:
        y0 = rnd(B, T, N, Dd)

        def gather_tokens(backend):
            y = y0.detach().requires_grad_()
            _fwd_bwd(kernels.gather_tokens(y, midx, backend=backend))
        cases["gather_tokens"] = _pair(gather_tokens)
    if "linear_cross_entropy" in ops and s.vocab_size:
        M = B * (T * Nm if s.mask_kind in ("tube", "cube") else num_masked(ratio, T * N))
        h0, w0 = rnd(M, Dd), rnd(s.vocab_size, Dd) * 0.02
        target = torch.randint(0, s.vocab_size, (M,), generator=g).to(device)

        def ce(backend):
            h, w = h0.detach().requires_grad_(), w0.detach().requires_grad_()
            _fwd_bwd(kernels.linear_cross_entropy(h, w, None, target, backend=backend))
        cases["linear_cross_entropy"] = _pair(ce)
    side = int(round(N ** 0.5)) * s.patch
    ppc = s.patch * s.patch * s.channels
    if "rgb_diff_mse_tube" in ops:
        clip, p0 = rnd(B, T, s.channels, side, side), rnd(B, T, max(Nm, 1), ppc)

        def rgb(backend):
            p = p0.detach().requires_grad_()
            _fwd_bwd(kernels.rgb_diff_mse_tube(clip, p, midx, s.patch, backend=backend))
        cases["rgb_diff_mse_tube"] = _pair(rgb)
    if "rgb_diff_mse_packed" in ops:
        clip = rnd(B, T, s.channels, side, side)
        rows = torch.randperm(B * T * N, generator=g)[: max(1, num_masked(ratio, T * N)) * B].sort().values.to(device)
        p0 = rnd(rows.numel(), ppc)

        def rgb_packed(backend):
            p = p0.detach().requires_grad_()
            _fwd_bwd(kernels.rgb_diff_mse_packed(clip, p, rows, s.patch, backend=backend))
        cases["rgb_diff_mse_packed"] = _pair(rgb_packed)
    return cases


def time_call(fn: Callable[[], None], device: torch.device, warmup: int = 2, reps: int = 5) -> float:
    """Milliseconds of one call of ``fn`` on ``device``: on a GPU its device time, queued behind
    a sleeping kernel so the host's launch overhead (which a training step hides: the host runs
    ahead of the device) is not counted (:mod:`mam2_fast.kernels.device_time`); elsewhere its
    median wall time."""
    from mam2_fast.kernels import device_time

    return device_time.device_ms(fn, device, warmup, reps)


def cache_path() -> Path:
    return Path(os.environ.get("MAM2_KERNEL_CACHE", "~/.cache/mam2_fast/kernel_choice.json")).expanduser()


def cache_key(s, device: torch.device, dtype: torch.dtype) -> str:
    from mam2_fast.train import accel

    # "device time": entries timed eagerly (host overhead included) before 2026-12-05 are not reused
    return f"{accel.device_name(device)} | {str(dtype).replace('torch.', '')} | device time | {s}"


def agree_across_ranks(timings: Dict[str, dict]) -> Dict[str, dict]:
    """In a multi-process run every rank keeps rank 0's timings and choices: each rank times
    its own device, and where the two sides of an op are close, timing noise could give ranks
    different kernels (each correct, but the ranks' numerics would differ). One
    ``broadcast_object_list``; a no-op in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return timings
    box = [timings]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def choose_ops(s, device: torch.device, dtype: torch.dtype, log=print, timer: Optional[Timer] = None,
               path: Optional[Path] = None) -> Dict[str, dict]:
    """Time every fused op of a step at shapes ``s`` against its reference and send the slower
    fused ones back to the reference (every rank of a multi-process run follows rank 0's
    choice); returns ``{op: {"fused_ms", "reference_ms", "choice"}}``."""
    path = path or cache_path()
    key = cache_key(s, device, dtype)
    cache: dict = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
    timings = cache.get(key) if os.environ.get("MAM2_KERNEL_RETUNE", "0") in ("", "0") else None
    source = "cached"
    if timings is None:
        from mam2_fast.kernels import device_time

        timer = timer or time_call
        timings, source = {}, "timed"
        for op, (fused, reference) in op_cases(s, device, dtype).items():
            if op in kernels.fallbacks():          # failed the start-of-run check: not a candidate
                continue
            tf, tr = timer(fused, device), timer(reference, device)
            timings[op] = {"fused_ms": round(tf, 4), "reference_ms": round(tr, 4),
                           "choice": "fused" if tf <= tr else "reference"}
        device_time.release()                     # the L2-flush buffer
        cache[key] = timings
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, path)
        except OSError as e:
            log(f"kernels: could not cache the per-op choice in {path} ({e})")
    timings = agree_across_ranks(timings)
    for op, t in timings.items():
        if t["choice"] == "reference":
            kernels.fall_back_to_reference(op, f"slower than its torch reference at the run's shapes "
                                               f"({t['fused_ms']:.3f} vs {t['reference_ms']:.3f} ms)")
    unit = "device ms" if device.type == "cuda" else "ms"
    log(f"kernels: per-op choice at batch {s.batch} ({source}, fused vs torch, {unit}): " + ", ".join(
        f"{op} {t['choice']} ({t['fused_ms']:.2f} vs {t['reference_ms']:.2f} ms)" for op, t in timings.items()))
    return timings
