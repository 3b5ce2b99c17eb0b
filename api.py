"""The public Python API: ``kascade.attention``, ``attention_varlen`` and ``paged_decode_attention``.

Each call builds the library cascade for the requested variant (``ir.library``), schedules
it (``passes.schedule`` / ``passes.schedule_decode``), picks a config, renders the Triton
kernel(s) (``codegen``) and runs them on a backend. Everything but the launch is cached per
variant, so repeated calls cost a dictionary lookup (plus, for the varlen and paged calls,
one device sync to check the offsets / lengths against the tensors).

The three calls share their input checks (the ``_check_*`` helpers below): tensor types,
dtypes and devices, GQA head counts, head dims, windows, soft-caps, scales, backends and
``out=``; every rejection is a kascade error that says what was wrong and what is accepted.
"""

from __future__ import annotations

import math
import sys
from functools import cache, lru_cache

import torch

from kascade.autotune.choose import aot_check, device_target
from kascade.autotune.choose import choose_config as choose_tuned_or_modelled
from kascade.backends.reference import evaluate
from kascade.codegen.attention_prefill import render
from kascade.codegen.paged_decode import PagedDecodeSources
from kascade.codegen.paged_decode import render as render_decode
from kascade.codegen.source import KernelSource
from kascade.ir.cascade import Cascade
from kascade.ir.dtypes import DType, bf16, f16, f32
from kascade.ir.errors import DeviceError, DTypeError, KascadeError, ShapeError
from kascade.ir.extents import bind_extents
from kascade.ir.library import attention as attention_cascade
from kascade.ir.library import paged_decode as paged_decode_cascade
from kascade.ir.settings import settings
from kascade.passes.schedule import (
    MAX_HEAD_DIM,
    Config,
    Schedule,
    attention_prefill_schedule,
    attention_varlen_schedule,
    padded_head_dim,
)
from kascade.passes.schedule_decode import MAX_GROUP, MAX_SPLITS, choose_decode_config, paged_decode_schedule
from kascade.passes.score import soft_cap

