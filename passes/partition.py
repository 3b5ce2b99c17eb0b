"""Partitioning a cascade across devices: tiling one level above the thread blocks.

A device mapping shards ranks over mesh axes (``g`` and ``f`` over the tensor-parallel
group ``tp``, experts ``x`` over the expert-parallel group ``ep``, a batch or sequence
rank over data-parallel replicas ``dp``). As in :func:`~kascade.passes.split_rank.split_rank`
a sharded rank ``r`` of extent ``R`` over ``D`` devices becomes ``device x local``:
``r = dev * R_TP + r_tp`` with the local rank ``r_tp`` of extent ``R_TP = R / D``; the
per-device cascade is the local part, ``dev`` an int param (``tp_rank``).

Which statements run on the local part is decided per sharded rank by one backward
analysis. A statement that iterates ``r`` (an output rank or a reduction) runs locally
unless its result is needed whole along ``r``: read at an index other than plain ``r``
(``K[s]`` of a tensor over ``t``, rotate-half's ``(e + E/2) % E``), by an operator that
runs over ``r`` (a router's top-k over the experts), by a recurrence over ``r``, or by a
statement that does not run locally itself. Such producers are recomputed on every device
(replicated) instead of gathered: on the paths where this happens in a layer (router
logits, norms) recomputing costs a little arithmetic, a gather costs a collective on the
critical path. Inputs read only on the local part are sliced per device (weights); the
others are replicated.

Collectives follow from the rewrite:

- a reduction over a local rank is a partial reduction on each device followed by an
  ``all_reduce`` (its kind: sum, max, min) over that axis; a reduction that is not a whole
  statement is pulled out into its own tensor ``<name>_part`` first (``HA = X + sum[g](...)``
  becomes ``HA_part = sum[g_tp](...)``, all-reduce, ``HA = X + HA_part``);
- an output that stays sharded is ``all_gather``-ed so every device holds it whole.

So the dense decoder layer under ``{g: tp, f: tp}`` is Megatron's pattern (one all-reduce
after the attention output projection, one after the FFN down projection), and the MoE layer
under ``{x: ep}`` runs each device's experts on the tokens routed to them and sums the
expert outputs with one all-reduce (the dense-combine form of expert parallelism); the
expert-grouped MoE (:func:`~kascade.passes.moe_grouping.group_experts`) under ``{x: ep}``
dispatches its rows to the experts' devices and back with all-to-alls instead
(:func:`partition_experts_all_to_all`). Pipeline stages split the statements instead (:func:`pipeline_stages`),
and :func:`kv_transfer` lists the cache a prefill instance hands to a decode instance.

Collective sizes (``bytes``) are expressions of the source cascade's (global) extents: the
size of the whole tensor communicated, the message size a latency-bandwidth model takes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kascade.ir import expr as E
from kascade.ir.cascade import Cascade, Einsum, ExtentDecl, Operator, Param, TensorDecl
from kascade.ir.dtypes import i32
from kascade.ir.errors import RewriteError, ShapeError
from kascade.ir.expr import Expr, Op, extent_of, free_ranks
from kascade.ir.extents import eval_int
from kascade.ir.printer import format_cascade, format_expr, format_statement
from kascade.ir.validate import infer_dtypes, validate
from kascade.passes.moe_grouping import group_experts

AXES = ("tp", "ep", "dp")   # axes that shard a rank; "pp" splits statements (pipeline_stages)
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p", "kv_transfer")


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` split over ``degree`` devices of mesh axis ``axis``."""
    rank: str
    axis: str
    degree: int

    @property
    def local_rank(self) -> str:
        return f"{self.rank}_{self.axis}"

    @property
    def local_extent(self) -> str:
        return extent_of(self.local_rank)

    @property
    def device_param(self) -> str:
        return f"{self.axis}_rank"


