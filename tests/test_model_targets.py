"""Target switches of the MAM^2 model: flow / clip-order motion targets (Table 1f, Sec. 2.2),
the pixel appearance target (VideoMAE / MAE-ST baselines) and activation checkpointing."""
import pytest
import torch
import torch.nn.functional as F

from mam2_fast.config import Config, ConfigError, ModelConfig, validate
from mam2_fast.masking import MaskGenerator, MaskInfo
from mam2_fast.models.mam2 import MAM2, build_model, select_pos
from mam2_fast.targets.pixel import pixel_target

K = 16
P = 16


def tiny(**kw):
    base = dict(preset="tiny", img_size=48, num_frames=4, embed_dim=32, depth=2, num_heads=2,
                regressor_depth=1, appearance_depth=1, motion_depth=1)
    base.update(kw)
    return ModelConfig(**base)


def batch(cfg, B=2, kind="tube", ratio=0.75, seed=0):
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(B, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=g)
    n = (cfg.img_size // P) ** 2
    codes = torch.randint(0, K, (B, cfg.num_frames, n), generator=g)
    flow = torch.randn(B, cfg.num_frames, n, P * P * 2, generator=g)
    flow[:, 0] = 0.0
    info = MaskGenerator(kind, ratio, cfg.num_frames, (cfg.img_size // P,) * 2)(B, g)
    return clip, info, codes, flow


def masked_pos(m, info):
    return torch.stack([m.pos_grid()[:, info.mask_idx[b]] for b in range(info.mask.shape[0])])


# ---------------------------------------------------------------------------------------- flow
@pytest.mark.parametrize("kind", ["tube", "random"])
def test_flow_target_loss_equals_hand_computation(kind):
    torch.manual_seed(0)
    cfg = tiny(motion_target="flow", use_appearance=False)
    m = build_model(cfg).eval()
    assert m.motion_head.out_features == P * P * 2
    clip, info, _, flow = batch(cfg, kind=kind, ratio=0.6)
    out = m(clip, info, motion_target=flow)
    B, T = clip.shape[:2]
    if info.is_tube:
        r = m.regress(m.encode(clip, info)[0], info, None)
        pred = m.motion_head(m.motion_decoder(r + masked_pos(m, info)))      # [B, T, Nm, 512]
        slots = [info.mask_idx[b].tolist() for b in range(B)]
        get = lambda b, t, j, s: pred[b, t, j]  # noqa: E731
    else:
        lat, valid = m.encode(clip, info)
        r = m.regress(lat, info, valid)
        pred = m.motion_head(m.motion_decoder(r + m.pos_grid(), info.mask))  # [B, T, N, 512]
        get = lambda b, t, j, s: pred[b, t, s]  # noqa: E731
    total, n = 0.0, 0
    for b in range(B):
        for t in range(1, T):
            idx = slots[b] if info.is_tube else info.mask[b, t].nonzero().flatten().tolist()
            for j, s in enumerate(idx):
                total = total + ((get(b, t, j, s) - flow[b, t, s]) ** 2).mean()
                n += 1
    assert torch.allclose(out["loss_motion"], total / n, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out["loss"], out["loss_motion"] + 2.0 * out["loss_align"])


def test_flow_needs_motion_target_of_the_right_shape():
    cfg = tiny(motion_target="flow")
    m = build_model(cfg, vocab_size=K)
    clip, info, codes, flow = batch(cfg)
    with pytest.raises(ValueError, match="motion_target"):
        m(clip, info, codes)
    with pytest.raises(ValueError, match="motion_target"):
        m(clip, info, codes, motion_target=flow[..., :100])
    m(clip, info, codes, motion_target=flow)["loss"].backward()
    assert m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- clip order
def test_shuffle_clips_swaps_halves_where_labelled():
    T, Kt = 5, 6
    x = torch.arange(T, dtype=torch.float32)[None, :, None, None].expand(2, T, Kt, 3).clone()
    x = x + 100 * torch.arange(Kt)[None, None, :, None]                 # value = 100 * slot + frame
    labels = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 1]])
    y = MAM2.shuffle_clips(x, labels)
    for b in range(2):
        for k in range(Kt):
            frames = y[b, :, k, 0] - 100 * k
            want = [2, 3, 4, 0, 1] if labels[b, k] else [0, 1, 2, 3, 4]  # clips [0, 2) and [2, 5)
            assert frames.tolist() == want


