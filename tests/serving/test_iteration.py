"""The per-iteration time model: roofline sanity, parallelism, memory, infeasible plans, collectives."""

from __future__ import annotations

import pytest

from kascade.backends.cluster import Link, make_cluster
from kascade.backends.iteration import IterationModel, Parallelism
from kascade.ir.errors import KascadeError
from kascade.ir.library.models import PRESETS

H200 = make_cluster("h200", 8, 1)


def _model(name: str, cluster=H200, **par) -> IterationModel:
    return IterationModel(PRESETS[name], cluster, Parallelism(**par))


def test_decode_roofline_sanity():
    """Batch-1 decode of Llama-3-8B on one H200 is no faster than reading the weights and the KV cache
    once at the measured bandwidth, and within 1.6x of it."""
    m = _model("llama-3-8b")
    spec, bw = m.model, H200.target.hbm_bandwidth
    for context in (128, 1024, 8192):
        cost = m.iteration([], [context])
        ideal = (spec.weight_bytes() + context * spec.kv_bytes_per_token()) / bw
        ratio = cost.seconds / ideal
        assert 1.0 <= ratio <= 1.6, (f"context {context}: predicted {cost.seconds * 1e3:.3f} ms, "
                                     f"bandwidth bound {ideal * 1e3:.3f} ms, ratio {ratio:.2f}; {cost.breakdown}")
        assert cost.bound == "memory", cost
        assert sum(v for _, v in cost.breakdown) == pytest.approx(cost.seconds)
        # every weight is read once except the embedding table (one row per token)
        assert cost.hbm_bytes >= spec.weight_bytes() - spec.vocab * spec.hidden * spec.dtype_bytes


def test_large_prefill_is_compute_bound():
    m = _model("llama-3-8b")
    spec = m.model
    cost = m.iteration([(8192, 0)], [])
    parts = dict(cost.breakdown)
    resources = dict(cost.resources)
    assert cost.bound == "compute" and resources["compute"] > 0.8 * cost.seconds, cost
    assert parts["gemm"] + parts["attention_prefill"] > 0.9 * cost.seconds, parts
    # the work matches the model's FLOPs per token (the LM head runs on the last token only)
    head = 2 * spec.vocab * spec.hidden
    want = sum(spec.flops_per_token(i + 1) - head for i in range(0, 8192, 64)) * 64 + head
    assert cost.flops == pytest.approx(want, rel=0.05)
    peak = H200.target.tensor_peak("bf16")
    assert cost.seconds >= cost.flops / peak, (cost.seconds, cost.flops / peak)


def test_more_tensor_parallelism_is_faster_but_not_linearly():
    """Doubling tp lowers an iteration's time, by less than 2x: the all-reduces grow in share."""
    batch = ([(2048, 0)], [1500] * 32)
    times = {tp: _model("llama-3-8b", tp=tp).iteration(*batch) for tp in (1, 2, 4, 8)}
    for a, b in ((1, 2), (2, 4), (4, 8)):
        speedup = times[a].seconds / times[b].seconds
        assert 1.0 < speedup < 2.0, f"tp {a} -> {b}: {times[a].seconds * 1e3:.2f} -> {times[b].seconds * 1e3:.2f} ms"
    shares = [dict(times[tp].breakdown).get("all_reduce", 0) / times[tp].seconds for tp in (1, 2, 4, 8)]
    assert shares[0] == 0 and shares[1] < shares[2] < shares[3], shares
    decode = {tp: _model("llama-3-70b", tp=tp).iteration([], [2000] * 8).seconds for tp in (2, 4, 8)}
    assert decode[2] > decode[4] > decode[8] > decode[2] / 4, decode


@pytest.mark.parametrize("name, par, reason", [
    ("llama-3-70b", {}, "weights do not fit"),
    ("llama-3-70b", {"tp": 3}, "tp=3 does not divide the 64 attention heads"),
    ("mixtral-8x7b", {"ep": 3}, "ep=3 does not divide the 8 experts"),
    ("llama-3-8b", {"ep": 2}, "needs a mixture-of-experts model"),
    ("llama-3-8b", {"tp": 8, "dp": 2}, "needs 16 GPUs"),
    ("llama-3-8b", {"pp": 64}, "pp=64 is more stages than the 32 layers"),
])
def test_infeasible_plans_say_why(name, par, reason):
    cluster = make_cluster("h200", 8, 8) if par.get("pp") == 64 else H200
    model = _model(name, cluster, **par)
    got = model.infeasible()
    assert got is not None and reason in got, got
    if "divide" in reason:     # a plan that cannot be sharded cannot be timed either
        with pytest.raises(KascadeError, match=reason):
            model.iteration([], [100])


