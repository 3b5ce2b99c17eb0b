"""The time of one serving iteration of one model replica, from roofline kernel costs and collectives.

An iteration runs one batch through the model once: some prefill chunks (``(new tokens,
tokens already in the cache)`` each) and some decode requests (their context lengths, the
new token included), as iteration-level (continuous) batching does. Its time is the sum of
the kernels each GPU runs at its SHARDED shapes plus the collectives between GPUs.

Parallelism and placement (``Parallelism``): a replica is ``pp`` pipeline stages of
``tp * ep`` GPUs, tensor-parallel innermost (adjacent GPUs), then expert-parallel, then the
stages; ``dp`` replicas are independent copies (the simulator's router spreads requests over
them). Per stage:

* attention, the dense FFN, shared experts and the LM head are tensor-parallel over ``tp``
  (Megatron: query heads / ``tp``, KV heads / ``tp`` or replicated when ``tp > kv_heads``,
  FFN inner size / ``tp``, vocabulary / ``tp``). A layer's collectives are those the partition
  pass gives for the serving-step cascade under ``g`` and ``f`` over ``tp``
  (:func:`layer_collectives`: two all-reduces of ``tokens x hidden``, after the attention output
  and the FFN's down projection), sized from the iteration's token count;
* with ``ep > 1`` the ``ep`` tensor-parallel groups of a stage each take an equal share of the
  batch's requests for attention (data-parallel attention, as DeepSeek-V3 and SGLang serve
  MoE models) and the routed experts are split over them (``experts / ep`` each, each expert's
  FFN again over ``tp``): tokens go to their experts with an all-to-all (dispatch) and come
  back with another (combine). These are the partition pass's expert-parallel collectives
  (:func:`expert_collectives`: the serving step with its experts' outputs as a tensor, grouped
  by expert and partitioned with the experts ``x`` and tokens ``t`` over ``ep``, attention's
  ``g`` over ``tp``): a count exchange, the rows with their expert ids, the results back.
  Routing is taken as uniform (the cost model's prior).
* with ``pp > 1`` the batch is cut into ``m = min(pp, sequences)`` micro-batches that follow
  each other through the stages (vLLM's and TensorRT-LLM's pipeline with iteration-level
  scheduling); a stage then works ``sum_j t(mb_j)`` per iteration and idles ``(pp - m) *
  max_j t(mb_j)`` (the bubble when there are fewer micro-batches than stages); activations go
  point-to-point between stages. Every request advances one token per iteration, so the
  iteration's time is ``sum_j t(mb_j) + (pp - m) * max_j t(mb_j) + (pp - 1) * p2p``.

Kernel costs come from ``backends/model.py``'s roofline (``Cost`` / ``predict``): GEMMs as
tensor FLOPs against weight + activation bytes; prefill attention and paged decode attention
from their cost rules at the best-ranked config of their schedules (memoised per shape
bucket); MoE from ``backends/moe_cost`` at the best config of ``swiglu_moe_schedule``; norms,
RoPE, residuals and activations as bytes. A ``kernel_seconds(kind, shape)`` hook (the ``db``
argument; ``autotune/plan.py`` fills it from measured tuning records) overrides any kernel it
knows. Kernels are separated by a GPU-side gap (``KERNEL_GAP_S``) rather than a host launch:
serving engines replay CUDA graphs for decode and keep the launch queue ahead of the GPU for
prefill.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from typing import NamedTuple

from kascade.backends.cluster import Cluster
from kascade.backends.model import (
    Cost,
    Efficiency,
    Prediction,
    attention_prefill_cost,
    paged_decode_cost,
    predict,
    rank_configs,
)
from kascade.backends.moe_cost import moe_cost
from kascade.backends.targets import Target
from kascade.ir.dtypes import Kind, bf16
from kascade.ir.errors import KascadeError
from kascade.ir.expr import extents_used
from kascade.ir.library.models import ModelSpec, serving_step_cascade
from kascade.ir.validate import infer_dtypes
from kascade.passes.partition import partition
from kascade.passes.schedule import Config, Schedule, attention_prefill_schedule
from kascade.passes.schedule_decode import paged_decode_schedule
from kascade.passes.schedule_moe import swiglu_moe_schedule

KernelSeconds = Callable[[str, Mapping[str, int]], "float | None"]
"""``kernel_seconds(kind, shape)``: a measured time for a kernel at a sharded shape, or None.
Kinds and shape keys: ``gemm`` {M, N, K}; ``elementwise`` {T, W}; ``attention_prefill`` {B, G, R,
P, M, E, F} (causal, bottom-right aligned); ``paged_decode`` {B, G, R, E, F, M0, L, KV} (see
``backends/model.decode_extents``); ``moe`` {T, K, E, D, F} (``backends/moe_cost``)."""

KERNEL_GAP_S = 1.5e-6            # between kernels of a CUDA graph (measured gaps: ~1-2 us)
GEMM_EFF = Efficiency(tensor=0.85, hbm=0.88)   # cuBLAS GEMMs reach ~85 % of the measured matmul ceiling
MEMORY_UTILISATION = 0.9          # vLLM's gpu_memory_utilization default: the share the engine may use
MAX_BATCHED_TOKENS = 8192         # activation workspace is sized for this many tokens in one iteration

# the kernel classes of IterationCost.breakdown and the resource each mostly uses (the bound that a
# large batch hits; the NanoFlow policy overlaps classes on different resources)
RESOURCE = {"gemm": "compute", "attention_prefill": "compute", "attention_decode": "memory", "moe": "compute",
            "elementwise": "memory", "lm_head": "compute", "all_reduce": "network", "all_to_all": "network",
            "all_gather": "network", "p2p": "network", "pp_bubble": "idle"}


@dataclass(frozen=True)
class Parallelism:
    """Degrees of tensor, pipeline, expert and data parallelism (GPUs = ``tp * pp * ep * dp``)."""
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "dp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise KascadeError(f"parallel degree {name} must be a positive integer, got {v!r}")

    @property
    def replica_gpus(self) -> int:
        return self.tp * self.pp * self.ep

    @property
    def gpus(self) -> int:
        return self.replica_gpus * self.dp


@dataclass(frozen=True)
class IterationCost:
    """One iteration: ``seconds`` end to end; ``breakdown`` the seconds per kernel class and
    collective (they add up to ``seconds``); ``flops`` and ``hbm_bytes`` summed over the
    replica's GPUs (model FLOP utilisation = ``flops / (seconds * peak * replica GPUs)``);
    ``resources`` the same seconds by the resource that bounds each kernel (``compute``: tensor
    cores or ALUs; ``memory``: HBM bandwidth, latency or launch gaps; ``network``: collectives;
    ``idle``: pipeline bubbles), and ``bound`` the one with the most."""
    seconds: float
    breakdown: tuple[tuple[str, float], ...]
    flops: float
    hbm_bytes: float
    bound: str = ""
    resources: tuple[tuple[str, float], ...] = ()


class Kernel(NamedTuple):
    """One kernel's time, its work (a roofline ``Cost``) and the resource that bounds it."""
    seconds: float
    cost: Cost
    resource: str


