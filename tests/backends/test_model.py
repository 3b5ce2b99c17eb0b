"""The roofline model on hand-computed cases: the right roof, monotonic, traffic as the tiling implies."""

from __future__ import annotations

import pytest

from kascade.backends.model import Cost, attention_prefill_cost, predict, rank_configs, wave_efficiency
from kascade.backends.targets import get_target
from kascade.ir.library import attention
from kascade.passes.schedule import Config, attention_prefill_schedule

H200 = get_target("h200")


def test_a_copy_is_bandwidth_bound():
    p = predict(Cost(hbm_bytes=2e9, l2_bytes=2e9, launches=1), H200)
    assert p.bound == "hbm"
    assert p.seconds == pytest.approx(2e9 / (4.3e12 * 0.88) + 4e-6)


def test_a_large_gemm_is_compute_bound():
    n = 8192
    p = predict(Cost(tensor_flops=2.0 * n ** 3, hbm_bytes=3.0 * n * n * 2, launches=1), H200)
    assert p.bound == "tensor"
    assert p.roofline_seconds == pytest.approx(2.0 * n ** 3 / 790e12)


def test_a_tiny_kernel_is_launch_bound():
    assert predict(Cost(tensor_flops=1e6, hbm_bytes=1e4, launches=1), H200).bound == "launch"


def test_costs_add():
    a, b = Cost(10, 2, 3, 4, 5, 1, 1.0, 1.0), Cost(30, 20, 30, 40, 50, 1, 0.5, 0.5)
    s = a + b
    assert (s.tensor_flops, s.special, s.flops, s.hbm_bytes, s.l2_bytes, s.launches) == (40, 22, 33, 44, 55, 2)
    assert s.wave_efficiency == pytest.approx(0.75)
    assert s.mma_efficiency == pytest.approx((10 * 1.0 + 30 * 0.5) / 40)  # weighted by tensor work


def test_wave_quantisation():
    assert wave_efficiency(132, 132) == 1.0
    assert wave_efficiency(66, 132, per_sm=2) == 0.5      # half the SMs idle
    assert wave_efficiency(264, 132, per_sm=2) == 1.0     # one full wave of two per SM
    assert wave_efficiency(265, 132, per_sm=2) == pytest.approx(265 / 528)


SCHED = attention_prefill_schedule(attention("2pass"))
CAUSAL = attention_prefill_schedule(attention("2pass", causal=True))


def ext(P=4096, M=4096, B=2, G=8, R=4, E=128, F=128):
    return dict(B=B, G=G, R=R, P=P, M=M, E=E, F=F)


def cfg(bm=128, bn=64, w=8, s=3):
    return Config.of(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)


def test_kv_traffic_grows_with_query_tiles():
    """K and V are re-read once per query tile: halving BLOCK_M doubles that traffic."""
    big = attention_prefill_cost(SCHED, cfg(bm=128), ext(), H200)
    small = attention_prefill_cost(SCHED, cfg(bm=64), ext(), H200)
    q_and_o = 2 * 8 * 4 * 4096 * 256 * 2
    assert (small.l2_bytes - q_and_o) == pytest.approx(2 * (big.l2_bytes - q_and_o))


def test_causal_skips_about_half_the_tiles():
    full = attention_prefill_cost(SCHED, cfg(), ext(), H200)
    causal = attention_prefill_cost(CAUSAL, cfg(), ext(), H200)
    assert 0.45 < causal.tensor_flops / full.tensor_flops < 0.56


def test_prediction_grows_with_the_problem_and_stays_under_the_roof():
    times = [predict(attention_prefill_cost(SCHED, cfg(), ext(P=s, M=s), H200), H200) for s in (1024, 4096, 16384)]
    assert times[0].seconds < times[1].seconds < times[2].seconds
    assert times[-1].bound == "tensor"
    flops = 4 * 2 * 32 * 16384 * 16384 * 128
    assert flops / times[-1].seconds < 790e12  # never faster than the measured ceiling


def test_ranking_prefers_big_tiles_for_long_sequences_and_small_for_short():
    long_best = rank_configs(SCHED, ext(), H200)[0][1]
    assert long_best["BLOCK_M"] >= 64 and long_best["BLOCK_N"] >= 32
    short_best = rank_configs(SCHED, ext(P=1, M=4096), H200)[0][1]
    assert short_best["BLOCK_M"] == 16  # one query row: the smallest query tile wastes least
