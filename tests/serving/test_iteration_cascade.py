"""The iteration model against the partitioned serving-step cascade: its collectives come from the
partition pass, and its FLOPs and HBM bytes agree with ``count()`` of the per-device cascade."""

from __future__ import annotations

import time

import pytest

from kascade.backends.cluster import make_cluster
from kascade.backends.iteration import IterationModel, LayerCollective, Parallelism, layer_collectives
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


def test_iteration_stays_fast():
    """The partition pass runs once per model and degree (memoised); an iteration's collectives are
    then a multiply per collective: a warm call stays well under a millisecond."""
    layer_collectives.cache_clear()
    t0 = time.perf_counter()
    m = IterationModel(PRESETS["llama-3-70b"], H200, Parallelism(tp=8))
    setup = time.perf_counter() - t0
    batches = [([(64 + 16 * i, 0)], [1000 + i] * (i % 50 + 1)) for i in range(200)]
    for pre, dec in batches:
        m.iteration(pre, dec)
    t0 = time.perf_counter()
    for pre, dec in batches:
        m.iteration(pre, dec)
    per_call = (time.perf_counter() - t0) / len(batches)
    assert layer_collectives.cache_info().misses == 1
    assert per_call < 1e-3, f"warm iteration() {per_call * 1e6:.0f} us per call (setup {setup * 1e3:.0f} ms)"
