"""Renders an expert-grouped MoE :class:`~kascade.passes.schedule.Schedule` + Config to Triton modules.

The template (``moe_grouped_gemm.py.j2``, next to this file) holds the family of
:func:`~kascade.passes.schedule_moe.moe_schedule`: grouped GEMM 1 with the activation in its
epilogue (``moe_gate_up``), grouped GEMM 2 (``moe_down``, its epilogue chosen by
``WEIGHT_IN_DOWN`` / ``FUSED_COMBINE``) and, without the fused combine, ``moe_combine``. This
module computes their leaf values: the activation lowered by :mod:`kascade.codegen.triton_expr`
with its gate / up reads bound to the two accumulators, the arguments, dtypes and readable
variant names (``moe_gate_up_silu_bm64_bn128_bk64_g8_w8_s3_fp16_1a2b3c4d``; the last part is a
hash of what the kernel computes).

The kernels read the routing bookkeeping of :func:`kascade.backends.moe_routing.align_blocks`
(``SORTED_PAIRS``, ``BLOCK_EXPERT``, ``NUM_ROWS``) and take the token count, ``K`` and the
dims as runtime arguments, so one source serves every batch. Their launch extents are named
:data:`ROWS` (the row capacity, a multiple of ``BLOCK_M``), :data:`PAIRS`, :data:`TOKENS`,
:data:`TOP_K`, :data:`HIDDEN` and :data:`INNER`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kascade.codegen.source import DTYPE_NAMES, KernelArg, KernelSource, template
from kascade.codegen.triton_expr import Binding, emit
from kascade.ir.dtypes import DType
from kascade.ir.errors import CodegenError
from kascade.ir.expr import Op
from kascade.passes.schedule import Config, Schedule, TensorRole, padded_head_dim
from kascade.passes.schedule_moe import MoeGrouped

TEMPLATE = Path(__file__).with_name("moe_grouped_gemm.py.j2")
ROWS, PAIRS, TOKENS, TOP_K, HIDDEN, INNER = "ROWS", "PAIRS", "T", "K", "D", "F"
COMBINE_MAX_BLOCK_D = 512
COMBINE_WARPS = 4
ROUTING = ("SORTED_PAIRS", "BLOCK_EXPERT", "NUM_ROWS")
RESOURCE_RULES = ("tile_waste", "registers", "shared_memory")   # what check=False lets through


@dataclass(frozen=True)
class MoeSources:
    """The rendered kernels of one config; ``combine`` is None with ``FUSED_COMBINE=1`` (the
    down kernel's output ``OUT`` is then the fp32 ``(T, D)`` output, else the ``(T*K, D)`` rows)."""
    gate_up: KernelSource
    down: KernelSource
    combine: KernelSource | None
    config: Config

    @property
    def kernels(self) -> tuple[KernelSource, ...]:
        return tuple(k for k in (self.gate_up, self.down, self.combine) if k is not None)


def render(schedule: Schedule, config: Config, sizes: Mapping[str, int], *, check: bool = True) -> MoeSources:
    """The kernels for ``config`` at ``sizes`` (hidden ``D`` and FFN ``F``). ``check=False``
    renders a config the schedule's constraints reject (to measure it with ``backends/aot.py``)."""
    body: MoeGrouped = schedule.kernels[0].body
    if not isinstance(body, MoeGrouped):
        raise CodegenError(f"render needs a schedule from moe_schedule, got kernels "
                           f"{[k.family for k in schedule.kernels]}")
    missing = [s for s in ("D", "F") if s not in sizes]
    if missing:
        raise CodegenError(f"render needs {missing} in sizes= (D hidden, F FFN), got {dict(sizes)}")
    dtype = body.x.dtype
    if dtype not in DTYPE_NAMES:
        raise CodegenError(f"MoE kernels take fp16, bf16 or fp32 activations and weights, not {dtype}")
    why = schedule.feasible(config, {"D": sizes["D"], "F": sizes["F"], "itemsize": dtype.itemsize})
    if why is not None and (check or why.split(":")[0] not in RESOURCE_RULES):
        raise CodegenError(f"config {config.key()} is not feasible: {why}")
    kernels = _Family(schedule, config, int(sizes["D"]))
    combine = None if config["FUSED_COMBINE"] else kernels.combine()
    return MoeSources(kernels.gate_up(), kernels.down(), combine, config)


def _digest(*parts) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:8]


