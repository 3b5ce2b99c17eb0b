"""The library of cascades: attention variants, paged decode, MoE, GEMM, norms, a decoder layer.

Every builder returns a validated :class:`~kascade.ir.Cascade`; its docstring says what it
computes, its inputs (names, ranks, layout), params and extents. Outputs are ``bf16`` by
default (``dtype=`` changes that); intermediates are undeclared (f32).

``LIBRARY`` names zero-argument builders for the CLI and the round-trip tests.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from kascade.ir.cascade import Cascade
from kascade.ir.library.attention import attention, attention_varlen
from kascade.ir.library.decode import paged_decode
from kascade.ir.library.layer import decoder_layer
from kascade.ir.library.mlp import gemm, rmsnorm, swiglu_mlp
from kascade.ir.library.moe import moe

LIBRARY: dict[str, Callable[..., Cascade]] = {
    "attention": partial(attention, "3pass"),
    "attention_2pass": partial(attention, "2pass"),
    "attention_1pass": partial(attention, "1pass"),
    "attention_causal": partial(attention, "3pass", causal=True),
    "attention_1pass_causal": partial(attention, "1pass", causal=True),
    "attention_window": partial(attention, "3pass", window=(1, 1)),
    "attention_softcap": partial(attention, "3pass", softcap=True),
    "attention_alibi": partial(attention, "3pass", alibi=True),
    "attention_varlen": attention_varlen,
    "attention_varlen_causal": partial(attention_varlen, causal=True),
    "paged_decode": paged_decode,
    "paged_decode_split_kv": partial(paged_decode, split_kv=True),
    "moe": moe,
    "moe_gather": partial(moe, form="gather"),
    "moe_router": partial(moe, router=True),
    "gemm": gemm,
    "gemm_bias_gelu": partial(gemm, "bias_gelu"),
    "rmsnorm": rmsnorm,
    "swiglu_mlp": swiglu_mlp,
    "decoder_layer": decoder_layer,
    "decoder_layer_moe": partial(decoder_layer, moe=True),
}

__all__ = ["LIBRARY", "attention", "attention_varlen", "paged_decode", "moe", "gemm", "rmsnorm", "swiglu_mlp",
           "decoder_layer"]
