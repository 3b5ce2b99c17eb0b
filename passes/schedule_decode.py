"""The paged-decode schedule: split-KV (FlashDecoding) as a partial kernel plus a merge kernel.

:func:`paged_decode_schedule` matches the 2-pass paged-decode pattern (one query per
sequence, keys read through a block table, ``kascade.ir.library.paged_decode``), then
lowers it with :func:`~kascade.passes.softmax.split_reduction` over the page rank: the
statements that iterate the split rank ``c`` (score, local max, local sums) become the
*partial* kernel, the merge Einsums over ``c`` the *merge* kernel. What the templates
need is taken from the split cascade: the score (masks, scale, soft-cap) with its
contraction kept in place, the merge's rescaled sums and the output expression.

Each sequence is split over its *own* page count (``M1`` bound per sequence to
``cdiv(SL[b], M0)``), as ``backends/cuda.py`` does: split ``c`` of sequence ``b`` takes its
pages ``[c * W, (c + 1) * W)``, ``W = cdiv(M1, C)``. Any partition gives the same merged
result; this one gives no split work past a short sequence's end.

Free parameters: ``BLOCK_N`` (keys per step of the partial kernel's loop: pages of any
size, power of two or not, are gathered key by key), ``num_warps``, ``num_stages`` and
``num_splits`` (``C``, a launch parameter: the source does not depend on it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from kascade.ir import expr as E
from kascade.ir.cascade import Cascade, Einsum
from kascade.ir.dtypes import DType, Kind
from kascade.ir.expr import Expr, Op, free_ranks
from kascade.ir.validate import validate
from kascade.passes.normalize import defer_normalization
from kascade.passes.schedule import (
    MAX_HEAD_DIM,
    SMEM_BUDGET,
    Choice,
    Config,
    Constraint,
    Kernel,
    Schedule,
    ScheduleError,
    TensorRole,
    mask_conjuncts,
    padded_head_dim,
    plain_ranks,
)
from kascade.passes.softmax import split_reduction

MAX_SPLITS = 1024            # the CUDA launcher's limit too
# split counts the tuner and the cost model choose from (a call may still pass any count up to
# MAX_SPLITS): steps of about 1.5x, since a few percent more splits changes nothing measurable
SPLIT_CHOICES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
MIN_KEYS_PER_SPLIT = 64      # fewer keys per split and the merge's traffic stops paying off
PROGRAMS_PER_SM_TARGET = 4   # partial-kernel programs per SM that the default split count aims for
MAX_GROUP = 64               # query heads per KV head that one program holds (BLOCK_R rows)
REGISTER_ESTIMATE_LIMIT = 200   # see _registers


@dataclass(frozen=True)
class PagedDecode:
    """The matched paged-decode pattern after the split, in the cascade's own names."""
    q: TensorRole              # Q[b, g, r, e]
    k: TensorRole              # KC[n, m0, g, e], read at [BT[b, m1], m0, g, e]; ``block`` names the dim BT indexes
    v: TensorRole              # VC[n, m0, g, f]
    table: TensorRole          # BT[b, m1]
    lengths: TensorRole        # SL[b]
    out: TensorRole            # O[b, g, r, f]
    partial_max: TensorRole    # LGM[b, g, r, c]: per-split max (fp32 workspace)
    partial_sum: TensorRole    # LSD[b, g, r, c]: per-split sum of exp(score - split max)
    partial_num: TensorRole    # LAV[b, g, r, c, f]: per-split numerator (workspace layout: f innermost)
    block: str                 # n: the cache dim that the block table indexes
    batch: str                 # b: one sequence
    kv_head: str               # g
    group: str                 # r: the query heads of one KV head, all in one program
    page: str                  # m1: a sequence's page (block-table column)
    slot: str                  # m0: the position in a page
    split: str                 # c
    step: str                  # w: the page of a split
    head: str                  # e
    vhead: str                 # f
    score: Expr                # the split cascade's score; ``contraction`` is a node inside it
    contraction: Expr          # sum[e](Q[..] * KC[BT[..], ..])
    page_index: Expr           # c * W + w: the page a split's step reads
    merge_den: Expr            # SD = sum[c](merge_den): partial sums rescaled to the global max
    merge_num: Expr            # AV = sum[c](merge_num)
    global_max: Expr           # GM[b, g, r] as the merge reads it
    output: Expr               # the output Einsum's expression, reading ``denominator`` and ``numerator``
    denominator: Expr          # SD[b, g, r]
    numerator: Expr            # AV[b, g, r, f]
    extra_inputs: tuple[TensorRole, ...]   # other inputs the score reads (indexed by b, g, r)


