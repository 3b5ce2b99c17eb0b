"""The CUDA (CuPy) backend of MoE routing bookkeeping: :func:`align_blocks_cuda` on torch CUDA tensors.

``align_blocks_cuda(topk_ids, num_experts, block_m)`` returns the same
:class:`~kascade.backends.moe_routing.BlockAlignment` as the torch
:func:`~kascade.backends.moe_routing.align_blocks` (the contract is stated there), from one
launch of the kernel rendered by :mod:`kascade.codegen.moe_routing_cuda`: counting, the prefix
sum over experts and the stable scatter happen in one thread block, and the kernel writes
every element of its outputs, so they come from ``torch.empty`` (torch's allocator, ordered on
torch's current stream, which is where the kernel is launched). Nothing synchronises with the
host: ``num_rows`` stays on the device.

The kernel is compiled once per variant (index dtype, expert bucket, threads) and device with
NVRTC through ``cupy.RawModule``. CuPy is optional: it is imported on first launch, and its
absence is a :class:`~kascade.backends.cuda.CupyMissingError` naming the install command.

Ids must lie in ``[0, num_experts)``; checking that would cost a device sync, so it is the
caller's job (the router's top-k produces such ids). A pair whose id is out of range gets no
row and is not counted, where the torch version raises; the kernel never writes out of bounds.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from kascade.backends.cuda import import_cupy, raw_module
from kascade.backends.moe_routing import BlockAlignment, capacity
from kascade.codegen.moe_routing_cuda import EXPERT_BUCKETS, MoeRoutingParams, default_params, render, write_source
from kascade.ir.dtypes import DType
from kascade.ir.errors import DeviceError, DTypeError, KascadeError, ShapeError

_INDEX_DTYPES = {torch.int32: DType.I32, torch.int64: DType.I64}
MAX_BLOCK_M = 4096
MAX_ROWS = 2**31 - 2**16  # int32 rows and pair indices, with headroom for the kernel's index arithmetic


def check_inputs(topk_ids, num_experts, block_m) -> MoeRoutingParams:
    """Check types, dtype, shape and the sizes the kernel takes; return the variant to run.
    Devices are :func:`check_device`'s business."""
    if not isinstance(topk_ids, torch.Tensor):
        raise DTypeError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype not in _INDEX_DTYPES:
        raise DTypeError(f"topk_ids must be torch.int32 or torch.int64, got {topk_ids.dtype}")
    if topk_ids.dim() != 2:
        raise ShapeError(f"topk_ids must be 2-D (tokens T, choices K), got shape {tuple(topk_ids.shape)}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= EXPERT_BUCKETS[-1]:
        raise KascadeError(f"num_experts must be an int from 1 to {EXPERT_BUCKETS[-1]}, got {num_experts!r}")
    if isinstance(block_m, bool) or not isinstance(block_m, int) or not 1 <= block_m <= MAX_BLOCK_M:
        raise KascadeError(f"block_m must be an int from 1 to {MAX_BLOCK_M}, got {block_m!r}")
    T, K = topk_ids.shape
    rows = capacity(T, K, num_experts, block_m)
    if rows > MAX_ROWS:
        raise ShapeError(f"topk_ids of shape ({T}, {K}) with {num_experts} experts and block_m={block_m} need "
                         f"{rows} rows; the kernel's int32 rows hold at most {MAX_ROWS}")
    return default_params(_INDEX_DTYPES[topk_ids.dtype], num_experts)


def check_device(topk_ids: torch.Tensor) -> None:
    if topk_ids.device.type != "cuda":
        raise DeviceError(f"the CUDA MoE routing kernel needs topk_ids on a CUDA device; got it on {topk_ids.device} "
                          "(kascade.backends.moe_routing.align_blocks runs on any device)")


@functools.cache
def _kernel(params: MoeRoutingParams, device_index: int):
    """The CuPy kernel of one variant on one device, compiled by NVRTC once (CuPy also keeps
    the binary in its on-disk cache)."""
    source = render(params)
    return raw_module(source, write_source, device_index).get_function(source.kernel)


def _launch(kernel, grid, block, args, device: torch.device) -> None:
    """Launch on torch's current stream of ``device``; CuPy raises on a failed launch."""
    cupy = import_cupy()
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream, device.index):
        kernel(grid, block, args)


def align_blocks_cuda(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> BlockAlignment:
    """The block-aligned expert grouping of ``topk_ids`` (T, K), int32 or int64 on a CUDA device,
    in one kernel launch; outputs as :func:`kascade.backends.moe_routing.align_blocks` (int32, on
    ``topk_ids``' device). ``num_experts`` from 1 to 1024; ``block_m`` from 1 to 4096."""
    params = check_inputs(topk_ids, num_experts, block_m)
    check_device(topk_ids)
    T, K = topk_ids.shape
    pairs, rows, dev = T * K, capacity(T, K, num_experts, block_m), topk_ids.device
    ids = topk_ids.contiguous()  # pair t * K + k is element t * K + k
    sorted_pairs = torch.empty(rows, dtype=torch.int32, device=dev)
    block_expert = torch.empty(rows // block_m, dtype=torch.int32, device=dev)
    num_rows = torch.empty(1, dtype=torch.int32, device=dev)
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    p = np.uint64
    args = (p(ids.data_ptr()), np.int32(pairs), np.int32(num_experts), np.int32(block_m), np.int32(rows),
            p(sorted_pairs.data_ptr()), p(block_expert.data_ptr()), p(num_rows.data_ptr()), p(counts.data_ptr()))
    _launch(_kernel(params, dev.index), (1,), (params.threads,), args, dev)
    return BlockAlignment(sorted_pairs, block_expert, num_rows, counts)
