"""The reference evaluator against independent plain-torch computations, in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from kascade.backends.reference import bind_extents, evaluate
from kascade.ir import CascadeError, DTypeError, ShapeError, parse

F64 = torch.float64


def randn(*shape):
    return torch.randn(*shape, dtype=F64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# FuseMax's 1-pass cascade over tiles of M0 keys, with a masked tail tile.
ATTENTION_1PASS = """
param scale: f32
input Q[p, e]: f32
input K[m, e]: f32
input V[m, f]: f32
extent M0
extent M1 = cdiv(M, M0)

QK[m1, m0, p] = where(m1 * M0 + m0 < M, sum[e](Q[p, e] * K[m1 * M0 + m0, e]) * scale, -inf)
LM[m1, p] = max[m0](QK[m1, m0, p])
init RM[0, p] = -inf
RM[m1 + 1, p] = max(RM[m1, p], LM[m1, p])
SLN[m1, m0, p] = exp(QK[m1, m0, p] - RM[m1 + 1, p])
PRM[m1, p] = exp(RM[m1, p] - RM[m1 + 1, p])
SLD[m1, p] = sum[m0](SLN[m1, m0, p])
init RD[0, p] = 0
RD[m1 + 1, p] = PRM[m1, p] * RD[m1, p] + SLD[m1, p]
SLNV[m1, f, p] = sum[m0](SLN[m1, m0, p] * where(m1 * M0 + m0 < M, V[m1 * M0 + m0, f], 0.0))
init RNV[0, f, p] = 0
RNV[m1 + 1, f, p] = PRM[m1, p] * RNV[m1, f, p] + SLNV[m1, f, p]
output O[p, f] = RNV[M1, f, p] / RD[M1, p]
"""


def test_gemm_bias_gelu():
    c = parse("""
input A[m, k]: bf16
input B[k, n]: bf16
input BIAS[n]: f32
output C[m, n]: bf16 = gelu(sum[k](A[m, k] * B[k, n]) + BIAS[n])
""")
    a, b, bias = randn(33, 70), randn(70, 19), randn(19)
    out = evaluate(c, {"A": a, "B": b, "BIAS": bias})
    assert set(out) == {"C"} and out["C"].dtype == F64
    torch.testing.assert_close(out["C"], F.gelu(a @ b + bias), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 17, 97, 40), (1, 1, 1, 1, 59), (1, 2, 1025, 1025, 256)])
def test_attention_3pass_matches_sdpa(shape, attention_text):
    """DESIGN.md's attention cascade, verbatim (the fixture in tests/conftest.py)."""
    b, h, sq, sk, d = shape
    q, k, v = randn(b, h, sq, d), randn(b, h, sk, d), randn(b, h, sk, d)
    out = evaluate(parse(attention_text), {"Q": q, "K": k, "V": v}, {"scale": d ** -0.5})
    torch.testing.assert_close(out["O"], F.scaled_dot_product_attention(q, k, v), rtol=1e-10, atol=1e-12)


def test_gqa_indexes_kv_by_group():
    c = parse("""
input Q[g, r, p, e]: bf16
input K[g, m, e]: bf16
input V[g, m, f]: bf16
QK[g, r, m, p] = sum[e](Q[g, r, p, e] * K[g, m, e])
GM[g, r, p] = max[m](QK[g, r, m, p])
SN[g, r, m, p] = exp(QK[g, r, m, p] - GM[g, r, p])
output O[g, r, p, f] = sum[m](SN[g, r, m, p] * V[g, m, f]) / sum[m](SN[g, r, m, p])
""")
    q, k, v = randn(3, 4, 9, 40), randn(3, 13, 40), randn(3, 13, 40)
    out = evaluate(c, {"Q": q, "K": k, "V": v})["O"]
    ref = F.scaled_dot_product_attention(q, k[:, None], v[:, None], scale=1.0)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m0", [1, 4, 16, 200])
