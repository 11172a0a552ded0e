"""Micro-benchmarks of the fused kernels (mam2_fast/kernels) against the best built-in alternatives.

For ViT-S/B/L shapes (T = 16, N = 196 patches, tube masks 0.75 / 0.9) it times forward and
forward+backward of

* factorized attention on the engine's layout ``qkv [B, T, S, 3, H, dh]`` (encoder: S =
  visible slots; decoder: S = masked slots), temporal (over the T frames at each slot) and
  spatial (over the S slots of each frame): fused Triton vs the eager reference, the
  ``torch.compile``d reference, every SDPA backend (flash, efficient, cudnn, math, each
  forced with ``sdpa_kernel``) on the cheapest layouts -- spatial on zero-copy views
  ``[B*T, H, S, dh]`` in and out; temporal with the heads folded (one copy splits the
  interleaved q|k|v, then ``[B, S*H, T, dh]`` views in and out: no 4-D view of the engine's
  layout reaches the temporal order) and per clip (B calls on zero-copy ``[S, H, T, dh]``
  views, one copy out) --, FlexAttention compiled once (static shapes; the recompile limit is
  raised, so no shape falls back to eager flex), and ``torch.nn.attention.varlen.varlen_attn``;
* varlen attention on packed random space-time masks (per-frame visible counts differ):
  packed Triton kernel vs the grid with validity masks (fused and reference), torch's
  ``varlen_attn`` and nested (jagged) SDPA (temporal mode pays the gather into segment order
  and back), and FlexAttention with a document mask; work counted over the real segments;
* gather_visible_add_pos / gather_tokens at the model's dtypes (bf16 activations, fp32
  position tables, int64 indices): fused vs ``torch.gather`` (the reference),
  ``index_select`` and advanced indexing on flat row indices, ``torch.compile(reference)``;
* rgb_diff_mse (tube, and packed rows of a random mask): fused vs reference eager vs
  ``torch.compile(reference)``;
* linear_cross_entropy (K = 16384 by default): fused vs reference (F.linear +
  F.cross_entropy) eager and compiled, with peak memory.

Every table (markdown) gives ms, TFLOP/s (attention, head) or TB/s (memory-bound ops, of the
minimum bytes), and "% copy": the op's analytic minimum bytes (``kernel_bytes.py``: each
needed input element read once, each output written once) / time / the device-to-device copy
bandwidth measured at the start (``y.copy_(x)`` of ``--copy-mib`` MiB: 2 x bytes / time).
Under it, per shape and pass: the fastest of our kernels ("(triton)"), the best built-in
(every other variant: eager, compiled, SDPA, flex, varlen, nested) and fused ms / best ms
(< 1: the fused kernel is faster). Without CUDA it prints a message and exits 0 (``--smoke``
runs tiny shapes on CPU under the Triton interpreter, to check the script).

Timing on a GPU: triton's ``do_bench`` by default (each call's events recorded as the host
issues it, so a small op's host launch overhead shows when it exceeds the kernel's time);
``--device-time``: device time, the calls queued behind a sleeping kernel first
(``mam2_fast.kernels.device_time``); ``--cuda-graphs``: CUDA-graph replays (device time; a
variant that cannot be captured is timed eagerly and says so).

    python benchmarks/bench_kernels.py --models B --batch 32 --ops attention,ce
    python benchmarks/bench_kernels.py --models B --batch 32,64 --device-time
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import kernel_bytes as kb  # noqa: E402
from mam2_fast.train import accel  # noqa: E402
from mam2_fast.kernels import device_time  # noqa: E402
# the SDPA layouts are the engine's own (the per-call choice of ``kernels: auto`` uses them too)
from mam2_fast.kernels.builtin import attention_layout, attention_unlayout  # noqa: E402,F401

MODELS = {  # name: (embed dim D, heads H); head dim = D / H = 64
    "S": (384, 6),
    "B": (768, 12),
    "L": (1024, 16),
}
T_FRAMES, N_PATCHES, PATCH = 16, 196, 16
SKIP_COMPILED = False  # --skip-compiled: no torch.compile'd variants (their compile time dominates a short session)
COPY_MIB = 1024        # --copy-mib: size of the copy that measures the bandwidth
CUDA_GRAPHS = False    # --cuda-graphs: time CUDA-graph replays (device time, no host gaps)
DEVICE_TIME = False    # --device-time: time calls queued behind a sleeping kernel (device time, no capture)
DEVICE = torch.device("cuda")   # the device --device-time times on (main sets it)
OURS = "(triton)"      # variants with this in their name are ours; every other one is a built-in


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------
def bench(fn: Callable[[], object], smoke: bool) -> float:
    """Milliseconds per call (GPU: triton's do_bench, which flushes L2 between calls; with
    ``--device-time`` the median device time of calls queued behind a sleeping kernel, L2
    flushed between calls too: ``mam2_fast.kernels.device_time``)."""
    if smoke:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    if DEVICE_TIME:
        t = device_time.device_time(fn, DEVICE, warmup=3, reps=10)   # 10: reps x launches stays in the ~1000-entry queue
        if not t.queued:
            _HOST_GAPS[0] += 1
        return t.device_ms
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10, rep=50))


def timed_ms(fn: Callable[[], object], dev: torch.device, reps: int) -> float:
    """Mean milliseconds of ``fn`` over ``reps`` back-to-back calls: device events on a GPU
    (accel: CUDA events, or the stand-in's, which read 0), the host clock on the CPU."""
    fn()
    accel.synchronize(dev)
    if dev.type == "cpu":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    start, end = accel.new_event(dev, enable_timing=True), accel.new_event(dev, enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    accel.synchronize(dev)
    return start.elapsed_time(end) / reps


_HOST_GAPS = [0]   # --device-time measurements whose calls could not all be queued ahead (host syncs)
_COPY_RATE: Dict[str, Optional[float]] = {}


def copy_bandwidth(dev: torch.device, smoke: bool = False, mib: Optional[int] = None) -> Optional[float]:
    """Bytes/s of a large device-to-device copy ``y.copy_(x)`` (2 x numel x element size per
    call), measured once per device; None where nothing is timed (the stand-in device)."""
    key = str(dev)
    if key not in _COPY_RATE:
        mib = mib or (16 if smoke or dev.type == "cpu" else COPY_MIB)
        x = torch.ones(mib * 2 ** 20 // 4, device=dev)
        y = torch.empty_like(x)
        ms = timed_ms(lambda: y.copy_(x), dev, reps=3 if smoke else 20)
        _COPY_RATE[key] = 2 * x.numel() * x.element_size() / (ms * 1e-3) if ms > 0 else None
        del x, y
    return _COPY_RATE[key]


def _cell(x: Optional[float], fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


class Table:
    """Rows ``(shape, variant, fwd ms, f+b ms, fwd work, f+b work, note)``; work in the
    table's unit (FLOPs for TFLOP/s, bytes for TB/s). ``min_bytes[shape]``: the op's analytic
    minimum (:mod:`kernel_bytes`), for the "% copy" columns."""

    def __init__(self, title: str, unit: str, dev: Optional[torch.device] = None, smoke: bool = False):
        self.title, self.unit = title, unit
        self.rows: List[tuple] = []
        self.min_bytes: Dict[str, kb.MinBytes] = {}
        self.copy_rate = copy_bandwidth(dev, smoke) if dev is not None else None

    def add(self, shape: str, variant: str, ms_f: Optional[float], ms_fb: Optional[float],
            work_f: float, work_fb: float, note: str = ""):
        self.rows.append((shape, variant, ms_f, ms_fb, work_f, work_fb, note))

    def set_bytes(self, shape: str, mb: kb.MinBytes):
        self.min_bytes[shape] = mb

    def pct_copy(self, shape: str, ms: Optional[float], fwd: bool) -> Optional[float]:
        mb = self.min_bytes.get(shape)
        if mb is None or not ms or not self.copy_rate:
            return None
        return 100.0 * (mb.fwd if fwd else mb.total) / (ms * 1e-3) / self.copy_rate

    def summary(self) -> List[tuple]:
        """``(shape, pass, fastest fused, ms, best built-in, ms, fused/best)`` per shape and
        pass (None where a side has no timing)."""
        out = []
        shapes = list(dict.fromkeys(r[0] for r in self.rows))
        for shape in shapes:
            rows = [r for r in self.rows if r[0] == shape]
            for col, label in ((2, "fwd"), (3, "f+b")):
                timed = [(r[col], r[1]) for r in rows if r[col] is not None and r[col] > 0]
                ours = min(((ms, n) for ms, n in timed if OURS in n), default=(None, None))
                best = min(((ms, n) for ms, n in timed if OURS not in n), default=(None, None))
                ratio = ours[0] / best[0] if ours[0] is not None and best[0] is not None else None
                out.append((shape, label, ours[1], ours[0], best[1], best[0], ratio))
        return out

    def show(self):
        print(f"\n### {self.title}\n")
        if self.copy_rate:
            print(f"copy bandwidth (measured, device-to-device): {self.copy_rate / 1e12:.3f} TB/s; "
                  "% copy = analytic minimum bytes / time / copy bandwidth\n")
        else:
            print("copy bandwidth: not measured here (% copy: n/a)\n")
        u = self.unit
        print(f"| shape | variant | fwd ms | fwd {u} | fwd % copy | f+b ms | f+b {u} | f+b % copy | note |")
        print("|:--|:--|--:|--:|--:|--:|--:|--:|:--|")
        for shape, variant, mf, mfb, wf, wfb, note in self.rows:
            cells = []
            for ms, work, fwd in ((mf, wf, True), (mfb, wfb, False)):
                rate = work / (ms * 1e-3) / 1e12 if ms else None
                cells += [_cell(ms, ".3f"), _cell(rate, ".2f"), _cell(self.pct_copy(shape, ms, fwd), ".1f")]
            print("| " + " | ".join([shape, variant, *cells, note.replace("|", "/")]) + " |")
        print("\n| shape | pass | fastest fused | ms | best built-in | ms | fused/best |")
        print("|:--|:--|:--|--:|:--|--:|--:|")
        for shape, label, on, oms, bn, bms, ratio in self.summary():
            print(f"| {shape} | {label} | {on or 'n/a'} | {_cell(oms, '.3f')} | {bn or 'n/a'} | "
                  f"{_cell(bms, '.3f')} | {_cell(ratio, '.2f')} |")


_INPUT_GEN: Dict[str, torch.Generator] = {}


def randn(*shape, device, dtype, requires_grad: bool = False) -> torch.Tensor:
    """Benchmark inputs from a generator of their own: a CUDA-graph capture that fails part-way
    can leave the default CUDA generator marked as capturing (seen on the H200 with
    ``--cuda-graphs``: the next ``torch.randn`` raised "Offset increment outside graph capture")."""
    if torch.device(device).type != "cuda":      # the CPU smoke run, the meta stand-in
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad)
    key = str(device)
    if key not in _INPUT_GEN:
        _INPUT_GEN[key] = torch.Generator(device=device).manual_seed(0)
    t = torch.randn(*shape, device=device, dtype=dtype, generator=_INPUT_GEN[key])
    return t.requires_grad_(requires_grad)


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured once in a CUDA graph (after 3 warm-up calls on a side stream); returns the
    graph's replay. Timing the replay measures the device's work alone: no Python, autograd or
    launch gaps between kernels, which dominate eager timings of the small problems here (a
    training step at ViT-B batch 32+ keeps the GPU busy, so its host overhead hides)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def host_sync_in(fn: Callable[[], object]) -> Optional[str]:
    """Run ``fn`` once eagerly with torch's sync debug mode set to "error": the first op that
    would wait for the device from the host (``.item()``, ``nonzero``, a copy to the CPU,
    metadata a nested tensor computes) raises here instead of breaking a CUDA-graph capture
    half-way (a failed capture can leave the default generator, the allocator's graph pool and
    the stream in capture state; the H200 run of 2026-12-04 hit that). -> why, or None."""
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as e:
        return f"host sync: {str(e).splitlines()[0][:50] if str(e) else 'RuntimeError'}"
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def run_variant(fwd: Callable[[], torch.Tensor], inputs: List[torch.Tensor], smoke: bool):
    """-> (fwd ms, fwd+bwd ms, note). Errors / OOM become notes. With ``--cuda-graphs`` both
    passes are timed as CUDA-graph replays (device time); a variant that cannot be captured
    is timed eagerly and says so in its note."""
    def fb():
        out = fwd()
        if out.dim() == 0:
            out.backward()
        else:
            out.backward(grad)
        for t in inputs:
            t.grad = None
    try:
        out = fwd()
        grad = randn(*out.shape, device=out.device, dtype=out.dtype) if out.dim() else None
        del out
        if CUDA_GRAPHS and not smoke:
            fb()                                    # warm: autotuning and lazy setup run outside the probe
            with torch.no_grad():
                why = host_sync_in(fwd)
            why = why or host_sync_in(fb)
            if why is None:
                try:
                    with torch.no_grad():
                        ms_f = bench(graphed(fwd), smoke)
                    ms_fb = bench(graphed(fb), smoke)
                    return ms_f, ms_fb, "graph"
                except Exception as e:  # noqa: BLE001 - not capturable: eager timing below
                    accel.synchronize(torch.device("cuda"))
                    why = f"no graph ({type(e).__name__})"
            else:
                why = f"no graph ({why})"
        else:
            why = ""
        with torch.no_grad():
            ms_f = bench(fwd, smoke)
        ms_fb = bench(fb, smoke)
        return ms_f, ms_fb, why
    except torch.cuda.OutOfMemoryError:
        accel.empty_cache()
        return None, None, "OOM"
    except Exception as e:  # unsupported backend / shape: report, keep going
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}"


def _static_compile_limits() -> None:
    """Static shapes recompile per shape; raise dynamo's recompile limits so no shape falls
    back to eager (a silently slow "compiled" baseline), and make hitting them an error."""
    import torch._dynamo.config as cfg
    for names, floor in ((("recompile_limit", "cache_size_limit"), 1024),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 8192)):
        name = next((n for n in names if hasattr(cfg, n)), None)
        if name is not None:
            setattr(cfg, name, max(getattr(cfg, name), floor))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            setattr(cfg, name, True)
            break


def compiled(fn, dev: torch.device, **kwargs):
    """``torch.compile(fn, dynamic=False)`` (one static graph per shape, reused), or None
    where it is not measured: on the stand-in device (dry runs: nothing to time, and Inductor
    would compile for no device), with ``--skip-compiled``, or if it fails."""
    if accel.is_stand_in(dev) or SKIP_COMPILED:
        return None
    try:
        _static_compile_limits()
        return torch.compile(fn, **{"dynamic": False, **kwargs})
    except Exception:
        return None


def _host_idx(B: int, N: int, K: int, seed: int = 0) -> torch.Tensor:
    """[B, K] sorted distinct positions per row, drawn on the host (the byte counts read it)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g)[:K].sort().values for _ in range(B)])


# ----------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------
_CU: Dict[tuple, torch.Tensor] = {}


def _uniform_cu(n: int, L: int, device) -> torch.Tensor:
    key = (n, L, str(device))
    if key not in _CU:
        _CU[key] = (torch.arange(n + 1, device=device, dtype=torch.int32) * L)
    return _CU[key]


def attention_variants(mode: str, dev: torch.device) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> fn(qkv [B, T, S, 3, H, dh]) -> [B, T, S, H*dh], every one the same attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    from mam2_fast.kernels import factorized_attention
    from mam2_fast.kernels.reference import factorized_attention_ref

    def sdpa(backend):
        def f(qkv):
            q, k, v = attention_layout(qkv, mode)
            with sdpa_kernel([backend]):
                return attention_unlayout(F.scaled_dot_product_attention(q, k, v), qkv)
        return f

    def sdpa_per_clip(backend):  # temporal: B calls on zero-copy [S, H, T, dh] views
        def f(qkv):
            B, T, S, _, H, dh = qkv.shape
            outs = []
            with sdpa_kernel([backend]):
                for b in range(B):
                    q, k, v = (qkv[b, :, :, i].permute(1, 2, 0, 3) for i in range(3))
                    outs.append(F.scaled_dot_product_attention(q, k, v).permute(2, 0, 1, 3))  # [T, S, H, dh]
            return torch.stack(outs).reshape(B, T, S, H * dh)
        return f

    def reference(qkv):
        return factorized_attention_ref(qkv, mode)

    def fused_with(env: Dict[str, str]):  # the fused op with a kernel-family switch set for the call
        def f(qkv):
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                return factorized_attention(qkv, mode, backend="fused")
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return f

    variants = {
        "reference": reference,
        "fused (triton)": lambda qkv: factorized_attention(qkv, mode, backend="fused"),
        # L <= 64 only (SHORT_ONLY): the single-tile kernels forced to loop over all heads, and
        # the flash-attention kernels the short ones replaced
        "fused short, all heads/prog (triton)": fused_with({"MAM2_ATTN_HEADS_PER_PROG": "all"}),
        "fused flash tiling (triton)": fused_with({"MAM2_ATTN_SHORT": "0"}),
    }
    ref_c = compiled(reference, dev)
    if ref_c is not None:
        variants["compiled reference"] = ref_c
    layout = "views" if mode == "spatial" else "heads=S*H"
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        variants[f"sdpa {name} ({layout})"] = sdpa(backend)
        if mode == "temporal" and backend != SDPBackend.MATH:
            variants[f"sdpa {name} (per clip)"] = sdpa_per_clip(backend)
    try:
        from torch.nn.attention.flex_attention import flex_attention

        def flex_full(qkv):
            q, k, v = attention_layout(qkv, mode)
            return attention_unlayout(flex_attention(q, k, v), qkv)
        flex = compiled(flex_full, dev)
        if flex is not None:
            variants["flex (compiled)"] = flex
    except Exception:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        def varlen(qkv):  # packed tokens; spatial: zero-copy, temporal: the q|k|v split, heads folded
            B, T, S, _, H, dh = qkv.shape
            if mode == "spatial":
                q, k, v = qkv.reshape(B * T * S, 3, H, dh).unbind(1)          # [B*T*S, H, dh]
                n, L = B * T, S
            else:
                x = qkv.permute(3, 0, 1, 2, 4, 5).contiguous()
                q, k, v = (x[i].view(B * T, S * H, dh) for i in range(3))     # [B*T, S*H, dh]
                n, L = B, T
            cu = _uniform_cu(n, L, qkv.device)
            return varlen_attn(q, k, v, cu, cu, L, L).reshape(B, T, S, H * dh)
        variants["varlen_attn"] = varlen
    except Exception:
        pass
    return variants


SHORT_ONLY = ("fused short, all heads/prog (triton)", "fused flash tiling (triton)")


def bench_attention(args, dev, dtype):
    from mam2_fast.kernels import attention
    tables = []
    for mode in ("spatial", "temporal"):
        tab = Table(f"factorized attention ({mode}), qkv [B, T, S, 3, H, dh] {dtype}", "TFLOP/s", dev, args.smoke)
        variants = attention_variants(mode, dev)
        for model in args.models:
            D, H = MODELS[model]
            dh = D // H
            for B in args.batch:
                for mask in args.masks:
                    n_vis = max(1, round(N_PATCHES * (1 - mask)))
                    for where, S in (("enc", n_vis), ("dec", N_PATCHES - n_vis)):
                        T = args.frames
                        L, G = (T, S) if mode == "temporal" else (S, T)
                        flops_f = 4.0 * B * G * H * L * L * dh
                        shape = f"ViT-{model} B{B} m{mask} {where} S{S}"
                        singles = B * T * S if L == 1 else 0
                        tab.set_bytes(shape, kb.factorized_attention_bytes(B, T, S, H, dh, dtype, singletons=singles))
                        lin = randn(B, T, S, 3 * D, device=dev, dtype=dtype, requires_grad=True)
                        qkv = lin.view(B, T, S, 3, H, dh)
                        for name, f in variants.items():
                            if name in SHORT_ONLY and L > attention.SHORT_L_MAX:
                                continue
                            ms_f, ms_fb, note = run_variant(lambda: f(qkv), [lin], args.smoke)
                            tab.add(shape, name, ms_f, ms_fb, flops_f, 3.5 * flops_f, note)
                        del lin, qkv
        tab.show()
        tables.append(tab)
    return tables


def varlen_variants(mode: str, qkv_p: torch.Tensor, cu: torch.Tensor, longest: int,
                    index: Optional[torch.Tensor], host_cu: torch.Tensor, flex=None, varlen_attn=None):
    """Built-ins for packed varlen attention: name -> fn() -> ``[Ntok, H*dh]`` in packed row
    order, like ``varlen_attention(qkv_p, cu, longest, index)``. ``host_cu``: cu on the host
    (the nested tensor's offsets skip empty segments; flex's document ids)."""
    import torch.nn.functional as F
    ntok, _, H, dh = qkv_p.shape
    D = H * dh
    dev = qkv_p.device
    order = None if index is None else index.long()

    def to_rows(o):  # position order -> packed row order
        return o if order is None else o.new_empty(o.shape).index_copy(0, order, o)

    def in_order():
        return qkv_p if order is None else qkv_p[order]

    variants = {}
    if varlen_attn is not None:
        def torch_varlen():
            q, k, v = in_order().unbind(1)                                      # [Ntok, H, dh]
            return to_rows(varlen_attn(q, k, v, cu, cu, longest, longest).reshape(ntok, D))
        variants["varlen_attn (torch)"] = torch_varlen

    offsets = torch.unique_consecutive(host_cu.long()).to(dev)                  # empty segments dropped

    def nested():  # jagged values must be contiguous: one copy splits q|k|v (and gathers, temporal)
        x = qkv_p.transpose(0, 1)
        x = x.contiguous() if order is None else x[:, order]                    # [3, Ntok, H, dh]
        q, k, v = (torch.nested.nested_tensor_from_jagged(x[i], offsets, max_seqlen=longest).transpose(1, 2)
                   for i in range(3))                                           # [G, H, j, dh]
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).values()   # [Ntok, H, dh]
        return to_rows(o.reshape(ntok, D))
    variants["nested jagged sdpa"] = nested

    if flex is not None:
        from torch.nn.attention.flex_attention import create_block_mask
        lens = (host_cu[1:] - host_cu[:-1]).long()
        doc = torch.repeat_interleave(torch.arange(lens.numel()), lens).to(dev)
        bm = create_block_mask(lambda b, h, q, kv: doc[q] == doc[kv], None, None, ntok, ntok, device=dev)

        def flex_doc():
            x = in_order().permute(1, 2, 0, 3).unsqueeze(1)                     # 3 x [1, H, Ntok, dh]
            return to_rows(flex(x[0], x[1], x[2], block_mask=bm)[0].transpose(0, 1).reshape(ntok, D))
        variants["flex doc-mask (compiled)"] = flex_doc
    return variants


def bench_varlen(args, dev, dtype):
    from mam2_fast.kernels import factorized_attention, varlen_attention
    from mam2_fast.masking import MaskGenerator
    tables = []
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        varlen_attn = None
    try:
        from torch.nn.attention.flex_attention import flex_attention
        flex = compiled(flex_attention, dev)
    except Exception:
        flex = None
    for mode in ("spatial", "temporal"):
        tab = Table(f"varlen attention on random-mask token sets ({mode}), {dtype}", "TFLOP/s", dev, args.smoke)
        for model in args.models:
            D, H = MODELS[model]
            dh = D // H
            for B in args.batch:
                for mask in args.masks:
                    T, N = args.frames, N_PATCHES
                    side = int(round(N ** 0.5))
                    info = MaskGenerator("random", mask, T, (side, N // side))(B)
                    host_seg = info.segments(masked=False)       # built on the host, like the trainer's
                    host_cu = host_seg.spatial_cu if mode == "spatial" else host_seg.temporal_cu
                    lens_host = (host_cu[1:] - host_cu[:-1]).double()
                    flops_f = float(4.0 * H * dh * (lens_host ** 2).sum())
                    ntok = int(host_seg.rows.numel())
                    seg = host_seg.to(dev)
                    valid = (~info.mask).to(dev)
                    cu, longest, index = ((seg.spatial_cu, seg.spatial_max, None) if mode == "spatial"
                                          else (seg.temporal_cu, seg.temporal_max, seg.temporal_index))
                    shape = f"ViT-{model} B{B} m{mask} tok{ntok}"
                    tab.set_bytes(shape, kb.varlen_attention_bytes(
                        ntok, host_cu.numel() - 1, H, dh, dtype, indexed=index is not None,
                        singletons=kb.segment_singletons(host_cu), cu_dtype=host_cu.dtype,
                        index_dtype=host_seg.temporal_index.dtype))
                    packed = torch.randn(ntok, 3 * D, device=dev, dtype=dtype, requires_grad=True)
                    grid = torch.randn(B, T, N, 3 * D, device=dev, dtype=dtype, requires_grad=True)
                    qkv_p = packed.view(ntok, 3, H, dh)
                    qkv_g = grid.view(B, T, N, 3, H, dh)
                    variants = {
                        "reference": ([grid], lambda: factorized_attention(qkv_g, mode, valid, backend="reference")),
                        "grid+valid (triton)": ([grid], lambda: factorized_attention(qkv_g, mode, valid, backend="fused")),
                        "packed (triton)": ([packed], lambda: varlen_attention(qkv_p, cu, longest, index, backend="fused")),
                    }
                    try:
                        built = varlen_variants(mode, qkv_p, cu, longest, index, host_cu, flex, varlen_attn)
                    except Exception as e:  # e.g. the block mask: report, keep going
                        built = {}
                        tab.add(shape, "built-ins", None, None, flops_f, 3.5 * flops_f,
                                f"{type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}")
                    variants.update({name: ([packed], f) for name, f in built.items()})
                    for name, (inputs, f) in variants.items():
                        ms_f, ms_fb, note = run_variant(f, inputs, args.smoke)
                        tab.add(shape, name, ms_f, ms_fb, flops_f, 3.5 * flops_f, note)
                    del packed, grid
        tab.show()
        tables.append(tab)
    return tables


# ----------------------------------------------------------------------------------------
# memory-bound ops
# ----------------------------------------------------------------------------------------
def flat_rows(idx: torch.Tensor, T: int, N: int) -> torch.Tensor:
    """idx ``[B, K]`` -> int64 rows ``[B*T*K]`` of ``x.view(B*T*N, D)`` in (b, t, k) order."""
    B, K = idx.shape
    base = (torch.arange(B, device=idx.device)[:, None] * T + torch.arange(T, device=idx.device)) * N  # [B, T]
    return (base[:, :, None] + idx[:, None, :]).reshape(-1)


def gather_variants(dev: torch.device):
    """(pos variants, token variants): name -> fn(x, pos_t, pos_s, idx, rows) resp.
    fn(x, idx, rows) -> ``[B, T, K, D]``; ``rows = flat_rows(idx, T, N)`` (precomputed)."""
    from mam2_fast.kernels import gather_tokens, gather_visible_add_pos
    from mam2_fast.kernels.reference import gather_tokens_ref, gather_visible_add_pos_ref

    def shaped(g, x, idx):
        B, T, _, D = x.shape
        return g.view(B, T, idx.shape[1], D)

    def pos_of(pos_t, pos_s, idx):   # [T, 1, D] and [B, 1, K, D]
        return pos_t[:, None, :], pos_s[idx][:, None]

    def sel_pos(x, pt, ps, idx, rows):
        a, b = pos_of(pt, ps, idx)
        return shaped(x.reshape(-1, x.shape[-1]).index_select(0, rows), x, idx) + a + b

    def adv_pos(x, pt, ps, idx, rows):
        a, b = pos_of(pt, ps, idx)
        return shaped(x.reshape(-1, x.shape[-1])[rows], x, idx) + a + b

    pos = {"reference": lambda x, pt, ps, idx, rows: gather_visible_add_pos_ref(x, pt, ps, idx),
           "index_select + pos add": sel_pos,
           "x[rows] + pos add": adv_pos,
           "fused (triton)": lambda x, pt, ps, idx, rows: gather_visible_add_pos(x, pt, ps, idx, backend="fused")}
    tok = {"reference": lambda x, idx, rows: gather_tokens_ref(x, idx),
           "index_select": lambda x, idx, rows: shaped(x.reshape(-1, x.shape[-1]).index_select(0, rows), x, idx),
           "x[rows]": lambda x, idx, rows: shaped(x.reshape(-1, x.shape[-1])[rows], x, idx),
           "fused (triton)": lambda x, idx, rows: gather_tokens(x, idx, backend="fused")}
    pos_c, tok_c = compiled(gather_visible_add_pos_ref, dev), compiled(gather_tokens_ref, dev)
    if pos_c is not None:
        pos["compiled reference"] = lambda x, pt, ps, idx, rows: pos_c(x, pt, ps, idx)
    if tok_c is not None:
        tok["compiled reference"] = lambda x, idx, rows: tok_c(x, idx)
    return pos, tok


def bench_gather(args, dev, dtype):
    pos_dtype = torch.float32   # the model's position tables are fp32 parameters (output: promoted)
    tab = Table(f"gather_visible_add_pos / gather_tokens: x {dtype}, pos {pos_dtype}, idx int64 "
                "(index_select / x[rows]: flat rows precomputed)", "TB/s", dev, args.smoke)
    pos_v, tok_v = gather_variants(dev)
    for model in args.models:
        D, _ = MODELS[model]
        for B in args.batch:
            for mask in args.masks:
                T, N = args.frames, N_PATCHES
                K = max(1, round(N * (1 - mask)))
                x = torch.randn(B, T, N, D, device=dev, dtype=dtype, requires_grad=True)
                pt = torch.randn(T, D, device=dev, dtype=pos_dtype, requires_grad=True)
                ps = torch.randn(N, D, device=dev, dtype=pos_dtype, requires_grad=True)
                idx_host = _host_idx(B, N, K)
                idx = idx_host.to(dev)
                rows = flat_rows(idx, T, N)
                shape = f"pos ViT-{model} B{B} m{mask} K{K}"
                mb = kb.gather_visible_add_pos_bytes(B, T, N, K, D, dtype, pos_dtype,
                                                     pos_rows=kb.positions_used(idx_host))
                tab.set_bytes(shape, mb)
                for name, f in pos_v.items():
                    ms_f, ms_fb, note = run_variant(lambda: f(x, pt, ps, idx, rows), [x, pt, ps], args.smoke)
                    tab.add(shape, name, ms_f, ms_fb, mb.fwd, mb.total, note)
                shape = f"tok ViT-{model} B{B} m{mask} K{K}"
                mb = kb.gather_tokens_bytes(B, T, N, K, D, dtype)
                tab.set_bytes(shape, mb)
                for name, f in tok_v.items():
                    ms_f, ms_fb, note = run_variant(lambda: f(x, idx, rows), [x], args.smoke)
                    tab.add(shape, name, ms_f, ms_fb, mb.fwd, mb.total, note)
                del x
    tab.show()
    return [tab]


def bench_rgb(args, dev, dtype):
    from mam2_fast.kernels import rgb_diff_mse_packed, rgb_diff_mse_tube
    from mam2_fast.kernels.reference import rgb_diff_mse_packed_ref, rgb_diff_mse_tube_ref
    tab = Table(f"rgb_diff_mse tube and packed (clip fp32, pred {dtype})", "TB/s", dev, args.smoke)
    ref_c = compiled(rgb_diff_mse_tube_ref, dev)
    ref_pc = compiled(rgb_diff_mse_packed_ref, dev)
    side = args.image
    for B in args.batch:
        for mask in args.masks:
            T, N = args.frames, (side // PATCH) ** 2
            Nm = N - max(1, round(N * (1 - mask)))
            clip = torch.randn(B, T, 3, side, side, device=dev)
            pred = torch.randn(B, T, Nm, PATCH * PATCH * 3, device=dev, dtype=dtype, requires_grad=True)
            idx = _host_idx(B, N, Nm, seed=1).to(dev)
            mb = kb.rgb_diff_mse_tube_bytes(B, T, Nm, PATCH, dtype, clip.dtype)
            shape = f"B{B} m{mask} Nm{Nm}"
            tab.set_bytes(shape, mb)
            for name, f in (("reference", lambda: rgb_diff_mse_tube_ref(clip, pred, idx, PATCH)),
                            ("compiled reference", (lambda: ref_c(clip, pred, idx, PATCH)) if ref_c else None),
                            ("fused (triton)", lambda: rgb_diff_mse_tube(clip, pred, idx, PATCH, backend="fused"))):
                if f is None:
                    continue
                ms_f, ms_fb, note = run_variant(f, [pred], args.smoke)
                tab.add(shape, name, ms_f, ms_fb, mb.fwd, mb.total, note)
            # packed rows of a random (per-token) mask at the same ratio: the random-mask path
            # (drawn on the host with a fixed count: no data-dependent nonzero, so it also
            # dry-runs on meta, and the byte count reads it)
            M = round(mask * B * T * N)
            rows_host = torch.randperm(B * T * N, generator=torch.Generator().manual_seed(2))[:M].sort().values
            rows = rows_host.to(dev)
            pred_p = torch.randn(M, PATCH * PATCH * 3, device=dev, dtype=dtype, requires_grad=True)
            counted, patches = kb.rgb_packed_counts(rows_host, T, N)
            mb = kb.rgb_diff_mse_packed_bytes(M, counted, patches, PATCH, dtype, clip.dtype)
            shape = f"packed B{B} m{mask} M{M}"
            tab.set_bytes(shape, mb)
            for name, f in (("reference", lambda: rgb_diff_mse_packed_ref(clip, pred_p, rows, PATCH)),
                            ("compiled reference", (lambda: ref_pc(clip, pred_p, rows, PATCH)) if ref_pc else None),
                            ("fused (triton)", lambda: rgb_diff_mse_packed(clip, pred_p, rows, PATCH, backend="fused"))):
                if f is None:
                    continue
                ms_f, ms_fb, note = run_variant(f, [pred_p], args.smoke)
                tab.add(shape, name, ms_f, ms_fb, mb.fwd, mb.total, note)
    tab.show()
    return [tab]


def bench_ce(args, dev, dtype):
    from mam2_fast.kernels import linear_cross_entropy
    from mam2_fast.kernels.reference import linear_cross_entropy_ref
    tab = Table(f"linear + cross-entropy K={args.classes}, {dtype}", "TFLOP/s", dev, args.smoke)
    ref_c = compiled(linear_cross_entropy_ref, dev)
    K = args.classes
    for model in args.models:
        D, _ = MODELS[model]
        for B in args.batch:
            for mask in args.masks:
                Nm = N_PATCHES - max(1, round(N_PATCHES * (1 - mask)))
                M = B * args.frames * Nm
                x = torch.randn(M, D, device=dev, dtype=dtype, requires_grad=True)
                w = (torch.randn(K, D, device=dev, dtype=dtype) * D ** -0.5).requires_grad_(True)
                b = torch.zeros(K, device=dev, dtype=dtype, requires_grad=True)
                y = torch.randint(0, K, (M,), device=dev)
                flops = 2.0 * M * D * K
                shape = f"ViT-{model} B{B} m{mask} M{M}"
                tab.set_bytes(shape, kb.linear_cross_entropy_bytes(M, D, K, dtype, bias=True))
                for name, f in (("reference", lambda: linear_cross_entropy_ref(x, w, b, y)),
                                ("compiled reference", (lambda: ref_c(x, w, b, y)) if ref_c else None),
                                ("fused (triton)", lambda: linear_cross_entropy(x, w, b, y, backend="fused"))):
                    if f is None:
                        continue
                    accel.reset_peak_memory(dev)
                    ms_f, ms_fb, note = run_variant(f, [x, w, b], args.smoke)
                    if dev.type == "cuda" and not note:
                        note = f"peak {accel.max_memory_gib(dev):.2f} GiB"
                    tab.add(shape, name, ms_f, ms_fb, flops, 3 * flops, note)
                del x, w, b
    tab.show()
    return [tab]


def main(argv=None) -> int:
    global SKIP_COMPILED, COPY_MIB, N_PATCHES, CUDA_GRAPHS, DEVICE_TIME, DEVICE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="S,B,L")
    p.add_argument("--batch", default="8,32,64")
    p.add_argument("--masks", default="0.75,0.9")
    p.add_argument("--frames", type=int, default=T_FRAMES)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--classes", type=int, default=16384)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--ops", default="attention,varlen,gather,rgb,ce")
    p.add_argument("--skip-compiled", action="store_true",
                   help="leave out the torch.compile'd variants (flex attention, compiled references)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="time CUDA-graph replays of each variant (device time without host launch gaps)")
    p.add_argument("--device-time", action="store_true",
                   help="time each call's device work, queued behind a sleeping kernel (no host launch gaps, "
                        "no CUDA-graph capture needed; mam2_fast.kernels.device_time)")
    p.add_argument("--copy-mib", type=int, default=COPY_MIB,
                   help="size of the device-to-device copy that measures the copy bandwidth (MiB)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script only)")
    args = p.parse_args(argv)
    args.models = [m.strip().upper() for m in args.models.split(",")]
    args.batch = [int(b) for b in args.batch.split(",")]
    args.masks = [float(m) for m in args.masks.split(",")]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    SKIP_COMPILED, COPY_MIB, CUDA_GRAPHS = args.skip_compiled, args.copy_mib, args.cuda_graphs
    DEVICE_TIME = args.device_time and not CUDA_GRAPHS
    if args.device_time and CUDA_GRAPHS:
        p.error("--device-time and --cuda-graphs are two ways of timing the device: choose one")

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.models, args.batch, args.masks = ["S"], [1], [0.9]
        args.frames, args.image, args.classes = 2, 32, 256
        dtype, dev = torch.float32, torch.device("cpu")
        N_PATCHES = 12
    elif not accel.cuda_available():
        print("bench_kernels: no CUDA device found; GPU benchmarks skipped "
              "(use --smoke to exercise the script on CPU).")
        return 0
    else:
        dev = DEVICE = torch.device("cuda")
        print(f"device: {accel.device_name(dev)}  torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("bench_kernels: triton is not importable; nothing to compare.")
        return 0
    rate = copy_bandwidth(dev, args.smoke)
    print(f"copy bandwidth: {rate / 1e12:.3f} TB/s" if rate else "copy bandwidth: n/a")

    if DEVICE_TIME and not args.smoke:
        print("timing: device time of calls queued behind a sleeping kernel (median of 10, L2 flushed between calls)")
    ops = {"attention": bench_attention, "varlen": bench_varlen, "gather": bench_gather, "rgb": bench_rgb, "ce": bench_ce}
    for name in args.ops.split(","):
        ops[name.strip()](args, dev, dtype)
    if _HOST_GAPS[0]:
        print(f"device time: {_HOST_GAPS[0]} measurement(s) include host gaps (the variant syncs with the host)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
