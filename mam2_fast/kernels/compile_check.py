"""Compile every fused Triton kernel for a GPU target on a machine without a GPU.

    python -m mam2_fast.kernels.compile_check            # sm_90 (H100/H200), a fixed set of cases
    python -m mam2_fast.kernels.compile_check --arch 80  # A100

The interpreter parity tests (``TRITON_INTERPRET=1``) prove the kernels compute the right
thing, but the interpreter accepts code the real compiler rejects (``tl.dot`` shape and dtype
rules, register/shared-memory limits, layout conversions). This check runs the public fused
functions, forward and backward, on CPU tensors at real launch configurations (the GPU block
sizes, not the interpreter's) and hands each kernel launch to ``triton.compile`` for
``GPUTarget("cuda", arch, 32)`` instead of running it: Triton -> TTIR -> TTGIR -> LLVM -> PTX
-> cubin (ptxas ships with Triton). Nothing is executed, so outputs are garbage; what is checked
is that every specialization the model can launch compiles under this Triton version and fits
the architecture's shared memory per block (else the launch fails "out of resources"). It needs
Triton's NVIDIA backend (in the Linux wheels) but no driver and no GPU.

Each distinct (kernel, signature, constexprs, options) is compiled once. The report lists the
kernels with their shared memory and register counts per thread where the backend gives them.
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Dict, List

import torch

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
                torch.uint8: "u8", torch.bool: "i1", torch.float64: "fp64"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# opt-in shared memory per block (bytes): a launch above it fails with "out of resources"
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (Triton 3.9 picks a newer one for sm_90+)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            tool = get_ptxas(arch)
        except TypeError:           # older Triton: get_ptxas() without the arch
            tool = get_ptxas()
        return tool.path if hasattr(tool, "path") else tool[0]
    except ImportError:
        import triton.backends.nvidia as nv
        return os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes of a kernel's PTX as ptxas reports them (``-v``).

    Triton's compiled metadata only carries ``n_regs`` / ``n_spills`` once a driver has loaded
    the cubin; ptxas tells the same from the PTX on a machine without one. The PTX targets
    ``sm_90a`` on Hopper (Triton's choice for wgmma), ``sm_<arch>`` elsewhere."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"compile_check: ptxas failed for {gpu}:\n{text[-2000:]}")
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"regs": max((int(r) for r in regs), default=None),
            "spill_stores": sum(int(a) for a, _ in spills), "spill_loads": sum(int(b) for _, b in spills)}


def _arg_type(name: str, value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"compile_check: argument {name} has unsupported type {type(value).__name__}")


@contextmanager
def compile_instead_of_launch(arch: int = 90, log: Callable[[str], None] = None, usage: bool = True):
    """Within the block, ``kernel[grid](...)`` compiles the launch for ``sm_<arch>`` and returns
    without running it. Yields the list of compiled records (dicts)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from mam2_fast.kernels import _common

    target = GPUTarget("cuda", arch, 32)
    records: List[dict] = []
    seen: Dict[tuple, dict] = {}
    original = JITFunction.run
    specialize = _jit_specializer(target)

    def run(self, *args, grid, warmup, **kwargs):
        spec = specialize(self, args, kwargs) if specialize else None
        if spec is not None:
            signature, constexprs, attrs, options = spec
        else:                                # no specialization: every int a plain i32, no alignment known
            options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
            bound = inspect.signature(self.fn).bind(*args, **kwargs)
            bound.apply_defaults()
            constexpr_names = {p.name for p in self.params if p.is_constexpr}
            signature, constexprs, attrs = {}, {}, None
            for name, value in bound.arguments.items():
                if name in constexpr_names or value is None:
                    signature[name] = "constexpr"
                    constexprs[name] = value
                else:
                    signature[name] = _arg_type(name, value)
        key = (self.fn.__qualname__, tuple(signature.items()), tuple(sorted(map(str, constexprs.items()))),
               str(sorted((attrs or {}).items())), str(sorted(options.items())))
        if key in seen:
            return None
        t0 = time.time()
        src = ASTSource(self, signature, constexprs, attrs) if attrs is not None else ASTSource(self, signature, constexprs)
        compiled = triton.compile(src, target=target, options=options)
        meta = getattr(compiled, "metadata", None)
        names = [p.name for p in self.params]
        named = {(names[k[0]] if isinstance(k, tuple) and len(k) == 1 else k): v for k, v in constexprs.items()}
        rec = {"kernel": self.fn.__name__, "seconds": time.time() - t0,
               "shared": getattr(meta, "shared", None), "num_warps": getattr(meta, "num_warps", None),
               "constexprs": {k: v for k, v in named.items() if v is not None and isinstance(k, str)},
               "pointers": {k: v for k, v in signature.items() if v.startswith("*")},
               "specialized": attrs is not None}
        asm = getattr(compiled, "asm", {}) or {}
        if "cubin" not in asm:
            raise RuntimeError(f"compile_check: {self.fn.__name__} produced no cubin ({sorted(asm)})")
        rec.update(ptxas_usage(asm["ptx"], arch) if usage and "ptx" in asm else
                   {"regs": None, "spill_stores": None, "spill_loads": None})
        rec["dtype"] = _record_dtype(rec["pointers"])
        rec["accesses"] = global_accesses(asm.get("ptx", ""))
        limit = SHARED_LIMIT.get(arch)
        if limit is not None and rec["shared"] is not None and rec["shared"] > limit:
            raise RuntimeError(f"compile_check: {rec['kernel']} {rec['constexprs']} needs {rec['shared']} B of "
                               f"shared memory, sm_{arch} allows {limit} B per block")
        seen[key] = rec
        records.append(rec)
        if log:
            log(f"  {rec['kernel']:<28} {rec['seconds']:5.1f}s  shared {rec['shared']}  regs {rec['regs']}  "
                f"spill {rec['spill_stores']}/{rec['spill_loads']}  warps {rec['num_warps']}  "
                f"{rec['dtype']}  access bits {format_accesses(rec['accesses'])}  {rec['constexprs']}")
        return None

    JITFunction.run = run
    _common.COMPILE_ONLY = True
    try:
        yield records
    finally:
        JITFunction.run = original
        _common.COMPILE_ONLY = False


