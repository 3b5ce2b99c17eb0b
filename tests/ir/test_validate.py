"""The checker rejects ill-formed cascades with a message naming the statement; dtype inference."""

from __future__ import annotations

import pytest

from kascade.ir import (
    Cascade,
    CascadeError,
    Einsum,
    ExtentDecl,
    KascadeError,
    Operator,
    Param,
    TensorDecl,
    access,
    bf16,
    const,
    f32,
    i32,
    i64,
    infer_dtypes,
    param,
    parse,
    rank,
    validate,
)
from kascade.ir.dtypes import DType

p, m, m1 = rank("p"), rank("m"), rank("m1")


def rejects(text: str, *words: str) -> str:
    """Parse ``text`` without checking, then check it: it must fail with all ``words`` in the message."""
    cas = parse(text, validate=False)
    with pytest.raises(CascadeError) as info:
        validate(cas)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    # parse() runs the same checker
    with pytest.raises(CascadeError):
        parse(text)
    return msg


def test_valid_examples_pass(example_text):
    cas = parse(example_text, validate=False)
    assert validate(cas) is cas


# ---- ranks and tensors ------------------------------------------------------------------------------------------
def test_rank_neither_in_output_nor_reduced():
    msg = rejects("input Q[p, e]: f32\noutput O[p]: f32 = Q[p, e]\n", "Einsum 'O'", "rank 'e'", "sum[e]")
    assert "['p']" in msg


def test_rank_reduced_twice():
    rejects("input Q[p, e]: f32\noutput O[p]: f32 = sum[e](sum[e](Q[p, e]))\n", "Einsum 'O'", "sum[e]", "already")
    rejects("input Q[p, e]: f32\noutput O[p]: f32 = sum[p](Q[p, p])\n", "Einsum 'O'", "reduces rank 'p'")
    rejects("input Q[p, e]: f32\noutput O[p]: f32 = sum[e, e](Q[p, e])\n", "Einsum 'O'", "names a rank twice")


def test_output_rank_list_names_a_rank_twice():
    rejects("input Q[p]: f32\noutput O[p, p]: f32 = Q[p]\n", "Einsum 'O'", "names a rank twice")
    rejects("input Q[p, p]: f32\noutput O[p]: f32 = Q[p, p]\n", "input 'Q'", "names a rank twice")


def test_undefined_tensor():
    rejects("input X[p]: f32\noutput O[p]: f32 = X[p] + Z[p]\n", "Einsum 'O'", "undefined tensor 'Z'")


def test_use_before_definition():
    rejects("input X[p]: f32\nA[p] = B[p]\nB[p] = X[p]\noutput O[p]: f32 = A[p]\n",
            "Einsum 'A'", "'B' before the statement that defines it")


def test_tensor_defined_twice():
    rejects("input X[p]: f32\nA[p] = X[p]\nA[p] = X[p] * 2.0\noutput O[p]: f32 = A[p]\n",
            "Einsum 'A'", "redefines 'A'", "defined once")
    rejects("input X[p]: f32\noutput X[p]: f32 = 1.0\n", "Einsum 'X'", "redefines 'X'", "input")
    rejects("param X: f32\ninput X[p]: f32\noutput O[p]: f32 = 1.0\n", "input 'X'", "param")
    rejects("param s: f32\nparam s: f32\ninput X[p]: f32\noutput O[p]: f32 = X[p]\n", "param 's'", "twice")


def test_wrong_number_of_indices():
    rejects("input X[p, m]: f32\noutput O[p]: f32 = sum[m](X[p])\n", "Einsum 'O'", "X has 2 ranks", "1 indices")
    rejects("input X[p]: f32\noutput O[p, m]: f32 = X[p, m]\n", "Einsum 'O'", "X has 1 ranks", "2 indices")


ATTN_QK = """\
input Q[b, h, p, e]: bf16
input K[b, h, m, e]: bf16
{extra}output QK[b, h, m, p]: f32 = sum[e](Q[b, h, m, e] * K[b, h, m, e])
"""


