"""The canonical text form of expressions and cascades.

``parse(format_cascade(c)) == c`` for every valid cascade: parentheses are printed
exactly where the parser's precedence would otherwise build a different tree.
"""

from __future__ import annotations

import math

from kascade.ir.cascade import Cascade, Einsum, Operator
from kascade.ir.expr import BINARY, COMPARISONS, Expr, Op

# Binding strength, loosest first. Calls, accesses and leaves bind tightest.
_PREC = {Op.OR: 1, Op.AND: 2, Op.NOT: 3, **{op: 4 for op in COMPARISONS},
         Op.ADD: 5, Op.SUB: 5, Op.MUL: 6, Op.DIV: 6, Op.FLOORDIV: 6, Op.MOD: 6, Op.NEG: 7}
_ATOM = 9
_CALL_STYLE = {Op.MAX: "max", Op.MIN: "min", Op.CDIV: "cdiv"}


def _prec(e: Expr) -> int:
    if e.op is Op.CONST and isinstance(e.arg, (int, float)) and not isinstance(e.arg, bool) and e.arg < 0:
        return _PREC[Op.NEG]  # "-1" reads as a negation
    if e.op in _CALL_STYLE:
        return _ATOM
    return _PREC.get(e.op, _ATOM)


def format_const(v: int | float | bool) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    return str(v)


def format_expr(e: Expr) -> str:
    op = e.op
    if op is Op.CONST:
        return format_const(e.arg)
    if op in (Op.RANK, Op.EXTENT, Op.PARAM):
        return e.arg
    if op is Op.ACCESS:
        return f"{e.arg}[{', '.join(format_expr(a) for a in e.args)}]"
    if op is Op.FUNC:
        return f"{e.arg}({format_expr(e.args[0])})"
    if op is Op.CAST:
        return f"{e.arg.value}({format_expr(e.args[0])})"
    if op is Op.WHERE:
        return f"where({', '.join(format_expr(a) for a in e.args)})"
    if op is Op.REDUCE:
        kind, names = e.arg
        return f"{kind}[{', '.join(names)}]({format_expr(e.args[0])})"
    if op in _CALL_STYLE:
        return f"{_CALL_STYLE[op]}({format_expr(e.args[0])}, {format_expr(e.args[1])})"
    if op is Op.NEG:
        x = e.args[0]
        # "-1" reads back as the constant -1, so a NEG node over a number prints as "-(1)"
        number = x.op is Op.CONST and not isinstance(x.arg, bool)
        return "-" + _wrap(x, number or _prec(x) < _PREC[Op.NEG])
    if op is Op.NOT:
        return "not " + _wrap(e.args[0], _prec(e.args[0]) < _PREC[Op.NOT])
    assert op in BINARY, op
    p = _PREC[op]
    left, right = e.args
    # left-associative; comparisons do not chain, so both sides need parentheses there
    left_parens = _prec(left) < p or (op in COMPARISONS and _prec(left) == p)
    right_parens = _prec(right) <= p
    return f"{_wrap(left, left_parens)} {op.value} {_wrap(right, right_parens)}"


def _wrap(e: Expr, parens: bool) -> str:
    s = format_expr(e)
    return f"({s})" if parens else s


def _target(name: str, ranks: tuple[str, ...], step: str | None, dtype) -> str:
    idx = ", ".join(f"{r} + 1" if r == step else r for r in ranks)
    return f"{name}[{idx}]" + (f": {dtype.value}" if dtype is not None else "")


def format_statement(s: Einsum | Operator) -> str:
    prefix = "output " if s.output else ""
    if isinstance(s, Einsum):
        lines = []
        if s.init is not None:
            idx = ", ".join("0" if r == s.step else r for r in s.ranks)
            lines.append(f"init {s.name}[{idx}] = {format_expr(s.init)}")
        lines.append(f"{prefix}{_target(s.name, s.ranks, s.step, s.dtype)} = {format_expr(s.expr)}")
        return "\n".join(lines)
    targets = ", ".join(_target(n, s.ranks, None, d) for n, d in zip(s.names, s.dtypes))
    return f"{prefix}{targets} = {s.kind}[{s.over}]({format_expr(s.expr)})"


def format_cascade(c: Cascade) -> str:
    head = [f"param {p.name}: {p.dtype.value}" for p in c.params]
    head += [f"input {t.name}[{', '.join(t.ranks)}]: {t.dtype.value}" for t in c.inputs]
    head += [f"extent {x.name}" + (f" = {format_expr(x.value)}" if x.value is not None else "")
             for x in c.extents]
    body = [format_statement(s) for s in c.stmts]
    return "\n".join(head + ([""] if head and body else []) + body) + "\n"
