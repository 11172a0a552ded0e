"""Pretrained appearance tokenizers (VQGAN, DALL-E): checkpoint layout, loading, codes.

Checkpoints are written here with random weights in the released key layouts (taming
``.ckpt`` with pytorch_lightning-style extra objects, OpenAI's pickled ``encoder.pkl``)
using small architectures, so nothing is downloaded.
"""
from __future__ import annotations

import importlib
import os
import pickle
import sys
import types
import warnings
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mam2_fast.targets import build_tokenizer
from mam2_fast.targets.dalle import DalleTokenizer, load_dalle_state_dict
from mam2_fast.targets.pixel import PixelTarget
from mam2_fast.targets.token_cache import TokenCache, default_cache_dir
from mam2_fast.targets.tokenizer import Tokenizer
from mam2_fast.targets.vqgan import (GumbelQuantizerCodes, VQGANTokenizer, VectorQuantizerCodes,
                                     _lanczos_matrix, resize_frames, safe_torch_load)

SMALL_DD = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32,
                ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)


def small_spec(quantizer="vq", n_embed=64, embed_dim=32):
    return dict(quantizer=quantizer, n_embed=n_embed, embed_dim=embed_dim, ddconfig=dict(SMALL_DD))


def taming_yaml(path, spec):
    target = "taming.models.vqgan.GumbelVQ" if spec["quantizer"] == "gumbel" else "taming.models.vqgan.VQModel"
    doc = {"model": {"base_learning_rate": 4.5e-6, "target": target, "params": {
        "embed_dim": spec["embed_dim"], "n_embed": spec["n_embed"], "monitor": "val/rec_loss",
        "ddconfig": spec["ddconfig"],
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_start": 250001}}}}}
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return str(path)


def _randomize(module: nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or name.endswith(".b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() == 1:  # GroupNorm weight
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5))
    return module


class _FakeModelCheckpoint:
    """Stands for pytorch_lightning's ModelCheckpoint callback stored in taming .ckpt files."""

    def __init__(self):
        self.best_model_score = torch.tensor(0.5)
        self.dirpath = "/somewhere"


def _lightning_module():
    mod = types.ModuleType("fake_pl_for_tests_callbacks")
    _FakeModelCheckpoint.__module__ = mod.__name__
    mod._FakeModelCheckpoint = _FakeModelCheckpoint
    return mod


def write_taming_ckpt(path, spec, seed=0, drop=(), reshape=None, extra_objects=True):
    """A .ckpt in taming's layout: encoder/quant_conv/quantize plus decoder/loss keys (ignored)
    and, like real checkpoints, non-tensor pickled objects next to the state dict."""
    tok = _randomize(VQGANTokenizer(spec), seed)
    sd = OrderedDict((k, v.clone()) for k, v in tok.state_dict().items())
    sd["post_quant_conv.weight"] = torch.randn(spec["ddconfig"]["z_channels"], spec["embed_dim"], 1, 1)
    sd["decoder.conv_in.weight"] = torch.randn(8, 8, 3, 3)
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    for k in drop:
        del sd[k]
    if reshape:
        for k, shape in reshape.items():
            sd[k] = torch.randn(shape)
    obj = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8", "state_dict": sd,
           "optimizer_states": [], "lr_schedulers": []}
    if extra_objects:
        mod = _lightning_module()
        sys.modules[mod.__name__] = mod
        try:
            obj["callbacks"] = {_FakeModelCheckpoint: {"best_model_score": 0.5}, "cb": _FakeModelCheckpoint()}
            torch.save(obj, path)
        finally:
            del sys.modules[mod.__name__]
    else:
        torch.save(obj, path)
    return str(path), tok


def _ref_scores(tok: VQGANTokenizer, frames):
    """Straightforward reference in float64: encoder -> quant_conv -> one score per code,
    [B*T*h*w, K], lower is better (squared L2 distance for vq, minus the logit for gumbel)."""
    B, T, C, H, W = frames.shape
    x = frames.reshape(B * T, C, H, W).float()
    x = resize_frames(x, tok.input_size(H, W), tok.resize_mode) * 2 - 1
    with torch.no_grad():
        z = tok.quant_conv(tok.encoder(x))
    zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()      # [rows, Dz]
    if tok.spec["quantizer"] == "vq":
        return torch.cdist(zf, tok.quantize.embedding.weight.double()) ** 2
    return -(zf @ tok.quantize.proj.weight.double().flatten(1).t() + tok.quantize.proj.bias.double())


def _assert_nearest_codes(tok: VQGANTokenizer, frames, ids, rtol: float = 1e-5):
    """``ids`` [B, T, h, w] are the reference's best codes, except at a genuine fp32 near-tie
    (the chosen code's score within ``rtol`` of the best in float64), where either is right.
    An exact match against torch.cdist's own tie-break failed about 1 draw in 2,500 (one of
    288 positions, two codes 1.4e-7 apart); a wrong code, argmax for argmin or swapped frames
    are all far outside rtol."""
    B, T, C, H, W = frames.shape
    assert ids.shape == (B, T, *tok.grid_size(H, W)), f"ids shape {tuple(ids.shape)}"
    score = _ref_scores(tok, frames)                                   # [rows, K]
    chosen = score.gather(1, ids.reshape(-1, 1))[:, 0]
    top = score.min(dim=1).values
    slack = (chosen - top) / top.abs().clamp(min=1e-12)
    off = ids.reshape(-1) != score.argmin(dim=1)
    assert int(off.sum()) <= 2 and bool((slack <= rtol).all()), (
        f"{int(off.sum())} of {off.numel()} codes differ from the reference; "
        f"worst relative score gap {slack.max().item():.2e} (rtol {rtol:.0e})")


# ----------------------------------------------------------------------------------------
# the released f16 architecture
# ----------------------------------------------------------------------------------------
def _taming_layout(ch, ch_mult, nrb, attn_levels, z, embed_dim, n_embed, quantizer):
    """Independent enumeration of taming's Encoder/VQModel keys and shapes."""
    out = OrderedDict()

    def conv(name, cin, cout, k):
        out[name + ".weight"] = (cout, cin, k, k)
        out[name + ".bias"] = (cout,)

    def norm(name, c):
        out[name + ".weight"] = (c,)
        out[name + ".bias"] = (c,)

    def res(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cin, cout, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(name + ".norm", c)
        for m in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{m}", c, c, 1)

    conv("encoder.conv_in", 3, ch, 3)
    cin = ch
    for i, m in enumerate(ch_mult):
        for j in range(nrb):
            res(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i in attn_levels:
            for j in range(nrb):
                attn(f"encoder.down.{i}.attn.{j}", cin)
        if i != len(ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    res("encoder.mid.block_1", cin, cin)
    attn("encoder.mid.attn_1", cin)
    res("encoder.mid.block_2", cin, cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", cin, z, 3)
    conv("quant_conv", z, embed_dim, 1)
    if quantizer == "vq":
        out["quantize.embedding.weight"] = (n_embed, embed_dim)
    else:
        conv("quantize.proj", z, n_embed, 1)
        out["quantize.embed.weight"] = (n_embed, embed_dim)
    return out


@pytest.fixture(scope="module")
def f16_16384():
    return VQGANTokenizer("vqgan_imagenet_f16_16384", patch_size=16)


def test_f16_16384_matches_published_layout(f16_16384):
    tok = f16_16384
    want = _taming_layout(128, (1, 1, 2, 2, 4), 2, {4}, 256, 256, 16384, "vq")
    got = OrderedDict((k, tuple(v.shape)) for k, v in tok.state_dict().items())
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    assert got == want
    assert len(got) == 147
    # taming's Encoder(ch=128, ch_mult=(1,1,2,2,4), ...) has 29,298,176 parameters
    assert sum(p.numel() for p in tok.encoder.parameters()) == 29_298_176
    assert tok.vocab_size == 16384 and tok.stride == 16
    assert tok.grid_size(224, 224) == (14, 14) and tok.input_size(224, 224) == (224, 224)
    assert isinstance(tok, Tokenizer)
    assert not any(p.requires_grad for p in tok.parameters())


def test_f16_16384_runs(f16_16384):
    frames = torch.rand(1, 2, 3, 32, 32)
    ids = f16_16384.tokenize(frames)
    assert ids.shape == (1, 2, 2, 2) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 16384


def test_other_presets():
    t1024 = VQGANTokenizer("vqgan_imagenet_f16_1024", patch_size=16)
    assert t1024.vocab_size == 1024 and t1024.quantize.embedding.weight.shape == (1024, 256)
    g = VQGANTokenizer("vqgan_gumbel_openimages_f8_8192", patch_size=16)
    want = _taming_layout(128, (1, 1, 2, 4), 2, {3}, 256, 256, 8192, "gumbel")
    assert OrderedDict((k, tuple(v.shape)) for k, v in g.state_dict().items()) == want
    assert g.vocab_size == 8192 and g.stride == 8
    # f8 on a 224 frame with 16-px patches: resized to 112 for a 14x14 grid
    assert g.grid_size(224, 224) == (14, 14) and g.input_size(224, 224) == (112, 112)
    assert g.describe()["input_for_224"] == (112, 112)
    with pytest.raises(ValueError, match="unknown preset"):
        VQGANTokenizer.from_checkpoint(__file__, preset="nope")


# ----------------------------------------------------------------------------------------
# quantizers on hand-made inputs
# ----------------------------------------------------------------------------------------
def test_vector_quantizer_picks_nearest_code():
    q = VectorQuantizerCodes(4, 2)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    pts = torch.tensor([[0.1, -0.1], [0.9, 0.2], [-0.3, 0.8], [4.0, 6.0], [0.6, 0.1], [10.0, 10.0]])
    z = pts.t().reshape(1, 2, 2, 3)  # [N, D, h, w]; positions in row-major order
    ids = q(z)
    assert ids.shape == (1, 2, 3)
    assert ids.flatten().tolist() == [0, 1, 2, 3, 1, 3]


def test_gumbel_quantizer_argmax_no_noise():
    q = GumbelQuantizerCodes(num_hiddens=2, embed_dim=3, n_embed=3)
    with torch.no_grad():
        q.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]).reshape(3, 2, 1, 1))
        q.proj.bias.copy_(torch.tensor([0.0, 0.0, 0.7]))
    z = torch.tensor([[2.0, 1.0], [0.0, 3.0], [-1.0, -1.0], [0.1, 0.2]]).t().reshape(1, 2, 2, 2)
    a = q(z)
    assert a.flatten().tolist() == [0, 1, 2, 2]  # logits (2,1,-2.3) (0,3,-2.3) (-1,-1,2.7) (.1,.2,.4)
    torch.manual_seed(0)
    b = q(z)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------
def test_vqgan_ckpt_with_yaml_loads_and_tokenizes(tmp_path):
    spec = small_spec("vq")
    ckpt, src = write_taming_ckpt(tmp_path / "last.ckpt", spec)
    cfg = taming_yaml(tmp_path / "model.yaml", spec)
    with pytest.warns(UserWarning, match="restricted unpickler"):
        tok = VQGANTokenizer.from_checkpoint(ckpt, config=cfg, patch_size=2)
    for k, v in src.state_dict().items():
        assert torch.equal(tok.state_dict()[k], v), k
    frames = torch.rand(2, 3, 3, 16, 12)
    ids = tok.tokenize(frames)
    assert ids.shape == (2, 3, 8, 6) and ids.dtype == torch.long
    _assert_nearest_codes(tok, frames, ids)
    assert len(ids.unique()) > 1
    assert not ids.is_inference()  # usable as a cross-entropy target under autograd
    logits = torch.randn(ids.numel(), tok.vocab_size, requires_grad=True)
    F.cross_entropy(logits, ids.flatten()).backward()


@pytest.mark.parametrize("quantizer", ["vq", "gumbel"])
def test_nearest_code_check_can_fail(quantizer):
    """The near-tie allowance of _assert_nearest_codes admits no real bug: the second-best code
    everywhere, one position's code moved by one, or the codes of the frames in reverse order fail."""
    tok = _randomize(VQGANTokenizer(small_spec(quantizer), patch_size=2), seed=1).eval()
    frames = torch.rand(2, 3, 3, 16, 12)
    ids = tok.tokenize(frames)
    _assert_nearest_codes(tok, frames, ids)
    second = _ref_scores(tok, frames).topk(2, dim=1, largest=False).indices[:, 1].reshape(ids.shape)
    one_off = ids.clone()
    one_off.view(-1)[5] = (one_off.view(-1)[5] + 1) % tok.vocab_size
    frames_reversed = tok.tokenize(frames.flip(1))            # each frame's codes put on another frame
    for name, bad in (("second-best", second), ("one code off", one_off), ("frames reversed", frames_reversed)):
        with pytest.raises(AssertionError):
            _assert_nearest_codes(tok, frames, bad)
        assert not torch.equal(bad, ids), name


def test_vqgan_plain_state_dict_loads_weights_only(tmp_path):
    spec = small_spec("vq")
    ckpt, src = write_taming_ckpt(tmp_path / "plain.ckpt", spec, extra_objects=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback needed -> no warning
        tok = VQGANTokenizer.from_checkpoint(ckpt, config=taming_yaml(tmp_path / "m.yaml", spec), patch_size=2)
    assert tok.vocab_size == 64


def test_gumbel_ckpt_resized_grid_and_chunking(tmp_path):
    spec = small_spec("gumbel", n_embed=48, embed_dim=32)
    ckpt, _ = write_taming_ckpt(tmp_path / "gumbel.ckpt", spec, seed=1)
    cfg = taming_yaml(tmp_path / "gumbel.yaml", spec)
    with pytest.warns(UserWarning):
        tok = VQGANTokenizer.from_checkpoint(ckpt, config=cfg, patch_size=4)  # stride 2 < patch 4
    assert tok.spec["quantizer"] == "gumbel" and tok.vocab_size == 48
    frames = torch.rand(1, 4, 3, 16, 16)
    assert tok.grid_size(16, 16) == (4, 4) and tok.input_size(16, 16) == (8, 8)
    ids = tok.tokenize(frames)
    assert ids.shape == (1, 4, 4, 4)
    _assert_nearest_codes(tok, frames, ids)
    tok.chunk_frames = 1
    assert torch.equal(tok.tokenize(frames), ids)
    assert torch.equal(tok.tokenize(frames), ids)  # deterministic: no gumbel noise


def test_architecture_inferred_without_config(tmp_path):
    spec = small_spec("vq", n_embed=40, embed_dim=16)
    ckpt, src = write_taming_ckpt(tmp_path / "x.ckpt", spec)
    with pytest.warns(UserWarning):
        tok = VQGANTokenizer.from_checkpoint(ckpt, patch_size=2)
    assert tok.vocab_size == 40 and tok.stride == 2
    frames = torch.rand(1, 1, 3, 8, 8)
    _assert_nearest_codes(src, frames, tok.tokenize(frames))


def test_missing_key_error_names_key(tmp_path):
    spec = small_spec("vq")
    ckpt, _ = write_taming_ckpt(tmp_path / "bad.ckpt", spec, drop=["encoder.conv_in.weight", "quant_conv.bias"])
    with pytest.warns(UserWarning), pytest.raises(ValueError) as exc:
        VQGANTokenizer.from_checkpoint(ckpt, config=taming_yaml(tmp_path / "m.yaml", spec))
    msg = str(exc.value)
    assert "missing" in msg and "encoder.conv_in.weight" in msg and "quant_conv.bias" in msg and "bad.ckpt" in msg


def test_shape_mismatch_error_names_key(tmp_path):
    spec = small_spec("vq")
    ckpt, _ = write_taming_ckpt(tmp_path / "bad.ckpt", spec, reshape={"quantize.embedding.weight": (10, 32)})
    with pytest.warns(UserWarning), pytest.raises(ValueError) as exc:
        VQGANTokenizer.from_checkpoint(ckpt, config=taming_yaml(tmp_path / "m.yaml", spec))
    msg = str(exc.value)
    assert "shape" in msg and "quantize.embedding.weight" in msg and "(10, 32)" in msg


def test_wrong_preset_lists_mismatches(tmp_path):
    ckpt, _ = write_taming_ckpt(tmp_path / "small.ckpt", small_spec("vq"))
    with pytest.warns(UserWarning), pytest.raises(ValueError) as exc:
        VQGANTokenizer.from_checkpoint(ckpt, preset="vqgan_imagenet_f16_16384")
    msg = str(exc.value)
    assert "missing" in msg and "encoder.down.0.block.1.norm1.weight" in msg
    assert "unexpected" in msg and "shape" in msg and "encoder.conv_in.weight: checkpoint (32, 3, 3, 3)" in msg


def test_not_a_file_and_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        VQGANTokenizer.from_checkpoint(str(tmp_path / "nowhere.ckpt"), preset="vqgan_imagenet_f16_1024")
    with pytest.raises(FileNotFoundError):
        VQGANTokenizer.from_checkpoint(str(tmp_path), preset="vqgan_imagenet_f16_1024")  # a directory
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt"):
        VQGANTokenizer.from_checkpoint(str(junk), preset="vqgan_imagenet_f16_1024")
    notsd = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], notsd)
    with pytest.raises(ValueError, match="no state_dict"):
        VQGANTokenizer.from_checkpoint(str(notsd), preset="vqgan_imagenet_f16_1024")


def test_restricted_loader_never_runs_foreign_code(tmp_path):
    """A pickle whose REDUCE calls os.system must come back as an inert stand-in."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo SHOULD_NOT_RUN > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": Evil()}, path)
    with pytest.warns(UserWarning):
        obj = safe_torch_load(str(path))
    assert not (tmp_path / "pwned").exists()
    assert torch.equal(obj["state_dict"]["w"], torch.ones(2))
    assert "stand-in" in repr(obj["x"])


# ----------------------------------------------------------------------------------------
# DALL-E
# ----------------------------------------------------------------------------------------
def _fake_dall_e_modules():
    """Minimal modules named like the ``dall_e`` package, to write an encoder.pkl with the
    released pickle structure (whole module objects, params ``w``/``b``)."""
    pkg = types.ModuleType("dall_e")
    utils = types.ModuleType("dall_e.utils")
    enc = types.ModuleType("dall_e.encoder")

    class Conv2d(nn.Module):
        def __init__(self, n_in, n_out, kw, use_float16=True):
            super().__init__()
            self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, use_float16
            self.device, self.requires_grad = torch.device("cpu"), False
            self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw * kw) ** 0.5)
            self.b = nn.Parameter(torch.randn(n_out) * 0.1)

        def forward(self, x):
            return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

    class EncoderBlock(nn.Module):
        def __init__(self, n_in, n_out, n_layers):
            super().__init__()
            self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
            self.n_hid, self.post_gain = n_out // 4, 1 / n_layers ** 2
            self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
            self.res_path = nn.Sequential(OrderedDict([
                ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, self.n_hid, 3)),
                ("relu_2", nn.ReLU()), ("conv_2", Conv2d(self.n_hid, self.n_hid, 3)),
                ("relu_3", nn.ReLU()), ("conv_3", Conv2d(self.n_hid, self.n_hid, 3)),
                ("relu_4", nn.ReLU()), ("conv_4", Conv2d(self.n_hid, n_out, 1))]))

        def forward(self, x):
            return self.id_path(x) + self.post_gain * self.res_path(x)

    class Encoder(nn.Module):
        group_count = 4

        def __init__(self, n_hid=8, n_blk_per_group=1, vocab_size=32):
            super().__init__()
            self.n_hid, self.n_blk_per_group, self.vocab_size = n_hid, n_blk_per_group, vocab_size
            self.input_channels, self.use_mixed_precision = 3, True
            nl = 4 * n_blk_per_group
            groups = [("input", Conv2d(3, n_hid, 7))]
            widths = [n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
            prev = n_hid
            for g, wd in enumerate(widths, 1):
                items = [(f"block_{i + 1}", EncoderBlock(prev if i == 0 else wd, wd, nl)) for i in range(n_blk_per_group)]
                prev = wd
                if g < 4:
                    items.append(("pool", nn.MaxPool2d(kernel_size=2)))
                groups.append((f"group_{g}", nn.Sequential(OrderedDict(items))))
            groups.append(("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", Conv2d(8 * n_hid, vocab_size, 1, use_float16=False))]))))
            self.blocks = nn.Sequential(OrderedDict(groups))

        def forward(self, x):
            return self.blocks(x)

    for cls, mod in ((Conv2d, utils), (EncoderBlock, enc), (Encoder, enc)):
        cls.__module__ = mod.__name__
        cls.__qualname__ = cls.__name__
        setattr(mod, cls.__name__, cls)
    pkg.utils, pkg.encoder = utils, enc
    return {"dall_e": pkg, "dall_e.utils": utils, "dall_e.encoder": enc}


def write_dalle_pkl(path, legacy=False, **kw):
    mods = _fake_dall_e_modules()
    sys.modules.update(mods)
    try:
        torch.manual_seed(0)
        model = mods["dall_e.encoder"].Encoder(**kw)
        with warnings.catch_warnings():  # legacy format: "couldn't retrieve source code" notes
            warnings.simplefilter("ignore")
            torch.save(model, path, _use_new_zipfile_serialization=not legacy)
    finally:
        for name in mods:
            del sys.modules[name]
    return str(path), model


@pytest.mark.parametrize("legacy", [False, True])
def test_dalle_pickle_loads_without_dall_e_package(tmp_path, legacy):
    path, ref = write_dalle_pkl(tmp_path / "encoder.pkl", legacy=legacy, n_hid=8, n_blk_per_group=2, vocab_size=32)
    assert importlib.util.find_spec("dall_e") is None
    sd = load_dalle_state_dict(path)
    assert set(sd) == set(ref.state_dict())
    assert "blocks.group_2.block_1.id_path.w" in sd and "blocks.output.conv.w" in sd
    tok = DalleTokenizer.from_checkpoint(path, patch_size=16)
    assert tok.vocab_size == 32 and tok.stride == 8
    assert tok.grid_size(224, 224) == (14, 14) and tok.input_size(224, 224) == (112, 112)
    frames = torch.rand(1, 2, 3, 64, 48)
    ids = tok.tokenize(frames)
    assert ids.shape == (1, 2, 4, 3) and ids.dtype == torch.long
    x = resize_frames(frames.reshape(2, 3, 64, 48), (32, 24), "lanczos")
    with torch.no_grad():
        want = ref(0.8 * x + 0.1).argmax(dim=1)
    assert torch.equal(ids.reshape(2, 4, 3), want)


def test_dalle_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.pkl"):
        DalleTokenizer.from_checkpoint(str(tmp_path / "encoder.pkl"))
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match="blocks.input.w"):
        DalleTokenizer.from_checkpoint(str(other))
    path, ref = write_dalle_pkl(tmp_path / "e.pkl", n_hid=8, n_blk_per_group=1, vocab_size=32)
    sd = {k: v for k, v in ref.state_dict().items() if "group_3.block_1.res_path.conv_2" not in k}
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="group_3.block_1.res_path.conv_2.w"):
        DalleTokenizer.from_checkpoint(str(tmp_path / "partial.pt"))


# ----------------------------------------------------------------------------------------
# resize, build_tokenizer
# ----------------------------------------------------------------------------------------
def test_lanczos_resize():
    m = _lanczos_matrix(224, 112)
    assert torch.allclose(m.sum(dim=1), torch.ones(112), atol=1e-6)
    x = torch.full((1, 3, 224, 224), 0.3)
    assert torch.allclose(resize_frames(x, (112, 112)), x[..., :112, :112], atol=1e-6)
    y = torch.rand(2, 3, 20, 30)
    for mode in ("lanczos", "bilinear", "bicubic", "area", "nearest"):
        r = resize_frames(y, (10, 15), mode)
        assert r.shape == (2, 3, 10, 15) and float(r.min()) >= 0 and float(r.max()) <= 1
    with pytest.raises(ValueError, match="unknown mode"):
        resize_frames(y, (10, 15), "box")


def test_lanczos_matches_pil():
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    img = (np.random.RandomState(0).rand(40, 36, 3) * 255).astype(np.uint8)
    pil = np.asarray(Image.fromarray(img).resize((18, 20), Image.LANCZOS)).astype(np.float32) / 255
    ours = resize_frames(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, (20, 18), "lanczos")
    assert np.abs(ours[0].permute(1, 2, 0).numpy() - pil).max() < 2.5 / 255


def test_build_tokenizer_kinds(tmp_path):
    spec = small_spec("vq")
    ckpt, _ = write_taming_ckpt(tmp_path / "last.ckpt", spec)
    cfg = SimpleNamespace(kind="vqgan", vocab_size=64, kmeans_pool=4, checkpoint=ckpt,
                          checkpoint_config=taming_yaml(tmp_path / "m.yaml", spec), preset=None,
                          dtype="bfloat16", chunk_frames=2)
    with pytest.warns(UserWarning):
        tok = build_tokenizer(cfg, patch_size=4)
    assert isinstance(tok, VQGANTokenizer) and tok.chunk_frames == 2 and tok.grid_size(16, 16) == (4, 4)
    assert tok.tokenize(torch.rand(1, 3, 3, 16, 16)).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="tokenizer.checkpoint"):
        build_tokenizer(SimpleNamespace(kind="vqgan", checkpoint=None), 16)
    with pytest.raises(ValueError, match="tokenizer.checkpoint"):
        build_tokenizer(SimpleNamespace(kind="dalle", checkpoint=None), 16)
    dpath, _ = write_dalle_pkl(tmp_path / "encoder.pkl", n_hid=8, n_blk_per_group=1, vocab_size=32)
    d = build_tokenizer(SimpleNamespace(kind="dalle", checkpoint=dpath, vocab_size=32), 16)
    assert isinstance(d, DalleTokenizer) and d.grid_size(224, 224) == (14, 14)
    assert isinstance(build_tokenizer(SimpleNamespace(kind="pixel"), 16), PixelTarget)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_tokenizer(SimpleNamespace(kind="nope"), 16)


# ----------------------------------------------------------------------------------------
# token cache
# ----------------------------------------------------------------------------------------
class _CountingTokenizer(nn.Module):
    vocab_size = 100

    def __init__(self):
        super().__init__()
        self.calls = 0

    def grid_size(self, H, W):
        return H // 4, W // 4

    def tokenize(self, frames):
        self.calls += frames.shape[0]
        B, T, C, H, W = frames.shape
        return (frames.mean(dim=2)[:, :, ::4, ::4] * 99).long()


def test_token_cache_roundtrip(tmp_path):
    root = default_cache_dir(str(tmp_path), "kmeans-test")
    cache = TokenCache(root, "kmeans-test", vocab_size=100, grid=(2, 3), crop="center_8x12", writable=True)
    ids = torch.randint(0, 100, (2, 2, 3))
    assert cache.get("a/v1.mp4", [0, 5]) is None
    cache.put("a/v1.mp4", [0, 5], ids, num_frames=10)
    assert torch.equal(cache.get("a/v1.mp4", [0, 5]), ids)
    assert cache.get("a/v1.mp4", [0, 1]) is None  # frame 1 not computed
    assert cache.get("a/v1.mp4", [0, 10]) is None  # out of range
    cache.flush()
    ro = TokenCache(root, "kmeans-test", vocab_size=100, grid=(2, 3), crop="center_8x12")
    assert torch.equal(ro.get("a/v1.mp4", [5, 0]), ids.flip(0))
    with pytest.raises(PermissionError):
        ro.put("a/v1.mp4", [1], ids[:1], num_frames=10)
    with pytest.raises(ValueError, match="crop"):
        TokenCache(root, "kmeans-test", vocab_size=100, grid=(2, 3), crop="random_resized")
    with pytest.raises(FileNotFoundError):
        TokenCache(str(tmp_path / "none"), "x", vocab_size=100, grid=(2, 3), crop="c")


def test_token_cache_tokens_for(tmp_path):
    tok = _CountingTokenizer()
    cache = TokenCache(str(tmp_path / "c"), "count", vocab_size=100, grid=(2, 2), crop="c", writable=True)
    clip = torch.rand(2, 3, 3, 8, 8)
    frames = torch.tensor([[0, 2, 4], [1, 2, 3]])
    a = cache.tokens_for(tok, ["v0", "v1"], frames, clip, num_frames=[8, 8])
    assert tok.calls == 2 and torch.equal(a, tok.tokenize(clip))
    tok.calls = 0
    b = cache.tokens_for(tok, ["v0", "v1"], frames, clip, num_frames=[8, 8])
    assert tok.calls == 0 and torch.equal(a, b)


@pytest.mark.parametrize("quantizer", ["vq", "gumbel"])
def test_compiled_tokenizer_gives_the_nearest_codes(quantizer):
    """``tokenizer.compile``: the encoder and quantizer through torch.compile (Inductor on
    this CPU) give the reference's nearest codes (fp32 near-ties either way), for a chunked
    call whose last chunk is shorter (a second static shape); the eager path is untouched."""
    tok = _randomize(VQGANTokenizer(small_spec(quantizer), patch_size=2, dtype="float32",
                                    chunk_frames=4), seed=3).eval()
    frames = torch.rand(2, 3, 3, 16, 12)                 # 6 frames: chunks of 4 and 2
    from torch._dynamo.utils import counters

    eager = tok.tokenize(frames)
    tok.set_compiled(True)
    assert tok.describe()["compiled"] is True
    counters.clear()
    compiled = tok.tokenize(frames)
    assert counters["stats"]["unique_graphs"] >= 2        # compiled, once per chunk shape
    _assert_nearest_codes(tok, frames, compiled)
    assert (compiled == eager).float().mean() > 0.99
    tok.set_compiled(False)
    assert torch.equal(tok.tokenize(frames), eager)


def test_tokenizer_compile_is_a_config_switch(tmp_path):
    from types import SimpleNamespace

    from mam2_fast.targets.vqgan import build_vqgan_tokenizer

    ckpt = tmp_path / "last.ckpt"
    write_taming_ckpt(ckpt, small_spec(), extra_objects=False)
    cfg = SimpleNamespace(checkpoint=str(ckpt), checkpoint_config=None, preset=None, dtype="float32",
                          chunk_frames=0, resize_mode="lanczos", fused_norm=False, compile=True, vocab_size=None)
    assert build_vqgan_tokenizer(cfg, patch_size=2).compiled
    cfg.compile = False
    assert not build_vqgan_tokenizer(cfg, patch_size=2).compiled


def test_compiled_tokenizer_leaves_the_norm_to_inductor(monkeypatch):
    """tokenizer.fused_norm + tokenizer.compile: inside the compiled graph the plain GroupNorm
    + SiLU run (Inductor fuses them), never the Triton kernel; outside it, the fused path is
    still taken where it applies."""
    import mam2_fast.kernels.group_norm as gn
    from mam2_fast.targets import vqgan

    calls = []
    monkeypatch.setattr(gn, "group_norm_silu_fused", lambda *a, **k: calls.append(1) or pytest.fail("fused in graph"))
    monkeypatch.setattr(vqgan.torch.compiler, "is_compiling", lambda: True)
    norm = nn.GroupNorm(2, 4, eps=1e-6)
    norm.fused = True
    x = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        assert torch.allclose(vqgan._norm_act(norm, x), F.silu(norm(x)))
    assert calls == []
