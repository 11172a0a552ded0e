"""Per-op choice at run time (issue 19 item 3): a fused op slower than torch at the run's
shapes runs torch's; the choice is cached per device, dtype and shapes."""
import json

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