@dataclass(frozen=True)
class Collective:
    """One communication the partitioned program performs.

    ``tensor`` is replaced in place right after the statement that defines it (p2p and
    kv_transfer: sent from stage / instance ``src`` to ``dst``). ``op`` is the reduction of
    an all_reduce / reduce_scatter; ``rank`` the (global) rank an all_gather concatenates
    along. ``bytes`` is the size of the whole tensor, over the source's extents.

    An ``all_to_all`` sends blocks of ``tensor``'s first dim to the devices of the group and
    defines ``into`` (a per-device input of the program) from the blocks it receives, in
    device order. With ``splits = (send, recv)`` the block sizes are data-dependent: ``send``
    and ``recv`` are i32 tensors over the group's devices holding the rows sent to and received
    from each device (known on both sides before the rows move: the counts are exchanged
    first); without, every block has ``1 / group`` of the dim. Its ``bytes`` is the size of
    the whole exchanged tensor over all devices (every row leaves its device once at most).
    """
    kind: str
    tensor: str
    axis: str
    group: int
    bytes: Expr
    op: str | None = None
    rank: str | None = None
    src: int | None = None
    dst: int | None = None
    into: str | None = None
    splits: tuple[str, str] | None = None

    def bytes_at(self, extents: Mapping[str, int]) -> int:
        """``bytes`` for concrete global extents (``extents`` binds every symbol in it)."""
        missing = sorted(E.extents_used(self.bytes) - set(extents))
        if missing:
            raise ShapeError(f"{self}: extents {missing} are not bound; pass them in extents")
        return eval_int(self.bytes, extents)

    def __str__(self) -> str:
        what = self.kind + (f"[{self.op}]" if self.op else "") + (f"[{self.rank}]" if self.rank else "")
        where = f"{self.axis} x{self.group}" if self.src is None else f"{self.axis} {self.src} -> {self.dst}"
        moved = self.tensor if self.into is None else f"{self.tensor} -> {self.into}"
        rows = "" if self.splits is None else f", rows {self.splits[0]} -> {self.splits[1]}"
        return f"{what}({moved}) over {where}{rows}, bytes = {format_expr(self.bytes)}"


@dataclass(frozen=True)
class PartitionedProgram:
    """The per-device cascade ``local`` and the collectives it performs.

    ``input_shards`` says, per sliced input, which dims are split and how: device ``c`` of
    axis ``s.axis`` holds ``[c * n, (c + 1) * n)`` of that dim, ``n = extent / s.degree``.
    ``received`` names the inputs of ``local`` that the program's all-to-alls define.
    """
    source: Cascade
    shards: tuple[Shard, ...]
    local: Cascade
    collectives: tuple[Collective, ...]
    input_shards: tuple[tuple[str, tuple[tuple[int, Shard], ...]], ...]
    received: tuple[str, ...] = ()   # inputs of ``local`` an all_to_all defines (not the caller's)

    @property
    def axes(self) -> tuple[tuple[str, int], ...]:
        """The mesh: each axis once with its degree, in the mapping's order."""
        return tuple(dict.fromkeys((s.axis, s.degree) for s in self.shards))

    @property
    def world_size(self) -> int:
        return math.prod(d for _, d in self.axes)

    def coords(self, device: int) -> dict[str, int]:
        """Device ``device``'s coordinate on each axis (the last axis varies fastest)."""
        out = {}
        for axis, degree in reversed(self.axes):
            device, out[axis] = divmod(device, degree)
        return dict(reversed(out.items()))

    def device_params(self, device: int) -> dict[str, int]:
        """The params the per-device cascade adds (``tp_rank`` ...) bound for ``device``."""
        declared = {p.name for p in self.local.params}
        return {f"{a}_rank": c for a, c in self.coords(device).items() if f"{a}_rank" in declared}

    def local_extents(self, extents: Mapping[str, int]) -> dict[str, int]:
        """The local extents (``G_TP = G / D``) for global ``extents``; ShapeError when a
        degree does not divide its extent."""
        out = {}
        for s in self.shards:
            full = extents[self.source.rank_extent(s.rank)]
            _check_divides(s, full)
            out[s.local_extent] = full // s.degree
        return out

    def collectives_after(self, tensor: str) -> tuple[Collective, ...]:
        return tuple(c for c in self.collectives if c.tensor == tensor)


