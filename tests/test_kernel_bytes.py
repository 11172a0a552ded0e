"""The analytic minimum bytes of ``benchmarks/kernel_bytes.py`` against the traffic the
PyTorch references actually need, forward and backward, on small CPU tensors.

:func:`footprint` measures an op from the outside, without looking at its formula:

* written: every output in full (forward: the result; backward: the gradients autograd
  returns for the differentiable inputs, dense);
* read, float inputs and dout: the elements the pass's result depends on -- forward, the
  nonzero entries of d<r, out>/d input (r random, positive); backward, of
  d<r, grads>/d input and d<r, grads>/d dout (second derivatives), in float64 so nothing
  rounds to zero (a gather's backward, linear in dout, depends on no forward input);
* read, index and mask inputs: in full, when changing them (the case's ``alt``) changes the
  pass's result.

Bytes are element counts times the element sizes of the tensors at the op's real dtypes
(bf16 activations, fp32 clips and tables, int64 / int32 indices: what the model feeds). The
formulas must match exactly; ``test_off_by_one_is_caught`` shows that they would not with any
shape argument off by one or the older benchmark's formulas.

The last tests check what of ``benchmarks/bench_kernels.py`` runs without a GPU: every
built-in baseline it times computes the op (CUDA-only SDPA backends skipped, torch's
``varlen_attn`` stood in by the reference so the layouts around it run), the best-built-in
summary, the "% copy" arithmetic and the copy-bandwidth measurement.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Sequence

import pytest
import torch

from mam2_fast.kernels import reference as ref

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("kernel_bytes", ROOT / "benchmarks" / "kernel_bytes.py")
kb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kb)

BF16, F32 = torch.bfloat16, torch.float32


# ----------------------------------------------------------------------------------------
# the measurement
# ----------------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _grads(out, inputs, gout, **kw):
    return torch.autograd.grad(out, inputs, gout, allow_unused=True, **kw)


def footprint(fn: Callable[..., torch.Tensor], args: Dict[str, torch.Tensor], diff: Sequence[str],
              alt: Dict[str, torch.Tensor], seed: int = 0) -> kb.MinBytes:
    """Bytes ``fn(**args)`` reads and writes, forward and backward (gradients for ``diff``).
    ``alt``: a different value for every non-float input (read iff the result changes)."""
    gen = torch.Generator().manual_seed(seed)
    floats = [k for k, v in args.items() if v.is_floating_point()]
    others = [k for k in args if k not in floats]
    assert set(diff) <= set(floats) and set(others) == set(alt), (diff, others, alt.keys())

    # real dtypes: what is written
    real = {k: v.detach().clone().requires_grad_(k in diff) if k in floats else v for k, v in args.items()}
    out = fn(**real)
    gout = torch.randn(out.shape, generator=gen).to(out.dtype)
    grads = torch.autograd.grad(out, [real[k] for k in diff], gout)
    written_f, written_b = _nbytes(out), sum(_nbytes(g) for g in grads)

    # float64 twin: which elements are read
    t64 = {k: v.detach().double().requires_grad_(True) if k in floats else v for k, v in args.items()}
    gout64 = gout.double().requires_grad_(True)

    def run(over=None):
        o = fn(**{**t64, **(over or {})})
        g = _grads(o, [t64[k] for k in diff], gout64, create_graph=True)
        return o, g

    out64, g64 = run()
    r_out = torch.rand(out64.shape, generator=gen, dtype=torch.float64) + 0.5
    d_f = _grads(out64, [t64[k] for k in floats], r_out, retain_graph=True)
    probe = sum((g * (torch.rand(g.shape, generator=gen, dtype=torch.float64) + 0.5)).sum() for g in g64)
    d_b = torch.autograd.grad(probe, [t64[k] for k in floats] + [gout64], allow_unused=True)

    def nnz_bytes(d, like):
        return 0 if d is None else int((d != 0).sum()) * like.element_size()

    read_f = sum(nnz_bytes(d, args[k]) for k, d in zip(floats, d_f))
    read_b = sum(nnz_bytes(d, args[k]) for k, d in zip(floats, d_b[:-1])) + nnz_bytes(d_b[-1], gout)
    for k in others:
        o2, g2 = run({k: alt[k]})
        if not torch.equal(o2, out64):
            read_f += _nbytes(args[k])
        if any(not torch.equal(a, b) for a, b in zip(g2, g64)):
            read_b += _nbytes(args[k])
    return kb.MinBytes(read_f + written_f, read_b + written_b)


class Case(NamedTuple):
    fn: Callable[..., torch.Tensor]
    args: Dict[str, torch.Tensor]
    diff: Sequence[str]
    alt: Dict[str, torch.Tensor]
    formula: Callable[..., kb.MinBytes]
    kwargs: dict                      # the formula's arguments
    wrong: Dict[str, kb.MinBytes]     # formulas that must NOT match (older / plausible mistakes)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, dtype=F32, seed=0):
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _sorted_idx(B, N, K, seed):
    g = _gen(seed)
    return torch.stack([torch.randperm(N, generator=g)[:K].sort().values for _ in range(B)])


# ----------------------------------------------------------------------------------------
# cases: one per op and structure, at the model's dtypes
# ----------------------------------------------------------------------------------------
def attention_case(mode, masked, dtype, T=3, S=4):
    B, H, dh = 2, 2, 4
    qkv = _rand(B, T, S, 3, H, dh, dtype=dtype, seed=1)
    args, alt, kw = {"qkv": qkv}, {}, {}
    if masked:
        valid = torch.rand(B, T, S, generator=_gen(2)) < 0.6
        valid[0, :, 0] = valid[0, 0, :] = False          # an empty group in either mode
        valid[1, 0, 1], valid[1, 1:, 1] = True, False    # a temporal singleton
        valid[1, 2, :] = False
        valid[1, 2, 3] = True                            # a spatial singleton
        args["valid"], alt["valid"] = valid, valid.clone()
        alt["valid"][1, 1, 2] ^= True
        n, singles = kb.attention_group_counts(valid, mode)
        kw = {"valid_tokens": n, "singletons": singles}
    elif (T if mode == "temporal" else S) == 1:
        kw = {"singletons": B * T * S}
    fn = lambda qkv, valid=None: ref.factorized_attention_ref(qkv, mode, valid)  # noqa: E731
    full = dict(B=B, T=T, S=S, H=H, dh=dh, dtype=dtype)
    wrong = {"o and lse re-read in the backward": kb.MinBytes(
        kb.factorized_attention_bytes(**full, **kw).fwd,
        kb.factorized_attention_bytes(**full, **kw).bwd + B * T * S * H * dh * qkv.element_size())}
    return Case(fn, args, ["qkv"], alt, kb.factorized_attention_bytes, {**full, **kw}, wrong)


def varlen_case(indexed, dtype):
    H, dh = 2, 4
    lens = torch.tensor([3, 0, 1, 4, 2])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32)
    ntok = int(lens.sum())
    cu_alt = cu.clone()
    cu_alt[1:3] = 2                                        # lens 2, 0, 2, 4, 2
    args = {"qkv": _rand(ntok, 3, H, dh, dtype=dtype, seed=3), "cu": cu}
    alt = {"cu": cu_alt}
    if indexed:
        args["index"] = torch.randperm(ntok, generator=_gen(4)).to(torch.int32)
        alt["index"] = args["index"].roll(1)
    fn = lambda qkv, cu, index=None: ref.varlen_attention_ref(qkv, cu, 4, index)  # noqa: E731
    kw = dict(ntok=ntok, segments=lens.numel(), H=H, dh=dh, dtype=dtype, indexed=indexed,
              singletons=kb.segment_singletons(cu))
    no_single = {**kw, "singletons": 0}
    return Case(fn, args, ["qkv"], alt, kb.varlen_attention_bytes, kw,
                {"1-token segments read in full": kb.varlen_attention_bytes(**no_single)})


def gather_case(pos, dtype, pos_dtype=F32, narrow=False):
    B, T, N, K, D = 2, 3, 7, 3, 5
    idx = _sorted_idx(B, N, K, seed=5)
    if narrow:                                           # some positions unused by every row
        idx = torch.tensor([[0, 2, 3], [2, 3, 5]])
    alt = {"idx": idx.clone()}
    alt["idx"][1, 0] = (set(range(N)) - set(idx[1].tolist())).pop()
    x = _rand(B, T, N, D, dtype=dtype, seed=6)
    old_f = 2 * B * T * K * D * x.element_size()          # the former bench_kernels.py formula
    old = kb.MinBytes(old_f, old_f + B * T * K * D * x.element_size() + B * T * N * D * x.element_size())
    if not pos:
        kw = dict(B=B, T=T, N=N, K=K, D=D, dtype=dtype)
        return Case(lambda x, idx: ref.gather_tokens_ref(x, idx), {"x": x, "idx": idx}, ["x"], alt,
                    kb.gather_tokens_bytes, kw, {"old bench formula": old})
    args = {"x": x, "pos_t": _rand(T, D, dtype=pos_dtype, seed=7), "pos_s": _rand(N, D, dtype=pos_dtype, seed=8),
            "idx": idx}
    kw = dict(B=B, T=T, N=N, K=K, D=D, dtype=dtype, pos_dtype=pos_dtype, pos_rows=kb.positions_used(idx))
    wrong = {"old bench formula": old,
             "all of pos_s read": kb.gather_visible_add_pos_bytes(**{**kw, "pos_rows": N})}
    if pos_dtype != dtype:
        wrong["tables in x's dtype"] = kb.gather_visible_add_pos_bytes(**{**kw, "pos_dtype": dtype})
    if kw["pos_rows"] == N:
        del wrong["all of pos_s read"]
    return Case(lambda x, pos_t, pos_s, idx: ref.gather_visible_add_pos_ref(x, pos_t, pos_s, idx),
                args, ["x", "pos_t", "pos_s"], alt, kb.gather_visible_add_pos_bytes, kw, wrong)


def rgb_tube_case(pred_dtype, clip_dtype):
    B, T, patch, side = 2, 3, 2, 6
    N, Nm = (side // patch) ** 2, 4
    idx = _sorted_idx(B, N, Nm, seed=9)
    alt = {"idx": idx.clone()}
    alt["idx"][0, 0] = (set(range(N)) - set(idx[0].tolist())).pop()
    args = {"clip": _rand(B, T, 3, side, side, dtype=clip_dtype, seed=10),
            "pred": _rand(B, T, Nm, patch * patch * 3, dtype=pred_dtype, seed=11), "idx": idx}
    kw = dict(B=B, T=T, Nm=Nm, patch=patch, pred_dtype=pred_dtype, clip_dtype=clip_dtype)
    n = B * T * Nm * patch * patch * 3
    pe, ce = args["pred"].element_size(), args["clip"].element_size()
    old = kb.MinBytes(n * (2 * ce + pe), 2 * n * (2 * ce + pe) + n * pe)   # the former formula
    return Case(lambda clip, pred, idx: ref.rgb_diff_mse_tube_ref(clip, pred, idx, patch), args, ["pred"],
                alt, kb.rgb_diff_mse_tube_bytes, kw, {"old bench formula": old})


def rgb_packed_case(pred_dtype, clip_dtype):
    B, T, patch, side = 2, 3, 2, 6
    N = (side // patch) ** 2
    rows = torch.tensor([0, 3, N + 3, N + 4, 2 * N + 4, 2 * N + 8, T * N + 1, T * N + N + 1, T * N + 2 * N + 7])
    alt = {"rows": rows.clone()}
    alt["rows"][2] = N + 5
    M = rows.numel()
    args = {"clip": _rand(B, T, 3, side, side, dtype=clip_dtype, seed=12),
            "pred": _rand(M, patch * patch * 3, dtype=pred_dtype, seed=13), "rows": rows}
    counted, patches = kb.rgb_packed_counts(rows, T, N)
    kw = dict(M=M, counted=counted, clip_patches=patches, patch=patch, pred_dtype=pred_dtype,
              clip_dtype=clip_dtype)
    wrong = {"two clip patches per counted row": kb.rgb_diff_mse_packed_bytes(**{**kw, "clip_patches": 2 * counted}),
             "frame-0 rows read": kb.rgb_diff_mse_packed_bytes(**{**kw, "counted": M})}
    return Case(lambda clip, pred, rows: ref.rgb_diff_mse_packed_ref(clip, pred, rows, patch), args, ["pred"],
                alt, kb.rgb_diff_mse_packed_bytes, kw, wrong)


def ce_case(dtype, bias, ignored):
    M, D, K = 6, 4, 7
    target = torch.randint(0, K, (M,), generator=_gen(14))
    target[:ignored] = -100
    alt = {"target": target.clone()}
    alt["target"][-1] = (alt["target"][-1] + 1) % K
    args = {"x": _rand(M, D, dtype=dtype, seed=15), "w": _rand(K, D, dtype=dtype, seed=16), "target": target}
    diff = ["x", "w"]
    if bias:
        args["b"] = _rand(K, dtype=dtype, seed=17)
        diff.append("b")
    fn = lambda x, w, target, b=None: ref.linear_cross_entropy_ref(x, w, b, target)  # noqa: E731
    kw = dict(M=M, D=D, K=K, dtype=dtype, bias=bias, ignored=ignored)
    return Case(fn, args, diff, alt, kb.linear_cross_entropy_bytes, kw,
                {"ignored rows read": kb.linear_cross_entropy_bytes(**{**kw, "ignored": 0})} if ignored else {})


CASES = {
    **{f"attention-{m}-{'valid' if v else 'dense'}-{str(d)[6:]}": (attention_case, (m, v, d))
       for m in ("temporal", "spatial") for v in (False, True) for d in (BF16, F32)},
    "attention-temporal-one-frame": (attention_case, ("temporal", False, F32, 1)),
    **{f"varlen-{'indexed' if i else 'plain'}-{str(d)[6:]}": (varlen_case, (i, d)) for i in (False, True)
       for d in (BF16, F32)},
    "gather_tokens-bf16": (gather_case, (False, BF16)),
    "gather_pos-bf16-fp32pos": (gather_case, (True, BF16, F32)),
    "gather_pos-fp32-narrow": (gather_case, (True, F32, F32, True)),
    "gather_pos-bf16-bf16pos-narrow": (gather_case, (True, BF16, BF16, True)),
    "rgb_tube-bf16pred-fp32clip": (rgb_tube_case, (BF16, F32)),
    "rgb_tube-fp32-bf16clip": (rgb_tube_case, (F32, BF16)),
    "rgb_packed-bf16pred-fp32clip": (rgb_packed_case, (BF16, F32)),
    "rgb_packed-fp32-fp32": (rgb_packed_case, (F32, F32)),
    "ce-bf16-bias": (ce_case, (BF16, True, 0)),
    "ce-fp32-nobias-ignore": (ce_case, (F32, False, 2)),
}


@pytest.fixture(scope="module")
def measured():
    cache = {}

    def get(name):
        if name not in cache:
            make, params = CASES[name]
            case = make(*params)
            cache[name] = (case, footprint(case.fn, case.args, case.diff, case.alt))
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(CASES))
def test_formula_matches_measured_traffic(name, measured):
    case, got = measured(name)
    want = case.formula(**case.kwargs)
    assert (want.fwd, want.bwd) == (got.fwd, got.bwd), f"{name}: formula {want} vs measured {got}"


@pytest.mark.parametrize("name", list(CASES))
def test_off_by_one_is_caught(name, measured):
    """Every integer argument of the formula matters: off by one either way, the exact
    comparison above would fail; so would the case's known-wrong formulas."""
    case, got = measured(name)
    checked = 0
    for key, val in case.kwargs.items():
        if isinstance(val, bool) or not isinstance(val, int):
            continue
        for delta in (-1, 1):
            try:
                bad = case.formula(**{**case.kwargs, key: val + delta})
            except ValueError:                      # outside the formula's domain
                continue
            assert bad != got, f"{name}: {key} {val} -> {val + delta} still matches {got}"
            checked += 1
    assert checked >= 4, (name, checked)
    for why, bad in case.wrong.items():
        assert bad != got, f"{name}: the wrong formula ({why}) matches {got}"


