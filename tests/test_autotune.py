"""Per-op choice at run time (issue 19 item 3): a fused op slower than torch at the run's
shapes runs torch's; the choice is cached per device, dtype and shapes."""
import json
from pathlib import Path

import pytest
import torch

from mam2_fast.kernels import _testing  # noqa: F401  (interpreter mode on CPU: must come first)
from mam2_fast import kernels
from mam2_fast.kernels import autotune
from mam2_fast.kernels.launch_plan import RunShapes

TUBE = RunShapes(batch=2, frames=3, patches=9, patch=4, channels=3, embed_dim=16, heads=2, decoder_dim=16,
                 decoder_heads=2, mask_kind="tube", mask_ratio=0.5, vocab_size=11)
RANDOM = RunShapes(batch=2, frames=3, patches=9, patch=4, channels=3, embed_dim=16, heads=2, decoder_dim=16,
                   decoder_heads=2, mask_kind="random", mask_ratio=0.6, vocab_size=11)


@pytest.fixture(autouse=True)
def _clean():
    kernels.clear_fallbacks()
    yield
    kernels.clear_fallbacks()


@pytest.mark.parametrize("shapes", [TUBE, RANDOM, RunShapes(batch=1, frames=2, patches=4, patch=4, channels=3,
                                                             embed_dim=16, heads=2)], ids=["tube", "random", "finetune"])
def test_every_planned_call_has_a_case_that_runs_both_ways(shapes):
    from mam2_fast.kernels.launch_plan import planned_calls

    cases = autotune.call_cases(shapes, torch.device("cpu"), torch.float32)
    assert {c.op for c in cases.values()} == {c.op for c in planned_calls(shapes, torch.float32)}
    for key, case in cases.items():          # interpreter on CPU: both paths run, fwd + bwd
        with kernels.recording_calls() as seen:
            case.fused()
            case.reference()
        assert seen == [key, key], (key, seen)  # each case makes the call it is filed under


def _tiny_model(**over):
    from mam2_fast.config import ModelConfig
    from mam2_fast.models.mam2 import build_model

    cfg = ModelConfig(preset="tiny", img_size=32, num_frames=4, embed_dim=32, depth=1, num_heads=2,
                      decoder_dim=16, decoder_heads=2, regressor_depth=1, appearance_depth=1,
                      motion_depth=1, **over)
    return build_model(cfg, vocab_size=13)


@pytest.mark.parametrize("kind,over", [
    ("tube", {}), ("tube", {"use_regressor": False}), ("tube", {"use_alignment": False}),
    ("tube", {"appearance_target": "pixels"}), ("tube", {"motion_target": "clip_order"}),
    ("random", {}), ("frame", {}), ("random", {"use_regressor": False}), ("cube", {})])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_timed_calls_are_the_models_own_calls(kind, over, autocast):
    """The autotuner files each timing under the call key the model's own call computes: a
    forward + backward of a tiny model (``auto`` on the CPU: the fused path's calls, each
    through its reference) records the same set of keys that ``call_cases`` times, shapes,
    dtypes and forward-only passes (the alignment target) included."""
    from mam2_fast.kernels.launch_plan import RunShapes
    from mam2_fast.masking import MaskGenerator

    over = dict(over)
    model = _tiny_model(**over)
    model.set_kernel_backend("auto")
    g = torch.Generator().manual_seed(0)
    B, ratio = 2, 0.5
    info = MaskGenerator(kind, ratio, 4, (2, 2))(B, g)                    # 4 frames of 2 x 2 patches
    clip = torch.randn(B, 4, 3, 32, 32, generator=g)
    codes = torch.randint(0, 13, (B, 4, 4), generator=g)
    dtype = torch.bfloat16 if autocast else torch.float32
    with kernels.recording_calls() as seen, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(clip, info, codes)
        out["loss"].backward()
    shapes = RunShapes.of_model(model, B, kind, ratio)
    assert set(seen) == set(autotune.call_cases(shapes, torch.device("cpu"), dtype)), \
        (sorted(set(seen)), sorted(autotune.call_cases(shapes, torch.device("cpu"), dtype)))


