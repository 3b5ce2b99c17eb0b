"""Online softmax and split reduction: making the reductions over one rank local.

Both passes take a cascade whose reductions run over a rank ``o`` (the outer rank
of a split, ``m1`` or ``c``) and make every statement that iterates ``o`` work on one
value of ``o`` at a time:

* a max over ``o`` (an *anchor*, like ``GM = max[m1, m0](QK)``) becomes a per-``o``
  local max ``LGM[.., o] = max[m0](QK)``;
* a sum over ``o`` becomes a per-``o`` local sum, computed against the local
  anchor instead of the global one;
* the locals are combined: by a **recurrence** over ``o`` (``online_softmax``, the
  FuseMax 1-pass cascade: running max ``RGM``, rescale factor ``PGM``, running sums
  rescaled at each step) or by **merge** Einsums over ``o`` (``split_reduction``,
  split-KV / FlashDecoding: independent partials, then a rescaled sum).

Correctness rests on one algebraic fact checked here, not assumed: the body of
each rewritten sum is *homogeneous* in ``exp(-anchor)`` of some degree ``d``
(``exp(QK - GM) * V`` has degree 1 in ``GM``), so a partial computed against a
local max ``L`` equals the true partial times ``exp(L - GM)^d``. The degree
analysis below computes ``d`` for every statement; anything it cannot prove
homogeneous (``log(QK - GM)``, ``SN * SN + 1``) is refused with the statement's
name. Any score expression (masks, soft-capping, ALiBi) survives, because
it lives inside the anchor's argument, which is only ever read, never rescaled.

A max that is ``-inf`` (a fully masked tile or split) would make ``exp(-inf - -inf)``
NaN, so anchors are read through ``where(a > -inf, a, 0)``: masked scores still give
``exp(-inf) = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

from kascade.ir import expr as E
from kascade.ir.cascade import Cascade, Einsum, Operator
from kascade.ir.errors import RewriteError
from kascade.ir.expr import Expr, Op, extent_of, free_ranks

Degree = dict[str, tuple[int, tuple[Expr, ...]]]   # anchor -> (power, anchor's index expressions)
_ZERO = "zero"  # the constant 0, which is homogeneous of every degree


def guard(a: Expr) -> Expr:
    """``a`` where finite-or-+inf, else 0: a safe value to subtract in ``exp(x - a)``."""
    return E.where(a > E.neg(E.INF), a, E.const(0))


def iterates(s: Einsum, o: str) -> bool:
    return o in s.ranks or any(n.op is Op.REDUCE and o in n.reduce_ranks for n in s.expr.walk())


def _top_reduce(s: Einsum, o: str) -> Expr | None:
    """The reduction over ``o`` if it is the statement's whole expression."""
    e = s.expr
    return e if e.op is Op.REDUCE and o in e.reduce_ranks else None


