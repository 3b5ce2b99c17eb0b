"""Transformer models as the serving layer sees them: sizes from a Hugging Face ``config.json``.

A :class:`ModelSpec` holds the handful of numbers that decide a model's weights, KV cache
and FLOPs: hidden size, layers, query and KV heads, head dim, FFN size, vocabulary and, for
Mixture-of-Experts models, the expert count, experts per token, shared experts and the
expert FFN size. :func:`load_model` reads them from a preset name or a ``config.json``
written with Llama / Mixtral / Qwen3-MoE field names; :func:`serving_step_cascade` builds
one layer of a serving step (prefill chunks and decode tokens in one batch) as a cascade
from the library's pieces.

What the spec leaves out, on purpose: biases (Qwen2's QKV bias, a few thousand parameters),
Qwen3's per-head q/k norms (``2 * head_dim`` per layer), and models that mix dense and MoE
layers (DeepSeek's ``first_k_dense_replace``, Qwen-MoE's ``mlp_only_layers``): every layer
is taken to be MoE when ``experts > 0``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from kascade.ir.builder import CascadeBuilder
from kascade.ir.cascade import Cascade
from kascade.ir.dtypes import DType, bf16, f32, i32
from kascade.ir.errors import KascadeError
from kascade.ir.expr import INF, exp, extent, logical_and, max_, maximum, ranks, silu, sum_, where


@dataclass(frozen=True)
class ModelSpec:
    """One decoder-only transformer. ``moe_intermediate`` is the FFN size of one expert
    (Mixtral, which has no separate field, uses ``intermediate``); ``shared_experts`` counts
    always-active experts of that size (Qwen2-MoE's one wide shared expert is stored as the
    number of ``moe_intermediate``-sized experts it equals). ``tied_embeddings``: the LM head
    reuses the embedding matrix (counted once in the weights)."""
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    experts: int = 0
    experts_per_token: int = 0
    shared_experts: int = 0
    moe_intermediate: int = 0
    dtype_bytes: int = 2
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        for f in ("hidden", "layers", "heads", "kv_heads", "head_dim", "vocab", "dtype_bytes"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise KascadeError(f"model {self.name!r}: {f} must be a positive integer, got {v!r}")
        for f in ("intermediate", "experts", "experts_per_token", "shared_experts", "moe_intermediate"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 0:
                raise KascadeError(f"model {self.name!r}: {f} must be an integer >= 0, got {v!r}")
        if self.heads % self.kv_heads:
            raise KascadeError(f"model {self.name!r}: heads ({self.heads}) must be a multiple of kv_heads "
                               f"({self.kv_heads})")
        if self.experts:
            if not 1 <= self.experts_per_token <= self.experts:
                raise KascadeError(f"model {self.name!r}: experts_per_token must be in 1..experts ({self.experts}), "
                                   f"got {self.experts_per_token}")
            if self.expert_intermediate < 1:
                raise KascadeError(f"model {self.name!r}: a MoE model needs moe_intermediate (or intermediate) > 0")
        elif self.intermediate < 1:
            raise KascadeError(f"model {self.name!r}: a dense model needs intermediate > 0")

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def expert_intermediate(self) -> int:
        """The FFN size of one routed (or shared) expert."""
        return self.moe_intermediate or self.intermediate

    # ---- parameter counts (elements) -------------------------------------------------------
    def attention_params(self) -> int:
        """Q, K, V and O projections of one layer."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv)

    def ffn_params(self, active: bool = False) -> int:
        """The FFN of one layer (SwiGLU: gate, up, down); for MoE the router, the routed experts
        (all of them, or the ``experts_per_token`` a token uses when ``active``) and the shared ones."""
        if not self.is_moe:
            return 3 * self.hidden * self.intermediate
        routed = self.experts_per_token if active else self.experts
        return (self.hidden * self.experts
                + (routed + self.shared_experts) * 3 * self.hidden * self.expert_intermediate)

    def layer_params(self, active: bool = False) -> int:
        return self.attention_params() + self.ffn_params(active) + 2 * self.hidden   # two RMSNorm weights

    def embedding_params(self) -> int:
        """Input embedding and LM head (one matrix when tied) and the final norm."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden

    def param_count(self, active: bool = False) -> int:
        """All parameters (``active``: those one token uses, the MoE's routed experts limited to top-k)."""
        return self.layers * self.layer_params(active) + self.embedding_params()

    # ---- serving quantities ----------------------------------------------------------------
    def weight_bytes(self) -> int:
        return self.param_count() * self.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def flops_per_token(self, context: int) -> float:
        """Forward FLOPs of one token that attends to ``context`` keys: two per multiply-add of
        every active weight except the embedding lookup, plus ``QK^T`` and ``PV`` over the context."""
        matmul = self.param_count(active=True) - self.vocab * self.hidden * (0 if self.tied_embeddings else 1)
        attention = 4.0 * self.layers * self.heads * self.head_dim * context
        return 2.0 * matmul + attention


# Published configs (the models' config.json on the Hugging Face hub).
PRESETS: dict[str, ModelSpec] = {s.name: s for s in (
    # meta-llama/Meta-Llama-3-8B: 8.03 B parameters
    ModelSpec("llama-3-8b", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
              vocab=128256),
    # meta-llama/Meta-Llama-3-70B: 70.6 B
    ModelSpec("llama-3-70b", hidden=8192, layers=80, heads=64, kv_heads=8, head_dim=128, intermediate=28672,
              vocab=128256),
    # mistralai/Mixtral-8x7B-v0.1: 46.7 B total, 12.9 B active
    ModelSpec("mixtral-8x7b", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
              vocab=32000, experts=8, experts_per_token=2, moe_intermediate=14336),
    # Qwen/Qwen3-30B-A3B: 30.5 B total, 3.3 B active
    ModelSpec("qwen3-30b-a3b", hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128, intermediate=6144,
              vocab=151936, experts=128, experts_per_token=8, moe_intermediate=768),
)}

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4, "float8_e4m3fn": 1,
                "float8_e5m2": 1, "fp8": 1}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def load_model(name_or_path: str | Path) -> ModelSpec:
    """A preset by name (case-insensitive: ``llama-3-8b``, ``llama-3-70b``, ``mixtral-8x7b``,
    ``qwen3-30b-a3b``), or the model described by a ``config.json`` file (or a directory
    holding one).

    Fields read: ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``vocab_size``
    (required); ``num_key_value_heads`` (default: the attention heads), ``head_dim`` (default
    ``hidden_size / num_attention_heads``), ``intermediate_size`` (required for dense models),
    ``num_local_experts`` or ``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``,
    ``n_shared_experts`` or ``shared_expert_intermediate_size``, ``tie_word_embeddings``,
    ``torch_dtype``. A missing required field raises :class:`KascadeError` naming it and the file."""
    key = str(name_or_path).lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise KascadeError(f"unknown model {str(name_or_path)!r}: not a preset ({', '.join(PRESETS)}) "
                           f"and not a config.json file")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KascadeError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(cfg, dict):
        raise KascadeError(f"{path}: a config.json must hold a JSON object, got {type(cfg).__name__}")
    if isinstance(cfg.get("text_config"), dict):    # multimodal wrappers keep the LM's fields here
        cfg = {**cfg, **cfg["text_config"]}
    return _from_config(cfg, path)


