"""Mixture-of-Experts: softmax routing, top-k, SwiGLU experts and the weighted combine.

Ranks: tokens ``t``, hidden ``d``, experts ``x``, expert FFN inner ``f``, choice ``k``
(``K`` experts per token, bound by the caller), and ``h`` (2: gate / up) in vLLM's
fused_moe weight layout: ``w1`` of shape ``(E, 2F, D)`` viewed as ``W13[x, h, f, d]``
(gate ``W13[x, 0, f, d]``, up ``W13[x, 1, f, d]``) and ``w2`` as ``W2[x, d, f]``.
"""

from __future__ import annotations

from kascade.ir.builder import CascadeBuilder, TensorRef
from kascade.ir.cascade import Cascade
from kascade.ir.dtypes import DType, bf16, f32, i32
from kascade.ir.errors import CascadeError
from kascade.ir.expr import exp, max_, ranks, silu, sum_, where

FORMS = ("dense", "gather")

t, d, x, f, k, h = ranks("t d x f k h")


def emit_moe(cb: CascadeBuilder, X: TensorRef, LG: TensorRef, W13: TensorRef, W2: TensorRef, name: str, *,
             top_k_renormalize: bool, form: str, residual: TensorRef | None = None, dtype: DType | None = None,
             output: bool = False) -> TensorRef:
    """Append the MoE block for hidden states ``X[t, d]`` and router logits ``LG[t, x]``.

    ``name[t, d] = (residual +) sum over the token's top-K experts of TW * expert(X)``.
    """
    if form not in FORMS:
        raise CascadeError(f"unknown MoE form {form!r}; accepted: {', '.join(FORMS)}")
    # softmax over the experts, then the K most probable
    MX = cb.einsum("MX", "t", max_(x, LG[t, x]))
    EX = cb.einsum("EX", "t x", exp(LG[t, x] - MX[t]))
    SE = cb.einsum("SE", "t", sum_(x, EX[t, x]))
    P = cb.einsum("P", "t x", EX[t, x] / SE[t])
    TV, TI = cb.topk(("TV", "TI"), "t k", x, P[t, x])
    if top_k_renormalize:
        TS = cb.einsum("TS", "t", sum_(k, TV[t, k]))
        TW = cb.einsum("TW", "t k", TV[t, k] / TS[t])
    else:
        TW = TV
    if form == "dense":
        # the routing tensor: zero except at each token's chosen experts; every expert runs on
        # every token here, and a later pass turns the sparsity into expert-grouped GEMMs
        R = cb.einsum("R", "t x", sum_(k, where(TI[t, k].eq(x), TW[t, k], 0.0)))
        GU = cb.einsum("GU", "t x h f", sum_(d, X[t, d] * W13[x, h, f, d]))
        ACT = cb.einsum("ACT", "t x f", silu(GU[t, x, 0, f]) * GU[t, x, 1, f])
        EO = cb.einsum("EO", "t x d", sum_(f, ACT[t, x, f] * W2[x, d, f]))
        y = sum_(x, R[t, x] * EO[t, x, d])
    else:
        # one expert per (token, choice), its weights read through the chosen index
        GU = cb.einsum("GU", "t k h f", sum_(d, X[t, d] * W13[TI[t, k], h, f, d]))
        ACT = cb.einsum("ACT", "t k f", silu(GU[t, k, 0, f]) * GU[t, k, 1, f])
        EO = cb.einsum("EO", "t k d", sum_(f, ACT[t, k, f] * W2[TI[t, k], d, f]))
        y = sum_(k, TW[t, k] * EO[t, k, d])
    if residual is not None:
        y = residual[t, d] + y
    return cb.einsum(name, "t d", y, dtype, output=output)


def moe(top_k_renormalize: bool = True, router: bool = False, form: str = "dense", *,
        dtype: DType = bf16) -> Cascade:
    """A Mixture-of-Experts block with SwiGLU experts (Mixtral / vLLM fused_moe semantics).

    Inputs: ``X[t, d]`` (``dtype``); router logits ``LG[t, x]: f32``, or with ``router``
    a router weight ``WR[x, d]`` (``dtype``) and ``LG[t, x] = sum[d](X * WR)`` computed;
    ``W13[x, h, f, d]`` (``H = 2``: gate, up) and ``W2[x, d, f]`` (``dtype``).
    Routing: ``P = softmax over x of LG``; ``TV[t, k], TI[t, k] = topk[x](P)``; weights
    ``TW = TV / sum[k](TV)`` with ``top_k_renormalize``, else ``TV``. Extent ``K`` (experts
    per token) is bound by the caller; the others come from the shapes. No params.
    Expert ``x`` maps ``X[t]`` to ``W2[x] (silu(W13[x, 0] X[t]) * (W13[x, 1] X[t]))``.
    Output ``Y[t, d] = sum over choices of TW * expert(X)``: ``dtype``.

    ``form="dense"`` builds the routing tensor ``R[t, x] = sum[k](where(TI == x, TW, 0))``
    and runs all experts on all tokens (the Einsum over a sparse ``R``);
    ``form="gather"`` runs the K chosen experts per token, reading ``W13[TI[t, k], ...]``.
    """
    cb = CascadeBuilder(f"moe_{form}" + ("_router" if router else "") + ("" if top_k_renormalize else "_raw"))
    X = cb.input("X", "t d", dtype)
    if router:
        WR = cb.input("WR", "x d", dtype)
        LG = None
    else:
        LG = cb.input("LG", "t x", f32)
    W13 = cb.input("W13", "x h f d", dtype)
    W2 = cb.input("W2", "x d f", dtype)
    if router:
        LG = cb.einsum("LG", "t x", sum_(d, X[t, d] * WR[x, d]))
    emit_moe(cb, X, LG, W13, W2, "Y", top_k_renormalize=top_k_renormalize, form=form, dtype=dtype, output=True)
    return cb.build()


def moe_experts(*, dtype: DType = bf16) -> Cascade:
    """The expert part alone, for routing decided elsewhere (vLLM's ``fused_experts``): inputs
    ``X[t, d]``, ``TW[t, k]: f32`` (routing weights), ``TI[t, k]: i32`` (expert ids), ``W13``, ``W2``
    as in :func:`moe`; ``Y[t, d] = sum[k](TW[t, k] * expert_{TI[t, k]}(X[t]))``."""
    cb = CascadeBuilder("moe_experts")
    X = cb.input("X", "t d", dtype)
    TW = cb.input("TW", "t k", f32)
    TI = cb.input("TI", "t k", i32)
    W13 = cb.input("W13", "x h f d", dtype)
    W2 = cb.input("W2", "x d f", dtype)
    GU = cb.einsum("GU", "t k h f", sum_(d, X[t, d] * W13[TI[t, k], h, f, d]))
    ACT = cb.einsum("ACT", "t k f", silu(GU[t, k, 0, f]) * GU[t, k, 1, f])
    EO = cb.einsum("EO", "t k d", sum_(f, ACT[t, k, f] * W2[TI[t, k], d, f]))
    cb.einsum("Y", "t d", sum_(k, TW[t, k] * EO[t, k, d]), dtype, output=True)
    return cb.build()
