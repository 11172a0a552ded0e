"""CUDA launch limits of every fused launch, at the real shapes of every shipped preset, on CPU.

CUDA refuses a grid with more than 65535 blocks on axis 1 or 2 (2**31 - 1 on axis 0). Each fused
op's launch computation (forward and backward) runs here on ``meta`` tensors under
``_common.recording_launches``: every launch is checked and recorded, nothing is allocated or
run. Shapes: ViT-S/B/L at 16x224, tube / random masks at 0.75 and 0.9, frame and cube masks,
every target, the Table 2 no-regressor ablation, the fine-tuning full grid, each shipped config
file, for batch 1..256. Before the fix (B*G*H on grid axis 1) ViT-B failed at batch 28.
"""
import dataclasses
from pathlib import Path

import pytest
import torch

from mam2_fast.kernels import _testing  # noqa: F401  (interpreter mode on CPU: must come first)
from mam2_fast import kernels
from mam2_fast.kernels import _common
from mam2_fast.kernels._common import (CUDA_GRID_LIMITS, DIRECT_LAUNCH, LaunchLimitError, check_grid,
                                       launch, recording_launches)
from mam2_fast.kernels.launch_plan import RunShapes, check_launch_limits, planned_calls, record_launches

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# a dense set through 1..256, with the batches around the old limits (21, 28, 38) and the ends
BATCHES = (1, 2, 3, 4, 5, 7, 8, 12, 16, 20, 21, 22, 24, 27, 28, 29, 32, 37, 38, 40, 48, 63, 64,
           96, 127, 128, 160, 192, 224, 255, 256)

ALL_KERNELS = {
    "_attn_fwd_kernel", "_attn_bwd_preprocess", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
    "_varlen_fwd_kernel", "_varlen_bwd_preprocess", "_varlen_bwd_dkdv_kernel", "_varlen_bwd_dq_kernel",
    "_gather_kernel", "_scatter_kernel", "_scatter_pos_kernel", "_rgb_diff_kernel", "_ce_rows_kernel",
}
_seen_kernels: set = set()


def _one_block(model_cfg):
    """The config with one block per stack: launch shapes do not depend on depth, and the
    model builds in a blink on the CPU."""
    depths = {k: 1 for k in ("depth", "regressor_depth", "appearance_depth", "motion_depth")
              if hasattr(model_cfg, k)}
    return dataclasses.replace(model_cfg, **depths)


def _model(**model_kw):
    from mam2_fast.config import ModelConfig
    from mam2_fast.models.mam2 import build_model

    cfg = _one_block(ModelConfig(kernels="fused", **model_kw))
    return build_model(cfg, vocab_size=16384 if cfg.appearance_target == "tokens" else None)


def _check_every_batch(shapes: RunShapes) -> None:
    """Every launch of one step at each batch of BATCHES fits CUDA's grid limits and goes
    through ``_common.launch``."""
    for B in BATCHES:
        records = record_launches(shapes.with_batch(B))  # raises LaunchLimitError naming the op
        direct = [r for r in records if r.op == DIRECT_LAUNCH]
        assert not direct, f"launches that bypass _common.launch: {direct}"
        assert records, f"no fused launch at {shapes.with_batch(B)}"
        for r in records:
            assert all(1 <= n <= limit for n, limit in zip(r.grid, CUDA_GRID_LIMITS)), r
        _seen_kernels.update(r.kernel for r in records)


# ---- pre-training: preset x mask x target -------------------------------------------------
MASKS = [("tube", 0.75), ("tube", 0.9), ("cube", 0.9), ("random", 0.75), ("random", 0.9),
         ("frame", 0.5), ("frame", 0.75)]
TARGETS = [dict(), dict(appearance_target="pixels"), dict(motion_target="flow")]


@pytest.mark.parametrize("preset", ["small", "base", "large"])
@pytest.mark.parametrize("mask", MASKS, ids=[f"{k}{r}" for k, r in MASKS])
@pytest.mark.parametrize("targets", TARGETS, ids=["tokens+rgbdiff", "pixels", "flow"])
def test_pretraining_launches_fit_cuda_limits(preset, mask, targets):
    shapes = RunShapes.of_model(_model(preset=preset, **targets), 1, *mask)
    _check_every_batch(shapes)


@pytest.mark.parametrize("preset", ["small", "base", "large"])
@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_clip_order_launches_fit_cuda_limits(preset, ratio):
    shapes = RunShapes.of_model(_model(preset=preset, motion_target="clip_order"), 1, "tube", ratio)
    assert any("clip-order" in c.what for c in planned_calls(shapes))
    _check_every_batch(shapes)