def test_footprint_on_plain_ops():
    """The measurement itself, on ops whose traffic is obvious."""
    x = _rand(4, 3, dtype=BF16)
    # y = 2x: forward reads x, writes y; backward reads dy only (linear), writes dx
    assert footprint(lambda x: 2 * x, {"x": x}, ["x"], {}) == (2 * 24, 2 * 24)
    # y = x*x: the backward also reads x
    assert footprint(lambda x: x * x, {"x": x}, ["x"], {}) == (2 * 24, 3 * 24)
    # rows 1 and 3 of a [4, 3] table; the gradient is dense
    idx = torch.tensor([3, 1])
    assert footprint(lambda x, i: x[i], {"x": x, "i": idx}, ["x"], {"i": torch.tensor([0, 1])}) \
        == (12 + 16 + 12, 12 + 16 + 24)
    # a loss of the first row only: the other rows are never read, and dloss is read
    assert footprint(lambda x: x[0].float().pow(2).sum(), {"x": x}, ["x"], {}) == (6 + 4, 6 + 4 + 24)


def test_counts_helpers():
    valid = torch.tensor([[[1, 0, 1], [1, 0, 0]]], dtype=torch.bool)       # [1, T=2, S=3]
    assert kb.attention_group_counts(valid, "temporal") == (3, 1)           # column 2 alone
    assert kb.attention_group_counts(valid, "spatial") == (3, 1)            # frame 1 alone
    assert kb.segment_singletons(torch.tensor([0, 1, 1, 4, 5], dtype=torch.int32)) == 2
    # T = 2, N = 3: rows 4 (b0 t1 n1) and 11 (b1 t1 n2) count, 2 (b0 t0 n2) does not;
    # their targets read patches 4, 1, 11, 8
    assert kb.rgb_packed_counts(torch.tensor([2, 4, 11]), 2, 3) == (2, 4)
    assert kb.rgb_packed_counts(torch.tensor([1, 4]), 2, 3) == (1, 2)       # patch 1 read once
    assert kb.positions_used(torch.tensor([[0, 2], [2, 5]])) == 3
    assert kb.MinBytes(3, 4).total == 7


