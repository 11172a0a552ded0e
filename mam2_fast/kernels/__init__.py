"""Kernel dispatch: each op has a plain PyTorch reference (``reference.py``) and a fused
Triton implementation (``attention.py``, ``varlen.py``, ``gather.py``,
``rgb_diff_loss.py``, ``linear_ce.py``). ``backend`` is

* ``"reference"``: always the PyTorch reference;
* ``"fused"``: the Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``
  was set before triton was imported (slow, for tests). Anything else raises;
* ``"auto"``: fused when the inputs live on a CUDA device and Triton is importable,
  else the reference.

Per op, :func:`fall_back_to_reference` overrides ``"fused"`` / ``"auto"``: the start-of-run
check (``selfcheck.resolve_backend``) sends an op that fails on the device (or whose launches at
the run's shapes CUDA would refuse) back to its reference, and the other ops stay fused.
Per call, :func:`fall_back_call` does the same for one call site of an op, named by its
:func:`call_key` (op, mode, shapes, dtype, with or without backward): ``kernels: auto`` times
every call of a step and sends only the slower ones back (``autotune``), so the encoder's
spatial attention can run torch's while its temporal attention stays fused. "Back" is the
reference or, where torch has a faster built-in for the same computation (``builtin.py``:
SDPA with one backend forced for attention without validity masks, ``varlen_attn`` for packed
segments in row order), that built-in.
``meta`` tensors are accepted by ``"fused"``: the custom ops run their fake impls (dry runs).

The fused modules are imported lazily (first fused call), so importing this package never
imports triton and never fixes the interpreter mode.
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

import torch
from torch import Tensor

from mam2_fast.kernels import reference as ref
from mam2_fast.kernels._common import interpreting

BACKENDS = ("reference", "fused", "auto")

# the fused ops dispatched here (the names fall_back_to_reference takes)
FUSED_OPS = ("factorized_attention", "varlen_attention", "gather_visible_add_pos", "gather_tokens",
             "rgb_diff_mse_tube", "rgb_diff_mse_packed", "linear_cross_entropy")

# op -> why it runs the reference although the model asks for "fused" / "auto"
_FALLBACKS: dict[str, str] = {}

# call key -> (what that one call site runs instead of the fused kernel: "reference" or a
# torch built-in of builtin.py, why): the per-call choice of kernels: auto
_CALL_FALLBACKS: dict[str, tuple[str, str]] = {}
# the call keys of every dispatch while recording_calls() is active (any backend)
_RECORDING: Optional[List[str]] = None

# find_spec does not import triton (importing it would fix the interpreter mode too early)
_TRITON_OK: bool = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_OK


def fall_back_to_reference(op: str, reason: str) -> None:
    """Run ``op`` (one of :data:`FUSED_OPS`) through its reference from now on, whatever
    backend the caller asks for (the per-op switch of the start-of-run check)."""
    if op not in FUSED_OPS:
        raise ValueError(f"kernels: unknown fused op {op!r} (choose from {FUSED_OPS})")
    _FALLBACKS[op] = reason


def fallbacks() -> dict[str, str]:
    """``{op: reason}`` of the ops sent back to the reference by :func:`fall_back_to_reference`."""
    return dict(_FALLBACKS)


def clear_fallbacks() -> None:
    """Forget every op and call fallback (a new run decides afresh)."""
    _FALLBACKS.clear()
    _CALL_FALLBACKS.clear()


def clear_call_fallbacks() -> None:
    """Forget the per-call choices only (the op fallbacks of the start-of-run check stay)."""
    _CALL_FALLBACKS.clear()


def call_key(op: str, mode: str, *shaped: Tensor) -> str:
    """The name of one call site of ``op`` in a step: its mode, the shapes of the tensors that
    decide its launches, the first one's dtype, and whether a backward follows (grad mode on
    and an input that requires grad). E.g.
    ``factorized_attention spatial [32, 16, 49, 3, 12, 64] bfloat16 fwd+bwd``."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in shaped)
    shapes = " ".join(str(list(t.shape)) for t in shaped)
    return f"{op} {mode} {shapes} {str(shaped[0].dtype).replace('torch.', '')} {'fwd+bwd' if grad else 'fwd'}"