class _Family:
    """The leaf values shared by the three kernels, and each kernel's arguments."""

    def __init__(self, schedule: Schedule, config: Config, hidden: int):
        self.s, self.cfg, self.b = schedule, config, schedule.kernels[0].body
        self.c = schedule.cascade
        self.dtype: DType = self.b.x.dtype
        self.block_d = min(COMBINE_MAX_BLOCK_D, padded_head_dim(hidden))
        self.wd, self.fc = bool(config["WEIGHT_IN_DOWN"]), bool(config["FUSED_COMBINE"])
        self.eo = TensorRole("EO", (self.b.token, self.b.hidden), self.dtype)   # rows in pair order

    def common(self, kind: str, name: str) -> dict:
        b, c = self.b, self.c
        stmt = {s.name: s for s in c.einsums}
        ir = lambda n: f"{n}[{', '.join(stmt[n].ranks)}] = {stmt[n].expr}"  # noqa: E731
        return dict(kind=kind, name=name, cascade_name=c.name, cascade_hash=c.structural_hash()[:12],
                    config_key=self.cfg.key(), gu_ir=ir(b.gu), act_ir=ir(b.act), eo_ir=ir(b.eo),
                    y_ir=ir(b.out.name), inner=b.inner, hidden=b.hidden, tw_name=b.weights.name,
                    weight_in_down=self.wd, fused_combine=self.fc, residual=b.residual is not None,
                    dot_kwargs=', input_precision="ieee"' if self.dtype is DType.F32 else "")

    def tiles(self) -> str:
        cfg = self.cfg
        return (f"bm{cfg['BLOCK_M']}_bn{cfg['BLOCK_N']}_bk{cfg['BLOCK_K']}_g{cfg['GROUP_M']}_w{cfg['num_warps']}_"
                f"s{cfg['num_stages']}")

    def consts(self) -> tuple[tuple[str, int], ...]:
        return tuple((n, self.cfg[n]) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))

    def gate_up(self) -> KernelSource:
        b = self.b
        act_role = TensorRole("ACT", (b.row, b.inner), self.dtype)
        args = _Args()
        args.pointers(("X", self.dtype), ("W13", self.dtype), ("ACT", self.dtype), *_routing())
        args.strides("X", "x", ("t", "d"))
        args.strides("W13", "w13", ("x", "h", "f", "d"))
        args.strides("ACT", "act", ("q", "f"))
        args.extents(("num_pairs", PAIRS), ("top_k", TOP_K), ("hidden", HIDDEN), ("inner", INNER))
        fns = sorted({n.arg for n in b.activation.walk() if n.op is Op.FUNC})
        name = "_".join(["moe_gate_up", *fns, self.tiles(), DTYPE_NAMES[self.dtype],
                         _digest(b.activation, b.x, b.w13, b.gate, b.up)])
        activation = emit(b.activation, Binding(nodes={b.gate: "acc_g", b.up: "acc_u"}))
        p = dict(self.common("gate_up", name), args=args.lines(), activation=activation)
        grid = (((ROWS,), "BLOCK_M"), ((INNER,), "BLOCK_N"))
        return KernelSource(name, template(TEMPLATE).render(p=p), args.args, self.consts(), self.cfg["num_warps"],
                            self.cfg["num_stages"], grid, act_role, (ROWS, INNER))

    def down(self) -> KernelSource:
        b = self.b
        out = TensorRole("OUT", (b.token, b.hidden), DType.F32) if self.fc else self.eo
        args = _Args()
        args.pointers(("ACT", self.dtype), ("W2", self.dtype), ("TW", DType.F32), ("OUT", out.dtype), *_routing())
        args.strides("ACT", "act", ("q", "f"))
        args.strides("W2", "w2", ("x", "d", "f"))
        args.strides("TW", "tw", ("t", "k"))
        args.strides("OUT", "out", ("t", "d") if self.fc else ("r", "d"))
        args.extents(("num_pairs", PAIRS), ("top_k", TOP_K), ("hidden", HIDDEN), ("inner", INNER))
        name = "_".join(["moe_down", f"wd{int(self.wd)}", f"fc{int(self.fc)}", self.tiles(), DTYPE_NAMES[self.dtype],
                         _digest(b.w2, b.weights, self.wd, self.fc)])
        p = dict(self.common("down", name), args=args.lines())
        grid = (((ROWS,), "BLOCK_M"), ((HIDDEN,), "BLOCK_N"))
        extents = (TOKENS, HIDDEN) if self.fc else (PAIRS, HIDDEN)
        return KernelSource(name, template(TEMPLATE).render(p=p), args.args, self.consts(), self.cfg["num_warps"],
                            self.cfg["num_stages"], grid, out, extents)

    def combine(self) -> KernelSource:
        b = self.b
        args = _Args()
        pointers = [("EO", self.dtype), ("TW", DType.F32), ("Y", b.out.dtype)]
        if b.residual is not None:
            pointers.append(("R", b.residual.dtype))
        args.pointers(*pointers)
        args.strides("EO", "eo", ("r", "d"))
        args.strides("TW", "tw", ("t", "k"))
        args.strides("Y", "y", ("t", "d"))
        if b.residual is not None:
            args.strides("R", "r", ("t", "d"))
        args.extents(("top_k", TOP_K), ("hidden", HIDDEN))
        name = "_".join(["moe_combine", f"wd{int(self.wd)}", *(["res"] if b.residual else []), f"bd{self.block_d}",
                         DTYPE_NAMES[self.dtype], _digest(b.out, b.weights, b.residual, self.wd)])
        p = dict(self.common("combine", name), args=args.lines())
        grid = (((TOKENS,), None), ((HIDDEN,), "BLOCK_D"))
        return KernelSource(name, template(TEMPLATE).render(p=p), args.args, (("BLOCK_D", self.block_d),),
                            COMBINE_WARPS, 1, grid, TensorRole("Y", (b.token, b.hidden), b.out.dtype),
                            (TOKENS, HIDDEN))


def _routing() -> tuple[tuple[str, DType], ...]:
    return tuple((n, DType.I32) for n in ROUTING)


class _Args:
    """A kernel's runtime arguments in signature order, named as the template names them:
    pointers (referring to the launch's tensors by the same name), each tensor's strides
    (its last dim last: ``backends/aot.py`` takes the last stride of a tensor as its unit one),
    then extents."""

    def __init__(self):
        self.args: tuple[KernelArg, ...] = ()
        self.groups: list[list[str]] = []

    def add(self, group: list[KernelArg]) -> None:
        self.args += tuple(group)
        self.groups.append([a.name for a in group])

    def pointers(self, *named: tuple[str, DType]) -> None:
        self.add([KernelArg(n, "pointer", n, dtype=dt) for n, dt in named])

    def strides(self, tensor: str, short: str, dims: tuple[str, ...]) -> None:
        self.add([KernelArg(f"stride_{short}_{d}", "stride", tensor, i) for i, d in enumerate(dims)])

    def extents(self, *named: tuple[str, str]) -> None:
        self.add([KernelArg(n, "extent", sym) for n, sym in named])

    def lines(self) -> list[str]:
        return [", ".join(g) for g in self.groups]
