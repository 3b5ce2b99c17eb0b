"""Expert parallelism by all-to-all dispatch, for the expert-grouped MoE form.

:func:`partition_experts_all_to_all` shards the experts of a
:func:`~kascade.passes.moe_grouping.group_experts` cascade over an ``ep`` axis the way EP serving
does: each device routes its tokens, exchanges the row counts, sends each row to the device
that owns its expert (all-to-all with uneven splits), runs the grouped GEMMs on the rows it
received against its slice of the expert weights, and sends the results back for the weighted
combine. :func:`~kascade.passes.partition.partition` dispatches here for the grouped form.
"""

from __future__ import annotations

from dataclasses import dataclass

from kascade.ir import expr as E
from kascade.ir.cascade import Cascade, Einsum, ExtentDecl, Operator, Param, TensorDecl
from kascade.ir.dtypes import i32
from kascade.ir.errors import RewriteError
from kascade.ir.expr import Expr, Op, extent_of
from kascade.ir.printer import format_expr
from kascade.ir.validate import infer_dtypes, validate
from kascade.passes.partition import (
    Collective,
    PartitionedProgram,
    Shard,
    _as_output,
    _exprs,
    _fresh,
    _is_plain,
    _nbytes,
    _partition,
)


# ---- expert parallelism: all-to-all dispatch of the expert-grouped form ---------------------
@dataclass(frozen=True)
class _Grouped:
    """The statements of :func:`group_experts`'s form (see passes/moe_grouping.py)."""
    topk: Operator
    token: str              # t
    expert: str             # x
    eid: Einsum             # EID[p] = TI[p // K, p % K]
    counts: Einsum | None   # CNT[x] = sum[p](where(EID[p] == x, 1, 0))
    dispatch: Operator      # ROWEXP[q], PAIR[q] = sort[p](EID[p])
    experts: tuple[Einsum, ...]   # GU, ACT, EO over rows q
    unpermute: Operator     # PID[p], POS[p] = sort[q](PAIR[q])
    combine: Einsum         # Y[t, ..] = (residual +) sum[k](TW[t, k] * EO[POS[t * K + k], ..])

    @property
    def tail(self) -> tuple:
        return tuple(s for s in (self.eid, self.counts, self.dispatch, *self.experts, self.unpermute, self.combine)
                     if s is not None)

    @property
    def returned(self) -> str:
        """The expert tensor the combine reads (its rows go back to the tokens' devices)."""
        return next(n for n in E.tensors_read(self.combine.expr) if n in {s.name for s in self.experts})


def _match_grouped(c: Cascade) -> _Grouped | None:
    """The expert-grouped MoE statements of ``c``, or None when ``c`` is not in that form."""
    topks = [s for s in c.stmts if isinstance(s, Operator) and s.kind == "topk"]
    sorts = [s for s in c.stmts if isinstance(s, Operator) and s.kind == "sort"]
    if len(topks) != 1 or len(sorts) != 2:
        return None
    topk = topks[0]
    dispatch, unpermute = sorts
    eid = c.producer(dispatch.expr.arg) if dispatch.expr.op is Op.ACCESS else None
    if not isinstance(eid, Einsum) or topk.names[1] not in E.tensors_read(eid.expr):
        return None
    q = dispatch.new_rank
    if unpermute.over != q or unpermute.expr != E.access(dispatch.names[1], E.rank(q)):
        return None
    users = c.users(unpermute.names[1])
    if len(users) != 1 or not isinstance(users[0], Einsum):
        return None
    combine = users[0]
    experts = tuple(s for s in c.stmts if isinstance(s, Einsum) and q in s.ranks)
    counts = [s for s in c.users(eid.name) if s is not dispatch]
    if len(counts) > 1 or not experts:
        return None
    token = next(r for r in topk.ranks if r != topk.new_rank)
    return _Grouped(topk, token, topk.over, eid, counts[0] if counts else None, dispatch, experts, unpermute, combine)


