"""The CUDA (CuPy) backend: paged-KV decode attention with split-KV on torch CUDA tensors.

``paged_decode_attention_cuda(q, k_cache, v_cache, block_table, seq_lens)`` validates its
inputs (kascade errors that say what is accepted), picks the kernel variant and the number
of splits, renders the CUDA source (:mod:`kascade.codegen.paged_decode_cuda`), compiles it
once per variant with NVRTC through ``cupy.RawModule`` and launches the partial kernel and
the merge kernel on torch's current stream, passing raw pointers. The fp32 workspace comes
from torch's allocator, so it is ordered on the same stream.

CuPy is optional: it is imported inside the functions that launch, and its absence is a
:class:`CupyMissingError` naming ``pip install cupy-cuda13x`` (kascade's ``cuda`` extra).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kascade.codegen.paged_decode_cuda import (
    HEAD_DIMS,
    MAX_GROUP_SIZE,
    MERGE_THREADS,
    PagedDecodeParams,
    default_params,
    render,
    write_source,
)
from kascade.ir.dtypes import DType
from kascade.ir.errors import DeviceError, DTypeError, KascadeError, ShapeError
from kascade.passes.schedule_decode import MAX_SPLITS, default_num_splits  # one rule for both backends

NVRTC_OPTIONS = ("--std=c++17",)
_DTYPES = {torch.bfloat16: DType.BF16, torch.float16: DType.F16, torch.float32: DType.F32}
_INDEX_DTYPES = (torch.int32, torch.int64)
_MAX_GRID_YZ = 65535


class CupyMissingError(KascadeError):
    """The CUDA backend was called where CuPy is not installed."""




def import_cupy():
    """CuPy, imported on first use; a clear error with the install command when it is missing."""
    try:
        import cupy
    except ImportError as e:
        raise CupyMissingError("the CUDA backend needs CuPy, which is not installed: pip install cupy-cuda13x "
                               "(kascade's cuda extra: pip install 'kascade[cuda]')") from e
    return cupy


@dataclass(frozen=True)
class PagedDecodeShape:
    """The checked, canonical description of one call."""
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    head_dim_v: int
    block_size: int
    max_blocks: int
    dtype: DType
    max_seq_len: int

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads


def _names(**tensors: torch.Tensor) -> str:
    return ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items())


def check_devices(**tensors: torch.Tensor) -> None:
    """Every tensor on one CUDA device."""
    devices = {name: t.device for name, t in tensors.items()}
    if any(d.type != "cuda" for d in devices.values()) or len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise DeviceError(f"the CUDA paged-decode kernel needs every tensor on one CUDA device; got {where}")


def check_inputs(q, k_cache, v_cache, block_table, seq_lens) -> PagedDecodeShape:
    """Check dtypes and shapes (what the kernel accepts) and return the call's shape; devices
    are :func:`check_devices`' business. Reads ``seq_lens``' min and max (one device sync) to
    check them against the cache's capacity."""
    tensors = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = {name: t.dtype for name, t in list(tensors.items())[:3]}
    if len(set(dtypes.values())) > 1 or q.dtype not in _DTYPES:
        got = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        raise DTypeError(f"q, k_cache and v_cache must share one dtype of torch.bfloat16, torch.float16, "
                         f"torch.float32; got {got}")
    for name in ("block_table", "seq_lens"):
        if tensors[name].dtype not in _INDEX_DTYPES:
            raise DTypeError(f"{name} must be torch.int32 or torch.int64, got {tensors[name].dtype}")
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4 or block_table.dim() != 2 or seq_lens.dim() != 1:
        raise ShapeError("expected q (B, Hq, D), k_cache (num_blocks, block_size, Hkv, D), v_cache (num_blocks, "
                         "block_size, Hkv, Dv), block_table (B, max_blocks), seq_lens (B,); got " + _names(**tensors))
    B, Hq, D = q.shape
    N, BS, Hkv, Dk = k_cache.shape
    Nv, BSv, Hkv_v, Dv = v_cache.shape
    if (Nv, BSv, Hkv_v) != (N, BS, Hkv) or Dk != D:
        raise ShapeError("k_cache (num_blocks, block_size, Hkv, D) and v_cache (num_blocks, block_size, Hkv, Dv) "
                         "must agree with each other and with q (B, Hq, D); got "
                         + _names(q=q, k_cache=k_cache, v_cache=v_cache))
    if block_table.shape[0] != B or seq_lens.shape[0] != B:
        raise ShapeError(f"block_table and seq_lens need one row per sequence (B={B}); got "
                         + _names(block_table=block_table, seq_lens=seq_lens))
    if Hkv == 0 or Hq % Hkv != 0 or not 1 <= Hq // Hkv <= MAX_GROUP_SIZE:
        raise ShapeError(f"the query heads Hq={Hq} must be R * Hkv (Hkv={Hkv}) with R from 1 to {MAX_GROUP_SIZE}")
    for what, value in (("head dim D", D), ("head dim Dv", Dv)):
        if value not in HEAD_DIMS:
            raise ShapeError(f"{what}={value} is not supported; supported head dims: multiples of 8 from 8 to 256 "
                             f"({', '.join(map(str, HEAD_DIMS))})")
    if B > _MAX_GRID_YZ:
        raise ShapeError(f"batch {B} is over the kernel's grid limit of {_MAX_GRID_YZ} sequences per call")
    max_blocks = block_table.shape[1]
    lo, hi = torch.stack(torch.aminmax(seq_lens)).tolist() if B else (0, 0)
    capacity = max_blocks * BS
    if lo < 0 or hi > capacity:
        bad = int(torch.nonzero((seq_lens < 0) | (seq_lens > capacity))[0, 0])
        raise ShapeError(f"seq_lens[{bad}]={int(seq_lens[bad])} is outside 0..{capacity}, the cache capacity "
                         f"max_blocks * block_size = {max_blocks} * {BS} of the block table")
    return PagedDecodeShape(B, Hq, Hkv, D, Dv, BS, max_blocks, _DTYPES[q.dtype], hi)


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _kernels(params: PagedDecodeParams, device_index: int):
    """``(partial, merge)`` CuPy kernels of one variant on one device, compiled by NVRTC once
    (CuPy also keeps the binary in its on-disk cache)."""
    source = render(params)
    module = raw_module(source, write_source, device_index)
    return module.get_function(source.partial_kernel), module.get_function(source.merge_kernel)