def _jit_specializer(target):
    """``f(jit_fn, args, kwargs) -> (signature, constexprs, attrs, options)`` computed by
    Triton's own launch binder for ``target``, as a launch on that GPU would: pointers known
    16-byte aligned, integers divisible by 16 marked so, integers equal to 1 made constants
    (what lets loads along a unit stride vectorize). None where this Triton's internals differ
    (then launches compile unspecialized: a stricter check of registers, no alignment known)."""
    try:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        backend = make_backend(target)
    except Exception:  # noqa: BLE001 - another Triton's internals
        return None
    binders: Dict[int, Callable] = {}

    def specialize(fn, args, kwargs):
        try:
            if id(fn) not in binders:
                binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, backend)
            bound, spec, opts = binders[id(fn)](*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, dict(kwargs), bound, spec, opts)
        except Exception:  # noqa: BLE001 - another Triton's internals
            return None
        return signature, constexprs, attrs, dict(options.__dict__)
    return specialize


_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def global_accesses(ptx: str) -> Dict[str, int]:
    """``{"ld128": n, "st16": m, ...}``: the kernel's global loads and stores in the PTX by
    the bits one thread moves per instruction (vector width x element bits; static count, a
    loop body counted once). 128 = a full 16-byte vector access, the copy-rate case; 16 in a
    bf16 kernel = one element per instruction."""
    out: Dict[str, int] = {}
    for op, vec, bits in _ACCESS.findall(ptx):
        k = f"{op}{int(vec or 1) * int(bits)}"
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def format_accesses(acc: Dict[str, int]) -> str:
    return " ".join(f"{k}x{v}" for k, v in acc.items()) or "-"