BACKENDS = ("triton", "interpret", "reference")
DECODE_BACKENDS = ("triton", "cuda", "interpret", "reference")
INTERPRET_LIMIT = 20_000_000   # query-key pairs x heads above which the interpreter would take minutes
MAX_GRID_YZ = 65535            # CUDA's limit on grid axes 1 and 2
_DTYPES = {torch.float16: f16, torch.bfloat16: bf16, torch.float32: f32}
_INDEX_DTYPES = (torch.int32, torch.int64)


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
    _check_floats("attention", q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_ndim(name, t, "(batch, heads, seqlen, head_dim)")
    (B, Hq, Sq, D), (Bk, Hkv, Sk, Dk), (Bv, Hv, Sv, Dv) = q.shape, k.shape, v.shape
    if not B == Bk == Bv:
        raise ShapeError(f"batch sizes differ: q {B}, k {Bk}, v {Bv}; they must be equal")
    _check_heads(Hq, Hkv, Hv)
    if Sk != Sv:
        raise ShapeError(f"k has {Sk} keys but v has {Sv}; they must be equal")
    _check_head_dims(D, Dk, Dv)
    variant = _check_variant(causal, window, softcap)
    scale = _check_scale(scale, D)
    backend = _check_backend(backend, q, BACKENDS)
    out = _check_out(out, q, (B, Hq, Sq, Dv), "(B, Hq, Sq, Dv)")
    _check_interpretable(backend, q, B * Hq * Sq * Sk, "B*Hq*Sq*Sk")
    cascade = _cascade(variant.causal, variant.sides, variant.cap is not None, _DTYPES[q.dtype])
    params = variant.params(cascade, scale)
    G, R = Hkv, Hq // Hkv
    inputs = {"Q": q.unflatten(1, (G, R)), "K": k, "V": v}   # query head g * R + r reads KV head g: a view
    if backend == "reference":
        _debug(f"kascade.attention: backend=reference cascade={cascade.name}")
        return out.copy_(evaluate(cascade, inputs, params)["O"].flatten(1, 2))
    extents = bind_extents(cascade, {n: tuple(t.shape) for n, t in inputs.items()})
    schedule = _schedule(cascade)
    config, why = _prefill_config(schedule, tuple(sorted(extents.items())), q.dtype, q.device, backend,
                                  tuple(sorted((k, v) for k, v in params.items() if isinstance(v, int))))
    src = _source(schedule, config, padded_head_dim(D), padded_head_dim(Dv))
    _debug(f"kascade.attention: backend={backend} kernel={src.name} config={config.key()} ({why})")
    from kascade.backends.triton import run
    run(src, inputs, params, extents, interpret=backend == "interpret", out=out.unflatten(1, (G, R)))
    return out


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     window: tuple[int, int] | None = None, softcap: float | None = None,
                     scale: float | None = None, backend: str | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over packed variable-length sequences, flash-attn's ``varlen`` layout.

    ``q``: (total_q, Hq, D); ``k``: (total_k, Hkv, D); ``v``: (total_k, Hkv, Dv): sequence i
    owns rows ``cu_seqlens_q[i] : cu_seqlens_q[i + 1]`` of q and ``cu_seqlens_k[i] :
    cu_seqlens_k[i + 1]`` of k and v. ``cu_seqlens_q`` / ``cu_seqlens_k``: int32 or int64,
    (batch + 1,), ``0 = cu[0] <= cu[1] <= ... <= cu[batch] = total``. ``max_seqlen_q`` /
    ``max_seqlen_k``: at least the longest sequence (they size the grid). Each sequence is
    attended as :func:`attention` would attend it alone: ``causal`` and ``window`` aligned to
    its own bottom-right corner, GQA, ``softcap``, ``scale`` and the dtypes as there; a query
    that sees no key outputs 0. Returns (total_q, Hq, Dv) in q's dtype (``out``: write there).
    ``backend`` as for :func:`attention` (``"reference"``: the float64 evaluator of the same
    cascade, one sequence at a time). One device sync checks the offsets.
    """
    _check_floats("attention_varlen", q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_ndim(name, t, "(total_tokens, heads, head_dim)")
    (Tq, Hq, D), (Tk, Hkv, Dk), (Tv, Hv, Dv) = q.shape, k.shape, v.shape
    _check_heads(Hq, Hkv, Hv)
    if Tk != Tv:
        raise ShapeError(f"k has {Tk} tokens but v has {Tv}; they must be equal")
    _check_head_dims(D, Dk, Dv)
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_index(name, t, 1, "(batch + 1,)", q)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel() or cu_seqlens_q.numel() == 0:
        raise ShapeError(f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 >= 1 entries, got "
                         f"{cu_seqlens_q.numel()}, {cu_seqlens_k.numel()}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise KascadeError(f"{name} must be an int >= 0 (at least the longest sequence), got {value!r}")
    variant = _check_variant(causal, window, softcap)
    scale = _check_scale(scale, D)
    backend = _check_backend(backend, q, BACKENDS)
    out = _check_out(out, q, (Tq, Hq, Dv), "(total_q, Hq, Dv)")
    values = torch.cat([cu_seqlens_q.long(), cu_seqlens_k.long()]).tolist()   # the one device sync
    half = len(values) // 2
    lens_q = _check_offsets("cu_seqlens_q", values[:half], Tq, "q", "max_seqlen_q", max_seqlen_q)
    lens_k = _check_offsets("cu_seqlens_k", values[half:], Tk, "k and v", "max_seqlen_k", max_seqlen_k)
    batch = len(lens_q)
    _check_interpretable(backend, q, Hq * sum(a * b for a, b in zip(lens_q, lens_k)), "Hq * sum(Sq_i * Sk_i)")
    cascade = _cascade(variant.causal, variant.sides, variant.cap is not None, _DTYPES[q.dtype])
    params = variant.params(cascade, scale)
    G, R = Hkv, Hq // Hkv
    if backend == "reference":
        _debug(f"kascade.attention_varlen: backend=reference cascade={cascade.name}, one sequence at a time")
        starts_q, starts_k = _starts(lens_q), _starts(lens_k)
        for i in range(batch):
            rows_q, rows_k = slice(starts_q[i], starts_q[i + 1]), slice(starts_k[i], starts_k[i + 1])
            inputs = {"Q": q[rows_q].unflatten(1, (G, R)).permute(1, 2, 0, 3)[None],
                      "K": k[rows_k].permute(1, 0, 2)[None], "V": v[rows_k].permute(1, 0, 2)[None]}
            got = evaluate(cascade, inputs, params)["O"][0]          # (G, R, Sq_i, Dv)
            out[rows_q] = got.permute(2, 0, 1, 3).flatten(1, 2).to(out.dtype)
        return out
    if backend == "triton" and batch * Hq > MAX_GRID_YZ:
        raise ShapeError(f"batch x Hq = {batch} x {Hq} exceeds the varlen kernel's grid limit of {MAX_GRID_YZ} "
                         "(sequences x heads); split the call into smaller batches")
    schedule = _varlen_schedule(cascade)
    extents = {"B": batch, "G": G, "R": R, "P": max_seqlen_q, "M": max_seqlen_k, "E": D, "F": Dv}
    # the dense traffic model at the longest sequences: an upper estimate for packed ones
    config, why = _prefill_config(schedule, tuple(sorted(extents.items())), q.dtype, q.device, backend,
                                  tuple(sorted((k, v) for k, v in params.items() if isinstance(v, int))))
    src = _source(schedule, config, padded_head_dim(D), padded_head_dim(Dv))
    _debug(f"kascade.attention_varlen: backend={backend} kernel={src.name} config={config.key()} ({why}; "
           f"max_seqlen_q={max_seqlen_q}, max_seqlen_k={max_seqlen_k}, {batch} sequences)")
    body = schedule.kernels[0].body
    tensors = {"Q": q.unflatten(1, (G, R)), "K": k, "V": v,
               body.packed.query_starts.name: cu_seqlens_q.to(torch.int32),
               body.packed.key_starts.name: cu_seqlens_k.to(torch.int32)}
    from kascade.backends.triton import launch
    launch(src, {**tensors, body.out.name: out.unflatten(1, (G, R))}, params, extents,
           interpret=backend == "interpret")
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, *, softcap: float | None = None,
                           scale: float | None = None, num_splits: int | None = None, backend: str | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention: one new query token per sequence against a paged KV cache.

    ``q``: (B, Hq, D); ``k_cache``: (num_blocks, block_size, Hkv, D); ``v_cache``: (num_blocks,
    block_size, Hkv, Dv) (vLLM / flash-attn layout; any block size, power of two or not);
    ``block_table``: (B, max_blocks) int32 / int64, sequence b's j-th page is cache block
    ``block_table[b, j]``; ``seq_lens``: (B,) int32 / int64, ``0 <= seq_lens[b] <= max_blocks *
    block_size``. Entries past a sequence's pages are never read. Query head h reads KV head
    ``h // (Hq // Hkv)``; ``scale`` defaults to 1/sqrt(D); ``softcap`` as for :func:`attention`.
    A sequence of length 0 gets 0. Returns (B, Hq, Dv) in q's dtype (``out``: write there).

    ``num_splits`` (default: enough programs to fill the GPU, at least 64 keys and a page per
    split) splits each sequence's own pages into that many parts (FlashDecoding), merged
    exactly; more splits than pages is fine. ``backend``: ``"triton"`` (default on CUDA),
    ``"cuda"`` (the CUDA C++ kernel through CuPy, head dims multiples of 8), ``"interpret"``,
    ``"reference"`` (default on CPU: the float64 evaluator of the library's paged-decode
    cascade). One device sync checks the lengths and the used block-table entries.
    """
    _check_floats("paged_decode_attention", q=q, k_cache=k_cache, v_cache=v_cache)
    _check_ndim("q", q, "(batch, heads, head_dim)")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_ndim(name, t, "(num_blocks, block_size, kv_heads, head_dim)")
    (B, Hq, D), (N, BS, Hkv, Dk), (Nv, BSv, Hv, Dv) = q.shape, k_cache.shape, v_cache.shape
    if (N, BS) != (Nv, BSv):
        raise ShapeError(f"k_cache has {N} blocks of {BS} positions but v_cache {Nv} of {BSv}; they must be equal")
    if BS == 0:
        raise ShapeError("the caches' block_size (dim 1) must be at least 1")
    _check_heads(Hq, Hkv, Hv, kv="the caches'")
    _check_head_dims(D, Dk, Dv, k="k_cache", v="v_cache")
    if Hq // Hkv > MAX_GROUP:
        raise ShapeError(f"Hq / Hkv = {Hq // Hkv} query heads per KV head; the paged decode kernels take up to "
                         f"{MAX_GROUP}")
    _check_index("block_table", block_table, 2, "(batch, max_blocks)", q)
    _check_index("seq_lens", seq_lens, 1, "(batch,)", q)
    if block_table.shape[0] != B or seq_lens.shape[0] != B:
        raise ShapeError(f"block_table (batch, max_blocks) and seq_lens (batch,) need one row per sequence of q "
                         f"(batch {B}); got {list(block_table.shape)} and {list(seq_lens.shape)}")
    variant = _check_variant(False, None, softcap)
    scale = _check_scale(scale, D)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise KascadeError(f"num_splits must be None (chosen for you) or an int from 1 to {MAX_SPLITS}, "
                           f"got {num_splits!r}")
    backend = _check_backend(backend, q, DECODE_BACKENDS)
    out = _check_out(out, q, (B, Hq, Dv), "(B, Hq, Dv)")
    longest, total = _check_paged_lengths(block_table, seq_lens, N, BS)
    _check_interpretable(backend, q, Hq * total, "Hq * sum(seq_lens)")
    if backend == "cuda":
        from kascade.backends.cuda import paged_decode_attention_cuda
        _debug(f"kascade.paged_decode_attention: backend=cuda num_splits={num_splits or 'default'}")
        return paged_decode_attention_cuda(q, k_cache, v_cache, block_table, seq_lens, scale=scale,
                                           softcap=variant.cap, num_splits=num_splits, out=out)
    cascade = _decode_cascade(variant.cap is not None, _DTYPES[q.dtype])
    params = variant.params(cascade, scale)
    G, R = Hkv, Hq // Hkv
    inputs = {"Q": q.unflatten(1, (G, R)), "KC": k_cache, "VC": v_cache, "BT": block_table.to(torch.int32),
              "SL": seq_lens.to(torch.int32)}
    if backend == "reference":
        _debug(f"kascade.paged_decode_attention: backend=reference cascade={cascade.name}")
        return out.copy_(evaluate(cascade, inputs, params)["O"].flatten(1, 2))
    if backend == "triton" and (B > MAX_GRID_YZ or G > MAX_GRID_YZ):
        raise ShapeError(f"batch {B} and Hkv {G} must be at most {MAX_GRID_YZ} (the decode kernel's grid limit)")
    schedule = _decode_schedule(cascade)
    config, why = _decode_config(schedule, (("B", _pow2(B)), ("G", G), ("R", R), ("E", D), ("F", Dv), ("M0", BS),
                                            ("L", max(16, _pow2(longest)))), q.dtype, q.device, backend)
    if num_splits is not None:
        config, why = config.replace(num_splits=num_splits), why + f"; num_splits={num_splits} given"
    sources = _decode_sources(schedule, config.replace(num_splits=1), D, Dv, R, BS)
    _debug(f"kascade.paged_decode_attention: backend={backend} kernels={sources.partial.name} + "
           f"{sources.merge.name} config={config.key()} ({why})")
    extents = {"B": B, "G": G, "R": R, "E": D, "F": Dv}
    from kascade.backends.triton import run_paged_decode
    run_paged_decode(sources, inputs, params, extents, config["num_splits"], interpret=backend == "interpret",
                     out=out.unflatten(1, (G, R)))
    return out


# ---- cached per variant ----------------------------------------------------------------
@lru_cache(maxsize=1024)
def _prefill_config(schedule: Schedule, extents: tuple, dtype: torch.dtype, device: torch.device, backend: str,
                    int_params: tuple) -> tuple[Config, str]:
    """A tuned record for the shape bucket, else the cost model's best candidate; on the GPU the
    candidate must also compile cleanly (no spills, fits) for the device. Cached per shape, so
    records tuned while the process runs are seen by the next process."""
    ext = dict(extents)
    body, c = schedule.kernels[0].body, schedule.cascade
    heads = {c.rank_extent(r): padded_head_dim(ext[c.rank_extent(r)]) for r in (body.head, body.vhead)}
    check = aot_check(schedule, heads) if backend == "triton" else None
    return choose_tuned_or_modelled(schedule, ext, dtype, device, dict(int_params), compiles_cleanly=check)



@lru_cache(maxsize=1024)
def _decode_config(schedule: Schedule, extents: tuple, dtype: torch.dtype, device: torch.device,
                   backend: str) -> tuple[Config, str]:
    """As :func:`_prefill_config`, at the decode sizes rounded to their tuning bucket (the batch and the
    longest sequence to powers of two: a decode loop grows its lengths every step and must not
    re-rank every step). When none of the model's first candidates compiles cleanly, the
    measured spill-free defaults of ``choose_decode_config`` run."""
    ext = dict(extents)
    check = aot_check(schedule, _decode_render_sizes(schedule, ext["E"], ext["F"], ext["R"], ext["M0"])) \
        if backend == "triton" else None
    sms = device_target(device).sm_count

    def fallback() -> tuple[Config, str]:
        return choose_decode_config(schedule, {**ext, "itemsize": torch.empty((), dtype=dtype).element_size(),
                                               "sm_count": sms})
    return choose_tuned_or_modelled(schedule, ext, dtype, device, compiles_cleanly=check, fallback=fallback)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@cache
def _cascade(causal: bool, sides: tuple[int, int] | None, softcap: bool, dtype: DType) -> Cascade:
    return attention_cascade("2pass", causal=causal, window=sides, softcap=softcap, dtype=dtype)


@cache
def _decode_cascade(softcap: bool, dtype: DType) -> Cascade:
    c = paged_decode_cascade(dtype=dtype)
    return soft_cap(c) if softcap else c


@cache
def _schedule(cascade: Cascade) -> Schedule:
    return attention_prefill_schedule(cascade)


@cache
def _varlen_schedule(cascade: Cascade) -> Schedule:
    return attention_varlen_schedule(cascade)


@cache
def _decode_schedule(cascade: Cascade) -> Schedule:
    return paged_decode_schedule(cascade)


@lru_cache(maxsize=256)
def _source(schedule: Schedule, config: Config, block_e: int, block_f: int) -> KernelSource:
    c, body = schedule.cascade, schedule.kernels[0].body
    return render(schedule, config, {c.rank_extent(body.head): block_e, c.rank_extent(body.vhead): block_f})


@lru_cache(maxsize=256)
def _decode_sources(schedule: Schedule, config: Config, d: int, dv: int, r: int, page: int) -> PagedDecodeSources:
    return render_decode(schedule, config, _decode_render_sizes(schedule, d, dv, r, page))


def _decode_render_sizes(schedule: Schedule, d: int, dv: int, r: int, page: int) -> dict[str, int]:
    c, body = schedule.cascade, schedule.kernels[0].body
    return {c.rank_extent(body.head): padded_head_dim(d), c.rank_extent(body.vhead): padded_head_dim(dv),
            c.rank_extent(body.group): r, c.rank_extent(body.slot): page}


def _debug(line: str) -> None:
    if settings().debug:
        print(line, file=sys.stderr)


# ---- input checks, shared by the three calls --------------------------------------------
class _Variant:
    """The checked mask / soft-cap options: what the cascade is built with, and its params."""

    def __init__(self, causal: bool, sides: tuple[int, int] | None, wl: int, wr: int, cap: float | None):
        self.causal, self.sides, self.wl, self.wr, self.cap = causal, sides, wl, wr, cap

    def params(self, cascade: Cascade, scale: float) -> dict[str, float | int]:
        values = {"scale": scale, "cap": self.cap, "wl": self.wl, "wr": self.wr}
        return {p.name: values[p.name] for p in cascade.params}


def _check_variant(causal, window, softcap) -> _Variant:
    if not isinstance(causal, bool):
        raise KascadeError(f"causal must be True or False, got {causal!r}")
    sides, wl, wr = _check_window(window)
    return _Variant(causal, sides, wl, wr, _check_softcap(softcap))


def _check_floats(fn: str, **tensors) -> None:
    """Tensors of one accepted float dtype on one device, not requiring grad."""
    names = ", ".join(tensors)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise KascadeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise DTypeError(f"{name} is {t.dtype}; accepted: torch.float16, torch.bfloat16, torch.float32")
    ts = list(tensors.values())
    if len({t.dtype for t in ts}) > 1:
        raise DTypeError(f"{names} must have the same dtype, got {', '.join(str(t.dtype) for t in ts)}")
    if len({t.device for t in ts}) > 1:
        raise KascadeError(f"{names} must be on the same device, got {', '.join(str(t.device) for t in ts)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        raise KascadeError(f"kascade.{fn} is forward-only (no backward yet); call it under torch.no_grad() "
                           "or pass tensors that do not require grad")


def _check_ndim(name: str, t: torch.Tensor, dims: str) -> None:
    want = dims.count(",") + 1
    if t.ndim != want:
        raise ShapeError(f"{name} must have {want} dims {dims}, got shape {list(t.shape)}")


def _check_heads(hq: int, hkv: int, hv: int, kv: str = "k/v's") -> None:
    if hkv != hv:
        what = "k_cache has {} heads but v_cache has {}" if kv == "the caches'" else "k has {} heads but v has {}"
        raise ShapeError(what.format(hkv, hv) + "; they must be equal")
    if hkv == 0 or hq % hkv:
        raise ShapeError(f"q's {hq} heads must be a multiple of {kv} {hkv} heads (GQA: query head h reads "
                         f"KV head h // (Hq // Hkv)); accepted: Hkv >= 1 dividing Hq")


def _check_head_dims(d: int, dk: int, dv: int, k: str = "k", v: str = "v") -> None:
    if d != dk:
        raise ShapeError(f"q's head dim {d} differs from {k}'s {dk}; they must be equal ({v}'s may differ)")
    for name, x in ((f"q/{k}", d), (v, dv)):
        if not 1 <= x <= MAX_HEAD_DIM:
            raise ShapeError(f"{name} head dim {x} is not supported; supported: 1..{MAX_HEAD_DIM} "
                             f"(padded to a power of two >= 16 inside the kernel)")


def _check_index(name: str, t, ndim: int, dims: str, q: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise KascadeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise DTypeError(f"{name} is {t.dtype}; accepted: torch.int32, torch.int64")
    if t.ndim != ndim:
        raise ShapeError(f"{name} must have {ndim} dim{'s' if ndim > 1 else ''} {dims}, got shape {list(t.shape)}")
    if t.device != q.device:
        raise DeviceError(f"{name} is on {t.device} but q on {q.device}; they must be on the same device")


def _check_offsets(name: str, values: list[int], total: int, rows: str, max_name: str, max_len: int) -> list[int]:
    """The sequence lengths of the offsets ``values``, checked: they start at 0, do not decrease,
    end at ``total``, and no sequence is longer than ``max_len``."""
    lens = [b - a for a, b in zip(values, values[1:])]
    if values[0] != 0 or values[-1] != total:
        raise ShapeError(f"{name} must run from 0 to the number of tokens of {rows} ({total}); got "
                         f"{name}[0]={values[0]}, {name}[-1]={values[-1]}")
    if any(n < 0 for n in lens):
        bad = next(i for i, n in enumerate(lens) if n < 0)
        raise ShapeError(f"{name} must be non-decreasing (cumulative sequence lengths); {name}[{bad}]={values[bad]} "
                         f"> {name}[{bad + 1}]={values[bad + 1]}")
    if lens and max(lens) > max_len:
        raise ShapeError(f"{max_name}={max_len} is smaller than the longest sequence ({max(lens)} tokens in "
                         f"{name}); it must be at least that")
    return lens


def _starts(lens: list[int]) -> list[int]:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def _check_paged_lengths(block_table: torch.Tensor, seq_lens: torch.Tensor, blocks: int,
                         block_size: int) -> tuple[int, int]:
    """(longest, total) of ``seq_lens`` after one sync that checks them against the cache
    capacity and the used block-table entries against the number of cache blocks."""
    B, width = block_table.shape
    capacity = width * block_size
    if B == 0:
        return 0, 0
    lens = seq_lens.to(torch.int64)
    pages = (lens.clamp(min=0) + block_size - 1) // block_size
    used = torch.arange(width, device=block_table.device)[None, :] < pages[:, None]
    bad_entry = used & ((block_table < 0) | (block_table >= blocks))
    lo, hi, total, bad = torch.stack([lens.min(), lens.max(), lens.clamp(min=0).sum(), bad_entry.any().long()]).tolist()
    if lo < 0 or hi > capacity:
        i = int(torch.nonzero((lens < 0) | (lens > capacity))[0, 0])
        raise ShapeError(f"seq_lens[{i}]={int(lens[i])} is outside 0..{capacity}, the cache capacity "
                         f"max_blocks * block_size = {width} * {block_size} of the block table")
    if bad:
        i, j = (int(x) for x in torch.nonzero(bad_entry)[0])
        raise ShapeError(f"block_table[{i}, {j}]={int(block_table[i, j])} is not a cache block (0..{blocks - 1}) "
                         f"but sequence {i} of length {int(lens[i])} reads that page")
    return hi, total


def _check_out(out, q: torch.Tensor, shape: tuple[int, ...], dims: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=q.dtype, device=q.device)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != q.dtype \
            or out.device != q.device:
        got = f"{list(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ShapeError(f"out must be a {list(shape)} {q.dtype} tensor on {q.device} {dims}, got {got}")
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


def _check_backend(backend, q: torch.Tensor, accepted: tuple[str, ...]) -> str:
    if backend is None:
        return "triton" if q.device.type == "cuda" else "reference"
    if backend not in accepted:
        raise KascadeError(f"unknown backend {backend!r}; accepted: {', '.join(accepted)} "
                           "(None: triton for CUDA tensors, reference for CPU tensors)")
    if backend in ("triton", "cuda") and q.device.type != "cuda":
        raise KascadeError(f"backend={backend!r} runs CUDA tensors, got tensors on {q.device}; use "
                           "backend='interpret' (CPU interpreter, small shapes) or 'reference'")
    return backend


def _check_interpretable(backend: str, q: torch.Tensor, work: int, formula: str) -> None:
    if backend != "interpret":
        return
    if q.dtype == torch.bfloat16:
        raise DTypeError("backend='interpret' cannot run bf16: Triton's CPU interpreter computes bf16 tl.dot "
                         "wrongly; use fp16 or fp32 inputs, backend='reference', or backend='triton' on a GPU")
    if work > INTERPRET_LIMIT:
        raise ShapeError(f"backend='interpret' is for tests and small shapes: {formula} = {work} exceeds "
                         f"{INTERPRET_LIMIT}; use backend='triton' on a GPU or backend='reference'")