# ---- space and constraints ------------------------------------------------------------
DECODE_SPACE = (
    Choice("BLOCK_N", (16, 32, 64, 128)),
    Choice("num_warps", (1, 2, 4, 8)),
    Choice("num_stages", (1, 2, 3, 4)),
    Choice("num_splits", SPLIT_CHOICES),
)


def group_rows(r: int) -> int:
    """BLOCK_R: the query heads of one KV head padded to ``tl.dot``'s minimum of 16 rows."""
    return padded_head_dim(r)


def _head_dims(cfg: Config, sizes: Mapping[str, int]) -> str | None:
    for sym in ("E", "F"):
        if sym in sizes and not 1 <= sizes[sym] <= MAX_HEAD_DIM:
            return f"head dim {sym}={sizes[sym]} is outside 1..{MAX_HEAD_DIM}"
    if "R" in sizes and not 1 <= sizes["R"] <= MAX_GROUP:
        return f"{sizes['R']} query heads per KV head; one program holds 1..{MAX_GROUP}"
    return None


def _registers(cfg: Config, sizes: Mapping[str, int]) -> str | None:
    """32-bit registers per thread for the fp32 scores and accumulator (BLOCK_R rows), the query
    rows and the K and V tiles (counted twice: gathered rows and their ``tl.dot`` operand copy).
    A coarse prune calibrated on sm_80 / sm_90a compiles of the partial kernel: every measured
    config above ~200 spilled (some below it do too; ``backends/aot.py`` has the last word)."""
    if "E" not in sizes or "F" not in sizes:
        return None
    e, f, rows = padded_head_dim(sizes["E"]), padded_head_dim(sizes["F"]), group_rows(sizes.get("R", 1))
    n, item = cfg["BLOCK_N"], sizes.get("itemsize", 2)
    per_thread = (rows * (n + f) + (rows * e + 2 * n * (e + f)) * item // 4) // (32 * cfg["num_warps"])
    if per_thread > REGISTER_ESTIMATE_LIMIT:
        return (f"~{per_thread} registers per thread (scores, accumulator, queries, K and V tiles) exceed "
                f"{REGISTER_ESTIMATE_LIMIT}, past which the partial kernel spills")
    return None


def _shared_memory(cfg: Config, sizes: Mapping[str, int]) -> str | None:
    if "E" not in sizes or "F" not in sizes:
        return None
    e, f, item = padded_head_dim(sizes["E"]), padded_head_dim(sizes["F"]), sizes.get("itemsize", 2)
    need = item * (group_rows(sizes.get("R", 1)) * e + max(1, cfg["num_stages"] - 1) * cfg["BLOCK_N"] * (e + f))
    if need > SMEM_BUDGET:
        return f"needs ~{need // 1024} KiB of shared memory, more than {SMEM_BUDGET // 1024} KiB"
    return None


DECODE_CONSTRAINTS = (
    Constraint("head_dim", _head_dims),
    Constraint("registers", _registers),
    Constraint("shared_memory", _shared_memory),
)


# ---- the schedule -----------------------------------------------------------------------
def paged_decode_schedule(cascade: Cascade) -> Schedule:
    """Two kernels for a paged-decode cascade (the library's 2-pass ``paged_decode()``, with
    any score modifier): ``paged_decode_partial`` on grid (splits, KV heads, sequences),
    looping over its split's keys ``BLOCK_N`` at a time, and ``paged_decode_merge`` on grid
    (sequences x query heads). Raises :class:`ScheduleError` naming the part that does not match."""
    body = _Matcher(defer_normalization(validate(cascade))).match()
    b, g, r = body.batch, body.kv_head, body.group
    partial = Kernel("paged_decode_partial", "paged_decode_partial",
                     (((body.split,), None), ((g,), None), ((b,), None)), ((body.page, "BLOCK_N"),), body)
    merge = Kernel("paged_decode_merge", "paged_decode_merge", (((b, g, r), None),), (), body)
    return Schedule(validate(cascade), (partial, merge), DECODE_SPACE, DECODE_CONSTRAINTS)


def default_num_splits(programs: int, max_seq_len: int, page_size: int, sm_count: int) -> int:
    """Splits per sequence so that ``programs * splits`` partial programs fill the GPU
    (``PROGRAMS_PER_SM_TARGET`` per SM), keeping at least ``MIN_KEYS_PER_SPLIT`` keys and one
    page per split: the rule of ``backends/cuda.py``'s ``default_num_splits``."""
    if max_seq_len <= 0 or programs <= 0:
        return 1
    target = PROGRAMS_PER_SM_TARGET * sm_count
    if programs >= target:
        return 1
    splits = min(math.ceil(target / programs), max(1, max_seq_len // MIN_KEYS_PER_SPLIT),
                 math.ceil(max_seq_len / page_size), MAX_SPLITS)
    return max(1, splits)


# (BLOCK_N, num_warps) by (fp32, padded head dim: 64 stands for <= 64) and BLOCK_R: the largest key step
# that compiles without spills for sm_80 and sm_90a under triton 3.6 and 3.9 (measured with
# backends/aot.py), except fp32 with head dim >= 128 and 64 rows, which spills a little at the smallest step.
DEFAULT_STEPS = {
    (False, 64): {16: (64, 4), 32: (32, 4), 64: (32, 4)},
    (False, 128): {16: (32, 4), 32: (32, 4), 64: (32, 8)},
    (False, 256): {16: (32, 8), 32: (32, 8), 64: (16, 8)},
    (True, 64): {16: (32, 8), 32: (32, 8), 64: (32, 8)},
    (True, 128): {16: (32, 8), 32: (16, 8), 64: (16, 8)},
    (True, 256): {16: (16, 4), 32: (16, 8), 64: (16, 8)},
}


def choose_decode_config(schedule: Schedule, shapes: Mapping[str, int]) -> tuple[Config, str]:
    """A config and the reason, for ``KASCADE_DEBUG``. ``shapes``: head dims ``E``, ``F``, query
    heads per KV head ``R``, ``itemsize`` (default: the cascade's query dtype's), and for the split count the sequences
    ``B``, KV heads ``G``, the longest sequence ``L``, the page size ``M0`` and the GPU's
    ``sm_count`` (default 132, an H200). Keys per step and warps come from
    :data:`DEFAULT_STEPS`; the step shrinks to the keys of a split, and a config the constraints
    reject gets more warps, then smaller steps."""
    sizes = {"E": shapes.get("E", 128), "F": shapes.get("F", 128), "R": shapes.get("R", 1),
             "itemsize": shapes.get("itemsize", schedule.kernels[0].body.q.dtype.itemsize)}
    fp32, rows = sizes["itemsize"] >= 4, group_rows(sizes["R"])
    d = max(64, padded_head_dim(sizes["E"]), padded_head_dim(sizes["F"]))
    bn, warps = DEFAULT_STEPS[fp32, min(d, 256)][min(rows, 64)]
    longest = shapes.get("L", 0)
    splits = default_num_splits(shapes.get("B", 1) * shapes.get("G", 1), longest, shapes.get("M0", 16),
                                shapes.get("sm_count", 132))
    splits = max(c for c in SPLIT_CHOICES if c <= splits)     # a count the schedule's space has
    per_split = -(-longest // splits) if longest else 0
    why = (f"{'fp32' if fp32 else '16-bit'} inputs, head dim {d}, {sizes['R']} query heads per KV head "
           f"(BLOCK_R={rows}): BLOCK_N={bn}, {warps} warps; {splits} splits for {shapes.get('B', 1)}x"
           f"{shapes.get('G', 1)} (sequence, KV head) pairs of up to {longest} keys on "
           f"{shapes.get('sm_count', 132)} SMs")
    if 0 < per_split < bn:
        bn = max(16, padded_head_dim(per_split))
        why += f"; BLOCK_N={bn} for {per_split} keys per split"
    cfg = Config.of(BLOCK_N=bn, num_warps=warps, num_stages=2, num_splits=splits)
    while (reason := schedule.feasible(cfg, sizes)) is not None:
        if cfg["num_warps"] < 8:
            cfg = cfg.replace(num_warps=cfg["num_warps"] * 2)
        elif cfg["BLOCK_N"] > 16:
            cfg = cfg.replace(BLOCK_N=cfg["BLOCK_N"] // 2)
        elif cfg["num_stages"] > 1:
            cfg = cfg.replace(num_stages=cfg["num_stages"] - 1)
        else:
            raise ScheduleError(f"no paged decode config fits {sizes}: {reason}")
        why += f"; {cfg.key()} ({reason})"
    return cfg, why


# ---- matching -------------------------------------------------------------------------
def _fresh_rank(c: Cascade, preferred: str) -> str:
    used = {r for t in c.inputs for r in t.ranks} | {r for s in c.stmts for r in s.ranks}
    used |= {r for s in c.stmts for n in s.expr.walk() if n.op is Op.REDUCE for r in n.reduce_ranks}
    name, i = preferred, 2
    while name in used or c.extent_decl(E.extent_of(name)) is not None:
        name, i = f"{preferred}{i}", i + 1
    return name


class _Matcher:
    """Finds the paged-decode statements in a 2-pass cascade, failing with what is missing."""

    def __init__(self, c: Cascade):
        self.c = c

    def fail(self, msg: str) -> ScheduleError:
        return ScheduleError(f"paged_decode_schedule({self.c.name}): {msg}")

    def match(self) -> PagedDecode:
        c = self.c
        gm, s = self.anchor()
        contraction = next(n for n in s.expr.walk() if n.op is Op.REDUCE)
        if contraction.reduce_kind != "sum" or len(contraction.reduce_ranks) != 1 \
                or contraction.args[0].op is not Op.MUL:
            raise self.fail(f"the score {s.name!r} must contract one rank as sum[e](Q[..] * KC[BT[..], ..]), "
                            f"found {contraction}")
        e = contraction.reduce_ranks[0]
        qa, ka = self.factors(contraction)
        table, (batch, page) = self.table(ka, gm)
        slot = next(r for r in gm.expr.reduce_ranks if r != page)
        k_plain = [i.arg for i in ka.args if i.op is Op.RANK]
        kv = [r for r in k_plain if r not in (slot, e)]
        if sorted(k_plain) != sorted({slot, e, *kv}) or slot not in k_plain or e not in k_plain or len(kv) != 1:
            raise self.fail(f"the cache read {ka} must be indexed by the block, the slot {slot!r}, one KV head "
                            f"rank and the head rank {e!r}")
        kv = kv[0]
        group = [x for x in plain_ranks(qa) if x not in (batch, kv, e)]
        if len(group) != 1 or set(plain_ranks(qa)) != {batch, kv, e, group[0]}:
            raise self.fail(f"the query {qa} must be indexed by {batch!r}, {kv!r}, one rank of query heads per KV "
                            f"head and {e!r}")
        group = group[0]
        if set(s.ranks) != {batch, kv, group, page, slot} or set(gm.ranks) != {batch, kv, group}:
            raise self.fail(f"the score {s.name}{list(s.ranks)} and its max {gm.name}{list(gm.ranks)} must have "
                            f"the ranks {[batch, kv, group, page, slot]} and {[batch, kv, group]}")
        sn, sd, av, out, va = self.softmax(s, gm, page, slot, ka)
        f = [x for x in (i.arg for i in va.args if i.op is Op.RANK) if x not in (slot, kv)]
        if len(f) != 1 or set(av.ranks) != {batch, kv, group, f[0]}:
            raise self.fail(f"the value sum {av.name}{list(av.ranks)} must read {va} keeping one value head rank")
        f = f[0]
        lengths = self.lengths(s, batch, page, slot)
        extra = self.extra_inputs(s, {qa.arg, ka.arg, table, lengths, va.arg}, {batch, kv, group, page, slot})
        dim = next(i for i, x in enumerate(ka.args) if x.op is Op.ACCESS)
        block = c.input(ka.arg).ranks[dim]
        block = block if block not in {batch, kv, group, page, slot, e, f} else "block"
        # roles name each dim by the rank that reads it (the cache's block dim: ``block``)
        role = lambda x: TensorRole(x.arg, tuple(i.arg if i.op is Op.RANK else block for i in x.args),  # noqa: E731
                                    c.input(x.arg).dtype)
        lengths_read = E.access(lengths, E.rank(batch))
        table_read = next(i for i in ka.args if i.op is Op.ACCESS)
        split, step = _fresh_rank(c, "c"), _fresh_rank(c, "w")
        lowered = split_reduction(c, page, outer=split, inner=step)
        return self.merged(lowered, s, gm, sd, av, out, split, step, dict(
            q=role(qa), k=role(ka), v=role(va), table=role(table_read), lengths=role(lengths_read), block=block,
            batch=batch, kv_head=kv, group=group, page=page, slot=slot, split=split, step=step, head=e, vhead=f,
            extra_inputs=extra))

    def anchor(self) -> tuple[Einsum, Einsum]:
        """``GM = max[m1, m0](S[..])`` over two ranks (page, slot), ``S`` with one contraction."""
        found = []
        for gm in self.c.einsums:
            x = gm.expr
            if x.op is Op.REDUCE and x.reduce_kind == "max" and len(x.reduce_ranks) == 2 \
                    and x.args[0].op is Op.ACCESS:
                s = self.c.producer(x.args[0].arg)
                if isinstance(s, Einsum) and plain_ranks(x.args[0]) == s.ranks and s.step is None \
                        and sum(n.op is Op.REDUCE for n in s.expr.walk()) == 1:
                    found.append((gm, s))
        if len(found) != 1:
            raise self.fail(f"expected one softmax max 'GM[..] = max[m1, m0](S[..])' over a page and a slot rank "
                            f"of a score with one contraction; found {[g.name for g, _ in found] or 'none'}")
        return found[0]

    def factors(self, contraction: Expr) -> tuple[Expr, Expr]:
        """(the query, plain-indexed; the cache read, one index of which reads the block table)."""
        a, b = contraction.args[0].args
        indirect = lambda x: sum(i.op is Op.ACCESS for i in x.args) == 1  # noqa: E731
        for qa, ka in ((a, b), (b, a)):
            if qa.op is Op.ACCESS and ka.op is Op.ACCESS and self.c.input(qa.arg) and self.c.input(ka.arg) \
                    and plain_ranks(qa) and indirect(ka):
                return qa, ka
        raise self.fail(f"the contraction {contraction} must multiply a plain-indexed query by a cache read "
                        "through a block table, KC[BT[b, m1], m0, g, e]")

    def table(self, ka: Expr, gm: Einsum) -> tuple[str, tuple[str, str]]:
        """The block table's name and its (batch, page) ranks, checked against the max's ranks."""
        t = next(i for i in ka.args if i.op is Op.ACCESS)
        decl = self.c.input(t.arg)
        ranks = plain_ranks(t)
        if decl is None or decl.dtype.kind is not Kind.INT or ranks is None or len(ranks) != 2:
            raise self.fail(f"the block index {t} must read an integer input table at two plain ranks")
        pages = [x for x in ranks if x in gm.expr.reduce_ranks]
        if len(pages) != 1:
            raise self.fail(f"exactly one rank of the block table read {t} must be a rank the max reduces "
                            f"({list(gm.expr.reduce_ranks)})")
        batch = next(x for x in ranks if x != pages[0])
        return t.arg, (batch, pages[0])

    def softmax(self, s: Einsum, gm: Einsum, page: str, slot: str, ka: Expr):
        c = self.c
        users = [u for u in c.users(gm.name) if isinstance(u, Einsum)]
        sn = [u for u in users if u.expr == E.exp(E.access(s.name, *map(E.rank, s.ranks))
                                                  - E.access(gm.name, *map(E.rank, gm.ranks)))]
        if len(sn) != 1 or len(users) != 1:
            raise self.fail(f"{gm.name} must be read once, as exp({s.name} - {gm.name})")
        sn = sn[0]
        over = (page, slot)
        sums = [u for u in c.users(sn.name) if isinstance(u, Einsum) and u.expr.op is Op.REDUCE
                and u.expr.reduce_kind == "sum" and set(u.expr.reduce_ranks) == set(over)]
        sn_read = E.access(sn.name, *map(E.rank, sn.ranks))
        sd = [u for u in sums if u.expr.args[0] == sn_read]
        av = [u for u in sums if u not in sd]
        if len(sd) != 1 or len(av) != 1 or len(c.users(sn.name)) != 2:
            raise self.fail(f"{sn.name} must be read by exactly a denominator sum[{page}, {slot}]({sn.name}) and a "
                            f"numerator sum[{page}, {slot}]({sn.name} * V[..])")
        sd, av = sd[0], av[0]
        index = next(i for i in ka.args if i.op is Op.ACCESS)
        va = [n for n in av.expr.walk() if n.op is Op.ACCESS and c.input(n.arg) and index in n.args]
        if len(va) != 1 or va[0].arg == ka.arg:
            raise self.fail(f"the numerator {av.name} must read one value cache through {index}")
        outs = [t for t in c.einsums if t.output]
        if len(outs) != 1 or c.users(sd.name) != (outs[0],) or c.users(av.name) != (outs[0],):
            raise self.fail(f"expected one output Einsum reading {sd.name} and {av.name}")
        stmts = {x.name for x in (s, gm, sn, sd, av, outs[0])}
        other = [t.label for t in c.stmts if not set(t.outputs) <= stmts]
        if other:
            raise self.fail(f"{', '.join(other)} are not part of the paged decode pattern")
        return sn, sd, av, outs[0], va[0]

    def lengths(self, s: Einsum, batch: str, page: str, slot: str) -> str:
        """The sequence lengths: the conjunct ``m1 * M0 + m0 < SL[b]`` of the score's mask (the
        kernel stops its loop there; the mask itself is emitted from the cascade)."""
        position = E.rank(page) * E.extent(self.c.rank_extent(slot)) + E.rank(slot)
        for cond in mask_conjuncts(s.expr):
            lhs, rhs = (cond.args if cond.op is Op.LT else cond.args[::-1] if cond.op is Op.GT else (None, None))
            if lhs == position and rhs is not None and rhs.op is Op.ACCESS and plain_ranks(rhs) == (batch,) \
                    and self.c.input(rhs.arg) is not None and self.c.input(rhs.arg).dtype.kind is Kind.INT:
                return rhs.arg
        raise self.fail(f"the score's mask must bound the key position: where({position} < SL[{batch}], .., -inf)")

    def extra_inputs(self, s: Einsum, used: set[str], allowed: set[str]) -> tuple[TensorRole, ...]:
        out = []
        for n in s.expr.walk():
            if n.op is Op.ACCESS and n.arg not in used and self.c.input(n.arg) is not None:
                if not free_ranks(n) <= allowed:
                    raise self.fail(f"{n} is indexed by ranks outside {sorted(allowed)}")
                used.add(n.arg)
                decl = self.c.input(n.arg)
                out.append(TensorRole(n.arg, decl.ranks, decl.dtype))
        return tuple(out)

    def merged(self, lowered: Cascade, s: Einsum, gm: Einsum, sd: Einsum, av: Einsum, out: Einsum, split: str,
               step: str, roles: dict) -> PagedDecode:
        """The partial statistics and merge expressions of the split cascade."""
        get = lambda name: next(t for t in lowered.einsums if t.name == name)  # noqa: E731
        score, gmax, den, num, final = (get(x.name) for x in (s, gm, sd, av, out))
        for t in (gmax, den, num):
            if t.expr.op is not Op.REDUCE or t.expr.reduce_ranks != (split,):
                raise self.fail(f"split_reduction left {t.name} = {t.expr}; expected a merge over {split!r}")
        body = gmax.expr.args[0]
        if body.op is not Op.ACCESS:
            raise self.fail(f"split_reduction left {gmax.name} = {gmax.expr}; expected a max of split maxima")
        lm = body.arg

        def local(t: Einsum) -> str:
            names = {n.arg for n in t.expr.args[0].walk() if n.op is Op.ACCESS and n.arg != lm
                     and split in free_ranks(n)}
            if len(names) != 1:
                raise self.fail(f"the merge {t.name} = {t.expr} must rescale one per-split partial")
            return names.pop()

        ls, ln = local(den), local(num)
        b, g, r, f = roles["batch"], roles["kv_head"], roles["group"], roles["vhead"]
        ws = DType.F32
        page_index = E.rank(split) * E.extent(lowered.rank_extent(step)) + E.rank(step)
        own = lambda t: E.access(t.name, *map(E.rank, t.ranks))  # noqa: E731
        return PagedDecode(
            **roles, out=TensorRole(out.name, out.ranks, out.dtype or ws),
            partial_max=TensorRole(lm, (b, g, r, split), ws), partial_sum=TensorRole(ls, (b, g, r, split), ws),
            partial_num=TensorRole(ln, (b, g, r, split, f), ws), score=score.expr,
            contraction=next(n for n in score.expr.walk() if n.op is Op.REDUCE),
            page_index=page_index, merge_den=den.expr.args[0], merge_num=num.expr.args[0], global_max=own(gmax),
            output=final.expr, denominator=own(den), numerator=own(num))
