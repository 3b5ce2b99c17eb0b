"""The iteration model against the partitioned serving-step cascade: its collectives come from the
partition pass, and its FLOPs and HBM bytes agree with ``count()`` of the per-device cascade."""

from __future__ import annotations

import pytest

from kascade.backends.cluster import make_cluster
from kascade.backends.iteration import (
    ExpertCollective,
    IterationModel,
    LayerCollective,
    Parallelism,
    expert_collectives,
    layer_collectives,
)
from kascade.ir.errors import KascadeError
from kascade.ir.library.models import PRESETS, ModelSpec, serving_step_cascade
from kascade.passes.analysis import count
from kascade.passes.partition import partition
from kascade.passes.schedule_decode import group_rows

H200 = make_cluster("h200", 8, 1)

# decode-only, prefill-only (one chunk of a fresh prompt), mixed (a chunk with cached context and
# decodes): token counts on the iteration model's bucket grid (512 = 448 + 64), so its shape
# bucketing adds nothing; Mixtral's 512 tokens x 2 choices fill its 128-row expert tiles exactly
# (a small decode batch would leave most rows of each expert's tile empty: 2x the FLOPs at 64 tokens)
BATCHES = {"decode": ([], [1024] * 512), "prefill": ([(512, 0)], []), "mixed": ([(448, 1024)], [2048] * 64)}
CASES = [("llama-3-8b", 1), ("llama-3-8b", 2), ("mixtral-8x7b", 2)]


