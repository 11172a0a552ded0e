"""model.arch videomae through fine-tuning / probe / export, official VideoMAE checkpoints,
HuggingFace folders both ways (numerically, with the installed transformers when present)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from mam2_fast.config import Config, MaskConfig, ModelConfig
from mam2_fast.export import export_encoder, load_encoder
from mam2_fast.ft.config import ClassifierConfig, finetune_config_from_dict
from mam2_fast.ft.weights import WeightsError, encoder_config_from_arch, load_encoder_into, read_encoder_weights
from mam2_fast.models.videomae import VideoMAE, videomae_config
from mam2_fast.models.videomae_classifier import VideoMAEClassifier, VideoMAEEncoder
from mam2_fast.train.checkpoint import save_checkpoint

ARCH = dict(preset="small", img_size=32, num_frames=4, patch_size=16, embed_dim=32, depth=2, num_heads=2)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def videomae_pretrain(seed: int = 0) -> VideoMAE:
    torch.manual_seed(seed)
    m = VideoMAE(videomae_config("small", img_size=32, num_frames=4, patch_size=16, embed_dim=32, depth=2,
                                 num_heads=2, decoder_dim=16, decoder_heads=2, decoder_depth=1))
    _randomize(m, seed)
    return m.eval()


def reference_tokens(m: VideoMAE, clip: torch.Tensor) -> torch.Tensor:
    """The pre-training encoder on all tokens (no mask), as the official forward does it."""
    x = m.encoder.patch_embed(clip.transpose(1, 2)) + m.encoder.pos_embed
    for blk in m.encoder.blocks:
        x = blk(x)
    return m.encoder.norm(x)


def tool_checkpoint(tmp_path, m: VideoMAE):
    mcfg = ModelConfig(arch="videomae", **ARCH, decoder_dim=16, decoder_heads=2)
    cfg = Config(model=mcfg, mask=MaskConfig(kind="tube", ratio=0.75))
    return save_checkpoint(tmp_path / "run", 5, {"model": m.state_dict(), "config": cfg.to_dict(), "step": 5,
                                                   "tokenizer": None})


def clip(seed=1):
    return torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def encoder_from(w) -> VideoMAEEncoder:
    # what weights cannot tell (official checkpoints: heads, frames, size) comes from the model config
    enc = VideoMAEEncoder(encoder_config_from_arch({**w.arch, "img_size": 32, "num_frames": 4, "num_heads": 2})).eval()
    load_encoder_into(enc, w)
    return enc


# ----------------------------------------------------------------------------------------
# this project's VideoMAE baseline -> fine-tune / probe / export
# ----------------------------------------------------------------------------------------
def test_tool_videomae_checkpoint_to_classifier_probe_and_export(tmp_path):
    m = videomae_pretrain()
    path = tool_checkpoint(tmp_path, m)
    w = read_encoder_weights(tmp_path / "run")
    assert w.arch["arch"] == "videomae" and w.arch["tubelet_size"] == 2 and w.arch["embed_dim"] == 32
    assert "mask_token" in w.dropped and any(k.startswith("decoder.") for k in w.dropped)
    x = clip()
    ref = reference_tokens(m, x)
    with torch.no_grad():
        assert torch.allclose(encoder_from(w).tokens(x), ref, atol=1e-5)

    from mam2_fast.finetune import build_finetune_model
    cfg = finetune_config_from_dict({"init": str(path), "model": {**ARCH, "arch": "videomae", "num_classes": 3},
                                     "data": {"demo": True, "num_frames": 4, "input_size": 32}})
    model, rep = build_finetune_model(cfg, log=lambda s: None)
    assert isinstance(model, VideoMAEClassifier) and rep["loaded"] == len(w.state)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.tokens(x), ref, atol=1e-5)
        assert model(x).shape == (2, 3)
    # arch mismatch is named
    bad = finetune_config_from_dict({"init": str(path), "model": {**ARCH, "num_classes": 3},
                                     "data": {"demo": True, "num_frames": 4, "input_size": 32}})
    with pytest.raises(WeightsError, match="model.arch=videomae"):
        build_finetune_model(bad, log=lambda s: None)

    from mam2_fast.probe import load_frozen_encoder, pool_tokens
    enc, arch = load_frozen_encoder(str(path), log=lambda s: None)
    with torch.no_grad():
        f = enc.forward_features(x)
    assert f.shape == (2, 2, 4, 32)                                        # [B, T/2, N, D]
    assert torch.allclose(pool_tokens(f, "mean"), ref.mean(1), atol=1e-5)

    out = export_encoder(path, tmp_path / "exp")
    conf = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert conf["arch"]["arch"] == "videomae" and conf["input"]["mean"] == [0.485, 0.456, 0.406]
    loaded, conf2 = load_encoder(tmp_path / "exp")
    assert conf2 == conf and out.name == "model.safetensors"
    with torch.no_grad():
        assert torch.allclose(loaded.tokens(x), ref, atol=1e-5)
    assert read_encoder_weights(tmp_path / "exp").kind == "export"      # folder is a valid init


def test_evaluate_loads_a_videomae_finetune_checkpoint(tmp_path):
    from mam2_fast.evaluate import load_finetuned
    cfg = finetune_config_from_dict({"model": {**ARCH, "arch": "videomae", "num_classes": 3},
                                     "data": {"demo": True, "num_frames": 4, "input_size": 32}})
    model = VideoMAEClassifier(cfg.model)
    save_checkpoint(tmp_path / "ft", 3, {"kind": "finetune", "model": model.state_dict(), "config": cfg.to_dict(),
                                         "step": 3})
    m2, cfg2, _ = load_finetuned(tmp_path / "ft", torch.device("cpu"))
    assert isinstance(m2, VideoMAEClassifier) and cfg2.model.arch == "videomae"
    # and the fine-tuned classifier is a valid init (head set aside)
    w = read_encoder_weights(tmp_path / "ft")
    assert w.kind == "finetune" and {"fc_norm.weight", "head.weight"} <= set(w.dropped)


# ----------------------------------------------------------------------------------------
# official VideoMAE checkpoint.pth
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["model", "module"])
def test_official_pretrain_checkpoint(tmp_path, key):
    m = videomae_pretrain(3)
    p = tmp_path / "checkpoint.pth"
    torch.save({key: m.state_dict(), "epoch": 799, "args": argparse.Namespace(model="pretrain_videomae_small")}, p)
    w = read_encoder_weights(p)
    assert w.kind == "videomae-pretrain" and w.arch["arch"] == "videomae" and w.arch["depth"] == 2
    x = clip()
    with torch.no_grad():
        assert torch.allclose(encoder_from(w).tokens(x), reference_tokens(m, x), atol=1e-5)


def test_official_finetune_checkpoint_without_final_norm(tmp_path):
    m = videomae_pretrain(4)
    sd = {k[len("encoder."):]: v for k, v in m.state_dict().items() if k.startswith("encoder.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}    # use_mean_pooling: no final norm
    sd.update({"fc_norm.weight": torch.ones(32), "fc_norm.bias": torch.zeros(32),
               "head.weight": torch.zeros(7, 32), "head.bias": torch.zeros(7)})
    p = tmp_path / "ft.pth"
    torch.save({"module": sd}, p)
    w = read_encoder_weights(p)
    assert w.kind == "videomae-finetune" and w.arch["final_norm"] is False
    assert {"head.weight", "fc_norm.weight"} <= set(w.dropped)
    cfg = ClassifierConfig(**ARCH, arch="videomae", final_norm=False, num_classes=7)
    model = VideoMAEClassifier(cfg)
    load_encoder_into(model, w)
    from mam2_fast.ft.weights import check_arch
    with pytest.raises(WeightsError, match="final_norm"):
        check_arch(w, ClassifierConfig(**ARCH, arch="videomae", num_classes=7))


def test_unknown_key_in_official_checkpoint_is_named(tmp_path):
    m = videomae_pretrain()
    p = tmp_path / "odd.pth"
    torch.save({"model": {**m.state_dict(), "extra.weight": torch.zeros(1)}}, p)
    with pytest.raises(WeightsError, match=r"odd\.pth.*'extra\.weight'"):
        read_encoder_weights(p)


# ----------------------------------------------------------------------------------------
# HuggingFace transformers, both ways
# ----------------------------------------------------------------------------------------
def _transformers():
    return pytest.importorskip("transformers")


def test_export_hf_videomae_loads_in_transformers(tmp_path):
    tr = _transformers()
    m = videomae_pretrain(5)
    path = tool_checkpoint(tmp_path, m)
    folder = export_encoder(path, tmp_path / "hf", fmt="hf-videomae")          # verifies internally too
    hf = tr.VideoMAEModel.from_pretrained(str(folder)).eval()
    x = clip(2)
    with torch.no_grad():
        out = hf(pixel_values=x).last_hidden_state
    ref = reference_tokens(m, x)
    assert float(m.encoder.blocks[0].attn.q_bias.detach().abs().max()) > 0.01       # biases matter in this check
    assert torch.allclose(out, ref, atol=1e-4), float((out - ref).abs().max())
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == [0.485, 0.456, 0.406] and pre["crop_size"]["height"] == 32
    # and the folder reads back as an init
    w = read_encoder_weights(folder)
    assert w.arch["num_frames"] == 4 and w.arch["img_size"] == 32
    with torch.no_grad():
        assert torch.allclose(encoder_from(w).tokens(x), ref, atol=1e-5)


def test_both_hf_bias_spellings_are_right_or_refused(tmp_path):
    """A transformers release that ignores a bias spelling loads zeros silently: the
    numerical check of export must catch it; the spelling chosen for the installed one works."""
    _transformers()
    from mam2_fast.export import verify_hf_folder
    from mam2_fast.interop.videomae import hf_bias_style, write_hf_folder
    m = videomae_pretrain(6)
    w = read_encoder_weights(tool_checkpoint(tmp_path, m))
    arch = {k: v for k, v in w.arch.items()}
    chosen = hf_bias_style()
    for style in ("old", "new"):
        folder = write_hf_folder(tmp_path / style, w.state, arch, bias_style=style)
        if style == chosen:
            assert verify_hf_folder(folder, w.state, arch) < 1e-4
        else:
            try:
                err = verify_hf_folder(folder, w.state, arch)
            except WeightsError:
                continue                                   # refused, not silently wrong
            assert err < 1e-4


@pytest.mark.parametrize("mean_pooling", [False, True])
def test_hf_folder_as_init(tmp_path, mean_pooling):
    tr = _transformers()
    torch.manual_seed(0)
    c = tr.VideoMAEConfig(image_size=32, patch_size=16, num_channels=3, num_frames=4, tubelet_size=2,
                          hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                          use_mean_pooling=mean_pooling, layer_norm_eps=1e-6, num_labels=5)
    model = (tr.VideoMAEForVideoClassification if mean_pooling else tr.VideoMAEModel)(c).eval()
    _randomize(model, 7)
    model.save_pretrained(str(tmp_path / "hf"))
    w = read_encoder_weights(tmp_path / "hf")
    assert w.arch["final_norm"] is (not mean_pooling) and w.arch["num_heads"] == 2
    enc = VideoMAEEncoder(encoder_config_from_arch(w.arch)).eval()
    load_encoder_into(enc, w)
    x = clip(3)
    with torch.no_grad():
        base = model.videomae if mean_pooling else model
        ref = base(pixel_values=x).last_hidden_state
        assert torch.allclose(enc.tokens(x), ref, atol=1e-4), float((enc.tokens(x) - ref).abs().max())
    if mean_pooling:
        assert any(k.startswith("classifier.") for k in w.dropped)


def test_hf_export_refuses_mam2(tmp_path):
    from mam2_fast.models.mam2 import build_model
    mcfg = ModelConfig(preset="tiny", img_size=32, num_frames=2, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                       regressor_depth=1, appearance_depth=1, motion_depth=1)
    model = build_model(mcfg, vocab_size=16)
    path = save_checkpoint(tmp_path / "run", 1, {"model": model.state_dict(), "config": Config(model=mcfg).to_dict(),
                                                   "step": 1, "tokenizer": None})
    with pytest.raises(WeightsError, match="hf-videomae needs a model.arch videomae"):
        export_encoder(path, tmp_path / "hf", fmt="hf-videomae")
    # the mam2 export: tensors + config.json with the preprocessing, and the loader
    out = export_encoder(path)
    conf = json.loads((out.parent / "config.json").read_text())
    assert out == tmp_path / "run" / "encoder" / "model.safetensors"
    assert conf["arch"]["arch"] == "mam2" and conf["input"]["num_frames"] == 2
    assert conf["input"]["sampling_stride"] == Config().data.sampling_stride and conf["loader"]
    enc, _ = load_encoder(out.parent)
    x = torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc.forward_features(x), model.eval().forward_features(x), atol=1e-5)
    out2 = export_encoder(path, tmp_path / "enc.safetensors")
    assert (tmp_path / "enc.json").is_file() and load_encoder(tmp_path / "enc.json")[1]["arch"]["depth"] == 1
    assert out2.name == "enc.safetensors"


def test_official_recipe_final_norm_false_sets_the_pretrained_norm_aside(tmp_path):
    from mam2_fast.finetune import build_finetune_model
    m = videomae_pretrain(8)
    p = tmp_path / "checkpoint.pth"
    torch.save({"model": m.state_dict()}, p)
    cfg = finetune_config_from_dict({"init": str(p), "model": {**ARCH, "arch": "videomae", "final_norm": False,
                                                               "num_classes": 3},
                                     "data": {"demo": True, "num_frames": 4, "input_size": 32}})
    model, rep = build_finetune_model(cfg, log=lambda s: None)
    assert {"norm.weight", "norm.bias"} <= set(rep["dropped"]) and not hasattr(model.norm, "weight")
    x = clip()
    with torch.no_grad():
        x_ref = m.encoder.patch_embed(x.transpose(1, 2)) + m.encoder.pos_embed
        for blk in m.encoder.blocks:
            x_ref = blk(x_ref)
        assert torch.allclose(model.eval().tokens(x), x_ref, atol=1e-5)


def test_hf_pretraining_folder_and_official_to_hf_cli(tmp_path):
    tr = _transformers()
    c = tr.VideoMAEConfig(image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=32,
                          num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, use_mean_pooling=False,
                          decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                          decoder_intermediate_size=32, layer_norm_eps=1e-6)
    pre = tr.VideoMAEForPreTraining(c).eval()
    _randomize(pre, 9)
    pre.save_pretrained(str(tmp_path / "hfpre"))
    w = read_encoder_weights(tmp_path / "hfpre")
    assert w.kind == "hf-pretrain" and "mask_token" in w.dropped and any(k.startswith("decoder.") for k in w.dropped)
    x = clip(4)
    with torch.no_grad():
        ref = pre.videomae(pixel_values=x).last_hidden_state
        assert torch.allclose(encoder_from(w).tokens(x), ref, atol=1e-4)

    # official checkpoint.pth -> HuggingFace folder through the CLI (ViT-S width: 6 heads)
    from mam2_fast.export import main as export_main
    m = VideoMAE(videomae_config("small", depth=1, decoder_depth=1))      # official sizes: 16 x 224 (what is inferred)
    _randomize(m, 10)
    torch.save({"model": m.state_dict()}, tmp_path / "checkpoint.pth")
    assert export_main([str(tmp_path / "checkpoint.pth"), "--format", "hf-videomae", "-o", str(tmp_path / "hfs")]) == 0
    hf = tr.VideoMAEModel.from_pretrained(str(tmp_path / "hfs")).eval()
    assert hf.config.num_attention_heads == 6 and hf.config.hidden_size == 384
    clip224 = torch.randn(1, 16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=clip224).last_hidden_state, reference_tokens(m.eval(), clip224),
                              atol=1e-4)


def test_export_arch_override_for_official_checkpoints(tmp_path):
    """Weights do not tell heads / frames / size: the CLI flags set them."""
    from mam2_fast.export import main as export_main
    m = videomae_pretrain(11)                                  # width 32, 2 heads (not an official width)
    torch.save({"model": m.state_dict()}, tmp_path / "checkpoint.pth")
    assert export_main([str(tmp_path / "checkpoint.pth"), "-o", str(tmp_path / "e"), "--num-heads", "2",
                        "--num-frames", "4", "--img-size", "32"]) == 0
    enc, conf = load_encoder(tmp_path / "e")
    assert conf["arch"]["num_heads"] == 2 and conf["input"]["num_frames"] == 4
    x = clip()
    with torch.no_grad():
        assert torch.allclose(enc.tokens(x), reference_tokens(m, x), atol=1e-5)
