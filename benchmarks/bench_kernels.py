"""Micro-benchmarks of the fused kernels (mam2_fast/kernels) against the alternatives.

For ViT-S/B/L shapes (T = 16, N = 196 patches, tube masks 0.75 / 0.9) it times forward and
forward+backward of

* factorized attention (encoder: S = visible slots; decoder: S = masked slots), temporal and
  spatial: fused Triton vs reference eager, torch SDPA (flash / efficient / cudnn, with the
  permutes + contiguous copies they need), FlexAttention (compiled), and
  ``torch.nn.attention.varlen.varlen_attn`` when present;
* varlen attention on packed random space-time masks (per-frame visible counts differ):
  packed Triton kernel vs the grid with validity masks (fused and reference), torch's
  ``varlen_attn`` (temporal mode pays the gather into segment order and back), and
  FlexAttention with a document mask; work counted over the real segments only;
* gather_visible_add_pos / gather_tokens: fused vs reference eager vs torch.compile(reference);
* rgb_diff_mse (tube, and packed rows of a random mask): fused vs reference eager vs
  torch.compile(reference);
* linear_cross_entropy (K = 16384 by default): fused vs reference (F.linear +
  F.cross_entropy) eager and compiled, with peak memory.

It prints one table per op: ms, TFLOP/s (attention, head) or TB/s (memory-bound ops), and
the ratio to the reference eager time. Without CUDA it prints a message and exits 0
(``--smoke`` runs tiny shapes on CPU under the Triton interpreter, to check the script).

    python benchmarks/bench_kernels.py --models B --batch 32 --ops attention,ce
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mam2_fast.train import accel  # noqa: E402

MODELS = {  # name: (embed dim D, heads H); head dim = D / H = 64
    "S": (384, 6),
    "B": (768, 12),
    "L": (1024, 16),
}
T_FRAMES, N_PATCHES, PATCH = 16, 196, 16
SKIP_COMPILED = False  # --skip-compiled: no torch.compile'd variants (their compile time dominates a short session)


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------
def bench(fn: Callable[[], object], smoke: bool) -> float:
    """Mean milliseconds per call."""
    if smoke:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10, rep=50))


class Table:
    def __init__(self, title: str, unit: str):
        self.title, self.unit = title, unit
        self.rows: List[tuple] = []

    def add(self, shape: str, variant: str, ms_f: Optional[float], ms_fb: Optional[float],
            work_f: float, work_fb: float, note: str = ""):
        self.rows.append((shape, variant, ms_f, ms_fb, work_f, work_fb, note))

    def show(self):
        scale = 1e12
        print(f"\n== {self.title} ==")
        hdr = (f"{'shape':<34} {'variant':<22} {'fwd ms':>9} {self.unit:>8} {'x ref':>6} "
               f"{'f+b ms':>9} {self.unit:>8} {'x ref':>6}  note")
        print(hdr)
        print("-" * len(hdr))
        ref: Dict[str, tuple] = {}
        for shape, variant, mf, mfb, wf, wfb, note in self.rows:
            if variant == "reference":
                ref[shape] = (mf, mfb)
        for shape, variant, mf, mfb, wf, wfb, note in self.rows:
            rf, rfb = ref.get(shape, (None, None))

            def cell(ms, work, r):
                if ms is None:
                    return f"{'n/a':>9} {'':>8} {'':>6}"
                rate = work / (ms * 1e-3) / scale
                ratio = f"{r / ms:6.2f}" if r else f"{'':>6}"
                return f"{ms:9.3f} {rate:8.2f} {ratio}"
            print(f"{shape:<34} {variant:<22} {cell(mf, wf, rf)} {cell(mfb, wfb, rfb)}  {note}")


def run_variant(fwd: Callable[[], torch.Tensor], inputs: List[torch.Tensor], smoke: bool):
    """-> (fwd ms, fwd+bwd ms, note). Errors / OOM become notes."""
    def fb():
        out = fwd()
        if out.dim() == 0:
            out.backward()
        else:
            out.backward(grad)
        for t in inputs:
            t.grad = None
    try:
        with torch.no_grad():
            ms_f = bench(fwd, smoke)
        out = fwd()
        grad = torch.randn_like(out) if out.dim() else None
        del out
        ms_fb = bench(fb, smoke)
        return ms_f, ms_fb, ""
    except torch.cuda.OutOfMemoryError:
        accel.empty_cache()
        return None, None, "OOM"
    except Exception as e:  # unsupported backend / shape: report, keep going
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"


# ----------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------
def attention_variants(mode: str, dev: torch.device):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    from mam2_fast.kernels import factorized_attention

    def to_bhld(qkv):  # [B, T, S, 3, H, dh] -> 3 x [B*G, H, L, dh] (the permutes SDPA needs)
        B, T, S, _, H, dh = qkv.shape
        perm = (0, 2, 3, 1, 4) if mode == "temporal" else (0, 1, 3, 2, 4)  # of [B, T, S, H, dh]
        return [qkv[:, :, :, i].permute(*perm).reshape(-1, H, T if mode == "temporal" else S, dh)
                for i in range(3)]

    def from_bhld(o, qkv):  # [B*G, H, L, dh] -> [B, T, S, H*dh] (contiguous)
        B, T, S, _, H, dh = qkv.shape
        if mode == "temporal":
            return o.view(B, S, H, T, dh).permute(0, 3, 1, 2, 4).reshape(B, T, S, H * dh)
        return o.view(B, T, H, S, dh).permute(0, 1, 3, 2, 4).reshape(B, T, S, H * dh)

    def sdpa(backend):
        def f(qkv):
            q, k, v = to_bhld(qkv)
            with sdpa_kernel([backend]):
                return from_bhld(F.scaled_dot_product_attention(q, k, v), qkv)
        return f

    variants = {
        "reference": lambda qkv: factorized_attention(qkv, mode, backend="reference"),
        "fused (triton)": lambda qkv: factorized_attention(qkv, mode, backend="fused"),
        "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    try:
        from torch.nn.attention.flex_attention import flex_attention
        flex = compiled(flex_attention, dev, dynamic=False)
        if flex is not None:
            variants["flex (compiled)"] = lambda qkv: from_bhld(flex(*to_bhld(qkv)), qkv)
    except Exception:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        def varlen(qkv):
            q, k, v = to_bhld(qkv)  # [BG, H, L, dh] -> packed [BG*L, H, dh]
            BG, H, L, dh = q.shape
            pk = [t.transpose(1, 2).reshape(BG * L, H, dh) for t in (q, k, v)]
            cu = torch.arange(0, BG + 1, device=q.device, dtype=torch.int32) * L
            o = varlen_attn(pk[0], pk[1], pk[2], cu, cu, L, L)
            return from_bhld(o.view(BG, L, H, dh).transpose(1, 2), qkv)
        variants["varlen_attn"] = varlen
    except Exception:
        pass
    return variants


def bench_attention(args, dev, dtype):
    tables = []
    for mode in ("spatial", "temporal"):
        tab = Table(f"factorized attention ({mode}), {dtype}", "TFLOP/s")
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
                        lin = torch.randn(B, T, S, 3 * D, device=dev, dtype=dtype, requires_grad=True)
                        qkv = lin.view(B, T, S, 3, H, dh)
                        for name, f in variants.items():
                            ms_f, ms_fb, note = run_variant(lambda: f(qkv), [lin], args.smoke)
                            tab.add(shape, name if name != "reference" else "reference",
                                    ms_f, ms_fb, flops_f, 3.5 * flops_f, note)
                        del lin, qkv
        tab.show()
        tables.append(tab)
    return tables


def bench_varlen(args, dev, dtype):
    from mam2_fast.kernels import factorized_attention, varlen_attention
    from mam2_fast.masking import MaskGenerator
    tables = []
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        varlen_attn = None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = compiled(flex_attention, dev, dynamic=False)
    except Exception:
        flex = None
    for mode in ("spatial", "temporal"):
        tab = Table(f"varlen attention on random-mask token sets ({mode}), {dtype}", "TFLOP/s")
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
                    lens = lens_host.to(dev)
                    shape = f"ViT-{model} B{B} m{mask} tok{ntok}"
                    packed = torch.randn(ntok, 3 * D, device=dev, dtype=dtype, requires_grad=True)
                    grid = torch.randn(B, T, N, 3 * D, device=dev, dtype=dtype, requires_grad=True)
                    qkv_p = packed.view(ntok, 3, H, dh)
                    qkv_g = grid.view(B, T, N, 3, H, dh)
                    variants = {
                        "reference": ([grid], lambda: factorized_attention(qkv_g, mode, valid, backend="reference")),
                        "grid+valid (triton)": ([grid], lambda: factorized_attention(qkv_g, mode, valid, backend="fused")),
                        "packed (triton)": ([packed], lambda: varlen_attention(qkv_p, cu, longest, index, backend="fused")),
                    }
                    if varlen_attn is not None:
                        def torch_varlen():
                            x = qkv_p if index is None else qkv_p[index.long()]          # segment order
                            q, k, v = x.unbind(1)                                          # [Ntok, H, dh]
                            o = varlen_attn(q, k, v, cu, cu, longest, longest).reshape(ntok, D)
                            return o if index is None else o.new_empty(o.shape).index_copy(0, index.long(), o)
                        variants["varlen_attn (torch)"] = ([packed], torch_varlen)
                    if flex is not None:
                        try:
                            order = torch.arange(ntok, device=dev) if index is None else index.long()
                            doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=dev), lens.long())
                            bm = create_block_mask(lambda b, h, q, kv: doc[q] == doc[kv], None, None, ntok, ntok,
                                                   device=dev)

                            def flex_doc():
                                x = qkv_p[order].permute(1, 2, 0, 3).unsqueeze(1)         # 3 x [1, H, Ntok, dh]
                                o = flex(x[0], x[1], x[2], block_mask=bm)[0].transpose(0, 1).reshape(ntok, D)
                                return o.new_empty(o.shape).index_copy(0, order, o)
                            variants["flex doc-mask (compiled)"] = ([packed], flex_doc)
                        except Exception:
                            pass
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
def compiled(fn, dev: torch.device, **kwargs):
    """``torch.compile(fn)``, or None where it is not measured: on the stand-in device (dry
    runs: nothing to time, and Inductor would compile for no device), or if it fails."""
    if accel.is_stand_in(dev) or SKIP_COMPILED:
        return None
    try:
        return torch.compile(fn, **kwargs)
    except Exception:
        return None


def bench_gather(args, dev, dtype):
    from mam2_fast.kernels import gather_tokens, gather_visible_add_pos
    from mam2_fast.kernels.reference import gather_tokens_ref, gather_visible_add_pos_ref
    tab = Table(f"gather_visible_add_pos / gather_tokens, {dtype}", "TB/s")
    ref_pos_c, ref_tok_c = compiled(gather_visible_add_pos_ref, dev), compiled(gather_tokens_ref, dev)
    el = torch.tensor([], dtype=dtype).element_size()
    for model in args.models:
        D, _ = MODELS[model]
        for B in args.batch:
            for mask in args.masks:
                T, N = args.frames, N_PATCHES
                K = max(1, round(N * (1 - mask)))
                x = torch.randn(B, T, N, D, device=dev, dtype=dtype, requires_grad=True)
                pt = torch.randn(T, D, device=dev, dtype=dtype, requires_grad=True)
                ps = torch.randn(N, D, device=dev, dtype=dtype, requires_grad=True)
                idx = torch.stack([torch.randperm(N, device=dev)[:K].sort().values for _ in range(B)])
                rows = B * T * K * D
                byt_f = 2 * rows * el  # read gathered rows + write output (pos tables are tiny)
                byt_fb = byt_f + rows * el + B * T * N * D * el  # + read dout, write dense dx
                shape = f"pos ViT-{model} B{B} m{mask} K{K}"
                for name, f in (("reference", lambda: gather_visible_add_pos_ref(x, pt, ps, idx)),
                                ("compiled reference", (lambda: ref_pos_c(x, pt, ps, idx)) if ref_pos_c else None),
                                ("fused (triton)", lambda: gather_visible_add_pos(x, pt, ps, idx, backend="fused"))):
                    if f is None:
                        continue
                    tab.add(shape, name, *run_variant(f, [x, pt, ps], args.smoke)[:2], byt_f, byt_fb)
                shape = f"tok ViT-{model} B{B} m{mask} K{K}"
                for name, f in (("reference", lambda: gather_tokens_ref(x, idx)),
                                ("compiled reference", (lambda: ref_tok_c(x, idx)) if ref_tok_c else None),
                                ("fused (triton)", lambda: gather_tokens(x, idx, backend="fused"))):
                    if f is None:
                        continue
                    tab.add(shape, name, *run_variant(f, [x], args.smoke)[:2], byt_f, byt_fb)
                del x
    tab.show()
    return [tab]


def bench_rgb(args, dev, dtype):
    from mam2_fast.kernels import rgb_diff_mse_packed, rgb_diff_mse_tube
    from mam2_fast.kernels.reference import rgb_diff_mse_packed_ref, rgb_diff_mse_tube_ref
    tab = Table(f"rgb_diff_mse tube and packed (clip fp32, pred {dtype})", "TB/s")
    ref_c = compiled(rgb_diff_mse_tube_ref, dev)
    ref_pc = compiled(rgb_diff_mse_packed_ref, dev)
    side = args.image
    for B in args.batch:
        for mask in args.masks:
            T, N = args.frames, (side // PATCH) ** 2
            Nm = N - max(1, round(N * (1 - mask)))
            clip = torch.randn(B, T, 3, side, side, device=dev)
            pred = torch.randn(B, T, Nm, PATCH * PATCH * 3, device=dev, dtype=dtype, requires_grad=True)
            idx = torch.stack([torch.randperm(N, device=dev)[:Nm].sort().values for _ in range(B)])
            n = B * T * Nm * PATCH * PATCH * 3
            byt_f = n * (2 * 4 + pred.element_size())  # two clip frames + pred
            byt_fb = byt_f + byt_f + n * pred.element_size()  # recompute + write dpred
            shape = f"B{B} m{mask} Nm{Nm}"
            for name, f in (("reference", lambda: rgb_diff_mse_tube_ref(clip, pred, idx, PATCH)),
                            ("compiled reference", (lambda: ref_c(clip, pred, idx, PATCH)) if ref_c else None),
                            ("fused (triton)", lambda: rgb_diff_mse_tube(clip, pred, idx, PATCH, backend="fused"))):
                if f is None:
                    continue
                tab.add(shape, name, *run_variant(f, [pred], args.smoke)[:2], byt_f, byt_fb)
            # packed rows of a random (per-token) mask at the same ratio: the random-mask path
            # (drawn with a fixed count: no data-dependent nonzero, so it also dry-runs on meta)
            M = round(mask * B * T * N)
            rows = torch.randperm(B * T * N, device=dev)[:M].sort().values
            pred_p = torch.randn(M, PATCH * PATCH * 3, device=dev, dtype=dtype, requires_grad=True)
            n = M * PATCH * PATCH * 3
            byt_f = n * (2 * 4 + pred_p.element_size())
            byt_fb = byt_f + byt_f + n * pred_p.element_size()
            shape = f"packed B{B} m{mask} M{M}"
            for name, f in (("reference", lambda: rgb_diff_mse_packed_ref(clip, pred_p, rows, PATCH)),
                            ("compiled reference", (lambda: ref_pc(clip, pred_p, rows, PATCH)) if ref_pc else None),
                            ("fused (triton)", lambda: rgb_diff_mse_packed(clip, pred_p, rows, PATCH, backend="fused"))):
                if f is None:
                    continue
                tab.add(shape, name, *run_variant(f, [pred_p], args.smoke)[:2], byt_f, byt_fb)
    tab.show()
    return [tab]


def bench_ce(args, dev, dtype):
    from mam2_fast.kernels import linear_cross_entropy
    from mam2_fast.kernels.reference import linear_cross_entropy_ref
    tab = Table(f"linear + cross-entropy K={args.classes}, {dtype}", "TFLOP/s")
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
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script only)")
    args = p.parse_args(argv)
    args.models = [m.strip().upper() for m in args.models.split(",")]
    args.batch = [int(b) for b in args.batch.split(",")]
    args.masks = [float(m) for m in args.masks.split(",")]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    global SKIP_COMPILED
    SKIP_COMPILED = args.skip_compiled

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.models, args.batch, args.masks = ["S"], [1], [0.9]
        args.frames, args.image, args.classes = 2, 32, 256
        dtype, dev = torch.float32, torch.device("cpu")
        global N_PATCHES
        N_PATCHES = 12
    elif not accel.cuda_available():
        print("bench_kernels: no CUDA device found; GPU benchmarks skipped "
              "(use --smoke to exercise the script on CPU).")
        return 0
    else:
        dev = torch.device("cuda")
        print(f"device: {accel.device_name(dev)}  torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("bench_kernels: triton is not importable; nothing to compare.")
        return 0

    ops = {"attention": bench_attention, "varlen": bench_varlen, "gather": bench_gather, "rgb": bench_rgb, "ce": bench_ce}
    for name in args.ops.split(","):
        ops[name.strip()](args, dev, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
