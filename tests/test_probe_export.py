"""Checkpoint -> classifier loading (strict), export round trip, bad-checkpoint errors, probe."""
from __future__ import annotations

import json

import pytest
import torch

from mam2_fast.config import Config, ModelConfig
from mam2_fast.export import export_encoder
from mam2_fast.ft.config import ClassifierConfig
from mam2_fast.ft.weights import WeightsError, load_encoder_into, read_encoder_weights
from mam2_fast.models.classifier import VideoClassifier, VideoEncoder, is_encoder_key
from mam2_fast.models.mam2 import build_model
from mam2_fast.probe import derive_target, linear_probe
from mam2_fast.train.checkpoint import save_checkpoint

ARCH = dict(preset="tiny", img_size=32, num_frames=2, patch_size=16, embed_dim=32, depth=2, num_heads=2)


def pretrain_checkpoint(tmp_path, step=7):
    """A pre-training checkpoint in the format mam2_fast.pretrain writes."""
    torch.manual_seed(0)
    mcfg = ModelConfig(**ARCH, regressor_depth=1, appearance_depth=1, motion_depth=1)
    model = build_model(mcfg, vocab_size=16)
    cfg = Config(model=mcfg)
    path = save_checkpoint(tmp_path / "run", step, {"model": model.state_dict(), "config": cfg.to_dict(),
                                                      "step": step, "tokenizer": None})
    return model, path


def classifier(**kw):
    return VideoClassifier(ClassifierConfig(**{**ARCH, "num_classes": 5, **kw}))


def test_checkpoint_to_classifier_uses_every_encoder_key(tmp_path):
    mam2, path = pretrain_checkpoint(tmp_path)
    w = read_encoder_weights(tmp_path / "run")                          # run folder -> latest checkpoint
    enc_keys = {k for k in mam2.state_dict() if is_encoder_key(k)}
    assert set(w.state) == enc_keys
    assert set(w.dropped) == set(mam2.state_dict()) - enc_keys           # the rest is accounted for
    assert any(k.startswith("regressor.") for k in w.dropped)
    model = classifier()
    rep = load_encoder_into(model, w)
    assert rep["loaded"] == len(enc_keys) and not rep["interpolated"]
    sd = model.state_dict()
    for k in enc_keys:
        assert torch.equal(sd[k], mam2.state_dict()[k]), k
    mam2.eval(), model.eval()
    clip = torch.randn(2, 2, 3, 32, 32)
    assert torch.allclose(model.forward_features(clip), mam2.forward_features(clip), atol=1e-5)
    assert model(clip).shape == (2, 5)


