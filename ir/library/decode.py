"""Paged-KV decode attention: one new query token per sequence against a block-paged cache.

The cache layout is vLLM's / flash-attn's: ``KC[n, m0, g, e]`` (block, position in the
block, KV head, head dim); ``BT[b, m1]`` maps a sequence's ``m1``-th block to a cache
block, so key position ``m1 * M0 + m0`` of sequence ``b`` lives at
``KC[BT[b, m1], m0, g, e]`` and is valid iff it is below ``SL[b]``. Block-table entries
past a sequence's length may hold anything (-1, stale ids): every cache read sits
under the validity mask in its own Einsum, so nothing they point at reaches the output.
"""

from __future__ import annotations

from kascade.ir.builder import CascadeBuilder
from kascade.ir.cascade import Cascade
from kascade.ir.dtypes import DType, bf16, f32, i32
from kascade.ir.expr import INF, cdiv, exp, extent, logical_and, max_, ranks, sum_, where

b, g, r, e, f, c, w, m1, m0 = ranks("b g r e f c w m1 m0")


def paged_decode(split_kv: bool = False, *, dtype: DType = bf16) -> Cascade:
    """Decode attention over a paged KV cache (2-pass form; FlashDecoding with ``split_kv``).

    Inputs: ``Q[b, g, r, e]`` (the query of each sequence, query head ``g * R + r``),
    ``KC[n, m0, g, e]``, ``VC[n, m0, g, f]`` (``dtype``; ``N`` cache blocks of ``M0``
    positions), ``BT[b, m1]``: i32 (block table, ``M1`` blocks per sequence at most),
    ``SL[b]``: i32 (sequence lengths, ``<= M1 * M0``). Param ``scale: f32``.
    Output ``O[b, g, r, f]: dtype``; a sequence of length 0 gets 0.

    ``split_kv``: the blocks are split into ``C`` chunks (``extent C``, free: bound by
    the caller) of ``W = cdiv(M1, C)`` blocks; chunk ``c`` takes blocks ``c * W + w``
    (those ``>= M1`` are masked). Each chunk has its own max ``LM``, guarded exponent,
    sum ``LD`` and numerator ``LNV``; the merge over ``c`` rescales them by
    ``exp(LM - GM)`` (``GM`` guarded) and normalises.
    """
    cb = CascadeBuilder("paged_decode" + ("_split_kv" if split_kv else ""))
    scale = cb.param("scale", f32)
    Q = cb.input("Q", "b g r e", dtype)
    KC = cb.input("KC", "n m0 g e", dtype)
    VC = cb.input("VC", "n m0 g f", dtype)
    BT = cb.input("BT", "b m1", i32)
    SL = cb.input("SL", "b", i32)
    M0 = extent("M0")
    if not split_kv:
        valid = m1 * M0 + m0 < SL[b]
        dot = sum_(e, Q[b, g, r, e] * KC[BT[b, m1], m0, g, e])
        QK = cb.einsum("QK", "b g r m1 m0", where(valid, dot * scale, -INF))
        GM = cb.einsum("GM", "b g r", max_((m1, m0), QK[b, g, r, m1, m0]))
        SN = cb.einsum("SN", "b g r m1 m0", exp(QK[b, g, r, m1, m0] - GM[b, g, r]))
        SD = cb.einsum("SD", "b g r", sum_((m1, m0), SN[b, g, r, m1, m0]))
        sv = SN[b, g, r, m1, m0] * VC[BT[b, m1], m0, g, f]
        AV = cb.einsum("AV", "b g r f", sum_((m1, m0), where(valid, sv, 0.0)))
        cb.output("O", "b g r f", dtype, where(SD[b, g, r] > 0, AV[b, g, r, f] / SD[b, g, r], 0))
        return cb.build()

    C = cb.extent("C")
    W = cb.extent("W", cdiv(extent("M1"), C))
    blk = c * W + w
    valid = logical_and(blk < extent("M1"), blk * M0 + m0 < SL[b])
    dot = sum_(e, Q[b, g, r, e] * KC[BT[b, blk], m0, g, e])
    QK = cb.einsum("QK", "b g r c w m0", where(valid, dot * scale, -INF))[b, g, r, c, w, m0]
    LM = cb.einsum("LM", "b g r c", max_((w, m0), QK))
    # guarded: a chunk with no valid key subtracts 0, so its exponents are exp(-inf) = 0, not NaN
    SLM = cb.einsum("SLM", "b g r c", where(LM[b, g, r, c] > -INF, LM[b, g, r, c], 0))
    SN = cb.einsum("SN", "b g r c w m0", exp(QK - SLM[b, g, r, c]))
    LD = cb.einsum("LD", "b g r c", sum_((w, m0), SN[b, g, r, c, w, m0]))
    LNV = cb.einsum("LNV", "b g r c f",
                    sum_((w, m0), where(valid, SN[b, g, r, c, w, m0] * VC[BT[b, blk], m0, g, f], 0.0)))
    # merge the chunks
    GM = cb.einsum("GM", "b g r", max_(c, LM[b, g, r, c]))
    SGM = cb.einsum("SGM", "b g r", where(GM[b, g, r] > -INF, GM[b, g, r], 0))
    RS = cb.einsum("RS", "b g r c", exp(LM[b, g, r, c] - SGM[b, g, r]))
    SD = cb.einsum("SD", "b g r", sum_(c, RS[b, g, r, c] * LD[b, g, r, c]))
    AV = cb.einsum("AV", "b g r f", sum_(c, RS[b, g, r, c] * LNV[b, g, r, c, f]))
    cb.output("O", "b g r f", dtype, where(SD[b, g, r] > 0, AV[b, g, r, f] / SD[b, g, r], 0))
    return cb.build()

