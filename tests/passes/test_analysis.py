"""Counting and pass analysis on hand-computed cases."""

from __future__ import annotations

import pytest

from kascade.ir import ShapeError, parse
from kascade.ir.library import attention, gemm, paged_decode, rmsnorm
from kascade.passes.analysis import Counts, count, pass_counts, passes_over
from kascade.passes.pipeline import decode_steps, lower, prefill_steps


def test_gemm_counts():
    """M*N*K multiply-accumulates on tensor cores; bf16 A, B read once, C written once."""
    M, N, K = 64, 48, 80
    n = count(gemm(), dict(M=M, N=N, K=K))
    assert n.tensor_macs == M * N * K and n.tensor_flops == 2 * M * N * K
    assert n.special == 0 and n.flops == 0
    assert dict(n.bytes_in) == {"A": M * K * 2, "B": N * K * 2}
    assert dict(n.bytes_out) == {"C": M * N * 2}


def test_epilogue_counts_as_special_and_plain_flops():
    """gelu costs 1 special-function op and 4 plain FLOPs per element, the bias add 1."""
    n = count(gemm("bias_gelu"), dict(M=3, N=5, K=7))
    assert n.tensor_macs == 3 * 5 * 7
    assert n.special == 15 and n.flops == 15 * (4 + 1)


def test_copy_moves_bytes_and_does_no_arithmetic():
    n = count(parse("input X[i, j]: f32\noutput Y[i, j]: f32 = X[i, j]\n"), dict(I=100, J=30))
    assert n.total_flops == 0 and n.bytes == 2 * 100 * 30 * 4


def test_rmsnorm_square_sum_is_not_a_tensor_core_contraction():
    """sum[d](X * X) has no rank that only one factor has: plain FLOPs, not MACs."""
    n = count(rmsnorm(), dict(T=8, D=16))
    assert n.tensor_macs == 0
    assert n.special == 8  # one rsqrt per token


def test_attention_counts():
    """QK^T and PV: B*G*R*P*M*(E + F) MACs; one exp per score; each tensor moved once."""
    B, G, R, P, M, E, F = 2, 2, 4, 128, 256, 64, 32
    n = count(attention("2pass"), dict(B=B, G=G, R=R, P=P, M=M, E=E, F=F))
    assert n.tensor_macs == B * G * R * P * M * (E + F)
    assert n.special == B * G * R * P * M
    assert dict(n.bytes_in) == {"Q": B * G * R * P * E * 2, "K": B * G * M * E * 2, "V": B * G * M * F * 2}


def test_attention_intensity_grows_with_sequence():
    small = count(attention("2pass"), dict(B=1, G=8, R=1, P=128, M=128, E=128, F=128))
    large = count(attention("2pass"), dict(B=1, G=8, R=1, P=4096, M=4096, E=128, F=128))
    assert large.total_flops / large.bytes > 10 * small.total_flops / small.bytes


def test_paged_cache_bytes_count_touched_blocks_not_the_whole_pool():
    """KC[BT[b, m1], m0, g, e]: B * M1 * M0 * G * E elements touched, capped by the pool."""
    ext = dict(B=4, R=1, G=2, E=8, F=8, N=1000, M0=16, M1=3)
    n = count(paged_decode(), ext)
    assert dict(n.bytes_in)["KC"] == 4 * 3 * 16 * 2 * 8 * 2
    small_pool = count(paged_decode(), dict(ext, N=2))
    assert dict(small_pool.bytes_in)["KC"] == 2 * 16 * 2 * 8 * 2


def test_counts_add():
    a = Counts(1, 2, 3, (("X", 10),), (("Y", 4),))
    b = Counts(10, 20, 30, (("X", 5), ("Z", 1)), ())
    s = a + b
    assert (s.tensor_macs, s.special, s.flops) == (11, 22, 33)
    assert dict(s.bytes_in) == {"X": 15, "Z": 1} and s.bytes == 20


def test_count_needs_every_extent():
    with pytest.raises(ShapeError, match="pass extents="):
        count(gemm(), dict(M=3, N=4))


@pytest.mark.parametrize("form, passes", [("3pass", 3), ("2pass", 2)])
def test_pass_counts_of_attention_forms(form, passes):
    assert pass_counts(attention(form))["m"] == passes


def test_the_1pass_form_makes_one_pass_over_the_tiles():
    counts = pass_counts(attention("1pass"))
    assert counts["m1"] == 1
    assert counts["m0"] == 2  # inside a tile: the tile max, then the exponentials


def test_derived_cascades_report_their_passes():
    trace = lower(attention("3pass", causal=True), prefill_steps("m"))
    assert [pass_counts(c).get("m", pass_counts(c).get("m1")) for _, c in trace] == [3, 2, 2, 1]
    split = lower(paged_decode(), decode_steps("m1", 4))[-1][1]
    assert passes_over(split, "c") == 2  # the partials, then the merge


def test_a_recurrence_is_one_pass():
    c = parse("""
input X[i]: f32
init C[0] = 0
C[i + 1] = C[i] + X[i]
output S[i]: f32 = C[i + 1] * 2
""")
    assert pass_counts(c) == {"i": 1}
