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

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from kascade.backends.targets import Target
from kascade.ir.expr import Expr, Op
from kascade.ir.extents import eval_int
from kascade.passes.schedule import Config, Schedule, padded_head_dim


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

    def __add__(self, other: Cost) -> Cost:
        def mean(a: float, wa: float, b: float, wb: float) -> float:
            return (a * wa + b * wb) / (wa + wb) if wa + wb else 1.0
        return Cost(self.tensor_flops + other.tensor_flops, self.special + other.special, self.flops + other.flops,
                    self.hbm_bytes + other.hbm_bytes, self.l2_bytes + other.l2_bytes,
                    self.launches + other.launches,
                    mean(self.wave_efficiency, self.launches, other.wave_efficiency, other.launches),
                    mean(self.mma_efficiency, self.tensor_flops, other.mma_efficiency, other.tensor_flops))


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
        "hbm": cost.hbm_bytes / (hbm * eff.hbm),
        "l2": cost.l2_bytes / (hbm * eff.l2_bandwidth_ratio * eff.l2),
    }
    ideal = max(cost.tensor_flops / tensor_rate, cost.special / target.sfu_rate, cost.flops / target.fp32_rate,
                cost.hbm_bytes / hbm)
    bound = max(terms, key=terms.get)
    body = terms[bound] / max(cost.wave_efficiency, 1e-9)
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


def rank_configs(schedule: Schedule, extents: Mapping[str, int], target: Target, itemsize: int = 2,
                 params: Mapping[str, int | float] | None = None) -> list[tuple[Prediction, Config]]:
    """Every feasible config with its prediction, fastest first (ties broken by the config key)."""
    c, body = schedule.cascade, schedule.kernels[0].body
    sizes = {"E": extents[c.rank_extent(body.head)], "F": extents[c.rank_extent(body.vhead)], "itemsize": itemsize}
    out = [(predict(attention_prefill_cost(schedule, cfg, extents, target, itemsize, params), target), cfg)
           for cfg in schedule.configs(sizes)]
    return sorted(out, key=lambda pc: (pc[0].seconds, pc[1].key()))

