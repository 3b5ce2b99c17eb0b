"""Score modifiers as passes: rewrite the score of a softmax cascade, leaving its masks alone.

The score of an attention-like cascade is the Einsum that the softmax max reads
(``GM = max[..](QK[..])``). Its expression is a value wrapped in masks,
``where(c1, where(c2, x, -inf), -inf)``; a modifier replaces ``x`` and keeps the masks, so
a masked key still scores ``-inf`` (FlexAttention's ``score_mod``, as a Cascade -> Cascade
function). :func:`soft_cap` is the one kascade needs: flash-attn's / Gemma 2's soft-capping
``cap * tanh(x / cap)`` for cascades that the library builds without it (paged decode).
Applied to the library's uncapped attention it gives exactly the library's capped one.
"""

from __future__ import annotations

from collections.abc import Callable

from kascade.ir import expr as E
from kascade.ir.cascade import Cascade, Einsum, Param
from kascade.ir.dtypes import f32
from kascade.ir.errors import RewriteError
from kascade.ir.expr import Expr, Op
from kascade.ir.validate import validate


def score_einsum(c: Cascade) -> Einsum:
    """The Einsum read by the softmax max: ``S`` of ``GM = max[..](S[..])`` where ``GM`` is
    read as ``exp(x - GM)``. Raises :class:`RewriteError` unless there is exactly one."""
    anchors = {n.args[0].args[1].arg for s in c.stmts for n in s.expr.walk()
               if n.op is Op.FUNC and n.arg == "exp" and n.args[0].op is Op.SUB and n.args[0].args[1].op is Op.ACCESS}
    found = []
    for s in c.einsums:
        body = s.expr.args[0] if s.expr.op is Op.REDUCE else None
        if s.name in anchors and s.expr.reduce_kind == "max" and body is not None and body.op is Op.ACCESS:
            producer = c.producer(body.arg)
            if isinstance(producer, Einsum) and producer not in found:
                found.append(producer)
    if len(found) != 1:
        raise RewriteError(f"{c.name}: expected one softmax score (the tensor a max reads before exp(x - max)), "
                           f"found {[s.name for s in found] or 'none'}")
    return found[0]


def modify_score(c: Cascade, fn: Callable[[Expr], Expr], params: tuple[Param, ...] = (), suffix: str = "") -> Cascade:
    """``c`` with its score's unmasked value ``x`` replaced by ``fn(x)``; ``params`` are declared
    after the cascade's own (names already taken are an error); ``suffix`` extends the name."""
    validate(c)
    s = score_einsum(c)
    taken = {p.name for p in c.params}
    for p in params:
        if p.name in taken:
            raise RewriteError(f"{c.name}: param {p.name!r} is already declared; the score modifier needs it")

    def inside(e: Expr) -> Expr:
        if e.op is Op.WHERE and e.args[2] == E.neg(E.INF):
            return E.where(e.args[0], inside(e.args[1]), e.args[2])
        return fn(e)

    new = Einsum(s.name, s.ranks, inside(s.expr), s.dtype, s.output, s.step, s.init)
    stmts = [new if t is s else t for t in c.stmts]
    return validate(c.replace(params=c.params + params, stmts=tuple(stmts), name=c.name + suffix))


def soft_cap(c: Cascade, cap: str = "cap") -> Cascade:
    """Soft-capping: the score ``x`` becomes ``cap * tanh(x / cap)`` with a new ``param cap: f32``
    (flash-attn's ``softcap``; ``x`` already scaled)."""
    p = E.param(cap)
    return modify_score(c, lambda x: p * E.tanh(x / p), (Param(cap, f32),), "_softcap")
