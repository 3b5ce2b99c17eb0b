"""The reference evaluator: runs any valid :class:`~kascade.ir.Cascade` with torch.

It is the numerics oracle for every kernel kascade generates, so it is written to be
obviously right, and it imports ``kascade.ir`` only (a bug shared with the passes or
the code generators would otherwise go unseen). Its one concession to speed: a sum of
a product, ``sum[e](Q * K)``, is a ``torch.einsum`` and never materialises the product.

A value is a torch tensor together with the rank names its dims stand for; values
combine by aligning on rank names (permute + unsqueeze) and torch broadcasting.
Floats are computed in one dtype (float64 or float32) whatever the cascade declares:
declared float dtypes say how a kernel stores data, not what the function is. Casts
(``bf16(x)``) do model rounding. Out-of-range reads of float tensors yield NaN, so an
unmasked read past the end poisons the result instead of hiding in it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from kascade.ir.cascade import Cascade, Einsum, Operator
from kascade.ir.dtypes import DType, Kind
from kascade.ir.errors import CascadeError, DTypeError, ShapeError
from kascade.ir.expr import COMPARISONS, Expr, Op, extent_of
from kascade.ir.extents import bind_extents as ir_bind_extents
from kascade.ir.validate import infer_dtypes, validate

_COMPUTE_DTYPES = (torch.float32, torch.float64)
_ROUNDING_CASTS = {DType.BF16: torch.bfloat16, DType.F16: torch.float16, DType.F32: torch.float32}
_FUNCTIONS = {
    "exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": lambda x: x * torch.sigmoid(x),
    "gelu": lambda x: torch.nn.functional.gelu(x, approximate="none"),
    "softplus": lambda x: torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device)),
    "abs": torch.abs,
}
_ARITH = {Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul, Op.MOD: torch.remainder,
          Op.FLOORDIV: lambda a, b: torch.div(a, b, rounding_mode="floor"),
          Op.CDIV: lambda a, b: -torch.div(-a, b, rounding_mode="floor"),
          Op.MAX: torch.maximum, Op.MIN: torch.minimum}
_COMPARE = {Op.LT: torch.lt, Op.LE: torch.le, Op.GT: torch.gt, Op.GE: torch.ge, Op.EQ: torch.eq, Op.NE: torch.ne}


class Value(NamedTuple):
    """A tensor whose dim ``i`` stands for rank ``ranks[i]`` (a 0-dim tensor has no ranks)."""
    t: torch.Tensor
    ranks: tuple[str, ...]


def _kind(t: torch.Tensor) -> Kind:
    return Kind.BOOL if t.dtype == torch.bool else Kind.FLOAT if t.is_floating_point() else Kind.INT


def _union(*rank_tuples: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(r for rs in rank_tuples for r in rs))


def _align(v: Value, target: tuple[str, ...]) -> torch.Tensor:
    """``v``'s tensor with one dim per rank of ``target`` (size 1 where ``v`` lacks the rank)."""
    t = v.t.permute(sorted(range(len(v.ranks)), key=lambda i: target.index(v.ranks[i])))
    for pos, r in enumerate(target):
        if r not in v.ranks:
            t = t.unsqueeze(pos)
    return t


def bind_extents(cascade: Cascade, inputs: Mapping[str, torch.Tensor],
                 extents: Mapping[str, int] | None = None) -> dict[str, int]:
    """Every extent the cascade names, from the inputs' shapes, ``extents`` and declarations
    (see :func:`kascade.ir.extents.bind_extents`)."""
    return ir_bind_extents(cascade, {n: tuple(t.shape) for n, t in inputs.items()}, extents)


