"""Expert grouping: the MoE block's expert part becomes grouped GEMMs over rows sorted by expert.

The library writes MoE two ways (``ir/library/moe.py``): *dense*, every expert on every
token and the result weighted by a routing tensor ``R[t, x]`` that is zero except at each
token's top-K experts; *gather*, the K chosen experts per token, their weights read as
``W13[TI[t, k], ...]``. Neither is how a GPU should run it: the dense form does ``E / K``
times the work, the gather form reads a whole expert matrix per (token, choice). The
expert-grouped form, which both become, runs each expert once over the rows routed to it:

    extent P = T * K
    EID[p]: i32 = TI[p // K, p % K]                      # pair p = (t, k) = (p // K, p % K)
    CNT[x]: i32 = sum[p](where(EID[p] == x, 1, 0))       # pairs per expert
    ROWEXP[q]: i32, PAIR[q]: i32 = sort[p](EID[p])       # stable: rows q in expert order
    GU[q, h, f] = sum[d](X[PAIR[q] // K, d] * W13[ROWEXP[q], h, f, d])
    ACT[q, f] = silu(GU[q, 0, f]) * GU[q, 1, f]
    EO[q, d] = sum[f](ACT[q, f] * W2[ROWEXP[q], d, f])
    PID[p]: i32, POS[p]: i32 = sort[q](PAIR[q])          # POS: the row of pair p
    output Y[t, d] = sum[k](TW[t, k] * EO[POS[t * K + k], d])

Rows are not padded here; padding every expert's run to a multiple of the kernel's block is
a schedule detail (``backends/moe_routing.py``).

How the rewrite stays correct, statement by statement:

* every *expert statement* (one whose output ranks include the token rank ``t`` and the
  expert rank ``e``: ``x`` dense, ``k`` gather) is re-indexed: ``S'[q, rest] = S[t(q), e(q), rest]``
  with ``t(q) = PAIR[q] // K`` and ``e(q) = ROWEXP[q]`` (dense) or ``PAIR[q] % K`` (gather).
  That is a substitution of ranks, so any body survives (another activation, a bias
  ``B[x, f]``); afterwards ``TI[t(q), k(q)]`` is ``ROWEXP[q]`` by construction, and reads of
  other expert tensors at their own ``(t, e)`` position become reads at ``q``;
* the *combine* ``sum[e](weight * f(EO[t, e, ..]))`` reads ``EO[t, e]`` as ``EO'[POS[t * K + k]]``;
  in the dense form the sum over ``x`` of the one-hot ``R[t, x] = sum[k](where(TI[t, k] == x,
  W[t, k], 0))`` times ``f(x)`` is ``sum[k](W[t, k] * f(TI[t, k]))``, since top-k indices of
  one token are distinct. Anything around the sum (a residual) is kept.

What does not fit (no top-k, no weighted sum of expert results, an expert tensor read at a
shifted position or by some other statement) raises :class:`RewriteError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kascade.ir import expr as E
from kascade.ir.cascade import Cascade, Einsum, ExtentDecl, Operator
from kascade.ir.dtypes import i32
from kascade.ir.errors import RewriteError
from kascade.ir.expr import Expr, Op, extent_of, free_ranks, substitute_ranks, tensors_read
from kascade.ir.extents import extent_symbols

_STEP = "group_experts"


def _fail(msg: str) -> RewriteError:
    return RewriteError(f"{_STEP}: {msg}")


@dataclass(frozen=True)
class _Match:
    """What the rewrite needs to know about the source cascade."""
    topk: Operator            # TV[t, k], TI[t, k] = topk[x](...)
    token: str                # t
    choice: str               # k
    expert: str               # x
    form: str                 # "dense" (combine sums over x) | "gather" (over k)
    combine: Einsum           # Y = (residual +) sum[e](weight * ...)
    reduce: Expr              # the sum inside the combine
    weight: Expr              # the weight factor as it appears in the reduce's body
    pair_weight: Expr         # the per-(t, k) weight: TW[t, k] (dense: taken out of R)
    onehot: str | None        # dense: the routing tensor R
    experts: tuple[Einsum, ...]  # expert statements, in order

    @property
    def grouped_rank(self) -> str:
        """The rank that the source's expert statements carry besides ``t``."""
        return self.expert if self.form == "dense" else self.choice


def group_experts(cascade: Cascade) -> Cascade:
    """The expert-grouped form of an MoE cascade (dense or gather, any router, any
    renormalisation, with or without a residual around the combine); see the module doc."""
    m = _match(cascade)
    return _rewrite(cascade, m)


