"""IR expressions to Triton expression text: the one place that does it.

A :class:`Binding` says what each leaf of an expression is inside a kernel: ranks are
index tiles or program-id scalars (``p -> offs_p[:, None]``), extents and params are
kernel arguments, whole nodes can stand for a variable the template computed (the
contraction ``sum[e](Q * K)`` is the ``qk`` tile; ``SD[b, g, r, p]`` is ``l_i[:, None]``),
and other input tensors become ``tl.load`` s through their pointer and stride arguments.

Lowering rules are tables keyed by op; an op or function without a rule raises
:class:`CodegenError` naming it. Every formulation uses only what both triton 3.6 and
3.9 provide as builtins (``tl.exp``, ``tl.log``, ``tl.erf`` ...): ``tanh`` and ``sigmoid``
are written with ``tl.exp`` (there is no ``tl.tanh`` and ``tl.sigmoid`` is a library
function). Operators print with Python's precedence, parenthesised only where needed;
note that ``&`` and ``|`` bind tighter than comparisons in Python, so comparisons under
them get parentheses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from kascade.ir.dtypes import DType
from kascade.ir.errors import CodegenError
from kascade.ir.expr import Expr, Op


@dataclass(frozen=True)
class TensorArg:
    """An input tensor as kernel arguments: base pointer, one stride and one size per dim."""
    pointer: str
    strides: tuple[str, ...]
    sizes: tuple[str, ...]


@dataclass(frozen=True)
class Binding:
    ranks: Mapping[str, str] = field(default_factory=dict)
    extents: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    nodes: Mapping[Expr, str] = field(default_factory=dict)
    tensors: Mapping[str, TensorArg] = field(default_factory=dict)
    in_range: frozenset[str] = frozenset()   # ranks whose values always index inside a tensor (no load mask)


# Python's binding strengths (loosest first); calls, subscripts and names are atoms.
_ATOM, _UNARY = 14, 12
_BINARY = {Op.OR: ("|", 6), Op.AND: ("&", 8), Op.ADD: ("+", 10), Op.SUB: ("-", 10),
           Op.MUL: ("*", 11), Op.DIV: ("/", 11),
           Op.LT: ("<", 5), Op.LE: ("<=", 5), Op.GT: (">", 5), Op.GE: (">=", 5), Op.EQ: ("==", 5), Op.NE: ("!=", 5)}
_CALLS = {Op.MAX: "tl.maximum", Op.MIN: "tl.minimum", Op.WHERE: "tl.where"}
# ``{0}`` is the argument parenthesised where an operator could bind into it, ``{1}`` it as is
# (for sole call arguments).
_FUNCTIONS = {
    "exp": "tl.exp({1})",
    "exp2": "tl.exp2({1})",
    "log": "tl.log({1})",
    "sqrt": "tl.sqrt({1})",
    "rsqrt": "tl.rsqrt({1})",
    "abs": "tl.abs({1})",
    "tanh": "(2 / (1 + tl.exp(-2 * {0})) - 1)",          # saturates to +-1, never NaN
    "sigmoid": "(1 / (1 + tl.exp(-{0})))",
    "silu": "({0} / (1 + tl.exp(-{0})))",
    "gelu": "(0.5 * {0} * (1 + tl.erf({0} * 0.7071067811865476)))",
    "softplus": "(tl.maximum({1}, 0.0) + tl.log(1 + tl.exp(-tl.abs({1}))))",
}
_CASTS = {DType.F16: "tl.float16", DType.BF16: "tl.bfloat16", DType.F32: "tl.float32", DType.F64: "tl.float64",
          DType.I32: "tl.int32", DType.I64: "tl.int64"}
# Triton's integer // and % truncate toward zero; the IR's floor. Refused until a kernel needs them.
_REFUSED = {Op.FLOORDIV: "integer // (Triton truncates toward zero, the IR floors)",
            Op.MOD: "integer % (Triton's remainder takes the dividend's sign, the IR's the divisor's)",
            Op.CDIV: "cdiv", Op.REDUCE: "a reduction not bound to a tile variable"}


def emit(e: Expr, b: Binding) -> str:
    """Triton expression text for ``e`` under binding ``b``."""
    return _emit(e, b)[0]


def _emit(e: Expr, b: Binding) -> tuple[str, int]:
    """(text, precedence of its outermost operator)."""
    if e in b.nodes:
        return b.nodes[e], _ATOM
    op = e.op
    if op is Op.CONST:
        return _const(e.arg)
    if op in (Op.RANK, Op.EXTENT, Op.PARAM):
        table = {Op.RANK: b.ranks, Op.EXTENT: b.extents, Op.PARAM: b.params}[op]
        if e.arg not in table:
            raise CodegenError(f"{op.value} {e.arg!r} has no binding in this kernel; bound: {sorted(table)}")
        return table[e.arg], _ATOM
    if op is Op.ACCESS:
        return load(e, b), _ATOM
    if op in _REFUSED:
        raise CodegenError(f"cannot lower {_REFUSED[op]} to Triton (in {e})")
    if op in _BINARY:
        sym, prec = _BINARY[op]
        left, right = (_emit(a, b) for a in e.args)
        # left-associative; comparisons do not chain, so both of their sides need a tighter operator
        left_paren = left[1] < prec or (prec == 5 and left[1] == prec)
        return f"{_wrap(left, left_paren)} {sym} {_wrap(right, right[1] <= prec)}", prec
    if op in _CALLS:
        return f"{_CALLS[op]}({', '.join(emit(a, b) for a in e.args)})", _ATOM
    if op is Op.NEG:
        x = _emit(e.args[0], b)
        return f"-{_wrap(x, x[1] < _UNARY or x[0].startswith('-'))}", _UNARY
    if op is Op.NOT:
        x = _emit(e.args[0], b)
        return f"~{_wrap(x, x[1] < _UNARY)}", _UNARY
    if op is Op.FUNC:
        if e.arg not in _FUNCTIONS:
            raise CodegenError(f"function {e.arg!r} has no Triton lowering; lowered: {', '.join(_FUNCTIONS)}")
        x = _emit(e.args[0], b)
        return _FUNCTIONS[e.arg].format(_wrap(x, x[1] < _ATOM), x[0]), _ATOM
    if op is Op.CAST:
        x = _emit(e.args[0], b)
        if e.arg is DType.BOOL:
            return f"({x[0]} != 0)", _ATOM
        if e.arg not in _CASTS:
            raise CodegenError(f"cast to {e.arg} has no Triton lowering")
        return f"{_wrap(x, x[1] < _ATOM)}.to({_CASTS[e.arg]})", _ATOM
    raise CodegenError(f"op {op.value!r} has no Triton lowering (in {e})")


def _wrap(x: tuple[str, int], parens: bool) -> str:
    return f"({x[0]})" if parens else x[0]


def _const(v: bool | int | float) -> tuple[str, int]:
    if isinstance(v, bool):
        return ("True" if v else "False"), _ATOM
    if isinstance(v, float) and math.isinf(v):
        return ('float("inf")' if v > 0 else 'float("-inf")'), _ATOM
    text = repr(v)
    return text, (_UNARY if text.startswith("-") else _ATOM)


def load(e: Expr, b: Binding) -> str:
    """``tl.load`` of one element per index combination of an input tensor access. Dims indexed
    by anything but an in-range rank are masked to the tensor's extent (reading 0 outside)."""
    if e.arg not in b.tensors:
        raise CodegenError(f"tensor {e.arg!r} is read as {e} but is not a kernel argument; "
                           f"arguments: {sorted(b.tensors)}")
    t = b.tensors[e.arg]
    if len(t.strides) != len(e.args):
        raise CodegenError(f"{e} indexes {len(e.args)} dims of a tensor with {len(t.strides)}")
    offsets, masks = [], []
    for idx, stride, size in zip(e.args, t.strides, t.sizes):
        i = _emit(idx, b)
        offsets.append(f"{_wrap(i, i[1] < 11)} * {stride}")
        if not (idx.op is Op.RANK and idx.arg in b.in_range):
            masks += [f"({i[0]} >= 0)", f"({i[0]} < {size})"]
    ptr = " + ".join([t.pointer, *offsets])
    return f"tl.load({ptr}, mask={' & '.join(masks)}, other=0)" if masks else f"tl.load({ptr})"
