"""torch.compile sees the fused kernels as custom ops: the MAM^2 forward + losses with
``kernels=fused`` is one graph with no graph breaks, for tube masks (compact kernels) and
random masks (packed path: varlen attention, packed RGB-difference loss), and the graph
calls the ``mam2_fast::`` ops rather than tracing into Triton.

On CPU the kernels run under TRITON_INTERPRET=1 (set by the kernel test helper first)."""
from mam2_fast.kernels import _testing as kt  # noqa: F401  (sets TRITON_INTERPRET=1 without CUDA)

import pytest
import torch

pytest.importorskip("triton")

from mam2_fast.config import ModelConfig  # noqa: E402
from mam2_fast.kernels import attention as ATT  # noqa: E402
from mam2_fast.masking import MaskGenerator  # noqa: E402
from mam2_fast.models.mam2 import build_model  # noqa: E402

if not kt.fused_kernels_interpretable(ATT):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)


@pytest.mark.parametrize("kind,call_fallback", [("tube", None), ("random", None), ("tube", "reference"),
                                                ("tube", "sdpa:math")],
                         ids=["tube", "random", "tube-call-to-reference", "tube-call-to-sdpa"])
def test_fused_model_compiles_without_graph_breaks(kind, call_fallback):
    """``call_fallback``: the encoder's spatial attention sent to its reference or to torch's
    SDPA by the per-call choice of ``kernels: auto``; the call-key lookup traces too."""
    import torch._dynamo as dynamo
    from mam2_fast import kernels
    cfg = ModelConfig(preset="tiny", img_size=32, num_frames=4, embed_dim=32, depth=1, num_heads=2,
                      regressor_depth=1, appearance_depth=1, motion_depth=1, kernels="fused")
    model = build_model(cfg, vocab_size=8)
    model.set_kernel_backend("fused")
    dev = kt.DEVICE
    model = model.to(dev)
    info = MaskGenerator(kind, 0.75, 4, (2, 2))(2, torch.Generator().manual_seed(0)).to(dev)
    clip, codes = torch.randn(2, 4, 3, 32, 32, device=dev), torch.randint(0, 8, (2, 4, 4), device=dev)
    dynamo.reset()
    kernels.clear_fallbacks()
    sent_back = kernels.call_key("factorized_attention", "spatial",   # the tube encoder's [B, T, Nv, 3, H, dh]
                                 torch.empty(2, 4, 1, 3, 2, 16, device=dev, requires_grad=True))
    if call_fallback:
        kernels.fall_back_call(sent_back, "slower", impl=call_fallback)
    try:
        with kernels.recording_calls() as seen:
            model(clip, info, codes)
        assert (sent_back in seen) == (kind == "tube")   # the key names a call the tube model makes
        dynamo.reset()
        explanation = dynamo.explain(model)(clip, info, codes)
    finally:
        kernels.clear_fallbacks()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    code = "\n".join(g.code for g in explanation.graphs)
    assert "mam2_fast" in code, "the fused custom ops are not in the graph"
    if kind == "tube":   # the reference attention (softmax) appears only where a call was sent back
        assert ("softmax" in code) == (call_fallback == "reference") and "factorized_attention" in code
        assert ("_sdpa_kernel" in code) == (call_fallback == "sdpa:math")     # the forced backend, traced
    if kind == "random":
        assert "varlen" in code and "rgb_diff_mse_packed" in code
    else:
        assert "rgb_diff_mse_tube" in code
