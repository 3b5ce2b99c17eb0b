"""Attention cascades: the 3-pass, 2-pass and 1-pass (FuseMax) forms, with masks.

Every builder here follows one set of conventions, which the passes and kernels
downstream rely on:

- ranks: batch ``b``, KV head ``g``, query heads per KV head ``r`` (query head
  ``g * R + r``: MHA is ``R = 1``, MQA is ``G = 1``, GQA otherwise), query position
  ``p``, key position ``m``, QK head dim ``e``, V head dim ``f`` (may differ from ``e``);
- scores are ``QK[b, g, r, m, p]`` (key before query), masked scores are ``-inf``;
- causal masks and windows are bottom-right aligned: query ``p`` sits at key position
  ``p + M - P``;
- a query that sees no key gets output 0 in every form (flash-attn's convention):
  the output is guarded by ``where(denominator > 0, ..., 0)``.
"""

from __future__ import annotations

from kascade.ir.builder import CascadeBuilder, TensorRef
from kascade.ir.cascade import Cascade
from kascade.ir.dtypes import DType, bf16, f32, i32
from kascade.ir.errors import CascadeError
from kascade.ir.expr import (
    INF,
    Expr,
    abs_,
    access,
    cdiv,
    exp,
    extent,
    logical_and,
    max_,
    maximum,
    ranks,
    sum_,
    tanh,
    where,
)

FORMS = ("3pass", "2pass", "1pass")

b, g, r, p, m, e, f = ranks("b g r p m e f")
m1, m0 = ranks("m1 m0")


def conjunction(conds: list[Expr]) -> Expr | None:
    """``c1 and c2 and ...`` (None for no condition)."""
    out = None
    for c in conds:
        out = c if out is None else logical_and(out, c)
    return out


def _check_window(window: tuple[int, int] | None) -> tuple[bool, bool]:
    """Which sides of a window are bounded; -1 leaves a side unbounded."""
    if window is None:
        return False, False
    if len(window) != 2 or any(not isinstance(w, int) or w < -1 for w in window):
        raise CascadeError(f"window must be (left, right) with ints >= -1 (-1: unbounded), got {window!r}")
    return window[0] != -1, window[1] != -1


class _Scores:
    """Builds the score of (query ``p``, key ``key``) with its caps, biases and masks."""

    def __init__(self, cb: CascadeBuilder, *, causal: bool, window, softcap: bool, alibi: bool):
        self.causal = causal
        self.left, self.right = _check_window(window)
        self.scale = cb.param("scale", f32)
        self.cap = cb.param("cap", f32) if softcap else None
        self.wl = cb.param("wl", i32) if self.left else None
        self.wr = cb.param("wr", i32) if self.right else None
        self.alibi = alibi

    def visible(self, key: Expr, diag: Expr, extra: list[Expr]) -> Expr | None:
        """The condition under which a query whose own key position is ``diag`` sees ``key``."""
        conds = list(extra)
        if self.causal:
            conds.append(key <= diag)
        if self.left:
            conds.append(key >= diag - self.wl)
        if self.right:
            conds.append(key <= diag + self.wr)
        return conjunction(conds)

    def score(self, dot: Expr, key: Expr, diag: Expr, slope: Expr | None, extra: list[Expr]) -> Expr:
        s = dot * self.scale
        if self.cap is not None:
            s = self.cap * tanh(s / self.cap)
        if self.alibi:
            s = s - slope * abs_(diag - key)
        cond = self.visible(key, diag, extra)
        return s if cond is None else where(cond, s, -INF)