def _cascade_view(spec: ModelSpec, tp: int, prefill, decode) -> tuple[float, float, float, float]:
    """FLOPs and HBM bytes of one iteration over the replica's ``tp`` GPUs from ``count()`` of the
    per-device partitioned serving step, times the layers, plus the LM head the cascade lacks
    (``S`` last-token rows against a ``vocab / tp`` weight shard per GPU); the useful FLOPs of the
    decode tokens' attention (``QK^T`` and ``PV`` over their contexts); and the FLOPs the cascade
    spends on masked (query, key) pairs: its attention spans every token against the batch's
    longest cache (``M1 x M0`` positions) and against all ``T`` new tokens."""
    step = serving_step_cascade(spec, prefill, decode, tp=1)
    groups = max(spec.kv_heads, tp)
    ext = {**step.extents, "G": groups, "R": spec.heads // groups}
    if tp > 1:
        prog = partition(step.cascade, {"g": ("tp", tp), "f": ("tp", tp)})
        c = count(prog.local, {**ext, **prog.local_extents(ext)})
    else:
        c = count(step.cascade, ext)
    S, D, V, b, L = ext["S"], spec.hidden, spec.vocab, spec.dtype_bytes, spec.layers
    flops = tp * L * c.total_flops + 2.0 * S * V * D
    hbm = tp * L * c.bytes + tp * (V // tp * D + S * (V // tp + D)) * b
    per_pair = 4.0 * L * spec.heads * spec.head_dim
    useful = sum(n * c + n * (n + 1) // 2 for n, c in prefill) + sum(decode)
    masked = ext["T"] * (ext["M1"] * ext["M0"] + ext["U"]) - useful
    return flops, hbm, per_pair * sum(decode), per_pair * masked


def _activation_traffic(spec: ModelSpec, tp: int, tokens: int) -> float:
    """The bytes an unfused layer moves besides weights and KV over the replica: each GEMM reads its
    activations and writes its output; the norms, RoPE, residual adds and SwiGLU activation stream
    their ``tokens x width`` once each way (``count()`` gives the fused minimum: the layer's input and
    output only)."""
    D, q, kv = spec.hidden, spec.heads // tp * spec.head_dim, max(1, spec.kv_heads // tp) * spec.head_dim
    F = 0 if spec.is_moe else spec.intermediate // tp
    gemms = (D + q + 2 * kv) + (q + D) + (D + spec.experts if spec.is_moe else (D + 2 * F) + (F + D))
    elementwise = 2 * (2 * D + q + kv + 2 * D + F)
    return float(tp * spec.layers * tokens * (gemms + elementwise) * spec.dtype_bytes)


def test_collectives_come_from_the_partition_pass():
    """Under tp the layer's collectives are the partitioned serving step's two all-reduces of the
    attention output and the FFN (or MoE) down projection, T x D at the activation dtype; the new
    keys and values stay on their GPU (no all-gather); tp=1 has none."""
    for name in ("llama-3-8b", "mixtral-8x7b", "qwen3-30b-a3b"):
        spec = PRESETS[name]
        got = layer_collectives(spec, 4)
        assert got == (LayerCollective("all_reduce", "HA_part", 4, spec.hidden * spec.dtype_bytes),
                       LayerCollective("all_reduce", "Y_part", 4, spec.hidden * spec.dtype_bytes)), (name, got)
    assert layer_collectives(PRESETS["llama-3-8b"], 1) == ()
    # tp past the KV heads replicates them: still the same two all-reduces
    assert [c.tensor for c in layer_collectives(PRESETS["llama-3-8b"], 16)] == ["HA_part", "Y_part"]
    with pytest.raises(KascadeError, match="tp=3"):
        layer_collectives(PRESETS["llama-3-8b"], 3)


def test_iteration_times_the_partitioned_collectives():
    """An iteration's all-reduce time is the listed collectives at its token count, per layer, on
    the tensor-parallel link; it grows with the tokens and vanishes at tp=1."""
    m = IterationModel(PRESETS["llama-3-8b"], H200, Parallelism(tp=4))
    pre, dec = [(300, 0)], [500] * 20
    tokens = 320
    want = sum(m.model.layers * H200.collective_seconds(c.kind, tokens * c.bytes_per_token, c.group, False)
               for c in m.collectives)
    got = dict(m.iteration(pre, dec).breakdown)["all_reduce"]
    assert got == pytest.approx(want, rel=1e-12), (got, want)
    assert dict(m.iteration([(1000, 0)], []).breakdown)["all_reduce"] > got
    one = IterationModel(PRESETS["llama-3-8b"], H200, Parallelism(tp=1))
    assert "all_reduce" not in dict(one.iteration(pre, dec).breakdown)


@pytest.mark.parametrize("name,tp", CASES, ids=[f"{n}-tp{t}" for n, t in CASES])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_work_agrees_with_the_cascade(name, tp, batch):
    """FLOPs: the kernels count the work their tiles run, the cascade the work its ranks span. They
    differ by the paged-decode kernel's GQA rows (``R`` query heads of a KV head padded to a 16-row
    MMA tile: ``(BLOCK_R / R - 1)`` more decode-attention FLOPs) and by the cascade's masked
    attention pairs (every token against the batch's longest cache and all the batch's tokens; the
    kernels skip masked tiles), both computed here and moved to the cascade's side; what remains
    (the prefill kernel's diagonal tiles, norms and RoPE counted per element vs per pass) is within
    2 %.

    HBM bytes: ``count()`` is the fused minimum (weights, KV cache, the layer's input and output);
    the iteration model also charges each unfused kernel's activation traffic. With that traffic
    added (:func:`_activation_traffic`) they agree within 4 %: attention's Q/K/V/O streams, which
    the helper leaves out, and the cache's block rounding."""
    spec, (pre, dec) = PRESETS[name], BATCHES[batch]
    it = IterationModel(spec, H200, Parallelism(tp=tp)).iteration(pre, dec)
    flops, hbm, decode_attention, masked = _cascade_view(spec, tp, pre, dec)
    R = spec.heads // max(spec.kv_heads, tp)
    padding = (group_rows(R) / R - 1) * decode_attention
    f_ratio = it.flops / (flops - masked + padding)
    assert abs(f_ratio - 1) <= 0.02, (f"{name} tp={tp} {batch}: iteration model {it.flops:.4e} FLOPs, cascade "
                                      f"{flops:.4e} - masked pairs {masked:.4e} + GQA row padding {padding:.4e}; "
                                      f"ratio {f_ratio:.4f}")
    tokens = sum(n for n, _ in pre) + len(dec)
    traffic = _activation_traffic(spec, tp, tokens)
    assert hbm <= it.hbm_bytes * 1.01, (f"{name} tp={tp} {batch}: the fused minimum {hbm:.4e} B exceeds the "
                                        f"iteration model's {it.hbm_bytes:.4e} B")
    b_ratio = it.hbm_bytes / (hbm + traffic)
    assert abs(b_ratio - 1) <= 0.04, (f"{name} tp={tp} {batch}: iteration model {it.hbm_bytes:.4e} B, cascade "
                                      f"minimum {hbm:.4e} B + unfused activations {traffic:.4e} B; ratio "
                                      f"{b_ratio:.4f}")


def test_the_partition_pass_runs_once_per_model_and_degree():
    """The simulator calls iteration() per iteration: the partitioned cascade's collectives are
    collected once per (model, tp), never per call (speed itself: bench/serving.py)."""
    layer_collectives.cache_clear()
    m = IterationModel(PRESETS["llama-3-70b"], H200, Parallelism(tp=8))
    for i in range(50):
        m.iteration([(64 + 16 * i, 0)], [1000 + i] * (i % 50 + 1))
    IterationModel(PRESETS["llama-3-70b"], H200, Parallelism(tp=8)).iteration([(64, 0)], [1000])
    assert layer_collectives.cache_info().misses == 1


def test_expert_collectives_come_from_the_partition_pass():
    """Under ep the MoE layer's all-to-alls are the partitioned serving step's (grouped, x and t over
    ep, g over tp): the count exchange (X i32 per device, independent of the batch), the dispatch
    (the rows at the activation dtype with their i32 expert ids, one message) and the combine; each
    per token of the device's own tokens."""
    for name in ("mixtral-8x7b", "qwen3-30b-a3b"):
        spec = PRESETS[name]
        K, D, b, X = spec.experts_per_token, spec.hidden, spec.dtype_bytes, spec.experts
        for tp, ep in ((1, 2), (1, 4), (2, 4), (1, 8)):
            got = expert_collectives(spec, tp, ep)
            assert got == (ExpertCollective(("CNT",), ep, 4.0 * X, 0.0),
                           ExpertCollective(("ROWEXP", "XS"), ep, 0.0, K * (D * b + 4.0)),
                           ExpertCollective(("EO",), ep, 0.0, float(K * D * b))), (name, tp, ep, got)
    assert expert_collectives(PRESETS["mixtral-8x7b"], 2, 1) == ()
    with pytest.raises(KascadeError, match="dense"):
        expert_collectives(PRESETS["llama-3-8b"], 1, 2)
    with pytest.raises(KascadeError, match="ep=3"):
        expert_collectives(PRESETS["mixtral-8x7b"], 1, 3)


def test_iteration_times_the_expert_all_to_alls():
    """An iteration's all-to-all time is the listed expert collectives, per layer, on the expert-parallel
    link, each GPU sending the rows of its 1/tp of its attention group's tokens."""
    spec = PRESETS["mixtral-8x7b"]
    m = IterationModel(spec, H200, Parallelism(tp=2, ep=4))
    group_tokens = 16                       # 64 decodes over 4 attention groups
    want = spec.layers * sum(H200.collective_seconds("all_to_all", c.fixed_bytes + c.bytes_per_token
                                                     * group_tokens / 2, c.group, False)
                             for c in m.expert_collectives)
    got = dict(m.iteration([], [1000] * 64).breakdown)["all_to_all"]
    assert got == pytest.approx(want, rel=1e-12), (got, want)
    assert dict(m.iteration([(2048, 0)], []).breakdown)["all_to_all"] > got
    assert "all_to_all" not in dict(IterationModel(spec, H200, Parallelism(tp=2)).iteration([], [1000] * 64).breakdown)


EP_CASES = [("mixtral-8x7b", 1, 2), ("mixtral-8x7b", 1, 4), ("mixtral-8x7b", 2, 4), ("mixtral-8x7b", 1, 8),
            ("qwen3-30b-a3b", 1, 4), ("qwen3-30b-a3b", 2, 4), ("qwen3-30b-a3b", 1, 8)]


def test_expert_all_to_alls_keep_the_formula_scale():
    """The pass's all-to-alls against the hand-written formula they replace (dispatch + combine,
    ``2 * L * a2a(group tokens * K * D * bytes / tp)``): the row messages are the same size, the count
    exchange adds one latency-bound collective per layer (at most 1.5x for tiny batches, within a few
    % for a prefill), and the ids add 4 bytes per row."""
    rows = []
    for name, tp, ep in EP_CASES:
        spec = PRESETS[name]
        m = IterationModel(spec, H200, Parallelism(tp=tp, ep=ep))
        for label, pre, dec in (("decode8x", [], [1024] * 8 * ep), ("decode64x", [], [1024] * 64 * ep),
                                ("prefill4096", [(4096, 0)], [])):
            lead = 4096 if pre else len(dec) // ep
            old = 2 * spec.layers * H200.collective_seconds(
                "all_to_all", lead * spec.experts_per_token * spec.hidden * spec.dtype_bytes / tp, ep, False)
            new = dict(m.iteration(pre, dec).breakdown)["all_to_all"]
            rows.append(f"{name} tp{tp} ep{ep} {label}: formula {old * 1e3:.3f} ms, pass {new * 1e3:.3f} ms "
                        f"(x{new / old:.2f})")
            # a prefill's rows are bandwidth-bound: the count exchange's latencies are lost in them
            assert old <= new <= (1.1 if pre else 1.5) * old, "\n".join(rows)


def test_expert_all_to_alls_are_partitioned_once_per_model_and_degrees():
    """As the TP collectives: the expert all-to-alls come from one partition per (model, tp, ep)."""
    expert_collectives.cache_clear()
    m = IterationModel(PRESETS["qwen3-30b-a3b"], H200, Parallelism(tp=2, ep=4))
    for i in range(50):
        m.iteration([(64 + 16 * i, 0)], [1000 + i] * (i % 50 + 1))
    IterationModel(PRESETS["qwen3-30b-a3b"], H200, Parallelism(tp=2, ep=4))
    assert expert_collectives.cache_info().misses == 1
