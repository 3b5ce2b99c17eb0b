"""Schedules and configs: how a cascade becomes kernels, and the knobs left free.

A :class:`Schedule` is the validated cascade it implements, its :class:`Kernel` s (one
fused kernel each, with the mapping of ranks to the grid and to loops) and the free
parameters (:class:`Choice`) with their constraints. A :class:`Config` binds those
parameters; ``schedule.feasible(config, sizes)`` says why a config is rejected (None
when it is accepted), as a pure function, so a search can prune without compiling.

:func:`attention_prefill_schedule` matches the prefill attention pattern (FuseMax's
1-pass / FlashAttention-2 structure: queries split across programs, keys streamed in
a loop) and extracts what a kernel template needs: the score expression (with the
contraction node kept in place, for the template to bind to its ``qk`` tile), the
output expression, the roles of Q, K, V and of every rank, and the bounds on the key
rank that the mask implies (for skipping key tiles that no query of a tile sees).
:func:`attention_varlen_schedule` is the same kernel over packed variable-length sequences.
The paged-decode (split-KV) schedule is in :mod:`kascade.passes.schedule_decode`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from itertools import product
from typing import Any

from kascade.ir import expr as E
from kascade.ir.cascade import Cascade, Einsum
from kascade.ir.dtypes import DType, Kind
from kascade.ir.errors import KascadeError, RewriteError
from kascade.ir.expr import Expr, Op, free_ranks
from kascade.ir.validate import validate
from kascade.passes.normalize import defer_normalization


class ScheduleError(RewriteError):
    """A cascade that a schedule cannot implement; the message names the part that did not match."""


# ---- configs ------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Bound free parameters: sorted ``(name, int)`` pairs. ``Config.of(BLOCK_M=64, ...)``."""
    items: tuple[tuple[str, int], ...]

    def __post_init__(self):
        for name, value in self.items:
            if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, int):
                raise KascadeError(f"a Config binds names to ints, got {name!r}={value!r}")
        if len({n for n, _ in self.items}) != len(self.items):
            raise KascadeError(f"a Config names a parameter twice: {self.items}")
        object.__setattr__(self, "items", tuple(sorted(self.items)))

    @classmethod
    def of(cls, mapping: Mapping[str, int] | None = None, **values: int) -> Config:
        return cls(tuple({**(mapping or {}), **values}.items()))

    def __getitem__(self, name: str) -> int:
        for n, v in self.items:
            if n == name:
                return v
        raise KeyError(f"config {self.key()} has no parameter {name!r}")

    def as_dict(self) -> dict[str, int]:
        return dict(self.items)

    def replace(self, **values: int) -> Config:
        return Config.of(self.as_dict(), **values)

    def key(self) -> str:
        """Stable text key, e.g. ``BLOCK_M=64,BLOCK_N=64,num_stages=2,num_warps=4``."""
        return ",".join(f"{n}={v}" for n, v in self.items)

    def __str__(self) -> str:
        return self.key()


@dataclass(frozen=True)
class Choice:
    """A free parameter and its candidate values."""
    name: str
    values: tuple[int, ...]


@dataclass(frozen=True)
class Constraint:
    """A named rule: ``check(config, sizes)`` returns why the config is rejected, or None.
    ``sizes`` carries what the rule may need beyond the config (head dims ``E`` / ``F``,
    ``itemsize``); a rule whose sizes are absent accepts."""
    name: str
    check: Callable[[Config, Mapping[str, int]], str | None]


# ---- what a kernel computes ---------------------------------------------------------
@dataclass(frozen=True)
class TensorRole:
    """A tensor of the cascade as a kernel sees it: the rank indexing each dim, in dim order."""
    name: str
    ranks: tuple[str, ...]
    dtype: DType


@dataclass(frozen=True)
class KeyBound:
    """``m <= coeff * p + offset`` (``upper``) or ``m >= coeff * p + offset`` (``lower``),
    a conjunct of the score's mask: keys outside it score ``-inf`` for query ``p``."""
    side: str
    coeff: int
    offset: Expr
    source: Expr


