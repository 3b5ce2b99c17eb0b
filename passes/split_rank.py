"""Rank splitting (tiling): ``m -> (m1, m0)`` with ``m = m1 * M0 + m0``.

Every statement that iterates ``m`` is rewritten: intermediates keep ``(m1, m0)`` in
place of ``m``; reductions over ``m`` reduce over ``(m1, m0)``; reads of inputs and
index expressions use ``m1 * M0 + m0``. The tile extent is a symbol (``extent M0``,
bound later by a Config) or a constant, and ``M1 = cdiv(M, M0)``. Because ``M0``
need not divide ``M`` the last tile has a tail: each reduction over the split ranks
masks it (``where(m1 * M0 + m0 < M, body, identity)``), so padded positions never
reach a result. Outputs keep their declared ranks and read split intermediates at
``[m // M0, m % M0]``.

With ``count`` instead of ``tile`` the outer extent is fixed (``C`` parts) and the
inner one derived (``W = cdiv(M, C)``): the split used to spread a reduction over
independent workers (see ``split_reduction``).
"""

from __future__ import annotations

from kascade.ir import expr as E
from kascade.ir.cascade import Cascade, Einsum, ExtentDecl, Operator
from kascade.ir.errors import RewriteError
from kascade.ir.expr import Expr, Op, extent_of

IDENTITY = {"sum": E.const(0), "max": E.neg(E.INF), "min": E.INF}


def _all_ranks(c: Cascade) -> set[str]:
    names = {r for t in c.inputs for r in t.ranks}
    for s in c.stmts:
        names |= set(s.ranks)
        for n in s.expr.walk():
            if n.op is Op.REDUCE:
                names |= set(n.reduce_ranks)
        if isinstance(s, Operator):
            names.add(s.over)
    return names


def split_rank(c: Cascade, rank: str, outer: str | None = None, inner: str | None = None, *,
               tile: int | str | None = None, count: int | str | None = None,
               divisible: bool = False) -> Cascade:
    """Split ``rank`` into ``(outer, inner)``.

    ``tile``: the inner extent (an int, or a symbol name; default: a free symbol
    named after ``inner``). ``count``: the outer extent instead (int or symbol); the
    inner one is then derived. ``divisible=True`` promises that the split divides
    exactly and omits the tail masks.
    """
    outer = outer or f"{rank}1"
    inner = inner or f"{rank}0"
    taken = _all_ranks(c)
    if rank not in taken:
        raise RewriteError(f"split_rank: the cascade has no rank {rank!r}; its ranks are {sorted(taken)}")
    for new in (outer, inner):
        if new in taken:
            raise RewriteError(f"split_rank: rank {new!r} is already used; pick other names for the split")
    if tile is not None and count is not None:
        raise RewriteError("split_rank: give the tile extent or the number of parts, not both")

    full = E.extent(c.rank_extent(rank))
    inner_x, outer_x = extent_of(inner), extent_of(outer)
    if count is None:  # the tile size is given (or free); the number of tiles follows
        fixed, fixed_value, derived = inner_x, tile, ExtentDecl(outer_x, E.cdiv(full, E.extent(inner_x)))
    else:  # the number of parts is given (or free); the part size follows
        fixed, fixed_value, derived = outer_x, count, ExtentDecl(inner_x, E.cdiv(full, E.extent(outer_x)))
    own_name = fixed_value == fixed   # count='C' for the outer extent C: simply a free symbol
    new_decls = [ExtentDecl(fixed, None if own_name else _extent_value(fixed_value)), derived]
    if isinstance(fixed_value, str) and fixed_value != fixed and c.extent_decl(fixed_value) is None:
        new_decls.insert(0, ExtentDecl(fixed_value))  # a named free symbol, e.g. BLOCK_M
    for d in new_decls:
        if c.extent_decl(d.name) is not None:
            raise RewriteError(f"split_rank: extent {d.name!r} is already declared")
    decls = list(c.extents) + new_decls

    index = E.rank(outer) * E.extent(inner_x) + E.rank(inner)
    valid = index < full
    split_tensors = {s.name for s in c.stmts
                     if isinstance(s, Einsum) and rank in s.ranks and not s.output}

    def rewrite(e: Expr, split_here: bool) -> Expr:
        """``split_here``: the free rank ``rank`` stands for ``index`` in this context."""
        if e.op is Op.RANK and e.arg == rank and split_here:
            return index
        if e.op is Op.REDUCE and rank in e.reduce_ranks:
            kind, names = e.arg
            body = rewrite(e.args[0], True)
            if not divisible:
                body = E.where(valid, body, IDENTITY[kind])
            new_names = tuple(x for r in names for x in ((outer, inner) if r == rank else (r,)))
            return Expr(Op.REDUCE, (body,), (kind, new_names))
        if e.op is Op.ACCESS and e.arg in split_tensors:
            dims = c.ranks_of(e.arg)
            idx = []
            for dim, ix in zip(dims, e.args):
                if dim != rank:
                    idx.append(rewrite(ix, split_here))
                elif ix.op is Op.RANK and ix.arg == rank and split_here:
                    idx += [E.rank(outer), E.rank(inner)]
                else:  # any other index i reads the split tensor at (i // M0, i % M0)
                    i = rewrite(ix, split_here)
                    idx += [i // E.extent(inner_x), i % E.extent(inner_x)]
            return E.access(e.arg, *idx)
        new_args = tuple(rewrite(a, split_here) for a in e.args)
        return e if all(x is y for x, y in zip(new_args, e.args)) else e.replace(args=new_args)

    stmts = []
    for s in c.stmts:
        if isinstance(s, Operator):
            if rank in s.ranks or rank == s.over:
                raise RewriteError(f"split_rank: {s.label} runs over rank {rank!r}; operators are not tiled")
            stmts.append(s.__class__(s.kind, s.names, s.ranks, s.over, rewrite(s.expr, False), s.dtypes, s.output))
            continue
        if s.step == rank:
            raise RewriteError(f"split_rank: {s.label} is a recurrence over {rank!r}; its steps cannot be tiled")
        here = s.name in split_tensors
        ranks = tuple(x for r in s.ranks for x in ((outer, inner) if r == rank and here else (r,)))
        init = None if s.init is None else rewrite(s.init, here)
        stmts.append(Einsum(s.name, ranks, rewrite(s.expr, here), s.dtype, s.output, s.step, init))
    return c.replace(extents=tuple(decls), stmts=tuple(stmts))


def _extent_value(v: int | str | None) -> Expr | None:
    if v is None:
        return None
    if isinstance(v, str):
        return E.extent(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise RewriteError(f"split_rank: a tile size or part count is a positive int or an extent name, got {v!r}")
    return E.const(v)
