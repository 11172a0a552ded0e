"""The VideoMAE baseline at the ``tiny`` preset (issue 18): same widths as MAM^2's tiny encoder,
accepted by pre-training and fine-tuning config validation, trainable (forward + backward)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mam2_fast.models.mam2 import PRESETS
from mam2_fast.models.videomae import VIDEOMAE_PRESETS, VideoMAE, videomae_config

CONFIGS = Path(__file__).parent.parent / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")      # tests/conftest.py


def test_every_mam2_preset_has_a_videomae_preset():
    assert set(PRESETS) <= set(VIDEOMAE_PRESETS)
    for name, p in PRESETS.items():
        v = VIDEOMAE_PRESETS[name]
        assert (v["embed_dim"], v["depth"], v["num_heads"]) == (p.embed_dim, p.depth, p.num_heads), name
        assert v["decoder_dim"] % v["decoder_heads"] == 0, name


def test_tiny_forward_backward():
    cfg = videomae_config("tiny", img_size=32, num_frames=4, mask_ratio=0.5, decoder_depth=1)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (192, 4, 3)
    torch.manual_seed(0)
    model = VideoMAE(cfg)
    info = model.mask_generator()(2, torch.Generator().manual_seed(0))
    clip = torch.randn(2, cfg.num_frames, 3, cfg.img_size, cfg.img_size)
    out = model(clip, info)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_pretrain_config_accepts_videomae_tiny():
    from mam2_fast.config import ConfigError, load_config
    from mam2_fast.pretrain import build_baseline

    over = ["model.arch=videomae", "model.preset=tiny", "mask.kind=tube", "mask.ratio=0.5",
            "model.img_size=32", "model.num_frames=4", "model.tubelet_size=2",
            "data.num_frames=4", "data.input_size=32",
            # the demo config narrows the encoder; tiny's own widths here
            "model.embed_dim=null", "model.depth=null", "model.num_heads=null"]
    cfg = load_config(CONFIGS / "demo.yaml", over)
    assert cfg.model.arch == "videomae" and cfg.model.preset == "tiny"
    model = build_baseline(cfg)
    assert (model.cfg.embed_dim, model.cfg.depth, model.cfg.num_heads) == (192, 4, 3)
    with pytest.raises(ConfigError, match="model.preset"):
        load_config(CONFIGS / "demo.yaml", [o if o != "model.preset=tiny" else "model.preset=huge" for o in over])

    # its encoder fine-tunes: the pre-training config resolves to tiny widths and the
    # classifier takes the encoder tensors key for key
    from mam2_fast.ft.config import load_finetune_config
    from mam2_fast.ft.weights import arch_from_pretrain_config
    from mam2_fast.models.classifier import build_classifier

    arch = arch_from_pretrain_config(cfg.to_dict())
    assert (arch["embed_dim"], arch["depth"], arch["num_heads"], arch["arch"]) == (192, 4, 3, "videomae")
    ft = load_finetune_config(CONFIGS / "finetune_demo.yaml",
                              ["model.arch=videomae", "model.preset=tiny", "model.img_size=32", "model.num_frames=4",
                               "model.embed_dim=null", "model.depth=null", "model.num_heads=null",
                               "data.num_frames=4", "data.input_size=32"])
    clf = build_classifier(ft.model)
    enc = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    missing, unexpected = clf.load_state_dict(enc, strict=False)
    assert not unexpected and all(k.startswith(("fc_norm.", "head.")) for k in missing)
    logits = clf(torch.randn(1, 4, 3, 32, 32))
    assert logits.shape == (1, ft.model.num_classes)
    logits.sum().backward()
