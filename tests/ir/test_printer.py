"""The printed text parses back to the same tree, is canonical, and its hash is stable across processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kascade.ir import (
    INF,
    Cascade,
    Einsum,
    Expr,
    Param,
    TensorDecl,
    access,
    bf16,
    cast,
    cdiv,
    const,
    exp,
    extent,
    f32,
    format_cascade,
    format_expr,
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
    validate,
    where,
)
from kascade.ir.dtypes import DType
from kascade.ir.errors import CascadeError
from kascade.ir.expr import FUNCTIONS, REDUCTIONS, Op, binary, func, neg, reduce, substitute_ranks

a, b, c, d, x, e, m0, m1 = ranks("a b c d x e m0 m1")
M0 = extent("M0")


def strict_key(node: Expr):
    """The tree with constants keyed by type and repr: ``1``, ``1.0``, ``True``, ``-0.0`` all differ here."""
    arg = (type(node.arg).__name__, repr(node.arg)) if node.op is Op.CONST else node.arg
    return node.op, arg, tuple(strict_key(k) for k in node.args)


def assert_round_trips(node: Expr) -> str:
    text = format_expr(node)
    back = parse_expr(text)
    assert back == node, text
    assert strict_key(back) == strict_key(node), text
    assert format_expr(back) == text
    return text


# ---- parentheses ------------------------------------------------------------------------------------------------
PRECEDENCE = [
    (a - (b - c), "a - (b - c)"),
    ((a - b) - c, "a - b - c"),
    (a + (b + c), "a + (b + c)"),
    ((a + b) * c, "(a + b) * c"),
    (a * (b + c), "a * (b + c)"),
    (a * b + c, "a * b + c"),
    (-(a * b), "-(a * b)"),
    ((-a) * b, "-a * b"),
    (-(a - b), "-(a - b)"),
    (neg(neg(a)), "--a"),
    (a - (-b), "a - -b"),
    (a / (b * c), "a / (b * c)"),
    ((a / b) * c, "a / b * c"),
    ((a // b) // c, "a // b // c"),
    (a // (b // c), "a // (b // c)"),
    (a % (b * c), "a % (b * c)"),
    (logical_not(a < b), "not a < b"),
    (logical_not(a) < b, "(not a) < b"),
    (logical_and(a < b, c < d), "a < b and c < d"),
    (logical_and(logical_or(a, b), c), "(a or b) and c"),
    (logical_or(logical_and(a, b), c), "a and b or c"),
    (logical_or(a, logical_or(b, c)), "a or (b or c)"),
    (logical_not(logical_and(a, b)), "not (a and b)"),
    (logical_and(logical_not(a), b), "not a and b"),
    (logical_not(logical_not(a)), "not not a"),
    (logical_not(-a), "not -a"),
    (-logical_not(a), "-(not a)"),
    ((a < b).eq(c < d), "(a < b) == (c < d)"),
    ((a + b).ne(c), "a + b != c"),
    (const(-1) * x, "-1 * x"),
    (x - const(-1), "x - -1"),
    (x + const(-1.5), "x + -1.5"),
    (x * -INF, "x * -inf"),
    (-INF, "-inf"),
    (INF, "inf"),
    (const(1e-05), "1e-05"),
    (const(1e16), "1e+16"),
    (const(-0.0), "-0.0"),
    (const(1), "1"),
    (const(1.0), "1.0"),
    (const(True), "true"),
    (const(False), "false"),
    (-const(True), "-true"),
    (x * 2.5, "x * 2.5"),
    (2 - x, "2 - x"),
    (maximum(a + b, c), "max(a + b, c)"),
    (maximum(a, b) * c, "max(a, b) * c"),
    (cdiv(extent("M"), M0), "cdiv(M, M0)"),
    (cast(f32, a + b) * c, "f32(a + b) * c"),
    (cast(DType.BOOL, a), "bool(a)"),
    (where(a < b, x, -INF), "where(a < b, x, -inf)"),
    (sum_(e, a * b) * c, "sum[e](a * b) * c"),
    (-sum_(e, a), "-sum[e](a)"),
    (reduce("max", ("a", "b"), access("X", a, b)), "max[a, b](X[a, b])"),
    (access("K", m1 * M0 + m0, e), "K[m1 * M0 + m0, e]"),
    (access("KC", access("BT", b, m1), m0), "KC[BT[b, m1], m0]"),
    (access("Z"), "Z[]"),
    (exp(a) - b, "exp(a) - b"),
    (exp(a - b), "exp(a - b)"),
]


@pytest.mark.parametrize("node,text", PRECEDENCE, ids=[t for _, t in PRECEDENCE])
def test_parentheses_only_where_needed(node, text):
    assert format_expr(node) == text
    assert str(node) == text
    assert_round_trips(node)


@pytest.mark.parametrize("value", [1, 0, -7, 2**62, 1.0, 0.0, -0.0, 1e-05, -2.5, 1e300, 5e-324, 0.1, float("inf"),
                                   float("-inf"), True, False])
def test_constants_keep_type_and_value(value):
    back = parse_expr(format_expr(const(value)))
    assert type(back.arg) is type(value)
    assert repr(back.arg) == repr(value)


def test_negation_of_a_constant_made_by_substitution_round_trips():
    """substitute_ranks / replace may put a constant under a NEG node; the text must keep that node."""
    node = substitute_ranks(-rank("m"), {"m": const(2)})
    assert node.op is Op.NEG and node.args[0] == const(2)
    assert_round_trips(node)


# ---- cascades ---------------------------------------------------------------------------------------------------
CANONICAL_ATTENTION = """\
param scale: f32
input Q[b, h, p, e]: bf16
input K[b, h, m, e]: bf16
input V[b, h, m, f]: bf16