@dataclass(frozen=True)
class AttentionPrefill:
    """The matched prefill-attention pattern, in the cascade's own names."""
    q: TensorRole
    k: TensorRole
    v: TensorRole
    out: TensorRole
    grid_ranks: tuple[str, ...]   # batch-like ranks: one program per combination (and per query tile)
    query: str                    # p: split into BLOCK_M tiles across programs
    key: str                      # m: streamed in BLOCK_N tiles by a loop
    head: str                     # e: contracted by Q K^T
    vhead: str                    # f: the value / output head dim
    score: Expr                   # the score Einsum's expression; ``contraction`` is a node inside it
    contraction: Expr             # sum[e](Q[..] * K[..])
    output: Expr                  # the output Einsum's expression, reading ``denominator`` and ``numerator``
    denominator: Expr             # SD[..] as the output reads it: SD = sum[m](exp(S - GM))
    numerator: Expr               # AV[..] as the output reads it: AV = sum[m](exp(S - GM) * V)
    key_bounds: tuple[KeyBound, ...]
    extra_inputs: tuple[TensorRole, ...]   # other inputs the score or output read (ALiBi slopes, ...)
    packed: PackedSequences | None = None  # varlen: sequences packed along the query and key ranks


@dataclass(frozen=True)
class PackedSequences:
    """The varlen layout (flash-attn's ``cu_seqlens``): the batch-like rank ``rank`` numbers
    sequences packed along the query and key ranks. Sequence ``s`` owns rows
    ``[QS[s], QS[s + 1])`` of Q and the output and ``[KS[s], KS[s + 1])`` of K and V; the query
    and key extents (``P``, ``M``) are that sequence's lengths, so a mask written with ``M - P``
    is aligned within each sequence."""
    rank: str
    query_starts: TensorRole   # QS[s]: i32, S + 1 entries
    key_starts: TensorRole     # KS[s]: i32, S + 1 entries


@dataclass(frozen=True)
class Kernel:
    """One fused kernel: its template family, the grid and loop mapping, and what it computes."""
    name: str
    family: str
    grid: tuple[tuple[tuple[str, ...], str | None], ...]   # per grid axis: (ranks, tile parameter or None)
    loops: tuple[tuple[str, str], ...]                      # (rank, tile parameter) streamed in order
    body: Any                                               # what it computes: AttentionPrefill, PagedDecode


@dataclass(frozen=True)
class Schedule:
    cascade: Cascade
    kernels: tuple[Kernel, ...]
    space: tuple[Choice, ...]
    constraints: tuple[Constraint, ...]

    def feasible(self, config: Config, sizes: Mapping[str, int] | None = None) -> str | None:
        """Why ``config`` is rejected (the first failing rule), or None when it is accepted."""
        given = {n for n, _ in config.items}
        wanted = {c.name for c in self.space}
        if given != wanted:
            return f"config {config.key()} must bind exactly {sorted(wanted)}"
        for choice in self.space:
            if config[choice.name] not in choice.values:
                return f"{choice.name}={config[choice.name]} is not one of {list(choice.values)}"
        for rule in self.constraints:
            why = rule.check(config, sizes or {})
            if why is not None:
                return f"{rule.name}: {why}"
        return None

    def configs(self, sizes: Mapping[str, int] | None = None) -> Iterator[Config]:
        """Every feasible config of the space, in a stable order."""
        for values in product(*(c.values for c in self.space)):
            cfg = Config(tuple(zip((c.name for c in self.space), values)))
            if self.feasible(cfg, sizes) is None:
                yield cfg

    def key(self) -> str:
        """Structural identity: the cascade's hash and the kernel families."""
        return f"{'+'.join(k.family for k in self.kernels)}:{self.cascade.structural_hash()}"