@pytest.mark.parametrize("mask", [("tube", 0.75), ("random", 0.9)], ids=["tube", "random"])
def test_no_regressor_ablation_launches_fit_cuda_limits(mask):
    shapes = RunShapes.of_model(_model(preset="base", use_regressor=False), 1, *mask)
    _check_every_batch(shapes)


# ---- fine-tuning and evaluation: the encoder on all 16 x 196 tokens ------------------------
@pytest.mark.parametrize("preset", ["small", "base", "large"])
def test_finetuning_full_grid_launches_fit_cuda_limits(preset):
    from mam2_fast.ft.config import FinetuneConfig
    from mam2_fast.models.classifier import build_classifier

    cfg = dataclasses.replace(FinetuneConfig().model, preset=preset, kernels="fused", num_classes=400)
    model = build_classifier(_one_block(cfg))
    shapes = RunShapes.of_model(model, 1)
    assert (shapes.frames, shapes.patches) == (16, 196)
    _check_every_batch(shapes)
    _check_every_batch(RunShapes.of_model(model, 1, train=False))  # multi-view evaluation


# ---- every shipped config file ----------------------------------------------------------
def _vocab(cfg) -> int:
    kind = cfg.tokenizer.kind
    if kind == "vqgan":
        from mam2_fast.targets.vqgan import VQGAN_PRESETS
        return VQGAN_PRESETS[cfg.tokenizer.preset]["n_embed"]
    return 8192 if kind == "dalle" else cfg.tokenizer.vocab_size


def _pretrain_configs():
    return sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("finetune"))


@pytest.mark.parametrize("name", _pretrain_configs())
def test_shipped_pretraining_configs(name):
    from mam2_fast.config import load_config
    from mam2_fast.models.mam2 import build_model
    from mam2_fast.pretrain import build_baseline

    cfg = load_config(CONFIGS / name, ["data.list_file=unused.csv"])  # no data is read
    if cfg.model.arch == "videomae":
        cfg.model = _one_block(cfg.model)
        model = build_baseline(cfg)
    else:
        uses_tokens = cfg.model.use_appearance and cfg.model.appearance_target == "tokens"
        model = build_model(_one_block(cfg.model), vocab_size=_vocab(cfg) if uses_tokens else None)
    shapes = RunShapes.of_model(model, cfg.train.batch_size, cfg.mask.kind, cfg.mask.ratio)
    if cfg.model.arch == "videomae":
        # the VideoMAE baseline (2x16x16 tubelets, tube 0.9) attends through SDPA: no fused launch
        assert shapes is None and not hasattr(model, "set_kernel_backend")
        return
    _check_every_batch(shapes)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("finetune*.yaml")))
def test_shipped_finetuning_configs(name):
    from mam2_fast.ft.config import load_finetune_config
    from mam2_fast.models.classifier import build_classifier

    cfg = load_finetune_config(CONFIGS / name, ["data.list_file=unused.csv"])
    model = build_classifier(_one_block(cfg.model))
    shapes = RunShapes.of_model(model, cfg.train.batch_size)
    if shapes is None:  # a VideoMAE classifier: SDPA only
        return
    _check_every_batch(shapes)


def test_every_kernel_was_checked():
    """The cases above reach all 13 kernels (runs last in this file)."""
    if not _seen_kernels:
        pytest.skip("run with the rest of this file")
    assert ALL_KERNELS <= _seen_kernels, f"never launched: {sorted(ALL_KERNELS - _seen_kernels)}"


# ---- the launcher itself ----------------------------------------------------------------
def test_check_grid_names_op_kernel_and_shape():
    assert check_grid((3, 65535, 65535), "op", "k", "s") == (3, 65535, 65535)
    assert check_grid((2 ** 31 - 1,), "op", "k", "s") == (2 ** 31 - 1,)
    with pytest.raises(LaunchLimitError, match=r"factorized_attention.*_attn_fwd_kernel.*axis 1 "
                                               r"\(75264 > 65535 blocks\).*qkv \[32"):
        check_grid((4, 75264), "factorized_attention", "_attn_fwd_kernel", "qkv [32, 16, 196]")
    with pytest.raises(LaunchLimitError, match="axis 0"):
        check_grid((2 ** 31,), "op", "k", "s")
    with pytest.raises(LaunchLimitError, match="axis 2"):
        check_grid((1, 1, 70000), "op", "k", "s")
    with pytest.raises(LaunchLimitError, match="0 blocks on axis 0"):
        check_grid((0, 1), "op", "k", "s")