def test_clip_order_applies_the_labelled_shuffle_and_trains():
    torch.manual_seed(0)
    cfg = tiny(motion_target="clip_order")
    m = build_model(cfg, vocab_size=K).eval()
    assert m.motion_head.out_features == 2 and m.motion_decoder.cls_token.shape == (32,)
    clip, info, codes, _ = batch(cfg, ratio=0.75)
    B, T = clip.shape[:2]
    Nm = info.mask_idx.shape[1]

    seen = {}
    hook = m.motion_decoder.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    out = m(clip, info, codes, generator=torch.Generator().manual_seed(7))
    hook.remove()

    # labels come from the generator passed in, both orders occur
    labels = out["order_labels"]
    assert labels.shape == (B, Nm)
    assert torch.equal(labels, torch.randint(0, 2, (B, Nm), generator=torch.Generator().manual_seed(7)))
    assert 0 < labels.sum() < labels.numel()

    # pre-drawn labels (the torch.compile-friendly way) give the same result
    again = m(clip, info, codes, order_labels=labels)
    assert torch.equal(again["order_labels"], labels) and torch.allclose(again["loss"], out["loss"])
    with pytest.raises(ValueError, match="order_labels"):
        m(clip, info, codes, order_labels=labels[:, :3])

    # the motion decoder got [CLS] + the regressed latents swapped exactly where labelled
    x = seen["x"]
    assert x.shape == (B, 1 + T, Nm, 32)
    r = m.regress(m.encode(clip, info)[0], info, None)                   # [B, T, Nm, D']
    pos_m = masked_pos(m, info)
    h = T // 2
    for b in range(B):
        for j in range(Nm):
            frames = list(range(h, T)) + list(range(h)) if labels[b, j] else list(range(T))
            assert torch.allclose(x[b, 1:, j], r[b, frames, j] + pos_m[b, :, j], atol=1e-5)
            assert torch.allclose(x[b, 0, j], m.motion_decoder.cls_token + m.pos_embed_space[info.mask_idx[b, j]])

    # the loss is the CE of the [CLS] logits for those labels
    logits = m.motion_head(m.motion_decoder(x)[:, 0])
    ce = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1))
    assert torch.allclose(out["loss_motion"], ce, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out["loss"], out["loss_app"] + out["loss_motion"] + 2.0 * out["loss_align"])
    assert 0.0 <= out["order_acc"] <= 1.0

    # gradients: the [CLS] reads its tube only through temporal attention. Default blocks (no
    # temporal_fc, the paper's encoder size): the gradient reaches the encoder at step 0.
    m.train()
    out = m(clip, info, codes, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(out["loss_motion"], [m.blocks[0].attn.qkv.weight, m.patch_embed.weight,
                                                     m.motion_decoder.cls_token, m.mask_query])
    assert all(g.abs().sum() > 0 for g in grads)
    # With TimeSformer's temporal_fc (zero init) the step-0 clip-order loss trains temporal_fc;
    # once it is non-zero the gradient reaches the encoder.
    torch.manual_seed(0)
    m = build_model(tiny(motion_target="clip_order", temporal_fc=True), vocab_size=K).train()
    blk = m.motion_decoder.blocks[0]
    out = m(clip, info, codes, generator=torch.Generator().manual_seed(7))
    g_fc, = torch.autograd.grad(out["loss_motion"], [blk.temporal_fc.weight])
    assert g_fc.abs().sum() > 0
    with torch.no_grad():
        blk.temporal_fc.weight.normal_(0, 0.02)          # as after a first optimizer step
    out = m(clip, info, codes, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(out["loss_motion"], [m.blocks[0].attn.qkv.weight, m.patch_embed.weight,
                                                     m.motion_decoder.cls_token, m.mask_query])
    assert all(g.abs().sum() > 0 for g in grads)


def test_clip_order_rejects_non_tube_masks_and_bad_configs():
    cfg = tiny(motion_target="clip_order")
    m = build_model(cfg, vocab_size=K)
    clip, info, codes, _ = batch(cfg, kind="random", ratio=0.6)
    with pytest.raises(ValueError, match="tube"):
        m(clip, info, codes)
    tube = batch(cfg)[1]
    with pytest.raises(ValueError, match="tube"):
        m(clip, MaskInfo(tube.mask), codes)  # tube pattern but no compact indices
    with pytest.raises(ValueError, match="use_regressor"):
        build_model(tiny(motion_target="clip_order", use_regressor=False))
    with pytest.raises(ValueError, match="coupled_decoder"):
        build_model(tiny(motion_target="clip_order", coupled_decoder=True))
    with pytest.raises(ValueError, match="motion_target"):
        build_model(tiny(motion_target="optical_flow"))


def _config(mask_kind="tube", **model):
    cfg = Config()
    cfg.data.demo = True
    cfg.mask.kind = mask_kind
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


@pytest.mark.parametrize("mask_kind,model,key", [
    ("random", {"motion_target": "clip_order"}, "model.motion_target"),
    ("frame", {"motion_target": "clip_order"}, "model.motion_target"),
    ("tube", {"motion_target": "clip_order", "use_regressor": False}, "model.motion_target"),
    ("tube", {"motion_target": "clip_order", "coupled_decoder": True}, "model.motion_target"),
    ("tube", {"motion_target": "optical_flow"}, "model.motion_target"),
    ("tube", {"appearance_target": "rgb"}, "model.appearance_target"),
])
def test_config_rejects_bad_target_settings(mask_kind, model, key):
    with pytest.raises(ConfigError, match=key):
        validate(_config(mask_kind, **model))


def test_config_accepts_target_settings():
    for mask_kind, model in (("tube", {"motion_target": "clip_order"}), ("cube", {"motion_target": "clip_order"}),
                             ("random", {"motion_target": "flow", "flow_weights": "raft.pth"}), ("random", {"appearance_target": "pixels"}),
                             ("tube", {"grad_checkpointing": True})):
        validate(_config(mask_kind, **model))


# -------------------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("kind", ["tube", "random"])
def test_pixel_appearance_target_equals_hand_computation(kind):
    torch.manual_seed(0)
    cfg = tiny(appearance_target="pixels", use_motion=False, appearance_depth=2)
    m = build_model(cfg, vocab_size=K).eval()            # vocab_size is ignored for pixels
    assert m.appearance_head.out_features == P * P * 3
    clip, info, _, _ = batch(cfg, kind=kind, ratio=0.6)
    out = m(clip, info)                                   # no codes needed
    assert "app_acc" not in out
    tgt = pixel_target(clip, P)                           # [B, T, N, 768], VideoMAE norm
    B, T = clip.shape[:2]
    if info.is_tube:
        pred = m.appearance_head(m.appearance_decoder(m.regress(m.encode(clip, info)[0], info, None)
                                                      + masked_pos(m, info)))
    else:
        lat, valid = m.encode(clip, info)
        pred = m.appearance_head(m.appearance_decoder(m.regress(lat, info, valid) + m.pos_grid(), info.mask))
    total, n = 0.0, 0
    for b in range(B):
        for t in range(T):                                 # every frame counts for pixels
            idx = info.mask_idx[b].tolist() if info.is_tube else info.mask[b, t].nonzero().flatten().tolist()
            for j, s in enumerate(idx):
                p = pred[b, t, j] if info.is_tube else pred[b, t, s]
                total = total + ((p - tgt[b, t, s]) ** 2).mean()
                n += 1
    assert torch.allclose(out["loss_app"], total / n, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out["loss"], out["loss_app"] + 2.0 * out["loss_align"])


# ----------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("over", [{}, {"use_regressor": False, "motion_target": "flow"},
                                  {"motion_target": "clip_order", "appearance_target": "pixels"}],
                         ids=["default", "no_regressor_flow", "clip_order_pixels"])
