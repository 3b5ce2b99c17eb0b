"""Analyses: what a cascade costs, and how many passes over each rank it needs.

``count`` feeds the roofline model: multiply-accumulates that can run on tensor
cores, special-function evaluations (exp, tanh, ...), other floating-point
arithmetic, and the bytes each input and output must move at least once.
``pass_counts`` is FuseMax's pass analysis: how many times a kernel must traverse
each reduced rank, given the cascade's dependences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from kascade.ir.cascade import Cascade, Einsum, Operator
from kascade.ir.dtypes import Kind
from kascade.ir.expr import FUNCTIONS, Expr, Op, free_ranks, tensors_read
from kascade.ir.extents import bind_extents
from kascade.ir.validate import infer_dtypes

_PLAIN = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MAX, Op.MIN, Op.NEG, Op.WHERE,
          Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE}


@dataclass(frozen=True)
class Counts:
    """Work and traffic of a cascade (or a kernel); counts add with ``+``."""
    tensor_macs: int = 0   # multiply-accumulates of contractions shaped like a matrix product
    special: int = 0       # special-function evaluations (exp, tanh, rsqrt, ...)
    flops: int = 0         # other floating-point operations (add, mul, max, select, compare ...)
    bytes_in: tuple[tuple[str, int], ...] = field(default=())    # per input: bytes read at least once
    bytes_out: tuple[tuple[str, int], ...] = field(default=())   # per output: bytes written once

    def __add__(self, other: Counts) -> Counts:
        def merge(a, b):
            out = dict(a)
            for k, v in b:
                out[k] = out.get(k, 0) + v
            return tuple(sorted(out.items()))
        return Counts(self.tensor_macs + other.tensor_macs, self.special + other.special,
                      self.flops + other.flops, merge(self.bytes_in, other.bytes_in),
                      merge(self.bytes_out, other.bytes_out))

    @property
    def tensor_flops(self) -> int:
        return 2 * self.tensor_macs

    @property
    def total_flops(self) -> int:
        return self.tensor_flops + self.special + self.flops

    @property
    def bytes(self) -> int:
        return sum(v for _, v in self.bytes_in) + sum(v for _, v in self.bytes_out)


def _strip_mask(e: Expr) -> Expr:
    while e.op is Op.WHERE and e.args[2].op is Op.CONST and e.args[2].arg == 0:
        e = e.args[1]
    return e


def _matrix_ranks(e: Expr, inputs: frozenset[str]) -> frozenset[str]:
    """The ranks ``e`` spans as a matrix operand. A rank that reaches an *input* only through
    an index read (``W13[ROWEXP[q], h, f, d]``, ``KC[BT[b, m1], m0, g, e]``) picks which matrix
    of a stack in memory is used (an expert's, a cache block), so it is a group rank there,
    not a matrix dimension. An intermediate read through an index (``EO[POS[t * K + k], d]``)
    is a row gather: all its ranks count."""
    if e.op is Op.RANK:
        return frozenset((e.arg,))
    if e.op is Op.ACCESS:
        if e.arg not in inputs:
            return free_ranks(e)
        return frozenset().union(*(_direct_ranks(i) for i in e.args))
    if e.op is Op.REDUCE:
        return _matrix_ranks(e.args[0], inputs) - frozenset(e.reduce_ranks)
    return frozenset().union(*(_matrix_ranks(a, inputs) for a in e.args))


def _direct_ranks(e: Expr) -> frozenset[str]:
    """Ranks of an index expression outside any tensor read nested in it."""
    if e.op is Op.ACCESS:
        return frozenset()
    if e.op is Op.RANK:
        return frozenset((e.arg,))
    out = frozenset().union(*(_direct_ranks(a) for a in e.args))
    return out - frozenset(e.reduce_ranks) if e.op is Op.REDUCE else out


def _is_contraction(red: Expr, inputs: frozenset[str] = frozenset()) -> bool:
    """``sum[r](a * b)`` where a and b both vary with r and each has a rank the other
    lacks as a matrix: the shape of a matrix product, which tensor cores run. Grouped
    GEMMs count (``X[PAIR[q] // K, d] * W13[ROWEXP[q], h, f, d]``: rows ``q`` of gathered
    activations times the matrix of each row's expert; see :func:`_matrix_ranks`)."""
    if red.reduce_kind != "sum":
        return False
    body = _strip_mask(red.args[0])
    if body.op is not Op.MUL:
        return False
    a, b = (free_ranks(x) for x in body.args)
    am, bm = (_matrix_ranks(x, inputs) for x in body.args)
    reduced = set(red.reduce_ranks)
    return bool(a & reduced) and bool(b & reduced) and bool(a - bm) and bool(b - am) \
        and all(tensors_read(x) for x in body.args)


class _Counter:
    def __init__(self, c: Cascade, ext: Mapping[str, int]):
        self.c, self.ext = c, ext
        self.dtypes = infer_dtypes(c)
        self.inputs = frozenset(t.name for t in c.inputs)
        self.macs = self.special = self.flops = 0

    def size(self, ranks) -> int:
        return math.prod(self.ext[self.c.rank_extent(r)] for r in ranks)

    def is_float(self, e: Expr) -> bool:
        """Does the node compute on floating-point data (not index or mask arithmetic)?"""
        return any((n.op is Op.ACCESS and self.dtypes[n.arg].kind is Kind.FLOAT)
                   or (n.op is Op.PARAM and any(p.name == n.arg and p.dtype.kind is Kind.FLOAT
                                                for p in self.c.params))
                   or (n.op is Op.CONST and isinstance(n.arg, float))
                   for n in e.walk())

    def visit(self, e: Expr) -> None:
        """Each node runs once per distinct value of its free ranks (invariant work is
        hoisted); a recurrence's step rank is free in its body, so steps count too."""
        if e.op is Op.ACCESS:
            return  # index arithmetic is not floating-point work
        if e.op is Op.REDUCE:
            n = self.size(free_ranks(e.args[0]) | set(e.reduce_ranks))
            if _is_contraction(e, self.inputs):
                self.macs += n
                for x in _strip_mask(e.args[0]).args:
                    self.visit(x)
                return
            self.flops += n
            self.visit(e.args[0])
            return
        n = self.size(free_ranks(e))
        if e.op is Op.FUNC:
            sfu, plain = FUNCTIONS[e.arg]
            self.special += n * sfu
            self.flops += n * plain
        elif e.op in _PLAIN and self.is_float(e):
            self.flops += n
        for a in e.args:
            self.visit(a)


def count(c: Cascade, extents: Mapping[str, int]) -> Counts:
    """Count ``c`` at concrete extents (every symbol the cascade needs, or derivable)."""
    ext = bind_extents(c, None, extents)
    k = _Counter(c, ext)
    for s in c.stmts:
        if isinstance(s, Einsum):
            k.visit(s.expr)
            if s.init is not None:
                k.visit(s.init)
        elif isinstance(s, Operator):
            k.visit(s.expr)
            # a selection / sort costs about log2(n) compares per element
            n = k.size(set(s.ranks) - {s.new_rank} | {s.over})
            k.flops += n * max(1, math.ceil(math.log2(max(2, ext[c.rank_extent(s.over)]))))
    bytes_in = []
    for t in c.inputs:
        full = k.size(t.ranks)
        touched = 0
        for s in c.stmts:
            for n in s.expr.walk():
                if n.op is Op.ACCESS and n.arg == t.name:
                    plain = all(i.op is Op.RANK for i in n.args)
                    used = set().union(*(free_ranks(i) for i in n.args)) if n.args else set()
                    touched = max(touched, full if plain else min(full, k.size(used)))
        bytes_in.append((t.name, touched * t.dtype.itemsize))
    bytes_out = [(name, k.size(c.ranks_of(name)) * k.dtypes[name].itemsize) for name in c.outputs]
    return Counts(k.macs, k.special, k.flops, tuple(sorted(bytes_in)), tuple(sorted(bytes_out)))


# ---- FuseMax pass analysis ------------------------------------------------------------
def _iterates(s, r: str) -> bool:
    if r in s.ranks or (isinstance(s, Operator) and s.over == r):
        return True
    return any(n.op is Op.REDUCE and r in n.reduce_ranks for n in s.expr.walk())


def passes_over(c: Cascade, r: str) -> int:
    """How many traversals of rank ``r`` a fused kernel needs.

    A statement that iterates ``r`` can run in the same traversal as a producer it
    reads elementwise along ``r`` (the value for position ``r`` is ready when that
    position is visited), but must wait for the next traversal after any producer
    whose result it needs complete: one that reduced ``r`` away, or one it reads at
    a position that is not the current one. A recurrence reading its own previous
    step does not count: that is what makes the 1-pass cascade one pass.
    """
    pass_of: dict[str, int] = {}   # statement output -> traversal that produces it (iterating r)
    ready: dict[str, int] = {}     # tensor -> traversal after which it is complete (0: before any)
    most = 0
    for s in c.stmts:
        reads = [n for n in s.expr.walk() if n.op is Op.ACCESS]
        if isinstance(s, Einsum) and s.init is not None:
            reads += [n for n in s.init.walk() if n.op is Op.ACCESS]
        if _iterates(s, r):
            p = 1
            for n in reads:
                t = n.arg
                if isinstance(s, Einsum) and t == s.name:
                    continue  # a recurrence's own previous step
                if t in pass_of:
                    live = r in c.ranks_of(t) and any(r in free_ranks(i) for i in n.args)
                    p = max(p, pass_of[t] if live else pass_of[t] + 1)
                elif ready.get(t, 0):
                    p = max(p, ready[t] + 1)
            for name in s.outputs:
                pass_of[name] = ready[name] = p
            most = max(most, p)
        else:
            done = max([ready.get(n.arg, 0) for n in reads] + [0])
            for name in s.outputs:
                ready[name] = done
    return most


def reduced_ranks(c: Cascade) -> list[str]:
    """Ranks that some statement reduces (or a recurrence steps over), in order of appearance."""
    out: list[str] = []
    for s in c.stmts:
        found = [r for n in s.expr.walk() if n.op is Op.REDUCE for r in n.reduce_ranks]
        if isinstance(s, Einsum) and s.step:
            found.append(s.step)
        if isinstance(s, Operator):
            found.append(s.over)
        out += [r for r in found if r not in out]
    return out


def pass_counts(c: Cascade) -> dict[str, int]:
    """``{rank: passes}`` for every reduced rank: 3-pass attention gives ``m: 3``."""
    return {r: passes_over(c, r) for r in reduced_ranks(c)}