def test_launch_refuses_before_running_the_kernel():
    ran = []

    class Kernel:
        __name__ = "_fake_kernel"

        def __getitem__(self, grid):
            return lambda *a, **k: ran.append(grid)

    launch(Kernel(), (5, 7), op="op", shape="s")
    assert ran == [(5, 7)]
    with pytest.raises(LaunchLimitError, match="op: kernel _fake_kernel"):
        launch(Kernel(), (1, 65536), op="op", shape="s")
    assert ran == [(5, 7)]


def test_direct_launches_are_caught_while_recording():
    import triton
    import triton.language as tl

    @triton.jit
    def _direct_kernel(X):
        tl.store(X, 1.0)

    with recording_launches() as records:
        _direct_kernel[(2, 3)](torch.empty(1))
        with pytest.raises(LaunchLimitError, match="axis 1"):
            _direct_kernel[(1, 70000)](torch.empty(1))
    assert [(r.op, r.grid) for r in records] == [(DIRECT_LAUNCH, (2, 3))]


def test_check_launch_limits_reports_per_op(monkeypatch):
    """An op whose grid would be refused is named, the others are not."""
    shapes = RunShapes.of_model(_model(preset="base"), 32, "random", 0.9)
    assert check_launch_limits(shapes) == {}
    monkeypatch.setattr(_common, "CUDA_GRID_LIMITS", (65535, 65535, 65535))  # an axis-0 cap of 65535
    # one program per (segment, head): the temporal visible sets, 6272 segments x 12 heads, pass
    # 65535 (with the all-heads loop the short kernels choose there, they would not)
    monkeypatch.setenv("MAM2_ATTN_HEADS_PER_PROG", "1")
    problems = check_launch_limits(shapes)
    assert "varlen_attention" in problems and "axis 0" in problems["varlen_attention"]
    assert "linear_cross_entropy" not in problems  # launched per chunk of at most 4096 rows


# ---- meta tensors route to the fake impls ---------------------------------------------------
def test_fused_ops_on_meta_tensors_return_shapes():
    meta = torch.device("meta")
    B, T, S, H, dh = 3, 4, 5, 2, 16
    qkv = torch.empty(B, T, S, 3 * H * dh, device=meta, requires_grad=True)
    for mode in ("temporal", "spatial"):
        out = kernels.factorized_attention(qkv.view(B, T, S, 3, H, dh), mode, backend="fused")
        assert out.shape == (B, T, S, H * dh) and out.device == meta
        out.sum().backward()
        assert qkv.grad.shape == qkv.shape and qkv.grad.device == meta
    packed = torch.empty(7, 3 * H * dh, device=meta, requires_grad=True)
    cu = torch.empty(3, dtype=torch.int32, device=meta)
    out = kernels.varlen_attention(packed.view(7, 3, H, dh), cu, 4, backend="fused")
    out.sum().backward()
    assert out.shape == (7, H * dh) and packed.grad.shape == packed.shape
    x = torch.empty(B, T, 10, 32, device=meta, requires_grad=True)
    idx = torch.empty(B, 6, dtype=torch.int64, device=meta)
    pos_t, pos_s = torch.empty(T, 32, device=meta), torch.empty(10, 32, device=meta)
    assert kernels.gather_visible_add_pos(x, pos_t, pos_s, idx, backend="fused").shape == (B, T, 6, 32)
    assert kernels.gather_tokens(x, idx, backend="fused").shape == (B, T, 6, 32)
    clip = torch.empty(B, T, 3, 32, 32, device=meta)
    pred = torch.empty(B, T, 6, 3 * 16 * 16, device=meta, requires_grad=True)
    loss = kernels.rgb_diff_mse_tube(clip, pred, idx, 16, backend="fused")
    loss.backward()
    assert loss.shape == () and pred.grad.shape == pred.shape
    rows = torch.empty(9, dtype=torch.int64, device=meta)
    pred_p = torch.empty(9, 3 * 16 * 16, device=meta, requires_grad=True)
    assert kernels.rgb_diff_mse_packed(clip, pred_p, rows, 16, backend="fused").shape == ()
    feat = torch.empty(11, 32, device=meta, requires_grad=True)
    w = torch.empty(50, 32, device=meta, requires_grad=True)
    target = torch.empty(11, dtype=torch.int64, device=meta)
    loss = kernels.linear_cross_entropy(feat, w, None, target, backend="fused")
    loss.backward()
    assert loss.shape == () and feat.grad.shape == feat.shape and w.grad.shape == w.shape