def partition_experts_all_to_all(c: Cascade, shards: tuple[Shard, ...], m: _Grouped | None = None
                                 ) -> PartitionedProgram:
    """Expert parallelism as EP serving runs it, on the expert-grouped MoE form.

    The experts ``x`` are split over an axis (``ep``, ``D`` devices, ``X_EP = X / D`` each).
    The tokens are split over the same axis: with ``t`` in the mapping (DP attention) the
    statements before the MoE run on the token shard (:func:`partition`'s rank sharding);
    without, they run replicated and each device dispatches its ``T / D`` slice of them
    (sequence-parallel MoE). On each device, with ``ep_peer`` a device of the group:

        EID[p] = TI[tokens of this device]                       # P = T_EP * K local pairs
        CNT[ep_peer, x_ep] = rows for expert ep_peer * X_EP + x_ep
        <all_to_all(CNT -> CNT_RECV)>                            # counts first: equal blocks
        CNT_SEND[ep_peer] = sum[x_ep](CNT[..]); CNT_RECV.. -> ROWS_RECV[ep_peer]
        ROWEXP[q], PAIR[q] = sort[p](EID[p])                     # rows in expert order = device order
        <all_to_all(ROWEXP -> ROWEXP_RECV), rows CNT_SEND -> ROWS_RECV>
        XS[q, d] = X[PAIR[q] // K, d]                            # the token rows the experts read
        <all_to_all(XS -> XS_RECV), rows CNT_SEND -> ROWS_RECV>
        GU[u, ..] = .. XS_RECV[u, d] * W13[ROWEXP_RECV[u] - ep_rank * X_EP, ..]   # local experts,
        ...                                                       # on the U rows received
        <all_to_all(EO -> EO_BACK), rows ROWS_RECV -> CNT_SEND>   # results to the tokens' devices
        Y[t_ep, d] = (residual +) sum[k](TW * EO_BACK[POS[t_ep * K + k], d])
        <all_gather(Y) over t>

    ``U`` (rows received) is data-dependent; the runner binds it from the received tensor.
    Sizes: each row all-to-all moves ``T * K`` rows in all (``bytes`` = ``T * K * row bytes``;
    under uniform routing ``(D - 1) / D`` of them cross devices), the counts ``D * X`` i32.
    The degree must divide ``T`` (no padding of token shards). Other shards (``g`` over tp)
    apply to the statements before the MoE; sharding a rank of the expert statements themselves
    (the experts' inner ``f`` over tp) is not done here (RewriteError).
    """
    m = m or _match_grouped(c)
    if m is None:
        raise RewriteError("partition: no expert-grouped MoE form (EID, sort into ROWEXP/PAIR, expert statements "
                           "over rows, unpermuting sort, combine); accepted: group_experts' output")
    xs = next(s for s in shards if s.rank == m.expert)
    t, axis, degree = m.token, xs.axis, xs.degree
    ts = next((s for s in shards if s.rank == t), None)
    if ts is not None and (ts.axis, ts.degree) != (axis, degree):
        raise RewriteError(f"partition: with expert all-to-all the tokens {t!r} are split over the experts' axis "
                           f"({axis} x{degree}) or not at all; got {ts.axis} x{ts.degree}")
    tail = m.tail
    if c.stmts[-1] is not m.combine or any(c.stmts.index(s) < c.stmts.index(m.eid) for s in tail):
        raise RewriteError(f"partition: expert all-to-all needs the combine {m.combine.label} last and the routing "
                           "and expert statements just before it (group_experts' layout)")
    tail_ranks = {r for s in tail for r in s.ranks} | {r for s in tail for n in s.expr.walk()
                                                        if n.op is Op.REDUCE for r in n.reduce_ranks}
    others = tuple(s for s in shards if s.rank not in (t, m.expert))
    inner = [s.rank for s in others if s.rank in tail_ranks - {t}]
    if inner:
        raise RewriteError(f"partition: expert all-to-all does not shard ranks {inner} of the expert statements; "
                           "accepted with it: the experts' rank, the tokens over the same axis, and ranks of the "
                           "statements before the MoE (g over tp); or use ep_style='all_reduce' on the dense form")
    tshard = ts or Shard(t, axis, degree)
    tail_names = {n for s in tail for n in s.outputs}
    dtypes = infer_dtypes(c)

    # the statements before the MoE: rank-sharded by the other shards (and the tokens if mapped),
    # keeping what the MoE reads on its shard
    pre_stmts = [s for s in c.stmts if s not in tail]
    read_by_tail = {n for s in tail for e in _exprs(s) for n in E.tensors_read(e)} - tail_names
    pre_names = {n for s in pre_stmts for n in s.outputs}
    pre_read = {n for s in pre_stmts for e in _exprs(s) for n in E.tensors_read(e)}
    pre_inputs = tuple(x for x in c.inputs if x.name in pre_read)
    pre_shards = others + ((ts,) if ts else ())
    if pre_stmts and pre_shards:
        # what the MoE reads becomes an output of this part, left on its shard (every output of
        # a statement so marked: a top-k's values and indices go together)
        needed = read_by_tail & pre_names
        keep = frozenset(n for s in pre_stmts if set(s.outputs) & needed and not s.output for n in s.outputs)
        marked = [_as_output(s, dtypes) if set(s.outputs) & keep else s for s in pre_stmts]
        pre = _partition(Cascade(c.params, pre_inputs, c.extents, tuple(marked), name=c.name), pre_shards, keep)
        local_pre, collectives = pre.local, list(pre.collectives)
        input_shards = dict(pre.input_shards)
    else:
        local_pre = Cascade(c.params, pre_inputs, c.extents, tuple(pre_stmts), name=c.name)
        collectives, input_shards = [], {}

    dev, x_ep = E.param(xs.device_param), xs.local_rank
    XL, TL = E.extent(xs.local_extent), E.extent(tshard.local_extent)
    t_ep = tshard.local_rank
    off = dev * TL
    taken = set(c.tensor_names()) | {p.name for p in c.params}
    peer = _fresh_rank_name(c, f"{axis}_peer")
    u = _fresh_rank_name(c, "u", {peer})
    q, p = m.dispatch.new_rank, m.dispatch.over
    rowexp, pair = m.dispatch.names
    ranks_in: dict[str, tuple[str, ...]] = {x.name: x.ranks for x in local_pre.inputs}
    ranks_in |= {n: s.ranks for s in local_pre.stmts for n in s.outputs}

    # inputs only the MoE reads: expert weights (read at ROWEXP[q] on the expert dim) are sliced
    # over the experts; token inputs are sliced over the tokens when the tokens are mapped
    tail_inputs, received = [], []
    for x in c.inputs:
        if x.name in pre_read or x.name not in read_by_tail:
            continue
        ranks = x.ranks
        if m.expert in ranks and _read_only_at(c, x.name, m.expert, E.access(rowexp, E.rank(q)), m.experts):
            ranks = tuple(x_ep if r == m.expert else r for r in ranks)
            input_shards[x.name] = ((x.ranks.index(m.expert), xs),)
        elif ts and t in ranks:
            ranks = tuple(t_ep if r == t else r for r in ranks)
            input_shards[x.name] = ((x.ranks.index(t), ts),)
        tail_inputs.append(TensorDecl(x.name, ranks, x.dtype))
        ranks_in[x.name] = ranks

    def tok(name: str, ix: Expr) -> Expr:
        """The index of local token ``ix`` in ``name``'s token dim (on its shard or whole)."""
        return ix if t_ep in ranks_in.get(name, ()) else ix + off

    def localize(e: Expr, t_local: bool = False) -> Expr:
        """A tail expression on this device: pair / row tensors are local; token tensors are read
        at this device's tokens; a bare token rank is the global token index."""
        if e.op is Op.RANK and e.arg == t:
            return E.rank(t_ep) if t_local else E.rank(t_ep) + off
        if e.op is Op.ACCESS:
            if e.arg in tail_names:
                return E.access(e.arg, *(localize(a, True) for a in e.args))
            dims = c.ranks_of(e.arg)
            return E.access(e.arg, *(tok(e.arg, localize(a, True)) if r == t else localize(a, t_local)
                                     for r, a in zip(dims, e.args)))
        if e.op is Op.REDUCE:
            return Expr(Op.REDUCE, (localize(e.args[0], t_local),), e.arg)
        new = tuple(localize(a, t_local) for a in e.args)
        return e if all(a is b for a, b in zip(new, e.args)) else e.replace(args=new)

    pairs_total = c.extent_decl(extent_of(p)).value if c.extent_decl(extent_of(p)) else E.extent(extent_of(p))

    def a2a(tensor: str, into: str, ranks: tuple[str, ...], dtype, splits, recv_rank: str) -> str:
        """Exchange ``tensor``'s rows (its first rank); the rows received are input ``into``."""
        nbytes = E.const(dtype.itemsize) * pairs_total
        for r in ranks[1:]:
            nbytes = nbytes * E.extent(c.rank_extent(r))
        collectives.append(Collective("all_to_all", tensor, axis, degree, nbytes, into=into, splits=splits))
        received.append(TensorDecl(into, (recv_rank, *ranks[1:]), dtype))
        return into

    cnt = m.counts.name if m.counts else _fresh("CNT", taken)
    cnt_recv, send, recv = (_fresh(f"{cnt}_{n}", taken) for n in ("RECV", "SEND", "ROWS_RECV"))
    rp = E.rank(p)
    stmts = list(local_pre.stmts)
    stmts.append(Einsum(m.eid.name, m.eid.ranks, localize(m.eid.expr), m.eid.dtype or dtypes[m.eid.name]))
    stmts.append(Einsum(cnt, (peer, x_ep), E.sum_(p, E.where(E.access(m.eid.name, rp).eq(
        E.rank(peer) * XL + E.rank(x_ep)), 1, 0)), i32))
    collectives.append(Collective("all_to_all", cnt, axis, degree,
                                  E.const(4 * degree) * E.extent(c.rank_extent(m.expert)), into=cnt_recv))
    received.append(TensorDecl(cnt_recv, (peer, x_ep), i32))
    stmts.append(Einsum(send, (peer,), E.sum_(x_ep, E.access(cnt, E.rank(peer), E.rank(x_ep))), i32))
    stmts.append(Einsum(recv, (peer,), E.sum_(x_ep, E.access(cnt_recv, E.rank(peer), E.rank(x_ep))), i32))
    stmts.append(m.dispatch)
    rows, back = (send, recv), (recv, send)
    rowexp_recv = a2a(rowexp, _fresh(f"{rowexp}_RECV", taken), (q,), i32, rows, u)
    expert_names = {s.name for s in m.experts}
    if any(s.ranks[0] != q for s in m.experts):
        raise RewriteError(f"partition: expert all-to-all needs the row rank {q!r} first in every expert statement "
                           "(the rows are what moves)")

    # every read of a token tensor inside the expert statements becomes a payload row XS[q, ..]
    payload: dict[Expr, Expr] = {}

    def dispatch_reads(e: Expr) -> Expr | None:
        if e.op is not Op.ACCESS or e.arg in tail_names or t not in c.ranks_of(e.arg):
            return None
        if e not in payload:
            rest = tuple(r for r in sorted(E.free_ranks(e)) if r != q)
            if not all(any(_is_plain(ix, r) for ix in e.args) for r in rest):
                raise RewriteError(f"partition: expert all-to-all: {format_expr(e)} in the expert statements is not "
                                   f"a row of a token tensor; accepted: reads like X[{pair}[{q}] // K, d]")
            name = _fresh(f"XS_{e.arg}" if payload else "XS", taken)
            stmts.append(Einsum(name, (q, *rest), localize(e), dtypes[e.arg]))
            into = a2a(name, _fresh(f"{name}_RECV", taken), (q, *rest), dtypes[e.arg], rows, u)
            payload[e] = E.access(into, E.rank(u), *map(E.rank, rest))
        return payload[e]

    at_q = E.access(rowexp, E.rank(q))

    def on_received(e: Expr) -> Expr | None:
        """Rows q of this device -> rows u received: expert ids, sliced weights at the local expert."""
        if e.op is Op.RANK and e.arg == q:
            return E.rank(u)
        if e.op is not Op.ACCESS:
            return None
        if e == at_q:
            return E.access(rowexp_recv, E.rank(u))
        if e.arg in tail_names - expert_names and e.arg not in {x.name for x in received}:
            raise RewriteError(f"partition: expert all-to-all: the expert statements read {format_expr(e)}; "
                               f"accepted: {rowexp}[{q}], token rows through {pair}[{q}], weights, expert tensors")
        sliced = dict(input_shards.get(e.arg, ()))
        j = next((j for j, sh in sliced.items() if sh is xs), None)
        return E.access(e.arg, *(E.access(rowexp_recv, E.rank(u)) - dev * XL if i == j and a == at_q
                                 else _top_down(a, on_received) for i, a in enumerate(e.args)))

    for s in m.experts:
        body = _top_down(_top_down(s.expr, dispatch_reads), on_received)
        stmts.append(Einsum(s.name, (u, *s.ranks[1:]), body, s.dtype or dtypes[s.name]))
    ret = m.returned
    ret_back = a2a(ret, _fresh(f"{ret}_BACK", taken), (q, *c.ranks_of(ret)[1:]), dtypes[ret], back, q)
    stmts.append(m.unpermute)
    body = localize(m.combine.expr).rewrite(lambda n: E.access(ret_back, *n.args)
                                             if n.op is Op.ACCESS and n.arg == ret else None)
    ranks = tuple(t_ep if r == t else r for r in m.combine.ranks)
    stmts.append(Einsum(m.combine.name, ranks, body, m.combine.dtype or dtypes[m.combine.name], m.combine.output))
    if m.combine.output:
        collectives.append(Collective("all_gather", m.combine.name, axis, degree,
                                      _nbytes(c, m.combine.name, dtypes), rank=t))
    params = list(local_pre.params)
    if all(x.name != xs.device_param for x in params):
        params.append(Param(xs.device_param, i32))
    # extents: the pairs are this device's (P = T_EP * K); the peers are the group's devices
    P = extent_of(p)
    decls = [x for x in local_pre.extents if x.name != P]
    have = {x.name for x in decls}
    pval = pairs_total.rewrite(lambda n: TL if n.op is Op.EXTENT and n.arg == c.rank_extent(t) else None)
    decls.append(ExtentDecl(P, pval))
    decls.append(ExtentDecl(extent_of(peer), E.const(degree)))
    for s in (xs, tshard):
        if extent_of(s.rank) not in have:
            decls = [x for x in decls if x.name != extent_of(s.rank)]
            decls.append(ExtentDecl(extent_of(s.rank), E.extent(s.local_extent) * degree))
    inputs = (*local_pre.inputs, *tail_inputs, *received)
    local = Cascade(tuple(params), inputs, tuple(decls), tuple(stmts), name=f"{c.name}_partitioned")
    validate(local)
    all_shards = shards if ts else (*shards, tshard)
    order = [x.name for x in c.inputs if x.name in input_shards]
    return PartitionedProgram(c, tuple(all_shards), local, tuple(collectives),
                              tuple((n, tuple(sorted(input_shards[n]))) for n in order),
                              received=tuple(x.name for x in received))


