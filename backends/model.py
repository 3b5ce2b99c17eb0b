"""The roofline cost model: predicts a kernel's time from its Schedule + Config, without running it.

A kernel's :class:`Cost` is its work and traffic at each level: tensor-core FLOPs,
special-function and plain FLOPs, bytes from HBM and bytes through L2, and its grid.
Costs add (a plan's cost is the sum of its kernels'). :func:`predict` divides each
quantity by the target's rate times an efficiency factor, takes the largest term
(that roof bounds the kernel, and the prediction says which), stretches it by wave
quantisation over the SMs, and adds the launch overhead.

The efficiency factors are the model's only free numbers: defaults from published
measurements of well-tuned kernels (FlashAttention-2/3 reach 60-75 % of the tensor-core
peak; a streaming kernel 85-90 % of HBM bandwidth), to be refitted per target from
measured timings (the autotuner's calibration). Predictions rank configs; they are not
benchmarks.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kascade.backends.targets import Target
from kascade.ir.dtypes import DType
from kascade.ir.errors import KascadeError
from kascade.ir.expr import Expr, Op
from kascade.ir.extents import eval_int
from kascade.passes.schedule import Config, Schedule, padded_head_dim
from kascade.passes.schedule_decode import group_rows


@dataclass(frozen=True)
class Cost:
    """Work and traffic of one or more kernel launches (adds with ``+``)."""
    tensor_flops: float = 0.0
    special: float = 0.0          # special-function evaluations (exp, tanh, ...)
    flops: float = 0.0            # other floating-point operations on CUDA cores
    hbm_bytes: float = 0.0        # bytes that must come from (or go to) device memory
    l2_bytes: float = 0.0         # bytes every program reads, re-reads included (served by L2 or HBM)
    launches: int = 0
    wave_efficiency: float = 1.0  # busy fraction of the SMs over the kernel's waves
    mma_efficiency: float = 1.0   # tensor-core efficiency of the tile shape (small tiles waste MMA issue)
    hbm_efficiency: float = 1.0   # share of HBM bandwidth the bytes in flight can sustain (Little's law)
    latency_s: float = 0.0        # the longest program's chain of dependent loads (not stretched by waves)

    def __add__(self, other: Cost) -> Cost:
        def mean(a: float, wa: float, b: float, wb: float) -> float:
            return (a * wa + b * wb) / (wa + wb) if wa + wb else 1.0
        return Cost(self.tensor_flops + other.tensor_flops, self.special + other.special, self.flops + other.flops,
                    self.hbm_bytes + other.hbm_bytes, self.l2_bytes + other.l2_bytes,
                    self.launches + other.launches,
                    mean(self.wave_efficiency, self.launches, other.wave_efficiency, other.launches),
                    mean(self.mma_efficiency, self.tensor_flops, other.mma_efficiency, other.tensor_flops),
                    mean(self.hbm_efficiency, self.hbm_bytes, other.hbm_efficiency, other.hbm_bytes),
                    self.latency_s + other.latency_s)


@dataclass(frozen=True)
class Efficiency:
    """Achievable fractions of each peak (fitted per target by calibration)."""
    tensor: float = 0.65
    special: float = 0.8
    flops: float = 0.6
    hbm: float = 0.88
    l2: float = 0.8
    l2_bandwidth_ratio: float = 2.5   # L2 bandwidth as a multiple of HBM bandwidth (Ampere / Hopper)


@dataclass(frozen=True)
class Prediction:
    seconds: float
    bound: str                                  # the roof that bounds it: tensor, special, flops, hbm, l2, launch
    terms: tuple[tuple[str, float], ...] = field(default=())   # seconds per roof, before wave stretching
    cost: Cost = Cost()

    @property
    def roofline_seconds(self) -> float:
        """The ideal time: the largest roof at 100 % of every peak (what a kernel cannot beat)."""
        return dict(self.terms).get("ideal", self.seconds)


def predict(cost: Cost, target: Target, dtype: str = "bf16", eff: Efficiency = Efficiency()) -> Prediction:
    """Time of ``cost`` on ``target``: the largest roof, stretched by wave quantisation, plus launches."""
    tensor_rate = target.tensor_peak(dtype if dtype in target.tensor_tflops else "tf32")
    hbm = target.hbm_bandwidth
    terms = {
        "tensor": cost.tensor_flops / (tensor_rate * eff.tensor * cost.mma_efficiency),
        "special": cost.special / (target.sfu_rate * eff.special),
        "flops": cost.flops / (target.fp32_rate * eff.flops),
        "hbm": cost.hbm_bytes / (hbm * eff.hbm * cost.hbm_efficiency),
        "l2": cost.l2_bytes / (hbm * eff.l2_bandwidth_ratio * eff.l2),
    }
    ideal = max(cost.tensor_flops / tensor_rate, cost.special / target.sfu_rate, cost.flops / target.fp32_rate,
                cost.hbm_bytes / hbm)
    bound = max(terms, key=terms.get)
    body = terms[bound] / max(cost.wave_efficiency, 1e-9)
    if cost.latency_s > body:
        bound, body = "latency", cost.latency_s
    terms["latency"] = cost.latency_s
    launch = cost.launches * target.launch_overhead_s
    if launch > body:
        bound = "launch"
    return Prediction(body + launch, bound, tuple(sorted({**terms, "ideal": ideal}.items())), cost)


# ---- occupancy ---------------------------------------------------------------------------
def blocks_per_sm(target: Target, warps: int, shared_bytes: int, registers_per_thread: int) -> int:
    """Resident thread blocks per SM, limited by threads, shared memory and registers."""
    threads = warps * 32
    by_threads = target.max_threads_per_sm // threads
    by_smem = target.smem_per_sm // max(1, shared_bytes)
    by_regs = target.regs_per_sm // max(1, threads * min(registers_per_thread, target.max_regs_per_thread))
    return max(1, min(by_threads, by_smem, by_regs, 32))


def wave_efficiency(programs: int, sms: int, per_sm: int = 1) -> float:
    """Busy fraction of the SMs. Up to one wave (``sms * per_sm`` programs) it is the share of
    SMs that have work; beyond it, the last wave's idle slots stretch the run."""
    if programs <= 0:
        return 1.0
    slots = sms * per_sm
    if programs <= slots:
        return min(1.0, programs / sms)
    return programs / (math.ceil(programs / slots) * slots)