# the library's rank names for "tp=2" / "ep=2" / "dp=2": query-head groups and the FFN inner
# rank, experts, batch (else tokens)
DEFAULT_RANKS = {"tp": ("g", "f"), "ep": ("x",), "dp": ("b", "t")}


def parse_mapping(spec: str | Mapping[str, tuple[str, int]] | Iterable[Shard],
                  cascade: Cascade | None = None) -> tuple[Shard, ...]:
    """A device mapping from ``{"g": ("tp", 2)}``, Shards, or text ``"g=tp:2,f=tp:2"``; with
    ``cascade``, text may also say ``"tp=2"`` for the library's ranks of that axis
    (:data:`DEFAULT_RANKS`: ``g`` and ``f`` for tp, ``x`` for ep, ``b`` or else ``t`` for dp)."""
    if isinstance(spec, str):
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            rank, _, rest = (x.strip() for x in part.partition("="))
            if cascade is not None and rank in DEFAULT_RANKS and rest.isdigit():
                have = {r for t in cascade.inputs for r in t.ranks} | {r for s in cascade.stmts for r in s.ranks}
                found = [r for r in DEFAULT_RANKS[rank] if r in have]
                if not found:
                    raise RewriteError(f"partition: {part!r}: the cascade has none of {list(DEFAULT_RANKS[rank])}; "
                                       "write RANK=AXIS:DEGREE")
                items += [Shard(r, rank, int(rest)) for r in (found[:1] if rank == "dp" else found)]
                continue
            axis, _, degree = rest.partition(":")
            if not rank or not axis or not degree.strip().isdigit():
                raise RewriteError(f"partition: cannot read {part!r}; write RANK=AXIS:DEGREE, e.g. 'g=tp:2,f=tp:2'"
                                   + (" or AXIS=DEGREE, e.g. 'tp=2'" if cascade is not None else ""))
            items.append(Shard(rank, axis.strip(), int(degree)))
        return tuple(items)
    if isinstance(spec, Mapping):
        return tuple(Shard(r, *v) for r, v in spec.items())
    return tuple(spec)


def _check_divides(s: Shard, full: int) -> None:
    if full % s.degree:
        ok = [d for d in range(1, full + 1) if full % d == 0]
        raise ShapeError(f"partition: {s.axis} degree {s.degree} does not divide the extent of rank {s.rank!r} "
                         f"({full}); accepted degrees: {ok}")


# ---- analysis -------------------------------------------------------------------------
def _exprs(s) -> list[Expr]:
    return [s.expr] + ([s.init] if isinstance(s, Einsum) and s.init is not None else [])


def _iterates(s, r: str) -> bool:
    if r in s.ranks or (isinstance(s, Operator) and s.over == r):
        return True
    return any(n.op is Op.REDUCE and r in n.reduce_ranks for e in _exprs(s) for n in e.walk())


def _is_plain(ix: Expr, r: str) -> bool:
    return ix.op is Op.RANK and ix.arg == r