def has_expert_part(cascade: Cascade) -> bool:
    """Does ``group_experts`` apply (a top-k routing and a weighted sum of expert results)?"""
    try:
        group_experts(cascade)
    except RewriteError:
        return False
    return True


# ---- matching -------------------------------------------------------------------------
def _match(c: Cascade) -> _Match:
    topks = [s for s in c.stmts if isinstance(s, Operator) and s.kind == "topk"]
    if len(topks) != 1:
        raise _fail(f"expected exactly one topk operator (the router's choice of experts), found {len(topks)}")
    topk = topks[0]
    choice = topk.new_rank
    if len(topk.ranks) != 2:
        raise _fail(f"{topk.label} has ranks {list(topk.ranks)}; accepted: a (token, choice) pair like [t, k]")
    token = next(r for r in topk.ranks if r != choice)
    found = []
    for s in c.stmts:
        if not isinstance(s, Einsum):
            continue
        for node in s.expr.walk():
            hit = _weighted_sum(c, topk, token, choice, node)
            if hit is not None:
                found.append((s, node, *hit))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(s.name for s, *_ in found)})"
        raise _fail(f"found {what} weighted sum of expert results: accepted is one statement with "
                    f"sum[{choice}](W[{token}, {choice}] * EO[{token}, {choice}, ..]) over the top-k weights, or "
                    f"sum[{topk.over}](R[{token}, {topk.over}] * EO[{token}, {topk.over}, ..]) with the routing tensor "
                    f"R = sum[{choice}](where(TI[{token}, {choice}] == {topk.over}, W[{token}, {choice}], 0))")
    combine, reduce, form, weight, pair_weight, onehot = found[0]
    if combine.step is not None:
        raise _fail(f"{combine.label} is a recurrence over {combine.step!r}; the combine must be a plain Einsum")
    m = _Match(topk, token, choice, topk.over, form, combine, reduce, weight, pair_weight, onehot, ())
    return replace(m, experts=_expert_statements(c, m))


def _weighted_sum(c: Cascade, topk: Operator, t: str, k: str, node: Expr):
    """If ``node`` is ``sum[e](weight * ...)`` with a routing weight, its (form, weight factor,
    per-pair weight, one-hot tensor); else None."""
    if node.op is not Op.REDUCE or node.reduce_kind != "sum" or len(node.reduce_ranks) != 1:
        return None
    e = node.reduce_ranks[0]
    if e not in (k, topk.over):
        return None
    factors = _factors(node.args[0])
    for f in factors:
        if not any(tensors_read(g) for g in factors if g is not f):
            continue  # a sum of the weights alone (the renormaliser) combines no expert result
        if f.op is not Op.ACCESS or sorted(_plain(f) or ()) != sorted((t, e)):
            continue
        if e == k and f.arg != topk.names[1] and _depends_on(c, f.arg, topk.names[0]):
            return "gather", f, f, None
        if e == topk.over:
            w = _onehot_weight(c, topk, t, k, f)
            if w is not None:
                return "dense", f, w, f.arg
    return None


def _onehot_weight(c: Cascade, topk: Operator, t: str, k: str, read: Expr) -> Expr | None:
    """For a read ``R[t, x]`` of ``R[t', x'] = sum[kk](where(TI[t', kk] == x', W, 0))``, ``W``
    in terms of the reader's ``t`` and the top-k's ``k``; else None."""
    s = c.producer(read.arg)
    if not isinstance(s, Einsum) or s.step is not None:
        return None
    e = s.expr
    if e.op is not Op.REDUCE or e.reduce_kind != "sum" or len(e.reduce_ranks) != 1:
        return None
    kk = e.reduce_ranks[0]
    body = e.args[0]
    if body.op is not Op.WHERE or body.args[2].op is not Op.CONST or body.args[2].arg != 0 \
            or body.args[0].op is not Op.EQ:
        return None
    # the reader's ranks for R's own ranks
    to_reader = {r: i.arg for r, i in zip(s.ranks, read.args)}
    x_src = next(r for r, i in zip(s.ranks, read.args) if i.arg == topk.over)
    t_src = next(r for r, i in zip(s.ranks, read.args) if i.arg == t)
    ti = E.access(topk.names[1], *(E.rank(t_src) if r == t else E.rank(kk) for r in topk.ranks))
    if set(body.args[0].args) != {ti, E.rank(x_src)} or body.args[0].args[0] == body.args[0].args[1]:
        return None
    w = body.args[1]
    if x_src in free_ranks(w):
        return None
    return substitute_ranks(w, {t_src: E.rank(to_reader[t_src]), kk: E.rank(k)})


