"""The public Python API: ``kascade.attention``.

Each call builds the library cascade for the requested variant (``ir.library.attention``,
2-pass form), schedules it (``passes.schedule``), picks a config, renders the Triton
kernel (``codegen.attention_prefill``) and runs it on a backend. Everything but the
launch is cached per variant, so repeated calls cost a dictionary lookup.
"""

from __future__ import annotations

import math
import sys
from functools import cache, lru_cache

import torch

from kascade.backends.reference import evaluate
from kascade.codegen.attention_prefill import KernelSource, render
from kascade.ir.cascade import Cascade
from kascade.ir.dtypes import DType, bf16, f16, f32
from kascade.ir.errors import DTypeError, KascadeError, ShapeError
from kascade.ir.extents import bind_extents
from kascade.ir.library import attention as attention_cascade
from kascade.ir.settings import settings
from kascade.passes.schedule import (
    MAX_HEAD_DIM,
    Config,
    Schedule,
    attention_prefill_schedule,
    choose_config,
    padded_head_dim,
)

BACKENDS = ("triton", "interpret", "reference")
INTERPRET_LIMIT = 20_000_000   # B * Hq * Sq * Sk above which the interpreter would take minutes
_DTYPES = {torch.float16: f16, torch.bfloat16: bf16, torch.float32: f32}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              window: tuple[int, int] | None = None, softcap: float | None = None, scale: float | None = None,
              backend: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention, flash-attn / SDPA semantics, forward only.

    ``q``: (B, Hq, Sq, D); ``k``: (B, Hkv, Sk, D); ``v``: (B, Hkv, Sk, Dv); Hkv must divide
    Hq (GQA; MQA is Hkv = 1); fp16, bf16 or fp32, all the same, on one device; any strides.
    ``scale`` defaults to 1/sqrt(D). ``window=(left, right)``: query i sees keys
    [i - left, i + right], -1 leaves a side unbounded. ``causal`` and windows are aligned to
    the bottom-right corner when Sq != Sk (query i sits at key position i + Sk - Sq).
    ``softcap=c`` replaces each scaled score s by c * tanh(s / c) (None or 0: off). A query
    that sees no key outputs 0. Returns (B, Hq, Sq, Dv) in q's dtype.

    ``backend``: ``"triton"`` (the generated kernel on CUDA tensors), ``"interpret"`` (the
    same kernel under Triton's CPU interpreter: for tests and small shapes) or
    ``"reference"`` (the float64 evaluator of the cascade). Default: ``"triton"`` for CUDA
    tensors, ``"reference"`` for CPU tensors. ``out``: a (B, Hq, Sq, Dv) tensor of q's dtype and
    device to write the result into (any strides). ``KASCADE_DEBUG=1`` prints the config that ran.
    """
    B, Hq, Sq, D, Hkv, Sk, Dv = _check_tensors(q, k, v)
    sides, wl, wr = _check_window(window)
    cap = _check_softcap(softcap)
    scale = _check_scale(scale, D)
    backend = _check_backend(backend, q)
    if not isinstance(causal, bool):
        raise KascadeError(f"causal must be True or False, got {causal!r}")
    dtype = _DTYPES[q.dtype]
    out = _check_out(out, q, (B, Hq, Sq, Dv))
    if backend == "interpret":
        if dtype is bf16:
            raise DTypeError("backend='interpret' cannot run bf16: Triton's CPU interpreter computes bf16 tl.dot "
                             "wrongly; use fp16 or fp32 inputs, backend='reference', or backend='triton' on a GPU")
        if B * Hq * Sq * Sk > INTERPRET_LIMIT:
            raise ShapeError(f"backend='interpret' is for tests and small shapes: B*Hq*Sq*Sk = {B * Hq * Sq * Sk} "
                             f"exceeds {INTERPRET_LIMIT}; use backend='triton' on a GPU or backend='reference'")
    cascade = _cascade(causal, sides, cap is not None, dtype)
    params = {"scale": scale, "cap": cap, "wl": wl, "wr": wr}
    params = {p.name: params[p.name] for p in cascade.params}
    G, R = Hkv, Hq // Hkv
    inputs = {"Q": q.unflatten(1, (G, R)), "K": k, "V": v}   # query head g * R + r reads KV head g: a view
    if backend == "reference":
        if settings().debug:
            print(f"kascade.attention: backend=reference cascade={cascade.name}", file=sys.stderr)
        return out.copy_(evaluate(cascade, inputs, params)["O"].flatten(1, 2))
    extents = bind_extents(cascade, {n: tuple(t.shape) for n, t in inputs.items()})
    schedule = _schedule(cascade)
    config, why = choose_config(schedule, {**extents, "itemsize": q.element_size()})
    src = _source(schedule, config, padded_head_dim(D), padded_head_dim(Dv))
    if settings().debug:
        print(f"kascade.attention: backend={backend} kernel={src.name} config={config.key()} ({why})",
              file=sys.stderr)
    from kascade.backends.triton import run
    run(src, inputs, params, extents, interpret=backend == "interpret", out=out.unflatten(1, (G, R)))
    return out


# ---- cached per variant ----------------------------------------------------------------
@cache
def _cascade(causal: bool, sides: tuple[int, int] | None, softcap: bool, dtype: DType) -> Cascade:
    return attention_cascade("2pass", causal=causal, window=sides, softcap=softcap, dtype=dtype)


@cache
def _schedule(cascade: Cascade) -> Schedule:
    return attention_prefill_schedule(cascade)


@lru_cache(maxsize=256)
def _source(schedule: Schedule, config: Config, block_e: int, block_f: int) -> KernelSource:
    c, body = schedule.cascade, schedule.kernels[0].body
    return render(schedule, config, {c.rank_extent(body.head): block_e, c.rank_extent(body.vhead): block_f})


# ---- input checks ----------------------------------------------------------------------
def _check_tensors(q, k, v) -> tuple[int, ...]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise KascadeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ShapeError(f"{name} must have 4 dims (batch, heads, seqlen, head_dim), got shape {list(t.shape)}")
        if t.dtype not in _DTYPES:
            raise DTypeError(f"{name} is {t.dtype}; accepted: torch.float16, torch.bfloat16, torch.float32")
    if not q.dtype == k.dtype == v.dtype:
        raise DTypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise KascadeError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise KascadeError("kascade.attention is forward-only (no backward yet); call it under torch.no_grad() "
                           "or pass tensors that do not require grad")
    (B, Hq, Sq, D), (Bk, Hkv, Sk, Dk), (Bv, Hv, Sv, Dv) = q.shape, k.shape, v.shape
    if not B == Bk == Bv:
        raise ShapeError(f"batch sizes differ: q {B}, k {Bk}, v {Bv}; they must be equal")
    if Hkv != Hv:
        raise ShapeError(f"k has {Hkv} heads but v has {Hv}; they must be equal")
    if Hkv == 0 or Hq % Hkv:
        raise ShapeError(f"q's {Hq} heads must be a multiple of k/v's {Hkv} heads (GQA: query head h reads "
                         f"KV head h // (Hq // Hkv)); accepted: Hkv >= 1 dividing Hq")
    if Sk != Sv:
        raise ShapeError(f"k has {Sk} keys but v has {Sv}; they must be equal")
    if D != Dk:
        raise ShapeError(f"q's head dim {D} differs from k's {Dk}; they must be equal (v's may differ)")
    for name, d in (("q/k", D), ("v", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ShapeError(f"{name} head dim {d} is not supported; supported: 1..{MAX_HEAD_DIM} "
                             f"(padded to a power of two >= 16 inside the kernel)")
    return B, Hq, Sq, D, Hkv, Sk, Dv


def _check_out(out, q: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=q.dtype, device=q.device)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != q.dtype \
            or out.device != q.device:
        got = f"{list(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ShapeError(f"out must be a {list(shape)} {q.dtype} tensor on {q.device} (B, Hq, Sq, Dv), got {got}")
    return out


def _check_window(window) -> tuple[tuple[int, int] | None, int, int]:
    """``(sides for the cascade or None, wl, wr)``."""
    if window is None:
        return None, 0, 0
    ok = isinstance(window, (tuple, list)) and len(window) == 2 and all(
        isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)
    if not ok:
        raise KascadeError(f"window must be None or (left, right) with ints >= -1 (-1: that side unbounded), "
                           f"got {window!r}")
    left, right = window
    if left == right == -1:
        return None, 0, 0
    return (left, right), max(left, 0), max(right, 0)


def _check_softcap(softcap) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) \
            or softcap < 0:
        raise KascadeError(f"softcap must be None, 0 (off) or a finite number > 0, got {softcap!r}")
    return float(softcap) if softcap > 0 else None


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise KascadeError(f"scale must be None (1/sqrt(head_dim)) or a finite number, got {scale!r}")
    return float(scale)


def _check_backend(backend, q: torch.Tensor) -> str:
    if backend is None:
        return "triton" if q.device.type == "cuda" else "reference"
    if backend not in BACKENDS:
        raise KascadeError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)} "
                           "(None: triton for CUDA tensors, reference for CPU tensors)")
    if backend == "triton" and q.device.type != "cuda":
        raise KascadeError(f"backend='triton' runs CUDA tensors, got tensors on {q.device}; use "
                           "backend='interpret' (CPU interpreter, small shapes) or 'reference'")
    return backend