# ---- attention prefill -----------------------------------------------------------------------
def _value(e: Expr, env: Mapping[str, int]) -> int | None:
    """An offset of a mask bound (extents and int params) at concrete values."""
    e = e.rewrite(lambda n: Expr(Op.CONST, (), int(env[n.arg])) if n.op is Op.PARAM and n.arg in env else None)
    if any(n.op is Op.PARAM for n in e.walk()):
        return None
    try:
        return eval_int(e, env)
    except KeyError:
        return None


def _key_tiles(schedule: Schedule, config: Config, extents: Mapping[str, int], params: Mapping[str, int]) -> int:
    """Key tiles visited over all query tiles of one (batch, head): the loop bounds the
    kernel derives from the mask's ``m <= p + c`` / ``m >= p - c`` conjuncts."""
    body = schedule.kernels[0].body
    c = schedule.cascade
    P, M = extents[c.rank_extent(body.query)], extents[c.rank_extent(body.key)]
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    env = {**extents, **{k: v for k, v in params.items() if isinstance(v, int)}}
    total = 0
    for start in range(0, P, bm):
        first, last = start, min(start + bm, P) - 1
        lo, hi = 0, M
        for kb in body.key_bounds:
            off = _value(kb.offset, env)
            if off is None:
                continue
            if kb.side == "upper":
                hi = min(hi, kb.coeff * last + off + 1)
            else:
                lo = max(lo, kb.coeff * first + off)
        lo = max(0, lo) // bn * bn
        total += max(0, math.ceil((hi - lo) / bn))
    return total