def _analyse(c: Cascade, r: str, keep: frozenset[str] = frozenset()) -> tuple[set[int], set[str], list[str]]:
    """Statements (by index) that run on the local part of ``r``; tensors needed whole
    along ``r``; and why each blocked statement could not run locally. Outputs in ``keep``
    are consumed on their shard by a later part of the program, so they may stay sharded."""
    why: list[str] = []
    local = set()
    for i, s in enumerate(c.stmts):
        if not _iterates(s, r):
            continue
        if isinstance(s, Operator) and s.over == r:
            why.append(f"{s.label} runs over {r!r}")
        elif isinstance(s, Einsum) and s.step == r:
            why.append(f"{s.label} is a recurrence over {r!r}")
        else:
            local.add(i)
    full: set[str] = set()
    read_later = {n for s in c.stmts for e in _exprs(s) for n in E.tensors_read(e)}
    # outputs read later stay whole (they are gathered), unless a later part reads them on their shard
    full |= {n for n in c.outputs if n in read_later and r in c.ranks_of(n) and n not in keep}
    changed = True
    while changed:
        changed = False
        for i, s in enumerate(c.stmts):
            for node in (n for e in _exprs(s) for n in e.walk() if n.op is Op.ACCESS):
                dims = c.ranks_of(node.arg)
                if r not in dims or node.arg in full:
                    continue
                bad = [ix for dim, ix in zip(dims, node.args) if dim == r and not _is_plain(ix, r)]
                if i not in local or bad:
                    full.add(node.arg)
                    changed = True
                    why.append(f"{node.arg!r} is read whole along {r!r} by {s.label}"
                               + (f" (index {format_expr(bad[0])})" if bad else ""))
        sharded = {t.name for t in c.inputs if r in t.ranks and t.name not in full}
        sharded |= {n for i in local for n in c.stmts[i].outputs if r in c.ranks_of(n)}
        for i in sorted(local):
            s = c.stmts[i]
            reads_shard = any(n.arg in sharded for e in _exprs(s) for n in e.walk() if n.op is Op.ACCESS)
            # whole along r, or a reduction over r of whole tensors: a partial sum and an
            # all-reduce would only recompute what every device can compute alone
            if any(n in full and r in s.ranks for n in s.outputs) or (r not in s.ranks and not reads_shard):
                local.discard(i)
                changed = True
    return local, full, why


def _validate_mapping(c: Cascade, shards: tuple[Shard, ...], extents: Mapping[str, int] | None) -> None:
    ranks = sorted({r for t in c.inputs for r in t.ranks} | {r for s in c.stmts for r in s.ranks}
                   | {r for s in c.stmts for e in _exprs(s) for n in e.walk() if n.op is Op.REDUCE
                      for r in n.reduce_ranks})
    seen: dict[str, int] = {}
    for s in shards:
        if not isinstance(s, Shard):
            raise RewriteError(f"partition: a mapping entry is a Shard(rank, axis, degree), got {s!r}")
        if s.axis == "pp":
            raise RewriteError("partition: pipeline parallelism splits statements, not a rank; "
                               "use pipeline_stages(cascade, stages)")
        if s.axis not in AXES:
            raise RewriteError(f"partition: unknown mesh axis {s.axis!r} for rank {s.rank!r}; accepted: "
                               f"{', '.join(AXES)}")
        if s.rank not in ranks:
            raise RewriteError(f"partition: the cascade has no rank {s.rank!r}; its ranks are {ranks}")
        if isinstance(s.degree, bool) or not isinstance(s.degree, int) or s.degree < 1:
            raise RewriteError(f"partition: the degree of {s.rank!r} is a positive int, got {s.degree!r}")
        if seen.setdefault(s.axis, s.degree) != s.degree:
            raise RewriteError(f"partition: axis {s.axis!r} has one degree; got {seen[s.axis]} and {s.degree}")
        decl = c.extent_decl(extent_of(s.rank))
        if decl is not None and decl.value is not None:
            raise RewriteError(f"partition: the extent of rank {s.rank!r} is declared "
                               f"({decl.name} = {format_expr(decl.value)}); shard the rank it derives from")
        if extents is not None and c.rank_extent(s.rank) in extents:
            _check_divides(s, extents[c.rank_extent(s.rank)])
    if len({s.rank for s in shards}) != len(shards):
        raise RewriteError("partition: a rank is mapped twice; map each rank to one axis")