@dataclass
class _Localizer:
    c: Cascade
    o: str
    mode: str  # "recurrence" | "merge"

    def __post_init__(self):
        self.anchors: dict[str, str] = {}        # anchor name -> name of its local max
        self.running: dict[str, str] = {}        # anchor or sum name -> its running (recurrent) tensor
        self.rescale: dict[str, str] = {}        # anchor -> rescale-factor tensor (recurrence mode)
        self.degree: dict[str, Degree] = {}      # o-iterating map tensor -> its degree
        self.sums: set[str] = set()              # sums over o that were localized
        self.out: list = []
        self.OX = E.extent(extent_of(self.o))

    def fail(self, s, msg: str) -> RewriteError:
        step = "online_softmax" if self.mode == "recurrence" else "split_reduction"
        return RewriteError(f"{step} over {self.o!r}: {s.label} {msg}")

    # ---- degree analysis -----------------------------------------------------------
    def deg(self, e: Expr, s) -> Degree | str:
        op = e.op
        if op is Op.CONST:
            return _ZERO if e.arg == 0 else {}
        if op in (Op.RANK, Op.EXTENT, Op.PARAM):
            return {}
        if op is Op.ACCESS:
            for ix in e.args:
                if self.deg(ix, s) not in ({}, _ZERO):
                    raise self.fail(s, f"indexes a tensor with a value that depends on an anchor: {e}")
            if e.arg in self.anchors:
                raise self.fail(s, f"uses the max {e.arg!r} outside the form exp(x - {e.arg}); only that "
                                "form can be rescaled")
            if e.arg in self.degree:
                mapping = dict(zip(self.c.ranks_of(e.arg), e.args))
                return {a: (p, tuple(E.substitute_ranks(i, mapping) for i in idx))
                        for a, (p, idx) in self.degree[e.arg].items()}
            return {}
        if op is Op.FUNC and e.arg == "exp" and e.args[0].op is Op.SUB:
            x, a = e.args[0].args
            if a.op is Op.ACCESS and a.arg in self.anchors and self.deg(x, s) in ({}, _ZERO):
                return {a.arg: (1, a.args)}
        if op in (Op.MUL, Op.DIV):
            x, y = (self.deg(a, s) for a in e.args)
            if _ZERO in (x, y):
                return _ZERO if x == _ZERO else {} if op is Op.DIV else _ZERO
            return self._combine(x, y, 1 if op is Op.MUL else -1, s, e)
        if op in (Op.ADD, Op.SUB, Op.MAX, Op.MIN, Op.WHERE, Op.NEG, Op.CAST, Op.REDUCE):
            parts = list(e.args)
            if op is Op.WHERE:
                if self.deg(parts[0], s) not in ({}, _ZERO):
                    raise self.fail(s, f"has a condition that depends on an anchor: {parts[0]}")
                parts = parts[1:]
            degs = [d for d in (self.deg(a, s) for a in parts) if d != _ZERO]
            if not degs:
                return _ZERO
            if any(d != degs[0] for d in degs[1:]):
                raise self.fail(s, f"adds terms of different scale in {e}; it is not homogeneous in exp(-max)")
            return degs[0]
        degs = [self.deg(a, s) for a in e.args]
        if any(d not in ({}, _ZERO) for d in degs):
            raise self.fail(s, f"applies '{op.value if op is not Op.FUNC else e.arg}' to a value scaled by "
                            f"exp(-max) in {e}; only products, quotients, sums and selects can be rescaled")
        return {}

    def _combine(self, x: Degree, y: Degree, sign: int, s, e: Expr) -> Degree:
        out = dict(x)
        for a, (p, idx) in y.items():
            if a in out and out[a][1] != idx:
                raise self.fail(s, f"reads the max {a!r} at two different positions in {e}")
            q = out.get(a, (0, idx))[0] + sign * p
            out[a] = (q, idx)
        return {a: v for a, v in out.items() if v[0] != 0}

    # ---- rewriting -----------------------------------------------------------------
    def local_anchor(self, a: str, idx: tuple[Expr, ...]) -> Expr:
        """The anchor's value against which the current ``o`` works."""
        if self.mode == "recurrence":
            return guard(E.access(self.running[a], *idx, E.rank(self.o) + 1))
        return guard(E.access(self.anchors[a], *idx, E.rank(self.o)))

    def final(self, name: str, idx: tuple[Expr, ...]) -> Expr:
        """A read of a localized tensor from outside the loop over ``o``."""
        if self.mode == "recurrence" and name in self.running:
            return E.access(self.running[name], *idx, self.OX)
        return E.access(name, *idx)

    def inside(self, e: Expr) -> Expr:
        def fn(n: Expr) -> Expr | None:
            if n.op is Op.ACCESS and n.arg in self.anchors:
                return self.local_anchor(n.arg, n.args)
            return None
        return e.rewrite(fn)

    def outside(self, e: Expr) -> Expr:
        def fn(n: Expr) -> Expr | None:
            if n.op is Op.ACCESS and (n.arg in self.anchors or n.arg in self.sums):
                return self.final(n.arg, n.args)
            return None
        return e.rewrite(fn)

    def scale_factor(self, d: Degree, s) -> Expr:
        """exp(local - global)^d for merge, the per-step rescale^d for a recurrence."""
        f: Expr | None = None
        for a, (p, idx) in sorted(d.items(), key=lambda kv: kv[0]):
            if p < 0:
                raise self.fail(s, f"divides by exp(x - {a}); only positive powers can be rescaled")
            if self.mode == "recurrence":
                term = E.access(self.rescale[a], *idx, E.rank(self.o))
            else:
                term = E.exp(E.access(self.anchors[a], *idx, E.rank(self.o)) - guard(E.access(a, *idx)))
            for _ in range(p):
                f = term if f is None else f * term
        return f

    def check_reads(self, s, e: Expr, is_inside: bool) -> None:
        for n in e.walk():
            if n.op is not Op.ACCESS:
                continue
            if n.arg in self.sums and is_inside and self.mode == "recurrence":
                raise self.fail(s, f"needs {n.arg!r} complete inside the loop over {self.o!r}: that takes a "
                                "second pass (run defer_normalization first to hoist the division)")
            if n.arg in self.degree and self.degree[n.arg] and not is_inside:
                raise self.fail(s, f"reads {n.arg!r}, which only exists scaled by a running max inside the "
                                f"loop over {self.o!r}")

    def einsum(self, s: Einsum) -> None:
        o = self.o
        if not iterates(s, o):
            self.check_reads(s, s.expr, False)
            init = None if s.init is None else self.outside(s.init)
            self.out.append(Einsum(s.name, s.ranks, self.outside(s.expr), s.dtype, s.output, s.step, init))
            return
        if s.step is not None:
            raise self.fail(s, f"is a recurrence inside the loop over {o!r}; not supported")
        self.check_reads(s, s.expr, True)
        red = _top_reduce(s, o)
        if red is None:
            if o not in s.ranks:
                raise self.fail(s, f"reduces over {o!r} inside a larger expression; make the reduction "
                                "the whole expression of its own Einsum")
            d = self.deg(s.expr, s)
            d = {} if d == _ZERO else d
            if d and s.output:
                raise self.fail(s, "is an output scaled by exp(-max); it cannot be produced per tile")
            self.degree[s.name] = d
            self.out.append(Einsum(s.name, s.ranks, self.inside(s.expr), s.dtype, s.output))
            return
        kind, names = red.arg
        rest = tuple(r for r in names if r != o)
        body = red.args[0]
        d = self.deg(body, s)
        d = {} if d == _ZERO else d
        local_body = self.inside(body)
        local_expr = E.reduce(kind, rest, local_body) if rest else local_body
        local = self.c.fresh_name("L" + s.name)
        self.out.append(Einsum(local, s.ranks + (o,), local_expr))
        idx = tuple(E.rank(r) for r in s.ranks)
        here = E.access(local, *idx, E.rank(o))
        if kind == "max" and not d and self.is_anchor(s):
            self.anchors[s.name] = local
            if self.mode == "recurrence":
                run = self.running[s.name] = self.c.fresh_name("R" + s.name)
                prev = E.access(run, *idx, E.rank(o))
                self.out.append(Einsum(run, s.ranks + (o,), E.maximum(prev, here), step=o, init=E.neg(E.INF)))
                resc = self.rescale[s.name] = self.c.fresh_name("P" + s.name)
                self.out.append(Einsum(resc, s.ranks + (o,),
                                       E.exp(prev - guard(E.access(run, *idx, E.rank(o) + 1)))))
            else:
                self.out.append(Einsum(s.name, s.ranks, E.max_(o, here), s.dtype, s.output))
            return
        if kind != "sum" and d:
            raise self.fail(s, f"is a {kind} of values scaled by exp(-max); only sums can be rescaled")
        self.sums.add(s.name)
        factor = self.scale_factor(d, s) if d else None
        if self.mode == "recurrence":
            run = self.running[s.name] = self.c.fresh_name("R" + s.name)
            prev = E.access(run, *idx, E.rank(o))
            combine = {"sum": lambda: (prev if factor is None else factor * prev) + here,
                       "max": lambda: E.maximum(prev, here), "min": lambda: E.minimum(prev, here)}[kind]()
            init = {"sum": E.const(0), "max": E.neg(E.INF), "min": E.INF}[kind]
            self.out.append(Einsum(run, s.ranks + (o,), combine, step=o, init=init))
            if s.output:
                self.out.append(Einsum(s.name, s.ranks, E.access(run, *idx, self.OX), s.dtype, True))
                self.running.pop(s.name)
                self.sums.discard(s.name)
        else:
            self.sums.discard(s.name)  # merged in place: later reads see the complete value
            merged = here if factor is None else factor * here
            self.out.append(Einsum(s.name, s.ranks, E.reduce(kind, o, merged), s.dtype, s.output))

    def is_anchor(self, s: Einsum) -> bool:
        """A max over ``o`` whose result some later statement reads as exp(x - max)."""
        for later in self.c.stmts:
            for n in later.expr.walk():
                if n.op is Op.FUNC and n.arg == "exp" and n.args[0].op is Op.SUB:
                    a = n.args[0].args[1]
                    if a.op is Op.ACCESS and a.arg == s.name:
                        return True
        return False

    def run(self) -> Cascade:
        self.c = hoist_reductions(self.c, self.o)
        for s in self.c.stmts:
            if isinstance(s, Operator):
                if self.o in s.ranks or self.o == s.over or self.o in free_ranks(s.expr):
                    raise self.fail(s, f"runs over {self.o!r}; operators cannot be localized")
                self.out.append(s.__class__(s.kind, s.names, s.ranks, s.over, self.outside(s.expr),
                                            s.dtypes, s.output))
            else:
                self.einsum(s)
        if not self.anchors and not self.sums and self.mode == "recurrence" and not self.running:
            raise RewriteError(f"online_softmax over {self.o!r}: no reduction runs over {self.o!r}")
        return self.c.with_stmts(self.out)


