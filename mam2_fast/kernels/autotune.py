"""Per-call choice at run time: a fused kernel runs only where it beats torch at the run's shapes.

``kernels: auto`` runs, once per run and after the start-of-run check (``selfcheck``), every
distinct fused call that one training step makes (``call_cases``, following
``launch_plan.planned_calls``: the encoder's temporal and its spatial attention, the alignment
target's forward-only passes, the decoders', the gathers, the appearance head, the motion loss)
at the run's shapes, on the run's device and dtype, forward and backward where the step runs a
backward, against the same call through its plain-torch reference (matmul-softmax attention,
``F.cross_entropy`` on full logits, advanced indexing, ...) and, where torch has a faster
built-in for the same computation (``builtin.py``: SDPA with each backend forced for attention
without validity masks, ``varlen_attn`` for packed segments in row order; each checked against
the reference first), against those too, and
keeps the fastest **per call**.
The calls differ in kind, not just in size (the encoder's spatial attention over 49 visible
tokens runs a single-tile kernel, the decoders' over 147 masked ones the flash-attention
scheme; on the H200 of 2026-12-04 the fused temporal attention won 3-7x while the spatial
forward lost to cuDNN's SDPA), so one choice per op would keep a slower kernel somewhere. A
call with a faster alternative runs it for the whole run (``kernels.fall_back_call``, matched
by ``kernels.call_key``); an op whose every call chose its reference falls back whole
(``kernels.fall_back_to_reference``), so shapes the plan did not time (a last short batch)
follow it. A user never gets a fused call that is slower than torch's at the run's shapes.

The choice is logged in one line and cached in a JSON file keyed by device name, dtype and
shapes (``~/.cache/mam2_fast/kernel_choice.json``; ``MAM2_KERNEL_CACHE`` moves it,
``MAM2_KERNEL_RETUNE=1`` ignores it), so a resumed run or a second run at the same shapes does
not time again. On a GPU each call is timed by its device time (``kernels.device_time``:
queued behind a sleeping kernel, so the host's launch overhead, which a training step hides,
does not decide), on the CPU by its wall time.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional

import torch

from mam2_fast import kernels
from mam2_fast.kernels import builtin
from mam2_fast.masking import num_masked

Timer = Callable[[Callable[[], None], torch.device], float]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _run(out: torch.Tensor, backward: bool) -> None:
    if backward:
        (out.float().sum() if out.dim() else out.float()).backward()


class CallCase(NamedTuple):
    """One call site of a fused op in a step, ready to run every way at the run's shapes."""
    op: str                       # the dispatch name (kernels.FUSED_OPS)
    what: str                     # where the model makes the call
    fused: Callable[[], None]     # forward (+ backward when the step runs one) through the kernel
    reference: Callable[[], None]  # the same through the op's plain-torch reference
    # torch built-ins for the same call (builtin.candidates: e.g. "sdpa:cudnn" -> its run)
    builtins: Dict[str, Callable[[], None]] = {}
    # impl -> relative error of its output (and input gradient) against the reference's
    error: Optional[Callable[[str], float]] = None


