"""Resolving extent symbols to integers.

Extents come from three places: the caller (input shapes, tile sizes), the cascade's
``extent`` declarations (constants, aliases ``S = T``, derived ``M1 = cdiv(M, M0)``),
and operators (``sort``'s new rank has the extent of the rank it sorts over).
"""

from __future__ import annotations

from typing import Mapping

from kascade.ir.cascade import Cascade, Operator
from kascade.ir.errors import ShapeError
from kascade.ir.expr import Expr, Op, extent_of


def eval_int(e: Expr, extents: Mapping[str, int]) -> int | None:
    """Value of an integer expression over extents; None if an extent is unbound."""
    op = e.op
    if op is Op.CONST:
        return int(e.arg)
    if op is Op.EXTENT:
        return extents.get(e.arg)
    vals = [eval_int(a, extents) for a in e.args]
    if any(v is None for v in vals):
        return None
    a, b = vals if len(vals) == 2 else (vals[0], None)
    if op is Op.NEG:
        return -a
    if op in (Op.FLOORDIV, Op.MOD, Op.CDIV) and b == 0:
        raise ShapeError(f"division by zero while computing extent {e}")
    return {
        Op.ADD: lambda: a + b, Op.SUB: lambda: a - b, Op.MUL: lambda: a * b,
        Op.FLOORDIV: lambda: a // b, Op.MOD: lambda: a % b, Op.CDIV: lambda: -(-a // b),
        Op.MAX: lambda: max(a, b), Op.MIN: lambda: min(a, b),
    }[op]()


def _bind(out: dict[str, int], name: str, value: int, source: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ShapeError(f"extent {name} = {value!r} from {source}; extents are non-negative integers")
    if name in out and out[name] != value:
        raise ShapeError(f"extent {name} is {out[name]} but {source} makes it {value}")
    out[name] = value


def resolve_extents(cascade: Cascade, given: Mapping[str, int]) -> dict[str, int]:
    """Every extent symbol that ``given`` and the declarations determine.

    ``given`` holds symbols already known (from input shapes, or the caller). Aliases
    are bound both ways, so ``extent S = T`` with ``S`` known binds ``T`` too.
    Conflicts raise :class:`ShapeError`; symbols that stay unknown are simply absent
    (see :func:`require_extents`).
    """
    out: dict[str, int] = {}
    for k, v in given.items():
        _bind(out, k, v, "the caller")
    aliases = [(s.name, s.value.arg) for s in cascade.extents if s.value is not None and s.value.op is Op.EXTENT]
    aliases += [(extent_of(s.new_rank), extent_of(s.over)) for s in cascade.stmts
                if isinstance(s, Operator) and s.kind == "sort"]
    changed = True
    while changed:
        changed = False
        for decl in cascade.extents:
            if decl.value is None:
                continue
            v = eval_int(decl.value, out)
            if v is not None and decl.name not in out:
                _bind(out, decl.name, v, f"'extent {decl.name} = {decl.value}'")
                changed = True
            elif v is not None:
                _bind(out, decl.name, v, f"'extent {decl.name} = {decl.value}'")
        for a, b in aliases:
            for x, y in ((a, b), (b, a)):
                if y in out and x not in out:
                    _bind(out, x, out[y], f"the alias {a} = {b}")
                    changed = True
    return out


def needed_extents(cascade: Cascade) -> set[str]:
    """The extent symbol of every rank any statement iterates, plus extents used in expressions."""
    from kascade.ir.expr import extents_used
    need = {extent_of(r) for t in cascade.inputs for r in t.ranks}
    for s in cascade.stmts:
        need |= {extent_of(r) for r in s.ranks} | extents_used(s.expr)
        for n in s.expr.walk():
            if n.op is Op.REDUCE:
                need |= {extent_of(r) for r in n.reduce_ranks}
        if isinstance(s, Operator):
            need.add(extent_of(s.over))
    return need


def require_extents(cascade: Cascade, known: Mapping[str, int]) -> None:
    missing = sorted(needed_extents(cascade) - set(known))
    if missing:
        hint = ", ".join(f"'{m}': ..." for m in missing)
        raise ShapeError(f"extent{'s' * (len(missing) > 1)} {', '.join(missing)} not bound by the inputs "
                         f"or declarations; pass extents={{{hint}}}")