def test_finetune_calls_are_timed_as_the_classifier_makes_them():
    from mam2_fast.kernels.launch_plan import RunShapes
    from mam2_fast.ft.config import ClassifierConfig
    from mam2_fast.models.classifier import VideoClassifier

    model = VideoClassifier(ClassifierConfig(preset="tiny", img_size=32, num_frames=4, embed_dim=32, depth=1, num_heads=2,
                                             num_classes=5))
    model.set_kernel_backend("auto")
    clip = torch.randn(2, 4, 3, 32, 32)
    with kernels.recording_calls() as seen:
        model(clip).sum().backward()
    shapes = RunShapes.of_model(model, 2)
    assert set(seen) == set(autotune.call_cases(shapes, torch.device("cpu"), torch.float32))


def _fake_cases(monkeypatch, error=lambda impl: 0.0):
    """Cases that report (side, op, what) instead of running; built-ins report their name."""
    real_cases = autotune.call_cases

    def cases(s, device, dtype):
        return {k: c._replace(fused=(lambda c=c: ("f", c.op, c.what)), reference=(lambda c=c: ("r", c.op, c.what)),
                              builtins={impl: (lambda c=c, impl=impl: (impl, c.op, c.what)) for impl in c.builtins},
                              error=error if c.error is not None else None)
                for k, c in real_cases(s, device, dtype).items()}
    monkeypatch.setattr(autotune, "call_cases", cases)


def test_slower_calls_fall_back_alone_and_the_choice_is_cached(tmp_path, monkeypatch):
    monkeypatch.delenv("MAM2_KERNEL_RETUNE", raising=False)
    path = tmp_path / "choice.json"
    _fake_cases(monkeypatch)
    calls = []

    def timer(fn, device):
        side, op, what = fn()
        calls.append((side, op, what))
        if side.startswith("sdpa:"):                                      # the built-ins: slowest here
            return 9.0
        if op == "factorized_attention" and what.endswith("spatial"):     # fused spatial attention: slower
            return 2.0 if side == "f" else 1.0
        if op == "linear_cross_entropy":                                  # the whole op slower
            return 3.0 if side == "f" else 1.0
        return 0.5 if side == "f" else 1.0
    lines = []
    t = autotune.choose_ops(TUBE, torch.device("cpu"), torch.float32, lines.append, timer=timer, path=path)
    spatial = {k for k, v in t.items() if v["op"] == "factorized_attention" and v["what"].endswith("spatial")}
    assert len(spatial) == 3 and all(" spatial " in k for k in spatial)   # encoder, alignment target, decoders
    assert set(kernels.call_fallbacks()) == spatial                       # attention stays fused elsewhere
    assert set(kernels.fallbacks()) == {"linear_cross_entropy"}            # slower at its only call: whole op
    assert len(lines) == 1 and "timed" in lines[0] and "temporal: fused" in lines[0]
    key = autotune.cache_key(TUBE, torch.device("cpu"), torch.float32)
    assert json.loads(path.read_text())[key] == t
    # the same run shapes again: from the cache, nothing timed, the same choice
    kernels.clear_fallbacks()
    n = len(calls)
    lines.clear()
    assert autotune.choose_ops(TUBE, torch.device("cpu"), torch.float32, lines.append, timer=timer, path=path) == t
    assert len(calls) == n and "cached" in lines[0]
    assert set(kernels.call_fallbacks()) == spatial and set(kernels.fallbacks()) == {"linear_cross_entropy"}
    # MAM2_KERNEL_RETUNE=1 times again; another batch is another key
    monkeypatch.setenv("MAM2_KERNEL_RETUNE", "1")
    autotune.choose_ops(TUBE, torch.device("cpu"), torch.float32, lines.append, timer=timer, path=path)
    assert len(calls) > n
    assert autotune.cache_key(TUBE.with_batch(4), torch.device("cpu"), torch.float32) != key