# ---- the rewrite ----------------------------------------------------------------------
def partition(c: Cascade, mapping, *, extents: Mapping[str, int] | None = None,
              ep_style: str | None = None) -> PartitionedProgram:
    """Shard ``c`` by ``mapping`` (see :func:`parse_mapping`); returns the per-device program.

    ``extents`` (global, optional) lets the pass check that each degree divides its rank's
    extent now rather than when the program runs. Raises :class:`RewriteError` for an
    unknown rank or axis, two ranks on one axis that meet in one statement (that would keep
    only the diagonal blocks), or a rank with no statement that can run on its local part;
    :class:`ShapeError` when a degree does not divide an extent.

    Expert parallelism (the experts' rank sharded), by ``ep_style``:

    - ``"all_to_all"`` (the default for the expert-grouped form, :func:`group_experts`'s
      output; a dense or gather MoE is grouped first): what EP serving does. Each device routes
      its share of the tokens, dispatches every (token, choice) row to the device owning its
      expert with an all-to-all (counts first, then rows), runs its experts' grouped GEMMs on
      the rows it received, and a second all-to-all returns the results for the weighted
      combine on the token's device; see :func:`partition_experts_all_to_all`.
    - ``"all_reduce"`` (the default for the dense form): every device runs its experts on all
      tokens (``R[t, x] * EO[t, x, d]`` is zero off the routed pairs) and one all-reduce sums the
      contributions. The same function, no dispatch; what an engine does with replicated tokens.
    """
    from kascade.passes.partition_experts import (  # it builds on this module
        _match_grouped,
        partition_experts_all_to_all,
    )
    validate(c)
    shards = parse_mapping(mapping, c)
    if not shards:
        raise RewriteError("partition: the mapping is empty; give at least one RANK=AXIS:DEGREE")
    _validate_mapping(c, shards, extents)
    if ep_style not in (None, "all_to_all", "all_reduce"):
        raise RewriteError(f"partition: ep_style={ep_style!r}; accepted: 'all_to_all', 'all_reduce' or None "
                           "(all_to_all for the expert-grouped MoE form, all_reduce otherwise)")
    grouped = _match_grouped(c)
    if ep_style == "all_to_all" and grouped is None:
        c = group_experts(c)          # raises a RewriteError saying why when c has no expert part
        grouped = _match_grouped(c)
    if grouped is not None and any(s.rank == grouped.expert for s in shards):
        if ep_style == "all_reduce":
            raise RewriteError("partition: ep_style='all_reduce' needs the dense MoE form (every expert's result "
                               "for every token); the expert-grouped form computes only routed rows; partition "
                               "the dense form, or use ep_style='all_to_all'")
        return partition_experts_all_to_all(c, shards, grouped)
    return _partition(c, shards)