def evaluate(cascade: Cascade, inputs: Mapping[str, torch.Tensor], params: Mapping[str, int | float] | None = None,
             extents: Mapping[str, int] | None = None, *, dtype: torch.dtype = torch.float64, device=None,
             keep_all: bool = False) -> dict[str, torch.Tensor]:
    """Run ``cascade`` on ``inputs`` (bound by tensor name) and return its outputs by name.

    Float tensors are computed and returned in ``dtype`` (float32 or float64), integer
    tensors as int64, bool as bool. ``keep_all`` also returns every intermediate tensor
    (inputs are not returned). A recurrent tensor over rank ``r`` has ``R + 1`` entries
    along ``r``. Extents come from :func:`bind_extents`.
    """
    validate(cascade)
    if dtype not in _COMPUTE_DTYPES:
        raise DTypeError(f"the reference evaluator computes in torch.float32 or torch.float64, got {dtype}")
    declared = {t.name: t for t in cascade.inputs}
    missing = [n for n in declared if n not in inputs]
    unknown = [n for n in inputs if n not in declared]
    if unknown:
        raise CascadeError(f"unknown input(s) {unknown}; the cascade's inputs are {list(declared)}")
    if missing:
        raise CascadeError(f"missing input(s) {missing}; the cascade's inputs are {list(declared)}")
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"input {name!r} must be a torch.Tensor, got {type(t).__name__}")
        if _kind(t) is not declared[name].dtype.kind or t.is_complex():
            raise DTypeError(f"input {name!r} is declared {declared[name].dtype} but given a {t.dtype} tensor; "
                             f"accepted: any torch {declared[name].dtype.kind.name.lower()} dtype")
    if device is None:
        device = next((t.device for t in inputs.values()), torch.device("cpu"))
    sizes = bind_extents(cascade, inputs, extents)
    run = _Run(cascade, sizes, dtype, torch.device(device))
    run.bind_params(params or {})
    for name, t in inputs.items():
        run.env[name] = run.store(t, declared[name].dtype.kind)
    for s in cascade.stmts:
        run.einsum(s) if isinstance(s, Einsum) else run.operator(s)
    names = [n for s in cascade.stmts for n in s.outputs if keep_all or s.output]
    return {n: run.env[n] for n in names}


