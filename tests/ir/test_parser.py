"""The text form of DESIGN.md parses to the trees it means; bad text fails at the right place."""

from __future__ import annotations

import pytest

from kascade.ir import (
    INF,
    Cascade,
    Einsum,
    ExtentDecl,
    IRSyntaxError,
    KascadeError,
    Operator,
    Param,
    TensorDecl,
    access,
    bf16,
    cdiv,
    const,
    exp,
    extent,
    f32,
    i32,
    logical_and,
    logical_not,
    logical_or,
    maximum,
    param,
    parse,
    parse_expr,
    rank,
    ranks,
    sum_,
    tanh,
    validate,
    where,
)
from kascade.ir import max_ as max_r
from kascade.ir.expr import Op, neg

b, h, p, e, f, m, m0, m1, g, n = ranks("b h p e f m m0 m1 g n")
M, P, M0, M1 = extent("M"), extent("P"), extent("M0"), extent("M1")


def only_output(c: Cascade) -> Einsum:
    (s,) = [s for s in c.stmts if s.output]
    return s


# ---- the examples of DESIGN.md -----------------------------------------------------------------------------------
def test_attention_3pass_parses_to_the_cascade_it_writes(attention_text):
    c = parse(attention_text)
    assert c.params == (Param("scale", f32),)
    assert c.inputs == (TensorDecl("Q", ("b", "h", "p", "e"), bf16), TensorDecl("K", ("b", "h", "m", "e"), bf16),
                        TensorDecl("V", ("b", "h", "m", "f"), bf16))
    assert c.extents == ()
    assert [s.name for s in c.stmts] == ["QK", "GM", "SN", "SD", "AV", "O"]
    assert c.outputs == ("O",)
    qk, gm, sn, sd, av, o = c.stmts
    assert qk == Einsum("QK", ("b", "h", "m", "p"),
                        sum_(e, access("Q", b, h, p, e) * access("K", b, h, m, e)) * param("scale"))
    assert gm.expr == max_r(m, access("QK", b, h, m, p))
    assert sn.expr == exp(access("QK", b, h, m, p) - access("GM", b, h, p))
    assert sd.expr == sum_(m, access("SN", b, h, m, p))
    assert av.expr == sum_(m, access("SN", b, h, m, p) * access("V", b, h, m, f))
    assert o == Einsum("O", ("b", "h", "p", "f"), access("AV", b, h, p, f) / access("SD", b, h, p), bf16, output=True)
    assert all(s.dtype is None for s in (qk, gm, sn, sd, av))


def test_causal_mask(fragments):
    s = only_output(parse(fragments["causal"]))
    assert s.expr == where(m <= p + M - P, access("QK", b, h, m, p), -INF)
    cond = s.expr.args[0]
    assert cond.op is Op.LE and cond.args[1].op is Op.SUB and cond.args[1].args[0].op is Op.ADD
    assert s.expr.args[2] == const(float("-inf")) and s.expr.args[2].op is Op.CONST


def test_affine_access(fragments):
    c = parse(fragments["affine"])
    assert c.extents == (ExtentDecl("M0"), ExtentDecl("M1", cdiv(M, M0)))
    assert only_output(c).expr == access("K", b, h, m1 * M0 + m0, e)


def test_indirect_access(fragments):
    s = only_output(parse(fragments["indirect"]))
    assert s.expr == access("KC", access("BT", b, m1), m0, g, e)


def test_alibi(fragments):
    s = only_output(parse(fragments["alibi"]))
    assert s.expr == access("X", h, p, m) - access("S", h) * (p - m)


def test_softcap_reads_the_declared_param(fragments):
    s = only_output(parse(fragments["softcap"]))
    c = param("c")
    assert s.expr == c * tanh(access("X", p, m) / c)


def test_recurrence_with_init_and_last_value(fragments):
    c = parse(fragments["recurrence"])
    rm = c.producer("RM")
    assert rm == Einsum("RM", ("p", "m1"), maximum(access("RM", p, m1), access("LM", p, m1)),
                        step="m1", init=-INF)
    assert only_output(c).expr == access("RM", p, M1)


def test_topk_and_sort_statements(fragments):
    (tk,) = parse(fragments["topk"]).stmts
    assert tk == Operator("topk", ("TV", "TI"), ("t", "k"), "x", access("LG", rank("t"), rank("x")), output=True)
    assert tk.new_rank == "k"
    (so,) = parse(fragments["sort"]).stmts
    assert so == Operator("sort", ("SV", "SI"), ("s",), "t", access("KEY", rank("t")), (None, i32), output=True)
    assert so.new_rank == "s"