def attention_prefill_cost(schedule: Schedule, config: Config, extents: Mapping[str, int], target: Target,
                           itemsize: int = 2, params: Mapping[str, int | float] | None = None) -> Cost:
    """Cost of the fused prefill kernel: every program streams its key tiles (K and V re-read
    once per query tile), tiles the mask excludes are skipped, padding is computed."""
    body = schedule.kernels[0].body
    c = schedule.cascade
    P = extents[c.rank_extent(body.query)]
    E, F = (padded_head_dim(extents[c.rank_extent(r)]) for r in (body.head, body.vhead))
    heads = math.prod(extents[c.rank_extent(r)] for r in body.grid_ranks)
    kv_heads = math.prod(extents[c.rank_extent(r)] for r in body.grid_ranks if r in body.k.ranks)
    bm, bn, warps = config["BLOCK_M"], config["BLOCK_N"], config["num_warps"]
    tiles = _key_tiles(schedule, config, extents, params or {}) * heads       # (program, key tile) pairs
    scores = tiles * bm * bn
    programs = math.ceil(P / bm) * heads
    M = extents[c.rank_extent(body.key)]
    q_and_o = heads * P * (E + F) * itemsize
    kv_once = kv_heads * M * (E + F) * itemsize
    kv_reads = tiles * bn * (E + F) * itemsize
    shared = itemsize * (bm * E + max(1, config["num_stages"] - 1) * bn * (E + F))
    regs = min(255, bm * (bn + F + E) // (32 * warps) * (2 if itemsize >= 4 else 1) + 32)
    per_sm = blocks_per_sm(target, warps, shared, regs)
    slots = target.sm_count * per_sm
    # Programs run in pid order, query tiles fastest: the n_qtiles * R programs that read one KV
    # head are consecutive, so the heads in flight at once are about slots / (n_qtiles * R). While
    # their K/V fit in L2, every re-read hits L2 and HBM sees each K/V once.
    per_head_kv = kv_once / max(1, kv_heads)
    readers = math.ceil(P / bm) * (heads // max(1, kv_heads))
    in_flight = min(kv_heads, max(1, math.ceil(slots / max(1, readers)))) * per_head_kv
    hbm_kv = kv_once * min(max(1.0, in_flight / target.l2_bytes), kv_reads / max(1, kv_once))
    mma = 2.0 * scores * (E + F)
    # fp32 inputs use Triton's exact dot, which runs on the FMA units, not the tensor cores
    tensor, plain = (0.0, mma) if itemsize >= 4 else (mma, 0.0)
    return Cost(tensor_flops=tensor, special=float(scores), flops=8.0 * scores + plain,
                hbm_bytes=float(q_and_o + hbm_kv), l2_bytes=float(kv_reads + q_and_o), launches=1,
                wave_efficiency=wave_efficiency(programs, target.sm_count, per_sm),
                mma_efficiency=_tile_efficiency(bm, bn, warps, config["num_stages"]))


def _tile_efficiency(bm: int, bn: int, warps: int, stages: int) -> float:
    """Tensor-core efficiency lost to small tiles (each warp's MMA needs 16+ rows and several
    k-steps in flight), to too few warps to hide latency, and to an unpipelined key loop
    (one stage: every K/V load waits). A prior, refitted by calibration."""
    rows_per_warp = bm / warps
    mma = min(1.0, rows_per_warp / 16) * min(1.0, bn / 64) ** 0.5
    latency = min(1.0, warps / 4) ** 0.5
    pipeline = {1: 0.7, 2: 0.92}.get(stages, 1.0)
    return max(0.05, mma * latency * pipeline)


# ---- paged decode (split-KV partials + merge) ---------------------------------------------
HBM_LATENCY_S = 700e-9    # a dependent HBM load on A100/H100-class parts (microbenchmarks: ~500-800 ns)
WORKSPACE_ITEMSIZE = 4    # the partials are fp32


def decode_extents(shapes: Mapping[str, int]) -> dict[str, int]:
    """A decode workload's sizes: sequences ``B``, KV heads ``G``, query heads per KV head ``R``,
    head dims ``E``/``F``, page size ``M0``, the longest sequence ``L`` and the keys over the
    whole batch ``KV`` (default ``B * L``: every sequence as long as the longest)."""
    out = {k: int(shapes[k]) for k in ("B", "G", "R", "E", "F", "M0", "L")}
    out["KV"] = int(shapes.get("KV", out["B"] * out["L"]))
    return out


def paged_decode_cost(schedule: Schedule, config: Config, extents: Mapping[str, int], target: Target,
                      itemsize: int = 2, params: Mapping[str, int | float] | None = None) -> Cost:
    """Cost of split-KV paged decode at the sizes of :func:`decode_extents`: the partial kernel
    (``num_splits * G * B`` programs, each streaming its split's pages ``BLOCK_N`` keys per step,
    all ``R`` query heads of a KV head padded to ``BLOCK_R`` rows in one MMA) and the merge
    (the fp32 partials written and read back once more per split).

    Decode is bandwidth-bound when the GPU is full; with few programs it is latency-bound, which
    the Little's-law factor ``hbm_efficiency`` says: the bytes the resident programs keep in flight
    (``num_stages - 1`` tiles each) divided by what HBM needs in flight to run at full rate, beyond
    the idle SMs that the wave efficiency already charges for."""
    x = decode_extents(extents)
    B, G, R, E, F, M0, L, KV = (x[k] for k in ("B", "G", "R", "E", "F", "M0", "L", "KV"))
    bn, warps, stages, C = config["BLOCK_N"], config["num_warps"], config["num_stages"], config["num_splits"]
    Ep, Fp, rows = padded_head_dim(E), padded_head_dim(F), group_rows(R)
    pages = max(1, math.ceil(L / M0))
    per_split = math.ceil(pages / C) * M0                       # keys of a full split
    busy = math.ceil(L / per_split) if L else 0                 # splits of the longest sequence with keys
    steps = sum(math.ceil(min(per_split, L - i * per_split) / bn) for i in range(busy))
    fill = KV / (B * L) if B * L else 0.0                       # shorter sequences do proportionally less
    key_steps = G * B * steps * fill
    scores = key_steps * bn * rows
    kv_bytes = G * KV * (E + F) * itemsize
    partials = B * G * R * C * (F + 2) * WORKSPACE_ITEMSIZE
    q_bytes = B * G * R * E * itemsize * C                      # every split reads its queries
    programs = C * G * B
    shared = itemsize * (rows * Ep + max(1, stages - 1) * bn * (Ep + Fp))
    regs = min(255, (rows * (bn + Fp) + (rows * Ep + 2 * bn * (Ep + Fp)) * itemsize // 4) // (32 * warps) + 32)
    per_sm = blocks_per_sm(target, warps, shared, regs)
    resident = min(programs, target.sm_count * per_sm)
    waves = wave_efficiency(programs, target.sm_count, per_sm)
    # a one-stage loop waits for each tile (half a tile in flight, on average); more stages prefetch
    tiles_ahead = stages - 1 if stages > 1 else 0.5
    in_flight = resident * tiles_ahead * bn * (E + F) * itemsize
    needed = target.hbm_bandwidth * HBM_LATENCY_S
    # the longest split's steps, each a block-table read then the K/V loads it addresses (two
    # dependent loads), overlapped with the prefetched steps
    chain = math.ceil(min(per_split, L) / bn) * 2 * HBM_LATENCY_S / max(1.0, tiles_ahead)
    mma = 2.0 * scores * (Ep + Fp)
    tensor, plain = (0.0, mma) if itemsize >= 4 else (mma, 0.0)
    # per step: the online softmax's row max and sum, and the accumulator's rescale
    rescale = key_steps * rows * (2 * Fp + 8)
    partial = Cost(tensor_flops=tensor, special=float(scores + key_steps * rows), flops=6.0 * scores + rescale + plain,
                   hbm_bytes=float(kv_bytes + q_bytes + partials), l2_bytes=float(kv_bytes + q_bytes + partials),
                   launches=1, wave_efficiency=waves,
                   mma_efficiency=_tile_efficiency(rows, bn, min(warps, max(1, rows // 16)), stages),
                   hbm_efficiency=min(1.0, in_flight / needed / waves), latency_s=chain)
    merge_programs = B * G * R
    merge = Cost(flops=4.0 * B * G * R * C * (F + 2), special=float(B * G * R * C),
                 hbm_bytes=float(partials + B * G * R * F * itemsize), l2_bytes=float(partials),
                 launches=1, wave_efficiency=wave_efficiency(merge_programs, target.sm_count, 8))
    return partial + merge


def _decode_candidates(schedule: Schedule, extents: Mapping[str, int], sizes: Mapping[str, int]):
    """The decode space with the split count limited to useful values: at most one split per page
    of the longest sequence (more only adds empty programs and merge traffic)."""
    x = decode_extents(extents)
    pages = max(1, math.ceil(x["L"] / x["M0"]))
    base = {ch.name: ch.values for ch in schedule.space if ch.name != "num_splits"}
    splits = [c for ch in schedule.space if ch.name == "num_splits" for c in ch.values if c <= pages] or [1]
    names = sorted(base)
    for combo in itertools.product(*(base[n] for n in names)):
        for c in splits:
            cfg = Config.of(dict(zip(names, combo)), num_splits=c)
            if schedule.feasible(cfg, sizes) is None:
                yield cfg


def _prefill_candidates(schedule: Schedule, extents: Mapping[str, int], sizes: Mapping[str, int]):
    return schedule.configs(sizes)


# kernel family of a schedule's first kernel -> (cost rule, candidate configs). Other families
# (the MoE grouped GEMMs) register here from their own module.
COST_RULES: dict[str, tuple[Callable, Callable]] = {
    "attention_prefill": (attention_prefill_cost, _prefill_candidates),
    # packed sequences: costed as the dense kernel at the longest sequence (the caller's extents)
    "attention_prefill_varlen": (attention_prefill_cost, _prefill_candidates),
    "paged_decode_partial": (paged_decode_cost, _decode_candidates),
}


RULE_MODULES = ("kascade.backends.moe_cost",)   # modules that add to COST_RULES when imported


def cost_rule(schedule: Schedule) -> tuple[Callable, Callable]:
    family = schedule.kernels[0].family
    if family not in COST_RULES:
        for module in RULE_MODULES:
            importlib.import_module(module)
    if family not in COST_RULES:
        raise KascadeError(f"the cost model has no rule for kernel family {family!r}; it has rules for "
                           f"{', '.join(sorted(COST_RULES))}")
    return COST_RULES[family]


def schedule_cost(schedule: Schedule, config: Config, extents: Mapping[str, int], target: Target,
                  itemsize: int = 2, params: Mapping[str, int | float] | None = None) -> Cost:
    """The cost of ``schedule`` at ``config`` by the rule of its kernel family."""
    return cost_rule(schedule)[0](schedule, config, extents, target, itemsize, params)


def input_dtype(schedule: Schedule) -> DType:
    """The element type of a schedule's main input (attention's queries, MoE's tokens): what its
    kernels are specialised to and what tuning records are keyed by."""
    body = schedule.kernels[0].body
    role = getattr(body, "q", None) or getattr(body, "x", None)
    if role is None:
        raise KascadeError(f"kernel family {schedule.kernels[0].family!r} names no main input (q or x)")
    return role.dtype


def schedule_sizes(schedule: Schedule, extents: Mapping[str, int], itemsize: int) -> dict[str, int]:
    """What the schedule's constraints read: head dims ``E``/``F``, query heads per KV head ``R``
    (decode), the element size."""
    c, body = schedule.cascade, schedule.kernels[0].body
    out = {"itemsize": itemsize}
    roles = (("E", "head"), ("F", "vhead"), ("R", "group"), ("D", "hidden"), ("F", "inner"))   # inner: MoE's FFN
    for sym, rank in ((sym, getattr(body, role, None)) for sym, role in roles):
        if rank is not None and c.rank_extent(rank) in extents:
            out[sym] = extents[c.rank_extent(rank)]
    return out


def rank_configs(schedule: Schedule, extents: Mapping[str, int], target: Target, itemsize: int = 2,
                 params: Mapping[str, int | float] | None = None,
                 eff: Efficiency = Efficiency()) -> list[tuple[Prediction, Config]]:
    """Every candidate config with its prediction, fastest first (ties broken by the config key)."""
    cost, candidates = cost_rule(schedule)
    sizes = schedule_sizes(schedule, extents, itemsize)
    dtype = {2: "bf16", 4: "tf32"}.get(itemsize, "bf16")
    out = [(predict(cost(schedule, cfg, extents, target, itemsize, params), target, dtype, eff), cfg)
           for cfg in candidates(schedule, extents, sizes)]
    return sorted(out, key=_rank_key)


def _rank_key(pc: tuple[Prediction, Config]) -> tuple:
    """Fastest first; within 0.1 % (configs the same roof bounds equally), the one with less work
    on the other roofs, then the config key (deterministic)."""
    pred, cfg = pc
    slack = sum(v for k, v in pred.terms if k not in ("ideal", "latency"))
    return (float(f"{pred.seconds:.3g}"), slack, cfg.key())
