"""kascade's calls as torch operators: ``torch.ops.kascade.*``.

Each operator has a fake (meta) implementation that only computes the output's shape,
so ``torch.compile(fullgraph=True)`` traces through it without a graph break, and each
passes ``torch.library.opcheck``. The real implementation is the Python API in
``kascade.api`` (imported on first call, so registering the schemas costs no triton or
jinja2 import). Optional arguments use sentinels the schema can carry: a window side of
-1 is unbounded, a soft-cap of 0 is off.
"""

# No `from __future__ import annotations`: torch.library reads the annotations at
# registration time to infer the operator's schema.

import torch
from torch import Tensor


def _window(left: int, right: int) -> tuple[int, int] | None:
    return None if left == right == -1 else (left, right)


@torch.library.custom_op("kascade::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, window_left: int = -1,
                 window_right: int = -1, softcap: float = 0.0, scale: float | None = None,
                 backend: str | None = None) -> Tensor:
    """``kascade.attention`` as an operator: (B, Hq, Sq, D) x (B, Hkv, Sk, D/Dv) -> (B, Hq, Sq, Dv)."""
    from kascade.api import attention
    return attention(q, k, v, causal=causal, window=_window(window_left, window_right), softcap=softcap or None,
                     scale=scale, backend=backend)


@attention_op.register_fake
def _attention_fake(q, k, v, causal=False, window_left=-1, window_right=-1, softcap=0.0, scale=None, backend=None):
    B, Hq, Sq, _ = q.shape
    return q.new_empty((B, Hq, Sq, v.shape[-1]))


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, window: tuple[int, int] | None = None,
              softcap: float | None = None, scale: float | None = None, backend: str | None = None,
              out: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention with flash-attn / SDPA semantics (see ``kascade.api.attention``).

    Goes through ``torch.ops.kascade.attention`` so that ``torch.compile`` sees one
    operator; with ``out=`` (writing into a given buffer) it calls the API directly.
    """
    if out is not None or not _fits_schema(causal, window, softcap, scale, backend):
        from kascade.api import attention as direct
        return direct(q, k, v, causal=causal, window=window, softcap=softcap, scale=scale, backend=backend, out=out)
    left, right = window if window is not None else (-1, -1)
    return attention_op(q, k, v, causal, left, right, softcap or 0.0, scale, backend)


def _fits_schema(causal, window, softcap, scale, backend) -> bool:
    """Can the operator's typed arguments carry these values? Anything else goes to the API
    directly, whose checks say what is accepted (a schema error would not)."""
    def number(x):
        return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))
    pair = window is None or (isinstance(window, (tuple, list)) and len(window) == 2 and all(
        isinstance(w, int) and not isinstance(w, bool) for w in window))
    return isinstance(causal, bool) and pair and number(softcap) and number(scale) and \
        (backend is None or isinstance(backend, str))


@torch.library.custom_op("kascade::attention_varlen", mutates_args=())
def attention_varlen_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                        max_seqlen_q: int, max_seqlen_k: int, causal: bool = False, window_left: int = -1,
                        window_right: int = -1, softcap: float = 0.0, scale: float | None = None,
                        backend: str | None = None) -> Tensor:
    """``kascade.attention_varlen``: packed (total_q, Hq, D) x (total_k, Hkv, D/Dv) -> (total_q, Hq, Dv)."""
    from kascade.api import attention_varlen
    return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                            window=_window(window_left, window_right), softcap=softcap or None, scale=scale,
                            backend=backend)


@attention_varlen_op.register_fake
def _attention_varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                           window_left=-1, window_right=-1, softcap=0.0, scale=None, backend=None):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))


@torch.library.custom_op("kascade::paged_decode_attention", mutates_args=())
def paged_decode_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                              softcap: float = 0.0, scale: float | None = None, num_splits: int | None = None,
                              backend: str | None = None) -> Tensor:
    """``kascade.paged_decode_attention``: q (B, Hq, D), caches (blocks, block size, Hkv, D/Dv) -> (B, Hq, Dv)."""
    from kascade.api import paged_decode_attention
    return paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, softcap=softcap or None, scale=scale,
                                  num_splits=num_splits, backend=backend)


@paged_decode_attention_op.register_fake
def _paged_decode_fake(q, k_cache, v_cache, block_table, seq_lens, softcap=0.0, scale=None, num_splits=None,
                       backend=None):
    return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, *, causal: bool = False, window: tuple[int, int] | None = None,
                     softcap: float | None = None, scale: float | None = None, backend: str | None = None,
                     out: Tensor | None = None) -> Tensor:
    """Attention over packed sequences in flash-attn's varlen layout (see ``kascade.api.attention_varlen``)."""
    ints = all(isinstance(n, int) and not isinstance(n, bool) for n in (max_seqlen_q, max_seqlen_k))
    if out is not None or not ints or not _fits_schema(causal, window, softcap, scale, backend):
        from kascade.api import attention_varlen as direct
        return direct(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal, window=window,
                      softcap=softcap, scale=scale, backend=backend, out=out)
    left, right = window if window is not None else (-1, -1)
    return attention_varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, left, right,
                               softcap or 0.0, scale, backend)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor, *,
                           softcap: float | None = None, scale: float | None = None, num_splits: int | None = None,
                           backend: str | None = None, out: Tensor | None = None) -> Tensor:
    """Decode attention over a paged KV cache (see ``kascade.api.paged_decode_attention``)."""
    splits_ok = num_splits is None or (isinstance(num_splits, int) and not isinstance(num_splits, bool))
    if out is not None or not splits_ok or not _fits_schema(False, None, softcap, scale, backend):
        from kascade.api import paged_decode_attention as direct
        return direct(q, k_cache, v_cache, block_table, seq_lens, softcap=softcap, scale=scale,
                      num_splits=num_splits, backend=backend, out=out)
    return paged_decode_attention_op(q, k_cache, v_cache, block_table, seq_lens, softcap or 0.0, scale, num_splits,
                                     backend)