# ---- the start-of-run check at the run's shapes (issue 13 item 5) ---------------------------
def test_start_of_run_check_uses_run_shapes_and_falls_back_per_op(monkeypatch):
    """Under ``kernels: auto`` an op whose launches at the run's batch CUDA would refuse runs its
    reference alone, with one warning naming it; the other ops stay fused. ``fused`` raises."""
    from mam2_fast.kernels import selfcheck

    monkeypatch.setattr(selfcheck, "check_fused_kernels", lambda device, dtype: {})  # device numerics pass
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr("mam2_fast.train.accel.capability", lambda d: (9, 0))
    monkeypatch.setattr("mam2_fast.kernels.autotune.choose_ops", lambda *a, **k: {})   # timing: test_autotune.py
    monkeypatch.setattr(_common, "CUDA_GRID_LIMITS", (65535, 65535, 65535))       # a tighter device
    monkeypatch.setenv("MAM2_ATTN_HEADS_PER_PROG", "1")   # varlen: 6272 segments x 12 heads > 65535
    shapes = RunShapes.of_model(_model(preset="base"), 32, "random", 0.9)
    cuda = torch.device("cuda")
    kernels.clear_fallbacks()
    try:
        lines = []
        assert selfcheck.resolve_backend("auto", cuda, torch.bfloat16, lines.append, shapes) == "fused"
        fell = kernels.fallbacks()
        assert "varlen_attention" in fell and "linear_cross_entropy" not in fell
        warned = [s for s in lines if "WARNING" in s]
        assert len(warned) == len(fell) and any("varlen_attention" in s for s in warned)
        # the small shapes of the numerics check alone would not have caught it
        kernels.clear_fallbacks()
        assert selfcheck.resolve_backend("auto", cuda, torch.bfloat16, lines.append, None) == "fused"
        assert kernels.fallbacks() == {}
        with pytest.raises(RuntimeError, match="varlen_attention"):
            selfcheck.resolve_backend("fused", cuda, torch.bfloat16, lines.append, shapes)
    finally:
        kernels.clear_fallbacks()


def test_start_of_run_check_falls_back_per_op_on_device_failure(monkeypatch):
    from mam2_fast.kernels import selfcheck

    monkeypatch.setattr(selfcheck, "check_fused_kernels",
                        lambda device, dtype: {"factorized_attention[spatial]": "relative error 1e+00 > 3e-02"})
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr("mam2_fast.train.accel.capability", lambda d: (8, 0))
    monkeypatch.setattr("mam2_fast.kernels.autotune.choose_ops", lambda *a, **k: {})
    kernels.clear_fallbacks()
    try:
        lines = []
        shapes = RunShapes.of_model(_model(preset="small"), 8, "tube", 0.75)
        assert selfcheck.resolve_backend("auto", torch.device("cuda"), torch.bfloat16, lines.append, shapes) == "fused"
        assert set(kernels.fallbacks()) == {"factorized_attention"}
        assert sum("WARNING" in s for s in lines) == 1 and "factorized_attention" in lines[-1]
    finally:
        kernels.clear_fallbacks()


def test_fused_kernels_need_ampere_and_bf16_must_be_native(monkeypatch):
    """V100 / T4 (sm_70 / sm_75): ``auto`` runs the reference with one line; ``fused`` is an error;
    ``precision: auto`` does not pick bf16 there (torch counts its emulation as support)."""
    from mam2_fast.kernels import selfcheck
    from mam2_fast.train import accel

    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(accel, "device_name", lambda d: "Tesla V100")
    monkeypatch.setattr(selfcheck, "check_fused_kernels", lambda d, t: pytest.fail("must not run on sm_70"))
    cuda = torch.device("cuda")
    for cap, native in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(accel, "capability", lambda d, cap=cap: cap)
        assert accel.bf16_supported(cuda) is native, cap
    monkeypatch.setattr(accel, "capability", lambda d: (7, 0))
    lines = []
    assert selfcheck.resolve_backend("auto", cuda, torch.float16, lines.append) == "reference"
    assert len(lines) == 1 and "Tesla V100" in lines[0] and "7.0" in lines[0]
    with pytest.raises(RuntimeError, match="compute capability 8.0"):
        selfcheck.resolve_backend("fused", cuda, torch.float16, lines.append)
