"""Analytic FLOP count of one MAM^2 (or VideoMAE) training step, from the config.

Counted: every matrix product the step executes -- linear layers, the patch-embedding
convolution, attention score (``Q K^T``) and value (``P V``) products, the appearance head,
the motion head -- and, for the tokenizer, its convolutions / attention / quantizer
products. One multiply-add is 2 FLOPs. Not counted: normalization, activations, softmax,
losses, gathers, the optimizer (all elementwise; AdamW is ~15 FLOPs per parameter, under
0.1 % of a ViT-B step), biases of linear layers. This is the convention of
``torch.utils.flop_counter.FlopCounterMode`` (which counts exactly the same products;
``tests/test_flops.py`` checks the count against it) and of MFU figures in the literature.

What the step computes (read off ``mam2_fast/models/mam2.py``; ``B`` clips, ``T`` frames,
``N`` patches per frame, tube mask with ``Nm`` masked / ``Nv = N - Nm`` visible slots):

trained (backward = 2x forward: grad of inputs + grad of weights)
    patch embedding of all ``T*N`` patches (backward 1x: the clip needs no gradient)
    encoder: ``depth`` divided blocks on ``[B, T, Nv, D]``
        (qkv 3D^2 + proj D^2 [+ temporal_fc D^2] + qkv 3D^2 + proj D^2 + MLP 2*D*4D per
        token, temporal attention over T, spatial attention over Nv)
    encoder_to_decoder / pos_to_decoder (only when decoder_dim != embed_dim)
    regressor: ``regressor_depth`` cross-attention blocks, queries ``T*Nm`` mask tokens,
        keys/values ``T*Nv`` visible latents ++ ``T*Nm`` queries
    appearance decoder (``appearance_depth`` divided blocks on ``[B, T, Nm, D']``) + head to K codes
    motion decoder (``motion_depth`` blocks) + head to ``P*P*C`` (all T frames, frame 0 too)
no grad (forward only)
    alignment target: the encoder on the masked tokens ``[B, T, Nm, D]`` (patch embedding shared)
    appearance accuracy for logging: head on at most 4096 rows (per batch, not per clip)
tokenizer (forward only, frozen)
    VQGAN: encoder convolutions + mid attention + quant_conv + nearest-code products, per frame
    k-means: nearest-centroid products; pixel targets: 0

Masks whose per-frame sets differ (``random``, ``frame``) keep the full ``N``-slot grid
with validity masks in the reference model, so every block then works on ``N`` slots, and
that is what is counted. With ``model.kernels: fused | auto`` those masks run packed (the
encoder on its set, the regressor on the masked queries, the decoders on the masked set):
``mam2_step_flops(..., packed=True)`` (``--packed``; the profiler passes it when the
fused kernels run) counts that instead, with expected attention lengths for random masks.
Tube masks, the default, are the same either way.

``python -m mam2_fast.flops [--config FILE] [overrides]`` prints the table.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

GROUPS = ("trained", "target", "logging", "tokenizer")


@dataclass
class Term:
    name: str
    fwd: float          # forward FLOPs for the whole batch
    bwd: float = 0.0    # backward FLOPs for the whole batch
    group: str = "trained"

    @property
    def total(self) -> float:
        return self.fwd + self.bwd


@dataclass
class StepFlops:
    """FLOPs of one step on ``batch`` clips, as a list of :class:`Term`."""
    batch: int
    terms: List[Term] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def add(self, name: str, fwd: float, bwd: float = 0.0, group: str = "trained") -> None:
        if group not in GROUPS:
            raise ValueError(f"unknown FLOP group {group!r}")
        self.terms.append(Term(name, float(fwd), float(bwd), group))

    def group_total(self, *groups: str) -> float:
        return sum(t.total for t in self.terms if t.group in groups)

    @property
    def model(self) -> float:
        """Model FLOPs of the step (trained fwd+bwd, alignment target, logging head)."""
        return self.group_total("trained", "target", "logging")

    @property
    def tokenizer(self) -> float:
        return self.group_total("tokenizer")

    @property
    def total(self) -> float:
        return self.model + self.tokenizer

    @property
    def forward(self) -> float:
        return sum(t.fwd for t in self.terms if t.group != "tokenizer")

    @property
    def backward(self) -> float:
        return sum(t.bwd for t in self.terms)

    def per_clip(self, value: Optional[float] = None) -> float:
        return (self.total if value is None else value) / self.batch

    def by_name(self) -> Dict[str, Term]:
        return {t.name: t for t in self.terms}

    def table(self, unit: float = 1e9, unit_name: str = "GFLOP") -> str:
        b = self.batch
        lines = [f"FLOPs per clip (batch {b}; {unit_name}; 1 multiply-add = 2 FLOPs)",
                 f"{'term':<44}{'group':<11}{'fwd':>11}{'bwd':>11}{'total':>11}"]
        for t in self.terms:
            lines.append(f"{t.name:<44}{t.group:<11}{t.fwd / b / unit:>11.2f}{t.bwd / b / unit:>11.2f}"
                         f"{t.total / b / unit:>11.2f}")
        lines.append("-" * 88)
        for label, v in (("model (trained + target + logging)", self.model),
                         ("tokenizer", self.tokenizer), ("total step", self.total)):
            lines.append(f"{label:<66}{v / b / unit:>22.2f}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# primitives (batch totals)
# ----------------------------------------------------------------------------------------
def linear(rows: int, din: int, dout: int) -> int:
    return 2 * rows * din * dout


def attention(batch_heads_free: int, lq: int, lk: int, width: int) -> int:
    """Q K^T and P V for ``batch_heads_free`` independent sequence groups (heads folded into
    ``width`` = heads * head_dim)."""
    return 2 * 2 * batch_heads_free * lq * lk * width


def conv2d(out_h: int, out_w: int, cin: int, cout: int, k: int, n: int = 1) -> int:
    return 2 * n * out_h * out_w * cout * cin * k * k


def divided_block(B: int, T: int, S: int, D: int, hidden: int, temporal_fc: bool = False) -> int:
    """One TimeSformer divided block on ``[B, T, S, D]``: projections (``temporal_fc``: plus
    TimeSformer's D x D linear after temporal attention) + both attentions."""
    L = B * T * S
    proj = 2 * linear(L, D, 3 * D) + (3 if temporal_fc else 2) * linear(L, D, D) \
        + linear(L, D, hidden) + linear(L, hidden, D)
    attn = attention(B * S, T, T, D) + attention(B * T, S, S, D)
    return proj + attn


def packed_set_sums(kind: str, ratio: float, T: int, N: int, masked: bool) -> tuple[int, float, float]:
    """Per sample, for the masked (or visible) set of a ``random`` / ``frame`` mask run packed:
    (tokens, E[sum over frames of L_t^2], E[sum over slots of L_n^2]), where L_t / L_n are the
    set's tokens in frame t / at slot n (the spatial / temporal attention lengths).

    Random masks draw the set uniformly among the T*N tokens, so a frame's (slot's) count is
    hypergeometric: E[L^2] = Var + mean^2 with N (T) draws. Frame masks are exact.
    """
    from mam2_fast.masking import num_masked

    if kind == "frame":
        nf = num_masked(ratio, T)
        f = nf if masked else T - nf
        return f * N, float(f * N * N), float(N * f * f)
    if kind != "random":
        raise ValueError(f"packed_set_sums: mask kind {kind!r} is not packed (random | frame)")
    total = T * N
    nm = num_masked(ratio, total)
    k = nm if masked else total - nm
    p = k / total

    def sum_sq(draws: int, groups: int) -> float:
        mean = draws * p
        var = draws * p * (1 - p) * (total - draws) / max(total - 1, 1)
        return groups * (var + mean * mean)

    return k, sum_sq(N, T), sum_sq(T, N)


def packed_divided_block(B: int, tokens: int, sum_sq_frames: float, sum_sq_slots: float, D: int,
                         hidden: int, temporal_fc: bool = False) -> int:
    """:func:`divided_block` on packed token sets (varlen attention): projections on the
    ``B * tokens`` rows, spatial attention sum_t L_t^2, temporal sum_n L_n^2 (per sample)."""
    L = B * tokens
    proj = 2 * linear(L, D, 3 * D) + (3 if temporal_fc else 2) * linear(L, D, D) \
        + linear(L, D, hidden) + linear(L, hidden, D)
    return proj + round(4 * B * (sum_sq_frames + sum_sq_slots) * D)


def vit_block(B: int, L: int, D: int, hidden: int) -> int:
    """One plain ViT block (joint attention) on ``[B, L, D]``."""
    return linear(B * L, D, 3 * D) + linear(B * L, D, D) + linear(B * L, D, hidden) \
        + linear(B * L, hidden, D) + attention(B, L, L, D)


def cross_block(B: int, Lq: int, Lk: int, D: int, hidden: int) -> int:
    """One CAE regressor block: q on Lq, k/v on Lk, proj + MLP on Lq, attention Lq x Lk."""
    return linear(B * Lq, D, D) + 2 * linear(B * Lk, D, D) + linear(B * Lq, D, D) \
        + linear(B * Lq, D, hidden) + linear(B * Lq, hidden, D) + attention(B, Lq, Lk, D)


# ----------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------
def vqgan_frame_flops(spec: Dict[str, Any], height: int, width: int) -> Dict[str, int]:
    """FLOPs of the frozen VQGAN encoder + quant_conv + quantizer on one ``height x width``
    frame (already at the encoder's input size), walking ``VQGANEncoder``'s architecture.
    Attention levels are chosen by the config ``resolution`` (as taming builds them), sizes
    are the actual feature-map sizes."""
    dd = spec["ddconfig"]
    ch, mult = int(dd["ch"]), tuple(int(m) for m in dd["ch_mult"])
    nres, zc = int(dd["num_res_blocks"]), int(dd["z_channels"])
    attn_res = {int(r) for r in dd["attn_resolutions"]}
    cin = int(dd.get("in_channels", 3))
    out = {"conv": 0, "attention": 0, "quantizer": 0}
    h, w = height, width

    def res_block(ci, co, h, w):
        f = conv2d(h, w, ci, co, 3) + conv2d(h, w, co, co, 3)
        return f + (conv2d(h, w, ci, co, 1) if ci != co else 0)

    def attn_block(c, h, w):
        return 4 * conv2d(h, w, c, c, 1), 2 * 2 * (h * w) * (h * w) * c

    out["conv"] += conv2d(h, w, cin, ch, 3)
    curr_res = int(dd["resolution"])
    in_mult = (1,) + mult
    block_in = ch
    for i in range(len(mult)):
        block_in, block_out = ch * in_mult[i], ch * mult[i]
        for _ in range(nres):
            out["conv"] += res_block(block_in, block_out, h, w)
            block_in = block_out
            if curr_res in attn_res:
                c, a = attn_block(block_in, h, w)
                out["conv"] += c
                out["attention"] += a
        if i != len(mult) - 1:
            h, w = (h + 1 - 3) // 2 + 1, (w + 1 - 3) // 2 + 1   # pad (0,1,0,1), 3x3 stride 2
            out["conv"] += conv2d(h, w, block_in, block_in, 3)
            curr_res //= 2
    out["conv"] += 2 * res_block(block_in, block_in, h, w)
    c, a = attn_block(block_in, h, w)
    out["conv"] += c
    out["attention"] += a
    zout = 2 * zc if dd.get("double_z", False) else zc
    out["conv"] += conv2d(h, w, block_in, zout, 3)
    out["conv"] += conv2d(h, w, zc, int(spec["embed_dim"]), 1)   # quant_conv
    out["quantizer"] = linear(h * w, int(spec["embed_dim"]), int(spec["n_embed"]))
    return out


def lanczos_resize_flops(n: int, c: int, H: int, W: int, h: int, w: int) -> int:
    """The two separable resampling matmuls of ``resize_frames(mode='lanczos')``."""
    if (H, W) == (h, w):
        return 0
    return 2 * n * c * H * W * w + 2 * n * c * h * H * w


def _vqgan_spec(tcfg) -> Optional[Dict[str, Any]]:
    from mam2_fast.targets.vqgan import parse_vqgan_config

    src = getattr(tcfg, "checkpoint_config", None) or getattr(tcfg, "preset", None) or "vqgan_imagenet_f16_16384"
    try:
        return parse_vqgan_config(src)
    except (FileNotFoundError, ValueError):
        return None


def tokenizer_flops(tcfg, B: int, T: int, img: int, patch: int, notes: List[str]) -> Dict[str, float]:
    """Batch FLOPs of the tokenizer named by a TokenizerConfig (forward only)."""
    kind = getattr(tcfg, "kind", "kmeans")
    n_frames = B * T
    g = img // patch
    if kind == "kmeans":
        feat = getattr(tcfg, "kmeans_pool", 4) ** 2 * 3
        return {"tokenizer (k-means codes)": linear(n_frames * g * g, feat, int(tcfg.vocab_size))}
    if kind == "pixel":
        return {}
    if kind == "vqgan":
        spec = _vqgan_spec(tcfg)
        if spec is None:
            notes.append("VQGAN architecture unknown (config file not readable): tokenizer not counted")
            return {}
        stride = 2 ** (len(spec["ddconfig"]["ch_mult"]) - 1)
        ih = g * stride
        f = vqgan_frame_flops(spec, ih, ih)
        out = {"tokenizer VQGAN convolutions": n_frames * f["conv"],
               "tokenizer VQGAN attention": n_frames * f["attention"],
               "tokenizer VQGAN quantizer": n_frames * f["quantizer"]}
        rs = lanczos_resize_flops(n_frames, 3, img, img, ih, ih) if getattr(tcfg, "resize_mode", "lanczos") == "lanczos" else 0
        if rs:
            out["tokenizer resize (lanczos)"] = rs
        return out
    if kind == "dalle":
        try:
            f = measured_dalle_frame_flops(g * 8)
        except Exception as exc:  # pragma: no cover - depends on dalle.py internals
            notes.append(f"DALL-E tokenizer not counted ({exc})")
            return {}
        notes.append("DALL-E tokenizer counted by FlopCounterMode on the meta device (not analytic)")
        return {"tokenizer DALL-E encoder": n_frames * f}
    notes.append(f"tokenizer {kind!r}: not counted")
    return {}


def measured_dalle_frame_flops(size: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mam2_fast.targets.dalle import DalleTokenizer

    tok = DalleTokenizer(patch_size=None).to("meta")
    with FlopCounterMode(display=False) as fc:
        tok.codes(torch.empty(1, 3, size, size, device="meta"))
    return int(fc.get_total_flops())


def tokenizer_vocab(tcfg) -> int:
    kind = getattr(tcfg, "kind", "kmeans")
    if kind == "vqgan":
        spec = _vqgan_spec(tcfg)
        if spec is not None:
            return int(spec["n_embed"])
    if kind == "dalle":
        return 8192
    return int(getattr(tcfg, "vocab_size", 64))


# ----------------------------------------------------------------------------------------
# MAM^2
# ----------------------------------------------------------------------------------------
def _dims(mcfg):
    from mam2_fast.models.mam2 import PRESETS

    preset = PRESETS[mcfg.preset]
    D = mcfg.embed_dim or preset.embed_dim
    depth = mcfg.depth if mcfg.depth is not None else preset.depth
    heads = mcfg.num_heads or preset.num_heads
    Dd = mcfg.decoder_dim or D
    return D, depth, heads, Dd


@dataclass(frozen=True)
class _StepSets:
    """The token sets one MAM^2 step works on (from the config and the mask), per frame unless
    said: ``S_vis`` / ``S_tgt`` / ``S_dec`` slots of the encoder, the alignment target and the
    decoders (tube masks: ``N - Nm`` / ``Nm`` / ``Nm``; grid masks: ``N``); ``app_rows`` /
    ``motion_rows`` rows of the heads for the whole batch; ``vis_set`` / ``mask_set``: the packed
    sets' :func:`packed_set_sums` (``packed`` only)."""
    B: int
    T: int
    N: int
    P: int
    C: int
    D: int
    depth: int
    Dd: int
    hid: int                      # encoder MLP width
    dhid: int                     # decoder / regressor MLP width
    tfc: bool                     # temporal_fc
    K: int                        # appearance codes
    tube: bool                    # tube-like mask (tube / cube)
    nm: int                       # masked slots a frame (tube-like masks; 0 otherwise)
    S_vis: int
    S_tgt: int
    S_dec: int
    app_rows: int
    motion_rows: int
    packed: bool                  # random / frame masks counted as the fused kernels run them
    vis_set: Optional[tuple] = None
    mask_set: Optional[tuple] = None


def _step_sets(cfg, batch: Optional[int], vocab_size: Optional[int], packed: bool) -> _StepSets:
    from mam2_fast.masking import num_masked

    m, k = cfg.model, cfg.mask
    B = int(batch if batch is not None else cfg.train.batch_size)
    D, depth, _, Dd = _dims(m)
    T, P = m.num_frames, m.patch_size
    g = m.img_size // P
    N = g * g
    K = int(vocab_size if vocab_size is not None else tokenizer_vocab(cfg.tokenizer))
    tube = k.kind in ("tube", "cube")
    nm = 0
    if tube:
        nm = num_masked(k.ratio, N)
        S_vis, S_tgt, S_dec = N - nm, nm, nm
        app_rows = motion_rows = B * T * nm
    else:
        S_vis = S_tgt = S_dec = N
        if k.kind == "random":
            app_rows = B * num_masked(k.ratio, T * N)
        else:  # frame
            app_rows = B * num_masked(k.ratio, T) * N
        motion_rows = B * T * N
    if not m.use_regressor:
        S_dec = N  # decoders see visible latents + mask queries on the full grid
    packed = packed and not tube
    vis_set = mask_set = None
    if packed:
        vis_set = packed_set_sums(k.kind, k.ratio, T, N, masked=False)
        mask_set = packed_set_sums(k.kind, k.ratio, T, N, masked=True)
        if m.use_regressor:  # heads and the alignment target's projection read the packed rows
            motion_rows = app_rows
    return _StepSets(B, T, N, P, m.in_chans, D, depth, Dd, int(D * m.mlp_ratio), int(Dd * m.mlp_ratio),
                     bool(getattr(m, "temporal_fc", False)), K, tube, nm, S_vis, S_tgt, S_dec, app_rows,
                     motion_rows, packed, vis_set, mask_set)


def mam2_step_flops(cfg, batch: Optional[int] = None, vocab_size: Optional[int] = None,
                    include_tokenizer: bool = True, include_logging: bool = True,
                    packed: bool = False) -> StepFlops:
    """FLOPs of one MAM^2 training step on ``batch`` clips (default ``cfg.train.batch_size``).

    ``cfg`` is a :class:`mam2_fast.config.Config`. ``vocab_size`` overrides the appearance
    head size (default: the tokenizer's, e.g. 16384 for VQGAN-f16-16384). ``packed``: count
    random / frame masks as the fused kernels run them (encoder, alignment target, regressor
    queries and decoders on packed sets; expected attention lengths for random masks, see
    :func:`packed_set_sums`) instead of on the grid; tube masks are the same either way.
    The terms come in the order the step runs: encoder side, regressor and decoders, heads,
    then the tokenizer.
    """
    m = cfg.model
    s = _step_sets(cfg, batch, vocab_size, packed)
    sf = StepFlops(batch=s.B)
    _add_encoder_terms(sf, m, s)
    _add_decoder_terms(sf, m, s)
    _add_head_terms(sf, m, s, include_logging)
    if include_tokenizer and m.use_appearance and getattr(m, "appearance_target", "tokens") == "tokens":
        for name, f in tokenizer_flops(cfg.tokenizer, s.B, s.T, m.img_size, s.P, sf.notes).items():
            sf.add(name, f, 0, "tokenizer")
    return sf


def _add_encoder_terms(sf: StepFlops, m, s: _StepSets) -> None:
    """Patch embedding, the encoder on the visible set, the width projections and the
    alignment target (the encoder on the masked set, no grad)."""
    B, T, N, D, depth, hid, tfc = s.B, s.T, s.N, s.D, s.depth, s.hid, s.tfc
    embed = 2 * B * T * N * D * s.C * s.P * s.P
    sf.add("patch embed", embed, embed)  # backward: weight grad only (clip has no grad)
    if s.packed:
        enc = depth * packed_divided_block(B, *s.vis_set, D, hid, tfc)
        sf.add(f"encoder ({depth} blocks, packed {s.vis_set[0]} tokens)", enc, 2 * enc)
    else:
        enc = depth * divided_block(B, T, s.S_vis, D, hid, tfc)
        sf.add(f"encoder ({depth} blocks, {s.S_vis} slots)", enc, 2 * enc)
    if s.Dd != D:
        e2d = linear(B * T * s.S_vis, D, s.Dd)
        sf.add("encoder_to_decoder", e2d, 2 * e2d)
        n_pos = 2 if m.use_regressor else 1
        p2d = n_pos * linear(T * N, D, s.Dd)
        sf.add("pos_to_decoder", p2d, 2 * p2d)
    if m.use_alignment:
        tgt = depth * (packed_divided_block(B, *s.mask_set, D, hid, tfc) if s.packed  # reuses the step's
                       else divided_block(B, T, s.S_tgt, D, hid, tfc))                 # patch embedding
        if s.Dd != D:
            tgt += linear(s.app_rows if (s.packed and m.use_regressor) else B * T * s.S_tgt, D, s.Dd)
        sf.add(f"alignment target (no grad, {s.S_tgt} slots)", tgt, 0, "target")


def _add_decoder_terms(sf: StepFlops, m, s: _StepSets) -> None:
    """The regressor (mask queries over visible latents + queries) and the decoders."""
    B, T, N, Dd, dhid = s.B, s.T, s.N, s.Dd, s.dhid
    if m.use_regressor:
        if s.tube:
            Lq, Lk = T * s.nm, T * N
        elif s.packed:
            Lq, Lk = s.mask_set[0], T * N   # the masked queries only (equal counts per sample)
        else:
            Lq = Lk = T * N
        reg = m.regressor_depth * cross_block(B, Lq, Lk, Dd, dhid)
        sf.add(f"regressor ({m.regressor_depth} blocks, Lq {Lq}, Lk {Lk})", reg, 2 * reg)

    def decoder(depth_: int) -> int:
        if s.packed and m.use_regressor:  # without a regressor the decoders see the whole grid
            return depth_ * packed_divided_block(B, *s.mask_set, Dd, dhid, s.tfc)
        return depth_ * divided_block(B, T, s.S_dec, Dd, dhid, s.tfc)

    if m.coupled_decoder:
        dec = decoder(m.appearance_depth)
        sf.add(f"coupled decoder ({m.appearance_depth} blocks)", dec, 2 * dec)
    else:
        if m.use_appearance:
            dec = decoder(m.appearance_depth)
            sf.add(f"appearance decoder ({m.appearance_depth} blocks)", dec, 2 * dec)
        if m.use_motion:
            dec = decoder(m.motion_depth)
            sf.add(f"motion decoder ({m.motion_depth} blocks)", dec, 2 * dec)


def _add_head_terms(sf: StepFlops, m, s: _StepSets, include_logging: bool) -> None:
    """The appearance and motion heads (and the logged accuracy), with notes on what is not counted."""
    Dd, P, C, K = s.Dd, s.P, s.C, s.K
    app_target = getattr(m, "appearance_target", "tokens")
    motion_target = getattr(m, "motion_target", "rgb_diff")
    if m.use_appearance and app_target == "pixels":
        # the pixel head runs on the decoder's whole output set (masked set, or full grid)
        head = linear(s.motion_rows, Dd, P * P * C)
        sf.add("appearance head (pixels)", head, 2 * head)
    elif m.use_appearance:
        head = linear(s.app_rows, Dd, K)
        sf.add(f"appearance head (K={K})", head, 2 * head)
        if include_logging:
            sf.add("appearance accuracy (logging)", linear(min(s.app_rows, 4096), Dd, K), 0, "logging")
    if m.use_motion and motion_target == "clip_order":
        sf.notes.append("motion_target='clip_order': counted as a motion decoder on the masked set without "
                        "the head; the per-tube [CLS] step and the 2-way head are not counted")
    elif m.use_motion:
        out_dim = P * P * (2 if motion_target == "flow" else C)
        head = linear(s.motion_rows, Dd, out_dim)
        sf.add(f"motion head ({motion_target})", head, 2 * head)
        if motion_target == "flow":
            sf.notes.append("motion_target='flow': the RAFT flow target is not counted")
    if getattr(m, "grad_checkpointing", False):
        sf.notes.append("grad_checkpointing: the backward recomputes each block's forward; those extra "
                        "FLOPs are not counted (model FLOPs, as MFU conventionally uses)")


# ----------------------------------------------------------------------------------------
# VideoMAE
# ----------------------------------------------------------------------------------------
def videomae_step_flops(vcfg, batch: int = 1) -> StepFlops:
    """FLOPs of one VideoMAE pre-training step (``mam2_fast.models.videomae``)."""
    B = int(batch)
    D, Dd = vcfg.embed_dim, vcfg.decoder_dim
    hid, dhid = int(D * vcfg.mlp_ratio), int(Dd * vcfg.mlp_ratio)
    tt = vcfg.num_frames // vcfg.tubelet_size
    g = vcfg.img_size // vcfg.patch_size
    N = g * g
    nm = min(max(vcfg.num_masked_per_frame(), 1), N - 1)
    Lv, L = tt * (N - nm), tt * N
    out_dim = vcfg.tubelet_size * vcfg.patch_size ** 2 * vcfg.in_chans
    sf = StepFlops(batch=B)
    embed = 2 * B * L * D * vcfg.in_chans * vcfg.tubelet_size * vcfg.patch_size ** 2
    sf.add("patch embed (Conv3d)", embed, embed)
    enc = vcfg.depth * vit_block(B, Lv, D, hid)
    sf.add(f"encoder ({vcfg.depth} blocks, {Lv} tokens)", enc, 2 * enc)
    e2d = linear(B * Lv, D, Dd)
    sf.add("encoder_to_decoder", e2d, 2 * e2d)
    dec = vcfg.decoder_depth * vit_block(B, L, Dd, dhid)
    sf.add(f"decoder ({vcfg.decoder_depth} blocks, {L} tokens)", dec, 2 * dec)
    head = linear(B * tt * nm, Dd, out_dim)
    sf.add("pixel head", head, 2 * head)
    return sf


# ----------------------------------------------------------------------------------------
# measurement helper (tests, benchmarks)
# ----------------------------------------------------------------------------------------
class FlopCounter:
    """Counts FLOPs with ``torch.utils.flop_counter``'s per-op formulas (``flop_registry``:
    mm / addmm / bmm / baddbmm / convolution (+ backward) / SDPA (+ backward)), without
    ``FlopCounterMode``'s module tracker -- that tracker asserts on modules called under
    ``no_grad`` with inputs sliced from grad-requiring tensors (the model's accuracy head).

        with FlopCounter() as fc:
            loss = model(...); loss.backward()
        fc.total, fc.by_op
    """

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        counter = self
        self.by_op: Dict[str, int] = {}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                packet = func._overloadpacket
                if packet in flop_registry:
                    n = int(flop_registry[packet](*args, **kwargs, out_val=out))
                    key = str(packet).split(".")[-1]
                    counter.by_op[key] = counter.by_op.get(key, 0) + n
                return out

        self._mode = _Mode()
        self._torch = torch

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __enter__(self) -> "FlopCounter":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def measure_flops(fn, *args, **kwargs) -> int:
    """Total FLOPs torch's flop formulas record while running ``fn(*args, **kwargs)``."""
    with FlopCounter() as fc:
        fn(*args, **kwargs)
    return fc.total


# ----------------------------------------------------------------------------------------
# config loading for counting / profiling (no data needed)
# ----------------------------------------------------------------------------------------
def config_without_data(path: Optional[str], overrides: Sequence[str] = (), base: Optional[dict] = None,
                        keep_data: bool = False):
    """Load a Config for counting or synthetic profiling: the YAML file (or ``base`` dict),
    then the dotted overrides. Unless ``keep_data``, ``data.demo`` is switched on when no
    list file is set (no data is read), and ``data.num_frames`` / ``data.input_size`` follow
    ``model.num_frames`` / ``model.img_size`` when only the model's were overridden."""
    from mam2_fast.config import _build, _deep_merge, parse_overrides, read_yaml, Config

    data = read_yaml(path) if path else copy.deepcopy(base or {})
    over = parse_overrides(list(overrides))
    data = _deep_merge(data, over)
    if not keep_data:
        d = data.setdefault("data", {})
        mo = over.get("model", {}) if isinstance(over.get("model"), dict) else {}
        do = over.get("data", {}) if isinstance(over.get("data"), dict) else {}
        if "num_frames" in mo and "num_frames" not in do:
            d["num_frames"] = mo["num_frames"]
        if "img_size" in mo and "input_size" not in do:
            d["input_size"] = mo["img_size"]
        if not d.get("list_file"):
            d["demo"] = True
    return _build(Config, data).validate()


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    from mam2_fast.config import ConfigError

    p = argparse.ArgumentParser(prog="python -m mam2_fast.flops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML config; omitted: configs/pretrain_base.yaml (ViT-B)")
    p.add_argument("--batch", type=int, help="clips per step (default: train.batch_size)")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--packed", action="store_true", help="random / frame masks as the fused kernels run them")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    from pathlib import Path

    path = a.config or str(Path(__file__).resolve().parent.parent / "configs" / "pretrain_base.yaml")
    try:
        cfg = config_without_data(path, a.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    sf = mam2_step_flops(cfg, batch=a.batch, vocab_size=a.vocab_size, packed=a.packed)
    print(f"config: {path} {' '.join(a.overrides)}")
    print(sf.table())
    print(f"total {sf.per_clip() / 1e12:.3f} TFLOP/clip, without tokenizer {sf.per_clip(sf.model) / 1e12:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