# ----------------------------------------------------------------------------------------
# the benchmark's CPU-checkable parts: every baseline computes the op, the summary, the copy rate
# ----------------------------------------------------------------------------------------
def _load_bench():
    saved = list(__import__("sys").path)
    try:
        spec = importlib.util.spec_from_file_location("bench_kernels_under_test",
                                                      ROOT / "benchmarks" / "bench_kernels.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        __import__("sys").path[:] = saved


@pytest.fixture(scope="module")
def bk():
    return _load_bench()


def _fake_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k):
    """torch's varlen_attn (CUDA only) by the reference, so the layouts around it run on CPU."""
    return ref.varlen_attention_ref(torch.stack([q, k, v], 1), cu_q, max_q).view(q.shape)


_CPU_MISSING = ("No viable backend", "fused kernels run on CUDA")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("mode", ["spatial", "temporal"])
def test_bench_attention_baselines_compute_the_op(mode, bk, monkeypatch):
    import torch.nn.attention.varlen as tv
    monkeypatch.setattr(tv, "varlen_attn", _fake_varlen_attn)
    monkeypatch.setattr(bk, "compiled", lambda fn, dev, **kw: fn)    # eager stand-ins (flex, reference)
    cpu = torch.device("cpu")
    qkv = torch.randn(2, 3, 5, 3 * 16, generator=_gen(20)).view(2, 3, 5, 3, 2, 8)
    want = ref.factorized_attention_ref(qkv, mode)
    ran = set()
    for name, f in bk.attention_variants(mode, cpu).items():
        try:
            got = f(qkv)
        except (RuntimeError, NotImplementedError) as e:
            assert any(m in str(e) for m in _CPU_MISSING), (name, e)   # CUDA-only backends
            continue
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
        ran.add(name)
    layout = "views" if mode == "spatial" else "heads=S*H"
    need = {f"sdpa math ({layout})", f"sdpa flash ({layout})", "flex (compiled)", "varlen_attn",
            "compiled reference"} | ({"sdpa flash (per clip)"} if mode == "temporal" else set())
    assert need <= ran, need - ran


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("indexed", [False, True])
def test_bench_varlen_baselines_compute_the_op(indexed, bk):
    from torch.nn.attention.flex_attention import flex_attention
    lens = torch.tensor([3, 0, 1, 4, 2])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32)
    qkv = torch.randn(10, 3, 2, 8, generator=_gen(21))
    index = torch.randperm(10, generator=_gen(22)).to(torch.int32) if indexed else None
    want = ref.varlen_attention_ref(qkv, cu, 4, index)
    variants = bk.varlen_variants("temporal" if indexed else "spatial", qkv, cu, 4, index, cu,
                                  flex=flex_attention, varlen_attn=_fake_varlen_attn)
    assert set(variants) == {"varlen_attn (torch)", "nested jagged sdpa", "flex doc-mask (compiled)"}
    for name, f in variants.items():
        torch.testing.assert_close(f(), want, atol=1e-5, rtol=1e-5, msg=name)