def fall_back_call(key: str, reason: str, impl: str = "reference") -> None:
    """Run the one call site named ``key`` (a :func:`call_key`) through its op's reference,
    or through the torch built-in ``impl`` (``builtin.candidates``, e.g. ``sdpa:cudnn``)."""
    op = key.split(" ", 1)[0]
    if op not in FUSED_OPS:
        raise ValueError(f"kernels: call key {key!r} names no fused op (choose from {FUSED_OPS})")
    if impl != "reference" and impl not in _builtin().BUILTINS.get(op, ()):
        raise ValueError(f"kernels: no built-in {impl!r} for {op}")
    _CALL_FALLBACKS[key] = (impl, reason)


def call_fallbacks() -> dict[str, tuple[str, str]]:
    """``{call key: (impl, reason)}`` of the call sites sent away by :func:`fall_back_call`."""
    return dict(_CALL_FALLBACKS)


@contextmanager
def recording_calls() -> Iterator[List[str]]:
    """Collect the :func:`call_key` of every op dispatched inside (whatever the backend):
    what the model really calls, to check the autotuner times the same calls."""
    global _RECORDING
    outer, _RECORDING = _RECORDING, []
    try:
        yield _RECORDING
    finally:
        _RECORDING = outer


def _route(backend: str, *tensors: Optional[Tensor], op: str,
           call: Optional[Callable[[], str]] = None) -> str:
    """What this call runs: ``"fused"``, ``"reference"`` or a built-in (``builtin.py``) chosen
    for it by :func:`fall_back_call`. ``call`` gives its :func:`call_key`, computed only while
    there are per-call choices or a recording (no cost otherwise)."""
    if call is not None and (_CALL_FALLBACKS or _RECORDING is not None):
        key = call()
        if _RECORDING is not None:
            _RECORDING.append(key)
        if key in _CALL_FALLBACKS:
            return _CALL_FALLBACKS[key][0]
    return "fused" if _use_fused(backend, *tensors, op=op) else "reference"


def _use_fused(backend: str, *tensors: Optional[Tensor], op: str) -> bool:
    """Whether ``backend`` sends this call of ``op`` to its fused kernel."""
    if backend == "reference":
        return False
    if backend not in BACKENDS:
        raise ValueError(f"kernels: unknown backend {backend!r} (choose from {BACKENDS})")
    if op in _FALLBACKS:
        return False
    ts = [t for t in tensors if t is not None]
    if backend == "auto":
        return all(t.is_cuda for t in ts) and triton_available()
    if not triton_available():
        raise RuntimeError("kernels: backend='fused' needs triton, which is not importable")
    for t in ts:
        if t.device.type == "cpu" and not interpreting():
            raise RuntimeError("kernels: backend='fused' got CPU tensors; fused kernels run on "
                               "CUDA, or on CPU only under TRITON_INTERPRET=1 (set before "
                               "triton is imported). Use backend='auto' or 'reference'.")
        if t.device.type not in ("cpu", "cuda", "meta"):
            raise RuntimeError(f"kernels: backend='fused' does not support device {t.device}")
    return True


# Lazy imports via plain import statements (torch.compile traces these without a graph
# break, unlike importlib.import_module).
def _attention():
    from mam2_fast.kernels import attention
    return attention


def _builtin():
    from mam2_fast.kernels import builtin
    return builtin


def _varlen():
    from mam2_fast.kernels import varlen
    return varlen


def _gather():
    from mam2_fast.kernels import gather
    return gather


def _rgb_diff():
    from mam2_fast.kernels import rgb_diff_loss
    return rgb_diff_loss


def _linear_ce():
    from mam2_fast.kernels import linear_ce
    return linear_ce


def factorized_attention(qkv: Tensor, mode: str, valid: Optional[Tensor] = None,
                         scale: Optional[float] = None, backend: str = "reference") -> Tensor:
    """qkv ``[B, T, S, 3, H, dh]`` -> ``[B, T, S, H*dh]``; see ``reference.factorized_attention_ref``."""
    how = _route(backend, qkv, valid, op="factorized_attention",
                 call=lambda: call_key("factorized_attention", mode if valid is None else f"{mode}+valid", qkv))
    if how == "fused":
        return _attention().factorized_attention_fused(qkv, mode, valid, scale)
    if how != "reference":
        return _builtin().run("factorized_attention", how, qkv, mode, valid, scale)
    return ref.factorized_attention_ref(qkv, mode, valid, scale)


