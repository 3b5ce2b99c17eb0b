"""Every rewrite is checked by evaluating before and after on fresh random inputs:
the same function, within float64 rounding. Each test states before, after and the
claim in its docstring."""

from __future__ import annotations

import pytest
import torch

from kascade.backends.inputs import random_inputs
from kascade.backends.reference import evaluate
from kascade.ir import RewriteError, parse
from kascade.ir.library import attention, gemm, paged_decode, rmsnorm
from kascade.passes.analysis import pass_counts
from kascade.passes.normalize import defer_normalization
from kascade.passes.pipeline import decode_steps, lower, prefill_steps
from kascade.passes.softmax import merge_partials, online_softmax, split_reduction
from kascade.passes.split_rank import split_rank

ATOL = 1e-12


def same_function(before, after, extents, gen, after_extents=None, fixed=None):
    inputs, params = random_inputs(before, extents, generator=gen, fixed=fixed)
    want = evaluate(before, inputs, params, extents)
    got = evaluate(after, inputs, params, {**extents, **(after_extents or {})})
    assert want.keys() == got.keys()
    for k in want:
        assert not torch.isnan(want[k]).any(), f"reference {k} has NaN"
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=1e-10, msg=f"output {k} differs")


ATTN = dict(B=2, G=2, R=3, P=13, M=29, E=7, F=5)


# ---- defer_normalization ------------------------------------------------------------
def test_defer_normalization_turns_3pass_into_2pass(gen):
    """before: A = SN / SD; AV = sum[m](A * V)   after: AV = sum[m](SN * V), readers use AV / SD.
    Claim: same function, 3 passes over m become 2."""
    c3 = attention("3pass", causal=True)
    c2 = defer_normalization(c3)
    assert "A" not in set(c2.tensor_names())
    assert pass_counts(c3)["m"] == 3 and pass_counts(c2)["m"] == 2
    same_function(c3, c2, ATTN, gen)


def test_defer_normalization_leaves_a_varying_divisor_alone():
    """before/after: sum[m](N[m] / D[m] * V[m]) with D depending on m.  Claim: not rewritten."""
    c = parse("""
input N[m, p]: f32
input D[m]: f32
input V[m, f]: f32
A[m, p] = N[m, p] / D[m]
output O[p, f]: f32 = sum[m](A[m, p] * V[m, f])
""")
    assert defer_normalization(c) == c


# ---- split_rank -------------------------------------------------------------------------
@pytest.mark.parametrize("tile", [1, 4, 7, 29, 64])
def test_split_rank_reduced_rank_with_tail(gen, tile):
    """before: sums/maxes over m   after: over (m1, m0), m = m1 * M0 + m0, tail masked.
    Claim: same function for tiles that divide M, that don't, and that exceed it."""
    c = attention("2pass", causal=True)
    s = split_rank(c, "m", tile=tile)
    assert {"m1", "m0"} <= {r for st in s.stmts for r in st.ranks}
    same_function(c, s, ATTN, gen)


def test_split_rank_symbolic_tile(gen):
    """after: 'extent M0' is free and bound at evaluation.  Claim: one cascade serves any tile."""
    c = gemm()
    s = split_rank(c, "k")
    assert "extent K0\n" in str(s) and "extent K1 = cdiv(K, K0)" in str(s)
    for tile in (3, 8):
        same_function(c, s, dict(M=6, N=5, K=19), gen, after_extents={"K0": tile})


def test_split_rank_of_an_output_rank(gen):
    """before: O[.., p, ..]   after: intermediates over (p1, p0), O reads them at [p // P0, p % P0].
    Claim: same function; the output keeps its declared ranks."""
    c = attention("2pass", causal=True)
    s = split_rank(c, "p", tile=4)
    assert s.producer("O").ranks == c.producer("O").ranks
    same_function(c, s, ATTN, gen)


def test_split_rank_tail_masks_are_needed(gen):
    """divisible=True omits the masks.  Claim: a non-dividing tile then poisons the output (NaN),
    which shows the masks are what make the tail correct."""
    c = gemm()
    s = split_rank(c, "k", tile=4, divisible=True)
    inputs, params = random_inputs(c, dict(M=3, N=2, K=10), generator=gen)
    out = evaluate(s, inputs, params, dict(M=3, N=2, K=10))
    assert torch.isnan(out["C"]).all()


def test_split_rank_named_after_its_own_extent_is_a_free_symbol(gen):
    """count="K1" names the outer extent itself: declared once, free, bound at evaluation."""
    s = split_rank(gemm(), "k", count="K1")
    assert [str(x.name) for x in s.extents] == ["K1", "K0"] and s.extent_decl("K1").value is None
    same_function(gemm(), s, dict(M=3, N=4, K=11), gen, after_extents={"K1": 3})


def test_split_rank_errors():
    c = gemm()
    with pytest.raises(RewriteError, match="no rank 'z'"):
        split_rank(c, "z")
    with pytest.raises(RewriteError, match="already used"):
        split_rank(c, "k", "m", "k0")
    with pytest.raises(RewriteError, match="not both"):
        split_rank(c, "k", tile=4, count=2)
    with pytest.raises(RewriteError, match="positive int"):
        split_rank(c, "k", tile=0)


# ---- online_softmax ------------------------------------------------------------------------
VARIANTS = [
    dict(),
    dict(causal=True),
    dict(window=(3, 2)),
    dict(window=(4, -1), causal=True),
    dict(softcap=True),
    dict(alibi=True),
    dict(causal=True, softcap=True, alibi=True),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v) or "plain")
