"""CascadeBuilder builds the same frozen values as the text form."""

from __future__ import annotations

import pytest

from kascade.ir import (
    INF,
    CascadeBuilder,
    CascadeError,
    ExtentDecl,
    TensorRef,
    access,
    bf16,
    cdiv,
    const,
    exp,
    extent,
    f32,
    i32,
    max_,
    maximum,
    parse,
    ranks,
    sum_,
    where,
)

b, h, p, e, f, m, m0, m1 = ranks("b h p e f m m0 m1")


def attention_3pass() -> CascadeBuilder:
    cb = CascadeBuilder("attention")
    scale = cb.param("scale", f32)
    Q = cb.input("Q", "b h p e", bf16)
    K = cb.input("K", (b, h, m, e), bf16)
    V = cb.input("V", ["b", "h", "m", "f"], bf16)
    QK = cb.einsum("QK", "b h m p", sum_(e, Q[b, h, p, e] * K[b, h, m, e]) * scale)
    GM = cb.einsum("GM", "b h p", max_(m, QK[b, h, m, p]))
    SN = cb.einsum("SN", "b h m p", exp(QK[b, h, m, p] - GM[b, h, p]))
    SD = cb.einsum("SD", "b h p", sum_(m, SN[b, h, m, p]))
    AV = cb.einsum("AV", "b h p f", sum_(m, SN[b, h, m, p] * V[b, h, m, f]))
    cb.output("O", "b h p f", bf16, AV[b, h, p, f] / SD[b, h, p])
    return cb


def test_built_attention_equals_the_parsed_text(attention_text):
    built = attention_3pass().build()
    parsed = parse(attention_text)
    assert built == parsed
    assert built.structural_hash() == parsed.structural_hash()
    assert str(built) == str(parsed)
    assert built.name == "attention" and parsed.name == "cascade"


def test_built_fusemax_equals_the_parsed_text(fusemax_text):
    cb = CascadeBuilder("fusemax")
    scale = cb.param("scale", f32)
    Q = cb.input("Q", "b h p e", bf16)
    K = cb.input("K", "b h m e", bf16)
    V = cb.input("V", "b h m f", bf16)
    M, M0 = extent("M"), cb.extent("M0")
    M1 = cb.extent("M1", cdiv(M, M0))
    pos = m1 * M0 + m0
    QK = cb.einsum("QK", "b h m1 m0 p", where(pos < M, sum_(e, Q[b, h, p, e] * K[b, h, pos, e]) * scale, -INF))
    LM = cb.einsum("LM", "b h m1 p", max_(m0, QK[b, h, m1, m0, p]))
    RM = cb.einsum("RM", "b h m1 p", maximum(access("RM", b, h, m1, p), LM[b, h, m1, p]), step=m1, init=-INF)
    SLN = cb.einsum("SLN", "b h m1 m0 p", exp(QK[b, h, m1, m0, p] - RM[b, h, m1 + 1, p]))
    PRM = cb.einsum("PRM", "b h m1 p", exp(RM[b, h, m1, p] - RM[b, h, m1 + 1, p]))
    SLD = cb.einsum("SLD", "b h m1 p", sum_(m0, SLN[b, h, m1, m0, p]))
    RD = cb.einsum("RD", "b h m1 p", PRM[b, h, m1, p] * access("RD", b, h, m1, p) + SLD[b, h, m1, p],
                   step="m1", init=0.0)
    SLNV = cb.einsum("SLNV", "b h m1 f p", sum_(m0, where(pos < M, SLN[b, h, m1, m0, p] * V[b, h, pos, f], 0.0)))
    RNV = cb.einsum("RNV", "b h m1 f p",
                    PRM[b, h, m1, p] * access("RNV", b, h, m1, f, p) + SLNV[b, h, m1, f, p], step=m1, init=0.0)
    cb.output("O", "b h p f", bf16, RNV[b, h, M1, f, p] / RD[b, h, M1, p])
    built = cb.build()
    assert built.extents == (ExtentDecl("M0"), ExtentDecl("M1", cdiv(M, M0)))
    assert built == parse(fusemax_text)
    assert built.structural_hash() == parse(fusemax_text).structural_hash()


def test_built_operators_equal_the_parsed_text(fragments):
    t, x, k = ranks("t x k")
    cb = CascadeBuilder()
    LG = cb.input("LG", "t x", f32)
    tv, ti = cb.topk(("TV", "TI"), (t, k), x, LG[t, x], output=True)
    assert (tv, ti) == (TensorRef("TV", ("t", "k")), TensorRef("TI", ("t", "k")))
    assert cb.build() == parse(fragments["topk"])

    cb = CascadeBuilder()
    KEY = cb.input("KEY", "t", i32)
    cb.sort(("SV", "SI"), "s", "t", KEY[t], dtypes=(None, i32), output=True)
    assert cb.build() == parse(fragments["sort"])


def test_tensor_ref_indexing():
    X = TensorRef("X", ("p", "e"))
    assert X[p, e] == access("X", p, e)
    assert TensorRef("S", ("h",))[h] == access("S", h)
    assert X[p * 2, 0] == access("X", p * 2, 0)


def test_build_checks_by_default():
    cb = CascadeBuilder()
    X = cb.input("X", "p e", f32)
    cb.output("O", "p", f32, X[p, e])  # e is neither an output rank nor reduced
    with pytest.raises(CascadeError, match="Einsum 'O'.*rank 'e'"):
        cb.build()
    unchecked = cb.build(validate=False)
    assert unchecked.outputs == ("O",)


def test_builder_extent_values_become_expressions():
    cb = CascadeBuilder()
    assert cb.extent("B0", 64) == extent("B0")
    assert cb.extents == [ExtentDecl("B0", const(64))]