@torch.library.custom_op("kascade::moe", mutates_args=())
def moe_op(x: Tensor, w1: Tensor, w2: Tensor, router_logits: Tensor | None = None,
           topk_weights: Tensor | None = None, topk_ids: Tensor | None = None, top_k: int | None = None,
           renormalize: bool = True, activation: str = "swiglu", backend: str | None = None) -> Tensor:
    """``kascade.moe``: x (T, D), w1 (E, 2F, D), w2 (E, D, F) and routing -> (T, D)."""
    from kascade.api_moe import moe
    return moe(x, w1, w2, router_logits, top_k=top_k, renormalize=renormalize, activation=activation,
               topk_weights=topk_weights, topk_ids=topk_ids, backend=backend)


@moe_op.register_fake
def _moe_fake(x, w1, w2, router_logits=None, topk_weights=None, topk_ids=None, top_k=None, renormalize=True,
              activation="swiglu", backend=None):
    from kascade.api_moe import check_weights  # shapes, dtypes, devices: what needs no data
    check_weights(x, w1, w2)
    return x.new_empty(x.shape)


def moe(x: Tensor, w1: Tensor, w2: Tensor, router_logits: Tensor | None = None, *, top_k: int | None = None,
        renormalize: bool = True, activation: str = "swiglu", topk_weights: Tensor | None = None,
        topk_ids: Tensor | None = None, backend: str | None = None, out: Tensor | None = None) -> Tensor:
    """A Mixture-of-Experts block in vLLM's fused_moe layout (see ``kascade.api_moe.moe``)."""
    typed = (top_k is None or (isinstance(top_k, int) and not isinstance(top_k, bool))) and \
        isinstance(renormalize, bool) and isinstance(activation, str) and (backend is None or isinstance(backend, str))
    tensors = all(t is None or isinstance(t, Tensor) for t in (router_logits, topk_weights, topk_ids))
    if out is not None or not typed or not tensors or not isinstance(x, Tensor):
        from kascade.api_moe import moe as direct
        return direct(x, w1, w2, router_logits, top_k=top_k, renormalize=renormalize, activation=activation,
                      topk_weights=topk_weights, topk_ids=topk_ids, backend=backend, out=out)
    return moe_op(x, w1, w2, router_logits, topk_weights, topk_ids, top_k, renormalize, activation, backend)