def test_rank_extent_mismatch_and_its_fix():
    msg = rejects(ATTN_QK.format(extra=""), "Einsum 'QK'", "rank 'p' has extent P", "rank 'm' of extent M",
                  "extent M = P")
    assert "Q" in msg
    for fix in ("extent P = M\n", "extent M = P\n"):
        cas = parse(ATTN_QK.format(extra=fix))
        assert cas.rank_extent("p") == cas.rank_extent("m")


def test_index_expressions_are_not_extent_checked():
    # an affine or indirect index may run over anything; only a plain rank must match the dimension's extent
    parse("input X[p]: f32\nextent M = 4\noutput O[m]: f32 = X[m * 0 + 1]\n")


# ---- recurrences ------------------------------------------------------------------------------------------------
RECURRENCE = "input LM[p, m1]: f32\n{init}RM[p, m1 + 1] = {body}\noutput O[p]: f32 = RM[p, M1]\n"


def test_recurrence_without_init():
    rejects(RECURRENCE.format(init="", body="max(RM[p, m1], LM[p, m1])"),
            "Einsum 'RM'", "recurrence over 'm1'", "without an initial value", "init RM[p, 0]")


def test_recurrence_builds_from_init():
    cas = parse(RECURRENCE.format(init="init RM[p, 0] = -inf\n", body="max(RM[p, m1], LM[p, m1])"))
    assert infer_dtypes(cas)["RM"] is f32


def test_recurrence_reads_its_previous_step_only():
    rejects(RECURRENCE.format(init="init RM[p, 0] = -inf\n", body="max(RM[p, m1 + 1], LM[p, m1])"),
            "Einsum 'RM'", "previous step", "m1 + 1")
    rejects(RECURRENCE.format(init="init RM[p, 0] = -inf\n", body="max(RM[p, M1], LM[p, m1])"),
            "Einsum 'RM'", "previous step", "found index M1")


def test_self_read_in_a_non_recurrence():
    rejects("input X[p]: f32\noutput A[p]: f32 = A[p] + X[p]\n", "Einsum 'A'", "reads its own output 'A'", "r + 1")


def test_init_without_step_or_step_outside_ranks():
    base = dict(inputs=(TensorDecl("X", ("p",), f32),))
    with pytest.raises(CascadeError, match="Einsum 'A' has an initial value but no iterative rank"):
        validate(Cascade(**base, stmts=(Einsum("A", ("p",), access("X", p), init=const(0.0), output=True),)))
    with pytest.raises(CascadeError, match="Einsum 'A': iterative rank 'q' is not one of its ranks"):
        validate(Cascade(**base, stmts=(Einsum("A", ("p",), access("X", p), step="q", init=const(0.0),
                                               output=True),)))


def test_init_may_not_use_the_iterative_rank():
    rejects("input LM[p, m1]: f32\ninit RM[p, 0] = LM[p, m1]\nRM[p, m1 + 1] = RM[p, m1] + LM[p, m1]\n"
            "output O[p]: f32 = RM[p, M1]\n", "Einsum 'RM' (init)", "rank 'm1'")


# ---- dtypes -----------------------------------------------------------------------------------------------------
def test_float_index():
    rejects("input X[p]: f32\ninput Y[p]: f32\noutput O[p]: f32 = X[Y[p]]\n", "Einsum 'O'", "index Y[p] of X",
            "float-valued", "integer")
    rejects("input X[p]: f32\noutput O[p]: f32 = X[p * 1.0]\n", "Einsum 'O'", "float-valued")
    rejects("input X[p]: f32\noutput O[p]: f32 = X[p < 1]\n", "Einsum 'O'", "bool-valued")


def test_where_needs_a_condition():
    rejects("input X[p]: f32\noutput O[p]: f32 = where(X[p], 1.0, 0.0)\n", "Einsum 'O'", "where's first argument",
            "found float")
    rejects("input X[p]: f32\noutput O[p]: f32 = where(p, 1.0, 0.0)\n", "Einsum 'O'", "found int")