@pytest.mark.parametrize("extents", [ATTN, dict(ATTN, P=31, M=9), dict(ATTN, G=1, R=7, P=1)],
                         ids=["Sq<Sk", "Sq>Sk", "mqa-decode"])
def test_prefill_pipeline_derives_1pass_for_any_score(gen, variant, extents):
    """before: 3-pass attention with masks / soft-cap / ALiBi   after: the FuseMax 1-pass cascade.
    Claim: same function at every step (rows that see no key stay 0), and 1 pass over m1."""
    c = attention("3pass", **variant)
    trace = lower(c, prefill_steps("m"))
    assert [n for n, _ in trace] == ["input", "defer_normalization", "split_rank", "online_softmax"]
    final = trace[-1][1]
    assert pass_counts(final)["m1"] == 1
    assert any(s.step == "m1" for s in final.einsums)
    for tile in (4, 5):
        same_function(c, final, extents, gen, after_extents={"M0": tile})


def test_online_softmax_matches_the_library_1pass_form(gen):
    """Claim: the derived cascade and the hand-written FuseMax form compute the same function."""
    derived = lower(attention("3pass", causal=True), prefill_steps("m"))[-1][1]
    handwritten = attention("1pass", causal=True)
    inputs, params = random_inputs(handwritten, ATTN, generator=gen)
    a = evaluate(derived, inputs, params, dict(ATTN, M0=6))["O"]
    b = evaluate(handwritten, inputs, params, dict(ATTN, M0=6))["O"]
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-10)


def test_online_softmax_refuses_what_it_cannot_rescale():
    """before: a sum over m of log(QK - GM).  Claim: refused, naming the Einsum, not miscompiled."""
    c = parse("""
input S[m, p]: f32
GM[p] = max[m](S[m, p])
SN[m, p] = exp(S[m, p] - GM[p])
LG[m, p] = log(SN[m, p] + 1)
output O[p]: f32 = sum[m](LG[m, p])
""")
    with pytest.raises(RewriteError, match="'LG'"):
        online_softmax(split_rank(c, "m"), "m1")


def test_online_softmax_needs_deferred_normalization():
    """before: the 3-pass form, split.  Claim: refused, saying a second pass is needed."""
    c = split_rank(attention("3pass"), "m")
    with pytest.raises(RewriteError, match="second pass"):
        online_softmax(c, "m1")


# ---- split_reduction -------------------------------------------------------------------------
@pytest.mark.parametrize("parts", [1, 2, 3, 7, 40])
def test_split_reduction_attention(gen, parts):
    """before: 2-pass attention   after: per-split local max / sums, merged over c with exp(LM - GM).
    Claim: same function for any split count, including more splits than keys (empty splits)."""
    c = attention("2pass", causal=True, window=(5, 0))
    s = split_reduction(c, "m", parts)
    assert pass_counts(s)["c"] == 2  # partials, then the merge
    same_function(c, s, ATTN, gen)


def test_split_reduction_plain_sum_is_split_k(gen):
    """before: C = sum[k](A * B)   after: partial sums per c, then sum[c].  Claim: same function."""
    c = gemm("bias_gelu")
    same_function(c, split_reduction(c, "k", 4), dict(M=5, N=6, K=23), gen)


def test_split_reduction_of_a_non_softmax_max(gen):
    """A max that nothing exponentiates is merged with max[c].  Claim: same function."""
    c = parse("""
input X[t, d]: f32
output Y[t]: f32 = max[d](X[t, d] * 2)
""")
    s = split_reduction(c, "d", 3)
    same_function(c, s, dict(T=4, D=11), gen)


@pytest.mark.parametrize("parts", [1, 2, 5])
@pytest.mark.parametrize("block", [1, 5, 16])
def test_split_kv_on_paged_decode(gen, paged_cache, parts, block):
    """before: paged decode over (m1 blocks, m0 slots)   after: blocks spread over C splits + merge.
    Claim: same function as the original and as the library's hand-written split-KV form."""
    lens = [1, 37, 5, 64]
    KC, VC, BT, SL, _, _ = paged_cache(lens, block, 2, 6, 4, gen)
    fixed = dict(KC=KC, VC=VC, BT=BT, SL=SL)
    c = paged_decode()
    ext = dict(B=4, G=2, R=3, E=6, F=4)
    trace = lower(c, decode_steps("m1", parts))
    same_function(c, trace[-1][1], ext, gen, fixed=fixed)
    inputs, params = random_inputs(c, ext, generator=gen, fixed=fixed)
    mine = evaluate(trace[-1][1], inputs, params, ext)["O"]
    theirs = evaluate(paged_decode(split_kv=True), inputs, params, dict(ext, C=parts))["O"]
    torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=1e-10)


def test_merge_partials_refuses_operators():
    c = parse("""
input LG[t, x]: f32
TV[t, k], TI[t, k] = topk[x](LG[t, x])
output Y[t]: f32 = sum[k](TV[t, k])
""")
    with pytest.raises(RewriteError, match="operators"):
        merge_partials(c, "x")


def test_rmsnorm_split_keeps_function(gen):
    """A reduction feeding an elementwise output (RMSNorm's mean square).  Claim: same function."""
    c = rmsnorm()
    same_function(c, split_reduction(c, "d", 2), dict(T=3, D=13), gen)