def test_fusemax_1pass_parses_and_validates(fusemax_text):
    c = parse(fusemax_text)
    assert validate(c) is c
    assert c.extents == (ExtentDecl("M0"), ExtentDecl("M1", cdiv(M, M0)))
    recurrences = {s.name: s for s in c.einsums if s.step is not None}
    assert sorted(recurrences) == ["RD", "RM", "RNV"]
    assert all(s.step == "m1" for s in recurrences.values())
    assert recurrences["RM"].init == -INF
    assert recurrences["RD"].init == const(0.0) and recurrences["RNV"].init == const(0.0)
    assert recurrences["RNV"].ranks == ("b", "h", "m1", "f", "p")
    qk = c.producer("QK")
    assert qk.expr.op is Op.WHERE
    assert qk.expr.args[0] == (m1 * M0 + m0 < M)
    assert qk.expr.args[2] == -INF
    assert qk.expr.args[1] == sum_(e, access("Q", b, h, p, e) * access("K", b, h, m1 * M0 + m0, e)) * param("scale")
    assert only_output(c).expr == access("RNV", b, h, M1, f, p) / access("RD", b, h, M1, p)
    assert c.outputs == ("O",)


# ---- layout of the text ------------------------------------------------------------------------------------------
def test_comments_blank_lines_and_bracket_continuation():
    text = ("# leading comment\n\n\ninput X[p,\n        m]: f32   # trailing comment\n\n"
            "output O[p]: f32 = sum[m](\n    X[p, m]\n)\n# done")
    c = parse(text)
    assert c.inputs == (TensorDecl("X", ("p", "m"), f32),)
    assert only_output(c).expr == sum_(m, access("X", p, m))


def test_init_may_follow_its_recurrence():
    text = ("input LM[p, m1]: f32\nRM[p, m1 + 1] = max(RM[p, m1], LM[p, m1])\ninit RM[p, 0] = -inf\n"
            "output O[p]: f32 = RM[p, M1]\n")
    assert parse(text).producer("RM").init == -INF


def test_params_are_known_before_their_declaration():
    c = parse("input X[p]: f32\noutput O[p]: f32 = X[p] * s\nparam s: f32\n")
    assert only_output(c).expr == access("X", p) * param("s")


def test_names_read_as_param_rank_or_extent():
    c = parse("param s: f32\ninput X[p, m]: f32\noutput O[p, m]: f32 = X[p, m] * s + m + M\n")
    assert only_output(c).expr == access("X", p, m) * param("s") + m + M
    # parse_expr knows no declarations: lower-case names are ranks, upper-case ones extents
    assert parse_expr("s + S") == rank("s") + extent("S")


def test_numbers_keep_their_type():
    assert type(parse_expr("1").arg) is int
    assert type(parse_expr("1.0").arg) is float
    assert type(parse_expr("1.").arg) is float
    assert type(parse_expr(".5").arg) is float
    assert type(parse_expr("1e3").arg) is float
    assert parse_expr("1e-05").arg == 1e-05
    assert parse_expr("2.5E+2").arg == 250.0
    assert type(parse_expr("true").arg) is bool and parse_expr("false").arg is False
    assert parse_expr("-inf").arg == float("-inf") and parse_expr("inf") == INF


def test_unary_minus_on_a_number_is_a_negative_constant():
    assert parse_expr("-1") == const(-1) and parse_expr("-1").op is Op.CONST
    assert parse_expr("-1 * x").args[0] == const(-1)
    assert parse_expr("x - -1").args[1] == const(-1)
    assert parse_expr("--x") == neg(neg(rank("x")))


def test_operator_precedence_and_associativity():
    x, y, z = ranks("x y z")
    assert parse_expr("x - y - z") == (x - y) - z
    assert parse_expr("x + y * z") == x + y * z
    assert parse_expr("x * y % z") == (x * y) % z
    assert parse_expr("-x * y") == (-x) * y
    assert parse_expr("x < y and y < z or not z < x") == logical_or(logical_and(x < y, y < z), logical_not(z < x))
    assert parse_expr("not x < y") == logical_not(x < y)
    assert parse_expr("x and y or z") == logical_or(logical_and(x, y), z)
    assert parse_expr("x or y and z") == logical_or(x, logical_and(y, z))