def test_a_call_fallback_sends_only_that_call_to_the_reference(monkeypatch):
    """Dispatch: with the spatial call of one shape sent back, that call runs the reference
    and the temporal call of the same tensor, and the spatial call at another shape, the
    kernel."""
    from mam2_fast.kernels import attention, reference

    ran = []
    monkeypatch.setattr(attention, "factorized_attention_fused",
                        lambda qkv, mode, valid, scale: ran.append(("fused", mode, qkv.shape[2])) or qkv[..., 0, :, :].flatten(-2))
    real_ref = reference.factorized_attention_ref
    monkeypatch.setattr(reference, "factorized_attention_ref",
                        lambda qkv, mode, valid, scale: ran.append(("reference", mode, qkv.shape[2])) or real_ref(qkv, mode, valid, scale))
    qkv, other = torch.randn(2, 3, 5, 3, 2, 4), torch.randn(2, 3, 7, 3, 2, 4)
    kernels.fall_back_call(kernels.call_key("factorized_attention", "spatial", qkv), "slower")
    for x in (qkv, other):
        for mode in ("temporal", "spatial"):
            kernels.factorized_attention(x, mode, backend="fused")
    assert ran == [("fused", "temporal", 5), ("reference", "spatial", 5), ("fused", "temporal", 7), ("fused", "spatial", 7)]
    with pytest.raises(ValueError, match="names no fused op"):
        kernels.fall_back_call("not_an_op spatial [1]", "x")


def test_ops_that_failed_the_check_are_not_timed(tmp_path):
    kernels.fall_back_to_reference("varlen_attention", "failed")
    seen = []
    autotune.choose_ops(RANDOM, torch.device("cpu"), torch.float32, lambda s: None,
                        timer=lambda fn, d: seen.append(fn) or 1.0, path=tmp_path / "c.json")
    t = json.loads((tmp_path / "c.json").read_text())
    assert "varlen_attention" not in next(iter(t.values()))


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: rank 0 times fused attention faster, rank 1 slower."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        kernels.clear_fallbacks()
        slow_on_this_rank = rank == 1

        def timed(fn, device):
            kind = timed.calls % 2            # fused, then reference, per op
            timed.calls += 1
            return (2.0 if slow_on_this_rank else 0.5) if kind == 0 else 1.0
        timed.calls = 0
        timings = autotune.choose_ops(TUBE, torch.device("cpu"), torch.float32, lambda s: None, timer=timed,
                                      path=Path(out_dir) / f"cache{rank}.json")
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(
            {"fallbacks": sorted(kernels.fallbacks()), "choices": {k: v["choice"] for k, v in timings.items()}}))
    finally:
        dist.destroy_process_group()


def test_ranks_follow_rank_zeros_choice(tmp_path):
    """Two gloo processes whose own timings disagree (rank 1 finds every fused op slower)
    both use rank 0's choice: no op runs fused on one rank and torch on the other."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert r0["fallbacks"] == [] and set(r0["choices"].values()) == {"fused"}
    # each rank cached what it measured itself: rank 1 found every fused op slower
    c1 = next(iter(json.loads((tmp_path / "cache1.json").read_text()).values()))
    assert set(v["choice"] for v in c1.values()) == {"reference"}


def _check_rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One gloo rank of the start-of-run check: the fused attention fails on rank 1 only."""
    import torch.distributed as dist

    from mam2_fast.kernels import selfcheck
    from mam2_fast.train import accel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        kernels.clear_fallbacks()
        selfcheck.check_fused_kernels = lambda device, dtype: (
            {"factorized_attention[spatial]": "relative error 1e+00 > 3e-02"} if rank == 1 else {})
        kernels.triton_available = lambda: True
        accel.capability = lambda d: (9, 0)
        autotune.choose_ops = lambda *a, **k: {}
        out = {}
        out["auto"] = selfcheck.resolve_backend("auto", torch.device("cuda"), torch.bfloat16, lambda s: None, None)
        out["fallbacks"] = kernels.fallbacks()
        try:
            selfcheck.resolve_backend("fused", torch.device("cuda"), torch.bfloat16, lambda s: None, None)
            out["fused"] = "no error"
        except RuntimeError as e:
            out["fused"] = str(e)
        (Path(out_dir) / f"check{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_a_check_failing_on_one_rank_falls_back_on_every_rank(tmp_path):
    """The start-of-run check fails on rank 1 only: under ``auto`` both ranks run that op's
    reference (rank 0 names rank 1); under ``fused`` both raise, so no rank is left waiting in
    a collective for one that stopped."""
    import torch.multiprocessing as mp

    mp.spawn(_check_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"check{r}.json").read_text()) for r in (0, 1))
    assert r0["auto"] == r1["auto"] == "fused"
    assert set(r0["fallbacks"]) == set(r1["fallbacks"]) == {"factorized_attention"}
    assert "on rank 1" in r0["fallbacks"]["factorized_attention"]
    assert "on rank" not in r1["fallbacks"]["factorized_attention"]
    assert "factorized_attention" in r0["fused"] and "factorized_attention" in r1["fused"]