def varlen_attention(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, index: Optional[Tensor] = None,
                     scale: Optional[float] = None, backend: str = "reference") -> Tensor:
    """Packed qkv ``[Ntok, 3, H, dh]``, segments ``cu_seqlens [G+1]`` int32, optional position ->
    row ``index [Ntok]`` -> ``[Ntok, H*dh]``; see ``reference.varlen_attention_ref``."""
    how = _route(backend, qkv, cu_seqlens, index, op="varlen_attention",
                 call=lambda: call_key("varlen_attention", "spatial" if index is None else "temporal", qkv, cu_seqlens))
    if how == "fused":
        return _varlen().varlen_attention_fused(qkv, cu_seqlens, max_seqlen, index, scale)
    if how != "reference":
        return _builtin().run("varlen_attention", how, qkv, cu_seqlens, max_seqlen, index, scale)
    return ref.varlen_attention_ref(qkv, cu_seqlens, max_seqlen, index, scale)


def gather_visible_add_pos(x: Tensor, pos_t: Tensor, pos_s: Tensor, idx: Tensor,
                           backend: str = "reference") -> Tensor:
    """x ``[B, T, N, D]`` + pos_t ``[T, D]`` + pos_s ``[N, D]`` at idx ``[B, Nv]`` -> ``[B, T, Nv, D]``."""
    if _route(backend, x, pos_t, pos_s, idx, op="gather_visible_add_pos",
              call=lambda: call_key("gather_visible_add_pos", "tube", x, idx, pos_t)) == "fused":
        return _gather().gather_visible_add_pos_fused(x, pos_t, pos_s, idx)
    return ref.gather_visible_add_pos_ref(x, pos_t, pos_s, idx)


def gather_tokens(x: Tensor, idx: Tensor, backend: str = "reference") -> Tensor:
    """x ``[B, T, N, D]`` at idx ``[B, K]`` (distinct per row) -> ``[B, T, K, D]``."""
    if _route(backend, x, idx, op="gather_tokens", call=lambda: call_key("gather_tokens", "tube", x, idx)) == "fused":
        return _gather().gather_tokens_fused(x, idx)
    return ref.gather_tokens_ref(x, idx)


def rgb_diff_mse_tube(clip: Tensor, pred: Tensor, mask_idx: Tensor, patch: int,
                      backend: str = "reference") -> Tensor:
    """Eq. 3 for tube masks; the clip is a constant (fused path: no clip gradient)."""
    if _route(backend, clip, pred, mask_idx, op="rgb_diff_mse_tube",
              call=lambda: call_key("rgb_diff_mse_tube", f"P{patch}", pred, clip, mask_idx)) == "fused":
        return _rgb_diff().rgb_diff_mse_tube_fused(clip, pred, mask_idx, patch)
    return ref.rgb_diff_mse_tube_ref(clip, pred, mask_idx, patch)


def rgb_diff_mse_packed(clip: Tensor, pred: Tensor, rows: Tensor, patch: int,
                        backend: str = "reference") -> Tensor:
    """Eq. 3 for packed masked tokens: pred ``[M, P*P*C]`` at flat rows ``[M]``
    (``b*T*N + t*N + n``); the clip is a constant (fused path: no clip gradient)."""
    if _route(backend, clip, pred, rows, op="rgb_diff_mse_packed",
              call=lambda: call_key("rgb_diff_mse_packed", f"P{patch}", pred, clip, rows)) == "fused":
        return _rgb_diff().rgb_diff_mse_packed_fused(clip, pred, rows, patch)
    return ref.rgb_diff_mse_packed_ref(clip, pred, rows, patch)


def linear_cross_entropy(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         backend: str = "reference", *, ignore_index: int = -100) -> Tensor:
    """``F.cross_entropy(x @ W.T + b, target, ignore_index)``; the fused path never holds the
    full ``[M, K]`` logits."""
    if _route(backend, x, weight, bias, target, op="linear_cross_entropy",
              call=lambda: call_key("linear_cross_entropy", f"ignore{ignore_index}", x, weight)) == "fused":
        return _linear_ce().linear_cross_entropy_fused(x, weight, bias, target, ignore_index)
    return ref.linear_cross_entropy_ref(x, weight, bias, target, ignore_index)
