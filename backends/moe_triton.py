"""Running the expert-grouped MoE kernels: routing bookkeeping, then two grouped GEMMs and the combine.

:func:`run_moe_triton` is vLLM's ``fused_experts`` contract (``x`` (T, D), ``w1`` (E, 2F, D)
with the gate rows first, ``w2`` (E, D, F), the router's ``topk_weights`` / ``topk_ids``
(T, K)) on kernels rendered from a :func:`~kascade.passes.schedule_moe.moe_schedule`:

1. :func:`~kascade.backends.moe_routing.align_blocks` groups the (token, choice) pairs by
   expert into ``BLOCK_M``-row blocks (torch, no host synchronisation);
2. ``moe_gate_up`` writes the activation rows ``ACT`` (capacity x F, x's dtype);
3. ``moe_down`` multiplies them by ``w2`` and, with ``FUSED_COMBINE=1``, adds the weighted rows
   into an fp32 (T, D) accumulator, else writes them in pair order (T*K, D);
4. ``moe_combine`` (``FUSED_COMBINE=0``) sums each token's K rows into the output; with the
   fused combine the fp32 accumulator is cast into the output instead.

Every launch has a grid fixed by the row capacity, so nothing depends on how the tokens
were routed. Workspaces come from torch's allocator (ordered on the current stream).
Kernels are rendered once per (schedule, config, D, F) and go through
:mod:`kascade.backends.triton`: JIT on the GPU, the interpreter on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from kascade.backends.moe_routing import BlockAlignment, align_blocks, capacity
from kascade.backends.triton import launch
from kascade.codegen.moe_grouped_gemm import HIDDEN, INNER, PAIRS, ROWS, TOKENS, TOP_K, MoeSources, render
from kascade.ir.dtypes import DType
from kascade.ir.errors import DeviceError, DTypeError, KascadeError, ShapeError
from kascade.passes.schedule import Config, Schedule
from kascade.passes.schedule_moe import MoeGrouped, swiglu_moe_schedule

_DTYPES = {torch.float16: DType.F16, torch.bfloat16: DType.BF16, torch.float32: DType.F32}
_sources: dict[tuple[str, Config, int, int], MoeSources] = {}


def moe_sources(schedule: Schedule, config: Config, hidden: int, inner: int) -> MoeSources:
    """The rendered kernels of ``config`` (cached by the schedule's structural key and the dims)."""
    key = (schedule.key(), config, hidden, inner)
    if key not in _sources:
        _sources[key] = render(schedule, config, {"D": hidden, "F": inner})
    return _sources[key]


def run_moe_triton(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, config: Config, *, interpret: bool, out: torch.Tensor | None = None,
                   schedule: Schedule | None = None, residual: torch.Tensor | None = None,
                   directory: Path | None = None, align: Callable[..., BlockAlignment] = align_blocks) -> torch.Tensor:
    """``y[t] = (residual[t] +) sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t])``, (T, D) in x's dtype.

    ``schedule`` defaults to the library's SwiGLU MoE for x's dtype
    (:func:`~kascade.passes.schedule_moe.swiglu_moe_schedule`); another grouped MoE schedule
    brings its own activation (its input dtype must be x's). ``residual`` (T, D) is needed
    exactly when the schedule's combine adds one. ``out``, if given, is written and returned.
    ``interpret=True`` runs Triton's CPU interpreter (CPU tensors), else the GPU JIT (CUDA
    tensors). Expert ids must lie in ``[0, E)``; that is checked for CPU tensors only (a check
    on the GPU would synchronise). ``align``: the routing bookkeeping, torch's
    :func:`~kascade.backends.moe_routing.align_blocks` or the CUDA kernel's
    :func:`~kascade.backends.cuda_moe.align_blocks_cuda` (same outputs).
    """
    T, D, E, F, K = _check(x, w1, w2, topk_weights, topk_ids, out, residual, interpret)
    if schedule is None:
        schedule = swiglu_moe_schedule(_DTYPES[x.dtype])
    body = schedule.kernels[0].body
    if not isinstance(body, MoeGrouped):
        raise KascadeError(f"run_moe_triton needs a schedule from moe_schedule, got kernels "
                           f"{[k.family for k in schedule.kernels]}")
    if body.x.dtype is not _DTYPES[x.dtype]:
        raise DTypeError(f"the schedule's kernels take {body.x.dtype} activations and weights; x is {x.dtype}")
    if (residual is None) != (body.residual is None):
        raise ShapeError(f"the schedule's combine {'adds' if body.residual else 'has no'} residual "
                         f"{body.residual.name if body.residual else ''}; pass residual= exactly when it has one")
    if out is None:
        out = torch.empty((T, D), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    sources = moe_sources(schedule, config, D, F)
    bm = config["BLOCK_M"]
    routing = align(topk_ids, E, bm)
    cap = capacity(T, K, E, bm)
    extents = {ROWS: cap, PAIRS: T * K, TOKENS: T, TOP_K: K, HIDDEN: D, INNER: F}
    bookkeeping = {"SORTED_PAIRS": routing.sorted_pairs, "BLOCK_EXPERT": routing.block_expert,
                   "NUM_ROWS": routing.num_rows}
    act = torch.empty((cap, F), dtype=x.dtype, device=x.device)
    weights = topk_weights.to(torch.float32)
    run = dict(interpret=interpret, directory=directory)
    launch(sources.gate_up, {"X": x, "W13": w1.unflatten(1, (2, F)), "ACT": act, **bookkeeping}, {}, extents, **run)
    if sources.combine is None:   # FUSED_COMBINE=1: weighted rows meet in an fp32 accumulator
        direct = out.dtype == torch.float32 and residual is None
        acc = out.zero_() if direct else (residual.to(torch.float32, copy=True) if residual is not None else
                                          torch.zeros((T, D), dtype=torch.float32, device=x.device))
        launch(sources.down, {"ACT": act, "W2": w2, "TW": weights, "OUT": acc, **bookkeeping}, {}, extents, **run)
        if not direct:
            out.copy_(acc)
        return out
    rows = torch.empty((T * K, D), dtype=x.dtype, device=x.device)
    launch(sources.down, {"ACT": act, "W2": w2, "TW": weights, "OUT": rows, **bookkeeping}, {}, extents, **run)
    tensors = {"EO": rows, "TW": weights, "Y": out, **({"R": residual} if residual is not None else {})}
    launch(sources.combine, tensors, {}, extents, **run)
    return out


def _check(x, w1, w2, topk_weights, topk_ids, out, residual, interpret) -> tuple[int, int, int, int, int]:
    """``(T, D, E, F, K)``, or the kascade error that says which input is wrong and what is accepted."""
    named = {"x": x, "w1": w1, "w2": w2, "topk_weights": topk_weights, "topk_ids": topk_ids}
    for name, t in {**named, "out": out, "residual": residual}.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise KascadeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, want in (("x", 2), ("w1", 3), ("w2", 3), ("topk_weights", 2), ("topk_ids", 2)):
        if named[name].dim() != want:
            raise ShapeError(f"{name} must have {want} dims, got shape {list(named[name].shape)}; expected x (T, D), "
                             f"w1 (E, 2F, D), w2 (E, D, F), topk_weights / topk_ids (T, K)")
    (T, D), (E, F2, D1), (E2, D2, F) = x.shape, w1.shape, w2.shape
    if D1 != D or D2 != D or E2 != E or F2 != 2 * F or F == 0 or D == 0:
        raise ShapeError(f"shapes disagree: x {list(x.shape)}, w1 {list(w1.shape)}, w2 {list(w2.shape)}; expected "
                         f"x (T, D), w1 (E, 2F, D) (gate rows, then up rows), w2 (E, D, F) with D, F >= 1")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != T or topk_ids.shape[1] < 1:
        raise ShapeError(f"topk_ids {list(topk_ids.shape)} and topk_weights {list(topk_weights.shape)} must both be "
                         f"(T, K) with T = {T} tokens of x and K >= 1")
    if x.dtype not in _DTYPES or w1.dtype != x.dtype or w2.dtype != x.dtype:
        raise DTypeError(f"x, w1 and w2 must share one dtype of float16, bfloat16, float32; got {x.dtype}, "
                         f"{w1.dtype}, {w2.dtype}")
    if not topk_weights.is_floating_point() or topk_ids.is_floating_point() or topk_ids.dtype == torch.bool:
        raise DTypeError(f"topk_weights must be floating point and topk_ids integer, got {topk_weights.dtype} and "
                         f"{topk_ids.dtype}")
    for name, t, shape in (("out", out, (T, D)), ("residual", residual, (T, D))):
        if t is not None and (tuple(t.shape) != shape or t.dtype != x.dtype):
            raise ShapeError(f"{name}= must be a ({T}, {D}) tensor of {x.dtype}, got {list(t.shape)} {t.dtype}")
    devices = {t.device for t in (*named.values(), out, residual) if t is not None}
    if len(devices) != 1:
        raise DeviceError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if interpret and device.type != "cpu":
        raise DeviceError(f"the interpreter runs CPU tensors; these are on {device}")
    if not interpret and device.type != "cuda":
        raise DeviceError(f"the Triton GPU path runs CUDA tensors, these are on {device}; pass interpret=True "
                          f"for CPU tensors")
    if device.type == "cpu" and topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= E):
        raise ShapeError(f"topk_ids must lie in [0, {E}) (E experts of w1), got values in "
                         f"[{int(topk_ids.min())}, {int(topk_ids.max())}]")
    return T, D, E, F, topk_ids.shape[1]
