"""torch's own fastest alternatives to a fused op: what ``kernels: auto`` may pick instead.

The plain references (``reference.py``) define what each op computes and are written for
clarity (attention there is matmul + softmax + matmul). Where torch has a faster built-in for
the same computation, it lives here, so the per-call choice (``autotune``) compares the fused
kernel with torch's best and not only with its plainest:

* ``factorized_attention`` without validity masks (tube masks, fine-tuning):
  ``F.scaled_dot_product_attention`` with one backend forced (``sdpa:flash``,
  ``sdpa:efficient``, ``sdpa:cudnn``; ``sdpa:math`` as well on the CPU, for the tests), on the
  cheapest layout: spatial attention on zero-copy views ``[B*T, H, S, dh]`` of the qkv
  projection; temporal attention after one copy that splits q | k | v, the heads folded into
  the batch (``[B, S*H, T, dh]`` views), since (B, S) and (S, H) do not merge in the engine's
  ``[B, T, S, 3, H, dh]`` layout.

* ``varlen_attention`` over segments in row order (the spatial segments of random / frame
  masks): ``torch.nn.attention.varlen.varlen_attn`` (``varlen_attn``, CUDA only) on zero-copy
  ``[Ntok, H, dh]`` views. Segments reached through a position -> row index (the temporal
  ones) have no zero-copy form and no built-in here.

A backend that cannot run a shape or dtype raises; the autotuner then drops it for that call.
Each candidate is also compared with the reference before it may be chosen.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def attention_layout(qkv: Tensor, mode: str):
    """qkv ``[B, T, S, 3, H, dh]`` -> q, k, v as 4-D ``[batch, heads, L, dh]`` for SDPA.

    spatial: zero-copy views ``[B*T, H, S, dh]``. temporal: one copy splits q|k|v
    (``[3, B, T, S, H, dh]``), then views ``[B, S*H, T, dh]``."""
    B, T, S, _, H, dh = qkv.shape
    if mode == "spatial":
        x = qkv.reshape(B * T, S, 3, H, dh)
        return tuple(x[:, :, i].transpose(1, 2) for i in range(3))
    if mode != "temporal":
        raise ValueError(f"mode must be 'temporal' or 'spatial', got {mode!r}")
    x = qkv.permute(3, 0, 1, 2, 4, 5).contiguous()
    return tuple(x[i].view(B, T, S * H, dh).transpose(1, 2) for i in range(3))


def attention_unlayout(o: Tensor, qkv: Tensor) -> Tensor:
    """``[batch, heads, L, dh]`` of :func:`attention_layout` -> ``[B, T, S, H*dh]``."""
    B, T, S, _, H, dh = qkv.shape
    return o.transpose(1, 2).reshape(B, T, S, H * dh)


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def factorized_attention_sdpa(qkv: Tensor, mode: str, scale: Optional[float], backend: str) -> Tensor:
    """:func:`reference.factorized_attention_ref` without validity masks through
    ``F.scaled_dot_product_attention`` with ``backend`` (one of :data:`SDPA_BACKENDS`) forced.
    qkv ``[B, T, S, 3, H, dh]`` -> ``[B, T, S, H*dh]``."""
    from torch.nn.attention import sdpa_kernel

    q, k, v = attention_layout(qkv, mode)
    with sdpa_kernel([_sdpa_backend(backend)]):
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return attention_unlayout(o, qkv)


def varlen_attention_torch(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: Optional[float]) -> Tensor:
    """:func:`reference.varlen_attention_ref` without a row index through torch's
    ``varlen_attn``. Packed qkv ``[Ntok, 3, H, dh]`` -> ``[Ntok, H*dh]``."""
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = qkv.unbind(1)                                                   # [Ntok, H, dh] views
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)
    return out.reshape(qkv.shape[0], -1)


# op -> the built-ins that may stand in for one of its calls
BUILTINS = {"factorized_attention": tuple(f"sdpa:{n}" for n in SDPA_BACKENDS), "varlen_attention": ("varlen_attn",)}


def candidates(op: str, device: torch.device, has_valid: bool = False, has_index: bool = False) -> List[str]:
    """The built-in implementations ``kernels: auto`` may time for one call of ``op``."""
    if op == "factorized_attention" and not has_valid:
        names = ("flash", "efficient", "cudnn") if device.type == "cuda" else ("flash", "math")
        return [f"sdpa:{n}" for n in names]
    if op == "varlen_attention" and not has_index and device.type == "cuda":
        return ["varlen_attn"]
    return []


def run(op: str, impl: str, *args):
    """Call ``op`` through the built-in ``impl`` (a name from :func:`candidates`) with the
    dispatch function's arguments."""
    if op == "factorized_attention" and impl in BUILTINS[op]:
        qkv, mode, valid, scale = args
        if valid is not None:
            raise ValueError("factorized_attention: the SDPA built-ins take no validity mask")
        return factorized_attention_sdpa(qkv, mode, scale, impl.split(":", 1)[1])
    if op == "varlen_attention" and impl in BUILTINS[op]:
        qkv, cu_seqlens, max_seqlen, index, scale = args
        if index is not None:
            raise ValueError("varlen_attention: torch's varlen_attn takes segments in row order (no index)")
        return varlen_attention_torch(qkv, cu_seqlens, max_seqlen, scale)
    raise ValueError(f"kernels: no built-in {impl!r} for {op}")