def hoist_reductions(c: Cascade, o: str) -> Cascade:
    """Give every reduction over ``o`` that is part of a larger expression an Einsum of its
    own (``C = gelu(sum[k](A * B) + BIAS)`` -> ``C_sum = sum[k](A * B)``, ``C = gelu(C_sum + BIAS)``),
    so that each reduction over ``o`` is a whole statement the localizer can rewrite."""
    stmts, taken = [], set(c.tensor_names())
    for s in c.stmts:
        if not isinstance(s, Einsum) or o in s.ranks or _top_reduce(s, o) is not None:
            stmts.append(s)
            continue
        hoisted = []

        def fn(n: Expr, s=s, hoisted=hoisted) -> Expr | None:
            if n.op is not Op.REDUCE or o not in n.reduce_ranks:
                return None
            free = free_ranks(n)
            ranks = tuple(r for r in s.ranks if r in free) + tuple(sorted(free - set(s.ranks)))
            name = f"{s.name}_{n.reduce_kind}"
            k = 2
            while name in taken:
                name, k = f"{s.name}_{n.reduce_kind}{k}", k + 1
            taken.add(name)
            hoisted.append(Einsum(name, ranks, n))
            return E.access(name, *(E.rank(r) for r in ranks))

        expr = s.expr.rewrite(fn)
        stmts += hoisted
        stmts.append(s if not hoisted else Einsum(s.name, s.ranks, expr, s.dtype, s.output, s.step, s.init))
    return c.with_stmts(stmts)


def online_softmax(c: Cascade, rank: str) -> Cascade:
    """Reductions over ``rank`` (the outer rank of a split, e.g. ``m1``) become
    recurrences over it: running max, rescale factor and rescaled running sums.
    Applied to the split 2-pass attention cascade this is FuseMax's 1-pass cascade."""
    return _Localizer(c, rank, "recurrence").run()


def merge_partials(c: Cascade, rank: str) -> Cascade:
    """Reductions over ``rank`` become per-``rank`` partials plus merge Einsums that
    reduce over ``rank`` with the rescale ``exp(local max - global max)``."""
    return _Localizer(c, rank, "merge").run()


def split_reduction(c: Cascade, rank: str, parts: int | str | None = None, *,
                    outer: str = "c", inner: str = "w") -> Cascade:
    """Spread the reductions over ``rank`` across independent workers: split ``rank``
    into ``(outer, inner)`` with the number of parts fixed (``parts``: an int or an
    extent symbol; default a free symbol ``C``), compute a partial per part, then merge.
    For attention this is split-KV (FlashDecoding)."""
    from kascade.passes.split_rank import split_rank
    return merge_partials(split_rank(c, rank, outer, inner, count=parts), outer)