def test_attention_1pass_recurrence_matches_sdpa(m0):
    sq, sk, d = 7, 45, 24
    q, k, v = randn(sq, d), randn(sk, d), randn(sk, d)
    out = evaluate(parse(ATTENTION_1PASS), {"Q": q, "K": k, "V": v}, {"scale": 0.3}, {"M0": m0}, keep_all=True)
    ref = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=0.3)[0]
    torch.testing.assert_close(out["O"], ref, rtol=1e-10, atol=1e-12)
    assert out["RM"].shape == (math.ceil(sk / m0) + 1, sq)  # recurrent rank has M1 + 1 entries
    torch.testing.assert_close(out["RM"][-1], (q @ k.T * 0.3).max(dim=1).values)


def test_causal_mask_bottom_right_with_sq_ne_sk():
    c = parse("""
input Q[p, e]: f32
input K[m, e]: f32
S[m, p] = where(m <= p + M - P, sum[e](Q[p, e] * K[m, e]), -inf)
G[p] = max[m](S[m, p])
N[m, p] = exp(S[m, p] - G[p])
D[p] = sum[m](N[m, p])
output A[p, m] = N[m, p] / D[p]
""")
    sq, sk, d = 5, 11, 8
    q, k = randn(sq, d), randn(sk, d)
    s = q @ k.T
    allowed = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + sk - sq
    ref = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=1)
    out = evaluate(c, {"Q": q, "K": k})["A"]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    assert (out[0, sk - sq + 1:] == 0).all() and (out[-1] > 0).all()


def test_outputs_are_fresh_tensors_and_keep_all_returns_intermediates():
    c = parse("input X[i, j]: f32\nT[j, i] = X[i, j]\noutput Y[i, j] = T[j, i]")
    x = randn(3, 4)
    out = evaluate(c, {"X": x}, device="cpu")
    assert set(out) == {"Y"} and torch.equal(out["Y"], x) and out["Y"].data_ptr() != x.data_ptr()
    out = evaluate(c, {"X": x}, keep_all=True)
    assert set(out) == {"T", "Y"} and torch.equal(out["T"], x.T) and out["T"].is_contiguous()


