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
def test_every_planned_op_has_a_case_that_runs_both_ways(shapes):
    from mam2_fast.kernels.launch_plan import planned_calls

    cases = autotune.op_cases(shapes, torch.device("cpu"), torch.float32)
    assert set(cases) == {c.op for c in planned_calls(shapes, torch.float32)}
    for fused, reference in cases.values():       # interpreter on CPU: both paths run, fwd + bwd
        fused()
        reference()


def test_slower_fused_ops_fall_back_and_the_choice_is_cached(tmp_path, monkeypatch):
    monkeypatch.delenv("MAM2_KERNEL_RETUNE", raising=False)
    path = tmp_path / "choice.json"
    calls = []
    slow = {"factorized_attention"}          # fused attention is slower than torch, the rest faster
    real_cases = autotune.op_cases

    def cases(s, device, dtype):
        out = {}
        for op, (f, r) in real_cases(s, device, dtype).items():
            out[op] = ((lambda op=op: ("f", op)), (lambda op=op: ("r", op)))
        return out
    monkeypatch.setattr(autotune, "op_cases", cases)

    def timer(fn, device):
        kind, op = fn()
        calls.append((kind, op))
        return (2.0 if kind == "f" else 1.0) if op in slow else (0.5 if kind == "f" else 1.0)
    lines = []
    t = autotune.choose_ops(TUBE, torch.device("cpu"), torch.float32, lines.append, timer=timer, path=path)
    assert t["factorized_attention"]["choice"] == "reference" and t["linear_cross_entropy"]["choice"] == "fused"
    assert set(kernels.fallbacks()) == slow
    assert len(lines) == 1 and "timed" in lines[0] and "factorized_attention reference" in lines[0]
    key = autotune.cache_key(TUBE, torch.device("cpu"), torch.float32)
    assert json.loads(path.read_text())[key] == t
    # the same run shapes again: from the cache, nothing timed
    kernels.clear_fallbacks()
    n = len(calls)
    lines.clear()
    assert autotune.choose_ops(TUBE, torch.device("cpu"), torch.float32, lines.append, timer=timer, path=path) == t
    assert len(calls) == n and "cached" in lines[0] and set(kernels.fallbacks()) == slow
    # MAM2_KERNEL_RETUNE=1 times again; another batch is another key
    monkeypatch.setenv("MAM2_KERNEL_RETUNE", "1")
    autotune.choose_ops(TUBE, torch.device("cpu"), torch.float32, lines.append, timer=timer, path=path)
    assert len(calls) > n
    assert autotune.cache_key(TUBE.with_batch(4), torch.device("cpu"), torch.float32) != key


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
