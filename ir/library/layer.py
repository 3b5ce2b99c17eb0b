"""A Llama-style decoder layer on one sequence, assembled from the library's blocks."""

from __future__ import annotations

from kascade.ir.builder import CascadeBuilder, TensorRef
from kascade.ir.cascade import Cascade
from kascade.ir.dtypes import DType, bf16, f32
from kascade.ir.expr import INF, extent, ranks, sum_, where
from kascade.ir.library.attention import softmax_av
from kascade.ir.library.mlp import emit_rmsnorm, emit_swiglu
from kascade.ir.library.moe import emit_moe

t, s, d, g, r, e, x = ranks("t s d g r e x")


def _rope(cb: CascadeBuilder, name: str, src: TensorRef, pos, COS: TensorRef, SIN: TensorRef) -> TensorRef:
    """Rotary embedding, rotate-half convention: ``x * cos + rotate_half(x) * sin`` along ``e``,
    where ``rotate_half(x)[e] = -x[e + E/2]`` for ``e < E/2`` and ``x[e - E/2]`` above."""
    half = extent("E") // 2
    idx = ranks(" ".join(src.ranks[:-1]))
    sign = where(e < half, -1, 1)
    body = src[(*idx, e)] * COS[pos, e] + sign * src[(*idx, (e + half) % extent("E"))] * SIN[pos, e]
    return cb.einsum(name, src.ranks, body)


def decoder_layer(moe: bool = False, *, top_k_renormalize: bool = True, moe_form: str = "dense",
                  dtype: DType = bf16) -> Cascade:
    """One Llama decoder layer over the ``T`` tokens of one sequence (prefill, causal).

    ``HA = X + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))`` with
    ``n1 = rmsnorm(X, WN1)``; ``Y = HA + mlp(rmsnorm(HA, WN2))``.

    Inputs (``dtype`` unless said): ``X[t, d]``; ``WN1[d]``, ``WN2[d]`` (norm weights);
    ``WQ[g, r, e, d]`` (q_proj.weight ``(G*R*E, D)`` viewed; query head ``g * R + r``),
    ``WK[g, e, d]``, ``WV[g, e, d]``, ``WO[d, g, r, e]`` (o_proj.weight ``(D, G*R*E)``
    viewed); ``COS[t, e]``, ``SIN[t, e]``: f32 (HF's rotary tables, halves repeated);
    MLP ``WG[f, d]``, ``WU[f, d]``, ``WD[d, f]``; or with ``moe`` the router ``WR[x, d]``
    and experts ``W13[x, h, f, d]``, ``W2[x, d, f]`` (see ``moe``; extent ``K`` bound by
    the caller). Params ``scale: f32`` (usually ``E ** -0.5``), ``eps: f32``.
    Keys use rank ``s`` with ``extent S = T``; attention is the causal 2-pass form.
    Output ``Y[t, d]: dtype``.
    """
    cb = CascadeBuilder("decoder_layer" + ("_moe" if moe else ""))
    scale = cb.param("scale", f32)
    eps = cb.param("eps", f32)
    X = cb.input("X", "t d", dtype)
    WN1 = cb.input("WN1", "d", dtype)
    WQ = cb.input("WQ", "g r e d", dtype)
    WK = cb.input("WK", "g e d", dtype)
    WV = cb.input("WV", "g e d", dtype)
    WO = cb.input("WO", "d g r e", dtype)
    COS = cb.input("COS", "t e", f32)
    SIN = cb.input("SIN", "t e", f32)
    WN2 = cb.input("WN2", "d", dtype)
    if moe:
        WR = cb.input("WR", "x d", dtype)
        W13 = cb.input("W13", "x h f d", dtype)
        W2 = cb.input("W2", "x d f", dtype)
    else:
        WG = cb.input("WG", "f d", dtype)
        WU = cb.input("WU", "f d", dtype)
        WD = cb.input("WD", "d f", dtype)
    cb.extent("S", extent("T"))

    XN = emit_rmsnorm(cb, X, WN1, eps, "XN", "MS1")
    QP = cb.einsum("QP", "g r t e", sum_(d, XN[t, d] * WQ[g, r, e, d]))
    KP = cb.einsum("KP", "g s e", sum_(d, XN[s, d] * WK[g, e, d]))
    VP = cb.einsum("VP", "g s e", sum_(d, XN[s, d] * WV[g, e, d]))
    QR = _rope(cb, "QR", QP, t, COS, SIN)
    KR = _rope(cb, "KR", KP, s, COS, SIN)
    # causal; S = T, so bottom-right alignment is plain s <= t
    cb.einsum("QK", "g r s t", where(s <= t, sum_(e, QR[g, r, t, e] * KR[g, s, e]) * scale, -INF))
    AO = softmax_av(cb, "g r", "s", "t", "e", VP[g, s, e], None, deferred=True, out="AO", output=False)
    HA = cb.einsum("HA", "t d", X[t, d] + sum_((g, r, e), AO[g, r, t, e] * WO[d, g, r, e]))

    HN = emit_rmsnorm(cb, HA, WN2, eps, "HN", "MS2")
    if moe:
        LG = cb.einsum("LG", "t x", sum_(d, HN[t, d] * WR[x, d]))
        emit_moe(cb, HN, LG, W13, W2, "Y", top_k_renormalize=top_k_renormalize, form=moe_form, residual=HA,
                 dtype=dtype, output=True)
    else:
        emit_swiglu(cb, HN, WG, WU, WD, "Y", prefix="M", residual=HA, dtype=dtype, output=True)
    return cb.build()