def _record_dtype(pointers: dict) -> str:
    """The kernel's activation dtype: the first floating-point pointer's (outputs in fp32 aside)."""
    kinds = [v[1:] for v in pointers.values() if v[1:] in ("bf16", "fp16", "fp32")]
    for k in ("bf16", "fp16"):
        if k in kinds:
            return k
    return kinds[0] if kinds else "-"


PRESET_HEAD_DIM = 64    # ViT-S/B/L: 384/6, 768/12, 1024/16


def used_by_presets(r: dict) -> bool:
    """A bf16 launch the shipped presets make: every non-attention kernel, attention at head dim 64
    (the other head dims are compiled and reported, not required spill-free)."""
    attention = r["kernel"].startswith(("_attn", "_varlen"))
    return r.get("dtype") == "bf16" and (not attention or r["constexprs"].get("BLOCK_D") == PRESET_HEAD_DIM)


def spills(records: List[dict], dtype: str = "bf16", presets_only: bool = False) -> List[dict]:
    """The records of ``dtype`` whose ptxas report shows spill stores or loads."""
    return [r for r in records if r.get("dtype") == dtype and (r.get("spill_stores") or r.get("spill_loads"))
            and (used_by_presets(r) or not presets_only)]


# Bandwidth-bound kernels whose activation loads and stores must compile to full 16-byte vector
# accesses in bf16 (at the model widths the cases use), and the accesses each may make narrower
# by design: {kernel: allowed narrow access kinds}. A 16-bit access here means one bf16 element
# per instruction: an eighth of the width a copy at full bandwidth uses.
WIDE_KERNELS = {
    "_gather_kernel": (),
    "_scatter_kernel": (),
    "_scatter_pos_kernel": (),
    "_short_fwd_kernel": (), "_short_bwd_kernel": (),
    "_varlen_short_fwd_kernel": (), "_varlen_short_bwd_kernel": (),
    "_ce_rows_kernel": ("ld16",),        # the target's logit, one value per row
}


def narrow_accesses(records: List[dict]) -> List[dict]:
    """The bf16 records of :data:`WIDE_KERNELS` with a 16-bit global access not allowed for
    the kernel, or without a 128-bit load and a 128-bit store. The RGB-difference kernel is
    checked on its clip loads: each thread's run along a patch row (4 values) must be one
    vector load per frame, at least 64 bits (the predictions are read strided by the channel
    count, by design: the model's (ph, pw, c) order)."""
    bad = []
    for r in records:
        acc = r.get("accesses") or {}
        if r.get("dtype") != "bf16":
            continue
        if r["kernel"] in WIDE_KERNELS:
            allowed = WIDE_KERNELS[r["kernel"]]
            narrow = [k for k in acc if k in ("ld16", "st16") and k not in allowed]
            if narrow or "ld128" not in acc or "st128" not in acc:
                bad.append(r)
        elif r["kernel"] == "_rgb_diff_kernel":
            wide = sum(v for k, v in acc.items() if k.startswith("ld") and int(k[2:]) >= 64)
            if wide < 3:                    # the mask index (one 64-bit load) + frames t and t-1
                bad.append(r)
    return bad