def _from_config(cfg: dict, path: Path) -> ModelSpec:
    experts = _int(cfg, path, "num_local_experts", _int(cfg, path, "num_experts", 0))
    required = _REQUIRED + (() if experts else ("intermediate_size",))
    missing = [f for f in required if cfg.get(f) is None]
    if experts and cfg.get("num_experts_per_tok") is None:
        missing.append("num_experts_per_tok")
    if experts and cfg.get("moe_intermediate_size") is None and cfg.get("intermediate_size") is None:
        missing.append("moe_intermediate_size (or intermediate_size)")
    if missing:
        raise KascadeError(f"{path}: config.json lacks required field(s) {', '.join(missing)} "
                           f"(a model needs {', '.join(_REQUIRED)}, intermediate_size for dense models, "
                           f"num_experts_per_tok and moe_intermediate_size for MoE)")
    hidden = _int(cfg, path, "hidden_size")
    heads = _int(cfg, path, "num_attention_heads")
    head_dim = _int(cfg, path, "head_dim", 0) or (hidden // heads if heads and hidden % heads == 0 else 0)
    if not head_dim:
        raise KascadeError(f"{path}: head_dim is missing and hidden_size ({hidden}) is not a multiple of "
                           f"num_attention_heads ({heads})")
    moe_inter = _int(cfg, path, "moe_intermediate_size", 0) if experts else 0
    intermediate = _int(cfg, path, "intermediate_size", 0)
    shared = _int(cfg, path, "n_shared_experts", 0)
    wide_shared = _int(cfg, path, "shared_expert_intermediate_size", 0)
    if experts and wide_shared and not shared:
        # one wide shared expert (Qwen2-MoE) counts as this many expert-sized ones
        shared = math.ceil(wide_shared / (moe_inter or intermediate))
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    if str(dtype).removeprefix("torch.") not in _DTYPE_BYTES:
        raise KascadeError(f"{path}: torch_dtype {dtype!r} is not supported; accepted: {', '.join(_DTYPE_BYTES)}")
    name = str(cfg.get("_name_or_path") or cfg.get("model_type") or path.parent.name or path.stem)
    try:
        return ModelSpec(
            name=name, hidden=hidden, layers=_int(cfg, path, "num_hidden_layers"), heads=heads,
            kv_heads=_int(cfg, path, "num_key_value_heads", heads), head_dim=head_dim, intermediate=intermediate,
            vocab=_int(cfg, path, "vocab_size"), experts=experts,
            experts_per_token=_int(cfg, path, "num_experts_per_tok", 0) if experts else 0,
            shared_experts=shared if experts else 0,
            moe_intermediate=(moe_inter or intermediate) if experts else 0,
            dtype_bytes=_DTYPE_BYTES[str(dtype).removeprefix("torch.")],
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except KascadeError as exc:
        raise KascadeError(f"{path}: {exc}") from exc


def _int(cfg: dict, path: Path, field: str, default: int | None = None) -> int:
    v = cfg.get(field)
    if v is None:
        if default is None:
            raise KascadeError(f"{path}: config.json lacks required field {field}")
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or v != int(v) or v < 0:
        raise KascadeError(f"{path}: {field} must be a non-negative integer, got {v!r}")
    return int(v)


def with_dtype(spec: ModelSpec, dtype_bytes: int) -> ModelSpec:
    """The same model served at another weight / KV precision (e.g. 1 for fp8)."""
    return replace(spec, dtype_bytes=dtype_bytes)


# ---- the serving step as a cascade ---------------------------------------------------------------
class ServingStep(NamedTuple):
    """One layer of a serving iteration: the cascade and the extents of one batch on one GPU."""
    cascade: Cascade
    extents: dict[str, int]


def serving_step_cascade(spec: ModelSpec, prefill: Sequence[tuple[int, int]], decode: Sequence[int], *,
                         tp: int = 1, block_size: int = 16, dtype: DType = bf16,
                         expert_outputs: bool = False) -> ServingStep:
    """One decoder layer of ``spec`` over one continuous-batching iteration, on one of ``tp``
    tensor-parallel GPUs: ``prefill`` chunks ``(new tokens, tokens already cached)`` and ``decode``
    requests (their context lengths, the new token included) packed into ``T`` tokens.

    The cascade (built from the library's RMSNorm, RoPE and SwiGLU pieces and emit_moe's routing, with a paged
    attention that serves prefill chunks and decode tokens alike, as vLLM's unified kernel does):

    * inputs ``X[t, d]``, ``SQ[t]``: i32 (the sequence of token ``t``), ``POS[t]``: i32 (its
      position, cached tokens first), ``COS[t, e]``, ``SIN[t, e]``: f32 (rotary tables at ``POS``);
      the paged cache ``KC[n, m0, g, e]``, ``VC[n, m0, g, e]`` with block table ``BT[s, m1]``: i32
      and cached lengths ``CL[s]``: i32 (the batch's new keys are not in it yet);
      weights as in :func:`~kascade.ir.library.decoder_layer` (``WQ[g, r, e, d]`` ... ``WO[d, g, r, e]``,
      the FFN's ``WG``/``WU``/``WD`` or the MoE's ``WR``/``W13``/``W2``);
    * attention of each token over its sequence's cached keys (``m1 * M0 + m0 < CL``) and the
      batch's new keys of the same sequence at or before its position (rank ``u`` over the
      tokens again), one softmax over both;
    * outputs ``Y[t, d]`` (the layer's output) and ``KNO[g, t, e]``, ``VN[g, t, e]`` (the new keys,
      after RoPE, and values that the engine appends to the cache).

    Sharding over ``tp`` (the extents): ``G = kv_heads / tp`` KV heads (1, replicated, when
    ``tp > kv_heads``), ``R`` query heads per KV head, FFN ``F = intermediate / tp`` (or the
    expert FFN / tp); the O and down projections then give partial sums that an all-reduce
    (``passes/partition``) completes. Experts are not split here (expert parallelism routes
    whole tokens; see ``backends/iteration``).

    ``expert_outputs``: the MoE's weighted combine is by default inside the down projection's
    reduction (``T x D`` partial sums under tp); with ``expert_outputs=True`` the experts' results
    are a tensor of their own, ``EO[t, k, d]``, and the combine ``Y = HA + sum[k](TW * EO)`` a
    statement after them: the gather form that ``passes/moe_grouping.group_experts`` groups and
    ``partition(..., ep_style="all_to_all")`` dispatches over an expert-parallel group."""
    from kascade.ir.library.layer import _rope
    from kascade.ir.library.mlp import emit_rmsnorm, emit_swiglu

    chunks = [(int(n), int(c)) for n, c in prefill]
    contexts = [int(c) for c in decode]
    if any(n < 1 or c < 0 for n, c in chunks) or any(c < 1 for c in contexts) or not chunks + contexts:
        raise KascadeError(f"a serving step needs prefill chunks (new >= 1, cached >= 0) and decode contexts "
                           f">= 1, and at least one of them; got {chunks}, {contexts}")
    if spec.heads % tp or (spec.kv_heads % tp if tp <= spec.kv_heads else tp % spec.kv_heads):
        raise KascadeError(f"tp={tp} must divide the {spec.heads} heads and divide or be a multiple of the "
                           f"{spec.kv_heads} KV heads")
    ffn = spec.expert_intermediate if spec.is_moe else spec.intermediate
    if ffn % tp:
        raise KascadeError(f"tp={tp} must divide the FFN size {ffn}")

    t, u, d, g, r, e, m1, m0 = ranks("t u d g r e m1 m0")
    cb = CascadeBuilder("serving_step" + ("_moe" if spec.is_moe else ""))
    scale, eps = cb.param("scale", f32), cb.param("eps", f32)
    X = cb.input("X", "t d", dtype)
    SQ, POS = cb.input("SQ", "t", i32), cb.input("POS", "t", i32)
    COS, SIN = cb.input("COS", "t e", f32), cb.input("SIN", "t e", f32)
    KC, VC = cb.input("KC", "n m0 g e", dtype), cb.input("VC", "n m0 g e", dtype)
    BT, CL = cb.input("BT", "s m1", i32), cb.input("CL", "s", i32)
    WN1, WN2 = cb.input("WN1", "d", dtype), cb.input("WN2", "d", dtype)
    WQ, WK, WV = cb.input("WQ", "g r e d", dtype), cb.input("WK", "g e d", dtype), cb.input("WV", "g e d", dtype)
    WO = cb.input("WO", "d g r e", dtype)
    cb.extent("U", extent("T"))

    XN = emit_rmsnorm(cb, X, WN1, eps, "XN", "MS1")
    QP = cb.einsum("QP", "g r t e", sum_(d, XN[t, d] * WQ[g, r, e, d]))
    KP = cb.einsum("KP", "g t e", sum_(d, XN[t, d] * WK[g, e, d]))
    VP = cb.einsum("VP", "g t e", sum_(d, XN[t, d] * WV[g, e, d]))
    QR = _rope(cb, "QR", QP, t, COS, SIN)
    KN = _rope(cb, "KN", KP, t, COS, SIN)
    # the new keys and values at the cache's dtype, as outputs that nothing reads: attention reads
    # KN and VP, so the partition pass can shard the K/V projections over g (an output read later
    # would be kept whole, i.e. every tensor-parallel GPU would recompute all KV heads)
    cb.einsum("KNO", "g t e", KN[g, t, e], dtype, output=True)
    cb.einsum("VN", "g t e", VP[g, t, e], dtype, output=True)
    # scores over the cached keys of the token's sequence, and over the batch's new keys
    cached = m1 * extent("M0") + m0 < CL[SQ[t]]
    dot_c = sum_(e, QR[g, r, t, e] * KC[BT[SQ[t], m1], m0, g, e])
    SCC = cb.einsum("SCC", "g r t m1 m0", where(cached, dot_c * scale, -INF))
    same = logical_and(SQ[u].eq(SQ[t]), POS[u] <= POS[t])
    SCN = cb.einsum("SCN", "g r t u", where(same, sum_(e, QR[g, r, t, e] * KN[g, u, e]) * scale, -INF))
    # one softmax over both key sets; every token sees at least itself, so the max is finite
    MC = cb.einsum("MC", "g r t", max_((m1, m0), SCC[g, r, t, m1, m0]))
    GM = cb.einsum("GM", "g r t", maximum(MC[g, r, t], max_(u, SCN[g, r, t, u])))
    EC = cb.einsum("EC", "g r t m1 m0", exp(SCC[g, r, t, m1, m0] - GM[g, r, t]))
    EN = cb.einsum("EN", "g r t u", exp(SCN[g, r, t, u] - GM[g, r, t]))
    SD = cb.einsum("SD", "g r t", sum_((m1, m0), EC[g, r, t, m1, m0]) + sum_(u, EN[g, r, t, u]))
    av_c = sum_((m1, m0), where(cached, EC[g, r, t, m1, m0] * VC[BT[SQ[t], m1], m0, g, e], 0.0))
    AV = cb.einsum("AV", "g r t e", (av_c + sum_(u, EN[g, r, t, u] * VP[g, u, e])) / SD[g, r, t])
    HA = cb.einsum("HA", "t d", X[t, d] + sum_((g, r, e), AV[g, r, t, e] * WO[d, g, r, e]))
    HN = emit_rmsnorm(cb, HA, WN2, eps, "HN", "MS2")
    if spec.is_moe:
        x = ranks("x")[0]
        WR = cb.input("WR", "x d", dtype)
        W13, W2 = cb.input("W13", "x h f d", dtype), cb.input("W2", "x d f", dtype)
        k, h, f = ranks("k h f")
        LG = cb.einsum("LG", "t x", sum_(d, HN[t, d] * WR[x, d]))
        # routing as emit_moe's (softmax, top-k, renormalised); the experts in its gather form, but
        # with the weighted combine inside the down projection's reduction (over k and f at once):
        # under tensor parallelism the partial sums are then ``T x D`` and so is their all-reduce,
        # as engines do (combine locally, then reduce), rather than ``T x K x D`` per choice
        MX = cb.einsum("MX", "t", max_(x, LG[t, x]))
        EX = cb.einsum("EX", "t x", exp(LG[t, x] - MX[t]))
        SE = cb.einsum("SE", "t", sum_(x, EX[t, x]))
        P = cb.einsum("P", "t x", EX[t, x] / SE[t])
        TV, TI = cb.topk(("TV", "TI"), "t k", x, P[t, x])
        TS = cb.einsum("TS", "t", sum_(k, TV[t, k]))
        TW = cb.einsum("TW", "t k", TV[t, k] / TS[t])
        GU = cb.einsum("GU", "t k h f", sum_(d, HN[t, d] * W13[TI[t, k], h, f, d]))
        ACT = cb.einsum("ACT", "t k f", silu(GU[t, k, 0, f]) * GU[t, k, 1, f])
        if expert_outputs:
            EO = cb.einsum("EO", "t k d", sum_(f, ACT[t, k, f] * W2[TI[t, k], d, f]))
            cb.einsum("Y", "t d", HA[t, d] + sum_(k, TW[t, k] * EO[t, k, d]), dtype, output=True)
        else:
            cb.einsum("Y", "t d", HA[t, d] + sum_((k, f), TW[t, k] * ACT[t, k, f] * W2[TI[t, k], d, f]), dtype,
                      output=True)
    else:
        WG, WU, WD = cb.input("WG", "f d", dtype), cb.input("WU", "f d", dtype), cb.input("WD", "d f", dtype)
        emit_swiglu(cb, HN, WG, WU, WD, "Y", prefix="M", residual=HA, dtype=dtype, output=True)

    kv_heads = max(1, spec.kv_heads // tp)
    seqs = len(chunks) + len(contexts)
    cached_lens = [c for _, c in chunks] + [c - 1 for c in contexts]
    pages = max(1, max(math.ceil(c / block_size) for c in cached_lens))
    ext = {"T": sum(n for n, _ in chunks) + len(contexts), "U": 0, "S": seqs, "D": spec.hidden, "G": kv_heads,
           "R": spec.heads // tp // kv_heads, "E": spec.head_dim, "M0": block_size, "M1": pages,
           "N": sum(max(1, math.ceil(c / block_size)) for c in cached_lens), "F": ffn // tp}
    ext["U"] = ext["T"]
    if spec.is_moe:
        ext |= {"X": spec.experts, "K": spec.experts_per_token, "H": 2}
    return ServingStep(cb.build(), ext)
