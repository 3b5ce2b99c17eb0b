"""Binding extent symbols to integers.

Extents come from input shapes (dimension i of input ``T`` binds the extent of
``T``'s i-th rank), from the caller (tile sizes, split counts, ``K`` of a top-k), from
the cascade's ``extent`` declarations (constants, aliases ``S = T``, derived
``M1 = cdiv(M, M0)``) and from operators (``sort``'s new rank has the extent of the rank
it sorts over). Every conflict names both sources.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

from kascade.ir.cascade import Cascade, Operator
from kascade.ir.errors import ShapeError
from kascade.ir.expr import Expr, Op, extent_of, extents_used

_INT_OPS = {Op.ADD: operator.add, Op.SUB: operator.sub, Op.MUL: operator.mul, Op.FLOORDIV: operator.floordiv,
            Op.MOD: operator.mod, Op.CDIV: lambda a, b: -(-a // b), Op.MAX: max, Op.MIN: min}


def extent_symbols(c: Cascade) -> set[str]:
    """Every extent symbol the cascade names: declared, of its ranks, and in expressions."""
    ranks = {r for t in (*c.inputs, *c.stmts) for r in t.ranks} | {s.over for s in c.stmts if isinstance(s, Operator)}
    syms = {x.name for x in c.extents}
    for e in [s.expr for s in c.stmts] + [s.init for s in c.einsums if s.init is not None]:
        syms |= extents_used(e)
        ranks |= {r for n in e.walk() if n.op is Op.REDUCE for r in n.reduce_ranks}
    return syms | {extent_of(r) for r in ranks}


def eval_int(e: Expr, bound: Mapping[str, int], canon=lambda s: s, name: str = "") -> int:
    """The value of an integer extent expression (its extents must be bound)."""
    if e.op is Op.CONST:
        return e.arg
    if e.op is Op.EXTENT:
        return bound[canon(e.arg)]
    a, b = (eval_int(x, bound, canon, name) for x in e.args)
    if e.op in (Op.FLOORDIV, Op.MOD, Op.CDIV) and b == 0:
        raise ShapeError(f"extent {name} = {e} divides by zero")
    return _INT_OPS[e.op](a, b)


def bind_extents(cascade: Cascade, shapes: Mapping[str, Sequence[int]] | None = None,
                 extents: Mapping[str, int] | None = None, *, complete: bool = True) -> dict[str, int]:
    """Bind extent symbols from input ``shapes`` (by input name), then ``extents``, then the
    cascade's declarations (and sort's new rank), iterated to a fixed point.

    Returns every bound symbol, aliases included. Raises :class:`ShapeError` when two
    sources disagree (naming both), for an unknown name in ``extents``, and, with
    ``complete``, when a symbol the cascade names stays unbound (saying what to pass).
    """
    canon = cascade.canonical_extent
    bound: dict[str, int] = {}
    origin: dict[str, str] = {}

    def bind(sym: str, value: int, where: str) -> bool:
        sym = canon(sym)
        if sym in bound:
            if bound[sym] != value:
                raise ShapeError(f"extent {sym} is {bound[sym]} from {origin[sym]} but {value} from {where}; "
                                 "they must agree")
            return False
        if value < 0:
            raise ShapeError(f"extent {sym} = {value} from {where}; extents are non-negative integers")
        bound[sym], origin[sym] = value, where
        return True

    for decl in cascade.inputs:
        if decl.name in (shapes or {}):
            shape = tuple(shapes[decl.name])
            if len(shape) != len(decl.ranks):
                raise ShapeError(f"input {decl.name!r} has {len(shape)} dims {list(shape)} but is declared with "
                                 f"{len(decl.ranks)} ranks {list(decl.ranks)}")
            for i, (r, size) in enumerate(zip(decl.ranks, shape)):
                bind(cascade.rank_extent(r), size, f"dim {i} (rank {r!r}) of input {decl.name!r}, size {size}")
    known = extent_symbols(cascade)
    for sym, value in (extents or {}).items():
        if sym not in known:
            raise ShapeError(f"extents= names unknown extent {sym!r}; accepted: {', '.join(sorted(known))}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ShapeError(f"extents={{{sym!r}: {value!r}}}: extents are non-negative integers")
        bind(sym, value, f"extents={{{sym!r}: {value}}}")
    sorts = [s for s in cascade.stmts if isinstance(s, Operator) and s.kind == "sort"]
    changed = True
    while changed:  # each round binds at least one more symbol, so this ends
        changed = False
        for x in cascade.extents:
            if x.value is None or x.value.op is Op.EXTENT:  # free symbols and aliases bind nothing
                continue
            if all(canon(d) in bound for d in extents_used(x.value)):
                changed |= bind(x.name, eval_int(x.value, bound, canon, x.name), f"'extent {x.name} = {x.value}'")
        for s in sorts:
            new, over = cascade.rank_extent(s.new_rank), cascade.rank_extent(s.over)
            for a, b in ((new, over), (over, new)):
                if b in bound:
                    changed |= bind(a, bound[b], f"{s.label} (sort's new rank has the extent of {s.over!r})")
    if complete:
        for sym in sorted(known):
            if canon(sym) not in bound:
                raise ShapeError(f"extent {sym!r} is not bound by any input shape or extent declaration; "
                                 f"pass extents={{{canon(sym)!r}: ...}}")
    return {sym: bound[canon(sym)] for sym in known if canon(sym) in bound}