def test_missing_unexpected_and_shape_errors_name_the_key(tmp_path):
    mam2, path = pretrain_checkpoint(tmp_path)
    sd = mam2.state_dict()

    def write(state, name):
        p = tmp_path / name
        torch.save({"model": state, "config": Config(model=ModelConfig(**ARCH)).to_dict()}, p)
        return p

    missing = write({k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.weight"}, "missing.pt")
    with pytest.raises(WeightsError, match=r"missing\.pt.*missing encoder key 'blocks\.1\.mlp\.fc2\.weight'"):
        load_encoder_into(classifier(), read_encoder_weights(missing))
    odd = write({**sd, "mystery.weight": torch.zeros(1)}, "odd.pt")
    with pytest.raises(WeightsError, match=r"odd\.pt.*unexpected key 'mystery\.weight'"):
        read_encoder_weights(odd)
    deeper = write({**sd, **{k.replace("blocks.1.", "blocks.2."): v for k, v in sd.items() if k.startswith("blocks.1.")}},
                   "deeper.pt")
    with pytest.raises(WeightsError, match=r"deeper\.pt.*unexpected key 'blocks\.2\."):
        load_encoder_into(classifier(), read_encoder_weights(deeper))
    bad_shape = write({**sd, "blocks.0.mlp.fc1.weight": torch.zeros(64, 32)}, "shape.pt")
    with pytest.raises(WeightsError, match=r"shape\.pt.*'blocks\.0\.mlp\.fc1\.weight'.*\(64, 32\).*\(128, 32\)"):
        load_encoder_into(classifier(), read_encoder_weights(bad_shape))
    wide = write({**sd, "pos_embed_space": torch.zeros(4, 48)}, "wide.pt")   # width differs: no interpolation
    with pytest.raises(WeightsError, match="pos_embed_space"):
        load_encoder_into(classifier(), read_encoder_weights(wide))


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match="not found.*nope.pt"):
        read_encoder_weights(tmp_path / "nope.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(WeightsError, match="empty_run.*no checkpoint"):
        read_encoder_weights(tmp_path / "empty_run")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt"):
        read_encoder_weights(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(WeightsError, match=r"other\.pt.*no 'model'"):
        read_encoder_weights(other)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match="fake.safetensors"):
        read_encoder_weights(fake)


def test_position_embeddings_interpolate_to_more_frames(tmp_path):
    _, path = pretrain_checkpoint(tmp_path)
    model = classifier(num_frames=4, img_size=64)
    rep = load_encoder_into(model, read_encoder_weights(path))
    assert len(rep["interpolated"]) == 2
    assert model.pos_embed_time.shape == (4, 32) and model.pos_embed_space.shape == (16, 32)


def test_export_round_trip(tmp_path):
    from safetensors import safe_open

    mam2, path = pretrain_checkpoint(tmp_path)
    out = export_encoder(path, tmp_path / "enc.safetensors")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "mam2_fast.encoder" and meta["step"] == "7"
    assert json.loads(meta["arch"])["embed_dim"] == 32
    assert keys == {k for k in mam2.state_dict() if is_encoder_key(k)}
    w = read_encoder_weights(out)
    assert w.kind == "export" and w.arch["depth"] == 2
    for k, v in w.state.items():
        assert torch.equal(v, mam2.state_dict()[k]), k
    model = classifier()
    load_encoder_into(model, w)                                          # fine-tuning loads the export
    with pytest.raises(WeightsError, match="already an exported encoder"):
        export_encoder(out, tmp_path / "again.safetensors")
    # a safetensors file without our metadata is refused, naming the file
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(WeightsError, match=r"foreign\.safetensors.*format"):
        read_encoder_weights(tmp_path / "foreign.safetensors")


def test_finetune_builds_from_export_and_from_checkpoint(tmp_path):
    from mam2_fast.finetune import build_finetune_model
    from mam2_fast.ft.config import finetune_config_from_dict

    mam2, path = pretrain_checkpoint(tmp_path)
    out = export_encoder(path, tmp_path / "enc.safetensors")
    for init in (str(path), str(out)):
        cfg = finetune_config_from_dict({"init": init, "model": {**ARCH, "num_classes": 3},
                                         "data": {"demo": True, "num_frames": 2, "input_size": 32}})
        model, rep = build_finetune_model(cfg, log=lambda s: None)
        assert rep["loaded"] == sum(is_encoder_key(k) for k in mam2.state_dict())
    cfg = finetune_config_from_dict({"init": str(out), "model": {**ARCH, "embed_dim": 64, "num_classes": 3},
                                     "data": {"demo": True, "num_frames": 2, "input_size": 32}})
    with pytest.raises(WeightsError, match="embed_dim"):
        build_finetune_model(cfg, log=lambda s: None)


def test_linear_probe_on_tiny_synthetic_set():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 2
    ytr, yte = torch.arange(60) % 3, torch.arange(30) % 3
    ftr = centers[ytr][:, None] + torch.randn(60, 2, 8, generator=g)
    fte = centers[yte][:, None] + torch.randn(30, 2, 8, generator=g)
    for method in ("ridge", "logistic"):
        r = linear_probe(ftr, ytr, fte, yte, method, lambdas=(1e-1,) if method == "logistic" else None)
        assert r["test_acc"] > 90 and r["chance"] == pytest.approx(100 / 3), (method, r)
    noise = linear_probe(torch.randn(60, 2, 8, generator=g), ytr, torch.randn(30, 2, 8, generator=g), yte)
    assert noise["test_acc"] < 70
    labels = torch.tensor([0, 5, 11])
    assert derive_target(labels, "shape").tolist() == [0, 1, 2]
    assert derive_target(labels, "direction").tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="unknown probe target"):
        derive_target(labels, "colour")


def test_probe_features_from_frozen_encoder():
    from mam2_fast.probe import extract_features, pool_tokens

    enc = VideoEncoder(ClassifierConfig(**ARCH)).eval()

    class Views:
        def __len__(self):
            return 3

        def __iter__(self):
            g = torch.Generator().manual_seed(1)
            yield {"views": torch.randn(3, 2, 2, 3, 32, 32, generator=g), "label": torch.tensor([0, 1, 2])}

    feats, labels = extract_features({"a": enc}, Views(), torch.device("cpu"))
    assert feats["a"].shape == (3, 2, 32) and labels.tolist() == [0, 1, 2]
    tok = torch.randn(2, 2, 4, 32)
    assert pool_tokens(tok, "time").shape == (2, 64)


def test_grid_pooling_is_cell_means_in_order():
    from mam2_fast.probe import pool_tokens

    B, T, h, D = 2, 5, 3, 4                                   # odd T and grid: uneven adaptive cells
    tok = torch.randn(B, T, h * h, D, dtype=torch.float64)
    out = pool_tokens(tok, "grid", (2, 2))
    assert out.shape == (B, 2 * 2 * 2 * D)
    grid = tok.view(B, T, h, h, D)
    # adaptive cells: time [0:3], [2:5]; rows/cols [0:2], [1:3]
    spans_t, spans_s = [(0, 3), (2, 5)], [(0, 2), (1, 3)]
    want = torch.cat([grid[:, t0:t1, r0:r1, c0:c1].mean(dim=(1, 2, 3))
                      for t0, t1 in spans_t for r0, r1 in spans_s for c0, c1 in spans_s], dim=1)
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)
    # (1, 1) is the mean pool
    assert torch.allclose(pool_tokens(tok, "grid", (1, 1)), pool_tokens(tok, "mean"))
    # a left-to-right sweep and its mirror differ in grid features, not in the mean
    sweep = torch.zeros(1, 2, 4, 1)
    sweep[0, 0, 0] = sweep[0, 1, 1] = 1.0                      # token 0 early, token 1 late
    mirror = sweep.flip(1)
    assert torch.equal(pool_tokens(sweep, "mean"), pool_tokens(mirror, "mean"))
    assert not torch.equal(pool_tokens(sweep, "grid", (2, 2)), pool_tokens(mirror, "grid", (2, 2)))


def test_grid_pooling_rejects_bad_shapes():
    from mam2_fast.probe import main, pool_tokens

    with pytest.raises(ValueError, match="square patch grid"):
        pool_tokens(torch.randn(1, 2, 6, 3), "grid", (2, 2))
    with pytest.raises(ValueError, match="does not fit"):
        pool_tokens(torch.randn(1, 2, 4, 3), "grid", (3, 2))
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_tokens(torch.randn(1, 2, 4, 3), "max")
    assert main(["--init", "x.safetensors", "--pool", "grid", "--grid", "2"]) == 2