def test_validate_false_returns_an_unchecked_cascade():
    c = parse("A[p] = Z[p]\n", validate=False)
    assert c.stmts == (Einsum("A", ("p",), access("Z", p)),)
    with pytest.raises(KascadeError):
        parse("A[p] = Z[p]\n")


def test_name_labels_the_cascade_only():
    c = parse("input X[p]: f32\noutput O[p]: f32 = X[p]\n", name="copy")
    assert c.name == "copy"
    assert c == parse("input X[p]: f32\noutput O[p]: f32 = X[p]\n")


# ---- syntax errors -----------------------------------------------------------------------------------------------
def _col(line: str, token: str, occurrence: int = 1) -> int:
    """1-based column of the ``occurrence``-th ``token`` in ``line``."""
    pos = -1
    for _ in range(occurrence):
        pos = line.index(token, pos + 1)
    return pos + 1


# (id, text, line of the error, (token, occurrence) on that line, words the message must contain)
SYNTAX_ERRORS = [
    ("unclosed rank list", "input Q[b, h: bf16\n", 1, (":", 1), ["expected ','", "']'", "':'"]),
    ("unclosed call", "input X[p]: f32\noutput O[p]: f32 = exp(X[p]", 2, None, ["expected ')'", "end of input"]),
    ("missing =", "input X[p]: f32\noutput O[p]: f32 X[p]\n", 2, ("X", 1), ["expected '='", "found 'X'"]),
    ("bad dtype", "input X[p]: f33\n", 1, ("f33", 1),
     ["unknown dtype 'f33'", "accepted", "bf16", "f16", "f32", "f64", "i32", "i64", "bool"]),
    ("unknown function", "input X[p]: f32\noutput O[p]: f32 = erf(X[p])\n", 2, ("erf", 1),
     ["unknown function 'erf'", "accepted", "exp", "tanh", "softplus", "where", "cdiv", "max"]),
    ("init without recurrence", "input X[p, m1]: f32\ninit RM[p, 0] = 0.0\nRM[p, m1] = X[p, m1]\n"
     "output O[p, m1]: f32 = RM[p, m1]\n", 2, ("init", 1), ["'RM'", "no iterative rank"]),
    ("init of nothing", "input X[p]: f32\ninit RM[p, 0] = 0.0\noutput O[p]: f32 = X[p]\n", 2, ("init", 1),
     ["init of 'RM'", "no statement defines"]),
    ("init at a wrong step", "input X[p, m1]: f32\ninit RM[p, 1] = 0.0\n", 2, ("1", 1), ["write 0"]),
    ("chained comparison", "input X[p]: f32\noutput O[p]: bool = X[p] < 1.0 < 2.0\n", 2, ("<", 2),
     ["do not chain", "and"]),
    ("stray character", "input X[p]: f32\noutput O[p]: f32 = X[p] $ 1.0\n", 2, ("$", 1), ["unexpected character '$'"]),
    ("keyword as input name", "input exp[p]: f32\n", 1, ("exp", 1), ["'exp' is a keyword", "tensor name"]),
    ("keyword as output name", "input X[p]: f32\noutput sum[p]: f32 = X[p]\n", 2, ("sum", 1), ["keyword"]),
    ("keyword as rank", "input X[p, where]: f32\n", 1, ("where", 1), ["keyword", "rank name"]),
    ("upper-case output rank", "input X[p]: f32\noutput O[P]: f32 = X[p]\n", 2, ("P", 1),
     ["lower-case", "found 'P'"]),
    ("upper-case input rank", "input X[p, Q]: f32\n", 1, ("Q", 1), ["lower-case"]),
    ("lower-case extent", "extent m0 = 4\n", 1, ("m0", 1), ["upper-case", "'m0'"]),
    ("iterative rank + 2", "input X[p]: f32\nR[p + 2] = X[p]\n", 2, ("2", 1), ["'r + 1'"]),
    ("two iterative ranks", "input X[p, q]: f32\nR[p + 1, q + 1] = X[p, q]\n", 2, ("+", 2), ["only one rank"]),
    ("topk with one target", "input LG[t, x]: f32\noutput TV[t, k] = topk[x](LG[t, x])\n", 2, ("TV", 1),
     ["topk defines two tensors"]),
    ("topk targets differ", "input LG[t, x]: f32\noutput TV[t, k], TI[k] = topk[x](LG[t, x])\n", 2, ("TV", 1),
     ["same ranks"]),
    ("two targets, no operator", "input X[p]: f32\nA[p], B[p] = X[p]\n", 2, ("A", 1), ["only topk and sort"]),
    ("where with two arguments", "input X[p]: f32\noutput O[p]: f32 = where(p < 1, X[p])\n", 2, None,
     ["where takes 3 arguments, found 2"]),
    ("keyword alone", "input X[p]: f32\noutput O[p]: f32 = X[p] + sum\n", 2, ("sum", 1), ["cannot stand alone"]),
    ("missing operand", "input X[p]: f32\noutput O[p]: f32 = X[p] *\n", 2, None,
     ["expected an expression", "end of line"]),
    ("junk after statement", "param s: f32 f32\n", 1, ("f32", 2), ["expected end of line"]),
    ("empty reduction", "input X[p]: f32\noutput O[p]: f32 = sum[](X[p])\n", 2, ("]", 2), ["rank name"]),
    ("error on line 3", "param s: f32\ninput X[p]: f32\noutput O[p]: f32 = X[p] * * s\n", 3, ("*", 2),
     ["expected an expression", "'*'"]),
]