def _expert_statements(c: Cascade, m: _Match) -> tuple[Einsum, ...]:
    """The statements the combine's expert factors come from, traced back through Einsums
    over ``(t, e)``; the routing (what the top-k or the weight depend on) is never one."""
    e = m.grouped_rank
    routing = _slice(c, tensors_read(m.topk.expr)) | set(m.topk.names) | _slice(c, tensors_read(m.weight))
    if m.onehot:
        routing.add(m.onehot)
    todo = [n for f in _factors(m.reduce.args[0]) if f is not m.weight for n in tensors_read(f)]
    chosen: set[str] = set()
    while todo:
        name = todo.pop()
        s = c.producer(name)
        if name in chosen or name in routing or not isinstance(s, Einsum) or not {m.token, e} <= set(s.ranks):
            continue
        if s.step is not None:
            raise _fail(f"{s.label} is a recurrence over {s.step!r}; expert statements must be plain Einsums")
        if s.output:
            raise _fail(f"{s.label} is an output of the expert part; only the combine may be an output")
        chosen.add(name)
        todo += tensors_read(s.expr)
    if not chosen:
        raise _fail(f"{m.combine.label} sums no expert results: no statement over ({m.token}, {e}) feeds it")
    experts = tuple(s for s in c.stmts if isinstance(s, Einsum) and s.name in chosen)
    for name in chosen:
        strangers = [s.label for s in c.users(name) if s not in experts and s is not m.combine]
        if strangers:
            raise _fail(f"expert tensor {name!r} is also read by {', '.join(strangers)}; after grouping it only "
                        "exists for the routed (token, expert) pairs")
    outside = m.combine.expr.rewrite(lambda n: E.const(0.0) if n == m.reduce else None)
    if tensors_read(outside) & chosen:
        raise _fail(f"{m.combine.label} reads expert results outside its weighted sum")
    if not any(_reads_expert_weights(c, m, s) for s in experts):
        raise _fail(f"no expert statement reads weights by expert (W[{m.expert}, ..] dense or "
                    f"W[{m.topk.names[1]}[{m.token}, {m.choice}], ..] gather)")
    return experts


def _reads_expert_weights(c: Cascade, m: _Match, s: Einsum) -> bool:
    ti = E.access(m.topk.names[1], *(E.rank(r) for r in m.topk.ranks))
    for n in s.expr.walk():
        if n.op is not Op.ACCESS or not n.args:
            continue
        if m.form == "gather" and ti in n.args:
            return True
        if m.form == "dense" and E.rank(m.expert) in n.args and m.token not in free_ranks(n):
            return True
    return False


def _slice(c: Cascade, names) -> set[str]:
    """``names`` and every tensor they are computed from."""
    out, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n in out:
            continue
        out.add(n)
        s = c.producer(n)
        if s is not None:
            todo += tensors_read(s.expr)
            if isinstance(s, Einsum) and s.init is not None:
                todo += tensors_read(s.init)
    return out


def _depends_on(c: Cascade, name: str, target: str) -> bool:
    return target in _slice(c, [name])


def _plain(e: Expr) -> tuple[str, ...] | None:
    """The rank names of an access whose indices are all plain, distinct ranks."""
    if not all(i.op is Op.RANK for i in e.args):
        return None
    names = tuple(i.arg for i in e.args)
    return names if len(set(names)) == len(names) else None


def _factors(e: Expr) -> list[Expr]:
    if e.op is Op.MUL:
        return [f for a in e.args for f in _factors(a)]
    return [e]


# ---- rewriting ------------------------------------------------------------------------
def _ranks_in_use(c: Cascade) -> set[str]:
    used = {r for t in (*c.inputs, *c.stmts) for r in t.ranks}
    for s in c.stmts:
        if isinstance(s, Operator):
            used.add(s.over)
        for x in (s.expr, getattr(s, "init", None)):
            if x is not None:
                used |= {n.arg for n in x.walk() if n.op is Op.RANK}
                used |= {r for n in x.walk() if n.op is Op.REDUCE for r in n.reduce_ranks}
    return used


def _fresh_rank(c: Cascade, base: str, taken: set[str]) -> str:
    """``base`` (or ``base2``, ...) unused as a rank, and its extent symbol unused too."""
    ranks, syms = _ranks_in_use(c) | taken, extent_symbols(c) | {p.name for p in c.params}
    cand, i = base, 2
    while cand in ranks or extent_of(cand) in syms or extent_of(cand) in {extent_of(r) for r in taken}:
        cand, i = f"{base}{i}", i + 1
    return cand