def raw_module(source, write: Callable, device_index: int):
    """``cupy.RawModule`` of a rendered CUDA source on one device (NVRTC; CuPy also keeps the
    binary in its on-disk cache), after ``write(source)`` leaves a readable copy for profilers
    and debuggers where the cache directory is writable."""
    cupy = import_cupy()
    try:
        write(source)
    except OSError:
        pass
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=source.code, options=NVRTC_OPTIONS)


def _vector_ready(t: torch.Tensor, vec: int) -> bool:
    """Rows of ``t`` can be read with 16-byte loads: unit last stride, 16-byte aligned base and strides."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % vec == 0 for s in t.stride()[:-1])


def _prepare(q, k_cache, v_cache, block_table, seq_lens, scale, softcap, num_splits):
    shape = check_inputs(q, k_cache, v_cache, block_table, seq_lens)
    check_devices(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens)
    params = default_params(shape.dtype, shape.head_dim, shape.head_dim_v, shape.block_size, shape.group_size,
                            softcap=softcap is not None)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.numel() and not _vector_ready(t, params.vec):
            raise ShapeError(f"{name} must have a unit-stride last dim, a 16-byte aligned start and strides that "
                             f"are multiples of 16 bytes (it is read in 16-byte vectors); got strides {t.stride()}")
    if not _vector_ready(q, params.vec):  # q is small: a fresh aligned copy is cheap
        q = torch.empty_like(q, memory_format=torch.contiguous_format).copy_(q)
    block_table = block_table.to(torch.int32)
    block_table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    scale = 1.0 / math.sqrt(shape.head_dim) if scale is None else float(scale)
    if softcap is not None and not float(softcap) > 0:
        raise KascadeError(f"softcap must be a positive number or None, got {softcap!r}")
    if num_splits is None:
        num_splits = default_num_splits(shape.batch * shape.kv_heads, shape.max_seq_len, shape.block_size,
                                        sm_count(q.device))
    if not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise KascadeError(f"num_splits must be an int from 1 to {MAX_SPLITS} or None (chosen for you), "
                           f"got {num_splits!r}")
    return shape, params, q, block_table, seq_lens, scale, float(softcap or 1.0), num_splits


def _launch(kernel, grid, block, args, device: torch.device) -> None:
    """Launch on torch's current stream of ``device``; CuPy raises on a failed launch."""
    cupy = import_cupy()
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream, device.index):
        kernel(grid, block, args)


