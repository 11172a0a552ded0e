"""Every ablation switch of the model under half-precision autocast, as a GPU run trains it.

CPU autocast casts like CUDA's for what matters here: linears and convolutions give bf16,
LayerNorm fp32, and ``scatter`` / ``index_copy`` do not promote, so a mixed-dtype scatter that
only a GPU run (bf16 by default) would hit fails here too. The stand-in ``meta`` device of
``test_dry_run_meta.py`` cannot show it: meta kernels skip the dtype check. Two such crashes were
found this way (2026-12-07): the packed regressor of random / frame masks with fused kernels
and the w/o-regressor ablation (Table 2) with tube masks both scattered bf16 latents and fp32
mask queries.

``kernels: auto`` on the CPU takes the fused model's code path (packed token sets, compact
gathers) with every op through its reference, so both paths run without the interpreter. On a
GPU the same test runs CUDA autocast, and ``auto`` runs the fused Triton kernels.
"""
import pytest
import torch

from mam2_fast.config import ModelConfig
from mam2_fast.masking import MaskGenerator
from mam2_fast.models.mam2 import build_model

SWITCHES = {
    "mam2": {}, "mam2_c": {"coupled_decoder": True}, "norm_motion": {"motion_space": "normalized"},
    "no_motion": {"use_motion": False}, "no_appearance": {"use_appearance": False},
    "no_regressor": {"use_regressor": False}, "no_alignment": {"use_alignment": False},
    "pixels": {"appearance_target": "pixels"}, "flow": {"motion_target": "flow"},
    "clip_order": {"motion_target": "clip_order"}, "no_regressor_pixels": {"use_regressor": False,
                                                                          "appearance_target": "pixels"},
}
KINDS = ("tube", "random", "frame", "cube")


def _cases():
    for kind in KINDS:
        for name, over in SWITCHES.items():
            if over.get("motion_target") == "clip_order" and kind not in ("tube", "cube"):
                continue                                   # clip order needs tube-like masks
            yield pytest.param(kind, over, id=f"{kind}-{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("kind,over", list(_cases()))
def test_every_switch_trains_under_half_autocast(kind, over, backend, dtype):
    """bf16: sm_80+ GPUs; fp16: ``precision: auto`` on older GPUs (V100 / T4)."""
    cfg = ModelConfig(preset="tiny", img_size=32, num_frames=4, embed_dim=32, depth=1, num_heads=2,
                      decoder_dim=16, decoder_heads=2, regressor_depth=1, appearance_depth=1,
                      motion_depth=1, **over)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(cfg, vocab_size=13).to(dev)
    model.set_kernel_backend(backend)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    B, T, N, P = 2, 4, 4, 16
    info = MaskGenerator(kind, 0.5, T, (2, 2))(B, g).to(dev)
    clip = torch.rand(B, T, 3, 32, 32, generator=g).to(dev)
    codes = torch.randint(0, 13, (B, T, N), generator=g).to(dev)
    flow = torch.randn(B, T, N, P * P * 2, generator=g).to(dev) if over.get("motion_target") == "flow" else None
    with torch.autocast(dev, dtype=dtype):
        out = model(clip, info, codes, motion_target=flow)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]), out["loss"]
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
    assert all(gr is None or torch.isfinite(gr).all() for gr in grads)
    # the encoder trains (the losses reach it) in every switch
    assert model.patch_embed.weight.grad is not None and model.patch_embed.weight.grad.abs().sum() > 0