def _rebase(ix: Expr, rowexp_recv: str, u: str, dev: Expr, XL: Expr) -> Expr:
    """The local expert of a received row: its global expert minus this device's first."""
    return E.access(rowexp_recv, E.rank(u)) - dev * XL if ix == E.access(rowexp_recv, E.rank(u)) else ix


def _top_down(e: Expr, fn) -> Expr:
    """Rewrite the outermost nodes ``fn`` replaces (children of a replaced node are not visited)."""
    out = fn(e)
    if out is not None:
        return out
    new = tuple(_top_down(a, fn) for a in e.args)
    return e if all(a is b for a, b in zip(new, e.args)) else e.replace(args=new)


def _read_only_at(c: Cascade, name: str, rank: str, index: Expr, stmts) -> bool:
    """Is input ``name`` read only by ``stmts``, always at ``index`` on its ``rank`` dim?"""
    j = c.ranks_of(name).index(rank)
    for s in c.stmts:
        for n in (n for e in _exprs(s) for n in e.walk() if n.op is Op.ACCESS and n.arg == name):
            if s not in stmts or n.args[j] != index:
                return False
    return True


def _fresh_rank_name(c: Cascade, base: str, taken: set[str] = frozenset()) -> str:
    used = {r for t in (*c.inputs, *c.stmts) for r in t.ranks} | set(taken)
    used |= {n.arg for s in c.stmts for e in _exprs(s) for n in e.walk() if n.op is Op.RANK}
    syms = {x.name for x in c.extents} | {extent_of(r) for r in used}
    name, i = base, 2
    while name in used or extent_of(name) in syms:
        name, i = f"{base}{i}", i + 1
    return name