def usage_table(records: List[dict], arch: int) -> str:
    """A markdown table of the compiled kernels: shared memory, registers, spills (RESULTS.md)."""
    lines = [f"| sm_{arch} kernel | dtype | key constexprs | warps | shared B | regs/thread | spill st/ld B |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in sorted(records, key=lambda r: (r["kernel"], r.get("dtype", ""), str(r["constexprs"]))):
        ce = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.isupper() or k.startswith("BLOCK"))
        lines.append(f"| {r['kernel']} | {r.get('dtype')} | {ce} | {r['num_warps']} | {r['shared']} | "
                     f"{r.get('regs')} | {r.get('spill_stores')}/{r.get('spill_loads')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# the launches the model makes (small tensors: only the specializations matter)
# ----------------------------------------------------------------------------------------
def _attention_cases(dtype: torch.dtype, dh: int, quick: bool):
    from mam2_fast.kernels.attention import factorized_attention_fused

    H = 2
    for mode, (T, S) in (("temporal", (16, 5)), ("spatial", (2, 49)), ("spatial", (2, 196))):
        for with_valid in ((False,) if quick else (False, True)):
            qkv = torch.randn(1, T, S, 3 * H * dh, dtype=dtype).view(1, T, S, 3, H, dh).requires_grad_()
            valid = torch.rand(1, T, S) < 0.7 if with_valid else None
            out = factorized_attention_fused(qkv, mode, valid)
            out.backward(torch.randn_like(out))


def _varlen_cases(dtype: torch.dtype, dh: int):
    from mam2_fast.kernels.varlen import varlen_attention_fused

    H = 2
    # temporal / spatial visible sets (<= 64: the short kernels), masked sets (> 64: the flash kernels)
    for lengths, permute in (([16, 9, 0, 5], True), ([49, 60, 0, 33], False), ([147, 80, 0, 176], False)):
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(torch.int32)
        ntok = int(cu[-1])
        index = torch.randperm(ntok).to(torch.int32) if permute else None
        qkv = torch.randn(ntok, 3 * H * dh, dtype=dtype).view(ntok, 3, H, dh).requires_grad_()
        out = varlen_attention_fused(qkv, cu, max(lengths), index)
        out.backward(torch.randn_like(out))


def _gather_cases(dtype: torch.dtype, D: int):
    from mam2_fast.kernels.gather import gather_tokens_fused, gather_visible_add_pos_fused

    B, T, N, Nv = 2, 3, 14, 4
    x = torch.randn(B, T, N, D, dtype=dtype, requires_grad=True)
    pos_t = torch.randn(T, D, dtype=dtype, requires_grad=True)
    pos_s = torch.randn(N, D, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(N)[:Nv] for _ in range(B)])
    y = gather_visible_add_pos_fused(x, pos_t, pos_s, idx)
    y.backward(torch.randn_like(y))
    z = gather_tokens_fused(x.detach().requires_grad_(), idx)
    z.backward(torch.randn_like(z))


def _rgb_diff_cases(dtype: torch.dtype, patch: int, clip_dtype: torch.dtype = None):
    """``clip_dtype``: the clip's (training feeds an fp32 clip with bf16 predictions)."""
    from mam2_fast.kernels.rgb_diff_loss import rgb_diff_mse_packed_fused, rgb_diff_mse_tube_fused

    B, T, h, w = 2, 4, 3, 2
    clip = torch.randn(B, T, 3, h * patch, w * patch, dtype=clip_dtype or dtype)
    idx = torch.stack([torch.randperm(h * w)[:3] for _ in range(B)])
    pred = torch.randn(B, T, 3, 3 * patch * patch, dtype=dtype, requires_grad=True)   # [B, T, Nm, P*P*C]
    rgb_diff_mse_tube_fused(clip, pred, idx, patch).backward()
    rows = torch.tensor([0, 5, 7, 12, 23, 30, 41])                                     # packed rows
    pred_p = torch.randn(rows.numel(), 3 * patch * patch, dtype=dtype, requires_grad=True)
    rgb_diff_mse_packed_fused(clip, pred_p, rows, patch).backward()


def _group_norm_cases(dtype: torch.dtype):
    from mam2_fast.kernels.group_norm import group_norm_silu_fused

    with torch.no_grad():                   # forward only (the frozen tokenizer)
        for C, hw, silu in ((128, 56, True), (512, 14, False)):
            x = torch.randn(2, C, hw, hw, dtype=dtype)
            group_norm_silu_fused(x, 32, torch.ones(C), torch.zeros(C), 1e-6, silu)