def attention(form: str = "3pass", *, causal: bool = False, window: tuple[int, int] | None = None,
              softcap: bool = False, alibi: bool = False, dtype: DType = bf16) -> Cascade:
    """Scaled dot-product attention ``O = softmax(Q K^T * scale + bias, masked) V``.

    Inputs: ``Q[b, g, r, p, e]``, ``K[b, g, m, e]``, ``V[b, g, m, f]`` (all ``dtype``),
    with ``alibi`` also ``AS[g, r]: f32`` (slope of query head ``g * R + r``).
    Params: ``scale: f32``; ``cap: f32`` with ``softcap`` (score ``cap * tanh(s / cap)``);
    ``wl: i32`` / ``wr: i32`` with a ``window``. ``window=(left, right)`` says which sides
    are bounded (-1: that side unbounded, its condition left out); the widths themselves
    are the params ``wl`` / ``wr`` (>= 0), bound at evaluation time. Query ``p`` sees key ``m`` iff
    ``m <= p + M - P`` (causal) and ``p + M - P - wl <= m <= p + M - P + wr`` (window).
    ALiBi adds ``-AS[g, r] * |p + M - P - m|`` after the soft-cap.
    Output: ``O[b, g, r, p, f]: dtype``; rows that see no key are 0.
    Extents: bound from the shapes; ``form="1pass"`` adds ``extent M0`` (the key tile,
    free: bound by the caller) and ``extent M1 = cdiv(M, M0)``.

    Forms: ``3pass`` normalises the probabilities before ``A V``; ``2pass`` defers the
    division to the output (DESIGN.md's example); ``1pass`` is FuseMax's online softmax
    over key tiles ``m1 * M0 + m0`` with running max ``RM``, denominator ``RD`` and
    numerator ``RNV``; the tail tile is masked.
    """
    if form not in FORMS:
        raise CascadeError(f"unknown attention form {form!r}; accepted: {', '.join(FORMS)}")
    suffix = "".join(f"_{n}" for n, on in (("causal", causal), ("window", window is not None),
                                            ("softcap", softcap), ("alibi", alibi)) if on)
    cb = CascadeBuilder(f"attention_{form}{suffix}")
    sc = _Scores(cb, causal=causal, window=window, softcap=softcap, alibi=alibi)
    Q = cb.input("Q", "b g r p e", dtype)
    K = cb.input("K", "b g m e", dtype)
    V = cb.input("V", "b g m f", dtype)
    slope = cb.input("AS", "g r", f32)[g, r] if alibi else None
    diag = p + extent("M") - extent("P")
    if form == "1pass":
        _one_pass(cb, sc, Q, K, V, slope, diag, dtype)
    else:
        cb.einsum("QK", "b g r m p", sc.score(sum_(e, Q[b, g, r, p, e] * K[b, g, m, e]), m, diag, slope, []))
        softmax_av(cb, "b g r", "m", "p", "f", V[b, g, m, f], dtype, deferred=form == "2pass")
    return cb.build()


def softmax_av(cb: CascadeBuilder, heads: str, key: str, query: str, vdim: str, v: Expr, dtype: DType | None,
               *, deferred: bool, out: str = "O", out_ranks: str | None = None, output: bool = True) -> TensorRef:
    """Softmax over ``key`` of ``QK[heads, key, query]`` times ``v``, guarded for empty rows.

    ``deferred=False`` is the 3-pass form (``A = SN / SD`` before ``A V``), ``True`` the
    2-pass form (``AV / SD`` at the output). The result ``out`` has ``out_ranks``
    (default ``heads query vdim``).
    """
    hs = heads.split()
    h = ranks(heads)
    k, q, fd = ranks(f"{key} {query} {vdim}")
    QK = TensorRef("QK", (*hs, key, query))
    GM = cb.einsum("GM", (*hs, query), max_(k, QK[(*h, k, q)]))
    SN = cb.einsum("SN", (*hs, key, query), exp(QK[(*h, k, q)] - GM[(*h, q)]))
    SD = cb.einsum("SD", (*hs, query), sum_(k, SN[(*h, k, q)]))
    av_ranks = (*hs, query, vdim)
    if deferred:
        AV = cb.einsum("AV", av_ranks, sum_(k, SN[(*h, k, q)] * v))
        value = AV[(*h, q, fd)] / SD[(*h, q)]
    else:
        A = cb.einsum("A", (*hs, key, query), SN[(*h, k, q)] / SD[(*h, q)])
        AV = cb.einsum("AV", av_ranks, sum_(k, A[(*h, k, q)] * v))
        value = AV[(*h, q, fd)]
    return cb.einsum(out, out_ranks or av_ranks, where(SD[(*h, q)] > 0, value, 0), dtype, output=output)