def _partials(shape, params, q, k_cache, v_cache, block_table, seq_lens, scale, softcap, num_splits, out):
    B, Hq, C, Dv = shape.batch, shape.q_heads, num_splits, shape.head_dim_v
    if out is None:
        out = (q.new_empty((B, Hq, C), dtype=torch.float32), q.new_empty((B, Hq, C), dtype=torch.float32),
               q.new_empty((B, Hq, C, Dv), dtype=torch.float32))
    expected = ((B, Hq, C), (B, Hq, C), (B, Hq, C, Dv))
    if (len(out) != 3 or any(tuple(t.shape) != s or t.dtype != torch.float32 or not t.is_contiguous()
                             or t.data_ptr() % 16 or t.device != q.device for t, s in zip(out, expected))):
        raise ShapeError(f"the partials workspace must be contiguous, 16-byte aligned float32 tensors of shapes "
                         f"{expected} on {q.device}")
    if B == 0:
        return out
    partial, _ = _kernels(params, q.device.index)
    p = np.uint64
    args = (p(q.data_ptr()), np.int64(q.stride(0)), np.int64(q.stride(1)),
            p(k_cache.data_ptr()), *(np.int64(s) for s in k_cache.stride()[:3]),
            p(v_cache.data_ptr()), *(np.int64(s) for s in v_cache.stride()[:3]),
            p(block_table.data_ptr()), np.int64(block_table.stride(0)), np.int32(shape.max_blocks),
            p(seq_lens.data_ptr()), p(out[0].data_ptr()), p(out[1].data_ptr()), p(out[2].data_ptr()),
            np.float32(scale), np.float32(softcap))
    _launch(partial, (C, shape.kv_heads, B), (params.threads,), args, q.device)
    return out


def paged_decode_partials_cuda(q, k_cache, v_cache, block_table, seq_lens, *, scale: float | None = None,
                               softcap: float | None = None, num_splits: int | None = None, out=None):
    """The split-KV partials ``(max, sum, numerator)`` of shapes ``(B, Hq, C)``, ``(B, Hq, C)``,
    ``(B, Hq, C, Dv)`` in fp32 (``out``: three such tensors to write into). Split ``c`` of
    sequence ``b`` covers its cache blocks ``[c * W, (c + 1) * W)``, ``W = cdiv(cdiv(len, block_size), C)``."""
    shape, params, q, block_table, seq_lens, scale, cap, num_splits = _prepare(
        q, k_cache, v_cache, block_table, seq_lens, scale, softcap, num_splits)
    return _partials(shape, params, q, k_cache, v_cache, block_table, seq_lens, scale, cap, num_splits, out)


def paged_decode_attention_cuda(q, k_cache, v_cache, block_table, seq_lens, *, scale: float | None = None,
                                softcap: float | None = None, num_splits: int | None = None,
                                out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of one query token per sequence over a paged KV cache.

    ``q`` (B, Hq, D); ``k_cache`` (num_blocks, block_size, Hkv, D), ``v_cache`` (num_blocks,
    block_size, Hkv, Dv), bf16 / f16 / f32 alike; ``block_table`` (B, max_blocks) and
    ``seq_lens`` (B,) int32 (int64 is converted). Query head ``h`` reads KV head
    ``h // (Hq // Hkv)``. ``scale`` defaults to ``1 / sqrt(D)``; ``softcap`` ``c`` turns a score
    ``s`` into ``c * tanh(s / c)``. ``num_splits`` (default: enough thread blocks to fill the GPU)
    splits each sequence's keys for parallelism; the result does not depend on it beyond
    rounding. Returns ``out`` (B, Hq, Dv) in q's dtype; a sequence of length 0 gets zeros.
    """
    shape, params, q, block_table, seq_lens, scale, cap, num_splits = _prepare(
        q, k_cache, v_cache, block_table, seq_lens, scale, softcap, num_splits)
    B, Hq, Dv = shape.batch, shape.q_heads, shape.head_dim_v
    if out is None:
        out = q.new_empty((B, Hq, Dv))
    if tuple(out.shape) != (B, Hq, Dv) or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ShapeError(f"out must be a ({B}, {Hq}, {Dv}) {q.dtype} tensor on {q.device} with a unit-stride "
                         f"last dim; got {tuple(out.shape)} {out.dtype} on {out.device}")
    if B == 0:
        return out
    part_max, part_sum, part_num = _partials(shape, params, q, k_cache, v_cache, block_table, seq_lens, scale, cap,
                                             num_splits, None)
    _, merge = _kernels(params, q.device.index)
    args = (np.uint64(part_max.data_ptr()), np.uint64(part_sum.data_ptr()), np.uint64(part_num.data_ptr()),
            np.uint64(out.data_ptr()), np.int64(out.stride(0)), np.int64(out.stride(1)), np.int32(num_splits))
    _launch(merge, (Hq, B), (MERGE_THREADS,), args, q.device)
    return out