@pytest.mark.parametrize("impl", ["sdpa:flash", "sdpa:math"])
@pytest.mark.parametrize("mode", ["temporal", "spatial"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 3, 16), (1, 3, 49, 3, 2, 8), (3, 16, 5, 3, 1, 32)],
                         ids=["odd", "batch1-S49", "T16"])
def test_sdpa_builtin_matches_the_reference(impl, mode, shape):
    """The built-in the per-call choice may pick computes the reference: output and d(qkv),
    fp32 on the CPU, fresh random inputs, odd sizes (T != 16, S not a power of two, batch 1)."""
    from mam2_fast.kernels import builtin
    from mam2_fast.kernels.reference import factorized_attention_ref

    qkv = torch.randn(*shape, dtype=torch.float32)
    g = torch.randn(*shape[:3], shape[4] * shape[5])
    outs = []
    for fn in (lambda x: builtin.run("factorized_attention", impl, x, mode, None, 0.3),
               lambda x: factorized_attention_ref(x, mode, None, 0.3)):
        x = qkv.clone().requires_grad_()
        out = fn(x)
        (out * g).sum().backward()
        outs.append((out.detach(), x.grad))
    for a, b in zip(*outs):
        assert a.shape == b.shape
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 1e-5, rel
    with pytest.raises(ValueError, match="validity mask"):
        builtin.run("factorized_attention", impl, qkv, mode, torch.ones(*shape[:3], dtype=torch.bool), None)


def test_a_faster_builtin_is_chosen_for_its_call_and_dispatched(tmp_path, monkeypatch):
    """Timings where SDPA (math) is fastest for the spatial calls: those calls run it, the
    temporal ones stay fused, and the dispatch of such a call goes to the built-in."""
    from mam2_fast.kernels import builtin

    _fake_cases(monkeypatch)

    def timer(fn, device):
        side, op, what = fn()
        if side.startswith("sdpa:"):
            return 0.1 if (side == "sdpa:math" and what.endswith("spatial")) else 5.0
        return 0.5 if side == "f" else 1.0
    t = autotune.choose_ops(TUBE, torch.device("cpu"), torch.float32, lambda s: None, timer=timer,
                            path=tmp_path / "c.json")
    spatial = {k for k, v in t.items() if v["op"] == "factorized_attention" and v["what"].endswith("spatial")}
    assert spatial and all(t[k]["choice"] == "sdpa:math" for k in spatial)
    assert {k: v[0] for k, v in kernels.call_fallbacks().items()} == {k: "sdpa:math" for k in spatial}
    assert not kernels.fallbacks()
    ran = []
    monkeypatch.setattr(builtin, "run", lambda op, impl, *a: ran.append(impl) or torch.zeros(()))
    key = next(k for k in spatial if "fwd+bwd" in k)          # the encoder's
    shape = [int(v) for v in key.split("[", 1)[1].split("]", 1)[0].split(",")]
    kernels.factorized_attention(torch.randn(*shape, requires_grad=True), "spatial", backend="fused")
    # a run whose backend is the reference (an older GPU: built-ins only) takes the choice too
    kernels.factorized_attention(torch.randn(*shape, requires_grad=True), "spatial", backend="reference")
    assert ran == ["sdpa:math", "sdpa:math"]