def _one_pass(cb: CascadeBuilder, sc: _Scores, Q: TensorRef, K: TensorRef, V: TensorRef,
              slope: Expr | None, diag: Expr, dtype: DType) -> None:
    """FuseMax's 1-pass cascade over key tiles; the running tensors step along ``m1``."""
    M0 = cb.extent("M0")
    M1 = cb.extent("M1", cdiv(extent("M"), M0))
    key = m1 * M0 + m0
    tail = key < extent("M")  # the last tile may run past M: its reads are out of range
    dot = sum_(e, Q[b, g, r, p, e] * K[b, g, key, e])
    QK = cb.einsum("QK", "b g r m1 m0 p", sc.score(dot, key, diag, slope, [tail]))
    LM = cb.einsum("LM", "b g r m1 p", max_(m0, QK[b, g, r, m1, m0, p]))
    RM = cb.einsum("RM", "b g r m1 p", maximum(access("RM", b, g, r, m1, p), LM[b, g, r, m1, p]),
                   step=m1, init=-INF)
    # guarded running max: a tile with every key masked so far subtracts 0, so exp(-inf) = 0, not NaN
    SRM = cb.einsum("SRM", "b g r m1 p", where(RM[b, g, r, m1 + 1, p] > -INF, RM[b, g, r, m1 + 1, p], 0))
    SLN = cb.einsum("SLN", "b g r m1 m0 p", exp(QK[b, g, r, m1, m0, p] - SRM[b, g, r, m1, p]))
    PRM = cb.einsum("PRM", "b g r m1 p", exp(RM[b, g, r, m1, p] - SRM[b, g, r, m1, p]))
    SLD = cb.einsum("SLD", "b g r m1 p", sum_(m0, SLN[b, g, r, m1, m0, p]))
    RD = cb.einsum("RD", "b g r m1 p", PRM[b, g, r, m1, p] * access("RD", b, g, r, m1, p)
                   + SLD[b, g, r, m1, p], step=m1, init=0.0)
    SLNV = cb.einsum("SLNV", "b g r m1 p f",
                     sum_(m0, where(tail, SLN[b, g, r, m1, m0, p] * V[b, g, key, f], 0.0)))
    RNV = cb.einsum("RNV", "b g r m1 p f", PRM[b, g, r, m1, p] * access("RNV", b, g, r, m1, p, f)
                    + SLNV[b, g, r, m1, p, f], step=m1, init=0.0)
    cb.output("O", "b g r p f", dtype, where(RD[b, g, r, M1, p] > 0, RNV[b, g, r, M1, p, f] / RD[b, g, r, M1, p], 0))


def attention_varlen(*, causal: bool = False, dtype: DType = bf16) -> Cascade:
    """Attention over packed variable-length sequences (2-pass form).

    Inputs: ``Q[u, g, r, e]`` (``u``: packed query tokens), ``K[v, g, e]``,
    ``V[v, g, f]`` (``v``: packed key tokens), all ``dtype``; cumulative lengths
    ``CQ[s1]``, ``CK[s1]``: i32 (``S1`` = number of sequences + 1, ``CQ[0] = 0``,
    ``CQ[S1 - 1] = U``; likewise ``CK`` and ``V``). Param ``scale: f32``.
    Extent ``S = S1 - 1`` (sequences, rank ``s``). ``SQ[u]`` / ``SK[v]`` are the
    sequence of each token; query ``u`` sees key ``v`` iff they are in the same
    sequence and, with ``causal``, ``v <= u + CK[s + 1] - CQ[s + 1]`` (bottom-right
    aligned within the sequence). Output ``O[u, g, r, f]: dtype``; empty rows are 0.
    """
    u, v, s = ranks("u v s")
    cb = CascadeBuilder("attention_varlen" + ("_causal" if causal else ""))
    scale = cb.param("scale", f32)
    Q = cb.input("Q", "u g r e", dtype)
    K = cb.input("K", "v g e", dtype)
    V = cb.input("V", "v g f", dtype)
    CQ = cb.input("CQ", "s1", i32)
    CK = cb.input("CK", "s1", i32)
    cb.extent("S", extent("S1") - 1)
    # a token's sequence is the number of sequences that end at or before it
    SQ = cb.einsum("SQ", "u", sum_(s, where(CQ[s + 1] <= u, 1, 0)))
    SK = cb.einsum("SK", "v", sum_(s, where(CK[s + 1] <= v, 1, 0)))
    cond = SQ[u].eq(SK[v])
    if causal:
        cond = logical_and(cond, v <= u + CK[SQ[u] + 1] - CQ[SQ[u] + 1])
    cb.einsum("QK", "g r v u", where(cond, sum_(e, Q[u, g, r, e] * K[v, g, e]) * scale, -INF))
    softmax_av(cb, "g r", "v", "u", "f", V[v, g, f], dtype, deferred=True, out_ranks="u g r f")
    return cb.build()