def test_bench_gather_baselines_compute_the_op(bk, monkeypatch):
    monkeypatch.setattr(bk, "compiled", lambda fn, dev, **kw: fn)
    B, T, N, K, D = 2, 3, 7, 3, 8
    x = torch.randn(B, T, N, D, generator=_gen(23)).to(BF16)
    pt, ps = torch.randn(T, D, generator=_gen(24)), torch.randn(N, D, generator=_gen(25))
    idx = _sorted_idx(B, N, K, seed=26)
    rows = bk.flat_rows(idx, T, N)
    assert rows.dtype == torch.int64 and rows.numel() == B * T * K
    pos_v, tok_v = bk.gather_variants(torch.device("cpu"))
    want_p, want_t = ref.gather_visible_add_pos_ref(x, pt, ps, idx), ref.gather_tokens_ref(x, idx)
    assert want_p.dtype == F32                                      # bf16 + fp32 tables -> fp32
    for name, f in pos_v.items():
        if bk.OURS in name:
            continue
        torch.testing.assert_close(f(x, pt, ps, idx, rows), want_p, msg=name)
    for name, f in tok_v.items():
        if bk.OURS in name:
            continue
        assert torch.equal(f(x, idx, rows), want_t), name
    assert {"index_select + pos add", "x[rows] + pos add", "compiled reference"} <= set(pos_v)
    assert {"index_select", "x[rows]", "compiled reference"} <= set(tok_v)


