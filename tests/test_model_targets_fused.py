"""Model-level parity for the target switches: one training step with kernels=fused equals
kernels=reference for the flow / clip-order motion targets, the pixel appearance target and
activation checkpointing (tube masks: the gathers of the targets go through
``kernels.gather_tokens``), and packed random masks for the pixel / flow / coupled heads. On CPU the Triton kernels run under TRITON_INTERPRET=1."""
import pytest
import torch

from mam2_fast.kernels import _testing  # noqa: F401  (sets TRITON_INTERPRET=1 without CUDA)

triton = pytest.importorskip("triton")

from mam2_fast.config import ModelConfig  # noqa: E402
from mam2_fast.masking import MaskGenerator  # noqa: E402
from mam2_fast.models.mam2 import build_model  # noqa: E402


@pytest.mark.parametrize("kind,over", [
    ("tube", {"motion_target": "flow", "appearance_target": "pixels"}),
    ("tube", {"motion_target": "clip_order", "grad_checkpointing": True}),
    ("random", {"motion_target": "flow", "appearance_target": "pixels"}),
    ("random", {"coupled_decoder": True}),
], ids=["flow_pixels", "clip_order_ckpt", "flow_pixels_random", "coupled_random"])
def test_fused_step_matches_reference_with_targets(kind, over):
    """Random masks: the fused path packs the encoder and the decoders (varlen attention on
    the masked tokens), the reference runs both on the grid with validity masks."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ModelConfig(preset="tiny", img_size=48, num_frames=3, embed_dim=64, depth=1, num_heads=2,
                      regressor_depth=1, appearance_depth=1, motion_depth=1, **over)
    model = build_model(cfg, vocab_size=24).to(device)
    with torch.no_grad():  # open the zero-initialized temporal branches (as after a first step)
        for name, p in model.named_parameters():
            if "temporal_fc.weight" in name:
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(2, 3, 3, 48, 48, generator=g).to(device)
    codes = torch.randint(0, 24, (2, 3, 9), generator=g).to(device)
    flow = torch.randn(2, 3, 9, 16 * 16 * 2, generator=g).to(device)
    info = MaskGenerator(kind, 0.6, 3, (3, 3))(2, g).to(device)

    results = {}
    for backend in ("reference", "fused"):
        model.set_kernel_backend(backend)
        model.zero_grad(set_to_none=True)
        out = model(clip, info, codes, motion_target=flow, generator=torch.Generator().manual_seed(seed))
        out["loss"].backward()
        results[backend] = (out, {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                  if p.grad is not None})
    (ro, rg), (fo, fg) = results["reference"], results["fused"]
    for k in ("loss", "loss_app", "loss_motion", "loss_align"):
        assert torch.allclose(fo[k], ro[k], rtol=1e-4, atol=1e-6), f"seed {seed} {k}: {fo[k]} vs {ro[k]}"
    assert rg.keys() == fg.keys()
    for n in rg:
        err = (fg[n] - rg[n]).norm() / rg[n].norm().clamp(min=1e-6)
        assert err < 1e-3 or (fg[n] - rg[n]).abs().max() < 1e-7, f"seed {seed} grad {n}: rel err {err:.2e}"