class _Run:
    """The state of one evaluation: bound extents, tensors so far, and rank overrides."""

    def __init__(self, cascade: Cascade, sizes: dict[str, int], dtype: torch.dtype, device: torch.device):
        self.c, self.sizes, self.dtype, self.device = cascade, sizes, dtype, device
        self.kinds = {n: d.kind for n, d in infer_dtypes(cascade).items()}
        self.env: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.Tensor] = {}
        self.rank_values: dict[str, Value] = {}  # the step rank of a recurrence, bound to one step

    def size(self, rank: str) -> int:
        return self.sizes[extent_of(rank)]

    def torch_dtype(self, kind: Kind) -> torch.dtype:
        return {Kind.FLOAT: self.dtype, Kind.INT: torch.int64, Kind.BOOL: torch.bool}[kind]

    def scalar(self, v: bool | int | float, kind: Kind) -> Value:
        return Value(torch.tensor(v, dtype=self.torch_dtype(kind), device=self.device), ())

    def store(self, t: torch.Tensor, kind: Kind) -> torch.Tensor:
        """``t`` on the device in the evaluator's dtype for ``kind`` (compute float, int64, bool)."""
        if kind is Kind.FLOAT:
            return t.to(device=self.device, dtype=self.dtype)
        if kind is Kind.INT:
            return (torch.trunc(t) if t.is_floating_point() else t).to(device=self.device, dtype=torch.int64)
        return t.to(device=self.device) != 0

    def bind_params(self, params: Mapping[str, int | float]) -> None:
        declared = {p.name: p.dtype for p in self.c.params}
        unknown = [n for n in params if n not in declared]
        missing = [n for n in declared if n not in params]
        if unknown or missing:
            raise CascadeError(f"params: missing {missing}, unknown {unknown}; the cascade's params are "
                               f"{list(declared)}")
        for name, v in params.items():
            # a Python float goes through float64, never torch's float32 default
            t = (torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else None)
                 if isinstance(v, (bool, int, float)) else v)
            if not isinstance(t, torch.Tensor) or t.ndim != 0 or declared[name].kind < _kind(t) or t.is_complex():
                raise DTypeError(f"param {name!r} is declared {declared[name]} but given {v!r}; accepted: "
                                 f"a Python number or 0-dim tensor of kind {declared[name].kind.name.lower()} "
                                 "or lower (bool < int < float)")
            self.params[name] = self.store(t, declared[name].kind)

    # ---- statements ---------------------------------------------------------------
    def materialise(self, v: Value, ranks: tuple[str, ...], kind: Kind, out: torch.Tensor | None = None):
        """``v`` broadcast over ``ranks`` into ``out`` (a fresh tensor by default, never an input's storage)."""
        if out is None:
            out = torch.empty([self.size(r) for r in ranks], dtype=self.torch_dtype(kind), device=self.device)
        return out.copy_(self.store(_align(v, ranks), kind))

    def einsum(self, s: Einsum) -> None:
        kind = self.kinds[s.name]
        if s.step is None:
            self.env[s.name] = self.materialise(self.ev(s.expr), s.ranks, kind)
            return
        d, steps = s.ranks.index(s.step), self.size(s.step)
        others = tuple(r for r in s.ranks if r != s.step)
        buf = torch.empty([self.size(r) + (r == s.step) for r in s.ranks], dtype=self.torch_dtype(kind),
                          device=self.device)
        self.materialise(self.ev(s.init), others, kind, out=buf.select(d, 0))
        self.env[s.name] = buf  # the body reads its previous step through the general access path
        for j in range(steps):
            self.rank_values[s.step] = self.scalar(j, Kind.INT)
            self.materialise(self.ev(s.expr), others, kind, out=buf.select(d, j + 1))
        del self.rank_values[s.step]

    def operator(self, s: Operator) -> None:
        new, n = s.new_rank, self.size(s.over)
        others = tuple(r for r in s.ranks if r != new)
        src = self.materialise(self.ev(s.expr), others + (s.over,), self.kinds[s.names[0]])
        if s.kind == "topk":
            k = self.size(new)
            if k > n:
                raise ShapeError(f"{s.label}: {extent_of(new)} = {k} exceeds the extent {extent_of(s.over)} = {n} "
                                 f"of the rank it selects over; accepted: {extent_of(new)} <= {n}")
            values, indices = torch.topk(src, k, dim=-1, largest=True, sorted=True)
        else:
            values, indices = torch.sort(src, dim=-1, stable=True)
        order = others + (new,)
        for name, t in zip(s.names, (values, indices)):
            self.env[name] = self.materialise(Value(t, order), s.ranks, self.kinds[name])

    # ---- expressions --------------------------------------------------------------
    def ev(self, e: Expr) -> Value:
        op = e.op
        if op is Op.CONST:
            v = e.arg
            return self.scalar(v, Kind.BOOL if isinstance(v, bool) else Kind.INT if isinstance(v, int) else Kind.FLOAT)
        if op is Op.RANK:  # a rank is all its values, unless a recurrence has bound it to one step
            return self.rank_values.get(e.arg) or Value(torch.arange(self.size(e.arg), device=self.device), (e.arg,))
        if op is Op.EXTENT:
            return self.scalar(self.sizes[e.arg], Kind.INT)
        if op is Op.PARAM:
            return Value(self.params[e.arg], ())
        if op is Op.ACCESS:
            return self.access(e)
        if op is Op.REDUCE:
            return self.reduce(e)
        return self.apply(e, [self.ev(a) for a in e.args])

    def apply(self, e: Expr, vals: list[Value]) -> Value:
        """Node ``e``'s operation on its evaluated arguments, promoted bool < int < float."""
        op = e.op
        if op is Op.FUNC:
            (x,) = self.promote(vals, Kind.FLOAT)
            return Value(_FUNCTIONS[e.arg](x.t), x.ranks)
        if op is Op.CAST:
            return self.cast(e.arg, vals[0])
        if op is Op.NEG:
            (x,) = self.promote(vals, Kind.INT)
            return Value(-x.t, x.ranks)
        if op is Op.NOT:
            return Value(torch.logical_not(vals[0].t), vals[0].ranks)
        ranks = _union(*(v.ranks for v in vals))
        if op is Op.WHERE:  # torch.where does not propagate NaN from the branch it does not select
            a, b = self.promote(vals[1:])
            return Value(torch.where(_align(vals[0], ranks), _align(a, ranks), _align(b, ranks)), ranks)
        if op in (Op.AND, Op.OR):
            fn = torch.logical_and if op is Op.AND else torch.logical_or
            return Value(fn(_align(vals[0], ranks), _align(vals[1], ranks)), ranks)
        if op is Op.DIV:
            fn, at_least = torch.div, Kind.FLOAT
        elif op in COMPARISONS:
            fn, at_least = _COMPARE[op], Kind.BOOL
        else:  # + - * // % cdiv turn bools into ints (torch's bool + bool is a logical or); max / min do not
            fn, at_least = _ARITH[op], Kind.BOOL if op in (Op.MAX, Op.MIN) else Kind.INT
        a, b = self.promote(vals, at_least)
        return Value(fn(_align(a, ranks), _align(b, ranks)), ranks)

    def promote(self, vals: list[Value], at_least: Kind = Kind.BOOL) -> list[Value]:
        """Convert every value to the largest kind among them (and ``at_least``): bool < int < float."""
        kind = max([at_least, *(_kind(v.t) for v in vals)])
        return [Value(self.store(v.t, kind) if _kind(v.t) is not kind else v.t, v.ranks) for v in vals]

    def cast(self, to: DType, x: Value) -> Value:
        if to.kind is Kind.BOOL:
            return Value(x.t != 0, x.ranks)
        if to.kind is Kind.INT:  # truncation toward zero
            return Value(self.store(x.t, Kind.INT), x.ranks)
        (x,) = self.promote([x], Kind.FLOAT)
        if to in _ROUNDING_CASTS:  # round through the narrower type to model its precision
            return Value(x.t.to(_ROUNDING_CASTS[to]).to(self.dtype), x.ranks)
        return x

    def access(self, e: Expr) -> Value:
        t = self.env[e.arg]
        idx = e.args
        plain = [i.arg for i in idx if i.op is Op.RANK and i.arg not in self.rank_values]
        if len(plain) == len(idx) == len(set(plain)) and all(t.shape[d] >= self.size(r) for d, r in enumerate(plain)):
            # fast path: a view; a recurrent tensor's extra entry (R + 1 along its step rank) is cut off
            for d, r in enumerate(plain):
                t = t.narrow(d, 0, self.size(r))
            return Value(t, tuple(plain))
        vals = [self.ev(i) for i in idx]
        ranks = _union(*(v.ranks for v in vals))
        aligned = [_align(v, ranks) for v in vals]
        shape = torch.broadcast_shapes(*(a.shape for a in aligned))
        outside = torch.zeros(shape, dtype=torch.bool, device=self.device)
        for d, a in enumerate(aligned):
            outside = outside | (a < 0) | (a >= t.shape[d])
        if t.numel() == 0:  # nothing to clamp to
            fill = math.nan if t.is_floating_point() else 0
            return Value(torch.full(shape, fill, dtype=t.dtype, device=self.device), ranks)
        got = t[tuple(a.clamp(0, t.shape[d] - 1) for d, a in enumerate(aligned))]
        if t.is_floating_point():  # poison: an unmasked out-of-range read must show up in the result
            got = torch.where(outside, torch.full((), math.nan, dtype=t.dtype, device=self.device), got)
        return Value(got, ranks)

    def reduce(self, e: Expr) -> Value:
        kind, over = e.arg
        empty = any(self.size(r) == 0 for r in over)
        factors = _factors(e.args[0]) if kind == "sum" and not empty else []
        if len(factors) >= 2:
            vals = [self.ev(f) for f in factors]
            if any(_kind(v.t) is Kind.FLOAT for v in vals):
                return self.contract(self.promote(vals), over)
            body = functools.reduce(lambda a, b: self.apply(Expr(Op.MUL), [a, b]), vals)
        else:
            body = self.ev(e.args[0])
        # the body is materialised over every reduced rank, even one it does not depend on
        ranks = body.ranks + tuple(r for r in over if r not in body.ranks)
        t = _align(body, ranks).expand([*body.t.shape, *(self.size(r) for r in ranks[len(body.ranks):])])
        dims = [ranks.index(r) for r in over]
        rest = tuple(r for r in ranks if r not in over)
        if kind == "sum":
            return Value(torch.sum(t, dim=dims), rest)
        if empty:
            return Value(torch.full([self.size(r) for r in rest], _identity(kind, t.dtype), dtype=t.dtype,
                                    device=self.device), rest)
        return Value((torch.amax if kind == "max" else torch.amin)(t, dim=dims), rest)

    def contract(self, vals: list[Value], over: tuple[str, ...]) -> Value:
        """``sum[over](f1 * f2 * ...)`` with torch.einsum, never materialising the broadcast product."""
        ranks = _union(*(v.ranks for v in vals))
        if len(ranks) > 52:
            raise CascadeError(f"a product over {len(ranks)} ranks exceeds torch.einsum's 52 letters")
        letter = {r: chr(ord("a") + i) if i < 26 else chr(ord("A") + i - 26) for i, r in enumerate(ranks)}
        rest = tuple(r for r in ranks if r not in over)
        spec = ",".join("".join(letter[r] for r in v.ranks) for v in vals) + "->" + "".join(letter[r] for r in rest)
        out = torch.einsum(spec, *(v.t for v in vals))
        absent = math.prod(self.size(r) for r in over if r not in ranks)  # summing a constant over R: times R
        return Value(out * absent if absent != 1 else out, rest)


def _factors(e: Expr) -> list[Expr]:
    """The leaves of a product tree ``f1 * f2 * ...``."""
    if e.op is Op.MUL:
        return [f for a in e.args for f in _factors(a)]
    return [e]


def _identity(kind: str, dtype: torch.dtype) -> bool | int | float:
    """The value of an empty max / min reduction: the bottom / top of the dtype."""
    if dtype == torch.bool:
        return kind == "min"
    lo, hi = (-math.inf, math.inf) if dtype.is_floating_point else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    return lo if kind == "max" else hi