@pytest.mark.parametrize("text,line,token,words", [c[1:] for c in SYNTAX_ERRORS], ids=[c[0] for c in SYNTAX_ERRORS])
def test_syntax_error_points_at_the_token(text, line, token, words):
    with pytest.raises(IRSyntaxError) as info:
        parse(text)
    err = info.value
    assert err.line == line, str(err)
    src = text.split("\n")[line - 1]
    if token is not None:
        assert err.column == _col(src, *token), str(err)
    assert err.source_line == src
    for w in words:
        assert w in str(err), (w, str(err))
    # the message shows the line and a caret under the column
    assert f"line {line}, column {err.column}:" in str(err)
    assert str(err).endswith(f"\n  {src}\n  {' ' * (err.column - 1)}^")


def test_unclosed_call_points_at_the_end_of_input():
    text = "input X[p]: f32\noutput O[p]: f32 = exp(X[p]"
    with pytest.raises(IRSyntaxError) as info:
        parse(text)
    assert (info.value.line, info.value.column) == (2, len("output O[p]: f32 = exp(X[p]") + 1)


def test_where_arity_error_points_after_the_call():
    with pytest.raises(IRSyntaxError) as info:
        parse_expr("where(p < 1, x) + 1")
    assert "where takes 3 arguments, found 2" in str(info.value)
    assert info.value.column == len("where(p < 1, x) ") + 1


def test_syntax_errors_are_kascade_errors():
    assert issubclass(IRSyntaxError, KascadeError)
    with pytest.raises(KascadeError):
        parse("input")


def test_parse_rejects_non_text():
    with pytest.raises(IRSyntaxError) as info:
        parse(b"input X[p]: f32")  # type: ignore[arg-type]
    assert "must be a str" in str(info.value) and "bytes" in str(info.value)


def test_parse_expr_rejects_trailing_tokens():
    with pytest.raises(IRSyntaxError) as info:
        parse_expr("x + y z")
    assert info.value.column == 7 and "expected end of expression" in str(info.value)


def test_parse_expr_of_empty_text():
    with pytest.raises(IRSyntaxError) as info:
        parse_expr("   ")
    assert "expected an expression" in str(info.value) and "end of input" in str(info.value)


def test_duplicate_init_is_an_error():
    text = "input LM[p, m1]: f32\ninit RM[p, 0] = 0.0\ninit RM[p, 0] = 1.0\nRM[p, m1 + 1] = LM[p, m1]\n"
    with pytest.raises(IRSyntaxError) as info:
        parse(text)
    assert info.value.line == 3 and "two init statements" in str(info.value)


def test_init_index_list_must_match_the_recurrence():
    text = ("input LM[p, m1]: f32\ninit RM[0, p] = 0.0\nRM[p, m1 + 1] = RM[p, m1] + LM[p, m1]\n"
            "output O[p]: f32 = RM[p, M1]\n")
    with pytest.raises(IRSyntaxError) as info:
        parse(text)
    assert info.value.line == 2 and "init RM[p, 0]" in str(info.value)


def test_the_parsed_cascade_is_frozen(attention_text):
    c = parse(attention_text)
    with pytest.raises(AttributeError):
        c.stmts = ()  # type: ignore[misc]
    assert isinstance(hash(c.stmts[0]), int)