# a Prediction's roof -> the resource the NanoFlow-style overlap reasons about
_RESOURCE_OF_BOUND = {"tensor": "compute", "flops": "compute", "special": "compute", "hbm": "memory",
                      "l2": "memory", "latency": "memory", "launch": "memory"}


def _dtype(itemsize: int) -> str:
    return {2: "bf16", 4: "tf32"}.get(itemsize, "bf16")


@cache
def _schedules() -> tuple[Schedule, Schedule, Schedule]:
    """The library's causal 2-pass prefill attention, paged decode and SwiGLU MoE schedules."""
    from kascade.ir.library import attention, paged_decode
    return (attention_prefill_schedule(attention("2pass", causal=True)), paged_decode_schedule(paged_decode()),
            swiglu_moe_schedule(bf16))


def _coarse(x: int, base: int, lo: int = 1, hi: int = 1 << 30) -> int:
    """``x`` rounded to the nearest power of ``base`` (in log space), clamped to ``[lo, hi]``:
    the grid on which configs are RANKED (the best config changes slowly with the size)."""
    return int(min(hi, max(lo, base ** round(math.log(max(1, x), base)))))


@cache
def _best_config(family: int, target: Target, coarse: tuple, itemsize: int) -> Config:
    schedule = _schedules()[family]
    ranked = rank_configs(schedule, dict(coarse), target, itemsize)
    if not ranked:
        raise KascadeError(f"no feasible {schedule.kernels[0].family} config for {dict(coarse)}")
    return ranked[0][1]


def _gemm_prediction(target: Target, t: int, n: int, k: int, itemsize: int) -> Prediction:
    cost = Cost(tensor_flops=2.0 * t * n * k, hbm_bytes=float((n * k + t * (n + k)) * itemsize), launches=1)
    return predict(cost, target, _dtype(itemsize), GEMM_EFF)


@lru_cache(maxsize=1 << 16)
def _prefill_prediction(target: Target, ext: tuple, itemsize: int) -> Prediction:
    """The fused prefill kernel at the config ranked best for the nearest power-of-two chunk
    (queries capped at 2048: beyond that the tile choice no longer changes)."""
    x = dict(ext)
    p = _coarse(x["P"], 2, 16, 2048)
    cfg = _best_config(0, target, tuple(sorted({**x, "P": p, "M": p}.items())), itemsize)
    return predict(attention_prefill_cost(_schedules()[0], cfg, x, target, itemsize), target, _dtype(itemsize))


