"""Statements and the Cascade: an ordered list of extended Einsums.

A :class:`Cascade` holds params (scalars), inputs (tensors with named ranks and a
dtype), extent declarations (tile sizes, aliases, derived extents) and statements in
order: :class:`Einsum` (one output tensor defined by an expression) or
:class:`Operator` (the few non-Einsum operators: ``topk`` and ``sort``).

All of them are frozen values with structural equality. :meth:`Cascade.structural_hash`
is a SHA-256 of the canonical printed text, so it is stable across processes and
Python versions (the tuning database keys on it); the cascade's ``name`` is a label
and takes no part in equality or the hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from kascade.ir.dtypes import DType
from kascade.ir.errors import CascadeError
from kascade.ir.expr import Expr, extent_of

OPERATORS = ("topk", "sort")


@dataclass(frozen=True)
class Param:
    """A scalar bound at evaluation time (``param scale: f32``)."""
    name: str
    dtype: DType


@dataclass(frozen=True)
class TensorDecl:
    """An input tensor: ``input K[b, h, m, e]: bf16``."""
    name: str
    ranks: tuple[str, ...]
    dtype: DType


@dataclass(frozen=True)
class ExtentDecl:
    """``extent M0`` (a free symbol bound later, e.g. a tile size), ``extent M0 = 64``
    (a constant) or ``extent M1 = cdiv(M, M0)`` / ``extent S = T`` (derived)."""
    name: str
    value: Expr | None = None


@dataclass(frozen=True)
class Einsum:
    """``name[ranks] = expr``.

    ``step`` names an iterative rank: the output access is written ``RM[p, m1 + 1]``
    and the statement is a recurrence evaluated for ``m1 = 0 .. M1-1``; the tensor
    then has ``M1 + 1`` entries along that rank, entry 0 being ``init`` (evaluated
    over the other output ranks) and entry ``M1`` the final value.
    """
    name: str
    ranks: tuple[str, ...]
    expr: Expr
    dtype: DType | None = None
    output: bool = False
    step: str | None = None
    init: Expr | None = None

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def label(self) -> str:
        return f"Einsum {self.name!r}"


@dataclass(frozen=True)
class Operator:
    """A non-Einsum operator with two outputs, values and indices, over ``ranks``.

    ``TV[t, k], TI[t, k] = topk[x](LG[t, x])``: the ``K`` largest values of the
    source along rank ``x`` (descending) and their positions; ``k`` is the rank in
    ``ranks`` that the source does not use, its extent ``K`` is bound like any other.
    ``SV[s], SI[s] = sort[t](KEY[t])``: a stable ascending sort along ``t``; the new
    rank ``s`` has the extent of ``t``.
    """
    kind: str
    names: tuple[str, str]
    ranks: tuple[str, ...]
    over: str
    expr: Expr
    dtypes: tuple[DType | None, DType | None] = (None, None)
    output: bool = False

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.names

    @property
    def label(self) -> str:
        return f"{self.kind} {', '.join(map(repr, self.names))}"

    @property
    def new_rank(self) -> str:
        from kascade.ir.expr import free_ranks
        fresh = [r for r in self.ranks if r not in free_ranks(self.expr)]
        if len(fresh) != 1:
            raise CascadeError(
                f"{self.label}: the outputs must have exactly one rank that the source does "
                f"not use (the rank of the result), found {fresh or 'none'}")
        return fresh[0]


Statement = Einsum | Operator


@dataclass(frozen=True)
class Cascade:
    params: tuple[Param, ...] = ()
    inputs: tuple[TensorDecl, ...] = ()
    extents: tuple[ExtentDecl, ...] = ()
    stmts: tuple[Statement, ...] = ()
    name: str = field(default="cascade", compare=False)

    # ---- lookups -------------------------------------------------------------------
    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(n for s in self.stmts if s.output for n in s.outputs)

    @property
    def einsums(self) -> tuple[Einsum, ...]:
        return tuple(s for s in self.stmts if isinstance(s, Einsum))

    def tensor_names(self) -> Iterator[str]:
        yield from (t.name for t in self.inputs)
        for s in self.stmts:
            yield from s.outputs

    def input(self, name: str) -> TensorDecl | None:
        return next((t for t in self.inputs if t.name == name), None)

    def producer(self, name: str) -> Statement | None:
        """The statement that defines tensor ``name`` (None for inputs and unknowns)."""
        return next((s for s in self.stmts if name in s.outputs), None)

    def ranks_of(self, name: str) -> tuple[str, ...]:
        decl = self.input(name)
        if decl is not None:
            return decl.ranks
        stmt = self.producer(name)
        if stmt is None:
            raise CascadeError(f"undefined tensor {name!r}")
        return stmt.ranks

    def users(self, name: str) -> tuple[Statement, ...]:
        from kascade.ir.expr import tensors_read
        return tuple(s for s in self.stmts
                     if name in tensors_read(s.expr)
                     or (isinstance(s, Einsum) and s.init is not None and name in tensors_read(s.init)))

    def extent_decl(self, name: str) -> ExtentDecl | None:
        return next((x for x in self.extents if x.name == name), None)

    def canonical_extent(self, name: str) -> str:
        """Follow alias declarations (``extent S = T``) to the symbol they stand for."""
        seen = set()
        while name not in seen:
            seen.add(name)
            decl = self.extent_decl(name)
            if decl is None or decl.value is None or decl.value.op.value != "extent":
                return name
            name = decl.value.arg
        raise CascadeError(f"extent aliases form a cycle through {name!r}")

    def rank_extent(self, rank_name: str) -> str:
        return self.canonical_extent(extent_of(rank_name))

    # ---- building ------------------------------------------------------------------
    def replace(self, **changes) -> Cascade:
        return replace(self, **changes)

    def with_stmts(self, stmts) -> Cascade:
        return replace(self, stmts=tuple(stmts))

    def fresh_name(self, base: str) -> str:
        """``base`` if no tensor, param or extent uses it yet, else ``base2``, ``base3`` ..."""
        taken = set(self.tensor_names()) | {p.name for p in self.params} | {x.name for x in self.extents}
        if base not in taken:
            return base
        i = 2
        while f"{base}{i}" in taken:
            i += 1
        return f"{base}{i}"

    # ---- identity ------------------------------------------------------------------
    def structural_hash(self) -> str:
        """SHA-256 (hex) of the canonical text; equal cascades hash equal in any process."""
        return hashlib.sha256(str(self).encode()).hexdigest()

    def __str__(self) -> str:
        from kascade.ir.printer import format_cascade
        return format_cascade(self)
