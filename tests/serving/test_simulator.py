"""The serving simulator shows the policy behaviour the literature reports, and keeps its books.

Every number below comes from the real iteration model (roofline kernels + collectives) of
Llama-3-8B on H200s; each assertion message carries the numbers it saw.
"""

from __future__ import annotations

import numpy as np
import pytest

from kascade.backends.cluster import make_cluster
from kascade.backends.iteration import IterationModel, Parallelism
from kascade.backends.simulator import CostTable, Policy, SimulationError, overlapped_seconds, simulate
from kascade.backends.workload import SLO, Request, poisson_workload
from kascade.ir.library.models import load_model

SPEC = load_model("llama-3-8b")
CLUSTER = make_cluster("h200", 8)


def model(tp: int = 1) -> IterationModel:
    return IterationModel(SPEC, CLUSTER, Parallelism(tp=tp))


def test_chunked_prefill_cuts_the_tpot_tail_under_a_mixed_workload():
    """Sarathi-Serve: long prompts stall running decodes under prefill-first scheduling."""
    reqs = poisson_workload(8, 600, "lognormal:2048,1500", "lognormal:256,200", seed=1)
    pf = simulate(reqs, model(), Policy("prefill_first", token_budget=8192))
    ch = simulate(reqs, model(), Policy("chunked", token_budget=512))
    a, b = pf.percentile("tpot", 99), ch.percentile("tpot", 99)
    ia, ib = pf.percentile("itl", 99), ch.percentile("itl", 99)
    assert b < 0.8 * a, f"TPOT p99: prefill-first {a * 1e3:.1f} ms, chunked {b * 1e3:.1f} ms"
    assert ib < 0.5 * ia, f"inter-token p99: prefill-first {ia * 1e3:.1f} ms, chunked {ib * 1e3:.1f} ms"
    assert pf.completed == ch.completed == len(reqs)


def test_disaggregation_raises_goodput_for_a_prefill_heavy_workload_under_tight_slos():
    """DistServe: with tight TTFT and TPOT targets, prefill and decode on separate replicas win."""
    slo = SLO(ttft=0.4, tpot=0.008, percentile=0.9)
    reqs = poisson_workload(14, 600, "lognormal:4096,1000", "lognormal:64,30", seed=2)
    m = model()
    seen = {}
    for name, pol in (("prefill_first", Policy("prefill_first", token_budget=8192)),
                      ("chunked", Policy("chunked", token_budget=512)),
                      ("disaggregated 3P:1D", Policy("disaggregated", prefill_replicas=3, token_budget=8192))):
        r = simulate(reqs, m, pol, replicas=4, gpus_per_replica=1, slo=slo)
        seen[name] = (r.goodput_per_gpu(), r.attainment())
    text = ", ".join(f"{k}: {g:.2f} req/s/GPU ({a:.1%} met)" for k, (g, a) in seen.items())
    dis = seen["disaggregated 3P:1D"][0]
    assert dis > 1.1 * max(seen["prefill_first"][0], seen["chunked"][0]), text
    assert seen["disaggregated 3P:1D"][1] >= 0.9, text


def test_more_tensor_parallelism_lowers_per_token_latency_and_costs_throughput_per_gpu():
    reqs = poisson_workload(1000, 400, "lognormal:512,200", "lognormal:256,100", seed=3)   # a saturating burst
    rows = []
    for tp in (1, 2, 4):
        r = simulate(reqs, model(tp), Policy("chunked", max_batch=256), gpus_per_replica=tp)
        rows.append((tp, r.percentile("tpot", 50), r.token_throughput / tp))
    text = "; ".join(f"TP{tp}: TPOT p50 {t * 1e3:.2f} ms, {g:.0f} tok/s/GPU" for tp, t, g in rows)
    assert rows[0][1] > rows[1][1] > rows[2][1], text
    assert rows[0][2] > rows[1][2] > rows[2][2], text


