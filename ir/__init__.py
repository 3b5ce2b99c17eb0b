"""The Einsum-cascade IR: expressions, statements, cascades, their text form and checker.

This package imports nothing else from kascade; every other layer builds on it.
"""

from kascade.ir.builder import CascadeBuilder, TensorRef
from kascade.ir.cascade import Cascade, Einsum, ExtentDecl, Operator, Param, TensorDecl
from kascade.ir.dtypes import DType, Kind, bf16, boolean, f16, f32, f64, i32, i64
from kascade.ir.errors import CascadeError, DTypeError, IRSyntaxError, KascadeError, RewriteError, ShapeError
from kascade.ir.expr import (
                               INF,
                               Expr,
                               Op,
                               abs_,
                               access,
                               cast,
                               cdiv,
                               const,
                               exp,
                               exp2,
                               extent,
                               free_ranks,
                               func,
                               gelu,
                               log,
                               logical_and,
                               logical_not,
                               logical_or,
                               max_,
                               maximum,
                               min_,
                               minimum,
                               param,
                               rank,
                               ranks,
                               reduce,
                               rsqrt,
                               sigmoid,
                               silu,
                               softplus,
                               sqrt,
                               sum_,
                               tanh,
                               where,
)
from kascade.ir.parser import parse, parse_expr
from kascade.ir.printer import format_cascade, format_expr
from kascade.ir.validate import infer_dtypes, validate

__all__ = [
    "CascadeBuilder", "TensorRef", "Cascade", "Einsum", "ExtentDecl", "Operator", "Param",
    "TensorDecl", "DType", "Kind", "bf16", "boolean", "f16", "f32", "f64", "i32", "i64",
    "CascadeError", "DTypeError", "IRSyntaxError", "KascadeError", "RewriteError", "ShapeError",
    "INF", "Expr", "Op", "abs_", "access", "cast", "cdiv", "const", "exp", "exp2", "extent",
    "free_ranks", "func", "gelu", "log", "logical_and", "logical_not", "logical_or", "max_",
    "maximum", "min_", "minimum", "param", "rank", "ranks", "reduce", "rsqrt", "sigmoid", "silu",
    "softplus", "sqrt", "sum_", "tanh", "where", "parse", "parse_expr", "format_cascade",
    "format_expr", "infer_dtypes", "validate",
]