def test_a_builtin_that_disagrees_with_the_reference_is_never_chosen(tmp_path, monkeypatch):
    _fake_cases(monkeypatch, error=lambda impl: 0.5)          # every built-in off by 50 %
    t = autotune.choose_ops(TUBE, torch.device("cpu"), torch.float32, lambda s: None,
                            timer=lambda fn, d: 0.01 if fn()[0].startswith("sdpa:") else 1.0,
                            path=tmp_path / "c.json")
    attn = [v for v in t.values() if v["op"] == "factorized_attention"]
    assert attn and all(v["choice"] == "fused" and "builtin_ms" not in v for v in attn)
    assert all("relative error 5.0e-01" in why for v in attn for why in v["builtin_skipped"].values())


def test_attention_cases_offer_the_sdpa_builtins_and_they_pass_parity():
    """Real cases on the CPU: each attention call offers SDPA flash and math, each agrees with
    the reference on the case's own inputs (output and gradient), and runs."""
    cases = autotune.call_cases(TUBE, torch.device("cpu"), torch.float32)
    attn = [c for c in cases.values() if c.op == "factorized_attention"]
    assert attn and all(set(c.builtins) == {"sdpa:flash", "sdpa:math"} for c in attn)
    for c in attn:
        for impl, run in c.builtins.items():
            assert c.error(impl) < 1e-5, (c.what, impl)
            run()
    assert all(not c.builtins for c in cases.values() if c.op != "factorized_attention")


def test_varlen_builtin_hands_torch_the_packed_views(monkeypatch):
    """``varlen_attn`` is CUDA-only; on the CPU a stand-in with its signature (attention per
    segment through the reference) checks what the built-in hands it: zero-copy q, k, v
    ``[Ntok, H, dh]`` views of the packed qkv, the segments, the longest segment, the scale;
    and that output and gradient come back as the reference's ``[Ntok, H*dh]``. Only segments in
    row order (spatial) get it, and only on CUDA."""
    import torch.nn.attention.varlen as tv

    from mam2_fast.kernels import builtin
    from mam2_fast.kernels.reference import attention_ref, varlen_attention_ref

    seen = {}

    def stand_in(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, **kw):
        seen.update(shape=tuple(q.shape), views=q.data_ptr() != k.data_ptr() and not q.is_contiguous(),
                    max=(max_q, max_k), scale=scale, same_cu=cu_q is cu_k)
        out = torch.zeros_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            if b > a:
                qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))             # [H, L, dh]
                out = out.index_copy(0, torch.arange(a, b), attention_ref(qs, ks, vs, None, scale).transpose(0, 1))
        return out
    monkeypatch.setattr(tv, "varlen_attn", stand_in)
    cu = torch.tensor([0, 5, 5, 12, 13], dtype=torch.int32)         # an empty and a one-token segment
    qkv = torch.randn(13, 3, 2, 8)
    g = torch.randn(13, 16)
    res = []
    for fn in (lambda x: builtin.run("varlen_attention", "varlen_attn", x, cu, 7, None, 0.5),
               lambda x: varlen_attention_ref(x, cu, 7, None, 0.5)):
        x = qkv.clone().requires_grad_()
        out = fn(x)
        (out * g).sum().backward()
        res.append((out.detach(), x.grad))
    for a, b in zip(*res):
        assert a.shape == b.shape and ((a - b).norm() / b.norm()).item() < 1e-5
    assert seen == {"shape": (13, 2, 8), "views": True, "max": (7, 7), "scale": 0.5, "same_cu": True}
    assert builtin.candidates("varlen_attention", torch.device("cuda")) == ["varlen_attn"]
    assert builtin.candidates("varlen_attention", torch.device("cuda"), has_index=True) == []
    assert builtin.candidates("varlen_attention", torch.device("cpu")) == []
    with pytest.raises(ValueError, match="row order"):
        builtin.run("varlen_attention", "varlen_attn", qkv, cu, 7, torch.arange(13, dtype=torch.int32), None)
    kernels.fall_back_call("varlen_attention spatial [13, 3, 2, 8] [5] float32 fwd", "x", impl="varlen_attn")
    with pytest.raises(ValueError, match="no built-in"):
        kernels.fall_back_call("gather_tokens tube [1] [1] float32 fwd", "x", impl="varlen_attn")