def test_integer_division_on_floats():
    for op in ("//", "%"):
        rejects(f"input X[p]: f32\noutput O[p]: f32 = X[p] {op} 2\n", "Einsum 'O'", f"'{op}' is integer arithmetic")
    rejects("input X[p]: f32\noutput O[p]: f32 = cdiv(X[p], 2)\n", "Einsum 'O'", "'cdiv' is integer arithmetic")


def test_declared_dtype_narrower_than_the_expression():
    rejects("input X[p]: f32\noutput O[p]: i32 = X[p]\n", "Einsum 'O'", "declares i32", "float-valued")
    rejects("input X[p]: i32\noutput O[p]: bool = X[p] + 1\n", "Einsum 'O'", "declares bool", "int-valued")
    # widening is fine
    assert infer_dtypes(parse("input X[p]: i32\noutput O[p]: f32 = X[p] + 1\n"))["O"] is f32


def test_logic_on_non_conditions():
    rejects("input X[p]: f32\noutput O[p]: bool = X[p] and X[p] < 0.0\n", "Einsum 'O'", "'and' takes conditions",
            "float/bool")
    rejects("input X[p]: f32\noutput O[p]: bool = X[p] < 0.0 or p\n", "Einsum 'O'", "'or' takes conditions")
    rejects("input X[p]: f32\noutput O[p]: bool = not X[p]\n", "Einsum 'O'", "'not' takes conditions")


def test_unknown_param():
    cas = Cascade(inputs=(TensorDecl("X", ("p",), f32),),
                  stmts=(Einsum("O", ("p",), access("X", p) * param("s"), f32, output=True),))
    with pytest.raises(CascadeError, match="Einsum 'O': undeclared param 's'"):
        validate(cas)
    assert validate(cas.replace(params=(Param("s", f32),))).params == (Param("s", f32),)


def test_unknown_extent():
    rejects("input X[p]: f32\noutput O[p]: f32 = X[p] * T\n", "Einsum 'O'", "unknown extent 'T'", "extent")
    rejects("input X[p]: f32\nextent A = B + 1\noutput O[p]: f32 = X[p]\n", "extent 'A'", "unknown extent 'B'")


def test_extent_values_are_integer_expressions():
    rejects("input X[p]: f32\nextent A = 2.5\noutput O[p]: f32 = X[p]\n", "extent 'A'", "integers")
    rejects("input X[p]: f32\nextent A = P / 2\noutput O[p]: f32 = X[p]\n", "extent 'A'", "'/'")
    rejects("input X[p]: f32\nextent A = p\noutput O[p]: f32 = X[p]\n", "extent 'A'", "'rank'")
    rejects("input X[p]: f32\nextent A = 4\nextent A = 8\noutput O[p]: f32 = X[p]\n", "extent 'A'", "twice")


def test_cascade_without_output():
    rejects("input X[p]: f32\nA[p] = X[p]\n", "no output", "output")
    rejects("", "no output")


@pytest.mark.parametrize("decls", ["extent A = B\nextent B = A\n", "extent A = A\n",
                                   "extent A = B + 1\nextent B = cdiv(C, 2)\nextent C = max(A, 4)\n"])
def test_cyclic_extents(decls):
    msg = rejects(f"input X[p]: f32\n{decls}output O[p]: f32 = X[p]\n", "cycle", "A")
    assert "->" in msg


def test_alias_cycle_is_an_error_in_rank_extent():
    cas = parse("input X[p]: f32\nextent A = B\nextent B = A\noutput O[p]: f32 = X[p]\n", validate=False)
    with pytest.raises(CascadeError, match="cycle"):
        cas.canonical_extent("A")


# ---- topk and sort -------------------------------------------------------------------------------------------------
TOPK = "input LG[t, x]: f32\noutput {targets} = topk[x]({src})\n"