# ---- attention prefill ----------------------------------------------------------------
PREFILL_SPACE = (
    Choice("BLOCK_M", (16, 32, 64, 128)),
    Choice("BLOCK_N", (16, 32, 64, 128)),
    Choice("num_warps", (2, 4, 8)),
    Choice("num_stages", (1, 2, 3, 4)),
)
MAX_HEAD_DIM = 256
SMEM_BUDGET = 227 * 1024   # the largest per-block shared memory of a supported target (sm_90)


def padded_head_dim(d: int) -> int:
    """The tile width of a head dim: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, 1 << max(0, d - 1).bit_length())


def _tile_area(cfg: Config, sizes: Mapping[str, int]) -> str | None:
    if cfg["BLOCK_M"] * cfg["BLOCK_N"] > 128 * 64 and cfg["num_warps"] < 4:
        return f"a {cfg['BLOCK_M']}x{cfg['BLOCK_N']} score tile needs at least 4 warps"
    return None


def _registers(cfg: Config, sizes: Mapping[str, int]) -> str | None:
    """The score tile, the accumulator and the Q tile spread over the threads, doubled for fp32
    (whose exact ``tl.dot`` runs on FMA units with a larger register footprint). Calibrated on
    sm_80 / sm_90a compiles: above ~256 the kernel spills heavily."""
    if "E" not in sizes or "F" not in sizes:
        return None
    width = cfg["BLOCK_N"] + padded_head_dim(sizes["E"]) + padded_head_dim(sizes["F"])
    per_thread = cfg["BLOCK_M"] * width // (32 * cfg["num_warps"]) * (2 if sizes.get("itemsize", 2) >= 4 else 1)
    if per_thread > 256:
        return f"~{per_thread} values per thread (score, accumulator and Q tiles) exceed 256 registers"
    return None


def _shared_memory(cfg: Config, sizes: Mapping[str, int]) -> str | None:
    """An upper estimate: the Q tile, and K and V tiles in flight for each pipeline stage but
    the last (compiled kernels measured by ``backends/aot.py`` use about half of it)."""
    if "E" not in sizes or "F" not in sizes:
        return None
    e, f, item = padded_head_dim(sizes["E"]), padded_head_dim(sizes["F"]), sizes.get("itemsize", 2)
    need = item * (cfg["BLOCK_M"] * e + max(1, cfg["num_stages"] - 1) * cfg["BLOCK_N"] * (e + f))
    if need > SMEM_BUDGET:
        return f"needs ~{need // 1024} KiB of shared memory, more than {SMEM_BUDGET // 1024} KiB"
    return None


def _head_dims(cfg: Config, sizes: Mapping[str, int]) -> str | None:
    for sym in ("E", "F"):
        if sym in sizes and not 1 <= sizes[sym] <= MAX_HEAD_DIM:
            return f"head dim {sym}={sizes[sym]} is outside 1..{MAX_HEAD_DIM}"
    return None


PREFILL_CONSTRAINTS = (
    Constraint("head_dim", _head_dims),
    Constraint("tile_area", _tile_area),
    Constraint("registers", _registers),
    Constraint("shared_memory", _shared_memory),
)


def attention_prefill_schedule(cascade: Cascade, *, query: str | None = None) -> Schedule:
    """One fused kernel for an attention cascade (3- or 2-pass form).

    Grid: (query tiles, every combination of the batch-like ranks); the key rank is a
    loop over ``BLOCK_N`` tiles with an online softmax. ``query`` names the query rank
    when the default (the last rank of Q that K lacks, besides the contracted one) is
    not it. Raises :class:`ScheduleError` naming the part that does not match.
    """
    body = _Matcher(defer_normalization(validate(cascade)), query).match()
    grid = (((body.query,), "BLOCK_M"), (body.grid_ranks, None))
    kernel = Kernel("attn_fwd", "attention_prefill", grid, ((body.key, "BLOCK_N"),), body)
    return Schedule(validate(cascade), (kernel,), PREFILL_SPACE, PREFILL_CONSTRAINTS)


def attention_varlen_schedule(cascade: Cascade, *, sequence: str | None = None,
                              query: str | None = None) -> Schedule:
    """The prefill kernel over packed variable-length sequences (flash-attn's varlen layout).

    ``cascade`` is a dense attention cascade: the attention of *one* sequence, batched over
    the rank ``sequence`` (default: the first batch-like rank, ``b`` in the library's). The
    kernel reads Q / the output packed as ``[p, <other ranks>]`` and K / V as ``[m, <other
    ranks>]`` (``sequence`` dropped), with each sequence's start and length taken from two
    offset tensors (``cu_seqlens_q`` / ``cu_seqlens_k``). Grid: (query tiles of the longest
    sequence, sequences x heads); programs past their sequence's end exit at once.
    """
    base = attention_prefill_schedule(cascade, query=query)
    kernel = base.kernels[0]
    body = kernel.body
    seq = sequence or (body.grid_ranks[0] if body.grid_ranks else None)
    if seq not in body.grid_ranks:
        raise ScheduleError(f"attention_varlen_schedule({cascade.name}): the sequence rank must be one of the "
                            f"batch-like ranks {list(body.grid_ranks)}, got {seq!r}")
    for role in (body.q, body.k, body.v, body.out):
        if seq not in role.ranks:
            raise ScheduleError(f"attention_varlen_schedule({cascade.name}): {role.name}{list(role.ranks)} is not "
                                f"indexed by the sequence rank {seq!r}, so it cannot be packed")

    def pack(role: TensorRole, along: str) -> TensorRole:
        return TensorRole(role.name, (along, *(r for r in role.ranks if r not in (seq, along))), role.dtype)

    starts = [TensorRole(cascade.fresh_name(n), (seq,), DType.I32) for n in ("CQ", "CK")]
    packed = replace(body, q=pack(body.q, body.query), k=pack(body.k, body.key), v=pack(body.v, body.key),
                     out=pack(body.out, body.query), packed=PackedSequences(seq, *starts))
    kernel = replace(kernel, name="attn_fwd_varlen", family="attention_prefill_varlen", body=packed)
    return replace(base, kernels=(kernel,))


def default_config(schedule: Schedule, shapes: Mapping[str, int]) -> Config:
    """A sensible config until the cost model exists (see :func:`choose_config`)."""
    return choose_config(schedule, shapes)[0]


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (fp32, varlen) and padded head dim (64 stands for <= 64)
DEFAULT_TILES = {
    (False, False): {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 64, 8, 2)},
    (False, True): {64: (128, 64, 8, 3), 128: (128, 32, 8, 3), 256: (32, 64, 8, 2)},
    (True, False): {64: (64, 32, 8, 2), 128: (64, 32, 8, 2), 256: (32, 16, 8, 2)},
    (True, True): {64: (64, 32, 8, 2), 128: (32, 32, 8, 2), 256: (16, 16, 4, 2)},
}


def choose_config(schedule: Schedule, shapes: Mapping[str, int]) -> tuple[Config, str]:
    """A config by head dim and sequence lengths, and the reason, for ``KASCADE_DEBUG``.

    ``shapes`` binds the extents of the query, key and head ranks (``P``, ``M``, ``E``,
    ``F``) and optionally ``itemsize`` (default 2). For 16-bit inputs FlashAttention-2's 128 x 64
    tiles with 8 warps up to head dim 128, 64 x 64 above; fp32 gets small tiles with 8 warps (its
    exact ``tl.dot`` has no tensor cores); the varlen kernel (whose per-sequence offsets and lengths
    take registers the dense kernel's arguments do not) narrower key tiles from head dim 128 on.
    These are the largest tiles that compile without spills for sm_80 and sm_90a under triton 3.6
    and 3.9 (measured with ``backends/aot.py``; :data:`DEFAULT_TILES`). Tiles shrink to short
    sequences; a rejected config is shrunk (stages, then tiles) until the constraints accept it.
    """
    body = schedule.kernels[0].body
    c = schedule.cascade
    ext = {role: shapes[c.rank_extent(r)] for role, r in
           (("P", body.query), ("M", body.key), ("E", body.head), ("F", body.vhead)) if c.rank_extent(r) in shapes}
    sizes = {"E": ext.get("E", 128), "F": ext.get("F", 128), "itemsize": shapes.get("itemsize", 2)}
    d = max(64, padded_head_dim(sizes["E"]), padded_head_dim(sizes["F"]))
    varlen = body.packed is not None
    bm, bn, warps, stages = DEFAULT_TILES[sizes["itemsize"] >= 4, varlen][d]
    why = (f"{'fp32' if sizes['itemsize'] >= 4 else '16-bit'} inputs, head dim {d}{', varlen' if varlen else ''}: "
           f"{bm}x{bn} tiles, {warps} warps")
    fit = lambda n, block: max(16, min(block, padded_head_dim(max(1, n))))  # noqa: E731
    if "P" in ext and fit(ext["P"], bm) < bm:
        bm, why = fit(ext["P"], bm), why + f"; BLOCK_M={fit(ext['P'], bm)} for {ext['P']} queries"
    if "M" in ext and fit(ext["M"], bn) < bn:
        bn, why = fit(ext["M"], bn), why + f"; BLOCK_N={fit(ext['M'], bn)} for {ext['M']} keys"
    cfg = Config.of(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    while (reason := schedule.feasible(cfg, sizes)) is not None:
        if cfg["num_stages"] > 1:
            cfg = cfg.replace(num_stages=cfg["num_stages"] - 1)
        elif cfg["BLOCK_N"] > 16:
            cfg = cfg.replace(BLOCK_N=cfg["BLOCK_N"] // 2)
        elif cfg["BLOCK_M"] > 16:
            cfg = cfg.replace(BLOCK_M=cfg["BLOCK_M"] // 2)
        else:
            raise ScheduleError(f"no prefill attention config fits: {reason}")
        why += f"; shrunk ({reason})"
    return cfg, why


# ---- matching -------------------------------------------------------------------------
def plain_ranks(access: Expr) -> tuple[str, ...] | None:
    """The rank names of an access indexed by distinct plain ranks, else None."""
    names = tuple(i.arg for i in access.args if i.op is Op.RANK)
    return names if len(names) == len(access.args) == len(set(names)) else None


class _Matcher:
    """Finds the prefill-attention statements in a 2-pass cascade, failing with what is missing."""

    def __init__(self, c: Cascade, query: str | None):
        self.c, self.query = c, query

    def fail(self, msg: str) -> ScheduleError:
        return ScheduleError(f"attention_prefill_schedule({self.c.name}): {msg}")

    def einsum_reading(self, name: str, test: Callable[[Einsum], bool], what: str) -> Einsum:
        found = [s for s in self.c.users(name) if isinstance(s, Einsum) and test(s)]
        if len(found) != 1:
            raise self.fail(f"expected exactly one {what}, found {len(found)}")
        return found[0]

    def match(self) -> AttentionPrefill:
        c = self.c
        gm, s = self.anchor()
        m = gm.expr.reduce_ranks[0]
        contraction = next(n for n in s.expr.walk() if n.op is Op.REDUCE)
        e = contraction.reduce_ranks
        if contraction.reduce_kind != "sum" or len(e) != 1 or contraction.args[0].op is not Op.MUL:
            raise self.fail(f"the score {s.name!r} must contract one rank as sum[e](Q[..] * K[..]), "
                            f"found {contraction}")
        e = e[0]
        a, b = contraction.args[0].args
        if not all(x.op is Op.ACCESS and c.input(x.arg) is not None and plain_ranks(x) for x in (a, b)):
            raise self.fail(f"the contraction {contraction} must multiply two inputs indexed by plain ranks")
        if (m in plain_ranks(a)) == (m in plain_ranks(b)):
            raise self.fail(f"exactly one factor of {contraction} must be indexed by the key rank {m!r} (K)")
        qa, ka = (b, a) if m in plain_ranks(a) else (a, b)
        q_only = [r for r in plain_ranks(qa) if r not in plain_ranks(ka) and r != e]
        if self.query is not None and self.query not in q_only:
            raise self.fail(f"query rank {self.query!r} is not a rank of {qa.arg} that {ka.arg} lacks: {q_only}")
        if not q_only:
            raise self.fail(f"{qa.arg} has no query rank (a rank that {ka.arg} lacks)")
        p = self.query or q_only[-1]
        grid = tuple(r for r in s.ranks if r not in (m, p))
        if set(s.ranks) != set(grid) | {m, p} or set(gm.ranks) != set(grid) | {p}:
            raise self.fail(f"the score {s.name}{list(s.ranks)} and its max {gm.name}{list(gm.ranks)} must "
                            f"share the batch-like ranks {list(grid)}")
        for x, allowed in ((qa, {*grid, p, e}), (ka, {*grid, m, e})):
            if not set(plain_ranks(x)) <= allowed or e not in plain_ranks(x):
                raise self.fail(f"{x} may only use the ranks {sorted(allowed)} and must use {e!r}")
        sn = self.einsum_reading(gm.name, lambda t: self.is_exp_diff(t, s, gm), f"exp({s.name} - {gm.name})")
        if {u.name for u in c.users(s.name)} != {gm.name, sn.name} or [u.name for u in c.users(gm.name)] != [sn.name]:
            raise self.fail(f"{s.name} and {gm.name} may only be read by the softmax ({gm.name}, {sn.name})")
        sd = self.einsum_reading(sn.name, lambda t: self.sums(t, sn, m, None), f"denominator sum[{m}]({sn.name})")
        av = self.einsum_reading(sn.name, lambda t: self.sums(t, sn, m, "V"), f"numerator sum[{m}]({sn.name} * V)")
        if len(c.users(sn.name)) != 2:
            raise self.fail(f"{sn.name} may only be read by {sd.name} and {av.name}")
        va = next(x for x in av.expr.args[0].args if x.arg != sn.name)
        f = [r for r in plain_ranks(va) if r not in (*grid, m)]
        if len(f) != 1 or set(av.ranks) != {*grid, p, f[0]} or set(sd.ranks) != {*grid, p}:
            raise self.fail(f"the value sum {av.name}{list(av.ranks)} must reduce {va} over {m!r} keeping one "
                            f"value head rank besides {sorted({*grid, p})}")
        f = f[0]
        out = self.output(sd, av)
        stmts = {x.name for x in (s, gm, sn, sd, av, out)}
        extra_stmts = [t.label for t in c.stmts if not set(t.outputs) <= stmts]
        if extra_stmts:
            raise self.fail(f"{', '.join(extra_stmts)} are not part of the prefill attention pattern")
        role = lambda x: TensorRole(x.arg, plain_ranks(x), c.input(x.arg).dtype)  # noqa: E731
        used = {qa.arg, ka.arg, va.arg}
        extra = []
        for expr, allowed in ((s.expr, {*grid, p, m}), (out.expr, {*grid, p, f})):
            for n in expr.walk():
                if n.op is Op.ACCESS and n.arg not in used and c.input(n.arg) is not None:
                    if not free_ranks(n) <= allowed:
                        raise self.fail(f"{n} is indexed by ranks outside {sorted(allowed)}")
                    used.add(n.arg)
                    decl = c.input(n.arg)
                    extra.append(TensorRole(n.arg, decl.ranks, decl.dtype))
        out_role = TensorRole(out.name, out.ranks, out.dtype or DType.F32)
        bounds = tuple(b for cj in mask_conjuncts(s.expr) if (b := key_bound(cj, m, p, self.int_params())) is not None)
        own = lambda t: E.access(t.name, *map(E.rank, t.ranks))  # noqa: E731
        return AttentionPrefill(role(qa), role(ka), role(va), out_role, grid, p, m, e, f, s.expr, contraction,
                                out.expr, own(sd), own(av), bounds, tuple(extra))

    def anchor(self) -> tuple[Einsum, Einsum]:
        """``GM = max[m](S[..])`` over one rank, ``S`` an Einsum with exactly one reduction."""
        found, seen = [], []
        for gm in self.c.einsums:
            x = gm.expr
            if x.op is not Op.REDUCE or x.reduce_kind != "max":
                continue
            seen.append(gm.name)
            body = x.args[0]
            s = self.c.producer(body.arg) if body.op is Op.ACCESS else None
            if len(x.reduce_ranks) == 1 and isinstance(s, Einsum) and plain_ranks(body) == s.ranks and s.step is None \
                    and sum(n.op is Op.REDUCE for n in s.expr.walk()) == 1:
                found.append((gm, s))
        if len(found) != 1:
            raise self.fail(f"expected one softmax max 'GM[..] = max[m](S[..])' over one rank of a score S with "
                            f"one contraction sum[e](Q[..] * K[..]); max reductions found: {seen or 'none'}, "
                            f"matching: {[g.name for g, _ in found] or 'none'}")
        return found[0]

    @staticmethod
    def is_exp_diff(t: Einsum, s: Einsum, gm: Einsum) -> bool:
        x = t.expr
        if not (x.op is Op.FUNC and x.arg == "exp" and x.args[0].op is Op.SUB):
            return False
        a, b = x.args[0].args
        return (a.op is Op.ACCESS and a.arg == s.name and plain_ranks(a) == s.ranks and set(t.ranks) == set(s.ranks)
                and b.op is Op.ACCESS and b.arg == gm.name and plain_ranks(b) == gm.ranks)

    def sums(self, t: Einsum, sn: Einsum, m: str, with_input: str | None) -> bool:
        x = t.expr
        if x.op is not Op.REDUCE or x.reduce_kind != "sum" or x.reduce_ranks != (m,) or t.output or t.step:
            return False
        body = x.args[0]
        is_sn = lambda y: y.op is Op.ACCESS and y.arg == sn.name and plain_ranks(y) == sn.ranks  # noqa: E731
        if with_input is None:
            return is_sn(body)
        return body.op is Op.MUL and sum(map(is_sn, body.args)) == 1 and all(
            is_sn(y) or (y.op is Op.ACCESS and self.c.input(y.arg) is not None and plain_ranks(y)) for y in body.args)

    def output(self, sd: Einsum, av: Einsum) -> Einsum:
        outs = [t for t in self.c.einsums if t.output]
        if len(outs) != 1 or self.c.users(sd.name) != (outs[0],) or self.c.users(av.name) != (outs[0],):
            raise self.fail(f"expected one output Einsum reading {sd.name} and {av.name}, found outputs "
                            f"{[t.name for t in outs]}")
        out = outs[0]
        if set(out.ranks) != set(av.ranks) or out.step is not None:
            raise self.fail(f"the output {out.name}{list(out.ranks)} must have the ranks of {av.name}")
        for n in out.expr.walk():
            if n.op is Op.ACCESS and n.arg in (sd.name, av.name) and plain_ranks(n) != self.c.ranks_of(n.arg):
                raise self.fail(f"the output reads {n}; it must read {n.arg} at its own ranks")
            if n.op is Op.REDUCE:
                raise self.fail(f"the output expression may not reduce: {n}")
        return out

    def int_params(self) -> frozenset[str]:
        return frozenset(p.name for p in self.c.params if p.dtype.kind is Kind.INT)


# ---- mask analysis --------------------------------------------------------------------
def mask_conjuncts(score: Expr) -> list[Expr]:
    """The conditions ``c`` of ``where(c, x, -inf)`` wrappers around the score, split at ``and``:
    when any of them is false the score is ``-inf`` and the key contributes nothing."""
    out: list[Expr] = []
    e = score
    while e.op is Op.WHERE and e.args[2] == E.neg(E.INF):
        stack = [e.args[0]]
        while stack:
            x = stack.pop()
            if x.op is Op.AND:
                stack.extend(reversed(x.args))
            else:
                out.append(x)
        e = e.args[1]
    return out


Linear = tuple[int, int, tuple[tuple[int, Expr], ...], int]   # (coeff of m, coeff of p, other terms, constant)


def _linear(e: Expr, m: str, p: str, int_params: frozenset[str]) -> Linear | None:
    """``e`` as ``a*m + b*p + sum(c_i * t_i) + k`` with integer coefficients; None if it is not
    linear in ``m`` and ``p`` with integer leaves (extents, int params, other ranks)."""
    op = e.op
    if op is Op.RANK:
        return (1, 0, (), 0) if e.arg == m else (0, 1, (), 0) if e.arg == p else (0, 0, ((1, e),), 0)
    if op is Op.CONST:
        return (0, 0, (), e.arg) if isinstance(e.arg, int) and not isinstance(e.arg, bool) else None
    if op is Op.EXTENT or (op is Op.PARAM and e.arg in int_params):
        return 0, 0, ((1, e),), 0
    if op is Op.NEG:
        x = _linear(e.args[0], m, p, int_params)
        return None if x is None else _scale(x, -1)
    if op in (Op.ADD, Op.SUB):
        x, y = (_linear(a, m, p, int_params) for a in e.args)
        if x is None or y is None:
            return None
        y = y if op is Op.ADD else _scale(y, -1)
        return x[0] + y[0], x[1] + y[1], x[2] + y[2], x[3] + y[3]
    if op is Op.MUL:
        x, y = (_linear(a, m, p, int_params) for a in e.args)
        if x is None or y is None:
            return None
        for u, v in ((x, y), (y, x)):
            if u[:3] == (0, 0, ()):
                return _scale(v, u[3])
    return None


def _scale(x: Linear, k: int) -> Linear:
    return x[0] * k, x[1] * k, tuple((c * k, t) for c, t in x[2]), x[3] * k


def _affine_expr(terms: tuple[tuple[int, Expr], ...], const: int) -> Expr:
    """``sum(c_i * t_i) + const`` as a readable expression (positive terms first)."""
    merged: dict[Expr, int] = {}
    for c, t in terms:
        merged[t] = merged.get(t, 0) + c
    items = sorted(((c, t) for t, c in merged.items() if c), key=lambda ct: ct[0] < 0)
    out: Expr | None = None
    for c, t in items:
        term = t if abs(c) == 1 else E.const(abs(c)) * t
        out = (term if c > 0 else -term) if out is None else (out + term if c > 0 else out - term)
    if out is None:
        return E.const(const)
    return out if const == 0 else out + const if const > 0 else out - (-const)


def key_bound(cond: Expr, m: str, p: str, int_params: frozenset[str] = frozenset()) -> KeyBound | None:
    """A conjunct ``lhs OP rhs`` that bounds ``m`` by an affine function of ``p`` with unit
    coefficient on ``m`` (``m <= p + M - P``, ``m >= p + M - P - wl``); None otherwise."""
    if cond.op not in (Op.LE, Op.LT, Op.GE, Op.GT):
        return None
    lin = _linear(cond.args[0] - cond.args[1], m, p, int_params)
    if lin is None:
        return None
    if cond.op in (Op.GE, Op.GT):   # lhs >= rhs  <=>  rhs - lhs <= 0
        lin = _scale(lin, -1)
    a, b, terms, k = lin
    if cond.op in (Op.LT, Op.GT):   # integers: x < 0  <=>  x + 1 <= 0
        k += 1
    if any(m in free_ranks(t) or p in free_ranks(t) for _, t in terms):
        return None
    if a == 1:    # m + b*p + rest <= 0  <=>  m <= -b*p - rest
        return KeyBound("upper", -b, _affine_expr(_scale((0, 0, terms, k), -1)[2], -k), cond)
    if a == -1:   # -m + b*p + rest <= 0  <=>  m >= b*p + rest
        return KeyBound("lower", b, _affine_expr(terms, k), cond)
    return None

