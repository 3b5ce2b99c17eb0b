"""Dense building blocks: GEMM with epilogues, RMSNorm and the SwiGLU MLP.

Weights use torch's ``Linear`` layout ``[out, in]``. Each block also has an ``emit_*``
form that appends its statements to a :class:`CascadeBuilder` under given names, so
the decoder layer is assembled from the same pieces the standalone builders use.
"""

from __future__ import annotations

from kascade.ir.builder import CascadeBuilder, TensorRef
from kascade.ir.cascade import Cascade
from kascade.ir.dtypes import DType, bf16, f32
from kascade.ir.errors import CascadeError
from kascade.ir.expr import Expr, extent, gelu, ranks, rsqrt, silu, sum_

EPILOGUES = (None, "bias", "gelu", "silu", "bias_gelu", "bias_silu")

m, n, k, t, d, f = ranks("m n k t d f")


def gemm(epilogue: str | None = None, *, dtype: DType = bf16) -> Cascade:
    """``C[m, n] = act(sum[k](A[m, k] * B[n, k]) + BIAS[n])``: a Linear layer.

    Inputs ``A[m, k]``, ``B[n, k]`` (torch Linear weight layout), with a bias epilogue
    also ``BIAS[n]``, all ``dtype``. ``epilogue``: None, ``bias``, ``gelu`` (exact, erf),
    ``silu``, ``bias_gelu``, ``bias_silu``. Output ``C[m, n]: dtype``. No params; the
    extents come from the shapes.
    """
    if epilogue not in EPILOGUES:
        raise CascadeError(f"unknown gemm epilogue {epilogue!r}; accepted: {', '.join(map(str, EPILOGUES))}")
    cb = CascadeBuilder("gemm" + (f"_{epilogue}" if epilogue else ""))
    A = cb.input("A", "m k", dtype)
    B = cb.input("B", "n k", dtype)
    acc = sum_(k, A[m, k] * B[n, k])
    if epilogue and epilogue.startswith("bias"):
        acc = acc + cb.input("BIAS", "n", dtype)[n]
    if epilogue and epilogue.endswith("gelu"):
        acc = gelu(acc)
    if epilogue and epilogue.endswith("silu"):
        acc = silu(acc)
    cb.output("C", "m n", dtype, acc)
    return cb.build()


def emit_rmsnorm(cb: CascadeBuilder, x: TensorRef, w: TensorRef, eps: Expr, name: str, ms_name: str,
                 *, dtype: DType | None = None, output: bool = False) -> TensorRef:
    """``name = x * rsqrt(mean(x * x) + eps) * w``, normalising over ``x``'s last rank.

    The mean square is its own Einsum ``ms_name`` (a rank cannot be both reduced and
    an output rank in one expression).
    """
    *rows, col = x.ranks
    rs, c = ranks(" ".join(rows)), ranks(col)[0]
    MS = cb.einsum(ms_name, rows, sum_(c, x[(*rs, c)] * x[(*rs, c)]) / extent(col.upper()))
    return cb.einsum(name, x.ranks, x[(*rs, c)] * rsqrt(MS[rs] + eps) * w[c], dtype, output=output)


def rmsnorm(*, dtype: DType = bf16) -> Cascade:
    """RMSNorm ``Y[t, d] = X[t, d] * rsqrt(sum[d](X * X) / D + eps) * W[d]``.

    Inputs ``X[t, d]``, ``W[d]`` (``dtype``); param ``eps: f32``; output ``Y[t, d]: dtype``
    (the mean square ``MS[t]`` is an f32 intermediate).
    """
    cb = CascadeBuilder("rmsnorm")
    eps = cb.param("eps", f32)
    X = cb.input("X", "t d", dtype)
    W = cb.input("W", "d", dtype)
    emit_rmsnorm(cb, X, W, eps, "Y", "MS", dtype=dtype, output=True)
    return cb.build()


def emit_swiglu(cb: CascadeBuilder, x: TensorRef, wg: TensorRef, wu: TensorRef, wd: TensorRef, name: str,
                *, prefix: str = "", residual: TensorRef | None = None, dtype: DType | None = None,
                output: bool = False) -> TensorRef:
    """``name[t, d] = (residual +) sum[f](silu(x·wg) * (x·wu) * wd)`` over ``x[t, d]``.

    Intermediates ``{prefix}G[t, f]``, ``{prefix}U[t, f]``, ``{prefix}ACT[t, f]``.
    """
    G = cb.einsum(f"{prefix}G", "t f", sum_(d, x[t, d] * wg[f, d]))
    U = cb.einsum(f"{prefix}U", "t f", sum_(d, x[t, d] * wu[f, d]))
    ACT = cb.einsum(f"{prefix}ACT", "t f", silu(G[t, f]) * U[t, f])
    y = sum_(f, ACT[t, f] * wd[d, f])
    if residual is not None:
        y = residual[t, d] + y
    return cb.einsum(name, "t d", y, dtype, output=output)


def swiglu_mlp(*, dtype: DType = bf16) -> Cascade:
    """Llama's MLP ``Y = (silu(X WG^T) * (X WU^T)) WD^T``.

    Inputs ``X[t, d]``, ``WG[f, d]`` (gate), ``WU[f, d]`` (up), ``WD[d, f]`` (down), all
    ``dtype`` in torch Linear layout; output ``Y[t, d]: dtype``; no params.
    """
    cb = CascadeBuilder("swiglu_mlp")
    X = cb.input("X", "t d", dtype)
    WG = cb.input("WG", "f d", dtype)
    WU = cb.input("WU", "f d", dtype)
    WD = cb.input("WD", "d f", dtype)
    emit_swiglu(cb, X, WG, WU, WD, "Y", dtype=dtype, output=True)
    return cb.build()