@lru_cache(maxsize=1 << 16)
def _decode_prediction(target: Target, ext: tuple, itemsize: int) -> Prediction:
    """Paged decode at the config ranked best for the nearest power-of-four batch and length."""
    x = dict(ext)
    b, L = _coarse(x["B"], 4, 1, 256), _coarse(x["L"], 4, 256, 65536)
    cfg = _best_config(1, target, tuple(sorted({**x, "B": b, "L": L, "KV": b * L}.items())), itemsize)
    return predict(paged_decode_cost(_schedules()[1], cfg, x, target, itemsize), target, _dtype(itemsize))


@lru_cache(maxsize=1 << 16)
def _moe_prediction(target: Target, shape: tuple, itemsize: int) -> Prediction:
    """The grouped MoE kernels at the config ranked best for the nearest power-of-eight token count."""
    x = dict(shape)
    cfg = _best_config(2, target, tuple(sorted({**x, "T": _coarse(x["T"], 8)}.items())), itemsize)
    return predict(moe_cost(_schedules()[2], cfg, x, target, itemsize), target, _dtype(itemsize))


# the serving step's new keys and values: each GPU appends its KV heads to its own shard of the
# paged cache (sharded on g like KC / VC), so the all-gather the partition pass lists for these
# outputs is not one an engine performs
_CACHE_OUTPUTS = frozenset({"KNO", "VN"})
# the serving step's extents that depend on the batch (tokens, keys over the batch's tokens, sequences)
_BATCH_EXTENTS = frozenset({"T", "U", "S"})


class LayerCollective(NamedTuple):
    """One collective of one layer of the tensor-parallel serving step: its ``kind`` and ``group``
    (``Cluster.collective_seconds`` takes both) and its size, ``bytes_per_token * tokens``.

    Sizes are at the model's activation dtype: the partition pass sizes a partial sum at its f32
    accumulator type, but engines all-reduce the row-parallel layers' outputs at the activation
    dtype (Megatron, vLLM: bf16), so the pass's bytes are scaled by ``dtype_bytes / itemsize``."""
    kind: str
    tensor: str
    group: int
    bytes_per_token: float


