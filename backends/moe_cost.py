"""The roofline cost of the expert-grouped MoE kernels (``passes/schedule_moe.py``), without running them.

What the three kernels do for ``T`` tokens, ``K`` choices, ``E`` experts, hidden ``D`` and
FFN ``F``, with routing assumed uniform (the cost model's prior; a skewed routing only
changes how many experts are touched and how many rows each gets):

- ``E_active = E (1 - (1 - K/E)^T)`` experts get tokens (each token picks K distinct ones;
  with K = 1 this is ``E (1 - (1 - 1/E)^(T*K))``), ``T*K / E_active`` rows each,
  padded to whole ``BLOCK_M`` blocks: the tensor FLOPs of both GEMMs count the padded rows
  (a decode batch's 16-row blocks holding one or two real rows are mostly padding);
- weights come from HBM for the touched experts only, re-read once per ``GROUP_M`` row blocks
  of an expert when its weights do not stay in L2 (a prefill expert's many row blocks);
- activations: ``x`` rows gathered per pair, the ``ACT`` rows written and read back, the
  down GEMM's rows written and read by the combine (``FUSED_COMBINE=0``) or added into an
  fp32 output by atomics (``FUSED_COMBINE=1``: read-modify-write in L2, the output zeroed
  and cast around it);
- programs and waves per kernel (grids of row blocks times ``N`` tiles), and the launches
  (the routing bookkeeping's torch operations included).

A decode-sized batch is weight streaming (HBM-bound: the touched experts' weights dwarf
everything else); a prefill-sized one is tensor-bound. Predictions rank configs; they are
not benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from kascade.backends.model import COST_RULES, Cost, Prediction, blocks_per_sm, rank_configs, wave_efficiency
from kascade.backends.targets import Target
from kascade.ir.errors import KascadeError
from kascade.passes.schedule import Config, Schedule
from kascade.passes.schedule_moe import expected_experts

ROUTING_LAUNCHES = 8   # align_blocks: bincount, cumsums, sort, scatter, searchsorted, ... (torch)
_DTYPE_NAMES = {2: "bf16", 4: "tf32"}


def _dims(shapes: Mapping[str, int]) -> tuple[int, int, int, int, int]:
    missing = [s for s in ("T", "K", "E", "D", "F") if s not in shapes]
    if missing:
        raise KascadeError(f"the MoE cost needs {missing} in shapes (T tokens, K experts per token, E experts, "
                           f"D hidden, F FFN), got {dict(shapes)}")
    return tuple(int(shapes[s]) for s in ("T", "K", "E", "D", "F"))


def _mma_efficiency(bm: int, bn: int, warps: int, stages: int) -> float:
    """Tensor-core efficiency lost to small tiles (a warp's MMA wants 16+ rows and a wide N),
    to few warps and to a shallow pipeline. A prior, to be refitted by calibration."""
    rows_per_warp = bm / max(1, warps // 2)
    tile = min(1.0, rows_per_warp / 16) * min(1.0, bn / 64) ** 0.5
    pipeline = {1: 0.7, 2: 0.9}.get(stages, 1.0)
    return max(0.05, tile * min(1.0, warps / 4) ** 0.5 * pipeline)


def moe_cost(schedule: Schedule, config: Config, shapes: Mapping[str, int], target: Target,
             itemsize: int = 2, params: Mapping[str, int | float] | None = None) -> Cost:
    """The summed cost of the gate-up, down and (unfused) combine kernels plus the routing's
    launches for ``shapes`` (``T``, ``K``, ``E``, ``D``, ``F``) and ``itemsize``-byte weights."""
    T, K, E, D, F = _dims(shapes)
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    warps, stages, group = config["num_warps"], config["num_stages"], config["GROUP_M"]
    fused = bool(config["FUSED_COMBINE"])
    pairs = T * K
    if pairs == 0:
        return _with_launches(Cost(), 0)
    active = max(1.0, expected_experts(E, T, K))
    blocks_per_expert = math.ceil(pairs / active / bm)
    row_blocks = active * blocks_per_expert
    rows = row_blocks * bm                                   # padded rows both GEMMs compute
    fp32 = itemsize >= 4
    shared = itemsize * stages * bk * (bm + 2 * bn)
    per_sm = blocks_per_sm(target, warps, shared, min(255, 2 * bm * bn // (32 * warps) + 96))
    # weights: read once per group of GROUP_M row blocks of an expert, unless they stay in L2
    w13, w2 = 2 * F * D * itemsize, D * F * itemsize
    rereads = 1 if (w13 + w2) * active <= target.l2_bytes / 2 else math.ceil(blocks_per_expert / group)

    def gemm(n: int, k: int, weight_bytes: int, act_bytes: float, out_bytes: float, flops_per_mac: int) -> Cost:
        mma = 2.0 * rows * n * k * flops_per_mac
        programs = int(row_blocks * math.ceil(n / bn))
        return Cost(tensor_flops=0.0 if fp32 else mma, flops=mma if fp32 else 0.0,
                    hbm_bytes=active * weight_bytes * rereads + act_bytes + out_bytes,
                    l2_bytes=row_blocks * weight_bytes + act_bytes * math.ceil(n / bn) + out_bytes, launches=1,
                    wave_efficiency=wave_efficiency(programs, target.sm_count, per_sm),
                    mma_efficiency=_mma_efficiency(bm, bn, warps, stages))

    x_rows = pairs * D * itemsize
    act_rows = pairs * F * itemsize
    gate_up = gemm(F, D, w13, x_rows + T * K * 4, act_rows, 2)
    gate_up = gate_up + Cost(special=float(rows * F), flops=4.0 * rows * F)   # the activation's exp and FMAs
    if fused:   # fp32 atomics: read-modify-write in L2; zeroing and the final cast touch HBM
        down = gemm(D, F, w2, act_rows, T * D * 4, 1) + Cost(l2_bytes=2.0 * pairs * D * 4, flops=float(pairs * D))
        zero_and_cast = Cost(hbm_bytes=T * D * (4 + 4 + itemsize))
        return _with_launches(gate_up + down + zero_and_cast, 2)
    down = gemm(D, F, w2, act_rows, pairs * D * itemsize, 1)
    combine_bytes = pairs * D * itemsize + T * D * itemsize
    combine = Cost(hbm_bytes=combine_bytes, l2_bytes=combine_bytes, flops=2.0 * pairs * D, launches=1,
                   wave_efficiency=wave_efficiency(T * math.ceil(D / 512), target.sm_count, 8))
    return _with_launches(gate_up + down + combine, 0)


def _with_launches(kernels: Cost, torch_ops: int) -> Cost:
    """Adds the launches of the routing bookkeeping and of ``torch_ops`` other torch operations,
    which cost launch time but take no part in the kernels' wave efficiency (a mean over launches)."""
    return replace(kernels, launches=kernels.launches + ROUTING_LAUNCHES + torch_ops)


def rank_moe_configs(schedule: Schedule, shapes: Mapping[str, int], target: Target,
                     itemsize: int = 2) -> list[tuple[Prediction, Config]]:
    """Every feasible config with its prediction, fastest first (the model's generic ranking)."""
    _dims(shapes)
    return rank_configs(schedule, shapes, target, itemsize)


def _candidates(schedule: Schedule, shapes: Mapping[str, int], sizes: Mapping[str, int]):
    return schedule.configs(sizes)


COST_RULES["moe_gate_up"] = (moe_cost, _candidates)