def test_grad_checkpointing_gives_equal_loss_and_grads(over):
    torch.manual_seed(0)
    cfg = tiny(drop_path=0.2, **over)                     # stochastic depth: RNG must replay
    m = build_model(cfg, vocab_size=K).train()
    clip, info, codes, flow = batch(cfg)
    res = {}
    for ckpt in (False, True):
        m.set_grad_checkpointing(ckpt)
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = m(clip, info, codes, motion_target=flow, generator=torch.Generator().manual_seed(3))
        out["loss"].backward()
        res[ckpt] = (out["loss"].detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert m.motion_decoder is None or m.motion_decoder.grad_checkpointing
    (l0, g0), (l1, g1) = res[False], res[True]
    assert torch.allclose(l0, l1, rtol=1e-6, atol=1e-7), (l0, l1)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), n


def test_grad_checkpointing_from_config():
    m = build_model(tiny(grad_checkpointing=True), vocab_size=K)
    assert m.grad_checkpointing and m.appearance_decoder.grad_checkpointing and m.motion_decoder.grad_checkpointing


def test_select_pos_matches_gather_from_expanded_table():
    torch.manual_seed(0)
    pos = torch.randn(4, 9, 8, requires_grad=True)
    info = MaskGenerator("tube", 0.6, 4, (3, 3))(3, torch.Generator().manual_seed(0))
    from mam2_fast.kernels.reference import gather_tokens_ref
    for masked in (True, False):
        idx = info.mask_idx if masked else info.vis_idx
        a = select_pos(pos, info, masked)
        b = gather_tokens_ref(pos.unsqueeze(0).expand(3, *pos.shape), idx)
        assert torch.equal(a, b)
        ga, = torch.autograd.grad(a.square().sum(), pos)
        gb, = torch.autograd.grad(b.square().sum(), pos)
        assert torch.allclose(ga, gb, atol=1e-6)


# ------------------------------------------------------------------------------ compile / amp
@pytest.mark.parametrize("over,extra", [
    ({"motion_target": "flow", "appearance_target": "pixels", "grad_checkpointing": True}, "flow"),
    ({"motion_target": "clip_order"}, "labels"),
], ids=["flow_pixels_ckpt", "clip_order_labels"])
def test_target_switches_have_no_graph_breaks_and_run_under_bf16_autocast(over, extra):
    import torch._dynamo as dynamo
    cfg = tiny(img_size=32, depth=1, **over)
    m = build_model(cfg, vocab_size=K)
    clip, info, codes, _ = batch(cfg)
    n = info.mask.shape[-1]
    kw = ({"motion_target": torch.randn(2, cfg.num_frames, n, P * P * 2)} if extra == "flow"
          else {"order_labels": torch.randint(0, 2, tuple(info.mask_idx.shape))})
    dynamo.reset()
    e = dynamo.explain(m)(clip, info, codes, **kw)
    assert e.graph_break_count == 0, e.break_reasons
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(clip, info, codes, **kw)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.patch_embed.weight.grad is not None
