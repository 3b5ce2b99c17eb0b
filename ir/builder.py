"""A Python builder for cascades: what the front-ends (the library) use.

    cb = CascadeBuilder("gemm")
    m, n, k = ranks("m n k")
    A = cb.input("A", "m k", bf16)
    B = cb.input("B", "k n", bf16)
    cb.output("C", "m n", bf16, sum_(k, A[m, k] * B[k, n]))
    gemm = cb.build()

The text form is for people and tests; both build the same frozen values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kascade.ir.cascade import Cascade, Einsum, ExtentDecl, Operator, Param, TensorDecl
from kascade.ir.dtypes import DType
from kascade.ir.expr import Expr, ExprLike, access, as_expr, extent, param

RankSpec = str | Sequence[str | Expr]


def rank_names(spec: RankSpec) -> tuple[str, ...]:
    """``"b h p"`` or ``(b, h, p)`` (rank expressions or names) -> ``("b", "h", "p")``."""
    items = spec.split() if isinstance(spec, str) else spec
    return tuple(r.name if isinstance(r, Expr) else r for r in items)


@dataclass(frozen=True)
class TensorRef:
    """A tensor in a cascade under construction; ``T[i, j]`` builds an access."""
    name: str
    ranks: tuple[str, ...]

    def __getitem__(self, idx) -> Expr:
        idx = idx if isinstance(idx, tuple) else (idx,)
        return access(self.name, *idx)


class CascadeBuilder:
    def __init__(self, name: str = "cascade"):
        self.name = name
        self.params: list[Param] = []
        self.inputs: list[TensorDecl] = []
        self.extents: list[ExtentDecl] = []
        self.stmts: list[Einsum | Operator] = []

    def param(self, name: str, dtype: DType) -> Expr:
        self.params.append(Param(name, dtype))
        return param(name)

    def input(self, name: str, ranks: RankSpec, dtype: DType) -> TensorRef:
        self.inputs.append(TensorDecl(name, rank_names(ranks), dtype))
        return TensorRef(name, rank_names(ranks))

    def extent(self, name: str, value: ExprLike | None = None) -> Expr:
        self.extents.append(ExtentDecl(name, None if value is None else as_expr(value)))
        return extent(name)

    def einsum(self, name: str, ranks: RankSpec, expr: ExprLike, dtype: DType | None = None,
               *, output: bool = False, step: str | Expr | None = None,
               init: ExprLike | None = None) -> TensorRef:
        """``name[ranks] = expr``; with ``step`` a recurrence over that rank starting at ``init``."""
        step_name = step.name if isinstance(step, Expr) else step
        self.stmts.append(Einsum(name, rank_names(ranks), as_expr(expr), dtype, output, step_name,
                                 None if init is None else as_expr(init)))
        return TensorRef(name, rank_names(ranks))

    def output(self, name: str, ranks: RankSpec, dtype: DType, expr: ExprLike) -> TensorRef:
        return self.einsum(name, ranks, expr, dtype, output=True)

    def operator(self, kind: str, names: tuple[str, str], ranks: RankSpec, over: str | Expr,
                 source: ExprLike, dtypes: tuple[DType | None, DType | None] = (None, None),
                 *, output: bool = False) -> tuple[TensorRef, TensorRef]:
        over_name = over.name if isinstance(over, Expr) else over
        self.stmts.append(Operator(kind, names, rank_names(ranks), over_name, as_expr(source), dtypes, output))
        return TensorRef(names[0], rank_names(ranks)), TensorRef(names[1], rank_names(ranks))

    def topk(self, names: tuple[str, str], ranks: RankSpec, over: str | Expr, source: ExprLike,
             **kw) -> tuple[TensorRef, TensorRef]:
        return self.operator("topk", names, ranks, over, source, **kw)

    def sort(self, names: tuple[str, str], ranks: RankSpec, over: str | Expr, source: ExprLike,
             **kw) -> tuple[TensorRef, TensorRef]:
        return self.operator("sort", names, ranks, over, source, **kw)

    def build(self, validate: bool = True) -> Cascade:
        c = Cascade(tuple(self.params), tuple(self.inputs), tuple(self.extents), tuple(self.stmts),
                    name=self.name)
        if validate:
            from kascade.ir.validate import validate as check
            check(c)
        return c