def test_topk_types():
    dtypes = infer_dtypes(parse(TOPK.format(targets="TV[t, k], TI[t, k]", src="LG[t, x]")))
    assert dtypes["TV"] is f32 and dtypes["TI"] is i64
    dtypes = infer_dtypes(parse(TOPK.format(targets="TV[t, k]: bf16, TI[t, k]: i32", src="LG[t, x] * 2.0")))
    assert dtypes["TV"] is bf16 and dtypes["TI"] is i32


def test_topk_needs_exactly_one_new_rank():
    rejects(TOPK.format(targets="TV[t], TI[t]", src="LG[t, x]"), "topk 'TV', 'TI'", "exactly one rank", "none")
    rejects(TOPK.format(targets="TV[t, k, j], TI[t, k, j]", src="LG[t, x]"), "topk 'TV', 'TI'", "exactly one rank",
            "'k'", "'j'")


def test_topk_over_an_output_rank():
    rejects(TOPK.format(targets="TV[t, x], TI[t, x]", src="LG[t, x]"), "topk 'TV', 'TI'", "cannot also be an output")


def test_topk_source_must_be_numeric_and_indices_integer():
    rejects(TOPK.format(targets="TV[t, k], TI[t, k]", src="LG[t, x] < 0.0"), "topk", "numeric", "bool")
    rejects(TOPK.format(targets="TV[t, k], TI[t, k]: f32", src="LG[t, x]"), "topk", "indices", "integer dtype")
    rejects(TOPK.format(targets="TV[t, k]: i32, TI[t, k]", src="LG[t, x]"), "topk", "values declared i32")


def test_topk_outputs_are_two_tensors():
    rejects(TOPK.format(targets="TV[t, k], TV[t, k]", src="LG[t, x]"), "topk", "redefines 'TV'")
    rejects("input LG[t, x]: f32\nTI[t] = 0\noutput TV[t, k], TI[t, k] = topk[x](LG[t, x])\n", "redefines 'TI'")


def test_topk_outputs_are_readable():
    cas = parse("input LG[t, x]: f32\nTV[t, k], TI[t, k] = topk[x](LG[t, x])\n"
                "output W[t, k]: f32 = TV[t, k] * f32(TI[t, k])\n")
    assert infer_dtypes(cas)["W"] is f32
    rejects("input LG[t, x]: f32\nTV[t, k], TI[t, k] = topk[x](LG[t, x])\noutput W[t]: f32 = TV[t]\n",
            "Einsum 'W'", "TV has 2 ranks")


def test_sort():
    dtypes = infer_dtypes(parse("input KEY[t]: i32\noutput SV[s], SI[s] = sort[t](KEY[t])\n"))
    assert dtypes["SV"] is i64 and dtypes["SI"] is i64
    rejects("input KEY[t]: i32\noutput SV[t], SI[t] = sort[t](KEY[t])\n", "sort 'SV', 'SI'",
            "cannot also be an output rank")


def test_unknown_operator_kind():
    cas = Cascade(inputs=(TensorDecl("LG", ("t", "x"), f32),),
                  stmts=(Operator("argmax", ("V", "I"), ("t", "k"), "x", access("LG", rank("t"), rank("x")),
                                  output=True),))
    with pytest.raises(CascadeError, match="unknown operator 'argmax'; accepted: topk, sort"):
        validate(cas)


# ---- names --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decl,words", [
    (TensorDecl("exp", ("p",), f32), ["'exp'", "tensor name", "keywords"]),
    (TensorDecl("X", ("P",), f32), ["rank name", "'P'", "lower-case"]),
    (TensorDecl("X", ("p q",), f32), ["'p q'", "rank name"]),
    (TensorDecl("1X", ("p",), f32), ["'1X'"]),
])
def test_built_names_are_checked(decl, words):
    cas = Cascade(inputs=(decl,), stmts=(Einsum("O", (), const(1.0), output=True),))
    with pytest.raises(CascadeError) as info:
        validate(cas)
    for w in words:
        assert w in str(info.value)