def test_the_same_seed_gives_the_same_simulation():
    def run(seed):
        reqs = poisson_workload(6, 300, "lognormal:1024,600", "lognormal:128,80", seed=seed)
        return simulate(reqs, model(), Policy("chunked", router="round_robin"), replicas=2)
    a, b, c = run(5), run(5), run(6)
    for f in ("ttft", "tpot", "e2e"):
        assert np.array_equal(getattr(a, f), getattr(b, f), equal_nan=True)
    assert a.iterations == b.iterations and a.breakdown == b.breakdown
    assert not np.array_equal(a.ttft, c.ttft)


def test_preemption_when_the_kv_cache_runs_out_and_every_request_still_finishes():
    m = model()
    cap = m.kv_capacity_tokens()
    n = 2 * cap // (2048 + 1024) + 50       # twice what fits at full length, all at once
    reqs = [Request(i, 0.001 * i, 2048, 1024) for i in range(n)]
    for pol in (Policy("prefill_first", max_batch=2048, token_budget=16384), Policy("chunked", max_batch=2048)):
        r = simulate(reqs, m, pol)
        assert r.preemptions > 0, f"{pol.name}: no preemption with {n} requests x 3072 tokens in {cap} tokens of KV"
        assert r.completed == n and not r.dropped, f"{pol.name}: {r.completed}/{n} finished, dropped {r.dropped[:3]}"
        assert r.peak_kv_fraction <= 1.0 and r.peak_kv_fraction > 0.9, r.peak_kv_fraction
        assert np.all(r.e2e >= r.ttft)


def test_a_request_larger_than_the_kv_cache_is_dropped_with_the_reason():
    m = model()
    big = m.kv_capacity_tokens() + 100
    r = simulate([Request(0, 0.0, big, 4), Request(1, 0.0, 100, 4)], m, Policy("chunked"))
    assert r.completed == 1 and r.dropped[0][0] == 0 and "exceed the KV cache" in r.dropped[0][1]


def test_disaggregated_first_token_comes_from_prefill_and_the_kv_transfer_delays_the_second():
    m = model()
    r = simulate([Request(0, 0.0, 4096, 2)], m, Policy("disaggregated", prefill_replicas=1), replicas=2)
    prefill = m.iteration([(4096, 0)], []).seconds
    assert r.ttft[0] == pytest.approx(prefill)
    assert r.tpot[0] > m.kv_transfer_seconds(4096) > 0


def test_nanoflow_overlap_is_never_slower_than_serial_and_never_below_the_roofline():
    m = model()
    t = CLUSTER.target
    for pre, dec in (([(2048, 0)], [1000] * 128), ([], [4000] * 256), ([], [100])):
        c = m.iteration(pre, dec)
        floor = max(c.flops / t.tensor_peak("bf16"), c.hbm_bytes / t.hbm_bandwidth)
        assert overlapped_seconds(c, 1, 0.05, t.tensor_peak("bf16"), t.hbm_bandwidth) == c.seconds
        got = overlapped_seconds(c, 4, 0.0, t.tensor_peak("bf16"), t.hbm_bandwidth)
        assert floor <= got <= c.seconds, (pre, len(dec), floor, got, c.seconds)


def test_throughput_goodput_and_utilisation_are_consistent():
    reqs = poisson_workload(5, 300, "lognormal:1024,600", "lognormal:128,80", seed=4)
    r = simulate(reqs, model(), Policy("nanoflow", nano_batches=2), target=CLUSTER.target,
                 slo=SLO(10.0, 1.0), costs=CostTable(model()))
    assert r.completed == 300 and r.goodput() == pytest.approx(r.throughput)
    assert 0 < r.mfu < 1 and 0 < r.mbu < 1 and r.attainment() == 1.0
    assert set(r.breakdown) >= {"gemm", "attention_decode", "attention_prefill"}


def test_bad_simulation_input_is_a_clear_error():
    with pytest.raises(SimulationError, match="unknown policy"):
        Policy("fastest")
    with pytest.raises(SimulationError, match="decode"):
        simulate([Request(0, 0.0, 10, 2)], model(), Policy("disaggregated", prefill_replicas=2), replicas=2)
    with pytest.raises(SimulationError, match="no requests"):
        simulate([], model())