def test_feasible_plans_and_kv_capacity():
    small = _model("llama-3-8b")
    assert small.infeasible() is None
    spec = small.model
    free = 141e9 * 0.9 - spec.weight_bytes()
    cap = small.kv_capacity_tokens()
    assert 0.9 * free / spec.kv_bytes_per_token() < cap < free / spec.kv_bytes_per_token(), cap
    assert cap % 16 == 0
    assert _model("llama-3-8b", tp=2).kv_capacity_tokens() > 2 * cap          # weights halve per GPU
    assert _model("llama-3-70b", tp=8).infeasible() is None
    assert _model("llama-3-70b", tp=4, pp=2).infeasible() is None
    # tp beyond the KV heads replicates them: 16 GPUs hold no more KV per token than 8
    big = make_cluster("h200", 8, 2)
    assert _model("llama-3-70b", big, tp=16).kv_bytes_per_token_per_gpu() == \
        _model("llama-3-70b", big, tp=8).kv_bytes_per_token_per_gpu()
    assert _model("mixtral-8x7b", tp=2, ep=4).infeasible() is None


def test_pipeline_bubbles_and_expert_all_to_all():
    one = _model("llama-3-70b", tp=4, pp=2).iteration([], [1000])
    assert dict(one.breakdown)["pp_bubble"] > 0.3 * one.seconds, one      # one sequence, two stages
    many = _model("llama-3-70b", tp=4, pp=2).iteration([], [1000] * 16)
    assert "pp_bubble" not in dict(many.breakdown) and dict(many.breakdown)["p2p"] > 0
    moe = _model("mixtral-8x7b", tp=2, ep=4).iteration([(1024, 0)], [500] * 16)
    assert dict(moe.breakdown)["all_to_all"] > 0 and dict(moe.breakdown)["moe"] > 0


def test_kernel_seconds_hook_overrides_the_model():
    """A measured record for a sharded shape replaces the roofline for that kernel; others stay."""
    seen = []

    def db(kind, shape):
        seen.append((kind, dict(shape)))
        return 1e-3 if kind == "paged_decode" else None

    base = _model("llama-3-8b", tp=2).iteration([], [1024] * 4)
    hooked = IterationModel(PRESETS["llama-3-8b"], H200, Parallelism(tp=2), db=db).iteration([], [1024] * 4)
    assert dict(hooked.breakdown)["attention_decode"] == pytest.approx(32 * 1e-3)
    assert dict(hooked.breakdown)["gemm"] == dict(base.breakdown)["gemm"]
    decode = [s for k, s in seen if k == "paged_decode"]
    assert decode and decode[0]["G"] == 4 and decode[0]["R"] == 4 and decode[0]["B"] == 4   # sharded: 8 / tp
    assert {k for k, _ in seen} >= {"gemm", "paged_decode", "elementwise"}


def test_kv_transfer_and_collectives():
    one_node = _model("llama-3-8b")
    two_nodes = _model("llama-3-8b", make_cluster("h200", 8, 2))
    assert one_node.kv_transfer_seconds(0) == 0
    t = one_node.kv_transfer_seconds(4096)
    assert t == pytest.approx(2e-6 + 4096 * 131072 / 450e9)
    assert two_nodes.kv_transfer_seconds(4096) > 5 * t       # over InfiniBand
    c = H200
    big = 1 << 30
    assert c.collective_seconds("all_reduce", big, 8, False) == pytest.approx(14 * 2e-6 + 2 * 7 / 8 * big / 450e9)
    assert c.collective_seconds("all_gather", big, 8, False) == pytest.approx(7 * 2e-6 + 7 / 8 * big / 450e9)
    assert c.collective_seconds("all_to_all", big, 4, True) == pytest.approx(3 * 5e-6 + 3 / 4 * big / 50e9)
    assert c.collective_seconds("all_reduce", 4096, 8, False) < 5e-6       # one-shot for small messages
    assert c.collective_seconds("p2p", big, 1, False) == 0
    with pytest.raises(KascadeError, match="all_reduce"):
        c.collective_seconds("broadcast", 1, 2, False)
    with pytest.raises(KascadeError, match="bandwidth"):
        Link(0, 1e-6)
    assert make_cluster("a100", 4, 2).gpus == 8 and make_cluster("h100-pcie").intra.bandwidth == 64e9
    with pytest.raises(KascadeError, match="known"):
        make_cluster("tpu-v5")
    with pytest.raises(KascadeError, match="positive"):
        Parallelism(tp=0)
