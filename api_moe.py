"""``kascade.moe``: a Mixture-of-Experts block with SwiGLU experts, in vLLM's fused_moe layout.

Routing (softmax over the experts in fp32, top-k, optional renormalisation) is decided here or
passed in; the expert part runs as the expert-grouped kernels of
:func:`~kascade.passes.schedule_moe.swiglu_moe_schedule` (the library's MoE cascade rewritten
by :func:`~kascade.passes.moe_grouping.group_experts`), or through the float64 evaluator.

Which config runs: a tuned record for the shape bucket (tokens rounded to a power of two),
else the cost model's best, else the schedule's heuristic default (``KASCADE_DEBUG=1`` says
which and why).
"""

from __future__ import annotations

import sys
from functools import cache, lru_cache

import torch

from kascade.autotune.choose import aot_check
from kascade.autotune.choose import choose_config as choose_tuned_or_modelled
from kascade.backends.reference import evaluate
from kascade.ir.cascade import Cascade
from kascade.ir.dtypes import DType, bf16, f16, f32
from kascade.ir.errors import DeviceError, DTypeError, KascadeError, ShapeError
from kascade.ir.library.moe import moe as moe_cascade
from kascade.ir.library.moe import moe_experts
from kascade.ir.settings import settings
from kascade.passes.schedule import Config, Schedule
from kascade.passes.schedule_moe import choose_moe_config, swiglu_moe_schedule

ACTIVATIONS = ("swiglu",)
BACKENDS = ("triton", "interpret", "reference")
INTERPRET_LIMIT = 1 << 24       # T * K * 3 * D * F multiply-adds the CPU interpreter is asked to do
# the evaluator gathers each (token, choice)'s expert weights in float64: T * K * 3 * D * F values
REFERENCE_LIMIT = 1 << 27       # 1 GiB of gathered weights
_DTYPES = {torch.float16: f16, torch.bfloat16: bf16, torch.float32: f32}


def moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, router_logits: torch.Tensor | None = None, *,
        top_k: int | None = None, renormalize: bool = True, activation: str = "swiglu",
        topk_weights: torch.Tensor | None = None, topk_ids: torch.Tensor | None = None,
        backend: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y[t] = sum over the token's chosen experts e of w_e * W2[e] (silu(gate_e x[t]) * (up_e x[t]))``.

    ``x``: (T, D); ``w1``: (E, 2F, D), gate rows ``[0, F)`` then up rows ``[F, 2F)``; ``w2``: (E, D, F);
    all one dtype of float16, bfloat16, float32. Routing, one of:

    - ``router_logits`` (T, E) and ``top_k``: probabilities ``softmax(router_logits)`` in fp32, the
      ``top_k`` most probable experts (ties: the lower expert id), weights renormalised to sum to
      one with ``renormalize`` (Mixtral), else the probabilities themselves. Logits must be finite
      except ``-inf`` (an expert the token may not pick), with at least ``top_k`` finite per row;
      NaN or ``+inf`` is an error (one device sync checks it).
    - ``topk_weights`` (T, K) float and ``topk_ids`` (T, K) int (routing decided elsewhere): ids in
      ``[0, E)`` and distinct within a row (one device sync checks both).

    Returns (T, D) in x's dtype (``out``: written and returned). ``backend``: ``"triton"`` (default for
    CUDA tensors), ``"interpret"`` (Triton's CPU interpreter, fp16/fp32, small shapes),
    ``"reference"`` (default for CPU tensors: the float64 evaluator of the library cascade).
    """
    T, D, E, F = check_weights(x, w1, w2)
    if activation not in ACTIVATIONS:
        raise KascadeError(f"activation {activation!r} is not supported; accepted: {', '.join(ACTIVATIONS)} "
                           "(silu(gate) * up, w1 = [gate; up])")
    if not isinstance(renormalize, bool):
        raise KascadeError(f"renormalize must be a bool, got {renormalize!r}")
    backend = _check_backend(backend, x)
    if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != (T, D) or out.dtype != x.dtype
                            or out.device != x.device):
        raise ShapeError(f"out must be a ({T}, {D}) tensor of {x.dtype} on {x.device}, got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    given = topk_weights is not None or topk_ids is not None
    if given == (router_logits is not None):
        raise KascadeError("pass either router_logits (with top_k) or topk_weights and topk_ids, not both and not "
                           "neither")
    if given:
        K = _check_routing(topk_weights, topk_ids, T, E, x)
        if top_k is not None and top_k != K:
            raise ShapeError(f"top_k={top_k} but topk_ids has {K} experts per token")
        weights, ids = topk_weights, topk_ids
    else:
        K = _check_top_k(top_k, E)
        _check_logits(router_logits, T, E, x, K)
        if backend == "reference":
            _check_reference_size(T, K, D, F)
            return _write(out, _reference_routed(x, w1, w2, router_logits, K, renormalize), x)
        weights, ids = route(router_logits, K, renormalize)
    if backend == "reference":
        _check_reference_size(T, K, D, F)
        return _write(out, _reference_given(x, w1, w2, weights, ids), x)
    if backend == "interpret":
        if x.dtype == torch.bfloat16:
            raise DTypeError("backend='interpret' cannot run bf16: Triton's CPU interpreter computes bf16 tl.dot "
                             "wrongly; use fp16 or fp32, backend='reference', or backend='triton' on a GPU")
        if T * K * 3 * D * F > INTERPRET_LIMIT:
            raise ShapeError(f"backend='interpret' is for tests and small shapes: T*K*3*D*F = {T * K * 3 * D * F} "
                             f"exceeds {INTERPRET_LIMIT}; use backend='triton' on a GPU or backend='reference'")
    schedule = swiglu_moe_schedule(_DTYPES[x.dtype])
    config, why = _config(schedule, (("T", _pow2(T)), ("K", K), ("E", E), ("D", D), ("F", F)), x.dtype, x.device,
                          backend)
    _debug(f"kascade.moe: backend={backend} T={T} E={E} K={K} D={D} F={F} config={config.key()} ({why})")
    from kascade.backends.moe_triton import run_moe_triton
    return run_moe_triton(x, w1, w2, weights, ids.to(torch.int32), config, interpret=backend == "interpret",
                          out=out, schedule=schedule, align=_bookkeeping(x.device))


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights fp32, topk_ids int32)``: softmax over the experts in fp32, top-k, renormalised."""
    probs = torch.softmax(router_logits.to(torch.float32), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1, sorted=True)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


# ---- the reference path -------------------------------------------------------------------
def _reference_routed(x, w1, w2, logits, K, renormalize) -> torch.Tensor:
    c = _routed_cascade(renormalize, _DTYPES[x.dtype])
    F = w2.shape[2]
    ins = {"X": x.double(), "LG": logits.double(), "W13": w1.unflatten(1, (2, F)).double(), "W2": w2.double()}
    return evaluate(c, ins, {}, {"K": K})["Y"]


def _reference_given(x, w1, w2, weights, ids) -> torch.Tensor:
    c = _experts_cascade(_DTYPES[x.dtype])
    F = w2.shape[2]
    ins = {"X": x.double(), "TW": weights.double(), "TI": ids.to(torch.int32),
           "W13": w1.unflatten(1, (2, F)).double(), "W2": w2.double()}
    return evaluate(c, ins, {})["Y"]


@cache
def _routed_cascade(renormalize: bool, dtype: DType) -> Cascade:
    return moe_cascade(top_k_renormalize=renormalize, form="gather", dtype=dtype)


@cache
def _experts_cascade(dtype: DType) -> Cascade:
    return moe_experts(dtype=dtype)


def _write(out: torch.Tensor | None, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return y.to(like.dtype) if out is None else out.copy_(y)


# ---- the config ---------------------------------------------------------------------------
@lru_cache(maxsize=1024)
def _config(schedule: Schedule, shapes: tuple, dtype: torch.dtype, device: torch.device,
            backend: str = "triton") -> tuple[Config, str]:
    """Tuned record, else the model's best (on the GPU: the first whose GEMMs compile without
    spills for the device), else the heuristic; per token bucket (cached)."""
    ext = dict(shapes)
    check = aot_check(schedule, {"D": ext["D"], "F": ext["F"]}) if backend == "triton" else None
    item = torch.empty((), dtype=dtype).element_size()

    def fallback() -> tuple[Config, str]:
        return choose_moe_config(schedule, {**ext, "itemsize": item})
    return choose_tuned_or_modelled(schedule, ext, dtype, device, compiles_cleanly=check, fallback=fallback)


@lru_cache(maxsize=8)
def _bookkeeping(device: torch.device):
    """The routing bookkeeping: the CUDA kernel (one launch) where CuPy is installed, else torch's
    formulation (a few small launches, same outputs)."""
    from kascade.backends.moe_routing import align_blocks
    if device.type != "cuda":
        return align_blocks
    try:
        import cupy  # noqa: F401
    except ImportError:
        return align_blocks
    from kascade.backends.cuda_moe import align_blocks_cuda
    return align_blocks_cuda


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _debug(line: str) -> None:
    if settings().debug:
        print(line, file=sys.stderr)


# ---- input checks ---------------------------------------------------------------------------
def check_weights(x, w1, w2) -> tuple[int, int, int, int]:
    for name, t, dims in (("x", x, "(T, D)"), ("w1", w1, "(E, 2F, D)"), ("w2", w2, "(E, D, F)")):
        if not isinstance(t, torch.Tensor):
            raise KascadeError(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
        if t.dim() != len(dims.split(",")):
            raise ShapeError(f"{name} must be {dims}, got shape {list(t.shape)}")
        if t.dtype not in _DTYPES:
            raise DTypeError(f"{name} is {t.dtype}; accepted: torch.float16, torch.bfloat16, torch.float32")
    if w1.dtype != x.dtype or w2.dtype != x.dtype:
        raise DTypeError(f"x, w1 and w2 must share one dtype, got {x.dtype}, {w1.dtype}, {w2.dtype}")
    if len({x.device, w1.device, w2.device}) != 1:
        raise DeviceError(f"x, w1, w2 must be on one device, got {x.device}, {w1.device}, {w2.device}")
    (T, D), (E, F2, D1), (E2, D2, F) = x.shape, w1.shape, w2.shape
    if E < 1 or E2 != E:
        raise ShapeError(f"w1 has {E} experts and w2 {E2}; they must be equal and at least 1")
    if D1 != D or D2 != D or D < 1:
        raise ShapeError(f"hidden size D disagrees: x {list(x.shape)} (T, D), w1 {list(w1.shape)} (E, 2F, D), "
                         f"w2 {list(w2.shape)} (E, D, F)")
    if F < 1 or F2 != 2 * F:
        raise ShapeError(f"w1 {list(w1.shape)} must stack gate and up as (E, 2F, D) with F = w2's last dim {F}")
    return T, D, E, F


def _check_top_k(top_k, E: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise KascadeError(f"top_k must be an int from 1 to the number of experts E={E}, got {top_k!r}")
    return top_k


def _check_logits(logits, T: int, E: int, x: torch.Tensor, K: int) -> None:
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (T, E) or not logits.is_floating_point():
        raise ShapeError(f"router_logits must be a floating-point (T, E) = ({T}, {E}) tensor, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)} {getattr(logits, 'dtype', '')}")
    if logits.device != x.device:
        raise DeviceError(f"router_logits is on {logits.device} but x on {x.device}")
    bad = torch.isnan(logits) | torch.isposinf(logits)
    finite = torch.isfinite(logits).sum(dim=-1)
    if T and bool(bad.any() | (finite < K).any()):           # one device sync
        row = int((bad.any(dim=-1) | (finite < K)).nonzero()[0])
        raise KascadeError(f"router_logits row {row} has NaN or +inf, or fewer than top_k={K} finite logits: "
                           "accepted are finite logits and -inf for experts a token may not pick")


def _check_routing(weights, ids, T: int, E: int, x: torch.Tensor) -> int:
    for name, t in (("topk_weights", weights), ("topk_ids", ids)):
        if not isinstance(t, torch.Tensor):
            raise KascadeError(f"{name} must be a (T, K) torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise DeviceError(f"{name} is on {t.device} but x on {x.device}")
    if weights.dim() != 2 or ids.shape != weights.shape or weights.shape[0] != T or weights.shape[1] < 1:
        raise ShapeError(f"topk_weights {list(weights.shape)} and topk_ids {list(ids.shape)} must both be (T, K) with "
                         f"T={T} tokens and K >= 1")
    if not weights.is_floating_point():
        raise DTypeError(f"topk_weights must be floating point, got {weights.dtype}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise DTypeError(f"topk_ids must be torch.int32 or torch.int64, got {ids.dtype}")
    K = ids.shape[1]
    if K > E:
        raise ShapeError(f"{K} experts per token but only E={E} experts")
    if T:
        ordered = ids.sort(dim=-1).values
        dup = (ordered[:, 1:] == ordered[:, :-1]).any(dim=-1)
        # one device sync for all three facts: ids index the weights, so they are checked
        lo, hi, any_dup = torch.stack([ordered[:, 0].min(), ordered[:, -1].max(), dup.any().to(ordered.dtype)]).tolist()
        if lo < 0 or hi >= E:
            raise ShapeError(f"topk_ids must lie in [0, {E}) (E experts of w1), got values in [{lo}, {hi}]")
        if any_dup:
            row = int(dup.nonzero()[0])
            raise ShapeError(f"topk_ids row {row} names expert {ids[row].tolist()} more than once; each token's "
                             "experts must be distinct")
    return K


def _check_reference_size(T: int, K: int, D: int, F: int) -> None:
    if T * K * 3 * D * F > REFERENCE_LIMIT:
        raise ShapeError(f"backend='reference' gathers every chosen expert's weights in float64: T*K*3*D*F = "
                         f"{T * K * 3 * D * F} values exceed {REFERENCE_LIMIT} (1 GiB); use backend='triton' on a "
                         "GPU, or fewer tokens")


def _check_backend(backend, x: torch.Tensor) -> str:
    if backend is None:
        return "triton" if x.device.type == "cuda" else "reference"
    if backend not in BACKENDS:
        raise KascadeError(f"unknown backend {backend!r} for moe; accepted: {', '.join(BACKENDS)} "
                           "(None: triton for CUDA tensors, reference for CPU tensors)")
    if backend == "triton" and x.device.type != "cuda":
        raise DeviceError(f"backend='triton' runs CUDA tensors, got tensors on {x.device}; use backend='interpret' "
                          "(CPU interpreter, small shapes) or 'reference'")
    if backend == "interpret" and x.device.type != "cpu":
        raise DeviceError(f"backend='interpret' runs CPU tensors, got tensors on {x.device}")
    return backend
