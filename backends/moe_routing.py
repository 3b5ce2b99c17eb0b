"""Routing bookkeeping for expert-grouped MoE kernels: who goes to which expert, in which row.

The grouped GEMMs do not loop over experts. They run over *blocks* of ``block_m`` rows of
a permuted row list in which every expert's (token, choice) pairs are contiguous and each
expert's segment is padded to a multiple of ``block_m``; every block belongs to one expert,
so a program reads one expert's weights. An expert with no tokens has no blocks (no launch,
no program doing work); one with most tokens has most blocks.

:func:`align_blocks` is the torch formulation of that bookkeeping (a stable sort by expert,
so tokens keep their order inside an expert). It is what the interpreter path runs and
what the CUDA routing kernel (counting, prefix sum, permutation in one launch) is checked
against. Its outputs, for ``topk_ids`` of shape (T, K) and ``P = T * K`` pairs:

- ``sorted_pairs`` (int32, ``capacity(T, K, E, block_m)``): pair indices ``t * K + k``
  grouped by expert, each expert's run padded with the sentinel ``P``; entries past
  ``num_rows`` are the sentinel too.
- ``block_expert`` (int32, ``capacity // block_m``): the expert of each block; ``-1`` past the
  last used block (those programs return at once).
- ``num_rows`` (int32, shape (1,)): rows in use (a multiple of ``block_m``), left on the device
  so that nothing synchronises.
- ``counts`` (int32, (E,)): pairs per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockAlignment:
    sorted_pairs: torch.Tensor
    block_expert: torch.Tensor
    num_rows: torch.Tensor
    counts: torch.Tensor


def capacity(tokens: int, top_k: int, experts: int, block_m: int) -> int:
    """Rows the permuted list may need: every pair, plus under a block of padding for each
    expert that has any pair (at most ``min(E, T * K)`` of them), rounded up to whole blocks."""
    pairs = tokens * top_k
    rows = pairs + min(experts, pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m


def align_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> BlockAlignment:
    """The block-aligned expert grouping of ``topk_ids`` (T, K), in torch (any device)."""
    T, K = topk_ids.shape
    pairs, dev = T * K, topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded                     # exclusive prefix sum
    order = torch.sort(flat, stable=True).indices                  # pairs grouped by expert, token order kept
    expert_of = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(pairs, device=dev) - first_of_expert[expert_of]
    cap = capacity(T, K, num_experts, block_m)
    sorted_pairs = torch.full((cap,), pairs, dtype=torch.int32, device=dev)
    sorted_pairs[starts[expert_of] + rank_in_expert] = order.to(torch.int32)
    # block i belongs to the first expert whose blocks end past i (no host sync)
    block_ends = torch.cumsum(padded // block_m, 0)
    blocks = torch.arange(cap // block_m, device=dev)
    expert = torch.searchsorted(block_ends, blocks, right=True)
    block_expert = torch.where(expert < num_experts, expert, -1).to(torch.int32)
    num_rows = padded.sum().reshape(1).to(torch.int32)
    return BlockAlignment(sorted_pairs, block_expert, num_rows, counts.to(torch.int32))
