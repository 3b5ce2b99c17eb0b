"""IR expressions -> CUDA C++ expressions, for the scalar epilogues of generated kernels.

The emitter is table-driven: one row per IR op and one per elementwise function, so
what CUDA code an op becomes is read in one place, and an op without a row raises
:class:`CudaEmitError` naming it. Float arithmetic is single precision (``float``):
constants are written with an ``f`` suffix and functions are the ``f`` variants
(``tanh`` -> ``tanhf``). Leaves that stand for kernel values (params, scalar tensor
reads such as the raw score ``S``, ranks, extents) are bound by name to C++ names by
the caller; an unbound leaf is an error too. The output is fully parenthesised, so
it is correct without operator precedence, if not pretty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from kascade.ir.dtypes import DType
from kascade.ir.errors import CodegenError
from kascade.ir.expr import FUNCTIONS, Expr, Op


class CudaEmitError(CodegenError):
    """An IR expression that has no CUDA C++ form here; the message names the op."""


_POS_INF = "__int_as_float(0x7f800000)"
_NEG_INF = "__int_as_float(0xff800000)"

# {a}, {b}, {c}: the operands, already emitted.
_OPS: dict[Op, str] = {
    Op.NEG: "(-{a})",
    Op.NOT: "(!{a})",
    Op.ADD: "({a} + {b})",
    Op.SUB: "({a} - {b})",
    Op.MUL: "({a} * {b})",
    Op.DIV: "({a} / {b})",
    Op.MAX: "fmaxf({a}, {b})",
    Op.MIN: "fminf({a}, {b})",
    Op.LT: "({a} < {b})",
    Op.LE: "({a} <= {b})",
    Op.GT: "({a} > {b})",
    Op.GE: "({a} >= {b})",
    Op.EQ: "({a} == {b})",
    Op.NE: "({a} != {b})",
    Op.AND: "({a} && {b})",
    Op.OR: "({a} || {b})",
    Op.WHERE: "({a} ? {b} : {c})",
}

# {x}: the argument, already emitted (it may appear twice: the emitted code is pure).
_FUNCTIONS: dict[str, str] = {
    "exp": "expf({x})",
    "exp2": "exp2f({x})",
    "log": "logf({x})",
    "sqrt": "sqrtf({x})",
    "rsqrt": "rsqrtf({x})",
    "tanh": "tanhf({x})",
    "sigmoid": "(1.0f / (1.0f + expf(-({x}))))",
    "silu": "(({x}) / (1.0f + expf(-({x}))))",
    "gelu": "(0.5f * ({x}) * (1.0f + erff(({x}) * 0.70710678118654752f)))",
    "softplus": "(fmaxf({x}, 0.0f) + log1pf(expf(-fabsf({x}))))",
    "abs": "fabsf({x})",
}
assert set(_FUNCTIONS) == set(FUNCTIONS), "every IR function needs a CUDA row"

_CASTS: dict[DType, str] = {DType.F32: "((float)({x}))", DType.I32: "((int)({x}))", DType.I64: "((long long)({x}))",
                            DType.BOOL: "((bool)({x}))"}


def cuda_literal(value: int | float | bool) -> str:
    """A C++ literal for an IR constant: ``true``, ``3``, ``0.5f``, ``__int_as_float(...)`` for infinities."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return _POS_INF if value > 0 else _NEG_INF
    text = repr(float(value))
    return f"{text}f" if any(ch in text for ch in ".e") else f"{text}.0f"


def emit_cuda(e: Expr, names: Mapping[str, str]) -> str:
    """The CUDA C++ expression computing ``e``; ``names`` maps leaf names (params, scalar
    tensors, ranks, extents) to the C++ names that hold them."""
    if e.op is Op.CONST:
        return cuda_literal(e.arg)
    if e.op in (Op.PARAM, Op.RANK, Op.EXTENT) or (e.op is Op.ACCESS and not e.args):
        if e.arg not in names:
            raise CudaEmitError(f"{e.op.value} {e.arg!r} has no C++ name bound; bound names: {sorted(names)}")
        return names[e.arg]
    if e.op is Op.FUNC:
        if e.arg not in _FUNCTIONS:
            raise CudaEmitError(f"function {e.arg!r} has no CUDA form; accepted: {', '.join(_FUNCTIONS)}")
        return _FUNCTIONS[e.arg].format(x=emit_cuda(e.args[0], names))
    if e.op is Op.CAST:
        if e.arg not in _CASTS:
            raise CudaEmitError(f"cast to {e.arg} has no scalar CUDA form; accepted: {', '.join(map(str, _CASTS))}")
        return _CASTS[e.arg].format(x=emit_cuda(e.args[0], names))
    if e.op not in _OPS:
        supported = sorted(op.value for op in _OPS) + ["const", "param", "rank", "extent", "func", "cast"]
        raise CudaEmitError(f"op {e.op.value!r} (in {e}) has no CUDA scalar form; accepted: {', '.join(supported)}")
    operands = dict(zip("abc", (emit_cuda(a, names) for a in e.args)))
    return _OPS[e.op].format(**operands)