def test_recurrences_prefix_sum_and_running_max():
    c = parse("""
input X[i]: f32
init C[0] = 0
output C[i + 1] = C[i] + X[i]
init R[0] = -inf
output R[i + 1] = max(R[i], X[i])
""")
    x = randn(29)
    out = evaluate(c, {"X": x})
    assert out["C"].shape == (30,) and out["C"][0] == 0 and out["R"][0] == -math.inf
    torch.testing.assert_close(out["C"][1:], torch.cumsum(x, 0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["R"][1:], torch.cummax(x, 0).values, rtol=0, atol=0)


def test_recurrence_init_broadcasts_over_other_ranks():
    c = parse("""
input X[b, i]: f32
init C[b, 0] = 1.5
output C[b, i + 1] = C[b, i] * 2 + X[b, i]
""")
    x = randn(3, 6)
    ref = torch.empty(3, 7, dtype=F64)
    ref[:, 0] = 1.5
    for j in range(6):
        ref[:, j + 1] = ref[:, j] * 2 + x[:, j]
    torch.testing.assert_close(evaluate(c, {"X": x})["C"], ref, rtol=1e-12, atol=1e-12)


def test_affine_access_with_symbolic_tile_poisons_unmasked_tail():
    c = parse("""
input X[m]: f32
extent M0
extent M1 = cdiv(M, M0)
output T[m1, m0] = X[m1 * M0 + m0]
output MASKED[m1, m0] = where(m1 * M0 + m0 < M, X[m1 * M0 + m0], 0.0)
output S[] = sum[m1, m0](where(m1 * M0 + m0 < M, X[m1 * M0 + m0], 0.0))
""")
    x = randn(13)
    assert bind_extents(c, {"X": x}, {"M0": 4}) == {"M": 13, "M0": 4, "M1": 4}
    out = evaluate(c, {"X": x}, extents={"M0": 4})
    assert out["T"].shape == (4, 4)
    flat = out["T"].reshape(-1)
    torch.testing.assert_close(flat[:13], x, rtol=0, atol=0)
    assert flat[13:].isnan().all()  # unmasked out-of-range reads are poison
    assert not out["MASKED"].isnan().any() and (out["MASKED"].reshape(-1)[13:] == 0).all()
    torch.testing.assert_close(out["S"], x.sum(), rtol=1e-12, atol=1e-12)


def test_indirect_paged_gather():
    c = parse("""
input KC[n, m0, e]: bf16
input BT[b, m1]: i32
extent M0 = 4
output KG[b, m1, m0, e] = KC[BT[b, m1], m0, e]
""")
    kc, bt = randn(9, 4, 5), torch.randint(0, 9, (3, 2), dtype=torch.int32)
    out = evaluate(c, {"KC": kc, "BT": bt})["KG"]
    torch.testing.assert_close(out, kc[bt.long()], rtol=0, atol=0)


def test_out_of_range_integer_reads_clamp_and_float_reads_are_nan():
    c = parse("""
input I[m]: i64
input X[m]: f32
output A[m]: i64 = I[m + 2]
output B[m] = X[m - 1]
""")
    i, x = torch.arange(10, 15), randn(5)
    out = evaluate(c, {"I": i, "X": x})
    assert out["A"].tolist() == [12, 13, 14, 14, 14] and out["A"].dtype == torch.int64
    assert out["B"][0].isnan() and torch.equal(out["B"][1:], x[:-1])


def test_topk_and_sort():
    c = parse("""
input LG[t, x]: f32
input KEY[t]: i32
extent K = 3
output TV[t, k], TI[t, k] = topk[x](LG[t, x])
output SV[s], SI[s] = sort[t](KEY[t])
""")
    lg, key = randn(6, 8), torch.randint(0, 3, (6,), dtype=torch.int32)
    out = evaluate(c, {"LG": lg, "KEY": key})
    values, indices = torch.topk(lg, 3, dim=1)
    assert torch.equal(out["TV"], values) and torch.equal(out["TI"], indices)
    sv, si = torch.sort(key.long(), stable=True)
    assert torch.equal(out["SV"], sv) and torch.equal(out["SI"], si) and out["SI"].dtype == torch.int64


def test_topk_output_rank_order_and_k_bound():
    c = parse("""
input LG[t, x]: f32
output TV[k, t], TI[k, t] = topk[x](LG[t, x])
""")
    lg = randn(4, 7)
    out = evaluate(c, {"LG": lg}, extents={"K": 2})
    assert torch.equal(out["TV"], torch.topk(lg, 2, dim=1).values.T)
    with pytest.raises(ShapeError, match="K = 9 exceeds the extent X = 7"):
        evaluate(c, {"LG": lg}, extents={"K": 9})
    with pytest.raises(ShapeError, match=r"pass extents=\{'K': \.\.\.\}"):
        evaluate(c, {"LG": lg})


def test_casts_model_rounding():
    c = parse("""
input X[i]: f32
output B[i] = bf16(X[i])
output H[i] = f16(X[i])
output S[i] = f32(X[i])
output D[i] = f64(X[i])
output T[i] = i32(X[i] * 10)
output Z[i] = bool(i32(X[i]))
output FI[i] = f32(i) / 2
""")
    x = randn(50) * 3
    out = evaluate(c, {"X": x})
    assert torch.equal(out["B"], x.to(torch.bfloat16).to(F64))
    assert torch.equal(out["H"], x.to(torch.float16).to(F64))
    assert torch.equal(out["S"], x.to(torch.float32).to(F64))
    assert torch.equal(out["D"], x) and out["D"].dtype == F64
    assert torch.equal(out["T"], torch.trunc(x * 10).long()) and out["T"].dtype == torch.int64
    assert torch.equal(out["Z"], x.trunc() != 0) and out["Z"].dtype == torch.bool
    assert torch.equal(out["FI"], torch.arange(50, dtype=F64) / 2)


def test_integer_arithmetic_is_python_style():
    c = parse("""
input X[i]: i64
output FD[i] = (X[i] - 5) // 3
output MD[i] = (X[i] - 5) % 3
output CD[i] = cdiv(X[i] - 5, 3)
output DV[i] = X[i] / 4
output MX[i] = max(X[i], 4) + min(X[i], I - 1)
""")
    x = torch.arange(10)
    out = evaluate(c, {"X": x})
    assert out["FD"].tolist() == [(v - 5) // 3 for v in range(10)]
    assert out["MD"].tolist() == [(v - 5) % 3 for v in range(10)]
    assert out["CD"].tolist() == [-((5 - v) // 3) for v in range(10)]
    assert out["DV"].dtype == F64 and torch.equal(out["DV"], x / 4)
    assert out["MX"].tolist() == [max(v, 4) + min(v, 9) for v in range(10)]


def test_elementwise_functions():
    c = parse("\n".join(["input X[i]: f32"] + [f"output {n.upper()}[i] = {n}(X[i])" for n in (
        "exp", "exp2", "tanh", "sigmoid", "silu", "gelu", "softplus", "abs")] + [
        "output LOG[i] = log(abs(X[i]))", "output SQRT[i] = sqrt(abs(X[i]))", "output RSQRT[i] = rsqrt(abs(X[i]))",
        "output NEG[i] = -X[i]"]))
    x = torch.cat([randn(40), torch.tensor([800.0, -800.0], dtype=F64)])
    out = evaluate(c, {"X": x})
    refs = {"EXP": x.exp(), "EXP2": torch.exp2(x), "TANH": x.tanh(), "SIGMOID": torch.sigmoid(x),
            "SILU": x * torch.sigmoid(x), "GELU": x / 2 * (1 + torch.erf(x / math.sqrt(2))),
            "SOFTPLUS": torch.where(x > 30, x, torch.log1p(torch.exp(x))), "ABS": x.abs(),
            "LOG": x.abs().log(), "SQRT": x.abs().sqrt(), "RSQRT": 1 / x.abs().sqrt(), "NEG": -x}
    for name, ref in refs.items():
        torch.testing.assert_close(out[name], ref, rtol=1e-12, atol=1e-300, msg=name)


def test_reduction_of_a_constant_sees_every_reduced_rank():
    c = parse("""
input X[m, n]: f32
output CNT[] = sum[m](1)
output CNT2[n] = sum[m, k](X[0, n] * 2)
output TRI[] = sum[m, n](where(m < n, 1, 0))
output TRIB[] = sum[m, n](m < n)
output SQ[] = sum[m](m * m * 2)
""")
    out = evaluate(c, {"X": randn(6, 4)}, extents={"K": 3})
    assert out["CNT"].item() == 6 and out["CNT"].dtype == torch.int64
    assert out["TRI"].item() == out["TRIB"].item() == sum(1 for m in range(6) for n in range(4) if m < n)
    assert out["SQ"].item() == sum(2 * m * m for m in range(6)) and out["SQ"].dtype == torch.int64
    x = evaluate(c, {"X": (x0 := randn(6, 4))}, extents={"K": 3})["CNT2"]
    torch.testing.assert_close(x, x0[0] * 2 * 18, rtol=1e-12, atol=0)


def test_empty_reductions():
    c = parse("""
input X[m, n]: f32
output S[n] = sum[m](X[m, n])
output HI[n] = max[m](X[m, n])
output LO[n] = min[m](X[m, n])
output P[n] = sum[m](X[m, n] * X[m, n])
""")
    out = evaluate(c, {"X": randn(0, 3)})
    assert out["S"].tolist() == [0.0] * 3 and out["P"].tolist() == [0.0] * 3
    assert out["HI"].tolist() == [-math.inf] * 3 and out["LO"].tolist() == [math.inf] * 3


def test_float32_compute_and_params():
    c = parse("""
param s: f32
param n: i32
input X[i]: bf16
output Y[i] = X[i] * s + n
""")
    x = torch.randn(8, dtype=torch.bfloat16)
    out = evaluate(c, {"X": x}, {"s": 0.1, "n": torch.tensor(3)}, dtype=torch.float32)["Y"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() * 0.1 + 3, rtol=1e-6, atol=1e-6)
    out64 = evaluate(c, {"X": x}, {"s": 0.1, "n": 3})["Y"]
    assert torch.equal(out64, x.double() * 0.1 + 3)  # 0.1 is not rounded to float32 on the way in


def test_extent_aliases_and_constants():
    c = parse("""
input A[s, e]: f32
input B[t, e]: f32
extent S = T
extent E = 3
output C[s] = sum[e](A[s, e] * B[s, e])
""")
    a, b = randn(5, 3), randn(5, 3)
    torch.testing.assert_close(evaluate(c, {"A": a, "B": b})["C"], (a * b).sum(1), rtol=1e-12, atol=0)
    with pytest.raises(ShapeError, match="input 'A'.*input 'B'|input 'B'.*input 'A'"):
        evaluate(c, {"A": a, "B": randn(6, 3)})
    with pytest.raises(ShapeError, match="extent E = 3"):
        evaluate(c, {"A": randn(5, 4), "B": randn(5, 4)})


# ---- errors a user can cause --------------------------------------------------------
SIMPLE = parse("""
input X[m, k]: f32
input W[k, n]: f32
input IDX[m]: i32
output Y[m, n] = sum[k](X[m, k] * W[k, n]) + IDX[m]
""")


def simple_inputs(**changes):
    return {"X": randn(4, 5), "W": randn(5, 3), "IDX": torch.arange(4, dtype=torch.int32), **changes}


def test_error_missing_input():
    inputs = simple_inputs()
    del inputs["W"]
    with pytest.raises(CascadeError, match=r"missing input\(s\) \['W'\]"):
        evaluate(SIMPLE, inputs)


def test_error_unknown_input():
    with pytest.raises(CascadeError, match=r"unknown input\(s\) \['Z'\].*inputs are \['X', 'W', 'IDX'\]"):
        evaluate(SIMPLE, simple_inputs(Z=randn(2)))


def test_error_wrong_ndim():
    with pytest.raises(ShapeError, match="input 'W' has 3 dims"):
        evaluate(SIMPLE, simple_inputs(W=randn(5, 3, 1)))


def test_error_conflicting_extents():
    with pytest.raises(ShapeError, match="extent K is 5 from dim 1 .* of input 'X'.* but 6 from dim 0 .* of input 'W'"):
        evaluate(SIMPLE, simple_inputs(W=randn(6, 3)))
    with pytest.raises(ShapeError, match="extents="):
        evaluate(SIMPLE, simple_inputs(), extents={"N": 7})


def test_error_unbound_extent():
    c = parse("""
input X[m]: f32
extent M0
extent M1 = cdiv(M, M0)
output T[m1, m0] = X[m1 * M0 + m0]
""")
    with pytest.raises(ShapeError, match=r"pass extents=\{'M0': \.\.\.\}"):
        evaluate(c, {"X": randn(13)})
    with pytest.raises(ShapeError, match="unknown extent 'Q'"):
        evaluate(c, {"X": randn(13)}, extents={"Q": 2})
    with pytest.raises(ShapeError, match="non-negative"):
        evaluate(c, {"X": randn(13)}, extents={"M0": -1})


def test_error_float_tensor_for_integer_input():
    with pytest.raises(DTypeError, match="'IDX' is declared i32 but given a torch.float64"):
        evaluate(SIMPLE, simple_inputs(IDX=randn(4)))
    with pytest.raises(DTypeError, match="declared f32"):
        evaluate(SIMPLE, simple_inputs(X=torch.ones(4, 5, dtype=torch.int64)))


def test_error_unsupported_compute_dtype():
    with pytest.raises(DTypeError, match="torch.float32 or torch.float64"):
        evaluate(SIMPLE, simple_inputs(), dtype=torch.bfloat16)


def test_error_params():
    c = parse("param s: i32\ninput X[i]: f32\noutput Y[i] = X[i] * s")
    with pytest.raises(CascadeError, match=r"missing \['s'\]"):
        evaluate(c, {"X": randn(3)})
    with pytest.raises(DTypeError, match="param 's' is declared i32"):
        evaluate(c, {"X": randn(3)}, {"s": 0.5})