@lru_cache(maxsize=256)
def layer_collectives(model: ModelSpec, tp: int) -> tuple[LayerCollective, ...]:
    """The per-layer collectives of ``model``'s serving step on ``tp`` tensor-parallel GPUs, from
    :func:`~kascade.passes.partition.partition` of :func:`~kascade.ir.library.models.serving_step_cascade`
    with the KV-head groups ``g`` and the FFN's inner rank ``f`` over ``tp`` (memoised: the simulator
    asks per iteration, the cascade and the pass run once per model and degree).

    With ``tp > kv_heads`` the KV heads are replicated: the global view then has ``G = tp`` groups
    of ``heads / tp`` query heads (each GPU one group), which is what each GPU computes. Raises
    :class:`KascadeError` when ``tp`` does not shard the model (see ``IterationModel.infeasible``)
    or a collective's size depends on the batch other than through its token count."""
    if tp == 1:
        return ()
    if model.heads % tp or (model.kv_heads % tp if tp <= model.kv_heads else tp % model.kv_heads):
        raise KascadeError(f"tp={tp} must divide the {model.heads} heads and divide or be a multiple of the "
                           f"{model.kv_heads} KV heads")
    step = serving_step_cascade(model, [(1, 0)], [], tp=1)
    groups = max(model.kv_heads, tp)
    fixed = {k: v for k, v in step.extents.items() if k not in _BATCH_EXTENTS}
    fixed |= {"G": groups, "R": model.heads // groups}
    prog = partition(step.cascade, {"g": ("tp", tp), "f": ("tp", tp)}, extents={**fixed, "T": 1, "U": 1, "S": 1})
    out = []
    for c in prog.collectives:
        if c.kind == "all_gather" and c.tensor in _CACHE_OUTPUTS:
            continue
        batch = extents_used(c.bytes) & _BATCH_EXTENTS
        if batch != {"T"}:
            raise KascadeError(f"serving step under tp={tp}: {c} depends on the batch through {sorted(batch)}; "
                               "the iteration model sizes a layer's collectives by its token count T only")
        itemsize = c.bytes_at(dict.fromkeys(extents_used(c.bytes), 1))
        per_token = c.bytes_at({**fixed, "T": 1}) * model.dtype_bytes / itemsize
        out.append(LayerCollective(c.kind, c.tensor, c.group, per_token))
    return tuple(out)


class ExpertCollective(NamedTuple):
    """One expert-parallel all-to-all of one MoE layer, as one GPU of an attention group sends it:
    ``fixed_bytes + bytes_per_token * tokens`` with ``tokens`` the group's tokens on that GPU (its
    share of the group's, ``1 / tp``), the buffer ``Cluster.collective_seconds`` takes for
    ``all_to_all`` (all the GPU sends, its own share included: that model's ``(n - 1) / n`` is the
    share uniform routing sends to other devices). ``tensors`` are the partitioned program's tensors
    moved in this one message."""
    tensors: tuple[str, ...]
    group: int
    fixed_bytes: float
    bytes_per_token: float


@lru_cache(maxsize=256)
def expert_collectives(model: ModelSpec, tp: int, ep: int) -> tuple[ExpertCollective, ...]:
    """The all-to-alls of one MoE layer of ``model`` under expert parallelism ``ep`` with
    ``tp``-way tensor-parallel attention groups, from :func:`~kascade.passes.partition.partition`
    with ``ep_style="all_to_all"`` of the serving step (``expert_outputs=True``: the gather form
    that the pass groups by expert) under ``x=ep:EP``, ``t=ep:EP`` (data-parallel attention: each
    group its own tokens) and ``g=tp:TP`` (memoised per model and degrees, as
    :func:`layer_collectives`).

    The pass lists, per layer: the row counts (``CNT``, ``4 * ep * X`` bytes over the group: ``X``
    i32 per device, whatever the batch: a small, latency-bound message), the dispatched expert ids
    (``ROWEXP``, i32) and token rows (``XS``), and the experts' results back (``EO``), each of the
    latter ``T * K`` rows over the whole group. Conversions:

    * per device: the tokens are split over ``ep``, so a device's buffer is ``1 / ep`` of a
      collective's ``bytes`` (the pass sizes the whole tensor over the group): per token of its
      own, ``bytes(T = 1)``;
    * per GPU of a tensor-parallel group: the ``tp`` GPUs of a group hold the same tokens after
      the attention all-reduce and each dispatches ``1 / tp`` of them (the caller divides the
      tokens by ``tp``). The pass does not shard the experts' inner rank ``f`` together with the
      all-to-all (it refuses), so it is partitioned with ``tp`` on attention only; the experts'
      ``f / tp`` split is the kernels' business (``_moe``);
    * rows at the activation dtype: the pass sizes ``XS`` and ``EO`` at their f32 accumulator type,
      engines move them at the model's (bf16); i32 metadata stays 4 bytes;
    * one message per direction and split: the ids travel with the rows they label (DeepEP and
      pplx-kernels send both in one dispatch), so all-to-alls with the same ``splits`` that follow
      each other are one collective (one set of ``ep - 1`` latencies).

    Raises :class:`KascadeError` for a dense model, ``ep`` not dividing the experts, a ``tp`` that
    does not shard attention, or a size that depends on the batch other than through ``T``."""
    if not model.is_moe:
        raise KascadeError(f"expert parallelism needs a mixture-of-experts model; {model.name} is dense")
    if ep == 1:
        return ()
    if model.experts % ep:
        raise KascadeError(f"ep={ep} does not divide the {model.experts} experts of {model.name}")
    if model.heads % tp or (model.kv_heads % tp if tp <= model.kv_heads else tp % model.kv_heads):
        raise KascadeError(f"tp={tp} must divide the {model.heads} heads and divide or be a multiple of the "
                           f"{model.kv_heads} KV heads")
    step = serving_step_cascade(model, [(1, 0)], [], tp=1, expert_outputs=True)
    groups = max(model.kv_heads, tp)
    fixed = {k: v for k, v in step.extents.items() if k not in _BATCH_EXTENTS}
    fixed |= {"G": groups, "R": model.heads // groups}
    mapping = {"x": ("ep", ep), "t": ("ep", ep)} | ({"g": ("tp", tp)} if tp > 1 else {})
    prog = partition(step.cascade, mapping, extents={**fixed, "T": ep, "U": ep, "S": ep}, ep_style="all_to_all")
    dtypes = infer_dtypes(prog.local)
    out: list[ExpertCollective] = []
    last_splits = object()
    for c in prog.collectives:
        if c.kind != "all_to_all":   # attention's all-reduce is layer_collectives'; outputs are not gathered
            continue
        batch = extents_used(c.bytes) & _BATCH_EXTENTS
        if not batch <= {"T"}:
            raise KascadeError(f"serving step under ep={ep}: {c} depends on the batch through {sorted(batch)}; "
                               "the iteration model sizes the expert all-to-alls by the token count T only")
        dtype = dtypes[c.tensor]
        scale = model.dtype_bytes / dtype.itemsize if dtype.kind is Kind.FLOAT else 1.0
        if batch:
            at1 = c.bytes_at({**fixed, "T": 1})
            size, per_token = 0.0, at1 * scale   # bytes(T) / ep per device = bytes(1) per own token
        else:
            size, per_token = c.bytes_at(fixed) * scale / ep, 0.0
        if out and c.splits is not None and c.splits == last_splits:
            prev = out[-1]
            out[-1] = prev._replace(tensors=(*prev.tensors, c.tensor), fixed_bytes=prev.fixed_bytes + size,
                                    bytes_per_token=prev.bytes_per_token + per_token)
        else:
            out.append(ExpertCollective((c.tensor,), c.group, size, per_token))
        last_splits = c.splits
    return tuple(out)


def _bucket(x: int) -> int:
    """Rounds up to a grid of 16 steps per octave above 32 (<= 4.4 % high): kernel costs are
    memoised per bucket, so a simulator's millions of calls hit a few thousand shapes."""
    if x <= 32:
        return int(x)
    step = 2 ** (math.floor(math.log2(x)) - 4)
    return int(math.ceil(x / step) * step)


class IterationModel:
    """Per-iteration time of one replica of ``model`` under ``par`` on ``cluster``."""

    def __init__(self, model: ModelSpec, cluster: Cluster, par: Parallelism, *,
                 db: KernelSeconds | None = None, block_size: int = 16):
        if not isinstance(block_size, int) or block_size < 1:
            raise KascadeError(f"block_size must be a positive integer, got {block_size!r}")
        self.model, self.cluster, self.par, self.db, self.block_size = model, cluster, par, db, block_size
        self.target = replace(cluster.target, launch_overhead_s=KERNEL_GAP_S)
        m, tp = model, par.tp
        self.heads = m.heads // tp if m.heads % tp == 0 else 0
        self.kv_heads = max(1, m.kv_heads // tp)
        self.stage_layers = math.ceil(m.layers / par.pp)
        self.ffn = m.intermediate // tp if not m.is_moe else 0
        self.local_experts = m.experts // par.ep if m.is_moe else 0
        self.expert_ffn = m.expert_intermediate // tp if m.is_moe else 0
        self.shared_ffn = m.shared_experts * m.expert_intermediate // tp if m.is_moe else 0
        self._memo: dict = {}
        self._unsharded = self._unshardable()
        self.collectives = layer_collectives(model, par.tp) if self._unsharded is None else ()
        self.expert_collectives = (expert_collectives(model, par.tp, par.ep)
                                   if self._unsharded is None and m.is_moe else ())
        # placement: tp innermost, then ep, then pp
        self.tp_spans = cluster.spans_nodes(1, par.tp)
        self.ep_spans = cluster.spans_nodes(par.tp, par.ep)
        self.pp_spans = par.pp > 1 and par.tp * par.ep * par.pp > cluster.gpus_per_node

    def sharded_shapes(self) -> dict[str, int]:
        """What one GPU of the replica holds of each layer: the shapes its kernels run at (what
        ``kascade tune`` should tune for this plan)."""
        m = self.model
        return {"heads": self.heads, "kv_heads": self.kv_heads, "head_dim": m.head_dim, "hidden": m.hidden,
                "ffn": self.ffn, "experts": self.local_experts, "experts_per_token": m.experts_per_token,
                "expert_ffn": self.expert_ffn, "shared_ffn": self.shared_ffn, "layers": self.stage_layers,
                "vocab": m.vocab // self.par.tp, "block_size": self.block_size}

    # ---- memory ------------------------------------------------------------------------------
    def weight_bytes_per_gpu(self) -> int:
        """Weights one GPU of the replica holds: its stage's layers at sharded shapes plus the
        embedding and LM head (vocabulary-parallel over ``tp``; with ``pp > 1`` the first stage
        holds the embedding and the last the head, the larger of the two counted)."""
        m, b = self.model, self.model.dtype_bytes
        q, kv = (m.heads // self.par.tp or 1) * m.head_dim, self.kv_heads * m.head_dim
        attn = m.hidden * (2 * q + 2 * kv)
        if m.is_moe:
            ffn = (m.hidden * m.experts + (self.local_experts * m.expert_intermediate // self.par.tp
                                           + self.shared_ffn) * 3 * m.hidden)
        else:
            ffn = 3 * m.hidden * (m.intermediate // self.par.tp)
        layer = attn + ffn + 2 * m.hidden
        table = m.vocab * m.hidden // self.par.tp
        ends = table * (1 if m.tied_embeddings else 2) if self.par.pp == 1 else table
        return (self.stage_layers * layer + ends + m.hidden) * b

    def kv_bytes_per_token_per_gpu(self) -> int:
        m = self.model
        return 2 * self.stage_layers * self.kv_heads * m.head_dim * m.dtype_bytes

    def activation_bytes_per_gpu(self) -> int:
        """Peak activation workspace of a ``MAX_BATCHED_TOKENS`` iteration (vLLM profiles the same):
        the widest per-token intermediates in fp32-safe margins, plus fp32 logits of 256 sequences."""
        m = self.model
        q = (m.heads // self.par.tp or 1) * m.head_dim
        widest = max(self.ffn, self.expert_ffn * m.experts_per_token, self.shared_ffn) * 2
        per_token = (4 * m.hidden + q + 2 * self.kv_heads * m.head_dim + widest) * m.dtype_bytes
        logits = 256 * (m.vocab // self.par.tp) * 4
        return MAX_BATCHED_TOKENS * per_token + logits

    def free_bytes_per_gpu(self) -> float:
        return (self.target.hbm_bytes * MEMORY_UTILISATION - self.weight_bytes_per_gpu()
                - self.activation_bytes_per_gpu())

    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache one replica holds: each of the ``ep`` attention groups stores its own
        requests' KV, sharded over its ``tp * pp`` GPUs; whole blocks of ``block_size`` only."""
        per_gpu = max(0.0, self.free_bytes_per_gpu()) // self.kv_bytes_per_token_per_gpu()
        return int(per_gpu // self.block_size * self.block_size) * self.par.ep

    def infeasible(self) -> str | None:
        """Why this plan cannot run (``None`` when it can): more GPUs than the cluster has, degrees
        that do not divide the heads / FFN / experts, weights and activations that do not fit."""
        p, c = self.par, self.cluster
        if p.gpus > c.gpus:
            return (f"the plan needs {p.gpus} GPUs (tp {p.tp} x pp {p.pp} x ep {p.ep} x dp {p.dp}); the cluster "
                    f"has {c.gpus}")
        return self._unshardable() or self._does_not_fit()

    def _unshardable(self) -> str | None:
        m, p = self.model, self.par
        if m.heads % p.tp:
            return f"tp={p.tp} does not divide the {m.heads} attention heads"
        if p.tp > m.kv_heads and p.tp % m.kv_heads or p.tp <= m.kv_heads and m.kv_heads % p.tp:
            return (f"tp={p.tp} neither divides the {m.kv_heads} KV heads nor is a multiple of them "
                    f"(to replicate them)")
        if not m.is_moe and m.intermediate % p.tp:
            return f"tp={p.tp} does not divide the FFN size {m.intermediate}"
        if m.is_moe and m.expert_intermediate % p.tp:
            return f"tp={p.tp} does not divide the expert FFN size {m.expert_intermediate}"
        if p.ep > 1 and not m.is_moe:
            return f"ep={p.ep} needs a mixture-of-experts model; {m.name} is dense"
        if m.is_moe and m.experts % p.ep:
            return f"ep={p.ep} does not divide the {m.experts} experts"
        if p.pp > m.layers:
            return f"pp={p.pp} is more stages than the {m.layers} layers"
        return None

    def _does_not_fit(self) -> str | None:
        gib = 2 ** 30
        usable = self.target.hbm_bytes * MEMORY_UTILISATION
        weights = self.weight_bytes_per_gpu()
        if weights + self.activation_bytes_per_gpu() >= usable:
            return (f"weights do not fit: {weights / gib:.1f} GiB per GPU plus "
                    f"{self.activation_bytes_per_gpu() / gib:.1f} GiB of activations, but "
                    f"{self.target.name} offers {usable / gib:.1f} GiB ({MEMORY_UTILISATION:.0%} of its memory)")
        if self.kv_capacity_tokens() < self.block_size:
            return f"no memory left for even one KV block of {self.block_size} tokens"
        return None

    def kv_transfer_seconds(self, tokens: int) -> float:
        """Moving ``tokens`` tokens of KV cache from a prefill replica to a decode replica with the
        same sharding: every GPU sends its shard at once, point to point (over the inter-node link
        when the cluster has several nodes: the instances are then taken to be on different ones)."""
        if tokens <= 0:
            return 0.0
        return self.cluster.collective_seconds("p2p", tokens * self.kv_bytes_per_token_per_gpu(), 2,
                                               self.cluster.nodes > 1)

    # ---- kernels -----------------------------------------------------------------------------
    def _kernel(self, key: tuple, kind: str, shape: dict[str, int], model: Callable[[], Prediction]) -> Kernel:
        """A kernel's time from the ``kernel_seconds`` hook when it has a record for ``shape``,
        else from the roofline ``model`` (memoised per ``key``, a shape bucket)."""
        hit = self._memo.get(key)
        if hit is None:
            pred = model()
            measured = self.db(kind, shape) if self.db is not None else None
            sec = pred.seconds if measured is None else float(measured)
            hit = self._memo[key] = Kernel(sec, pred.cost, _RESOURCE_OF_BOUND.get(pred.bound, "memory"))
        return hit

    def _gemm(self, tokens: int, n: int, k: int) -> Kernel:
        """``tokens x k`` activations times a ``k x n`` weight."""
        t = _bucket(tokens)
        return self._kernel(("gemm", t, n, k), "gemm", {"M": t, "N": n, "K": k},
                            lambda: _gemm_prediction(self.target, t, n, k, self.model.dtype_bytes))

    def _elementwise(self, tokens: int, width: int) -> Kernel:
        """Streaming kernels over ``tokens x width`` elements, each read and written once."""
        t = _bucket(tokens)
        b = self.model.dtype_bytes
        # four launches: the two norms (residual adds fused in, as vLLM does), RoPE, the activation
        cost = Cost(hbm_bytes=2.0 * t * width * b, flops=4.0 * t * width, launches=4)
        return self._kernel(("elementwise", t, width), "elementwise", {"T": t, "W": width},
                            lambda: predict(cost, self.target))

    def _prefill_attention(self, new: int, cached: int) -> Kernel:
        """One chunk of ``new`` queries over ``cached + new`` keys (causal, bottom-right aligned),
        all of this GPU's heads."""
        P, C = _bucket(new), _bucket(cached) if cached else 0
        ext = {"B": 1, "G": self.kv_heads, "R": self.heads // self.kv_heads if self.heads >= self.kv_heads else 1,
               "P": P, "M": P + C, "E": self.model.head_dim, "F": self.model.head_dim}
        return self._kernel(("prefill", P, C), "attention_prefill", ext,
                            lambda: _prefill_prediction(self.target, tuple(sorted(ext.items())),
                                                        self.model.dtype_bytes))

    def _decode_attention(self, contexts: Sequence[int]) -> Kernel:
        """Paged decode of ``len(contexts)`` sequences (split-KV partials and merge)."""
        B, L, KV = _bucket(len(contexts)), _bucket(max(contexts)), _bucket(sum(contexts))
        ext = {"B": B, "G": self.kv_heads, "R": self.heads // self.kv_heads if self.heads >= self.kv_heads else 1,
               "E": self.model.head_dim, "F": self.model.head_dim, "M0": self.block_size, "L": L,
               "KV": min(KV, B * L)}
        return self._kernel(("decode", B, L, ext["KV"]), "paged_decode", ext,
                            lambda: _decode_prediction(self.target, tuple(sorted(ext.items())),
                                                       self.model.dtype_bytes))

    def _moe(self, tokens: int) -> Kernel:
        """The routed experts one GPU runs for a micro-batch of ``tokens`` tokens (every attention
        group's): with ``ep = 1`` all ``experts`` for ``tokens`` tokens picking ``k`` each; with
        ``ep > 1`` its ``experts / ep`` experts for the ``tokens * k / ep`` (token, expert) pairs that
        uniform routing sends it, each pair a row of its own (``K = 1``)."""
        m, ep = self.model, self.par.ep
        t = _bucket(tokens)
        if ep == 1:
            shape = {"T": t, "K": m.experts_per_token, "E": m.experts}
        else:
            shape = {"T": math.ceil(t * m.experts_per_token / ep), "K": 1, "E": self.local_experts}
        shape |= {"D": m.hidden, "F": self.expert_ffn}
        return self._kernel(("moe", t), "moe", shape,
                            lambda: _moe_prediction(self.target, tuple(sorted(shape.items())),
                                                    self.model.dtype_bytes))

    # ---- one iteration -----------------------------------------------------------------------
    def iteration(self, prefill: Sequence[tuple[int, int]], decode: Sequence[int]) -> IterationCost:
        """One iteration of ONE replica: ``prefill`` chunks as ``(new tokens, tokens already in the
        cache)``, ``decode`` requests as their context lengths (the keys the new token attends to,
        itself included)."""
        if self._unsharded is not None:
            raise KascadeError(f"cannot time an iteration of {self.model.name} under {self.par}: {self._unsharded}")
        chunks = [(int(n), int(c)) for n, c in prefill if n > 0]
        contexts = [max(1, int(c)) for c in decode]
        seqs = len(chunks) + len(contexts)
        if seqs == 0:
            return IterationCost(0.0, (), 0.0, 0.0, "idle", ())
        pp = self.par.pp
        mbs = min(pp, seqs)
        parts = [self._stage(chunks[j::mbs], contexts[j::mbs]) for j in range(mbs)]
        time: dict[str, float] = {}
        resources: dict[str, float] = {}
        flops = hbm = 0.0
        for part in parts:
            _add(time, part.time)
            _add(resources, part.resources)
            flops += part.layer_flops * pp + part.head_flops
            hbm += part.layer_hbm * pp + part.head_hbm
        if pp > 1:
            slowest = max(sum(part.time.values()) for part in parts)
            bubble = (pp - mbs) * slowest
            p2p = (pp - 1) * max(self.cluster.collective_seconds(
                "p2p", part.tokens * self.model.hidden * self.model.dtype_bytes, 2, self.pp_spans) for part in parts)
            _add(time, {"pp_bubble": bubble, "p2p": p2p})
            _add(resources, {"idle": bubble, "network": p2p})
        breakdown = tuple(sorted((k, v) for k, v in time.items() if v > 0))
        res = tuple(sorted((k, v) for k, v in resources.items() if v > 0))
        seconds = sum(v for _, v in breakdown)
        bound = max(res, key=lambda kv: kv[1])[0] if res else "idle"
        return IterationCost(seconds, breakdown, flops, hbm, bound, res)

    def _stage(self, chunks: list[tuple[int, int]], contexts: list[int]) -> _Part:
        """One micro-batch through one stage (the last, which also runs the LM head). The ``ep``
        attention groups work in parallel on their shares of the requests; the slowest sets the
        pace up to the experts' all-to-all; then every GPU runs its experts on all groups' tokens."""
        m, par, L = self.model, self.par, self.stage_layers
        groups = [self._group(chunks[i::par.ep], contexts[i::par.ep]) for i in range(par.ep)]
        lead = max(groups, key=lambda g: sum(g.time.values()))
        part = _Part(dict(lead.time), dict(lead.resources), 0.0, 0.0, 0.0, 0.0, sum(g.tokens for g in groups))
        for g in groups:   # work summed over the replica's GPUs: tp of them per group
            part.layer_flops += g.layer_flops * par.tp
            part.layer_hbm += g.layer_hbm * par.tp
            part.head_flops += g.head_flops * par.tp
            part.head_hbm += g.head_hbm * par.tp
        if m.is_moe and part.tokens:
            k = self._moe(part.tokens)
            _add(part.time, {"moe": L * k.seconds})
            _add(part.resources, {k.resource: L * k.seconds})
            part.layer_flops += L * (k.cost.tensor_flops + k.cost.flops) * par.tp * par.ep
            part.layer_hbm += L * k.cost.hbm_bytes * par.tp * par.ep
            if par.ep > 1:
                # the partitioned step's count exchange, dispatch and combine, every layer of the stage:
                # each GPU of the slowest group sends the rows of its 1/tp of the group's tokens
                a2a = L * sum(self.cluster.collective_seconds(
                    "all_to_all", c.fixed_bytes + c.bytes_per_token * lead.tokens / par.tp, c.group, self.ep_spans)
                    for c in self.expert_collectives)
                _add(part.time, {"all_to_all": a2a})
                _add(part.resources, {"network": a2a})
        return part

    def _group(self, chunks: list[tuple[int, int]], contexts: list[int]) -> _Part:
        """One attention group's share of a micro-batch, as one of its ``tp`` GPUs sees it: the
        stage's layers (without the routed experts) and the LM head."""
        m, par, L = self.model, self.par, self.stage_layers
        tokens = sum(n for n, _ in chunks) + len(contexts)
        part = _Part({}, {}, 0.0, 0.0, 0.0, 0.0, tokens)
        if tokens == 0:
            return part
        q, kv = self.heads * m.head_dim, self.kv_heads * m.head_dim

        def run(kind: str, k: Kernel, times: int = L, head: bool = False) -> None:
            _add(part.time, {kind: k.seconds * times})
            _add(part.resources, {k.resource: k.seconds * times})
            flops, hbm = (k.cost.tensor_flops + k.cost.flops) * times, k.cost.hbm_bytes * times
            if head:
                part.head_flops += flops
                part.head_hbm += hbm
            else:
                part.layer_flops += flops
                part.layer_hbm += hbm

        run("gemm", self._gemm(tokens, q + 2 * kv, m.hidden))           # QKV projection
        run("gemm", self._gemm(tokens, m.hidden, q))                    # O projection
        if m.is_moe:
            run("gemm", self._gemm(tokens, m.experts, m.hidden))        # router
            if self.shared_ffn:
                run("gemm", self._gemm(tokens, 2 * self.shared_ffn, m.hidden))
                run("gemm", self._gemm(tokens, m.hidden, self.shared_ffn))
        else:
            run("gemm", self._gemm(tokens, 2 * self.ffn, m.hidden))     # gate and up
            run("gemm", self._gemm(tokens, m.hidden, self.ffn))         # down
        for n, c in chunks:
            run("attention_prefill", self._prefill_attention(n, c))
        if contexts:
            run("attention_decode", self._decode_attention(contexts))
        # two RMSNorms, RoPE on q and k, two residual adds, the SwiGLU activation
        width = 2 * m.hidden + q + kv + 2 * m.hidden + max(self.ffn, self.shared_ffn)
        run("elementwise", self._elementwise(tokens, width))
        for c in self.collectives:   # the partitioned serving step's, every layer of the stage
            sec = L * self.cluster.collective_seconds(c.kind, tokens * c.bytes_per_token, c.group, self.tp_spans)
            _add(part.time, {c.kind: sec})
            _add(part.resources, {"network": sec})
        # the LM head on the last token of each sequence, vocabulary-parallel, then its logits gathered
        logits = len(chunks) + len(contexts)
        run("lm_head", self._gemm(logits, m.vocab // par.tp, m.hidden), times=1, head=True)
        if par.tp > 1:
            ag = self.cluster.collective_seconds("all_gather", logits * m.vocab * 4, par.tp, self.tp_spans)
            _add(part.time, {"all_gather": ag})
            _add(part.resources, {"network": ag})
        return part


@dataclass
class _Part:
    """A micro-batch's (or one attention group's) time per kernel class and per resource on the
    GPU that sets the pace, and its work summed over GPUs (layers of one stage; the LM head)."""
    time: dict[str, float]
    resources: dict[str, float]
    layer_flops: float
    layer_hbm: float
    head_flops: float
    head_hbm: float
    tokens: int


def _add(into: dict[str, float], more: Mapping[str, float]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0.0) + v
