"""Shared fixtures. Every test runs with the IR checker after each pass switched on."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("KASCADE_CHECK_IR", "1")


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seeded generator per test: random, reproducible, never zeros."""
    return torch.Generator().manual_seed(1234)


def make_paged_cache(lens: list[int], block: int, G: int, E: int, F: int, gen: torch.Generator,
                     dtype=torch.float64, spare_blocks: int = 3):
    """A paged KV cache holding sequences of ``lens`` tokens in shuffled blocks.

    Returns ``(KC, VC, BT, SL, K_dense, V_dense)`` where ``K_dense[i]`` is sequence i's keys
    ``(len, G, E)``; unused block-table entries point at random (valid) blocks, as a
    real allocator leaves them, so an unmasked read would pick up another sequence's data.
    """
    per_seq = [max(1, -(-n // block)) for n in lens]
    n_blocks = sum(per_seq) + spare_blocks
    KC = torch.randn(n_blocks, block, G, E, generator=gen, dtype=dtype)
    VC = torch.randn(n_blocks, block, G, F, generator=gen, dtype=dtype)
    perm = torch.randperm(n_blocks, generator=gen)
    width = max(per_seq)
    BT = torch.randint(0, n_blocks, (len(lens), width), generator=gen, dtype=torch.int32)
    K_dense, V_dense, used = [], [], 0
    for i, (n, nb) in enumerate(zip(lens, per_seq)):
        ids = perm[used:used + nb]
        used += nb
        BT[i, :nb] = ids.to(torch.int32)
        K_dense.append(KC[ids].reshape(nb * block, G, E)[:n])
        V_dense.append(VC[ids].reshape(nb * block, G, F)[:n])
    SL = torch.tensor(lens, dtype=torch.int32)
    return KC, VC, BT, SL, K_dense, V_dense


@pytest.fixture
def paged_cache():
    """The :func:`make_paged_cache` builder (test modules cannot import conftest)."""
    return make_paged_cache