def call_cases(s, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Dict[str, CallCase]:
    """``{call key: CallCase}`` for every distinct fused call a step at shapes ``s`` (a
    :class:`~mam2_fast.kernels.launch_plan.RunShapes`) makes, keyed by the
    :func:`kernels.call_key` the model's own call computes (``tests/test_autotune.py`` records
    the model's calls and checks the two agree). Follows ``launch_plan.planned_calls``; each
    attention call is two cases (temporal, spatial: different kernels, different winners)."""
    c = _Cases(s, device, dtype, seed)
    B, T, N, D, H, train = s.batch, s.frames, s.patches, s.embed_dim, s.heads, s.train
    Dd, Hd = s.decoder_dim or D, s.decoder_heads or H
    if s.mask_kind is None:                    # fine-tuning / evaluation: the encoder on every token
        c.attention(f"encoder [B, T, N] = {[B, T, N]}", T, N, D, H, train)
        return c.cases
    decoders = s.appearance_target is not None or s.motion_target not in (None, "clip_order")
    if s.mask_kind in ("tube", "cube"):
        Nm = num_masked(s.mask_ratio, N)
        Nv = N - Nm
        c.gather_pos(f"visible tokens + positions, Nv {Nv}", Nv, train)
        c.attention(f"encoder [B, T, Nv] = {[B, T, Nv]}", T, Nv, D, H, train)
        if s.use_alignment:
            c.gather_pos(f"alignment target: masked tokens, Nm {Nm}", Nm, False)
            c.attention(f"alignment target encoder [B, T, Nm] = {[B, T, Nm]}", T, Nm, D, H, False)
        dec_slots = Nm if s.use_regressor else N
        if decoders:
            c.attention(f"decoders [B, T, {dec_slots}]", T, dec_slots, Dd, Hd, train)
        if s.motion_target == "clip_order":
            c.attention(f"clip-order decoder [B, 1+T, Nm] = {[B, 1 + T, Nm]}", T + 1, Nm, Dd, Hd, train)
        if not s.use_regressor:
            c.gather_tokens("decoder output -> masked tokens", Dd, c.normed, train)   # after the decoders' norm
        if s.appearance_target == "tokens" and s.vocab_size:
            c.linear_ce(B * T * Nm)
        elif s.appearance_target == "pixels":
            c.gather_tokens("pixel target at the masked tokens", c.ppc, torch.float32, False)
        if s.motion_target == "rgb_diff":
            c.rgb_diff_tube(Nm)
        elif s.motion_target == "flow":
            c.gather_tokens("flow target at the masked tokens", s.patch * s.patch * 2, torch.float32, False)
        return c.cases
    # random / frame masks: packed token sets, varlen attention
    visible = _visible(s)
    masked = T * N - visible
    c.varlen(f"encoder, packed visible set ({visible} per clip)", False, D, H, train)
    if s.use_alignment:
        c.varlen(f"alignment target encoder, packed masked set ({masked} per clip)", True, D, H, False)
    if decoders:
        if s.use_regressor:
            c.varlen(f"decoders, packed masked set ({masked} per clip)", True, Dd, Hd, train)
        else:
            c.attention(f"decoders [B, T, N] = {[B, T, N]}", T, N, Dd, Hd, train)
    if s.appearance_target == "tokens" and s.vocab_size:
        c.linear_ce(B * masked)
    if s.motion_target == "rgb_diff" and s.use_regressor:
        c.rgb_diff_packed(B * masked)
    return c.cases


class _Cases:
    """Builds the :class:`CallCase` of each call kind on random inputs at the run's shapes."""

    def __init__(self, s, device: torch.device, dtype: torch.dtype, seed: int):
        self.s, self.device, self.dtype = s, device, dtype
        self.g = torch.Generator(device="cpu").manual_seed(seed)
        self.cases: Dict[str, CallCase] = {}
        self.ppc = s.patch * s.patch * s.channels
        # a half-precision run is fp32 weights under autocast: the calls see the autocast dtype
        # where a linear / convolution made the tensor (qkv, patch embeddings, the motion head's
        # prediction) and fp32 where a LayerNorm or a parameter did (the appearance head's input)
        self.amp = dtype in (torch.float16, torch.bfloat16)
        self.normed = torch.float32 if self.amp else dtype
        side = int(round(s.patches ** 0.5)) * s.patch
        self.clip = self.rnd(s.batch, s.frames, s.channels, side, side, dt=torch.float32)   # motion clip: fp32

    def rnd(self, *shape, dt=None) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g).to(device=self.device, dtype=dt or self.dtype)

    def slots(self, k: int) -> torch.Tensor:                                 # [B, k] sorted slots
        N = self.s.patches
        return torch.stack([torch.randperm(N, generator=self.g)[:max(k, 1)].sort().values
                            for _ in range(self.s.batch)]).to(self.device)

    def _ctx(self, grad: bool):
        from mam2_fast.train import accel

        return torch.set_grad_enabled(grad), accel.autocast(self.device, self.dtype, enabled=self.amp)

    def add(self, op: str, what: str, grad: bool, call: Callable[[str], torch.Tensor], key_of: Callable[[], str],
            builtin_call: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
            leaf: Optional[Callable[[], torch.Tensor]] = None, impls: tuple = ()) -> None:
        """``call(backend)`` makes the op's call on fresh leaves; ``grad``: a backward follows.
        ``builtin_call(impl, x)``: the call through the torch built-in ``impl`` (one of
        ``impls``) or the reference, on the leaf ``x = leaf()``."""
        def runner(make: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def run():
                g_ctx, amp_ctx = self._ctx(grad)
                with g_ctx, amp_ctx:
                    _run(make(), grad)
            return run

        def outputs(impl: str):                          # output (+ the leaf's grad), detached
            x = leaf()
            g_ctx, amp_ctx = self._ctx(grad)
            with g_ctx, amp_ctx:
                out = builtin_call(impl, x)
                _run(out, grad)
            return [out.detach().float()] + ([x.grad.float()] if grad else [])

        expected: list = []                              # the reference's outputs, computed once

        def error(impl: str) -> float:
            expected[:] = expected or outputs("reference")
            return max(_rel(a, b) for a, b in zip(outputs(impl), expected))

        g_ctx, amp_ctx = self._ctx(grad)
        with g_ctx, amp_ctx:
            key = key_of()
        builtins = {impl: runner(lambda impl=impl: builtin_call(impl, leaf())) for impl in impls}
        self.cases.setdefault(key, CallCase(op, what, runner(lambda: call("fused")), runner(lambda: call("reference")),
                                            builtins, error if impls else None))

    def attention(self, what: str, frames: int, S: int, width: int, heads: int, grad: bool) -> None:
        qkv0 = self.rnd(self.s.batch, frames, S, 3, heads, width // heads)   # [B, T, S, 3, H, dh]
        leaf = lambda: qkv0.detach().requires_grad_(grad)                   # noqa: E731
        for mode in ("temporal", "spatial"):
            def through(impl: str, qkv: torch.Tensor, mode=mode) -> torch.Tensor:
                if impl == "reference":
                    return kernels.factorized_attention(qkv, mode, backend="reference")
                return builtin.run("factorized_attention", impl, qkv, mode, None, None)
            self.add("factorized_attention", f"{what} {mode}", grad,
                     lambda backend, mode=mode: kernels.factorized_attention(leaf(), mode, backend=backend),
                     lambda mode=mode: kernels.call_key("factorized_attention", mode, leaf()),
                     builtin_call=through, leaf=leaf,
                     impls=tuple(builtin.candidates("factorized_attention", self.device)))

    def varlen(self, what: str, masked_set: bool, width: int, heads: int, grad: bool) -> None:
        B = self.s.batch
        frame_len, slot_len = _segment_lengths(self.s, masked_set)             # one clip's segments
        spatial_cu = _cu_seqlens(frame_len * B, self.device)                  # per (b, t)
        temporal_cu = _cu_seqlens(slot_len * B, self.device)                  # per (b, n)
        ntok = int(spatial_cu[-1])
        qkv0 = self.rnd(ntok, 3, heads, width // heads)                       # [Ntok, 3, H, dh]
        index = torch.arange(ntok, device=self.device, dtype=torch.int32)   # position -> row
        leaf = lambda: qkv0.detach().requires_grad_(grad)                    # noqa: E731
        for mode, cu, lengths, idx in (("spatial", spatial_cu, frame_len, None),
                                       ("temporal", temporal_cu, slot_len, index)):
            def through(impl: str, qkv: torch.Tensor, cu=cu, longest=max(lengths), idx=idx) -> torch.Tensor:
                if impl == "reference":
                    return kernels.varlen_attention(qkv, cu, longest, idx, backend="reference")
                return builtin.run("varlen_attention", impl, qkv, cu, longest, idx, None)
            self.add("varlen_attention", f"{what} {mode}", grad,
                     lambda backend, cu=cu, longest=max(lengths), idx=idx: kernels.varlen_attention(
                         leaf(), cu, longest, idx, backend=backend),
                     lambda mode=mode, cu=cu: kernels.call_key("varlen_attention", mode, leaf(), cu),
                     builtin_call=through, leaf=leaf,
                     impls=tuple(builtin.candidates("varlen_attention", self.device, has_index=idx is not None)))

    def gather_pos(self, what: str, k: int, grad: bool) -> None:
        B, T, N, D = self.s.batch, self.s.frames, self.s.patches, self.s.embed_dim
        x0, pt0, ps0 = self.rnd(B, T, N, D), self.rnd(T, D, dt=torch.float32), self.rnd(N, D, dt=torch.float32)
        idx = self.slots(k)
        leaves = lambda: (x0.detach().requires_grad_(grad), pt0.detach().requires_grad_(grad),  # noqa: E731
                          ps0.detach().requires_grad_(grad))
        self.add("gather_visible_add_pos", what, grad,
                 lambda backend: kernels.gather_visible_add_pos(*leaves(), idx, backend=backend),
                 lambda: kernels.call_key("gather_visible_add_pos", "tube", leaves()[0], idx, leaves()[1]))

    def gather_tokens(self, what: str, width: int, dt: torch.dtype, grad: bool) -> None:
        s = self.s
        x0, idx = self.rnd(s.batch, s.frames, s.patches, width, dt=dt), self.slots(s.patches - _visible(s))
        leaf = lambda: x0.detach().requires_grad_(grad)                     # noqa: E731
        self.add("gather_tokens", what, grad, lambda backend: kernels.gather_tokens(leaf(), idx, backend=backend),
                 lambda: kernels.call_key("gather_tokens", "tube", leaf(), idx))

    def linear_ce(self, M: int) -> None:
        s, train = self.s, self.s.train
        Dd = s.decoder_dim or s.embed_dim
        h0, w0 = self.rnd(M, Dd, dt=self.normed), self.rnd(s.vocab_size, Dd, dt=self.normed) * 0.02
        target = torch.randint(0, s.vocab_size, (M,), generator=self.g).to(self.device)
        leaves = lambda: (h0.detach().requires_grad_(train), w0.detach().requires_grad_(train))  # noqa: E731
        self.add("linear_cross_entropy", f"appearance head, M {M}", train,
                 lambda backend: kernels.linear_cross_entropy(*leaves(), None, target, backend=backend),
                 lambda: kernels.call_key("linear_cross_entropy", "ignore-100", *leaves()))

    def rgb_diff_tube(self, Nm: int) -> None:
        s, train, clip = self.s, self.s.train, self.clip
        p0, idx = self.rnd(s.batch, s.frames, Nm, self.ppc), self.slots(Nm)
        leaf = lambda: p0.detach().requires_grad_(train)                    # noqa: E731
        self.add("rgb_diff_mse_tube", "motion loss (Eq. 3)", train,
                 lambda backend: kernels.rgb_diff_mse_tube(clip, leaf(), idx, s.patch, backend=backend),
                 lambda: kernels.call_key("rgb_diff_mse_tube", f"P{s.patch}", leaf(), clip, idx))

    def rgb_diff_packed(self, M: int) -> None:
        s, train, clip = self.s, self.s.train, self.clip
        rows = torch.randperm(s.batch * s.frames * s.patches, generator=self.g)[:M].sort().values.to(self.device)
        p0 = self.rnd(rows.numel(), self.ppc)
        leaf = lambda: p0.detach().requires_grad_(train)                    # noqa: E731
        self.add("rgb_diff_mse_packed", "motion loss (Eq. 3), packed", train,
                 lambda backend: kernels.rgb_diff_mse_packed(clip, leaf(), rows, s.patch, backend=backend),
                 lambda: kernels.call_key("rgb_diff_mse_packed", f"P{s.patch}", leaf(), clip, rows))


def _visible(s) -> int:
    """Visible tokens per clip (tube-like masks: per frame)."""
    if s.mask_kind in ("tube", "cube", None):
        return s.patches - (num_masked(s.mask_ratio, s.patches) if s.mask_kind else 0)
    if s.mask_kind == "frame":
        return (s.frames - num_masked(s.mask_ratio, s.frames)) * s.patches
    return s.frames * s.patches - num_masked(s.mask_ratio, s.frames * s.patches)


def _segment_lengths(s, masked_set: bool):
    """One clip's packed segment lengths for the masked (or visible) set: per frame (spatial)
    and per slot (temporal). Random masks: the set spread evenly (what a draw gives on
    average); frame masks: whole frames in or out."""
    T, N = s.frames, s.patches
    if s.mask_kind == "frame":
        mf = num_masked(s.mask_ratio, T)
        in_set = [t >= T - mf for t in range(T)] if masked_set else [t < T - mf for t in range(T)]
        return [N if i else 0 for i in in_set], [sum(in_set)] * N
    count = T * N - _visible(s) if masked_set else _visible(s)
    return [count // T + (t < count % T) for t in range(T)], [count // N + (n < count % N) for n in range(N)]


def _cu_seqlens(lengths, device: torch.device) -> torch.Tensor:
    """``cu_seqlens [len(lengths)+1]`` int32."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return out.to(device)


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

    # "per call, built-ins": entries of the per-op choice (before 2026-12-07) are not reused
    return f"{accel.device_name(device)} | {str(dtype).replace('torch.', '')} | device time, per call, built-ins | {s}"


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
               path: Optional[Path] = None, fused: bool = True) -> Dict[str, dict]:
    """Time every fused call of a step at shapes ``s`` against its reference and, where torch
    has a built-in for the call (``builtin.candidates``: SDPA backends for attention without
    validity masks, ``varlen_attn`` for packed segments in row order), against each built-in
    that agrees with the reference; the fastest runs. A call whose fastest is not the kernel
    runs its reference or built-in (``kernels.fall_back_call``); an op whose every call chose
    its reference falls back whole (``kernels.fall_back_to_reference``: other shapes, e.g. a
    last short batch, follow it). Every rank of a multi-process run follows rank 0's choice.
    An op that failed the start-of-run check (or every op, ``fused=False``: no fused kernel
    can run here) is timed without its kernel, reference against built-ins. Returns
    ``{call key: {"op", "what", "fused_ms" (when timed), "reference_ms", "builtin_ms", "choice"}}``."""
    path = path or cache_path()
    key = cache_key(s, device, dtype) + ("" if fused else " | built-ins only")
    kernels.clear_call_fallbacks()                # this choice decides every call afresh
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

        from mam2_fast.kernels.selfcheck import TOLERANCE

        timer = timer or time_call
        timings, source = {}, "timed"
        for call, case in call_cases(s, device, dtype).items():
            with_kernel = fused and case.op not in kernels.fallbacks()   # failed the check: no kernel
            if not (with_kernel or case.builtins):
                continue
            t = {"op": case.op, "what": case.what}
            if with_kernel:
                t["fused_ms"] = round(timer(case.fused, device), 4)
            t["reference_ms"] = round(timer(case.reference, device), 4)
            for impl, run in case.builtins.items():   # torch built-ins: parity first, then time
                try:
                    err = case.error(impl) if case.error is not None else 0.0
                    if not err <= TOLERANCE.get(dtype, 3e-2):
                        raise ValueError(f"relative error {err:.1e} against the reference")
                    t.setdefault("builtin_ms", {})[impl] = round(timer(run, device), 4)
                except Exception as e:  # noqa: BLE001 - a backend that cannot run this call
                    t.setdefault("builtin_skipped", {})[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            ms = {"reference": t["reference_ms"], **t.get("builtin_ms", {})}
            if with_kernel:
                ms["fused"] = t["fused_ms"]
            t["choice"] = min(ms, key=lambda k: (ms[k], k != "fused"))     # ties keep the kernel
            timings[call] = t
        device_time.release()                     # the L2-flush buffer
        cache[key] = timings
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, path)
        except OSError as e:
            log(f"kernels: could not cache the per-call choice in {path} ({e})")
    timings = agree_across_ranks(timings)
    apply_choice(timings)
    unit = "device ms" if device.type == "cuda" else "ms"
    log(f"kernels: per-call choice at batch {s.batch} ({source}, {unit}; fused / reference / "
        f"built-ins): " + ", ".join(f"{t['op']} {t['what']}: {t['choice']} ({_times(t)})" for t in timings.values()))
    return timings


def _times(t: dict) -> str:
    built = "".join(f" / {impl} {ms:.2f}" for impl, ms in t.get("builtin_ms", {}).items())
    fused = f"{t['fused_ms']:.2f}" if "fused_ms" in t else "-"
    return f"{fused} / {t['reference_ms']:.2f}{built}"


def apply_choice(timings: Dict[str, dict]) -> None:
    """Send each call that has a faster alternative to it: a whole op to its reference where
    every one of its calls chose the reference, else call by call (reference or built-in)."""
    by_op: Dict[str, list] = {}
    for call, t in timings.items():
        by_op.setdefault(t["op"], []).append((call, t))
    for op, calls in by_op.items():
        why = lambda t: (f"faster than the fused kernel at the run's shapes "  # noqa: E731
                         f"(fused / reference / built-ins: {_times(t)} ms)")
        if all(t["choice"] == "reference" and "fused_ms" in t for _, t in calls):
            kernels.fall_back_to_reference(op, "; ".join(f"{t['what']}: {why(t)}" for _, t in calls))
            continue
        for call, t in calls:
            if t["choice"] != "fused":
                kernels.fall_back_call(call, why(t), impl=t["choice"])


def main(argv=None) -> int:
    """``python -m mam2_fast.kernels.autotune [--config YAML] [--batch B] [key=value ...]``:
    what ``kernels: auto`` chooses for each fused call of a pre-training step of that config on
    this machine's GPU (times afresh; nothing cached), one line per call."""
    import argparse
    import sys

    from mam2_fast.config import ConfigError
    from mam2_fast.flops import config_without_data, tokenizer_vocab
    from mam2_fast.kernels.launch_plan import RunShapes
    from mam2_fast.models.mam2 import build_model
    from mam2_fast.train.loop import amp_dtype

    p = argparse.ArgumentParser(prog="python -m mam2_fast.kernels.autotune", description=main.__doc__)
    p.add_argument("--config", "-c", help="YAML config; omitted: configs/pretrain_base.yaml (ViT-B)")
    p.add_argument("--batch", type=int, help="clips per step on one device (default: train.batch_size)")
    p.add_argument("--device", default="cuda", help="cuda (default) | cpu (wall time, the interpreter: tiny configs)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    path = a.config or str(Path(__file__).resolve().parents[2] / "configs" / "pretrain_base.yaml")
    try:
        cfg = config_without_data(path, a.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("autotune: no CUDA device here (--device cpu times a tiny config under TRITON_INTERPRET=1)",
              file=sys.stderr)
        return 2
    with torch.device("meta"):                 # shapes only: no memory for the weights
        model = build_model(cfg.model, vocab_size=tokenizer_vocab(cfg.tokenizer))
    batch = a.batch or cfg.train.batch_size
    shapes = RunShapes.of_model(model, batch, cfg.mask.kind, cfg.mask.ratio)
    dtype = amp_dtype(device, cfg.train.precision) or torch.float32
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / f"mam2_autotune_{os.getpid()}.json"
    os.environ.update(MAM2_KERNEL_RETUNE="1", MAM2_KERNEL_CACHE=str(cache))   # time afresh, keep nothing
    print(f"config: {path} {' '.join(a.overrides)}; batch {batch}, {cfg.mask.kind} {cfg.mask.ratio}, "
          f"{str(dtype).replace('torch.', '')}, {'device' if device.type == 'cuda' else 'wall'} ms")
    try:
        if device.type == "cuda":              # as a run does it: the start-of-run check, then the timing
            from mam2_fast.kernels.selfcheck import resolve_backend

            resolve_backend("auto", device, dtype, lambda line: print(line) if "WARNING" in line else None, shapes)
        else:
            choose_ops(shapes, device, dtype, log=lambda line: None)
        timings = json.loads(cache.read_text())[cache_key(shapes, device, dtype)] if cache.is_file() else {}
    finally:
        cache.unlink(missing_ok=True)
    print("| op | call | fused | reference | built-ins | choice |\n|---|---|--:|--:|---|---|")
    for t in timings.values():
        built = ", ".join(f"{k} {v:.3f}" for k, v in t.get("builtin_ms", {}).items())
        skipped = ", ".join(f"{k}: skipped ({v})" for k, v in t.get("builtin_skipped", {}).items())
        fused = f"{t['fused_ms']:.3f}" if "fused_ms" in t else "-"
        print(f"| {t['op']} | {t['what']} | {fused} | {t['reference_ms']:.3f} | "
              f"{'; '.join(x for x in (built, skipped) if x)} | **{t['choice']}** |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