def test_cli_prints_the_choice_for_each_call(capsys):
    """``python -m mam2_fast.kernels.autotune``: a tiny config on the CPU (interpreter), one
    table row per distinct call with its three timings and the choice; nothing left cached."""
    over = ["model.preset=tiny", "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.num_frames=4",
            "data.num_frames=4", "data.input_size=32", "model.img_size=32", "model.decoder_dim=16",
            "model.decoder_heads=2", "model.regressor_depth=1", "model.appearance_depth=1", "model.motion_depth=1"]
    assert autotune.main(["--device", "cpu", "--batch", "1", *over]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "**" in line]
    assert len(rows) == 10, out                    # 2 gathers, 3 x 2 attention, head, motion loss
    assert sum("factorized_attention" in r and "sdpa:flash" in r for r in rows) == 6
    assert all(r.rstrip(" |").split("**")[-2] in ("fused", "reference", "sdpa:flash", "sdpa:math") for r in rows)
    if not torch.cuda.is_available():                # a clear refusal, not a crash
        assert autotune.main(["--device", "cuda"]) == 2 and "no CUDA device" in capsys.readouterr().err


def test_without_fused_kernels_the_calls_still_get_torchs_fastest_builtin(tmp_path, monkeypatch):
    """``fused=False`` (an older GPU, no triton): no kernel is timed or chosen; a call whose
    built-in beats the reference runs it, the rest run their reference; no op-level decision is
    taken from the timings (the op fallbacks stay the caller's)."""
    _fake_cases(monkeypatch)
    seen = []

    def timer(fn, device):
        side, op, what = fn()
        seen.append(side)
        return 0.2 if side == "sdpa:flash" else 1.0
    t = autotune.choose_ops(TUBE, torch.device("cpu"), torch.float32, lambda s: None, timer=timer,
                            path=tmp_path / "c.json", fused=False)
    assert "f" not in seen and all("fused_ms" not in v for v in t.values())
    attn = {k for k, v in t.items() if v["op"] == "factorized_attention"}
    assert set(t) == attn                                     # only calls with a built-in are timed
    assert {k: v[0] for k, v in kernels.call_fallbacks().items()} == {k: "sdpa:flash" for k in attn}
    assert not kernels.fallbacks()
    key = autotune.cache_key(TUBE, torch.device("cpu"), torch.float32)
    assert list(json.loads((tmp_path / "c.json").read_text())) == [key + " | built-ins only"]


def test_an_older_gpu_under_auto_gets_the_builtins_chosen_per_call(monkeypatch):
    """A V100 (sm_70) under ``auto``: every op falls back to its reference, then the per-call
    choice still runs, built-ins only (SDPA's efficient backend runs there)."""
    from mam2_fast.kernels import selfcheck
    from mam2_fast.train import accel

    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(accel, "device_name", lambda d: "Tesla V100")
    monkeypatch.setattr(accel, "capability", lambda d: (7, 0))
    monkeypatch.setattr(selfcheck, "check_fused_kernels", lambda d, t: pytest.fail("must not run on sm_70"))
    calls = []
    monkeypatch.setattr(autotune, "choose_ops", lambda *a, **k: calls.append(k.get("fused")) or {})
    lines = []
    assert selfcheck.resolve_backend("auto", torch.device("cuda"), torch.float16, lines.append, TUBE) == "reference"
    assert calls == [False] and set(kernels.fallbacks()) == set(kernels.FUSED_OPS)
    assert "faster torch built-in" in lines[0]
    monkeypatch.setattr(kernels, "triton_available", lambda: False)   # no triton on a new GPU: the same
    monkeypatch.setattr(accel, "capability", lambda d: (9, 0))
    assert selfcheck.resolve_backend("auto", torch.device("cuda"), torch.bfloat16, lines.append, TUBE) == "reference"
    assert calls == [False, False]