def _partition(c: Cascade, shards: tuple[Shard, ...], keep: frozenset[str] = frozenset()) -> PartitionedProgram:
    """The rank-sharding rewrite (mapping validated). Outputs in ``keep`` are left on their
    shard (no all-gather): a later part of the program reads them there."""
    local_on: dict[int, list[Shard]] = {}
    sharded_dims: dict[str, dict[int, Shard]] = {}
    for sh in shards:
        local, full, why = _analyse(c, sh.rank, keep)
        if not local:
            raise RewriteError(f"partition: rank {sh.rank!r} cannot be sharded: no statement can run on a part of "
                               f"it ({'; '.join(why) or 'no statement iterates it'}); accepted: ranks that some "
                               "statement iterates and whose results are read at that rank")
        for i in local:
            local_on.setdefault(i, []).append(sh)
            for n in c.stmts[i].outputs:
                if sh.rank in c.ranks_of(n):
                    sharded_dims.setdefault(n, {})[c.ranks_of(n).index(sh.rank)] = sh
        for t in c.inputs:
            if sh.rank in t.ranks and t.name not in full:
                sharded_dims.setdefault(t.name, {})[t.ranks.index(sh.rank)] = sh
    for i, shs in local_on.items():
        axes = [s.axis for s in shs]
        if len(set(axes)) != len(axes):
            ranks = [s.rank for s in shs]
            raise RewriteError(f"partition: {c.stmts[i].label} runs over ranks {ranks} that are sharded over the "
                               "same axis; a device would hold only the diagonal blocks; shard them over "
                               "different axes")

    taken = set(c.tensor_names()) | {p.name for p in c.params}
    stmts: list = []
    pending: list[tuple[str, str, tuple[Shard, ...], str | None]] = []   # (tensor, kind, shards, op)
    for i, s in enumerate(c.stmts):
        shs = {sh.rank: sh for sh in local_on.get(i, [])}
        rw = _Rewriter(c, shs, sharded_dims)
        ranks = tuple(shs[r].local_rank if r in shs else r for r in s.ranks)
        if isinstance(s, Operator):
            stmts.append(Operator(s.kind, s.names, ranks, s.over, rw(s.expr), s.dtypes, s.output))
        else:
            body, init = rw(s.expr), None if s.init is None else rw(s.init)
            by_local = {sh.local_rank: sh for sh in shs.values()}
            whole = body.op is Op.REDUCE and set(body.reduce_ranks) & set(by_local) \
                and tuple(sorted(free_ranks(body))) == tuple(sorted(ranks))
            if whole:   # the statement is itself the partial reduction: all-reduce it in place
                red = [by_local[r] for r in body.reduce_ranks if r in by_local]
                pending.append((s.name, "all_reduce", tuple(red), body.reduce_kind))
            else:
                def pull_out(node: Expr, s=s, ranks=ranks, by_local=by_local) -> Expr | None:
                    if node.op is not Op.REDUCE or not set(node.reduce_ranks) & set(by_local):
                        return None
                    fr = free_ranks(node)
                    order = tuple(r for r in ranks if r in fr) + tuple(sorted(fr - set(ranks)))
                    name = _fresh(f"{s.name}_part", taken)
                    stmts.append(Einsum(name, order, node))
                    red = [by_local[r] for r in node.reduce_ranks if r in by_local]
                    pending.append((name, "all_reduce", tuple(red), node.reduce_kind))
                    return E.access(name, *map(E.rank, order))
                body = body.rewrite(pull_out)
            stmts.append(Einsum(s.name, ranks, body, s.dtype, s.output, s.step, init))
        if s.output:
            for n in (n for n in s.outputs if n not in keep):
                gathered = tuple(sharded_dims.get(n, {}).values())
                if gathered:
                    pending.append((n, "all_gather", gathered, None))

    params = list(c.params)
    body_params = {p for st in stmts for e in _exprs(st) for p in E.params_used(e)}
    for sh in shards:
        if sh.device_param in body_params and all(p.name != sh.device_param for p in params):
            params.append(Param(sh.device_param, i32))
    inputs = tuple(TensorDecl(t.name, tuple(sharded_dims.get(t.name, {}).get(j, None).local_rank
                                            if j in sharded_dims.get(t.name, {}) else r
                                            for j, r in enumerate(t.ranks)), t.dtype) for t in c.inputs)
    decls = [x for x in c.extents if x.name not in {extent_of(s.rank) for s in shards}]
    # the global extent stays named R (index expressions use it); the local one R_TP is bound
    # from the sliced shapes, and R follows from it where no replicated input binds it
    decls += [ExtentDecl(extent_of(s.rank), E.extent(s.local_extent) * s.degree) for s in shards]
    local = Cascade(tuple(params), inputs, tuple(decls), tuple(stmts), name=f"{c.name}_partitioned")
    validate(local)

    dtypes = infer_dtypes(local)
    glob = {s.local_rank: s.rank for s in shards}
    collectives = []
    for name, kind, shs, op in pending:
        ranks = local.ranks_of(name)
        nbytes = E.const(dtypes[name].itemsize)
        for r in ranks:
            nbytes = nbytes * E.extent(c.rank_extent(glob.get(r, r)))
        for sh in dict.fromkeys(shs):
            collectives.append(Collective(kind, name, sh.axis, sh.degree, nbytes, op=op,
                                          rank=sh.rank if kind == "all_gather" else None))
    input_shards = tuple((t.name, tuple(sorted(sharded_dims[t.name].items())))
                         for t in c.inputs if sharded_dims.get(t.name))
    return PartitionedProgram(c, shards, local, tuple(collectives), input_shards)