def _rewrite(c: Cascade, m: _Match) -> Cascade:
    t, k, x, e = m.token, m.choice, m.expert, m.grouped_rank
    p = _fresh_rank(c, "p", set())
    q = _fresh_rank(c, "q", {p})
    K = E.extent(c.rank_extent(k))
    names = {n: c.fresh_name(n) for n in ("EID", "CNT", "ROWEXP", "PAIR", "PID", "POS")}
    eid, cnt, rowexp, pair, pid, pos = (names[n] for n in ("EID", "CNT", "ROWEXP", "PAIR", "PID", "POS"))
    ti_name = m.topk.names[1]

    def ti_at(idx: dict[str, Expr]) -> Expr:
        return E.access(ti_name, *(idx[r] for r in m.topk.ranks))

    rp, rq = E.rank(p), E.rank(q)
    t_of_q, k_of_q = E.access(pair, rq) // K, E.access(pair, rq) % K
    e_of_q = E.access(rowexp, rq) if m.form == "dense" else k_of_q
    routing = [
        Einsum(eid, (p,), ti_at({t: rp // K, k: rp % K}), i32),
        Einsum(cnt, (x,), E.sum_(p, E.where(E.access(eid, rp).eq(E.rank(x)), 1, 0)), i32),
        Operator("sort", (rowexp, pair), (q,), p, E.access(eid, rp), (i32, i32)),
    ]
    grouped = {s.name: s.ranks for s in m.experts}

    def regroup(pair_index: Expr, at: dict[str, Expr]):
        """Reads of expert tensors at their own (t, e) position -> reads at ``pair_index``."""
        def fn(n: Expr) -> Expr | None:
            if n.op is not Op.ACCESS or n.arg not in grouped:
                return None
            ranks = grouped[n.arg]
            idx = dict(zip(ranks, n.args))
            if idx[t] != at[t] or idx[e] != at[e]:
                raise _fail(f"{n} reads expert tensor {n.arg!r} away from its own ({t}, {e}) position; "
                            "only elementwise reads of the expert part can be regrouped")
            return E.access(n.arg, pair_index, *(i for r, i in zip(ranks, n.args) if r not in (t, e)))
        return fn

    at_q = {t: t_of_q, e: e_of_q}
    chosen_ti = ti_at({t: t_of_q, k: k_of_q})
    experts = []
    for s in m.experts:
        body = substitute_ranks(s.expr, at_q)
        # the expert of row q is ROWEXP[q], by the sort's construction
        body = body.rewrite(lambda n: E.access(rowexp, rq) if n == chosen_ti else None)
        body = body.rewrite(regroup(rq, at_q))
        experts.append(Einsum(s.name, (q, *(r for r in s.ranks if r not in (t, e))), body, s.dtype))
    unpermute = Operator("sort", (pid, pos), (p,), q, E.access(pair, rq), (i32, i32))

    pos_tk = E.access(pos, E.rank(t) * K + E.rank(k))
    if m.form == "gather":
        new_body = m.reduce.args[0].rewrite(regroup(pos_tk, {t: E.rank(t), k: E.rank(k)}))
    else:
        if k in free_ranks(m.reduce) or any(n.op is Op.REDUCE and k in n.reduce_ranks
                                            for n in m.combine.expr.walk()):
            raise _fail(f"{m.combine.label} already uses rank {k!r}, the choice rank the combine must sum over")
        weight_reads = [n for n in m.reduce.args[0].walk() if n == m.weight]
        if len(weight_reads) != 1:
            raise _fail(f"{m.combine.label} reads the routing tensor {m.weight} more than once in its sum")
        body = m.reduce.args[0].rewrite(lambda n: m.pair_weight if n == m.weight else None)
        body = body.rewrite(regroup(pos_tk, {t: E.rank(t), x: E.rank(x)}))
        new_body = substitute_ranks(body, {x: ti_at({t: E.rank(t), k: E.rank(k)})})
    new_reduce = E.sum_(k, new_body)
    combine = Einsum(m.combine.name, m.combine.ranks, m.combine.expr.rewrite(
        lambda n: new_reduce if n == m.reduce else None), m.combine.dtype, m.combine.output)

    drop = {s.name for s in m.experts}
    if m.onehot and all(u is m.combine for u in c.users(m.onehot)):
        drop.add(m.onehot)
    stmts = []
    for s in c.stmts:
        if s is m.combine:
            stmts += [*routing, *experts, unpermute, combine]
        elif not (isinstance(s, Einsum) and s.name in drop):
            stmts.append(s)
    extent = ExtentDecl(extent_of(p), E.extent(c.rank_extent(t)) * K)
    return c.replace(extents=(*c.extents, extent), stmts=tuple(stmts))