def _linear_ce_cases(dtype: torch.dtype, K: int):
    from mam2_fast.kernels.linear_ce import linear_cross_entropy_fused

    x = torch.randn(8, 32, dtype=dtype, requires_grad=True)
    w = torch.randn(K, 32, dtype=dtype, requires_grad=True)
    b = torch.randn(K, dtype=dtype, requires_grad=True)
    y = torch.randint(0, K, (8,))
    linear_cross_entropy_fused(x, w, b, y, -100).backward()


def run_checks(arch: int = 90, quick: bool = False, log: Callable[[str], None] = print) -> List[dict]:
    """Compile the model's kernel launches for ``sm_<arch>``; returns the compiled records."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check: unset TRITON_INTERPRET (the kernels must be JIT functions)")
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    with compile_instead_of_launch(arch, log) as records:
        for dtype in dtypes:
            for dh in ((64,) if quick else (32, 64, 80, 128)):
                _attention_cases(dtype, dh, quick)
                _varlen_cases(dtype, dh)
            for D in ((768,) if quick else (384, 768, 1024)):
                _gather_cases(dtype, D)
            _rgb_diff_cases(dtype, 16)
            if dtype != torch.float32:
                _rgb_diff_cases(dtype, 16, clip_dtype=torch.float32)
            for K in ((16384,) if quick else (8192, 16384)):
                _linear_ce_cases(dtype, K)
            _group_norm_cases(dtype)
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mam2_fast.kernels.compile_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100/H200)")
    ap.add_argument("--quick", action="store_true", help="bf16 and one size per kernel only")
    ap.add_argument("--table", action="store_true", help="print a markdown table of registers and spills")
    ap.add_argument("--allow-spills", action="store_true",
                    help="report bf16 spills without failing (default: any spill in a bf16 kernel fails)")
    args = ap.parse_args(argv)
    import triton

    print(f"triton {triton.__version__}, torch {torch.__version__}: compiling for sm_{args.arch}")
    t0 = time.time()
    records = run_checks(args.arch, args.quick)
    kernels = sorted({r["kernel"] for r in records})
    if args.table:
        print(usage_table(records, args.arch))
    for r in spills(records, "bf16"):
        tag = "SPILL" if used_by_presets(r) else "spill (not a preset shape)"
        print(f"{tag} sm_{args.arch}: {r['kernel']} {r['constexprs']} regs {r['regs']} "
              f"spill stores {r['spill_stores']} B loads {r['spill_loads']} B", file=sys.stderr)
    spilled = spills(records, "bf16", presets_only=True)
    if spilled and not args.allow_spills:
        print(f"compile_check: {len(spilled)} bf16 kernel specialization(s) the presets launch spill registers "
              f"on sm_{args.arch}",
              file=sys.stderr)
        return 1
    specialized = all(r.get("specialized") for r in records)
    if specialized:
        narrow = narrow_accesses(records)
        for r in narrow:
            print(f"NARROW sm_{args.arch}: {r['kernel']} {r['constexprs']} global access bits "
                  f"{format_accesses(r['accesses'])}", file=sys.stderr)
        if narrow:
            print(f"compile_check: {len(narrow)} bandwidth-bound bf16 kernel specialization(s) compile to narrower "
                  f"than 16-byte accesses on sm_{args.arch}", file=sys.stderr)
            return 1
    else:
        print("compile_check: this Triton's launch binder could not be used; launches compiled unspecialized "
              "(no alignment known), the access-width check skipped", file=sys.stderr)
    print(f"ok: {len(records)} specializations of {len(kernels)} kernels compiled to cubin in "
          f"{time.time() - t0:.0f}s, specialized as launched: {'yes' if specialized else 'no'} "
          f"({', '.join(kernels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
