"""The roofline model on split-KV paged decode: bytes, bounds, and what the split count buys."""

from __future__ import annotations

import pytest

from kascade.backends.model import Cost, paged_decode_cost, predict, rank_configs, schedule_cost
from kascade.backends.targets import get_target
from kascade.ir.errors import KascadeError
from kascade.ir.library import paged_decode
from kascade.passes.schedule import Config, Kernel, Schedule
from kascade.passes.schedule_decode import paged_decode_schedule

SCHED = paged_decode_schedule(paged_decode())
H200 = get_target("h200")
CFG = Config.of(BLOCK_N=64, num_warps=4, num_stages=3, num_splits=1)


def ext(B=32, L=4096, **kw):
    return {"B": B, "G": 8, "R": 4, "E": 128, "F": 128, "M0": 16, "L": L, **kw}


def test_kv_bytes_are_read_once_and_merge_traffic_grows_with_splits():
    one = paged_decode_cost(SCHED, CFG, ext(), H200)
    kv = 32 * 8 * 4096 * 256 * 2
    assert kv <= one.hbm_bytes < 1.01 * kv
    eight = paged_decode_cost(SCHED, CFG.replace(num_splits=8), ext(), H200)
    assert eight.hbm_bytes > one.hbm_bytes and eight.launches == one.launches == 2


def test_shorter_sequences_read_proportionally_less():
    full = paged_decode_cost(SCHED, CFG, ext(), H200)
    half = paged_decode_cost(SCHED, CFG, ext(KV=32 * 2048), H200)
    assert half.hbm_bytes == pytest.approx(full.hbm_bytes / 2, rel=0.01)


def test_a_full_batch_is_bandwidth_bound_near_the_copy_rate():
    p = predict(paged_decode_cost(SCHED, CFG, ext(B=256), H200), H200)
    assert p.bound == "hbm"
    assert 0.5 * H200.hbm_bandwidth < 256 * 8 * 4096 * 256 * 2 / p.seconds <= H200.hbm_bandwidth


def test_one_long_sequence_needs_splits():
    """One sequence of 32k keys on one KV head: a single program walks 2048 key steps, bound by
    load latency; splitting it over the SMs is predicted many times faster."""
    x = ext(B=1, L=32768, G=1)
    alone = predict(paged_decode_cost(SCHED, CFG, x, H200), H200)
    split = predict(paged_decode_cost(SCHED, CFG.replace(num_splits=128), x, H200), H200)
    assert alone.bound == "latency" and split.seconds < alone.seconds / 10


def test_ranking_splits_small_batches_and_not_full_ones():
    best_small = rank_configs(SCHED, ext(B=1, L=32768), H200)[0][1]
    best_full = rank_configs(SCHED, ext(B=256, L=8192), H200)[0][1]
    assert best_small["num_splits"] >= 8
    assert best_full["num_splits"] <= 4
    assert all(SCHED.feasible(c, {"E": 128, "F": 128, "R": 4, "itemsize": 2}) is None
               for _, c in rank_configs(SCHED, ext(B=4, L=100), H200))


def test_split_candidates_stop_at_the_pages_of_the_longest_sequence():
    ranked = rank_configs(SCHED, ext(B=2, L=100), H200)     # 7 pages of 16
    assert max(c["num_splits"] for _, c in ranked) == 6


def test_a_family_without_a_rule_is_named():
    body = SCHED.kernels[0].body
    odd = Schedule(SCHED.cascade, (Kernel("k", "mystery_family", (), (), body),), SCHED.space, SCHED.constraints)
    with pytest.raises(KascadeError, match="no rule for kernel family 'mystery_family'.*paged_decode_partial"):
        schedule_cost(odd, CFG, ext(), H200)


def test_latency_adds_across_kernels():
    assert (Cost(latency_s=1e-6, launches=1) + Cost(latency_s=2e-6, launches=1)).latency_s == pytest.approx(3e-6)
