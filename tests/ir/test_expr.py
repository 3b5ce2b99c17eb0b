"""Expr: structural equality, identity-preserving replace/rewrite, operator overloads, queries."""

from __future__ import annotations

import dataclasses
import math

import pytest

from kascade.ir import (
    INF,
    CascadeError,
    Expr,
    Op,
    access,
    bf16,
    cast,
    const,
    exp,
    exp2,
    extent,
    f32,
    free_ranks,
    func,
    param,
    rank,
    ranks,
    reduce,
    sum_,
    where,
)
from kascade.ir.expr import (
    as_expr,
    extent_of,
    extents_used,
    neg,
    params_used,
    substitute_ranks,
    tensors_read,
)

b, h, p, e, m = ranks("b h p e m")


# ---- structural equality --------------------------------------------------------------------------------------
def test_equality_is_structural():
    one, two = access("Q", p, e) * 2.0 + m, access("Q", p, e) * 2.0 + m
    assert one is not two
    assert one == two and hash(one) == hash(two)
    assert len({one, two}) == 1
    assert {one: "x"}[two] == "x"
    assert (one == two) is True  # == compares, it does not build an expression


@pytest.mark.parametrize("one,other", [
    (m + 1, 1 + m),
    (m - p, p - m),
    (sum_(e, access("Q", p, e)), sum_(m, access("Q", p, e))),
    (sum_(e, access("Q", p, e)), reduce("max", e, access("Q", p, e))),
    (cast(f32, m), cast(bf16, m)),
    (exp(m), exp2(m)),
    (access("Q", p), access("K", p)),
    (access("Q", p, e), access("Q", e, p)),
    (rank("M"), extent("M")),
    (rank("s"), param("s")),
    (m < p, m <= p),
    (m.eq(p), m.ne(p)),
])
def test_different_trees_differ(one, other):
    assert one != other


@pytest.mark.parametrize("one,other", [(1, 1.0), (1, True), (0, False), (0.0, -0.0), (1.0, True)])
def test_constants_of_different_type_or_sign_differ(one, other):
    """1, 1.0 and true have different kinds (and print differently): structurally they are different trees."""
    assert const(one) != const(other)
    assert access("X", p) * one != access("X", p) * other


@pytest.mark.parametrize("value", [1, 1.0, True, 0.0, -0.0, -3, INF.arg])
def test_equal_constants_hash_equal(value):
    assert const(value) == const(value) and hash(const(value)) == hash(const(value))


def test_replace_does_not_lose_a_change_of_constant_type():
    assert type(const(1).replace(arg=1.0).arg) is float
    assert const(0).replace(arg=False).arg is False
    assert math.copysign(1.0, const(0.0).replace(arg=-0.0).arg) == -1.0  # -0.0 == 0.0, yet prints apart
    assert const(0.0).replace(arg=-0.0) == const(-0.0)


def test_expr_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.arg = "n"  # type: ignore[misc]


# ---- replace and rewrite ------------------------------------------------------------------------------------------
def test_replace_returns_the_same_object_when_nothing_changes():
    node = access("Q", p, e) * 2.0
    assert node.replace() is node
    assert node.replace(op=Op.MUL) is node
    assert node.replace(args=node.args) is node
    assert node.replace(args=tuple(list(node.args))) is node
    assert node.replace(args=(access("Q", p, e), const(2.0))) is node  # equal children: still no change
    assert node.replace(arg=None) is node


def test_replace_builds_a_new_node_on_change():
    node = access("Q", p, e) * 2.0
    sub = node.replace(op=Op.SUB)
    assert sub == access("Q", p, e) - 2.0 and node.op is Op.MUL
    assert node.replace(args=(m, p)) == m * p
    assert access("Q", p).replace(arg="K") == access("K", p)


def test_rewrite_keeps_identity_of_unchanged_subtrees():
    left, right = exp(access("Q", p, e)), access("K", m, e) + 1
    node = left * right
    assert node.rewrite(lambda n: None) is node
    swapped = node.rewrite(lambda n: access("V", *n.args) if n.op is Op.ACCESS and n.arg == "K" else None)
    assert swapped == left * (access("V", m, e) + 1)
    assert swapped.args[0] is left


def test_rewrite_is_bottom_up():
    seen = []
    (m + p * 2).rewrite(lambda n: seen.append(str(n)))
    assert seen == ["m", "p", "2", "p * 2", "m + p * 2"]