QK[b, h, m, p] = sum[e](Q[b, h, p, e] * K[b, h, m, e]) * scale
GM[b, h, p] = max[m](QK[b, h, m, p])
SN[b, h, m, p] = exp(QK[b, h, m, p] - GM[b, h, p])
SD[b, h, p] = sum[m](SN[b, h, m, p])
AV[b, h, p, f] = sum[m](SN[b, h, m, p] * V[b, h, m, f])
output O[b, h, p, f]: bf16 = AV[b, h, p, f] / SD[b, h, p]
"""


def test_attention_prints_canonically(attention_text):
    assert format_cascade(parse(attention_text)) == CANONICAL_ATTENTION
    assert str(parse(attention_text)) == CANONICAL_ATTENTION


def test_recurrence_prints_its_init_first(fragments):
    assert str(parse(fragments["recurrence"])) == (
        "input LM[p, m1]: f32\n\ninit RM[p, 0] = -inf\nRM[p, m1 + 1] = max(RM[p, m1], LM[p, m1])\n"
        "output O[p]: f32 = RM[p, M1]\n")


def test_operators_print_both_targets(fragments):
    assert str(parse(fragments["sort"])).endswith("output SV[s], SI[s]: i32 = sort[t](KEY[t])\n")
    assert str(parse(fragments["topk"])).endswith("output TV[t, k], TI[t, k] = topk[x](LG[t, x])\n")


def _strict_cascade(cas: Cascade):
    out = []
    for s in cas.stmts:
        out.append((s, strict_key(s.expr), strict_key(s.init) if getattr(s, "init", None) is not None else None))
    return cas, tuple(out), tuple(strict_key(v.value) for v in cas.extents if v.value is not None)


def test_example_round_trips(example_text):
    cas = parse(example_text)
    text = str(cas)
    back = parse(text)
    assert back == cas
    assert _strict_cascade(back) == _strict_cascade(cas)
    assert back.structural_hash() == cas.structural_hash()
    # canonical: parse -> print -> parse -> print is a fixed point
    assert str(back) == text


def test_hash_ignores_the_name_and_sees_every_change(attention_text):
    cas = parse(attention_text, name="one")
    assert parse(attention_text, name="two").structural_hash() == cas.structural_hash()
    assert len(cas.structural_hash()) == 64 and int(cas.structural_hash(), 16) >= 0
    changed = [
        parse(attention_text.replace("scale: f32", "scale: f16")),
        parse(attention_text.replace("input V[b, h, m, f]: bf16", "input V[b, h, m, f]: f16")),
        parse(attention_text.replace("max[m](QK", "min[m](QK")),
        parse(attention_text.replace("output O[b, h, p, f]: bf16", "output O[b, h, p, f]: f32")),
    ]
    hashes = {cas.structural_hash(), *(k.structural_hash() for k in changed)}
    assert len(hashes) == 1 + len(changed)
    assert all(k != cas for k in changed)


_HASH_SCRIPT = textwrap.dedent("""
    import sys
    from kascade.ir import parse
    for text in sys.stdin.read().split("\\x00"):
        print(parse(text).structural_hash())