def _fresh(base: str, taken: set[str]) -> str:
    name, i = base, 2
    while name in taken:
        name, i = f"{base}{i}", i + 1
    taken.add(name)
    return name


class _Rewriter:
    """Rewrites one statement's expressions for its local ranks ``shs``: plain reads of a
    sharded dim use the local rank; every other use of a local rank is its global index
    ``r_tp + tp_rank * R_TP``; reductions over a local rank reduce over its local part."""

    def __init__(self, c: Cascade, shs: dict[str, Shard], sharded_dims: dict[str, dict[int, Shard]]):
        self.c, self.shs, self.sharded_dims = c, shs, sharded_dims

    def __call__(self, e: Expr) -> Expr:
        if not self.shs:
            return e
        if e.op is Op.RANK and e.arg in self.shs:
            sh = self.shs[e.arg]
            return E.rank(sh.local_rank) + E.param(sh.device_param) * E.extent(sh.local_extent)
        if e.op is Op.ACCESS:
            dims = self.sharded_dims.get(e.arg, {})
            idx = []
            for j, ix in enumerate(e.args):
                if j in dims:
                    if dims[j].rank not in self.shs or not _is_plain(ix, dims[j].rank):  # the analysis rules it out
                        raise RewriteError(f"partition: internal: {e.arg!r} read off its shard at {format_expr(ix)}")
                    idx.append(E.rank(dims[j].local_rank))
                else:
                    idx.append(self(ix))
            return E.access(e.arg, *idx)
        if e.op is Op.REDUCE:
            kind, names = e.arg
            names = tuple(self.shs[r].local_rank if r in self.shs else r for r in names)
            return Expr(Op.REDUCE, (self(e.args[0]),), (kind, names))
        new_args = tuple(self(a) for a in e.args)
        return e if all(x is y for x, y in zip(new_args, e.args)) else e.replace(args=new_args)


# ---- pipeline stages and KV transfer -----------------------------------------------------
@dataclass(frozen=True)
class PipelineProgram:
    """``stages[i]`` runs on stage ``i``; ``transfers`` are the p2p sends between neighbours
    (a tensor needed two stages later is forwarded through the stage in between)."""
    source: Cascade
    stages: tuple[Cascade, ...]
    transfers: tuple[Collective, ...]


def pipeline_stages(c: Cascade, stages: int | Sequence[int], *, axis: str = "pp") -> PipelineProgram:
    """Split ``c``'s statements into contiguous stages (layers over pipeline stages).

    ``stages``: a count (statements split as evenly as possible) or the statement index at
    which each stage after the first begins. Each stage is a sub-cascade whose inputs are
    the source inputs it reads plus the tensors earlier stages produced; it outputs what
    later stages (or the caller) need.
    """
    validate(c)
    count = len(c.stmts)
    if isinstance(stages, int):
        if isinstance(stages, bool) or stages < 1 or stages > count:
            raise RewriteError(f"pipeline_stages: {stages!r} stages for {count} statements; accepted: 1 .. {count}")
        cuts = [round(count * i / stages) for i in range(1, stages)]
    else:
        cuts = list(stages)
        if cuts != sorted(set(cuts)) or not all(0 < x < count for x in cuts):
            raise RewriteError(f"pipeline_stages: cut points {cuts} must increase strictly within 1 .. {count - 1}")
    bounds = [0, *cuts, count]
    dtypes = infer_dtypes(c)
    reads = [set().union(*(E.tensors_read(e) for e in _exprs(s))) for s in c.stmts]
    produced_in = {name: k for k in range(len(bounds) - 1) for s in c.stmts[bounds[k]:bounds[k + 1]]
                   for name in s.outputs}
    out_stage = len(bounds) - 2
    parts, transfers = [], []
    for k in range(len(bounds) - 1):
        own = c.stmts[bounds[k]:bounds[k + 1]]
        read_here = set().union(*reads[bounds[k]:bounds[k + 1]])
        needed_later = {t for j in range(bounds[k + 1], count) for t in reads[j]} | set(c.outputs)
        # a tensor from an earlier stage that this stage or a later one reads passes through here
        carried = sorted(t for t, p in produced_in.items() if p < k and (t in read_here or t in needed_later))
        inputs = [t for t in c.inputs if t.name in read_here]
        inputs += [TensorDecl(t, c.ranks_of(t), dtypes[t]) for t in carried]
        keep = {name for s in own for name in s.outputs if name in needed_later} | set(carried)
        stmts = [_as_output(s, dtypes) if set(s.outputs) & keep and not s.output else s for s in own]
        if k < out_stage:
            transfers += [Collective("p2p", t, axis, len(bounds) - 1, _nbytes(c, t, dtypes), src=k, dst=k + 1)
                          for t in sorted(keep)]
        parts.append(Cascade(c.params, tuple(inputs), c.extents, tuple(stmts), name=f"{c.name}_stage{k}"))
    return PipelineProgram(c, tuple(parts), tuple(transfers))


