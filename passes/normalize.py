"""Deferring a normalisation: ``sum[m](N / D * V) -> sum[m](N * V) / D`` when ``D``
does not depend on the reduced ranks.

FuseMax's 3-pass attention divides every ``exp(QK - GM)`` by the complete sum
``SD`` before multiplying by ``V``, which takes a third pass over ``m``; dividing
once after the reduction (the 2-pass form) computes the same function with one
pass fewer and ``M`` times fewer divisions.
"""

from __future__ import annotations

from functools import partial

from kascade.ir import expr as E
from kascade.ir.cascade import Cascade, Einsum
from kascade.ir.expr import Expr, Op, free_ranks


def _replace_factor(body: Expr, name: str, by: Expr) -> Expr | None:
    """``body`` with the one multiplicative occurrence of tensor ``name`` replaced by
    ``by``; None unless ``name`` occurs exactly once, as a factor of a product (under
    selects whose other branch is 0)."""
    if body.op is Op.ACCESS and body.arg == name:
        return by
    if body.op is Op.MUL:
        a, b = body.args
        in_a = any(n.op is Op.ACCESS and n.arg == name for n in a.walk())
        in_b = any(n.op is Op.ACCESS and n.arg == name for n in b.walk())
        if in_a == in_b:
            return None
        new = _replace_factor(a if in_a else b, name, by)
        return None if new is None else (E.binary(Op.MUL, new, b) if in_a else E.binary(Op.MUL, a, new))
    if body.op is Op.WHERE and body.args[2] == E.const(0):
        cond, x, zero = body.args
        if any(n.op is Op.ACCESS and n.arg == name for n in cond.walk()):
            return None
        new = _replace_factor(x, name, by)
        return None if new is None else E.where(cond, new, zero)
    return None


def _deferred(a: Einsum, user: Einsum) -> tuple[Einsum, Expr] | None:
    """``user`` without the division, and the divisor in ``user``'s ranks."""
    e = user.expr
    if e.op is not Op.REDUCE or e.reduce_kind != "sum" or user.step is not None:
        return None
    uses = [n for n in e.walk() if n.op is Op.ACCESS and n.arg == a.name]
    if len(uses) != 1:
        return None
    mapping = dict(zip(a.ranks, uses[0].args))
    num, den = (E.substitute_ranks(x, mapping) for x in a.expr.args)
    if not free_ranks(den) <= set(user.ranks):
        return None  # the divisor varies with a reduced rank: it cannot leave the sum
    body = _replace_factor(e.args[0], a.name, num)
    if body is None:
        return None
    return Einsum(user.name, user.ranks, E.reduce("sum", e.reduce_ranks, body), user.dtype), den


def _divide_reads(e: Expr, new: dict[str, tuple[Einsum, Expr]]) -> Expr:
    """Every read ``S[idx]`` of a rewritten sum becomes ``S[idx] / D[idx]``."""
    def fn(n: Expr) -> Expr | None:
        if n.op is Op.ACCESS and n.arg in new:
            stmt, den = new[n.arg]
            return n / E.substitute_ranks(den, dict(zip(stmt.ranks, n.args)))
        return None
    return e.rewrite(fn)


def defer_normalization(c: Cascade) -> Cascade:
    """For each quotient ``A = N / D`` that is only read as a factor of sums whose reduced
    ranks ``D`` does not vary with, drop ``A``: each such sum ``S`` reduces ``N`` instead,
    and every read of ``S`` is divided by ``D`` (so ``S`` and its readers stay separate
    Einsums, as the later passes expect)."""
    for a in c.stmts:
        if not (isinstance(a, Einsum) and not a.output and a.step is None and a.expr.op is Op.DIV):
            continue
        users = c.users(a.name)
        done = [_deferred(a, u) if isinstance(u, Einsum) and not u.output else None for u in users]
        if not users or any(d is None for d in done):
            continue
        new = {u.name: d for u, d in zip(users, done)}
        divide_reads = partial(_divide_reads, new=new)
        stmts = []
        for s in c.stmts:
            if s is a:
                continue
            if isinstance(s, Einsum) and s.name in new:
                stmts.append(new[s.name][0])
            elif isinstance(s, Einsum):
                init = None if s.init is None else divide_reads(s.init)
                stmts.append(Einsum(s.name, s.ranks, divide_reads(s.expr), s.dtype, s.output, s.step, init))
            else:
                stmts.append(s.__class__(s.kind, s.names, s.ranks, s.over, divide_reads(s.expr), s.dtypes, s.output))
        return defer_normalization(c.with_stmts(stmts))
    return c