# ---- truth value -----------------------------------------------------------------------------------------------------
def test_expr_has_no_truth_value():
    with pytest.raises(TypeError, match="no truth value"):
        bool(m < p)
    with pytest.raises(TypeError):
        if m:
            pass
    with pytest.raises(TypeError):
        _ = not m
    with pytest.raises(TypeError):
        _ = m < p and p < b
    with pytest.raises(TypeError):
        _ = b < m < p  # a Python chained comparison asks for the truth of (b < m)


def test_eq_and_ne_build_comparisons():
    assert m.eq(p).op is Op.EQ and m.ne(p).op is Op.NE
    assert m.eq(1).args == (m, const(1))


# ---- building -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("built,op,args", [
    (m + 1, Op.ADD, (m, const(1))),
    (1 + m, Op.ADD, (const(1), m)),
    (2 - m, Op.SUB, (const(2), m)),
    (2.0 * m, Op.MUL, (const(2.0), m)),
    (1 / m, Op.DIV, (const(1), m)),
    (7 // m, Op.FLOORDIV, (const(7), m)),
    (7 % m, Op.MOD, (const(7), m)),
    (m > 0, Op.GT, (m, const(0))),
    (0 < m, Op.GT, (m, const(0))),   # Python reflects 0 < m to m > 0
    (m >= p, Op.GE, (m, p)),
])
def test_operator_overloads(built, op, args):
    assert built.op is op and built.args == args


def test_negation_folds_numbers_only():
    assert -const(2) == const(-2) and (-const(2)).op is Op.CONST
    assert -const(1.5) == const(-1.5)
    assert -INF == const(-math.inf)
    assert neg(True).op is Op.NEG and neg(True).args == (const(True),)
    assert (-m).op is Op.NEG and neg(neg(m)).args[0].op is Op.NEG


def test_constructor_errors():
    with pytest.raises(CascadeError, match="accepted: Expr, int, float, bool"):
        as_expr("m")  # type: ignore[arg-type]
    with pytest.raises(CascadeError, match="NaN"):
        const(math.nan)
    with pytest.raises(CascadeError, match="unknown function 'erf'; accepted: exp, exp2"):
        func("erf", m)
    with pytest.raises(CascadeError, match="unknown reduction 'prod'; accepted: sum, max, min"):
        reduce("prod", "e", m)
    with pytest.raises(CascadeError, match="at least one rank"):
        reduce("sum", (), m)
    with pytest.raises(CascadeError):
        _ = m + "p"  # type: ignore[operator]


def test_reduce_accepts_names_and_rank_expressions():
    body = access("Q", p, e)
    assert reduce("sum", "e", body) == reduce("sum", e, body) == reduce("sum", [e], body) == sum_(("e",), body)
    both = reduce("max", (e, "m"), body)
    assert both.reduce_kind == "max" and both.reduce_ranks == ("e", "m")


def test_names_and_helpers():
    assert ranks("b h p") == (rank("b"), rank("h"), rank("p"))
    assert extent_of("m1") == "M1" and extent_of("p") == "P"
    assert m.name == "m" and extent("M").name == "M" and param("s").name == "s"
    assert access("Q", p).name == "Q" and exp(m).name == "exp"
    assert str(where(m < p, 1.0, -INF)) == "where(m < p, 1.0, -inf)"
    assert repr(m + 1) == "Expr<m + 1>"
    assert isinstance(m, Expr)


# ---- queries --------------------------------------------------------------------------------------------------------
def test_free_ranks_respects_reductions():
    qk = sum_(e, access("Q", b, p, e) * access("K", b, m, e))
    assert free_ranks(qk) == {"b", "p", "m"}
    assert free_ranks(reduce("max", (m, p), qk)) == {"b"}
    assert free_ranks(access("K", access("BT", b, m), extent("M") - 1)) == {"b", "m"}
    assert free_ranks(const(1.0) * param("s")) == frozenset()
    # a rank reduced inside and used outside stays free
    assert free_ranks(sum_(e, access("Q", e)) + e) == {"e"}


def test_substitute_ranks_shadows_reduced_ranks():
    body = sum_(e, access("Q", p, e)) + e
    out = substitute_ranks(body, {"e": m * 2, "p": const(0)})
    assert out == sum_(e, access("Q", const(0), e)) + m * 2
    assert substitute_ranks(body, {}) is body
    assert substitute_ranks(body, {"x": m}) is body


def test_walk_is_pre_order():
    assert [str(n) for n in (m + p * 2).walk()] == ["m + p * 2", "m", "p * 2", "p", "2"]


def test_reads_and_uses():
    node = access("K", access("BT", b, m), e) * param("s") + extent("M") + extent("M0")
    assert tensors_read(node) == {"K", "BT"}
    assert extents_used(node) == {"M", "M0"}
    assert params_used(node) == {"s"}