def _as_output(s, dtypes):
    if isinstance(s, Einsum):
        return Einsum(s.name, s.ranks, s.expr, s.dtype or dtypes[s.name], True, s.step, s.init)
    return Operator(s.kind, s.names, s.ranks, s.over, s.expr, s.dtypes, True)


def _nbytes(c: Cascade, tensor: str, dtypes) -> Expr:
    out = E.const(dtypes[tensor].itemsize)
    for r in c.ranks_of(tensor):
        out = out * E.extent(c.rank_extent(r))
    return out


def kv_transfer(c: Cascade, tensors: Sequence[str] = ("KR", "VP"), *, src: int = 0,
                dst: int = 1) -> tuple[Collective, ...]:
    """The KV cache a prefill instance sends to a decode instance (disaggregated serving):
    one ``kv_transfer`` per cache tensor (the decoder layer's rotated keys ``KR`` and values
    ``VP`` by default), sized from ``c``'s extents."""
    dtypes = infer_dtypes(c)
    names = set(c.tensor_names())
    for t in tensors:
        if t not in names:
            raise RewriteError(f"kv_transfer: the cascade has no tensor {t!r}; its tensors are {sorted(names)}")
    return tuple(Collective("kv_transfer", t, "pd", 2, _nbytes(c, t, dtypes), src=src, dst=dst) for t in tensors)


# ---- printing ---------------------------------------------------------------------------
def format_partitioned(p: PartitionedProgram) -> str:
    """The per-device program: the mesh, sliced inputs, then statements with each collective
    on its own line after the statement whose tensor it communicates."""
    mesh = " x ".join(f"{a}={d}" for a, d in p.axes)
    lines = [f"# partitioned {p.source.name} over {mesh} ({p.world_size} devices)"]
    for s in p.shards:
        lines.append(f"#   rank {s.rank} -> {s.axis} x{s.degree}: local rank {s.local_rank}, "
                     f"{s.local_extent} = {extent_of(s.rank)} / {s.degree}, global index "
                     f"{s.local_rank} + {s.device_param} * {s.local_extent}")
    for name, dims in p.input_shards:
        lines.append(f"#   input {name} sliced on " + ", ".join(f"dim {j} ({s.rank} over {s.axis})" for j, s in dims))
    head = format_cascade(p.local.replace(stmts=())).rstrip("\n")
    lines += [head, ""]
    for s in p.local.stmts:
        lines.append(format_statement(s))
        lines += [f"  <{c}>" for n in s.outputs for c in p.collectives_after(n)]
    return "\n".join(lines) + "\n"


def format_pipeline(p: PipelineProgram) -> str:
    lines = [f"# {p.source.name} over {len(p.stages)} pipeline stages"]
    for k, st in enumerate(p.stages):
        lines += [f"# ---- stage {k}", format_cascade(st).rstrip("\n")]
        lines += [f"  <{c}>" for c in p.transfers if c.src == k]
    return "\n".join(lines) + "\n"