def test_built_extent_names_are_upper_case():
    cas = Cascade(extents=(ExtentDecl("m0"),), stmts=(Einsum("O", (), const(1.0), output=True),))
    with pytest.raises(CascadeError, match="upper-case"):
        validate(cas)


def test_validate_rejects_non_cascades():
    with pytest.raises(CascadeError, match="expected a Cascade"):
        validate("input X[p]: f32")  # type: ignore[arg-type]


def test_cascade_errors_are_kascade_errors():
    assert issubclass(CascadeError, KascadeError)


# ---- dtype inference ----------------------------------------------------------------------------------------------
def test_infer_dtypes_of_attention(attention_text):
    dtypes = infer_dtypes(parse(attention_text))
    assert dtypes == {"Q": bf16, "K": bf16, "V": bf16, "QK": f32, "GM": f32, "SN": f32, "SD": f32, "AV": f32,
                      "O": bf16}


def test_infer_dtypes_of_fusemax(fusemax_text):
    dtypes = infer_dtypes(parse(fusemax_text))
    assert {n: dtypes[n] for n in ("QK", "LM", "RM", "SLN", "PRM", "SLD", "RD", "SLNV", "RNV")} == dict.fromkeys(
        ("QK", "LM", "RM", "SLN", "PRM", "SLD", "RD", "SLNV", "RNV"), f32)
    assert dtypes["O"] is bf16


@pytest.mark.parametrize("body,dtype", [
    ("p * 2", i64),
    ("p // 2 + P % 3", i64),
    ("cdiv(P, 4)", i64),
    ("sum[m](m)", i64),
    ("X[p] + 1", i64),
    ("-X[p]", i64),
    ("max(X[p], 3)", i64),
    ("X[p] / 2", f32),
    ("X[p] * 1.0", f32),
    ("exp(X[p])", f32),
    ("f32(X[p])", f32),
    ("where(p < 3, X[p], 0)", i64),
    ("where(p < 3, X[p], 0.5)", f32),
    ("p < 3", DType.BOOL),
    ("0 <= p and p < P", DType.BOOL),
    ("not p == 3", DType.BOOL),
    ("true", DType.BOOL),
    ("max[m](m < p)", DType.BOOL),
    ("sum[m](m < p)", i64),
    ("-(p < 3)", i64),
    ("i32(1.5)", i64),   # inference works on kinds: an undeclared int intermediate is i64
    ("bool(p)", DType.BOOL),
])
def test_infer_dtypes_of_intermediates(body, dtype):
    text = f"input X[p]: i32\ninput Y[m]: f32\nT[p] = {body}\noutput O[p]: f32 = f32(T[p])\n"
    assert infer_dtypes(parse(text))["T"] is dtype


def test_infer_dtypes_of_int_and_bool_intermediates_are_usable():
    cas = parse("input X[p, m]: f32\nMASK[p, m] = m <= p\nPOS[p, m] = p - m\n"
                "output O[p, m]: f32 = where(MASK[p, m], X[p, m] * f32(POS[p, m]), -inf)\n")
    dtypes = infer_dtypes(cas)
    assert dtypes["MASK"] is DType.BOOL and dtypes["POS"] is i64 and dtypes["O"] is f32


def test_param_kinds_drive_inference():
    cas = parse("param n: i32\nparam s: f32\ninput X[p]: i32\nA[p] = X[p] * n\nB[p] = X[p] * s\n"
                "output O[p]: f32 = f32(A[p]) + B[p]\n")
    dtypes = infer_dtypes(cas)
    assert dtypes["A"] is i64 and dtypes["B"] is f32


def test_checker_errors_from_text_name_the_line():
    """A checker error about a parsed statement says on which line that statement is."""
    with pytest.raises(CascadeError, match=r"^line 3: Einsum 'Y': rank 'j'"):
        parse("input X[i]: f32\n\nY[i] = X[j]\noutput Z[i]: f32 = Y[i]\n")
