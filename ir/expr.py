"""Expression trees: one small frozen node type with a kind enum.

An :class:`Expr` is ``(op, args, arg)``: ``args`` are child expressions, ``arg`` the
op's payload (a constant's value, a rank / extent / param / tensor name, a function
name, a cast's dtype, a reduction's ``(kind, ranks)``). Equality and hashing are
structural, so ``==`` compares trees; comparisons that *build* expressions are the
operators ``<``, ``<=``, ``>``, ``>=`` and the methods :meth:`Expr.eq` / :meth:`Expr.ne`.

Ranks are lower-case index variables; the extent of rank ``m1`` is the symbol
``M1`` (upper case of the rank's name), the FuseMax convention.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kascade.ir.dtypes import DType
from kascade.ir.errors import CascadeError


class Op(enum.Enum):
    # leaves
    CONST = "const"      # arg: int | float | bool
    RANK = "rank"        # arg: rank name
    EXTENT = "extent"    # arg: extent symbol
    PARAM = "param"      # arg: param name
    # tensor read: arg = tensor name, args = one index expression per dimension
    ACCESS = "access"
    # unary
    NEG = "neg"
    NOT = "not"
    FUNC = "func"        # arg: function name (see FUNCTIONS)
    CAST = "cast"        # arg: DType
    # binary
    ADD = "+"
    SUB = "-"
    MUL = "*"
    DIV = "/"
    FLOORDIV = "//"
    MOD = "%"
    CDIV = "cdiv"        # ceiling division, for extents and tile counts
    MAX = "max"
    MIN = "min"
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    EQ = "=="
    NE = "!="
    AND = "and"
    OR = "or"
    # ternary select
    WHERE = "where"
    # reduction: arg = (kind, ranks); kind in REDUCTIONS
    REDUCE = "reduce"


BINARY = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.FLOORDIV, Op.MOD, Op.CDIV, Op.MAX,
                    Op.MIN, Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE, Op.AND, Op.OR})
COMPARISONS = frozenset({Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE})
LOGICAL = frozenset({Op.AND, Op.OR})
INTEGER_ONLY = frozenset({Op.FLOORDIV, Op.MOD, Op.CDIV})

REDUCTIONS = ("sum", "max", "min")

# Elementwise functions: name -> number of special-function-unit operations it costs
# and the number of plain FLOPs around them (used by the counting analysis).
FUNCTIONS: dict[str, tuple[int, int]] = {
    "exp": (1, 0),
    "exp2": (1, 0),
    "log": (1, 0),
    "sqrt": (1, 0),
    "rsqrt": (1, 0),
    "tanh": (1, 0),
    "sigmoid": (1, 2),   # 1 / (1 + exp(-x))
    "silu": (1, 3),      # x * sigmoid(x)
    "gelu": (1, 4),      # exact: x/2 * (1 + erf(x / sqrt 2))
    "softplus": (2, 1),  # log(1 + exp(x))
    "abs": (0, 1),
}


@dataclass(frozen=True, eq=False)
class Expr:
    op: Op
    args: tuple[Expr, ...] = ()
    arg: Any = None

    # ---- structural identity ----------------------------------------------------
    # Python says 1 == 1.0 == True, but the IR does not: the three print differently
    # and mean different types, so a payload's type is part of the structure.
    def _key(self) -> tuple:
        arg = self.arg
        if isinstance(arg, float):
            arg = (arg, math.copysign(1.0, arg))  # -0.0 prints apart from 0.0
        return (self.op, type(self.arg), arg)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Expr):
            return NotImplemented
        return self._key() == other._key() and self.args == other.args

    def __hash__(self) -> int:
        return hash((self._key(), self.args))

    # ---- building: arithmetic -------------------------------------------------
    def __add__(self, o: ExprLike) -> Expr: return binary(Op.ADD, self, o)
    def __radd__(self, o: ExprLike) -> Expr: return binary(Op.ADD, o, self)
    def __sub__(self, o: ExprLike) -> Expr: return binary(Op.SUB, self, o)
    def __rsub__(self, o: ExprLike) -> Expr: return binary(Op.SUB, o, self)
    def __mul__(self, o: ExprLike) -> Expr: return binary(Op.MUL, self, o)
    def __rmul__(self, o: ExprLike) -> Expr: return binary(Op.MUL, o, self)
    def __truediv__(self, o: ExprLike) -> Expr: return binary(Op.DIV, self, o)
    def __rtruediv__(self, o: ExprLike) -> Expr: return binary(Op.DIV, o, self)
    def __floordiv__(self, o: ExprLike) -> Expr: return binary(Op.FLOORDIV, self, o)
    def __rfloordiv__(self, o: ExprLike) -> Expr: return binary(Op.FLOORDIV, o, self)
    def __mod__(self, o: ExprLike) -> Expr: return binary(Op.MOD, self, o)
    def __rmod__(self, o: ExprLike) -> Expr: return binary(Op.MOD, o, self)
    def __neg__(self) -> Expr: return neg(self)
    # comparisons build expressions; == stays structural equality (use .eq / .ne)
    def __lt__(self, o: ExprLike) -> Expr: return binary(Op.LT, self, o)
    def __le__(self, o: ExprLike) -> Expr: return binary(Op.LE, self, o)
    def __gt__(self, o: ExprLike) -> Expr: return binary(Op.GT, self, o)
    def __ge__(self, o: ExprLike) -> Expr: return binary(Op.GE, self, o)
    def eq(self, o: ExprLike) -> Expr: return binary(Op.EQ, self, o)
    def ne(self, o: ExprLike) -> Expr: return binary(Op.NE, self, o)
    def __bool__(self) -> bool:
        raise TypeError("an Expr has no truth value; build conditions with where(...)")

    # ---- inspection --------------------------------------------------------------
    @property
    def name(self) -> str:
        """The name of a rank, extent, param, tensor access or function node."""
        assert self.op in (Op.RANK, Op.EXTENT, Op.PARAM, Op.ACCESS, Op.FUNC), self.op
        return self.arg

    @property
    def reduce_kind(self) -> str:
        assert self.op is Op.REDUCE
        return self.arg[0]

    @property
    def reduce_ranks(self) -> tuple[str, ...]:
        assert self.op is Op.REDUCE
        return self.arg[1]

    def replace(self, **changes: Any) -> Expr:
        """A copy with fields changed; the same object when nothing changes."""
        new = Expr(**{"op": self.op, "args": self.args, "arg": self.arg, **changes})
        return self if new == self else new

    def walk(self) -> Iterator[Expr]:
        """Pre-order traversal of every node."""
        yield self
        for a in self.args:
            yield from a.walk()

    def rewrite(self, fn: Callable[[Expr], Expr | None]) -> Expr:
        """Bottom-up rewrite: ``fn`` sees each node with rewritten children and returns
        a replacement or ``None`` to keep it. Unchanged subtrees keep their identity."""
        new_args = tuple(a.rewrite(fn) for a in self.args)
        node = self if all(x is y for x, y in zip(new_args, self.args)) else self.replace(args=new_args)
        out = fn(node)
        return node if out is None else out

    def __str__(self) -> str:
        from kascade.ir.printer import format_expr
        return format_expr(self)

    def __repr__(self) -> str:
        return f"Expr<{self}>"


ExprLike = Expr | int | float | bool


def as_expr(x: ExprLike) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, (bool, int, float)):
        return const(x)
    raise CascadeError(f"cannot use {x!r} ({type(x).__name__}) in an expression; "
                       "accepted: Expr, int, float, bool")


# ---- constructors ----------------------------------------------------------------
def const(value: int | float | bool) -> Expr:
    if isinstance(value, float) and math.isnan(value):
        raise CascadeError("NaN is not a valid constant")
    return Expr(Op.CONST, (), value)


INF = Expr(Op.CONST, (), math.inf)


def rank(name: str) -> Expr:
    return Expr(Op.RANK, (), name)


def ranks(names: str) -> tuple[Expr, ...]:
    """``ranks("b h p")`` -> three rank expressions."""
    return tuple(rank(n) for n in names.split())


def extent(name: str) -> Expr:
    return Expr(Op.EXTENT, (), name)


def extent_of(rank_name: str) -> str:
    """The extent symbol of a rank: ``m1`` -> ``M1``."""
    return rank_name.upper()


def param(name: str) -> Expr:
    return Expr(Op.PARAM, (), name)


def access(tensor: str, *indices: ExprLike) -> Expr:
    return Expr(Op.ACCESS, tuple(as_expr(i) for i in indices), tensor)


def neg(x: ExprLike) -> Expr:
    x = as_expr(x)
    # folded so that the printed "-1" parses back to the same tree
    if x.op is Op.CONST and not isinstance(x.arg, bool):
        return const(-x.arg)
    return Expr(Op.NEG, (x,))


def logical_not(x: ExprLike) -> Expr:
    return Expr(Op.NOT, (as_expr(x),))


def func(name: str, x: ExprLike) -> Expr:
    if name not in FUNCTIONS:
        raise CascadeError(f"unknown function {name!r}; accepted: {', '.join(FUNCTIONS)}")
    return Expr(Op.FUNC, (as_expr(x),), name)


def cast(dtype: DType, x: ExprLike) -> Expr:
    return Expr(Op.CAST, (as_expr(x),), dtype)


def binary(op: Op, a: ExprLike, b: ExprLike) -> Expr:
    assert op in BINARY, op
    return Expr(op, (as_expr(a), as_expr(b)))


def where(cond: ExprLike, a: ExprLike, b: ExprLike) -> Expr:
    return Expr(Op.WHERE, (as_expr(cond), as_expr(a), as_expr(b)))


def reduce(kind: str, over: str | Expr | tuple | list, body: ExprLike) -> Expr:
    """``reduce("sum", "e", Q*K)`` or with rank expressions / several ranks."""
    if kind not in REDUCTIONS:
        raise CascadeError(f"unknown reduction {kind!r}; accepted: {', '.join(REDUCTIONS)}")
    items = over if isinstance(over, (tuple, list)) else (over,)
    names = tuple(r.name if isinstance(r, Expr) else r for r in items)
    if not names:
        raise CascadeError(f"{kind}[] needs at least one rank")
    return Expr(Op.REDUCE, (as_expr(body),), (kind, names))


def sum_(over, body) -> Expr: return reduce("sum", over, body)
def max_(over, body) -> Expr: return reduce("max", over, body)
def min_(over, body) -> Expr: return reduce("min", over, body)
def maximum(a: ExprLike, b: ExprLike) -> Expr: return binary(Op.MAX, a, b)
def minimum(a: ExprLike, b: ExprLike) -> Expr: return binary(Op.MIN, a, b)
def cdiv(a: ExprLike, b: ExprLike) -> Expr: return binary(Op.CDIV, a, b)
def logical_and(a: ExprLike, b: ExprLike) -> Expr: return binary(Op.AND, a, b)
def logical_or(a: ExprLike, b: ExprLike) -> Expr: return binary(Op.OR, a, b)


def _fn(name: str) -> Callable[[ExprLike], Expr]:
    def build(x: ExprLike) -> Expr:
        return func(name, x)
    build.__name__ = name
    build.__doc__ = f"The elementwise function ``{name}``."
    return build


exp, exp2, log, sqrt, rsqrt, tanh = (_fn(n) for n in ("exp", "exp2", "log", "sqrt", "rsqrt", "tanh"))
sigmoid, silu, gelu, softplus, abs_ = (_fn(n) for n in ("sigmoid", "silu", "gelu", "softplus", "abs"))


# ---- queries ---------------------------------------------------------------------
def free_ranks(e: Expr) -> frozenset[str]:
    """Ranks an expression depends on that no reduction inside it binds."""
    if e.op is Op.RANK:
        return frozenset((e.arg,))
    if e.op is Op.REDUCE:
        return free_ranks(e.args[0]) - frozenset(e.reduce_ranks)
    out: frozenset[str] = frozenset()
    for a in e.args:
        out |= free_ranks(a)
    return out


def tensors_read(e: Expr) -> frozenset[str]:
    return frozenset(n.arg for n in e.walk() if n.op is Op.ACCESS)


def extents_used(e: Expr) -> frozenset[str]:
    return frozenset(n.arg for n in e.walk() if n.op is Op.EXTENT)


def params_used(e: Expr) -> frozenset[str]:
    return frozenset(n.arg for n in e.walk() if n.op is Op.PARAM)


def substitute_ranks(e: Expr, mapping: dict[str, Expr]) -> Expr:
    """Replace free occurrences of ranks by expressions (reductions shadow their ranks)."""
    if not mapping:
        return e
    if e.op is Op.RANK:
        return mapping.get(e.arg, e)
    if e.op is Op.REDUCE:
        inner = {k: v for k, v in mapping.items() if k not in e.reduce_ranks}
        body = substitute_ranks(e.args[0], inner)
        return e if body is e.args[0] else e.replace(args=(body,))
    new_args = tuple(substitute_ranks(a, mapping) for a in e.args)
    return e if all(x is y for x, y in zip(new_args, e.args)) else e.replace(args=new_args)
