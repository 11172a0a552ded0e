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


@pytest.mark.parametrize("kind", ["tube", "random"])
def test_fused_model_compiles_without_graph_breaks(kind):
    import torch._dynamo as dynamo
    cfg = ModelConfig(preset="tiny", img_size=32, num_frames=4, embed_dim=32, depth=1, num_heads=2,
                      regressor_depth=1, appearance_depth=1, motion_depth=1, kernels="fused")
    model = build_model(cfg, vocab_size=8)
    model.set_kernel_backend("fused")
    dev = kt.DEVICE
    model = model.to(dev)
    info = MaskGenerator(kind, 0.75, 4, (2, 2))(2, torch.Generator().manual_seed(0)).to(dev)
    clip, codes = torch.randn(2, 4, 3, 32, 32, device=dev), torch.randint(0, 8, (2, 4, 4), device=dev)
    dynamo.reset()
    explanation = dynamo.explain(model)(clip, info, codes)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    code = "\n".join(g.code for g in explanation.graphs)
    assert "mam2_fast" in code, "the fused custom ops are not in the graph"
    if kind == "random":
        assert "varlen" in code and "rgb_diff_mse_packed" in code
    else:
        assert "rgb_diff_mse_tube" in code