def test_bench_table_summary_and_copy_rate(bk, capsys):
    tab = bk.Table("t", "TB/s")
    tab.copy_rate = 2e12
    tab.set_bytes("s", kb.MinBytes(10 ** 9, 3 * 10 ** 9))
    for name, mf, mfb, note in (("reference", 4.0, 9.0, ""), ("compiled reference", 1.0, 6.0, ""),
                                ("sdpa x", None, None, "RuntimeError: no"), ("fused (triton)", 0.5, 4.0, ""),
                                ("packed (triton)", 0.8, 3.0, "")):
        tab.add("s", name, mf, mfb, 10 ** 9, 4 * 10 ** 9, note)
    assert tab.summary() == [("s", "fwd", "fused (triton)", 0.5, "compiled reference", 1.0, 0.5),
                             ("s", "f+b", "packed (triton)", 3.0, "compiled reference", 6.0, 0.5)]
    assert tab.pct_copy("s", 1.0, fwd=True) == pytest.approx(50.0)      # 1 GB in 1 ms = 1 TB/s of 2
    assert tab.pct_copy("s", 4.0, fwd=False) == pytest.approx(50.0)     # 4 GB in 4 ms
    tab.show()
    out = capsys.readouterr().out
    assert "| s | f+b | packed (triton) | 3.000 | compiled reference | 6.000 | 0.50 |" in out
    assert "| s | fused (triton) | 0.500 | 2.00 | 100.0 | 4.000 | 1.00 | 50.0 |  |" in out
    # the copy rate: measured on the CPU, None on the stand-in (its events read 0)
    bk._COPY_RATE.clear()
    assert bk.copy_bandwidth(torch.device("cpu"), smoke=True, mib=4) > 0
    assert bk.copy_bandwidth(torch.device("meta"), smoke=True) is None