""")


@pytest.mark.parametrize("seed", ["0", "4242"])
def test_hash_is_stable_across_processes(examples, seed):
    texts = [examples[k] for k in sorted(examples)]
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run([sys.executable, "-c", _HASH_SCRIPT], input="\x00".join(texts), env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == [parse(t).structural_hash() for t in texts]


@pytest.mark.parametrize("one,other", [("1", "1.0"), ("1", "true"), ("0.0", "-0.0"), ("1.0", "true")])
def test_equal_cascades_hash_equal(one, other):
    """structural_hash promises: equal cascades hash equal. Constants of different type must not compare equal."""
    def cascade(k: str) -> Cascade:
        return parse(f"input X[p]: f32\noutput O[p]: f32 = X[p] * {k}\n")
    first, second = cascade(one), cascade(other)
    assert (first == second) == (first.structural_hash() == second.structural_hash())


def test_param_named_like_a_rank_is_rejected_or_round_trips():
    """A cascade the checker accepts must read back from its text (the printer's contract)."""
    cas = Cascade(params=(Param("p", f32),), inputs=(TensorDecl("Q", ("p",), f32),),
                  stmts=(Einsum("O", ("p",), access("Q", rank("p")) * param("p"), f32, output=True),))
    try:
        validate(cas)
    except CascadeError:
        return
    assert parse(str(cas)) == cas


def test_param_named_like_an_extent_is_rejected_or_round_trips():
    cas = Cascade(params=(Param("M", i32),), inputs=(TensorDecl("Q", ("m",), f32),),
                  stmts=(Einsum("O", ("m",), access("Q", rank("m")) * extent("M"), f32, output=True),))
    try:
        validate(cas)
    except CascadeError:
        return
    assert parse(str(cas)) == cas


# ---- random trees -------------------------------------------------------------------------------------------------
RANK_NAMES = ("b", "h", "m", "p", "m0", "m1")
EXTENT_NAMES = ("M", "P", "M0", "M1")
TENSORS = {"X": 2, "S": 1, "Z": 0, "BT": 2, "MK": 1}   # name -> number of indices
BOOL, INT, FLOAT = 0, 1, 2

ints = st.one_of(st.integers(-1000, 1000), st.sampled_from([0, 1, -1, 2**31, -(2**40), 10**18]))
floats = st.one_of(st.floats(allow_nan=False),
                   st.sampled_from([1e-05, -0.0, 0.0, 0.5, 1.0, -1.0, 1e16, 5e-324, float("inf"), float("-inf")]))


def to_int(kn):
    kind, node = kn
    return node if kind == INT else cast(i32, node)


def to_bool(kn):
    kind, node = kn
    return node if kind == BOOL else binary(Op.LT, node, const(0))


def to_num(kn):
    kind, node = kn
    return (kind, node) if kind != BOOL else (INT, cast(DType.I64, node))


def leaves(with_params: bool):
    options = [
        st.sampled_from(RANK_NAMES).map(lambda n: (INT, rank(n))),
        st.sampled_from(EXTENT_NAMES).map(lambda n: (INT, extent(n))),
        ints.map(lambda v: (INT, const(v))),
        floats.map(lambda v: (FLOAT, const(v))),
        st.booleans().map(lambda v: (BOOL, const(v))),
        st.just((FLOAT, INF)),
    ]
    if with_params:
        options.append(st.sampled_from(["scale", "n_tok"]).map(lambda n: (FLOAT if n == "scale" else INT, param(n))))
    return st.one_of(*options)


def grow(children):
    arith = st.tuples(st.sampled_from([Op.ADD, Op.SUB, Op.MUL, Op.MAX, Op.MIN]), children, children).map(
        lambda t: (max(to_num(t[1])[0], to_num(t[2])[0]), binary(t[0], to_num(t[1])[1], to_num(t[2])[1])))
    div = st.tuples(children, children).map(lambda t: (FLOAT, to_num(t[0])[1] / to_num(t[1])[1]))
    intdiv = st.tuples(st.sampled_from([Op.FLOORDIV, Op.MOD, Op.CDIV]), children, children).map(
        lambda t: (INT, binary(t[0], to_int(t[1]), to_int(t[2]))))
    negate = children.map(lambda kn: (max(kn[0], INT), neg(kn[1])))
    call = st.tuples(st.sampled_from(sorted(FUNCTIONS)), children).map(lambda t: (FLOAT, func(t[0], to_num(t[1])[1])))
    casts = st.tuples(st.sampled_from(list(DType)), children).map(lambda t: (t[0].kind.value, cast(t[0], t[1][1])))
    compare = st.tuples(st.sampled_from([Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE]), children, children).map(
        lambda t: (BOOL, binary(t[0], to_num(t[1])[1], to_num(t[2])[1])))
    logic = st.tuples(st.sampled_from([Op.AND, Op.OR]), children, children).map(
        lambda t: (BOOL, binary(t[0], to_bool(t[1]), to_bool(t[2]))))
    negation = children.map(lambda kn: (BOOL, logical_not(to_bool(kn))))
    select = st.tuples(children, children, children).map(
        lambda t: (max(t[1][0], t[2][0]), where(to_bool(t[0]), t[1][1], t[2][1])))
    reduction = st.tuples(st.sampled_from(REDUCTIONS), st.lists(st.sampled_from(RANK_NAMES), min_size=1, max_size=2,
                                                                unique=True), children).map(
        lambda t: (max(to_num(t[2])[0], INT) if t[0] == "sum" else to_num(t[2])[0],
                   reduce(t[0], tuple(t[1]), to_num(t[2])[1])))
    read = st.sampled_from(sorted(TENSORS)).flatmap(
        lambda name: st.lists(children, min_size=TENSORS[name], max_size=TENSORS[name]).map(
            lambda idx: ({"BT": INT, "MK": BOOL}.get(name, FLOAT), access(name, *map(to_int, idx)))))
    return st.one_of(arith, div, intdiv, negate, call, casts, compare, logic, negation, select, reduction, read)


def trees(with_params: bool = False):
    return st.recursive(leaves(with_params), grow, max_leaves=24).map(lambda kn: kn[1])


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_random_expression_round_trips(node):
    assert_round_trips(node)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(with_params=True), st.sampled_from([None, f32, bf16]))
def test_random_cascade_round_trips(node, dtype):
    """A cascade around a random expression (params included) prints and reads back to itself."""
    cas = Cascade(params=(Param("scale", f32), Param("n_tok", i32)),
                  inputs=(TensorDecl("X", ("m", "p"), f32), TensorDecl("S", ("h",), f32),
                          TensorDecl("Z", (), f32), TensorDecl("BT", ("b", "m1"), i32),
                          TensorDecl("MK", ("p",), DType.BOOL)),
                  stmts=(Einsum("O", ("b", "h", "m", "p", "m0", "m1"), node, dtype, output=True),))
    text = str(cas)
    back = parse(text, validate=False)
    assert back == cas
    assert strict_key(back.stmts[0].expr) == strict_key(node)
    assert str(back) == text
    assert back.structural_hash() == cas.structural_hash()
